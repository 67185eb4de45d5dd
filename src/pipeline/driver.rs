//! The sequential driver (algorithm.md §1.4, §2.3 and the streamed reorganisation of §6.0).
//!
//! Two activation streams run in lock-step, layer by layer: the quantized-model stream `h_q` and
//! (for GPTAQ, or whenever metrics are requested) the full-precision stream `h_fp`. Within a layer
//! the true-sequential groups `[q,k,v] → [o] → [gate,up] → [down]` are processed in five stages, each
//! one pass over the calibration batches:
//!
//! | stage | computes per batch (both streams) | accumulates | then |
//! |---|---|---|---|
//! | A | `x1 = norm₁(h)` | H, D of q/k/v | solve q, k, v |
//! | B | `a = attention(x1)` with the quantized q/k/v, stored | H, D of o; q/k/v metrics | solve o |
//! | C | `h ← h + o(a)`, `x2 = norm₂(h)` | H, D of gate/up; o metrics | solve gate, up |
//! | D | `act = silu(gate(x2))·up(x2)` | H, D of down; gate/up metrics | solve down |
//! | E | `h ← h + down(act)` (act recomputed) | down metrics, ‖h_q − h_fp‖ | next layer |
//!
//! Each module's product is therefore computed once per stream with its final weights, instead of
//! the reference's four group forwards plus a final forward. `D = 2/N·(X_fp − X_q)ᵀX_q` is
//! accumulated on the fly from the two current inputs instead of caching every FP module input
//! (the official GPTAQ code caches them on the GPU: ~13 GiB for an 8B model). Stage E recomputes
//! `act` rather than storing `[tokens, intermediate]` per stream, trading two GEMMs for memory,
//! unless the plan has room to keep it from stage D (`MemoryPlan::act_streams`); without metrics
//! the FP stream's down_proj, which no quantization changes, runs in stage D on the act at hand
//! instead, so only the quantized stream recomputes.
//!
//! Where a stream is f32 on the GPU, each stage reads and updates the stream's own batch buffers
//! (`Stream::gpu_batch`: the residual adds in place, attention and SwiGLU writing straight into
//! their streams); host and packed-f16 streams are loaded into work buffers and stored back.
//!
//! The metrics reuse those products: a module's outputs in the two streams are its metrics'
//! `Y_q = X_q·Qᵀ` and `Y_fp = X_fp·Wᵀ` (pipeline::metrics), so only `Y_w = X_q·Wᵀ` costs a GEMM
//! of its own (on a Llama-3-8B layer that removes ~1.8 of ~6 TFLOP per 2048-token sequence).
//! They are measured before the forward changes them: q/k/v before RoPE (in place), gate before
//! SwiGLU (in place), o and down formed in the metric scratch's `Y_q`/`Y_fp` buffers and then added
//! to `h`. Modules with a bias keep the three-GEMM path: the metrics are defined without it.
//! Where the group has `D` (GPTAQ; GPTQ where plan::metric_d_pays), not even `Y_w` is formed: after
//! the group's solve, each module's quantization and cross terms come from `H` and `D`
//! (pipeline::metrics, "From the statistics"), and the next stage records only `‖Y_q − Y_fp‖²` and
//! `‖Y_fp‖²`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::forward::{self, GpuLayer, LayerScratch, Rope, TcScratch};
use crate::gpu::ops::{self, CoopOp, MatView};
use crate::gpu::profile::Profile;
use crate::gpu::{GpuBuffer, GpuContext, GpuMatrix, Recorder};
use crate::model::prefetch::LayerPrefetch;
use crate::model::{LayerWeights, ModelConfig, ModuleKind, WeightSource};
use crate::quant::gpu::PendingCodes;
use crate::quant::{Fallback, Method, QuantConfig, QuantResult};

use super::events::{Event, LayerReport, MemoryPlan, ModuleReport, RunReport};
use super::metrics::{MetricAccumulator, MetricScratch, Moments};
use super::plan::{self, PlanInput};
use super::stream::{Placement, Stream};
use super::{PipelineConfig, PipelineError, QuantizedModel, Solver};

/// Inputs resolved from a [`super::Job`].
pub struct Prepared<'a> {
    pub source: &'a dyn WeightSource,
    pub model_name: String,
    pub windows: &'a [Vec<u32>],
    pub calibration: String,
    pub device: String,
}

/// Per-layer GPU state for both streams.
struct Layers {
    /// Weights of the quantized stream (modules are overwritten by their `Q` as they are solved).
    q: GpuLayer,
    /// Original weights (the FP stream and the metrics' `W`); absent without an FP stream.
    fp: Option<GpuLayer>,
    /// Tensor-core GPTAQ solves compute A from split-f16 copies (`MemoryPlan::split_f16`: where
    /// those copies fit the budget).
    split_f16: bool,
}

impl Layers {
    /// Frees `mods`' weights in both streams ([`GpuLayer::release`]).
    fn release(&mut self, ctx: &GpuContext, mods: &[ModuleKind]) -> Result<(), PipelineError> {
        self.q.release(ctx, mods)?;
        if let Some(fp) = self.fp.as_mut() {
            fp.release(ctx, mods)?;
        }
        Ok(())
    }

    /// Frees `mods`' f32 weights in both streams and keeps their f16 copies
    /// ([`GpuLayer::release_f32`]).
    fn release_f32(&mut self, ctx: &GpuContext, mods: &[ModuleKind]) -> Result<(), PipelineError> {
        self.q.release_f32(ctx, mods)?;
        if let Some(fp) = self.fp.as_mut() {
            fp.release_f32(ctx, mods)?;
        }
        Ok(())
    }
}

struct Work {
    h_q: GpuBuffer<f32>,
    h_fp: GpuBuffer<f32>,
    /// Attention outputs loaded from the stored streams in stage C.
    a_q: GpuBuffer<f32>,
    a_fp: GpuBuffer<f32>,
    s_q: LayerScratch,
    s_fp: LayerScratch,
    diff: GpuBuffer<f32>,
    metric: MetricScratch,
    hidden_parts: GpuBuffer<f32>,
    /// Tensor cores asked for and granted (the statistics' f16 path, [`tensor_cores`]).
    tc: bool,
}

/// Statistics of one true-sequential group.
struct Stats {
    n: usize,
    nsamples: usize,
    /// `None` for RTN (no statistics needed).
    /// n×n, in row panels when larger than one storage binding (gpu/matrix.rs).
    h: Option<GpuMatrix>,
    d: Option<GpuMatrix>,
    /// `E = 2/N·(X_fp − X_q)ᵀ(X_fp − X_q)`, only for a layer-lab capture: with H and D it gives
    /// every error metric of the module exactly from n×n matrices (see `pipeline::CapturedModule`).
    e: Option<GpuMatrix>,
    /// f16 operands of the tensor-core path (`X_q`, `X_fp − X_q`), allocated on its first batch
    /// and reused by the later ones (grown only if a batch is larger).
    f16: Option<(GpuBuffer<half::f16>, GpuBuffer<half::f16>)>,
    /// Per-batch partial sums of `‖X_fp − X_q‖²` (with `D`, for the metrics' moments): whether
    /// the two streams' inputs were bit for bit equal, which makes the metrics' asymmetry exactly
    /// 0 ([`Moments`]).
    dx: Option<GpuBuffer<f32>>,
    /// Partials per batch in `dx`.
    dx_len: usize,
    /// Only D's blocks on and above the diagonal are accumulated (its lower blocks stay zero):
    /// when GPTAQ's solve is D's only reader, which then reads only the strict upper triangle
    /// (the run's `d_upper`, never for a capture).
    d_upper: bool,
}

/// The next layer's weights, read and uploaded on a scoped thread during the last stage.
type NextLayer<'scope> =
    std::thread::ScopedJoinHandle<'scope, Result<(LayerWeights, GpuLayer), PipelineError>>;

/// A solved module waiting for its metrics (measured in the next stage).
struct Pending {
    module: ModuleKind,
    report: ModuleReport,
    /// The quantization and cross terms from the group statistics, when the metrics use them
    /// (`pipeline::metrics` module docs).
    moments: Option<Moments>,
}

/// [`Stream::batch_or`] of an optional stream (`work` without one).
fn batch_or<'a>(s: &'a Option<Stream>, b: usize, work: &'a GpuBuffer<f32>) -> &'a GpuBuffer<f32> {
    s.as_ref().map_or(work, |s| s.batch_or(b, work))
}

/// The per-batch activations in `slot`, allocated by `make` if they were released.
fn ensure_work<'a>(
    slot: &'a mut Option<Work>,
    make: &dyn Fn() -> Result<Work, PipelineError>,
) -> Result<&'a Work, PipelineError> {
    let work = match slot.take() {
        Some(w) => w,
        None => make()?,
    };
    Ok(slot.insert(work))
}

/// Whether the configured capture targets one of `mods` in `layer`.
fn capturing(cfg: &PipelineConfig, layer: usize, mods: &[ModuleKind]) -> bool {
    cfg.capture
        .is_some_and(|(l, m)| l == layer && mods.contains(&m))
}

fn check_cancel(cancel: &AtomicBool) -> Result<(), PipelineError> {
    if cancel.load(Ordering::Relaxed) {
        Err(PipelineError::Cancelled)
    } else {
        Ok(())
    }
}

