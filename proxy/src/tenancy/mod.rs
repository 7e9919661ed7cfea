//! Tenancy on the request path: virtual keys (cached after their first lookup, invalidated
//! through the store's change log within a second on every instance), model access, budgets and
//! rate limits checked before any upstream call, and spend settled in memory at once and
//! written to the store by the batching [`writer::SpendWriter`].

pub mod counters;
pub mod writer;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use http::{HeaderName, HeaderValue};
use parking_lot::{Mutex, RwLock};
use serde_json::Value;
use sluice_config::TenancySettings;
use sluice_filters::period::Period;
use sluice_filters::tenancy::{
    BudgetRecord, CustomerRecord, Entity, KeyRecord, Kind, Limits, SpendRow, Store, StoreError,
    TeamRecord, UserRecord, GLOBAL_ID,
};
use sluice_filters::ApiError;

use counters::{Counters, Denial, LocalCounters, RedisCounters, Scope, Standing};
use writer::SpendWriter;

use crate::respond::names;

/// A virtual key with everything its checks need, as cached.
#[derive(Debug)]
pub struct KeyContext {
    /// The key, its limits completed from its `budget_id` row.
    pub key: KeyRecord,
    /// The key's hash (`key.token`), shared by the spend rows of its requests.
    pub token: Arc<str>,
    pub user: Option<UserRecord>,
    /// The team, its limits completed from its `budget_id` row.
    pub team: Option<TeamRecord>,
    /// Stored spend of this key per model group with a `model_max_budget`.
    pub model_spend: HashMap<String, f64>,
}

impl KeyContext {
    pub fn is_admin(&self) -> bool {
        self.user.as_ref().is_some_and(UserRecord::is_admin)
    }

    /// How the key is named in messages: its alias, else its masked name.
    pub fn label(&self) -> String {
        self.key
            .key_alias
            .clone()
            .or_else(|| self.key.key_name.clone())
            .unwrap_or_else(|| format!("{}...", &self.key.token[..8.min(self.key.token.len())]))
    }
}

/// Counted against its scopes until settled in the logging phase.
pub struct Admission {
    scopes: Vec<Scope>,
    /// Tokens and cost already counted (parallel slot released) before the logging phase.
    settled: bool,
    /// `x-ratelimit-*` and `x-litellm-key-spend` headers for the response, values made
    /// from the numbers without a `String` between; moved onto the response when it is built.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// Which level a scope stands for, for messages.
fn scope_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Key | Kind::KeyModel => "key",
        Kind::User => "user",
        Kind::Team => "team",
        Kind::Customer => "end_user",
        Kind::Global => "proxy",
        Kind::Budget | Kind::Model => "model",
    }
}

/// The current budget period of `limits` at `now`: its end (epoch seconds; 0 without a
/// duration) and, when the stored `budget_reset_at` has passed, the new reset time to store.
/// Periods advance from the stored time, so every instance computes the same one.
pub fn budget_period(limits: &Limits, now: DateTime<Utc>) -> (i64, Option<DateTime<Utc>>) {
    let Some(period) = limits
        .budget_duration
        .as_deref()
        .and_then(|d| Period::parse(d).ok())
    else {
        return (0, None);
    };
    let Some(mut at) = limits.budget_reset_at else {
        return (0, None);
    };
    if now < at {
        return (at.timestamp(), None);
    }
    while at <= now {
        at = period.after(at);
    }
    (at.timestamp(), Some(at))
}

/// The maps looked up on every request, several times each with 64-character key hashes.
/// foldhash (hashbrown's default hasher, seeded at random like std's) hashes those several
/// times faster than std's SipHash; its random seed still keeps ids a client chooses (end
/// users) from being picked to collide.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

