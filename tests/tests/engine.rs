//! The engine on the two real models of MODELS.md (fetched from PyPI, checksums verified):
//! SmolLM2's greedy output against an independent numpy reference, batching that changes
//! nothing, MiniLM embeddings that rank sentences sensibly, and the gateway supervising an
//! engine it started.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_tests::{client, real_models, Engine, Gateway};

const SMOLLM_ARGS: &[&str] = &["--max-model-len", "2048", "--max-num-seqs", "16"];

async fn post(url: &str, body: Value) -> (u16, Value) {
    let resp = client()
        .post(url)
        .json(&body)
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
    (status, json)
}

fn greedy_chat(content: &str, max_tokens: usize) -> Value {
    json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": true,
    })
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Runs `tests/reference/fetch_and_reference.sh`: the numpy reference's greedy outputs for the
/// fixed prompts (computed once, cached next to the models).
fn reference_outputs() -> Vec<Value> {
    let root = sluice_tests::repo_root();
    let out = std::process::Command::new("bash")
        .arg(root.join("tests/reference/fetch_and_reference.sh"))
        .arg(root.join("models"))
        .output()
        .expect("running fetch_and_reference.sh");
    assert!(
        out.status.success(),
        "fetch_and_reference.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let path = stdout.lines().nth(1).expect("the reference JSON path");
    serde_json::from_str(&std::fs::read_to_string(path.trim()).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_greedy_chat_equals_the_independent_numpy_reference() {
    let models = real_models();
    let references = reference_outputs();
    assert!(!references.is_empty());
    let mut args = SMOLLM_ARGS.to_vec();
    args.extend(["--served-model-name", "smollm2"]);
    let engine = Engine::start(&models.smollm2_gguf, &args).await;
    for reference in &references {
        let (status, body) = post(
            &engine.url("/v1/chat/completions"),
            json!({
                "model": "smollm2",
                "messages": reference["messages"],
                "max_tokens": reference["max_tokens"],
                "temperature": 0,
                "return_token_ids": true,
            }),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["prompt_token_ids"], reference["prompt_ids"],
            "chat template + tokenizer differ from the reference"
        );
        // vLLM lists the EOS token among the output ids; the reference stops before it.
        let mut got: Vec<Value> = body["choices"][0]["token_ids"].as_array().unwrap().clone();
        if body["choices"][0]["finish_reason"] == "stop" && got.last() == Some(&json!(2)) {
            got.pop();
        }
        assert_eq!(
            body["choices"][0]["finish_reason"],
            reference["finish_reason"]
        );
        assert_eq!(
            Value::Array(got), reference["output_ids"],
            "greedy tokens differ from the reference for {}: engine text {:?}, reference text {:?}, \
             reference top-2 margins {}",
            reference["messages"], body["choices"][0]["message"]["content"], reference["text"],
            reference["top2_margins"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minilm_embeddings_rank_related_sentences_closer() {
    let models = real_models();
    let engine = Engine::start(&models.minilm_dir, &["--served-model-name", "minilm"]).await;
    let sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
    ];
    let (status, body) = post(
        &engine.url("/v1/embeddings"),
        json!({"model": "minilm", "input": sentences}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let vectors: Vec<Vec<f64>> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(vectors.len(), 3);
    assert_eq!(vectors[0].len(), 384);
    let norm: f64 = vectors[0].iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(
        (norm - 1.0).abs() < 1e-4,
        "embeddings are L2-normalised, got {norm}"
    );
    let related = cosine(&vectors[0], &vectors[1]);
    let unrelated = cosine(&vectors[0], &vectors[2]);
    assert!(
        related > unrelated + 0.3,
        "bread {related:.3} must beat baby {unrelated:.3}"
    );

    // /v1/score: cosine of the same embeddings, in input order.
    let (status, body) = post(
        &engine.url("/v1/score"),
        json!({"model": "minilm", "text_1": sentences[0], "text_2": [sentences[1], sentences[2]]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let scores: Vec<f64> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["score"].as_f64().unwrap())
        .collect();
    assert!((scores[0] - related).abs() < 1e-4 && (scores[1] - unrelated).abs() < 1e-4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_greedy_requests_equal_the_same_requests_one_by_one() {
    let models = real_models();
    let mut args = SMOLLM_ARGS.to_vec();
    args.extend(["--served-model-name", "smollm2"]);
    let engine = Engine::start(&models.smollm2_gguf, &args).await;
    let topics = [
        "the sea",
        "a cat",
        "rain",
        "Paris",
        "numbers",
        "the moon",
        "bread",
        "trains",
        "music",
        "winter",
        "a robot",
        "coffee",
        "mountains",
        "the sun",
        "books",
        "a garden",
    ];
    let requests: Vec<Value> = topics
        .iter()
        .map(|t| greedy_chat(&format!("Write one sentence about {t}."), 20))
        .collect();
    let url = engine.url("/v1/chat/completions");
    let mut one_by_one = Vec::new();
    for r in &requests {
        let (status, body) = post(&url, r.clone()).await;
        assert_eq!(status, 200, "{body}");
        one_by_one.push(body);
    }
    let concurrent =
        futures_util::future::join_all(requests.iter().map(|r| post(&url, r.clone()))).await;
    for (i, ((status, body), alone)) in concurrent.iter().zip(&one_by_one).enumerate() {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(
            body["choices"][0]["message"]["content"], alone["choices"][0]["message"]["content"],
            "request {i}: batched output differs from the request alone"
        );
        assert_eq!(
            body["choices"][0]["token_ids"],
            alone["choices"][0]["token_ids"]
        );
        assert_eq!(body["usage"], alone["usage"]);
    }
    // The batch really ran together: the engine's iteration histogram saw steps with more
    // than one token.
    let metrics = client()
        .get(engine.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("vllm:num_requests_running"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_starts_supervises_and_restarts_a_colocated_engine() {
    let models = real_models();
    let sock_dir = tempfile::tempdir().unwrap();
    let socket = sock_dir.path().join("smollm2.sock");
    let config = format!(
        "local_models:\n  - model_name: smollm2\n    model: {}\n    socket: {}\n    args: [\"--max-model-len\", \"1024\", \"--threads\", \"2\"]\n",
        models.smollm2_gguf.display(),
        socket.display()
    );
    let gateway = Gateway::start(&config, &[]).await;
    let url = gateway.url("/v1/chat/completions");
    let (status, body) = post(&url, greedy_chat("Say hello.", 8)).await;
    assert_eq!(status, 200, "{body}\n{}", gateway.log());
    assert!(!body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());

    // Kill the engine the gateway started (found by its unique socket path).
    let pids = std::process::Command::new("pgrep")
        .args(["-f", &socket.display().to_string()])
        .output()
        .unwrap();
    let pids = String::from_utf8_lossy(&pids.stdout).to_string();
    let pid = pids.split_whitespace().next().expect("engine process");
    assert!(std::process::Command::new("kill")
        .args(["-9", pid])
        .status()
        .unwrap()
        .success());

    // The supervisor restarts it; a later request succeeds.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = post(&url, greedy_chat("Say hello.", 8)).await;
        if status == 200 {
            assert!(gateway.log().contains("engine exited"), "{}", gateway.log());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no success after the restart: {status} {body}\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn metric(engine: &Engine, name: &str) -> f64 {
    let text = client()
        .get(engine.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preemption_and_prefix_caching_leave_outputs_unchanged() {
    let models = real_models();
    // 40 blocks of 16 tokens: 16 concurrent sequences of ~70 tokens cannot all fit, so the
    // scheduler must preempt and recompute some of them. A block holds K and V for 30 layers,
    // 3 KV heads and 64 dims per token, in f16.
    let per_block = 2 * 30 * 3 * 64 * 2 * 16;
    let kv_bytes = (40 * per_block).to_string();
    let args = [
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "16",
        "--served-model-name",
        "smollm2",
        "--kv-cache-bytes",
        &kv_bytes,
    ];
    let tight = Engine::start(&models.smollm2_gguf, &args).await;
    let requests: Vec<Value> = (0..16)
        .map(|i| {
            greedy_chat(
                &format!("List {} animals that live in the sea, one per line.", i + 2),
                24,
            )
        })
        .collect();
    let url = tight.url("/v1/chat/completions");
    let mut alone = Vec::new();
    for r in &requests {
        let (status, body) = post(&url, r.clone()).await;
        assert_eq!(status, 200, "{body}");
        alone.push(body["choices"][0]["token_ids"].clone());
    }
    let batched =
        futures_util::future::join_all(requests.iter().map(|r| post(&url, r.clone()))).await;
    for (i, ((status, body), alone)) in batched.iter().zip(&alone).enumerate() {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(
            &body["choices"][0]["token_ids"], alone,
            "request {i} changed under preemption"
        );
    }
    assert!(
        metric(&tight, "vllm:num_preemptions_total").await > 0.0,
        "the cache was meant to be too small for the batch"
    );
    // Every request was sent twice with the same prompt: the second time its full blocks came
    // from the prefix cache.
    let hits = metric(&tight, "vllm:prefix_cache_hits_total").await;
    assert!(hits >= 16.0 * 16.0, "prefix cache hits {hits}");
    assert_eq!(metric(&tight, "vllm:num_requests_running").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_surface_on_the_real_model() {
    let models = real_models();
    let mut args = SMOLLM_ARGS.to_vec();
    args.extend(["--served-model-name", "smollm2"]);
    let engine = Engine::start(&models.smollm2_gguf, &args).await;
    let http = client();

    let models_list: Value = http
        .get(engine.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models_list["data"][0]["id"], "smollm2");
    assert_eq!(models_list["data"][0]["max_model_len"], 2048);
    for path in ["/health", "/ping", "/version", "/load"] {
        let r = http.get(engine.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }

    // tokenize / detokenize round trip; the chat template's special tokens are single ids.
    let (status, tok) = post(
        &engine.url("/tokenize"),
        json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(status, 200, "{tok}");
    assert_eq!(tok["tokens"][0], 1, "<|im_start|> is token 1: {tok}");
    let (_, text) = post(
        &engine.url("/detokenize"),
        json!({"model": "smollm2", "tokens": tok["tokens"]}),
    )
    .await;
    assert!(
        text["prompt"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>user\nHi<|im_end|>"),
        "{text}"
    );

    // Stop strings end the text before them; n gives n choices; a seed reproduces samples.
    let (status, body) = post(
        &engine.url("/v1/completions"),
        json!({"model": "smollm2", "prompt": "1, 2, 3, 4,", "max_tokens": 20, "temperature": 0,
               "stop": [" 7"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "stop", "{body}");
    assert_eq!(choice["stop_reason"], " 7");
    assert_eq!(choice["text"], " 5, 6,", "{body}");
    let sampled = json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 12,
                         "temperature": 1.0, "seed": 42, "n": 3, "logprobs": 2});
    let (_, first) = post(&engine.url("/v1/completions"), sampled.clone()).await;
    let (_, again) = post(&engine.url("/v1/completions"), sampled).await;
    assert_eq!(first["choices"].as_array().unwrap().len(), 3);
    for i in 0..3 {
        assert_eq!(
            first["choices"][i]["text"], again["choices"][i]["text"],
            "seeded choice {i}"
        );
        assert_eq!(
            first["choices"][i]["logprobs"]["top_logprobs"][0]
                .as_object()
                .unwrap()
                .len(),
            2
        );
    }

    // A prompt past the context is a 400 in the OpenAI error shape.
    let long = "word ".repeat(3000);
    let (status, body) = post(
        &engine.url("/v1/completions"),
        json!({"model": "smollm2", "prompt": long, "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length is 2048"),
        "{body}"
    );
    let (status, body) = post(
        &engine.url("/v1/chat/completions"),
        json!({"model": "other", "messages": []}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_aborts_its_request() {
    let models = real_models();
    let mut args = SMOLLM_ARGS.to_vec();
    args.extend(["--served-model-name", "smollm2"]);
    let engine = Engine::start(&models.smollm2_gguf, &args).await;
    let mut resp = client()
        .post(engine.url("/v1/completions"))
        .json(
            &json!({"model": "smollm2", "prompt": "Tell me a long story.", "max_tokens": 1500,
                      "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().expect("a first chunk");
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    drop(resp);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(
        &engine,
        "vllm:request_success_total{engine=\"0\",finished_reason=\"abort\"",
    )
    .await
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the engine kept generating for a gone client"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&engine, "vllm:num_requests_running").await, 0.0);
    let generated = metric(&engine, "vllm:generation_tokens_total").await;
    assert!(
        generated < 1500.0,
        "generated {generated} tokens for an aborted request"
    );
}
