//! Logprobs in the two OpenAI shapes: chat (`content: [{token, logprob, bytes, top_logprobs}]`)
//! and completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::sampling::TokenLogprob;

/// How a token id is shown: its decoded text, or `token_id:N` with `return_tokens_as_token_ids`.
pub type TokenText = Arc<dyn Fn(u32) -> String + Send + Sync>;

/// vLLM clamps -inf (a masked token) so the JSON stays valid.
fn finite(logprob: f32) -> f64 {
    if logprob.is_nan() {
        -9999.0
    } else {
        (logprob as f64).max(-9999.0)
    }
}

fn chat_entry(token: &str, logprob: f32) -> Map<String, Value> {
    let mut entry = Map::new();
    entry.insert("token".into(), Value::from(token));
    entry.insert("logprob".into(), json!(finite(logprob)));
    entry.insert("bytes".into(), json!(token.as_bytes()));
    entry
}

/// `{"content": [...]}` for these tokens, chat shape.
pub fn chat_logprobs(entries: &[TokenLogprob], token_text: &TokenText) -> Value {
    let content: Vec<Value> = entries
        .iter()
        .map(|entry| {
            let mut item = chat_entry(&token_text(entry.token), entry.logprob);
            let top: Vec<Value> = entry
                .top
                .iter()
                .map(|&(id, logprob)| Value::Object(chat_entry(&token_text(id), logprob)))
                .collect();
            item.insert("top_logprobs".into(), Value::Array(top));
            Value::Object(item)
        })
        .collect();
    json!({ "content": content })
}

/// Completions-shape logprobs of one choice, built up delta by delta. `text_offset` counts
/// characters from the start of the choice's text (after any echoed prompt).
#[derive(Debug, Clone, Default)]
pub struct CompletionLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f64>,
    top_logprobs: Vec<Map<String, Value>>,
    text_offset: Vec<usize>,
    next_offset: usize,
}

impl CompletionLogprobs {
    pub fn starting_at(offset: usize) -> Self {
        CompletionLogprobs {
            next_offset: offset,
            ..Self::default()
        }
    }

    pub fn push(&mut self, entry: &TokenLogprob, token_text: &TokenText) {
        let text = token_text(entry.token);
        // vLLM's dict holds the sampled token next to the top alternatives.
        let mut top = Map::new();
        for &(id, logprob) in &entry.top {
            top.insert(token_text(id), json!(finite(logprob)));
        }
        top.insert(text.clone(), json!(finite(entry.logprob)));
        self.text_offset.push(self.next_offset);
        self.next_offset += text.chars().count();
        self.token_logprobs.push(finite(entry.logprob));
        self.tokens.push(text);
        self.top_logprobs.push(top);
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The JSON of everything pushed so far; `take` empties it (stream chunks carry only what is
    /// new) while the offset keeps counting.
    pub fn take(&mut self) -> Value {
        let value = json!({
            "tokens": std::mem::take(&mut self.tokens),
            "token_logprobs": std::mem::take(&mut self.token_logprobs),
            "top_logprobs": std::mem::take(&mut self.top_logprobs),
            "text_offset": std::mem::take(&mut self.text_offset),
        });
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text() -> TokenText {
        Arc::new(|id| match id {
            1 => "He".to_string(),
            2 => "llo".to_string(),
            3 => "é".to_string(),
            _ => format!("<{id}>"),
        })
    }

    #[test]
    fn chat_shape() {
        let entries = vec![TokenLogprob {
            token: 3,
            logprob: -0.5,
            top: vec![(3, -0.5), (1, f32::NEG_INFINITY)],
        }];
        let value = chat_logprobs(&entries, &text());
        assert_eq!(
            value,
            json!({"content": [{
                "token": "é", "logprob": -0.5, "bytes": [0xc3, 0xa9],
                "top_logprobs": [
                    {"token": "é", "logprob": -0.5, "bytes": [0xc3, 0xa9]},
                    {"token": "He", "logprob": -9999.0, "bytes": [72, 101]}
                ]
            }]})
        );
    }

    #[test]
    fn completion_shape_with_offsets_across_takes() {
        let mut logprobs = CompletionLogprobs::starting_at(5);
        logprobs.push(
            &TokenLogprob {
                token: 1,
                logprob: -1.0,
                top: vec![(2, -0.25)],
            },
            &text(),
        );
        let first = logprobs.take();
        assert_eq!(
            first,
            json!({
                "tokens": ["He"], "token_logprobs": [-1.0],
                "top_logprobs": [{"llo": -0.25, "He": -1.0}], "text_offset": [5]
            })
        );
        assert!(logprobs.is_empty());
        logprobs.push(
            &TokenLogprob {
                token: 3,
                logprob: -2.0,
                top: vec![],
            },
            &text(),
        );
        logprobs.push(
            &TokenLogprob {
                token: 2,
                logprob: -3.0,
                top: vec![],
            },
            &text(),
        );
        let second = logprobs.take();
        // 5 + "He" (2 chars), then + "é" (1 char, 2 bytes).
        assert_eq!(second["text_offset"], json!([7, 8]));
        assert_eq!(second["tokens"], json!(["é", "llo"]));
    }
}
