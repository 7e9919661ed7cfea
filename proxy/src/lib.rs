//! `sluice-proxy`: the Sluice gateway. Pingora serves HTTP/1.1 and h2c on the front; each request
//! is answered in `request_filter`, where the gateway authenticates, parses the body, picks a
//! deployment ([`router`]), and runs the upstream exchange itself over Pingora's pooled connector
//! ([`upstream`]) so that it can retry, fall back and capture usage before the client sees a
//! byte. Translation and policy live in `sluice-filters`; this crate is the glue.

pub mod admin;
pub mod app;
pub mod engines;
pub mod gateway;
pub mod google_auth;
pub mod import;
pub mod inference;
pub mod info;
pub mod jwt_auth;
pub mod metrics;
pub mod passthrough;
pub mod respond;
pub mod router;
pub mod server;
pub mod store;
pub mod target;
pub mod tenancy;
pub mod upstream;
