//! Where a model's tensors come from: a GGUF file or a safetensors folder.

use crate::error::Result;
use crate::tensor::QTensor;

/// Looks tensors up by name. Errors name the file and the tensor.
pub trait WeightSource {
    /// The tensor, shaped outermost dimension first.
    fn tensor(&self, name: &str) -> Result<QTensor>;
    fn contains(&self, name: &str) -> bool;
}
