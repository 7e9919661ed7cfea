//! Criterion micro-benchmarks of provider translation (`sluice_filters::provider`), one case per
//! wire format:
//!
//! * `request/<provider>`: a ~2 KB OpenAI chat body (system prompt, user/assistant turns, a tool
//!   call round trip, one tool) from `RequestBody::parse` through `Provider::build_request`, as
//!   the gateway does per request. `request/bedrock_sigv4` adds the SigV4 signature the proxy
//!   computes for Bedrock deployments with IAM keys.
//! * `response/<provider>`: `Provider::translate_response` of a ~1 KB non-streamed answer in the
//!   provider's documented shape.
//! * `stream/<provider>`: `StreamDecoder::feed` of a 50-event stream in the provider's format
//!   (one event per chunk; AWS event-stream frames with real CRC32s for Bedrock), then
//!   `finish`. Decoder construction is not timed. Criterion's throughput is chunks per second;
//!   time per chunk is the reported time divided by 50.
//!
//! Every input is checked once before timing, so a translator that starts failing fails the
//! benchmark instead of timing its error path.
//!
//! ```sh
//! cargo bench -p sluice-benches --bench translation            # everything (~2 min)
//! cargo bench -p sluice-benches --bench translation -- stream/  # one group
//! ```

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sluice_config::Deployment;
use sluice_filters::body::RequestBody;
use sluice_filters::provider::{bedrock, CallOptions, Operation, Provider};

/// Events in every benchmarked stream.
const STREAM_EVENTS: usize = 50;
/// The model name the client asked for (what responses and chunks report).
const CLIENT_MODEL: &str = "travel-assistant";
const OP: Operation = Operation::ChatCompletions;

const CONFIG: &str = r#"
model_list:
  - model_name: openai
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: https://api.openai.com/v1
      api_key: sk-bench-0123456789abcdef
  - model_name: azure
    litellm_params:
      model: azure/gpt-4o-mini-prod
      api_base: https://northwind-eastus.openai.azure.com
      api_key: 0123456789abcdef0123456789abcdef
      api_version: "2024-10-21"
  - model_name: anthropic
    litellm_params:
      model: anthropic/claude-3-5-sonnet-20241022
      api_key: sk-ant-bench-0123456789abcdef
  - model_name: gemini
    litellm_params:
      model: gemini/gemini-2.0-flash
      api_key: AIzaSyBench0123456789abcdef
  - model_name: vertex_ai
    litellm_params:
      model: vertex_ai/gemini-2.0-flash-001
      vertex_project: northwind-prod-4821
      vertex_location: us-central1
  - model_name: bedrock
    litellm_params:
      model: bedrock/anthropic.claude-3-5-sonnet-20241022-v2:0
      aws_access_key_id: AKIAIOSFODNN7EXAMPLE
      aws_secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY
      aws_region_name: us-east-1
  - model_name: ollama
    litellm_params:
      model: ollama_chat/llama3.1:8b
      api_base: http://127.0.0.1:11434
  - model_name: cohere
    litellm_params:
      model: cohere_chat/command-r-plus-08-2024
      api_key: co-bench-0123456789abcdef
"#;

