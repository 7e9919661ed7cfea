//! JWT bearer tokens, as LiteLLM's `general_settings.enable_jwt_auth: true` accepts them: the
//! `litellm_jwtauth` settings, the verification keys (a JWKS fetched from `JWT_PUBLIC_KEY_URL`, or
//! Sluice's static PEM key / HS256 secret), and [`verify`], which checks a token and maps its
//! claims to a [`JwtIdentity`]. Nothing here does I/O: the proxy fetches the JWKS and hands the
//! bytes to [`JwtKeys::from_jwks`].
//!
//! What follows LiteLLM (`litellm/proxy/auth/handle_jwt.py`, `LiteLLM_JWTAuth`):
//! - admin: the `scope` claim (a space-separated string or a list) holds `admin_jwt_scope`
//!   (default `litellm_proxy_admin`); any other `scope` type is an error.
//! - `*_jwt_field` name claims by dotted path (`realm_access.team`, `\.` escapes a dot, a leading
//!   `metadata.` is dropped as LiteLLM's `get_nested_value` does); Sluice also accepts a top-level
//!   claim whose name contains dots (`https://example.com/groups`). A list under
//!   `team_id_jwt_field` yields its first element; `team_id_default` fills a missing team.
//! - `JWT_PUBLIC_KEY_URL` (comma-separated; an OIDC discovery URL is resolved to its `jwks_uri`),
//!   `JWT_AUDIENCE` (checked only when set), `JWT_ISSUER` (likewise), `public_key_ttl` (600 s).
//! - error texts: "Token Expired" (type `expired_key`), "Authentication Error, Validation fails:
//!   ..." with PyJWT's wording, "Authentication Error, No matching public key found. ...".
//!
//! Where Sluice is stricter: only RS256, ES256 (P-256) and HS256 are accepted, `exp` is required,
//! `nbf` is checked, no clock leeway by default, a key is only ever used with its own algorithm
//! (no HS256-with-a-public-key confusion), and symmetric (`oct`) keys in a fetched JWKS are
//! ignored.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// LiteLLM's default admin scope.
pub const DEFAULT_ADMIN_JWT_SCOPE: &str = "litellm_proxy_admin";
/// LiteLLM's default `public_key_ttl`.
pub const DEFAULT_PUBLIC_KEY_TTL: Duration = Duration::from_secs(600);
/// How long past `public_key_ttl` the last key set fetched from an unreachable JWKS endpoint keeps
/// being used (`public_key_stale_ttl`; 0 fails closed as soon as the TTL lapses).
pub const DEFAULT_PUBLIC_KEY_STALE_TTL: Duration = Duration::from_secs(3600);
/// RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
pub const MIN_SECRET_LEN: usize = 32;

const SETTINGS_PATH: &str = "general_settings.litellm_jwtauth";

/// `general_settings.litellm_jwtauth` plus the environment, resolved once at startup.
#[derive(Clone, PartialEq)]
pub struct JwtSettings {
    /// Scope (in the `scope` claim) that makes the caller a proxy admin.
    pub admin_jwt_scope: String,
    pub user_id_jwt_field: Option<String>,
    pub team_id_jwt_field: Option<String>,
    pub team_ids_jwt_field: Option<String>,
    /// Team used when `team_id_jwt_field` is unset or missing from the token.
    pub team_id_default: Option<String>,
    pub end_user_id_jwt_field: Option<String>,
    pub user_email_jwt_field: Option<String>,
    pub org_id_jwt_field: Option<String>,
    /// How long a fetched JWKS is trusted before it is fetched again.
    pub public_key_ttl: Duration,
    /// How long past `public_key_ttl` a JWKS is still used while its endpoint cannot be reached.
    pub public_key_stale_ttl: Duration,
    /// `JWT_AUDIENCE`: when set, tokens must carry it in `aud`.
    pub audience: Option<String>,
    /// `JWT_ISSUER`: when set, tokens must carry it in `iss`.
    pub issuer: Option<String>,
    /// `JWT_PUBLIC_KEY_URL`, split on commas: JWKS (or OIDC discovery) URLs.
    pub jwks_urls: Vec<String>,
    /// Sluice: `public_key` / `JWT_PUBLIC_KEY`, a PEM RSA or EC (P-256) public key.
    pub public_key_pem: Option<String>,
    /// Sluice: `secret` / `JWT_SECRET`, an HS256 shared secret.
    pub secret: Option<String>,
    /// Clock-skew allowance for `exp` and `nbf`, in seconds (LiteLLM's default: none).
    pub leeway_secs: u64,
}

impl Default for JwtSettings {
    fn default() -> Self {
        JwtSettings {
            admin_jwt_scope: DEFAULT_ADMIN_JWT_SCOPE.to_string(),
            user_id_jwt_field: None,
            team_id_jwt_field: None,
            team_ids_jwt_field: None,
            team_id_default: None,
            end_user_id_jwt_field: None,
            user_email_jwt_field: None,
            org_id_jwt_field: None,
            public_key_ttl: DEFAULT_PUBLIC_KEY_TTL,
            public_key_stale_ttl: DEFAULT_PUBLIC_KEY_STALE_TTL,
            audience: None,
            issuer: None,
            jwks_urls: Vec::new(),
            public_key_pem: None,
            secret: None,
            leeway_secs: 0,
        }
    }
}

