//! Golden tests against Google's documented Gemini / Vertex AI wire formats (fixtures in
//! `filters/fixtures/gemini`).

use super::*;
use std::path::Path;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/gemini");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(FIXTURES).join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn json_fixture(name: &str) -> Value {
    serde_json::from_slice(&fixture(name)).unwrap()
}

fn deployment(model: &str, extra: &str) -> Deployment {
    let c = sluice_config::parse_config(
        &format!("model_list:\n  - {{model_name: g, litellm_params: {{model: {model}{extra}}}}}\n"),
        Path::new("t.yaml"),
    )
    .unwrap();
    c.deployments[0].clone()
}

fn gemini() -> Deployment {
    deployment("gemini/gemini-2.5-flash", ", api_key: AIza-test")
}

fn vertex() -> Deployment {
    deployment(
        "vertex_ai/gemini-2.5-flash",
        ", vertex_project: my-proj-1, vertex_location: europe-west4",
    )
}

fn build_with(
    op: Operation,
    d: &Deployment,
    body: &[u8],
    opts: CallOptions,
    vertex: bool,
) -> Result<UpstreamRequest, ApiError> {
    let mut b = RequestBody::parse(body).unwrap();
    let stream = b.bool_field("stream").unwrap().unwrap_or(false);
    build_request(op, &mut b, d, "gemini-2.5-flash", stream, &opts, vertex)
}

fn build(body: &[u8], opts: CallOptions) -> Result<UpstreamRequest, ApiError> {
    build_with(Operation::ChatCompletions, &gemini(), body, opts, false)
}

fn body_of(req: &UpstreamRequest) -> Value {
    serde_json::from_slice(&req.body).unwrap()
}

#[test]
fn request_translation_matches_golden() {
    let req = build(&fixture("chat_tools.in.json"), CallOptions::default()).unwrap();
    assert_eq!(
        req.path,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    );
    assert_eq!(
        req.headers,
        vec![("x-goog-api-key".to_string(), "AIza-test".to_string())]
    );
    assert!(!req.injected_stream_usage);
    assert_eq!(body_of(&req), json_fixture("chat_tools.out.json"));
}

#[test]
fn non_stream_path_and_simple_body() {
    let req = build(
        br#"{"model":"g","messages":[{"role":"user","content":"hi"}]}"#,
        CallOptions::default(),
    )
    .unwrap();
    assert_eq!(req.path, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(
        body_of(&req),
        json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    );
}

#[test]
fn vertex_path_has_project_and_location_and_no_key() {
    let d = vertex();
    let body = br#"{"model":"g","messages":[{"role":"user","content":"hi"}]}"#;
    let req = build_with(
        Operation::ChatCompletions,
        &d,
        body,
        CallOptions::default(),
        true,
    )
    .unwrap();
    assert_eq!(
        req.path,
        "/v1/projects/my-proj-1/locations/europe-west4/publishers/google/models/gemini-2.5-flash:generateContent"
    );
    assert!(req.headers.is_empty(), "{:?}", req.headers);
    let stream = br#"{"model":"g","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let req = build_with(
        Operation::ChatCompletions,
        &d,
        stream,
        CallOptions::default(),
        true,
    )
    .unwrap();
    assert!(req
        .path
        .ends_with("/models/gemini-2.5-flash:streamGenerateContent?alt=sse"));
    assert_eq!(
        vertex_api_base(&d),
        "https://europe-west4-aiplatform.googleapis.com"
    );

    // The location defaults to us-central1; the project may come from inline credentials.
    let d = deployment(
        "vertex_ai/gemini-2.5-flash",
        r#", vertex_credentials: '{"type": "service_account", "project_id": "from-creds"}'"#,
    );
    let req = build_with(
        Operation::ChatCompletions,
        &d,
        body,
        CallOptions::default(),
        true,
    )
    .unwrap();
    assert!(
        req.path
            .starts_with("/v1/projects/from-creds/locations/us-central1/"),
        "{}",
        req.path
    );
    assert_eq!(
        vertex_api_base(&d),
        "https://us-central1-aiplatform.googleapis.com"
    );
    let d = deployment(
        "vertex_ai/gemini-2.5-flash",
        ", vertex_project: p, vertex_location: global",
    );
    assert_eq!(vertex_api_base(&d), "https://aiplatform.googleapis.com");

    // No project at all is a configuration error, not the client's.
    let d = deployment("vertex_ai/gemini-2.5-flash", "");
    let e = build_with(
        Operation::ChatCompletions,
        &d,
        body,
        CallOptions::default(),
        true,
    )
    .unwrap_err();
    assert_eq!(e.status, 500);
}

