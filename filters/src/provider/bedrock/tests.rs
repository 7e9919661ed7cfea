//! Golden tests against Bedrock's documented wire formats (fixtures in `filters/fixtures/bedrock`),
//! AWS's published SigV4 test vectors, and event-stream frames built here with real CRCs.

use super::*;
use crate::provider::common::comparable;
use std::path::Path;
use std::time::Duration;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/bedrock");
const MODEL: &str = "anthropic.claude-3-5-sonnet-20241022-v2:0";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(FIXTURES).join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn json_fixture(name: &str) -> Value {
    serde_json::from_slice(&fixture(name)).unwrap()
}

fn deployment_for(model: &str, extra: &str) -> Deployment {
    let c = sluice_config::parse_config(
        &format!("model_list:\n  - {{model_name: m, litellm_params: {{model: \"bedrock/{model}\"{extra}}}}}\n"),
        Path::new("t.yaml"),
    )
    .unwrap();
    c.deployments[0].clone()
}

fn run(
    op: Operation,
    model: &str,
    body: &[u8],
    opts: CallOptions,
) -> Result<UpstreamRequest, ApiError> {
    let d = deployment_for(model, "");
    let mut b = RequestBody::parse(body).unwrap();
    let stream = b.bool_field("stream").unwrap().unwrap_or(false);
    build_request(op, &mut b, &d, &d.upstream_model.clone(), stream, &opts)
}

fn build(body: &[u8], opts: CallOptions) -> Result<UpstreamRequest, ApiError> {
    run(Operation::ChatCompletions, MODEL, body, opts)
}

fn body_of(req: &UpstreamRequest) -> Value {
    serde_json::from_slice(&req.body).unwrap()
}

#[test]
fn request_translation_matches_golden() {
    let req = build(&fixture("chat_tools.in.json"), CallOptions::default()).unwrap();
    assert_eq!(
        req.path,
        "/model/anthropic.claude-3-5-sonnet-20241022-v2%3A0/converse-stream"
    );
    assert!(req
        .headers
        .contains(&("content-type".into(), "application/json".into())));
    assert!(!req.headers.iter().any(|(k, _)| k == "authorization"));
    assert!(!req.injected_stream_usage);
    assert_eq!(body_of(&req), json_fixture("chat_tools.out.json"));
}

#[test]
fn paths_encode_the_model_id_like_the_aws_sdks() {
    let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let req = build(body, CallOptions::default()).unwrap();
    assert_eq!(
        req.path,
        "/model/anthropic.claude-3-5-sonnet-20241022-v2%3A0/converse"
    );
    let arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-sonnet-20241022-v2:0";
    let req = run(
        Operation::ChatCompletions,
        arn,
        body,
        CallOptions::default(),
    )
    .unwrap();
    assert_eq!(req.path, "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-3-5-sonnet-20241022-v2%3A0/converse");
    let req = run(
        Operation::ChatCompletions,
        "converse/us.amazon.nova-pro-v1:0",
        body,
        CallOptions::default(),
    )
    .unwrap();
    assert_eq!(req.path, "/model/us.amazon.nova-pro-v1%3A0/converse");
}

#[test]
fn minimal_request_and_unsupported_params() {
    let req = build(
        br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        CallOptions::default(),
    )
    .unwrap();
    assert_eq!(
        body_of(&req),
        json!({"messages": [{"role": "user", "content": [{"text": "hi"}]}]})
    );

    let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"presence_penalty":0.5,"seed":1,"n":2}"#;
    let e = build(body, CallOptions::default()).unwrap_err();
    assert_eq!(e.status, 400);
    assert!(
        e.message
            .contains("bedrock does not support parameters: ['presence_penalty', 'seed', 'n']"),
        "{}",
        e.message
    );
    assert!(e.message.contains(MODEL));
    let req = build(body, CallOptions { drop_params: true }).unwrap();
    let got = body_of(&req);
    assert!(got.get("presence_penalty").is_none() && got.get("seed").is_none());
    assert!(got.get("inferenceConfig").is_none());

    let e = run(
        Operation::Completions,
        MODEL,
        br#"{"model":"m","prompt":"x"}"#,
        CallOptions::default(),
    )
    .unwrap_err();
    assert_eq!(e.status, 400);
}

