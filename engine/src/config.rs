//! A model's shape, read from GGUF metadata or a Hugging Face `config.json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::gguf::MetaValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM2, TinyLlama, Mistral.
    Llama,
    /// Llama plus biases on the q/k/v projections.
    Qwen2,
    /// BERT encoder for sentence embeddings.
    Bert,
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): what GGUF `llama` weights need, since the converter permuted
    /// the q/k rows.
    Interleaved,
    /// Dimension i with i + d/2 (Hugging Face `rotate_half`; also GGUF `qwen2`).
    Half,
}

/// Llama 3 style frequency scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub llama3_rope: Option<Llama3RopeScaling>,
    /// RMSNorm eps (decoders) or LayerNorm eps (BERT).
    pub norm_eps: f32,
    pub tie_word_embeddings: bool,
    /// BERT only.
    pub type_vocab_size: usize,
}

impl ModelConfig {
    /// From GGUF metadata (`general.architecture` and `{arch}.*` keys). The vocabulary size is
    /// taken from the token list, or later from the embedding tensor when absent.
    pub fn from_gguf(path: &Path, meta: &BTreeMap<String, MetaValue>) -> Result<Self> {
        let read = MetaReader { path, meta };
        let arch_name = read.str("general.architecture")?;
        let (architecture, rope_style) = match arch_name {
            "llama" | "mistral" => (Architecture::Llama, RopeStyle::Interleaved),
            "qwen2" => (Architecture::Qwen2, RopeStyle::Half),
            "bert" => (Architecture::Bert, RopeStyle::Half),
            other => {
                return Err(EngineError::format(
                    path,
                    format!(
                        "general.architecture: `{other}` is not supported (llama, qwen2, bert)"
                    ),
                ))
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let hidden_size = read.usize(&key("embedding_length"))?;
        let num_heads = read.usize(&key("attention.head_count"))?;
        let num_kv_heads = read
            .opt_usize(&key("attention.head_count_kv"))?
            .unwrap_or(num_heads);
        let head_dim = read
            .opt_usize(&key("attention.key_length"))?
            .unwrap_or(hidden_size / num_heads.max(1));
        let norm_eps = match architecture {
            Architecture::Bert => read.f32(&key("attention.layer_norm_epsilon"))?,
            _ => read.f32(&key("attention.layer_norm_rms_epsilon"))?,
        };
        let vocab_size = match meta.get("tokenizer.ggml.tokens") {
            Some(MetaValue::Array(tokens)) => tokens.len(),
            _ => read.opt_usize(&key("vocab_size"))?.unwrap_or(0),
        };
        let config = ModelConfig {
            architecture,
            hidden_size,
            num_layers: read.usize(&key("block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size: read.usize(&key("feed_forward_length"))?,
            vocab_size,
            max_position_embeddings: read.opt_usize(&key("context_length"))?.unwrap_or(2048),
            rope_theta: read.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_style,
            llama3_rope: None,
            norm_eps,
            tie_word_embeddings: false,
            type_vocab_size: 2,
        };
        config.validate(path)?;
        Ok(config)
    }

    /// From a Hugging Face `config.json`.
    pub fn from_hf_config(path: &Path, json: &Value) -> Result<Self> {
        let read = JsonReader { path, json };
        let model_type = read.str("model_type").unwrap_or("");
        let arch_names: Vec<&str> = json
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let is = |names: &[&str], kind: &str| {
            model_type == kind || arch_names.iter().any(|a| names.contains(a))
        };
        let architecture = if is(&["LlamaForCausalLM", "MistralForCausalLM"], "llama")
            || model_type == "mistral"
        {
            Architecture::Llama
        } else if is(&["Qwen2ForCausalLM"], "qwen2") {
            Architecture::Qwen2
        } else if is(&["BertModel", "BertForMaskedLM"], "bert") {
            Architecture::Bert
        } else {
            return Err(EngineError::format(
                path,
                format!(
                    "architectures/model_type: {arch_names:?}/`{model_type}` is not supported \
                     (Llama, Mistral, Qwen2, BERT)"
                ),
            ));
        };
        let hidden_size = read.usize("hidden_size")?;
        let num_heads = read.usize("num_attention_heads")?;
        let norm_eps = match architecture {
            Architecture::Bert => read.opt_f32("layer_norm_eps")?.unwrap_or(1e-12),
            _ => read.opt_f32("rms_norm_eps")?.unwrap_or(1e-6),
        };
        let llama3_rope = match json.get("rope_scaling") {
            Some(scaling) if !scaling.is_null() => {
                let kind = scaling
                    .get("rope_type")
                    .or_else(|| scaling.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if kind != "llama3" {
                    return Err(EngineError::format(
                        path,
                        format!("rope_scaling: type `{kind}` is not supported (llama3)"),
                    ));
                }
                let r = JsonReader {
                    path,
                    json: scaling,
                };
                Some(Llama3RopeScaling {
                    factor: r.f32("factor")?,
                    low_freq_factor: r.f32("low_freq_factor")?,
                    high_freq_factor: r.f32("high_freq_factor")?,
                    original_max_position_embeddings: r.f32("original_max_position_embeddings")?,
                })
            }
            _ => None,
        };
        let config = ModelConfig {
            architecture,
            hidden_size,
            num_layers: read.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads: read.opt_usize("num_key_value_heads")?.unwrap_or(num_heads),
            head_dim: read
                .opt_usize("head_dim")?
                .unwrap_or(hidden_size / num_heads.max(1)),
            intermediate_size: read.usize("intermediate_size")?,
            vocab_size: read.usize("vocab_size")?,
            max_position_embeddings: read.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            rope_theta: read.opt_f32("rope_theta")?.unwrap_or(10_000.0),
            rope_style: RopeStyle::Half,
            llama3_rope,
            norm_eps,
            tie_word_embeddings: json
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            type_vocab_size: read.opt_usize("type_vocab_size")?.unwrap_or(2),
        };
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |what: String| Err(EngineError::format(path, what));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.hidden_size == 0 {
            return bad("head counts and hidden size must be positive".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "attention heads ({}) must be a multiple of key/value heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.architecture != Architecture::Bert && !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            ));
        }
        Ok(())
    }

    /// Rotary inverse frequencies for one head (length head_dim / 2).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim as f32;
        (0..self.head_dim / 2)
            .map(|i| {
                let freq = 1.0 / self.rope_theta.powf(2.0 * i as f32 / d);
                match &self.llama3_rope {
                    None => freq,
                    Some(s) => llama3_scale(freq, s),
                }
            })
            .collect()
    }
}

/// Llama 3.1's frequency-dependent scaling of rotary frequencies.
fn llama3_scale(freq: f32, s: &Llama3RopeScaling) -> f32 {
    let wavelen = 2.0 * std::f32::consts::PI / freq;
    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

struct MetaReader<'a> {
    path: &'a Path,
    meta: &'a BTreeMap<String, MetaValue>,
}

impl MetaReader<'_> {
    fn missing(&self, key: &str, expected: &str) -> EngineError {
        EngineError::format(self.path, format!("metadata `{key}`: expected {expected}"))
    }
    fn str(&self, key: &str) -> Result<&str> {
        match self.meta.get(key) {
            Some(MetaValue::String(s)) => Ok(s),
            _ => Err(self.missing(key, "a string")),
        }
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        Ok(match self.meta.get(key) {
            None => None,
            Some(v) => {
                Some(meta_as_u64(v).ok_or_else(|| self.missing(key, "an integer"))? as usize)
            }
        })
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.missing(key, "an integer"))
    }
    fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        Ok(match self.meta.get(key) {
            None => None,
            Some(MetaValue::F32(v)) => Some(*v),
            Some(MetaValue::F64(v)) => Some(*v as f32),
            Some(v) => Some(meta_as_u64(v).ok_or_else(|| self.missing(key, "a number"))? as f32),
        })
    }
    fn f32(&self, key: &str) -> Result<f32> {
        self.opt_f32(key)?
            .ok_or_else(|| self.missing(key, "a number"))
    }
}

/// An unsigned integer metadata value of any width.
pub fn meta_as_u64(v: &MetaValue) -> Option<u64> {
    match *v {
        MetaValue::U8(x) => Some(x as u64),
        MetaValue::U16(x) => Some(x as u64),
        MetaValue::U32(x) => Some(x as u64),
        MetaValue::U64(x) => Some(x),
        MetaValue::I8(x) => u64::try_from(x).ok(),
        MetaValue::I16(x) => u64::try_from(x).ok(),
        MetaValue::I32(x) => u64::try_from(x).ok(),
        MetaValue::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

struct JsonReader<'a> {
    path: &'a Path,
    json: &'a Value,
}

impl JsonReader<'_> {
    fn missing(&self, key: &str, expected: &str) -> EngineError {
        EngineError::format(self.path, format!("`{key}`: expected {expected}"))
    }
    fn str(&self, key: &str) -> Option<&str> {
        self.json.get(key).and_then(Value::as_str)
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.missing(key, "a non-negative integer")),
        }
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.missing(key, "a non-negative integer"))
    }
    fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| self.missing(key, "a number")),
        }
    }
    fn f32(&self, key: &str) -> Result<f32> {
        self.opt_f32(key)?
            .ok_or_else(|| self.missing(key, "a number"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_a_llama_config_json() {
        let cfg = ModelConfig::from_hf_config(
            Path::new("config.json"),
            &json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "intermediate_size": 128, "vocab_size": 100, "rms_norm_eps": 1e-5,
                    "rope_theta": 500000.0, "tie_word_embeddings": true}),
        )
        .unwrap();
        assert_eq!(cfg.architecture, Architecture::Llama);
        assert_eq!(cfg.head_dim, 16);
        assert_eq!(cfg.num_kv_heads, 2);
        assert_eq!(cfg.rope_style, RopeStyle::Half);
        assert!(cfg.tie_word_embeddings);
        assert_eq!(cfg.rope_inv_freq().len(), 8);
        assert_eq!(cfg.rope_inv_freq()[0], 1.0);
    }

    #[test]
    fn config_errors_name_the_file_and_key() {
        let err = ModelConfig::from_hf_config(
            Path::new("/m/config.json"),
            &json!({"model_type": "llama", "hidden_size": "big"}),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/m/config.json") && err.contains("hidden_size"),
            "{err}"
        );
        let err = ModelConfig::from_hf_config(Path::new("c.json"), &json!({"model_type": "gpt2"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not supported"), "{err}");
    }

    #[test]
    fn reads_gguf_llama_metadata() {
        let mut meta = BTreeMap::new();
        let mut put = |k: &str, v: MetaValue| meta.insert(k.to_string(), v);
        put("general.architecture", MetaValue::String("llama".into()));
        put("llama.embedding_length", MetaValue::U32(576));
        put("llama.block_count", MetaValue::U32(30));
        put("llama.feed_forward_length", MetaValue::U32(1536));
        put("llama.attention.head_count", MetaValue::U32(9));
        put("llama.attention.head_count_kv", MetaValue::U32(3));
        put(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        );
        put("llama.rope.freq_base", MetaValue::F32(100_000.0));
        put("llama.context_length", MetaValue::U32(8192));
        let cfg = ModelConfig::from_gguf(Path::new("m.gguf"), &meta).unwrap();
        assert_eq!(cfg.head_dim, 64);
        assert_eq!(cfg.rope_style, RopeStyle::Interleaved);
        assert_eq!(cfg.max_position_embeddings, 8192);
        meta.remove("llama.block_count");
        let err = ModelConfig::from_gguf(Path::new("m.gguf"), &meta)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m.gguf") && err.contains("llama.block_count"),
            "{err}"
        );
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        assert_eq!(llama3_scale(1.0, &s), 1.0);
        let low = 2.0 * std::f32::consts::PI / 10_000.0;
        assert!((llama3_scale(low, &s) - low / 8.0).abs() < 1e-12);
    }
}
