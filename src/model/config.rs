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
    /// A Hugging Face config.json for this config (used when exporting a model that has no
    /// config.json of its own, i.e. the synthetic demo model). [`ModelConfig::parse`] of the result
    /// gives back `self`; `hidden_act` is always SiLU (the only activation the forward pass runs).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let model_type = match self.architecture {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        };
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::Default => serde_json::Value::Null,
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        serde_json::json!({
            "architectures": [self.architecture_name],
            "model_type": model_type,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "torch_dtype": self.dtype.name(),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        })
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

/// Errors parsing config.json. Every variant names the file (or `<string>` for
/// [`ModelConfig::from_json_str`]) and, where one is at fault, the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: malformed JSON: {message}")]
    Json { path: String, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Field {
        path: String,
        field: String,
        message: String,
    },
    #[error(
        "{path}: field `architectures`: unsupported architecture `{name}` (supported: {})",
        SUPPORTED_ARCHITECTURES.join(", ")
    )]
    UnsupportedArchitecture { path: String, name: String },
}

/// `architectures[0]` values this loader understands (all share the Llama decoder layout).
pub const SUPPORTED_ARCHITECTURES: [&str; 4] = [
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
];

impl Architecture {
    /// Maps an `architectures[0]` string to the enum.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Self::Llama),
            "MistralForCausalLM" => Some(Self::Mistral),
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            "Qwen3ForCausalLM" => Some(Self::Qwen3),
            _ => None,
        }
    }

    /// `model_type` → architecture, used only when `architectures` is absent (old or hand-written
    /// configs; transformers itself resolves `AutoModelForCausalLM` through `model_type`).
    fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            _ => None,
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// Per-architecture defaults of the transformers config classes (`LlamaConfig`,
    /// `MistralConfig`, `Qwen2Config`, `Qwen3Config`, transformers 4.4x–5.x) for fields a
    /// config.json may omit. `tie_word_embeddings` defaults to `False` in all four classes.
    fn defaults(self) -> ArchDefaults {
        match self {
            Self::Llama => ArchDefaults {
                max_position_embeddings: 2048,
            },
            Self::Mistral => ArchDefaults {
                max_position_embeddings: 4096 * 32,
            },
            Self::Qwen2 | Self::Qwen3 => ArchDefaults {
                max_position_embeddings: 32768,
            },
        }
    }
}

struct ArchDefaults {
    max_position_embeddings: usize,
}

/// Defaults shared by the four transformers config classes.
const DEFAULT_RMS_NORM_EPS: f64 = 1e-6;
const DEFAULT_ROPE_THETA: f64 = 10000.0;

impl ConfigDType {
    /// Parses `torch_dtype` / `dtype` (`"bfloat16"`, also tolerating a `torch.` prefix).
    pub fn from_hf_name(s: &str) -> Option<Self> {
        match s.strip_prefix("torch.").unwrap_or(s) {
            "float32" | "float" => Some(Self::F32),
            "float16" | "half" => Some(Self::F16),
            "bfloat16" => Some(Self::Bf16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
        }
    }
}

/// Field accessors over the parsed JSON object that produce [`ConfigError::Field`] errors naming
/// the file and the field.
struct Fields<'a> {
    path: &'a str,
    obj: &'a serde_json::Map<String, serde_json::Value>,
    /// Prefix for nested objects (`rope_scaling.`), so messages name the full field path.
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Field {
            path: self.path.to_string(),
            field: format!("{}{}", self.prefix, field),
            message: message.into(),
        }
    }

    /// The value, treating JSON `null` as absent (transformers writes `"rope_scaling": null`).
    fn get(&self, field: &str) -> Option<&'a serde_json::Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    self.err(field, format!("expected a non-negative integer, got {v}"))
                }),
        }
    }

    fn req_positive(&self, field: &str) -> Result<usize, ConfigError> {
        let n = self
            .opt_usize(field)?
            .ok_or_else(|| self.err(field, "missing (required)"))?;
        self.positive(field, n)
    }

    fn positive(&self, field: &str, n: usize) -> Result<usize, ConfigError> {
        if n == 0 {
            Err(self.err(field, "must be greater than 0"))
        } else {
            Ok(n)
        }
    }

    fn opt_f64(&self, field: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
                _ => Err(self.err(field, format!("expected a positive finite number, got {v}"))),
            },
        }
    }

    fn opt_bool(&self, field: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected true or false, got {v}"))),
        }
    }

    fn opt_str(&self, field: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a string, got {v}"))),
        }
    }

    /// A token id: an integer, or a list of integers of which the first is taken (transformers
    /// allows `eos_token_id: [128001, 128008, 128009]`; generation stops on any of them, and
    /// the first is the canonical one).
    fn opt_token_id(&self, field: &str) -> Result<Option<u32>, ConfigError> {
        let v = match self.get(field) {
            None => return Ok(None),
            Some(serde_json::Value::Array(items)) => match items.first() {
                None => return Ok(None),
                Some(first) => first,
            },
            Some(v) => v,
        };
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                self.err(
                    field,
                    format!("expected a token id (integer ≥ 0) or a list of them, got {v}"),
                )
            })
    }
}