#[test]
fn model_names_cannot_escape_the_path() {
    let d = gemini();
    let mut b = RequestBody::parse(br#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
    let e = build_request(
        Operation::ChatCompletions,
        &mut b,
        &d,
        "x:generateContent?key=",
        false,
        &CallOptions::default(),
        false,
    )
    .unwrap_err();
    assert_eq!(e.status, 400);
    let req = build_request(
        Operation::ChatCompletions,
        &mut b,
        &d,
        "models/gemini-1.5-pro-002",
        false,
        &CallOptions::default(),
        false,
    )
    .unwrap();
    assert_eq!(
        req.path,
        "/v1beta/models/gemini-1.5-pro-002:generateContent"
    );
}

#[test]
fn unsupported_params_error_unless_dropped() {
    let body = br#"{"model":"g","messages":[{"role":"user","content":"hi"}],"logit_bias":{"1":2},"logprobs":true,"top_logprobs":2,"parallel_tool_calls":false,"temperature":0.5}"#;
    let e = build(body, CallOptions::default()).unwrap_err();
    assert_eq!(e.status, 400);
    assert!(
        e.message.contains(
            "gemini does not support parameters: ['logit_bias', 'top_logprobs', 'logprobs', 'parallel_tool_calls']"
        ),
        "{}",
        e.message
    );
    assert!(e.message.contains("drop_params"));
    assert_eq!(e.param.as_deref(), Some("logit_bias"));

    let req = build(body, CallOptions { drop_params: true }).unwrap();
    let got = body_of(&req);
    assert_eq!(got["generationConfig"], json!({"temperature": 0.5}));
    assert_eq!(got.as_object().unwrap().len(), 2, "{got}");

    // Harmless values are not "unsupported".
    let body = br#"{"model":"g","messages":[{"role":"user","content":"hi"}],"logprobs":false,"parallel_tool_calls":true,"modalities":["text"]}"#;
    assert!(build(body, CallOptions::default()).is_ok());
}

#[test]
fn tool_choice_modes() {
    for (choice, expected) in [
        (r#""auto""#, json!({"mode": "AUTO"})),
        (r#""none""#, json!({"mode": "NONE"})),
        (r#""required""#, json!({"mode": "ANY"})),
    ] {
        let body = format!(
            r#"{{"model":"g","messages":[{{"role":"user","content":"hi"}}],"tools":[{{"type":"function","function":{{"name":"f"}}}}],"tool_choice":{choice}}}"#
        );
        let got = body_of(&build(body.as_bytes(), CallOptions::default()).unwrap());
        assert_eq!(got["toolConfig"]["functionCallingConfig"], expected);
        assert_eq!(
            got["tools"],
            json!([{"functionDeclarations": [{"name": "f"}]}])
        );
    }
}

#[test]
fn response_format_and_reasoning_effort() {
    let body = br##"{"model":"g","messages":[{"role":"user","content":"json please"}],
        "reasoning_effort":"low",
        "response_format":{"type":"json_schema","json_schema":{"name":"x","strict":true,"schema":{
            "type":"object","additionalProperties":false,
            "properties":{"answer":{"type":"integer"},"step":{"$ref":"#/$defs/Step"}},
            "required":["answer"],
            "$defs":{"Step":{"type":"object","properties":{"kind":{"const":"add"},"note":{"oneOf":[{"type":"string"},{"type":"null"}]}}}}}}}}"##;
    let got = body_of(&build(body, CallOptions::default()).unwrap());
    assert_eq!(
        got["generationConfig"],
        json!({
            "responseMimeType": "application/json",
            "responseSchema": {
                "type": "object",
                "properties": {
                    "answer": {"type": "integer"},
                    "step": {"type": "object", "properties": {
                        "kind": {"enum": ["add"]},
                        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}
                    }}
                },
                "required": ["answer"]
            },
            "thinkingConfig": {"thinkingBudget": 1024, "includeThoughts": true}
        })
    );
    let body = br#"{"model":"g","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_object"}}"#;
    let got = body_of(&build(body, CallOptions::default()).unwrap());
    assert_eq!(
        got["generationConfig"],
        json!({"responseMimeType": "application/json"})
    );
}

#[test]
fn system_only_and_unknown_tool_ids() {
    let got = body_of(
        &build(
            br#"{"model":"g","messages":[{"role":"system","content":"Say hi."}]}"#,
            CallOptions::default(),
        )
        .unwrap(),
    );
    assert_eq!(
        got,
        json!({"contents": [{"role": "user", "parts": [{"text": "Say hi."}]}]})
    );
    let e = build(
        br#"{"model":"g","messages":[{"role":"tool","tool_call_id":"call_9","content":"x"}]}"#,
        CallOptions::default(),
    )
    .unwrap_err();
    assert_eq!(e.status, 400);
    assert!(e.message.contains("call_9"), "{}", e.message);
    assert!(build(
        br#"{"model":"g","messages":[],"n":1}"#,
        CallOptions::default()
    )
    .is_ok());
    let e = build(
        br#"{"model":"g","messages":[],"tools":[{"type":"web_search"}]}"#,
        CallOptions::default(),
    )
    .unwrap_err();
    assert_eq!(e.param.as_deref(), Some("tools"));
}

#[test]
fn native_tools_pass_through_after_functions() {
    let body = br#"{"model":"g","messages":[{"role":"user","content":"hi"}],"tools":[{"googleSearch":{}},{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{}}}},{"codeExecution":{}}]}"#;
    let got = body_of(&build(body, CallOptions::default()).unwrap());
    assert_eq!(
        got["tools"],
        json!([{"functionDeclarations": [{"name": "f"}]}, {"googleSearch": {}}, {"codeExecution": {}}])
    );
}

#[test]
fn completions_are_refused() {
    let e = build_with(
        Operation::Completions,
        &gemini(),
        br#"{"model":"g","prompt":"hi"}"#,
        CallOptions::default(),
        false,
    )
    .unwrap_err();
    assert_eq!(e.status, 400);
}

#[test]
fn response_translation_matches_golden() {
    let (body, usage) = translate_response(
        Operation::ChatCompletions,
        &fixture("response_tool_call.json"),
        "gemini-2.5-flash",
    )
    .unwrap();
    let mut got: Value = serde_json::from_slice(&body).unwrap();
    assert!(got["created"].as_u64().unwrap() > 0);
    got.as_object_mut().unwrap().remove("created");
    assert_eq!(got, json_fixture("response_tool_call.out.json"));
    let u = usage.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (120, 90, 210)
    );
}

#[test]
fn tool_call_ids_round_trip_their_thought_signature() {
    let (body, _) = translate_response(
        Operation::ChatCompletions,
        &fixture("response_tool_call.json"),
        "m",
    )
    .unwrap();
    let resp: Value = serde_json::from_slice(&body).unwrap();
    let message = &resp["choices"][0]["message"];
    let request = json!({
        "model": "g",
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": message["tool_calls"]},
            {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "18C"},
            {"role": "tool", "tool_call_id": message["tool_calls"][1]["id"], "content": "12C"},
        ],
    });
    let got = body_of(&build(request.to_string().as_bytes(), CallOptions::default()).unwrap());
    assert_eq!(
        got["contents"][1],
        json!({"role": "model", "parts": [
            {"functionCall": {"name": "get_weather", "args": {"location": "Paris", "unit": "C"}}, "thoughtSignature": "CiQBVKhc7g=="},
            {"functionCall": {"name": "get_weather", "args": {"location": "London", "unit": "C"}}},
        ]})
    );
    assert_eq!(
        got["contents"][2]["parts"][1],
        json!({"functionResponse": {"name": "get_weather", "response": {"content": "12C"}}})
    );
}

