//! Opening MODEL_PATH: a GGUF file or a Hugging Face folder, into weights, tokenizer and the
//! model's default sampling parameters.

use std::path::{Path, PathBuf};

use crate::config::{Architecture, ModelConfig};
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::model::bert::BertModel;
use crate::model::llama::{LlamaModel, Naming};
use crate::safetensors_dir::SafetensorsDir;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;

pub enum Weights {
    Decoder(LlamaModel),
    Encoder(BertModel),
}

pub struct LoadedModel {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    /// vLLM's defaults overridden by `generation_config.json` (temperature, top_p, top_k,
    /// min_p, repetition_penalty).
    pub sampling_defaults: SamplingParams,
}

pub fn load_model(path: &Path) -> Result<LoadedModel> {
    let meta = std::fs::metadata(path).map_err(|e| EngineError::io(path, e))?;
    if meta.is_dir() {
        load_hf_dir(path)
    } else {
        load_gguf(path)
    }
}

fn load_gguf(path: &Path) -> Result<LoadedModel> {
    let file = GgufFile::open(path)?;
    let config = ModelConfig::from_gguf(path, &file.metadata)?;
    if config.architecture == Architecture::Bert {
        return Err(EngineError::Unsupported(format!(
            "{}: BERT models load from a Hugging Face folder, not GGUF",
            path.display()
        )));
    }
    let tokenizer = Tokenizer::from_gguf(&file.metadata)?;
    let model = LlamaModel::load(config, &file, Naming::Gguf)?;
    Ok(LoadedModel {
        path: path.to_path_buf(),
        config: model.config.clone(),
        weights: Weights::Decoder(model),
        tokenizer,
        sampling_defaults: SamplingParams::default(),
    })
}

fn load_hf_dir(dir: &Path) -> Result<LoadedModel> {
    let source = SafetensorsDir::open(dir)?;
    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    let config = source.config.clone();
    let weights = match config.architecture {
        Architecture::Bert => Weights::Encoder(BertModel::load(config.clone(), &source)?),
        _ => Weights::Decoder(LlamaModel::load(
            config.clone(),
            &source,
            Naming::HuggingFace,
        )?),
    };
    let mut sampling_defaults = SamplingParams::default();
    let gen_path = dir.join("generation_config.json");
    if gen_path.exists() {
        let text = std::fs::read_to_string(&gen_path).map_err(|e| EngineError::io(&gen_path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::format(&gen_path, format!("invalid JSON: {e}")))?;
        apply_generation_config(&mut sampling_defaults, &json);
    }
    Ok(LoadedModel {
        path: dir.to_path_buf(),
        config,
        weights,
        tokenizer,
        sampling_defaults,
    })
}

/// vLLM's `--generation-config auto`: the model's preferred sampling values become defaults.
pub fn apply_generation_config(defaults: &mut SamplingParams, json: &serde_json::Value) {
    let num = |k: &str| json.get(k).and_then(serde_json::Value::as_f64);
    if let Some(v) = num("temperature") {
        defaults.temperature = v as f32;
    }
    if let Some(v) = num("top_p") {
        defaults.top_p = v as f32;
    }
    if let Some(v) = num("top_k") {
        defaults.top_k = v as i32;
    }
    if let Some(v) = num("min_p") {
        defaults.min_p = v as f32;
    }
    if let Some(v) = num("repetition_penalty") {
        defaults.repetition_penalty = v as f32;
    }
}
