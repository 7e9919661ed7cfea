//! Rate-limit and budget counters. One instance keeps them in memory; with Redis configured they
//! live there, changed by atomic scripts, so several instances enforce one limit. When Redis
//! cannot be reached the in-memory counters take over (each instance then enforces the limits
//! on its own traffic) until it answers again: requests keep flowing rather than fail on a
//! cache outage, and the outage is logged and counted in `litellm_redis_fails`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use sluice_filters::tenancy::Kind;

/// One level a request counts against (key, user, team, end user, key×model, proxy).
#[derive(Debug, Clone, PartialEq)]
pub struct Scope {
    pub kind: Kind,
    pub id: Arc<str>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub parallel: Option<u64>,
    pub budget: Option<f64>,
    /// The current budget period (its reset time, epoch seconds; 0 without a duration): spend
    /// counted under another period does not count against this one.
    pub period: i64,
    /// Spend the store holds for this period, used when no counter exists yet.
    pub seed: f64,
}

/// What a scope stood at after a request was admitted.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Standing {
    pub requests: u64,
    pub tokens: u64,
    pub spend: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitType {
    Requests,
    Tokens,
    Parallel,
}

impl LimitType {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitType::Requests => "requests",
            LimitType::Tokens => "tokens",
            LimitType::Parallel => "max_parallel_requests",
        }
    }
}

/// Why a request was refused: the index of the scope and what it hit.
#[derive(Debug, Clone, PartialEq)]
pub enum Denial {
    Budget { scope: usize, spend: f64 },
    Limit { scope: usize, limit: LimitType },
}

/// Seconds until the current rate-limit window ends.
pub fn window_reset_secs() -> u64 {
    60 - now_secs() % 60
}

