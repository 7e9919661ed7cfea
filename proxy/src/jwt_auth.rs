//! JWT bearer auth (`general_settings.enable_jwt_auth: true`): the verification keys for
//! [`sluice_filters::jwt::verify`]. Static keys (`public_key` / `secret`) are used as they are;
//! the JWKS behind each `JWT_PUBLIC_KEY_URL` entry (an OIDC discovery URL is first resolved to its
//! `jwks_uri`) is fetched over the gateway's own upstream connector, as Vertex tokens are in
//! [`crate::google_auth`], and cached for `public_key_ttl`.
//!
//! A fetch happens when a key set is missing or older than `public_key_ttl`, or when a token names
//! a `kid` that no cached key has (a key rotation), but never more than once per
//! [`MIN_REFETCH_INTERVAL`], so tokens with made-up kids cannot hammer the identity provider. One
//! request fetches while the others wait for its result. While an endpoint cannot be reached its
//! last key set keeps being used for `public_key_stale_ttl` past its TTL; after that, tokens no
//! remaining key can verify get a 503, as LiteLLM answers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use sluice_filters::jwt::{self, JwtIdentity, JwtKeys, JwtSettings};
use sluice_filters::ApiError;

use crate::target::Target;
use crate::upstream::{Call, Upstream};

/// At most one JWKS fetch round per this interval.
pub const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(10);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// One `JWT_PUBLIC_KEY_URL` entry's last good key set.
#[derive(Default)]
struct Source {
    fetched: Option<(JwtKeys, Instant)>,
    /// The last attempt failed.
    failing: bool,
    /// `fetched` is young enough to be in the combined set.
    usable: bool,
}

struct Cache {
    sources: Vec<Source>,
    /// Static keys plus every source's usable keys: what tokens are verified against.
    combined: Arc<JwtKeys>,
    last_attempt: Option<Instant>,
}

impl Cache {
    fn needs_fetch(&self, now: Instant, token: &str, ttl: Duration) -> bool {
        if self
            .last_attempt
            .is_some_and(|at| now.duration_since(at) < MIN_REFETCH_INTERVAL)
        {
            return false;
        }
        let expired = self.sources.iter().any(|s| match &s.fetched {
            None => true,
            Some((_, at)) => now.duration_since(*at) >= ttl,
        });
        expired || !self.combined.can_verify(token)
    }

    /// Records a fetch round (one result per source) and rebuilds the combined key set.
    fn store(
        &mut self,
        results: Vec<Result<JwtKeys, String>>,
        now: Instant,
        static_keys: &JwtKeys,
        usable_for: Duration,
    ) {
        self.last_attempt = Some(now);
        for (source, result) in self.sources.iter_mut().zip(results) {
            match result {
                Ok(keys) => {
                    source.fetched = Some((keys, now));
                    source.failing = false;
                }
                Err(_) => source.failing = true,
            }
        }
        let mut combined = static_keys.clone();
        for source in &mut self.sources {
            source.usable = false;
            if let Some((keys, at)) = &source.fetched {
                if now.duration_since(*at) < usable_for {
                    combined.extend(keys.clone());
                    source.usable = true;
                }
            }
        }
        self.combined = Arc::new(combined);
    }

    /// Some endpoint is failing and has no usable keys left to stand in for it.
    fn unavailable(&self) -> bool {
        self.sources.iter().any(|s| s.failing && !s.usable)
    }
}

/// Verifies JWT bearer tokens against the configured keys.
pub struct JwtAuth {
    settings: JwtSettings,
    static_keys: JwtKeys,
    cache: Mutex<Cache>,
    /// Held while fetching, so concurrent requests share one fetch round.
    refresh: tokio::sync::Mutex<()>,
    /// Tests move the clock forward.
    #[cfg(test)]
    skew: Mutex<Duration>,
}

