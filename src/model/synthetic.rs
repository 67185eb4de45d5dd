//! A deterministic, randomly initialised Llama-shaped model for the demo and for tests that must
//! run without a checkpoint. It is **not** a trained model: its perplexity is meaningless, but its
//! weight and activation statistics are shaped like real ones so quantization behaves visibly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::{Architecture, ConfigDType, ModelConfig, RopeScaling};
use super::weights::{
    EMBED_NAME, FINAL_NORM_NAME, LM_HEAD_NAME, TensorStore, TensorView, WeightError,
};
use super::{LayerWeights, Linear, ModuleKind, WeightSource};

/// A synthetic model: every tensor generated at construction from the seed and held as f32.
///
/// Structure (why): linear weights ~ N(0, 1/fan_in) (the variance-preserving init real
/// checkpoints stay close to); RMSNorm gains ~ N(1, 0.1²), except a few *outlier channels* per
/// layer whose gain is 5–10×, and a few `up_proj` / `v_proj` rows scaled 5–10× so `down_proj` and
/// `o_proj` also see outlier input channels. Outlier input channels make the Hessian diagonal
/// uneven, which is what makes quantization error visible and act-order matter.
pub struct SyntheticModel {
    config: ModelConfig,
    seed: u64,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    bytes: BTreeMap<String, Vec<u8>>,
    dir: PathBuf,
}

/// Stable 64-bit FNV-1a, so each tensor's RNG stream depends only on (seed, name).
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Standard normal by Box–Muller (rand 0.9 has no `Normal` without rand_distr).
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

