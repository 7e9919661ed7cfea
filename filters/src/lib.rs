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
    KeyHash::of(key).as_str().to_owned()
}

/// [`hash_key`] on the stack, for the request path's cache lookup.
pub struct KeyHash([u8; 64]);

impl KeyHash {
    pub fn of(key: &str) -> KeyHash {
        use sha2::{Digest, Sha256};
        // Runs on every request that carries a key: hex by table, not a `format!` per byte.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digest = Sha256::digest(key.as_bytes());
        let mut out = [0u8; 64];
        for (i, b) in digest.into_iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        KeyHash(out)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
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
