//! Anthropic-format ingress (`/v1/messages`) and the official Python SDKs as clients.

use std::process::Command;

use serde_json::{json, Value};
use sluice_tests::{client, Gateway, Mock};

async fn gateway(mock: &Mock) -> Gateway {
    Gateway::start(
        &format!(
            r#"
model_list:
  - model_name: gpt
    litellm_params: {{model: openai/gpt-mock, api_base: "{base}"}}
  - model_name: claude
    litellm_params: {{model: anthropic/claude-native, api_base: "{root}", api_key: sk-ant-upstream}}
general_settings: {{master_key: sk-master}}
"#,
            base = mock.base_url(),
            root = mock.url("")
        ),
        &[],
    )
    .await
}

fn messages_body(model: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 100, "stream": stream, "system": "Be brief.",
           "messages": [{"role": "user", "content": "hello"}]})
}

async fn post_messages(gw: &Gateway, body: &Value) -> reqwest::Response {
    client()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", "sk-master")
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn anthropic_ingress_to_an_openai_backend() {
    let mock = Mock::start("oa").await;
    let gw = gateway(&mock).await;
    let resp = post_messages(&gw, &messages_body("gpt", false)).await;
    assert_eq!(resp.status(), 200, "{}", gw.log());
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "message");
    assert!(v["content"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("oa received"));
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"]["output_tokens"], 5);
    let last = &mock.stats().await["last_request"];
    assert_eq!(last["path"], "/v1/chat/completions");
    assert_eq!(
        last["json"]["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );

    let body = post_messages(&gw, &messages_body("gpt", true))
        .await
        .text()
        .await
        .unwrap();
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"message_start"));
    assert_eq!(events.last(), Some(&"message_stop"));
    assert!(body.contains("\"text_delta\""));
    assert!(body.contains("\"output_tokens\":5"), "{body}");

    // Errors come back in Anthropic's shape.
    let resp = post_messages(&gw, &messages_body("nope", false)).await;
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "not_found_error");
}

#[tokio::test]
async fn anthropic_ingress_to_an_anthropic_backend_is_native() {
    let mock = Mock::start("an").await;
    let gw = gateway(&mock).await;
    let mut body = messages_body("claude", false);
    body["metadata"] = json!({"user_id": "u-1"});
    body["messages"][0]["content"] =
        json!([{"type": "text", "text": "hello", "cache_control": {"type": "ephemeral"}}]);
    let resp = client()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", "sk-master")
        .header("anthropic-beta", "prompt-caching-2024-07-31")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", gw.log());
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["id"].as_str().unwrap().starts_with("msg_an_"),
        "the upstream's own message: {v}"
    );
    let last = &mock.stats().await["last_request"];
    assert_eq!(last["path"], "/v1/messages");
    assert_eq!(
        last["headers"]["x-api-key"], "sk-ant-upstream",
        "the client key is replaced"
    );
    assert_eq!(
        last["headers"]["anthropic-beta"],
        "prompt-caching-2024-07-31"
    );
    let mut expected = body.clone();
    expected["model"] = json!("claude-native");
    assert_eq!(last["json"], expected, "the body is passed as sent");

    let body = post_messages(&gw, &messages_body("claude", true))
        .await
        .text()
        .await
        .unwrap();
    assert!(body.contains("event: message_start") && body.contains("event: message_stop"));
    assert!(!body.contains("chat.completion"), "{body}");

    let count: Value = client()
        .post(gw.url("/v1/messages/count_tokens"))
        .header("x-api-key", "sk-master")
        .json(&json!({"model": "claude", "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(count["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        mock.stats().await["last_request"]["path"],
        "/v1/messages/count_tokens"
    );
}

/// Runs a Python SDK script; the SDKs are installed by scripts/test.sh.
fn run_sdk(script: &str, args: &[&str]) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("sdk")
        .join(script);
    let out = Command::new("python3")
        .arg(&path)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn official_anthropic_sdk_works_unchanged() {
    let mock = Mock::start("sdk").await;
    let gw = gateway(&mock).await;
    let base = gw.url("");
    tokio::task::spawn_blocking(move || {
        run_sdk("anthropic_client.py", &[&base, "sk-master", "gpt"])
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn official_openai_sdk_works_unchanged() {
    let mock = Mock::start("sdk").await;
    let gw = gateway(&mock).await;
    let base = gw.url("/v1");
    tokio::task::spawn_blocking(move || run_sdk("openai_client.py", &[&base, "sk-master", "gpt"]))
        .await
        .unwrap();
}
