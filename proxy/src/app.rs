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
    /// Vertex AI access tokens.
    pub google_tokens: crate::google_auth::GoogleTokens,
    /// The latest background health round, when `background_health_checks` is on.
    pub health_cache: parking_lot::Mutex<Option<crate::info::HealthResults>>,
}

impl App {
    pub fn new(config: Config) -> App {
        let auth: Box<dyn Authenticator> =
            Box::new(MasterKeyAuth::new(config.general.master_key.clone()));
        App {
            router: Router::new(&config),
            auth,
            upstream: Upstream::default(),
            metrics: Metrics::new(),
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
        }
    }
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
