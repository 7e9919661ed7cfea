//! Client (OpenAI format) → Sluice → mock speaking Gemini's and Bedrock's wire formats.

use serde_json::{json, Value};
use sluice_tests::{client, sse_data, Gateway, Mock};

async fn gateway(mock: &Mock) -> Gateway {
    let root = mock.url("");
    Gateway::start(
        &format!(
            r#"
model_list:
  - model_name: gemini
    litellm_params: {{model: gemini/gemini-1.5-flash, api_base: "{root}", api_key: g-secret}}
  - model_name: gemini-embed
    litellm_params: {{model: gemini/text-embedding-004, api_base: "{root}", api_key: g-secret}}
    model_info: {{mode: embedding}}
  - model_name: bedrock
    litellm_params:
      model: bedrock/anthropic.claude-3-5-sonnet-20241022-v2:0
      api_base: "{root}"
      aws_access_key_id: AKIDEXAMPLE
      aws_secret_access_key: wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY
      aws_region_name: us-east-1
"#
        ),
        &[],
    )
    .await
}

async fn chat(gw: &Gateway, model: &str, stream: bool) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": model, "stream": stream, "stream_options": {"include_usage": true},
                      "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap()
}

fn streamed(body: &str) -> (String, Vec<Value>) {
    let chunks: Vec<Value> = sse_data(body)
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text = chunks
        .iter()
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str())
        .collect();
    (text, chunks)
}

#[tokio::test]
async fn gemini_chat_stream_and_embeddings() {
    let mock = Mock::start("gm").await;
    let gw = gateway(&mock).await;
    let resp = chat(&gw, "gemini", false).await;
    assert_eq!(resp.status(), 200, "{}", gw.log());
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("gm received"),
        "{v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let last = &mock.stats().await["last_request"];
    assert_eq!(
        last["path"],
        "/v1beta/models/gemini-1.5-flash:generateContent"
    );
    assert_eq!(last["headers"]["x-goog-api-key"], "g-secret");
    assert_eq!(
        last["json"]["systemInstruction"]["parts"][0]["text"],
        "Be brief."
    );

    let body = chat(&gw, "gemini", true).await.text().await.unwrap();
    let (text, chunks) = streamed(&body);
    assert_eq!(text, "tok0 tok1 tok2 tok3 tok4 ");
    assert!(
        chunks.iter().any(|c| c["usage"]["completion_tokens"] == 5),
        "{body}"
    );
    assert_eq!(sse_data(&body).last().unwrap(), "[DONE]");
    assert_eq!(
        mock.stats().await["last_request"]["path"],
        "/v1beta/models/gemini-1.5-flash:streamGenerateContent"
    );

    let v: Value = client()
        .post(gw.url("/v1/embeddings"))
        .json(&json!({"model": "gemini-embed", "input": ["a", "b"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][1]["embedding"], json!([1.0, 0.5]));
}

#[tokio::test]
async fn bedrock_is_signed_and_streams_event_frames() {
    let mock = Mock::start("br").await;
    let gw = gateway(&mock).await;
    let resp = chat(&gw, "bedrock", false).await;
    assert_eq!(resp.status(), 200, "{}", gw.log());
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("br received"),
        "{v}"
    );
    let last = &mock.stats().await["last_request"];
    assert_eq!(
        last["path"],
        "/model/anthropic.claude-3-5-sonnet-20241022-v2%3A0/converse"
    );
    let auth = last["headers"]["authorization"].as_str().unwrap();
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"),
        "{auth}"
    );
    assert!(auth.contains("/us-east-1/bedrock/aws4_request"), "{auth}");
    assert!(last["headers"]["x-amz-date"].is_string());
    assert_eq!(last["json"]["system"][0]["text"], "Be brief.");

    let resp = chat(&gw, "bedrock", true).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let body = resp.text().await.unwrap();
    let (text, chunks) = streamed(&body);
    assert_eq!(text, "tok0 tok1 tok2 tok3 tok4 ");
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "stop"));
    assert!(
        chunks.iter().any(|c| c["usage"]["completion_tokens"] == 5),
        "{body}"
    );
    assert_eq!(sse_data(&body).last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn vertex_mints_and_caches_an_oauth_token() {
    let mock = Mock::start("vx").await;
    let dir = tempfile::tempdir().unwrap();
    let key = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../filters/fixtures/vertex/test-service-account-key.pem"),
    )
    .unwrap();
    let creds = dir.path().join("sa.json");
    std::fs::write(
        &creds,
        json!({"type": "service_account", "project_id": "proj-1", "client_email": "sluice@proj-1.iam.gserviceaccount.com",
               "private_key": key, "token_uri": mock.url("/token")})
        .to_string(),
    )
    .unwrap();
    let gw = Gateway::start(
        &format!(
            r#"
model_list:
  - model_name: vertex
    litellm_params:
      model: vertex_ai/gemini-1.5-pro
      api_base: "{0}"
      vertex_project: proj-1
      vertex_location: europe-west4
      vertex_credentials: "{1}"
  - model_name: vertex-embed
    litellm_params:
      model: vertex_ai/text-embedding-004
      api_base: "{0}"
      vertex_project: proj-1
      vertex_credentials: "{1}"
    model_info: {{mode: embedding}}
"#,
            mock.url(""),
            creds.display()
        ),
        &[],
    )
    .await;
    for _ in 0..3 {
        let resp = chat(&gw, "vertex", false).await;
        assert_eq!(resp.status(), 200, "{}", gw.log());
    }
    let stats = mock.stats().await;
    assert_eq!(
        stats["calls_by_path"]["/token"], 1,
        "one token for three calls: {stats}"
    );
    let last = &stats["last_request"];
    assert_eq!(
        last["path"],
        "/v1/projects/proj-1/locations/europe-west4/publishers/google/models/gemini-1.5-pro:generateContent"
    );
    assert_eq!(last["headers"]["authorization"], "Bearer ya29.mock-vx");

    let v: Value = client()
        .post(gw.url("/v1/embeddings"))
        .json(&json!({"model": "vertex-embed", "input": ["a", "b"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][1]["embedding"], json!([1.0, 0.75]), "{v}");
    let last = mock.stats().await["last_request"].clone();
    assert!(
        last["path"]
            .as_str()
            .unwrap()
            .ends_with("/models/text-embedding-004:predict"),
        "{last}"
    );
    assert_eq!(
        mock.stats().await["calls_by_path"]["/token"],
        1,
        "the token is shared by the account"
    );
}

fn tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}])
}