impl ModelConfig {
    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<ModelConfig, ConfigError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses config.json text; errors name the file as `<string>`.
    pub fn from_json_str(json: &str) -> Result<ModelConfig, ConfigError> {
        Self::parse(json, "<string>")
    }

    /// Parses config.json text, naming `origin` (a path) in every error.
    ///
    /// Mirrors the transformers config classes: fields absent or `null` take the class defaults
    /// (see [`Architecture`]); both the transformers-4 layout (top-level `rope_theta`,
    /// `rope_scaling` with `rope_type` or the older `type`) and the transformers-5 layout
    /// (`rope_parameters: {rope_theta, rope_type, ...}`) are read; `rope_parameters` wins when both
    /// are present because transformers 5 writes it as the canonical copy. Structural sizes
    /// (`hidden_size`, `intermediate_size`, `num_hidden_layers`, `num_attention_heads`,
    /// `vocab_size`) are required: the class defaults (a 7B Llama) are never what a checkpoint
    /// without them means.
    pub fn parse(json: &str, origin: &str) -> Result<ModelConfig, ConfigError> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| ConfigError::Json {
                path: origin.to_string(),
                message: e.to_string(),
            })?;
        let obj = value.as_object().ok_or_else(|| ConfigError::Json {
            path: origin.to_string(),
            message: "top level is not a JSON object".to_string(),
        })?;
        let f = Fields {
            path: origin,
            obj,
            prefix: "",
        };

        let (architecture, architecture_name) = match f.get("architectures") {
            Some(serde_json::Value::Array(items)) => {
                let name = items.first().and_then(|v| v.as_str()).ok_or_else(|| {
                    f.err("architectures", "expected a non-empty list of strings")
                })?;
                let arch = Architecture::from_hf_name(name).ok_or_else(|| {
                    ConfigError::UnsupportedArchitecture {
                        path: origin.to_string(),
                        name: name.to_string(),
                    }
                })?;
                (arch, name.to_string())
            }
            Some(other) => {
                return Err(f.err(
                    "architectures",
                    format!("expected a list of strings, got {other}"),
                ));
            }
            None => {
                let mt = f.opt_str("model_type")?.ok_or_else(|| {
                    f.err(
                        "architectures",
                        "missing, and no `model_type` to infer it from",
                    )
                })?;
                let arch = Architecture::from_model_type(mt).ok_or_else(|| {
                    ConfigError::UnsupportedArchitecture {
                        path: origin.to_string(),
                        name: format!("model_type={mt}"),
                    }
                })?;
                (arch, arch.hf_name().to_string())
            }
        };
        let defaults = architecture.defaults();

        let hidden_size = f.req_positive("hidden_size")?;
        let intermediate_size = f.req_positive("intermediate_size")?;
        let num_layers = f.req_positive("num_hidden_layers")?;
        let num_heads = f.req_positive("num_attention_heads")?;
        let vocab_size = f.req_positive("vocab_size")?;
        let num_kv_heads = match f.opt_usize("num_key_value_heads")? {
            Some(n) => f.positive("num_key_value_heads", n)?,
            None => num_heads,
        };
        if !num_heads.is_multiple_of(num_kv_heads) {
            return Err(f.err(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads = {num_heads} (grouped-query attention needs an integer group size)"),
            ));
        }
        // transformers: `head_dim = getattr(config, "head_dim", hidden_size // num_attention_heads)`.
        // Qwen3 states head_dim explicitly and it need not equal hidden/heads.
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => f.positive("head_dim", d)?,
            None => {
                if !hidden_size.is_multiple_of(num_heads) {
                    return Err(f.err(
                        "num_attention_heads",
                        format!("{num_heads} does not divide hidden_size = {hidden_size} and no `head_dim` is given"),
                    ));
                }
                hidden_size / num_heads
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(f.err(
                "head_dim",
                format!("{head_dim} is odd; rotary embeddings rotate pairs of dimensions"),
            ));
        }

        let rms_norm_eps = f.opt_f64("rms_norm_eps")?.unwrap_or(DEFAULT_RMS_NORM_EPS);
        let (rope_theta, rope_scaling) = parse_rope(&f)?;
        let max_position_embeddings = match f.opt_usize("max_position_embeddings")? {
            Some(n) => f.positive("max_position_embeddings", n)?,
            None => defaults.max_position_embeddings,
        };
        let tie_word_embeddings = f.opt_bool("tie_word_embeddings")?.unwrap_or(false);
        // Qwen2 hard-codes `bias=True` on q/k/v (modeling_qwen2.py) and has no config switch.
        let attention_bias = match architecture {
            Architecture::Qwen2 => true,
            Architecture::Mistral => false,
            Architecture::Llama | Architecture::Qwen3 => {
                f.opt_bool("attention_bias")?.unwrap_or(false)
            }
        };
        let mlp_bias = match architecture {
            Architecture::Llama => f.opt_bool("mlp_bias")?.unwrap_or(false),
            _ => false,
        };
        let qk_norm = architecture == Architecture::Qwen3;

        // transformers 5 writes `dtype`, 4.x `torch_dtype`; absent means the class default float32.
        let dtype = match (f.opt_str("dtype")?, f.opt_str("torch_dtype")?) {
            (Some(s), _) => ConfigDType::from_hf_name(s).ok_or_else(|| {
                f.err(
                    "dtype",
                    format!("unsupported dtype `{s}` (expected float32, float16 or bfloat16)"),
                )
            })?,
            (None, Some(s)) => ConfigDType::from_hf_name(s).ok_or_else(|| {
                f.err(
                    "torch_dtype",
                    format!("unsupported dtype `{s}` (expected float32, float16 or bfloat16)"),
                )
            })?,
            (None, None) => ConfigDType::F32,
        };

        Ok(ModelConfig {
            architecture,
            architecture_name,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings,
            attention_bias,
            mlp_bias,
            qk_norm,
            dtype,
            bos_token_id: f.opt_token_id("bos_token_id")?,
            eos_token_id: f.opt_token_id("eos_token_id")?,
        })
    }
}