#[allow(clippy::needless_range_loop)] // `b` indexes several per-batch streams at once
/// Runs the whole model. `emit` receives every event except the terminal one, which the caller
/// sends (it knows whether export or evaluation follows).
pub fn quantize(
    ctx: &GpuContext,
    prep: &Prepared<'_>,
    cfg: &PipelineConfig,
    emit: &mut dyn FnMut(Event),
    cancel: &AtomicBool,
) -> Result<QuantizedModel, PipelineError> {
    let t0 = Instant::now();
    let mc = prep.source.config().clone();
    let qc = &cfg.quant;
    let gptaq = matches!(qc.method, Method::Gptaq { .. });
    // The metrics (and a layer-lab capture, which needs D and E) need the FP stream; GPTAQ runs it
    // in any case (its solve needs D) and without metrics only skips their products and moments.
    let metrics = cfg.measures_metrics();
    let fp_stream = gptaq || metrics;
    let nseq = prep.windows.len();
    let seqlen = cfg.seqlen;
    if nseq == 0 {
        return Err(PipelineError::Input(
            "empty calibration set: no windows".into(),
        ));
    }
    if let Some((i, w)) = prep
        .windows
        .iter()
        .enumerate()
        .find(|(_, w)| w.len() != seqlen)
    {
        return Err(PipelineError::Input(format!(
            "calibration window {i} has {} tokens, expected {seqlen}",
            w.len()
        )));
    }
    validate_config(&mc, qc)?;
    if !fp_stream && qc.method == Method::Rtn {
        return quantize_rtn_direct(ctx, prep, cfg, emit, cancel);
    }

    // Metrics from the statistics where that pays (pipeline::metrics): GPTAQ's H and D always,
    // GPTQ's H and an extra D in the groups where D is cheaper than the Y_w products.
    let metric_moments = metrics && !cfg.metric_products && qc.method != Method::Rtn;
    // GPTAQ's solve reads only D's strict upper triangle in processing order (quant::gpu,
    // `gptaq_p_blocked`; the f64 reference's `gptaq_p` likewise), which is the column order
    // without act-order: then, unless the metrics' moments read D too, the statistics accumulate
    // only D's blocks on and above the diagonal — half of D's product (Stats::accumulate).
    let d_upper = matches!(qc.method, Method::Gptaq { .. }) && !qc.act_order && !metric_moments;
    let metric_d = |mods: &[ModuleKind]| -> bool {
        let n = mc.linear_shape(mods[0]).1;
        let rows = mods.iter().map(|&m| mc.linear_shape(m).0).sum();
        metric_moments && plan::metric_d_pays(n, rows)
    };
    // Tensor cores where asked for (config or GPTAQ_TENSOR_CORES=1) and granted.
    let tc_asked = cfg.tensor_cores || tensor_cores_requested();
    let plan_input = PlanInput {
        config: &mc,
        nsamples: nseq,
        seqlen,
        fp_stream,
        metrics,
        statistics: if cfg.capture.is_some() {
            3
        } else if gptaq {
            2
        } else {
            1
        },
        metric_moments,
        gpu_budget_bytes: cfg.gpu_budget_bytes,
        max_buffer_bytes: ctx.max_binding_bytes(),
        host_dtype: cfg.stream_dtype,
        force_host: cfg.force_host_streams,
        lean_memory: cfg.lean_memory,
        tensor_cores: tc_asked && ops::coop_available(ctx),
    };
    // Tensor cores are a speed option: where their f16 copies do not fit the budget, the run goes
    // on with the f32 kernels instead of failing (warned below).
    let (plan, tc_refused) = plan::plan_or_without_tensor_cores(&plan_input)?;
    let use_tc = plan_input.tensor_cores && tc_refused.is_none();
    emit_started(emit, prep, qc, &plan);
    // Reuse freed buffers (gpu::buffer's pool): every stage and layer allocates the same sizes
    // again. Only with the streams on the GPU, the speed configuration: a memory-bound plan (host
    // streams) keeps nothing it does not use. The pool may fill the budget's usable part, not
    // only the plan's estimate: with the estimate as its limit, GPTAQ's solves (whose buffers
    // the estimate counts instead of the stage's, not beside them) trimmed the stage's batch
    // buffers every time, and every stage allocated them again (0.37 s of an 8B layer's 7.4 s
    // on the H100, BENCHMARKS.md session 21). The report tells live bytes (bounded by the
    // estimate) from pooled ones. `GPTAQ_POOL=0` turns it off, for side-by-side timing.
    let _pool = PoolScope::new(
        ctx,
        if !plan.streams_on_gpu || std::env::var("GPTAQ_POOL").is_ok_and(|v| v == "0") {
            0
        } else {
            plan.gpu_bytes_estimate
                .max(plan::usable_budget(plan.gpu_budget_bytes))
        },
    );
    ctx.reset_peak();

    let bs = plan.batch_sequences.max(1);
    let batches: Vec<std::ops::Range<usize>> = (0..nseq)
        .step_by(bs)
        .map(|s| s..(s + bs).min(nseq))
        .collect();
    let nb = batches.len();
    let h = mc.hidden_size;
    let tok = |b: usize| batches[b].len() * seqlen;
    let max_tokens = bs * seqlen;
    let attn_seqs = plan.attention_sequences.max(1);
    let placement = plan::placement(&plan, cfg.stream_dtype);
    let hidden_lens: Vec<usize> = (0..nb).map(|b| tok(b) * h).collect();
    let attn_lens: Vec<usize> = (0..nb).map(|b| tok(b) * mc.q_dim()).collect();
    let act_lens: Vec<usize> = (0..nb).map(|b| tok(b) * mc.intermediate_size).collect();

    emit(Event::Status("embedding calibration windows".into()));
    let mut hq = Stream::new(ctx, "h_q", &hidden_lens, placement)?;
    let mut hfp = if fp_stream {
        Some(Stream::new(ctx, "h_fp", &hidden_lens, placement)?)
    } else {
        None
    };
    for (b, range) in batches.iter().enumerate() {
        let ids: Vec<u32> = prep.windows[range.clone()]
            .iter()
            .flatten()
            .copied()
            .collect();
        let emb = prep
            .source
            .embed(&ids)
            .map_err(|e| PipelineError::Input(e.to_string()))?;
        hq.set_host(ctx, b, &emb)?;
        if let Some(s) = hfp.as_mut() {
            s.set_host(ctx, b, &emb)?;
        }
    }

    let rope = Rope::new(ctx, &mc, seqlen)?;
    const QKV: [ModuleKind; 3] = [ModuleKind::Q, ModuleKind::K, ModuleKind::V];
    const GATE_UP: [ModuleKind; 2] = [ModuleKind::Gate, ModuleKind::Up];
    let any_metric_d = [&QKV[..], &[ModuleKind::O], &GATE_UP, &[ModuleKind::Down]]
        .iter()
        .any(|g| metric_d(g));
    let widest = h.max(mc.intermediate_size).max(mc.q_dim());
    // The per-batch activations: released while a group is solved, whose n×n temporaries need
    // the room (Llama-3-8B, one 2048-token sequence, both streams: ≈1.7 GiB of activations, more
    // than the down_proj factor's two 14336² matrices), and allocated again for the next stage.
    // The memory plan counts the two stages apart (pipeline/plan.rs).
    // Where the hidden-state and attention streams are f32 buffers on the GPU, the kernels read
    // and update their batches in place (`Stream::gpu_batch`) and these work copies are never
    // used: one element each (the memory plan still counts them, an overestimate).
    let staged = placement.staged(nb);
    // Scratch (`GpuContext::scratch`): pooled buffers are not cleared, as every batch's values
    // are written before they are read; only the partial sums, read whole, start from zeros.
    let make_work = || -> Result<Work, PipelineError> {
        let size = |on: bool, len: usize| if on && staged { len } else { 1 };
        Ok(Work {
            tc: use_tc,
            h_q: ctx.scratch("work h_q", size(true, max_tokens * h))?,
            h_fp: ctx.scratch("work h_fp", size(fp_stream, max_tokens * h))?,
            a_q: ctx.scratch("work a_q", size(true, max_tokens * mc.q_dim()))?,
            a_fp: ctx.scratch("work a_fp", size(fp_stream, max_tokens * mc.q_dim()))?,
            s_q: LayerScratch::new(ctx, &mc, max_tokens)?,
            s_fp: LayerScratch::new(ctx, &mc, if fp_stream { max_tokens } else { 1 })?,
            diff: ctx.scratch(
                "work diff",
                if gptaq || cfg.capture.is_some() || any_metric_d {
                    max_tokens * widest
                } else {
                    1
                },
            )?,
            metric: MetricScratch::new(
                ctx,
                if fp_stream { max_tokens } else { 1 },
                if fp_stream { widest } else { 1 },
            )?,
            hidden_parts: ctx.zeros(
                "hidden partials",
                2 * nb * ops::sq_partials_len(max_tokens * h),
            )?,
        })
    };
    let mut work_slot: Option<Work> = None;

    // A memory-bound plan (host streams) takes each group's codes back at once: their
    // host-readable copies (up to 117 MB for Llama-3-8B's gate and up) are not counted by the
    // plan, and the overlap they buy (about 0.25 s of an 8B layer) is small beside the 30 s such a
    // layer takes with its streams on the host.
    let mut results = Results {
        overlap_codes: plan.streams_on_gpu,
        ..Results::default()
    };
    // Likewise its layer uploads are paced (`GpuContext::upload_paced`): whole-tensor uploads
    // stage each weight matrix in host-visible memory, device memory on resizable-BAR machines
    // that the plan does not count (≈ 0.9 GB for an 8B layer's next weights).
    let paced_uploads = !plan.streams_on_gpu;
    let mut module_reports = Vec::new();
    let mut layer_reports = Vec::new();
    let mut warnings = Vec::new();
    if tc_asked {
        let w = match (&tc_refused, use_tc) {
            (Some(e), _) => format!(
                "tensor cores not used: their f16 weight copies and scratch do not fit the memory \
                 budget ({e}); the f32 kernels run instead"
            ),
            (None, true) => format!(
                "tensor cores: the calibration forward's linears and attention and H, D (and E) \
                 run on f16 operands with f32 accumulation where the shapes tile{} (experimental)",
                match (gptaq, plan.split_f16) {
                    (true, true) => {
                        ", and GPTAQ's A = α·triu₁(D·Uᵀ) on split-f16 operands (near f32's \
                         accuracy) where the width is a multiple of 128"
                    }
                    (true, false) => {
                        "; GPTAQ's A = α·triu₁(D·Uᵀ) takes the f32 GEMMs: its split-f16 copies \
                         do not fit the memory budget"
                    }
                    _ => "",
                }
            ),
            (None, false) => format!(
                "tensor cores ignored: {}",
                ctx.summary
                    .tensor_cores_unavailable()
                    .unwrap_or_else(|| "this adapter cannot run the tensor-core kernels".into())
            ),
        };
        emit(Event::Warning(w.clone()));
        warnings.push(w);
    }

    // The next layer's host weights are read on a second thread while this one computes
    // (model::prefetch), and uploaded on a third during this layer's last stage when the plan
    // allows (MemoryPlan::weights_ahead): the GPU then does not wait at each layer start for the
    // host copy of ~0.9 GB (8B). The scope joins those threads on every exit path.
    let source = prep.source;
    let mcr = &mc;
    std::thread::scope(|scope| -> Result<(), PipelineError> {
        let mut prefetch = LayerPrefetch::new(scope, source);
        let mut next: Option<NextLayer<'_>> = None;
        // The tensor-core scratch of the layer before, shared by every layer.
        let mut tc_shared: Option<TcScratch> = None;
        let mut prof = Profile::from_env();
        for layer in 0..mc.num_layers {
            check_cancel(cancel)?;
            let t_layer = Instant::now();
            prof.restart();
            // GPTAQ_KERNEL_TIMES (gpu::timing): the layer's dispatches are "forward" unless the
            // statistics, metrics, streams or solve below set their own scope.
            let _scope = ctx.time_scope("forward");
            emit(Event::LayerStarted { layer });
            let (lw, q) = match next.take() {
                Some(handle) => handle.join().unwrap_or_else(|_| {
                    Err(PipelineError::Input(format!(
                        "the thread uploading layer {layer} panicked"
                    )))
                })?,
                None => {
                    let lw: LayerWeights = prefetch
                        .layer(layer)
                        .map_err(|e| PipelineError::Input(e.to_string()))?;
                    let _upload = ctx.time_scope("upload");
                    let q = upload_layer(
                        ctx,
                        &mc,
                        &lw,
                        (use_tc, paced_uploads),
                        (max_tokens, seqlen, attn_seqs),
                        tc_shared.clone(),
                    )?;
                    (lw, q)
                }
            };
            // The FP stream's copy is made on the GPU, not uploaded a second time.
            let fp = if fp_stream {
                let mut rec = ctx.recorder();
                let fp = q.duplicate(&mut rec)?;
                rec.submit();
                Some(fp)
            } else {
                None
            };
            let mut layers = Layers {
                q,
                fp,
                split_f16: plan.split_f16,
            };
            tc_shared = layers.q.tc_scratch();
            prof.sync(ctx, "weights")?;
            let mut pending: Vec<Pending> = Vec::new();

            // ---- stage A: statistics of q/k/v
            let work = ensure_work(&mut work_slot, &make_work)?;
            let mut stats = Stats::new(
                ctx,
                nseq,
                h,
                qc.method,
                capturing(cfg, layer, &[ModuleKind::Q, ModuleKind::K, ModuleKind::V]),
                metric_d(&[ModuleKind::Q, ModuleKind::K, ModuleKind::V]),
                d_upper,
                metric_moments,
                (nb, max_tokens),
            )?;
            // Charges this stage's allocations (streams, statistics, metric sums) to "setup"; the
            // first batch's "load" used to absorb them.
            prof.sync(ctx, "setup")?;
            for b in 0..nb {
                check_cancel(cancel)?;
                let t = tok(b);
                let mut rec = ctx.recorder();
                rec = hq.load_unless_in_place(rec, b, &work.h_q)?;
                if let Some(s) = hfp.as_mut() {
                    rec = s.load_unless_in_place(rec, b, &work.h_fp)?;
                }
                rec = prof.lap(rec, "load")?;
                let (h_q, h_fp) = (hq.batch_or(b, &work.h_q), batch_or(&hfp, b, &work.h_fp));
                forward::input_norm(&mut rec, &layers.q, h_q, &work.s_q, t)?;
                if let Some(fp) = &layers.fp {
                    forward::input_norm(&mut rec, fp, h_fp, &work.s_fp, t)?;
                }
                rec = prof.lap(rec, "forward")?;
                stats.accumulate(&mut rec, work, work.s_q.x1(), work.s_fp.x1(), (b, t))?;
                rec = prof.lap(rec, "stats")?;
                rec.submit();
            }
            work_slot = None;
            solve_group(
                ctx,
                cfg,
                &lw,
                &mut layers,
                &[ModuleKind::Q, ModuleKind::K, ModuleKind::V],
                &mut stats,
                layer,
                &mut prof,
                &mut pending,
                &mut results,
                &mut module_reports,
                emit,
            )?;
            drop(stats);

            // ---- stage B: attention with quantized q/k/v → statistics of o, metrics of q/k/v
            let work = ensure_work(&mut work_slot, &make_work)?;
            let mut aq = Stream::written_before_read(ctx, "a_q", &attn_lens, placement)?;
            let mut afp = if fp_stream {
                Some(Stream::written_before_read(
                    ctx, "a_fp", &attn_lens, placement,
                )?)
            } else {
                None
            };
            let mut stats = Stats::new(
                ctx,
                nseq,
                mc.q_dim(),
                qc.method,
                capturing(cfg, layer, &[ModuleKind::O]),
                metric_d(&[ModuleKind::O]),
                d_upper,
                metric_moments,
                (nb, max_tokens),
            )?;
            let qkv_metrics = metric_accs(
                ctx,
                &mc,
                metrics,
                nb,
                max_tokens,
                &[ModuleKind::Q, ModuleKind::K, ModuleKind::V],
                &pending,
            )?;
            prof.sync(ctx, "setup")?;
            for b in 0..nb {
                check_cancel(cancel)?;
                let t = tok(b);
                let mut rec = ctx.recorder();
                rec = hq.load_unless_in_place(rec, b, &work.h_q)?;
                if let Some(s) = hfp.as_mut() {
                    rec = s.load_unless_in_place(rec, b, &work.h_fp)?;
                }
                rec = prof.lap(rec, "load")?;
                let (h_q, h_fp) = (hq.batch_or(b, &work.h_q), batch_or(&hfp, b, &work.h_fp));
                // The attention outputs straight into their streams' batches where those are f32
                // GPU buffers.
                let (a_q, a_fp) = (
                    aq.batch_or(b, work.s_q.attn()),
                    batch_or(&afp, b, work.s_fp.attn()),
                );
                let nseq_b = batches[b].len();
                forward::input_norm(&mut rec, &layers.q, h_q, &work.s_q, t)?;
                if let Some(fp) = &layers.fp {
                    forward::qkv_proj(&mut rec, &layers.q, &work.s_q, t)?;
                    forward::input_norm(&mut rec, fp, h_fp, &work.s_fp, t)?;
                    forward::qkv_proj(&mut rec, fp, &work.s_fp, t)?;
                    rec = prof.lap(rec, "forward")?;
                    // The projections are the metrics' Y_q and Y_fp: measured here, before RoPE
                    // rewrites q and k in place.
                    record_metrics(
                        &mut rec,
                        &qkv_metrics,
                        work,
                        (b, t),
                        (work.s_q.x1(), work.s_fp.x1()),
                        (&layers.q, fp),
                        |m| Some((work.s_q.module_output(m)?, work.s_fp.module_output(m)?)),
                    )?;
                    rec = prof.lap(rec, "metrics")?;
                    let (sq, sfp) = (&work.s_q, &work.s_fp);
                    forward::rope_attend(&mut rec, &layers.q, &rope, sq, nseq_b, seqlen, a_q)?;
                    forward::rope_attend(&mut rec, fp, &rope, sfp, nseq_b, seqlen, a_fp)?;
                } else {
                    let sq = &work.s_q;
                    forward::attention(&mut rec, &layers.q, &rope, sq, nseq_b, seqlen, a_q)?;
                }
                rec = prof.lap(rec, "attention")?;
                stats.accumulate(&mut rec, work, a_q, a_fp, (b, t))?;
                rec = prof.lap(rec, "stats")?;
                rec = aq.store_unless_in_place(rec, b, work.s_q.attn())?;
                if let Some(s) = afp.as_mut() {
                    rec = s.store_unless_in_place(rec, b, work.s_fp.attn())?;
                }
                rec = prof.lap(rec, "store")?;
                rec.submit();
            }
            finish_metrics(ctx, &qkv_metrics, &mut pending, &mut module_reports, emit)?;
            prof.sync(ctx, "metrics")?;
            work_slot = None;
            solve_group(
                ctx,
                cfg,
                &lw,
                &mut layers,
                &[ModuleKind::O],
                &mut stats,
                layer,
                &mut prof,
                &mut pending,
                &mut results,
                &mut module_reports,
                emit,
            )?;
            drop(stats);

            // ---- stage C: h ← h + o(a) → statistics of gate/up, metrics of o
            let work = ensure_work(&mut work_slot, &make_work)?;
            let mut stats = Stats::new(
                ctx,
                nseq,
                h,
                qc.method,
                capturing(cfg, layer, &[ModuleKind::Gate, ModuleKind::Up]),
                metric_d(&[ModuleKind::Gate, ModuleKind::Up]),
                d_upper,
                metric_moments,
                (nb, max_tokens),
            )?;
            let o_metrics = metric_accs(
                ctx,
                &mc,
                metrics,
                nb,
                max_tokens,
                &[ModuleKind::O],
                &pending,
            )?;
            prof.sync(ctx, "setup")?;
            for b in 0..nb {
                check_cancel(cancel)?;
                let t = tok(b);
                let mut rec = ctx.recorder();
                rec = hq.load_unless_in_place(rec, b, &work.h_q)?;
                rec = aq.load_unless_in_place(rec, b, &work.a_q)?;
                rec = prof.lap(rec, "load")?;
                // h ← h + o(a) in the stream's own buffer where it is on the GPU in f32.
                let (h_q, a_q) = (hq.batch_or(b, &work.h_q), aq.batch_or(b, &work.a_q));
                if let (Some(fp), Some(s), Some(a)) = (&layers.fp, hfp.as_mut(), afp.as_mut()) {
                    rec = s.load_unless_in_place(rec, b, &work.h_fp)?;
                    rec = a.load_unless_in_place(rec, b, &work.a_fp)?;
                    rec = prof.lap(rec, "load")?;
                    let (h_fp, a_fp) = (s.batch_or(b, &work.h_fp), a.batch_or(b, &work.a_fp));
                    // o's outputs pass through the metric scratch so the metrics can reuse them.
                    let (yq, yfp) = (work.metric.y_q(), work.metric.y_fp());
                    for (l, a, hs, s, y) in [
                        (&layers.q, a_q, h_q, &work.s_q, yq),
                        (fp, a_fp, h_fp, &work.s_fp, yfp),
                    ] {
                        add_output(
                            &mut rec,
                            l,
                            ModuleKind::O,
                            t,
                            a,
                            hs,
                            s,
                            metrics.then_some(y),
                        )?;
                        forward::post_norm(&mut rec, l, hs, s, t)?;
                    }
                    rec = prof.lap(rec, "forward")?;
                    record_metrics(
                        &mut rec,
                        &o_metrics,
                        work,
                        (b, t),
                        (a_q, a_fp),
                        (&layers.q, fp),
                        |_| Some((yq, yfp)),
                    )?;
                    rec = prof.lap(rec, "metrics")?;
                } else {
                    forward::o_residual(&mut rec, &layers.q, a_q, h_q, &work.s_q, t)?;
                    forward::post_norm(&mut rec, &layers.q, h_q, &work.s_q, t)?;
                    rec = prof.lap(rec, "forward")?;
                }
                stats.accumulate(&mut rec, work, work.s_q.x2(), work.s_fp.x2(), (b, t))?;
                rec = prof.lap(rec, "stats")?;
                rec = hq.store_unless_in_place(rec, b, &work.h_q)?;
                if let Some(s) = hfp.as_mut() {
                    rec = s.store_unless_in_place(rec, b, &work.h_fp)?;
                }
                rec = prof.lap(rec, "store")?;
                rec.submit();
            }
            // The attention streams end here: report f16 overflow in them before they go.
            warn_f16_overflow(
                ctx,
                [Some(&aq), afp.as_ref()],
                &format!("layer {layer}: attention outputs"),
                emit,
                &mut warnings,
            )?;
            drop((aq, afp));
            finish_metrics(ctx, &o_metrics, &mut pending, &mut module_reports, emit)?;
            prof.sync(ctx, "metrics")?;
            work_slot = None;
            solve_group(
                ctx,
                cfg,
                &lw,
                &mut layers,
                &[ModuleKind::Gate, ModuleKind::Up],
                &mut stats,
                layer,
                &mut prof,
                &mut pending,
                &mut results,
                &mut module_reports,
                emit,
            )?;
            drop(stats);
            // A tensor-core run's gate/up read only their f16 copies from here on (stage D's and
            // E's forward; their metrics come from H and D, measured in the solve): their f32
            // weights go before down_proj's statistics and solve, where the plan counts without
            // them (plan::gate_up_f32_released; only ever set in a plan with tensor cores, which
            // the run then uses).
            if plan.gate_up_f32_released {
                layers.release_f32(ctx, &GATE_UP)?;
            }

            // ---- stage D: act = silu(gate)·up → statistics of down, metrics of gate/up
            // Attention's weights are done with (their metrics were measured in stages B and C):
            // freed before down_proj's statistics and solve, where the layer's peak lies.
            layers.release(
                ctx,
                &[ModuleKind::Q, ModuleKind::K, ModuleKind::V, ModuleKind::O],
            )?;
            let work = ensure_work(&mut work_slot, &make_work)?;
            // act kept for stage E where the plan has room on the GPU (MemoryPlan::act_streams).
            let act_stream = |name: &str, on: bool| -> Result<Option<Stream>, PipelineError> {
                let placement = if plan.act_f16 {
                    Placement::GpuF16
                } else {
                    Placement::Gpu
                };
                Ok(if plan.act_streams && on {
                    Some(Stream::written_before_read(
                        ctx, name, &act_lens, placement,
                    )?)
                } else {
                    None
                })
            };
            let (mut actq, mut actfp) =
                (act_stream("act_q", true)?, act_stream("act_fp", fp_stream)?);
            // The FP stream's down_proj does not depend on any quantization: where stage E would
            // recompute the FP stream's act only to feed it (act not kept) and no metric needs its
            // output beside the quantized one's (metrics off), it runs here on the act at hand,
            // and stage E only reads h_fp for the hidden deviation: two of the FP stream's GEMMs
            // (gate/up) per layer fewer, and the FP layer's MLP weights can go before down's solve.
            // The plan decides (MemoryPlan::fp_down_in_d, whose freed weights its estimate
            // counts); `GPTAQ_FP_DOWN_EARLY=0` keeps it in stage E, for A/B runs.
            let fp_down_in_d = plan.fp_down_in_d;
            if fp_down_in_d && (actfp.is_some() || metrics) {
                return Err(PipelineError::Gpu(crate::gpu::GpuError::Validation(
                    "the plan runs the FP stream's down_proj in stage D, which needs act not \
                     kept and metrics off"
                        .into(),
                )));
            }
            let mut stats = Stats::new(
                ctx,
                nseq,
                mc.intermediate_size,
                qc.method,
                capturing(cfg, layer, &[ModuleKind::Down]),
                metric_d(&[ModuleKind::Down]),
                d_upper,
                metric_moments,
                (nb, max_tokens),
            )?;
            let gu_metrics = metric_accs(
                ctx,
                &mc,
                metrics,
                nb,
                max_tokens,
                &[ModuleKind::Gate, ModuleKind::Up],
                &pending,
            )?;
            prof.sync(ctx, "setup")?;
            for b in 0..nb {
                check_cancel(cancel)?;
                let t = tok(b);
                let mut rec = ctx.recorder();
                rec = hq.load_unless_in_place(rec, b, &work.h_q)?;
                rec = prof.lap(rec, "load")?;
                forward::post_norm(&mut rec, &layers.q, hq.batch_or(b, &work.h_q), &work.s_q, t)?;
                // act straight into its kept stream's batch where that is an f32 GPU buffer.
                let act_q = batch_or(&actq, b, work.s_q.act());
                let act_fp = batch_or(&actfp, b, work.s_fp.act());
                if let (Some(fp), Some(s)) = (&layers.fp, hfp.as_mut()) {
                    forward::gate_up_proj(&mut rec, &layers.q, &work.s_q, t, act_q)?;
                    rec = prof.lap(rec, "forward")?;
                    rec = s.load_unless_in_place(rec, b, &work.h_fp)?;
                    rec = prof.lap(rec, "load")?;
                    forward::post_norm(&mut rec, fp, s.batch_or(b, &work.h_fp), &work.s_fp, t)?;
                    forward::gate_up_proj(&mut rec, fp, &work.s_fp, t, act_fp)?;
                    rec = prof.lap(rec, "forward")?;
                    // The raw gate and up outputs are the metrics' Y_q and Y_fp: measured before
                    // SwiGLU overwrites the gate output with act.
                    record_metrics(
                        &mut rec,
                        &gu_metrics,
                        work,
                        (b, t),
                        (work.s_q.x2(), work.s_fp.x2()),
                        (&layers.q, fp),
                        |m| match m {
                            ModuleKind::Gate => Some((act_q, act_fp)),
                            _ => Some((work.s_q.module_output(m)?, work.s_fp.module_output(m)?)),
                        },
                    )?;
                    rec = prof.lap(rec, "metrics")?;
                    forward::silu_mul(&mut rec, &layers.q, &work.s_q, t, act_q)?;
                    forward::silu_mul(&mut rec, fp, &work.s_fp, t, act_fp)?;
                } else {
                    forward::mlp_act(&mut rec, &layers.q, &work.s_q, t, act_q)?;
                }
                rec = prof.lap(rec, "forward")?;
                stats.accumulate(&mut rec, work, act_q, act_fp, (b, t))?;
                rec = prof.lap(rec, "stats")?;
                if let (Some(fp), Some(s), true) = (&layers.fp, hfp.as_mut(), fp_down_in_d) {
                    // Through the metric scratch as in stage E, so the sums are those bits.
                    let (h_fp, y) = (s.batch_or(b, &work.h_fp), Some(work.metric.y_fp()));
                    add_output(
                        &mut rec,
                        fp,
                        ModuleKind::Down,
                        t,
                        act_fp,
                        h_fp,
                        &work.s_fp,
                        y,
                    )?;
                    rec = prof.lap(rec, "forward")?;
                    rec = s.store_unless_in_place(rec, b, &work.h_fp)?;
                    rec = prof.lap(rec, "store")?;
                }
                if let Some(s) = actq.as_mut() {
                    rec = s.store_unless_in_place(rec, b, work.s_q.act())?;
                }
                if let Some(s) = actfp.as_mut() {
                    rec = s.store_unless_in_place(rec, b, work.s_fp.act())?;
                }
                rec = prof.lap(rec, "store")?;
                rec.submit();
            }
            finish_metrics(ctx, &gu_metrics, &mut pending, &mut module_reports, emit)?;
            prof.sync(ctx, "metrics")?;
            work_slot = None;
            // With act kept, stage E does not run gate/up again: they go before down's solve too.
            if actq.is_some() {
                layers.release(ctx, &[ModuleKind::Gate, ModuleKind::Up])?;
            }
            // Nor does the FP stream run its MLP again once its down_proj ran in stage D.
            if let (true, Some(fp)) = (fp_down_in_d, layers.fp.as_mut()) {
                fp.release(ctx, &[ModuleKind::Gate, ModuleKind::Up, ModuleKind::Down])?;
            }
            solve_group(
                ctx,
                cfg,
                &lw,
                &mut layers,
                &[ModuleKind::Down],
                &mut stats,
                layer,
                &mut prof,
                &mut pending,
                &mut results,
                &mut module_reports,
                emit,
            )?;
            drop(stats);

            // ---- stage E: h ← h + down(act) for both streams; metrics of down; hidden deviation
            // The next layer is read (if the prefetch has not finished) and uploaded meanwhile:
            // this layer's statistics and solve buffers are gone, so it fits within the plan.
            if plan.weights_ahead && layer + 1 < mc.num_layers {
                drop(lw);
                let lw_next = prefetch
                    .layer(layer + 1)
                    .map_err(|e| PipelineError::Input(e.to_string()))?;
                let shared = layers.q.tc_scratch();
                next = Some(scope.spawn(move || {
                    let _scope = ctx.time_scope("upload");
                    let q = upload_layer(
                        ctx,
                        mcr,
                        &lw_next,
                        (use_tc, paced_uploads),
                        (max_tokens, seqlen, attn_seqs),
                        shared,
                    )?;
                    Ok((lw_next, q))
                }));
            }
            let work = ensure_work(&mut work_slot, &make_work)?;
            let down_metrics = metric_accs(
                ctx,
                &mc,
                metrics,
                nb,
                max_tokens,
                &[ModuleKind::Down],
                &pending,
            )?;
            let hp = ops::sq_partials_len(max_tokens * h);
            prof.sync(ctx, "setup")?;
            for b in 0..nb {
                check_cancel(cancel)?;
                let t = tok(b);
                let mut rec = ctx.recorder();
                rec = hq.load_unless_in_place(rec, b, &work.h_q)?;
                if let Some(s) = actq.as_mut() {
                    rec = s.load_unless_in_place(rec, b, work.s_q.act())?;
                }
                rec = prof.lap(rec, "load")?;
                // h ← h + down(act) in the stream's own buffer where it is on the GPU in f32, act
                // read from its stream's buffer likewise.
                let h_q = hq.batch_or(b, &work.h_q);
                if actq.is_none() {
                    forward::post_norm(&mut rec, &layers.q, h_q, &work.s_q, t)?;
                    forward::mlp_act(&mut rec, &layers.q, &work.s_q, t, work.s_q.act())?;
                }
                // With metrics, down's outputs pass through the metric scratch so that the metrics
                // can reuse them.
                let down = ModuleKind::Down;
                let act_q = batch_or(&actq, b, work.s_q.act());
                let (yq, yfp) = (work.metric.y_q(), work.metric.y_fp());
                let keep = (metrics && layers.fp.is_some()).then_some(yq);
                add_output(&mut rec, &layers.q, down, t, act_q, h_q, &work.s_q, keep)?;
                rec = prof.lap(rec, "forward")?;
                if let (Some(fp), Some(s)) = (&layers.fp, hfp.as_mut()) {
                    rec = s.load_unless_in_place(rec, b, &work.h_fp)?;
                    if let Some(a) = actfp.as_mut() {
                        rec = a.load_unless_in_place(rec, b, work.s_fp.act())?;
                    }
                    rec = prof.lap(rec, "load")?;
                    let h_fp = s.batch_or(b, &work.h_fp);
                    // Where stage D ran the FP stream's down_proj, h_fp is only read here.
                    if !fp_down_in_d {
                        if actfp.is_none() {
                            forward::post_norm(&mut rec, fp, h_fp, &work.s_fp, t)?;
                            forward::mlp_act(&mut rec, fp, &work.s_fp, t, work.s_fp.act())?;
                        }
                        let act_fp = batch_or(&actfp, b, work.s_fp.act());
                        add_output(&mut rec, fp, down, t, act_fp, h_fp, &work.s_fp, Some(yfp))?;
                        rec = prof.lap(rec, "forward")?;
                        record_metrics(
                            &mut rec,
                            &down_metrics,
                            work,
                            (b, t),
                            (act_q, act_fp),
                            (&layers.q, fp),
                            |_| Some((yq, yfp)),
                        )?;
                    }
                    ops::sq_diff_partials(
                        &mut rec,
                        t * h,
                        h_q,
                        1.0,
                        h_fp,
                        &work.hidden_parts,
                        b * hp,
                    )?;
                    ops::sq_diff_partials(
                        &mut rec,
                        t * h,
                        h_fp,
                        0.0,
                        h_fp,
                        &work.hidden_parts,
                        (nb + b) * hp,
                    )?;
                    rec = prof.lap(rec, "metrics")?;
                }
                rec = hq.store_unless_in_place(rec, b, &work.h_q)?;
                if let (Some(s), false) = (hfp.as_mut(), fp_down_in_d) {
                    rec = s.store_unless_in_place(rec, b, &work.h_fp)?;
                }
                rec = prof.lap(rec, "store")?;
                rec.submit();
            }
            if plan.act_f16 {
                warn_f16_overflow(
                    ctx,
                    [actq.as_ref(), actfp.as_ref()],
                    &format!("layer {layer}: MLP activations"),
                    emit,
                    &mut warnings,
                )?;
            }
            drop((actq, actfp));
            finish_metrics(ctx, &down_metrics, &mut pending, &mut module_reports, emit)?;
            prof.sync(ctx, "metrics")?;
            let hidden_rel_error = if fp_stream {
                let parts = ctx.read(&work.hidden_parts)?;
                let span = nb * hp;
                let num: f64 = parts[..span].iter().map(|&v| f64::from(v)).sum();
                let den: f64 = parts[span..2 * span].iter().map(|&v| f64::from(v)).sum();
                Some(if den > 0.0 { (num / den).sqrt() } else { 0.0 })
            } else {
                None
            };
            warn_f16_overflow(
                ctx,
                [Some(&hq), hfp.as_ref()],
                &format!("layer {layer}: hidden states"),
                emit,
                &mut warnings,
            )?;
            // Every module is reported by now (without metrics when solved, with them when its
            // metrics are finished); this keeps a view from missing one should a stage ever leave
            // a module pending.
            for p in pending.drain(..) {
                emit(Event::ModuleDone(p.report.clone()));
                module_reports.push(p.report);
            }
            for rep in module_reports.iter().filter(|r| r.layer == layer) {
                if let Some(f) = &rep.fallback {
                    let w = format!("layer {layer} {}: {f}", rep.module);
                    emit(Event::Warning(w.clone()));
                    warnings.push(w);
                }
            }
            ctx.sync()?;
            prof.sync(ctx, "other")?;
            let lr = LayerReport {
                layer,
                hidden_rel_error,
                secs: t_layer.elapsed().as_secs_f64(),
                phases: prof.take(),
                kernel_times: layer_kernel_times(ctx)?,
            };
            emit(Event::LayerDone(lr.clone()));
            layer_reports.push(lr);
        }
        Ok(())
    })?;
    Ok(QuantizedModel {
        modules: results.finish(ctx)?,
        report: run_report(
            ctx,
            prep,
            cfg,
            plan,
            (module_reports, layer_reports, warnings),
            t0,
        ),
    })
}

