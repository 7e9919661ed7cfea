//! Client (OpenAI format) → Sluice → mock speaking Anthropic's Messages API.

use serde_json::{json, Value};
use sluice_tests::{client, sse_data, Gateway, Mock};

async fn gateway(mock: &Mock, extra: &str) -> Gateway {
    Gateway::start(
        &format!(
            r#"
model_list:
  - model_name: claude
    litellm_params: {{model: anthropic/claude-3-5-sonnet, api_base: "{}", api_key: sk-ant-secret}}
  - model_name: claude-tools
    litellm_params: {{model: anthropic/claude-tool-user, api_base: "{}", api_key: sk-ant-secret}}
{extra}"#,
            mock.url(""),
            mock.base_url()
        ),
        &[],
    )
    .await
}

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}])
}

#[tokio::test]
async fn chat_is_translated_both_ways() {
    let mock = Mock::start("ant").await;
    let gw = gateway(&mock, "").await;
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "claude", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"}
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", gw.log());
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("ant received"));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let last = &mock.stats().await["last_request"];
    assert_eq!(last["path"], "/v1/messages");
    assert_eq!(last["headers"]["x-api-key"], "sk-ant-secret");
    assert_eq!(last["headers"]["anthropic-version"], "2023-06-01");
    assert!(last["headers"].get("authorization").is_none());
    assert_eq!(last["json"]["system"], "Be brief.");
    assert_eq!(last["json"]["max_tokens"], 4096);
    assert_eq!(last["json"]["model"], "claude-3-5-sonnet");
}

#[tokio::test]
async fn tool_calls_round_trip_and_stream() {
    let mock = Mock::start("ant").await;
    let gw = gateway(&mock, "").await;
    let http = client();
    let v: Value = http
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "claude-tools", "tools": weather_tools(), "messages": [{"role": "user", "content": "weather?"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args["location"], "Paris");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        mock.stats().await["last_request"]["json"]["tools"][0]["input_schema"]["type"],
        "object"
    );

    let body = http
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "claude-tools", "stream": true, "stream_options": {"include_usage": true},
                      "tools": weather_tools(), "messages": [{"role": "user", "content": "weather?"}]}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = sse_data(&body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "tok0 tok1 tok2 tok3 tok4 ");
    let args: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap()["location"],
        "Paris"
    );
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "tool_calls"));
    let usage = chunks
        .iter()
        .find(|c| c["usage"].is_object())
        .expect("usage chunk");
    assert_eq!(usage["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn unsupported_params_are_400_unless_dropped() {
    let mock = Mock::start("ant").await;
    let gw = gateway(&mock, "").await;
    let req = json!({"model": "claude", "presence_penalty": 1, "messages": [{"role": "user", "content": "x"}]});
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("anthropic does not support parameters: ['presence_penalty']"));
    assert_eq!(mock.stats().await["total_calls"], 0);

    let gw = gateway(&mock, "litellm_settings: {drop_params: true}\n").await;
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(mock.stats().await["last_request"]["json"]
        .get("presence_penalty")
        .is_none());
}
