//! Client (OpenAI format) → Sluice → mock speaking Azure OpenAI, Ollama and Cohere formats.

use serde_json::{json, Value};
use sluice_tests::{client, sse_data, Gateway, Mock};

async fn gateway(mock: &Mock) -> Gateway {
    let root = mock.url("");
    Gateway::start(
        &format!(
            r#"
model_list:
  - model_name: azure-gpt
    litellm_params: {{model: azure/gpt-4o-prod, api_base: "{root}", api_key: az-secret, api_version: "2024-06-01"}}
  - model_name: azure-embed
    litellm_params: {{model: azure/embed-prod, api_base: "{root}", api_key: az-secret}}
    model_info: {{mode: embedding}}
  - model_name: llama
    litellm_params: {{model: ollama_chat/llama3.1, api_base: "{root}"}}
  - model_name: ollama-embed
    litellm_params: {{model: ollama/nomic-embed-text, api_base: "{root}"}}
  - model_name: command
    litellm_params: {{model: cohere/command-r-plus, api_base: "{root}", api_key: co-secret}}
  - model_name: cohere-embed
    litellm_params: {{model: cohere/embed-english-v3.0, api_base: "{root}", api_key: co-secret}}
"#
        ),
        &[],
    )
    .await
}

async fn chat(gw: &Gateway, model: &str, stream: bool) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .json(
            &json!({"model": model, "stream": stream, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "hello"}]}),
        )
        .send()
        .await
        .unwrap()
}

fn streamed_text(body: &str) -> String {
    sse_data(body)
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

#[tokio::test]
async fn azure_uses_deployment_paths_and_api_key() {
    let mock = Mock::start("az").await;
    let gw = gateway(&mock).await;
    let resp = chat(&gw, "azure-gpt", false).await;
    assert_eq!(resp.status(), 200, "{}", gw.log());
    let last = &mock.stats().await["last_request"];
    assert_eq!(
        last["path"],
        "/openai/deployments/gpt-4o-prod/chat/completions"
    );
    assert_eq!(last["headers"]["api-key"], "az-secret");
    assert!(last["headers"].get("authorization").is_none());
    let body = chat(&gw, "azure-gpt", true).await.text().await.unwrap();
    assert_eq!(streamed_text(&body), "tok0 tok1 tok2 tok3 tok4 ");
    let resp = client()
        .post(gw.url("/v1/embeddings"))
        .json(&json!({"model": "azure-embed", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        mock.stats().await["last_request"]["path"],
        "/openai/deployments/embed-prod/embeddings"
    );
}

#[tokio::test]
async fn ollama_chat_stream_and_embeddings() {
    let mock = Mock::start("ol").await;
    let gw = gateway(&mock).await;
    let v: Value = chat(&gw, "llama", false).await.json().await.unwrap();
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("ol received"),
        "{v}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let last = &mock.stats().await["last_request"];
    assert_eq!(last["path"], "/api/chat");
    assert_eq!(last["json"]["stream"], false);

    let resp = chat(&gw, "llama", true).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let body = resp.text().await.unwrap();
    assert_eq!(streamed_text(&body), "tok0 tok1 tok2 tok3 tok4 ");
    assert!(body.contains("\"completion_tokens\":5"), "{body}");
    assert_eq!(sse_data(&body).last().unwrap(), "[DONE]");

    let v: Value = client()
        .post(gw.url("/v1/embeddings"))
        .json(&json!({"model": "ollama-embed", "input": ["a", "b"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["embedding"], json!([1.0, 0.5, 0.25]));
}

#[tokio::test]
async fn cohere_chat_and_embeddings() {
    let mock = Mock::start("co").await;
    let gw = gateway(&mock).await;
    let v: Value = chat(&gw, "command", false).await.json().await.unwrap();
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("co received"),
        "{v}"
    );
    let last = &mock.stats().await["last_request"];
    assert_eq!(last["path"], "/v2/chat");
    assert_eq!(last["headers"]["authorization"], "Bearer co-secret");

    let v: Value = client()
        .post(gw.url("/v1/embeddings"))
        .json(&json!({"model": "cohere-embed", "input": ["a", "b", "c"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 3);
    assert_eq!(v["usage"]["prompt_tokens"], 7);
    assert_eq!(
        mock.stats().await["last_request"]["json"]["input_type"],
        "search_document"
    );
}
