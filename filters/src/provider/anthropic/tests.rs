//! Golden tests against Anthropic's documented wire formats (fixtures in `filters/fixtures/anthropic`).

use super::*;
use crate::provider::common::comparable;
use std::path::Path;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/anthropic");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(FIXTURES).join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn json_fixture(name: &str) -> Value {
    serde_json::from_slice(&fixture(name)).unwrap()
}

fn deployment(extra: &str) -> Deployment {
    let c = sluice_config::parse_config(
        &format!("model_list:\n  - {{model_name: claude, litellm_params: {{model: anthropic/claude-3-5-sonnet-20241022, api_key: sk-ant-test{extra}}}}}\n"),
        Path::new("t.yaml"),
    )
    .unwrap();
    c.deployments[0].clone()
}

fn build(body: &[u8], opts: CallOptions) -> Result<UpstreamRequest, ApiError> {
    let d = deployment("");
    let mut b = RequestBody::parse(body).unwrap();
    let stream = b.bool_field("stream").unwrap().unwrap_or(false);
    build_request(
        Operation::ChatCompletions,
        &mut b,
        &d,
        "claude-3-5-sonnet-20241022",
        stream,
        &opts,
    )
}

#[test]
fn request_translation_matches_golden() {
    let req = build(&fixture("chat_tools.in.json"), CallOptions::default()).unwrap();
    assert_eq!(req.path, "/v1/messages");
    assert!(req
        .headers
        .contains(&("x-api-key".into(), "sk-ant-test".into())));
    assert!(req
        .headers
        .contains(&("anthropic-version".into(), "2023-06-01".into())));
    let got: Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(got, json_fixture("chat_tools.out.json"));
}

#[test]
fn max_tokens_defaults_and_unsupported_params() {
    let req = build(
        br#"{"model":"c","messages":[{"role":"user","content":"hi"}]}"#,
        CallOptions::default(),
    )
    .unwrap();
    let got: Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(got["max_tokens"], DEFAULT_MAX_TOKENS);
    assert!(got.get("system").is_none());

    let body = br#"{"model":"c","messages":[{"role":"user","content":"hi"}],"presence_penalty":0.5,"seed":1}"#;
    let e = build(body, CallOptions::default()).unwrap_err();
    assert_eq!(e.status, 400);
    assert!(
        e.message
            .contains("anthropic does not support parameters: ['presence_penalty', 'seed']"),
        "{}",
        e.message
    );
    assert!(e.message.contains("drop_params"));
    let req = build(body, CallOptions { drop_params: true }).unwrap();
    let got: Value = serde_json::from_slice(&req.body).unwrap();
    assert!(got.get("presence_penalty").is_none() && got.get("seed").is_none());
}

#[test]
fn response_translation_matches_golden() {
    let (body, usage) = translate_response(
        &fixture("response_tool_use.json"),
        "claude-3-5-sonnet-20241022",
    )
    .unwrap();
    let mut got: Value = serde_json::from_slice(&body).unwrap();
    assert!(got["created"].as_u64().unwrap() > 0);
    got.as_object_mut().unwrap().remove("created");
    assert_eq!(got, json_fixture("response_tool_use.out.json"));
    let u = usage.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (582, 89, 671)
    );
}