/// Warns once when a value of `what` went beyond f16's range in the f16 host copy of either
/// stream (clamped there; see `Stream::overflowed`). One 4-byte flag read per stream, made for
/// both streams (no short-circuit) so that each flag is cleared.
fn warn_f16_overflow(
    ctx: &GpuContext,
    streams: [Option<&Stream>; 2],
    what: &str,
    emit: &mut dyn FnMut(Event),
    warnings: &mut Vec<String>,
) -> Result<(), PipelineError> {
    let over = streams
        .into_iter()
        .flatten()
        .map(|s| s.overflowed(ctx))
        .collect::<Result<Vec<bool>, _>>()?;
    if over.contains(&true) {
        let w = format!(
            "{what} beyond f16's range (±65504) were clamped in the f16 host streams; use \
             --stream-dtype f32"
        );
        emit(Event::Warning(w.clone()));
        warnings.push(w);
    }
    Ok(())
}

/// The run-started event (plan included) of both drivers.
fn emit_started(
    emit: &mut dyn FnMut(Event),
    prep: &Prepared<'_>,
    qc: &QuantConfig,
    plan: &MemoryPlan,
) {
    emit(Event::Started {
        model: prep.model_name.clone(),
        method: qc.method.name().into(),
        layers: prep.source.config().num_layers,
        modules_per_layer: ModuleKind::ALL.len(),
        plan: plan.clone(),
    });
}

