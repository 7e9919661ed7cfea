//! Black-box tests of tenancy: virtual keys through the management API, every limit and budget
//! tripping with LiteLLM's errors, spend equal to price × tokens, the spend log surviving
//! SIGTERM and a database outage, and two instances sharing Postgres and Redis.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_tests::{client, redis_address, sse_data, Gateway, Mock, TcpCut, TestDatabase};

const MASTER: &str = "sk-master-test";
/// Prices of group `m` (per token), so costs are exact.
const IN_PRICE: f64 = 0.001;
const OUT_PRICE: f64 = 0.002;

/// Groups: `m` (priced echo), `m2` (another echo), `slow` (answers after 1.5 s) and
/// `gpt-4o-mini` (priced from the bundled table). `general` and `litellm` are extra lines.
fn config(mock: &Mock, general: &str, litellm: &str) -> String {
    let base = mock.base_url();
    format!(
        "model_list:
  - {{model_name: m, litellm_params: {{model: openai/echo, api_base: {base}, input_cost_per_token: {IN_PRICE}, output_cost_per_token: {OUT_PRICE}}}}}
  - {{model_name: m2, litellm_params: {{model: openai/echo2, api_base: {base}, input_cost_per_token: {IN_PRICE}, output_cost_per_token: {OUT_PRICE}}}}}
  - {{model_name: slow, litellm_params: {{model: openai/slow-1500, api_base: {base}}}}}
  - {{model_name: gpt-4o-mini, litellm_params: {{model: openai/gpt-4o-mini, api_base: {base}}}}}
general_settings:
  master_key: {MASTER}
  proxy_batch_write_at: 0.1
{general}
litellm_settings:
  drop_params: true
{litellm}
"
    )
}

async fn call(
    gw: &Gateway,
    method: &str,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = client()
        .request(method.parse().unwrap(), gw.url(path))
        .bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request to the gateway");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v, headers)
}

async fn admin(gw: &Gateway, path: &str, body: Value) -> Value {
    let (status, v, _) = call(gw, "POST", path, MASTER, Some(body)).await;
    assert_eq!(status, 200, "{path}: {v}\n{}", gw.log());
    v
}

async fn new_key(gw: &Gateway, body: Value) -> String {
    let v = admin(gw, "/key/generate", body).await;
    v["key"]
        .as_str()
        .expect("key in /key/generate answer")
        .to_string()
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]})
}

async fn chat(gw: &Gateway, key: &str, model: &str) -> (u16, Value, reqwest::header::HeaderMap) {
    call(
        gw,
        "POST",
        "/v1/chat/completions",
        key,
        Some(chat_body(model)),
    )
    .await
}

fn error_type(v: &Value) -> &str {
    v["error"]["type"].as_str().unwrap_or("")
}

