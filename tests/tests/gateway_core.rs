//! Black-box tests of the built `sluice` binary against real mock providers on loopback:
//! routing, retries, fallbacks, cooldowns, streaming, errors and discovery routes.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_tests::{client, sse_data, Gateway, Mock};

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
}

async fn post(gw: &Gateway, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(gw.url(path))
        .json(body)
        .send()
        .await
        .expect("request to the gateway")
}

/// A config with one deployment, group `m`, of the mock's `openai/<upstream>` model.
/// `params` extends its `litellm_params` (", timeout: 1"); `rest` follows the model list.
fn one_model(mock: &Mock, upstream: &str, params: &str, rest: &str) -> String {
    format!(
        "model_list:\n  - {{model_name: m, litellm_params: {{model: openai/{upstream}, api_base: {}{params}}}}}\n{rest}",
        mock.base_url()
    )
}

async fn calls(mock: &Mock) -> u64 {
    mock.stats().await["total_calls"].as_u64().unwrap()
}

#[tokio::test]
async fn one_mib_prompt_reaches_upstream_intact() {
    let mock = Mock::start("big").await;
    let gw = Gateway::start(
        &format!(
            "model_list:\n  - model_name: m\n    litellm_params: {{model: openai/echo, api_base: {}, api_key: sk-upstream}}\n",
            mock.base_url()
        ),
        &[],
    )
    .await;
    let text: String = "abcdefghij".repeat(1024 * 1024 / 10 + 1);
    let body =
        serde_json::to_vec(&json!({"messages": [{"role": "user", "content": text}], "model": "m"}))
            .unwrap();
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", gw.log());
    let received: usize = resp.headers()["llm_provider-x-mock-body-len"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The gateway rewrites only `model` (m → echo): the rest arrives byte for byte.
    assert_eq!(received, body.len() + "echo".len() - "m".len());
    let last = &mock.stats().await["last_request"];
    assert_eq!(
        last["json"]["messages"][0]["content"]
            .as_str()
            .unwrap()
            .len(),
        text.len()
    );
    assert_eq!(last["json"]["model"], "echo");
    assert_eq!(last["headers"]["authorization"], "Bearer sk-upstream");
}

#[tokio::test]
async fn retry_after_429_goes_to_the_other_deployment() {
    let a = Mock::start("a").await;
    let b = Mock::start("b").await;
    let gw = Gateway::start(
        &format!(
            r#"
model_list:
  - model_name: m
    litellm_params: {{model: openai/error-429, api_base: {}, order: 1}}
  - model_name: m
    litellm_params: {{model: openai/ok, api_base: {}, order: 2}}
"#,
            a.base_url(),
            b.base_url()
        ),
        &[],
    )
    .await;
    let resp = post(&gw, "/chat/completions", &chat("m")).await;
    assert_eq!(resp.status(), 200, "{}", gw.log());
    assert_eq!(resp.headers()["x-litellm-attempted-retries"], "1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["system_fingerprint"], "b");
    assert_eq!(calls(&a).await, 1);
    assert_eq!(calls(&b).await, 1);
}

#[tokio::test]
async fn retries_then_general_and_context_window_fallbacks() {
    let mock = Mock::start("fb").await;
    let base = mock.base_url();
    let gw = Gateway::start(
        &format!(
            r#"
model_list:
  - {{model_name: broken, litellm_params: {{model: openai/error-503, api_base: {base}}}}}
  - {{model_name: small, litellm_params: {{model: openai/context-window, api_base: {base}}}}}
  - {{model_name: big, litellm_params: {{model: openai/big-ok, api_base: {base}}}}}
  - {{model_name: rescue, litellm_params: {{model: openai/rescue-ok, api_base: {base}}}}}
router_settings:
  num_retries: 2
  disable_cooldowns: true
  fallbacks: [{{"broken": ["rescue"]}}]
  context_window_fallbacks: [{{"small": ["big"]}}]
"#
        ),
        &[],
    )
    .await;
    let resp = post(&gw, "/v1/chat/completions", &chat("broken")).await;
    assert_eq!(resp.status(), 200, "{}", gw.log());
    assert_eq!(resp.headers()["x-litellm-attempted-fallbacks"], "1");
    assert_eq!(resp.headers()["x-litellm-attempted-retries"], "2");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["model"], "rescue-ok");
    let by_model = mock.stats().await["calls_by_model"].clone();
    assert_eq!(by_model["error-503"], 3, "1 call + 2 retries: {by_model}");

    // A context-window error is not retried: it goes straight to the context-window fallback.
    let resp = post(&gw, "/v1/chat/completions", &chat("small")).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["model"], "big-ok");
    assert_eq!(mock.stats().await["calls_by_model"]["context-window"], 1);
}