/// Wall-clock seconds from the coarse clock: it is read up to three times per keyed request,
/// and a minute window needs no finer time than the kernel's tick (a few ms), which the vDSO
/// returns without reading the TSC (on a VM, the fine clock cost ~0.1 µs a read).
fn now_secs() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into; CLOCK_REALTIME_COARSE exists on Linux.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } == 0 {
        return u64::try_from(ts.tv_sec).unwrap_or(0);
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[derive(Default)]
struct ScopeState {
    period: i64,
    spend: f64,
    window: u64,
    requests: u64,
    tokens: u64,
    parallel: u64,
}

impl ScopeState {
    fn roll(&mut self, window: u64) {
        if self.window != window {
            self.window = window;
            self.requests = 0;
            self.tokens = 0;
        }
    }
}

/// Counters of this process only, one map per kind so lookups borrow the id (an id is copied
/// only the first time it is seen, not on every request).
#[derive(Default)]
pub struct LocalCounters {
    scopes: Mutex<[super::FastMap<String, ScopeState>; Kind::ALL.len()]>,
}

fn slot(kind: Kind) -> usize {
    kind as usize
}

impl LocalCounters {
    /// Checks every scope and, only when all pass, counts the request against each.
    pub fn admit(&self, scopes: &[Scope]) -> Result<Vec<Standing>, Denial> {
        let window = now_secs() / 60;
        let mut maps = self.scopes.lock();
        for (i, s) in scopes.iter().enumerate() {
            let map = &mut maps[slot(s.kind)];
            if !map.contains_key(&*s.id) {
                let fresh = ScopeState {
                    period: s.period,
                    spend: s.seed,
                    ..Default::default()
                };
                map.insert(s.id.to_string(), fresh);
            }
            let st = map.get_mut(&*s.id).expect("inserted above");
            if st.period != s.period {
                st.period = s.period;
                st.spend = s.seed;
            }
            st.roll(window);
            if s.budget.is_some_and(|b| st.spend >= b) {
                return Err(Denial::Budget {
                    scope: i,
                    spend: st.spend,
                });
            }
            let hit = if s.rpm.is_some_and(|l| st.requests >= l) {
                Some(LimitType::Requests)
            } else if s.tpm.is_some_and(|l| st.tokens >= l) {
                Some(LimitType::Tokens)
            } else if s.parallel.is_some_and(|l| st.parallel >= l) {
                Some(LimitType::Parallel)
            } else {
                None
            };
            if let Some(limit) = hit {
                return Err(Denial::Limit { scope: i, limit });
            }
        }
        Ok(scopes
            .iter()
            .map(|s| {
                let st = maps[slot(s.kind)]
                    .get_mut(&*s.id)
                    .expect("entry made above");
                st.requests += 1;
                st.parallel += 1;
                Standing {
                    requests: st.requests,
                    tokens: st.tokens,
                    spend: st.spend,
                }
            })
            .collect())
    }

    /// Adds a finished request's tokens and cost and releases its parallel slot.
    pub fn settle(&self, scopes: &[Scope], tokens: u64, cost: f64) {
        let window = now_secs() / 60;
        let mut maps = self.scopes.lock();
        for s in scopes {
            if let Some(st) = maps[slot(s.kind)].get_mut(&*s.id) {
                st.roll(window);
                st.tokens += tokens;
                if st.period == s.period {
                    st.spend += cost;
                }
                st.parallel = st.parallel.saturating_sub(1);
            }
        }
    }

    /// Spend counted in memory for a scope, if it has been seen.
    pub fn spend(&self, kind: Kind, id: &str) -> Option<f64> {
        self.scopes.lock()[slot(kind)].get(id).map(|s| s.spend)
    }

    /// Forgets a scope (its entity was deleted or reset by an admin).
    pub fn forget(&self, kind: Kind, id: &str) {
        self.scopes.lock()[slot(kind)].remove(id);
    }
}

const ADMIT: &str = r#"
local n = #KEYS / 4
for i = 0, n - 1 do
  local a = 1 + i * 5
  redis.call('SET', KEYS[i*4+4], ARGV[a+5], 'NX', 'EX', 3024000)
end
for i = 0, n - 1 do
  local a = 1 + i * 5
  local rpm, tpm, par, budget = tonumber(ARGV[a+1]), tonumber(ARGV[a+2]), tonumber(ARGV[a+3]), tonumber(ARGV[a+4])
  local spend = tonumber(redis.call('GET', KEYS[i*4+4]) or '0')
  if budget >= 0 and spend >= budget then return {'budget', tostring(i), tostring(spend)} end
  if rpm >= 0 and tonumber(redis.call('GET', KEYS[i*4+1]) or '0') >= rpm then return {'requests', tostring(i)} end
  if tpm >= 0 and tonumber(redis.call('GET', KEYS[i*4+2]) or '0') >= tpm then return {'tokens', tostring(i)} end
  if par >= 0 and tonumber(redis.call('GET', KEYS[i*4+3]) or '0') >= par then return {'max_parallel_requests', tostring(i)} end
end
local out = {'ok'}
for i = 0, n - 1 do
  local r = redis.call('INCR', KEYS[i*4+1])
  redis.call('EXPIRE', KEYS[i*4+1], 120)
  redis.call('INCR', KEYS[i*4+3])
  redis.call('EXPIRE', KEYS[i*4+3], 900)
  table.insert(out, tostring(r))
  table.insert(out, redis.call('GET', KEYS[i*4+2]) or '0')
  table.insert(out, redis.call('GET', KEYS[i*4+4]) or '0')
end
return out
"#;

const SETTLE: &str = r#"
local n = #KEYS / 4
for i = 0, n - 1 do
  redis.call('INCRBY', KEYS[i*4+2], ARGV[1])
  redis.call('EXPIRE', KEYS[i*4+2], 120)
  if tonumber(redis.call('DECR', KEYS[i*4+3])) < 0 then redis.call('SET', KEYS[i*4+3], 0) end
  if redis.call('EXISTS', KEYS[i*4+4]) == 1 then redis.call('INCRBYFLOAT', KEYS[i*4+4], ARGV[2]) end
end
return 1
"#;

/// Counters shared by every instance through Redis, with the local ones as the fallback.
pub struct RedisCounters {
    client: redis::Client,
    conn: RwLock<Option<redis::aio::ConnectionManager>>,
    admit: redis::Script,
    settle: redis::Script,
    healthy: AtomicBool,
    connecting: AtomicBool,
    fails: prometheus::IntCounter,
}

impl RedisCounters {
    pub fn new(url: &str, fails: prometheus::IntCounter) -> Result<Arc<Self>, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis url: {e}"))?;
        Ok(Arc::new(RedisCounters {
            client,
            conn: RwLock::new(None),
            admit: redis::Script::new(ADMIT),
            settle: redis::Script::new(SETTLE),
            healthy: AtomicBool::new(false),
            connecting: AtomicBool::new(false),
            fails,
        }))
    }

    /// Connects in the background; until then (and whenever Redis fails) callers fall back.
    pub fn connect_in_background(self: &Arc<Self>) {
        if self.connecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Duration::from_millis(500))
                .set_response_timeout(Duration::from_millis(500))
                .set_number_of_retries(1);
            loop {
                match me
                    .client
                    .get_connection_manager_with_config(config.clone())
                    .await
                {
                    Ok(c) => {
                        *me.conn.write() = Some(c);
                        me.healthy.store(true, Ordering::Release);
                        tracing::info!("redis connected: limits and budgets are shared");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "redis unreachable; enforcing limits per instance");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            me.connecting.store(false, Ordering::Release);
        });
    }

    fn connection(&self) -> Option<redis::aio::ConnectionManager> {
        self.conn.read().clone()
    }

    fn failed(&self, e: &redis::RedisError) {
        self.fails.inc();
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::warn!(error = %e, "redis call failed; enforcing limits per instance until it answers");
        }
    }

    fn keys(scopes: &[Scope]) -> Vec<String> {
        let window = now_secs() / 60;
        let mut keys = Vec::with_capacity(scopes.len() * 4);
        for s in scopes {
            let base = format!("sluice:{}:{{{}}}", s.kind.as_str(), s.id);
            keys.push(format!("{base}:rpm:{window}"));
            keys.push(format!("{base}:tpm:{window}"));
            keys.push(format!("{base}:par"));
            keys.push(format!("{base}:spend:{}", s.period));
        }
        keys
    }

    /// `None` when Redis could not answer (the caller falls back to local counters).
    pub async fn admit(&self, scopes: &[Scope]) -> Option<Result<Vec<Standing>, Denial>> {
        let mut conn = self.connection()?;
        let mut inv = self.admit.prepare_invoke();
        for k in Self::keys(scopes) {
            inv.key(k);
        }
        inv.arg(now_secs() / 60);
        let num = |v: Option<u64>| v.map_or(-1i64, |v| v as i64);
        for s in scopes {
            inv.arg(num(s.rpm))
                .arg(num(s.tpm))
                .arg(num(s.parallel))
                .arg(s.budget.unwrap_or(-1.0))
                .arg(s.seed);
        }
        let reply: Vec<String> = match inv.invoke_async(&mut conn).await {
            Ok(r) => r,
            Err(e) => {
                self.failed(&e);
                return None;
            }
        };
        self.healthy.store(true, Ordering::Release);
        let index = |i: usize| {
            reply
                .get(i)
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0)
        };
        Some(match reply.first().map(String::as_str) {
            Some("ok") => Ok(reply[1..]
                .chunks(3)
                .map(|c| Standing {
                    requests: c[0].parse().unwrap_or(0),
                    tokens: c[1].parse().unwrap_or(0),
                    spend: c[2].parse().unwrap_or(0.0),
                })
                .collect()),
            Some("budget") => Err(Denial::Budget {
                scope: index(1),
                spend: reply.get(2).and_then(|v| v.parse().ok()).unwrap_or(0.0),
            }),
            Some("requests") => Err(Denial::Limit {
                scope: index(1),
                limit: LimitType::Requests,
            }),
            Some("tokens") => Err(Denial::Limit {
                scope: index(1),
                limit: LimitType::Tokens,
            }),
            _ => Err(Denial::Limit {
                scope: index(1),
                limit: LimitType::Parallel,
            }),
        })
    }

    /// `false` when Redis could not take it.
    pub async fn settle(&self, scopes: &[Scope], tokens: u64, cost: f64) -> bool {
        let Some(mut conn) = self.connection() else {
            return false;
        };
        let mut inv = self.settle.prepare_invoke();
        for k in Self::keys(scopes) {
            inv.key(k);
        }
        inv.arg(tokens).arg(cost);
        match inv.invoke_async::<i64>(&mut conn).await {
            Ok(_) => true,
            Err(e) => {
                self.failed(&e);
                false
            }
        }
    }

    pub async fn spend(&self, kind: Kind, id: &str, period: i64) -> Option<f64> {
        let mut conn = self.connection()?;
        let key = format!("sluice:{}:{{{}}}:spend:{period}", kind.as_str(), id);
        redis::cmd("GET")
            .arg(key)
            .query_async::<Option<f64>>(&mut conn)
            .await
            .ok()
            .flatten()
    }
}