pub struct Tenancy {
    pub store: Arc<dyn Store>,
    pub settings: TenancySettings,
    pub counters: Counters,
    pub writer: SpendWriter,
    keys: RwLock<FastMap<String, Arc<KeyContext>>>,
    /// Keys recently looked up and not found, so a bad key cannot make every request a query.
    missing: Mutex<FastMap<String, Instant>>,
    customers: RwLock<FastMap<String, Option<Arc<CustomerRecord>>>>,
    /// Bumped by every invalidation, before the entries go. A load notes it before reading the
    /// store and caches what it read only if it has not moved since: a read that began before
    /// a change committed and ended after the poll dropped the old entry would otherwise put
    /// the stale record back, to stay until the entity changed again.
    cache_epoch: AtomicU64,
    /// The proxy-wide budget's stored state.
    global: RwLock<(f64, Limits)>,
    change_seq: AtomicI64,
    /// Budget resets already handed to the writer (kind, id, new period).
    resets: Mutex<HashSet<(Kind, String, i64)>>,
    /// Keys already reported past their soft budget.
    soft_warned: Mutex<HashSet<String>>,
}

const MISSING_TTL: Duration = Duration::from_secs(1);

fn unavailable(e: StoreError) -> ApiError {
    match e {
        StoreError::Unavailable(m) => ApiError::new(
            503,
            "service_unavailable",
            format!("The key store is unavailable: {m}"),
        ),
        StoreError::Corrupt(m) => ApiError::new(500, "internal_server_error", m),
    }
}

