//! HTTP routes: the public webhook endpoint and the admin endpoints.

pub mod admin;
pub mod webhook;