/// RoPE parameters from either layout (see [`ModelConfig::parse`]).
fn parse_rope(f: &Fields<'_>) -> Result<(f64, RopeScaling), ConfigError> {
    if let Some(v) = f.get("rope_parameters") {
        let obj = v
            .as_object()
            .ok_or_else(|| f.err("rope_parameters", format!("expected an object, got {v}")))?;
        let inner = Fields {
            path: f.path,
            obj,
            prefix: "rope_parameters.",
        };
        let theta = match inner.opt_f64("rope_theta")? {
            Some(t) => t,
            None => f.opt_f64("rope_theta")?.unwrap_or(DEFAULT_ROPE_THETA),
        };
        return Ok((theta, parse_rope_scaling(&inner)?));
    }
    let theta = f.opt_f64("rope_theta")?.unwrap_or(DEFAULT_ROPE_THETA);
    let scaling = match f.get("rope_scaling") {
        None => RopeScaling::Default,
        Some(v) => {
            let obj = v.as_object().ok_or_else(|| {
                f.err(
                    "rope_scaling",
                    format!("expected an object or null, got {v}"),
                )
            })?;
            parse_rope_scaling(&Fields {
                path: f.path,
                obj,
                prefix: "rope_scaling.",
            })?
        }
    };
    Ok((theta, scaling))
}