/// The run report of both drivers: modules, layers and warnings as collected, peak GPU memory
/// since the run started.
fn run_report(
    ctx: &GpuContext,
    prep: &Prepared<'_>,
    cfg: &PipelineConfig,
    plan: MemoryPlan,
    (modules, layers, warnings): (Vec<ModuleReport>, Vec<LayerReport>, Vec<String>),
    t0: Instant,
) -> RunReport {
    let (_, peak_reserved) = ctx.memory();
    let (_, peak) = ctx.allocated();
    ctx.sample_allocator();
    let allocator = ctx.allocator_peak();
    let kernel_times = crate::gpu::timing::merge(layers.iter().map(|l| l.kernel_times.as_slice()));
    RunReport {
        model: prep.model_name.clone(),
        method: cfg.quant.method.name().into(),
        config: cfg.quant.clone(),
        device: prep.device.clone(),
        calibration: prep.calibration.clone(),
        nsamples: prep.windows.len(),
        seqlen: cfg.seqlen,
        seed: cfg.seed,
        plan,
        modules,
        layers,
        peak_gpu_bytes: peak,
        peak_reserved_bytes: peak_reserved,
        peak_allocator_bytes: allocator.map(|a| a.0),
        peak_staging_bytes: allocator.map(|a| a.1),
        kernel_times,
        secs: t0.elapsed().as_secs_f64(),
        warnings,
    }
}

