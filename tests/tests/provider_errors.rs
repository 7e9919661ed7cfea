//! Errors per provider: upstream failures are classified per provider format, retried or
//! answered in the OpenAI shape, and context-window errors reach their fallbacks.

use serde_json::{json, Value};
use sluice_tests::{client, Gateway, Mock};

const PROVIDERS: &[(&str, &str)] = &[
    ("anthropic", "root"),
    ("gemini", "root"),
    ("bedrock", "root"),
    ("cohere", "root"),
    ("ollama_chat", "root"),
    ("azure", "root"),
    ("huggingface", "base"),
];

async fn gateway(mock: &Mock) -> Gateway {
    let mut yaml = String::from("model_list:\n");
    for (p, base) in PROVIDERS {
        let base = if *base == "root" {
            mock.url("")
        } else {
            mock.base_url()
        };
        for script in ["ok-model", "context-window", "error-429"] {
            yaml.push_str(&format!(
                "  - {{model_name: {p}-{script}, litellm_params: {{model: {p}/{script}, api_base: \"{base}\", api_key: k, aws_access_key_id: AKID, aws_secret_access_key: s, aws_region_name: us-east-1}}}}\n"
            ));
        }
    }
    yaml.push_str(&format!(
        "  - {{model_name: rescue, litellm_params: {{model: openai/rescued, api_base: \"{}\"}}}}\n",
        mock.base_url()
    ));
    yaml.push_str("router_settings:\n  num_retries: 1\n  retry_after: 0\n  context_window_fallbacks: [{\"anthropic-context-window\": [\"rescue\"]}]\n");
    Gateway::start(&yaml, &[]).await
}

async fn chat(gw: &Gateway, model: &str) -> (u16, Value) {
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn every_provider_classifies_context_window_and_rate_limits() {
    let mock = Mock::start("err").await;
    let gw = gateway(&mock).await;
    for (p, _) in PROVIDERS {
        let (status, v) = chat(&gw, &format!("{p}-ok-model")).await;
        assert_eq!(status, 200, "{p}: {v}\n{}", gw.log());
        assert!(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .starts_with("err received"),
            "{p}: {v}"
        );

        if *p != "anthropic" {
            let (status, v) = chat(&gw, &format!("{p}-context-window")).await;
            assert_eq!(status, 400, "{p}: {v}");
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(msg.contains("ContextWindowExceededError"), "{p}: {msg}");
        }

        mock.reset().await;
        let (status, v) = chat(&gw, &format!("{p}-error-429")).await;
        assert_eq!(status, 429, "{p}: {v}");
        assert_eq!(v["error"]["code"], "429");
        assert_eq!(mock.stats().await["total_calls"], 2, "{p}: one retry");
    }
    // A context-window error goes to the context-window fallback.
    let (status, v) = chat(&gw, "anthropic-context-window").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "rescued");
}
