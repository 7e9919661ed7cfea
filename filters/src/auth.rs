//! Who is calling: the key is read from the headers LiteLLM accepts, in its order, and checked by
//! an [`Authenticator`]. The master-key authenticator lives here; virtual keys plug in as another
//! implementation of the same trait.

use std::sync::Arc;

use crate::error::ApiError;

/// Header names that may carry the key, in the order they are read.
pub const KEY_HEADERS: &[&str] = &[
    "authorization",
    "api-key",
    "x-api-key",
    "x-goog-api-key",
    "ocp-apim-subscription-key",
    "x-litellm-api-key",
];

/// Finds the caller's key. `header` looks a header up by lowercase name; `custom_header` is
/// `general_settings.litellm_key_header_name`.
pub fn extract_key<'a>(
    header: impl Fn(&str) -> Option<&'a str>,
    custom_header: Option<&str>,
) -> Option<&'a str> {
    for name in KEY_HEADERS.iter().copied().chain(custom_header) {
        if let Some(v) = header(name) {
            let v = v.trim();
            let v = if name == "authorization" {
                match v.split_once(' ') {
                    Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
                    _ => v,
                }
            } else {
                v
            };
            if !v.is_empty() {
                return Some(v);
            }
        }
    }
    None
}

/// What an authenticated caller may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Admin rights (the master key, or auth switched off).
    pub admin: bool,
    /// Model groups the caller may use; `None` = all.
    pub models: Option<Vec<String>>,
    /// Hash of the key for logs and spend (never the key itself); shared with the cached key.
    pub key_hash: Option<Arc<str>>,
    /// The key's (or JWT's) user and team.
    pub user_id: Option<String>,
    pub team_id: Option<String>,
}

impl Principal {
    pub fn open() -> Self {
        Principal {
            admin: true,
            models: None,
            key_hash: None,
            user_id: None,
            team_id: None,
        }
    }

    pub fn may_use(&self, group: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.is_empty() || m.iter().any(|g| g == group))
    }
}

/// Decides whether a key may call the gateway.
pub trait Authenticator: Send + Sync {
    fn authenticate(&self, key: Option<&str>) -> Result<Principal, ApiError>;

    /// Whether `key` passes this authenticator: [`Authenticator::authenticate`]'s answer
    /// without building it, for callers that try virtual keys when it does not.
    fn passes(&self, key: Option<&str>) -> bool {
        self.authenticate(key).is_ok()
    }
}

/// LiteLLM's master key: without one the proxy is open; with one, only that key passes (virtual
/// keys are a separate authenticator layered in front of this one).
pub struct MasterKeyAuth {
    master_key: Option<String>,
}

impl MasterKeyAuth {
    pub fn new(master_key: Option<String>) -> Self {
        MasterKeyAuth { master_key }
    }

    pub fn is_open(&self) -> bool {
        self.master_key.is_none()
    }
}

/// Compares without an early exit so timing does not leak how much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator for MasterKeyAuth {
    fn authenticate(&self, key: Option<&str>) -> Result<Principal, ApiError> {
        let Some(master) = &self.master_key else {
            return Ok(Principal::open());
        };
        match key {
            None => Err(ApiError::unauthorized(
                "Authentication Error, No api key passed in.",
            )),
            Some(k) if constant_time_eq(k.as_bytes(), master.as_bytes()) => Ok(Principal {
                admin: true,
                models: None,
                key_hash: Some(crate::hash_key(k).into()),
                user_id: None,
                team_id: None,
            }),
            Some(_) => Err(ApiError::unauthorized(
                "Authentication Error, Invalid proxy server token passed. Received API Key = sk-...(redacted). Unable to find token in cache or `LiteLLM_VerificationTokenTable`",
            )),
        }
    }

    fn passes(&self, key: Option<&str>) -> bool {
        match (&self.master_key, key) {
            (None, _) => true,
            (Some(master), Some(k)) => constant_time_eq(k.as_bytes(), master.as_bytes()),
            (Some(_), None) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> + 'a {
        move |n| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
    }

    #[test]
    fn reads_keys_in_litellm_order() {
        assert_eq!(
            extract_key(headers(&[("authorization", "Bearer sk-1")]), None),
            Some("sk-1")
        );
        assert_eq!(
            extract_key(headers(&[("x-api-key", "sk-2")]), None),
            Some("sk-2")
        );
        assert_eq!(
            extract_key(headers(&[("x-api-key", "sk-2"), ("api-key", "sk-3")]), None),
            Some("sk-3")
        );
        assert_eq!(
            extract_key(headers(&[("x-litellm-api-key", "sk-4")]), None),
            Some("sk-4")
        );
        assert_eq!(
            extract_key(headers(&[("my-key", "sk-5")]), Some("my-key")),
            Some("sk-5")
        );
        assert_eq!(extract_key(headers(&[]), None), None);
    }

    #[test]
    fn master_key_gates_access() {
        let open = MasterKeyAuth::new(None);
        assert!(open.authenticate(None).unwrap().admin);
        let gated = MasterKeyAuth::new(Some("sk-master".into()));
        assert!(gated.authenticate(Some("sk-master")).is_ok());
        assert_eq!(
            gated.authenticate(Some("sk-other")).unwrap_err().status,
            401
        );
        let e = gated.authenticate(None).unwrap_err();
        assert_eq!(e.status, 401);
        assert!(!e.message.contains("sk-other"));
    }

    #[test]
    fn passes_says_what_authenticate_decides() {
        let open = MasterKeyAuth::new(None);
        let gated = MasterKeyAuth::new(Some("sk-master".into()));
        for key in [
            None,
            Some("sk-master"),
            Some("sk-other"),
            Some("sk-maste"),
            Some(""),
        ] {
            assert_eq!(open.passes(key), open.authenticate(key).is_ok(), "{key:?}");
            assert_eq!(
                gated.passes(key),
                gated.authenticate(key).is_ok(),
                "{key:?}"
            );
        }
    }
}