impl Tenancy {
    pub async fn start(
        store: Arc<dyn Store>,
        settings: TenancySettings,
        metrics: &crate::metrics::Metrics,
    ) -> anyhow::Result<Arc<Tenancy>> {
        let redis = match &settings.redis {
            Some(r) => {
                let counters = RedisCounters::new(&r.url(), metrics.redis_fails.clone())
                    .map_err(anyhow::Error::msg)?;
                counters.connect_in_background();
                Some(counters)
            }
            None => None,
        };
        let writer = SpendWriter::start(
            store.clone(),
            settings.batch_write_interval,
            metrics.spend_rows_dropped.clone(),
        );
        // Changes made before this start are already in what the store returns.
        let (seq, _) = store.changes_since(0).await.unwrap_or((0, vec![]));
        let t = Arc::new(Tenancy {
            counters: Counters {
                local: LocalCounters::default(),
                redis,
            },
            writer,
            keys: RwLock::default(),
            missing: Mutex::default(),
            customers: RwLock::default(),
            cache_epoch: AtomicU64::new(0),
            global: RwLock::new((0.0, Limits::default())),
            change_seq: AtomicI64::new(seq),
            resets: Mutex::new(HashSet::new()),
            soft_warned: Mutex::new(HashSet::new()),
            store,
            settings,
        });
        t.load_global().await?;
        let weak = Arc::downgrade(&t);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let Some(t) = weak.upgrade() else { return };
                t.poll_changes().await;
            }
        });
        Ok(t)
    }

    /// The proxy-wide budget: its stored spend and, with a duration, its reset time (created
    /// on first start so every instance shares one period).
    async fn load_global(&self) -> anyhow::Result<()> {
        let entity = self.store.get(Kind::Global, GLOBAL_ID).await?;
        let spend = entity.as_ref().map_or(0.0, |e| e.spend);
        let mut limits: Limits = entity
            .as_ref()
            .and_then(|e| serde_json::from_value(e.doc.clone()).ok())
            .unwrap_or_default();
        limits.max_budget = self.settings.max_budget;
        if limits.budget_duration != self.settings.budget_duration
            || limits.budget_reset_at.is_none()
        {
            limits.budget_duration = self.settings.budget_duration.clone();
            limits.budget_reset_at = self
                .settings
                .budget_duration
                .as_deref()
                .and_then(|d| Period::parse(d).ok())
                .map(|p| p.after(Utc::now()));
            let doc = serde_json::to_value(&limits)?;
            if entity.is_some() {
                self.store.update(Kind::Global, GLOBAL_ID, &doc).await?;
            } else {
                self.store.insert(Kind::Global, GLOBAL_ID, &doc).await?;
            }
        }
        *self.global.write() = (spend, limits);
        Ok(())
    }

    /// Drops cached entities other instances (or this one) changed.
    pub async fn poll_changes(&self) {
        let since = self.change_seq.load(Ordering::Acquire);
        let Ok((seq, changes)) = self.store.changes_since(since).await else {
            return;
        };
        for (kind, id) in &changes {
            self.invalidate(*kind, id);
        }
        self.change_seq.fetch_max(seq, Ordering::AcqRel);
    }

    /// The cache epoch to note before a load reads the store.
    fn cache_epoch(&self) -> u64 {
        self.cache_epoch.load(Ordering::Acquire)
    }

    /// Whether no invalidation ran since `epoch` was noted, so what the load read may be
    /// cached. Callers ask while holding the lock of the map they insert into.
    fn cache_unchanged_since(&self, epoch: u64) -> bool {
        self.cache_epoch() == epoch
    }

    pub fn invalidate(&self, kind: Kind, id: &str) {
        // Loads holding the cache's write lock see either the bump or the removal after
        // their insert, never neither.
        self.cache_epoch.fetch_add(1, Ordering::AcqRel);
        match kind {
            Kind::Key => {
                self.keys.write().remove(id);
                self.missing.lock().remove(id);
            }
            // Users, teams and budgets are folded into key contexts: rebuild them all.
            Kind::User | Kind::Team | Kind::Budget => self.keys.write().clear(),
            Kind::Customer => {
                self.customers.write().remove(id);
            }
            Kind::Global | Kind::KeyModel | Kind::Model => {}
        }
    }

    /// The cached context of a key (by hash), loading it on first use.
    pub async fn key(&self, token: &str) -> Result<Option<Arc<KeyContext>>, ApiError> {
        if let Some(k) = self.keys.read().get(token) {
            return Ok(Some(k.clone()));
        }
        if let Some(at) = self.missing.lock().get(token) {
            if at.elapsed() < MISSING_TTL {
                return Ok(None);
            }
        }
        let epoch = self.cache_epoch();
        let Some(ctx) = self.load_key(token).await.map_err(unavailable)? else {
            let mut missing = self.missing.lock();
            if missing.len() > 10_000 {
                missing.clear();
            }
            if self.cache_unchanged_since(epoch) {
                missing.insert(token.to_string(), Instant::now());
            }
            return Ok(None);
        };
        let ctx = Arc::new(ctx);
        let mut keys = self.keys.write();
        if self.cache_unchanged_since(epoch) {
            keys.insert(token.to_string(), ctx.clone());
        }
        Ok(Some(ctx))
    }

    /// The context of a JWT caller: its user's and team's limits and budgets apply, cached
    /// like a key's.
    pub async fn identity(
        &self,
        user_id: Option<&str>,
        team_id: Option<&str>,
    ) -> Result<Arc<KeyContext>, ApiError> {
        let cache_key = format!("jwt:{}:{}", user_id.unwrap_or(""), team_id.unwrap_or(""));
        if let Some(k) = self.keys.read().get(&cache_key) {
            return Ok(k.clone());
        }
        let epoch = self.cache_epoch();
        let user: Option<UserRecord> = self
            .record(Kind::User, user_id)
            .await
            .map_err(unavailable)?;
        let team = self.team(team_id).await.map_err(unavailable)?;
        let ctx = Arc::new(KeyContext {
            token: cache_key.as_str().into(),
            key: KeyRecord {
                token: cache_key.clone(),
                key_alias: Some(format!("jwt user={}", user_id.unwrap_or("-"))),
                user_id: user_id.map(str::to_string),
                team_id: team_id.map(str::to_string),
                ..Default::default()
            },
            user,
            team,
            model_spend: HashMap::new(),
        });
        let mut keys = self.keys.write();
        if self.cache_unchanged_since(epoch) {
            keys.insert(cache_key, ctx.clone());
        }
        Ok(ctx)
    }

    async fn record<T: serde::de::DeserializeOwned>(
        &self,
        kind: Kind,
        id: Option<&str>,
    ) -> Result<Option<T>, StoreError> {
        let Some(id) = id else { return Ok(None) };
        match self.store.get(kind, id).await? {
            Some(e) => e.record().map(Some),
            None => Ok(None),
        }
    }

    /// Completes `limits` from the budget row named by `budget_id`, if any.
    async fn inherit_budget(
        &self,
        limits: &mut Limits,
        budget_id: Option<&str>,
    ) -> Result<(), StoreError> {
        if let Some(b) = self.record::<BudgetRecord>(Kind::Budget, budget_id).await? {
            limits.inherit(&b.limits);
        }
        Ok(())
    }

    /// A team with its limits completed from its budget row.
    async fn team(&self, team_id: Option<&str>) -> Result<Option<TeamRecord>, StoreError> {
        let mut team: Option<TeamRecord> = self.record(Kind::Team, team_id).await?;
        if let Some(t) = team.as_mut() {
            let budget = t.budget_id.clone();
            self.inherit_budget(&mut t.limits, budget.as_deref())
                .await?;
        }
        Ok(team)
    }

    async fn load_key(&self, token: &str) -> Result<Option<KeyContext>, StoreError> {
        let Some(entity) = self.store.get(Kind::Key, token).await? else {
            return Ok(None);
        };
        let mut key: KeyRecord = entity.record()?;
        let budget = key.budget_id.clone();
        self.inherit_budget(&mut key.limits, budget.as_deref())
            .await?;
        let user: Option<UserRecord> = self.record(Kind::User, key.user_id.as_deref()).await?;
        let team = self.team(key.team_id.as_deref()).await?;
        let mut model_spend = HashMap::new();
        for model in key.limits.model_max_budget.keys() {
            let id = format!("{token}/{model}");
            let spend = self
                .store
                .get(Kind::KeyModel, &id)
                .await?
                .map_or(0.0, |e: Entity| e.spend);
            model_spend.insert(model.clone(), spend);
        }
        Ok(Some(KeyContext {
            token: key.token.as_str().into(),
            key,
            user,
            team,
            model_spend,
        }))
    }

    async fn customer(&self, id: &str) -> Result<Option<Arc<CustomerRecord>>, ApiError> {
        if let Some(c) = self.customers.read().get(id) {
            return Ok(c.clone());
        }
        let epoch = self.cache_epoch();
        let mut c: Option<CustomerRecord> = self
            .record(Kind::Customer, Some(id))
            .await
            .map_err(unavailable)?;
        if let Some(c) = c.as_mut() {
            let budget = c.budget_id.clone();
            self.inherit_budget(&mut c.limits, budget.as_deref())
                .await
                .map_err(unavailable)?;
        }
        let c = c.map(Arc::new);
        let mut map = self.customers.write();
        if map.len() > 100_000 {
            map.clear();
        }
        if self.cache_unchanged_since(epoch) {
            map.insert(id.to_string(), c.clone());
        }
        Ok(c)
    }

    /// Refuses blocked and expired keys.
    pub fn check_key(&self, k: &KeyContext) -> Result<(), ApiError> {
        if k.key.blocked {
            return Err(ApiError::new(
                403,
                "auth_error",
                "Authentication Error - Key is blocked. Update via `/key/unblock` if you're admin.",
            ));
        }
        if let Some(exp) = k.key.expires {
            let now = Utc::now();
            if exp <= now {
                return Err(ApiError::new(
                    401,
                    "expired_key",
                    format!(
                        "Authentication Error - Expired Key. Key Expiry time {} and current time {}",
                        exp.to_rfc3339(),
                        now.to_rfc3339()
                    ),
                ));
            }
        }
        if let Some(t) = &k.team {
            if t.blocked {
                return Err(ApiError::new(
                    403,
                    "auth_error",
                    format!("Authentication Error - Team={} is blocked.", t.team_id),
                ));
            }
        }
        Ok(())
    }

    /// A scope for one level, its period settled (and a reset queued when one passed).
    /// `id` comes as an `Arc` where the caller holds one (the key's hash), so that the
    /// request's scope shares it rather than copying it.
    fn scope(
        &self,
        kind: Kind,
        id: impl AsRef<str> + Into<Arc<str>>,
        limits: &Limits,
        spend: f64,
        now: DateTime<Utc>,
    ) -> Scope {
        let (period, reset) = budget_period(limits, now);
        let seed = if reset.is_some() { 0.0 } else { spend };
        if let Some(at) = reset {
            self.queue_reset(kind, id.as_ref(), limits, at);
        }
        Scope {
            kind,
            id: id.into(),
            rpm: limits.rpm_limit,
            tpm: limits.tpm_limit,
            parallel: limits.max_parallel_requests,
            budget: limits.max_budget,
            period,
            seed,
        }
    }

    /// Hands a passed budget period to the writer once: stored spend back to 0 with the next
    /// reset time, written after the rows of the old period.
    fn queue_reset(&self, kind: Kind, id: &str, limits: &Limits, at: DateTime<Utc>) {
        if !self
            .resets
            .lock()
            .insert((kind, id.to_string(), at.timestamp()))
        {
            return;
        }
        let store = self.store.clone();
        let writer = self.writer.clone();
        let id = id.to_string();
        let limits = limits.clone();
        tokio::spawn(async move {
            // The stored document is the base: only the reset time changes.
            let mut doc = match store.get(kind, &id).await {
                Ok(Some(e)) => e.doc,
                Ok(None) if kind == Kind::Global => {
                    serde_json::to_value(&limits).unwrap_or_default()
                }
                _ => return,
            };
            if let Value::Object(m) = &mut doc {
                m.insert("budget_reset_at".into(), Value::String(at.to_rfc3339()));
            }
            writer.reset(kind, id, doc);
        });
    }

    /// Model access, budgets and limits for one call; counts it when everything passes.
    /// Budget periods are judged at `now`, the request's arrival.
    pub async fn admit(
        &self,
        key: Option<&Arc<KeyContext>>,
        group: &str,
        allowed_by_key: impl Fn(&[String]) -> bool,
        end_user: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Admission, ApiError> {
        let mut scopes = Vec::with_capacity(6);
        {
            let (spend, limits) = &*self.global.read();
            if limits.max_budget.is_some() {
                scopes.push(self.scope(Kind::Global, GLOBAL_ID, limits, *spend, now));
            }
        }
        if let Some(k) = key {
            if let Some(t) = &k.team {
                if !t.models.is_empty() && !allowed_by_key(&t.models) {
                    return Err(ApiError::new(
                        401,
                        "team_model_access_denied",
                        format!("Team={} not allowed to access model. This team can only access models={:?}. Tried to access {group}", t.team_id, t.models),
                    ));
                }
            }
            if let Some(u) = &k.user {
                if !u.models.is_empty() && !allowed_by_key(&u.models) {
                    return Err(ApiError::new(
                        401,
                        "user_model_access_denied",
                        format!("User={} not allowed to access model. This user can only access models={:?}. Tried to access {group}", u.user_id, u.models),
                    ));
                }
            }
            let token = &k.key.token;
            scopes.push(self.scope(Kind::Key, k.token.clone(), &k.key.limits, k.key.spend, now));
            if let Some(mb) = k.key.limits.model_max_budget.get(group) {
                let limits = Limits {
                    max_budget: Some(mb.limit()),
                    ..Default::default()
                };
                let spend = k.model_spend.get(group).copied().unwrap_or(0.0);
                scopes.push(self.scope(
                    Kind::KeyModel,
                    format!("{token}/{group}"),
                    &limits,
                    spend,
                    now,
                ));
            }
            if let Some(u) = &k.user {
                scopes.push(self.scope(Kind::User, u.user_id.as_str(), &u.limits, u.spend, now));
            }
            if let Some(t) = &k.team {
                scopes.push(self.scope(Kind::Team, t.team_id.as_str(), &t.limits, t.spend, now));
            }
        }
        if let Some(id) = end_user {
            if let Some(c) = self.customer(id).await? {
                if c.blocked {
                    return Err(ApiError::new(
                        403,
                        "auth_error",
                        format!("Authentication Error - End user={id} is blocked. Allowed to unblock via `/customer/unblock`."),
                    ));
                }
                scopes.push(self.scope(Kind::Customer, id, &c.limits, c.spend, now));
            }
        }
        if scopes.is_empty() {
            return Ok(Admission {
                scopes,
                settled: false,
                headers: vec![],
            });
        }
        let standings = match self.counters.admit(&scopes).await {
            Ok(s) => s,
            Err(d) => return Err(denial_error(&d, &scopes, key)),
        };
        let mut headers = admission_headers(&scopes, &standings, key.is_some());
        // soft_budget never blocks: past it, answers say so and the gateway logs it once.
        if let Some(k) = key {
            let spend = scopes
                .iter()
                .zip(&standings)
                .find(|(s, _)| s.kind == Kind::Key)
                .map_or(0.0, |(_, st)| st.spend);
            if k.key.limits.soft_budget.is_some_and(|soft| spend >= soft) {
                headers.push((
                    names::SOFT_BUDGET_EXCEEDED,
                    HeaderValue::from_static("true"),
                ));
                if self.soft_warned.lock().insert(k.key.token.clone()) {
                    tracing::warn!(key = %k.label(), spend, soft_budget = k.key.limits.soft_budget, "key is past its soft budget");
                }
            }
        }
        Ok(Admission {
            settled: false,
            headers,
            scopes,
        })
    }

    /// Settles a finished call in the counters and queues its spend row.
    pub async fn finish(&self, admission: Option<Admission>, row: Option<SpendRow>) {
        let (tokens, cost) = row.as_ref().map_or((0, 0.0), |r| (r.total_tokens, r.spend));
        if let Some(mut a) = admission {
            self.settle(&mut a, tokens, cost).await;
        }
        if let Some(row) = row {
            if !(self.settings.disable_spend_logs && self.settings.disable_spend_updates) {
                self.writer.push(row);
            }
        }
    }

    /// Counts a call's tokens and cost and releases its parallel slot, once.
    pub async fn settle(&self, a: &mut Admission, tokens: u64, cost: f64) {
        if a.settled {
            return;
        }
        a.settled = true;
        if !a.scopes.is_empty() {
            self.counters.settle(&a.scopes, tokens, cost).await;
        }
    }

    /// Spend counted for an entity: in memory when seen, else as stored.
    pub fn live_spend(&self, kind: Kind, id: &str) -> Option<f64> {
        self.counters.local.spend(kind, id)
    }

    /// Spend shared through Redis for an entity's current period, when configured.
    pub async fn shared_spend(&self, kind: Kind, id: &str, limits: &Limits) -> Option<f64> {
        let r = self.counters.redis.as_ref()?;
        let (period, _) = budget_period(limits, Utc::now());
        r.spend(kind, id, period).await
    }

    /// The proxy-wide budget and the spend counted against it.
    pub async fn global_spend(&self) -> (f64, Option<f64>) {
        let (stored, limits) = self.global.read().clone();
        let spend = match self.shared_spend(Kind::Global, GLOBAL_ID, &limits).await {
            Some(s) => s,
            None => self.live_spend(Kind::Global, GLOBAL_ID).unwrap_or(stored),
        };
        (spend, limits.max_budget)
    }
}

