//! What the simulator remembers between requests, all in memory: the
//! verifications it created (so that `complete` knows their phone) and the
//! log of webhook delivery attempts. Nothing survives a restart, on purpose:
//! each test or demo starts from a clean provider.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::cli::Settings;
use crate::delivery::DeliveryAttempt;

/// Oldest attempts are dropped past this many, so that a long demo under
/// load cannot grow the log without bound; a test never comes close.
const MAX_LOGGED_ATTEMPTS: usize = 10_000;

/// A verification as created by the create endpoint.
#[derive(Clone, Debug)]
pub struct Verification {
    pub user_phone: String,
}

/// Shared by every worker through `web::Data`.
pub struct AppState {
    pub settings: Settings,
    /// One client for every delivery: connections to the webhook are reused.
    pub client: reqwest::Client,
    /// Created verifications by id; written by `api.rs`, read by `control.rs`.
    verifications: Mutex<HashMap<uuid::Uuid, Verification>>,
    /// Every delivery attempt in order; written by `delivery.rs`.
    attempts: Mutex<VecDeque<DeliveryAttempt>>,
}

impl AppState {
    pub fn new(settings: Settings, client: reqwest::Client) -> Self {
        Self {
            settings,
            client,
            verifications: Mutex::new(HashMap::new()),
            attempts: Mutex::new(VecDeque::new()),
        }
    }

    pub fn remember(&self, id: uuid::Uuid, verification: Verification) {
        lock(&self.verifications).insert(id, verification);
    }

    pub fn verification(&self, id: &uuid::Uuid) -> Option<Verification> {
        lock(&self.verifications).get(id).cloned()
    }

    pub fn log_attempt(&self, attempt: DeliveryAttempt) {
        let mut log = lock(&self.attempts);
        if log.len() == MAX_LOGGED_ATTEMPTS {
            log.pop_front();
        }
        log.push_back(attempt);
    }

    /// The logged attempts, oldest first, optionally for one verification.
    pub fn attempts(&self, verification_id: Option<&str>) -> Vec<DeliveryAttempt> {
        lock(&self.attempts)
            .iter()
            .filter(|a| verification_id.is_none_or(|id| a.verification_id == id))
            .cloned()
            .collect()
    }
}

/// A poisoned lock only means another request panicked mid-update of a map
/// or a list; the data is still usable for a simulator, so carry on.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
