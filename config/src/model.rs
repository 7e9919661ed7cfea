//! The validated configuration Sluice runs on: deployments grouped by public model name, router
//! behaviour with LiteLLM's defaults applied, and the general settings the gateway core honours.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::provider::ProviderKind;

/// A whole, validated config file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (`<built-in>` for the embedded default).
    pub source: PathBuf,
    /// Every deployment the current `LITELLM_ENVIRONMENT` allows, in file order. Entries whose
    /// `model_name` holds `*` are wildcard templates.
    pub deployments: Vec<Deployment>,
    /// `router_settings.model_group_alias`: alias → group.
    pub model_group_alias: BTreeMap<String, GroupAlias>,
    pub router: RouterSettings,
    pub general: GeneralSettings,
    pub tenancy: TenancySettings,
    /// `local_models`: engines the gateway starts and supervises.
    pub local_models: Vec<crate::local::LocalModel>,
    /// Keys that were accepted but that Sluice does not act on (yet), as full key paths.
    pub ignored_keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GroupAlias {
    pub target: String,
    pub hidden: bool,
}

/// One upstream deployment: a `model_list` entry (one per `organization` when it lists several).
#[derive(Debug, Clone)]
pub struct Deployment {
    /// `model_info.id`, or a stable hash of the entry when the file gives none.
    pub id: String,
    /// The public name clients send as `model`; may be a pattern holding `*`.
    pub model_name: String,
    pub provider: ProviderKind,
    /// The model name sent upstream (without the provider prefix); may hold `*` for wildcards.
    pub upstream_model: String,
    /// `api_base`, else the provider's default base, else `None` (unroutable until configured).
    pub api_base: Option<String>,
    pub api_key: Option<String>,
    pub api_version: Option<String>,
    pub organization: Option<String>,
    pub extra_headers: Vec<(String, String)>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub weight: Option<f64>,
    pub order: Option<i64>,
    pub timeout: Option<Duration>,
    pub stream_timeout: Option<Duration>,
    pub max_retries: Option<u32>,
    pub max_parallel_requests: Option<u64>,
    pub cooldown_time: Option<Duration>,
    pub tags: Vec<String>,
    /// Per-deployment `drop_params` (overrides `litellm_settings.drop_params`).
    pub drop_params: Option<bool>,
    pub input_cost_per_token: Option<f64>,
    pub output_cost_per_token: Option<f64>,
    /// Request parameters given in `litellm_params` (`temperature`, `max_tokens`, ...): sent
    /// upstream unless the client set them itself.
    pub default_params: Map<String, Value>,
    /// Provider credentials and locations for providers with their own signing (aws_*, vertex_*).
    pub provider_params: Map<String, Value>,
    pub model_info: ModelInfo,
}

#[derive(Debug, Clone, Default)]
pub struct ModelInfo {
    pub mode: Option<String>,
    pub base_model: Option<String>,
    pub access_groups: Vec<String>,
    pub max_tokens: Option<u64>,
    pub max_input_tokens: Option<u64>,
    pub max_output_tokens: Option<u64>,
    pub health_check_model: Option<String>,
    pub health_check_timeout: Option<Duration>,
    /// The whole `model_info` mapping as written (secrets never live here), echoed by `/model/info`.
    pub raw: Map<String, Value>,
}

impl Deployment {
    pub fn is_wildcard(&self) -> bool {
        self.model_name.contains('*')
    }

    /// For a wildcard entry, the part of `requested` that the `*` stands for.
    pub fn wildcard_capture<'a>(&self, requested: &'a str) -> Option<&'a str> {
        let (pre, post) = self.model_name.split_once('*')?;
        if requested.len() >= pre.len() + post.len()
            && requested.starts_with(pre)
            && requested.ends_with(post)
        {
            Some(&requested[pre.len()..requested.len() - post.len()])
        } else {
            None
        }
    }

    /// The literal length of a wildcard pattern: longer patterns are more specific and win.
    pub fn pattern_specificity(&self) -> usize {
        self.model_name.len() - self.model_name.matches('*').count()
    }

    /// The upstream model for a request routed through this entry.
    pub fn upstream_model_for(&self, requested: &str) -> String {
        match self.wildcard_capture(requested) {
            Some(cap) if self.upstream_model.contains('*') => {
                self.upstream_model.replacen('*', cap, 1)
            }
            _ => self.upstream_model.clone(),
        }
    }

    /// `api_base` without a trailing `/v1` (vLLM's native routes live at the server root).
    pub fn server_root(&self) -> Option<String> {
        let base = self.api_base.as_deref()?.trim_end_matches('/');
        Some(base.strip_suffix("/v1").unwrap_or(base).to_string())
    }

    /// Timeout for this call: `stream_timeout` replaces `timeout` for streams.
    pub fn call_timeout(&self, stream: bool, router: &RouterSettings) -> Duration {
        let own = if stream {
            self.stream_timeout.or(self.timeout)
        } else {
            self.timeout
        };
        let global = if stream {
            router.stream_timeout.unwrap_or(router.timeout)
        } else {
            router.timeout
        };
        own.unwrap_or(global)
    }

    pub fn mode(&self) -> &str {
        self.model_info.mode.as_deref().unwrap_or("chat")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingStrategy {
    SimpleShuffle,
    LeastBusy,
    LatencyBased,
    UsageBased,
    CostBased,
}

impl RoutingStrategy {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::SimpleShuffle => "simple-shuffle",
            Self::LeastBusy => "least-busy",
            Self::LatencyBased => "latency-based-routing",
            Self::UsageBased => "usage-based-routing-v2",
            Self::CostBased => "cost-based-routing",
        }
    }
}