/// How a scope is named in messages (only built when a request is refused).
fn scope_label(s: &Scope, key: Option<&Arc<KeyContext>>) -> String {
    match (s.kind, key) {
        (Kind::Key, Some(k)) => k.label(),
        (Kind::KeyModel, Some(k)) => {
            let model = s.id.rsplit_once('/').map_or("", |(_, m)| m);
            format!("{} model={model}", k.label())
        }
        (Kind::Team, Some(k)) => k
            .team
            .as_ref()
            .and_then(|t| t.team_alias.clone())
            .unwrap_or_else(|| s.id.to_string()),
        _ => s.id.to_string(),
    }
}

fn denial_error(d: &Denial, scopes: &[Scope], key: Option<&Arc<KeyContext>>) -> ApiError {
    let label = |i: usize| scope_label(&scopes[i], key);
    match d {
        Denial::Budget { scope, spend } => {
            let s = &scopes[*scope];
            let max = s.budget.unwrap_or(0.0);
            let message = match s.kind {
                Kind::Key => format!(
                    "Authentication Error, ExceededTokenBudget: Current spend for token: {spend}; Max Budget for Token: {max}"
                ),
                Kind::KeyModel => format!(
                    "Budget has been exceeded! Key={} Current cost: {spend}, Max budget: {max}",
                    label(*scope)
                ),
                Kind::Global => format!(
                    "Budget has been exceeded! Proxy budget. Current cost: {spend}, Max budget: {max}"
                ),
                k => format!(
                    "Budget has been exceeded! {}={} Current cost: {spend}, Max budget: {max}",
                    scope_title(k),
                    label(*scope)
                ),
            };
            ApiError::new(400, "budget_exceeded", message)
        }
        Denial::Limit { scope, limit } => {
            let s = &scopes[*scope];
            let current = match limit {
                counters::LimitType::Requests => s.rpm,
                counters::LimitType::Tokens => s.tpm,
                counters::LimitType::Parallel => s.parallel,
            }
            .unwrap_or(0);
            let reset = if *limit == counters::LimitType::Parallel {
                1
            } else {
                counters::window_reset_secs()
            };
            let at = Utc::now() + chrono::Duration::seconds(reset as i64);
            ApiError::new(
                429,
                "rate_limit_error",
                format!(
                    "Rate limit exceeded for {}: {}. Limit type: {}. Current limit: {current}, Remaining: 0. Limit resets at: {}",
                    scope_name(s.kind),
                    label(*scope),
                    limit.as_str(),
                    at.to_rfc3339()
                ),
            )
            .with_retry_after(reset)
        }
    }
}