/// `rope_type` (or the pre-4.45 key `type`) → [`RopeScaling`]. Types other than default/linear/
/// llama3 (dynamic, yarn, longrope, …) change attention in ways the forward pass does not model,
/// so they are rejected rather than silently ignored.
fn parse_rope_scaling(f: &Fields<'_>) -> Result<RopeScaling, ConfigError> {
    let (key, kind) = match (f.opt_str("rope_type")?, f.opt_str("type")?) {
        (Some(t), _) => ("rope_type", t),
        (None, Some(t)) => ("type", t),
        (None, None) => return Ok(RopeScaling::Default),
    };
    let req = |field: &str| -> Result<f64, ConfigError> {
        f.opt_f64(field)?
            .ok_or_else(|| f.err(field, format!("missing (required by rope type `{kind}`)")))
    };
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear {
            factor: req("factor")?,
        }),
        "llama3" => {
            let low = req("low_freq_factor")?;
            let high = req("high_freq_factor")?;
            if high <= low {
                return Err(f.err(
                    "high_freq_factor",
                    format!("{high} must be greater than low_freq_factor = {low}"),
                ));
            }
            Ok(RopeScaling::Llama3 {
                factor: req("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: req("original_max_position_embeddings")?,
            })
        }
        other => Err(f.err(
            key,
            format!("unsupported RoPE type `{other}` (supported: default, linear, llama3)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
            "num_attention_heads": 8, "vocab_size": 512
        })
    }

    fn parse(v: &serde_json::Value) -> Result<ModelConfig, ConfigError> {
        ModelConfig::parse(&v.to_string(), "cfg.json")
    }

    #[test]
    fn defaults_follow_transformers() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.num_kv_heads, 8);
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.dtype, ConfigDType::F32);
        assert_eq!(c.max_position_embeddings, 2048);
    }

    #[test]
    fn rope_layouts() {
        let mut v = base();
        v["rope_theta"] = 500000.0.into();
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = parse(&v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));

        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        assert_eq!(
            parse(&v).unwrap().rope_scaling,
            RopeScaling::Linear { factor: 2.0 }
        );

        let mut v = base();
        v["rope_parameters"] = serde_json::json!({"rope_theta": 1e6, "rope_type": "default"});
        let c = parse(&v).unwrap();
        assert_eq!(c.rope_theta, 1e6);

        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let e = parse(&v).unwrap_err().to_string();
        assert!(
            e.contains("cfg.json") && e.contains("rope_scaling.rope_type") && e.contains("yarn"),
            "{e}"
        );
    }

    #[test]
    fn qwen_flags_and_eos_list() {
        let mut v = base();
        v["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
        v["eos_token_id"] = serde_json::json!([7, 8]);
        v["torch_dtype"] = "bfloat16".into();
        let c = parse(&v).unwrap();
        assert!(c.attention_bias && !c.qk_norm);
        assert_eq!(c.eos_token_id, Some(7));
        assert_eq!(c.dtype, ConfigDType::Bf16);

        let mut v = base();
        v["architectures"] = serde_json::json!(["Qwen3ForCausalLM"]);
        v["head_dim"] = 16.into();
        let c = parse(&v).unwrap();
        assert!(c.qk_norm && !c.attention_bias);
        assert_eq!(c.q_dim(), 128);
    }

    #[test]
    fn nonsense_rejected_with_field() {
        for (field, val, needle) in [
            ("hidden_size", serde_json::json!(0), "hidden_size"),
            (
                "num_key_value_heads",
                serde_json::json!(3),
                "num_key_value_heads",
            ),
            (
                "num_attention_heads",
                serde_json::json!(7),
                "num_attention_heads",
            ),
            ("rms_norm_eps", serde_json::json!(-1.0), "rms_norm_eps"),
            ("vocab_size", serde_json::json!("big"), "vocab_size"),
            ("dtype", serde_json::json!("int8"), "dtype"),
        ] {
            let mut v = base();
            v[field] = val;
            let e = parse(&v).unwrap_err().to_string();
            assert!(e.contains("cfg.json") && e.contains(needle), "{field}: {e}");
        }
        let mut v = base();
        v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
        let e = parse(&v).unwrap_err().to_string();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("Qwen3ForCausalLM"),
            "{e}"
        );
    }
}
