//! Writing answers to the client: JSON bodies, the OpenAI error shape (the one place errors
//! become HTTP), and the headers every answer carries.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use sluice_filters::ApiError;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Headers that describe one connection and are never copied between hops.
pub fn is_hop_header(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
            | "host"
    )
}

/// Sluice's own response header names, made at compile time: a name built from a string at run
/// time is parsed and, unless it is a standard one, copied into an allocation.
pub mod names {
    use http::header::HeaderName;

    pub const CALL_ID: HeaderName = HeaderName::from_static("x-litellm-call-id");
    pub const VERSION: HeaderName = HeaderName::from_static("x-litellm-version");
    pub const RESPONSE_COST: HeaderName = HeaderName::from_static("x-litellm-response-cost");
    pub const RESPONSE_DURATION_MS: HeaderName =
        HeaderName::from_static("x-litellm-response-duration-ms");
    pub const OVERHEAD_DURATION_MS: HeaderName =
        HeaderName::from_static("x-litellm-overhead-duration-ms");
    pub const KEY_SPEND: HeaderName = HeaderName::from_static("x-litellm-key-spend");
    pub const SOFT_BUDGET_EXCEEDED: HeaderName =
        HeaderName::from_static("x-litellm-soft-budget-exceeded");
    pub const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
    pub const REMAINING_REQUESTS: HeaderName =
        HeaderName::from_static("x-ratelimit-remaining-requests");
    pub const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
    pub const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
    pub const REMAINING_TOKENS: HeaderName =
        HeaderName::from_static("x-ratelimit-remaining-tokens");
    pub const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
}

/// A response header with the gateway's standard headers set.
pub fn header(status: u16, call_id: &str, extra: &[(&'static str, String)]) -> ResponseHeader {
    response_header(status, standard_headers(call_id, extra, 0))
}

/// The headers every answer carries, plus `extra`, in a map with room for `more` headers the
/// caller adds: sized once instead of growing (and rehashing) as headers go in.
pub fn standard_headers(call_id: &str, extra: &[(&'static str, String)], more: usize) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(2 + extra.len() + more);
    if let Ok(v) = HeaderValue::from_str(call_id) {
        h.insert(names::CALL_ID, v);
    }
    h.insert(names::VERSION, HeaderValue::from_static(VERSION));
    for (k, v) in extra {
        // `from_static` does not allocate; the names are literals, checked by the tests that
        // send them.
        if let Ok(v) = HeaderValue::from_str(v) {
            h.append(HeaderName::from_static(k), v);
        }
    }
    h
}

/// The response header for `headers`, built without pingora's header-case map: every name then
/// goes in as a `HeaderName`, not parsed from a string twice (once for each map) as
/// `insert_header` does. On HTTP/1 pingora writes standard names title-cased (`Content-Type`),
/// the others as they are (lower case); names are case-insensitive (RFC 9110, 5.1).
pub fn response_header(status: u16, headers: HeaderMap) -> ResponseHeader {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = StatusCode::from_u16(status).expect("valid status");
    parts.headers = headers;
    ResponseHeader::from(parts)
}

/// Sends a complete response. Returns false if the client is gone.
pub async fn send(session: &mut Session, mut h: ResponseHeader, body: Bytes) -> bool {
    let _ = h.insert_header("content-length", body.len().to_string());
    if session
        .write_response_header(Box::new(h), body.is_empty())
        .await
        .is_err()
    {
        return false;
    }
    if body.is_empty() {
        return true;
    }
    session.write_response_body(Some(body), true).await.is_ok()
}

pub async fn send_json(
    session: &mut Session,
    status: u16,
    call_id: &str,
    body: impl Into<Bytes>,
    extra: &[(&'static str, String)],
) -> bool {
    let mut h = header(status, call_id, extra);
    let _ = h.insert_header("content-type", "application/json");
    send(session, h, body.into()).await
}

/// Sends an error in the OpenAI shape, or Anthropic's for `/v1/messages` clients.
pub async fn send_error(
    session: &mut Session,
    call_id: &str,
    err: &ApiError,
    extra: &[(&'static str, String)],
    anthropic_shape: bool,
) -> bool {
    let mut extra = extra.to_vec();
    if let Some(s) = err.retry_after {
        extra.push(("retry-after", s.to_string()));
    }
    let body = if anthropic_shape {
        sluice_filters::ingress::anthropic_error_body(err)
    } else {
        err.body()
    };
    send_json(session, err.status, call_id, body, &extra).await
}
