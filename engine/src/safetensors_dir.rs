//! A Hugging Face model folder: `model.safetensors` (or shards), `config.json`,
//! `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`.
