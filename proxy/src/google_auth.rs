//! OAuth access tokens for Vertex AI, minted from a service account and cached until shortly
//! before they expire (one token exchange per account per hour, not per request).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use parking_lot::Mutex;
use sluice_config::Deployment;
use sluice_filters::provider::vertex_auth;
use sluice_filters::ApiError;

use crate::target::Target;
use crate::upstream::{Call, Upstream};

/// Tokens are renewed this long before Google says they expire.
const REFRESH_MARGIN: Duration = Duration::from_secs(120);
const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct GoogleTokens {
    cache: Mutex<HashMap<String, (String, Instant)>>,
}

impl GoogleTokens {
    /// A valid access token for the deployment's service account.
    pub async fn bearer(&self, upstream: &Upstream, d: &Deployment) -> Result<String, ApiError> {
        let sa = vertex_auth::service_account(d)?;
        let key = format!("{}|{}", sa.client_email, sa.token_uri());
        if let Some((token, valid_until)) = self.cache.lock().get(&key) {
            if Instant::now() < *valid_until {
                return Ok(token.clone());
            }
        }
        let assertion = vertex_auth::assertion(&sa, SystemTime::now())?;
        let target = Target::parse(sa.token_uri())
            .map_err(|e| ApiError::new(500, "internal_server_error", format!("token_uri: {e}")))?;
        let headers = [(
            "content-type".to_string(),
            "application/x-www-form-urlencoded".to_string(),
        )];
        let path = if target.path_prefix.is_empty() {
            "/".to_string()
        } else {
            target.path_prefix.clone()
        };
        let call = Call {
            target: &target,
            method: "POST",
            path: &path,
            headers: &headers,
            body: Bytes::from(vertex_auth::token_request_body(&assertion)),
            timeout: TOKEN_TIMEOUT,
        };
        let unavailable = |e: String| {
            ApiError::new(
                502,
                "internal_server_error",
                format!("Vertex AI token exchange failed: {e}"),
            )
        };
        let mut resp = upstream
            .send(&call)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let status = resp.header.status.as_u16();
        let body = upstream
            .read_all(&mut resp, 64 * 1024)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        upstream.release(resp).await;
        if status >= 400 {
            // Google's error text names the account problem, never the key.
            return Err(unavailable(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            )));
        }
        let (token, expires_in) = vertex_auth::parse_token_response(&body)?;
        let valid_until =
            Instant::now() + Duration::from_secs(expires_in).saturating_sub(REFRESH_MARGIN);
        self.cache.lock().insert(key, (token.clone(), valid_until));
        tracing::debug!(account = %sa.client_email, expires_in, "minted a Vertex AI access token");
        Ok(token)
    }
}
