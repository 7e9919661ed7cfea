//! Token usage as OpenAI reports it, and the incremental SSE scanner that captures it from a
//! stream without holding the stream back.

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
    if memmem::find(event, b"\"usage\"").is_none() {
        return false;
    }
    let Some(json) = event_data(event) else {
        return false;
    };
    let Ok(parsed) = serde_json::from_slice::<WithUsage>(json) else {
        return false;
    };
    if let Some(u) = parsed.usage {
        *usage = Some(u);
        return strip_usage_chunk && parsed.choices.is_none_or(|c| c.is_empty());
    }
    false
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
    fn usage_from_whole_body() {
        let body =
            br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        assert_eq!(usage_from_body(body).unwrap().total_tokens, 7);
        assert_eq!(usage_from_body(b"{}"), None);
    }
}