#[test]
fn finish_reasons_and_blocked_prompts() {
    for (reason, expected) in [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("OTHER", "stop"),
    ] {
        let resp = format!(
            r#"{{"candidates":[{{"content":{{"parts":[{{"text":"x"}}],"role":"model"}},"finishReason":"{reason}","index":0}}]}}"#
        );
        let (body, usage) =
            translate_response(Operation::ChatCompletions, resp.as_bytes(), "m").unwrap();
        let got: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(got["choices"][0]["finish_reason"], expected, "{reason}");
        assert!(usage.is_none());
    }
    let blocked = br#"{"promptFeedback":{"blockReason":"SAFETY","safetyRatings":[{"category":"HARM_CATEGORY_HARASSMENT","probability":"HIGH"}]},"usageMetadata":{"promptTokenCount":8,"totalTokenCount":8}}"#;
    let (body, usage) = translate_response(Operation::ChatCompletions, blocked, "m").unwrap();
    let got: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        got["choices"],
        json!([{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "content_filter"}])
    );
    assert_eq!(usage.unwrap().prompt_tokens, 8);
    let e = translate_response(Operation::ChatCompletions, b"<html>", "m").unwrap_err();
    assert_eq!(e.status, 502);
}

#[test]
fn embeddings_requests_and_responses() {
    let body =
        br#"{"model":"e","input":["hello world","bye"],"dimensions":3,"encoding_format":"float"}"#;
    let req = build_with(
        Operation::Embeddings,
        &gemini(),
        body,
        CallOptions::default(),
        false,
    )
    .unwrap();
    assert_eq!(
        req.path,
        "/v1beta/models/gemini-2.5-flash:batchEmbedContents"
    );
    assert_eq!(
        body_of(&req),
        json!({"requests": [
            {"model": "models/gemini-2.5-flash", "content": {"parts": [{"text": "hello world"}]}, "outputDimensionality": 3},
            {"model": "models/gemini-2.5-flash", "content": {"parts": [{"text": "bye"}]}, "outputDimensionality": 3},
        ]})
    );
    let req = build_with(
        Operation::Embeddings,
        &vertex(),
        br#"{"model":"e","input":"hello world"}"#,
        CallOptions::default(),
        true,
    )
    .unwrap();
    assert_eq!(
        req.path,
        "/v1/projects/my-proj-1/locations/europe-west4/publishers/google/models/gemini-2.5-flash:predict"
    );
    assert_eq!(
        body_of(&req),
        json!({"instances": [{"content": "hello world"}]})
    );
    let e = build_with(
        Operation::Embeddings,
        &gemini(),
        br#"{"model":"e","input":[[1,2,3]]}"#,
        CallOptions::default(),
        false,
    )
    .unwrap_err();
    assert_eq!(e.param.as_deref(), Some("input"));
    let base64 = br#"{"model":"e","input":"x","encoding_format":"base64"}"#;
    assert!(build_with(
        Operation::Embeddings,
        &gemini(),
        base64,
        CallOptions::default(),
        false
    )
    .is_err());
    assert!(build_with(
        Operation::Embeddings,
        &gemini(),
        base64,
        CallOptions { drop_params: true },
        false
    )
    .is_ok());

    let expected = json_fixture("embeddings.out.json");
    let (body, usage) = translate_response(
        Operation::Embeddings,
        &fixture("embeddings_batch.json"),
        "text-embedding-004",
    )
    .unwrap();
    let mut got: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        got.as_object_mut().unwrap().remove("usage").unwrap(),
        json!({"prompt_tokens": 0, "total_tokens": 0})
    );
    assert_eq!(got, expected);
    assert!(usage.is_none(), "batchEmbedContents reports no usage");

    let (body, usage) = translate_response(
        Operation::Embeddings,
        &fixture("embeddings_predict.json"),
        "text-embedding-004",
    )
    .unwrap();
    let mut got: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        got.as_object_mut().unwrap().remove("usage").unwrap(),
        json!({"prompt_tokens": 10, "total_tokens": 10})
    );
    assert_eq!(got, expected);
    assert_eq!(usage.unwrap().total_tokens, 10);
}