/// Spend-log rows, waiting until at least `n` are there.
async fn spend_rows(gw: &Gateway, query: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, v, _) = call(gw, "GET", &format!("/spend/logs{query}"), MASTER, None).await;
        assert_eq!(status, 200, "{v}");
        let rows = v.as_array().cloned().unwrap_or_default();
        if rows.len() >= n || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn key_lifecycle_over_http() {
    let mock = Mock::start("life").await;
    let gw = Gateway::start(&config(&mock, "", ""), &[]).await;

    let generated = admin(
        &gw,
        "/key/generate",
        json!({"key_alias": "alice-key", "models": ["m"], "metadata": {"team": "x"}, "tags": ["a"]}),
    )
    .await;
    let key = generated["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("sk-") && key.len() >= 3 + 22, "{key}");
    let token = generated["token_id"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 64);
    assert!(generated["key_name"]
        .as_str()
        .unwrap()
        .starts_with("sk-..."));

    // The key works for its model and nothing else.
    assert_eq!(chat(&gw, &key, "m").await.0, 200);
    let (status, v, _) = chat(&gw, &key, "m2").await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(error_type(&v), "key_model_access_denied");

    // The store keeps only the hash; info answers to the raw key and to the hash.
    let (status, info, _) = call(&gw, "GET", &format!("/key/info?key={key}"), MASTER, None).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["info"]["token"], token);
    assert_eq!(info["info"]["key_alias"], "alice-key");
    assert!(!info.to_string().contains(&key[3..]) || info["key"] == key);
    let (status, _, _) = call(&gw, "GET", &format!("/key/info?key={token}"), MASTER, None).await;
    assert_eq!(status, 200);

    // A key reads its own info; another key gets 403; management routes are admin-only.
    let (status, own, _) = call(&gw, "GET", "/key/info", &key, None).await;
    assert_eq!(status, 200, "{own}");
    let other = new_key(&gw, json!({})).await;
    let (status, v, _) = call(&gw, "GET", &format!("/key/info?key={key}"), &other, None).await;
    assert_eq!(status, 403, "{v}");
    let (status, _, _) = call(&gw, "POST", "/key/generate", &other, Some(json!({}))).await;
    assert_eq!(status, 403);

    // A key's aliases rename the model it asks for.
    let aliased = new_key(&gw, json!({"aliases": {"fast": "m2"}})).await;
    let (s, v, h) = chat(&gw, &aliased, "fast").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(h["x-litellm-model-group"], "m2");

    // list, update, block, unblock.
    let (_, list, _) = call(&gw, "GET", "/key/list?key_alias=alice-key", MASTER, None).await;
    assert_eq!(list["keys"], json!([token]));
    assert_eq!(list["total_count"], 1);
    let updated = admin(
        &gw,
        "/key/update",
        json!({"key": key, "models": ["m", "m2"]}),
    )
    .await;
    assert_eq!(updated["models"], json!(["m", "m2"]));
    assert_eq!(chat(&gw, &key, "m2").await.0, 200);
    admin(&gw, "/key/block", json!({"key": key})).await;
    let (status, v, _) = chat(&gw, &key, "m").await;
    assert_eq!(status, 403, "{v}");
    admin(&gw, "/key/unblock", json!({"key": key})).await;
    assert_eq!(chat(&gw, &key, "m").await.0, 200);

    // regenerate: the old key stops working, the new one works with the same settings.
    let regen = admin(&gw, "/key/regenerate", json!({"key": key})).await;
    let new = regen["key"].as_str().unwrap().to_string();
    assert_ne!(new, key);
    assert_eq!(chat(&gw, &key, "m").await.0, 401);
    assert_eq!(chat(&gw, &new, "m").await.0, 200);
    let (_, info, _) = call(&gw, "GET", &format!("/key/info?key={new}"), MASTER, None).await;
    assert_eq!(info["info"]["key_alias"], "alice-key");

    // delete.
    let deleted = admin(&gw, "/key/delete", json!({"keys": [new]})).await;
    assert_eq!(deleted["deleted_keys"], json!([new]));
    let (status, v, _) = chat(&gw, &new, "m").await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(error_type(&v), "auth_error");

    // Expiry.
    let short = new_key(&gw, json!({"duration": "1s"})).await;
    assert_eq!(chat(&gw, &short, "m").await.0, 200);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (status, v, _) = chat(&gw, &short, "m").await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(error_type(&v), "expired_key");

    // Bad input to the management API.
    let (status, v, _) = call(
        &gw,
        "POST",
        "/key/generate",
        MASTER,
        Some(json!({"max_budget": "lots"})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    let (status, v, _) = call(
        &gw,
        "POST",
        "/key/generate",
        MASTER,
        Some(json!({"duration": "soon"})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    let (status, _, _) = call(
        &gw,
        "POST",
        "/key/delete",
        MASTER,
        Some(json!({"keys": ["sk-nope"]})),
    )
    .await;
    assert_eq!(status, 404);

    // Users, teams, customers and budgets.
    let user = admin(
        &gw,
        "/user/new",
        json!({"user_id": "u1", "user_email": "u1@example.com", "max_budget": 5}),
    )
    .await;
    assert!(user["key"].as_str().unwrap().starts_with("sk-"));
    let (_, uinfo, _) = call(&gw, "GET", "/user/info?user_id=u1", MASTER, None).await;
    assert_eq!(uinfo["user_info"]["user_email"], "u1@example.com");
    assert_eq!(uinfo["keys"].as_array().unwrap().len(), 1);
    admin(
        &gw,
        "/team/new",
        json!({"team_id": "t1", "team_alias": "core", "models": ["m"]}),
    )
    .await;
    let added = admin(
        &gw,
        "/team/member_add",
        json!({"team_id": "t1", "member": {"role": "user", "user_id": "u1"}}),
    )
    .await;
    assert_eq!(added["members_with_roles"][0]["user_id"], "u1");
    let (_, tinfo, _) = call(&gw, "GET", "/team/info?team_id=t1", MASTER, None).await;
    assert_eq!(tinfo["team_info"]["team_alias"], "core");
    admin(
        &gw,
        "/team/member_delete",
        json!({"team_id": "t1", "user_id": "u1"}),
    )
    .await;
    admin(
        &gw,
        "/team/update",
        json!({"team_id": "t1", "team_alias": "core2"}),
    )
    .await;
    admin(
        &gw,
        "/customer/new",
        json!({"user_id": "c1", "max_budget": 1}),
    )
    .await;
    let (_, c, _) = call(&gw, "GET", "/customer/info?end_user_id=c1", MASTER, None).await;
    assert_eq!(c["max_budget"], 1.0);
    admin(
        &gw,
        "/budget/new",
        json!({"budget_id": "b1", "rpm_limit": 1}),
    )
    .await;
    let (_, b, _) = call(&gw, "GET", "/budget/info?budget_id=b1", MASTER, None).await;
    assert_eq!(b[0]["rpm_limit"], 1);
    admin(&gw, "/team/delete", json!({"team_ids": ["t1"]})).await;
    admin(&gw, "/user/delete", json!({"user_ids": ["u1"]})).await;
    admin(&gw, "/customer/delete", json!({"user_ids": ["c1"]})).await;
    admin(&gw, "/budget/delete", json!({"id": "b1"})).await;
    let (status, _, _) = call(&gw, "GET", "/team/info?team_id=t1", MASTER, None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn every_limit_trips_with_litellm_errors() {
    let mock = Mock::start("limits").await;
    let gw = Gateway::start(&config(&mock, "", ""), &[]).await;

    // Key rpm, with the remaining-requests header counting down.
    let key = new_key(&gw, json!({"rpm_limit": 2})).await;
    let (s, _, h) = chat(&gw, &key, "m").await;
    assert_eq!(s, 200);
    assert_eq!(h["x-ratelimit-remaining-requests"], "1");
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(chat(&gw, &key, "m").await.0, 200);
    let (s, v, h) = chat(&gw, &key, "m").await;
    assert_eq!(s, 429, "{v}");
    assert_eq!(error_type(&v), "rate_limit_error");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("Limit type: requests") && msg.contains("Current limit: 2"),
        "{msg}"
    );
    assert!(h.contains_key("retry-after"));

    // Key tpm: the first call uses more tokens than the limit, the next is refused.
    let key = new_key(&gw, json!({"tpm_limit": 5})).await;
    let (s, _, h) = chat(&gw, &key, "m").await;
    assert_eq!(s, 200);
    assert_eq!(h["x-ratelimit-remaining-tokens"], "5");
    let (s, v, _) = chat(&gw, &key, "m").await;
    assert_eq!(s, 429, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Limit type: tokens"));

    // Key max_parallel_requests.
    let key = new_key(&gw, json!({"max_parallel_requests": 1})).await;
    let (a, b) = tokio::join!(chat(&gw, &key, "slow"), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        chat(&gw, &key, "slow").await
    });
    assert_eq!(a.0, 200, "{}", a.1);
    assert_eq!(b.0, 429, "{}", b.1);
    assert!(b.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_parallel_requests"));
    assert_eq!(chat(&gw, &key, "m").await.0, 200, "the slot is released");

    // User rpm (through the user's key) and team rpm (shared by two keys).
    admin(
        &gw,
        "/user/new",
        json!({"user_id": "ru", "rpm_limit": 1, "auto_create_key": false}),
    )
    .await;
    let k1 = new_key(&gw, json!({"user_id": "ru"})).await;
    let k2 = new_key(&gw, json!({"user_id": "ru"})).await;
    assert_eq!(chat(&gw, &k1, "m").await.0, 200);
    let (s, v, _) = chat(&gw, &k2, "m").await;
    assert_eq!(s, 429, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("user"));
    admin(
        &gw,
        "/team/new",
        json!({"team_id": "rt", "rpm_limit": 1, "models": ["m"]}),
    )
    .await;
    let t1 = new_key(&gw, json!({"team_id": "rt"})).await;
    let t2 = new_key(&gw, json!({"team_id": "rt"})).await;
    assert_eq!(chat(&gw, &t1, "m").await.0, 200);
    let (s, v, _) = chat(&gw, &t2, "m").await;
    assert_eq!(s, 429, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("team"));
    // The team's model list binds its keys.
    let (s, v, _) = chat(&gw, &t1, "m2").await;
    assert_eq!(s, 401, "{v}");

    // A budget row attached by budget_id gives its limits to the key.
    admin(
        &gw,
        "/budget/new",
        json!({"budget_id": "one-rpm", "rpm_limit": 1}),
    )
    .await;
    let kb = new_key(&gw, json!({"budget_id": "one-rpm"})).await;
    assert_eq!(chat(&gw, &kb, "m").await.0, 200);
    assert_eq!(chat(&gw, &kb, "m").await.0, 429);

    // An unknown key is refused before any upstream call.
    let before = mock.stats().await["total_calls"].as_u64().unwrap();
    let (s, v, _) = chat(&gw, "sk-not-a-key", "m").await;
    assert_eq!(s, 401, "{v}");
    assert_eq!(mock.stats().await["total_calls"].as_u64().unwrap(), before);
}

/// The cost of one call to group `m` as the mock answers it.
fn cost_of(resp: &Value) -> f64 {
    let u = &resp["usage"];
    u["prompt_tokens"].as_f64().unwrap() * IN_PRICE
        + u["completion_tokens"].as_f64().unwrap() * OUT_PRICE
}

#[tokio::test]
async fn budgets_trip_at_every_level_and_reset() {
    let mock = Mock::start("budgets").await;
    let gw = Gateway::start(&config(&mock, "", ""), &[]).await;

    // Key: the first call spends more than the budget; the next is refused.
    let key = new_key(&gw, json!({"max_budget": 0.001})).await;
    let (s, v, h) = chat(&gw, &key, "m").await;
    assert_eq!(s, 200, "{v}");
    let cost: f64 = h["x-litellm-response-cost"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (cost - cost_of(&v)).abs() < 1e-12,
        "{cost} vs {}",
        cost_of(&v)
    );
    let (s, v, _) = chat(&gw, &key, "m").await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(error_type(&v), "budget_exceeded");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ExceededTokenBudget"),
        "{v}"
    );

    // soft_budget never blocks; past it the answer says so.
    let soft = new_key(&gw, json!({"soft_budget": 0.001})).await;
    let (_, _, h) = chat(&gw, &soft, "m").await;
    assert!(!h.contains_key("x-litellm-soft-budget-exceeded"));
    let (s, _, h) = chat(&gw, &soft, "m").await;
    assert_eq!(s, 200);
    assert_eq!(h["x-litellm-soft-budget-exceeded"], "true");

    // User, team and end user (the OpenAI `user` field).
    admin(
        &gw,
        "/user/new",
        json!({"user_id": "bu", "max_budget": 0.001, "auto_create_key": false}),
    )
    .await;
    let ku = new_key(&gw, json!({"user_id": "bu"})).await;
    assert_eq!(chat(&gw, &ku, "m").await.0, 200);
    let (s, v, _) = chat(&gw, &ku, "m").await;
    assert_eq!((s, error_type(&v)), (400, "budget_exceeded"), "{v}");
    admin(
        &gw,
        "/team/new",
        json!({"team_id": "bt", "max_budget": 0.001}),
    )
    .await;
    let kt = new_key(&gw, json!({"team_id": "bt"})).await;
    assert_eq!(chat(&gw, &kt, "m").await.0, 200);
    let (s, v, _) = chat(&gw, &kt, "m").await;
    assert_eq!((s, error_type(&v)), (400, "budget_exceeded"), "{v}");
    admin(
        &gw,
        "/customer/new",
        json!({"user_id": "cust", "max_budget": 0.001}),
    )
    .await;
    let anyone = new_key(&gw, json!({})).await;
    let mut body = chat_body("m");
    body["user"] = json!("cust");
    assert_eq!(
        call(
            &gw,
            "POST",
            "/v1/chat/completions",
            &anyone,
            Some(body.clone())
        )
        .await
        .0,
        200
    );
    let (s, v, _) = call(&gw, "POST", "/v1/chat/completions", &anyone, Some(body)).await;
    assert_eq!((s, error_type(&v)), (400, "budget_exceeded"), "{v}");
    assert_eq!(
        chat(&gw, &anyone, "m").await.0,
        200,
        "other end users are not blocked"
    );

    // Per-model budget on a key.
    let km = new_key(&gw, json!({"model_max_budget": {"m": 0.001}})).await;
    assert_eq!(chat(&gw, &km, "m").await.0, 200);
    assert_eq!(chat(&gw, &km, "m").await.0, 400);
    assert_eq!(
        chat(&gw, &km, "m2").await.0,
        200,
        "other models are not limited"
    );

    // budget_duration: spend returns to 0 when the period ends.
    let kr = new_key(&gw, json!({"max_budget": 0.001, "budget_duration": "2s"})).await;
    assert_eq!(chat(&gw, &kr, "m").await.0, 200);
    assert_eq!(chat(&gw, &kr, "m").await.0, 400);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let (s, v, _) = chat(&gw, &kr, "m").await;
    assert_eq!(s, 200, "budget reset: {v}");
    let (_, info, _) = call(&gw, "GET", &format!("/key/info?key={kr}"), MASTER, None).await;
    assert!(info["info"]["budget_reset_at"].is_string(), "{info}");
}

#[tokio::test]
async fn proxy_wide_budget_blocks_every_key() {
    let mock = Mock::start("global").await;
    let gw = Gateway::start(&config(&mock, "", "  max_budget: 0.001"), &[]).await;
    let key = new_key(&gw, json!({})).await;
    assert_eq!(chat(&gw, &key, "m").await.0, 200);
    let (s, v, _) = chat(&gw, MASTER, "m").await;
    assert_eq!((s, error_type(&v)), (400, "budget_exceeded"), "{v}");
    let (_, g, _) = call(&gw, "GET", "/global/spend", MASTER, None).await;
    assert!(g["spend"].as_f64().unwrap() > 0.001, "{g}");
    assert_eq!(g["max_budget"], 0.001);
}

#[tokio::test]
async fn spend_is_price_times_tokens_streamed_or_not() {
    let mock = Mock::start("spend").await;
    let gw = Gateway::start(&config(&mock, "", ""), &[]).await;
    let key = new_key(&gw, json!({"key_alias": "spender"})).await;

    let (s, v, h) = chat(&gw, &key, "m").await;
    assert_eq!(s, 200);
    let whole = cost_of(&v);
    assert_eq!(
        h["x-litellm-response-cost"]
            .to_str()
            .unwrap()
            .parse::<f64>()
            .unwrap(),
        whole
    );

    // A stream: usage comes from the stream itself.
    let mut body = chat_body("m");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let usage = sse_data(&text)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|c| c["usage"].is_object())
        .expect("usage chunk")["usage"]
        .clone();
    let streamed = usage["prompt_tokens"].as_f64().unwrap() * IN_PRICE
        + usage["completion_tokens"].as_f64().unwrap() * OUT_PRICE;

    // The bundled price table prices gpt-4o-mini.
    let (s, v, h) = chat(&gw, &key, "gpt-4o-mini").await;
    assert_eq!(s, 200);
    let table = v["usage"]["prompt_tokens"].as_f64().unwrap() * 0.000_000_15
        + v["usage"]["completion_tokens"].as_f64().unwrap() * 0.000_000_6;
    let header: f64 = h["x-litellm-response-cost"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((header - table).abs() < 1e-12, "{header} vs {table}");

    let hash = sluice_hash(&key);
    let rows = spend_rows(&gw, &format!("?api_key={key}"), 3).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    let mut spends: Vec<f64> = rows.iter().map(|r| r["spend"].as_f64().unwrap()).collect();
    spends.sort_by(f64::total_cmp);
    let mut expected = vec![whole, streamed, table];
    expected.sort_by(f64::total_cmp);
    for (a, b) in spends.iter().zip(&expected) {
        assert!((a - b).abs() < 1e-12, "{spends:?} vs {expected:?}");
    }
    assert!(rows
        .iter()
        .all(|r| r["api_key"] == hash && r["status"] == "success"));
    let total: f64 = expected.iter().sum();
    let (_, info, _) = call(&gw, "GET", &format!("/key/info?key={key}"), MASTER, None).await;
    assert!(
        (info["info"]["spend"].as_f64().unwrap() - total).abs() < 1e-9,
        "{info}"
    );

    // A failed call is logged too, with status failure.
    let (s, _, _) = call(
        &gw,
        "POST",
        "/v1/chat/completions",
        &key,
        Some(json!({"model": "m"})),
    )
    .await;
    assert_eq!(s, 400);
    // Pass-through usage is logged (vLLM shape on /vllm).
    let resp = client()
        .post(gw.url("/vllm/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat_body("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Three successes and the failure above, then this pass-through call.
    let rows = spend_rows(&gw, &format!("?api_key={key}"), 5).await;
    assert!(
        rows.iter()
            .any(|r| r["call_type"] == "/vllm" && r["total_tokens"].as_u64().unwrap() > 0),
        "{rows:?}"
    );

    // Reports group the spend.
    let (s, report, _) = call(
        &gw,
        "GET",
        "/global/spend/report?group_by=api_key",
        MASTER,
        None,
    )
    .await;
    assert_eq!(s, 200, "{report}");
    let groups = report[0]["api_keys"].as_array().unwrap();
    assert!(groups.iter().any(|g| g["api_key"] == hash), "{report}");
}

fn sluice_hash(key: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Requests sent under load while SIGTERM arrives: every answered call has its row after
/// the restart.
#[tokio::test]
async fn sigterm_under_load_loses_no_spend_rows() {
    let mock = Mock::start("term").await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/spend.db", dir.path().display());
    let general = format!("  database_url: \"{db}\"\n  proxy_batch_write_at: 30");
    let cfg = config(&mock, &general, "").replace("  proxy_batch_write_at: 0.1\n", "");
    let mut gw = Gateway::start(&cfg, &[]).await;
    let key = new_key(&gw, json!({})).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = vec![];
    for _ in 0..8 {
        let url = gw.url("/v1/chat/completions");
        let key = key.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut ok = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client()
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&chat_body("m"))
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            ok
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = gw
        .terminate(Duration::from_secs(30))
        .await
        .expect("exits on SIGTERM");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent_ok = 0;
    for w in workers {
        sent_ok += w.await.unwrap();
    }
    assert!(status.success(), "{status}\n{}", gw.log());
    assert!(sent_ok > 20, "load ran: {sent_ok}");
    assert!(
        gw.log().contains("spend log flushed at exit"),
        "{}",
        gw.log()
    );

    let gw2 = Gateway::start(&cfg, &[]).await;
    let rows = spend_rows(
        &gw2,
        &format!("?api_key={key}&limit=100000"),
        sent_ok as usize,
    )
    .await;
    let ok_rows = rows.iter().filter(|r| r["status"] == "success").count() as u64;
    assert_eq!(ok_rows, sent_ok, "spend rows vs answered requests");
}

/// Postgres goes away under traffic and comes back: requests keep being answered (keys are
/// cached) and every row arrives once it is back.
#[tokio::test]
async fn database_outage_loses_no_spend_rows() {
    let mock = Mock::start("outage").await;
    let db = TestDatabase::create();
    let cut = TcpCut::start("127.0.0.1:5432".parse().unwrap()).await;
    let general = format!("  database_url: \"{}\"", db.url_via(cut.port));
    let gw = Gateway::start(&config(&mock, &general, ""), &[]).await;
    let key = new_key(&gw, json!({})).await;
    assert_eq!(chat(&gw, &key, "m").await.0, 200);
    spend_rows(&gw, "", 1).await;
    // The key's own creation reaches the change poll (every 250 ms) and may drop the entry the
    // first request cached; once that poll is past, a second request caches it for good.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(chat(&gw, &key, "m").await.0, 200);
    spend_rows(&gw, "", 2).await;

    cut.cut();
    let mut ok = 2;
    for _ in 0..20 {
        let (s, v, _) = chat(&gw, &key, "m").await;
        assert_eq!(
            s, 200,
            "served from the key cache while the database is away: {v}"
        );
        ok += 1;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    cut.restore();
    let rows = spend_rows(&gw, "?limit=1000", ok).await;
    assert_eq!(rows.len(), ok, "{}", gw.log());
    let stored = db.query("SELECT count(*) FROM sluice_spend_logs");
    assert_eq!(stored, ok.to_string());
}

/// Two gateways on one Postgres and one Redis enforce one rpm limit and one budget.
#[tokio::test]
async fn two_instances_share_limits_through_redis() {
    let mock = Mock::start("shared").await;
    let db = TestDatabase::create();
    let (host, port) = redis_address();
    let general = format!("  database_url: \"{}\"", db.url);
    // A fresh Redis namespace is not needed: keys are per token, and tokens are random.
    let routing = format!("router_settings:\n  redis_host: {host}\n  redis_port: {port}\n");
    let cfg = format!("{}{routing}", config(&mock, &general, ""));
    let a = Gateway::start(&cfg, &[]).await;
    let b = Gateway::start(&cfg, &[]).await;
    wait_for_log(&a, "redis connected").await;
    wait_for_log(&b, "redis connected").await;

    let key = new_key(&a, json!({"rpm_limit": 6})).await;
    let mut ok = 0;
    for i in 0..12 {
        let gw = if i % 2 == 0 { &a } else { &b };
        if chat(gw, &key, "m").await.0 == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 6, "one rpm limit across both instances");

    // Budget: each call costs more than a third of it; sequential calls stop after the third.
    let (_, first, _) = chat(&a, &new_key(&a, json!({})).await, "m").await;
    let budget = cost_of(&first) * 2.5;
    let key = new_key(&a, json!({"max_budget": budget})).await;
    let mut ok = 0;
    for i in 0..10 {
        let gw = if i % 2 == 0 { &a } else { &b };
        if chat(gw, &key, "m").await.0 == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 3, "one budget across both instances");

    // A block on one instance reaches the other within a second.
    let key = new_key(&a, json!({})).await;
    assert_eq!(chat(&b, &key, "m").await.0, 200);
    admin(&a, "/key/block", json!({"key": key})).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(chat(&b, &key, "m").await.0, 403);
}

async fn wait_for_log(gw: &Gateway, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no '{needle}' in log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With Redis unreachable, requests are served and limits hold per instance.
#[tokio::test]
async fn redis_unreachable_falls_back_to_local_limits() {
    let mock = Mock::start("noredis").await;
    let closed = sluice_tests::free_port();
    let cfg = format!(
        "{}router_settings:\n  redis_host: 127.0.0.1\n  redis_port: {closed}\n",
        config(&mock, "", "")
    );
    let gw = Gateway::start(&cfg, &[]).await;
    let key = new_key(&gw, json!({"rpm_limit": 2})).await;
    assert_eq!(chat(&gw, &key, "m").await.0, 200);
    assert_eq!(chat(&gw, &key, "m").await.0, 200);
    assert_eq!(chat(&gw, &key, "m").await.0, 429);
    wait_for_log(&gw, "redis unreachable").await;
}

fn jwt(secret_or_pem: &[u8], alg: jsonwebtoken::Algorithm, claims: Value) -> String {
    let key = match alg {
        jsonwebtoken::Algorithm::HS256 => jsonwebtoken::EncodingKey::from_secret(secret_or_pem),
        _ => jsonwebtoken::EncodingKey::from_rsa_pem(secret_or_pem).unwrap(),
    };
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, &key).unwrap()
}

fn exp_in(secs: i64) -> i64 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64)
        + secs
}

#[tokio::test]
async fn jwt_callers_are_accepted_mapped_and_rejected() {
    let mock = Mock::start("jwt").await;
    let secret = "a-test-only-hs256-secret-of-32-bytes!!";
    let general = format!(
        "  enable_jwt_auth: true\n  litellm_jwtauth:\n    secret: \"{secret}\"\n    user_id_jwt_field: sub\n    team_id_jwt_field: team\n"
    );
    let gw = Gateway::start(&config(&mock, &general, ""), &[]).await;
    admin(
        &gw,
        "/team/new",
        json!({"team_id": "jt", "rpm_limit": 2, "models": ["m"]}),
    )
    .await;
    let hs = jsonwebtoken::Algorithm::HS256;

    // A user token: served, with its team's limits and models.
    let user = jwt(
        secret.as_bytes(),
        hs,
        json!({"sub": "ju", "team": "jt", "exp": exp_in(300)}),
    );
    let (s, v, _) = chat(&gw, &user, "m").await;
    assert_eq!(s, 200, "{v}\n{}", gw.log());
    assert_eq!(chat(&gw, &user, "m").await.0, 200);
    let (s, v, _) = chat(&gw, &user, "m").await;
    assert_eq!(s, 429, "team rpm applies to the JWT's team: {v}");
    let (s, _, _) = chat(&gw, &user, "m2").await;
    assert_eq!(s, 401, "team models apply");
    // Not an admin: management routes are refused.
    let (s, _, _) = call(&gw, "POST", "/key/generate", &user, Some(json!({}))).await;
    assert_eq!(s, 403);

    // An admin token (scope) may manage keys.
    let adm = jwt(
        secret.as_bytes(),
        hs,
        json!({"sub": "boss", "scope": "openid litellm_proxy_admin", "exp": exp_in(300)}),
    );
    let (s, v, _) = call(&gw, "POST", "/key/generate", &adm, Some(json!({}))).await;
    assert_eq!(s, 200, "{v}");

    // Expired, wrongly signed, unsigned and garbage tokens: 401.
    let expired = jwt(
        secret.as_bytes(),
        hs,
        json!({"sub": "ju", "exp": exp_in(-120)}),
    );
    let (s, v, _) = chat(&gw, &expired, "m").await;
    assert_eq!(s, 401, "{v}");
    let forged = jwt(
        b"another-secret-that-is-32-bytes-long!!",
        hs,
        json!({"sub": "ju", "exp": exp_in(300)}),
    );
    assert_eq!(chat(&gw, &forged, "m").await.0, 401);
    let rsa = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../filters/fixtures/jwt/rsa-a.TEST-ONLY-private.pem"
    ))
    .unwrap();
    let wrong_alg = jwt(
        &rsa,
        jsonwebtoken::Algorithm::RS256,
        json!({"sub": "ju", "exp": exp_in(300)}),
    );
    assert_eq!(chat(&gw, &wrong_alg, "m").await.0, 401);
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(json!({"sub": "ju", "exp": exp_in(300)}).to_string())
    );
    assert_eq!(chat(&gw, &none, "m").await.0, 401);
}

#[tokio::test]
async fn jwt_with_a_static_rs256_public_key() {
    let mock = Mock::start("jwt-rs").await;
    let public = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../filters/fixtures/jwt/rsa-a.public.pem"
    );
    let pem = std::fs::read_to_string(public).unwrap();
    let indented: String = pem.lines().map(|l| format!("      {l}\n")).collect();
    let general = format!(
        "  enable_jwt_auth: true\n  litellm_jwtauth:\n    user_id_jwt_field: sub\n    public_key: |\n{indented}"
    );
    let gw = Gateway::start(&config(&mock, &general, ""), &[]).await;
    let private = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../filters/fixtures/jwt/rsa-a.TEST-ONLY-private.pem"
    ))
    .unwrap();
    let other = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../filters/fixtures/jwt/rsa-b.TEST-ONLY-private.pem"
    ))
    .unwrap();
    let rs = jsonwebtoken::Algorithm::RS256;
    let good = jwt(&private, rs, json!({"sub": "r1", "exp": exp_in(300)}));
    let (s, v, _) = chat(&gw, &good, "m").await;
    assert_eq!(s, 200, "{v}\n{}", gw.log());
    let bad = jwt(&other, rs, json!({"sub": "r1", "exp": exp_in(300)}));
    assert_eq!(chat(&gw, &bad, "m").await.0, 401);
}