impl SyntheticModel {
    /// The demo shape: hidden 128, intermediate 384, 4 layers, 4 heads / 2 kv heads, head_dim 32,
    /// vocab 512, untied lm_head.
    pub fn demo_config() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            architecture_name: "LlamaForCausalLM".into(),
            hidden_size: 128,
            intermediate_size: 384,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 32,
            vocab_size: 512,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::Default,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            qk_norm: false,
            dtype: ConfigDType::F32,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
        }
    }

    pub fn new(seed: u64) -> Self {
        Self::with_config(Self::demo_config(), seed)
    }

    /// Any Llama-family shape (q/k/v biases when `attention_bias`, MLP biases when `mlp_bias`,
    /// q/k norms when `qk_norm`; lm_head stored only when not tied).
    pub fn with_config(config: ModelConfig, seed: u64) -> Self {
        let mut tensors = BTreeMap::new();
        let c = &config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let mut add =
            |name: String, shape: Vec<usize>, generate: &dyn Fn(&mut ChaCha8Rng, usize) -> f32| {
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(&name));
                let n: usize = shape.iter().product();
                let data: Vec<f32> = (0..n).map(|i| generate(&mut rng, i)).collect();
                tensors.insert(name, (shape, data));
            };
        add(EMBED_NAME.into(), vec![v, h], &|r, _| normal(r));
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}.");
            let outl_h = Self::outliers(seed, &format!("{p}hidden"), h);
            let gain = |outl: &[(usize, f32)]| {
                let outl = outl.to_vec();
                move |r: &mut ChaCha8Rng, i: usize| {
                    let g = 1.0 + 0.1 * normal(r);
                    outl.iter()
                        .find(|(ch, _)| *ch == i)
                        .map_or(g, |(_, s)| g.abs() * s)
                }
            };
            add(
                format!("{p}input_layernorm.weight"),
                vec![h],
                &gain(&outl_h),
            );
            let outl_h2 = Self::outliers(seed, &format!("{p}hidden2"), h);
            add(
                format!("{p}post_attention_layernorm.weight"),
                vec![h],
                &gain(&outl_h2),
            );
            for m in ModuleKind::ALL {
                let (o, i) = c.linear_shape(m);
                let std = (1.0 / i as f64).sqrt() as f32;
                // Rows of v_proj / up_proj scaled so o_proj / down_proj get outlier input channels.
                let row_outl = match m {
                    ModuleKind::V | ModuleKind::Up => {
                        Self::outliers(seed, &format!("{p}{}", m.short_name()), o)
                    }
                    _ => Vec::new(),
                };
                add(
                    format!("{p}{}.weight", m.hf_name()),
                    vec![o, i],
                    &move |r, idx| {
                        let row = idx / i;
                        let s = row_outl
                            .iter()
                            .find(|(ch, _)| *ch == row)
                            .map_or(1.0, |(_, s)| *s);
                        normal(r) * std * s
                    },
                );
                let has_bias = match m {
                    ModuleKind::Q | ModuleKind::K | ModuleKind::V => c.attention_bias,
                    ModuleKind::Gate | ModuleKind::Up | ModuleKind::Down => c.mlp_bias,
                    ModuleKind::O => false,
                };
                if has_bias {
                    add(format!("{p}{}.bias", m.hf_name()), vec![o], &|r, _| {
                        0.02 * normal(r)
                    });
                }
            }
            if c.qk_norm {
                add(
                    format!("{p}self_attn.q_norm.weight"),
                    vec![c.head_dim],
                    &|r, _| 1.0 + 0.1 * normal(r),
                );
                add(
                    format!("{p}self_attn.k_norm.weight"),
                    vec![c.head_dim],
                    &|r, _| 1.0 + 0.1 * normal(r),
                );
            }
        }
        add(FINAL_NORM_NAME.into(), vec![h], &|r, _| {
            1.0 + 0.1 * normal(r)
        });
        if !c.tie_word_embeddings {
            let std = (1.0 / h as f64).sqrt() as f32;
            add(LM_HEAD_NAME.into(), vec![v, h], &move |r, _| {
                normal(r) * std
            });
        }
        let bytes = tensors
            .iter()
            .map(|(k, (_, d))| (k.clone(), d.iter().flat_map(|x| x.to_le_bytes()).collect()))
            .collect();
        SyntheticModel {
            config,
            seed,
            tensors,
            bytes,
            dir: PathBuf::from(format!("<synthetic seed {seed}>")),
        }
    }

    /// Up to 4 (at least 1) outlier channels out of `n`, each with a scale in [5, 10).
    fn outliers(seed: u64, tag: &str, n: usize) -> Vec<(usize, f32)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(tag) ^ 0x5eed);
        let k = (n / 32).clamp(1, 4);
        (0..k)
            .map(|_| (rng.random_range(0..n), rng.random_range(5.0f32..10.0)))
            .collect()
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    fn get(&self, name: &str) -> Result<&[f32], WeightError> {
        self.tensors
            .get(name)
            .map(|(_, d)| d.as_slice())
            .ok_or_else(|| WeightError::Tensor {
                path: self.dir.display().to_string(),
                tensor: name.to_string(),
                message: "not present in the synthetic model".into(),
            })
    }

    fn opt(&self, name: &str) -> Option<Vec<f32>> {
        self.tensors.get(name).map(|(_, d)| d.clone())
    }

    fn linear(&self, p: &str, m: ModuleKind) -> Result<Linear, WeightError> {
        let (out_features, in_features) = self.config.linear_shape(m);
        Ok(Linear {
            weight: self.get(&format!("{p}{}.weight", m.hf_name()))?.to_vec(),
            out_features,
            in_features,
            bias: self.opt(&format!("{p}{}.bias", m.hf_name())),
        })
    }

    fn rows(&self, name: &str, rows: impl Iterator<Item = usize>) -> Result<Vec<f32>, WeightError> {
        let d = self.get(name)?;
        let (h, v) = (self.config.hidden_size, self.config.vocab_size);
        let mut out = Vec::new();
        for r in rows {
            if r >= v {
                return Err(WeightError::Tensor {
                    path: self.dir.display().to_string(),
                    tensor: name.to_string(),
                    message: format!("row {r} out of range (vocab_size {v})"),
                });
            }
            out.extend_from_slice(&d[r * h..(r + 1) * h]);
        }
        Ok(out)
    }
}