impl JwtAuth {
    /// Builds the static keys and checks the JWKS URLs; fails when there is no key source.
    pub fn new(settings: JwtSettings) -> Result<JwtAuth, String> {
        let static_keys = match JwtKeys::static_from(&settings) {
            Some(keys) => keys?,
            None => JwtKeys::default(),
        };
        if settings.jwks_urls.is_empty() && static_keys.is_empty() {
            return Err("JWT auth needs a key: set JWT_PUBLIC_KEY_URL (JWKS URLs), \
                 general_settings.litellm_jwtauth.public_key or JWT_PUBLIC_KEY (PEM), \
                 or general_settings.litellm_jwtauth.secret or JWT_SECRET (HS256)"
                .into());
        }
        for url in &settings.jwks_urls {
            let target = Target::parse(url).map_err(|e| format!("JWT_PUBLIC_KEY_URL: {e}"))?;
            if target.unix {
                return Err(format!(
                    "JWT_PUBLIC_KEY_URL: {url}: expected http:// or https://"
                ));
            }
        }
        let cache = Cache {
            sources: settings
                .jwks_urls
                .iter()
                .map(|_| Source::default())
                .collect(),
            combined: Arc::new(static_keys.clone()),
            last_attempt: None,
        };
        Ok(JwtAuth {
            settings,
            static_keys,
            cache: Mutex::new(cache),
            refresh: tokio::sync::Mutex::new(()),
            #[cfg(test)]
            skew: Mutex::new(Duration::ZERO),
        })
    }

    #[cfg(not(test))]
    fn now(&self) -> Instant {
        Instant::now()
    }

    #[cfg(test)]
    fn now(&self) -> Instant {
        Instant::now() + *self.skew.lock()
    }

    pub fn settings(&self) -> &JwtSettings {
        &self.settings
    }

    /// Checks the token (see [`sluice_filters::jwt::verify`]) and maps its claims. Static keys
    /// need no fetch; JWKS keys are fetched and cached as the module describes.
    pub async fn verify(&self, upstream: &Upstream, token: &str) -> Result<JwtIdentity, ApiError> {
        if self.settings.jwks_urls.is_empty() {
            return jwt::verify(token, &self.static_keys, &self.settings);
        }
        let keys = self.keys_for(upstream, token).await?;
        jwt::verify(token, &keys, &self.settings)
    }

    async fn keys_for(&self, upstream: &Upstream, token: &str) -> Result<Arc<JwtKeys>, ApiError> {
        let ttl = self.settings.public_key_ttl;
        let stale = { self.cache.lock().needs_fetch(self.now(), token, ttl) };
        if stale {
            let _fetching = self.refresh.lock().await;
            // Another request may have fetched while this one waited.
            let still = { self.cache.lock().needs_fetch(self.now(), token, ttl) };
            if still {
                let results = self.fetch_all(upstream).await;
                let usable_for = ttl.saturating_add(self.settings.public_key_stale_ttl);
                self.cache
                    .lock()
                    .store(results, self.now(), &self.static_keys, usable_for);
            }
        }
        let cache = self.cache.lock();
        if !cache.combined.can_verify(token) && cache.unavailable() {
            return Err(ApiError::new(
                503,
                "auth_provider_unavailable",
                "Service Unavailable, the identity provider's JWKS endpoint is temporarily \
                 unreachable, so the JWT signature could not be verified. Please retry shortly.",
            ));
        }
        Ok(cache.combined.clone())
    }

    async fn fetch_all(&self, upstream: &Upstream) -> Vec<Result<JwtKeys, String>> {
        let fetches = self.settings.jwks_urls.iter().map(|url| async move {
            let result = fetch_keys(upstream, url).await;
            match &result {
                Ok(keys) => tracing::debug!(url = %url, keys = keys.len(), "fetched JWKS"),
                Err(e) => tracing::warn!(url = %url, error = %e, "JWKS fetch failed"),
            }
            result
        });
        futures_util::future::join_all(fetches).await
    }
}