#[tokio::test]
async fn jwt_settings_that_restrict_access_are_refused_not_ignored() {
    let mock = Mock::start("jwt-rbac").await;
    let general = "  enable_jwt_auth: true\n  litellm_jwtauth:\n    secret: \"a-test-only-hs256-secret-of-32-bytes!!\"\n    enforce_rbac: true\n";
    let (status, stderr) = Gateway::start_expect_failure(&config(&mock, general, "")).await;
    assert!(!status.success());
    assert!(stderr.contains("litellm_jwtauth.enforce_rbac"), "{stderr}");
}

/// A wildcard deployment is priced by the model the request resolved to, not the pattern.
#[tokio::test]
async fn wildcard_deployments_are_priced_by_the_resolved_model() {
    let mock = Mock::start("wild").await;
    let cfg = format!(
        "model_list:\n  - {{model_name: \"openai/*\", litellm_params: {{model: \"openai/*\", api_base: {}}}}}\ngeneral_settings:\n  master_key: {MASTER}\n  proxy_batch_write_at: 0.1\n",
        mock.base_url()
    );
    let gw = Gateway::start(&cfg, &[]).await;
    let (s, v, h) = chat(&gw, MASTER, "openai/gpt-4o-mini").await;
    assert_eq!(s, 200, "{v}\n{}", gw.log());
    let expected = v["usage"]["prompt_tokens"].as_f64().unwrap() * 0.000_000_15
        + v["usage"]["completion_tokens"].as_f64().unwrap() * 0.000_000_6;
    let cost: f64 = h["x-litellm-response-cost"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        expected > 0.0 && (cost - expected).abs() < 1e-12,
        "{cost} vs {expected}"
    );
    let rows = spend_rows(&gw, "", 1).await;
    assert_eq!(rows[0]["model"], "gpt-4o-mini", "{rows:?}");
    assert_eq!(rows[0]["model_group"], "openai/gpt-4o-mini");
}