impl WeightSource for SyntheticModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, WeightError> {
        self.rows(EMBED_NAME, ids.iter().map(|&i| i as usize))
    }
    fn layer(&self, index: usize) -> Result<LayerWeights, WeightError> {
        if index >= self.config.num_layers {
            return Err(WeightError::File {
                path: self.dir.display().to_string(),
                message: format!(
                    "layer {index} requested but the model has {}",
                    self.config.num_layers
                ),
            });
        }
        let p = format!("model.layers.{index}.");
        Ok(LayerWeights {
            input_norm: self.get(&format!("{p}input_layernorm.weight"))?.to_vec(),
            q: self.linear(&p, ModuleKind::Q)?,
            k: self.linear(&p, ModuleKind::K)?,
            v: self.linear(&p, ModuleKind::V)?,
            o: self.linear(&p, ModuleKind::O)?,
            q_norm: self.opt(&format!("{p}self_attn.q_norm.weight")),
            k_norm: self.opt(&format!("{p}self_attn.k_norm.weight")),
            post_norm: self
                .get(&format!("{p}post_attention_layernorm.weight"))?
                .to_vec(),
            gate: self.linear(&p, ModuleKind::Gate)?,
            up: self.linear(&p, ModuleKind::Up)?,
            down: self.linear(&p, ModuleKind::Down)?,
        })
    }
    fn final_norm(&self) -> Result<Vec<f32>, WeightError> {
        Ok(self.get(FINAL_NORM_NAME)?.to_vec())
    }
    fn lm_head_rows(&self, rows: std::ops::Range<usize>) -> Result<Vec<f32>, WeightError> {
        let name = if self.config.tie_word_embeddings {
            EMBED_NAME
        } else {
            LM_HEAD_NAME
        };
        self.rows(name, rows)
    }
    fn describe(&self) -> String {
        format!(
            "SYNTHETIC demo model (random Llama-shaped weights with outlier channels, seed {}; not trained, perplexity is meaningless)",
            self.seed
        )
    }
}

impl TensorStore for SyntheticModel {
    fn tensor_names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn tensor(&self, name: &str) -> Result<TensorView<'_>, WeightError> {
        match (self.tensors.get(name), self.bytes.get(name)) {
            (Some((shape, _)), Some(data)) => Ok(TensorView {
                dtype: safetensors::Dtype::F32,
                shape: shape.clone(),
                data,
            }),
            _ => Err(WeightError::Tensor {
                path: self.dir.display().to_string(),
                tensor: name.to_string(),
                message: "not present in the synthetic model".into(),
            }),
        }
    }
    fn source_dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_shaped() {
        let a = SyntheticModel::new(3);
        let b = SyntheticModel::new(3);
        let la = a.layer(1).unwrap();
        assert_eq!(la.q.weight, b.layer(1).unwrap().q.weight);
        assert_ne!(
            la.q.weight,
            SyntheticModel::new(4).layer(1).unwrap().q.weight
        );
        assert_eq!(la.q.weight.len(), 128 * 128);
        assert_eq!(la.k.weight.len(), 64 * 128);
        assert_eq!(la.down.weight.len(), 128 * 384);
        // N(0, 1/fan_in): variance of gate weights ≈ 1/128.
        let var: f64 = la
            .gate
            .weight
            .iter()
            .map(|&x| (x as f64).powi(2))
            .sum::<f64>()
            / la.gate.weight.len() as f64;
        assert!((var * 128.0 - 1.0).abs() < 0.1, "{var}");
        // Outlier gains exist.
        let max = la.input_norm.iter().cloned().fold(0.0f32, f32::max);
        assert!(max > 4.0, "{max}");
        assert!(a.describe().contains("SYNTHETIC"));
        assert_eq!(a.embed(&[0, 511]).unwrap().len(), 256);
        assert!(a.embed(&[512]).is_err());
        assert_eq!(a.tensor(EMBED_NAME).unwrap().data.len(), 512 * 128 * 4);
    }
}