impl std::fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSettings")
            .field("admin_jwt_scope", &self.admin_jwt_scope)
            .field("user_id_jwt_field", &self.user_id_jwt_field)
            .field("team_id_jwt_field", &self.team_id_jwt_field)
            .field("team_ids_jwt_field", &self.team_ids_jwt_field)
            .field("team_id_default", &self.team_id_default)
            .field("end_user_id_jwt_field", &self.end_user_id_jwt_field)
            .field("user_email_jwt_field", &self.user_email_jwt_field)
            .field("org_id_jwt_field", &self.org_id_jwt_field)
            .field("public_key_ttl", &self.public_key_ttl)
            .field("public_key_stale_ttl", &self.public_key_stale_ttl)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("jwks_urls", &self.jwks_urls)
            .field(
                "public_key_pem",
                &self.public_key_pem.as_ref().map(|_| "<pem>"),
            )
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

impl JwtSettings {
    /// Reads the `litellm_jwtauth` mapping (empty when the config has none) and the environment
    /// (`JWT_PUBLIC_KEY_URL`, `JWT_AUDIENCE`, `JWT_ISSUER`, `JWT_PUBLIC_KEY`, `JWT_SECRET`).
    ///
    /// Returns the settings and the full paths of the keys Sluice does not act on (LiteLLM options
    /// without a Sluice equivalent, and typos) so the caller can warn. An error is
    /// `(key path, what was expected)`; having no key source at all is an error too.
    pub fn from_map(
        map: &Map<String, Value>,
    ) -> Result<(JwtSettings, Vec<String>), (String, String)> {
        Self::from_map_with_env(map, |name| std::env::var(name).ok())
    }

    /// [`JwtSettings::from_map`] with the environment given as a lookup (for tests).
    pub fn from_map_with_env(
        map: &Map<String, Value>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(JwtSettings, Vec<String>), (String, String)> {
        let mut s = JwtSettings::default();
        let mut ignored = Vec::new();
        for (key, value) in map {
            let path = format!("{SETTINGS_PATH}.{key}");
            let text = || opt_string(value, &path);
            match key.as_str() {
                "admin_jwt_scope" => {
                    if let Some(v) = text()? {
                        s.admin_jwt_scope = v;
                    }
                }
                "user_id_jwt_field" => s.user_id_jwt_field = text()?,
                "team_id_jwt_field" => s.team_id_jwt_field = text()?,
                "team_ids_jwt_field" => s.team_ids_jwt_field = text()?,
                "team_id_default" => s.team_id_default = text()?,
                "end_user_id_jwt_field" => s.end_user_id_jwt_field = text()?,
                "user_email_jwt_field" => s.user_email_jwt_field = text()?,
                "org_id_jwt_field" => s.org_id_jwt_field = text()?,
                "public_key_ttl" => {
                    if let Some(d) = opt_seconds(value, &path)? {
                        s.public_key_ttl = d;
                    }
                }
                "public_key_stale_ttl" => {
                    if let Some(d) = opt_seconds(value, &path)? {
                        s.public_key_stale_ttl = d;
                    }
                }
                "public_key" => s.public_key_pem = text()?,
                "secret" => s.secret = text()?,
                _ => ignored.push(path),
            }
        }

        let env_text = |name: &str| {
            env(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if let Some(urls) = env_text("JWT_PUBLIC_KEY_URL") {
            for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err((
                        "JWT_PUBLIC_KEY_URL".into(),
                        "comma-separated http:// or https:// JWKS URLs".into(),
                    ));
                }
                s.jwks_urls.push(url.to_string());
            }
        }
        s.audience = env_text("JWT_AUDIENCE");
        s.issuer = env_text("JWT_ISSUER");

        let (pem_path, pem) = match s.public_key_pem.take() {
            Some(p) => (format!("{SETTINGS_PATH}.public_key"), Some(p)),
            None => ("JWT_PUBLIC_KEY".to_string(), env_text("JWT_PUBLIC_KEY")),
        };
        if let Some(pem) = pem {
            // Environment variables often carry PEM newlines as literal `\n`.
            let pem = if pem.contains('\n') {
                pem
            } else {
                pem.replace("\\n", "\n")
            };
            if let Err(e) = JwtKeys::from_pem(&pem) {
                return Err((
                    pem_path,
                    format!("a PEM RSA or EC (P-256) public key ({e})"),
                ));
            }
            s.public_key_pem = Some(pem);
        }
        let (secret_path, secret) = match s.secret.take() {
            Some(v) => (format!("{SETTINGS_PATH}.secret"), Some(v)),
            None => (
                "JWT_SECRET".to_string(),
                env("JWT_SECRET").filter(|v| !v.is_empty()),
            ),
        };
        if let Some(secret) = secret {
            if secret.len() < MIN_SECRET_LEN {
                return Err((
                    secret_path,
                    format!("an HS256 secret of at least {MIN_SECRET_LEN} bytes"),
                ));
            }
            s.secret = Some(secret);
        }

        if !s.has_key_source() {
            return Err((
                SETTINGS_PATH.into(),
                "a key to verify JWTs with: JWKS URLs in JWT_PUBLIC_KEY_URL, a PEM public key \
                 (public_key or JWT_PUBLIC_KEY), or an HS256 secret (secret or JWT_SECRET)"
                    .into(),
            ));
        }
        Ok((s, ignored))
    }

    /// Whether any key source (JWKS URLs, PEM key, secret) is configured.
    pub fn has_key_source(&self) -> bool {
        !self.jwks_urls.is_empty() || self.public_key_pem.is_some() || self.secret.is_some()
    }
}

fn opt_string(value: &Value, path: &str) -> Result<Option<String>, (String, String)> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        _ => Err((path.to_string(), "a string".to_string())),
    }
}

fn opt_seconds(value: &Value, path: &str) -> Result<Option<Duration>, (String, String)> {
    let secs = match value {
        Value::Null => return Ok(None),
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match secs {
        Some(v) if (0.0..1e12).contains(&v) => Ok(Some(Duration::from_secs_f64(v))),
        _ => Err((
            path.to_string(),
            "a number of seconds, 0 or more".to_string(),
        )),
    }
}

/// The only algorithms accepted.
const SUPPORTED: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::HS256];

