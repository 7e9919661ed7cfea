//! Writing answers to the client: JSON bodies, the OpenAI error shape (the one place errors
//! become HTTP), and the headers every answer carries.

use bytes::Bytes;
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

/// A response header with the gateway's standard headers set.
pub fn header(status: u16, call_id: &str, extra: &[(&str, String)]) -> ResponseHeader {
    header_with_room(status, call_id, extra, 0)
}

/// [`header`], with room for `more` headers the caller adds: the header maps are sized once
/// instead of growing (and rehashing, twice over with the case map) as headers go in.
pub fn header_with_room(
    status: u16,
    call_id: &str,
    extra: &[(&str, String)],
    more: usize,
) -> ResponseHeader {
    let mut h = ResponseHeader::build(status, Some(8 + extra.len() + more)).expect("valid status");
    let _ = h.insert_header("x-litellm-call-id", call_id);
    let _ = h.insert_header("x-litellm-version", VERSION);
    for (k, v) in extra {
        let _ = h.append_header(k.to_string(), v.as_str());
    }
    h
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
    extra: &[(&str, String)],
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
    extra: &[(&str, String)],
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
