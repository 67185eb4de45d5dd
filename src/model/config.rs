//! config.json → [`ModelConfig`]. (Parsing: see `ModelConfig::from_file` / `from_json_str`.)

use serde::{Deserialize, Serialize};

/// Supported `architectures[0]` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

/// RoPE frequency scaling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/head_dim)`.
    Default,
    /// Llama 3.1 piecewise scaling of `inv_freq`.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Linear position interpolation: `inv_freq / factor`.
    Linear { factor: f64 },
}

/// Storage dtype of the checkpoint as config.json states it (`torch_dtype` or `dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfigDType {
    F32,
    F16,
    Bf16,
}

/// Everything the forward pass and the pipeline need to know about a Llama-family model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    /// `architectures[0]` exactly as written, e.g. `LlamaForCausalLM`.
    pub architecture_name: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (Qwen2 always; Llama `attention_bias`). o_proj bias follows `attention_bias` for
    /// Llama and is absent for Qwen2 — the loader decides from the tensors actually present.
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3: RMSNorm over each q / k head before RoPE.
    pub qk_norm: bool,
    pub dtype: ConfigDType,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    /// `(out_features, in_features)` of a decoder linear.
    pub fn linear_shape(&self, m: super::ModuleKind) -> (usize, usize) {
        use super::ModuleKind::*;
        let (h, i) = (self.hidden_size, self.intermediate_size);
        match m {
            Q => (self.q_dim(), h),
            K | V => (self.kv_dim(), h),
            O => (h, self.q_dim()),
            Gate | Up => (i, h),
            Down => (h, i),
        }
    }
}