fn algorithm(name: &str) -> Option<Algorithm> {
    match name {
        "RS256" => Some(Algorithm::RS256),
        "ES256" => Some(Algorithm::ES256),
        "HS256" => Some(Algorithm::HS256),
        _ => None,
    }
}

#[derive(Clone)]
struct KeyEntry {
    /// `None` for static keys (and JWKS keys without a `kid`): a candidate for every token.
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Verification keys, each bound to one algorithm and, for JWKS keys, to its `kid`.
#[derive(Clone, Default)]
pub struct JwtKeys {
    keys: Vec<KeyEntry>,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| (k.alg, k.kid.as_deref())))
            .finish()
    }
}

impl JwtKeys {
    /// Parses a JWKS (`{"keys": [...]}`, a bare list, or a single JWK). RSA (RS256) and EC P-256
    /// (ES256) signature keys are kept; encryption keys, other algorithms and curves, and
    /// symmetric keys are skipped. It is an error when no usable key remains.
    pub fn from_jwks(json: &[u8]) -> Result<JwtKeys, String> {
        let doc: Value =
            serde_json::from_slice(json).map_err(|e| format!("JWKS is not JSON: {e}"))?;
        let list: Vec<&Value> = match &doc {
            Value::Object(o) => match o.get("keys") {
                Some(Value::Array(a)) => a.iter().collect(),
                Some(_) => return Err("JWKS `keys` is not a list".into()),
                None => vec![&doc],
            },
            Value::Array(a) => a.iter().collect(),
            _ => return Err("JWKS is not an object or a list".into()),
        };
        let keys: Vec<KeyEntry> = list.into_iter().filter_map(jwk_entry).collect();
        if keys.is_empty() {
            return Err("JWKS holds no RS256 or ES256 (P-256) signature key".into());
        }
        Ok(JwtKeys { keys })
    }

    /// A PEM public key (`PUBLIC KEY`, `RSA PUBLIC KEY` or a `CERTIFICATE`): RSA keys verify
    /// RS256, EC P-256 keys ES256.
    pub fn from_pem(pem: &str) -> Result<JwtKeys, String> {
        if pem.contains("PRIVATE KEY-----") {
            return Err("expected a public key, got a private key".into());
        }
        let bytes = pem.trim().as_bytes();
        let entry = if let Ok(key) = DecodingKey::from_rsa_pem(bytes) {
            KeyEntry {
                kid: None,
                alg: Algorithm::RS256,
                key,
            }
        } else if let Ok(key) = DecodingKey::from_ec_pem(bytes) {
            if !is_p256(&key) {
                return Err("EC keys must be on P-256 (ES256)".into());
            }
            KeyEntry {
                kid: None,
                alg: Algorithm::ES256,
                key,
            }
        } else {
            return Err("not a PEM RSA or EC public key".into());
        };
        Ok(JwtKeys { keys: vec![entry] })
    }

    /// An HS256 shared secret.
    pub fn from_secret(secret: &[u8]) -> JwtKeys {
        JwtKeys {
            keys: vec![KeyEntry {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret),
            }],
        }
    }

    /// The static keys the settings name (PEM key and/or secret); `None` when there are none.
    pub fn static_from(settings: &JwtSettings) -> Option<Result<JwtKeys, String>> {
        if settings.public_key_pem.is_none() && settings.secret.is_none() {
            return None;
        }
        let mut keys = JwtKeys::default();
        if let Some(pem) = &settings.public_key_pem {
            match JwtKeys::from_pem(pem) {
                Ok(k) => keys.extend(k),
                Err(e) => return Some(Err(format!("public_key: {e}"))),
            }
        }
        if let Some(secret) = &settings.secret {
            keys.extend(JwtKeys::from_secret(secret.as_bytes()));
        }
        Some(Ok(keys))
    }

    /// Adds another set's keys.
    pub fn extend(&mut self, other: JwtKeys) {
        self.keys.extend(other.keys);
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether some key could verify this token (its `alg` and `kid` match a key). `false` for a
    /// token naming a `kid` no key has: the caller may refetch the JWKS.
    pub fn can_verify(&self, token: &str) -> bool {
        match token_header(token) {
            Some(h) => match h.alg {
                Some(alg) => self.candidates(alg, h.kid.as_deref()).next().is_some(),
                None => false,
            },
            None => false,
        }
    }

    fn candidates<'a>(
        &'a self,
        alg: Algorithm,
        kid: Option<&'a str>,
    ) -> impl Iterator<Item = &'a KeyEntry> + 'a {
        self.keys.iter().filter(move |k| {
            k.alg == alg
                && match (&k.kid, kid) {
                    (Some(have), Some(want)) => have == want,
                    _ => true,
                }
        })
    }
}

fn is_p256(key: &DecodingKey) -> bool {
    matches!(key.try_get_as_bytes(), Ok(b) if b.len() == 65 && b[0] == 4)
        // A point off the curve fails here, before any token is checked against it.
        && jsonwebtoken::crypto::verify("AAAA", b"probe", key, Algorithm::ES256).is_ok()
}