/// The client's request: system prompt, a few turns, one tool call round trip and one tool.
const REQUEST: &str = r#"{
  "model": "travel-assistant",
  "messages": [
    {"role": "system", "content": "You are a concise travel assistant for Northwind Airlines. Answer in plain English, cite the fare rules when they matter, and call get_flight_status whenever the user asks about a specific flight. Never invent flight numbers, gate assignments or departure times; if you do not know, say so and offer to look it up."},
    {"role": "user", "content": "Hi! I'm flying from Boston to Lisbon next Thursday and I'd like to know what the checked baggage allowance is on a Basic Economy ticket."},
    {"role": "assistant", "content": "On Basic Economy transatlantic fares you get one personal item and one carry-on bag for free. A first checked bag (up to 23 kg / 50 lb) costs $75 each way when prepaid online, or $100 at the airport. Would you like me to look up your booking?"},
    {"role": "user", "content": "Yes please, it's flight NW 218 on the 12th. Is it on time?"},
    {"role": "assistant", "content": null, "tool_calls": [{"id": "call_8dKq2XwLmN4pRt7V", "type": "function", "function": {"name": "get_flight_status", "arguments": "{\"flight_number\":\"NW218\",\"date\":\"2025-06-12\"}"}}]},
    {"role": "tool", "tool_call_id": "call_8dKq2XwLmN4pRt7V", "content": "{\"flight_number\":\"NW218\",\"status\":\"scheduled\",\"departure\":\"2025-06-12T21:35:00-04:00\",\"gate\":\"E7\",\"aircraft\":\"A321neo\"}"},
    {"role": "assistant", "content": "NW 218 is currently scheduled to leave on time at 9:35 pm from gate E7 at Logan, operated by an A321neo."},
    {"role": "user", "content": "Great. If it's delayed by more than three hours, what compensation am I entitled to, and could I switch to the morning flight instead without paying a change fee?"}
  ],
  "tools": [{"type": "function", "function": {"name": "get_flight_status", "description": "Look up the live status of a flight by its number and local departure date.", "parameters": {"type": "object", "properties": {"flight_number": {"type": "string", "description": "IATA flight number, e.g. NW218"}, "date": {"type": "string", "description": "Local departure date, YYYY-MM-DD"}}, "required": ["flight_number", "date"]}}}],
  "tool_choice": "auto",
  "temperature": 0.3,
  "top_p": 0.9,
  "max_tokens": 512,
  "stream": false
}"#;

/// The assistant's answer (JSON-escaped), used in every response and split into stream tokens.
const ANSWER: &str = r#"Good news on both counts. Because NW 218 departs from the United States on a US carrier, EU261 does not apply, but Northwind's customer service plan covers you: for a controllable delay of more than three hours you can request a $150 travel credit or 10,000 miles, plus a meal voucher once the delay passes four hours.\n\nOn your second question: Basic Economy fares normally cannot be changed, but when a delay of 90 minutes or more is announced, Northwind waives the change fee and the fare difference for a same-day flight on the same route. The morning departure, NW 216, leaves at 8:05 am and currently shows 14 open seats. Tell me if you would like me to move you, and I will check the \"same-day change\" rules on your ticket first."#;

/// Arguments of the tool call the streams end with.
const TOOL_ARGS: &str = r#"{"flight_number": "NW216", "date": "2025-06-12"}"#;

// ---------------------------------------------------------------------------------------------
// Non-streamed responses, in each provider's documented shape.

fn openai_response() -> String {
    format!(
        r#"{{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion","created":1741569952,"model":"gpt-4o-mini-2024-07-18","choices":[{{"index":0,"message":{{"role":"assistant","content":"{ANSWER}","refusal":null,"annotations":[]}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":412,"completion_tokens":168,"total_tokens":580,"prompt_tokens_details":{{"cached_tokens":0,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}},"service_tier":"default","system_fingerprint":"fp_06737a9306"}}"#
    )
}

const AZURE_FILTERS: &str = r#"{"hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}"#;

fn azure_response() -> String {
    format!(
        r#"{{"choices":[{{"content_filter_results":{AZURE_FILTERS},"finish_reason":"stop","index":0,"logprobs":null,"message":{{"content":"{ANSWER}","refusal":null,"role":"assistant"}}}}],"created":1741569952,"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","model":"gpt-4o-mini-2024-07-18","object":"chat.completion","prompt_filter_results":[{{"prompt_index":0,"content_filter_results":{AZURE_FILTERS}}}],"system_fingerprint":"fp_b705f0c291","usage":{{"completion_tokens":168,"completion_tokens_details":{{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":0,"rejected_prediction_tokens":0}},"prompt_tokens":412,"prompt_tokens_details":{{"audio_tokens":0,"cached_tokens":0}},"total_tokens":580}}}}"#
    )
}