/// The keys behind one `JWT_PUBLIC_KEY_URL` entry.
async fn fetch_keys(upstream: &Upstream, url: &str) -> Result<JwtKeys, String> {
    let jwks_url = if jwt::is_discovery_url(url) {
        jwt::jwks_uri_from_discovery(&get(upstream, url).await?)?
    } else {
        url.to_string()
    };
    let body = get(upstream, &jwks_url).await?;
    JwtKeys::from_jwks(&body).map_err(|e| format!("{jwks_url}: {e}"))
}

/// A GET over the gateway's upstream connector; the body of a 200, or why there is none.
async fn get(upstream: &Upstream, url: &str) -> Result<Bytes, String> {
    let target = Target::parse(url)?;
    if target.unix {
        return Err(format!("{url}: expected http:// or https://"));
    }
    let path = if target.path_prefix.is_empty() {
        "/".to_string()
    } else {
        target.path_prefix.clone()
    };
    let headers = [("accept".to_string(), "application/json".to_string())];
    let call = Call {
        target: &target,
        method: "GET",
        path: &path,
        headers: &headers,
        body: Bytes::new(),
        timeout: FETCH_TIMEOUT,
    };
    let mut resp = upstream
        .send(&call)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.header.status.as_u16();
    let body = upstream
        .read_all(&mut resp, MAX_DOCUMENT_BYTES)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    upstream.release(resp).await;
    if status != 200 {
        return Err(format!(
            "{url}: status {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../filters/fixtures/jwt");

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{FIXTURES}/{name}"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// A one-route HTTP server answering every GET with the current document (status 200, or
    /// 503 while it is `None`), counting requests.
    struct MockIdp {
        base: String,
        hits: Arc<AtomicUsize>,
        doc: Arc<Mutex<Option<String>>>,
    }

    async fn mock_idp(doc: Option<String>) -> MockIdp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let doc = Arc::new(Mutex::new(doc));
        let (h, d) = (hits.clone(), doc.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (h, d) = (h.clone(), d.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let body = d.lock().clone();
                    let (status, body) = match body {
                        Some(b) => ("200 OK", b),
                        None => ("503 Service Unavailable", "down".to_string()),
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        MockIdp { base, hits, doc }
    }

    fn settings(urls: Vec<String>) -> JwtSettings {
        JwtSettings {
            user_id_jwt_field: Some("sub".into()),
            jwks_urls: urls,
            ..JwtSettings::default()
        }
    }

    /// Moves the auth's clock forward.
    fn age(auth: &JwtAuth, by: Duration) {
        *auth.skew.lock() += by;
    }

    #[tokio::test]
    async fn fetches_caches_and_refetches_on_rotation() {
        let idp = mock_idp(Some(fixture("jwks.json"))).await;
        let auth = JwtAuth::new(settings(vec![format!("{}/certs", idp.base)])).unwrap();
        let upstream = Upstream::default();
        let token = fixture("rs256-kid-a.TEST-ONLY.token");

        let id = auth.verify(&upstream, &token).await.unwrap();
        assert!(id.admin);
        assert_eq!(id.user_id.as_deref(), Some("fixture-user"));
        assert_eq!(idp.hits.load(Ordering::SeqCst), 1);
        // Cached: no second fetch.
        auth.verify(&upstream, &token).await.unwrap();
        assert_eq!(idp.hits.load(Ordering::SeqCst), 1);

        // The IdP rotates key b to a new kid. Within 10 s of the last fetch the unknown kid is
        // not refetched; after that it is, once.
        *idp.doc.lock() = Some(fixture("jwks.json").replace("test-key-b", "rotated-key"));
        let rotated = fixture("rs256-kid-rotated.TEST-ONLY.token");
        let e = auth.verify(&upstream, &rotated).await.unwrap_err();
        assert_eq!(e.status, 401);
        assert_eq!(idp.hits.load(Ordering::SeqCst), 1);
        age(&auth, MIN_REFETCH_INTERVAL);
        auth.verify(&upstream, &rotated).await.unwrap();
        assert_eq!(idp.hits.load(Ordering::SeqCst), 2);
        auth.verify(&upstream, &rotated).await.unwrap();
        auth.verify(&upstream, &token).await.unwrap();
        assert_eq!(idp.hits.load(Ordering::SeqCst), 2);

        // Past public_key_ttl the set is fetched again.
        age(&auth, DEFAULT_TTL_PLUS);
        auth.verify(&upstream, &token).await.unwrap();
        assert_eq!(idp.hits.load(Ordering::SeqCst), 3);
    }

    const DEFAULT_TTL_PLUS: Duration = Duration::from_secs(601);

    #[tokio::test]
    async fn outage_serves_stale_keys_then_503() {
        let idp = mock_idp(Some(fixture("jwks.json"))).await;
        let auth = JwtAuth::new(settings(vec![format!("{}/certs", idp.base)])).unwrap();
        let upstream = Upstream::default();
        let token = fixture("rs256-kid-a.TEST-ONLY.token");
        auth.verify(&upstream, &token).await.unwrap();

        *idp.doc.lock() = None;
        // Expired and unreachable: the last set stands in.
        age(&auth, DEFAULT_TTL_PLUS);
        auth.verify(&upstream, &token).await.unwrap();
        assert_eq!(idp.hits.load(Ordering::SeqCst), 2);
        // Beyond the stale window: no key left, 503.
        age(&auth, Duration::from_secs(3600 + 601));
        let e = auth.verify(&upstream, &token).await.unwrap_err();
        assert_eq!(e.status, 503);
        assert_eq!(idp.hits.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn unreachable_at_start_is_503_and_backs_off() {
        let idp = mock_idp(None).await;
        let auth = JwtAuth::new(settings(vec![format!("{}/certs", idp.base)])).unwrap();
        let upstream = Upstream::default();
        let token = fixture("rs256-kid-a.TEST-ONLY.token");
        assert_eq!(
            auth.verify(&upstream, &token).await.unwrap_err().status,
            503
        );
        assert_eq!(
            auth.verify(&upstream, &token).await.unwrap_err().status,
            503
        );
        assert_eq!(idp.hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn discovery_url_is_resolved() {
        let idp = mock_idp(None).await;
        let jwks = mock_idp(Some(fixture("jwks.json"))).await;
        *idp.doc.lock() = Some(format!(r#"{{"jwks_uri": "{}/keys"}}"#, jwks.base));
        let url = format!("{}/realms/x/.well-known/openid-configuration", idp.base);
        let auth = JwtAuth::new(settings(vec![url])).unwrap();
        let token = fixture("rs256-kid-a.TEST-ONLY.token");
        auth.verify(&Upstream::default(), &token).await.unwrap();
        assert_eq!(
            (
                idp.hits.load(Ordering::SeqCst),
                jwks.hits.load(Ordering::SeqCst)
            ),
            (1, 1)
        );
    }

    #[tokio::test]
    async fn static_keys_need_no_fetch() {
        let s = JwtSettings {
            public_key_pem: Some(fixture("rsa-a.public.pem")),
            ..settings(vec![])
        };
        let auth = JwtAuth::new(s).unwrap();
        let token = fixture("rs256-kid-a.TEST-ONLY.token");
        let id = auth.verify(&Upstream::default(), &token).await.unwrap();
        assert_eq!(id.user_id.as_deref(), Some("fixture-user"));
        let other = fixture("rs256-kid-rotated.TEST-ONLY.token");
        assert_eq!(
            auth.verify(&Upstream::default(), &other)
                .await
                .unwrap_err()
                .status,
            401
        );
        assert!(JwtAuth::new(settings(vec![])).is_err());
    }
}