/// The kernel times since the last call (the layer's, called once per layer), emptied; nothing
/// without `GPTAQ_KERNEL_TIMES=1`. The layer ends with a sync already, so this waits for nothing.
fn layer_kernel_times(ctx: &GpuContext) -> Result<Vec<crate::gpu::KernelTime>, PipelineError> {
    if !ctx.kernel_timing() {
        return Ok(Vec::new());
    }
    let (times, lost) = ctx.kernel_times(true)?;
    if lost > 0 {
        log::warn!("kernel times: {lost} passes' timestamps could not be read");
    }
    Ok(times)
}

/// RTN without metrics: it reads no activations, so there is no calibration forward, no
/// statistics and no GPU work — each module is rounded on the host as its layer is read (on
/// lavapipe the forward this skips took minutes per layer at 128 × 512 tokens). Same events and
/// report as [`quantize`] without an FP stream (no errors, no hidden deviation).
fn quantize_rtn_direct(
    ctx: &GpuContext,
    prep: &Prepared<'_>,
    cfg: &PipelineConfig,
    emit: &mut dyn FnMut(Event),
    cancel: &AtomicBool,
) -> Result<QuantizedModel, PipelineError> {
    let t0 = Instant::now();
    let mc = prep.source.config().clone();
    let qc = &cfg.quant;
    let nseq = prep.windows.len();
    let plan = plan::rtn_direct(cfg.gpu_budget_bytes);
    emit_started(emit, prep, qc, &plan);
    ctx.reset_peak();
    let mut results = BTreeMap::new();
    let mut module_reports = Vec::new();
    let mut layer_reports = Vec::new();
    let mut warnings = Vec::new();
    std::thread::scope(|scope| -> Result<(), PipelineError> {
        let mut prefetch = LayerPrefetch::new(scope, prep.source);
        for layer in 0..mc.num_layers {
            check_cancel(cancel)?;
            let t_layer = Instant::now();
            emit(Event::LayerStarted { layer });
            let lw: LayerWeights = prefetch
                .layer(layer)
                .map_err(|e| PipelineError::Input(e.to_string()))?;
            for m in ModuleKind::ALL {
                let t = Instant::now();
                let lin = lw.linear(m);
                let r = crate::quant::quantizer::rtn_quantize(
                    &lin.weight,
                    lin.out_features,
                    lin.in_features,
                    qc,
                )
                .map_err(|e| PipelineError::Module {
                    layer,
                    module: m.short_name().into(),
                    message: e.to_string(),
                })?;
                let rep = report_stub(layer, m, &r, nseq, t.elapsed().as_secs_f64());
                if let Some(f) = &rep.fallback {
                    let w = format!("layer {layer} {}: {f}", rep.module);
                    emit(Event::Warning(w.clone()));
                    warnings.push(w);
                }
                emit(Event::ModuleDone(rep.clone()));
                module_reports.push(rep);
                results.insert((layer, m), r);
            }
            let lr = LayerReport {
                layer,
                hidden_rel_error: None,
                secs: t_layer.elapsed().as_secs_f64(),
                phases: Vec::new(),
                kernel_times: Vec::new(),
            };
            emit(Event::LayerDone(lr.clone()));
            layer_reports.push(lr);
        }
        Ok(())
    })?;
    Ok(QuantizedModel {
        modules: results,
        report: run_report(
            ctx,
            prep,
            cfg,
            plan,
            (module_reports, layer_reports, warnings),
            t0,
        ),
    })
}

