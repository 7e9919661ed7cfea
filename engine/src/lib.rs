//! `sluice-engine`: a vLLM-like inference engine in Rust.
//!
//! The pieces and their seams:
//! - loading: [`gguf`] (GGUF v3 files) and [`safetensors_dir`] (Hugging Face folders) produce
//!   [`tensor::QTensor`]s through the [`weights::WeightSource`] trait, described by a
//!   [`config::ModelConfig`];
//! - [`quant`]: GGML block formats, dequantisation and the quantised dot products the CPU
//!   executor multiplies with directly;
//! - [`tokenizer`], [`chat_template`], [`detok`]: text in and out (incremental detokenisation,
//!   stop strings across token boundaries);
//! - [`kv`] and [`scheduler`]: pure-Rust planning (continuous batching, chunked prefill, paged KV
//!   blocks, prefix caching, preemption by recompute). The scheduler only plans a
//!   [`plan::StepPlan`]; an [`executor::Executor`] only runs one. The CUDA executor slots in there;
//! - [`sampling`]: turns a row of logits into a token per request parameters;
//! - [`engine`]: the loop that ties scheduler, executor and sampler together, and the
//!   [`engine::EngineHandle`] the HTTP layer talks to;
//! - [`api`]: the OpenAI + vLLM-native HTTP API on TCP or a unix socket, with [`metrics`].

pub mod api;
pub mod chat_template;
pub mod config;
pub mod detok;
pub mod device;
pub mod engine;
pub mod error;
pub mod executor;
pub mod gguf;
pub mod kv;
pub mod load;
pub mod metrics;
pub mod model;
pub mod panel;
pub mod plan;
pub mod quant;
pub mod safetensors_dir;
pub mod sampling;
pub mod scheduler;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

pub use error::EngineError;