/// One usable JWKS entry, or `None` to skip it.
fn jwk_entry(jwk: &Value) -> Option<KeyEntry> {
    let text = |name: &str| jwk.get(name).and_then(Value::as_str);
    if text("use").is_some_and(|u| u != "sig") {
        return None;
    }
    if let Some(ops) = jwk.get("key_ops").and_then(Value::as_array) {
        if !ops.iter().any(|o| o.as_str() == Some("verify")) {
            return None;
        }
    }
    let declared = match text("alg") {
        Some(a) => Some(algorithm(a)?),
        None => None,
    };
    let kid = text("kid").map(str::to_string);
    match text("kty")? {
        "RSA" => {
            if declared.is_some_and(|a| a != Algorithm::RS256) {
                return None;
            }
            let (n, e) = (text("n")?, text("e")?);
            if n.is_empty() || e.is_empty() {
                return None;
            }
            let key = DecodingKey::from_rsa_components(n, e).ok()?;
            Some(KeyEntry {
                kid,
                alg: Algorithm::RS256,
                key,
            })
        }
        "EC" => {
            if declared.is_some_and(|a| a != Algorithm::ES256) || text("crv")? != "P-256" {
                return None;
            }
            let key = DecodingKey::from_ec_components(text("x")?, text("y")?).ok()?;
            if !is_p256(&key) {
                return None;
            }
            Some(KeyEntry {
                kid,
                alg: Algorithm::ES256,
                key,
            })
        }
        // Symmetric keys have no business in a published key set.
        _ => None,
    }
}

struct TokenHeader {
    /// `None` when `alg` names an algorithm Sluice does not accept.
    alg: Option<Algorithm>,
    kid: Option<String>,
}