/// Refuses settings that cannot work for this model, with the reason.
fn validate_config(mc: &ModelConfig, qc: &QuantConfig) -> Result<(), PipelineError> {
    if ![2, 3, 4, 8].contains(&qc.bits) {
        return Err(PipelineError::Input(format!(
            "bits must be 2, 3, 4 or 8 (got {})",
            qc.bits
        )));
    }
    if qc.block_size == 0 {
        return Err(PipelineError::Input("block size must be at least 1".into()));
    }
    if let Some(gs) = qc.group_size {
        if gs == 0 {
            return Err(PipelineError::Input(
                "group size must be positive (or -1 for none)".into(),
            ));
        }
        for m in ModuleKind::ALL {
            let (_, cols) = mc.linear_shape(m);
            if cols % gs != 0 {
                return Err(PipelineError::Input(format!(
                    "group size {gs} does not divide the {cols} input features of {}: GPTQ checkpoints need equal groups; \
                     pick a divisor of {cols} or -1",
                    m.short_name()
                )));
            }
        }
    } else if qc.static_groups {
        return Err(PipelineError::Input(
            "static groups need a group size".into(),
        ));
    }
    if let Method::Gptaq { alpha } = qc.method
        && !(0.0..=1.0).contains(&alpha)
    {
        return Err(PipelineError::Input(format!(
            "alpha must be in [0, 1] (got {alpha})"
        )));
    }
    Ok(())
}

/// Row alignment of the statistics' panels: none is needed by their users (the solve gathers H
/// and D into its own layout), 32 keeps the panel boundaries on GEMM-friendly rows.
const STATS_ALIGN: usize = 32;

impl Stats {
    /// Buffers for what `method` (and a capture) needs: nothing for RTN, H for GPTQ (and D with
    /// `metric_d`: only for the metrics, plan::metric_d_pays), H and D for GPTAQ (D's upper
    /// blocks only with `d_upper`), H, D and E for a capture; `‖X_fp − X_q‖²`'s partials only
    /// with `metric_moments`, the one reader of [`Stats::same_inputs`] (a `--no-metrics` GPTAQ
    /// layer spent a pass over both streams of every module input on them: 18 ms per Llama-3-8B
    /// layer on an H100, BENCHMARKS.md session 31).
    #[allow(clippy::too_many_arguments)]
    fn new(
        ctx: &GpuContext,
        nsamples: usize,
        n: usize,
        method: Method,
        capture: bool,
        metric_d: bool,
        d_upper: bool,
        metric_moments: bool,
        (batches, max_tokens): (usize, usize),
    ) -> Result<Self, PipelineError> {
        // D for the solve (GPTAQ), the capture, or only the metrics (GPTQ, `metric_d`).
        let with_d = matches!(method, Method::Gptaq { .. }) || (metric_d && method != Method::Rtn);
        let dx_len = ops::sq_partials_len(max_tokens * n);
        Ok(Self {
            n,
            nsamples,
            h: if method != Method::Rtn || capture {
                Some(ctx.matrix_zeros("H", n, n, STATS_ALIGN)?)
            } else {
                None
            },
            d: if with_d || capture {
                Some(ctx.matrix_zeros("D", n, n, STATS_ALIGN)?)
            } else {
                None
            },
            e: if capture {
                Some(ctx.matrix_zeros("E", n, n, STATS_ALIGN)?)
            } else {
                None
            },
            f16: None,
            dx: if (with_d || capture) && metric_moments {
                Some(ctx.zeros("ΔX partials", batches * dx_len)?)
            } else {
                None
            },
            dx_len,
            d_upper: d_upper && !capture,
        })
    }

    /// Records the partial sums of `‖X_fp − X_q‖²` of batch `b` from the two streams' inputs
    /// (`tokens·n` values each; the same sums as from an f32 `X_fp − X_q`: `1.0·x_q` is exact).
    fn record_dx(
        &self,
        rec: &mut Recorder<'_>,
        x_fp: &GpuBuffer<f32>,
        x_q: &GpuBuffer<f32>,
        (b, tokens): (usize, usize),
    ) -> Result<(), PipelineError> {
        if let Some(dx) = &self.dx {
            ops::sq_diff_partials(rec, tokens * self.n, x_fp, 1.0, x_q, dx, b * self.dx_len)?;
        }
        Ok(())
    }

    /// Whether the two streams' inputs were bit for bit equal on every token (all `‖X_fp − X_q‖²`
    /// partials exactly 0); false without `D` or without the metrics' moments (never read then).
    fn same_inputs(&self, ctx: &GpuContext) -> Result<bool, PipelineError> {
        match &self.dx {
            Some(dx) => Ok(ctx.read(dx)?.iter().all(|&v| v == 0.0)),
            None => Ok(false),
        }
    }

    /// `H += 2/N·X_qᵀX_q`, `D += 2/N·(X_fp − X_q)ᵀX_q` (algorithm.md §2.1; N counts sequences, as
    /// the references do; the 2/N is applied per batch, which sums to the same closed form).
    fn accumulate(
        &mut self,
        rec: &mut Recorder<'_>,
        work: &Work,
        x_q: &GpuBuffer<f32>,
        x_fp: &GpuBuffer<f32>,
        (b, tokens): (usize, usize),
    ) -> Result<(), PipelineError> {
        let Some(h) = &self.h else {
            return Ok(());
        };
        let _scope = rec.ctx().time_scope("stats");
        let n = self.n;
        let alpha = 2.0 / self.nsamples as f32;
        // The cooperative-matrix kernel writes one binding: only for single-panel statistics.
        if tensor_cores(rec.ctx(), work.tc, n, tokens) && h.single().is_some() {
            return self.accumulate_tensor_cores(rec, x_q, x_fp, (b, tokens), alpha);
        }
        ops::syrk_xtx(rec, tokens, n, alpha, MatView::new(x_q, n), 1.0, h)?;
        if let Some(d) = &self.d {
            ops::axpby(rec, tokens * n, 1.0, x_fp, -1.0, x_q, &work.diff)?;
            self.record_dx(rec, x_fp, x_q, (b, tokens))?;
            let (diff, xq) = (MatView::new(&work.diff, n), MatView::new(x_q, n));
            if self.d_upper {
                ops::gemm_mat_upper(
                    rec,
                    n,
                    tokens,
                    alpha,
                    diff.t().into(),
                    xq.into(),
                    1.0,
                    d.op(0, 0),
                )?;
            } else {
                ops::gemm_atb(rec, tokens, n, alpha, diff, xq, 1.0, d)?;
            }
            if let Some(e) = &self.e {
                ops::syrk_xtx(rec, tokens, n, alpha, MatView::new(&work.diff, n), 1.0, e)?;
            }
        }
        Ok(())
    }

    /// [`Stats::accumulate`] with f16 operands on tensor cores (experimental, see
    /// [`tensor_cores`]): `x = f16(√α·X_q)`, `δ = f16(√α·(X_fp − X_q))`, then `H += xᵀx`,
    /// `D += δᵀx`, `E += δᵀδ` — the same products as the f32 path, with α folded into the
    /// operands (the cooperative-matrix kernel only accumulates) and the full square computed.
    fn accumulate_tensor_cores(
        &mut self,
        rec: &mut Recorder<'_>,
        x_q: &GpuBuffer<f32>,
        x_fp: &GpuBuffer<f32>,
        (b, tokens): (usize, usize),
        alpha: f32,
    ) -> Result<(), PipelineError> {
        let n = self.n;
        let ctx = rec.ctx();
        let s = alpha.sqrt();
        if self.f16.as_ref().is_none_or(|(x, _)| x.len() < tokens * n) {
            self.f16 = Some((
                ctx.zeros::<half::f16>("X_q f16", tokens * n)?,
                ctx.zeros::<half::f16>("ΔX f16", tokens * n)?,
            ));
        }
        let Some((x16, d16)) = &self.f16 else {
            return Ok(());
        };
        ops::cast_f16(rec, tokens, n, MatView::new(x_q, n), s, x16)?;
        // The staged kernel where granted and n tiles by 128 (tokens by 32); else the 32×32 one,
        // which `tensor_cores` checked. The symmetric H and E then take only the blocks on and
        // above the diagonal (half the work) and are mirrored, as the f32 path's syrk does.
        let staged =
            ops::coop_staged_available(ctx) && ops::coop_shape_ok_for(CoopOp::Tn128, n, n, tokens);
        let (op, sym_op) = if staged {
            (CoopOp::Tn128, CoopOp::Tn128Upper)
        } else {
            (CoopOp::Tn, CoopOp::Tn)
        };
        fn one(m: &GpuMatrix) -> Result<&GpuBuffer<f32>, PipelineError> {
            m.single().ok_or_else(|| {
                PipelineError::Gpu(crate::gpu::GpuError::Validation(
                    "tensor-core statistics need single-panel matrices".into(),
                ))
            })
        }
        let symmetric = |rec: &mut Recorder<'_>,
                         a: &GpuBuffer<half::f16>,
                         m: &GpuMatrix|
         -> Result<(), PipelineError> {
            ops::gemm_coop(
                rec,
                sym_op,
                (n, n, tokens),
                (a, 0),
                (a, 0),
                MatView::new(one(m)?, n),
                true,
            )?;
            if staged {
                ops::mirror_upper(rec, m)?;
            }
            Ok(())
        };
        if let Some(h) = &self.h {
            symmetric(rec, x16, h)?;
        }
        if let Some(d) = &self.d {
            // δ straight from the two streams: no f32 ΔX is formed (`record_dx` reads them too).
            self.record_dx(rec, x_fp, x_q, (b, tokens))?;
            ops::cast_f16_diff(rec, tokens, n, MatView::new(x_fp, n), x_q, s, d16)?;
            // D's upper blocks only where the solve reads nothing else (`d_upper`), not mirrored.
            ops::gemm_coop(
                rec,
                if self.d_upper { sym_op } else { op },
                (n, n, tokens),
                (d16, 0),
                (x16, 0),
                MatView::new(one(d)?, n),
                true,
            )?;
            if let Some(e) = &self.e {
                symmetric(rec, d16, e)?;
            }
        }
        Ok(())
    }
}