#[test]
fn tool_choices_response_format_and_model_specific_fields() {
    let tools = r#""tools":[{"type":"function","function":{"name":"f"}}]"#;
    let choice = |c: &str| {
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],{tools},"tool_choice":{c}}}"#
        );
        body_of(&build(body.as_bytes(), CallOptions::default()).unwrap())["toolConfig"].clone()
    };
    assert_eq!(choice(r#""auto""#)["toolChoice"], json!({"auto": {}}));
    assert_eq!(choice(r#""required""#)["toolChoice"], json!({"any": {}}));
    assert_eq!(
        choice(r#"{"type":"function","function":{"name":"f"}}"#)["toolChoice"],
        json!({"tool": {"name": "f"}})
    );
    let none = choice(r#""none""#);
    assert!(none.get("toolChoice").is_none());
    assert_eq!(
        none["tools"][0]["toolSpec"]["inputSchema"]["json"],
        json!({"type": "object", "properties": {}})
    );

    let req = build(
        br#"{"model":"m","messages":[{"role":"user","content":"json please"}],"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object","properties":{"answer":{"type":"integer"}}}}}}"#,
        CallOptions::default(),
    )
    .unwrap();
    let got = body_of(&req);
    assert_eq!(
        got["toolConfig"]["toolChoice"],
        json!({"tool": {"name": "json_tool_call"}})
    );
    assert_eq!(
        got["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"]["json"]["properties"]["answer"]
            ["type"],
        "integer"
    );
    let resp = br#"{"output":{"message":{"role":"assistant","content":[{"toolUse":{"toolUseId":"t","name":"json_tool_call","input":{"answer":42}}}]}},"stopReason":"tool_use","usage":{"inputTokens":5,"outputTokens":3,"totalTokens":8}}"#;
    let (body, _) = translate_response(Operation::ChatCompletions, resp, "m").unwrap();
    let got: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(got["choices"][0]["message"]["content"], "{\"answer\":42}");
    assert!(got["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(got["choices"][0]["finish_reason"], "stop");

    // top_k goes where each family reads it; cache_control becomes a cachePoint.
    let body = br#"{"model":"m","messages":[{"role":"system","content":[{"type":"text","text":"long","cache_control":{"type":"ephemeral"}}]},{"role":"user","content":"hi"}],"top_k":5}"#;
    let nova = run(
        Operation::ChatCompletions,
        "us.amazon.nova-pro-v1:0",
        body,
        CallOptions::default(),
    )
    .unwrap();
    let got = body_of(&nova);
    assert_eq!(
        got["additionalModelRequestFields"],
        json!({"inferenceConfig": {"topK": 5}})
    );
    assert_eq!(
        got["system"],
        json!([{"text": "long"}, {"cachePoint": {"type": "default"}}])
    );
}

#[test]
fn text_is_copied_through_or_escaped() {
    // Unescaped strings are copied through as sent; escaped ones are decoded and re-escaped.
    let body = r#"{"model":"m","messages":[{"role":"system","content":"plain caf\u00e9 \"q\"\n"},{"role":"user","content":[{"type":"text","text":"plain café"},{"type":"text","text":"tab\there"}]},{"role":"assistant","content":"ok","reasoning_content":"why"},{"role":"tool","tool_call_id":"t","content":"\\ done"}]}"#;
    let req = build(body.as_bytes(), CallOptions::default()).unwrap();
    assert_eq!(
        body_of(&req),
        json!({
            "system": [{"text": "plain caf\u{e9} \"q\"\n"}],
            "messages": [
                {"role": "user", "content": [{"text": "plain caf\u{e9}"}, {"text": "tab\there"}]},
                {"role": "assistant", "content": [{"text": "why"}, {"text": "ok"}]},
                {"role": "user", "content": [{"toolResult": {"toolUseId": "t", "content": [{"text": "\\ done"}]}}]}
            ]
        })
    );
    let text = |src: &str, at: std::ops::Range<usize>| match super::text(src, &src[at]) {
        Text::Raw(r) => format!("raw {}", r.get()),
        Text::Str(s) => format!("str {s}"),
    };
    let src = r#"["ab","c\d",x"e"]"#;
    assert_eq!(text(src, 2..4), r#"raw "ab""#);
    assert_eq!(text(src, 2..3), "str a");
    assert_eq!(text(src, 7..10), r#"str c\d"#);
    assert_eq!(text(src, 0..1), "str [");
    assert_eq!(text(src, 12..13), "str x");
    assert_eq!(text(src, 14..15), r#"raw "e""#);
    assert_eq!(text(src, 16..17), "str ]");
    assert_eq!(text("x", 0..1), "str x");
}

#[test]
fn images_must_be_data_urls_and_roles_are_checked() {
    let body = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://example.com/cat.png"}}]}]}"#;
    let e = build(body, CallOptions::default()).unwrap_err();
    assert!(e.message.contains("data URL"), "{}", e.message);
    let body = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/jpeg;base64,/9j/4AAQ"}}]}]}"#;
    let got = body_of(&build(body, CallOptions::default()).unwrap());
    assert_eq!(
        got["messages"][0]["content"][0],
        json!({"image": {"format": "jpeg", "source": {"bytes": "/9j/4AAQ"}}})
    );
    let body = br#"{"model":"m","messages":[{"role":"wizard","content":"hi"}]}"#;
    assert_eq!(build(body, CallOptions::default()).unwrap_err().status, 400);
    let body = br#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#;
    assert!(build(body, CallOptions::default())
        .unwrap_err()
        .message
        .contains("tool_call_id"));
}

#[test]
fn response_translation_matches_golden() {
    let (body, usage) = translate_response(
        Operation::ChatCompletions,
        &fixture("response_tool_use.json"),
        "claude-bedrock",
    )
    .unwrap();
    let mut got: Value = serde_json::from_slice(&body).unwrap();
    assert!(got["created"].as_u64().unwrap() > 0);
    assert!(got["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let o = got.as_object_mut().unwrap();
    o.remove("created");
    o.remove("id");
    assert_eq!(got, json_fixture("response_tool_use.out.json"));
    let u = usage.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (572, 89, 661)
    );
    assert!(translate_response(Operation::ChatCompletions, b"{}", "m").is_err());
}

#[test]
fn stop_reasons_map_to_openai_finish_reasons() {
    for (stop, want) in [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("guardrail_intervened", "content_filter"),
        ("content_filtered", "content_filter"),
    ] {
        let resp = format!(
            r#"{{"output":{{"message":{{"role":"assistant","content":[{{"text":"x"}},{{"reasoningContent":{{"reasoningText":{{"text":"hmm","signature":"s"}}}}}}]}}}},"stopReason":"{stop}","usage":{{"inputTokens":1,"outputTokens":2,"totalTokens":3}}}}"#
        );
        let (body, _) =
            translate_response(Operation::ChatCompletions, resp.as_bytes(), "m").unwrap();
        let got: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(got["choices"][0]["finish_reason"], want, "{stop}");
        assert_eq!(got["choices"][0]["message"]["content"], "x");
        assert_eq!(got["choices"][0]["message"]["reasoning_content"], "hmm");
    }
}

#[test]
fn titan_embeddings() {
    let req = run(
        Operation::Embeddings,
        "amazon.titan-embed-text-v2:0",
        br#"{"model":"e","input":"hello world","dimensions":256,"encoding_format":"float"}"#,
        CallOptions::default(),
    )
    .unwrap();
    assert_eq!(req.path, "/model/amazon.titan-embed-text-v2%3A0/invoke");
    assert_eq!(
        body_of(&req),
        json!({"inputText": "hello world", "dimensions": 256})
    );
    // A one-item list is fine; more is refused with the limit named.
    let req = run(
        Operation::Embeddings,
        "amazon.titan-embed-text-v1",
        br#"{"model":"e","input":["only"]}"#,
        CallOptions::default(),
    )
    .unwrap();
    assert_eq!(body_of(&req), json!({"inputText": "only"}));
    let e = run(
        Operation::Embeddings,
        "amazon.titan-embed-text-v1",
        br#"{"model":"e","input":["a","b"]}"#,
        CallOptions::default(),
    )
    .unwrap_err();
    assert_eq!(e.status, 400);
    assert!(e.message.contains("the limit is 1"), "{}", e.message);
    assert!(e.message.contains("got 2 inputs"), "{}", e.message);
    let e = run(
        Operation::Embeddings,
        "amazon.titan-embed-text-v1",
        br#"{"model":"e","input":"x","dimensions":8}"#,
        CallOptions::default(),
    )
    .unwrap_err();
    assert!(e.message.contains("['dimensions']"), "{}", e.message);
    let e = run(
        Operation::Embeddings,
        "amazon.titan-embed-text-v1",
        br#"{"model":"e","input":[[1,2,3]]}"#,
        CallOptions::default(),
    )
    .unwrap_err();
    assert!(e.message.contains("token arrays"), "{}", e.message);

    let (body, usage) = translate_response(
        Operation::Embeddings,
        &fixture("embed_titan.json"),
        "titan-embed",
    )
    .unwrap();
    let got: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(got, json_fixture("embed_titan.out.json"));
    assert_eq!(usage.unwrap().prompt_tokens, 7);
}

#[test]
fn cohere_embeddings() {
    let req = run(
        Operation::Embeddings,
        "cohere.embed-english-v3",
        br#"{"model":"e","input":["hello","world"]}"#,
        CallOptions::default(),
    )
    .unwrap();
    assert_eq!(req.path, "/model/cohere.embed-english-v3/invoke");
    assert_eq!(
        body_of(&req),
        json!({"texts": ["hello", "world"], "input_type": "search_document"})
    );
    let req = run(
        Operation::Embeddings,
        "cohere.embed-multilingual-v3",
        br#"{"model":"e","input":"q","input_type":"search_query"}"#,
        CallOptions::default(),
    )
    .unwrap();
    assert_eq!(body_of(&req)["input_type"], "search_query");
    let e = run(
        Operation::Embeddings,
        "meta.llama3-8b-instruct-v1:0",
        br#"{"model":"e","input":"q"}"#,
        CallOptions::default(),
    )
    .unwrap_err();
    assert!(e.message.contains("amazon.titan-embed-*"), "{}", e.message);

    let (body, usage) = translate_response(
        Operation::Embeddings,
        &fixture("embed_cohere.json"),
        "cohere-embed",
    )
    .unwrap();
    let got: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(got, json_fixture("embed_cohere.out.json"));
    assert!(usage.is_none());
    // embed-v4 answers `{"embeddings": {"float": [...]}}`.
    let (body, _) = translate_response(
        Operation::Embeddings,
        br#"{"embeddings":{"float":[[1.5]]},"id":"x","response_type":"embeddings_by_type"}"#,
        "e",
    )
    .unwrap();
    let got: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(got["data"][0]["embedding"], json!([1.5]));
}

#[test]
fn classifies_bedrock_errors() {
    let throttled = br#"{"message":"Too many requests, please wait before trying again."}"#;
    assert_eq!(classify_error(429, throttled), FailureKind::RateLimit);
    assert_eq!(
        classify_error(400, b"ThrottlingException: Rate exceeded"),
        FailureKind::RateLimit
    );
    assert_eq!(
        classify_error(
            400,
            br#"{"message":"The model returned the following errors: Input is too long for requested model."}"#
        ),
        FailureKind::ContextWindowExceeded
    );
    assert_eq!(
        classify_error(400, br#"{"message":"too many input tokens"}"#),
        FailureKind::ContextWindowExceeded
    );
    assert_eq!(
        classify_error(
            400,
            br#"{"__type":"ValidationException","message":"Input of 210000 tokens exceeds the limit of 200000"}"#
        ),
        FailureKind::ContextWindowExceeded
    );
    assert_eq!(
        classify_error(
            400,
            br#"{"message":"The maximum tokens you requested exceeds the model limit of 8192"}"#
        ),
        FailureKind::BadRequest
    );
    assert_eq!(
        classify_error(400, br#"{"message":"Malformed input request"}"#),
        FailureKind::BadRequest
    );
    assert_eq!(classify_error(403, b"{}"), FailureKind::Auth);
    assert_eq!(classify_error(424, b"{}"), FailureKind::Server);
    assert_eq!(classify_error(503, b"{}"), FailureKind::Server);
}

// ---------------------------------------------------------------------------------------------
// SigV4

const SUITE_KEY: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

fn suite_creds(token: Option<&str>) -> AwsCredentials {
    AwsCredentials {
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: SUITE_KEY.into(),
        session_token: token.map(str::to_string),
    }
}

/// 2015-08-30T12:36:00Z, the date of AWS's SigV4 test suite.
fn suite_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_440_938_160)
}

fn headers(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Signs like the classic test suite (no `x-amz-content-sha256` header) and returns the
/// Authorization value.
fn suite_sign(
    method: &str,
    target: &str,
    hs: &[(&str, &str)],
    body: &str,
    token: Option<&str>,
) -> String {
    let hs = headers(hs);
    let req = Signable {
        method,
        host: "example.amazonaws.com",
        path_and_query: target,
        headers: &hs,
        body: body.as_bytes(),
    };
    let out = sign_v4(
        &req,
        &suite_creds(token),
        "us-east-1",
        "service",
        &amz_date(suite_time()),
        false,
    );
    assert_eq!(out[0], ("x-amz-date".into(), "20150830T123600Z".into()));
    out.iter()
        .find(|(k, _)| k == "authorization")
        .unwrap()
        .1
        .clone()
}

fn suite_authz(signed_headers: &str, signature: &str) -> String {
    format!("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders={signed_headers}, Signature={signature}")
}

#[test]
fn amz_dates() {
    assert_eq!(amz_date(suite_time()), "20150830T123600Z");
    assert_eq!(amz_date(UNIX_EPOCH), "19700101T000000Z");
    // 2024-02-29T23:59:59Z (a leap day).
    assert_eq!(
        amz_date(UNIX_EPOCH + Duration::from_secs(1_709_251_199)),
        "20240229T235959Z"
    );
}

/// name, method, target, headers, body, signed headers, signature.
type SuiteCase<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'a [(&'a str, &'a str)],
    &'a str,
    &'a str,
    &'a str,
);

/// AWS's published SigV4 test suite (aws-sig-v4-test-suite), expected Authorization values.
#[test]
fn sigv4_matches_aws_test_suite() {
    let vanilla = "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";
    let cases: &[SuiteCase] = &[
        ("get-vanilla", "GET", "/", &[], "", "host;x-amz-date", vanilla),
        ("post-vanilla", "POST", "/", &[], "", "host;x-amz-date", "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
        ("get-vanilla-query-order-key-case", "GET", "/?Param2=value2&Param1=value1", &[], "", "host;x-amz-date", "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"),
        ("post-vanilla-query", "POST", "/?Param1=value1", &[], "", "host;x-amz-date", "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11"),
        ("get-vanilla-query-unreserved", "GET", "/?-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz=-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", &[], "", "host;x-amz-date", "9c3e54bfcdf0b19771a7f523ee5669cdf59bc7cc0884027167c21bb143a40197"),
        ("get-vanilla-utf8-query", "GET", "/?%E1%88%B4=bar", &[], "", "host;x-amz-date", "2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04"),
        ("post-vanilla-query-nonunreserved", "POST", "/?%40%23%24%25%5E=&%2B=%2F%2C%3F%3E%3C%60%22%3B%3A%5C%7C%5D%5B%7B%7D", &[], "", "host;x-amz-date", "66c82657c86e26fb25238d0e69f011edc4c6df5ae71119d7cb98ed9b87393c1e"),
        ("post-vanilla-query-space", "POST", "/?p=", &[], "", "host;x-amz-date", "e71688addb58a26418614085fb730ba3faa623b461c17f48f2fbdb9361b94a9b"),
        ("get-unreserved", "GET", "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", &[], "", "host;x-amz-date", "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f"),
        ("get-utf8", "GET", "/ሴ", &[], "", "host;x-amz-date", "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85"),
        ("post-x-www-form-urlencoded", "POST", "/", &[("Content-Type", "application/x-www-form-urlencoded")], "Param1=value1", "content-type;host;x-amz-date", "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"),
        ("post-x-www-form-urlencoded-parameters", "POST", "/", &[("Content-Type", "application/x-www-form-urlencoded; charset=utf8")], "Param1=value1", "content-type;host;x-amz-date", "1a72ec8f64bd914b0e42e42607c7fbce7fb2c7465f63e3092b3b0d39fa77a6fe"),
        ("get-header-value-trim", "GET", "/", &[("My-Header1", " value1"), ("My-Header2", " \"a   b   c\"")], "", "host;my-header1;my-header2;x-amz-date", "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736"),
        ("get-header-key-duplicate", "GET", "/", &[("My-Header1", "value2"), ("My-Header1", "value2"), ("My-Header1", "value1")], "", "host;my-header1;x-amz-date", "c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea"),
        ("get-header-value-order", "GET", "/", &[("My-Header1", "value4"), ("My-Header1", "value1"), ("My-Header1", "value3"), ("My-Header1", "value2")], "", "host;my-header1;x-amz-date", "08c7e5a9acfcfeb3ab6b2185e75ce8b1deb5e634ec47601a50643f830c755c01"),
        ("post-header-key-case", "POST", "/", &[("MY-HEADER1", "value1")], "", "host;my-header1;x-amz-date", "c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c"),
        ("post-header-value-case", "POST", "/", &[("My-Header1", "VALUE1")], "", "host;my-header1;x-amz-date", "cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d"),
        // normalize-path cases whose canonical URI is "/": the same request as get-vanilla.
        ("get-relative-relative", "GET", "/example1/example2/../..", &[], "", "host;x-amz-date", vanilla),
        ("get-slash-dot-slash", "GET", "/./", &[], "", "host;x-amz-date", vanilla),
        ("get-slash", "GET", "//", &[], "", "host;x-amz-date", vanilla),
    ];
    for (name, method, target, hs, body, signed, sig) in cases {
        assert_eq!(
            suite_sign(method, target, hs, body, None),
            suite_authz(signed, sig),
            "{name}"
        );
    }
    // post-sts-header-before: the session token is signed.
    let token = "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==";
    assert_eq!(
        suite_sign("POST", "/", &[], "", Some(token)),
        suite_authz(
            "host;x-amz-date;x-amz-security-token",
            "85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead"
        )
    );
}

/// The public signer sends and signs `x-amz-content-sha256`: the test suite's
/// post-x-www-form-urlencoded case in its signed-body form (aws-c-auth's `sign_body: true`).
#[test]
fn sign_request_signs_the_content_hash() {
    let out = sign_request(
        "POST",
        "example.amazonaws.com",
        "/",
        &headers(&[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Content-Length", "13"),
            ("User-Agent", "sluice"),
        ]),
        b"Param1=value1",
        &suite_creds(None),
        "us-east-1",
        "service",
        suite_time(),
    );
    assert_eq!(
        out,
        headers(&[
            ("x-amz-date", "20150830T123600Z"),
            (
                "x-amz-content-sha256",
                "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e"
            ),
            (
                "authorization",
                &suite_authz(
                    "content-length;content-type;host;x-amz-content-sha256;x-amz-date",
                    "d3875051da38690788ef43de4db0d8f280229d82040bfac253562e56c3f20e0b"
                )
            ),
        ])
    );
}

/// Bedrock requests signed by botocore (the AWS SDK for Python) for the same inputs: the model
/// id's `:` is sent as `%3A` and signed as `%253A`.
#[test]
fn sigv4_matches_botocore_for_bedrock_paths() {
    let body = br#"{"messages": [{"role": "user", "content": [{"text": "Hello"}]}]}"#;
    let hs = headers(&[("Content-Type", "application/json")]);
    let req = Signable {
        method: "POST",
        host: "bedrock-runtime.us-east-1.amazonaws.com",
        path_and_query: &model_path("anthropic.claude-3-haiku-20240307-v1:0", "converse"),
        headers: &hs,
        body,
    };
    assert_eq!(
        req.path_and_query,
        "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
    );
    let out = sign_v4(
        &req,
        &suite_creds(None),
        "us-east-1",
        SERVICE,
        "20150830T123600Z",
        false,
    );
    assert_eq!(out.last().unwrap().1, "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/bedrock/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=0aa62a16899cd4f3e118a266cbf16143b1d1839a3df68f37d287ba1cfd323484");

    // With a session token and the content hash signed (botocore given the same header).
    let body = br#"{"messages": [{"role": "user", "content": [{"text": "Hi"}]}], "inferenceConfig": {"maxTokens": 10}}"#;
    let creds = AwsCredentials {
        session_token: Some("FwoGZXIvYXdzEXAMPLETOKEN//+==".into()),
        ..suite_creds(None)
    };
    let out = sign_request(
        "POST",
        "bedrock-runtime.us-west-2.amazonaws.com",
        &model_path(
            "us.anthropic.claude-3-5-sonnet-20241022-v2:0",
            "converse-stream",
        ),
        &hs,
        body,
        &creds,
        "us-west-2",
        SERVICE,
        UNIX_EPOCH + Duration::from_secs(1_714_554_487),
    );
    assert_eq!(
        out,
        headers(&[
            ("x-amz-date", "20240501T090807Z"),
            ("x-amz-content-sha256", "600c6b30c176f0977843790ef8d75a3e736268161b8fda3063b5245d7d920ab2"),
            ("x-amz-security-token", "FwoGZXIvYXdzEXAMPLETOKEN//+=="),
            ("authorization", "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240501/us-west-2/bedrock/aws4_request, SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date;x-amz-security-token, Signature=b1d3d26e14dc02deea0d536abf14b19a7604bb7715b422e46b430e9973af3d06"),
        ])
    );
}

#[test]
fn credentials_from_params_then_environment() {
    let d = deployment_for(
        MODEL,
        ", aws_access_key_id: AKIA1, aws_secret_access_key: s3cr3t, aws_session_token: tok, aws_region_name: eu-west-1",
    );
    let (c, region) = credentials_with(&d, |k: &str| -> Option<String> {
        panic!("the environment is not read when params are set ({k})")
    })
    .unwrap();
    assert_eq!(
        c,
        AwsCredentials {
            access_key_id: "AKIA1".into(),
            secret_access_key: "s3cr3t".into(),
            session_token: Some("tok".into()),
        }
    );
    assert_eq!(region, "eu-west-1");
    assert!(!format!("{c:?}").contains("s3cr3t"));

    let d = deployment_for(MODEL, "");
    let vars = |k: &str| match k {
        "AWS_ACCESS_KEY_ID" => Some("AKIAENV".to_string()),
        "AWS_SECRET_ACCESS_KEY" => Some("envsecret".to_string()),
        "AWS_SESSION_TOKEN" => Some("envtok".to_string()),
        "AWS_DEFAULT_REGION" => Some("ap-south-1".to_string()),
        _ => None,
    };
    let (c, region) = credentials_with(&d, vars).unwrap();
    assert_eq!(c.access_key_id, "AKIAENV");
    assert_eq!(c.session_token.as_deref(), Some("envtok"));
    assert_eq!(region, "ap-south-1");
    assert!(credentials_with(&d, |_| None).is_none());
    let (_, region) = credentials_with(&d, |k| vars(k).filter(|_| k.contains("KEY"))).unwrap();
    assert_eq!(region, DEFAULT_REGION);

    // The region of an ARN model id.
    let d = deployment_for(
        "arn:aws:bedrock:eu-central-1:123456789012:inference-profile/eu.x:0",
        "",
    );
    let (_, region) = credentials_with(&d, |k| vars(k).filter(|_| k.contains("KEY"))).unwrap();
    assert_eq!(region, "eu-central-1");

    assert_eq!(
        api_base(&d, "eu-central-1"),
        "https://bedrock-runtime.eu-central-1.amazonaws.com"
    );
    let d = deployment_for(MODEL, ", aws_bedrock_runtime_endpoint: \"https://vpce-1.bedrock-runtime.us-east-1.vpce.amazonaws.com/\"");
    assert_eq!(
        api_base(&d, "us-east-1"),
        "https://vpce-1.bedrock-runtime.us-east-1.vpce.amazonaws.com"
    );
}

#[test]
fn api_key_means_bearer_auth() {
    let d = deployment_for(MODEL, ", api_key: bedrock-api-key-1");
    let mut b = RequestBody::parse(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
        .unwrap();
    let req = build_request(
        Operation::ChatCompletions,
        &mut b,
        &d,
        MODEL,
        false,
        &CallOptions::default(),
    )
    .unwrap();
    assert!(req
        .headers
        .contains(&("authorization".into(), "Bearer bedrock-api-key-1".into())));
}

// ---------------------------------------------------------------------------------------------
// Event stream

/// Encodes one event-stream message with string headers and real CRCs.
fn frame(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut h = vec![];
    for (name, value) in headers {
        h.push(name.len() as u8);
        h.extend_from_slice(name.as_bytes());
        h.push(7);
        h.extend_from_slice(&(value.len() as u16).to_be_bytes());
        h.extend_from_slice(value.as_bytes());
    }
    let total = (12 + h.len() + payload.len() + 4) as u32;
    let mut m = vec![];
    m.extend_from_slice(&total.to_be_bytes());
    m.extend_from_slice(&(h.len() as u32).to_be_bytes());
    let prelude_crc = crc32fast::hash(&m);
    m.extend_from_slice(&prelude_crc.to_be_bytes());
    m.extend_from_slice(&h);
    m.extend_from_slice(payload);
    let crc = crc32fast::hash(&m);
    m.extend_from_slice(&crc.to_be_bytes());
    m
}

fn event(kind: &str, payload: &Value) -> Vec<u8> {
    frame(
        &[
            (":event-type", kind),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ],
        payload.to_string().as_bytes(),
    )
}

/// The recorded ConverseStream exchange of `stream_tool_use.events.json` as bytes.
fn recorded_stream() -> Vec<u8> {
    let events = json_fixture("stream_tool_use.events.json");
    events
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| event(e["event"].as_str().unwrap(), &e["payload"]))
        .collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A frame holding every header value type, checked with botocore's event-stream parser.
#[test]
fn decoder_skips_every_header_type() {
    let bytes = unhex("0000009e0000007abbc4de3a0174000166010162027f017303fffe01690400000007016c0500000000000000090262610600030001020b3a6576656e742d7479706507000c6d6573736167655374617274027473080000018bcfe56800017509000102030405060708090a0b0c0d0e0f0d3a6d6573736167652d747970650700056576656e747b22726f6c65223a22617373697374616e74227dfca56ba3");
    for split in 1..=bytes.len() {
        let mut d = EventStreamDecoder::new();
        let mut got = vec![];
        for chunk in bytes.chunks(split) {
            d.feed(chunk);
            while let Some(m) = d.next_message() {
                got.push(m.unwrap());
            }
        }
        assert_eq!(d.finish(), Ok(()));
        assert_eq!(
            got,
            vec![EventMessage {
                headers: vec![
                    (":event-type".into(), "messageStart".into()),
                    (":message-type".into(), "event".into()),
                ],
                payload: br#"{"role":"assistant"}"#.to_vec(),
            }],
            "split {split}"
        );
    }
    // The frame helper agrees with that encoding.
    let m = frame(&[(":message-type", "event")], b"{}");
    let mut d = EventStreamDecoder::new();
    d.feed(&m);
    assert_eq!(
        d.next_message().unwrap().unwrap().header(":message-type"),
        Some("event")
    );
    assert!(d.next_message().is_none());
}

/// Runs the stream decoder over `input` cut into `split`-sized pieces.
fn decode(input: &[u8], split: usize, include_usage: bool) -> (Vec<Value>, Option<Usage>) {
    let mut d = BedrockStream::new("claude-bedrock", include_usage);
    let mut out = vec![];
    for chunk in input.chunks(split) {
        d.feed(chunk, &mut out);
    }
    d.finish(&mut out);
    let text = String::from_utf8(out).unwrap();
    let mut id = None;
    let events = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let data = e.strip_prefix("data: ").expect("data events only");
            if data == "[DONE]" {
                return json!("[DONE]");
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if v.get("error").is_some() {
                return v;
            }
            let this_id = v["id"].as_str().unwrap().to_string();
            assert!(this_id.starts_with("chatcmpl-"));
            assert_eq!(
                id.get_or_insert(this_id.clone()),
                &this_id,
                "one id per stream"
            );
            assert_eq!(v["object"], "chat.completion.chunk");
            assert_eq!(v["model"], "claude-bedrock");
            match v["choices"].as_array().unwrap().first() {
                Some(c) => json!([c["delta"], c["finish_reason"]]),
                None => json!(["usage", {
                    "prompt_tokens": v["usage"]["prompt_tokens"],
                    "completion_tokens": v["usage"]["completion_tokens"],
                    "total_tokens": v["usage"]["total_tokens"],
                }]),
            }
        })
        .collect();
    (events, d.usage())
}

#[test]
fn stream_decoding_matches_golden_for_every_split() {
    let input = recorded_stream();
    let expected = json_fixture("stream_tool_use.out.json");
    for split in 1..=input.len() {
        let (events, usage) = decode(&input, split, true);
        assert_eq!(Value::Array(events), expected, "split {split}");
        assert_eq!(usage.unwrap().total_tokens, 561);
    }
    // Without include_usage the usage chunk is not sent, but usage is still captured.
    let (events, usage) = decode(&input, 13, false);
    assert!(!events.iter().any(|e| e[0] == "usage"));
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(usage.unwrap().completion_tokens, 89);
}

fn error_of(events: &[Value]) -> &Value {
    events
        .iter()
        .find(|e| e.get("error").is_some())
        .expect("an in-band error")
}

#[test]
fn corrupt_crcs_yield_an_in_band_error() {
    let input = recorded_stream();
    let events = json_fixture("stream_tool_use.events.json");
    let first = event("messageStart", &events[0]["payload"]).len();
    // A flipped payload byte in the second message: message CRC mismatch.
    let mut bad = input.clone();
    bad[first + 40] ^= 0x01;
    // A flipped length byte in the second message: prelude CRC mismatch.
    let mut bad_prelude = input.clone();
    bad_prelude[first + 2] ^= 0x40;
    for (input, what) in [(bad, "message CRC"), (bad_prelude, "prelude CRC")] {
        for split in [1, 7, 64, input.len()] {
            let (events, _) = decode(&input, split, true);
            let err = &error_of(&events)["error"];
            assert!(err["message"].as_str().unwrap().contains(what), "{err}");
            assert_eq!(err["code"], "502");
            assert_eq!(events[0][0], json!({"role": "assistant", "content": ""}));
            assert_eq!(events.last().unwrap(), "[DONE]", "split {split}");
            assert_eq!(
                events.iter().filter(|e| e.get("error").is_some()).count(),
                1
            );
        }
    }
}

#[test]
fn exceptions_and_truncation_are_reported_in_band() {
    let mut input = event("messageStart", &json!({"role": "assistant"}));
    input.extend(frame(
        &[
            (":exception-type", "throttlingException"),
            (":content-type", "application/json"),
            (":message-type", "exception"),
        ],
        br#"{"message":"Too many tokens, please wait before trying again."}"#,
    ));
    let (events, _) = decode(&input, 5, false);
    let err = &error_of(&events)["error"];
    assert_eq!(err["type"], "rate_limit_error");
    assert_eq!(err["code"], "429");
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("Too many tokens, please wait"));
    assert_eq!(events.last().unwrap(), "[DONE]");

    // The connection dropped inside a message.
    let full = recorded_stream();
    let (events, _) = decode(&full[..full.len() - 10], 9, true);
    assert!(error_of(&events)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("stream ended inside a message"));
    assert_eq!(events.last().unwrap(), "[DONE]");

    // The stream stopped cleanly between messages but before messageStop.
    let first = event("messageStart", &json!({"role": "assistant"}));
    let (events, usage) = decode(&first, 3, true);
    assert!(error_of(&events)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("before messageStop"));
    assert!(usage.is_none());
}

#[test]
fn frequent_messages_are_written_as_the_value_path_writes_them() {
    let mut input = recorded_stream();
    // Escapes (canonical and not), reasoning, the JSON-answer tool, odd types, repeated keys.
    for (kind, payload) in [
        (
            "contentBlockDelta",
            r#"{"contentBlockIndex":0,"delta":{"text":"a \"q\" \\ \n\u0001 \u00e9 \/"}}"#,
        ),
        (
            "contentBlockDelta",
            r#"{"contentBlockIndex":0,"delta":{"reasoningContent":{"text":"hm"}}}"#,
        ),
        (
            "contentBlockStart",
            r#"{"contentBlockIndex":7,"start":{"toolUse":{"name":"json_tool_call","toolUseId":"t"}}}"#,
        ),
        (
            "contentBlockDelta",
            r#"{"contentBlockIndex":7,"delta":{"toolUse":{"input":"{\"a\":"}}}"#,
        ),
        (
            "contentBlockDelta",
            r#"{"contentBlockIndex":7,"delta":{"toolUse":{"input":""}}}"#,
        ),
        (
            "contentBlockDelta",
            r#"{"contentBlockIndex":"1","delta":{"toolUse":{"input":"x"}}}"#,
        ),
        (
            "contentBlockDelta",
            r#"{"contentBlockIndex":1,"delta":{"text":5,"toolUse":{"input":"y"}}}"#,
        ),
        ("contentBlockDelta", r#"{"delta":{"text":"a","text":"b"}}"#),
        ("contentBlockDelta", r#"{"delta":{"te\u0078t":"c"}}"#),
        ("contentBlockDelta", r#"{"delta":{}}"#),
        ("contentBlockDelta", r#"{"delta":{"text":"e"}} x"#),
        ("contentBlockDelta", r#"[1]"#),
        ("contentBlockStop", r#"{"contentBlockIndex":0"#),
        ("somethingNew", r#"{"a":1}"#),
    ] {
        input.extend(frame(
            &[(":event-type", kind), (":message-type", "event")],
            payload.as_bytes(),
        ));
    }
    let mut fast = BedrockStream::new("m", true);
    let mut value = BedrockStream::new("m", true);
    value.writer = fast.writer.clone();
    let mut decoder = EventStreamDecoder::new();
    decoder.feed(&input);
    let mut n = 0;
    while let Some(at) = decoder.next_frame() {
        let at = at.unwrap();
        let m = decoder.frame(&at);
        let (mut a, mut b) = (vec![], vec![]);
        fast.message(&m, &mut a);
        value.message_value(&m, &mut b);
        assert_eq!(
            String::from_utf8_lossy(&a),
            String::from_utf8_lossy(&b),
            "{}",
            String::from_utf8_lossy(m.payload)
        );
        decoder.consume(&at);
        n += 1;
    }
    assert!(n > 20);
}

#[test]
fn text_responses_are_written_as_the_value_path_writes_them() {
    let fixture_body = fixture("response_tool_use.json");
    let bodies: Vec<&[u8]> = vec![
        br#"{"output":{"message":{"role":"assistant","content":[{"text":"He said \"hi\"\n\u00e9\/"}]}},"stopReason":"max_tokens","usage":{"inputTokens":4,"outputTokens":3,"cacheReadInputTokens":2,"cacheWriteInputTokens":1}}"#,
        br#"{"output":{"message":{"content":[]}},"stopReason":null}"#,
        br#"{"output":{"message":{"content":[{"text":"a"},{"text":"b"}]}}}"#,
        br#"{"output":{"message":{"content":[{"reasoningContent":{"reasoningText":{"text":"r"}}},{"text":"b"}]}}}"#,
        br#"{"output":{"message":{}}}"#,
        br#"{"output":{"message":{"content":[{"text":"x"}]}},"usage":{"inputTokens":null}}"#,
        br#"{"output":{"message":{"content":[{"text":"x"}]}},"stopReason":"guardrail_intervened"}"#,
        &fixture_body,
    ];
    for body in bodies {
        let fast = translate_chat(body, "m").map(|(b, u)| (comparable(&b, true), u));
        let value = value_chat(body, "m").map(|(b, u)| (comparable(&b, true), u));
        assert_eq!(fast.ok(), value.ok(), "{}", String::from_utf8_lossy(body));
    }
}

#[test]
fn signing_keys_are_reused_only_for_the_same_secret_date_region_and_service() {
    let derive = |secret: &str, date: &str, region: &str, service: &str| {
        let k = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
        let k = hmac(&k, region.as_bytes());
        let k = hmac(&k, service.as_bytes());
        hmac(&k, b"aws4_request")
    };
    let cases = [
        ("secret-a", "20250605", "us-east-1", "bedrock"),
        ("secret-b", "20250605", "us-east-1", "bedrock"),
        ("secret-a", "20250606", "us-east-1", "bedrock"),
        ("secret-a", "20250606", "eu-west-1", "bedrock"),
        ("secret-a", "20250606", "eu-west-1", "s3"),
    ];
    for round in 0..2 {
        for (secret, date, region, service) in cases {
            assert_eq!(
                signing_key(secret, date, region, service),
                derive(secret, date, region, service),
                "{round}: {secret} {date} {region} {service}"
            );
        }
    }
}
