//! The holds the drainer respects (see the module doc): why an entry was
//! spooled ([`Spooled`]), the hold that follows from it, the capped
//! exponential backoff of refused entries, and the wait for a late confirm.

use std::time::{Duration, Instant};

use super::Spool;
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
    /// a backoff.
    Refused,
    /// Sent but not confirmed: wait for the broker's late answer first.
    Unconfirmed(LateConfirm),
}

impl Spooled {
    /// The hold that follows from a failed publish.
    pub fn after(error: PublishError) -> Self {
        match error {
            PublishError::Unconfirmed(late) => Spooled::Unconfirmed(late),
            PublishError::Nack | PublishError::Unroutable => Spooled::Refused,
            _ => Spooled::BrokerUnavailable,
        }
    }

    /// The late confirm to wait for, if any, and the hold the entry starts
    /// with (none: drained at once).
    pub(super) fn hold(self) -> (Option<LateConfirm>, Option<Hold>) {
        match self {
            Spooled::BrokerUnavailable => (None, None),
            Spooled::Refused => (
                None,
                Some(Hold::RetryAt {
                    at: Instant::now() + RETRY_MIN,
                    attempts: 1,
                }),
            ),
            Spooled::Unconfirmed(late) => (Some(late), Some(Hold::Pending)),
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
}

impl Hold {
    /// True while the drainer must leave the entry alone.
    pub(super) fn holds_back(&self, now: Instant) -> bool {
        match self {
            Hold::Pending => true,
            Hold::RetryAt { at, .. } => *at > now,
        }
    }
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

    /// Records one more refusal of `seq` and returns the wait before the
    /// next try.
    pub(super) fn back_off(&self, seq: u64) -> Duration {
        let Ok(mut holds) = self.inner.holds.lock() else {
            return RETRY_MIN;
        };
        let attempts = match holds.get(&seq) {
            Some(Hold::RetryAt { attempts, .. }) => attempts + 1,
            _ => 1,
        };
        let wait = RETRY_MIN
            .saturating_mul(1u32 << (attempts - 1).min(16))
            .min(RETRY_MAX);
        holds.insert(
            seq,
            Hold::RetryAt {
                at: Instant::now() + wait,
                attempts,
            },
        );
        wait
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