/// Sets the context's buffer pool limit for a run and empties the pool, and frees the kept upload
/// staging, when the run ends, however it ends.
struct PoolScope<'a> {
    ctx: &'a GpuContext,
}

impl<'a> PoolScope<'a> {
    fn new(ctx: &'a GpuContext, limit: u64) -> Self {
        ctx.set_pool_limit(limit);
        Self { ctx }
    }
}

impl Drop for PoolScope<'_> {
    fn drop(&mut self) {
        self.ctx.set_pool_limit(0);
        self.ctx.release_upload_staging();
    }
}

/// A layer's weights on the GPU, with its f16 copies for the tensor-core forward when `tc`, and
/// the tensor-core scratch of an earlier layer (`shared`) where it has one; the linears' weights
/// through `GpuContext::upload_paced` when `paced`.
fn upload_layer(
    ctx: &GpuContext,
    mc: &ModelConfig,
    lw: &LayerWeights,
    (tc, paced): (bool, bool),
    (max_tokens, seqlen, attn_seqs): (usize, usize, usize),
    shared: Option<TcScratch>,
) -> Result<GpuLayer, PipelineError> {
    let mut q = GpuLayer::upload_with(ctx, mc, lw, paced)?;
    if tc {
        let mut rec = ctx.recorder();
        q.enable_tensor_cores_with(&mut rec, max_tokens, (seqlen, attn_seqs), shared)?;
        rec.submit();
    }
    Ok(q)
}

/// Whether the statistics go through the tensor-core GEMM: when asked for ([`upload_layer`]'s
/// `tc`, `PipelineConfig::tensor_cores` or `GPTAQ_TENSOR_CORES=1`; f16 operands round X to 11
/// significant bits and can overflow beyond 65504), the adapter grants the features and the
/// shape fits the kernel's tiles. Its two f16 operand buffers (2·tokens·n·2 bytes) are in the
/// memory plan's per-token scratch.
fn tensor_cores(ctx: &GpuContext, asked: bool, n: usize, tokens: usize) -> bool {
    asked && ops::coop_available(ctx) && ops::coop_shape_ok_for(CoopOp::Tn, n, n, tokens)
}

fn tensor_cores_requested() -> bool {
    std::env::var("GPTAQ_TENSOR_CORES").is_ok_and(|v| v == "1")
}

/// Records the metrics of every module in `accs` for batch `(b, tokens)`, from both streams'
/// inputs `x` of the modules and, where `outputs(m)` has them, both streams' outputs of module
/// `m` as the forward passes computed them (`(Y_q, Y_fp)`): those are reused and only `Y_w` is
/// formed; modules without usable outputs get all three products from the inputs.
fn record_metrics<'a>(
    rec: &mut Recorder<'_>,
    accs: &[(ModuleKind, MetricAccumulator)],
    work: &Work,
    (b, t): (usize, usize),
    (x_q, x_fp): (&GpuBuffer<f32>, &GpuBuffer<f32>),
    (q, fp): (&GpuLayer, &GpuLayer),
    outputs: impl Fn(ModuleKind) -> Option<(&'a GpuBuffer<f32>, &'a GpuBuffer<f32>)>,
) -> Result<(), PipelineError> {
    let _scope = rec.ctx().time_scope("metrics");
    for (m, acc) in accs {
        let outs = outputs(*m).filter(|_| output_is_product(fp, *m));
        // Only metrics from the statistics on the forward's outputs need no W: the plan frees f32
        // weights only then (plan::gate_up_f32_released).
        if (outs.is_none() || !acc.from_moments()) && (q.f32_released(*m) || fp.f32_released(*m)) {
            return Err(PipelineError::Gpu(crate::gpu::GpuError::Validation(
                format!(
                    "{}: its metrics need its f32 weights, which were freed",
                    m.hf_name()
                ),
            )));
        }
        let (q_m, w_m) = (q.linear(*m), fp.linear(*m));
        match outs {
            Some((y_q, y_fp)) => {
                acc.record_outputs(rec, &work.metric, b, t, x_q, y_q, y_fp, w_m)?
            }
            None => acc.record(rec, &work.metric, b, t, x_q, x_fp, q_m, w_m)?,
        }
    }
    Ok(())
}

/// Whether module `m`'s forward output is the metrics' product `X·Wᵀ` and can be reused. Not with
/// a bias (Qwen2's q/k/v, `mlp_bias`, Llama's `attention_bias` on o): the forward adds it, but the
/// metrics are defined on `X·Wᵀ` alone (the normaliser ‖Y_fp‖² excludes it), so such a module's
/// metrics form all three products from the inputs (`MetricAccumulator::record`). Both streams
/// share the bias (it is never quantized), so one layer's answer holds for both.
fn output_is_product(l: &GpuLayer, m: ModuleKind) -> bool {
    l.bias(m).is_none()
}

/// `h += m(x)` for o or down on one stream (`x`: the attention output, or act). Given `y` (metrics on) and a
/// module whose output the metrics reuse, the output is formed in `y` and then added, so it stays
/// there for [`record_metrics`]; otherwise the fused GEMM accumulates it straight into `h`.
#[allow(clippy::too_many_arguments)]
fn add_output(
    rec: &mut Recorder<'_>,
    l: &GpuLayer,
    m: ModuleKind,
    t: usize,
    x: &GpuBuffer<f32>,
    h: &GpuBuffer<f32>,
    s: &LayerScratch,
    y: Option<&GpuBuffer<f32>>,
) -> Result<(), PipelineError> {
    match y {
        Some(y) if output_is_product(l, m) => {
            forward::linear_into(rec, l, m, t, x, y)?;
            forward::residual_add(rec, t * l.dims().hidden, y, h)?;
        }
        _ if m == ModuleKind::O => forward::o_residual(rec, l, x, h, s, t)?,
        _ => forward::down_residual(rec, l, x, h, s, t)?,
    }
    Ok(())
}

/// The metric accumulators of `mods`, from moments where their solve left [`Moments`] in
/// `pending`.
fn metric_accs(
    ctx: &GpuContext,
    mc: &ModelConfig,
    metrics: bool,
    nb: usize,
    max_tokens: usize,
    mods: &[ModuleKind],
    pending: &[Pending],
) -> Result<Vec<(ModuleKind, MetricAccumulator)>, PipelineError> {
    if !metrics {
        return Ok(Vec::new());
    }
    mods.iter()
        .map(|&m| {
            let (rows, cols) = mc.linear_shape(m);
            let from_moments = pending.iter().any(|p| p.module == m && p.moments.is_some());
            let acc = MetricAccumulator::new(ctx, nb, max_tokens, rows, cols, from_moments)?;
            Ok((m, acc))
        })
        .collect()
}

/// Reads the metrics of a stage, completes those modules' reports and emits them.
fn finish_metrics(
    ctx: &GpuContext,
    accs: &[(ModuleKind, MetricAccumulator)],
    pending: &mut Vec<Pending>,
    done: &mut Vec<ModuleReport>,
    emit: &mut dyn FnMut(Event),
) -> Result<(), PipelineError> {
    for (m, acc) in accs {
        if let Some(pos) = pending.iter().position(|p| p.module == *m) {
            let p = pending.remove(pos);
            let (qe, ae, oe) = acc.finish(ctx, p.moments.as_ref())?;
            let mut rep = p.report;
            rep.quant_error = Some(qe);
            rep.asym_error = Some(ae);
            rep.output_error = Some(oe);
            emit(Event::ModuleDone(rep.clone()));
            done.push(rep);
        }
    }
    Ok(())
}

fn report_stub(
    layer: usize,
    m: ModuleKind,
    r: &QuantResult,
    nsamples: usize,
    secs: f64,
) -> ModuleReport {
    let fallback = r.fallback.as_ref().map(|f| match f {
        Fallback::IncreasedDamping => format!("damping raised to {:.3}", r.damp_percent),
        Fallback::DiagonalFloor => "diagonal floor".to_string(),
        Fallback::Rtn { reason } => format!("rtn: {reason}"),
    });
    ModuleReport {
        layer,
        module: m.short_name().into(),
        rows: r.rows,
        cols: r.cols,
        nsamples,
        damp: r.damp_percent,
        proxy_loss: r.proxy_loss_sum / nsamples.max(1) as f64,
        quant_error: None,
        asym_error: None,
        output_error: None,
        fallback,
        secs,
    }
}

