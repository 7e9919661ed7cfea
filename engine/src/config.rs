//! A model's shape, read from GGUF metadata or `config.json`.
