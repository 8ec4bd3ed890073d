//! [`MemoryDedup`]: the dedup store in process memory, with the same
//! claim / commit / release rules as Redis; for the embedded default and
//! single-process deployments. Its tests pin those rules.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::{Claim, DedupError, DedupPolicy, LeaseToken};
use crate::payload::VerificationId;

enum MemoryEntry {
    Lease { token: LeaseToken, expires: Instant },
    Committed { expires: Instant },
}

/// In-process store with the same semantics; for the embedded default and
/// single-process deployments.
pub struct MemoryDedup {
    /// Guarded by a std mutex: every critical section is a few map operations
    /// with no await inside.
    entries: Mutex<HashMap<String, MemoryEntry>>,
    policy: DedupPolicy,
}

/// Expired entries are swept once the map grows past this many since the
/// last sweep, keeping memory bounded without a background task.
const MEMORY_SWEEP_EVERY: usize = 10_000;

impl MemoryDedup {
    /// An empty store; leases and records expire per `policy`.
    pub fn new(policy: DedupPolicy) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            policy,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, MemoryEntry>> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (each operation is a single insert or remove), so poison is ignored.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn claim(&self, id: &VerificationId, now: Instant) -> Claim {
        let mut entries = self.lock();
        if entries.len() % MEMORY_SWEEP_EVERY == MEMORY_SWEEP_EVERY - 1 {
            entries.retain(|_, e| match e {
                MemoryEntry::Lease { expires, .. } | MemoryEntry::Committed { expires } => {
                    *expires > now
                }
            });
        }
        match entries.get(id.as_str()) {
            Some(MemoryEntry::Committed { expires }) if *expires > now => return Claim::Duplicate,
            Some(MemoryEntry::Lease { expires, .. }) if *expires > now => return Claim::InFlight,
            _ => {}
        }
        let token = LeaseToken::new();
        entries.insert(
            id.as_str().to_string(),
            MemoryEntry::Lease {
                token: token.clone(),
                expires: now + self.policy.lease,
            },
        );
        Claim::Claimed(token)
    }

    pub(super) fn commit(
        &self,
        id: &VerificationId,
        token: &LeaseToken,
        _record: String,
        now: Instant,
    ) -> Result<(), DedupError> {
        let mut entries = self.lock();
        let ours = match entries.get(id.as_str()) {
            None => true,
            Some(MemoryEntry::Lease {
                token: held,
                expires,
            }) => held == token || *expires <= now,
            Some(MemoryEntry::Committed { expires }) => *expires <= now,
        };
        if !ours {
            return Err(DedupError::LeaseLost);
        }
        entries.insert(
            id.as_str().to_string(),
            MemoryEntry::Committed {
                expires: now + self.policy.ttl,
            },
        );
        Ok(())
    }

    pub(super) fn release(&self, id: &VerificationId, token: &LeaseToken) {
        let mut entries = self.lock();
        if matches!(entries.get(id.as_str()), Some(MemoryEntry::Lease { token: held, .. }) if held == token)
        {
            entries.remove(id.as_str());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn store() -> MemoryDedup {
        MemoryDedup::new(DedupPolicy {
            key_prefix: String::new(),
            ttl: Duration::from_secs(60),
            lease: Duration::from_secs(5),
        })
    }
    fn id(s: &str) -> VerificationId {
        VerificationId::parse(s).unwrap()
    }

    #[test]
    fn claim_commit_then_duplicate() {
        let s = store();
        let now = Instant::now();
        let Claim::Claimed(token) = s.claim(&id("a"), now) else {
            panic!("not claimed")
        };
        assert_eq!(s.claim(&id("a"), now), Claim::InFlight);
        s.commit(&id("a"), &token, String::new(), now).unwrap();
        assert_eq!(s.claim(&id("a"), now), Claim::Duplicate);
    }

    #[test]
    fn release_frees_only_our_own_lease() {
        let s = store();
        let now = Instant::now();
        let Claim::Claimed(first) = s.claim(&id("b"), now) else {
            panic!()
        };
        // The lease expires and another request claims the id.
        let later = now + Duration::from_secs(6);
        let Claim::Claimed(second) = s.claim(&id("b"), later) else {
            panic!()
        };
        s.release(&id("b"), &first);
        assert_eq!(
            s.claim(&id("b"), later),
            Claim::InFlight,
            "stale release must not free the new lease"
        );
        s.release(&id("b"), &second);
        assert!(matches!(s.claim(&id("b"), later), Claim::Claimed(_)));
    }

    #[test]
    fn an_expired_lease_can_be_claimed_again() {
        let s = store();
        let now = Instant::now();
        assert!(matches!(s.claim(&id("c"), now), Claim::Claimed(_)));
        assert!(matches!(
            s.claim(&id("c"), now + Duration::from_secs(5)),
            Claim::Claimed(_)
        ));
    }

    #[test]
    fn commit_fails_when_another_claim_holds_the_key() {
        let s = store();
        let now = Instant::now();
        let Claim::Claimed(first) = s.claim(&id("d"), now) else {
            panic!()
        };
        let later = now + Duration::from_secs(6);
        let Claim::Claimed(_) = s.claim(&id("d"), later) else {
            panic!()
        };
        assert!(matches!(
            s.commit(&id("d"), &first, String::new(), later),
            Err(DedupError::LeaseLost)
        ));
    }
}