fn anthropic_response() -> String {
    format!(
        r#"{{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-3-5-sonnet-20241022","content":[{{"type":"text","text":"{ANSWER}"}}],"stop_reason":"end_turn","stop_sequence":null,"usage":{{"input_tokens":412,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":168}}}}"#
    )
}

fn gemini_response() -> String {
    format!(
        r#"{{"candidates":[{{"content":{{"parts":[{{"text":"{ANSWER}"}}],"role":"model"}},"finishReason":"STOP","avgLogprobs":-0.2137864953790392}}],"usageMetadata":{{"promptTokenCount":412,"candidatesTokenCount":168,"totalTokenCount":580,"promptTokensDetails":[{{"modality":"TEXT","tokenCount":412}}],"candidatesTokensDetails":[{{"modality":"TEXT","tokenCount":168}}]}},"modelVersion":"gemini-2.0-flash","responseId":"mJXXZ6uFK4eXm9IP3pXS4Qo"}}"#
    )
}

fn vertex_response() -> String {
    format!(
        r#"{{"candidates":[{{"content":{{"role":"model","parts":[{{"text":"{ANSWER}"}}]}},"finishReason":"STOP","safetyRatings":[{{"category":"HARM_CATEGORY_HATE_SPEECH","probability":"NEGLIGIBLE","probabilityScore":0.04,"severity":"HARM_SEVERITY_NEGLIGIBLE","severityScore":0.05}},{{"category":"HARM_CATEGORY_DANGEROUS_CONTENT","probability":"NEGLIGIBLE","probabilityScore":0.03,"severity":"HARM_SEVERITY_NEGLIGIBLE","severityScore":0.02}}],"avgLogprobs":-0.2137864953790392}}],"usageMetadata":{{"promptTokenCount":412,"candidatesTokenCount":168,"totalTokenCount":580,"trafficType":"ON_DEMAND"}},"modelVersion":"gemini-2.0-flash-001","createTime":"2025-06-05T14:22:07.123456Z","responseId":"X6JBaKfOB6e9nvgPr9aP8Ac"}}"#
    )
}

fn bedrock_response() -> String {
    format!(
        r#"{{"metrics":{{"latencyMs":2150}},"output":{{"message":{{"content":[{{"text":"{ANSWER}"}}],"role":"assistant"}}}},"stopReason":"end_turn","usage":{{"inputTokens":412,"outputTokens":168,"totalTokens":580}}}}"#
    )
}

fn ollama_response() -> String {
    format!(
        r#"{{"model":"llama3.1:8b","created_at":"2025-06-05T14:22:07.123456Z","message":{{"role":"assistant","content":"{ANSWER}"}},"done_reason":"stop","done":true,"total_duration":5191566416,"load_duration":2154458,"prompt_eval_count":412,"prompt_eval_duration":383809000,"eval_count":168,"eval_duration":4799921000}}"#
    )
}

fn cohere_response() -> String {
    format!(
        r#"{{"id":"c14c80c3-18eb-4519-9460-6c92edd8cfb4","message":{{"role":"assistant","content":[{{"type":"text","text":"{ANSWER}"}}]}},"finish_reason":"COMPLETE","usage":{{"billed_units":{{"input_tokens":412,"output_tokens":168}},"tokens":{{"input_tokens":478,"output_tokens":170}}}}}}"#
    )
}

// ---------------------------------------------------------------------------------------------
// Streams: exactly `STREAM_EVENTS` events each, one event per chunk.

/// Text tokens as streamed (each a JSON string body, already escaped), cycling through the
/// answer when more are needed.
fn tokens(n: usize) -> Vec<&'static str> {
    ANSWER.split_inclusive(' ').cycle().take(n).collect()
}

