//! The holds the drainer respects (see the module doc): why an entry was
//! spooled ([`Spooled`]), the hold that follows from it, the capped
//! exponential backoff of refused entries, and the wait for a late confirm.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::store::{Command, Meta};
use super::{now_ms, Spool, SpoolError};
use crate::message::Envelope;
use crate::publish::{LateConfirm, PublishError};

/// First wait before a refused entry is retried; doubles per refusal.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between retries of a refused entry.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Why an event is being spooled; decides when the drainer may publish it.
#[derive(Debug)]
pub enum Spooled {
    /// The broker could not be reached, or blocks publishing: publish as
    /// soon as it is available again.
    BrokerUnavailable,
    /// The broker refused it (nack, or returned as unroutable): retry after
    /// a backoff. Carries what the broker said.
    Refused(String),
    /// Sent but not confirmed: wait for the broker's late answer first.
    Unconfirmed(LateConfirm),
}

impl Spooled {
    /// The hold that follows from a failed publish.
    pub fn after(error: PublishError) -> Self {
        match error {
            PublishError::Unconfirmed(late) => Spooled::Unconfirmed(late),
            error @ (PublishError::Nack | PublishError::Unroutable) => {
                Spooled::Refused(error.to_string())
            }
            _ => Spooled::BrokerUnavailable,
        }
    }

    /// The late confirm to wait for, if any, the hold the entry starts
    /// with (none: drained at once) and its first meta (a live refusal is
    /// its first attempt).
    pub(super) fn hold(self) -> (Option<LateConfirm>, Option<Hold>, Option<Meta>) {
        match self {
            Spooled::BrokerUnavailable => (None, None, None),
            Spooled::Refused(error) => (
                None,
                Some(Hold::RetryAt {
                    at: Instant::now() + RETRY_MIN,
                    attempts: 1,
                }),
                Some(Meta {
                    attempts: 1,
                    last_error: Some(error),
                    ..Meta::default()
                }),
            ),
            Spooled::Unconfirmed(late) => (Some(late), Some(Hold::Pending), None),
        }
    }
}

/// What the drainer must respect for one entry.
#[derive(Debug, Clone, Copy)]
pub(super) enum Hold {
    /// A late confirm is awaited.
    Pending,
    /// Refused `attempts` times; not before `at`.
    RetryAt { at: Instant, attempts: u32 },
    /// Refused too often or too old: only an operator retries it (SPEC 5).
    Dead,
}

impl Hold {
    /// True while the drainer must leave the entry alone.
    pub(super) fn holds_back(&self, now: Instant) -> bool {
        match self {
            Hold::Pending | Hold::Dead => true,
            Hold::RetryAt { at, .. } => *at > now,
        }
    }
}

/// The wait before the next try of an entry refused `attempts` times.
fn backoff(attempts: u32) -> Duration {
    RETRY_MIN
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
        .min(RETRY_MAX)
}

impl Spool {
    /// Holds `seq` back; set before the entry is written for a new one.
    pub(super) fn set_hold(&self, seq: u64, hold: Hold) {
        if let Ok(mut holds) = self.inner.holds.lock() {
            holds.insert(seq, hold);
        }
    }

    /// Frees `seq` for the drainer.
    pub(super) fn clear_hold(&self, seq: u64) {
        if let Ok(mut holds) = self.inner.holds.lock() {
            holds.remove(&seq);
        }
    }

    /// The holds of entries an earlier run left with a meta: dead ones
    /// stay dead, refused ones keep their attempts (retried soon, since
    /// the broker may have changed meanwhile).
    pub(super) fn restore_holds(&self, metas: &[(u64, Meta)]) {
        for (seq, meta) in metas {
            if meta.dead {
                self.set_hold(*seq, Hold::Dead);
            } else if meta.attempts > 0 {
                let at = Instant::now() + RETRY_MIN;
                let attempts = meta.attempts;
                self.set_hold(*seq, Hold::RetryAt { at, attempts });
            }
        }
    }

    /// Records one more refusal of `seq` (persisted with what the broker
    /// said) and returns the wait before the next try, or `None` when the
    /// entry is now dead (`spool.max_attempts`).
    pub(super) fn refused(
        &self,
        seq: u64,
        envelope: &Envelope,
        error: &PublishError,
    ) -> Option<Duration> {
        let attempts = match self.inner.holds.lock().ok()?.get(&seq) {
            Some(Hold::RetryAt { attempts, .. }) => attempts + 1,
            _ => 1,
        };
        let meta = Meta {
            attempts,
            last_error: Some(error.to_string()),
            ..Meta::default()
        };
        let max = self.inner.max_attempts;
        if max > 0 && attempts >= max {
            self.die(seq, envelope, meta, "refused spool.max_attempts times");
            return None;
        }
        let wait = backoff(attempts);
        self.set_hold(
            seq,
            Hold::RetryAt {
                at: Instant::now() + wait,
                attempts,
            },
        );
        self.mark(seq, meta);
        Some(wait)
    }

    /// Makes `seq` dead: kept, counted, and left alone by the drainer.
    pub(super) fn die(&self, seq: u64, envelope: &Envelope, mut meta: Meta, why: &str) {
        tracing::warn!(
            key = seq,
            verification_id = envelope.verification_id(),
            attempts = meta.attempts,
            last_error = meta.last_error.as_deref().unwrap_or(""),
            why,
            "spool entry is dead: no longer retried until an operator retries or drops it"
        );
        meta.dead = true;
        if meta.last_error.is_none() {
            meta.last_error = Some(why.to_string());
        }
        self.set_hold(seq, Hold::Dead);
        self.mark(seq, meta);
    }

    /// Persists `meta` for `seq` without waiting: the hold already acts on
    /// it; the store keeps it across restarts and counts dead entries.
    fn mark(&self, seq: u64, meta: Meta) {
        let (done, _ignored) = oneshot::channel();
        let _ = self.inner.commands.send(Command::Mark { seq, meta, done });
    }

    /// Persists `meta` for `seq` and waits for the fsync.
    pub(super) async fn mark_durably(&self, seq: u64, meta: Meta) -> Result<(), SpoolError> {
        let (done, wait) = oneshot::channel();
        self.send(Command::Mark { seq, meta, done }, wait).await
    }

    /// An operator's retry: `seq` is attempted at once, its attempts reset
    /// and its age counted from now.
    pub(super) async fn revive(&self, seq: u64) -> Result<(), SpoolError> {
        let meta = Meta {
            age_from_ms: Some(now_ms()),
            ..Meta::default()
        };
        self.mark_durably(seq, meta).await?;
        self.clear_hold(seq);
        self.inner.appended.notify_one();
        Ok(())
    }

    /// The hold of `seq`, if it has one.
    pub(super) fn hold_of(&self, seq: u64) -> Option<Hold> {
        self.inner.holds.lock().ok()?.get(&seq).copied()
    }

    /// Waits in the background for the broker's late answer about `seq`:
    /// routed means the broker has the event, so the entry is deleted
    /// without publishing a second copy; anything else frees it for the
    /// drainer.
    pub(super) fn settle_when_confirmed(&self, seq: u64, late: LateConfirm) {
        let spool = self.clone();
        tokio::spawn(async move {
            if late.routed().await && spool.remove(&[seq]).await.is_ok() {
                tracing::debug!(seq, "late confirm arrived; spooled copy deleted");
                return;
            }
            spool.clear_hold(seq);
            spool.inner.appended.notify_one();
        });
    }
}
