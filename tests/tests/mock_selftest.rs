//! Tests of the mock provider itself, so gateway tests can trust what it reports.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sluice_tests::{client, sse_data, unix_request, Mock};

fn hex_sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn chat_body(model: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

#[tokio::test]
async fn default_chat_answers_with_headers_and_sha() {
    let mock = Mock::start("alpha").await;
    let body = chat_body("gpt-test", json!({})).to_string();
    let resp = client()
        .post(format!("{}/chat/completions", mock.base_url()))
        .header("authorization", "Bearer sk-upstream")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["x-mock-name"], "alpha");
    assert_eq!(h["x-mock-body-len"], body.len().to_string().as_str());
    assert_eq!(
        h["x-mock-body-sha256"],
        hex_sha256(body.as_bytes()).as_str()
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-alpha-"));
    assert_eq!(v["model"], "gpt-test");
    assert_eq!(v["system_fingerprint"], "alpha");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        format!("alpha received {} bytes", body.len())
    );
    let p = (body.len() / 4) as u64;
    assert_eq!(v["usage"]["prompt_tokens"], p);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], p + 5);

    // Same route without /v1; the request is recorded with lowercased headers.
    let resp = client()
        .post(mock.url("/chat/completions"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let stats = mock.stats().await;
    assert_eq!(stats["total_calls"], 2);
    assert_eq!(stats["calls_by_model"]["gpt-test"], 2);
    let last = &stats["last_request"];
    assert_eq!(last["path"], "/chat/completions");
    assert_eq!(last["method"], "POST");
    assert_eq!(last["body_len"], body.len());
    assert_eq!(last["body_sha256"], hex_sha256(body.as_bytes()));
    assert_eq!(last["json"]["model"], "gpt-test");
    assert_eq!(
        mock.requests().await[0]["headers"]["authorization"],
        "Bearer sk-upstream"
    );
}

#[tokio::test]
async fn other_endpoints_have_openai_and_vllm_shapes() {
    let mock = Mock::start("beta").await;
    let http = client();
    let post = |path: &str, body: Value| http.post(mock.url(path)).json(&body).send();

    let v: Value = post("/v1/completions", json!({"model": "m", "prompt": "hi"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("beta received"));

    let v: Value = post("/embeddings", json!({"model": "e", "input": ["a", "b"]}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["object"], "embedding");

    for path in ["/score", "/v1/score"] {
        let v: Value = post(
            path,
            json!({"model": "s", "text_1": "q", "text_2": ["a", "b", "c"]}),
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"].as_array().unwrap().len(), 3);
        assert_eq!(v["data"][0]["object"], "score");
    }

    let v: Value = post("/tokenize", json!({"model": "t", "prompt": "hello"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v["count"].as_u64().unwrap() >= 1);

    let metrics = http.get(mock.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics
        .text()
        .await
        .unwrap()
        .contains("vllm:num_requests_running 0"));

    let health = http.get(mock.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(health.bytes().await.unwrap().is_empty());

    let models: Value = http
        .get(mock.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");

    let missing = http.get(mock.url("/v1/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let v: Value = missing.json().await.unwrap();
    assert!(v["error"]["message"].is_string());
}

#[tokio::test]
async fn streaming_with_include_usage() {
    let mock = Mock::start("gamma").await;
    let body = chat_body(
        "m-stream-3",
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let resp = client()
        .post(format!("{}/chat/completions", mock.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    let data = sse_data(&text);
    // role + 3 content + usage + [DONE]
    assert_eq!(data.len(), 6, "{text}");
    let chunks: Vec<Value> = data[..5]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    for c in &chunks[1..3] {
        assert!(c["choices"][0]["finish_reason"].is_null());
    }
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
    let content: String = chunks[1..4]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(content, "tok0 tok1 tok2 ");
    assert_eq!(chunks[4]["choices"], json!([]));
    assert_eq!(chunks[4]["usage"]["completion_tokens"], 3);
    assert_eq!(data[5], "[DONE]");

    // Settled before the last byte was sent: no waiting needed.
    let stats = mock.stats().await;
    assert_eq!(stats["completed_streams"], 1);
    assert_eq!(stats["open_streams"], 0);
    assert_eq!(stats["cancelled_streams"], 0);
    assert_eq!(stats["in_flight"], 0);

    // Without include_usage: no usage chunk.
    let text = client()
        .post(mock.url("/chat/completions"))
        .json(&chat_body("m", json!({"stream": true})))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data = sse_data(&text);
    assert_eq!(data.len(), 1 + 5 + 1, "{text}");
    assert!(!data.iter().any(|d| d.contains("\"usage\"")));
}

#[tokio::test]
async fn stream_chunks_are_flushed_one_by_one() {
    let mock = Mock::start("delta").await;
    let started = Instant::now();
    let resp = client()
        .post(mock.url("/v1/chat/completions"))
        .json(&chat_body("m-stream-4-delay-150", json!({"stream": true})))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut arrivals = Vec::new();
    let mut all = Vec::new();
    while let Some(chunk) = body.next().await {
        all.extend_from_slice(&chunk.unwrap());
        arrivals.push(started.elapsed());
    }
    let text = String::from_utf8(all).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    // Four delays of 150 ms: the body takes ~600 ms, and the role chunk arrives long before.
    let last = *arrivals.last().unwrap();
    assert!(last >= Duration::from_millis(550), "{arrivals:?}");
    assert!(arrivals[0] < Duration::from_millis(300), "{arrivals:?}");
    assert!(arrivals.len() >= 4, "chunks were coalesced: {arrivals:?}");
}

#[tokio::test]
async fn fail_switch_and_scripted_errors() {
    let mock = Mock::start("eps").await;
    let http = client();
    let chat = |model: &str| {
        http.post(mock.url("/v1/chat/completions"))
            .json(&chat_body(model, json!({})))
            .send()
    };

    mock.set_fail(Some(503)).await;
    for _ in 0..2 {
        let r = chat("m").await.unwrap();
        assert_eq!(r.status(), 503);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["message"], "mock 503");
        assert!(v["error"]["param"].is_null());
    }
    mock.set_fail(None).await;
    assert_eq!(chat("m").await.unwrap().status(), 200);

    mock.fail_next(500, 1).await;
    assert_eq!(chat("m").await.unwrap().status(), 500);
    assert_eq!(chat("m").await.unwrap().status(), 200);

    let r = chat("m-error-429").await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    for (model, status) in [("error-401", 401), ("x-error-404", 404), ("error-500", 500)] {
        assert_eq!(chat(model).await.unwrap().status(), status, "{model}");
    }

    let r = chat("m-context-window").await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(v["error"]["param"], "messages");

    let r = chat("m-content-policy").await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "content_filter");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("content management policy"));

    let r = chat("m-bad-json").await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).is_err());

    let stats = mock.stats().await;
    assert_eq!(stats["total_calls"], 12);
    assert_eq!(stats["calls_by_model"]["m"], 5);
    assert!(stats["fail"].is_null());
}

#[tokio::test]
async fn stats_count_and_reset() {
    let mock = Mock::start("zeta").await;
    let http = client();
    for model in ["a", "a", "b"] {
        let r = http
            .post(mock.url("/v1/embeddings"))
            .json(&json!({"model": model, "input": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let stats = mock.stats().await;
    assert_eq!(stats["name"], "zeta");
    assert_eq!(stats["total_calls"], 3);
    assert_eq!(stats["calls_by_model"], json!({"a": 2, "b": 1}));
    assert_eq!(stats["last_request"]["json"]["model"], "b");

    mock.reset().await;
    let stats = mock.stats().await;
    assert_eq!(stats["total_calls"], 0);
    assert_eq!(stats["calls_by_model"], json!({}));
    assert!(stats["last_request"].is_null());

    // A slow request is in flight while it sleeps.
    let slow = tokio::spawn({
        let url = mock.url("/v1/chat/completions");
        async move {
            client()
                .post(url)
                .json(&chat_body("m-slow-400", json!({})))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    let s = mock
        .wait_stats(Duration::from_secs(2), |s| s["in_flight"] == 1)
        .await;
    assert_eq!(s["in_flight"], 1, "{s}");
    assert_eq!(slow.await.unwrap(), 200);
    assert_eq!(mock.stats().await["in_flight"], 0);
}

#[tokio::test]
async fn client_hangup_counts_as_cancelled_stream() {
    let mock = Mock::start("eta").await;
    let resp = client()
        .post(mock.url("/v1/chat/completions"))
        .json(&chat_body("m-stream-50-delay-200", json!({"stream": true})))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("tok0") {
        seen.push_str(std::str::from_utf8(&body.next().await.unwrap().unwrap()).unwrap());
    }
    let s = mock.stats().await;
    assert_eq!(s["open_streams"], 1, "{s}");
    assert_eq!(s["in_flight"], 1, "{s}");
    drop(body);

    let s = mock
        .wait_stats(Duration::from_secs(5), |s| s["cancelled_streams"] == 1)
        .await;
    assert_eq!(s["cancelled_streams"], 1, "{s}");
    assert_eq!(s["completed_streams"], 0, "{s}");
    assert_eq!(s["open_streams"], 0, "{s}");
    assert_eq!(s["in_flight"], 0, "{s}");
}

#[tokio::test]
async fn drop_mid_stream_aborts_the_connection() {
    let mock = Mock::start("theta").await;
    let resp = client()
        .post(mock.url("/v1/chat/completions"))
        .json(&chat_body("m-drop-mid-stream", json!({"stream": true})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    let mut error = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(b) => seen.push_str(std::str::from_utf8(&b).unwrap()),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    assert!(error.is_some(), "stream ended cleanly: {seen}");
    assert!(seen.contains("tok1") && !seen.contains("tok2"), "{seen}");
    assert!(!seen.contains("[DONE]"));
    let s = mock
        .wait_stats(Duration::from_secs(2), |s| s["aborted_streams"] == 1)
        .await;
    assert_eq!(s["aborted_streams"], 1, "{s}");
    assert_eq!(s["cancelled_streams"], 0, "{s}");
    assert_eq!(s["open_streams"], 0, "{s}");
}

#[tokio::test]
async fn unix_socket_mock() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("mock.sock");
    let mock = Mock::start_unix("iota", &sock).await;
    let body = chat_body("m", json!({})).to_string();
    let (status, resp) = unix_request(&sock, "POST", "/v1/chat/completions", Some(body.as_bytes()))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(v["system_fingerprint"], "iota");

    // Chunked (streamed) bodies are de-chunked by the helper.
    let body = chat_body("m-stream-2", json!({"stream": true})).to_string();
    let (status, resp) = unix_request(&sock, "POST", "/chat/completions", Some(body.as_bytes()))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(sse_data(std::str::from_utf8(&resp).unwrap()).len(), 4);

    mock.set_fail(Some(429)).await;
    let stats = mock.stats().await;
    assert_eq!(stats["total_calls"], 2);
    assert_eq!(stats["fail"]["status"], 429);
}

#[tokio::test]
async fn client_hangup_during_slow_counts_as_cancelled_request() {
    let mock = Mock::start("kappa").await;
    let req = client()
        .post(mock.url("/v1/chat/completions"))
        .json(&chat_body("m-slow-2000", json!({})))
        .send();
    // Give up long before the mock answers: the client drops the connection.
    assert!(tokio::time::timeout(Duration::from_millis(300), req)
        .await
        .is_err());
    let s = mock
        .wait_stats(Duration::from_secs(1), |s| s["cancelled_requests"] == 1)
        .await;
    assert_eq!(s["cancelled_requests"], 1, "{s}");
    assert_eq!(s["in_flight"], 0, "{s}");
}

#[tokio::test]
async fn large_bodies_are_accepted_and_hashed() {
    let mock = Mock::start("lambda").await;
    let prompt = "x".repeat(8 << 20);
    let body = chat_body(
        "m",
        json!({"messages": [{"role": "user", "content": prompt}]}),
    )
    .to_string();
    let resp = client()
        .post(mock.url("/v1/chat/completions"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-mock-body-len"],
        body.len().to_string().as_str()
    );
    assert_eq!(
        resp.headers()["x-mock-body-sha256"],
        hex_sha256(body.as_bytes()).as_str()
    );
}
