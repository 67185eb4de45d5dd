//! GPU forward pass of a Llama-family decoder layer (Llama, Mistral, Qwen2 with q/k/v bias, Qwen3
//! with q/k RMSNorm), split into the stage building blocks the quantization pipeline interleaves
//! with its statistics (see `pipeline::driver`) and that [`crate::eval`] chains for perplexity.
//!
//! Data layout: activations are row-major `[tokens, features]` f32 with the sequences of a batch
//! packed back to back (`tokens = nseq · seqlen`); linear weights are HF's `[out, in]` row-major,
//! so `y = x·Wᵀ` is a GEMM with a transposed view of W. Each stage records into a [`Recorder`]; no
//! stage reads anything back to the host.
//!
//! Every kernel has an f64 CPU counterpart in [`cpu`] that the tests compare against.

pub mod cpu;

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use crate::gpu::kernels::groups_1d;
use crate::gpu::ops::{self, CoopOp, CoopOperand, MatView};
use crate::gpu::{GpuBuffer, GpuContext, GpuError, Recorder};
use crate::model::{LayerWeights, ModelConfig, ModuleKind, RopeScaling};

crate::wgsl_shader!(RMSNORM, "rmsnorm");
crate::wgsl_shader!(ROPE, "rope");
crate::wgsl_shader!(ATTENTION, "attention");
crate::wgsl_shader!(FORWARD_EW, "forward_ew");
crate::wgsl_shader!(ATTN_SOFTMAX, "attn_softmax");

/// The largest head dim of the attention kernel: its output tile is at most 4 groups of 64 dims per
/// invocation (`attention_tiles`).
pub const MAX_HEAD_DIM: usize = 256;

use crate::gpu::ops::u32_of;

/// Shapes of one decoder layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    /// `(out, in)` per module, from [`ModelConfig::linear_shape`] (the one place the shapes are
    /// defined), indexed by `ModuleKind as usize`.
    shapes: [(usize, usize); 7],
}

impl LayerDims {
    pub fn of(cfg: &ModelConfig) -> Self {
        Self {
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps as f32,
            shapes: ModuleKind::ALL.map(|m| cfg.linear_shape(m)),
        }
    }
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// `(out_features, in_features)` of a module.
    pub fn linear_shape(&self, m: ModuleKind) -> (usize, usize) {
        self.shapes[m as usize]
    }
    fn check(&self) -> Result<(), GpuError> {
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) || self.head_dim > MAX_HEAD_DIM {
            return Err(GpuError::Validation(format!(
                "head_dim {} is not supported by the attention kernel (even, 2..={MAX_HEAD_DIM})",
                self.head_dim
            )));
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(GpuError::Validation(format!(
                "{} attention heads are not a multiple of {} kv heads",
                self.heads, self.kv_heads
            )));
        }
        Ok(())
    }
}

/// HF's `inv_freq` for the model's RoPE variant, computed in f32 as transformers does
/// (`1 / base^(arange(0, d, 2) / d)`), then rescaled for `llama3` / `linear` scaling.
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let mut f: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32))
        .collect();
    match cfg.rope_scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => f.iter_mut().for_each(|x| *x /= factor as f32),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            // transformers `_compute_llama3_parameters`.
            let low_wl = old / low_freq_factor;
            let high_wl = old / high_freq_factor;
            for x in f.iter_mut() {
                let inv = f64::from(*x);
                let wl = 2.0 * std::f64::consts::PI / inv;
                let scaled = if wl > low_wl { inv / factor } else { inv };
                // transformers: `~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)`.
                let medium = wl >= high_wl && wl <= low_wl;
                *x = if medium {
                    let smooth =
                        (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                } else {
                    scaled as f32
                };
            }
        }
    }
    f
}

/// Precomputed RoPE tables `[max_pos, head_dim/2]`: the angle is `f32(pos)·inv_freq` in f32 (as
/// HF computes it), its cos/sin taken in f64 and rounded.
pub struct Rope {
    cos: GpuBuffer<f32>,
    sin: GpuBuffer<f32>,
    max_pos: usize,
}

impl Rope {
    pub fn new(ctx: &GpuContext, cfg: &ModelConfig, max_pos: usize) -> Result<Self, GpuError> {
        let (cos, sin) = rope_tables(cfg, max_pos);
        Ok(Self {
            cos: ctx.upload("rope cos", &cos)?,
            sin: ctx.upload("rope sin", &sin)?,
            max_pos,
        })
    }
}

