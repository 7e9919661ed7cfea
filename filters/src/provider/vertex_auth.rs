//! Vertex AI credentials: a Google service account signs a JWT (RS256) that its token endpoint
//! exchanges for an OAuth access token. Building the assertion is pure and lives here; the
//! exchange and the cache are the proxy's.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::Value;
use sluice_config::Deployment;

use crate::error::ApiError;

/// The OAuth scope Vertex AI calls need.
pub const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// Lifetime asked for in the assertion (Google's maximum).
pub const ASSERTION_LIFETIME_SECS: u64 = 3600;

/// The fields of a service-account key file that signing needs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ServiceAccount {
    pub client_email: String,
    pub private_key: String,
    #[serde(default)]
    pub token_uri: Option<String>,
    #[serde(default)]
    pub project_id: Option<String>,
}

impl ServiceAccount {
    pub fn token_uri(&self) -> &str {
        self.token_uri.as_deref().unwrap_or(DEFAULT_TOKEN_URI)
    }
}

fn config_error(msg: String) -> ApiError {
    ApiError::new(500, "internal_server_error", msg)
}

/// The deployment's service account: `vertex_credentials` as an object, a JSON string or a
/// file path, else the file named by `GOOGLE_APPLICATION_CREDENTIALS`.
pub fn service_account(d: &Deployment) -> Result<ServiceAccount, ApiError> {
    let value: Value = match d.provider_params.get("vertex_credentials") {
        Some(Value::Object(o)) => Value::Object(o.clone()),
        Some(Value::String(s)) if s.trim_start().starts_with('{') => serde_json::from_str(s)
            .map_err(|e| config_error(format!("vertex_credentials of {}: not JSON: {e}", d.id)))?,
        Some(Value::String(path)) => read_file(path)?,
        Some(other) => {
            return Err(config_error(format!(
                "vertex_credentials of {}: expected a JSON object, JSON text or a file path, got {other}",
                d.id
            )))
        }
        None => match std::env::var("GOOGLE_APPLICATION_CREDENTIALS") {
            Ok(path) if !path.is_empty() => read_file(&path)?,
            _ => {
                return Err(config_error(format!(
                    "No Vertex AI credentials for deployment {}: set litellm_params.vertex_credentials or GOOGLE_APPLICATION_CREDENTIALS",
                    d.id
                )))
            }
        },
    };
    serde_json::from_value(value).map_err(|e| {
        config_error(format!(
            "vertex_credentials of {}: not a service-account key: {e}",
            d.id
        ))
    })
}

fn read_file(path: &str) -> Result<Value, ApiError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| config_error(format!("reading Vertex credentials {path}: {e}")))?;
    serde_json::from_str(&text).map_err(|e| config_error(format!("{path}: not JSON: {e}")))
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

/// The signed JWT to exchange at `token_uri` (grant type jwt-bearer).
pub fn assertion(sa: &ServiceAccount, now: SystemTime) -> Result<String, ApiError> {
    let iat = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = Claims {
        iss: &sa.client_email,
        scope: SCOPE,
        aud: sa.token_uri(),
        iat,
        exp: iat + ASSERTION_LIFETIME_SECS,
    };
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(sa.private_key.as_bytes()).map_err(|e| {
        config_error(format!(
            "service account {}: bad private_key: {e}",
            sa.client_email
        ))
    })?;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &key,
    )
    .map_err(|e| config_error(format!("signing the Vertex assertion: {e}")))
}

/// The form body of the token request.
pub fn token_request_body(assertion: &str) -> String {
    format!(
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
    )
}

/// `(access_token, expires_in seconds)` from the token endpoint's answer.
pub fn parse_token_response(body: &[u8]) -> Result<(String, u64), ApiError> {
    #[derive(Deserialize)]
    struct Token {
        access_token: String,
        #[serde(default)]
        expires_in: Option<u64>,
    }
    let t: Token = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            502,
            "internal_server_error",
            format!("Vertex token endpoint answered without a token: {e}"),
        )
    })?;
    Ok((
        t.access_token,
        t.expires_in.unwrap_or(ASSERTION_LIFETIME_SECS),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = include_str!("../../fixtures/vertex/test-service-account-key.pem");

    #[test]
    fn signs_a_verifiable_assertion() {
        let sa = ServiceAccount {
            client_email: "sluice@test.iam.gserviceaccount.com".into(),
            private_key: KEY.into(),
            token_uri: Some("http://127.0.0.1:1/token".into()),
            project_id: Some("p".into()),
        };
        let now = UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let jwt = assertion(&sa, now).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        use base64::Engine as _;
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(parts[1])
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["iss"], "sluice@test.iam.gserviceaccount.com");
        assert_eq!(claims["aud"], "http://127.0.0.1:1/token");
        assert_eq!(claims["scope"], SCOPE);
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            3600
        );
        let header: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(parts[0])
                .unwrap(),
        )
        .unwrap();
        assert_eq!(header["alg"], "RS256");
        assert!(token_request_body(&jwt).starts_with(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=ey"
        ));
        assert_eq!(
            parse_token_response(br#"{"access_token":"ya29.x","expires_in":3599}"#).unwrap(),
            ("ya29.x".into(), 3599)
        );
    }
}
