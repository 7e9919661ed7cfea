//! Incremental detokenisation for streams (never splits a UTF-8 character) and stop strings that
//! may span token boundaries.
//!
//! [`IncrementalDecoder`] uses vLLM's prefix/read offsets: each step decodes a short window of
//! recent tokens twice (up to the last emitted token, and up to the new one) and emits the
//! difference. Decoding a window rather than single tokens keeps SentencePiece `▁` spaces and
//! byte-fallback sequences right, and a window ending in U+FFFD (an incomplete UTF-8 character)
//! is held until a later token completes it.
//!
//! [`StopMatcher`] sits after the decoder: it holds back the longest tail of the text that could
//! still grow into a stop string, so a stop split over several tokens is still caught and never
//! partly sent.

use crate::tokenizer::Tokenizer;

/// How many prompt tokens seed the decoding window (vLLM uses the same context).
const PROMPT_CONTEXT_TOKENS: usize = 5;

/// Turns a growing list of token ids into text deltas.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    skip_special_tokens: bool,
    /// The window: `tokens[..prefix_offset]` is gone, `tokens[prefix_offset..read_offset]` has
    /// been emitted and gives context, `tokens[read_offset..]` is still pending.
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// A decoder with no prompt context: the first token decodes as a sequence start (a
    /// SentencePiece tokenizer drops its leading space). Prefer [`IncrementalDecoder::with_prompt`]
    /// when the generated text continues a prompt.
    pub fn new(skip_special_tokens: bool) -> Self {
        IncrementalDecoder {
            skip_special_tokens,
            tokens: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// A decoder whose window starts with the prompt's last tokens, so the first generated token
    /// keeps the space it carries (`▁Hello` after a prompt decodes as `" Hello"`).
    pub fn with_prompt(skip_special_tokens: bool, prompt: &[u32]) -> Self {
        let context = &prompt[prompt.len().saturating_sub(PROMPT_CONTEXT_TOKENS)..];
        IncrementalDecoder {
            skip_special_tokens,
            tokens: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
        }
    }

    /// Feed the next token; returns the text that is now final (possibly empty while a UTF-8
    /// character is incomplete).
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> String {
        self.tokens.push(token);
        let prefix_text = self.decode(tokenizer, self.prefix_offset, self.read_offset);
        let new_text = self.decode(tokenizer, self.prefix_offset, self.tokens.len());
        if new_text.len() <= prefix_text.len() || new_text.ends_with(char::REPLACEMENT_CHARACTER) {
            return String::new();
        }
        let delta = text_after(&new_text, &prefix_text).to_owned();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        // Only the window is needed from here on.
        self.tokens.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
        delta
    }

    /// The sequence ended: release text still held back for an incomplete character (it then
    /// ends in U+FFFD, as a full decode would).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> String {
        let prefix_text = self.decode(tokenizer, self.prefix_offset, self.read_offset);
        let new_text = self.decode(tokenizer, self.prefix_offset, self.tokens.len());
        let delta = if new_text.len() > prefix_text.len() {
            text_after(&new_text, &prefix_text).to_owned()
        } else {
            String::new()
        };
        self.tokens.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
        delta
    }

    fn decode(&self, tokenizer: &Tokenizer, start: usize, end: usize) -> String {
        match tokenizer.decode(&self.tokens[start..end], self.skip_special_tokens) {
            Ok(text) => text,
            Err(error) => {
                tracing::warn!(%error, "incremental decode failed");
                String::new()
            }
        }
    }
}

/// `text` minus `prefix`; when a decoder rewrote the shared part, drop as many characters as
/// `prefix` has (vLLM's rule).
fn text_after<'a>(text: &'a str, prefix: &str) -> &'a str {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest;
    }
    let skip = prefix.chars().count();
    match text.char_indices().nth(skip) {
        Some((at, _)) => &text[at..],
        None => "",
    }
}

/// Result of feeding text to a [`StopMatcher`].
#[derive(Debug, Default, PartialEq)]
pub struct StopCheck {
    /// Text safe to send now.
    pub emit: String,
    /// A stop string matched: the one that did.
    pub stopped: Option<String>,
}