/// Solves the modules of one true-sequential group in order ([`solve`]) and files each result
/// with its report stub: pending, when the metrics are added once the next stage has measured
/// them; without metrics reported (`ModuleDone`) and moved to `done` right away, so a view sees
/// each group as soon as it is solved, not at the end of the layer.
#[allow(clippy::too_many_arguments)]
fn solve_group(
    ctx: &GpuContext,
    cfg: &PipelineConfig,
    lw: &LayerWeights,
    layers: &mut Layers,
    mods: &[ModuleKind],
    stats: &mut Stats,
    layer: usize,
    prof: &mut Profile,
    pending: &mut Vec<Pending>,
    results: &mut Results,
    done: &mut Vec<ModuleReport>,
    emit: &mut dyn FnMut(Event),
) -> Result<(), PipelineError> {
    let names: Vec<&str> = mods.iter().map(|m| m.short_name()).collect();
    emit(Event::Status(format!(
        "layer {layer}: solving {}",
        names.join(", ")
    )));
    let _scope = ctx.time_scope("solve");
    // The tensor-core path's f16 operands are accumulation scratch: not kept through the solve.
    stats.f16 = None;
    // The group's modules share H and D: one factorisation and one P for all of them.
    let mut shared = crate::quant::gpu::SharedFactor::default();
    // Every module's GPU work first, then their results: waiting for one module's small results
    // before recording the next left the GPU idle in between (crate::quant::gpu::Solving).
    // Not in a memory-bound plan (streams on the host, no buffer pool): there a module's solver
    // buffers, dropped when it is submitted, are only destroyed once its GPU work is done, and the
    // next module's would be allocated beside them, beyond the plan. `GPTAQ_SOLVE_OVERLAP=0`
    // finishes each module before the next is submitted (A/B runs). The same condition lets the
    // factor be taken speculatively (crate::quant::gpu::submit_gpu_resident): its buffers, too,
    // outlive their host code until the GPU has used them.
    let overlap =
        results.overlap_codes && std::env::var("GPTAQ_SOLVE_OVERLAP").map_or(true, |v| v != "0");
    let mut solving = Vec::with_capacity(mods.len());
    let mut finished = Vec::with_capacity(mods.len());
    for &m in mods {
        let t = Instant::now();
        let s = submit_module(ctx, cfg, lw, layers, m, stats, layer, &mut shared, overlap)?;
        let secs = t.elapsed().as_secs_f64();
        if overlap {
            solving.push((m, s, secs));
        } else {
            let t = Instant::now();
            let done = finish_module(ctx, layers, m, s, layer, prof)?;
            finished.push((m, done, secs + t.elapsed().as_secs_f64()));
        }
    }
    // The previous group's codes: their copies had the stage since then to overlap with, and
    // copying them out (about 0.1 s of host time per 8B layer) now overlaps this group's solves
    // too. Done before the submissions above, the copy left the host late to ask for the
    // Hessian's diagonal, most likely the cause of the GPU idle measured there (19 ms per 8B GPTQ
    // layer on an H100; the gain of this order is not measured yet, BENCHMARKS.md session 31).
    results.finish_codes(ctx)?;
    prof.sync(ctx, "codes")?;
    for (m, s, submit_secs) in solving {
        let t = Instant::now();
        let done = finish_module(ctx, layers, m, s, layer, prof)?;
        finished.push((m, done, submit_secs + t.elapsed().as_secs_f64()));
    }
    for (m, (r, codes), secs) in finished {
        pending.push(Pending {
            module: m,
            report: report_stub(layer, m, &r, stats.nsamples, secs),
            moments: None,
        });
        results.insert((layer, m), r, codes);
    }
    // U and P are not needed by the metrics: freed before their temporaries are made.
    drop(shared);
    prof.sync(ctx, "solve")?;
    results.group_solved(ctx)?;
    // The metrics' quantization and cross terms from H and D while they are alive (metrics.rs).
    let metrics = cfg.measures_metrics();
    if let (Some(h), Some(d), Some(fp), true, false) =
        (&stats.h, &stats.d, &layers.fp, metrics, cfg.metric_products)
    {
        let same_inputs = stats.same_inputs(ctx)?;
        for p in pending.iter_mut().filter(|p| mods.contains(&p.module)) {
            let m = p.module;
            // With a bias the forward outputs are not X·Wᵀ: such a module measures products.
            if !output_is_product(fp, m) {
                continue;
            }
            let (rows, cols) = (p.report.rows, p.report.cols);
            p.moments = Some(super::metrics::moments(
                ctx,
                fp.linear(m),
                layers.q.linear(m),
                rows,
                cols,
                h,
                d,
                stats.nsamples,
                same_inputs,
            )?);
        }
        prof.sync(ctx, "metrics")?;
    }
    if !metrics {
        for p in pending.drain(..) {
            emit(Event::ModuleDone(p.report.clone()));
            done.push(p.report);
        }
    }
    Ok(())
}

/// A module's solve: in flight on the GPU, or done on the host (capture aside: RTN, the CPU
/// reference solver).
enum ModuleSolve<'a> {
    Gpu(crate::quant::gpu::Solving<'a>),
    Done(Box<QuantResult>),
}

/// The error of module `m` of `layer`, with a hint where tensor cores can explain non-finite
/// values (f16 operands overflow beyond ±65504 to infinities, which reach H's diagonal first).
fn module_error(layer: usize, m: ModuleKind, tc: bool, message: String) -> PipelineError {
    PipelineError::Module {
        layer,
        module: m.short_name().into(),
        message: if tc && message.contains("non-finite") {
            format!(
                "{message} (tensor cores were on: an activation beyond f16's range, ±65504, gives \
                 this; run without --tensor-cores)"
            )
        } else {
            message
        },
    }
}

/// Starts solving one module from the group statistics and installs its `Q` in the
/// quantized-stream layer (a GPU solve's Q is final unless [`finish_module`] falls back to RTN).
#[allow(clippy::too_many_arguments)]
fn submit_module<'a>(
    ctx: &GpuContext,
    cfg: &'a PipelineConfig,
    lw: &'a LayerWeights,
    layers: &mut Layers,
    m: ModuleKind,
    stats: &'a Stats,
    layer: usize,
    shared: &mut crate::quant::gpu::SharedFactor,
    speculate: bool,
) -> Result<ModuleSolve<'a>, PipelineError> {
    let lin = lw.linear(m);
    let (rows, cols) = (lin.out_features, lin.in_features);
    if cfg.capture == Some((layer, m)) {
        let read = |b: &Option<GpuMatrix>| -> Result<Vec<f32>, PipelineError> {
            match b {
                Some(b) => Ok(ctx.read_matrix(b)?),
                None => Ok(vec![0.0; cols * cols]),
            }
        };
        return Err(PipelineError::Captured(Box::new(super::CapturedModule {
            layer,
            module: m,
            rows,
            cols,
            nsamples: stats.nsamples,
            w: lin.weight.clone(),
            h: read(&stats.h)?,
            d: read(&stats.d)?,
            e: read(&stats.e)?,
        })));
    }
    let tc = layers.q.uses_tensor_cores();
    let module_err = |message: String| module_error(layer, m, tc, message);
    let qc = &cfg.quant;
    let result = if qc.method != Method::Rtn
        && let Some(stats_h) = &stats.h
    {
        match cfg.solver {
            Solver::Gpu => {
                // The quantized-stream layer still holds this module's original W (it becomes Q
                // right below): the solve copies it on the GPU instead of uploading it again.
                let s = crate::quant::gpu::submit_gpu_resident(
                    ctx,
                    &lin.weight,
                    Some(layers.q.linear(m)),
                    rows,
                    cols,
                    stats_h,
                    stats.d.as_ref(),
                    qc,
                    Some(shared),
                    crate::quant::gpu::SolveFlags {
                        speculate,
                        // GPTAQ's A on the tensor cores too: the plan with tensor cores counts
                        // its f16 copies (plan::solve_temp_bytes).
                        split_f16: tc && layers.split_f16,
                    },
                )
                .map_err(|e| module_err(e.to_string()))?;
                // Q goes straight from the solve's buffer into the quantized-stream layer, and the
                // buffer is let go (the next module's solve runs before this one is finished).
                let mut s = s;
                if let Some(q) = s.q() {
                    let mut rec = ctx.recorder();
                    layers.q.set_linear_gpu(&mut rec, m, q)?;
                    rec.submit();
                }
                s.release_q();
                return Ok(ModuleSolve::Gpu(s));
            }
            Solver::CpuReference => {
                let h = ctx.read_matrix(stats_h)?;
                // GPTQ's D (kept for its metrics only) is not the solve's.
                let d = match (&stats.d, qc.method) {
                    (Some(d), Method::Gptaq { .. }) => Some(ctx.read_matrix(d)?),
                    _ => None,
                };
                crate::quant::reference::quantize_reference(
                    &lin.weight,
                    rows,
                    cols,
                    &h,
                    d.as_deref(),
                    qc,
                )
                .map_err(|e| module_err(e.to_string()))?
            }
        }
    } else {
        // RTN needs no statistics (Stats::new allocates none for it).
        crate::quant::quantizer::rtn_quantize(&lin.weight, rows, cols, qc)
            .map_err(|e| module_err(e.to_string()))?
    };
    layers.q.set_linear(ctx, m, &result.q)?;
    // Like the GPU solve's results, only the codes stay on the host (QuantResult::weights).
    let mut result = result;
    result.q = Vec::new();
    Ok(ModuleSolve::Done(Box::new(result)))
}

/// Waits for a module's solve ([`submit_module`]): its result, and the codes still on their way
/// back. Where the finish replaced Q (the GPU sweep met non-finite values and fell back to RTN, or
/// the speculative factor failed and the module was solved again), the new Q replaces the one
/// installed at submission.
fn finish_module(
    ctx: &GpuContext,
    layers: &mut Layers,
    m: ModuleKind,
    s: ModuleSolve<'_>,
    layer: usize,
    prof: &mut Profile,
) -> Result<(QuantResult, Option<PendingCodes>), PipelineError> {
    let solving = match s {
        ModuleSolve::Done(r) => return Ok((*r, None)),
        ModuleSolve::Gpu(s) => s,
    };
    let submitted = matches!(solving, crate::quant::gpu::Solving::Submitted(_));
    let tc = layers.q.uses_tensor_cores();
    let s = solving
        .finish(ctx)
        .map_err(|e| module_error(layer, m, tc, e.to_string()))?;
    for (phase, secs) in &s.phases {
        prof.detail(&format!("solve/{phase}"), *secs);
    }
    // A submitted solve's Q was installed and released at submission; one that comes back is a
    // replacement (an RTN fallback, or a solve again after a failed speculative factor).
    if let (true, Some(q)) = (submitted, &s.q) {
        let mut rec = ctx.recorder();
        layers.q.set_linear_gpu(&mut rec, m, q)?;
        rec.submit();
    }
    Ok((s.result, s.codes))
}

/// The solved modules, some of whose codes may still be on their way back from the GPU
/// ([`PendingCodes`]: with `overlap_codes`, finished when the next group is solved, after the
/// stage between has been queued, and at the end of the run; else at the end of their group's
/// solve).
#[derive(Default)]
struct Results {
    done: BTreeMap<(usize, ModuleKind), (QuantResult, Option<PendingCodes>)>,
    overlap_codes: bool,
}

impl Results {
    fn insert(&mut self, key: (usize, ModuleKind), r: QuantResult, codes: Option<PendingCodes>) {
        self.done.insert(key, (r, codes));
    }

    /// After a group's solve: its codes are finished now unless they overlap the next stage.
    fn group_solved(&mut self, ctx: &GpuContext) -> Result<(), PipelineError> {
        if self.overlap_codes {
            Ok(())
        } else {
            self.finish_codes(ctx)
        }
    }

    fn finish_codes(&mut self, ctx: &GpuContext) -> Result<(), PipelineError> {
        for (r, codes) in self.done.values_mut() {
            if let Some(c) = codes.take() {
                c.finish(ctx, r)?;
            }
        }
        Ok(())
    }

    /// Every module's result, its codes finished.
    fn finish(
        mut self,
        ctx: &GpuContext,
    ) -> Result<BTreeMap<(usize, ModuleKind), QuantResult>, PipelineError> {
        self.finish_codes(ctx)?;
        Ok(self.done.into_iter().map(|(k, (r, _))| (k, r)).collect())
    }
}
