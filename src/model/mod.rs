//! Model description and weight access: config.json parsing, memory-mapped safetensors, tokenizer.
//!
//! Everything that runs a model reads weights through [`WeightSource`], so the forward pass,
//! the quantization pipeline and `eval` work the same on an FP checkpoint and on a GPTQ checkpoint.

pub mod config;
pub mod inspect;
pub mod prefetch;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig, RopeScaling};

/// The seven linear modules of a Llama-family decoder layer, in the order the pipeline quantizes
/// them (true-sequential groups: `[q,k,v] → [o] → [gate,up] → [down]`; algorithm.md §1.4).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum ModuleKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl ModuleKind {
    pub const ALL: [ModuleKind; 7] = [
        ModuleKind::Q,
        ModuleKind::K,
        ModuleKind::V,
        ModuleKind::O,
        ModuleKind::Gate,
        ModuleKind::Up,
        ModuleKind::Down,
    ];

    /// Tensor-name suffix inside a decoder layer, e.g. `self_attn.q_proj`.
    pub fn hf_name(self) -> &'static str {
        match self {
            ModuleKind::Q => "self_attn.q_proj",
            ModuleKind::K => "self_attn.k_proj",
            ModuleKind::V => "self_attn.v_proj",
            ModuleKind::O => "self_attn.o_proj",
            ModuleKind::Gate => "mlp.gate_proj",
            ModuleKind::Up => "mlp.up_proj",
            ModuleKind::Down => "mlp.down_proj",
        }
    }

    /// Short display name (`q_proj`, …).
    pub fn short_name(self) -> &'static str {
        match self {
            ModuleKind::Q => "q_proj",
            ModuleKind::K => "k_proj",
            ModuleKind::V => "v_proj",
            ModuleKind::O => "o_proj",
            ModuleKind::Gate => "gate_proj",
            ModuleKind::Up => "up_proj",
            ModuleKind::Down => "down_proj",
        }
    }

    pub fn from_short_name(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.short_name() == s || m.hf_name() == s)
    }
}

/// A dense linear layer `y = W x (+ b)` in f32, `weight` row-major `[out_features, in_features]`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Vec<f32>,
    pub out_features: usize,
    pub in_features: usize,
    pub bias: Option<Vec<f32>>,
}

/// One decoder layer's weights, converted to f32 (bf16/f16 are widened on load).
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub input_norm: Vec<f32>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// Qwen3 per-head RMSNorm over q and k (length `head_dim`).
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub post_norm: Vec<f32>,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl LayerWeights {
    pub fn linear(&self, m: ModuleKind) -> &Linear {
        match m {
            ModuleKind::Q => &self.q,
            ModuleKind::K => &self.k,
            ModuleKind::V => &self.v,
            ModuleKind::O => &self.o,
            ModuleKind::Gate => &self.gate,
            ModuleKind::Up => &self.up,
            ModuleKind::Down => &self.down,
        }
    }

    pub fn linear_mut(&mut self, m: ModuleKind) -> &mut Linear {
        match m {
            ModuleKind::Q => &mut self.q,
            ModuleKind::K => &mut self.k,
            ModuleKind::V => &mut self.v,
            ModuleKind::O => &mut self.o,
            ModuleKind::Gate => &mut self.gate,
            ModuleKind::Up => &mut self.up,
            ModuleKind::Down => &mut self.down,
        }
    }
}

/// Read access to a model's weights, one decoder layer at a time, so that a model larger than RAM
/// can be processed. Implemented by FP safetensors checkpoints ([`weights::SafetensorsModel`]),
/// GPTQ checkpoints (`export::GptqModel`, dequantized on load) and the synthetic demo model.
pub trait WeightSource: Send + Sync {
    fn config(&self) -> &ModelConfig;
    /// Embedding rows for `ids`, concatenated: `[ids.len(), hidden]` f32.
    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, weights::WeightError>;
    fn layer(&self, index: usize) -> Result<LayerWeights, weights::WeightError>;
    fn final_norm(&self) -> Result<Vec<f32>, weights::WeightError>;
    /// `lm_head` rows `[rows.start .. rows.end)` as `[len, hidden]` f32 (chunked so an 8B-model
    /// vocabulary never needs one >2 GiB buffer).
    fn lm_head_rows(&self, rows: std::ops::Range<usize>) -> Result<Vec<f32>, weights::WeightError>;
    /// A human-readable description for reports ("safetensors bf16, 3 shards", "GPTQ 4-bit g128").
    fn describe(&self) -> String;
}