#[tokio::test]
async fn errors_without_fallback_keep_litellm_shape() {
    let mock = Mock::start("err").await;
    let base = mock.base_url();
    let gw = Gateway::start(
        &format!(
            r#"
model_list:
  - {{model_name: down, litellm_params: {{model: openai/error-503, api_base: {base}, api_key: sk-secret-upstream-key}}}}
  - {{model_name: small, litellm_params: {{model: openai/context-window, api_base: {base}}}}}
  - {{model_name: slow, litellm_params: {{model: openai/slow-3000, api_base: {base}, timeout: 0.3}}}}
  - {{model_name: nowhere, litellm_params: {{model: openai/x, api_base: "http://127.0.0.1:1/v1"}}}}
router_settings: {{num_retries: 0}}
"#
        ),
        &[],
    )
    .await;
    let resp = post(&gw, "/chat/completions", &chat("down")).await;
    assert_eq!(resp.status(), 503);
    let text = resp.text().await.unwrap();
    assert!(!text.contains("sk-secret-upstream-key"), "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "503");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("litellm.ServiceUnavailableError: OpenAIException - mock 503"),
        "{v}"
    );

    let resp = post(&gw, "/chat/completions", &chat("small")).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("ContextWindowExceededError"));

    let started = Instant::now();
    let resp = post(&gw, "/chat/completions", &chat("slow")).await;
    assert_eq!(resp.status(), 408);
    assert!(started.elapsed() < Duration::from_secs(2));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "timeout");

    let resp = post(&gw, "/chat/completions", &chat("nowhere")).await;
    assert_eq!(resp.status(), 502);
}

#[tokio::test]
async fn cooldown_takes_a_failing_deployment_out_and_brings_it_back() {
    let bad = Mock::start("bad").await;
    let good = Mock::start("good").await;
    let gw = Gateway::start(
        &format!(
            r#"
model_list:
  - {{model_name: m, litellm_params: {{model: openai/x, api_base: {}}}}}
  - {{model_name: m, litellm_params: {{model: openai/x, api_base: {}}}}}
router_settings: {{num_retries: 3, allowed_fails: 1, cooldown_time: 1}}
"#,
            bad.base_url(),
            good.base_url()
        ),
        &[],
    )
    .await;
    bad.set_fail(Some(500)).await;
    for _ in 0..20 {
        let resp = post(&gw, "/chat/completions", &chat("m")).await;
        assert_eq!(resp.status(), 200, "retries hide the failing deployment");
    }
    // allowed_fails 1: the second failure within the minute cools it down, so it saw 2 calls.
    assert_eq!(calls(&bad).await, 2, "{}", bad.stats().await);
    let metrics = client()
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("litellm_deployment_cooled_down_total"),
        "{metrics}"
    );
    bad.set_fail(None).await;
    bad.reset().await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for _ in 0..20 {
        assert_eq!(
            post(&gw, "/chat/completions", &chat("m")).await.status(),
            200
        );
    }
    assert!(
        calls(&bad).await > 0,
        "after cooldown_time the deployment is used again"
    );
}

#[tokio::test]
async fn whole_group_cooling_down_answers_429_with_retry_after() {
    let mock = Mock::start("solo").await;
    let gw = Gateway::start(
        &one_model(
            &mock,
            "x",
            "",
            "router_settings: {num_retries: 0, allowed_fails: 0, cooldown_time: 30}\n",
        ),
        &[],
    )
    .await;
    mock.set_fail(Some(500)).await;
    assert_eq!(
        post(&gw, "/chat/completions", &chat("m")).await.status(),
        500
    );
    let resp = post(&gw, "/chat/completions", &chat("m")).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("No deployments available"));
    assert_eq!(calls(&mock).await, 1);
}

