//! Perplexity on the GPU, GPTQ-paper protocol (algorithm.md §5; `calib::eval_windows`): the text is
//! tokenized once without BOS, cut into non-overlapping windows of `seqlen`, each window predicts
//! its tokens 1.. from the previous ones, and `ppl = exp(mean NLL)` over all predictions (all
//! windows have the same length, so this equals the reference's mean of per-window means).
//!
//! The model runs layer by layer like the quantization pipeline: one decoder layer's weights on the
//! GPU at a time, hidden states of all windows kept on the GPU when they fit and spilled to host
//! memory otherwise. The head is `final norm → lm_head chunk → streaming log-sum-exp` (`nll.wgsl`),
//! so only one `(max, sum, target)` triple per token ever comes back to the host — never logits.
//!
//! [`Overlay`] evaluates an in-memory quantization result (fake-quantized `Q` in place of `W`)
//! without exporting it first.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytemuck::{Pod, Zeroable};

use crate::forward::{self, GpuLayer, LayerScratch, Rope, TcScratch};
use crate::gpu::kernels::groups_1d;
use crate::gpu::ops::{self, MatView};
use crate::gpu::{GpuBuffer, GpuContext, GpuError};
use crate::model::prefetch::LayerPrefetch;
use crate::model::weights::WeightError;
use crate::model::{LayerWeights, ModelConfig, ModuleKind, WeightSource};
use crate::pipeline::StreamDType;
use crate::pipeline::stream::{Layout, Placement, Stream};
use crate::quant::QuantResult;

crate::wgsl_shader!(NLL, "nll");

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error("{0}")]
    Input(String),
    #[error("cancelled")]
    Cancelled,
}

/// How to run an evaluation.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// GPU bytes the hidden-state stream may use: where the whole stream needs more, the batches
    /// beyond it spill to host memory.
    pub stream_budget_bytes: u64,
    /// Host spill element type.
    pub stream_dtype: StreamDType,
    /// Tokens per GPU batch (activations scale with it); 0 = automatic.
    pub batch_tokens: usize,
    /// Upload layer i + 1 on a second thread while layer i runs: the GPU does not wait for each
    /// layer's weights, at the cost of one more layer's weights on the GPU.
    pub weights_ahead: bool,
    /// Linears and attention on tensor cores (`forward::GpuLayer::enable_tensor_cores`) where the
    /// adapter grants them: the perplexity of the model run in f16 operands (as transformers runs
    /// an f16 checkpoint), not of the f32 forward. Ignored elsewhere.
    pub tensor_cores: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            stream_budget_bytes: 2 << 30,
            stream_dtype: StreamDType::F32,
            batch_tokens: 0,
            weights_ahead: true,
            tensor_cores: false,
        }
    }
}

/// Result of a perplexity run.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PerplexityStats {
    pub ppl: f64,
    pub mean_nll: f64,
    pub windows: usize,
    pub seqlen: usize,
    /// Number of predicted tokens (`windows · (seqlen − 1)`).
    pub predictions: usize,
    /// Windows whose hidden states spilled to host memory (the rest stayed on the GPU within
    /// `EvalOptions::stream_budget_bytes`).
    #[serde(default)]
    pub spilled_windows: usize,
    pub secs: f64,
}

/// Progress callback payload: `(layers done, layers total)`; the head counts as one more step.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct NllParams {
    tokens: u32,
    width: u32,
    v0: u32,
    first: u32,
}

/// Tokens per batch: bounded by activation memory (~256 MiB of scratch) and whole windows.
fn batch_sequences(
    cfg: &ModelConfig,
    seqlen: usize,
    opts: &EvalOptions,
    max_binding: u64,
) -> usize {
    // The pipeline planner's activation estimate for one stream (a slight over-estimate here).
    let per_token = crate::pipeline::plan::scratch_per_token(cfg, false, false);
    let target = if opts.batch_tokens > 0 {
        opts.batch_tokens as u64
    } else {
        ((256u64 << 20) / per_token.max(1)).max(1)
    };
    let by_binding = max_binding / (4 * cfg.intermediate_size.max(cfg.q_dim()).max(1) as u64);
    (target.min(by_binding) as usize / seqlen.max(1)).max(1)
}