fn scope_title(kind: Kind) -> &'static str {
    match kind {
        Kind::User => "User",
        Kind::Team => "Team",
        Kind::Customer => "EndUser",
        _ => "Key",
    }
}

/// The key's own limits (LiteLLM sends the key's when it has them).
fn admission_headers(
    scopes: &[Scope],
    standings: &[Standing],
    has_key: bool,
) -> Vec<(HeaderName, HeaderValue)> {
    let Some(i) = scopes
        .iter()
        .position(|s| s.kind == Kind::Key)
        .filter(|_| has_key)
    else {
        return vec![];
    };
    use std::fmt::Write as _;
    let (s, st) = (&scopes[i], &standings[i]);
    // Every value is written into one buffer and the headers share slices of it: one
    // allocation per request instead of one per header. Integers go through `itoa`, which
    // costs a fraction of `fmt`'s machinery.
    let mut text = String::with_capacity(128);
    let mut spans: [Option<(HeaderName, std::ops::Range<usize>)>; 7] = Default::default();
    // The spend keeps `Display`'s form ("0.00012", never an exponent), as it always had.
    let _ = write!(text, "{}", st.spend);
    spans[0] = Some((names::KEY_SPEND, 0..text.len()));
    let mut count = 1;
    let mut put = |name: HeaderName, value: &str| {
        let start = text.len();
        text.push_str(value);
        spans[count] = Some((name, start..text.len()));
        count += 1;
    };
    let mut digits = itoa::Buffer::new();
    let reset = counters::window_reset_secs();
    if let Some(l) = s.rpm {
        put(names::LIMIT_REQUESTS, digits.format(l));
        put(
            names::REMAINING_REQUESTS,
            digits.format(l.saturating_sub(st.requests)),
        );
        put(names::RESET_REQUESTS, digits.format(reset));
    }
    if let Some(l) = s.tpm {
        put(names::LIMIT_TOKENS, digits.format(l));
        put(
            names::REMAINING_TOKENS,
            digits.format(l.saturating_sub(st.tokens)),
        );
        put(names::RESET_TOKENS, digits.format(reset));
    }
    let text = bytes::Bytes::from(text);
    // Room for the soft-budget header too.
    let mut headers = Vec::with_capacity(spans.len() + 1);
    for (name, span) in spans.into_iter().flatten() {
        if let Ok(value) = HeaderValue::from_maybe_shared(text.slice(span)) {
            headers.push((name, value));
        }
    }
    headers
}

