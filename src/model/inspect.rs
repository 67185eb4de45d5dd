//! `inspect`: what a checkpoint is and what quantizing it will cost.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Serialize;

use super::config::RopeScaling;
use super::weights::{EMBED_NAME, LM_HEAD_NAME, SafetensorsModel, TensorStore, WeightError};
use super::{ModuleKind, WeightSource};

/// One decoder linear's shape (identical in every layer of these architectures).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModuleShape {
    pub name: String,
    pub out_features: usize,
    pub in_features: usize,
    pub params: u64,
}

/// A model's vital statistics for the CLI `inspect` command and the GUI header.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelSummary {
    pub description: String,
    pub architecture: String,
    /// config.json `torch_dtype` / `dtype`.
    pub config_dtype: String,
    /// Stored dtype → number of tensors (empty when only the config is known).
    pub stored_dtypes: BTreeMap<String, usize>,
    pub param_count: u64,
    /// `"stored tensors"` (summed from the tensors' shapes, a tied matrix counted once) or `"config"`.
    pub param_count_source: String,
    pub stored_bytes: u64,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope: String,
    pub tied_embeddings: bool,
    /// Which of embed_tokens / lm_head are stored.
    pub embedding_storage: String,
    /// Shard file names (one entry for a single-file checkpoint, empty for in-memory models).
    pub shards: Vec<String>,
    pub modules: Vec<ModuleShape>,
    /// Σ decoder-linear weights over all layers: what GPTQ quantizes (lm_head excluded).
    pub quantizable_params: u64,
    /// Largest in-feature count of a decoder linear: sets the Hessian size.
    pub largest_in_features: usize,
}

impl ModelSummary {
    /// From a [`WeightSource`] alone: shapes and parameter count derived from the config.
    pub fn from_source(src: &dyn WeightSource) -> Self {
        let c = src.config();
        let (v, h) = (c.vocab_size as u64, c.hidden_size as u64);
        let modules: Vec<ModuleShape> = ModuleKind::ALL
            .iter()
            .map(|&m| {
                let (o, i) = c.linear_shape(m);
                ModuleShape {
                    name: m.short_name().to_string(),
                    out_features: o,
                    in_features: i,
                    params: (o * i) as u64,
                }
            })
            .collect();
        let per_layer_linear: u64 = modules.iter().map(|m| m.params).sum();
        let quantizable_params = per_layer_linear * c.num_layers as u64;
        let per_layer_norms = 2 * h + if c.qk_norm { 2 * c.head_dim as u64 } else { 0 };
        let embeddings = if c.tie_word_embeddings {
            v * h
        } else {
            2 * v * h
        };
        let param_count =
            quantizable_params + per_layer_norms * c.num_layers as u64 + h + embeddings;
        let rope = match &c.rope_scaling {
            RopeScaling::Default => format!("theta {}", c.rope_theta),
            RopeScaling::Linear { factor } => format!("theta {}, linear ×{factor}", c.rope_theta),
            RopeScaling::Llama3 { factor, .. } => {
                format!("theta {}, llama3 ×{factor}", c.rope_theta)
            }
        };
        ModelSummary {
            description: src.describe(),
            architecture: c.architecture_name.clone(),
            config_dtype: c.dtype.name().to_string(),
            stored_dtypes: BTreeMap::new(),
            param_count,
            param_count_source: "config".into(),
            stored_bytes: 0,
            num_layers: c.num_layers,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            vocab_size: c.vocab_size,
            max_position_embeddings: c.max_position_embeddings,
            rope,
            tied_embeddings: c.tie_word_embeddings,
            embedding_storage: if c.tie_word_embeddings {
                "tied"
            } else {
                "embed_tokens + lm_head"
            }
            .into(),
            shards: Vec::new(),
            modules,
            quantizable_params,
            largest_in_features: ModuleKind::ALL
                .iter()
                .map(|&m| c.linear_shape(m).1)
                .max()
                .unwrap_or(0),
        }
    }