/// `TOOL_ARGS` in `n` pieces, each JSON-escaped (without quotes) for a partial-arguments field.
fn tool_arg_pieces(n: usize) -> Vec<String> {
    let chars: Vec<char> = TOOL_ARGS.chars().collect();
    let size = chars.len().div_ceil(n);
    chars
        .chunks(size)
        .map(|c| {
            let s: String = c.iter().collect();
            let quoted = serde_json::to_string(&s).expect("strings serialize");
            quoted[1..quoted.len() - 1].to_string()
        })
        .collect()
}

fn sse(data: &str) -> Vec<u8> {
    format!("data: {data}\n\n").into_bytes()
}

fn named_sse(event: &str, data: &str) -> Vec<u8> {
    format!("event: {event}\ndata: {data}\n\n").into_bytes()
}

fn check_len(name: &str, events: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    assert_eq!(
        events.len(),
        STREAM_EVENTS,
        "{name} stream has the wrong length"
    );
    events
}

/// OpenAI with `stream_options.include_usage` (which Sluice injects): every chunk carries
/// `"usage":null`, the last one before `[DONE]` the totals.
fn openai_stream() -> Vec<Vec<u8>> {
    let head = r#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741569952,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_06737a9306","choices":"#;
    let mut events = vec![sse(&format!(
        r#"{head}[{{"index":0,"delta":{{"role":"assistant","content":"","refusal":null}},"logprobs":null,"finish_reason":null}}],"usage":null}}"#
    ))];
    for t in tokens(STREAM_EVENTS - 4) {
        events.push(sse(&format!(
            r#"{head}[{{"index":0,"delta":{{"content":"{t}"}},"logprobs":null,"finish_reason":null}}],"usage":null}}"#
        )));
    }
    events.push(sse(&format!(
        r#"{head}[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"stop"}}],"usage":null}}"#
    )));
    events.push(sse(&format!(
        r#"{head}[],"usage":{{"prompt_tokens":412,"completion_tokens":46,"total_tokens":458,"prompt_tokens_details":{{"cached_tokens":0,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}}}"#
    )));
    events.push(sse("[DONE]"));
    check_len("openai", events)
}

/// Azure: a leading prompt-filter chunk, content-filter results on every choice.
fn azure_stream() -> Vec<Vec<u8>> {
    let mut events = vec![sse(&format!(
        r#"{{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{{"prompt_index":0,"content_filter_results":{AZURE_FILTERS}}}]}}"#
    ))];
    let chunk = |choice: String, usage: &str| {
        sse(&format!(
            r#"{{"choices":[{choice}],"created":1741569952,"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","model":"gpt-4o-mini-2024-07-18","object":"chat.completion.chunk","system_fingerprint":"fp_b705f0c291","usage":{usage}}}"#
        ))
    };
    events.push(chunk(
        r#"{"content_filter_results":{},"delta":{"content":"","refusal":null,"role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}"#.to_string(),
        "null",
    ));
    for t in tokens(STREAM_EVENTS - 5) {
        events.push(chunk(
            format!(
                r#"{{"content_filter_results":{AZURE_FILTERS},"delta":{{"content":"{t}"}},"finish_reason":null,"index":0,"logprobs":null}}"#
            ),
            "null",
        ));
    }
    events.push(chunk(
        r#"{"content_filter_results":{},"delta":{},"finish_reason":"stop","index":0,"logprobs":null}"#.to_string(),
        "null",
    ));
    events.push(sse(
        r#"{"choices":[],"created":1741569952,"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","model":"gpt-4o-mini-2024-07-18","object":"chat.completion.chunk","system_fingerprint":"fp_b705f0c291","usage":{"completion_tokens":45,"prompt_tokens":412,"total_tokens":457}}"#,
    ));
    events.push(sse("[DONE]"));
    check_len("azure", events)
}