fn is_b64url(segment: &str) -> bool {
    segment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn token_header(token: &str) -> Option<TokenHeader> {
    let mut parts = token.split('.');
    let (header, payload, signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || header.is_empty()
        || payload.is_empty()
        || ![header, payload, signature].iter().all(|s| is_b64url(s))
    {
        return None;
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let header: Map<String, Value> = serde_json::from_slice(&raw).ok()?;
    let alg = header.get("alg")?.as_str()?;
    Some(TokenHeader {
        alg: algorithm(alg),
        kid: header
            .get("kid")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// Cheap syntactic check: three dot-separated base64url segments whose header decodes to a JSON
/// object with an `alg`. `sk-...` keys never pass; a token with an unsupported `alg` (even
/// `none`) does, so that it is rejected as a JWT rather than looked up as a key.
pub fn looks_like_jwt(token: &str) -> bool {
    token_header(token).is_some()
}

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtIdentity {
    /// The `scope` claim holds `admin_jwt_scope`.
    pub admin: bool,
    pub user_id: Option<String>,
    pub team_id: Option<String>,
    pub team_ids: Vec<String>,
    pub end_user_id: Option<String>,
    pub user_email: Option<String>,
    pub org_id: Option<String>,
    /// The `exp` claim (seconds since the epoch).
    pub expires_at: Option<i64>,
}

fn auth_error(detail: impl std::fmt::Display) -> ApiError {
    ApiError::unauthorized(format!("Authentication Error, {detail}"))
}

fn validation_error(detail: impl std::fmt::Display) -> ApiError {
    auth_error(format!("Validation fails: {detail}"))
}

fn map_jwt_error(kind: &ErrorKind) -> ApiError {
    match kind {
        ErrorKind::ExpiredSignature => ApiError::new(401, "expired_key", "Token Expired"),
        ErrorKind::InvalidSignature => validation_error("Signature verification failed"),
        ErrorKind::InvalidAudience => validation_error("Audience doesn't match"),
        ErrorKind::InvalidIssuer => validation_error("Invalid issuer"),
        ErrorKind::ImmatureSignature => validation_error("The token is not yet valid (nbf)"),
        ErrorKind::MissingRequiredClaim(c) => {
            validation_error(format!("Token is missing the \"{c}\" claim"))
        }
        ErrorKind::InvalidClaimFormat(c) => {
            validation_error(format!("The \"{c}\" claim must be a number"))
        }
        ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => {
            validation_error("The specified alg value is not allowed")
        }
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => validation_error("Invalid token"),
        _ => validation_error("Invalid key"),
    }
}

/// Verifies the signature (RS256, ES256 or HS256 with a key bound to that algorithm; a `kid` in
/// the header picks the key, keys without one are tried in turn), `exp` (required), `nbf`, the
/// audience and issuer when configured, then maps the claims through the `*_jwt_field` settings.
/// Every failure is a 401.
pub fn verify(
    token: &str,
    keys: &JwtKeys,
    settings: &JwtSettings,
) -> Result<JwtIdentity, ApiError> {
    let header =
        token_header(token).ok_or_else(|| auth_error("Invalid JWT Submitted: malformed token"))?;
    let alg = header
        .alg
        .ok_or_else(|| validation_error("The specified alg value is not allowed"))?;
    debug_assert!(SUPPORTED.contains(&alg));

    let mut validation = Validation::new(alg);
    validation.leeway = settings.leeway_secs;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    let mut required: HashSet<String> = HashSet::from(["exp".to_string()]);
    match &settings.audience {
        Some(aud) => {
            validation.set_audience(&[aud]);
            required.insert("aud".into());
        }
        None => validation.validate_aud = false,
    }
    if let Some(iss) = &settings.issuer {
        validation.set_issuer(&[iss]);
        required.insert("iss".into());
    }
    validation.required_spec_claims = required;

    let mut tried = false;
    for entry in keys.candidates(alg, header.kid.as_deref()) {
        tried = true;
        match jsonwebtoken::decode::<Value>(token, &entry.key, &validation) {
            Ok(data) => return identity(&data.claims, settings),
            // Another key without a `kid` may still match.
            Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
            Err(e) => return Err(map_jwt_error(e.kind())),
        }
    }
    if !tried {
        let kid: String = header
            .kid
            .as_deref()
            .unwrap_or("None")
            .chars()
            .take(64)
            .collect();
        return Err(auth_error(format!(
            "No matching public key found. kid={kid}"
        )));
    }
    Err(map_jwt_error(&ErrorKind::InvalidSignature))
}

/// The claim at `path`: an exact top-level name first, then a dotted path (`\.` escapes a dot).
fn claim<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    let path = path.strip_prefix("metadata.").unwrap_or(path);
    let mut current = claims;
    let mut part = String::new();
    let mut chars = path.chars().peekable();
    loop {
        match chars.next() {
            Some('\\') if chars.peek() == Some(&'.') => {
                chars.next();
                part.push('.');
            }
            Some('.') => {
                current = current.get(part.as_str())?;
                part.clear();
            }
            Some(c) => part.push(c),
            None => return current.get(part.as_str()),
        }
    }
}

/// A claim value as an id: strings (non-empty) and numbers.
fn as_id(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn field(claims: &Value, path: &Option<String>) -> Option<String> {
    path.as_deref()
        .and_then(|p| claim(claims, p))
        .and_then(as_id)
}

fn identity(claims: &Value, s: &JwtSettings) -> Result<JwtIdentity, ApiError> {
    let scopes: Vec<&str> = match claims.get("scope") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(v)) => v.split_whitespace().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        Some(other) => {
            let kind = match other {
                Value::Bool(_) => "bool",
                Value::Number(_) => "number",
                _ => "object",
            };
            return Err(auth_error(format!(
                "Unmapped scope type - {kind}. Supported types - list, str."
            )));
        }
    };
    let admin = scopes.contains(&s.admin_jwt_scope.as_str());

    let team_id = match s
        .team_id_jwt_field
        .as_deref()
        .and_then(|p| claim(claims, p))
    {
        Some(Value::Array(a)) => a.first().and_then(as_id),
        Some(v) => as_id(v),
        None => None,
    }
    .or_else(|| s.team_id_default.clone());
    let team_ids = match s
        .team_ids_jwt_field
        .as_deref()
        .and_then(|p| claim(claims, p))
    {
        Some(Value::Array(a)) => a.iter().filter_map(as_id).collect(),
        Some(v) => as_id(v).into_iter().collect(),
        None => vec![],
    };
    let expires_at = claims
        .get("exp")
        .and_then(|e| e.as_i64().or_else(|| e.as_f64().map(|f| f as i64)));
    Ok(JwtIdentity {
        admin,
        user_id: field(claims, &s.user_id_jwt_field),
        team_id,
        team_ids,
        end_user_id: field(claims, &s.end_user_id_jwt_field),
        user_email: field(claims, &s.user_email_jwt_field),
        org_id: field(claims, &s.org_id_jwt_field),
        expires_at,
    })
}

/// Whether a `JWT_PUBLIC_KEY_URL` entry is an OIDC discovery document rather than a JWKS.
pub fn is_discovery_url(url: &str) -> bool {
    url.contains(".well-known/openid-configuration")
}

/// The `jwks_uri` of an OIDC discovery document.
pub fn jwks_uri_from_discovery(json: &[u8]) -> Result<String, String> {
    let doc: Value = serde_json::from_slice(json)
        .map_err(|e| format!("OIDC discovery document is not JSON: {e}"))?;
    match doc.get("jwks_uri").and_then(Value::as_str) {
        Some(u) if u.starts_with("https://") || u.starts_with("http://") => Ok(u.to_string()),
        Some(_) => Err("OIDC discovery document's jwks_uri is not an http(s) URL".into()),
        None => Err("OIDC discovery document has no jwks_uri".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/jwt");
    const SECRET: &str = "test-only-hs256-secret-0123456789abcdef";

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{FIXTURES}/{name}")).unwrap()
    }

    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    fn settings() -> JwtSettings {
        JwtSettings {
            user_id_jwt_field: Some("sub".into()),
            ..JwtSettings::default()
        }
    }

    fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        encode(&h, claims, key).unwrap()
    }

    fn hs(claims: &Value) -> String {
        sign(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            claims,
        )
    }

    fn rsa_key(name: &str) -> EncodingKey {
        EncodingKey::from_rsa_pem(fixture(&format!("{name}.TEST-ONLY-private.pem")).as_bytes())
            .unwrap()
    }

    fn ec_key() -> EncodingKey {
        EncodingKey::from_ec_pem(fixture("ec-p256.TEST-ONLY-private.pem").as_bytes()).unwrap()
    }

    fn secret_keys() -> JwtKeys {
        JwtKeys::from_secret(SECRET.as_bytes())
    }

    /// Builds a token from raw segments (for headers `encode` refuses to write).
    fn raw_token(header: &Value, claims: &Value, sig: &str) -> String {
        let b = |v: &Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
        };
        format!("{}.{}.{sig}", b(header), b(claims))
    }

    #[test]
    fn hs256_user_token() {
        let exp = now() + 300;
        let token = hs(&json!({"sub": "alice", "exp": exp, "email": "a@example.com"}));
        let mut s = settings();
        s.user_email_jwt_field = Some("email".into());
        let id = verify(&token, &secret_keys(), &s).unwrap();
        assert_eq!(
            id,
            JwtIdentity {
                admin: false,
                user_id: Some("alice".into()),
                team_id: None,
                team_ids: vec![],
                end_user_id: None,
                user_email: Some("a@example.com".into()),
                org_id: None,
                expires_at: Some(exp),
            }
        );
    }

    #[test]
    fn admin_scope_string_or_list() {
        let keys = secret_keys();
        let exp = now() + 60;
        let s = settings();
        let t = hs(&json!({"sub": "root", "exp": exp, "scope": "openid litellm_proxy_admin"}));
        assert!(verify(&t, &keys, &s).unwrap().admin);
        let t = hs(&json!({"sub": "root", "exp": exp, "scope": ["litellm_proxy_admin"]}));
        assert!(verify(&t, &keys, &s).unwrap().admin);
        let t = hs(&json!({"sub": "u", "exp": exp, "scope": "openid litellm_proxy_admin_x"}));
        assert!(!verify(&t, &keys, &s).unwrap().admin);
        let t = hs(&json!({"sub": "u", "exp": exp}));
        assert!(!verify(&t, &keys, &s).unwrap().admin);
        let mut custom = settings();
        custom.admin_jwt_scope = "gateway-admin".into();
        let t = hs(&json!({"sub": "u", "exp": exp, "scope": "gateway-admin"}));
        assert!(verify(&t, &keys, &custom).unwrap().admin);
        let t = hs(&json!({"sub": "u", "exp": exp, "scope": 7}));
        let e = verify(&t, &keys, &s).unwrap_err();
        assert_eq!(e.status, 401);
        assert!(e.message.contains("Unmapped scope type"), "{}", e.message);
    }

    #[test]
    fn team_and_nested_field_mapping() {
        let mut s = settings();
        s.team_id_jwt_field = Some("client_id".into());
        s.team_ids_jwt_field = Some("realm.groups".into());
        s.org_id_jwt_field = Some("org\\.id".into());
        s.end_user_id_jwt_field = Some("https://example.com/customer".into());
        let claims = json!({
            "sub": "bob", "exp": now() + 60, "client_id": ["team-a", "team-b"],
            "realm": {"groups": ["g1", "g2", 3]}, "org.id": "org-9",
            "https://example.com/customer": "cust-1"
        });
        let id = verify(&hs(&claims), &secret_keys(), &s).unwrap();
        assert_eq!(id.user_id.as_deref(), Some("bob"));
        assert_eq!(id.team_id.as_deref(), Some("team-a"));
        assert_eq!(id.team_ids, vec!["g1", "g2", "3"]);
        assert_eq!(id.org_id.as_deref(), Some("org-9"));
        assert_eq!(id.end_user_id.as_deref(), Some("cust-1"));

        // A missing team claim falls back to team_id_default; a single string is a one-item list.
        s.team_id_default = Some("default-team".into());
        let claims = json!({"sub": "bob", "exp": now() + 60, "realm": {"groups": "solo"}});
        let id = verify(&hs(&claims), &secret_keys(), &s).unwrap();
        assert_eq!(id.team_id.as_deref(), Some("default-team"));
        assert_eq!(id.team_ids, vec!["solo"]);
    }

    #[test]
    fn expired_missing_exp_and_nbf_are_401() {
        let keys = secret_keys();
        let s = settings();
        let e = verify(&hs(&json!({"sub": "a", "exp": now() - 5})), &keys, &s).unwrap_err();
        assert_eq!(
            (e.status, e.kind, e.message.as_str()),
            (401, "expired_key", "Token Expired")
        );
        let e = verify(&hs(&json!({"sub": "a"})), &keys, &s).unwrap_err();
        assert_eq!(e.status, 401);
        assert!(e.message.contains("\"exp\""), "{}", e.message);
        let t = hs(&json!({"sub": "a", "exp": now() + 600, "nbf": now() + 300}));
        let e = verify(&t, &keys, &s).unwrap_err();
        assert_eq!(e.status, 401);
        assert!(e.message.contains("not yet valid"), "{}", e.message);
    }

    #[test]
    fn wrong_signature_is_401() {
        let claims = json!({"sub": "a", "exp": now() + 60});
        let other = EncodingKey::from_secret(b"another-test-only-secret-0123456789abcdef");
        let t = sign(Algorithm::HS256, None, &other, &claims);
        let e = verify(&t, &secret_keys(), &settings()).unwrap_err();
        assert_eq!(e.status, 401);
        assert_eq!(
            e.message,
            "Authentication Error, Validation fails: Signature verification failed"
        );
        // A tampered payload under a genuine signature.
        let good = hs(&claims);
        let parts: Vec<&str> = good.split('.').collect();
        let forged = raw_token(
            &json!({"alg": "HS256", "typ": "JWT"}),
            &json!({"sub": "admin", "exp": now() + 60, "scope": "litellm_proxy_admin"}),
            parts[2],
        );
        assert_eq!(
            verify(&forged, &secret_keys(), &settings())
                .unwrap_err()
                .status,
            401
        );
    }

    #[test]
    fn audience_and_issuer_when_configured() {
        let keys = secret_keys();
        let mut s = settings();
        s.audience = Some("sluice".into());
        let ok = hs(&json!({"sub": "a", "exp": now() + 60, "aud": ["other", "sluice"]}));
        assert!(verify(&ok, &keys, &s).is_ok());
        let wrong = hs(&json!({"sub": "a", "exp": now() + 60, "aud": "other"}));
        let e = verify(&wrong, &keys, &s).unwrap_err();
        assert_eq!(e.status, 401);
        assert!(e.message.contains("Audience"), "{}", e.message);
        let missing = hs(&json!({"sub": "a", "exp": now() + 60}));
        assert_eq!(verify(&missing, &keys, &s).unwrap_err().status, 401);
        // Without JWT_AUDIENCE the audience is not checked (LiteLLM's behaviour).
        assert!(verify(&wrong, &keys, &settings()).is_ok());

        s.audience = None;
        s.issuer = Some("https://idp.example.com".into());
        let t = hs(&json!({"sub": "a", "exp": now() + 60, "iss": "https://evil.example.com"}));
        assert_eq!(verify(&t, &keys, &s).unwrap_err().status, 401);
        let t = hs(&json!({"sub": "a", "exp": now() + 60, "iss": "https://idp.example.com"}));
        assert!(verify(&t, &keys, &s).is_ok());
    }

    #[test]
    fn alg_none_and_unsupported_algs_are_401() {
        let claims = json!({"sub": "a", "exp": now() + 60, "scope": "litellm_proxy_admin"});
        let none = raw_token(&json!({"alg": "none", "typ": "JWT"}), &claims, "");
        assert!(looks_like_jwt(&none));
        let e = verify(&none, &secret_keys(), &settings()).unwrap_err();
        assert_eq!(e.status, 401);
        assert!(
            e.message.contains("alg value is not allowed"),
            "{}",
            e.message
        );

        let hs384 = sign(
            Algorithm::HS384,
            None,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            &claims,
        );
        assert_eq!(
            verify(&hs384, &secret_keys(), &settings())
                .unwrap_err()
                .status,
            401
        );

        // HS256 signed with the RSA public key as the "secret" (algorithm confusion).
        let public_pem = fixture("rsa-a.public.pem");
        let confused = sign(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(public_pem.as_bytes()),
            &claims,
        );
        let rsa_only = JwtKeys::from_pem(&public_pem).unwrap();
        let e = verify(&confused, &rsa_only, &settings()).unwrap_err();
        assert_eq!(e.status, 401);
        assert!(
            e.message.contains("No matching public key"),
            "{}",
            e.message
        );
    }

    #[test]
    fn rs256_and_es256_with_pem_keys() {
        let claims = json!({"sub": "carol", "exp": now() + 60});
        let rsa = JwtKeys::from_pem(&fixture("rsa-a.public.pem")).unwrap();
        let t = sign(Algorithm::RS256, None, &rsa_key("rsa-a"), &claims);
        assert_eq!(
            verify(&t, &rsa, &settings()).unwrap().user_id.as_deref(),
            Some("carol")
        );
        // Signed by the other RSA key: rejected.
        let t = sign(Algorithm::RS256, None, &rsa_key("rsa-b"), &claims);
        assert_eq!(verify(&t, &rsa, &settings()).unwrap_err().status, 401);

        let ec = JwtKeys::from_pem(&fixture("ec-p256.public.pem")).unwrap();
        let t = sign(Algorithm::ES256, Some("whatever"), &ec_key(), &claims);
        assert!(verify(&t, &ec, &settings()).is_ok());
        // An RS256 token cannot use the EC key.
        let t = sign(Algorithm::RS256, None, &rsa_key("rsa-a"), &claims);
        assert_eq!(verify(&t, &ec, &settings()).unwrap_err().status, 401);

        assert!(JwtKeys::from_pem(&fixture("rsa-a.TEST-ONLY-private.pem")).is_err());
        assert!(JwtKeys::from_pem("not a key").is_err());
    }

    #[test]
    fn jwks_picks_key_by_kid() {
        let keys = JwtKeys::from_jwks(fixture("jwks.json").as_bytes()).unwrap();
        // Two RSA keys and the EC key; the encryption key is skipped.
        assert_eq!(keys.len(), 3);
        let claims = json!({"sub": "dave", "exp": now() + 60});
        let s = settings();
        let b = sign(
            Algorithm::RS256,
            Some("test-key-b"),
            &rsa_key("rsa-b"),
            &claims,
        );
        assert!(keys.can_verify(&b));
        assert_eq!(
            verify(&b, &keys, &s).unwrap().user_id.as_deref(),
            Some("dave")
        );
        let a = sign(
            Algorithm::RS256,
            Some("test-key-a"),
            &rsa_key("rsa-a"),
            &claims,
        );
        assert!(verify(&a, &keys, &s).is_ok());
        // Key b's signature under key a's kid: the kid picks key a, which rejects it.
        let mislabelled = sign(
            Algorithm::RS256,
            Some("test-key-a"),
            &rsa_key("rsa-b"),
            &claims,
        );
        let e = verify(&mislabelled, &keys, &s).unwrap_err();
        assert!(
            e.message.contains("Signature verification failed"),
            "{}",
            e.message
        );
        let ec = sign(Algorithm::ES256, Some("test-key-ec"), &ec_key(), &claims);
        assert!(verify(&ec, &keys, &s).is_ok());
        // An unknown kid: no key, and the proxy is told it may refetch.
        let unknown = sign(
            Algorithm::RS256,
            Some("rotated"),
            &rsa_key("rsa-a"),
            &claims,
        );
        assert!(!keys.can_verify(&unknown));
        let e = verify(&unknown, &keys, &s).unwrap_err();
        assert_eq!(e.status, 401);
        assert!(e.message.contains("kid=rotated"), "{}", e.message);
        // No kid: every RS256 key is tried.
        let bare = sign(Algorithm::RS256, None, &rsa_key("rsa-b"), &claims);
        assert!(verify(&bare, &keys, &s).is_ok());
    }

    #[test]
    fn fixture_tokens_verify_against_the_fixture_jwks() {
        // proxy/src/jwt_auth.rs tests rely on these long-lived tokens.
        let keys = JwtKeys::from_jwks(fixture("jwks.json").as_bytes()).unwrap();
        let a = fixture("rs256-kid-a.TEST-ONLY.token");
        let id = verify(a.trim(), &keys, &settings()).unwrap();
        assert!(id.admin);
        assert_eq!(id.user_id.as_deref(), Some("fixture-user"));
        let rotated = fixture("rs256-kid-rotated.TEST-ONLY.token");
        assert!(!keys.can_verify(rotated.trim()));
        let rotated_set = fixture("jwks.json").replace("test-key-b", "rotated-key");
        let keys = JwtKeys::from_jwks(rotated_set.as_bytes()).unwrap();
        assert!(verify(rotated.trim(), &keys, &settings()).is_ok());
    }

    #[test]
    fn jwks_shapes_and_rejections() {
        let set: Value = serde_json::from_str(&fixture("jwks.json")).unwrap();
        let first = set["keys"][0].clone();
        assert_eq!(
            JwtKeys::from_jwks(first.to_string().as_bytes())
                .unwrap()
                .len(),
            1
        );
        let list = Value::Array(set["keys"].as_array().unwrap().clone());
        assert_eq!(
            JwtKeys::from_jwks(list.to_string().as_bytes())
                .unwrap()
                .len(),
            3
        );
        let oct = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}]});
        assert!(JwtKeys::from_jwks(oct.to_string().as_bytes()).is_err());
        let p384 = json!({"keys": [{"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"}]});
        assert!(JwtKeys::from_jwks(p384.to_string().as_bytes()).is_err());
        assert!(JwtKeys::from_jwks(b"<html>").is_err());
    }

    #[test]
    fn looks_like_jwt_rejects_keys() {
        assert!(!looks_like_jwt("sk-1234"));
        assert!(!looks_like_jwt("sk-abc.def.ghi"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(!looks_like_jwt(""));
        let no_alg = raw_token(&json!({"typ": "JWT"}), &json!({}), "");
        assert!(!looks_like_jwt(&no_alg));
        assert!(looks_like_jwt(&hs(&json!({"exp": 1}))));
    }

    #[test]
    fn settings_from_map_and_env() {
        let map: Map<String, Value> = serde_json::from_value(json!({
            "user_id_jwt_field": "sub",
            "team_ids_jwt_field": "groups",
            "public_key_ttl": 30,
            "enforce_rbac": true,
            "user_id_upsert": true
        }))
        .unwrap();
        let env = |name: &str| {
            match name {
            "JWT_PUBLIC_KEY_URL" => Some(" https://idp.example/a/jwks , https://idp2.example/.well-known/openid-configuration".to_string()),
            "JWT_AUDIENCE" => Some("sluice".to_string()),
            _ => None,
        }
        };
        let (s, ignored) = JwtSettings::from_map_with_env(&map, env).unwrap();
        assert_eq!(s.admin_jwt_scope, "litellm_proxy_admin");
        assert_eq!(s.user_id_jwt_field.as_deref(), Some("sub"));
        assert_eq!(s.team_ids_jwt_field.as_deref(), Some("groups"));
        assert_eq!(s.public_key_ttl, Duration::from_secs(30));
        assert_eq!(
            s.jwks_urls,
            vec![
                "https://idp.example/a/jwks",
                "https://idp2.example/.well-known/openid-configuration"
            ]
        );
        assert!(is_discovery_url(&s.jwks_urls[1]));
        assert_eq!(s.audience.as_deref(), Some("sluice"));
        assert_eq!(
            ignored,
            vec![
                "general_settings.litellm_jwtauth.enforce_rbac",
                "general_settings.litellm_jwtauth.user_id_upsert"
            ]
        );
        assert!(JwtKeys::static_from(&s).is_none());

        let bad = |v: Value| {
            let map: Map<String, Value> = serde_json::from_value(v).unwrap();
            JwtSettings::from_map_with_env(&map, env).unwrap_err()
        };
        assert_eq!(
            bad(json!({"public_key_ttl": "soon"})).0,
            "general_settings.litellm_jwtauth.public_key_ttl"
        );
        assert_eq!(
            bad(json!({"user_id_jwt_field": 5})).0,
            "general_settings.litellm_jwtauth.user_id_jwt_field"
        );
        assert_eq!(
            bad(json!({"secret": "short"})).0,
            "general_settings.litellm_jwtauth.secret"
        );
        assert_eq!(
            bad(
                json!({"public_key": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"})
            )
            .0,
            "general_settings.litellm_jwtauth.public_key"
        );

        // No key source at all.
        let err = JwtSettings::from_map_with_env(&Map::new(), |_| None).unwrap_err();
        assert_eq!(err.0, "general_settings.litellm_jwtauth");
        let err = JwtSettings::from_map_with_env(&Map::new(), |n| {
            (n == "JWT_PUBLIC_KEY_URL").then(|| "ftp://x".to_string())
        })
        .unwrap_err();
        assert_eq!(err.0, "JWT_PUBLIC_KEY_URL");
    }

    #[test]
    fn static_keys_from_settings_and_env() {
        let pem = fixture("ec-p256.public.pem");
        // PEM in an env var with literal "\n" escapes.
        let escaped = pem.trim().replace('\n', "\\n");
        let env = |name: &str| match name {
            "JWT_PUBLIC_KEY" => Some(escaped.clone()),
            "JWT_SECRET" => Some(SECRET.to_string()),
            _ => None,
        };
        let (s, _) = JwtSettings::from_map_with_env(&Map::new(), env).unwrap();
        assert!(s.jwks_urls.is_empty());
        let keys = JwtKeys::static_from(&s).unwrap().unwrap();
        assert_eq!(keys.len(), 2);
        let claims = json!({"sub": "erin", "exp": now() + 60});
        let es = sign(Algorithm::ES256, None, &ec_key(), &claims);
        assert!(verify(&es, &keys, &s).is_ok());
        assert!(verify(&hs(&claims), &keys, &s).is_ok());
        assert!(!format!("{s:?}").contains(SECRET));
    }

    #[test]
    fn discovery_documents() {
        let doc = br#"{"issuer": "https://idp", "jwks_uri": "https://idp/keys"}"#;
        assert_eq!(jwks_uri_from_discovery(doc).unwrap(), "https://idp/keys");
        assert!(jwks_uri_from_discovery(br#"{"issuer": "https://idp"}"#).is_err());
    }
}