async fn tool_chat(gw: &Gateway, model: &str, stream: bool) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .json(
            &json!({"model": model, "stream": stream, "tools": tools(), "tool_choice": "auto",
                      "messages": [{"role": "user", "content": "weather in Paris?"}]}),
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn tools_and_embeddings_on_gemini_vertex_and_bedrock() {
    let mock = Mock::start("tl").await;
    let root = mock.url("");
    let gw = Gateway::start(
        &format!(
            r#"
model_list:
  - {{model_name: gemini-tool, litellm_params: {{model: gemini/gemini-tool-user, api_base: "{root}", api_key: g}}}}
  - model_name: bedrock-tool
    litellm_params: {{model: bedrock/anthropic.claude-tool-user, api_base: "{root}", aws_access_key_id: AKID, aws_secret_access_key: s, aws_region_name: us-east-1}}
  - model_name: titan
    litellm_params: {{model: bedrock/amazon.titan-embed-text-v2:0, api_base: "{root}", aws_access_key_id: AKID, aws_secret_access_key: s, aws_region_name: us-east-1}}
    model_info: {{mode: embedding}}
  - model_name: bedrock-cohere
    litellm_params: {{model: bedrock/cohere.embed-english-v3, api_base: "{root}", aws_access_key_id: AKID, aws_secret_access_key: s, aws_region_name: us-east-1}}
    model_info: {{mode: embedding}}
"#
        ),
        &[],
    )
    .await;

    for model in ["gemini-tool", "bedrock-tool"] {
        let v: Value = tool_chat(&gw, model, false).await.json().await.unwrap();
        let call = &v["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather", "{model}: {v}");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args["location"], "Paris");
        assert_eq!(
            v["choices"][0]["finish_reason"], "tool_calls",
            "{model}: {v}"
        );
    }
    let last = mock.stats().await["last_request"].clone();
    assert_eq!(
        last["json"]["toolConfig"]["tools"][0]["toolSpec"]["name"],
        "get_weather"
    );

    let body = tool_chat(&gw, "bedrock-tool", true)
        .await
        .text()
        .await
        .unwrap();
    let (_, chunks) = streamed(&body);
    let args: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap()["location"],
        "Paris",
        "{body}"
    );
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "tool_calls"));

    let v: Value = client()
        .post(gw.url("/v1/embeddings"))
        .json(&json!({"model": "titan", "input": "hello"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["embedding"], json!([0.5, 0.25, 0.125]), "{v}");
    assert_eq!(
        mock.stats().await["last_request"]["json"]["inputText"],
        "hello"
    );
    let v: Value = client()
        .post(gw.url("/v1/embeddings"))
        .json(&json!({"model": "bedrock-cohere", "input": ["a", "b"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2, "{v}");
}
