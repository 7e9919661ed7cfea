//! Tokenizer: the `tokenizers` crate, loaded from `tokenizer.json` or built from GGUF metadata.

use std::collections::BTreeMap;
use std::path::Path;

use crate::chat_template::{ChatTemplate, ChatTemplateOptions};
use crate::error::Result;
use crate::gguf::MetaValue;

pub struct Tokenizer {}

impl Tokenizer {
    /// From a Hugging Face folder: `tokenizer.json`, plus `tokenizer_config.json` (chat template,
    /// bos/eos, add_bos_token) and `generation_config.json` (eos ids) when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let _ = dir;
        todo!("tokenizer helper")
    }
    /// From GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
    pub fn from_gguf(metadata: &BTreeMap<String, MetaValue>) -> Result<Self> {
        let _ = metadata;
        todo!()
    }
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let _ = (text, add_special_tokens);
        todo!()
    }
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let _ = (ids, skip_special_tokens);
        todo!()
    }
    /// The token's vocabulary string (as `return_token_strs` and logprobs show it).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        let _ = id;
        todo!()
    }
    pub fn vocab_size(&self) -> usize {
        todo!()
    }
    pub fn eos_token_ids(&self) -> &[u32] {
        todo!()
    }
    pub fn bos_token_id(&self) -> Option<u32> {
        todo!()
    }
    pub fn is_special(&self, id: u32) -> bool {
        let _ = id;
        todo!()
    }
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        todo!()
    }
    /// Render `messages` (OpenAI chat messages as JSON) with the model's template, or
    /// `options.chat_template` when given.
    pub fn apply_chat_template(
        &self,
        messages: &serde_json::Value,
        options: &ChatTemplateOptions,
    ) -> Result<String> {
        let _ = (messages, options);
        todo!()
    }
}
