//! `sluice-filters`: pure policy and translation for the Sluice gateway. Nothing here does I/O or
//! knows about Pingora: auth decisions, the parsed request body, provider translation behind the
//! [`provider::Provider`] seam, SSE usage capture, error classification and route matching.

pub mod auth;
pub mod body;
pub mod classify;
pub mod cost;
pub mod error;
pub mod ingress;
pub mod jwt;
pub mod period;
pub mod provider;
pub mod route;
pub mod sse;
pub mod tenancy;
pub mod usage;

pub use error::ApiError;

/// SHA-256 hex of a key: how keys appear in logs and storage (never in the clear).
pub fn hash_key(key: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
