//! One HTTP exchange with an upstream over Pingora's pooled connector: write the request, wait
//! for the response header (bounded by the call's timeout), then hand the open response to the
//! caller, which streams or buffers the body and gives the connection back to the pool.

use std::time::Duration;

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;

use crate::target::{Resolver, Target};

/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why no usable response came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// Could not connect, or the connection broke before a response header.
    Connect(String),
    /// No response (header or next body chunk) within the timeout.
    Timeout,
    /// The response broke off or was malformed.
    Protocol(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Connect(e) => write!(f, "connection failed: {e}"),
            CallError::Timeout => f.write_str("timed out"),
            CallError::Protocol(e) => write!(f, "upstream protocol error: {e}"),
        }
    }
}

/// A request to send.
pub struct Call<'a> {
    pub target: &'a Target,
    pub method: &'a str,
    /// Path and query, prefix included.
    pub path: &'a str,
    pub headers: &'a [(String, String)],
    pub body: Bytes,
    /// Limit on waiting for the response header and for each body chunk after it.
    pub timeout: Duration,
}

/// An upstream response whose body has not been read yet.
pub struct OpenResponse {
    session: HttpSession,
    peer: HttpPeer,
    pub header: ResponseHeader,
    timeout: Duration,
}

/// Pingora's connector plus DNS: shared by every request.
pub struct Upstream {
    connector: Connector,
    resolver: Resolver,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            connector: Connector::new(None),
            resolver: Resolver::default(),
        }
    }
}

impl Upstream {
    /// Sends the request and waits for the response header.
    pub async fn send(&self, call: &Call<'_>) -> Result<OpenResponse, CallError> {
        let mut peer = self
            .resolver
            .peer(call.target)
            .await
            .map_err(|e| CallError::Connect(e.to_string()))?;
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT.min(call.timeout));
        peer.options.idle_timeout = Some(POOL_IDLE);
        // A pooled connection the server already closed fails before any response; such a
        // failure is retried once on a fresh connection (nothing reached the upstream app).
        for attempt in 0..2 {
            let (mut session, reused) = self
                .connector
                .get_http_session(&peer)
                .await
                .map_err(|e| CallError::Connect(e.to_string()))?;
            session.set_read_timeout(Some(call.timeout));
            session.set_write_timeout(Some(call.timeout));
            let result =
                tokio::time::timeout(call.timeout, exchange_header(&mut session, call)).await;
            match result {
                Err(_) => return Err(CallError::Timeout),
                Ok(Ok(())) => {
                    let header = session
                        .response_header()
                        .cloned()
                        .ok_or_else(|| CallError::Protocol("no response header".into()))?;
                    return Ok(OpenResponse {
                        session,
                        peer,
                        header,
                        timeout: call.timeout,
                    });
                }
                Ok(Err(e)) if reused && attempt == 0 => {
                    tracing::debug!(error = %e, "pooled upstream connection failed; reconnecting");
                    continue;
                }
                Ok(Err(e)) => {
                    return Err(if e.contains("timed out") || e.contains("Timeout") {
                        CallError::Timeout
                    } else {
                        CallError::Connect(e)
                    })
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Reads the next body chunk; `None` at the end.
    pub async fn next_chunk(&self, r: &mut OpenResponse) -> Result<Option<Bytes>, CallError> {
        match tokio::time::timeout(r.timeout, r.session.read_response_body()).await {
            Err(_) => Err(CallError::Timeout),
            Ok(Err(e)) => Err(CallError::Protocol(e.to_string())),
            Ok(Ok(chunk)) => Ok(chunk),
        }
    }

    /// Reads the whole body, failing past `cap` bytes.
    pub async fn read_all(&self, r: &mut OpenResponse, cap: usize) -> Result<Bytes, CallError> {
        let mut buf = bytes::BytesMut::new();
        while let Some(chunk) = self.next_chunk(r).await? {
            buf.extend_from_slice(&chunk);
            if buf.len() > cap {
                return Err(CallError::Protocol(format!(
                    "response larger than {cap} bytes"
                )));
            }
        }
        Ok(buf.freeze())
    }

    /// Returns a fully read connection to the pool; anything else is closed.
    pub async fn release(&self, mut r: OpenResponse) {
        if r.session.response_done() {
            self.connector
                .release_http_session(r.session, &r.peer, Some(POOL_IDLE))
                .await;
        } else {
            r.session.shutdown().await;
        }
    }
}

async fn exchange_header(session: &mut HttpSession, call: &Call<'_>) -> Result<(), String> {
    let mut req = RequestHeader::build(
        call.method,
        call.path.as_bytes(),
        Some(call.headers.len() + 4),
    )
    .map_err(|e| e.to_string())?;
    let e = |e: Box<pingora::Error>| e.to_string();
    req.insert_header("host", &call.target.authority)
        .map_err(e)?;
    let has_body = !call.body.is_empty() || call.method == "POST" || call.method == "PUT";
    if has_body {
        req.insert_header("content-length", call.body.len().to_string())
            .map_err(e)?;
    }
    for (k, v) in call.headers {
        req.append_header(k.clone(), v.as_str()).map_err(e)?;
    }
    if has_body && req.headers.get("content-type").is_none() {
        req.insert_header("content-type", "application/json")
            .map_err(e)?;
    }
    session
        .write_request_header(Box::new(req))
        .await
        .map_err(e)?;
    if has_body {
        session
            .write_request_body(call.body.clone(), true)
            .await
            .map_err(e)?;
    }
    session.finish_request_body().await.map_err(e)?;
    session.read_response_header().await.map_err(e)?;
    Ok(())
}
