//! The gateway's shared state, built once from the config.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use sluice_config::Config;
use sluice_filters::auth::{Authenticator, MasterKeyAuth};

use crate::metrics::Metrics;
use crate::router::Router;
use crate::upstream::Upstream;

/// Request bodies above this are refused with 413 unless `max_request_size_mb` says otherwise.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
/// Non-streamed upstream responses are buffered up to this size.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Upstream error bodies are read up to this size to classify them.
pub const MAX_ERROR_BODY_BYTES: usize = 1024 * 1024;

/// `litellm_jwtauth` keys that restrict who may do what in LiteLLM. Sluice does not enforce
/// them, so a config that sets one is refused rather than served with looser access.
const RESTRICTIVE_JWT_KEYS: &[&str] = &[
    "enforce_rbac",
    "user_allowed_email_domain",
    "user_allowed_roles",
    "scope_mappings",
    "enforce_scope_based_access",
    "enforce_team_based_model_access",
    "team_allowed_routes",
    "admin_allowed_routes",
    "custom_validate",
    "issuers",
    "role_mappings",
    "object_id_jwt_field",
];

pub struct App {
    pub config: Config,
    pub router: Router,
    pub auth: Box<dyn Authenticator>,
    pub upstream: Upstream,
    pub metrics: Metrics,
    pub started: Instant,
    pub max_request_bytes: usize,
    pub max_response_bytes: usize,
    /// Inference calls in flight (for `general_settings.global_max_parallel_requests`).
    pub in_flight: AtomicU64,
    /// Requests being handled on any route (a drain waits for this to reach zero).
    pub active: Arc<AtomicU64>,
    /// Set on SIGTERM: liveliness answers 503 so load balancers stop sending traffic.
    pub draining: AtomicBool,
    /// Credentials and base per provider pass-through route: the provider's first configured
    /// deployment, else its environment defaults.
    pub passthrough: std::collections::HashMap<&'static str, Arc<crate::router::DeploymentState>>,
    /// Vertex AI access tokens.
    pub google_tokens: crate::google_auth::GoogleTokens,
    /// The latest background health round, when `background_health_checks` is on.
    pub health_cache: parking_lot::Mutex<Option<crate::info::HealthResults>>,
    /// Virtual keys, budgets, limits and spend; on whenever a master key is set.
    pub tenancy: Option<Arc<crate::tenancy::Tenancy>>,
    /// JWT authentication (`general_settings.enable_jwt_auth`).
    pub jwt: Option<crate::jwt_auth::JwtAuth>,
}

impl App {
    /// Builds the gateway state; fails on JWT settings that cannot work.
    pub fn new(
        config: Config,
        tenancy: Option<Arc<crate::tenancy::Tenancy>>,
        metrics: Metrics,
    ) -> anyhow::Result<App> {
        let jwt = if config.tenancy.enable_jwt_auth {
            let (settings, unknown) = sluice_filters::jwt::JwtSettings::from_map(
                &config.tenancy.jwt,
            )
            .map_err(|(path, expected)| {
                anyhow::anyhow!("{}: {path}: expected {expected}", config.source.display())
            })?;
            // Settings that narrow access in LiteLLM must not silently widen it here.
            let restrictive: Vec<&String> = unknown
                .iter()
                .filter(|k| {
                    RESTRICTIVE_JWT_KEYS
                        .iter()
                        .any(|r| k.rsplit('.').next() == Some(*r))
                })
                .collect();
            if !restrictive.is_empty() {
                anyhow::bail!(
                    "{}: {} restrict access in LiteLLM and Sluice does not enforce them; remove them (expected only the supported litellm_jwtauth keys)",
                    config.source.display(),
                    restrictive.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
                );
            }
            if !unknown.is_empty() {
                tracing::warn!(keys = %unknown.join(", "), "litellm_jwtauth keys Sluice does not act on (ignored)");
            }
            Some(crate::jwt_auth::JwtAuth::new(settings).map_err(anyhow::Error::msg)?)
        } else {
            None
        };
        let auth: Box<dyn Authenticator> =
            Box::new(MasterKeyAuth::new(config.general.master_key.clone()));
        let router = Router::new(&config);
        let passthrough = sluice_filters::route::PASSTHROUGH_PROVIDERS
            .iter()
            .filter_map(|p| {
                let configured = router
                    .all_deployments()
                    .find(|d| d.config.provider.name() == *p && !d.config.is_wildcard())
                    .cloned();
                configured
                    .or_else(|| environment_deployment(p))
                    .map(|d| (*p, d))
            })
            .collect();
        Ok(App {
            jwt,
            passthrough,
            router,
            auth,
            upstream: Upstream::default(),
            metrics,
            tenancy,
            started: Instant::now(),
            max_request_bytes: config
                .general
                .max_request_bytes
                .unwrap_or(DEFAULT_MAX_REQUEST_BYTES),
            max_response_bytes: config
                .general
                .max_response_bytes
                .unwrap_or(DEFAULT_MAX_RESPONSE_BYTES),
            in_flight: AtomicU64::new(0),
            health_cache: parking_lot::Mutex::new(None),
            google_tokens: Default::default(),
            active: Arc::new(AtomicU64::new(0)),
            draining: AtomicBool::new(false),
            config,
        })
    }
}

/// A deployment of `provider` with only its environment defaults (keys, bases, AWS and Google
/// credentials), for pass-through routes no `model_list` entry covers.
fn environment_deployment(provider: &str) -> Option<Arc<crate::router::DeploymentState>> {
    let yaml = format!(
        "model_list: [{{model_name: pass-through-{provider}, litellm_params: {{model: {provider}/pass-through}}}}]"
    );
    let config = sluice_config::parse_config(&yaml, std::path::Path::new("<pass-through>")).ok()?;
    let d = config.deployments.into_iter().next()?;
    Some(crate::router::DeploymentState::standalone(d))
}

/// Counts one request as active until dropped.
pub struct ActiveRequest(Arc<AtomicU64>);

impl ActiveRequest {
    pub fn new(counter: &Arc<AtomicU64>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(counter.clone())
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
