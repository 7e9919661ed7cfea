//! Token usage as OpenAI reports it, and the incremental SSE scanner that captures it from a
//! stream without holding the stream back.

use std::sync::LazyLock;

use memchr::memmem;
use serde::Deserialize;

use crate::sse::{event_data, SseSplitter};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
}

/// Usage from a whole (non-streamed) OpenAI-shaped response body.
pub fn usage_from_body(body: &[u8]) -> Option<Usage> {
    // Most bodies are checked by a byte search; only those naming usage are parsed.
    memmem::find(body, b"\"usage\"")?;
    serde_json::from_slice::<WithUsage>(body).ok()?.usage
}

/// Records the `usage` chunk of an OpenAI SSE stream and, when Sluice asked the upstream for
/// usage on the client's behalf, removes that extra chunk from what the client sees. Only a
/// trailing partial event is ever held back; complete events pass at once.
#[derive(Debug, Default)]
pub struct SseUsageScanner {
    splitter: SseSplitter,
    strip_usage_chunk: bool,
    usage: Option<Usage>,
    events: u64,
}

impl SseUsageScanner {
    pub fn new(strip_usage_chunk: bool) -> Self {
        SseUsageScanner {
            strip_usage_chunk,
            ..Default::default()
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Complete events seen so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Feeds upstream bytes; appends what the client should receive to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let Self {
            splitter,
            strip_usage_chunk,
            usage,
            events,
        } = self;
        splitter.feed(chunk, |event| {
            *events += 1;
            if !inspect(event, *strip_usage_chunk, usage) {
                out.extend_from_slice(event);
            }
        });
    }

    /// Flushes whatever partial event remains at the end of the stream.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let Self {
            splitter,
            strip_usage_chunk,
            usage,
            ..
        } = self;
        splitter.finish(|event| {
            if !inspect(event, *strip_usage_chunk, usage) {
                out.extend_from_slice(event);
            }
        });
    }
}

/// Records usage; returns true when the event must be withheld from the client.
fn inspect(event: &[u8], strip_usage_chunk: bool, usage: &mut Option<Usage>) -> bool {
    // Built once: setting up a searcher costs more than searching one event.
    static USAGE_KEY: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(b"\"usage\""));
    if USAGE_KEY.find(event).is_none() {
        return false;
    }
    let Some(json) = event_data(event) else {
        return false;
    };
    if ends_with_null_usage(json) {
        return false;
    }
    let Ok(parsed) = serde_json::from_slice::<WithUsage>(json) else {
        return false;
    };
    if let Some(u) = parsed.usage {
        *usage = Some(u);
        return strip_usage_chunk && parsed.choices.is_none_or(|c| c.is_empty());
    }
    false
}

/// Whether `json` ends with a last field `"usage":null` of its outermost object, as every chunk
/// but the last does once usage is asked for: then nothing is recorded or withheld, whatever
/// the rest holds, so it need not be parsed. (In valid JSON the final `}` closes the outermost
/// object, and the quote after `,` or `{` is unescaped, so it opens the key; invalid JSON is
/// not parsed into usage either.)
fn ends_with_null_usage(json: &[u8]) -> bool {
    let end = json
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\n' | b'\r' | b'\t'))
        .map_or(0, |i| i + 1);
    json[..end]
        .strip_suffix(b"\"usage\":null}")
        .and_then(|rest| rest.last())
        .is_some_and(|b| matches!(b, b',' | b'{'))
}

/// Usage read from a pass-through response whatever its shape: OpenAI's `usage`
/// (`prompt_tokens`/`completion_tokens`), Anthropic's (`input_tokens`/`output_tokens`, spread
/// over `message_start` and `message_delta` in streams) and Gemini's `usageMetadata`; SSE or a
/// whole JSON body. The bytes themselves pass on untouched; only a copy is inspected.
#[derive(Debug, Default)]
pub struct PassthroughUsage {
    sse: bool,
    splitter: SseSplitter,
    /// A JSON body, kept up to [`PASSTHROUGH_JSON_CAP`] bytes.
    json: Vec<u8>,
    usage: Option<Usage>,
}

/// Whole-body responses larger than this are not inspected for usage.
pub const PASSTHROUGH_JSON_CAP: usize = 4 * 1024 * 1024;

impl PassthroughUsage {
    /// `content_type` of the response decides between SSE and a whole JSON body.
    pub fn new(content_type: &str) -> Self {
        PassthroughUsage {
            sse: content_type.starts_with("text/event-stream"),
            ..Default::default()
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if self.sse {
            let Self {
                splitter, usage, ..
            } = self;
            splitter.feed(chunk, |event| merge_event_usage(event, usage));
        } else if self.json.len() + chunk.len() <= PASSTHROUGH_JSON_CAP {
            self.json.extend_from_slice(chunk);
        } else {
            self.json = Vec::new();
            self.sse = false;
        }
    }

    /// The usage found, once the response is complete.
    pub fn finish(mut self) -> Option<Usage> {
        if self.sse {
            let Self {
                mut splitter,
                mut usage,
                ..
            } = self;
            splitter.finish(|event| merge_event_usage(event, &mut usage));
            return usage;
        }
        let v: serde_json::Value = serde_json::from_slice(&self.json).ok()?;
        merge_value_usage(&v, &mut self.usage);
        self.usage
    }
}

fn merge_event_usage(event: &[u8], usage: &mut Option<Usage>) {
    if memmem::find(event, b"sage").is_none() {
        return;
    }
    let Some(data) = event_data(event) else {
        return;
    };
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        merge_value_usage(&v, usage);
    }
}