/// Local counters, or Redis ones falling back to local.
pub struct Counters {
    pub local: LocalCounters,
    pub redis: Option<Arc<RedisCounters>>,
}

impl Counters {
    pub async fn admit(&self, scopes: &[Scope]) -> Result<Vec<Standing>, Denial> {
        if let Some(r) = &self.redis {
            if let Some(result) = r.admit(scopes).await {
                return result;
            }
        }
        self.local.admit(scopes)
    }

    pub async fn settle(&self, scopes: &[Scope], tokens: u64, cost: f64) {
        if let Some(r) = &self.redis {
            if r.settle(scopes, tokens, cost).await {
                return;
            }
        }
        self.local.settle(scopes, tokens, cost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(rpm: Option<u64>, budget: Option<f64>) -> Scope {
        Scope {
            kind: Kind::Key,
            id: "k".into(),
            rpm,
            tpm: None,
            parallel: None,
            budget,
            period: 0,
            seed: 0.0,
        }
    }

    #[test]
    fn rpm_trips_after_the_limit_and_counts_nothing_on_denial() {
        let c = LocalCounters::default();
        let s = [scope(Some(2), None)];
        assert!(c.admit(&s).is_ok());
        assert!(c.admit(&s).is_ok());
        assert_eq!(
            c.admit(&s),
            Err(Denial::Limit {
                scope: 0,
                limit: LimitType::Requests
            })
        );
    }

    #[test]
    fn a_denied_scope_leaves_the_others_uncounted() {
        let c = LocalCounters::default();
        let mut team = scope(Some(1), None);
        team.kind = Kind::Team;
        let both = [scope(None, None), team];
        c.admit(&both).unwrap();
        assert!(c.admit(&both).is_err());
        // Only the first admission counted against the key.
        let st = c.admit(&[scope(None, None)]).unwrap();
        assert_eq!(st[0].requests, 2);
    }

    #[test]
    fn parallel_slots_are_released_on_settle() {
        let c = LocalCounters::default();
        let mut s = scope(None, None);
        s.parallel = Some(1);
        let s = [s];
        c.admit(&s).unwrap();
        assert!(c.admit(&s).is_err());
        c.settle(&s, 10, 0.0);
        c.admit(&s).unwrap();
    }

    #[test]
    fn budget_counts_settled_spend_and_resets_with_the_period() {
        let c = LocalCounters::default();
        let mut s = scope(None, Some(1.0));
        s.seed = 0.5;
        c.admit(std::slice::from_ref(&s)).unwrap();
        c.settle(std::slice::from_ref(&s), 0, 0.6);
        assert!(matches!(
            c.admit(std::slice::from_ref(&s)),
            Err(Denial::Budget { .. })
        ));
        s.period = 100;
        s.seed = 0.0;
        c.admit(&[s]).unwrap();
    }
}