    /// From a source plus its tensors: parameter count, bytes and dtypes from what is stored.
    pub fn from_store(
        src: &dyn WeightSource,
        store: &dyn TensorStore,
    ) -> Result<Self, WeightError> {
        let mut s = Self::from_source(src);
        let (mut params, mut bytes) = (0u64, 0u64);
        for name in store.tensor_names() {
            let t = store.tensor(&name)?;
            params += t.shape.iter().product::<usize>() as u64;
            bytes += t.data.len() as u64;
            *s.stored_dtypes.entry(format!("{:?}", t.dtype)).or_insert(0) += 1;
        }
        s.param_count = params;
        s.param_count_source = "stored tensors".into();
        s.stored_bytes = bytes;
        s.embedding_storage = match (store.contains(EMBED_NAME), store.contains(LM_HEAD_NAME)) {
            (true, true) => "embed_tokens + lm_head",
            (true, false) => "embed_tokens only (lm_head tied to it)",
            (false, true) => "lm_head only (embed_tokens tied to it)",
            (false, false) => "none stored",
        }
        .into();
        s.tied_embeddings = !(store.contains(EMBED_NAME) && store.contains(LM_HEAD_NAME));
        Ok(s)
    }

    pub fn from_safetensors(m: &SafetensorsModel) -> Result<Self, WeightError> {
        let mut s = Self::from_store(m, m)?;
        s.shards = m
            .shard_paths()
            .iter()
            .map(|p| {
                p.file_name().map_or_else(
                    || p.display().to_string(),
                    |f| f.to_string_lossy().into_owned(),
                )
            })
            .collect();
        Ok(s)
    }

    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, WeightError> {
        Self::from_safetensors(&SafetensorsModel::open(dir)?)
    }

    /// Multi-line report for the CLI (`Display` prints the same).
    pub fn to_text(&self) -> String {
        self.to_string()
    }
}

/// `1536` → `1.5 KiB`.
pub fn format_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

/// `15735168` → `15.74 M`.
pub fn format_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

impl fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.description)?;
        writeln!(f, "architecture   {}", self.architecture)?;
        let stored = if self.stored_dtypes.is_empty() {
            String::new()
        } else {
            let d: Vec<String> = self
                .stored_dtypes
                .iter()
                .map(|(k, v)| format!("{k}×{v}"))
                .collect();
            format!(" (stored: {})", d.join(", "))
        };
        writeln!(f, "dtype          {}{stored}", self.config_dtype)?;
        writeln!(
            f,
            "parameters     {} ({}, from {})",
            format_count(self.param_count),
            self.param_count,
            self.param_count_source
        )?;
        if self.stored_bytes > 0 {
            writeln!(f, "stored size    {}", format_bytes(self.stored_bytes))?;
        }
        writeln!(
            f,
            "layers         {} × hidden {}, intermediate {}, heads {} / kv {} × head_dim {}",
            self.num_layers,
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim
        )?;
        writeln!(f, "vocab          {}", self.vocab_size)?;
        writeln!(
            f,
            "rope           {}, max positions {}",
            self.rope, self.max_position_embeddings
        )?;
        writeln!(
            f,
            "embeddings     {}{}",
            self.embedding_storage,
            if self.tied_embeddings { " [tied]" } else { "" }
        )?;
        if !self.shards.is_empty() {
            writeln!(
                f,
                "files          {} ({})",
                self.shards.len(),
                self.shards.join(", ")
            )?;
        }
        writeln!(f, "decoder linears (per layer):")?;
        writeln!(
            f,
            "  {:<10} {:>8} {:>8} {:>12}",
            "module", "out", "in", "params"
        )?;
        for m in &self.modules {
            writeln!(
                f,
                "  {:<10} {:>8} {:>8} {:>12}",
                m.name, m.out_features, m.in_features, m.params
            )?;
        }
        writeln!(
            f,
            "quantizable    {} params in decoder linears",
            format_count(self.quantizable_params)
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::SyntheticModel;

    #[test]
    fn synthetic_summary() {
        let m = SyntheticModel::new(0);
        let a = ModelSummary::from_source(&m);
        let b = ModelSummary::from_store(&m, &m).unwrap();
        assert_eq!(a.param_count, b.param_count);
        assert_eq!(b.largest_in_features, 384);
        let text = b.to_text();
        assert!(
            text.contains("SYNTHETIC") && text.contains("down_proj"),
            "{text}"
        );
        assert!(
            serde_json::to_string(&b)
                .unwrap()
                .contains("\"param_count\"")
        );
    }
}