/// Host RoPE tables (shared with the CPU reference).
pub fn rope_tables(cfg: &ModelConfig, max_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let f = inv_freq(cfg);
    let half = f.len();
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for pos in 0..max_pos {
        for &x in &f {
            let angle = f64::from(pos as f32 * x);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

/// Sequences of `seqlen` tokens the tensor-core attention takes at once for batches of up to
/// `max_tokens` tokens, where memory is not the question ([`ATTN_SEQS`] at most; the pipeline's
/// memory plan may choose fewer).
pub fn attention_sequences(max_tokens: usize, seqlen: usize) -> usize {
    (max_tokens / seqlen.max(1)).clamp(1, ATTN_SEQS)
}

/// Activation rows cast to f16 at a time by the tensor-core forward: bounds its f16 scratch
/// (4096 × 14336 × 2 B = 112 MiB for Llama-3-8B's down_proj input) whatever the batch, while each
/// chunk is still a GEMM large enough to fill the GPU. A multiple of every `CoopOp` block.
pub const TC_CHUNK_TOKENS: usize = 4096;

/// The smallest row block of the tensor-core linears (`CoopOp::Nt`'s): a batch of a multiple of
/// this many tokens runs every row of a module with an f16 copy on the tensor cores
/// (`tc_ranges` takes 128-, then 64-, then 32-row blocks), none on the f32 GEMM, so such a
/// module's f32 weight is not read by the forward ([`GpuLayer::release_f32`]).
pub const TC_ROW_TILE: usize = 32;

/// Whether a `rows × cols` linear gets an f16 copy for the tensor-core forward
/// ([`GpuLayer::enable_tensor_cores`]): its shape tiles `CoopOp::Nt`'s blocks.
pub fn tc_weight_tiles(rows: usize, cols: usize) -> bool {
    ops::coop_shape_ok_for(CoopOp::Nt, TC_ROW_TILE, rows, cols)
}

/// The tensor-core forward's f16 operands ([`GpuLayer::enable_tensor_cores`]).
struct TensorCores {
    /// Per module (`ModuleKind as usize`): the f16 copy of its weight, `None` where the shape does
    /// not tile into the cooperative-matrix blocks (that module keeps the f32 GEMM).
    w16: Vec<Option<GpuBuffer<half::f16>>>,
    /// Shared with the layer's duplicate (the other stream) and the next layers.
    scratch: TcScratch,
}

/// A layer's tensor-core scratch (the f16 activation chunk and the attention scratch), to be
/// shared with the layer's duplicate and the next layers of the same shape
/// ([`GpuLayer::enable_tensor_cores_with`]): GPU work is ordered, so one scratch serves every
/// layer, and a layer uploaded ahead needs none of its own.
#[derive(Clone)]
pub struct TcScratch {
    /// One chunk of at most `chunk` activation rows of the widest input, in f16.
    x16: Arc<GpuBuffer<half::f16>>,
    chunk: usize,
    /// The tensor-core attention's scratch, where the shapes allow it.
    attn: Option<Arc<AttnTc>>,
    /// The sequence length `attn` was made for.
    seqlen: usize,
}

/// One decoder layer's weights on the GPU.
pub struct GpuLayer {
    dims: LayerDims,
    input_norm: GpuBuffer<f32>,
    post_norm: GpuBuffer<f32>,
    q_norm: Option<GpuBuffer<f32>>,
    k_norm: Option<GpuBuffer<f32>>,
    /// Indexed by `ModuleKind as usize`.
    linears: Vec<GpuBuffer<f32>>,
    biases: Vec<Option<GpuBuffer<f32>>>,
    /// Bound where a kernel's optional input is absent.
    dummy: GpuBuffer<f32>,
    /// f16 weights for the tensor-core linears; `None`: every linear is the f32 GEMM.
    tc: Option<TensorCores>,
}

/// The seven linears' weights of `lw`, each uploaded by a host thread of its own. An upload's time
/// is its copy into freshly mapped staging memory, on the calling thread: on the GPU machine's host
/// one thread moved an 8B layer's 0.9 GB of f32 weights at ≈ 8.7 GB/s (27 ms per MLP weight), and
/// when the next layer's upload, which starts with the last stage, outlasted a GPTQ layer's short
/// last stage, the GPU waited for it at the next layer's start: 39–57 ms per layer. The copies are
/// independent, so they run side by side (the buffers, and the order in which later submissions
/// see them, are the same as one thread's): the wait fell to 18 ms and the 8B GPTQ layer took 4 %
/// less on the H100 (BENCHMARKS.md, session 33, call 2).
fn upload_linears(ctx: &GpuContext, lw: &LayerWeights) -> Result<Vec<GpuBuffer<f32>>, GpuError> {
    std::thread::scope(|s| {
        let handles: Vec<_> = ModuleKind::ALL
            .iter()
            .map(|&m| {
                s.spawn(move || {
                    // Timing scopes are per thread (gpu::timing): these are the layer's upload.
                    let _scope = ctx.time_scope("upload");
                    ctx.upload(m.hf_name(), &lw.linear(m).weight)
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(ModuleKind::ALL)
            .map(|(h, m)| {
                h.join().unwrap_or_else(|_| {
                    Err(GpuError::Validation(format!(
                        "the thread uploading {} panicked",
                        m.hf_name()
                    )))
                })
            })
            .collect()
    })
}

impl GpuLayer {
    pub fn upload(
        ctx: &GpuContext,
        cfg: &ModelConfig,
        lw: &LayerWeights,
    ) -> Result<Self, GpuError> {
        Self::upload_with(ctx, cfg, lw, false)
    }

    /// [`GpuLayer::upload`], the linears' weights through [`GpuContext::upload_paced`] when
    /// `paced` (bounded staging memory; blocks while the GPU works through what was queued
    /// before).
    pub fn upload_with(
        ctx: &GpuContext,
        cfg: &ModelConfig,
        lw: &LayerWeights,
        paced: bool,
    ) -> Result<Self, GpuError> {
        let dims = LayerDims::of(cfg);
        dims.check()?;
        let mut biases = Vec::with_capacity(7);
        for m in ModuleKind::ALL {
            let lin = lw.linear(m);
            let (rows, cols) = dims.linear_shape(m);
            if lin.weight.len() != rows * cols {
                return Err(GpuError::Validation(format!(
                    "{}: weight has {} elements, expected {rows}×{cols}",
                    m.hf_name(),
                    lin.weight.len()
                )));
            }
            biases.push(match &lin.bias {
                Some(b) if b.len() == rows => Some(ctx.upload("bias", b)?),
                Some(b) => {
                    return Err(GpuError::Validation(format!(
                        "{}: bias has {} elements, expected {rows}",
                        m.hf_name(),
                        b.len()
                    )));
                }
                None => None,
            });
        }
        let linears = if paced {
            ModuleKind::ALL
                .iter()
                .map(|&m| ctx.upload_paced(m.hf_name(), &lw.linear(m).weight))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            upload_linears(ctx, lw)?
        };
        let norm = |what: &str, v: &[f32], n: usize| -> Result<GpuBuffer<f32>, GpuError> {
            if v.len() != n {
                return Err(GpuError::Validation(format!(
                    "{what}: {} elements, expected {n}",
                    v.len()
                )));
            }
            ctx.upload(what, v)
        };
        Ok(Self {
            dims,
            input_norm: norm("input_layernorm", &lw.input_norm, dims.hidden)?,
            post_norm: norm("post_attention_layernorm", &lw.post_norm, dims.hidden)?,
            q_norm: lw
                .q_norm
                .as_deref()
                .map(|v| norm("q_norm", v, dims.head_dim))
                .transpose()?,
            k_norm: lw
                .k_norm
                .as_deref()
                .map(|v| norm("k_norm", v, dims.head_dim))
                .transpose()?,
            linears,
            biases,
            dummy: ctx.zeros("dummy", 1)?,
            tc: None,
        })
    }

    /// Runs this layer's linears on tensor cores from here on (`gemm_coop.wgsl`, f16 operands,
    /// f32 accumulation), for batches of up to `max_tokens` tokens: each module whose shape tiles
    /// into the cooperative-matrix blocks (rows a multiple of 32, input width of 16) gets an f16
    /// copy of its weight, and the activations are cast to f16 chunk by chunk as they are read.
    /// Rows of a batch beyond the last whole block, and modules that do not tile, keep the f32
    /// GEMM. Attention over sequences of `seqlen` tokens runs on tensor cores too where its
    /// shapes tile ([`AttnTc::chunk`]), over as many of a batch's sequences at once as
    /// [`attention_sequences`] gives. f16 rounds the operands to 11 significant bits, like the
    /// reference's half-precision forward; values beyond ±65504 become infinite, which the
    /// pipeline's finite check of H's diagonal reports. Returns whether any module runs on tensor
    /// cores (never where the adapter does not grant cooperative matrices).
    pub fn enable_tensor_cores(
        &mut self,
        rec: &mut Recorder<'_>,
        max_tokens: usize,
        seqlen: usize,
    ) -> Result<bool, GpuError> {
        let seqs = attention_sequences(max_tokens, seqlen);
        self.enable_tensor_cores_with(rec, max_tokens, (seqlen, seqs), None)
    }

    /// [`GpuLayer::enable_tensor_cores`] with the attention over `attn_seqs` sequences at a time
    /// (the memory plan's `attention_sequences`), reusing another layer's scratch
    /// ([`GpuLayer::tc_scratch`]) where it was made for the same chunk, width, sequence length
    /// and sequence count (else new scratch).
    pub fn enable_tensor_cores_with(
        &mut self,
        rec: &mut Recorder<'_>,
        max_tokens: usize,
        (seqlen, attn_seqs): (usize, usize),
        shared: Option<TcScratch>,
    ) -> Result<bool, GpuError> {
        let ctx = rec.ctx();
        if !ops::coop_available(ctx) {
            return Ok(false);
        }
        let mut w16 = Vec::with_capacity(self.linears.len());
        let mut widest = 0;
        for m in ModuleKind::ALL {
            let (rows, cols) = self.dims.linear_shape(m);
            if !tc_weight_tiles(rows, cols) {
                w16.push(None);
                continue;
            }
            let buf = ctx.zeros::<half::f16>(m.hf_name(), rows * cols)?;
            ops::cast_f16(
                rec,
                rows,
                cols,
                MatView::new(self.linear(m), cols),
                1.0,
                &buf,
            )?;
            w16.push(Some(buf));
            widest = widest.max(cols);
        }
        if widest == 0 {
            return Ok(false);
        }
        let chunk = max_tokens.clamp(1, TC_CHUNK_TOKENS).next_multiple_of(128);
        // No more sequences than one storage binding holds the scores of (the plan asks for
        // that many already; this guards other callers).
        let attn_seqs = AttnTc::sequences_within(
            &self.dims.attn_shape(1, seqlen),
            attn_seqs,
            ctx.max_binding_bytes(),
        );
        let shared = shared.filter(|s| {
            s.chunk == chunk
                && s.seqlen == seqlen
                && s.x16.len() == chunk * widest
                && s.attn.as_ref().is_none_or(|a| a.seqs == attn_seqs)
        });
        let scratch = match shared {
            Some(s) => s,
            None => TcScratch {
                x16: Arc::new(ctx.zeros::<half::f16>("activations f16", chunk * widest)?),
                chunk,
                attn: AttnTc::new(ctx, &self.dims.attn_shape(attn_seqs, seqlen))?.map(Arc::new),
                seqlen,
            },
        };
        self.tc = Some(TensorCores { w16, scratch });
        Ok(true)
    }

    /// This layer's tensor-core scratch, for the next layer to share.
    pub fn tc_scratch(&self) -> Option<TcScratch> {
        self.tc.as_ref().map(|tc| tc.scratch.clone())
    }

    /// Whether [`GpuLayer::enable_tensor_cores`] put any of this layer's work on tensor cores.
    pub fn uses_tensor_cores(&self) -> bool {
        self.tc.is_some()
    }

    /// Whether module `m` runs on tensor cores ([`GpuLayer::enable_tensor_cores`]).
    pub fn tensor_cores(&self, m: ModuleKind) -> bool {
        self.w16(m).is_some()
    }

    fn w16(&self, m: ModuleKind) -> Option<&GpuBuffer<half::f16>> {
        self.tc.as_ref().and_then(|tc| tc.w16[m as usize].as_ref())
    }

    /// Re-derives module `m`'s f16 weight from its f32 one after a replacement.
    fn refresh_w16(&self, rec: &mut Recorder<'_>, m: ModuleKind) -> Result<(), GpuError> {
        if let Some(w16) = self.w16(m) {
            let (rows, cols) = self.dims.linear_shape(m);
            ops::cast_f16(
                rec,
                rows,
                cols,
                MatView::new(self.linear(m), cols),
                1.0,
                w16,
            )?;
        }
        Ok(())
    }

    /// Replaces a module's weights (the pipeline installs each quantized `Q` here).
    pub fn set_linear(
        &mut self,
        ctx: &GpuContext,
        m: ModuleKind,
        w: &[f32],
    ) -> Result<(), GpuError> {
        let (rows, cols) = self.dims.linear_shape(m);
        if w.len() != rows * cols {
            return Err(GpuError::Validation(format!(
                "{}: new weight has {} elements, expected {rows}×{cols}",
                m.hf_name(),
                w.len()
            )));
        }
        self.check_f32_kept(m)?;
        ctx.write(&self.linears[m as usize], 0, w);
        if self.w16(m).is_some() {
            let mut rec = ctx.recorder();
            self.refresh_w16(&mut rec, m)?;
            rec.submit();
        }
        Ok(())
    }

    /// A second copy of this layer made on the GPU (copies recorded in `rec`): the pipeline's two
    /// streams start from the same weights, and a device-side copy spares a second upload of the
    /// layer over the host link (0.8 GiB of f32 per Llama-3-8B layer).
    pub fn duplicate(&self, rec: &mut Recorder<'_>) -> Result<Self, GpuError> {
        let ctx = rec.ctx();
        let mut dup = |b: &GpuBuffer<f32>, what: &str| -> Result<GpuBuffer<f32>, GpuError> {
            let d = ctx.zeros::<f32>(what, b.len())?;
            rec.copy(b, 0, &d, 0, b.len());
            Ok(d)
        };
        let mut linears = Vec::with_capacity(self.linears.len());
        let mut biases = Vec::with_capacity(self.biases.len());
        for (m, (w, b)) in ModuleKind::ALL
            .iter()
            .zip(self.linears.iter().zip(&self.biases))
        {
            linears.push(dup(w, m.hf_name())?);
            biases.push(b.as_ref().map(|b| dup(b, "bias")).transpose()?);
        }
        Ok(Self {
            dims: self.dims,
            input_norm: dup(&self.input_norm, "input_layernorm")?,
            post_norm: dup(&self.post_norm, "post_attention_layernorm")?,
            q_norm: self.q_norm.as_ref().map(|v| dup(v, "q_norm")).transpose()?,
            k_norm: self.k_norm.as_ref().map(|v| dup(v, "k_norm")).transpose()?,
            linears,
            biases,
            dummy: ctx.zeros("dummy", 1)?,
            tc: match &self.tc {
                None => None,
                Some(tc) => {
                    let mut w16 = Vec::with_capacity(tc.w16.len());
                    for w in &tc.w16 {
                        w16.push(match w {
                            Some(w) => {
                                let d = ctx.zeros::<half::f16>("weight f16", w.len())?;
                                rec.copy(w, 0, &d, 0, w.len());
                                Some(d)
                            }
                            None => None,
                        });
                    }
                    Some(TensorCores {
                        w16,
                        scratch: tc.scratch.clone(),
                    })
                }
            },
        })
    }

    /// Copies a module's weights from a GPU buffer inside `rec` (the GPU solve's `Q`).
    pub fn set_linear_gpu(
        &self,
        rec: &mut Recorder<'_>,
        m: ModuleKind,
        w: &GpuBuffer<f32>,
    ) -> Result<(), GpuError> {
        self.check_f32_kept(m)?;
        let dst = &self.linears[m as usize];
        if w.len() < dst.len() {
            return Err(GpuError::Validation(format!(
                "{}: new weight has {} elements, expected {}",
                m.hf_name(),
                w.len(),
                dst.len()
            )));
        }
        rec.copy(w, 0, dst, 0, dst.len());
        self.refresh_w16(rec, m)
    }

    pub fn linear(&self, m: ModuleKind) -> &GpuBuffer<f32> {
        &self.linears[m as usize]
    }

    /// Frees the weights (and f16 copies) of `mods` for the rest of this layer's life: the
    /// pipeline no longer needs q/k/v/o once it reaches the MLP, and freeing them lowers the peak,
    /// which lies in down_proj's statistics and solve. A later forward through a released module
    /// is an error, not a silent zero.
    pub fn release(&mut self, ctx: &GpuContext, mods: &[ModuleKind]) -> Result<(), GpuError> {
        for &m in mods {
            self.linears[m as usize] = ctx.zeros(m.hf_name(), 0)?;
            if let Some(tc) = self.tc.as_mut() {
                tc.w16[m as usize] = None;
            }
        }
        Ok(())
    }

    /// Frees the f32 weights of `mods` and keeps their f16 copies: the forward through them then
    /// runs on the tensor cores only, which takes batches of a multiple of [`TC_ROW_TILE`] tokens
    /// (other batches are refused, not computed from a freed weight). The pipeline frees gate/up's
    /// once they are solved where the memory plan says so (`MemoryPlan::gate_up_f32_released`):
    /// nothing reads them there any more, and down_proj's statistics and solve need the room. A
    /// module without an f16 copy is an error (the plan only frees modules that have one).
    pub fn release_f32(&mut self, ctx: &GpuContext, mods: &[ModuleKind]) -> Result<(), GpuError> {
        if let Some(&m) = mods.iter().find(|&&m| self.w16(m).is_none()) {
            return Err(GpuError::Validation(format!(
                "{}: its f32 weight cannot be freed, it has no f16 copy for the tensor cores",
                m.hf_name()
            )));
        }
        for &m in mods {
            self.linears[m as usize] = ctx.zeros(m.hf_name(), 0)?;
        }
        Ok(())
    }

    /// Whether module `m`'s f32 weight was freed ([`GpuLayer::release`] or
    /// [`GpuLayer::release_f32`]).
    pub fn f32_released(&self, m: ModuleKind) -> bool {
        let (rows, cols) = self.dims.linear_shape(m);
        self.linears[m as usize].len() != rows * cols
    }

    /// Whether [`GpuLayer::release`] freed module `m`'s weights (f32 and f16).
    pub fn released(&self, m: ModuleKind) -> bool {
        self.f32_released(m) && self.w16(m).is_none()
    }

    /// An error where module `m`'s f32 weight was freed: it cannot be replaced or read.
    fn check_f32_kept(&self, m: ModuleKind) -> Result<(), GpuError> {
        if self.f32_released(m) {
            return Err(GpuError::Validation(format!(
                "{}: its f32 weight was freed",
                m.hf_name()
            )));
        }
        Ok(())
    }

    pub fn bias(&self, m: ModuleKind) -> Option<&GpuBuffer<f32>> {
        self.biases[m as usize].as_ref()
    }

    pub fn dims(&self) -> &LayerDims {
        &self.dims
    }
}

/// Per-batch intermediate buffers of one stream, sized for `max_tokens`.
pub struct LayerScratch {
    max_tokens: usize,
    x1: GpuBuffer<f32>,
    q: GpuBuffer<f32>,
    k: GpuBuffer<f32>,
    v: GpuBuffer<f32>,
    attn: GpuBuffer<f32>,
    x2: GpuBuffer<f32>,
    up: GpuBuffer<f32>,
    act: GpuBuffer<f32>,
}

impl LayerScratch {
    pub fn new(ctx: &GpuContext, cfg: &ModelConfig, max_tokens: usize) -> Result<Self, GpuError> {
        let d = LayerDims::of(cfg);
        let t = max_tokens.max(1);
        // Every stage writes its output for a batch's tokens before the next reads it, so
        // pooled buffers need no clear (`GpuContext::scratch`; a layer's activations are
        // allocated again per stage: at Llama-3-8B's 128 × 2048 tokens those clears were 21 ms of
        // a GPTQ layer and 51 ms of a GPTAQ one on the H100, BENCHMARKS.md session 31).
        Ok(Self {
            max_tokens: t,
            x1: ctx.scratch("x1", t * d.hidden)?,
            q: ctx.scratch("q", t * d.q_dim())?,
            k: ctx.scratch("k", t * d.kv_dim())?,
            v: ctx.scratch("v", t * d.kv_dim())?,
            attn: ctx.scratch("attn", t * d.q_dim())?,
            x2: ctx.scratch("x2", t * d.hidden)?,
            up: ctx.scratch("up", t * d.intermediate)?,
            act: ctx.scratch("act", t * d.intermediate)?,
        })
    }
    /// `input_layernorm(h)`: the input of q/k/v.
    pub fn x1(&self) -> &GpuBuffer<f32> {
        &self.x1
    }
    /// Attention output before `o_proj`: the input of o.
    pub fn attn(&self) -> &GpuBuffer<f32> {
        &self.attn
    }
    /// `post_attention_layernorm(h)`: the input of gate/up.
    pub fn x2(&self) -> &GpuBuffer<f32> {
        &self.x2
    }
    /// `silu(gate)·up`: the input of down.
    pub fn act(&self) -> &GpuBuffer<f32> {
        &self.act
    }
    /// The output of a module that the forward leaves in this scratch, valid only in a window of
    /// the stage sequence: q/k/v (`s.q`, `s.k`, `s.v`) between [`qkv_proj`] and [`rope_attend`]
    /// (RoPE rewrites q and k in place), gate (`s.act`) and up between [`gate_up_proj`] and
    /// [`silu_mul`] (SwiGLU overwrites the gate output with `act`). `None` for o and down, whose
    /// outputs the fused forward adds straight into `h` ([`linear_into`] puts them elsewhere).
    /// Bias included where the module has one.
    pub fn module_output(&self, m: ModuleKind) -> Option<&GpuBuffer<f32>> {
        match m {
            ModuleKind::Q => Some(&self.q),
            ModuleKind::K => Some(&self.k),
            ModuleKind::V => Some(&self.v),
            ModuleKind::Gate => Some(&self.act),
            ModuleKind::Up => Some(&self.up),
            ModuleKind::O | ModuleKind::Down => None,
        }
    }
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }
    fn check(&self, t: usize) -> Result<(), GpuError> {
        if t > self.max_tokens {
            return Err(GpuError::Validation(format!(
                "batch of {t} tokens exceeds the scratch size {}",
                self.max_tokens
            )));
        }
        Ok(())
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct NormParams {
    rows: u32,
    n: u32,
    eps: f32,
    _pad: u32,
}

/// `out = RMSNorm(x)·w` over `rows` rows of length `w.len()`.
pub fn rmsnorm(
    rec: &mut Recorder<'_>,
    rows: usize,
    eps: f32,
    x: &GpuBuffer<f32>,
    w: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
) -> Result<(), GpuError> {
    let params = NormParams {
        rows: u32_of("rmsnorm rows", rows)?,
        n: u32_of("rmsnorm width", w.len())?,
        eps,
        _pad: 0,
    };
    rec.dispatch(
        &RMSNORM,
        "rmsnorm",
        &[],
        &params,
        &[x.binding(), w.binding(), out.binding()],
        groups_1d(params.rows),
    )
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct EwParams {
    n: u32,
    cols: u32,
    _pad: [u32; 2],
}

/// `y = x·Wᵀ (+ b)`, or `y += x·Wᵀ (+ b)` with `accumulate` (the residual adds).
#[allow(clippy::too_many_arguments)]
fn linear(
    rec: &mut Recorder<'_>,
    layer: &GpuLayer,
    m: ModuleKind,
    t: usize,
    x: &GpuBuffer<f32>,
    y: &GpuBuffer<f32>,
    accumulate: bool,
) -> Result<(), GpuError> {
    linears(rec, layer, &[(m, y)], t, x, accumulate)
}

/// Row ranges `(kernel, first row, rows)` of a `t`-row product with module `m` that run on tensor
/// cores: the fastest kernel whose blocks tile the module (the staged 128×128 one where granted,
/// then 64×64, 32×32) takes the rows that fill its blocks, the next kernel the rows after those;
/// the rows past the last range go to the f32 GEMM. Empty without tensor cores for `m`.
fn tc_ranges(
    ctx: &GpuContext,
    layer: &GpuLayer,
    m: ModuleKind,
    t: usize,
) -> Vec<(CoopOp, usize, usize)> {
    let mut ranges = Vec::new();
    if layer.w16(m).is_none() {
        return ranges;
    }
    let (rows, cols) = layer.dims.linear_shape(m);
    let mut done = 0;
    for op in CoopOp::NT {
        let blk = op.block();
        let main = (t - done) / blk * blk;
        if main > 0 && op.available(ctx) && ops::coop_shape_ok_for(op, blk, rows, cols) {
            ranges.push((op, done, main));
            done += main;
        }
    }
    ranges
}

/// [`linear`] for modules that read the same input `x` (q/k/v, gate/up): on tensor cores each
/// chunk of `x` is cast to f16 once for all of them where their row ranges agree ([`tc_ranges`]:
/// always, when their widths tile alike), instead of once per module.
fn linears(
    rec: &mut Recorder<'_>,
    layer: &GpuLayer,
    mods: &[(ModuleKind, &GpuBuffer<f32>)],
    t: usize,
    x: &GpuBuffer<f32>,
    accumulate: bool,
) -> Result<(), GpuError> {
    let ctx = rec.ctx();
    if let Some(&(m, _)) = mods.iter().find(|&&(m, _)| layer.released(m)) {
        return Err(GpuError::Validation(format!(
            "{}: forward through a module whose weights were released",
            m.hf_name()
        )));
    }
    let ranges: Vec<_> = mods
        .iter()
        .map(|&(m, _)| tc_ranges(ctx, layer, m, t))
        .collect();
    if mods.len() > 1 && ranges.iter().any(|r| *r != ranges[0]) {
        for &(m, y) in mods {
            linears(rec, layer, &[(m, y)], t, x, accumulate)?;
        }
        return Ok(());
    }
    let ranges: &[(CoopOp, usize, usize)] = ranges.first().map_or(&[], |r| r.as_slice());
    let cols = mods
        .first()
        .map_or(0, |&(m, _)| layer.dims.linear_shape(m).1);
    for (tc, &(op, r0, len)) in ranges
        .iter()
        .filter_map(|r| Some((&layer.tc.as_ref()?.scratch, r)))
    {
        // `tc.chunk` is a multiple of every block, so each chunk tiles.
        for c0 in (r0..r0 + len).step_by(tc.chunk) {
            let n = (r0 + len - c0).min(tc.chunk);
            ops::cast_f16(
                rec,
                n,
                cols,
                MatView::new(x, cols).at(c0 * cols),
                1.0,
                &tc.x16,
            )?;
            for &(m, y) in mods {
                let (rows, w16) = (layer.dims.linear_shape(m).0, layer.w16(m));
                let w16 = w16.ok_or_else(|| {
                    GpuError::Validation(format!("{m:?}: tensor-core range without f16 weight"))
                })?;
                // The output rows of this chunk: overwritten, or added to (residual).
                ops::gemm_coop(
                    rec,
                    op,
                    (n, rows, cols),
                    (&tc.x16, 0),
                    (w16, 0),
                    MatView::new(y, rows).at(c0 * rows),
                    accumulate,
                )?;
            }
        }
    }
    // The rows no tensor-core kernel covers, and the biases, per module.
    let done = ranges.last().map_or(0, |&(_, r0, len)| r0 + len);
    let beta = if accumulate { 1.0 } else { 0.0 };
    for &(m, y) in mods {
        let (rows, cols) = layer.dims.linear_shape(m);
        if done < t {
            if layer.f32_released(m) {
                return Err(GpuError::Validation(format!(
                    "{}: {} of {t} rows do not tile the tensor-core blocks, and the f32 weight \
                     they would need was freed",
                    m.hf_name(),
                    t - done
                )));
            }
            ops::gemm(
                rec,
                t - done,
                rows,
                cols,
                1.0,
                MatView::new(x, cols).at(done * cols),
                MatView::new(layer.linear(m), cols).t(),
                beta,
                MatView::new(y, rows).at(done * rows),
            )?;
        }
        if let Some(b) = layer.bias(m) {
            bias_add(rec, t, rows, b, y)?;
        }
    }
    Ok(())
}

/// `y[r, c] += b[c]` for `t` rows.
pub fn bias_add(
    rec: &mut Recorder<'_>,
    t: usize,
    cols: usize,
    b: &GpuBuffer<f32>,
    y: &GpuBuffer<f32>,
) -> Result<(), GpuError> {
    let n = u32_of("bias add", t * cols)?;
    let params = EwParams {
        n,
        cols: u32_of("bias width", cols)?,
        _pad: [0; 2],
    };
    rec.dispatch(
        &FORWARD_EW,
        "bias_add",
        &[],
        &params,
        &[b.binding(), y.binding()],
        groups_1d(n.div_ceil(256)),
    )
}

/// `y = x·Wᵀ (+ b)` for module `m` over `t` tokens, into a buffer of the caller's (the driver
/// keeps o's and down's outputs apart from `h` to measure them before the residual add).
pub fn linear_into(
    rec: &mut Recorder<'_>,
    l: &GpuLayer,
    m: ModuleKind,
    t: usize,
    x: &GpuBuffer<f32>,
    y: &GpuBuffer<f32>,
) -> Result<(), GpuError> {
    // `ops::gemm` checks both buffers against the shapes.
    linear(rec, l, m, t, x, y, false)
}

/// `h[..n] += y[..n]`: the residual add of a module output computed by [`linear_into`]. It is
/// `bias_add` with the broadcast row as long as the whole array (`i % n = i`), so no extra entry
/// point is needed. Without a bias the sum rounds once, as the GEMM's `beta = 1` epilogue of the
/// fused [`o_residual`] / [`down_residual`] does (`1·acc + 1·h`), so both paths give the same `h`
/// bit for bit (with one, the bias is added before instead of after `h`).
pub fn residual_add(
    rec: &mut Recorder<'_>,
    n: usize,
    y: &GpuBuffer<f32>,
    h: &GpuBuffer<f32>,
) -> Result<(), GpuError> {
    if y.len() < n || h.len() < n {
        return Err(GpuError::Validation(format!(
            "residual add of {n} elements: buffers hold {} and {}",
            y.len(),
            h.len()
        )));
    }
    bias_add(rec, 1, n, y, h)
}

/// `input_layernorm`: `s.x1 = norm₁(h)` for `t` tokens.
pub fn input_norm(
    rec: &mut Recorder<'_>,
    l: &GpuLayer,
    h: &GpuBuffer<f32>,
    s: &LayerScratch,
    t: usize,
) -> Result<(), GpuError> {
    s.check(t)?;
    rmsnorm(rec, t, l.dims.eps, h, &l.input_norm, &s.x1)
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct RopeParams {
    rows: u32,
    heads: u32,
    hd: u32,
    seqlen: u32,
    has_norm: u32,
    eps: f32,
    _pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AttnParams {
    heads: u32,
    kv_heads: u32,
    hd: u32,
    seqlen: u32,
    scale: f32,
    nqb: u32,
    groups: u32,
    _pad: u32,
}

/// Query rows per workgroup of `attention.wgsl` (its `BQ`).
pub const ATTN_BQ: usize = 64;
/// Keys per streamed K/V chunk of `attention.wgsl` (its `BK`).
pub const ATTN_BK: usize = 32;

/// Head-dim dependent tiles of `attention.wgsl` (its override constants): see the shader's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnTiles {
    /// Head dims per staged Q/K slice of the score phase (`DS`, 1..=16).
    pub ds: usize,
    /// Keys per staged V slice (`KS`: a power of two dividing [`ATTN_BK`], `KS·roundup4(hd) ≤
    /// 1024`).
    pub ks: usize,
    /// Output dim groups of 64 per invocation (`NV`, 1..=4).
    pub nv: usize,
}

/// Tiles of `attention.wgsl` for head dim `hd` (even, ≤ [`MAX_HEAD_DIM`]). The score phase walks
/// hd in `ceil(hd / 16)` equal slices of at most 16 dims (no slice mostly padding, e.g. hd 20 is
/// 2 × 10, not 16 + 4); a V slice is as many keys as fit 1024 floats (one vec4 per invocation);
/// each invocation's output dims are `64·g + 4·tx..+3` for `g < ceil(hd / 64)`.
pub fn attention_tiles(hd: usize) -> AttnTiles {
    let hd = hd.max(1);
    let ds = hd.div_ceil(hd.div_ceil(16));
    let hdp = hd.next_multiple_of(4);
    let mut ks = ATTN_BK;
    while ks > 1 && ks * hdp > 1024 {
        ks /= 2;
    }
    AttnTiles {
        ds,
        ks,
        nv: hd.div_ceil(64),
    }
}

/// q/k/v projections of `s.x1`, (q/k norm and) RoPE, causal attention → `out` (`s.attn`, or a
/// stored attention stream's batch, written in place) for `nseq` packed sequences of `seqlen`
/// tokens: [`qkv_proj`] then [`rope_attend`].
pub fn attention(
    rec: &mut Recorder<'_>,
    l: &GpuLayer,
    rope: &Rope,
    s: &LayerScratch,
    nseq: usize,
    seqlen: usize,
    out: &GpuBuffer<f32>,
) -> Result<(), GpuError> {
    // Both halves check their shapes; nothing recorded here is submitted if one fails.
    qkv_proj(rec, l, s, nseq * seqlen)?;
    rope_attend(rec, l, rope, s, nseq, seqlen, out)
}

fn check_rope(rope: &Rope, seqlen: usize) -> Result<(), GpuError> {
    if seqlen > rope.max_pos {
        return Err(GpuError::Validation(format!(
            "sequence length {seqlen} exceeds the RoPE table ({} positions)",
            rope.max_pos
        )));
    }
    Ok(())
}

/// `s.q, s.k, s.v = x1·W_{q,k,v}ᵀ (+ b)` for `t` tokens: the q/k/v module outputs, which the
/// driver measures before [`rope_attend`] rewrites q and k.
pub fn qkv_proj(
    rec: &mut Recorder<'_>,
    l: &GpuLayer,
    s: &LayerScratch,
    t: usize,
) -> Result<(), GpuError> {
    s.check(t)?;
    linears(
        rec,
        l,
        &[
            (ModuleKind::Q, &s.q),
            (ModuleKind::K, &s.k),
            (ModuleKind::V, &s.v),
        ],
        t,
        &s.x1,
        false,
    )
}

/// The rest of [`attention`] after [`qkv_proj`]: (q/k norm and) RoPE in place on `s.q`, `s.k`,
/// then causal attention → `out`.
pub fn rope_attend(
    rec: &mut Recorder<'_>,
    l: &GpuLayer,
    rope: &Rope,
    s: &LayerScratch,
    nseq: usize,
    seqlen: usize,
    out: &GpuBuffer<f32>,
) -> Result<(), GpuError> {
    let t = nseq * seqlen;
    s.check(t)?;
    check_rope(rope, seqlen)?;
    let d = l.dims;
    for (buf, heads, norm) in [(&s.q, d.heads, &l.q_norm), (&s.k, d.kv_heads, &l.k_norm)] {
        let params = RopeParams {
            rows: u32_of("rope rows", t * heads)?,
            heads: heads as u32,
            hd: d.head_dim as u32,
            seqlen: seqlen as u32,
            has_norm: u32::from(norm.is_some()),
            eps: d.eps,
            _pad: [0; 2],
        };
        let nw = norm.as_ref().unwrap_or(&l.dummy);
        rec.dispatch(
            &ROPE,
            "rope",
            &[],
            &params,
            &[
                rope.cos.binding(),
                rope.sin.binding(),
                nw.binding(),
                buf.binding(),
            ],
            groups_1d(params.rows),
        )?;
    }
    let shape = d.attn_shape(nseq, seqlen);
    match l.tc.as_ref().and_then(|tc| tc.scratch.attn.as_deref()) {
        Some(a) if a.seqlen == seqlen => attend_tc(rec, &s.q, &s.k, &s.v, out, shape, a),
        _ => attend(rec, &s.q, &s.k, &s.v, out, shape),
    }
}

/// Shape of one causal attention dispatch ([`attend`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub nseq: usize,
    pub seqlen: usize,
}

/// A batched f16 GEMM with the contract of [`ops::gemm_coop_batched`] (which [`attend_tc`]
/// passes); the tests pass a host emulation to check [`attend_tc_with`]'s strides and offsets on
/// adapters without cooperative matrices.
pub type BatchedGemm<'f> = dyn FnMut(
        &mut Recorder<'_>,
        CoopOp,
        (usize, usize, usize),
        ops::CoopBatch,
        CoopOperand<'_>,
        CoopOperand<'_>,
        MatView<'_>,
        bool,
    ) -> Result<(), GpuError>
    + 'f;

/// Sequences the tensor-core attention processes at once where memory allows
/// ([`AttnTc::new`]): each of its GEMMs is one dispatch for all of them. With one sequence at a
/// time, Llama-3-8B's `P·V` (256 queries × 128 dims per head) was 64 workgroups for 132 SMs, and
/// a layer's attention took 28 dispatches per sequence. Eight sequences of Llama-3-8B's heads
/// took 30.2 ms one at a time, 12.0 ms four and 10.0 ms eight at a time (H100, BENCHMARKS.md
/// session 22); the scratch is about 120 MiB per sequence there.
pub const ATTN_SEQS: usize = 8;

/// Scratch of the tensor-core attention ([`attend_tc`]) for `seqs` sequences of `seqlen` tokens
/// at a time: their q, k, v in f16, and the scores `S` (f32) and probabilities `P` (f16) of one
/// query chunk for every head of every sequence.
pub struct AttnTc {
    q16: GpuBuffer<half::f16>,
    k16: GpuBuffer<half::f16>,
    v16: GpuBuffer<half::f16>,
    s: GpuBuffer<f32>,
    p: GpuBuffer<half::f16>,
    seqlen: usize,
    qc: usize,
    seqs: usize,
}

impl AttnTc {
    /// Query rows per chunk for sequences of `seqlen` tokens, or `None` where the tensor-core
    /// attention does not apply: the query chunks and their key ranges must tile into 64-wide
    /// blocks (seqlen a multiple of 64), the head dim into the P·V product's 32-wide blocks, and
    /// the heads into whole groups per key/value head. Chunks of 256 queries: the scores of
    /// all heads for one chunk are `heads·256·seqlen` floats (64 MiB for Llama-3-8B at 2048), and
    /// a chunk's keys stop at its last query, which skips most of the causal mask's zeros.
    /// (`shape.nseq` does not matter here.)
    pub fn chunk(shape: &AttnShape) -> Option<usize> {
        let tiles = shape.head_dim.is_multiple_of(32)
            && shape.kv_heads > 0
            && shape.heads.is_multiple_of(shape.kv_heads)
            && shape.seqlen > 0
            && shape.seqlen.is_multiple_of(64);
        if !tiles {
            return None;
        }
        [256, 128, 64]
            .into_iter()
            .find(|c| shape.seqlen.is_multiple_of(*c))
    }

    /// GPU bytes of the scratch for `shape.nseq` sequences at a time (0 where [`AttnTc::chunk`]
    /// does not apply).
    pub fn bytes(shape: &AttnShape) -> u64 {
        match Self::chunk(shape) {
            None => 0,
            Some(qc) => {
                let (l, h, hd) = (
                    shape.seqlen as u64,
                    shape.heads as u64,
                    shape.head_dim as u64,
                );
                let per_seq =
                    l * (h + 2 * shape.kv_heads as u64) * hd * 2 + h * qc as u64 * l * (4 + 2);
                per_seq * shape.nseq.max(1) as u64
            }
        }
    }

    /// Bytes of the scratch's largest buffer for `shape.nseq` sequences at a time (the scores,
    /// or the f16 queries where queries outnumber the chunk's scores), which one storage binding
    /// must hold; 0 where [`AttnTc::chunk`] does not apply.
    pub fn largest_buffer_bytes(shape: &AttnShape) -> u64 {
        match Self::chunk(shape) {
            None => 0,
            Some(qc) => {
                let (seqs, l, h) = (
                    shape.nseq.max(1) as u64,
                    shape.seqlen as u64,
                    shape.heads as u64,
                );
                seqs * (h * qc as u64 * l * 4).max(l * h * shape.head_dim as u64 * 2)
            }
        }
    }

    /// The most sequences, at most `want`, whose scratch buffers each fit in `max_binding` bytes
    /// (at least 1).
    pub fn sequences_within(shape: &AttnShape, want: usize, max_binding: u64) -> usize {
        (1..=want.max(1))
            .rev()
            .find(|&n| Self::largest_buffer_bytes(&AttnShape { nseq: n, ..*shape }) <= max_binding)
            .unwrap_or(1)
    }

    /// The scratch for `shape.nseq` sequences at a time, or `None` where [`AttnTc::chunk`] does
    /// not apply.
    pub fn new(ctx: &GpuContext, shape: &AttnShape) -> Result<Option<Self>, GpuError> {
        let Some(qc) = Self::chunk(shape) else {
            return Ok(None);
        };
        let (l, hd, seqs) = (shape.seqlen, shape.head_dim, shape.nseq.max(1));
        let scores = seqs * shape.heads * qc * l;
        Ok(Some(Self {
            q16: ctx.zeros("attention q f16", seqs * l * shape.heads * hd)?,
            k16: ctx.zeros("attention k f16", seqs * l * shape.kv_heads * hd)?,
            v16: ctx.zeros("attention v f16", seqs * l * shape.kv_heads * hd)?,
            // Zero at the start; attn_softmax re-zeroes what each chunk's GEMM accumulated.
            s: ctx.zeros("attention scores", scores)?,
            p: ctx.zeros("attention probabilities f16", scores)?,
            seqlen: l,
            qc,
            seqs,
        }))
    }

    /// Sequences processed at once.
    pub fn sequences(&self) -> usize {
        self.seqs
    }
}

impl LayerDims {
    /// The attention shape of `nseq` sequences of `seqlen` tokens through this layer.
    pub fn attn_shape(&self, nseq: usize, seqlen: usize) -> AttnShape {
        AttnShape {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            nseq,
            seqlen,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SoftmaxParams {
    rows: u32,
    keys: u32,
    ld: u32,
    q0: u32,
    zstride: u32,
    zero: u32,
    _pad: [u32; 2],
}

/// `attn_softmax.wgsl` over `rows` query rows (positions `q0..`) and `keys` keys of `heads` score
/// blocks of `rows × ld` floats in `s`, into `p` (same layout, f16); with `zero`, `s` is left
/// zeroed there (for a next `Q·Kᵀ` that adds into it).
#[allow(clippy::too_many_arguments)]
fn attn_softmax(
    rec: &mut Recorder<'_>,
    s: &GpuBuffer<f32>,
    p: &GpuBuffer<half::f16>,
    rows: usize,
    keys: usize,
    ld: usize,
    q0: usize,
    heads: usize,
    zero: bool,
) -> Result<(), GpuError> {
    let need = heads * rows * ld;
    if keys > ld || s.len() < need || p.len() < need || rows > 65535 || heads > 65535 {
        return Err(GpuError::Validation(format!(
            "attention softmax of {heads} × {rows} rows × {keys} keys (ld {ld}): scores hold {}, \
             probabilities {}, need {need}",
            s.len(),
            p.len()
        )));
    }
    let params = SoftmaxParams {
        rows: u32_of("softmax rows", rows)?,
        keys: u32_of("softmax keys", keys)?,
        ld: u32_of("softmax ld", ld)?,
        q0: u32_of("softmax q0", q0)?,
        zstride: u32_of("softmax head stride", rows * ld)?,
        zero: u32::from(zero),
        _pad: [0; 2],
    };
    rec.dispatch(
        &ATTN_SOFTMAX,
        "attn_softmax",
        &[],
        &params,
        &[s.binding(), p.binding()],
        [params.rows, heads as u32, 1],
    )
}

/// Causal grouped-query attention on tensor cores, with the result of [`attend`] (same layouts):
/// per pass of up to [`AttnTc::sequences`] sequences, q (scaled by 1/√hd), k and v are cast to
/// f16; then per chunk of `qc` queries, for all heads of all the pass's sequences in one nested
/// batched GEMM each ([`ops::CoopBatch`]), `S = Q·Kᵀ` over the keys up to the chunk's last
/// query, the causal softmax (`attn_softmax`: f32 scores, f16 probabilities), and
/// `O = P·V` for the chunk's rows. f16 operands and probabilities, f32 accumulation and softmax,
/// as the reference's half-precision attention (which also rounds P to f16 before P·V).
///
/// Each chunk's scores and output rows are one product each, so the staged kernels overwrite
/// them; where a chunk falls back to an unstaged kernel (which only adds), the scores are cleared
/// at the start and re-zeroed by the softmax after each read, and the pass's output rows are
/// cleared first (at 128 × 2048 tokens of Llama-3-8B those clears and zeroing writes were
/// 0.5 GB per pass).
pub fn attend_tc(
    rec: &mut Recorder<'_>,
    q: &GpuBuffer<f32>,
    k: &GpuBuffer<f32>,
    v: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
    shape: AttnShape,
    sc: &AttnTc,
) -> Result<(), GpuError> {
    attend_tc_with(rec, q, k, v, out, shape, sc, &mut ops::gemm_coop_batched)
}

/// [`attend_tc`] with the batched GEMM passed in (module-level [`BatchedGemm`]).
#[allow(clippy::too_many_arguments)]
pub fn attend_tc_with(
    rec: &mut Recorder<'_>,
    q: &GpuBuffer<f32>,
    k: &GpuBuffer<f32>,
    v: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
    shape: AttnShape,
    sc: &AttnTc,
    gemm: &mut BatchedGemm<'_>,
) -> Result<(), GpuError> {
    let AttnShape {
        heads,
        kv_heads,
        head_dim: hd,
        nseq,
        seqlen: l,
    } = shape;
    if l != sc.seqlen || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(GpuError::Validation(format!(
            "tensor-core attention scratch is for {} tokens per sequence, got {l} ({heads} heads, \
             {kv_heads} key/value heads)",
            sc.seqlen
        )));
    }
    let (qd, kd, g, qc) = (heads * hd, kv_heads * hd, heads / kv_heads, sc.qc);
    let seqs = sc.seqs;
    if sc.q16.len() < seqs * l * qd
        || sc.k16.len() < seqs * l * kd
        || sc.s.len() < seqs * heads * qc * l
    {
        return Err(GpuError::Validation(format!(
            "tensor-core attention scratch too small for {seqs} sequences of {heads} heads of \
             {hd} dims"
        )));
    }
    let scale = 1.0 / (hd as f32).sqrt();
    // Q·Kᵀ's kernel for a chunk with `keys` keys: the staged one where granted and the chunk tiles
    // by 128 (its operands are aligned: offsets and strides are multiples of hd, itself of 32);
    // P·V's likewise.
    let ctx = rec.ctx();
    let pick = |ops: &[CoopOp], (m, n, k): (usize, usize, usize), fallback: CoopOp| {
        ops.iter()
            .copied()
            .find(|&op| op.available(ctx) && ops::coop_shape_ok_for(op, m, n, k))
            .unwrap_or(fallback)
    };
    // Per chunk: Q·Kᵀ's and P·V's kernels.
    let chunks: Vec<(usize, CoopOp, CoopOp)> = (0..l)
        .step_by(qc)
        .map(|q0| {
            let keys = q0 + qc;
            (
                q0,
                pick(&CoopOp::NT, (qc, keys, hd), CoopOp::Nt),
                pick(&CoopOp::NN, (qc, hd, keys), CoopOp::Nn),
            )
        })
        .collect();
    // Whether every score product overwrites: else the scores must be zero wherever an adding
    // one starts, whatever an earlier call through this scratch left there.
    let qk_overwrite = chunks.iter().all(|c| c.1.staged());
    if !qk_overwrite {
        rec.clear(&sc.s, 0, sc.s.len())?;
    }
    let pv_overwrite = chunks.iter().all(|c| c.2.staged());
    for s0 in (0..nseq).step_by(seqs) {
        let ns = seqs.min(nseq - s0);
        let row0 = s0 * l;
        // The pass's sequences are consecutive rows: one cast each.
        ops::cast_f16(
            rec,
            ns * l,
            qd,
            MatView::new(q, qd).at(row0 * qd),
            scale,
            &sc.q16,
        )?;
        ops::cast_f16(
            rec,
            ns * l,
            kd,
            MatView::new(k, kd).at(row0 * kd),
            1.0,
            &sc.k16,
        )?;
        ops::cast_f16(
            rec,
            ns * l,
            kd,
            MatView::new(v, kd).at(row0 * kd),
            1.0,
            &sc.v16,
        )?;
        // An unstaged P·V adds into the output.
        if !pv_overwrite {
            rec.clear(out, row0 * qd, ns * l * qd)?;
        }
        for &(q0, qk_op, pv_op) in &chunks {
            let keys = q0 + qc;
            // Entry (sequence o, head z): S_oz = Q_oz[q0 .. q0 + qc] · K_o,z/g[.. keys]ᵀ, with
            // head z's queries in columns z·hd.. of sequence o's rows of q16, its key/value
            // head's keys in columns (z/g)·hd.. of k16; S_oz is block o·heads + z of s.
            gemm(
                rec,
                qk_op,
                (qc, keys, hd),
                ops::CoopBatch::nested(ns, heads, qc * l, heads * qc * l),
                CoopOperand::new(&sc.q16, q0 * qd, qd)
                    .batched(hd, 1)
                    .outer(l * qd),
                CoopOperand::new(&sc.k16, 0, kd)
                    .batched(hd, g)
                    .outer(l * kd),
                MatView::new(&sc.s, l),
                !qk_op.staged(),
            )?;
            attn_softmax(
                rec,
                &sc.s,
                &sc.p,
                qc,
                keys,
                l,
                q0,
                ns * heads,
                !qk_overwrite,
            )?;
            // O_oz[q0 .. q0 + qc] = P_oz · V_o,z/g[.. keys], into columns z·hd.. of sequence
            // o's output rows.
            gemm(
                rec,
                pv_op,
                (qc, hd, keys),
                ops::CoopBatch::nested(ns, heads, hd, l * qd),
                CoopOperand::new(&sc.p, 0, l)
                    .batched(qc * l, 1)
                    .outer(heads * qc * l),
                CoopOperand::new(&sc.v16, 0, kd)
                    .batched(hd, g)
                    .outer(l * kd),
                MatView::new(out, qd).at((row0 + q0) * qd),
                !pv_op.staged(),
            )?;
        }
    }
    Ok(())
}

/// Causal grouped-query attention alone (`attention.wgsl`), no RoPE: `out = softmax(q·kᵀ/√hd)·v`
/// per head over each sequence's earlier positions, with q, out `[tokens, heads·hd]` and k, v
/// `[tokens, kv_heads·hd]`, `tokens = nseq·seqlen` packed back to back; query head h reads kv
/// head `h / (heads / kv_heads)`. [`rope_attend`] runs it after RoPE; the tests and benches call
/// it directly.
pub fn attend(
    rec: &mut Recorder<'_>,
    q: &GpuBuffer<f32>,
    k: &GpuBuffer<f32>,
    v: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
    shape: AttnShape,
) -> Result<(), GpuError> {
    let AttnShape {
        heads,
        kv_heads,
        head_dim: hd,
        nseq,
        seqlen,
    } = shape;
    if hd == 0 || !hd.is_multiple_of(2) || hd > MAX_HEAD_DIM {
        return Err(GpuError::Validation(format!(
            "head_dim {hd} is not supported by the attention kernel (even, 2..={MAX_HEAD_DIM})"
        )));
    }
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(GpuError::Validation(format!(
            "{heads} attention heads are not a positive multiple of {kv_heads} kv heads"
        )));
    }
    let t = nseq * seqlen;
    for (what, buf, width) in [
        ("q", q, heads),
        ("k", k, kv_heads),
        ("v", v, kv_heads),
        ("out", out, heads),
    ] {
        if buf.len() < t * width * hd {
            return Err(GpuError::Validation(format!(
                "attention {what}: {} elements, {t} tokens × {width} heads × {hd} need {}",
                buf.len(),
                t * width * hd
            )));
        }
    }
    if t == 0 {
        return Ok(());
    }
    let tiles = attention_tiles(hd);
    let nqb = seqlen.div_ceil(ATTN_BQ);
    let params = AttnParams {
        heads: u32_of("attention heads", heads)?,
        kv_heads: u32_of("attention kv heads", kv_heads)?,
        hd: hd as u32,
        seqlen: u32_of("attention sequence length", seqlen)?,
        scale: 1.0 / (hd as f32).sqrt(),
        nqb: u32_of("attention query blocks", nqb)?,
        groups: u32_of("attention workgroups", nseq * nqb * heads)?,
        _pad: 0,
    };
    rec.dispatch(
        &ATTENTION,
        "attention",
        &[
            ("DS", tiles.ds as f64),
            ("KS", tiles.ks as f64),
            ("NV", tiles.nv as f64),
        ],
        &params,
        &[q.binding(), k.binding(), v.binding(), out.binding()],
        groups_1d(params.groups),
    )
}

/// `h += o_proj(a)`.
pub fn o_residual(
    rec: &mut Recorder<'_>,
    l: &GpuLayer,
    a: &GpuBuffer<f32>,
    h: &GpuBuffer<f32>,
    s: &LayerScratch,
    t: usize,
) -> Result<(), GpuError> {
    s.check(t)?;
    linear(rec, l, ModuleKind::O, t, a, h, true)
}

/// `post_attention_layernorm`: `s.x2 = norm₂(h)`.
pub fn post_norm(
    rec: &mut Recorder<'_>,
    l: &GpuLayer,
    h: &GpuBuffer<f32>,
    s: &LayerScratch,
    t: usize,
) -> Result<(), GpuError> {
    s.check(t)?;
    rmsnorm(rec, t, l.dims.eps, h, &l.post_norm, &s.x2)
}

/// `act = silu(gate(x2))·up(x2)` (`act`: `s.act`, or a kept activation stream's batch, written in
/// place): [`gate_up_proj`] then [`silu_mul`].
pub fn mlp_act(
    rec: &mut Recorder<'_>,
    l: &GpuLayer,
    s: &LayerScratch,
    t: usize,
    act: &GpuBuffer<f32>,
) -> Result<(), GpuError> {
    gate_up_proj(rec, l, s, t, act)?;
    silu_mul(rec, l, s, t, act)
}

/// The gate and up module outputs of `s.x2`: gate into `act` (SwiGLU then works in place, no
/// separate gate buffer), up into `s.up`.
pub fn gate_up_proj(
    rec: &mut Recorder<'_>,
    l: &GpuLayer,
    s: &LayerScratch,
    t: usize,
    act: &GpuBuffer<f32>,
) -> Result<(), GpuError> {
    s.check(t)?;
    linears(
        rec,
        l,
        &[(ModuleKind::Gate, act), (ModuleKind::Up, &s.up)],
        t,
        &s.x2,
        false,
    )
}

/// SwiGLU after [`gate_up_proj`]: `act = silu(act)·s.up`.
pub fn silu_mul(
    rec: &mut Recorder<'_>,
    l: &GpuLayer,
    s: &LayerScratch,
    t: usize,
    act: &GpuBuffer<f32>,
) -> Result<(), GpuError> {
    s.check(t)?;
    let n = u32_of("swiglu", t * l.dims.intermediate)?;
    let params = EwParams {
        n,
        cols: 1,
        _pad: [0; 2],
    };
    rec.dispatch(
        &FORWARD_EW,
        "silu_mul",
        &[],
        &params,
        &[s.up.binding(), act.binding()],
        groups_1d(n.div_ceil(256)),
    )
}

/// `h += down_proj(act)` (`act`: `s.act`, or a kept activation stream's batch, used in place).
pub fn down_residual(
    rec: &mut Recorder<'_>,
    l: &GpuLayer,
    act: &GpuBuffer<f32>,
    h: &GpuBuffer<f32>,
    s: &LayerScratch,
    t: usize,
) -> Result<(), GpuError> {
    s.check(t)?;
    linear(rec, l, ModuleKind::Down, t, act, h, true)
}

/// A whole decoder layer in place on `h` (`nseq` sequences of `seqlen` tokens).
pub fn forward_layer(
    rec: &mut Recorder<'_>,
    l: &GpuLayer,
    rope: &Rope,
    h: &GpuBuffer<f32>,
    s: &LayerScratch,
    nseq: usize,
    seqlen: usize,
) -> Result<(), GpuError> {
    let t = nseq * seqlen;
    input_norm(rec, l, h, s, t)?;
    attention(rec, l, rope, s, nseq, seqlen, &s.attn)?;
    o_residual(rec, l, &s.attn, h, s, t)?;
    post_norm(rec, l, h, s, t)?;
    mlp_act(rec, l, s, t, &s.act)?;
    down_residual(rec, l, &s.act, h, s, t)
}

#[allow(clippy::too_many_arguments)]
/// "Run layer i up to the input of module m": the stages needed so that `m`'s input sits in `s`
/// (`x1` for q/k/v, `attn` for o, `x2` for gate/up, `act` for down). `h` is advanced by the
/// attention residual for the MLP modules, as the layer would.
pub fn run_to_module_input(
    rec: &mut Recorder<'_>,
    l: &GpuLayer,
    rope: &Rope,
    h: &GpuBuffer<f32>,
    s: &LayerScratch,
    nseq: usize,
    seqlen: usize,
    m: ModuleKind,
) -> Result<(), GpuError> {
    let t = nseq * seqlen;
    input_norm(rec, l, h, s, t)?;
    if matches!(m, ModuleKind::Q | ModuleKind::K | ModuleKind::V) {
        return Ok(());
    }
    attention(rec, l, rope, s, nseq, seqlen, &s.attn)?;
    if m == ModuleKind::O {
        return Ok(());
    }
    o_residual(rec, l, &s.attn, h, s, t)?;
    post_norm(rec, l, h, s, t)?;
    if matches!(m, ModuleKind::Gate | ModuleKind::Up) {
        return Ok(());
    }
    mlp_act(rec, l, s, t, &s.act)
}