/// Cost of a call: explicit prices (`input_cost_per_token` / `output_cost_per_token` on the
/// deployment) when given, else the bundled table's for the model called (or its
/// `base_model`); self-hosted providers cost nothing unless priced.
pub fn cost_for(
    provider: &str,
    model: &str,
    base_model: Option<&str>,
    prices: (Option<f64>, Option<f64>),
    prompt_tokens: u64,
    completion_tokens: u64,
) -> f64 {
    use sluice_filters::cost::{cost, PriceTable};
    if prices.0.is_some() || prices.1.is_some() {
        return prompt_tokens as f64 * prices.0.unwrap_or(0.0)
            + completion_tokens as f64 * prices.1.unwrap_or(0.0);
    }
    let self_hosted = matches!(
        provider,
        "hosted_vllm"
            | "vllm"
            | "ollama"
            | "ollama_chat"
            | "huggingface"
            | "sluice"
            | "openai_like"
    );
    if self_hosted {
        return 0.0;
    }
    let table = PriceTable::bundled();
    let prefixed = format!("{provider}/{model}");
    let price = [base_model, Some(prefixed.as_str()), Some(model)]
        .into_iter()
        .flatten()
        .find_map(|n| table.lookup(n));
    price.map_or(0.0, |p| cost(p, prompt_tokens, completion_tokens))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use async_trait::async_trait;
    use serde_json::json;
    use sluice_filters::tenancy::{SpendQuery, SpendRow};
    use tokio::sync::Notify;

    /// A memory store whose key reads, once armed, read the stored record and then wait for a
    /// release before answering: the window in which another instance's change can commit and
    /// be polled while a load is in flight.
    struct GatedStore {
        inner: MemoryStore,
        armed: std::sync::atomic::AtomicBool,
        read_done: Notify,
        release: Notify,
    }

    #[async_trait]
    impl Store for GatedStore {
        async fn get(&self, kind: Kind, id: &str) -> Result<Option<Entity>, StoreError> {
            let got = self.inner.get(kind, id).await;
            if kind == Kind::Key && self.armed.swap(false, Ordering::AcqRel) {
                self.read_done.notify_one();
                self.release.notified().await;
            }
            got
        }
        async fn insert(&self, kind: Kind, id: &str, doc: &Value) -> Result<bool, StoreError> {
            self.inner.insert(kind, id, doc).await
        }
        async fn update(&self, kind: Kind, id: &str, doc: &Value) -> Result<bool, StoreError> {
            self.inner.update(kind, id, doc).await
        }
        async fn delete(&self, kind: Kind, id: &str) -> Result<bool, StoreError> {
            self.inner.delete(kind, id).await
        }
        async fn list(&self, kind: Kind) -> Result<Vec<Entity>, StoreError> {
            self.inner.list(kind).await
        }
        async fn put_with_spend(
            &self,
            kind: Kind,
            id: &str,
            spend: f64,
            doc: &Value,
        ) -> Result<(), StoreError> {
            self.inner.put_with_spend(kind, id, spend, doc).await
        }
        async fn write_spend(&self, rows: &[SpendRow]) -> Result<(), StoreError> {
            self.inner.write_spend(rows).await
        }
        async fn spend_logs(&self, query: &SpendQuery) -> Result<Vec<SpendRow>, StoreError> {
            self.inner.spend_logs(query).await
        }
        async fn changes_since(&self, seq: i64) -> Result<(i64, Vec<(Kind, String)>), StoreError> {
            self.inner.changes_since(seq).await
        }
    }

    /// A key read that began before a change and ended after the change was polled must not
    /// leave the old record cached: the next lookup has to see the change.
    #[tokio::test]
    async fn a_load_racing_a_change_does_not_cache_the_old_record() {
        let store = Arc::new(GatedStore {
            inner: MemoryStore::new(),
            armed: false.into(),
            read_done: Notify::new(),
            release: Notify::new(),
        });
        let token = "ab".repeat(32);
        store
            .insert(
                Kind::Key,
                &token,
                &json!({"token": token, "key_alias": "before"}),
            )
            .await
            .unwrap();
        let metrics = crate::metrics::Metrics::default();
        let tenancy = Tenancy::start(store.clone(), TenancySettings::default(), &metrics)
            .await
            .unwrap();

        store.armed.store(true, Ordering::Release);
        let loading = {
            let (tenancy, token) = (tenancy.clone(), token.clone());
            tokio::spawn(async move { tenancy.key(&token).await })
        };
        // The load has read "before"; now the key changes and the change is polled.
        store.read_done.notified().await;
        store
            .update(
                Kind::Key,
                &token,
                &json!({"token": token, "key_alias": "after"}),
            )
            .await
            .unwrap();
        tenancy.poll_changes().await;
        store.release.notify_one();
        let raced = loading.await.unwrap().unwrap().unwrap();
        assert_eq!(raced.key.key_alias.as_deref(), Some("before"));

        let next = tenancy.key(&token).await.unwrap().unwrap();
        assert_eq!(
            next.key.key_alias.as_deref(),
            Some("after"),
            "the record read before the change stayed cached"
        );
    }
}