#[test]
fn classifies_google_errors() {
    assert_eq!(
        classify_error(429, &fixture("error_rate_limit.json")),
        FailureKind::RateLimit
    );
    // Vertex has answered quota errors with other statuses; the status string decides.
    assert_eq!(
        classify_error(
            400,
            br#"{"error":{"code":400,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED"}}"#
        ),
        FailureKind::RateLimit
    );
    assert_eq!(
        classify_error(400, &fixture("error_context_window.json")),
        FailureKind::ContextWindowExceeded
    );
    assert_eq!(
        classify_error(400, br#"{"error":{"code":400,"message":"Unable to submit request because the input token count is 1200000 but model only supports up to 1048576. Reduce the input token count and try again.","status":"INVALID_ARGUMENT"}}"#),
        FailureKind::ContextWindowExceeded
    );
    assert_eq!(
        classify_error(400, &fixture("error_api_key.json")),
        FailureKind::Auth
    );
    assert_eq!(
        classify_error(
            400,
            br#"{"promptFeedback":{"blockReason":"PROHIBITED_CONTENT"}}"#
        ),
        FailureKind::ContentPolicy
    );
    // A bad safety *setting* is a plain bad request, not a policy block.
    assert_eq!(
        classify_error(400, br#"{"error":{"code":400,"message":"Invalid value at 'safety_settings[0].threshold'","status":"INVALID_ARGUMENT"}}"#),
        FailureKind::BadRequest
    );
    assert_eq!(
        classify_error(
            503,
            br#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#
        ),
        FailureKind::Server
    );
    assert_eq!(classify_error(403, b"{}"), FailureKind::Auth);
    assert_eq!(classify_error(404, b"{}"), FailureKind::NotFound);
    assert_eq!(classify_error(504, b"{}"), FailureKind::Timeout);
}

/// Runs the stream decoder over `input` cut at the given sizes (cycled).
fn decode_sizes(input: &[u8], sizes: &[usize], include_usage: bool) -> (Vec<Value>, Option<Usage>) {
    let mut d = GeminiStream::new("gemini-2.5-flash", include_usage);
    let mut out = vec![];
    let mut at = 0;
    for &n in sizes.iter().cycle() {
        if at >= input.len() {
            break;
        }
        let end = (at + n.max(1)).min(input.len());
        d.feed(&input[at..end], &mut out);
        at = end;
    }
    d.finish(&mut out);
    (events(&out), d.usage())
}

fn events(out: &[u8]) -> Vec<Value> {
    let text = String::from_utf8(out.to_vec()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let data = e.strip_prefix("data: ").expect("data events only");
            if data == "[DONE]" {
                return json!("[DONE]");
            }
            let v: Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["id"], "aGVsbG8tZ2VtaW5pLXN0cmVhbQ");
            assert_eq!(v["object"], "chat.completion.chunk");
            assert_eq!(v["model"], "gemini-2.5-flash");
            match v["choices"].as_array().unwrap().first() {
                Some(c) => {
                    assert_eq!(c["index"], 0);
                    json!([c["delta"], c["finish_reason"]])
                }
                None => json!(["usage", {
                    "prompt_tokens": v["usage"]["prompt_tokens"],
                    "completion_tokens": v["usage"]["completion_tokens"],
                    "total_tokens": v["usage"]["total_tokens"],
                }]),
            }
        })
        .collect()
}

