//! What an upstream failure means for routing: retry it, cool the deployment down, or switch to
//! a context-window or content-policy fallback.

use sluice_config::ErrorClass;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    RateLimit,
    ContextWindowExceeded,
    ContentPolicy,
    BadRequest,
    Auth,
    NotFound,
    Timeout,
    /// 5xx from the upstream.
    Server,
    /// No HTTP answer at all: connect refused, reset, malformed response.
    Connect,
}

impl FailureKind {
    /// LiteLLM retries 408, 409, 429 and 5xx (and connection/timeouts); other 4xx are final.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::RateLimit | Self::Timeout | Self::Server | Self::Connect
        )
    }

    /// Only 429, 401, 404, 408 and 5xx count towards cooling a deployment down.
    pub fn counts_for_cooldown(&self) -> bool {
        matches!(
            self,
            Self::RateLimit
                | Self::Auth
                | Self::NotFound
                | Self::Timeout
                | Self::Server
                | Self::Connect
        )
    }

    pub fn error_class(&self) -> ErrorClass {
        match self {
            Self::RateLimit => ErrorClass::RateLimit,
            Self::ContentPolicy => ErrorClass::ContentPolicyViolation,
            Self::ContextWindowExceeded | Self::BadRequest | Self::NotFound => {
                ErrorClass::BadRequest
            }
            Self::Auth => ErrorClass::Authentication,
            Self::Timeout => ErrorClass::Timeout,
            Self::Server | Self::Connect => ErrorClass::InternalServer,
        }
    }
}

fn contains_ci(hay: &[u8], needle: &str) -> bool {
    let needle = needle.as_bytes();
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// Classifies an OpenAI-compatible error response.
pub fn classify_status(status: u16, body: &[u8]) -> FailureKind {
    // Error bodies are small; cap the scan so a huge body cannot cost much.
    let body = &body[..body.len().min(16 * 1024)];
    match status {
        429 => FailureKind::RateLimit,
        408 | 504 => FailureKind::Timeout,
        401 | 403 => FailureKind::Auth,
        404 => FailureKind::NotFound,
        409 => FailureKind::Server,
        s if s >= 500 => FailureKind::Server,
        _ => {
            const CONTEXT: &[&str] = &[
                "context_length_exceeded",
                "maximum context length",
                "context window",
                "prompt is too long",
                "too many tokens",
                "input is too long",
            ];
            const POLICY: &[&str] = &[
                "content_filter",
                "content_policy",
                "content management policy",
                "safety system",
            ];
            if CONTEXT.iter().any(|n| contains_ci(body, n)) {
                FailureKind::ContextWindowExceeded
            } else if POLICY.iter().any(|n| contains_ci(body, n)) {
                FailureKind::ContentPolicy
            } else {
                FailureKind::BadRequest
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_statuses_and_bodies() {
        assert_eq!(classify_status(429, b""), FailureKind::RateLimit);
        assert!(classify_status(503, b"").retryable());
        assert!(!classify_status(400, b"{}").retryable());
        assert_eq!(
            classify_status(400, br#"{"error":{"code":"context_length_exceeded"}}"#),
            FailureKind::ContextWindowExceeded
        );
        assert_eq!(
            classify_status(400, b"This model's Maximum Context Length is 4096 tokens"),
            FailureKind::ContextWindowExceeded
        );
        assert_eq!(
            classify_status(400, br#"{"error":{"code":"content_filter"}}"#),
            FailureKind::ContentPolicy
        );
        assert!(!classify_status(400, b"").counts_for_cooldown());
        assert!(classify_status(401, b"").counts_for_cooldown());
    }
}
