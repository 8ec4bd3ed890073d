//! [`MemoryStore`]: the verification store in process memory, with the
//! same semantics as Redis, for one process (`dedup.backend = "memory"`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::{
    judge, now_ms, ttl_ms, ExpiryClaim, IdemBegin, IdemValue, Record, Status, StorePolicy,
    StoredAnswer,
};

struct MemoryRecord {
    record: Record,
    lease: Option<(String, u64)>,
    /// Unix ms after which the record is forgotten.
    forget_at_ms: u64,
}

struct MemoryIdem {
    value: IdemValue,
    forget_at_ms: u64,
}

/// Inserts between two sweeps of forgotten in-memory entries.
const MEMORY_SWEEP_EVERY: u64 = 1024;

#[derive(Default)]
struct MemoryState {
    records: HashMap<String, MemoryRecord>,
    idempotency: HashMap<String, MemoryIdem>,
    /// Inserts since start, to pace the sweeps.
    inserts: u64,
}

/// In-process store with the same semantics, for one process. Nothing here
/// can fail, so its methods return plain values; [`super::Store`] wraps them
/// in `Ok`.
pub struct MemoryStore {
    /// Every critical section is a few map operations with no await.
    state: Mutex<MemoryState>,
    policy: StorePolicy,
}

impl MemoryStore {
    /// An empty store; entries are forgotten per `policy`.
    pub fn new(policy: StorePolicy) -> Self {
        Self {
            state: Mutex::new(MemoryState::default()),
            policy,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // Each operation leaves the maps consistent; poison is ignored.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops forgotten entries once every [`MEMORY_SWEEP_EVERY`] inserts:
    /// memory stays bounded without a scan per request.
    fn forget_old(state: &mut MemoryState, now: u64) {
        state.inserts += 1;
        if !state.inserts.is_multiple_of(MEMORY_SWEEP_EVERY) {
            return;
        }
        state.records.retain(|_, r| r.forget_at_ms > now);
        state.idempotency.retain(|_, i| i.forget_at_ms > now);
    }

    pub(super) fn create_pending(&self, record: &Record) {
        let now = now_ms();
        let mut state = self.lock();
        Self::forget_old(&mut state, now);
        let forget_at_ms = record.expires_at_ms.unwrap_or(now).max(now) + ttl_ms(self.policy.ttl);
        state.records.insert(
            record.id.clone(),
            MemoryRecord {
                record: record.clone(),
                lease: None,
                forget_at_ms,
            },
        );
    }

    pub(super) fn get(&self, id: &str) -> Option<Record> {
        let now = now_ms();
        self.lock()
            .records
            .get(id)
            .filter(|r| r.forget_at_ms > now)
            .map(|r| r.record.clone())
    }

    pub(super) fn created_phone(&self, id: &str) -> Option<String> {
        self.get(id)
            .filter(Record::created_here)
            .and_then(|r| r.user_phone)
    }

    pub(super) fn mark_verified(&self, id: &str, user_phone: &str, verified_time_ms: u64) {
        let now = now_ms();
        let forget_at_ms = now + ttl_ms(self.policy.ttl);
        let mut state = self.lock();
        Self::forget_old(&mut state, now);
        let entry = state
            .records
            .entry(id.to_string())
            .or_insert_with(|| MemoryRecord {
                record: Record {
                    id: id.to_string(),
                    user_phone: Some(user_phone.to_string()),
                    status: Status::Verified,
                    created_at_ms: None,
                    expires_at_ms: None,
                    verified_time_ms: None,
                },
                lease: None,
                forget_at_ms,
            });
        entry.record.status = Status::Verified;
        entry.record.verified_time_ms = Some(verified_time_ms);
        entry.forget_at_ms = forget_at_ms;
    }

    pub(super) fn due(&self, now_ms: u64, limit: usize) -> Vec<String> {
        let state = self.lock();
        let mut due: Vec<(u64, String)> = state
            .records
            .values()
            .filter(|r| r.record.status == Status::Pending)
            .filter_map(|r| {
                r.record
                    .expires_at_ms
                    .filter(|e| *e <= now_ms)
                    .map(|e| (e, r.record.id.clone()))
            })
            .collect();
        due.sort();
        due.into_iter().take(limit).map(|(_, id)| id).collect()
    }

    pub(super) fn claim_expiry(
        &self,
        id: &str,
        now_ms: u64,
        lease: Duration,
        token: &str,
    ) -> ExpiryClaim {
        let mut state = self.lock();
        let Some(entry) = state.records.get_mut(id) else {
            return ExpiryClaim::Done;
        };
        if entry.record.status != Status::Pending {
            return ExpiryClaim::Done;
        }
        if entry.record.expires_at_ms.unwrap_or(0) > now_ms {
            return ExpiryClaim::NotDue;
        }
        if entry
            .lease
            .as_ref()
            .is_some_and(|(_, until)| *until > now_ms)
        {
            return ExpiryClaim::Busy;
        }
        entry.lease = Some((token.to_string(), now_ms + ttl_ms(lease)));
        ExpiryClaim::Claimed(entry.record.clone())
    }

    pub(super) fn finish_expiry(&self, id: &str, token: &str) {
        let forget_at_ms = now_ms() + ttl_ms(self.policy.ttl);
        let mut state = self.lock();
        if let Some(entry) = state.records.get_mut(id) {
            if entry.lease.as_ref().is_some_and(|(t, _)| t == token) {
                entry.lease = None;
                if entry.record.status == Status::Pending {
                    entry.record.status = Status::Expired;
                }
                entry.forget_at_ms = forget_at_ms;
            }
        }
    }

    pub(super) fn release_expiry(&self, id: &str, token: &str) {
        let mut state = self.lock();
        if let Some(entry) = state.records.get_mut(id) {
            if entry.lease.as_ref().is_some_and(|(t, _)| t == token) {
                entry.lease = None;
            }
        }
    }

    pub(super) fn idem_begin(&self, key: &str, fingerprint: &str) -> IdemBegin {
        let now = now_ms();
        let mut state = self.lock();
        if let Some(existing) = state.idempotency.get(key).filter(|i| i.forget_at_ms > now) {
            return judge(&existing.value, fingerprint);
        }
        Self::forget_old(&mut state, now);
        state.idempotency.insert(
            key.to_string(),
            MemoryIdem {
                value: IdemValue {
                    fingerprint: fingerprint.to_string(),
                    answer: None,
                },
                forget_at_ms: now + ttl_ms(self.policy.running_ttl),
            },
        );
        IdemBegin::Started
    }

    pub(super) fn idem_finish(&self, key: &str, fingerprint: &str, answer: &StoredAnswer) {
        let forget_at_ms = now_ms() + ttl_ms(self.policy.idempotency_ttl);
        self.lock().idempotency.insert(
            key.to_string(),
            MemoryIdem {
                value: IdemValue {
                    fingerprint: fingerprint.to_string(),
                    answer: Some(answer.clone()),
                },
                forget_at_ms,
            },
        );
    }
}
