//! Random identifiers the relay makes up: request ids, lease tokens.

/// A random (v4) UUID from the thread-local generator: `Uuid::new_v4` asks
/// the kernel for randomness on every call, two syscalls per webhook.
pub fn random_uuid() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}
