//! Memory-mapped safetensors checkpoints (single file or sharded with an index).

/// Errors reading weights. Every variant names the file and, where relevant, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{path}: tensor `{tensor}`: {message}")]
    Tensor {
        path: String,
        tensor: String,
        message: String,
    },
}

/// A borrowed view of one stored tensor (raw little-endian bytes as safetensors stores them).
#[derive(Clone, Debug)]
pub struct TensorView<'a> {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

/// Named tensor lookup over one checkpoint (all shards). Implemented by the memory-mapped
/// safetensors loader; the GPTQ reader and the exporter are written against this trait so they can
/// be tested on in-memory tensors.
pub trait TensorStore: Send + Sync {
    /// All tensor names, sorted.
    fn tensor_names(&self) -> Vec<String>;
    fn contains(&self, name: &str) -> bool;
    fn tensor(&self, name: &str) -> Result<TensorView<'_>, WeightError>;
    /// The directory the checkpoint was read from (for error messages and for copying side files).
    fn source_dir(&self) -> &std::path::Path;
}
