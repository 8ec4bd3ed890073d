//! HTTP routes: the public webhook endpoint, the admin endpoints and the
//! spool operations on the admin listener.

pub mod admin;
pub mod bearer;
pub mod spool;
pub mod webhook;
