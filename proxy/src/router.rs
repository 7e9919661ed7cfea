//! The `Selector`: model groups, per-deployment live state (in-flight count, this minute's usage,
//! recent latency, cooldown), and the choice of a deployment for each attempt. Weighted shuffle
//! runs on `pingora-load-balancing`; the other strategies compare live state directly.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr as StdSocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use pingora::lb::{discovery, selection::Random, Backend, Backends, LoadBalancer};
use pingora::protocols::l4::socket::SocketAddr;
use rand::Rng;
use sluice_config::{Config, Deployment, ErrorClass, GroupAlias, RouterSettings, RoutingStrategy};
use sluice_filters::classify::FailureKind;
use sluice_filters::provider::Provider;
use sluice_filters::ApiError;

use crate::target::Target;

const LATENCY_SAMPLES: usize = 10;

fn current_minute() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / 60)
        .unwrap_or(0)
}

fn secs_to_next_minute() -> u64 {
    let s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    60 - s % 60
}

/// Calls and failures of the current minute (LiteLLM's windows are per minute).
#[derive(Debug, Default, Clone)]
struct Window {
    minute: u64,
    requests: u64,
    tokens: u64,
    successes: u64,
    failures: u64,
    failures_by_class: BTreeMap<ErrorClass, u64>,
}

impl Window {
    fn roll(&mut self) {
        let m = current_minute();
        if self.minute != m {
            *self = Window {
                minute: m,
                ..Default::default()
            };
        }
    }
}

#[derive(Debug, Default)]
struct Latency {
    total: Vec<f64>,
    ttft: Vec<f64>,
}