/// Perplexity of `source` on `windows` (all of one length ≥ 2).
pub fn perplexity(
    ctx: &GpuContext,
    source: &dyn WeightSource,
    windows: &[Vec<u32>],
    opts: &EvalOptions,
    progress: Progress<'_>,
    cancel: &AtomicBool,
) -> Result<PerplexityStats, EvalError> {
    let t0 = Instant::now();
    let cfg = source.config().clone();
    let seqlen = windows.first().map_or(0, Vec::len);
    if windows.is_empty() || seqlen < 2 {
        return Err(EvalError::Input(
            "perplexity needs at least one window of 2 or more tokens (is the text shorter than --seqlen?)".into(),
        ));
    }
    if let Some((i, w)) = windows.iter().enumerate().find(|(_, w)| w.len() != seqlen) {
        return Err(EvalError::Input(format!(
            "window {i} has {} tokens, expected {seqlen}",
            w.len()
        )));
    }
    if let Some(&bad) = windows
        .iter()
        .flatten()
        .find(|&&id| id as usize >= cfg.vocab_size)
    {
        return Err(EvalError::Input(format!(
            "token id {bad} is outside the model's vocabulary of {} (tokenizer and model do not match?)",
            cfg.vocab_size
        )));
    }
    let h = cfg.hidden_size;
    let bs = batch_sequences(&cfg, seqlen, opts, ctx.max_binding_bytes());
    let batches: Vec<Range<usize>> = (0..windows.len())
        .step_by(bs)
        .map(|s| s..(s + bs).min(windows.len()))
        .collect();
    let lens: Vec<usize> = batches.iter().map(|r| r.len() * seqlen * h).collect();
    let total_bytes: u64 = lens.iter().map(|&l| l as u64 * 4).sum();
    // Where the whole stream exceeds its budget, the leading batches that fit it stay on the GPU
    // in the host's element type (f32, or packed f16 beside f16 host batches: the values the host
    // would hold, so the perplexity is the all-host one bit for bit) and only the rest spill —
    // for an 8B model on WikiText-2 (≈ 140 windows of 2048 tokens, 4.5 GiB of f32 hidden states)
    // the default 2 GiB keeps almost half of the windows off the host link.
    let placement: Layout = if total_bytes <= opts.stream_budget_bytes {
        Placement::Gpu.into()
    } else {
        let elem = opts.stream_dtype.bytes() as u64;
        let resident = lens
            .iter()
            .scan(0u64, |used, &l| {
                *used += l as u64 * elem;
                Some(*used)
            })
            .take_while(|&used| used <= opts.stream_budget_bytes)
            .count();
        Layout::spilled(opts.stream_dtype, resident)
    };
    let mut stream = Stream::new(ctx, "eval hidden", &lens, placement)?;
    for (b, r) in batches.iter().enumerate() {
        let ids: Vec<u32> = windows[r.clone()].iter().flatten().copied().collect();
        stream.set_host(ctx, b, &source.embed(&ids)?)?;
    }
    let max_tokens = bs * seqlen;
    let rope = Rope::new(ctx, &cfg, seqlen)?;
    let scratch = LayerScratch::new(ctx, &cfg, max_tokens)?;
    let work = ctx.zeros::<f32>("eval work h", max_tokens * h)?;
    let nl = cfg.num_layers;
    // Layer i + 1 is read (and converted / dequantized) on a second thread while layer i runs,
    // and with `weights_ahead` uploaded on a third once layer i's first batch is queued.
    let cfgr = &cfg;
    // Every layer shares the first one's tensor-core scratch (`shared`).
    let upload =
        move |lw: &LayerWeights, shared: Option<TcScratch>| -> Result<GpuLayer, EvalError> {
            let mut gl = GpuLayer::upload(ctx, cfgr, lw)?;
            if opts.tensor_cores {
                let mut rec = ctx.recorder();
                // One sequence at a time: the evaluation keeps its scratch small (see
                // `batch_tokens`), and its forward is not where a run's time goes.
                gl.enable_tensor_cores_with(&mut rec, max_tokens, (seqlen, 1), shared)?;
                rec.submit();
            }
            Ok(gl)
        };
    std::thread::scope(|scope| -> Result<(), EvalError> {
        let mut prefetch = LayerPrefetch::new(scope, source);
        let mut next: Option<std::thread::ScopedJoinHandle<'_, Result<GpuLayer, EvalError>>> = None;
        let mut shared: Option<TcScratch> = None;
        for layer in 0..nl {
            if cancel.load(Ordering::Relaxed) {
                return Err(EvalError::Cancelled);
            }
            let gl = match next.take() {
                Some(handle) => handle.join().unwrap_or_else(|_| {
                    Err(EvalError::Input(format!(
                        "the thread uploading layer {layer} panicked"
                    )))
                })?,
                None => upload(&prefetch.layer(layer)?, shared.clone())?,
            };
            shared = gl.tc_scratch();
            for (b, r) in batches.iter().enumerate() {
                let mut rec = stream.load(ctx.recorder(), b, &work)?;
                forward::forward_layer(&mut rec, &gl, &rope, &work, &scratch, r.len(), seqlen)?;
                rec = stream.store(rec, b, &work)?;
                rec.submit();
                if b == 0 && opts.weights_ahead && layer + 1 < nl {
                    let lw = prefetch.layer(layer + 1)?;
                    let sh = gl.tc_scratch();
                    next = Some(scope.spawn(move || upload(&lw, sh)));
                }
            }
            ctx.sync()?;
            progress(layer + 1, nl + 1);
        }
        Ok(())
    })?;

    // One flag read for the whole run (f16 host streams only; see Stream::overflowed): the result
    // has no warnings list, so the log carries it.
    if stream.overflowed(ctx)? {
        log::warn!(
            "eval: hidden states beyond f16's range (±65504) were clamped in the f16 host stream; \
             the perplexity is of the clamped model; evaluate with f32 streams (stream_dtype)"
        );
    }

    // Head: final norm, lm_head in row chunks, streaming log-sum-exp.
    let vocab = cfg.vocab_size;
    let fnorm = ctx.upload("final norm", &source.final_norm()?)?;
    let xn = ctx.zeros::<f32>("final normed", max_tokens * h)?;
    let logit_budget = (256u64 << 20).min(ctx.max_binding_bytes()) / 4;
    let width = ((logit_budget / max_tokens as u64) as usize).clamp(1, vocab);
    let head_chunk_rows =
        ((ctx.max_binding_bytes().min(512 << 20) / 4) as usize / h).clamp(1, vocab);
    let width = width.min(head_chunk_rows);
    let chunks: Vec<Range<usize>> = (0..vocab)
        .step_by(width)
        .map(|s| s..(s + width).min(vocab))
        .collect();
    let mut head: Vec<GpuBuffer<f32>> = Vec::with_capacity(chunks.len());
    for c in &chunks {
        head.push(ctx.upload("lm_head chunk", &source.lm_head_rows(c.clone())?)?);
    }
    let logits = ctx.zeros::<f32>("logits chunk", max_tokens * width)?;
    let state = ctx.zeros::<[f32; 4]>("nll state", max_tokens)?;
    let targets_buf = ctx.zeros::<u32>("targets", max_tokens)?;
    let (mut sum, mut count) = (0.0f64, 0usize);
    for (b, r) in batches.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Err(EvalError::Cancelled);
        }
        let t = r.len() * seqlen;
        // Position p predicts token p+1 of its window; the last position has no target.
        let targets: Vec<u32> = windows[r.clone()]
            .iter()
            .flat_map(|w| w[1..].iter().copied().chain(std::iter::once(u32::MAX)))
            .collect();
        ctx.write(&targets_buf, 0, &targets);
        let mut rec = stream.load(ctx.recorder(), b, &work)?;
        forward::rmsnorm(&mut rec, t, cfg.rms_norm_eps as f32, &work, &fnorm, &xn)?;
        for (ci, c) in chunks.iter().enumerate() {
            let w = c.len();
            ops::gemm(
                &mut rec,
                t,
                w,
                h,
                1.0,
                MatView::new(&xn, h),
                MatView::new(&head[ci], h).t(),
                0.0,
                MatView::new(&logits, w),
            )?;
            let params = NllParams {
                tokens: t as u32,
                width: w as u32,
                v0: c.start as u32,
                first: u32::from(ci == 0),
            };
            rec.dispatch(
                &NLL,
                "lse_chunk",
                &[],
                &params,
                &[logits.binding(), targets_buf.binding(), state.binding()],
                groups_1d(t as u32),
            )?;
        }
        rec.submit();
        let st = ctx.read_range(&state, 0, t)?;
        for (s, &tg) in st.iter().zip(&targets) {
            if tg == u32::MAX {
                continue;
            }
            let nll = f64::from(s[0]) + f64::from(s[1]).ln() - f64::from(s[2]);
            if !nll.is_finite() {
                return Err(EvalError::Input(format!(
                    "non-finite NLL in batch {b}: the model produced NaN/inf activations (corrupt weights?)"
                )));
            }
            sum += nll;
            count += 1;
        }
    }
    progress(nl + 1, nl + 1);
    let mean_nll = sum / count.max(1) as f64;
    Ok(PerplexityStats {
        ppl: mean_nll.exp(),
        mean_nll,
        windows: windows.len(),
        seqlen,
        predictions: count,
        spilled_windows: batches
            .iter()
            .enumerate()
            .filter(|&(b, _)| matches!(placement.of(b), Placement::Host(_)))
            .map(|(_, r)| r.len())
            .sum(),
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// Full logits `[ids.len(), vocab]` of one sequence (tests, greedy decoding checks; small inputs).
pub fn logits(
    ctx: &GpuContext,
    source: &dyn WeightSource,
    ids: &[u32],
) -> Result<Vec<f32>, EvalError> {
    let cfg = source.config().clone();
    let t = ids.len();
    if t == 0 {
        return Err(EvalError::Input("no tokens".into()));
    }
    let h = cfg.hidden_size;
    let work = ctx.upload("logits h", &source.embed(ids)?)?;
    let rope = Rope::new(ctx, &cfg, t)?;
    let scratch = LayerScratch::new(ctx, &cfg, t)?;
    for layer in 0..cfg.num_layers {
        let gl = GpuLayer::upload(ctx, &cfg, &source.layer(layer)?)?;
        let mut rec = ctx.recorder();
        forward::forward_layer(&mut rec, &gl, &rope, &work, &scratch, 1, t)?;
        rec.submit();
    }
    let fnorm = ctx.upload("final norm", &source.final_norm()?)?;
    let xn = ctx.zeros::<f32>("final normed", t * h)?;
    let head = ctx.upload("lm_head", &source.lm_head_rows(0..cfg.vocab_size)?)?;
    let out = ctx.zeros::<f32>("logits", t * cfg.vocab_size)?;
    let mut rec = ctx.recorder();
    forward::rmsnorm(&mut rec, t, cfg.rms_norm_eps as f32, &work, &fnorm, &xn)?;
    ops::gemm(
        &mut rec,
        t,
        cfg.vocab_size,
        h,
        1.0,
        MatView::new(&xn, h),
        MatView::new(&head, h).t(),
        0.0,
        MatView::new(&out, cfg.vocab_size),
    )?;
    rec.submit();
    Ok(ctx.read(&out)?)
}

/// Tokenizes an evaluation text with the tokenizer of `model_dir` (none is needed for
/// pre-tokenized `.safetensors` input) and cuts the GPTQ-protocol windows (`calib::eval_windows`).
pub fn windows_from_file(
    model_dir: Option<&std::path::Path>,
    text: &std::path::Path,
    seqlen: usize,
    max_windows: Option<usize>,
) -> Result<crate::calib::EvalWindows, EvalError> {
    let src = crate::calib::CalibSource::open(text).map_err(|e| EvalError::Input(e.to_string()))?;
    let tok = if src.kind() == crate::calib::CalibKind::PreTokenized {
        None
    } else {
        let dir = model_dir.ok_or_else(|| {
            EvalError::Input(format!(
                "{} is text but the model has no tokenizer (the synthetic demo model): use a pre-tokenized .safetensors",
                text.display()
            ))
        })?;
        Some(
            crate::model::tokenizer::Tokenizer::from_dir(dir)
                .map_err(|e| EvalError::Input(e.to_string()))?,
        )
    };
    let tokens = src
        .token_stream(tok.as_ref())
        .map_err(|e| EvalError::Input(e.to_string()))?;
    let w = crate::calib::eval_windows(&tokens, seqlen, max_windows);
    if w.windows.is_empty() {
        return Err(EvalError::Input(format!(
            "{} has {} tokens: fewer than one window of {seqlen}",
            text.display(),
            tokens.len()
        )));
    }
    Ok(w)
}

/// A model whose quantized modules are replaced by their fake-quantized weights `Q`, for evaluating
/// a run before (or without) exporting it.
pub struct Overlay<'a> {
    pub base: &'a dyn WeightSource,
    pub modules: &'a BTreeMap<(usize, ModuleKind), QuantResult>,
}

impl WeightSource for Overlay<'_> {
    fn config(&self) -> &ModelConfig {
        self.base.config()
    }
    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, WeightError> {
        self.base.embed(ids)
    }
    fn layer(&self, index: usize) -> Result<LayerWeights, WeightError> {
        let mut lw = self.base.layer(index)?;
        for m in ModuleKind::ALL {
            if let Some(r) = self.modules.get(&(index, m)) {
                lw.linear_mut(m).weight = r.weights().into_owned();
            }
        }
        Ok(lw)
    }
    fn final_norm(&self) -> Result<Vec<f32>, WeightError> {
        self.base.final_norm()
    }
    fn lm_head_rows(&self, rows: Range<usize>) -> Result<Vec<f32>, WeightError> {
        self.base.lm_head_rows(rows)
    }
    fn describe(&self) -> String {
        format!(
            "{} with {} fake-quantized modules",
            self.base.describe(),
            self.modules.len()
        )
    }
}