#[test]
fn stream_decoding_matches_golden_for_any_split() {
    let input = fixture("stream_tool_call.sse");
    let expected = json_fixture("stream_tool_call.out.json");
    for split in 1..=input.len() {
        let (events, usage) = decode_sizes(&input, &[split], true);
        assert_eq!(Value::Array(events), expected, "split {split}");
        let u = usage.unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (31, 30, 61)
        );
    }
    // Uneven cuts from a fixed pseudo-random sequence.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..50 {
        let sizes: Vec<usize> = (0..40)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                1 + (state >> 33) as usize % 97
            })
            .collect();
        let (events, _) = decode_sizes(&input, &sizes, true);
        assert_eq!(Value::Array(events), expected, "sizes {sizes:?}");
    }
    // Without include_usage the usage chunk is not sent, but usage is still captured.
    let (events, usage) = decode_sizes(&input, &[13], false);
    assert!(!events.iter().any(|e| e[0] == "usage"));
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(usage.unwrap().completion_tokens, 30);
}

#[test]
fn stream_without_trailing_blank_line_and_lf_endings() {
    // `\n\n`-separated events, the last one cut before its terminator.
    let input = "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hi\"}],\"role\":\"model\"},\"index\":0}],\"responseId\":\"aGVsbG8tZ2VtaW5pLXN0cmVhbQ\"}\n\n\
data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"\",\"thoughtSignature\":\"AY89\"}],\"role\":\"model\"},\"finishReason\":\"MAX_TOKENS\",\"index\":0}],\"usageMetadata\":{\"promptTokenCount\":1,\"candidatesTokenCount\":9,\"totalTokenCount\":10},\"responseId\":\"aGVsbG8tZ2VtaW5pLXN0cmVhbQ\"}";
    let (events, usage) = decode_sizes(input.as_bytes(), &[5], true);
    assert_eq!(
        Value::Array(events),
        json!([
            [{"role": "assistant", "content": ""}, null],
            [{"content": "Hi"}, null],
            [{}, "length"],
            ["usage", {"prompt_tokens": 1, "completion_tokens": 9, "total_tokens": 10}],
            "[DONE]"
        ])
    );
    assert_eq!(usage.unwrap().total_tokens, 10);
}