fn push_sample(v: &mut Vec<f64>, x: f64) {
    if v.len() == LATENCY_SAMPLES {
        v.remove(0);
    }
    v.push(x);
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// A deployment plus its live state.
pub struct DeploymentState {
    pub config: Deployment,
    /// The names a spend row carries, made once here and shared by every row.
    pub labels: Labels,
    /// Parsed `api_base`; an error explains why the deployment cannot be called.
    pub target: Result<Target, String>,
    pub provider: Result<Provider, ApiError>,
    /// Size of the group it belongs to (cooldown rules differ for single deployments).
    group_size: usize,
    in_flight: AtomicU64,
    window: Mutex<Window>,
    cooldown_until: Mutex<Option<Instant>>,
    latency: Mutex<Latency>,
}

/// A deployment's names as the spend log records them: model, group, id, provider, api_base.
#[derive(Debug, Clone, Default)]
pub struct Labels {
    /// The upstream model as configured (a wildcard's is made per request).
    pub model: Arc<str>,
    pub model_group: Arc<str>,
    pub model_id: Arc<str>,
    pub provider: Arc<str>,
    pub api_base: Arc<str>,
}

impl Labels {
    pub fn of(config: &Deployment) -> Labels {
        Labels {
            model: config.upstream_model.as_str().into(),
            model_group: config.model_name.as_str().into(),
            model_id: config.id.as_str().into(),
            provider: config.provider.name().into(),
            api_base: config.api_base.as_deref().unwrap_or_default().into(),
        }
    }
}

impl DeploymentState {
    fn new(config: Deployment, group_size: usize) -> Self {
        let provider = Provider::for_deployment(&config);
        // Providers whose endpoint depends on the deployment (Vertex's region, Bedrock's)
        // compute their default base; the rest use their public one.
        let base = config.api_base.clone().or_else(|| {
            provider
                .as_ref()
                .ok()
                .and_then(|p| p.default_api_base(&config))
        });
        let target = match &base {
            Some(base) => Target::parse(base),
            None => Err(format!(
                "no api_base for provider {} (set litellm_params.api_base)",
                config.provider
            )),
        };
        DeploymentState {
            labels: Labels::of(&config),
            config,
            target,
            provider,
            group_size,
            in_flight: AtomicU64::new(0),
            window: Mutex::new(Window::default()),
            cooldown_until: Mutex::new(None),
            latency: Mutex::new(Latency::default()),
        }
    }

    /// A deployment outside any group (pass-through defaults built from the environment).
    pub fn standalone(config: Deployment) -> Arc<Self> {
        Arc::new(Self::new(config, 1))
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn cooling_down(&self, now: Instant) -> Option<Duration> {
        let until = (*self.cooldown_until.lock())?;
        until.checked_duration_since(now)
    }

    /// 0 healthy, 1 partial outage (failures this minute), 2 cooling down (LiteLLM's gauge).
    pub fn state_code(&self) -> u8 {
        if self.cooling_down(Instant::now()).is_some() {
            return 2;
        }
        let mut w = self.window.lock();
        w.roll();
        u8::from(w.failures > 0)
    }

    fn at_limit(&self) -> bool {
        let d = &self.config;
        if d.max_parallel_requests
            .is_some_and(|m| self.in_flight() >= m)
        {
            return true;
        }
        let mut w = self.window.lock();
        w.roll();
        d.rpm.is_some_and(|rpm| w.requests >= rpm) || d.tpm.is_some_and(|tpm| w.tokens >= tpm)
    }

    fn usage_tokens(&self) -> u64 {
        let mut w = self.window.lock();
        w.roll();
        w.tokens
    }

    fn recent_latency(&self, stream: bool) -> f64 {
        let l = self.latency.lock();
        let (first, second) = if stream {
            (&l.ttft, &l.total)
        } else {
            (&l.total, &l.ttft)
        };
        // No samples yet: 0, so a new deployment gets explored.
        mean(first).or_else(|| mean(second)).unwrap_or(0.0)
    }

    fn cost(&self) -> f64 {
        match (
            self.config.input_cost_per_token,
            self.config.output_cost_per_token,
        ) {
            (None, None) => f64::INFINITY,
            (i, o) => i.unwrap_or(0.0) + o.unwrap_or(0.0),
        }
    }

    /// Remaining requests and tokens this minute, where limits are set.
    pub fn remaining(&self) -> (Option<u64>, Option<u64>) {
        let mut w = self.window.lock();
        w.roll();
        (
            self.config.rpm.map(|r| r.saturating_sub(w.requests)),
            self.config.tpm.map(|t| t.saturating_sub(w.tokens)),
        )
    }
}

/// Marks a call in flight until dropped (least-busy and max_parallel_requests read it).
pub struct InFlight(Arc<DeploymentState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A model group: the deployments sharing one `model_name` (or one wildcard pattern).
pub struct Group {
    pub name: String,
    pub deployments: Vec<Arc<DeploymentState>>,
    /// Weighted shuffle over `pingora-load-balancing`; backend `i` stands for deployment `i`.
    shuffle: LoadBalancer<Random>,
}

/// Weights for simple-shuffle, as LiteLLM decides them from the group's first deployment:
/// `weight`, else `rpm`, else `tpm`, else uniform. Scaled to integers for the selector.
fn shuffle_weights(deps: &[Deployment]) -> Vec<usize> {
    let first = &deps[0];
    let pick: fn(&Deployment) -> Option<f64> = if first.weight.is_some() {
        |d| d.weight
    } else if first.rpm.is_some() {
        |d| d.rpm.map(|v| v as f64)
    } else if first.tpm.is_some() {
        |d| d.tpm.map(|v| v as f64)
    } else {
        |_| Some(1.0)
    };
    let raw: Vec<f64> = deps.iter().map(|d| pick(d).unwrap_or(0.0)).collect();
    let max = raw.iter().cloned().fold(0.0, f64::max);
    if max <= 0.0 {
        return vec![1; deps.len()];
    }
    // The selector expands each weight into table slots; 1000 slots for the heaviest keep the
    // ratios within 0.1% at a bounded size.
    raw.iter()
        .map(|w| ((w / max) * 1000.0).round() as usize)
        .collect()
}

impl Group {
    fn new(name: String, deployments: Vec<Deployment>) -> Group {
        let n = deployments.len();
        let weights = shuffle_weights(&deployments);
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Backend {
                addr: SocketAddr::Inet(StdSocketAddr::new(
                    Ipv4Addr::LOCALHOST.into(),
                    u16::try_from(i + 1).expect("fewer than 65535 deployments in a group"),
                )),
                weight: *w,
                ext: Default::default(),
            })
            .collect();
        let shuffle = LoadBalancer::from_backends(Backends::new(discovery::Static::new(backends)));
        futures_now(shuffle.update()).expect("static discovery cannot fail");
        Group {
            name,
            deployments: deployments
                .into_iter()
                .map(|d| Arc::new(DeploymentState::new(d, n)))
                .collect(),
            shuffle,
        }
    }
}

/// Runs a future that never waits (static discovery) to completion.
fn futures_now<F: std::future::Future>(f: F) -> F::Output {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("static backend discovery does not wait"),
    }
}

/// Why no deployment could be picked.
#[derive(Debug)]
pub struct NoDeployment {
    pub retry_after: u64,
    /// Tag filtering left no deployment at all (a request error, not a capacity one).
    pub no_tag_match: bool,
}

/// A picked deployment, counted in flight until the guard drops.
pub struct Picked {
    pub index: usize,
    pub deployment: Arc<DeploymentState>,
    pub _in_flight: InFlight,
}

/// All groups and the routing policy.
pub struct Router {
    pub settings: RouterSettings,
    groups: HashMap<String, Arc<Group>>,
    /// Wildcard groups, most specific pattern first.
    wildcards: Vec<Arc<Group>>,
    /// Single-deployment groups keyed by `model_info.id` (a request may target one deployment).
    by_id: HashMap<String, Arc<Group>>,
    aliases: BTreeMap<String, GroupAlias>,
    /// Group names in config order.
    order: Vec<String>,
}

impl Router {
    pub fn new(config: &Config) -> Router {
        let mut by_name: Vec<(String, Vec<Deployment>)> = vec![];
        for d in &config.deployments {
            match by_name.iter_mut().find(|(n, _)| *n == d.model_name) {
                Some((_, list)) => list.push(d.clone()),
                None => by_name.push((d.model_name.clone(), vec![d.clone()])),
            }
        }
        let mut groups = HashMap::new();
        let mut wildcards = vec![];
        let mut order = vec![];
        let mut by_id = HashMap::new();
        for (name, deps) in by_name {
            let group = Arc::new(Group::new(name.clone(), deps));
            for d in &group.deployments {
                by_id.insert(
                    d.id().to_string(),
                    Arc::new(Group {
                        name: name.clone(),
                        deployments: vec![d.clone()],
                        shuffle: LoadBalancer::from_backends(Backends::new(
                            discovery::Static::new(Default::default()),
                        )),
                    }),
                );
            }
            if name.contains('*') {
                wildcards.push(group);
            } else {
                order.push(name.clone());
                groups.insert(name, group);
            }
        }
        wildcards.sort_by_key(|g| std::cmp::Reverse(g.deployments[0].config.pattern_specificity()));
        Router {
            settings: config.router.clone(),
            groups,
            wildcards,
            by_id,
            aliases: config.model_group_alias.clone(),
            order,
        }
    }

    /// The group a requested model name routes to: alias, exact name, deployment id, then the
    /// most specific wildcard.
    pub fn resolve(&self, requested: &str) -> Option<Arc<Group>> {
        let name = self
            .aliases
            .get(requested)
            .map_or(requested, |a| a.target.as_str());
        if let Some(g) = self.groups.get(name) {
            return Some(g.clone());
        }
        if let Some(g) = self.by_id.get(name) {
            return Some(g.clone());
        }
        self.wildcards
            .iter()
            .find(|g| g.deployments[0].config.wildcard_capture(name).is_some())
            .cloned()
    }

    /// The name a requested model resolves to after aliasing (what wildcards capture from).
    pub fn dealias<'a>(&'a self, requested: &'a str) -> &'a str {
        self.aliases
            .get(requested)
            .map_or(requested, |a| a.target.as_str())
    }

    /// Exact group names in config order, plus visible aliases.
    pub fn public_names(&self) -> Vec<String> {
        let mut names = self.order.clone();
        names.extend(
            self.aliases
                .iter()
                .filter(|(_, a)| !a.hidden)
                .map(|(k, _)| k.clone()),
        );
        names
    }

    pub fn groups_in_order(&self) -> impl Iterator<Item = &Arc<Group>> {
        self.order
            .iter()
            .filter_map(|n| self.groups.get(n))
            .chain(self.wildcards.iter())
    }

    /// Picks a deployment for one attempt. `tried` holds indexes already used for this request;
    /// they are avoided while another healthy deployment remains.
    pub fn select(
        &self,
        group: &Group,
        tried: &[usize],
        stream: bool,
    ) -> Result<Picked, NoDeployment> {
        self.select_tagged(group, tried, stream, &[])
    }

    /// Like [`Router::select`], restricted by the request's tags when `enable_tag_filtering`
    /// is on: tagged requests go to deployments carrying their tags (any or all, per
    /// `tag_filtering_match_any`); untagged ones to deployments tagged `default`, if any.
    pub fn select_tagged(
        &self,
        group: &Group,
        tried: &[usize],
        stream: bool,
        tags: &[String],
    ) -> Result<Picked, NoDeployment> {
        let eligible = self.tag_eligible(group, tags);
        if eligible.is_empty() {
            return Err(NoDeployment {
                retry_after: 0,
                no_tag_match: true,
            });
        }
        let now = Instant::now();
        let mut soonest_cooldown: Option<Duration> = None;
        let mut healthy: Vec<usize> = Vec::with_capacity(group.deployments.len());
        for (i, d) in group.deployments.iter().enumerate() {
            if !eligible.contains(&i) {
                continue;
            }
            if let Some(left) = d.cooling_down(now) {
                soonest_cooldown = Some(soonest_cooldown.map_or(left, |s| s.min(left)));
                continue;
            }
            if d.at_limit() {
                continue;
            }
            healthy.push(i);
        }
        if healthy.is_empty() {
            let retry_after = soonest_cooldown
                .map(|d| d.as_secs().max(1))
                .unwrap_or_else(secs_to_next_minute);
            return Err(NoDeployment {
                retry_after,
                no_tag_match: false,
            });
        }
        let untried: Vec<usize> = healthy
            .iter()
            .copied()
            .filter(|i| !tried.contains(i))
            .collect();
        let mut candidates = if untried.is_empty() { healthy } else { untried };

        // `order`: only the lowest order among the candidates is eligible.
        if let Some(min) = candidates
            .iter()
            .filter_map(|i| group.deployments[*i].config.order)
            .min()
        {
            candidates.retain(|i| group.deployments[*i].config.order == Some(min));
        }

        let index = if candidates.len() == 1 {
            candidates[0]
        } else {
            self.choose(group, &candidates, stream)
        };
        let d = group.deployments[index].clone();
        d.in_flight.fetch_add(1, Ordering::Relaxed);
        {
            let mut w = d.window.lock();
            w.roll();
            w.requests += 1;
        }
        Ok(Picked {
            index,
            deployment: d.clone(),
            _in_flight: InFlight(d),
        })
    }

    fn tag_eligible(&self, group: &Group, tags: &[String]) -> Vec<usize> {
        let all = 0..group.deployments.len();
        if !self.settings.enable_tag_filtering {
            return all.collect();
        }
        let has = |i: usize, t: &str| group.deployments[i].config.tags.iter().any(|d| d == t);
        if tags.is_empty() {
            let defaults: Vec<usize> = all.clone().filter(|i| has(*i, "default")).collect();
            return if defaults.is_empty() {
                all.collect()
            } else {
                defaults
            };
        }
        all.filter(|i| {
            if self.settings.tag_filtering_match_any {
                tags.iter().any(|t| has(*i, t))
            } else {
                tags.iter().all(|t| has(*i, t))
            }
        })
        .collect()
    }

    fn choose(&self, group: &Group, candidates: &[usize], stream: bool) -> usize {
        let deps = &group.deployments;
        let lowest_by = |key: &dyn Fn(&DeploymentState) -> f64| -> usize {
            let best = candidates
                .iter()
                .map(|i| key(&deps[*i]))
                .fold(f64::INFINITY, f64::min);
            let ties: Vec<usize> = candidates
                .iter()
                .copied()
                .filter(|i| key(&deps[*i]) <= best)
                .collect();
            let pool = if ties.is_empty() {
                candidates
            } else {
                &ties[..]
            };
            pool[rand::thread_rng().gen_range(0..pool.len())]
        };
        match self.settings.routing_strategy {
            RoutingStrategy::SimpleShuffle => {
                let accept = |b: &Backend, _healthy: bool| match &b.addr {
                    SocketAddr::Inet(a) => candidates.contains(&(a.port() as usize - 1)),
                    _ => false,
                };
                let key: [u8; 8] = rand::random();
                group
                    .shuffle
                    .select_with(&key, deps.len() * 4, accept)
                    .and_then(|b| match b.addr {
                        SocketAddr::Inet(a) => Some(a.port() as usize - 1),
                        _ => None,
                    })
                    .unwrap_or_else(|| {
                        candidates[rand::thread_rng().gen_range(0..candidates.len())]
                    })
            }
            RoutingStrategy::LeastBusy => lowest_by(&|d| d.in_flight() as f64),
            RoutingStrategy::LatencyBased => lowest_by(&|d| d.recent_latency(stream)),
            RoutingStrategy::UsageBased => lowest_by(&|d| d.usage_tokens() as f64),
            RoutingStrategy::CostBased => lowest_by(&|d| d.cost()),
        }
    }

    /// Feeds back a successful call: latency (time to first token for streams) and tokens.
    pub fn observe_success(
        &self,
        d: &DeploymentState,
        total: Duration,
        ttft: Option<Duration>,
        tokens: u64,
    ) {
        {
            let mut l = d.latency.lock();
            push_sample(&mut l.total, total.as_secs_f64());
            if let Some(t) = ttft {
                push_sample(&mut l.ttft, t.as_secs_f64());
            }
        }
        let mut w = d.window.lock();
        w.roll();
        w.successes += 1;
        w.tokens += tokens;
    }

    /// Feeds back a failure; returns true when it put the deployment into cooldown.
    pub fn observe_failure(&self, d: &DeploymentState, kind: FailureKind) -> bool {
        let s = &self.settings;
        let class = kind.error_class();
        let (calls, failures, class_failures) = {
            let mut w = d.window.lock();
            w.roll();
            if kind.counts_for_cooldown() {
                w.failures += 1;
                *w.failures_by_class.entry(class).or_default() += 1;
            }
            (
                w.successes + w.failures,
                w.failures,
                w.failures_by_class.get(&class).copied().unwrap_or(0),
            )
        };
        if s.disable_cooldowns || !kind.counts_for_cooldown() {
            return false;
        }
        let multi = d.group_size > 1;
        let cool = if !s.allowed_fails_policy.is_empty() {
            let allowed = s
                .allowed_fails_policy
                .get(&class)
                .copied()
                .unwrap_or(s.allowed_fails);
            class_failures > u64::from(allowed)
        } else {
            let rate = failures as f64 / calls.max(1) as f64;
            (kind == FailureKind::RateLimit && multi)
                || matches!(kind, FailureKind::Auth | FailureKind::NotFound)
                || failures > u64::from(s.allowed_fails)
                || (multi
                    && calls >= s.failure_threshold_minimum_requests
                    && rate > s.failure_threshold_percent)
                || (calls >= s.single_deployment_failure_threshold && failures == calls)
        };
        if cool {
            let period = d.config.cooldown_time.unwrap_or(s.cooldown_time);
            *d.cooldown_until.lock() = Some(Instant::now() + period);
            // A fresh window after the cooldown, so old failures do not re-trigger it at once.
            let mut w = d.window.lock();
            w.failures = 0;
            w.successes = 0;
            w.failures_by_class.clear();
            tracing::warn!(deployment = d.id(), model_group = %d.config.model_name, cooldown_s = period.as_secs_f64(), "deployment cooling down");
        }
        cool
    }

    /// The fallback groups for a group after a failure of `kind`.
    pub fn fallbacks_for(&self, group: &str, kind: FallbackKind) -> Vec<String> {
        let s = &self.settings;
        let list = match kind {
            FallbackKind::ContextWindow => &s.context_window_fallbacks,
            FallbackKind::ContentPolicy => &s.content_policy_fallbacks,
            FallbackKind::General => &s.fallbacks,
        };
        let find = |name: &str| list.iter().find(|(g, _)| g == name).map(|(_, t)| t.clone());
        if let Some(t) = find(group).or_else(|| find("*")) {
            return t;
        }
        match kind {
            // Specific lists fall back to the general ones when they have no entry.
            FallbackKind::ContextWindow | FallbackKind::ContentPolicy => {
                self.fallbacks_for(group, FallbackKind::General)
            }
            FallbackKind::General => s.default_fallbacks.clone(),
        }
    }

    /// Number of retries allowed after a failure of this class.
    pub fn retries_for(&self, kind: FailureKind, d: &Deployment) -> u32 {
        self.settings
            .retry_policy
            .get(&kind.error_class())
            .copied()
            .or(d.max_retries)
            .unwrap_or(self.settings.num_retries)
    }

    pub fn all_deployments(&self) -> impl Iterator<Item = &Arc<DeploymentState>> {
        self.groups_in_order().flat_map(|g| g.deployments.iter())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackKind {
    General,
    ContextWindow,
    ContentPolicy,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn router(yaml: &str) -> Router {
        Router::new(&sluice_config::parse_config(yaml, Path::new("t.yaml")).unwrap())
    }

    #[test]
    fn weighted_shuffle_follows_rpm() {
        let r = router(
            r#"
model_list:
  - {model_name: g, litellm_params: {model: openai/a, api_base: "http://127.0.0.1:1/v1", rpm: 900000}}
  - {model_name: g, litellm_params: {model: openai/b, api_base: "http://127.0.0.1:2/v1", rpm: 300000}}
"#,
        );
        let g = r.resolve("g").unwrap();
        let mut counts = [0usize; 2];
        for _ in 0..4000 {
            counts[r.select(&g, &[], false).unwrap().index] += 1;
        }
        let share = counts[0] as f64 / 4000.0;
        assert!((0.70..0.80).contains(&share), "{counts:?}");
    }

    #[test]
    fn order_rpm_limit_and_cooldown() {
        let r = router(
            r#"
model_list:
  - {model_name: g, litellm_params: {model: openai/a, api_base: "http://127.0.0.1:1/v1", order: 1, rpm: 2}}
  - {model_name: g, litellm_params: {model: openai/b, api_base: "http://127.0.0.1:2/v1", order: 2}}
router_settings: {cooldown_time: 30}
"#,
        );
        let g = r.resolve("g").unwrap();
        assert_eq!(r.select(&g, &[], false).unwrap().index, 0);
        assert_eq!(r.select(&g, &[], false).unwrap().index, 0);
        // rpm 2 reached: the order-2 deployment takes over.
        assert_eq!(r.select(&g, &[], false).unwrap().index, 1);
        assert!(r.observe_failure(&g.deployments[1], FailureKind::RateLimit));
        let Err(e) = r.select(&g, &[], false) else {
            panic!("every deployment is at its limit or cooling down");
        };
        assert!(e.retry_after >= 1);
    }

    #[test]
    fn least_busy_prefers_idle() {
        let r = router(
            r#"
model_list:
  - {model_name: g, litellm_params: {model: openai/a, api_base: "http://127.0.0.1:1/v1"}}
  - {model_name: g, litellm_params: {model: openai/b, api_base: "http://127.0.0.1:2/v1"}}
router_settings: {routing_strategy: least-busy}
"#,
        );
        let g = r.resolve("g").unwrap();
        let first = r.select(&g, &[], false).unwrap();
        for _ in 0..20 {
            let p = r.select(&g, &[], false).unwrap();
            assert_ne!(p.index, first.index);
        }
    }

    #[test]
    fn resolves_aliases_ids_and_most_specific_wildcard() {
        let r = router(
            r#"
model_list:
  - {model_name: "*", litellm_params: {model: "*"}}
  - {model_name: "openai/*", litellm_params: {model: "openai/*"}}
  - {model_name: exact, litellm_params: {model: openai/x}, model_info: {id: dep-1}}
router_settings: {model_group_alias: {short: exact}}
"#,
        );
        assert_eq!(r.resolve("exact").unwrap().name, "exact");
        assert_eq!(r.resolve("short").unwrap().name, "exact");
        assert_eq!(r.resolve("dep-1").unwrap().deployments.len(), 1);
        assert_eq!(r.resolve("openai/gpt-4o").unwrap().name, "openai/*");
        assert_eq!(r.resolve("claude-3").unwrap().name, "*");
    }

    fn two(strategy: &str, extra: &str) -> Router {
        router(&format!(
            r#"
model_list:
  - {{model_name: g, litellm_params: {{model: openai/a, api_base: "http://127.0.0.1:1/v1"{extra}}}}}
  - {{model_name: g, litellm_params: {{model: openai/b, api_base: "http://127.0.0.1:2/v1"}}}}
  - {{model_name: other, litellm_params: {{model: openai/c, api_base: "http://127.0.0.1:3/v1"}}}}
router_settings:
  routing_strategy: {strategy}
  fallbacks: [{{"*": ["other"]}}]
  context_window_fallbacks: [{{"g": ["other"]}}]
  default_fallbacks: ["other"]
  retry_policy: {{RateLimitErrorRetries: 7}}
"#
        ))
    }

    #[test]
    fn latency_based_prefers_the_faster_deployment() {
        let r = two("latency-based-routing", "");
        let g = r.resolve("g").unwrap();
        r.observe_success(&g.deployments[0], Duration::from_millis(500), None, 0);
        r.observe_success(&g.deployments[1], Duration::from_millis(50), None, 0);
        for _ in 0..10 {
            assert_eq!(r.select(&g, &[], false).unwrap().index, 1);
        }
        // Streams compare time to first token.
        r.observe_success(
            &g.deployments[0],
            Duration::from_secs(5),
            Some(Duration::from_millis(10)),
            0,
        );
        r.observe_success(
            &g.deployments[1],
            Duration::from_secs(5),
            Some(Duration::from_millis(900)),
            0,
        );
        assert_eq!(r.select(&g, &[], true).unwrap().index, 0);
    }

    #[test]
    fn usage_based_picks_lowest_tokens_this_minute_within_tpm() {
        let r = two("usage-based-routing-v2", ", tpm: 1000");
        let g = r.resolve("g").unwrap();
        r.observe_success(&g.deployments[1], Duration::from_millis(1), None, 300);
        assert_eq!(r.select(&g, &[], false).unwrap().index, 0);
        r.observe_success(&g.deployments[0], Duration::from_millis(1), None, 1000);
        // Deployment 0 reached its tpm: skipped although the other used tokens too.
        for _ in 0..5 {
            assert_eq!(r.select(&g, &[], false).unwrap().index, 1);
        }
    }

    #[test]
    fn cost_based_picks_the_cheapest() {
        let r = two("cost-based-routing", ", input_cost_per_token: 0.000001");
        let g = r.resolve("g").unwrap();
        for _ in 0..5 {
            assert_eq!(r.select(&g, &[], false).unwrap().index, 0);
        }
    }

    #[test]
    fn retries_avoid_tried_deployments_while_others_remain() {
        let r = two("simple-shuffle", "");
        let g = r.resolve("g").unwrap();
        let first = r.select(&g, &[], false).unwrap().index;
        for _ in 0..10 {
            assert_ne!(r.select(&g, &[first], false).unwrap().index, first);
        }
        // All tried: a retry may go back to any healthy one.
        assert!(r.select(&g, &[0, 1], false).is_ok());
    }

    #[test]
    fn fallback_lists_and_retry_policy() {
        let r = two("simple-shuffle", "");
        assert_eq!(
            r.fallbacks_for("g", FallbackKind::ContextWindow),
            vec!["other"]
        );
        assert_eq!(
            r.fallbacks_for("g", FallbackKind::General),
            vec!["other"],
            "the * entry"
        );
        assert_eq!(
            r.fallbacks_for("g", FallbackKind::ContentPolicy),
            vec!["other"],
            "falls back to general"
        );
        let d = &r.resolve("g").unwrap().deployments[0].config;
        assert_eq!(r.retries_for(FailureKind::RateLimit, d), 7);
        assert_eq!(r.retries_for(FailureKind::Server, d), 2);
    }

    #[test]
    fn failure_rate_rule_cools_down_only_multi_deployment_groups() {
        let r = two("simple-shuffle", "");
        let g = r.resolve("g").unwrap();
        let d = &g.deployments[0];
        for _ in 0..3 {
            r.observe_success(d, Duration::from_millis(1), None, 0);
        }
        // allowed_fails is 3, and 3 failures of 6 calls is not more than 50%: tolerated.
        assert!(!r.observe_failure(d, FailureKind::Server));
        assert!(!r.observe_failure(d, FailureKind::Server));
        assert!(!r.observe_failure(d, FailureKind::Server));
        // 4 failures of 7 calls (> 50%, ≥ 5 calls) and over allowed_fails: cooldown.
        assert!(r.observe_failure(d, FailureKind::Server));
        assert!(d.cooling_down(Instant::now()).is_some());
        // A plain 400 never cools a deployment down.
        let other = &g.deployments[1];
        for _ in 0..10 {
            assert!(!r.observe_failure(other, FailureKind::BadRequest));
        }
    }

    #[test]
    fn tag_filtering_routes_by_request_tags() {
        let r = router(
            r#"
model_list:
  - {model_name: g, litellm_params: {model: openai/a, api_base: "http://127.0.0.1:1/v1", tags: [paid, fast]}}
  - {model_name: g, litellm_params: {model: openai/b, api_base: "http://127.0.0.1:2/v1", tags: [default]}}
  - {model_name: g, litellm_params: {model: openai/c, api_base: "http://127.0.0.1:3/v1", max_parallel_requests: 1}}
router_settings: {enable_tag_filtering: true}
"#,
        );
        let g = r.resolve("g").unwrap();
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for _ in 0..5 {
            assert_eq!(
                r.select_tagged(&g, &[], false, &tags(&["paid"]))
                    .unwrap()
                    .index,
                0
            );
            assert_eq!(
                r.select_tagged(&g, &[], false, &[]).unwrap().index,
                1,
                "untagged → default"
            );
        }
        let Err(e) = r.select_tagged(&g, &[], false, &tags(&["nope"])) else {
            panic!("no deployment carries the tag");
        };
        assert!(e.no_tag_match);
    }

    #[test]
    fn max_parallel_requests_skips_a_busy_deployment() {
        let r = router(
            r#"
model_list:
  - {model_name: g, litellm_params: {model: openai/a, api_base: "http://127.0.0.1:1/v1", max_parallel_requests: 1, order: 1}}
  - {model_name: g, litellm_params: {model: openai/b, api_base: "http://127.0.0.1:2/v1", order: 2}}
"#,
        );
        let g = r.resolve("g").unwrap();
        let held = r.select(&g, &[], false).unwrap();
        assert_eq!(held.index, 0);
        assert_eq!(
            r.select(&g, &[], false).unwrap().index,
            1,
            "deployment 0 is at its limit"
        );
        drop(held);
        assert_eq!(r.select(&g, &[], false).unwrap().index, 0);
    }
}
