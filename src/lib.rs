//! `sendtalk-relay`: the edge service at a SendTalk WhatsApp Verification
//! Webhook URL. Every webhook flows one way:
//!
//! ```text
//! request -> auth -> payload -> dedup claim -> publish (or spool) -> dedup commit -> response
//! ```
//!
//! A 2xx answer means the event is confirmed by RabbitMQ or fsynced in the
//! local spool, from which it is drained to RabbitMQ later.
//!
//! # Layout
//! - [`config`]: layered settings (defaults < TOML < env), validated once into
//!   typed values (parsed URIs, exchange kinds, routing-key template, log
//!   filter, loaded TLS, secrets), units converted to `Duration`.
//! - [`telemetry`]: tracing-subscriber set-up and phone masking.
//! - [`auth`]: signature / secret verification of the raw body; pure.
//! - [`payload`]: `VerificationEvent` and its field newtypes; pure.
//! - [`dedup`]: claim / commit / release against Redis or memory.
//! - [`redis_conn`]: Redis connections per `redis.mode` (standalone,
//!   cluster, sentinel).
//! - [`message`]: the event record the publisher, the sink and the spool carry.
//! - [`publish`]: RabbitMQ publisher (a few confirmed channels, many publishes
//!   in flight, returns matched per publish, blocked-connection handling,
//!   reconnection); stdout sink.
//! - [`spool`]: the durable on-disk buffer (holds for late confirms and
//!   refused entries, recovery from I/O errors) and its drainer.
//! - [`ratelimit`]: optional per-client rate limit and the client-IP rule.
//! - [`metrics`]: every exported metric, in one registry per app.
//! - [`routes`]: the webhook endpoint (where the stages meet; its error
//!   mapping and request reading beside it) and admin endpoints.
//! - [`startup`]: the only place that creates clients and binds sockets, in
//!   named steps; its listeners and the ordered shutdown beside it.
//! - [`shutdown`]: signal handling.
//! - [`cli`]: the `sign` and `send-test` helpers of the command line.
//! - [`durable`]: publish with confirm or spool: one function for every event.
//! - [`ids`]: random request ids and lease tokens.
//! - [`api`]: the verification lifecycle API (SPEC 9), its SendTalk client,
//!   store, expiry sweeper and OpenAPI document.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod dedup;
pub mod durable;
pub mod ids;
pub mod message;
pub mod metrics;
pub mod payload;
pub mod publish;
pub mod ratelimit;
pub mod redis_conn;
pub mod routes;
pub mod shutdown;
pub mod spool;
pub mod startup;
pub mod telemetry;