#[test]
fn response_format_uses_a_forced_tool_and_returns_its_input_as_content() {
    let req = build(
        br#"{"model":"c","messages":[{"role":"user","content":"json please"}],"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object","properties":{"answer":{"type":"integer"}}}}}}"#,
        CallOptions::default(),
    )
    .unwrap();
    let got: Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(
        got["tool_choice"],
        json!({"type": "tool", "name": "json_tool_call"})
    );
    assert_eq!(
        got["tools"][0]["input_schema"]["properties"]["answer"]["type"],
        "integer"
    );
    let resp = br#"{"id":"msg_1","content":[{"type":"tool_use","id":"t","name":"json_tool_call","input":{"answer":42}}],"stop_reason":"tool_use","usage":{"input_tokens":5,"output_tokens":3}}"#;
    let (body, _) = translate_response(resp, "m").unwrap();
    let got: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(got["choices"][0]["message"]["content"], "{\"answer\":42}");
    assert!(got["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(got["choices"][0]["finish_reason"], "stop");
}

/// Runs the stream decoder over `input` cut into `splits`-sized pieces.
fn decode(input: &[u8], split: usize, include_usage: bool) -> (Vec<Value>, Option<Usage>) {
    let mut d = AnthropicStream::new("claude-3-5-sonnet-20241022", include_usage);
    let mut out = vec![];
    for chunk in input.chunks(split) {
        d.feed(chunk, &mut out);
    }
    d.finish(&mut out);
    let text = String::from_utf8(out).unwrap();
    let events = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let data = e.strip_prefix("data: ").expect("data events only");
            if data == "[DONE]" {
                return json!("[DONE]");
            }
            let v: Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["id"], "msg_014p7gG3wDgGV9EUtLvnow3U");
            assert_eq!(v["object"], "chat.completion.chunk");
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
fn stream_decoding_matches_golden_for_any_split() {
    let input = fixture("stream_tool_use.sse");
    let expected = json_fixture("stream_tool_use.out.json");
    for split in [1, 2, 3, 5, 7, 16, 61, 200, input.len()] {
        let (events, usage) = decode(&input, split, true);
        assert_eq!(Value::Array(events), expected, "split {split}");
        assert_eq!(usage.unwrap().total_tokens, 561);
    }
    // Without include_usage the usage chunk is not sent, but usage is still captured.
    let (events, usage) = decode(&input, 13, false);
    assert!(!events.iter().any(|e| e[0] == "usage"));
    assert_eq!(usage.unwrap().completion_tokens, 89);
}

#[test]
fn stream_error_event_is_reported_in_band() {
    let input = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_014p7gG3wDgGV9EUtLvnow3U\",\"usage\":{\"input_tokens\":1,\"output_tokens\":1}}}\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
    let mut d = AnthropicStream::new("m", false);
    let mut out = vec![];
    d.feed(input, &mut out);
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("\"error\""), "{text}");
    assert!(text.contains("Overloaded"));
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[test]
fn frequent_events_are_written_as_the_value_path_writes_them() {
    let mut input = fixture("stream_tool_use.sse");
    // Escapes (canonical and not), thinking, the JSON-answer tool, odd types and repeated keys.
    input.extend_from_slice(
        br#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a \"q\" \\ \n\u0001 \u00e9 \/ \ud83d\ude00"}}

data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hm\tm"}}

data: {"type":"content_block_start","index":7,"content_block":{"type":"tool_use","id":"t","name":"json_tool_call","input":{}}}

data: {"type":"content_block_delta","index":7,"delta":{"type":"input_json_delta","partial_json":"{\"a\":"}}

data: {"type":"content_block_delta","index":7,"delta":{"type":"input_json_delta","partial_json":""}}

data: {"type":"content_block_delta","index":"1","delta":{"type":"input_json_delta","partial_json":"x"}}

data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":3}}

data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta"}}

data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a","text":"b"}}

data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","te\u0078t":"c"}}

data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":null}}

data: {"type":"content_block_delta","index":0,"delta":{"type":"other","text":"d"}}

data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"e"}} x

data: {"type":"content_block_stop","index":0,"extra":[1,{"a":null}]}

data: {"type":"ping"}

"#,
    );
    let mut fast = AnthropicStream::new("m", true);
    let mut value = AnthropicStream::new("m", true);
    value.created = fast.created;
    value.writer = fast.writer.clone();
    let mut events = vec![];
    SseSplitter::default().feed(&input, |e| events.push(e.to_vec()));
    assert!(events.len() > 20);
    for e in &events {
        let (mut a, mut b) = (vec![], vec![]);
        fast.event(e, &mut a);
        value.event_value(event_data(e).unwrap(), &mut b);
        assert_eq!(
            String::from_utf8_lossy(&a),
            String::from_utf8_lossy(&b),
            "{}",
            String::from_utf8_lossy(e)
        );
    }
}

#[test]
fn text_responses_are_written_as_the_value_path_writes_them() {
    let fixture_body = fixture("response_tool_use.json");
    let bodies: Vec<&[u8]> = vec![
        br#"{"id":"msg_1","type":"message","content":[{"type":"text","text":"He said \"hi\"\n\u00e9\/"}],"stop_reason":"max_tokens","usage":{"input_tokens":4,"output_tokens":3,"cache_read_input_tokens":2,"cache_creation_input_tokens":1}}"#,
        br#"{"content":[],"stop_reason":null}"#,
        br#"{"id":"m","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}"#,
        br#"{"id":"m","content":[{"type":"thinking","thinking":"t"},{"type":"text","text":"b"}]}"#,
        br#"{"id":"m","content":[{"type":"other","text":"x"}],"stop_reason":"refusal"}"#,
        br#"{"id":"m","content":[{"text":"x"}]}"#,
        br#"{"id":"m","content":[{"type":"text","text":"x"}],"usage":{"input_tokens":1.5}}"#,
        br#"{"id":"m","content":[{"type":"text","text":"x"}],"id":"n"}"#,
        &fixture_body,
    ];
    for body in bodies {
        let fast = translate_response(body, "m").map(|(b, u)| (comparable(&b, false), u));
        let value = value_response(body, "m").map(|(b, u)| (comparable(&b, false), u));
        assert_eq!(fast.ok(), value.ok(), "{}", String::from_utf8_lossy(body));
    }
}

#[test]
fn tool_choice_maps_every_openai_form() {
    let choice = |c: &str| {
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"tools":[{{"type":"function","function":{{"name":"f"}}}}],"tool_choice":{c}}}"#
        );
        build(body.as_bytes(), CallOptions::default()).map(|r| {
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            v.get("tool_choice").cloned()
        })
    };
    assert_eq!(choice(r#""auto""#).unwrap(), Some(json!({"type": "auto"})));
    assert_eq!(
        choice(r#" "auto" "#).unwrap(),
        Some(json!({"type": "auto"}))
    );
    assert_eq!(choice(r#""none""#).unwrap(), Some(json!({"type": "none"})));
    assert_eq!(
        choice(r#""required""#).unwrap(),
        Some(json!({"type": "any"}))
    );
    assert_eq!(choice("null").unwrap(), None);
    assert_eq!(
        choice(r#"{"type":"function","function":{"name":"f"}}"#).unwrap(),
        Some(json!({"type": "tool", "name": "f"}))
    );
    for bad_choice in [r#"{"type":"function"}"#, "7", r#""sometimes""#] {
        let e = choice(bad_choice).unwrap_err();
        assert_eq!(
            (e.status, e.param.as_deref()),
            (400, Some("tool_choice")),
            "{bad_choice}"
        );
    }
}