/// Anthropic Messages SSE: text block, then a `tool_use` block streamed as `input_json_delta`s.
fn anthropic_stream() -> Vec<Vec<u8>> {
    let args = tool_arg_pieces(11);
    let text = STREAM_EVENTS - 9 - args.len();
    let mut events = vec![
        named_sse(
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-3-5-sonnet-20241022","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":412,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}"#,
        ),
        named_sse(
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
        named_sse("ping", r#"{"type": "ping"}"#),
    ];
    for t in tokens(text) {
        events.push(named_sse(
            "content_block_delta",
            &format!(
                r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"{t}"}}}}"#
            ),
        ));
    }
    events.push(named_sse(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#,
    ));
    events.push(named_sse(
        "content_block_start",
        r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_flight_status","input":{}}}"#,
    ));
    events.push(named_sse(
        "content_block_delta",
        r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}"#,
    ));
    for a in &args {
        events.push(named_sse(
            "content_block_delta",
            &format!(
                r#"{{"type":"content_block_delta","index":1,"delta":{{"type":"input_json_delta","partial_json":"{a}"}}}}"#
            ),
        ));
    }
    events.push(named_sse(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":1}"#,
    ));
    events.push(named_sse(
        "message_delta",
        r#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}"#,
    ));
    events.push(named_sse("message_stop", r#"{"type":"message_stop"}"#));
    check_len("anthropic", events)
}

/// Gemini / Vertex `streamGenerateContent?alt=sse` (CRLF-separated events): text chunks with
/// running usage, a `functionCall` chunk, and a final chunk with `finishReason`.
fn gemini_stream(vertex: bool) -> Vec<Vec<u8>> {
    let tail = if vertex {
        r#""modelVersion":"gemini-2.0-flash-001","createTime":"2025-06-05T14:22:07.123456Z","responseId":"X6JBaKfOB6e9nvgPr9aP8Ac""#
    } else {
        r#""modelVersion":"gemini-2.0-flash","responseId":"mJXXZ6uFK4eXm9IP3pXS4Qo""#
    };
    let event = |data: String| format!("data: {data}\r\n\r\n").into_bytes();
    let mut events = vec![];
    // Gemini sends a few words per chunk.
    let words = tokens(3 * (STREAM_EVENTS - 2));
    for (i, group) in words.chunks(3).enumerate() {
        let text = group.concat();
        events.push(event(format!(
            r#"{{"candidates":[{{"content":{{"parts":[{{"text":"{text}"}}],"role":"model"}},"index":0}}],"usageMetadata":{{"promptTokenCount":412,"candidatesTokenCount":{},"totalTokenCount":{},"promptTokensDetails":[{{"modality":"TEXT","tokenCount":412}}]}},{tail}}}"#,
            3 * (i + 1),
            412 + 3 * (i + 1),
        )));
    }
    events.push(event(format!(
        r#"{{"candidates":[{{"content":{{"parts":[{{"functionCall":{{"name":"get_flight_status","args":{TOOL_ARGS}}}}}],"role":"model"}},"index":0}}],"usageMetadata":{{"promptTokenCount":412,"candidatesTokenCount":160,"totalTokenCount":572}},{tail}}}"#
    )));
    events.push(event(format!(
        r#"{{"candidates":[{{"content":{{"parts":[{{"text":""}}],"role":"model"}},"finishReason":"STOP","index":0}}],"usageMetadata":{{"promptTokenCount":412,"candidatesTokenCount":168,"totalTokenCount":580,"promptTokensDetails":[{{"modality":"TEXT","tokenCount":412}}],"candidatesTokensDetails":[{{"modality":"TEXT","tokenCount":168}}]}},{tail}}}"#
    )));
    check_len(if vertex { "vertex_ai" } else { "gemini" }, events)
}

/// One AWS event-stream message with string headers and a real prelude and message CRC32.
fn frame(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut h = vec![];
    for (name, value) in headers {
        h.push(name.len() as u8);
        h.extend_from_slice(name.as_bytes());
        h.push(7); // string
        h.extend_from_slice(&(value.len() as u16).to_be_bytes());
        h.extend_from_slice(value.as_bytes());
    }
    let total = (12 + h.len() + payload.len() + 4) as u32;
    let mut m = Vec::with_capacity(total as usize);
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

fn bedrock_event(kind: &str, payload: &str) -> Vec<u8> {
    frame(
        &[
            (":event-type", kind),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ],
        payload.as_bytes(),
    )
}

/// ConverseStream: text deltas, then a tool use streamed as partial input, `messageStop` and
/// `metadata`. Payloads carry the `p` padding field AWS adds.
fn bedrock_stream() -> Vec<Vec<u8>> {
    let args = tool_arg_pieces(13);
    let text = STREAM_EVENTS - 6 - args.len();
    let mut events = vec![bedrock_event(
        "messageStart",
        r#"{"p":"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ","role":"assistant"}"#,
    )];
    for t in tokens(text) {
        events.push(bedrock_event(
            "contentBlockDelta",
            &format!(r#"{{"contentBlockIndex":0,"delta":{{"text":"{t}"}},"p":"abcdefghijk"}}"#),
        ));
    }
    events.push(bedrock_event(
        "contentBlockStop",
        r#"{"contentBlockIndex":0,"p":"abcdefghijklmnopqrstuvwxyzABCDEFGH"}"#,
    ));
    events.push(bedrock_event(
        "contentBlockStart",
        r#"{"contentBlockIndex":1,"p":"abcdefghijklm","start":{"toolUse":{"name":"get_flight_status","toolUseId":"tooluse_kZJMlvQmRJ6eAyJE5GIl7Q"}}}"#,
    ));
    for a in &args {
        events.push(bedrock_event(
            "contentBlockDelta",
            &format!(
                r#"{{"contentBlockIndex":1,"delta":{{"toolUse":{{"input":"{a}"}}}},"p":"abcdef"}}"#
            ),
        ));
    }
    events.push(bedrock_event(
        "contentBlockStop",
        r#"{"contentBlockIndex":1,"p":"abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"}"#,
    ));
    events.push(bedrock_event(
        "messageStop",
        r#"{"p":"abcdefghijklmnopqrstuvwxyz","stopReason":"tool_use"}"#,
    ));
    events.push(bedrock_event(
        "metadata",
        r#"{"metrics":{"latencyMs":1872},"p":"abcdefgh","usage":{"inputTokens":412,"outputTokens":89,"totalTokens":501}}"#,
    ));
    check_len("bedrock", events)
}

/// Ollama `/api/chat` NDJSON: content lines, a `tool_calls` line, the final `done` line.
fn ollama_stream() -> Vec<Vec<u8>> {
    let line = |message: String, extra: &str| {
        let mut line = format!(
            r#"{{"model":"llama3.1:8b","created_at":"2025-06-05T14:22:07.123456Z","message":{message},{extra}}}"#
        )
        .into_bytes();
        line.push(b'\n');
        line
    };
    let mut events = vec![];
    for t in tokens(STREAM_EVENTS - 2) {
        events.push(line(
            format!(r#"{{"role":"assistant","content":"{t}"}}"#),
            r#""done":false"#,
        ));
    }
    events.push(line(
        format!(
            r#"{{"role":"assistant","content":"","tool_calls":[{{"function":{{"name":"get_flight_status","arguments":{TOOL_ARGS}}}}}]}}"#
        ),
        r#""done":false"#,
    ));
    events.push(line(
        r#"{"role":"assistant","content":""}"#.to_string(),
        r#""done_reason":"stop","done":true,"total_duration":4883583458,"load_duration":1334875,"prompt_eval_count":412,"prompt_eval_duration":342546000,"eval_count":89,"eval_duration":4535599000"#,
    ));
    check_len("ollama", events)
}

/// Cohere v2 chat SSE: `message-start`, text content, a streamed tool call, `message-end`.
fn cohere_stream() -> Vec<Vec<u8>> {
    let args = tool_arg_pieces(6);
    let text = STREAM_EVENTS - 6 - args.len();
    let mut events = vec![
        named_sse(
            "message-start",
            r#"{"id":"29f14a5a-11de-4cae-9800-25e4747408ea","type":"message-start","delta":{"message":{"role":"assistant","content":[],"tool_plan":"","tool_calls":[],"citations":[]}}}"#,
        ),
        named_sse(
            "content-start",
            r#"{"type":"content-start","index":0,"delta":{"message":{"content":{"type":"text","text":""}}}}"#,
        ),
    ];
    for t in tokens(text) {
        events.push(named_sse(
            "content-delta",
            &format!(
                r#"{{"type":"content-delta","index":0,"delta":{{"message":{{"content":{{"text":"{t}"}}}}}}}}"#
            ),
        ));
    }
    events.push(named_sse(
        "content-end",
        r#"{"type":"content-end","index":0}"#,
    ));
    events.push(named_sse(
        "tool-call-start",
        r#"{"type":"tool-call-start","index":0,"delta":{"message":{"tool_calls":{"id":"get_flight_status_nsz5zm3w56q3","type":"function","function":{"name":"get_flight_status","arguments":""}}}}}"#,
    ));
    for a in &args {
        events.push(named_sse(
            "tool-call-delta",
            &format!(
                r#"{{"type":"tool-call-delta","index":0,"delta":{{"message":{{"tool_calls":{{"function":{{"arguments":"{a}"}}}}}}}}}}"#
            ),
        ));
    }
    events.push(named_sse(
        "tool-call-end",
        r#"{"type":"tool-call-end","index":0}"#,
    ));
    events.push(named_sse(
        "message-end",
        r#"{"type":"message-end","delta":{"finish_reason":"TOOL_CALL","usage":{"billed_units":{"input_tokens":412,"output_tokens":89},"tokens":{"input_tokens":478,"output_tokens":93}}}}"#,
    ));
    check_len("cohere", events)
}

// ---------------------------------------------------------------------------------------------

struct Case {
    name: &'static str,
    provider: Provider,
    deployment: Deployment,
    response: String,
    stream: Vec<Vec<u8>>,
    /// What `build_request` reports for a streamed call (OpenAI-shaped upstreams only).
    injected_usage: bool,
}

fn cases() -> Vec<Case> {
    let config = sluice_config::parse_config(CONFIG, Path::new("translation-bench.yaml"))
        .expect("the bench config parses");
    let case = |name: &'static str, response: String, stream: Vec<Vec<u8>>| {
        let deployment = config
            .deployments
            .iter()
            .find(|d| d.model_name == name)
            .unwrap_or_else(|| panic!("no deployment {name}"))
            .clone();
        let provider = Provider::for_deployment(&deployment).expect("a supported provider");
        Case {
            name,
            provider,
            injected_usage: provider.is_openai_native(),
            deployment,
            response,
            stream,
        }
    };
    vec![
        case("openai", openai_response(), openai_stream()),
        case("azure", azure_response(), azure_stream()),
        case("anthropic", anthropic_response(), anthropic_stream()),
        case("gemini", gemini_response(), gemini_stream(false)),
        case("vertex_ai", vertex_response(), gemini_stream(true)),
        case("bedrock", bedrock_response(), bedrock_stream()),
        case("ollama", ollama_response(), ollama_stream()),
        case("cohere", cohere_response(), cohere_stream()),
    ]
}

fn translate_request(c: &Case, bytes: &[u8]) -> sluice_filters::provider::UpstreamRequest {
    let mut body = RequestBody::parse(bytes).expect("the request parses");
    c.provider
        .build_request(
            OP,
            &mut body,
            &c.deployment,
            &c.deployment.upstream_model,
            false,
            &CallOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{}: build_request failed: {e:?}", c.name))
}

/// Feeds a whole stream the way the proxy does: `out` is cleared before every chunk.
fn decode_stream(c: &Case, out: &mut Vec<u8>, mut each: impl FnMut(&[u8])) {
    let mut decoder = c
        .provider
        .stream_decoder(OP, c.injected_usage, false, CLIENT_MODEL);
    for chunk in &c.stream {
        out.clear();
        decoder.feed(chunk, out);
        each(out);
    }
    out.clear();
    decoder.finish(out);
    each(out);
    assert!(
        decoder.usage().is_some(),
        "{}: stream usage not seen",
        c.name
    );
}

/// Runs every input once, so that a broken translator fails loudly instead of being timed on
/// its error path.
fn check(c: &Case) {
    let req = translate_request(c, REQUEST.as_bytes());
    serde_json::from_slice::<serde_json::Value>(&req.body)
        .unwrap_or_else(|e| panic!("{}: upstream body is not JSON: {e}", c.name));

    let (translated, usage) = c
        .provider
        .translate_response(OP, c.response.as_bytes(), CLIENT_MODEL)
        .unwrap_or_else(|e| panic!("{}: translate_response failed: {e:?}", c.name));
    assert!(
        usage.is_some_and(|u| u.total_tokens > 0),
        "{}: no usage",
        c.name
    );
    let body = translated.unwrap_or_else(|| c.response.clone().into_bytes());
    let v: serde_json::Value = serde_json::from_slice(&body).expect("response is JSON");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
    assert!(content.starts_with("Good news"), "{}: {content}", c.name);

    let mut all = vec![];
    decode_stream(c, &mut Vec::new(), |out| all.extend_from_slice(out));
    let text = String::from_utf8(all).expect("streams are UTF-8");
    assert!(
        !text.contains("\"error\""),
        "{}: stream error: {text}",
        c.name
    );
    assert!(text.ends_with("data: [DONE]\n\n"), "{}: no [DONE]", c.name);
    let chunks = text.matches("data: ").count();
    assert!(chunks >= 40, "{}: only {chunks} chunks out", c.name);
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20)
}

fn translation(crit: &mut Criterion) {
    let cases = cases();
    for c in &cases {
        check(c);
    }
    eprintln!(
        "request body: {} bytes; stream: {STREAM_EVENTS} events",
        REQUEST.len()
    );

    let mut group = crit.benchmark_group("request");
    for c in &cases {
        group.bench_function(c.name, |b| {
            b.iter(|| translate_request(c, black_box(REQUEST.as_bytes())))
        });
    }
    // What the proxy adds for a Bedrock deployment with IAM keys: the SigV4 signature.
    let bedrock_case = cases.iter().find(|c| c.name == "bedrock").expect("bedrock");
    let (creds, region) =
        bedrock::credentials_from(&bedrock_case.deployment).expect("bedrock credentials");
    let host = format!("bedrock-runtime.{region}.amazonaws.com");
    group.bench_function("bedrock_sigv4", |b| {
        b.iter(|| {
            let req = translate_request(bedrock_case, black_box(REQUEST.as_bytes()));
            bedrock::sign_request(
                "POST",
                &host,
                &req.path,
                &req.headers,
                &req.body,
                &creds,
                &region,
                bedrock::SERVICE,
                SystemTime::now(),
            )
        })
    });
    group.finish();

    let mut group = crit.benchmark_group("response");
    for c in &cases {
        group.bench_function(c.name, |b| {
            b.iter(|| {
                c.provider
                    .translate_response(OP, black_box(c.response.as_bytes()), CLIENT_MODEL)
                    .expect("translates")
            })
        });
    }
    group.finish();

    let mut group = crit.benchmark_group("stream");
    group.throughput(Throughput::Elements(STREAM_EVENTS as u64));
    for c in &cases {
        group.bench_function(c.name, |b| {
            b.iter_batched_ref(
                || {
                    let decoder =
                        c.provider
                            .stream_decoder(OP, c.injected_usage, false, CLIENT_MODEL);
                    (decoder, Vec::with_capacity(4096))
                },
                |(decoder, out)| {
                    for chunk in &c.stream {
                        out.clear();
                        decoder.feed(black_box(chunk), out);
                        black_box(&*out);
                    }
                    out.clear();
                    decoder.finish(out);
                    black_box(&*out);
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = translation
}
criterion_main!(benches);
