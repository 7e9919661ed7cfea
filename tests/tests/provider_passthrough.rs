//! `/{provider}/*` pass-through routes: the provider's native API with the configured
//! credentials instead of the client's key, streams included, usage counted.

use serde_json::{json, Value};
use sluice_tests::{client, Gateway, Mock};

async fn gateway(mock: &Mock) -> Gateway {
    let root = mock.url("");
    let base = mock.base_url();
    Gateway::start(
        &format!(
            r#"
model_list:
  - {{model_name: o, litellm_params: {{model: openai/gpt-x, api_base: "{base}", api_key: sk-openai-real}}}}
  - {{model_name: a, litellm_params: {{model: anthropic/claude-x, api_base: "{root}", api_key: sk-ant-real}}}}
  - {{model_name: g, litellm_params: {{model: gemini/gemini-x, api_base: "{root}", api_key: g-real}}}}
  - {{model_name: az, litellm_params: {{model: azure/dep, api_base: "{root}", api_key: az-real}}}}
  - {{model_name: co, litellm_params: {{model: cohere/command, api_base: "{root}", api_key: co-real}}}}
  - {{model_name: mi, litellm_params: {{model: mistral/mistral-large, api_base: "{base}", api_key: mi-real}}}}
  - model_name: b
    litellm_params: {{model: bedrock/amazon.nova-pro-v1:0, api_base: "{root}", aws_access_key_id: AKIDEXAMPLE, aws_secret_access_key: secret, aws_region_name: eu-west-1}}
general_settings: {{master_key: sk-master}}
"#
        ),
        &[],
    )
    .await
}

async fn last(mock: &Mock) -> Value {
    mock.stats().await["last_request"].clone()
}

#[tokio::test]
async fn each_provider_route_swaps_in_the_configured_credentials() {
    let mock = Mock::start("pt").await;
    let gw = gateway(&mock).await;
    let http = client();
    let chat = json!({"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]});

    let resp = http
        .post(gw.url("/openai/v1/chat/completions"))
        .bearer_auth("sk-master")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", gw.log());
    let l = last(&mock).await;
    assert_eq!(l["path"], "/v1/chat/completions");
    assert_eq!(l["headers"]["authorization"], "Bearer sk-openai-real");
    assert_eq!(l["json"], chat, "the body goes through unchanged");

    let msg = json!({"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let resp = http
        .post(gw.url("/anthropic/v1/messages"))
        .header("x-api-key", "sk-master")
        .json(&msg)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "message");
    let l = last(&mock).await;
    assert_eq!(l["headers"]["x-api-key"], "sk-ant-real");
    assert_eq!(l["headers"]["anthropic-version"], "2023-06-01");

    let resp = http
        .post(gw.url("/gemini/v1beta/models/gemini-x:generateContent?key=sk-master&alt=json"))
        .json(&json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the gateway key may come as ?key=");
    let l = last(&mock).await;
    assert_eq!(l["headers"]["x-goog-api-key"], "g-real");
    assert_eq!(l["path"], "/v1beta/models/gemini-x:generateContent");
    assert!(
        !l["query"].as_str().unwrap_or("").contains("sk-master"),
        "{l}"
    );

    let resp = http
        .post(gw.url("/azure/openai/deployments/dep/chat/completions?api-version=2024-06-01"))
        .header("api-key", "sk-master")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(last(&mock).await["headers"]["api-key"], "az-real");

    let resp = http
        .post(gw.url("/cohere/v2/chat"))
        .bearer_auth("sk-master")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        last(&mock).await["headers"]["authorization"],
        "Bearer co-real"
    );

    let resp = http
        .post(gw.url("/mistral/v1/chat/completions"))
        .bearer_auth("sk-master")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        last(&mock).await["headers"]["authorization"],
        "Bearer mi-real"
    );

    let resp = http
        .post(gw.url("/bedrock/model/amazon.nova-pro-v1%3A0/converse"))
        .bearer_auth("sk-master")
        .json(&json!({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let l = last(&mock).await;
    let auth = l["headers"]["authorization"].as_str().unwrap();
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
            && auth.contains("/eu-west-1/bedrock/"),
        "{auth}"
    );

    // The client's key is required and never forwarded.
    let resp = http
        .post(gw.url("/openai/v1/chat/completions"))
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn streams_pass_through_and_usage_is_counted() {
    let mock = Mock::start("pt").await;
    let gw = gateway(&mock).await;
    let http = client();
    let msg = json!({"model": "claude-x", "max_tokens": 10, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let body = http
        .post(gw.url("/anthropic/v1/messages"))
        .header("x-api-key", "sk-master")
        .json(&msg)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.starts_with("event: message_start"), "{body}");
    assert!(body.contains("event: message_stop"));
    let metrics = http
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("litellm_output_tokens_metric_total{model=\"anthropic\"} 5"),
        "{metrics}"
    );

    let chat = json!({"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]});
    http.post(gw.url("/openai/v1/chat/completions"))
        .bearer_auth("sk-master")
        .json(&chat)
        .send()
        .await
        .unwrap();
    let metrics = http
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("litellm_output_tokens_metric_total{model=\"openai\"} 5"),
        "{metrics}"
    );
}