/// Error classes of LiteLLM's `retry_policy` / `allowed_fails_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorClass {
    BadRequest,
    Authentication,
    Timeout,
    RateLimit,
    ContentPolicyViolation,
    InternalServer,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 6] = [
        ErrorClass::BadRequest,
        ErrorClass::Authentication,
        ErrorClass::Timeout,
        ErrorClass::RateLimit,
        ErrorClass::ContentPolicyViolation,
        ErrorClass::InternalServer,
    ];

    pub fn policy_name(&self) -> &'static str {
        match self {
            Self::BadRequest => "BadRequestError",
            Self::Authentication => "AuthenticationError",
            Self::Timeout => "TimeoutError",
            Self::RateLimit => "RateLimitError",
            Self::ContentPolicyViolation => "ContentPolicyViolationError",
            Self::InternalServer => "InternalServerError",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RouterSettings {
    pub routing_strategy: RoutingStrategy,
    pub num_retries: u32,
    /// Per error class retry counts; classes not listed use `num_retries`.
    pub retry_policy: BTreeMap<ErrorClass, u32>,
    pub timeout: Duration,
    pub stream_timeout: Option<Duration>,
    pub retry_after: Duration,
    pub allowed_fails: u32,
    pub allowed_fails_policy: BTreeMap<ErrorClass, u32>,
    pub cooldown_time: Duration,
    pub disable_cooldowns: bool,
    pub fallbacks: Vec<(String, Vec<String>)>,
    pub context_window_fallbacks: Vec<(String, Vec<String>)>,
    pub content_policy_fallbacks: Vec<(String, Vec<String>)>,
    pub default_fallbacks: Vec<String>,
    pub max_fallbacks: u32,
    pub enable_pre_call_checks: bool,
    pub enable_tag_filtering: bool,
    pub tag_filtering_match_any: bool,
    /// `litellm_settings.drop_params`: drop OpenAI params a provider cannot take instead of
    /// answering 400.
    pub drop_params: bool,
    pub failure_threshold_percent: f64,
    pub failure_threshold_minimum_requests: u64,
    pub single_deployment_failure_threshold: u64,
}

/// One `general_settings.pass_through_endpoints` entry.
#[derive(Debug, Clone)]
pub struct PassThroughEndpoint {
    pub path: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub forward_headers: bool,
    pub auth: bool,
    pub include_subpath: bool,
}

#[derive(Debug, Clone, Default)]
pub struct GeneralSettings {
    pub master_key: Option<String>,
    pub pass_through_endpoints: Vec<PassThroughEndpoint>,
    /// Request body cap in bytes (`max_request_size_mb`).
    pub max_request_bytes: Option<usize>,
    pub max_response_bytes: Option<usize>,
    pub litellm_key_header_name: Option<String>,
    pub forward_client_headers_to_llm_api: bool,
    pub allowed_routes: Option<Vec<String>>,
    pub health_check_details: bool,
    pub background_health_checks: bool,
    pub health_check_interval: Duration,
    pub global_max_parallel_requests: Option<u64>,
    pub database_url: Option<String>,
}

/// Virtual keys, budgets, spend and shared counters (from `general_settings`, `litellm_settings`
/// and `router_settings`).
#[derive(Debug, Clone)]
pub struct TenancySettings {
    /// `general_settings.database_url` or `DATABASE_URL`; none means the embedded SQLite file.
    pub database_url: Option<String>,
    pub pool_limit: u32,
    pub connect_timeout: Duration,
    pub disable_spend_logs: bool,
    pub disable_spend_updates: bool,
    /// `proxy_batch_write_at`: how often the spend writer flushes.
    pub batch_write_interval: Duration,
    /// `litellm_settings.max_budget` / `budget_duration`: the proxy-wide budget.
    pub max_budget: Option<f64>,
    pub budget_duration: Option<String>,
    /// `router_settings.redis_host` / `redis_port` / `redis_password`, else `REDIS_*`.
    pub redis: Option<RedisSettings>,
    pub enable_jwt_auth: bool,
    /// `general_settings.litellm_jwtauth`, read by the JWT authenticator.
    pub jwt: Map<String, Value>,
    pub default_key_generate_params: Map<String, Value>,
    pub upperbound_key_generate_params: Map<String, Value>,
}

impl Default for TenancySettings {
    fn default() -> Self {
        TenancySettings {
            database_url: None,
            pool_limit: 10,
            connect_timeout: Duration::from_secs(60),
            disable_spend_logs: false,
            disable_spend_updates: false,
            batch_write_interval: Duration::from_secs(10),
            max_budget: None,
            budget_duration: None,
            redis: None,
            enable_jwt_auth: false,
            jwt: Map::new(),
            default_key_generate_params: Map::new(),
            upperbound_key_generate_params: Map::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RedisSettings {
    pub host: String,
    pub port: u16,
    pub password: Option<String>,
}

impl RedisSettings {
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@{}:{}/", self.host, self.port),
            None => format!("redis://{}:{}/", self.host, self.port),
        }
    }
}

/// Whether `s` is a LiteLLM duration: a positive integer and one of `s`, `m`, `h`, `d`, `mo`.
pub fn is_duration(s: &str) -> bool {
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0
        && s[..digits].parse::<u64>().is_ok_and(|n| n > 0)
        && matches!(&s[digits..], "s" | "m" | "h" | "d" | "mo")
}
