//! Measures the CPU the spend writer's store calls cost per row: `write_spend` in batches of
//! 1000 rows like the gateway's, on SQLite (in a temp dir) or the Postgres URL given.
//! usage: spend_write_bench [sqlite|postgres://...] [rows]
use std::time::Instant;

use sluice_filters::tenancy::{SpendRow, Store};
use sluice_proxy::store::SqlStore;

/// The gateway's allocator, so the store's allocations cost what they cost in `sluice`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn cpu_secs_self() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// CPU of every process named `postgres` (the server side of the writes).
fn cpu_secs_postgres() -> f64 {
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = 0.0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        if !head.contains("(postgres") {
            continue;
        }
        let f: Vec<&str> = rest.split_whitespace().collect();
        total += (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / tck;
    }
    total
}

fn row(i: usize) -> SpendRow {
    let now = chrono::Utc::now();
    SpendRow {
        request_id: uuid::Uuid::now_v7().to_string(),
        call_type: "/chat/completions".into(),
        api_key: "88f1b0a4c1d7e2f3a4b5c6d7e8f90123456789abcdef0123456789abcdef0123".into(),
        spend: if i.is_multiple_of(2) { 0.0 } else { 1e-6 },
        prompt_tokens: 500,
        completion_tokens: 64,
        total_tokens: 564,
        start_time: now,
        end_time: now,
        completion_start_time: None,
        model: "bench".into(),
        model_id: "0f1e2d3c".into(),
        model_group: "bench".into(),
        custom_llm_provider: "openai".into(),
        api_base: "http://127.0.0.1:40000/v1".into(),
        user: None,
        team_id: None,
        end_user: None,
        status: "success".into(),
        status_code: 200,
        request_tags: vec![],
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let target = args.get(1).cloned().unwrap_or_else(|| "sqlite".into());
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let dir = std::env::temp_dir().join(format!("spend-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = if target == "sqlite" {
        format!("sqlite://{}/bench.db", dir.display())
    } else {
        target.clone()
    };
    let store = SqlStore::connect(&url, 10, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    if url.starts_with("postgres") {
        sqlx::query("TRUNCATE sluice_spend_logs")
            .execute(store.pool())
            .await
            .unwrap();
    }
    // Warm up: a few batches so statements are prepared.
    for _ in 0..3 {
        let rows: Vec<SpendRow> = (0..1000).map(row).collect();
        store.write_spend(&rows).await.unwrap();
    }
    let batches: Vec<Vec<SpendRow>> = (0..n / 1000)
        .map(|_| (0..1000).map(row).collect())
        .collect();
    let (c0, p0, t0) = (cpu_secs_self(), cpu_secs_postgres(), Instant::now());
    for b in &batches {
        store.write_spend(b).await.unwrap();
    }
    let (c1, p1, wall) = (cpu_secs_self(), cpu_secs_postgres(), t0.elapsed());
    let rows = batches.len() * 1000;
    println!(
        "{target}: {rows} rows, wall {:.1} us/row, gateway-process CPU {:.2} us/row, postgres CPU {:.2} us/row",
        wall.as_secs_f64() * 1e6 / rows as f64,
        (c1 - c0) * 1e6 / rows as f64,
        (p1 - p0) * 1e6 / rows as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
}
