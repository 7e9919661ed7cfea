//! Model architectures run by the CPU executor: Llama-family decoders (Llama, Mistral, Qwen2)
//! over the paged KV cache, and BERT encoders for embeddings.

pub mod attention;
pub mod bert;
pub mod llama;
pub mod ops;