#[tokio::test]
async fn weighted_shuffle_follows_rpm_weights() {
    let a = Mock::start("a").await;
    let b = Mock::start("b").await;
    let gw = Gateway::start(
        &format!(
            r#"
model_list:
  - {{model_name: m, litellm_params: {{model: openai/x, api_base: {}, rpm: 900000}}}}
  - {{model_name: m, litellm_params: {{model: openai/x, api_base: {}, rpm: 100000}}}}
"#,
            a.base_url(),
            b.base_url()
        ),
        &[],
    )
    .await;
    for _ in 0..300 {
        assert_eq!(
            post(&gw, "/chat/completions", &chat("m")).await.status(),
            200
        );
    }
    let share = calls(&a).await as f64 / 300.0;
    // Binomial(300, 0.9): 0.9 ± 4σ ≈ [0.83, 0.97].
    assert!(
        (0.83..=0.97).contains(&share),
        "share of the rpm-900k deployment: {share}"
    );
}

#[tokio::test]
async fn least_busy_prefers_the_idle_deployment() {
    let a = Mock::start("a").await;
    let b = Mock::start("b").await;
    let gw = Gateway::start(
        &format!(
            r#"
model_list:
  - {{model_name: m, litellm_params: {{model: openai/slow-1500, api_base: {}}}}}
  - {{model_name: m, litellm_params: {{model: openai/slow-1500, api_base: {}}}}}
router_settings: {{routing_strategy: least-busy}}
"#,
            a.base_url(),
            b.base_url()
        ),
        &[],
    )
    .await;
    // One long call occupies a deployment; the next four must all go to the other one.
    let first = tokio::spawn({
        let url = gw.url("/chat/completions");
        async move {
            client()
                .post(url)
                .json(&chat("m"))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let busy = if a.stats().await["in_flight"] == 1 {
        &a
    } else {
        &b
    };
    let idle_name = if busy.name == "a" { "b" } else { "a" };
    let mut handles = vec![];
    for _ in 0..4 {
        let url = gw.url("/chat/completions");
        handles.push(tokio::spawn(async move {
            let v: Value = client()
                .post(url)
                .json(&chat("m"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["system_fingerprint"].as_str().unwrap().to_string()
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Requests 2..5 overlap: least-busy alternates between idle and busy in order of in-flight
    // counts, but the deployment already holding the long call never gets the first of them.
    let names: Vec<String> = futures_util::future::join_all(handles)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(names[0], idle_name, "{names:?}");
    let on_idle = names.iter().filter(|n| *n == idle_name).count();
    assert!(on_idle >= 2, "{names:?}");
    assert_eq!(first.await.unwrap(), 200);
}

#[tokio::test]
async fn sse_flows_chunk_by_chunk_and_usage_chunk_is_hidden() {
    let mock = Mock::start("s").await;
    let gw = Gateway::start(&one_model(&mock, "stream-5-delay-300", "", ""), &[]).await;
    let started = Instant::now();
    let mut resp = post(
        &gw,
        "/v1/chat/completions",
        &json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let first = resp.chunk().await.unwrap().unwrap();
    let first_at = started.elapsed();
    // The upstream needs 5 × 300 ms; the first chunk must arrive long before that.
    assert!(
        first_at < Duration::from_millis(900),
        "first chunk after {first_at:?}"
    );
    let mut body = String::from_utf8(first.to_vec()).unwrap();
    while let Some(c) = resp.chunk().await.unwrap() {
        body.push_str(std::str::from_utf8(&c).unwrap());
    }
    assert!(started.elapsed() >= Duration::from_millis(1400));
    let events = sse_data(&body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(
        !body.contains("\"prompt_tokens\""),
        "Sluice asked for usage itself, so it hides it: {body}"
    );
    // The upstream was asked for usage.
    assert_eq!(
        mock.stats().await["last_request"]["json"]["stream_options"]["include_usage"],
        true
    );

    // A client that asked for usage gets it.
    let resp = post(&gw, "/v1/chat/completions", &json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}, "messages": []})).await;
    let body = resp.text().await.unwrap();
    assert!(body.contains("\"prompt_tokens\""));
    let metrics = client()
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("litellm_output_tokens_metric_total{model=\"m\"} 10"),
        "{metrics}"
    );
}

#[tokio::test]
async fn client_disconnect_closes_the_upstream_stream() {
    let mock = Mock::start("d").await;
    let gw = Gateway::start(&one_model(&mock, "stream-50-delay-100", "", ""), &[]).await;
    let mut resp = post(
        &gw,
        "/v1/chat/completions",
        &json!({"model": "m", "stream": true, "messages": []}),
    )
    .await;
    assert!(resp.chunk().await.unwrap().is_some());
    drop(resp);
    let stats = mock
        .wait_stats(Duration::from_secs(5), |s| s["cancelled_streams"] == 1)
        .await;
    assert_eq!(stats["completed_streams"], 0, "{stats}");
}

#[tokio::test]
async fn vllm_passthrough_is_byte_for_byte() {
    let mock = Mock::start("v").await;
    let gw = Gateway::start(
        &format!(
            r#"
model_list:
  - {{model_name: llama, litellm_params: {{model: hosted_vllm/served-llama, api_base: {}, api_key: sk-vllm-backend}}}}
general_settings: {{master_key: sk-master}}
"#,
            mock.base_url()
        ),
        &[],
    )
    .await;
    let http = client();
    // /vllm/metrics: GET, no body, the only hosted_vllm deployment.
    // The mock's own call counter differs between the two reads; every other line must match.
    let stable = |text: String| -> String {
        text.lines()
            .filter(|l| !l.starts_with("mock_calls_total"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let direct = http
        .get(mock.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let via = http
        .get(gw.url("/vllm/metrics"))
        .bearer_auth("sk-master")
        .send()
        .await
        .unwrap();
    assert_eq!(via.status(), 200);
    assert_eq!(stable(via.text().await.unwrap()), stable(direct));
    let last = &mock.stats().await["last_request"];
    assert_eq!(
        last["headers"]["authorization"], "Bearer sk-vllm-backend",
        "the client's key is never forwarded"
    );

    // /vllm/score: body passes through with `model` rewritten to the backend's model name.
    let score = json!({"model": "llama", "text_1": "a", "text_2": ["b", "c"]});
    let via = http
        .post(gw.url("/vllm/score"))
        .bearer_auth("sk-master")
        .json(&score)
        .send()
        .await
        .unwrap();
    assert_eq!(via.status(), 200);
    let via_body: Value = via.json().await.unwrap();
    let direct: Value = http
        .post(mock.url("/score"))
        .json(&json!({"model": "served-llama", "text_1": "a", "text_2": ["b", "c"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(via_body["data"], direct["data"]);
    assert_eq!(
        mock.stats().await["last_request"]["json"]["model"],
        "served-llama"
    );

    // Streamed /vllm/v1/chat/completions: the upstream's SSE bytes unchanged (usage chunk included
    // only if the client asked; nothing is injected on pass-through).
    let req = json!({"model": "llama", "stream": true, "messages": []});
    let via = http
        .post(gw.url("/vllm/v1/chat/completions"))
        .bearer_auth("sk-master")
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(via.status(), 200);
    let body = via.text().await.unwrap();
    let events = sse_data(&body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(!body.contains("prompt_tokens"));
    assert!(mock.stats().await["last_request"]["json"]
        .get("stream_options")
        .is_none());

    // Without the client key: 401, and the backend is not called.
    let before = calls(&mock).await;
    let resp = http.get(gw.url("/vllm/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(calls(&mock).await, before);
}

#[tokio::test]
async fn bad_input_gets_openai_errors_and_the_server_stays_up() {
    let mock = Mock::start("e").await;
    let gw = Gateway::start(
        &format!(
            r#"
model_list:
  - {{model_name: m, litellm_params: {{model: openai/x, api_base: {}}}}}
general_settings: {{master_key: sk-master, max_request_size_mb: 1}}
"#,
            mock.base_url()
        ),
        &[],
    )
    .await;
    let http = client();
    let send = |body: &'static str, key: Option<&'static str>| {
        let mut r = http
            .post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    let expect = |resp: reqwest::Response, status: u16| async move {
        assert_eq!(resp.status(), status);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], status.to_string(), "{v}");
        v
    };
    let v = expect(
        send("{\"model\": \"m\", ", Some("sk-master"))
            .await
            .unwrap(),
        400,
    )
    .await;
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("malformed JSON"));
    let v = expect(
        send("{\"messages\": []}", Some("sk-master")).await.unwrap(),
        400,
    )
    .await;
    assert_eq!(v["error"]["param"], "model");
    expect(
        send("{\"model\": \"m\"}", Some("sk-master")).await.unwrap(),
        400,
    )
    .await;
    expect(
        send("{\"model\": 7, \"messages\": []}", Some("sk-master"))
            .await
            .unwrap(),
        400,
    )
    .await;
    let v = expect(
        send("{\"model\": \"nope\", \"messages\": []}", Some("sk-master"))
            .await
            .unwrap(),
        404,
    )
    .await;
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Invalid model name passed in model=nope"));
    expect(
        send("{\"model\": \"m\", \"messages\": []}", Some("sk-wrong"))
            .await
            .unwrap(),
        401,
    )
    .await;
    expect(
        send("{\"model\": \"m\", \"messages\": []}", None)
            .await
            .unwrap(),
        401,
    )
    .await;
    let big = format!(
        "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "x".repeat(2 * 1024 * 1024)
    );
    let resp = http
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("sk-master")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let resp = http.get(gw.url("/v1/nothing-here")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(calls(&mock).await, 0, "no bad request reached the upstream");
    // Still serving, and each key header works.
    for (h, v) in [
        ("x-api-key", "sk-master"),
        ("api-key", "sk-master"),
        ("x-litellm-api-key", "sk-master"),
    ] {
        let resp = http
            .post(gw.url("/v1/chat/completions"))
            .header(h, v)
            .json(&chat("m"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{h}");
    }
}

#[tokio::test]
async fn invalid_config_fails_with_file_key_path_and_expectation() {
    let (status, stderr) = Gateway::start_expect_failure(
        "model_list:\n  - model_name: m\n    litellm_params: {model: openai/x, rpm: many}\nrouter_settings: {routing_strategy: fastest}\n",
    )
    .await;
    assert!(!status.success());
    assert!(stderr.contains("config.yaml"), "{stderr}");
    assert!(
        stderr.contains("model_list[0].litellm_params.rpm"),
        "{stderr}"
    );
    assert!(stderr.contains("non-negative integer"), "{stderr}");
    assert!(
        stderr.contains("router_settings.routing_strategy"),
        "{stderr}"
    );
}

#[tokio::test]
async fn discovery_routes_headers_aliases_and_wildcards() {
    let mock = Mock::start("i").await;
    let base = mock.base_url();
    let gw = Gateway::start(
        &format!(
            r#"
model_list:
  - model_name: gpt-4o
    litellm_params: {{model: openai/gpt-4o, api_base: {base}, api_key: sk-hidden-from-info, rpm: 10}}
    model_info: {{id: dep-1, version: 3}}
  - model_name: "team-a/*"
    litellm_params: {{model: "openai/*", api_base: {base}}}
  - model_name: embed
    litellm_params: {{model: openai/embedder, api_base: {base}}}
    model_info: {{mode: embedding}}
router_settings:
  model_group_alias: {{"fast": "gpt-4o", "secret": {{"model": "gpt-4o", "hidden": true}}}}
"#
        ),
        &[],
    )
    .await;
    let http = client();
    let models: Value = http
        .get(gw.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["gpt-4o", "embed", "fast"]);
    let info = http
        .get(gw.url("/model/info"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!info.contains("sk-hidden-from-info"));
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["data"][0]["model_info"]["id"], "dep-1");
    assert_eq!(info["data"][0]["model_info"]["version"], 3);
    let groups: Value = http
        .get(gw.url("/model_group/info"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(groups["data"][0]["rpm"], 10);

    let resp = post(&gw, "/chat/completions", &chat("fast")).await;
    assert_eq!(resp.status(), 200);
    for h in [
        "x-litellm-call-id",
        "x-litellm-model-id",
        "x-litellm-model-api-base",
        "x-litellm-response-duration-ms",
        "x-litellm-overhead-duration-ms",
    ] {
        assert!(resp.headers().contains_key(h), "missing {h}");
    }
    assert_eq!(resp.headers()["x-litellm-model-id"], "dep-1");
    let resp = post(&gw, "/chat/completions", &chat("secret")).await;
    assert_eq!(resp.status(), 200);
    let v: Value = post(&gw, "/chat/completions", &chat("team-a/o3-mini"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["model"], "o3-mini");
    // Targeting one deployment by id.
    assert_eq!(
        post(&gw, "/chat/completions", &chat("dep-1"))
            .await
            .status(),
        200
    );
    // Azure-style path.
    let resp = post(
        &gw,
        "/openai/deployments/gpt-4o/chat/completions?api-version=2024-02-01",
        &json!({"messages": []}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let resp = post(
        &gw,
        "/embeddings",
        &json!({"model": "embed", "input": "hi"}),
    )
    .await;
    assert_eq!(resp.status(), 200);

    let health: Value = http
        .get(gw.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["healthy_count"], 2, "{health}");
    mock.set_fail(Some(503)).await;
    let health: Value = http
        .get(gw.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["unhealthy_count"], 2, "{health}");
    assert!(!health.to_string().contains("sk-hidden-from-info"));
    let ready = http.get(gw.url("/health/readiness")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let live = http.get(gw.url("/health/liveness")).send().await.unwrap();
    assert_eq!(live.text().await.unwrap(), "\"I'm alive!\"");
}

#[tokio::test]
async fn unix_socket_upstream_and_h2c_clients() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("engine.sock");
    let mock = Mock::start_unix("u", &sock).await;
    let gw = Gateway::start(
        &format!(
            "model_list:\n  - {{model_name: local, litellm_params: {{model: hosted_vllm/local, api_base: \"unix:{}\"}}}}\n",
            sock.display()
        ),
        &[],
    )
    .await;
    let resp = post(&gw, "/v1/chat/completions", &chat("local")).await;
    assert_eq!(resp.status(), 200, "{}", gw.log());
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["system_fingerprint"], "u");
    assert_eq!(
        mock.stats().await["last_request"]["path"],
        "/v1/chat/completions"
    );

    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = h2
        .post(gw.url("/v1/chat/completions"))
        .json(&chat("local"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let resp = h2
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "local", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    let body = resp.text().await.unwrap();
    assert_eq!(sse_data(&body).last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn custom_pass_through_endpoints() {
    let mock = Mock::start("p").await;
    let gw = Gateway::start(
        &format!(
            r#"
general_settings:
  master_key: sk-master
  pass_through_endpoints:
    - path: /custom/rerank
      target: {}/rerank
      headers: {{Authorization: "Bearer os.environ/SLUICE_TEST_PT_KEY", x-extra: "1"}}
    - path: /open
      target: {}
      include_subpath: true
      forward_headers: true
      auth: false
"#,
            mock.base_url(),
            mock.url("")
        ),
        &[("SLUICE_TEST_PT_KEY", "sk-pt")],
    )
    .await;
    let http = client();
    let resp = http
        .post(gw.url("/custom/rerank"))
        .bearer_auth("sk-master")
        .json(&json!({"model": "r", "query": "q", "documents": ["a", "b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let last = &mock.stats().await["last_request"];
    assert_eq!(last["path"], "/v1/rerank");
    assert_eq!(last["headers"]["authorization"], "Bearer sk-pt");
    assert_eq!(last["headers"]["x-extra"], "1");
    let resp = http
        .get(gw.url("/open/health"))
        .header("x-client", "c")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let last = &mock.stats().await["last_request"];
    assert_eq!(last["path"], "/health");
    assert_eq!(last["headers"]["x-client"], "c");
}

#[tokio::test]
async fn deploy_examples_pass_check_config_with_secrets_redacted() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let env = [
        ("OPENAI_API_KEY", "sk-openai-example-secret"),
        ("GROQ_API_KEY", "gsk-example-secret"),
        ("TOGETHERAI_API_KEY", "together-example-secret"),
        ("DEEPSEEK_API_KEY", "deepseek-example-secret"),
        ("COHERE_API_KEY", "cohere-example-secret"),
        ("LITELLM_MASTER_KEY", "sk-master-example-secret"),
        (
            "DATABASE_URL",
            "postgres://sluice:example-secret@db:5432/sluice",
        ),
        ("REDIS_HOST", "redis"),
    ];
    // local-models.yaml names the real models by their place after scripts/fetch-models.sh.
    sluice_tests::real_models();
    let mut seen = 0;
    for entry in std::fs::read_dir(root.join("deploy/examples")).unwrap() {
        let path = entry.unwrap().path();
        let out = sluice_tests::run_sluice(
            &["--check-config".as_ref(), path.as_os_str()],
            &env,
            root,
            Duration::from_secs(20),
        )
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {stdout}{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("config OK"));
        assert!(!stdout.contains("example-secret"), "{stdout}");
        seen += 1;
    }
    assert!(seen >= 4);
}

#[tokio::test]
async fn unimplemented_keys_get_one_startup_warning() {
    let mock = Mock::start("w").await;
    let gw = Gateway::start(
        &format!(
            r#"
model_list:
  - {{model_name: m, litellm_params: {{model: openai/x, api_base: {}, mock_response: hi}}}}
litellm_settings: {{cache: true, success_callback: ["langfuse"]}}
guardrails: []
"#,
            mock.base_url()
        ),
        &[],
    )
    .await;
    let log = gw.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("not implemented"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    for key in [
        "guardrails",
        "litellm_settings.cache",
        "litellm_settings.success_callback",
        "model_list[0].litellm_params.mock_response",
    ] {
        assert!(
            warnings[0].contains(key),
            "{key} missing from {}",
            warnings[0]
        );
    }
}

#[tokio::test]
async fn json_logs_are_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(&cfg, "model_list: 7\n").unwrap();
    let out = sluice_tests::run_sluice(
        &["--json-logs".as_ref(), "--config".as_ref(), cfg.as_os_str()],
        &[],
        dir.path(),
        Duration::from_secs(20),
    )
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON log line");
    let v: Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["level"], "ERROR");
    assert!(v["fields"]["message"]
        .as_str()
        .unwrap()
        .contains("bad.yaml"));
}

#[tokio::test]
async fn nothing_is_retried_after_bytes_reached_the_client() {
    let mock = Mock::start("m").await;
    let gw = Gateway::start(
        &one_model(
            &mock,
            "drop-mid-stream",
            "",
            "router_settings: {num_retries: 3}\n",
        ),
        &[],
    )
    .await;
    let resp = post(
        &gw,
        "/v1/chat/completions",
        &json!({"model": "m", "stream": true, "messages": []}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap_or_default();
    let events = sse_data(&body);
    assert!(events.iter().any(|e| e.contains("tok0")), "{body}");
    // The break is reported in-band, as an error event.
    assert!(events.last().unwrap().contains("\"error\""), "{body}");
    assert_eq!(
        calls(&mock).await,
        1,
        "a stream that already sent bytes is not retried"
    );
}

#[tokio::test]
async fn client_disconnect_cancels_a_pending_upstream_call() {
    let mock = Mock::start("c").await;
    let gw = Gateway::start(&one_model(&mock, "slow-3000", "", ""), &[]).await;
    let call = tokio::spawn({
        let url = gw.url("/v1/chat/completions");
        async move { client().post(url).json(&chat("m")).send().await }
    });
    mock.wait_stats(Duration::from_secs(5), |s| s["in_flight"] == 1)
        .await;
    call.abort();
    let stats = mock
        .wait_stats(Duration::from_secs(2), |s| s["cancelled_requests"] == 1)
        .await;
    assert_eq!(stats["in_flight"], 0, "{stats}");
}

#[tokio::test]
async fn stream_timeout_bounds_the_wait_for_each_chunk() {
    let mock = Mock::start("t").await;
    let gw = Gateway::start(
        &one_model(
            &mock,
            "slow-2000",
            ", timeout: 30, stream_timeout: 0.3",
            "router_settings: {num_retries: 0}\n",
        ),
        &[],
    )
    .await;
    let started = Instant::now();
    let resp = post(
        &gw,
        "/v1/chat/completions",
        &json!({"model": "m", "stream": true, "messages": []}),
    )
    .await;
    assert_eq!(resp.status(), 408);
    assert!(started.elapsed() < Duration::from_millis(1500));
}

#[tokio::test]
async fn tls_upstream_is_verified_against_trusted_roots() {
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let mock = Mock::start_tls("tls", &cert_path, &key_path).await;
    let config = format!(
        "model_list:\n  - {{model_name: m, litellm_params: {{model: openai/x, api_base: \"https://127.0.0.1:{}/v1\"}}}}\nrouter_settings: {{num_retries: 0}}\n",
        mock.port
    );
    // Trusted through SSL_CERT_FILE: the call succeeds over TLS.
    let gw = Gateway::start(&config, &[("SSL_CERT_FILE", cert_path.to_str().unwrap())]).await;
    let resp = post(&gw, "/v1/chat/completions", &chat("m")).await;
    assert_eq!(resp.status(), 200, "{}", gw.log());
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["system_fingerprint"], "tls");
    drop(gw);
    // Not trusted: the certificate is refused and nothing is served from it.
    let other = tempfile::tempdir().unwrap();
    let empty = other.path().join("none.pem");
    std::fs::write(&empty, "").unwrap();
    let gw = Gateway::start(
        &config,
        &[
            ("SSL_CERT_FILE", empty.to_str().unwrap()),
            ("SSL_CERT_DIR", other.path().to_str().unwrap()),
        ],
    )
    .await;
    let resp = post(&gw, "/v1/chat/completions", &chat("m")).await;
    assert_eq!(resp.status(), 502, "{}", gw.log());
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish() {
    let mock = Mock::start("g").await;
    let mut gw = Gateway::start(&one_model(&mock, "slow-1000", "", ""), &[]).await;
    let call = tokio::spawn({
        let url = gw.url("/v1/chat/completions");
        async move {
            client()
                .post(url)
                .json(&chat("m"))
                .send()
                .await
                .map(|r| r.status())
        }
    });
    mock.wait_stats(Duration::from_secs(5), |s| s["in_flight"] == 1)
        .await;
    let status = gw
        .terminate(Duration::from_secs(15))
        .await
        .expect("sluice exits after SIGTERM");
    assert_eq!(
        call.await.unwrap().unwrap(),
        200,
        "the in-flight request completed"
    );
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn background_health_checks_serve_cached_results() {
    let mock = Mock::start("h").await;
    let gw = Gateway::start(
        &one_model(
            &mock,
            "x",
            "",
            "general_settings: {background_health_checks: true, health_check_interval: 30}\n",
        ),
        &[],
    )
    .await;
    mock.wait_stats(Duration::from_secs(5), |s| s["total_calls"] == 1)
        .await;
    for _ in 0..3 {
        let v: Value = client()
            .get(gw.url("/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["healthy_count"], 1, "{v}");
    }
    assert_eq!(
        calls(&mock).await,
        1,
        "/health answered from the background round"
    );
}

#[tokio::test]
async fn expect_100_continue_gets_the_go_ahead() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = Mock::start("x").await;
    let gw = Gateway::start(&one_model(&mock, "x", "", ""), &[]).await;
    let body = serde_json::to_vec(&chat("m")).unwrap();
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_millis(500), tcp.read(&mut buf))
        .await
        .expect("100 Continue arrives before the body is sent")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    tcp.write_all(&body).await.unwrap();
    let mut rest = Vec::new();
    let mut chunk = vec![0u8; 4096];
    while !String::from_utf8_lossy(&rest).contains("\"usage\"") {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed early");
        rest.extend_from_slice(&chunk[..n]);
    }
    assert!(String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn vllm_passthrough_falls_back_to_hosted_vllm_api_base() {
    let mock = Mock::start("env").await;
    let other = Mock::start("other").await;
    // Two hosted_vllm deployments: no single default, so the environment variable decides.
    let gw = Gateway::start(
        &format!(
            r#"
model_list:
  - {{model_name: a, litellm_params: {{model: hosted_vllm/a, api_base: {0}}}}}
  - {{model_name: b, litellm_params: {{model: hosted_vllm/b, api_base: {0}}}}}
"#,
            other.base_url()
        ),
        &[
            ("HOSTED_VLLM_API_BASE", &mock.base_url()),
            ("HOSTED_VLLM_API_KEY", "sk-env-vllm"),
        ],
    )
    .await;
    let resp = client()
        .post(gw.url("/vllm/tokenize"))
        .json(&json!({"prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let last = &mock.stats().await["last_request"];
    assert_eq!(last["path"], "/tokenize");
    assert_eq!(last["headers"]["authorization"], "Bearer sk-env-vllm");
    assert_eq!(calls(&other).await, 0);
}
