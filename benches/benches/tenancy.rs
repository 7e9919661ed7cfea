//! The hot path of tenancy: a cached virtual key looked up, checked, admitted against its key,
//! user and team limits and budgets (plus the proxy budget), then settled with its spend row
//! queued. Target: at most 20 µs per request.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use sluice_config::TenancySettings;
use sluice_filters::tenancy::{Kind, SpendRow, Store};
use sluice_proxy::metrics::Metrics;
use sluice_proxy::tenancy::Tenancy;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let metrics = Metrics::new();
    let (tenancy, token) = rt.block_on(async {
        let store: Arc<dyn Store> = Arc::new(sluice_proxy::store::memory::MemoryStore::default());
        let key = "sk-bench-key";
        let token = sluice_filters::hash_key(key);
        store
            .insert(Kind::User, "u", &json!({"user_id": "u", "max_budget": 1e9, "rpm_limit": 1_000_000_000u64}))
            .await
            .unwrap();
        store
            .insert(Kind::Team, "t", &json!({"team_id": "t", "max_budget": 1e9, "tpm_limit": 1_000_000_000_000u64}))
            .await
            .unwrap();
        store
            .insert(
                Kind::Key,
                &token,
                &json!({"token": token, "user_id": "u", "team_id": "t", "models": ["m"],
                        "max_budget": 1e9, "rpm_limit": 1_000_000_000u64, "tpm_limit": 1_000_000_000_000u64,
                        "max_parallel_requests": 1000}),
            )
            .await
            .unwrap();
        let settings = TenancySettings {
            max_budget: Some(1e12),
            batch_write_interval: std::time::Duration::from_millis(50),
            ..TenancySettings::default()
        };
        let t = Tenancy::start(store, settings, &metrics).await.unwrap();
        (t, token)
    });
    // The first lookup fills the cache; the bench measures the steady state.
    rt.block_on(tenancy.key(&token)).unwrap().unwrap();
    c.bench_function("tenancy/auth+limits+settle", |b| {
        b.iter(|| {
            rt.block_on(async {
                let k = tenancy.key(&token).await.unwrap().unwrap();
                tenancy.check_key(&k).unwrap();
                let a = tenancy
                    .admit(
                        Some(&k),
                        "m",
                        |m| m.iter().any(|x| x == "m"),
                        Some("end-user"),
                        // The gateway reads this clock at arrival; counted here all the same.
                        chrono::Utc::now(),
                    )
                    .await
                    .unwrap();
                let row = SpendRow {
                    request_id: "r".into(),
                    api_key: k.token.clone(),
                    spend: 0.0001,
                    total_tokens: 10,
                    model_group: "m".into(),
                    user: Some("u".into()),
                    team_id: Some("t".into()),
                    ..Default::default()
                };
                tenancy.finish(Some(a), Some(row)).await;
            })
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
