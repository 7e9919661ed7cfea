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
    // Runs on every request that carries a key: hex by table, not a `format!` per byte.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xf)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn hash_key_is_lowercase_sha256_hex() {
        assert_eq!(
            super::hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