/// Holds back text that could still turn into a stop string.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    include_stop_str_in_output: bool,
    /// Text not yet emitted: always a possible beginning of some stop string.
    held: String,
    stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: &[String], include_stop_str_in_output: bool) -> Self {
        StopMatcher {
            // An empty stop string would match everywhere; OpenAI ignores it.
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            include_stop_str_in_output,
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has matched (later text is discarded).
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    pub fn push(&mut self, text: &str) -> StopCheck {
        if self.stopped {
            return StopCheck::default();
        }
        if self.stops.is_empty() {
            return StopCheck {
                emit: text.to_owned(),
                stopped: None,
            };
        }
        self.held.push_str(text);

        // The earliest match wins; for matches at the same place, the first stop listed.
        let mut first_match: Option<(usize, &String)> = None;
        for stop in &self.stops {
            if let Some(at) = self.held.find(stop.as_str()) {
                if first_match.is_none_or(|(best, _)| at < best) {
                    first_match = Some((at, stop));
                }
            }
        }
        if let Some((at, stop)) = first_match {
            let end = if self.include_stop_str_in_output {
                at + stop.len()
            } else {
                at
            };
            let stop = stop.clone();
            let emit = self.held[..end].to_owned();
            self.held.clear();
            self.stopped = true;
            return StopCheck {
                emit,
                stopped: Some(stop),
            };
        }

        let keep_from = self.start_of_possible_stop();
        let emit = self.held[..keep_from].to_owned();
        self.held.drain(..keep_from);
        StopCheck {
            emit,
            stopped: None,
        }
    }

    /// Byte offset in `held` where the longest suffix that begins some stop string starts
    /// (`held.len()` when none does).
    fn start_of_possible_stop(&self) -> usize {
        let longest_stop = self.stops.iter().map(String::len).max().unwrap_or(0);
        // A suffix as long as a whole stop would have matched already.
        let earliest = self
            .held
            .len()
            .saturating_sub(longest_stop.saturating_sub(1));
        self.held
            .char_indices()
            .map(|(at, _)| at)
            .filter(|&at| at >= earliest)
            .find(|&at| {
                let suffix = &self.held[at..];
                self.stops.iter().any(|stop| stop.starts_with(suffix))
            })
            .unwrap_or(self.held.len())
    }

    /// The sequence ended without a stop string: release what was held back.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::{toy_byte_level, toy_sentencepiece};

    fn stream(decoder: &mut IncrementalDecoder, tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&id| decoder.push(tok, id)).collect()
    }

    #[test]
    fn emoji_split_over_byte_tokens_is_emitted_whole() {
        let tok = Tokenizer::from_gguf(&toy_byte_level("smollm")).unwrap();
        // "ab", the four byte tokens of U+1F600, " ab", "\n".
        let ids = [7, 16, 17, 18, 19, 9, 14];
        let mut decoder = IncrementalDecoder::new(false);
        let deltas = stream(&mut decoder, &tok, &ids);
        assert_eq!(deltas, ["ab", "", "", "", "\u{1F600}", " ab", "\n"]);
        assert!(deltas
            .iter()
            .all(|d| !d.contains(char::REPLACEMENT_CHARACTER)));
        assert_eq!(deltas.concat(), tok.decode(&ids, false).unwrap());
        assert_eq!(decoder.flush(&tok), "");
    }

    #[test]
    fn flush_releases_an_incomplete_character() {
        let tok = Tokenizer::from_gguf(&toy_byte_level("smollm")).unwrap();
        let mut decoder = IncrementalDecoder::new(false);
        assert_eq!(stream(&mut decoder, &tok, &[7, 16, 17]), ["ab", "", ""]);
        // What a full decode of the same ids ends with: the broken character as U+FFFD.
        let full = tok.decode(&[7, 16, 17], false).unwrap();
        assert_eq!(format!("ab{}", decoder.flush(&tok)), full);
    }

    #[test]
    fn special_tokens_are_skipped_on_request() {
        let tok = Tokenizer::from_gguf(&toy_byte_level("smollm")).unwrap();
        let ids = [1, 7, 2];
        let mut skipping = IncrementalDecoder::new(true);
        assert_eq!(stream(&mut skipping, &tok, &ids).concat(), "ab");
        let mut keeping = IncrementalDecoder::new(false);
        assert_eq!(
            stream(&mut keeping, &tok, &ids),
            ["<|im_start|>", "ab", "<|im_end|>"]
        );
    }

    #[test]
    fn sentencepiece_spaces_and_byte_fallback() {
        let tok = Tokenizer::from_gguf(&toy_sentencepiece()).unwrap();
        // ▁hi ▁hey: the sequence start drops the first space, the next token keeps its own.
        let mut decoder = IncrementalDecoder::new(true);
        assert_eq!(stream(&mut decoder, &tok, &[265, 269]), ["hi", " hey"]);
        // After a prompt the first generated token keeps its space.
        let mut after_prompt = IncrementalDecoder::with_prompt(true, &[1, 265]);
        assert_eq!(
            stream(&mut after_prompt, &tok, &[269, 265]),
            [" hey", " hi"]
        );
        // "▁hé" with é as byte-fallback tokens <0xC3> <0xA9>.
        let ids = [259, 260, 3 + 0xC3, 3 + 0xA9, 265];
        let mut bytes = IncrementalDecoder::new(true);
        let deltas = stream(&mut bytes, &tok, &ids);
        assert_eq!(deltas, ["", "h", "", "é", " hi"]);
        assert_eq!(deltas.concat(), tok.decode(&ids, true).unwrap());
    }

    fn stops(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stop_string_across_pushes() {
        let mut matcher = StopMatcher::new(&stops(&["STOP"]), false);
        assert_eq!(matcher.push("Hello ST").emit, "Hello ");
        let check = matcher.push("OP and more");
        assert_eq!(check.emit, "");
        assert_eq!(check.stopped.as_deref(), Some("STOP"));
        assert!(matcher.is_stopped());
        assert_eq!(matcher.push("later"), StopCheck::default());
        assert_eq!(matcher.flush(), "");
    }

    #[test]
    fn include_stop_str_in_output() {
        let mut matcher = StopMatcher::new(&stops(&["</s>"]), true);
        assert_eq!(matcher.push("done<").emit, "done");
        assert_eq!(matcher.push("/").emit, "");
        let check = matcher.push("s>tail");
        assert_eq!(check.emit, "</s>");
        assert_eq!(check.stopped.as_deref(), Some("</s>"));
    }

    #[test]
    fn false_alarm_is_released_and_flush_returns_the_tail() {
        let mut matcher = StopMatcher::new(&stops(&["STOP"]), false);
        assert_eq!(matcher.push("ST").emit, "");
        assert_eq!(matcher.push("ARt S").emit, "STARt ");
        assert_eq!(matcher.flush(), "S");
        assert_eq!(matcher.flush(), "");
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_text_is_safe() {
        let mut matcher = StopMatcher::new(&stops(&["world", "lo w"]), false);
        let check = matcher.push("hello world");
        assert_eq!(check.emit, "hel");
        assert_eq!(check.stopped.as_deref(), Some("lo w"));

        let mut accented = StopMatcher::new(&stops(&["é!"]), false);
        assert_eq!(accented.push("café").emit, "caf");
        let check = accented.push("!");
        assert_eq!(check.emit, "");
        assert_eq!(check.stopped.as_deref(), Some("é!"));

        // No stops: text passes straight through, empty stop strings are ignored.
        let mut none = StopMatcher::new(&stops(&[""]), false);
        assert_eq!(none.push("abc").emit, "abc");
    }

    #[test]
    fn matches_a_reference_over_every_split_point() {
        // Feeding any split of the text must give what a whole-text search gives.
        let text = "one two STOP three";
        let expected = &text[..text.find("STOP").unwrap()];
        for split in 0..=text.len() {
            let mut matcher = StopMatcher::new(&stops(&["STOP", "TOPS"]), false);
            let first = matcher.push(&text[..split]);
            let mut out = first.emit;
            let stopped = match first.stopped {
                Some(stop) => Some(stop),
                None => {
                    let second = matcher.push(&text[split..]);
                    out.push_str(&second.emit);
                    second.stopped
                }
            };
            assert_eq!(out, expected, "split at {split}");
            assert_eq!(stopped.as_deref(), Some("STOP"));
        }
    }
}