#[test]
fn stream_error_event_is_reported_in_band() {
    let input = b"data: {\"error\":{\"code\":503,\"message\":\"The model is overloaded.\",\"status\":\"UNAVAILABLE\"}}\r\n\r\n";
    let mut d = GeminiStream::new("m", true);
    let mut out = vec![];
    d.feed(input, &mut out);
    d.finish(&mut out);
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("\"error\""), "{text}");
    assert!(text.contains("overloaded"));
    assert!(text.contains("\"code\":\"503\""));
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_eq!(text.matches("[DONE]").count(), 1);
}

#[test]
fn text_responses_are_written_as_the_value_path_writes_them() {
    let fixture_body = fixture("response_tool_call.json");
    let bodies: Vec<&[u8]> = vec![
        br#"{"candidates":[{"content":{"parts":[{"text":"He said \"hi\"\n\u00e9\/"}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":3,"totalTokenCount":7,"promptTokensDetails":[{"modality":"TEXT","tokenCount":4}]},"responseId":"r-1"}"#,
        br#"{"candidates":[{"content":{"parts":[{"text":"a"}]},"finishReason":"MAX_TOKENS"},{"content":{"parts":[{"text":"b"}]},"finishReason":"SAFETY","index":5}],"usageMetadata":{"promptTokenCount":4,"thoughtsTokenCount":2,"cachedContentTokenCount":1}}"#,
        br#"{"candidates":[{"content":{"parts":[]}},{"finishReason":"STOP"}],"responseId":""}"#,
        br#"{"candidates":[{"content":{"parts":[{"text":"a"},{"text":"b"}]}}],"responseId":"r"}"#,
        br#"{"candidates":[{"content":{"parts":[{"text":"a","thought":true}]}}],"responseId":"r"}"#,
        br#"{"candidates":[{"content":{"parts":[{"text":"a"}]},"index":"1"}],"responseId":"r"}"#,
        br#"{"candidates":[{"content":{"parts":[{"text":"a"}]}}],"usageMetadata":{"totalTokenCount":null},"responseId":"r"}"#,
        br#"{"candidates":[{"content":{"parts":[{"text":"a"}]}}],"usageMetadata":{"promptTokenCount":1.5},"responseId":"r"}"#,
        br#"{"candidates":[{"content":{"parts":[{"text":"a"}]}}],"responseId":"r","responseId":"s"}"#,
        br#"{"candidates":[],"promptFeedback":{"blockReason":"SAFETY"},"responseId":"r"}"#,
        br#"{"candidates":[{"content":{"parts":[{"text":"a"}]}}],"responseId":7}"#,
        &fixture_body,
    ];
    for body in bodies {
        let strip = |out: Vec<u8>| {
            let mut v: Value = serde_json::from_slice(&out).unwrap();
            v.as_object_mut().unwrap().remove("created");
            if !v["id"].as_str().unwrap().starts_with('r') {
                v.as_object_mut().unwrap().remove("id");
            }
            // Byte for byte once `created` and generated ids are set aside.
            serde_json::to_string(&v).unwrap()
        };
        let (fast, fast_usage) = translate_response(Operation::ChatCompletions, body, "m").unwrap();
        let (value, value_usage) = value_response(Operation::ChatCompletions, body, "m").unwrap();
        assert_eq!(fast_usage, value_usage, "{}", String::from_utf8_lossy(body));
        assert_eq!(
            strip(fast),
            strip(value),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

/// The scanner's one-pass writer of schemas that need no cleaning gives exactly what the tree
/// path (parse, clean, write) gives, and leaves every schema that needs cleaning to the tree.
#[test]
fn clean_schemas_are_written_as_the_tree_writes_them() {
    let tree = |schema: &str| {
        let json: Json = serde_json::from_str(schema).unwrap();
        let cleaned = Schema::new(&json).cleaned();
        let mut out = vec![];
        cleaned.write(&mut out);
        (String::from_utf8(out).unwrap(), cleaned.is_empty_object())
    };
    let fast = |schema: &str| {
        let mut s = Scanner::new(schema.as_bytes());
        let mut out = vec![];
        let empty = write_clean_schema(&mut s, schema, &mut out, 0)?;
        assert_eq!(s.pos(), schema.len(), "{schema}: not read to its end");
        Some((String::from_utf8(out).unwrap(), empty))
    };
    let clean = [
        r#"{"type": "object", "properties": {"flight_number": {"type": "string", "description": "IATA flight number, e.g. NW218"}, "date": {"type": "string", "description": "Local departure date, YYYY-MM-DD"}}, "required": ["flight_number", "date"]}"#,
        r#"{}"#,
        r#"{"type":"object"}"#,
        r#"{"type":"object","properties":{}}"#,
        r#"{"type":"object","properties":{"a":{}}}"#,
        r#"{ "type" : "array" , "items" : { "type" : "integer", "minimum": -5, "maximum": 120 }, "maxItems": 3 }"#,
        r#"{"type":"array","items":true}"#,
        r#"{"type":"string","enum":["a","b\n\"c\"",null,true,false,0,-7],"default":"a","example":{"x":[1,{"y":null}],"z":"w"}}"#,
        r#"{"properties":{"s":{"type":"string","format":"date-time","pattern":"^\\d+$","nullable":true,"title":"S","minLength":1,"maxLength":9}},"propertyOrdering":["s"],"minProperties":1,"maxProperties":2}"#,
        r#"{"properties":{"deep":{"properties":{"deeper":{"type":"object","properties":{"x":{"type":"number"}}}}}}}"#,
    ];
    for schema in clean {
        assert_eq!(fast(schema), Some(tree(schema)), "{schema}");
    }
    let needs_the_tree = [
        r#"{"type":["string","null"]}"#,
        r#"{"anyOf":[{"type":"string"}]}"#,
        r#"{"oneOf":[{"type":"string"}]}"#,
        r#"{"const":"x"}"#,
        r##"{"$ref":"#/$defs/a","$defs":{"a":{"type":"string"}}}"##,
        r#"{"type":"object","additionalProperties":false}"#,
        r##"{"$schema":"http://json-schema.org/draft-07/schema#","type":"object"}"##,
        r#"{"type":"string","type":"integer"}"#,
        r#"{"properties":{"a":{},"a":{"type":"string"}}}"#,
        r#"{"properties":null}"#,
        r#"{"type":"number","minimum":1.5}"#,
        r#"{"type":"number","maximum":1e3}"#,
        r#"{"type":"integer","minimum":-0}"#,
        r#"{"type":"integer","maximum":123456789012345678901}"#,
        r#"{"description":"caf\u00e9"}"#,
        r#"{"description":"a\/b"}"#,
        r#"{"default":{"k":1,"k":2}}"#,
        r#"{"type":"\u0073tring"}"#,
        r#"true"#,
    ];
    for schema in needs_the_tree {
        assert_eq!(fast(schema), None, "{schema}");
    }
    // Nested deeper than the tree path writes in full.
    let mut deep = String::from(r#"{"type":"string"}"#);
    for _ in 0..17 {
        deep = format!(r#"{{"type":"object","properties":{{"p":{deep}}}}}"#);
    }
    assert_eq!(fast(&deep), None);
}
