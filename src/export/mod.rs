//! GPTQ checkpoint format: packing, writing, reading (algorithm.md §3).
//!
//! - [`pack`]: bit packing of codes (`qweight`) and v1 zero points (`qzeros`) for 2/3/4/8 bits.
//! - [`writer`]: [`write_checkpoint`] turns a [`crate::pipeline::QuantizedModel`] plus its source
//!   model into a Hugging Face GPTQ directory (sharded safetensors, config.json with
//!   `quantization_config`, quantize_config.json, tokenizer files, the run report), atomically.
//! - [`reader`]: [`GptqModel`] opens any checkpoint_format "gptq" (v1) directory and serves it as a
//!   [`crate::model::WeightSource`], dequantizing one layer at a time.

pub mod pack;
pub mod reader;
pub mod writer;

pub use pack::PackError;
pub use reader::{GptqModel, GptqSettings};
pub use writer::{ExportOptions, ExportSummary, write_checkpoint};

use crate::model::weights::WeightError;

/// Errors of export and of reading GPTQ checkpoints. Every variant names what is at fault: the
/// output / input path, the file and tensor, or the layer and module.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: already exists and is not empty; pass --force to replace it")]
    OutputExists { path: String },
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("layer {layer} {module}: {message}")]
    Module {
        layer: usize,
        module: String,
        message: String,
    },
    #[error("{path}: tensor `{tensor}`: {message}")]
    Tensor {
        path: String,
        tensor: String,
        message: String,
    },
    /// A checkpoint's configuration (quantization_config / quantize_config.json) is unusable.
    #[error("{path}: {message}")]
    Format { path: String, message: String },
    /// The export request itself is inconsistent (options, model vs. results).
    #[error("cannot export: {0}")]
    Invalid(String),
    #[error(transparent)]
    Weights(#[from] WeightError),
}

impl ExportError {
    pub(crate) fn io(path: &std::path::Path, what: &str, e: impl std::fmt::Display) -> Self {
        ExportError::Io {
            path: path.display().to_string(),
            message: format!("{what}: {e}"),
        }
    }
    pub(crate) fn tensor(path: &std::path::Path, tensor: &str, message: impl Into<String>) -> Self {
        ExportError::Tensor {
            path: path.display().to_string(),
            tensor: tensor.to_string(),
            message: message.into(),
        }
    }
    pub(crate) fn format(path: &std::path::Path, message: impl Into<String>) -> Self {
        ExportError::Format {
            path: path.display().to_string(),
            message: message.into(),
        }
    }
}