fn merge_value_usage(v: &serde_json::Value, usage: &mut Option<Usage>) {
    let n = |v: &serde_json::Value, k: &str| v.get(k).and_then(serde_json::Value::as_u64);
    let found = v
        .get("usage")
        .or_else(|| v.pointer("/message/usage"))
        .or_else(|| v.get("usageMetadata"));
    let Some(u) = found.filter(|u| u.is_object()) else {
        return;
    };
    let prompt = n(u, "prompt_tokens")
        .or_else(|| n(u, "input_tokens"))
        .or_else(|| n(u, "promptTokenCount"));
    let completion = n(u, "completion_tokens")
        .or_else(|| n(u, "output_tokens"))
        .or_else(|| n(u, "candidatesTokenCount"));
    let current = usage.get_or_insert_with(Usage::default);
    // Streams report input early and output late: keep the largest of each.
    if let Some(p) = prompt {
        current.prompt_tokens = current.prompt_tokens.max(p);
    }
    if let Some(c) = completion {
        current.completion_tokens = current.completion_tokens.max(c);
    }
    current.total_tokens = current.prompt_tokens + current.completion_tokens;
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "data: {\"id\":\"1\",\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n\
data: {\"id\":\"1\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
data: {\"id\":\"1\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n\
data: [DONE]\n\n";

    fn run(strip: bool, splits: &[usize]) -> (String, Option<Usage>) {
        let mut s = SseUsageScanner::new(strip);
        let mut out = vec![];
        let bytes = STREAM.as_bytes();
        let mut at: usize = 0;
        for &n in splits.iter().chain(std::iter::once(&usize::MAX)) {
            let end = at.saturating_add(n).min(bytes.len());
            s.feed(&bytes[at..end], &mut out);
            at = end;
            if at == bytes.len() {
                break;
            }
        }
        s.finish(&mut out);
        (String::from_utf8(out).unwrap(), s.usage())
    }

    #[test]
    fn captures_usage_for_any_split() {
        let expected_usage = Some(Usage {
            prompt_tokens: 7,
            completion_tokens: 2,
            total_tokens: 9,
        });
        for split in [1, 2, 3, 7, 13, 64, 1000] {
            let (out, usage) = run(false, &vec![split; 1000]);
            assert_eq!(out, STREAM);
            assert_eq!(usage, expected_usage);
            let (out, usage) = run(true, &vec![split; 1000]);
            assert!(!out.contains("usage"), "{out}");
            assert!(out.ends_with("data: [DONE]\n\n"));
            assert_eq!(usage, expected_usage);
        }
    }

    #[test]
    fn passthrough_usage_in_every_shape() {
        let mut p = PassthroughUsage::new("application/json");
        p.feed(br#"{"choices":[],"usage":{"prompt_tokens":3,"#);
        p.feed(br#""completion_tokens":4,"total_tokens":7}}"#);
        assert_eq!(p.finish().unwrap().total_tokens, 7);
        let mut p = PassthroughUsage::new("application/json");
        p.feed(br#"{"usageMetadata":{"promptTokenCount":2,"candidatesTokenCount":5}}"#);
        assert_eq!(p.finish().unwrap().completion_tokens, 5);
        let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":42}}\n\n";
        for split in [1, 5, stream.len()] {
            let mut p = PassthroughUsage::new("text/event-stream");
            for c in stream.as_bytes().chunks(split) {
                p.feed(c);
            }
            let u = p.finish().unwrap();
            assert_eq!(
                (u.prompt_tokens, u.completion_tokens, u.total_tokens),
                (10, 42, 52)
            );
        }
    }

    #[test]
    fn null_usage_chunks_are_not_parsed_and_change_nothing() {
        for (json, null_at_end) in [
            (&br#"{"choices":[{"delta":{}}],"usage":null}"#[..], true),
            (br#"{"usage":null} "#, true),
            (
                br#"{"choices":[],"usage":null,"usage":{"total_tokens":3}}"#,
                false,
            ),
            (
                br#"{"choices":[{"delta":{"content":"\"usage\":null}"}}]}"#,
                false,
            ),
            (br#"{"choices":[],"usage": null}"#, false),
            (br#"{"x":{"usage":null}}"#, false),
            (br#"{"choices":[],"usage":{"total_tokens":3}}"#, false),
        ] {
            assert_eq!(ends_with_null_usage(json), null_at_end, "{json:?}");
            // What the parse decides for the same event.
            let mut parsed = None;
            let event = [b"data: ", json, b"\n\n"].concat();
            let withheld = serde_json::from_slice::<WithUsage>(json)
                .ok()
                .and_then(|w| w.usage.map(|u| (u, w.choices)));
            if null_at_end {
                assert!(withheld.is_none());
                assert!(!inspect(&event, true, &mut parsed));
                assert_eq!(parsed, None);
            }
        }
    }

    #[test]
    fn usage_from_whole_body() {
        let body =
            br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        assert_eq!(usage_from_body(body).unwrap().total_tokens, 7);
        assert_eq!(usage_from_body(b"{}"), None);
    }
}
