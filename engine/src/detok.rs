//! Incremental detokenisation for streams (never splits a UTF-8 character) and stop strings that
//! may span token boundaries.

use crate::tokenizer::Tokenizer;

/// Turns a growing list of token ids into text deltas.
pub struct IncrementalDecoder {}

impl IncrementalDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        let _ = skip_special_tokens;
        todo!("tokenizer helper")
    }
    /// Feed the next token; returns the text that is now final (possibly empty while a UTF-8
    /// character is incomplete).
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> String {
        let _ = (tokenizer, token);
        todo!()
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
pub struct StopMatcher {}

impl StopMatcher {
    pub fn new(stops: &[String], include_stop_str_in_output: bool) -> Self {
        let _ = (stops, include_stop_str_in_output);
        todo!()
    }
    pub fn push(&mut self, text: &str) -> StopCheck {
        let _ = text;
        todo!()
    }
    /// The sequence ended without a stop string: release what was held back.
    pub fn flush(&mut self) -> String {
        todo!()
    }
}
