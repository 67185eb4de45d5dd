//! The memory plan, decided before a run starts from the model shape, the calibration size and
//! the device: how many sequences go through the GPU at once, and whether the activation streams
//! stay on the GPU or spill to host RAM. A run that cannot fit is refused up front, with numbers.

use crate::model::{ModelConfig, ModuleKind};

use super::events::MemoryPlan;
use super::stream::{Layout, Placement, StreamDType};

/// What the planner needs to know about the run.
#[derive(Clone, Debug)]
pub struct PlanInput<'a> {
    pub config: &'a ModelConfig,
    pub nsamples: usize,
    pub seqlen: usize,
    /// A second (full-precision) stream runs in lock-step (GPTAQ, or metrics requested).
    pub fp_stream: bool,
    /// The run measures error metrics (which read each module's W and Q after its solve, or its
    /// outputs in the next stage; `gate_up_f32_released`).
    pub metrics: bool,
    /// n×n statistics accumulated per group: 1 (H: GPTQ), 2 (H and D: GPTAQ), 3 (H, D and E:
    /// a layer-lab capture).
    pub statistics: usize,
    /// The metrics take their quantization and cross terms from the statistics where that pays
    /// (pipeline::metrics): with one statistic (GPTQ), the groups for which [`metric_d_pays`]
    /// then accumulate a `D` as well. Only with `fp_stream`.
    pub metric_moments: bool,
    /// GPU memory the run may use.
    pub gpu_budget_bytes: u64,
    /// Largest single buffer the adapter allows.
    pub max_buffer_bytes: u64,
    /// Host element type when streams spill.
    pub host_dtype: StreamDType,
    /// Force streams to the host even when they would fit (for testing the spill path).
    pub force_host: bool,
    /// Spend no spare memory on speed: no `MemoryPlan::act_streams`, no `MemoryPlan::weights_ahead`.
    pub lean_memory: bool,
    /// The linears, attention and statistics run on tensor cores (the adapter grants them and the
    /// run asked for them): f16 copies of each stream's weights, one scratch the streams share (an
    /// f16 activation chunk and the attention's), and the statistics' f16 operands per token.
    pub tensor_cores: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(
        "the run does not fit in the GPU memory budget: it needs at least {need_mib} MiB ({detail}) but the budget is \
         {budget_mib} MiB; raise --gpu-memory or use fewer / shorter calibration sequences"
    )]
    Budget {
        need_mib: u64,
        budget_mib: u64,
        detail: String,
    },
    /// One buffer the run needs in a single binding is larger than the adapter's largest storage
    /// binding (a module's weight; the n×n statistics are split into row panels, gpu/matrix.rs, so
    /// only one 128-row panel of them must fit). Refused before any work, instead of failing at
    /// that layer's allocation.
    #[error(
        "{what} needs one {need_mib} MiB buffer but this adapter binds at most {limit_mib} MiB per \
         buffer; models this wide are not supported on this adapter"
    )]
    Binding {
        what: String,
        need_mib: u64,
        limit_mib: u64,
    },
}

const F32: u64 = 4;

/// Most of the budget kept back for what the driver and its allocator hold beyond our own
/// buffers (the plan and `peak_gpu_bytes` count only those): on the H200's Vulkan driver
/// nvidia-smi showed up to 2 GiB more than the app's count in an 8B-shaped GPTAQ run
/// (BENCHMARKS.md, 2026-12-05). A quarter of the budget, at most this.
const DRIVER_RESERVE_MAX: u64 = 2 << 30;

/// The part of a `budget` our own buffers may hold: the rest is kept for the driver
/// (`DRIVER_RESERVE_MAX`). Plans fit in it, and the driver's buffer pool keeps freed buffers
/// for reuse up to it.
pub fn usable_budget(budget: u64) -> u64 {
    budget - (budget / 4).min(DRIVER_RESERVE_MAX)
}

/// Bytes of scratch activations per token (both streams included when `fp_stream`; GPTAQ's
/// `X_fp − X_q` of the widest input with `asymmetry`).
pub(crate) fn scratch_per_token(c: &ModelConfig, fp_stream: bool, asymmetry: bool) -> u64 {
    let (h, i, qd, kvd) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.q_dim() as u64,
        c.kv_dim() as u64,
    );
    // working hidden, normed input, q, k, v, attention output, gate, up, act, module-output temp
    let per_stream = (3 * h + 2 * qd + 2 * kvd + 3 * i + h.max(i)) * F32
        // f16 host streams: the packed staging buffers of the hidden and attention-output streams
        // (2 bytes per element, pipeline/stream.rs). Counted whatever the placement: the plan
        // decides the placement from these numbers, and it is ~5% of the rest for an 8B model.
        + (h + qd) * 2;
    // metrics: Y_q, Y_fp, Y_w for the widest module output
    let metrics = 3 * h.max(i).max(qd) * F32;
    let diff = if asymmetry { h.max(i).max(qd) * F32 } else { 0 };
    per_stream * if fp_stream { 2 } else { 1 } + metrics + diff
}

/// The true-sequential groups' modules, in the order the driver solves them: q/k/v (stage A),
/// o (B), gate/up (C), down (D).
const GROUP_MODULES: [&[ModuleKind]; 4] = [
    &[ModuleKind::Q, ModuleKind::K, ModuleKind::V],
    &[ModuleKind::O],
    &[ModuleKind::Gate, ModuleKind::Up],
    &[ModuleKind::Down],
];

/// A group's input width n and the output rows of all its modules.
fn group_shape(c: &ModelConfig, mods: &[ModuleKind]) -> (usize, usize) {
    let n = mods.first().map_or(0, |&m| c.linear_shape(m).1);
    (n, mods.iter().map(|&m| c.linear_shape(m).0).sum())
}

/// The true-sequential groups of a layer as (input width n, output rows of all its modules):
/// q/k/v, o, gate/up, down.
pub(crate) fn groups(c: &ModelConfig) -> [(usize, usize); 4] {
    GROUP_MODULES.map(|mods| group_shape(c, mods))
}

/// Whether a GPTQ group's metrics should come from the statistics: its `D` costs `2·T·n²` flops
/// to accumulate, the `Y_w` products it replaces `2·T·n·rows` (rows summed over the group's
/// modules). On Llama-3-8B that is q/k/v (4096 < 6144) and gate/up (4096 < 28672), not o (a tie)
/// and not down (14336 > 4096). GPTAQ accumulates `D` anyway and always uses it.
pub fn metric_d_pays(n: usize, rows: usize) -> bool {
    n < rows
}

/// Statistics per group (H, D, E) as the driver allocates them (driver::Stats::new).
fn group_statistics(input: &PlanInput<'_>, n: usize, rows: usize) -> usize {
    let s = input.statistics.max(1);
    if s == 1 && input.fp_stream && input.metric_moments && metric_d_pays(n, rows) {
        2
    } else {
        s
    }
}

/// One layer's linear weights in f32.
fn layer_weight_bytes(c: &ModelConfig) -> u64 {
    let (h, i, qd, kvd) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.q_dim() as u64,
        c.kv_dim() as u64,
    );
    (h * qd + 2 * h * kvd + qd * h + 3 * h * i) * F32
}

/// The tensor-core forward's scratch, shared by a layer's two streams
/// (`forward::GpuLayer::enable_tensor_cores`): one f16 chunk of `TC_CHUNK_TOKENS` activation rows
/// of the widest input (an upper bound: smaller batches get a smaller chunk) and the attention's
/// f16 q/k/v, scores and probabilities of one query chunk of one sequence
/// (`forward::AttnTc::bytes`; the plan adds the further sequences the attention takes at once).
/// Each stream's f16 weight copies come on top (half of `layer_weight_bytes`).
fn tensor_core_scratch_bytes(c: &ModelConfig, seqlen: usize) -> u64 {
    let widest = c.hidden_size.max(c.intermediate_size).max(c.q_dim()) as u64;
    crate::forward::TC_CHUNK_TOKENS as u64 * widest * 2 + attention_scratch_bytes(c, seqlen, 1)
}

/// The tensor-core attention's scratch for `seqs` sequences at a time.
fn attention_scratch_bytes(c: &ModelConfig, seqlen: usize, seqs: usize) -> u64 {
    crate::forward::AttnTc::bytes(&crate::forward::LayerDims::of(c).attn_shape(seqs, seqlen))
}

/// Bytes of one n×n f32 matrix.
fn nxn_bytes(n: usize) -> u64 {
    (n as u64).pow(2) * F32
}

/// The solve's n×n-sized temporaries next to a group's statistics (n: its input width;
/// quant/factor.rs, quant/gpu.rs): while factoring K (later U) and M (L, then L⁻¹) plus a 128-row
/// scratch; GPTAQ's P (or, deferred, its first factor A) then lives in the permuted D next to U,
/// with a block scratch of n × n/16 floats or min(n × n, 64 MiB), whichever is larger
/// (`quant::gpu::p_scratch_floats`). Two n×n matrices and the larger scratch. With `split` (GPTAQ's
/// A on the tensor cores, [`MemoryPlan::split_f16`]), A is computed from split-f16 copies of the
/// permuted D and U instead (`quant::gpu::SolveFlags::split_f16`): four n × n f16 matrices, as much
/// as two f32 ones, in the block scratch's place (the whole P's second product allocates that
/// scratch only once they are gone).
fn solve_temp_bytes(n: usize, asymmetry: bool, split: bool, max_buffer_bytes: u64) -> u64 {
    let factor_scratch = (crate::quant::factor::SCRATCH_ROWS * n) as u64 * F32;
    let p_scratch = if asymmetry {
        (crate::quant::gpu::p_scratch_floats(n, max_buffer_bytes) as u64 * F32).max(if split {
            2 * nxn_bytes(n)
        } else {
            0
        })
    } else {
        0
    };
    2 * nxn_bytes(n) + factor_scratch.max(p_scratch)
}

/// The GPU solve's per-module buffers for the largest of a group's modules `mods` (rows·cols): the
/// working W (f32), the integer codes (1 byte each, 4 per u32 word, rows padded to whole words:
/// rows·⌈cols/4⌉·4 bytes) and the final Q (f32), plus with `asymmetry` GPTAQ's pending terms
/// (rows·cols f32) and P's and A's diagonal blocks (2 · n × 128 at the default block size) — the
/// deferred P (quant::gpu's `PForm`), as much as the whole P's `[U; P]` staging (2·128 × n) that
/// replaces them where a group spans blocks; and the error buffer of the blocks awaiting one
/// cross-block update (`quant::gpu::lazy_blocks`): rows × L·128, twice with GPTAQ's −Q and one
/// more block for the column loss of the fused sweep (quant::gpu's `Sweep::fused`; 66 MiB for
/// gate/up's 14336 rows at L = 4). With `split` GPTAQ's pending flushes add their split-f16
/// operands (`quant::flush::FlushSplit`: 3·L·128 × (rows + cols) halves, 54 MiB for gate/up at
/// L = 4).
fn solver_bytes(c: &ModelConfig, mods: &[ModuleKind], asymmetry: bool, split: bool) -> u64 {
    let shapes: Vec<(u64, u64)> = mods
        .iter()
        .map(|&m| {
            let (r, k) = c.linear_shape(m);
            (r as u64, k as u64)
        })
        .collect();
    let max_of = |f: &dyn Fn(u64, u64) -> u64| shapes.iter().map(|&(r, k)| f(r, k)).max();
    let n = shapes.first().map_or(0, |s| s.1);
    let codes = max_of(&|r, k| r * k.div_ceil(4) * 4).unwrap_or(0);
    let largest = max_of(&|r, k| r * k).unwrap_or(0);
    let rows = max_of(&|r, _| r).unwrap_or(0);
    let gptaq = if asymmetry { largest + 2 * 128 * n } else { 0 };
    let lazy = crate::quant::gpu::lazy_blocks() as u64;
    let errors = rows
        * if asymmetry {
            2 * lazy * 128 + 128
        } else {
            lazy * 128
        };
    let k = crate::quant::gpu::lazy_blocks() * 128;
    let flush = if asymmetry && split {
        max_of(&|r, c| crate::quant::flush::FlushSplit::bytes(r as usize, c as usize, k))
            .unwrap_or(0)
    } else {
        0
    };
    (2 * largest + gptaq + errors) * F32 + codes + flush
}

/// The temporaries of the metrics' moments (pipeline::metrics::moments) for the largest of a
/// group's modules: three row-chunk buffers and the column partials. They exist after a group's
/// solve, when U, P and the solver's working buffers are gone but H and D are not.
fn moment_bytes(c: &ModelConfig, mods: &[ModuleKind]) -> u64 {
    let chunk = super::metrics::MOMENT_CHUNK_FLOATS as u64;
    mods.iter()
        .map(|&m| {
            let (rows, n) = c.linear_shape(m);
            let (rows, n) = (rows as u64, n as u64);
            let rc = (chunk / n.max(1)).clamp(1, rows.max(1));
            let chunks = rows.div_ceil(rc);
            let partials =
                2 * chunks * crate::gpu::ops::col_dot_partials_len(rc as usize, n as usize) as u64;
            (3 * rc * n + partials) * F32
        })
        .max()
        .unwrap_or(0)
}

/// Where [`plan`] put the streams (its `streams_on_gpu` and `stream_dtype`, written below), for
/// a run whose host streams would be `host_dtype`.
pub(crate) fn placement(p: &MemoryPlan, host_dtype: StreamDType) -> Layout {
    match (p.streams_on_gpu, p.stream_dtype.as_str()) {
        (true, "f16") => Placement::GpuF16.into(),
        (true, _) => Placement::Gpu.into(),
        (false, _) => Layout::spilled(host_dtype, p.resident_batches),
    }
}

/// The plan of RTN without metrics: it reads no activations, so the driver runs no calibration
/// forward, keeps no statistics and does no GPU work (`driver::quantize_rtn_direct`).
pub fn rtn_direct(gpu_budget_bytes: u64) -> MemoryPlan {
    MemoryPlan {
        batch_sequences: 0,
        streams_on_gpu: false,
        act_streams: false,
        act_f16: false,
        weights_ahead: false,
        attention_sequences: 1,
        split_f16: false,
        gate_up_f32_released: false,
        fp_down_in_d: false,
        resident_batches: 0,
        stream_dtype: "none".into(),
        gpu_bytes_estimate: 0,
        host_bytes_estimate: 0,
        gpu_budget_bytes,
        breakdown: vec![
            "RTN without metrics: no calibration forward and no statistics; weights are rounded \
             on the host, layer by layer"
                .into(),
        ],
    }
}

/// [`plan`], where tensor cores are a speed option rather than a requirement: when their f16
/// copies and scratch do not fit the budget, the plan without them, together with the refusal
/// (the driver then runs the f32 kernels and warns; the app shows that plan). `None` when
/// `input.tensor_cores` is off or they fit.
pub fn plan_or_without_tensor_cores(
    input: &PlanInput<'_>,
) -> Result<(MemoryPlan, Option<PlanError>), PlanError> {
    match plan(input) {
        Err(e @ PlanError::Budget { .. }) if input.tensor_cores => {
            let without = PlanInput {
                tensor_cores: false,
                ..*input
            };
            Ok((plan(&without)?, Some(e)))
        }
        other => other.map(|p| (p, None)),
    }
}

/// The smallest budget, in MiB, at which `input`'s run fits (its own `gpu_budget_bytes` is
/// ignored): `inspect`'s answer to "which card does this need". Whether a plan fits only grows
/// with the budget (everything but the binding stretch adapts: streams spill, batches shrink), so
/// this is the budget [`PlanError::Budget`] names, checked down to the MiB. Other refusals
/// (a buffer beyond the adapter's binding limit) are returned as they are.
pub fn smallest_budget_mib(input: &PlanInput<'_>) -> Result<u64, PlanError> {
    let fits = |mib: u64| {
        plan(&PlanInput {
            gpu_budget_bytes: mib << 20,
            ..*input
        })
    };
    let named = match fits(0) {
        Ok(_) => return Ok(0),
        Err(PlanError::Budget { need_mib, .. }) => need_mib,
        Err(e) => return Err(e),
    };
    // The named budget is rounded to whole MiB; search a little above and below it.
    let (mut lo, mut hi) = (named.saturating_sub(16), named + 16);
    fits(hi)?;
    while fits(lo).is_ok() && lo > 0 {
        lo = lo.saturating_sub(1024);
    }
    // fits(lo) fails (or lo is 0), fits(hi) holds.
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid).is_ok() {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

/// The plan. The per-batch activations are released while a group is solved
/// (pipeline/driver.rs), so a layer's peak is the largest, over its two stretches of stages
/// (`Stretch`), of the larger of two moments, each next to the stretch's layer weights (and the
/// streams, when they are on the GPU): accumulating (statistics + one batch of activations) and
/// solving (statistics + the solve's temporaries + its per-module buffers).
///
/// With tensor cores, GPTAQ's A on split-f16 copies ([`MemoryPlan::split_f16`]) is a speed option
/// inside the tensor-core plan: where its four n × n f16 copies do not fit, the plan computes A
/// with the f32 GEMMs instead (12–16 ms more per 4096 × 14336 solve on an H100, BENCHMARKS.md
/// session 32) and keeps the tensor-core forward and statistics, which save seconds per layer.
pub fn plan(input: &PlanInput<'_>) -> Result<MemoryPlan, PlanError> {
    if input.tensor_cores && input.statistics >= 2 {
        match plan_with(input, true) {
            Err(PlanError::Budget { .. }) => plan_with(input, false),
            other => other,
        }
    } else {
        plan_with(input, false)
    }
}

/// Whether a tensor-core run frees gate/up's f32 weights in both streams as soon as they are
/// solved (pipeline/driver.rs, before down_proj's statistics, where an 8B layer's peak lies):
/// from then on their forward reads only the f16 copies, so the f32 ones (0.9 GiB for Llama-3-8B's
/// two streams) would only sit there. That holds where
/// - both modules have f16 copies ([`crate::forward::tc_weight_tiles`]) and every batch's rows
///   tile the tensor-core kernels (whole sequences of a multiple of
///   [`crate::forward::TC_ROW_TILE`] tokens), so no row falls back to the f32 GEMM;
/// - nothing measures them from W afterwards: metrics off, or their metrics from H and D (their
///   group has a D and no bias: pipeline::metrics, "From the statistics"), not `--metric-products`.
pub(crate) fn gate_up_f32_released(input: &PlanInput<'_>) -> bool {
    let c = input.config;
    let mods = GROUP_MODULES[2];
    let (n, rows) = group_shape(c, mods);
    input.tensor_cores
        && input.seqlen.is_multiple_of(crate::forward::TC_ROW_TILE)
        && mods.iter().all(|&m| {
            let (r, k) = c.linear_shape(m);
            crate::forward::tc_weight_tiles(r, k)
        })
        && (!input.metrics
            || (input.metric_moments && !c.mlp_bias && group_statistics(input, n, rows) >= 2))
}

/// What one stretch of a layer's stages holds besides the streams and the batch's activations:
/// stages A–C (q/k/v, o, gate/up: every linear's weights, inputs of the hidden or attention width)
/// and stages D–E (down_proj: the driver has freed q/k/v/o's weights, and in tensor-core runs
/// perhaps gate/up's f32 ones, [`gate_up_f32_released`]; the input of the intermediate width).
struct Stretch {
    /// "stages A–C" or "stages D–E", for the breakdown.
    name: &'static str,
    weights: u64,
    /// The weights left while its groups solve: fewer in stages D–E where the driver frees
    /// weights no later stage reads before down_proj's solve ([`late_solve_weights`]).
    solve_weights: u64,
    /// The largest group's statistics (GPTQ with metrics may keep a D in its narrower groups).
    statistics: u64,
    /// The largest group's statistics, solve temporaries and solver buffers (or its metrics'
    /// moments, after the solve).
    solve: u64,
}

impl Stretch {
    fn of(
        input: &PlanInput<'_>,
        name: &'static str,
        groups: &[&[ModuleKind]],
        weights: u64,
        split: bool,
    ) -> Self {
        let c = input.config;
        let asymmetry = input.statistics >= 2;
        let (mut statistics, mut solve) = (0, 0);
        for &mods in groups {
            let (n, rows) = group_shape(c, mods);
            let s = group_statistics(input, n, rows) as u64;
            let stats = s * nxn_bytes(n);
            let temps = solve_temp_bytes(n, asymmetry, split, input.max_buffer_bytes)
                + solver_bytes(c, mods, asymmetry, split);
            // A capture's E is not needed by the solve, but it is alive while the group solves.
            let moments = if s >= 2 && input.fp_stream && input.metric_moments {
                moment_bytes(c, mods)
            } else {
                0
            };
            statistics = statistics.max(stats);
            solve = solve.max(stats + temps.max(moments));
        }
        Self {
            name,
            weights,
            solve_weights: weights,
            statistics,
            solve,
        }
    }

    /// The stretch's peak next to `fixed` more bytes (streams, the attention's further sequences)
    /// with activations of `batch_bytes`: accumulating with all its weights, or solving with
    /// those left then.
    fn peak(&self, fixed: u64, batch_bytes: u64) -> u64 {
        (self.weights + fixed + self.statistics + batch_bytes)
            .max(self.solve_weights + fixed + self.solve)
    }
}

/// What a stretch's layer weights are made of ([`stretch_weights`], [`late_solve_weights`]).
struct WeightParts {
    streams: u64,
    /// One tensor-core scratch (with tensor cores) and a margin the planner has always kept (two
    /// sevenths of one layer's f32 weights).
    base: u64,
    /// One stream's layer, f16 copies included with tensor cores.
    layer: u64,
    /// One stream's MLP in stages D–E: less gate/up's f32 weights where `released`.
    mlp: u64,
    /// One stream's down_proj, f16 copy included.
    down: u64,
}

fn weight_parts(input: &PlanInput<'_>, released: bool) -> WeightParts {
    let c = input.config;
    let tc = input.tensor_cores;
    let with_f16 = |f32_bytes: u64| f32_bytes + if tc { f32_bytes / 2 } else { 0 };
    let scratch = if tc {
        tensor_core_scratch_bytes(c, input.seqlen)
    } else {
        0
    };
    let mlp = 3 * (c.hidden_size as u64) * (c.intermediate_size as u64) * F32;
    let freed = if released { mlp / 3 * 2 } else { 0 };
    WeightParts {
        streams: if input.fp_stream { 2 } else { 1 },
        base: scratch + layer_weight_bytes(c) / 7 * 2,
        layer: with_f16(layer_weight_bytes(c)),
        mlp: with_f16(mlp) - freed,
        down: with_f16(mlp / 3),
    }
}

/// The layer weights each [`Stretch`] holds: every stream's f32 weights (and f16 copies, with
/// tensor cores), one tensor-core scratch, and the planner's margin ([`WeightParts`]); in stages
/// D–E only the MLP's, less gate/up's f32 ones where `released` ([`gate_up_f32_released`]).
fn stretch_weights(input: &PlanInput<'_>, released: bool) -> [u64; 2] {
    let w = weight_parts(input, released);
    [w.base + w.layer * w.streams, w.base + w.mlp * w.streams]
}

/// The most sequences per batch: 16 (larger batches bring no speed, their GEMMs are already
/// large, but cost memory); `GPTAQ_MAX_BATCH=N` caps it lower for A/B runs of batch size against
/// resident host batches (BENCHMARKS.md, session 44), where a smaller batch leaves the memory it
/// would take to [`MemoryPlan::resident_batches`].
pub(crate) fn max_batch() -> usize {
    std::env::var("GPTAQ_MAX_BATCH")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n >= 1)
        .map_or(16, |n| n.min(16))
}

/// Whether GPTAQ's FP stream may run its down_proj in stage D ([`fp_down_in_d`]): the default;
/// `GPTAQ_FP_DOWN_EARLY=0` keeps it in stage E, for A/B runs.
pub(crate) fn fp_down_early() -> bool {
    std::env::var("GPTAQ_FP_DOWN_EARLY").map_or(true, |v| v != "0")
}

/// Whether GPTAQ's FP stream runs its down_proj in stage D (`MemoryPlan::fp_down_in_d`): where
/// act is not kept (stage E would recompute the FP stream's gate/up only to feed it) and no metric
/// needs its output beside the quantized one's, and unless `GPTAQ_FP_DOWN_EARLY=0`.
fn fp_down_in_d(input: &PlanInput<'_>, act_kept: bool) -> bool {
    input.fp_stream && !act_kept && !input.metrics && fp_down_early()
}

/// Stage D–E's weights while down_proj solves, given whether the MLP activations are kept
/// (`act_kept`). The driver frees before that solve what no later stage reads:
/// - with act kept, stage E does not run gate/up again: both streams' gate/up go (f32 and f16);
/// - otherwise, without metrics, GPTAQ's FP stream runs its down_proj in stage D
///   ([`fp_down_early`]) and its whole MLP goes; the quantized stream keeps its MLP for stage E.
///
/// Stage E runs on what is left, next to the next layer's upload.
fn late_solve_weights(input: &PlanInput<'_>, released: bool, act_kept: bool) -> u64 {
    let w = weight_parts(input, released);
    if act_kept {
        w.base + w.down * w.streams
    } else if fp_down_in_d(input, false) {
        w.base + w.mlp
    } else {
        w.base + w.mlp * w.streams
    }
}

/// [`plan`] with or without GPTAQ's split-f16 A (`split`; only with tensor cores).
fn plan_with(input: &PlanInput<'_>, split: bool) -> Result<MemoryPlan, PlanError> {
    let c = input.config;
    let streams = if input.fp_stream { 2 } else { 1 };
    // With tensor cores each stream's layer also holds its f16 copy, next to one scratch for both
    // streams and every layer ([`stretch_weights`]; the next layer's upload makes only its f16
    // copy).
    let f16_weights = if input.tensor_cores {
        layer_weight_bytes(c) / 2
    } else {
        0
    };
    let stream_weights = layer_weight_bytes(c) + f16_weights;
    let released = gate_up_f32_released(input);
    let [early, late] = stretch_weights(input, released);
    let mut stretches = [
        Stretch::of(input, "stages A–C", &GROUP_MODULES[..3], early, split),
        Stretch::of(input, "stages D–E", &GROUP_MODULES[3..], late, split),
    ];
    // Until the streams' placement says whether act is kept, the larger of the two cases.
    stretches[1].solve_weights =
        late_solve_weights(input, released, true).max(late_solve_weights(input, released, false));
    let statistics = stretches.iter().map(|s| s.statistics).max().unwrap_or(0);
    let with_d = groups(c)
        .iter()
        .any(|&(n, rows)| group_statistics(input, n, rows) >= 2);
    let budget = input.gpu_budget_bytes;
    let usable = usable_budget(budget);
    let reserve = budget - usable;
    // The tensor-core statistics cast X_q and X_fp − X_q to f16 for the whole batch
    // (driver::Stats::accumulate_tensor_cores): 2 × 2 bytes per token and input feature.
    let per_token = scratch_per_token(c, input.fp_stream, with_d)
        + if input.tensor_cores {
            4 * c.hidden_size.max(c.intermediate_size).max(c.q_dim()) as u64
        } else {
            0
        };
    let seq_scratch = per_token * input.seqlen as u64;
    // The widest module's W lives in one buffer (forward pass, solve); the n×n H, D, U and P are
    // row panels of whole 128-column blocks (gpu/matrix.rs), so one such panel must fit.
    let n = c.hidden_size.max(c.intermediate_size).max(c.q_dim()) as u64;
    let widest_w = (c.hidden_size as u64) * (c.intermediate_size as u64).max(c.q_dim() as u64);
    for (what, bytes) in [
        (
            format!("a 128-row panel of the {n}×{n} Hessian of the widest input"),
            128 * n * F32,
        ),
        ("the widest module's weight".to_string(), widest_w * F32),
    ] {
        if bytes > input.max_buffer_bytes {
            return Err(PlanError::Binding {
                what,
                need_mib: bytes.div_ceil(1 << 20),
                limit_mib: input.max_buffer_bytes >> 20,
            });
        }
    }
    // The stretch that needs the most with one sequence of activations.
    let binding = stretches
        .iter()
        .max_by_key(|s| s.peak(0, seq_scratch))
        .unwrap_or(&stretches[0]);
    let need = binding.peak(0, seq_scratch);
    if need > usable {
        return Err(PlanError::Budget {
            // The budget at which `need` fits next to its reserve.
            need_mib: if need >= 3 * DRIVER_RESERVE_MAX {
                need + DRIVER_RESERVE_MAX
            } else {
                need.div_ceil(3) * 4
            } >> 20,
            budget_mib: budget >> 20,
            detail: format!(
                "{}: layer weights {} MiB{}, then the larger of accumulating (statistics {} MiB \
                 + activations for one sequence {} MiB) and solving (statistics, factor and \
                 solver buffers {} MiB), with {} MiB of the budget kept for the driver",
                binding.name,
                binding.weights >> 20,
                if binding.solve_weights < binding.weights {
                    format!(" ({} MiB while solving)", binding.solve_weights >> 20)
                } else {
                    String::new()
                },
                binding.statistics >> 20,
                seq_scratch >> 20,
                binding.solve >> 20,
                reserve >> 20
            ),
        });
    }
    // Stream payload per sequence: hidden state plus the stored attention output, per stream.
    let per_seq = |width: usize| width as u64 * input.seqlen as u64 * F32 * streams;
    let stream_per_seq = per_seq(c.hidden_size + c.q_dim());
    let all_streams = stream_per_seq * input.nsamples as u64;
    // With the MLP activations kept, the hidden states live next to the larger of the attention
    // outputs (stages B–C) and the activations (stages D–E), these `act_div` times smaller than
    // f32 (2: packed f16).
    let with_act_at = |act_div: u64| {
        (per_seq(c.hidden_size) + per_seq(c.q_dim()).max(per_seq(c.intermediate_size) / act_div))
            * input.nsamples as u64
    };
    let with_act = with_act_at(1);
    // Widest single buffer per sequence (the intermediate activations) bounds the batch size too.
    let widest_per_seq =
        c.hidden_size.max(c.intermediate_size).max(c.q_dim()) as u64 * input.seqlen as u64 * F32;
    let max_by_buffer = (input.max_buffer_bytes / widest_per_seq.max(1)).max(1) as usize;

    // f32 streams on the GPU when they fit; with f16 requested, else packed f16 on the GPU (half
    // the bytes, the values host f16 streams would give, no host-link traffic); else the host.
    let f32_on_gpu = !input.force_host && need + all_streams <= usable;
    let f16_on_gpu = !f32_on_gpu
        && !input.force_host
        && input.host_dtype == StreamDType::F16
        && need + all_streams / 2 <= usable;
    let streams_on_gpu = f32_on_gpu || f16_on_gpu;
    // Keeping act saves two of a layer's seven GEMMs per stream, as long as it fits as the streams
    // do (a spill to the host would move 2·intermediate values per token over the link instead)
    // and costs no batch size (smaller batches would give back what the GEMMs saved).
    // Accumulating bounds the batch: each stretch's weights and statistics.
    let accumulating = stretches.each_ref().map(|s| s.weights + s.statistics);
    let batch_for = |streams_bytes: u64| -> usize {
        let by_memory = accumulating
            .iter()
            .map(|held| {
                let room = usable.saturating_sub(held + streams_bytes);
                (room / seq_scratch.max(1)).max(1) as usize
            })
            .min()
            .unwrap_or(1);
        // Batches beyond 16 sequences bring no speed (GEMMs are already large) but cost memory.
        by_memory
            .min(max_by_buffer)
            .min(input.nsamples.max(1))
            .min(max_batch())
    };
    let keep_act = |with_act: u64| {
        f32_on_gpu
            && !input.lean_memory
            && need + with_act <= usable
            && batch_for(with_act) >= batch_for(all_streams)
    };
    // With tensor cores the down_proj GEMM casts act to f16 as it reads it, so act kept as packed
    // f16 (half the bytes) gives it the same values: tried where f32 act does not fit (GPTAQ's
    // two streams of Llama-3-8B activations are 30 GiB in f32 at 128 × 2048 tokens).
    let with_act16 = with_act_at(2);
    let (act_streams, act_f16, with_act) = if keep_act(with_act) {
        (true, false, with_act)
    } else if input.tensor_cores && keep_act(with_act16) {
        (true, true, with_act16)
    } else {
        (false, false, with_act)
    };
    stretches[1].solve_weights = late_solve_weights(input, released, act_streams);
    let streams_fixed = match (f32_on_gpu, f16_on_gpu, act_streams) {
        (true, _, true) => with_act,
        (true, _, false) => all_streams,
        (false, true, _) => all_streams / 2,
        (false, false, _) => 0,
    };
    let batch = batch_for(streams_fixed);
    let batch_bytes = seq_scratch * batch as u64;
    // The tensor-core attention takes several of the batch's sequences at once
    // (forward::ATTN_SEQS) where their scratch fits next to everything else; the batch size
    // comes first.
    let attn_seq_bytes = if input.tensor_cores {
        attention_scratch_bytes(c, input.seqlen, 1)
    } else {
        0
    };
    let attention_sequences = if attn_seq_bytes == 0 {
        1
    } else {
        // Also no more than one storage binding holds the scores of.
        let by_binding = crate::forward::AttnTc::sequences_within(
            &crate::forward::LayerDims::of(c).attn_shape(1, input.seqlen),
            crate::forward::ATTN_SEQS,
            input.max_buffer_bytes,
        );
        (1..=by_binding.min(batch))
            .rev()
            .find(|&s| {
                stretches.iter().all(|st| {
                    st.peak(streams_fixed + (s as u64 - 1) * attn_seq_bytes, batch_bytes) <= usable
                })
            })
            .unwrap_or(1)
    };
    let attn_more = (attention_sequences as u64 - 1) * attn_seq_bytes;
    let fixed = streams_fixed + attn_more;
    let peak = stretches
        .iter()
        .map(|s| s.peak(fixed, batch_bytes))
        .max()
        .unwrap_or(0);
    // The next layer's weights are uploaded during this layer's last stage (down_proj's outputs),
    // when its statistics and solve buffers are gone: one more layer of f32 weights next to the
    // weights, streams and one batch of activations. Where that stays within the peak the plan
    // already has (the statistics or the solve need more) it costs no memory; otherwise it needs
    // room beyond that peak, which the estimate then includes.
    let ahead = stream_weights;
    let last_stage = stretches[1].solve_weights + fixed + batch_bytes + ahead;
    let weights_ahead = !input.lean_memory && c.num_layers > 1 && last_stage <= usable;
    let gpu_total = if weights_ahead {
        peak.max(last_stage)
    } else {
        peak
    };
    let host_dtype = input.host_dtype;
    // Host streams: the leading batches that the memory left over holds stay on the GPU, in the
    // host's element type (stream::Layout), so only the others cross the link — at 8 GiB an 8B
    // GPTAQ plan keeps 9–17 of its 128 sequences there (0.6–1.1 GiB; the streams of 128 × 2048
    // tokens are 8 GiB in f16). The batch size is chosen first: at 12 GiB one sequence per batch
    // would keep 57 sequences resident instead of batch 3's 18, and the H100 ran both plans'
    // 8B layer in 4.85 s (`GPTAQ_MAX_BATCH=1`, BENCHMARKS.md session 44), so the rule stays. A
    // speed use of spare memory: not with --lean-memory, and not with --host-streams, which asks
    // for every batch on the host.
    let host_per_seq = stream_per_seq / F32 * host_dtype.bytes() as u64;
    let resident_batches = if streams_on_gpu || input.force_host || input.lean_memory {
        0
    } else {
        let per_batch = host_per_seq * batch as u64;
        let spare = usable.saturating_sub(gpu_total);
        (spare / per_batch.max(1)).min(input.nsamples.div_ceil(batch) as u64) as usize
    };
    let resident_seqs = (resident_batches * batch).min(input.nsamples) as u64;
    let resident_bytes = host_per_seq * (resident_batches * batch) as u64;
    let gpu_total = gpu_total + resident_bytes;
    let host = if streams_on_gpu {
        0
    } else {
        host_per_seq * (input.nsamples as u64 - resident_seqs)
    };
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
    let split_f16 = split && input.tensor_cores && input.statistics >= 2;
    Ok(MemoryPlan {
        batch_sequences: batch,
        streams_on_gpu,
        act_streams,
        act_f16,
        weights_ahead,
        attention_sequences,
        split_f16,
        gate_up_f32_released: released,
        fp_down_in_d: fp_down_in_d(input, act_streams),
        resident_batches,
        stream_dtype: if f32_on_gpu {
            "f32".into()
        } else {
            host_dtype.name().into()
        },
        gpu_bytes_estimate: gpu_total,
        host_bytes_estimate: host,
        gpu_budget_bytes: budget,
        breakdown: vec![
            format!(
                "kept for the driver and its allocator (not in this estimate): {}",
                mib(reserve)
            ),
            format!(
                "layer weights (f32{}{}{}): {}; from down_proj's statistics on {} (q/k/v/o \
                 freed{}){}",
                if input.fp_stream {
                    ", FP + quantized copies"
                } else {
                    ""
                },
                if input.tensor_cores {
                    format!(
                        ", each with its f16 copy, and one tensor-core scratch for both \
                         (attention over {attention_sequences} sequence(s) at a time)"
                    )
                } else {
                    String::new()
                },
                if weights_ahead {
                    "; the next layer's are uploaded during the last stage (in the estimate)"
                } else {
                    ""
                },
                mib(stretches[0].weights + attn_more),
                mib(stretches[1].weights + attn_more),
                if released {
                    ", and gate/up's f32 copies once solved: their forward reads the f16 ones"
                } else {
                    ""
                },
                match stretches[1].solve_weights {
                    w if w == stretches[1].weights => String::new(),
                    w => format!(
                        "; from down_proj's solve on {} ({} freed: no later stage reads them)",
                        mib(w + attn_more),
                        if act_streams {
                            "gate/up"
                        } else {
                            "the FP stream's MLP"
                        }
                    ),
                }
            ),
            format!(
                "accumulating: statistics of the widest input {} + activations for {batch} \
                 sequence(s) of {} tokens {}",
                mib(statistics),
                input.seqlen,
                mib(batch_bytes)
            ),
            format!(
                "solving (activations released): statistics, factor and solver buffers of the \
                 widest module {}{}",
                mib(stretches.iter().map(|s| s.solve).max().unwrap_or(0)),
                match (input.tensor_cores && input.statistics >= 2, split_f16) {
                    (true, true) => "; GPTAQ's A on the tensor cores from split-f16 copies",
                    (true, false) => {
                        "; GPTAQ's A with the f32 GEMMs (its split-f16 copies for the tensor \
                         cores do not fit)"
                    }
                    _ => "",
                }
            ),
            format!(
                "{} stream(s) of {} × {} tokens: {} on the {}{}",
                streams,
                input.nsamples,
                input.seqlen,
                if streams_on_gpu {
                    mib(streams_fixed)
                } else {
                    mib(host)
                },
                match (f32_on_gpu, f16_on_gpu) {
                    (true, _) => "GPU".to_string(),
                    (false, true) => "GPU (packed f16)".to_string(),
                    (false, false) if resident_batches > 0 => format!(
                        "host ({}), the other {resident_seqs} sequence(s) on the GPU in the \
                         memory left ({}; the first {resident_batches} batch(es))",
                        host_dtype.name(),
                        mib(resident_bytes)
                    ),
                    (false, false) => format!("host ({})", host_dtype.name()),
                },
                match (act_streams, act_f16) {
                    (true, false) => " (MLP activations kept from stage D to E, not recomputed)",
                    (true, true) => {
                        " (MLP activations kept from stage D to E as packed f16, not recomputed)"
                    }
                    _ => "",
                }
            ),
        ],
    })
}

/// Llama-3-8B's shape (hidden 4096, intermediate 14336, 32 heads, 8 KV heads, 32 layers), the
/// shape issue 10 plans for (the plan's and `inspect`'s tests).
#[cfg(test)]
pub(crate) fn llama3_8b_config() -> Result<ModelConfig, crate::model::config::ConfigError> {
    ModelConfig::from_json_str(
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
            "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
            "tie_word_embeddings": false}"#,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(c: &ModelConfig, budget_gib: u64, dtype: StreamDType) -> PlanInput<'_> {
        PlanInput {
            config: c,
            nsamples: 128,
            seqlen: 2048,
            fp_stream: true,
            metrics: true,
            statistics: 2,
            metric_moments: true,
            gpu_budget_bytes: budget_gib << 30,
            max_buffer_bytes: 4 << 30,
            host_dtype: dtype,
            force_host: false,
            lean_memory: false,
            tensor_cores: false,
        }
    }

    /// Issue 10's memory target as the planner sees it: GPTAQ (two streams) on a Llama-3-8B shape
    /// with 128 × 2048 calibration tokens fits an 8 GiB card with f16 host streams. The numbers
    /// asserted are the planner's own accounting (weights, then the larger of statistics + one
    /// sequence of activations and statistics + two n×n solve matrices + solver buffers, with 2 GiB
    /// kept for the driver), not a measurement; BENCHMARKS.md records measured peaks.
    #[test]
    fn llama3_8b_gptaq_fits_8_gib_with_host_streams() -> Result<(), Box<dyn std::error::Error>> {
        let c = llama3_8b_config()?;
        let p = plan(&input(&c, 8, StreamDType::F16))?;
        assert!(
            !p.streams_on_gpu,
            "two 128×2048×(4096+4096) f32 streams cannot be on the GPU"
        );
        assert_eq!(p.stream_dtype, "f16");
        // One 2048-token sequence per batch: a second one (1.7 GiB) would not fit next to the
        // 2 GiB kept for the driver.
        assert_eq!(p.batch_sequences, 1, "{:?}", p.breakdown);
        assert!(
            p.gpu_bytes_estimate <= 6 << 30,
            "estimate {} MiB > 6144 MiB (8 GiB less the driver reserve): {:?}",
            p.gpu_bytes_estimate >> 20,
            p.breakdown
        );
        // Two streams of 128 × 2048 × (hidden + attention output) in f16 on the host, less the
        // sequences kept on the GPU in the memory left (host_streams_keep_their_first_batches…).
        let resident = p.resident_batches as u64;
        assert!(resident > 0, "{:?}", p.breakdown);
        assert_eq!(
            p.host_bytes_estimate,
            2 * (128 - resident) * 2048 * (4096 + 4096) * 2
        );
        // Solving down_proj (n = 14336): H and D, the factor's two n×n matrices (K/U and M, then
        // U and P in D's permuted copy) and P's block scratch, its 64 MiB floor (more than
        // 14336 × 896 floats) — 4 × 784 + 64 MiB.
        let n = 14336u64;
        assert_eq!(
            solve_temp_bytes(14336, true, false, 4 << 30),
            2 * n * n * 4 + (64 << 20)
        );
        // With tensor cores, A's four n × n f16 copies instead of the scratch.
        assert_eq!(solve_temp_bytes(14336, true, true, 4 << 30), 4 * n * n * 4);
        assert_eq!(nxn_bytes(14336), n * n * 4);
        // down_proj's W and Q in f32, its codes one byte each (56 MiB, not 224); GPTAQ's
        // pending terms (another W) and P's and A's diagonal blocks (2 · n × 128); the errors of
        // four blocks of 128 for its 4096 rows (with GPTAQ's −Q twice, and the fused sweep's
        // column-loss block).
        let lazy = crate::quant::gpu::lazy_blocks() as u64;
        let down = &[ModuleKind::Down][..];
        assert_eq!(
            solver_bytes(&c, down, false, false),
            2 * 4096 * n * 4 + 4096 * n + 4096 * lazy * 128 * 4
        );
        assert_eq!(
            solver_bytes(&c, down, true, false),
            3 * 4096 * n * 4 + 4096 * n + 2 * 128 * n * 4 + 4096 * (2 * lazy + 1) * 128 * 4
        );
        // gate/up: the same sizes of W, Q and codes, P's blocks of their 4096-wide input, the
        // errors of their 14336 rows.
        let gate_up = &[ModuleKind::Gate, ModuleKind::Up][..];
        assert_eq!(
            solver_bytes(&c, gate_up, true, false),
            3 * 4096 * n * 4 + 4096 * n + 2 * 128 * 4096 * 4 + n * (2 * lazy + 1) * 128 * 4
        );
        // With tensor cores, GPTAQ's flushes' halves for the module's rows and columns (14336
        // beside 4096 either way round).
        for mods in [down, gate_up] {
            assert_eq!(
                solver_bytes(&c, mods, true, true) - solver_bytes(&c, mods, true, false),
                3 * lazy * 128 * (14336 + 4096) * 2
            );
            assert_eq!(
                solver_bytes(&c, mods, false, true),
                solver_bytes(&c, mods, false, false)
            );
        }
        assert!(
            p.breakdown.iter().any(|l| l.contains("solving")),
            "{:?}",
            p.breakdown
        );
        Ok(())
    }

    /// GPTQ with metrics keeps a D for the metrics exactly in the groups where it costs fewer
    /// flops than the products it replaces (q/k/v and gate/up on Llama-3-8B), none without
    /// metrics or with `metric_moments` off; the plan's statistics stay down_proj's one 14336²
    /// H, and the X_fp − X_q scratch is counted.
    #[test]
    fn gptq_metrics_keep_d_where_it_pays() -> Result<(), Box<dyn std::error::Error>> {
        let c = llama3_8b_config()?;
        let mut i = input(&c, 8, StreamDType::F16);
        i.statistics = 1;
        let counts = |i: &PlanInput<'_>| groups(&c).map(|(n, rows)| group_statistics(i, n, rows));
        assert_eq!(counts(&i), [2, 1, 2, 1]);
        let p = plan(&i)?;
        let solving = 14336u64 * 14336 * 4;
        assert!(
            p.breakdown.iter().any(|l| l.contains(&format!(
                "statistics of the widest input {:.1} MiB",
                solving as f64 / (1u64 << 20) as f64
            ))),
            "{:?}",
            p.breakdown
        );
        assert_eq!(
            scratch_per_token(&c, true, true) - scratch_per_token(&c, true, false),
            14336 * 4
        );
        i.metric_moments = false;
        assert_eq!(counts(&i), [1, 1, 1, 1]);
        i.metric_moments = true;
        i.fp_stream = false;
        assert_eq!(counts(&i), [1, 1, 1, 1]);
        Ok(())
    }

    /// The MLP activations are kept only with the streams on the GPU and room for them next to
    /// the hidden states (the next layer's weights are uploaded ahead within the plan's peak, at
    /// 8 GiB too): Llama-3-8B GPTAQ with 128 × 2048 tokens keeps 2 × 15 GiB of f32 `act` at
    /// 120 GiB, not at 40 GiB (where the hidden-state and attention streams still fit) nor at
    /// 60 GiB (where it would shrink the batches), never at 8 GiB (host streams), and never when
    /// told to recompute.
    #[test]
    fn act_streams_only_with_room_on_the_gpu() -> Result<(), Box<dyn std::error::Error>> {
        let c = llama3_8b_config()?;
        let p = plan(&input(&c, 120, StreamDType::F16))?;
        assert!(
            p.streams_on_gpu && p.act_streams && p.weights_ahead,
            "{:?}",
            p.breakdown
        );
        // Hidden states plus the larger of the attention outputs and act, both streams, f32.
        let kept: u64 = 2 * 128 * 2048 * (4096 + 14336) * 4;
        let line = format!("{:.1} MiB on the GPU", kept as f64 / (1u64 << 20) as f64);
        assert!(
            p.breakdown.iter().any(|l| l.contains(&line)) && p.gpu_bytes_estimate > kept,
            "want {line}: {:?}",
            p.breakdown
        );
        let p = plan(&input(&c, 40, StreamDType::F16))?;
        assert!(p.streams_on_gpu && !p.act_streams, "{:?}", p.breakdown);
        // GPTQ without metrics at 70 GiB (one stream, 16 sequences per batch): the last stage
        // holds more than the statistics it replaces, so the next layer's weights are counted
        // on top of the peak.
        let mut i = input(&c, 70, StreamDType::F16);
        (i.fp_stream, i.statistics) = (false, 1);
        let p = plan(&i)?;
        assert!(p.act_streams && p.weights_ahead, "{:?}", p.breakdown);
        // At 60 GiB act would fit, but only with 10 instead of 16 sequences per batch.
        let p = plan(&input(&c, 60, StreamDType::F16))?;
        assert!(
            p.streams_on_gpu && !p.act_streams && p.batch_sequences == 16,
            "{:?}",
            p.breakdown
        );
        // 8 GiB: host streams; the next layer's weights (0.85 GiB) fit next to one sequence of
        // activations in the last stage, within the 5.47 GiB that solving down_proj needs.
        let p = plan(&input(&c, 8, StreamDType::F16))?;
        assert!(!p.act_streams && p.weights_ahead, "{:?}", p.breakdown);
        assert!(p.gpu_bytes_estimate <= 6 << 30, "{:?}", p.breakdown);
        let mut i = input(&c, 120, StreamDType::F16);
        i.lean_memory = true;
        let p = plan(&i)?;
        assert!(
            p.streams_on_gpu && !p.act_streams && !p.weights_ahead,
            "{:?}",
            p.breakdown
        );
        Ok(())
    }

    /// With tensor cores, act that does not fit in f32 is kept as packed f16: Llama-3-8B GPTAQ at
    /// 70 GiB keeps 2 × 15 GiB of f32 act without tensor cores, but with them (their f16 weight
    /// copies and statistics operands take the room; the H100 run of session 20 recomputed act)
    /// only 2 × 7.5 GiB of f16 act fit, with the same batch; where f32 act fits next to the
    /// tensor cores' buffers (120 GiB) it stays f32.
    #[test]
    fn act_kept_as_f16_only_with_tensor_cores() -> Result<(), Box<dyn std::error::Error>> {
        let c = llama3_8b_config()?;
        let mut i = input(&c, 70, StreamDType::F16);
        let p = plan(&i)?;
        assert!(p.act_streams && !p.act_f16, "{:?}", p.breakdown);
        i.tensor_cores = true;
        let tc = plan(&i)?;
        assert!(tc.act_streams && tc.act_f16, "{:?}", tc.breakdown);
        assert_eq!(tc.batch_sequences, 16, "{:?}", tc.breakdown);
        // Room to spare: the attention takes the most sequences at once (not without tensor
        // cores, where it has no scratch)...
        assert_eq!(
            (tc.attention_sequences, p.attention_sequences),
            (crate::forward::ATTN_SEQS, 1),
            "{:?}",
            tc.breakdown
        );
        // ... and never more than the batch has, nor more than one storage binding holds the
        // scores of: 32 heads × 256 queries × 2048 keys × 4 B = 64 MiB per sequence.
        let shape = crate::forward::LayerDims::of(&c).attn_shape(1, 2048);
        let within = |mib: u64| crate::forward::AttnTc::sequences_within(&shape, 8, mib << 20);
        assert_eq!(
            [within(4096), within(240), within(64), within(10)],
            [8, 3, 1, 1]
        );
        i.max_buffer_bytes = 240 << 20;
        let narrow = plan(&i)?;
        assert_eq!(
            (narrow.batch_sequences, narrow.attention_sequences),
            (2, 2),
            "{:?}",
            narrow.breakdown
        );
        // Hidden states plus the larger of the attention outputs (f32) and act (f16), 2 streams.
        let kept: u64 = 2 * 128 * 2048 * (4096 + 14336 / 2) * 4;
        let line = format!("{:.1} MiB on the GPU", kept as f64 / (1u64 << 20) as f64);
        assert!(
            tc.breakdown
                .iter()
                .any(|l| l.contains(&line) && l.contains("packed f16")),
            "want {line}: {:?}",
            tc.breakdown
        );
        let mut i = input(&c, 120, StreamDType::F16);
        i.tensor_cores = true;
        let p = plan(&i)?;
        assert!(p.act_streams && !p.act_f16, "{:?}", p.breakdown);
        Ok(())
    }

    /// With f16 streams requested, streams that do not fit the GPU in f32 but do in f16 stay on
    /// the GPU, packed: Llama-3-8B GPTAQ at 128 × 2048 on a 16 GiB card (2 × 8 GiB of f16 hidden
    /// and attention streams would not fit, 2 × 4 GiB of f16 do, next to ≈ 5.5 GiB), not with f32
    /// requested, not at 8 GiB; at 24 GiB the f32 streams fit and are preferred (no rounding).
    #[test]
    fn f16_streams_stay_on_a_16_gib_gpu() -> Result<(), Box<dyn std::error::Error>> {
        let c = llama3_8b_config()?;
        let p = plan(&input(&c, 16, StreamDType::F16))?;
        assert!(
            p.streams_on_gpu && p.stream_dtype == "f16",
            "{:?}",
            p.breakdown
        );
        assert_eq!(placement(&p, StreamDType::F16), Placement::GpuF16.into());
        assert_eq!(p.host_bytes_estimate, 0);
        assert!(!p.act_streams, "act is kept only with f32 streams");
        let packed: u64 = 2 * 128 * 2048 * (4096 + 4096) * 2;
        let line = format!(
            "{:.1} MiB on the GPU (packed f16)",
            packed as f64 / (1u64 << 20) as f64
        );
        assert!(
            p.breakdown.iter().any(|l| l.contains(&line)),
            "want {line}: {:?}",
            p.breakdown
        );
        assert!(p.gpu_bytes_estimate <= 14 << 30, "{:?}", p.breakdown);
        let p = plan(&input(&c, 16, StreamDType::F32))?;
        assert!(
            !p.streams_on_gpu && p.stream_dtype == "f32",
            "{:?}",
            p.breakdown
        );
        let p = plan(&input(&c, 8, StreamDType::F16))?;
        assert!(
            !p.streams_on_gpu && p.stream_dtype == "f16",
            "{:?}",
            p.breakdown
        );
        assert_eq!(
            placement(&p, StreamDType::F16).rest,
            Placement::Host(StreamDType::F16)
        );
        let p = plan(&input(&c, 24, StreamDType::F16))?;
        assert!(
            p.streams_on_gpu && p.stream_dtype == "f32",
            "{:?}",
            p.breakdown
        );
        assert_eq!(placement(&p, StreamDType::F16), Placement::Gpu.into());
        let mut i = input(&c, 16, StreamDType::F16);
        i.force_host = true;
        assert!(!plan(&i)?.streams_on_gpu);
        Ok(())
    }

    /// Host streams keep their leading batches on the GPU in the memory the plan has left, in
    /// the host's element type: Llama-3-8B GPTAQ at 8 GiB keeps some sequences' batches on the
    /// GPU (packed f16 beside f16 host streams, f32 beside f32 ones), as many as fit, its
    /// estimate within the usable budget and its host estimate that much smaller;
    /// `--host-streams` and `--lean-memory` keep none.
    #[test]
    fn host_streams_keep_their_first_batches_on_the_gpu() -> Result<(), Box<dyn std::error::Error>>
    {
        let c = llama3_8b_config()?;
        // Both streams' hidden state and attention output per sequence.
        let per_seq_f32: u64 = 2 * 2048 * (4096 + 4096) * 4;
        for (gib, dtype, first) in [
            (8, StreamDType::F16, Placement::GpuF16),
            (8, StreamDType::F32, Placement::Gpu),
        ] {
            let i = input(&c, gib, dtype);
            let p = plan(&i)?;
            assert!(!p.streams_on_gpu, "{gib} GiB {dtype:?}: {:?}", p.breakdown);
            let per_seq = per_seq_f32 / 4 * dtype.bytes() as u64;
            let seqs = (p.resident_batches * p.batch_sequences) as u64;
            assert!(
                seqs > 0 && seqs < 128,
                "{gib} GiB {dtype:?}: {seqs} resident sequences: {:?}",
                p.breakdown
            );
            assert_eq!(p.host_bytes_estimate, per_seq * (128 - seqs));
            assert!(p.gpu_bytes_estimate <= usable_budget(i.gpu_budget_bytes));
            // One batch more would not have fitted.
            let without = PlanInput {
                lean_memory: false,
                force_host: true,
                ..i
            };
            let base = plan(&without)?;
            assert_eq!(base.resident_batches, 0);
            assert_eq!(
                base.gpu_bytes_estimate + seqs * per_seq,
                p.gpu_bytes_estimate
            );
            assert!(
                base.gpu_bytes_estimate + (seqs + p.batch_sequences as u64) * per_seq
                    > usable_budget(i.gpu_budget_bytes),
                "{gib} GiB {dtype:?}: room for another batch"
            );
            let layout = placement(&p, dtype);
            assert_eq!(
                (layout.first, layout.resident, layout.rest),
                (first, p.resident_batches, Placement::Host(dtype))
            );
            assert!(
                p.breakdown
                    .iter()
                    .any(|l| l.contains(&format!("the other {seqs} sequence(s) on the GPU"))),
                "{:?}",
                p.breakdown
            );
            let lean = PlanInput {
                lean_memory: true,
                ..i
            };
            assert_eq!(plan(&lean)?.resident_batches, 0);
        }
        Ok(())
    }

    /// Weights no later stage reads are freed before down_proj's solve, and the plan counts
    /// that: without metrics GPTAQ's FP stream runs its down_proj in stage D and its whole MLP
    /// goes (with tensor cores: gate/up/down in f16 and down in f32, gate/up's f32 already
    /// freed); with act kept both streams' gate/up go. GPTQ's one stream gets no such credit,
    /// nor does GPTAQ with metrics. The Llama-3-8B tensor-core plan without metrics then needs
    /// less than with them, and fits 7 GiB where the one with metrics does not.
    #[test]
    fn weights_freed_before_downs_solve_are_credited() -> Result<(), Box<dyn std::error::Error>> {
        let c = llama3_8b_config()?;
        let tc = |gib: u64, metrics: bool| {
            let mut i = input(&c, gib, StreamDType::F16);
            i.tensor_cores = true;
            i.metrics = metrics;
            i
        };
        let (with_m, without_m) = (tc(8, true), tc(8, false));
        let released = gate_up_f32_released(&without_m);
        assert!(released && gate_up_f32_released(&with_m));
        let late = stretch_weights(&with_m, released)[1];
        assert_eq!(stretch_weights(&without_m, released)[1], late);
        let mlp: u64 = 3 * 4096 * 14336 * 4;
        // One stream's MLP in stages D–E: f16 copies of all three, f32 down.
        let fp_mlp = mlp / 2 + mlp / 3;
        let base = tensor_core_scratch_bytes(&c, 2048) + layer_weight_bytes(&c) / 7 * 2;
        assert_eq!(
            late,
            base + 2 * fp_mlp,
            "stage D–E weights before the solve"
        );
        assert_eq!(
            late_solve_weights(&with_m, released, false),
            late,
            "metrics on"
        );
        let credited = late_solve_weights(&without_m, released, false);
        if fp_down_early() {
            assert_eq!(credited, late - fp_mlp, "FP MLP freed");
        } else {
            assert_eq!(credited, late, "GPTAQ_FP_DOWN_EARLY=0");
        }
        // Act kept: down's weights only (f32 + f16), both streams.
        assert_eq!(
            late_solve_weights(&with_m, released, true),
            base + 2 * (mlp / 3 + mlp / 6)
        );
        // GPTQ without metrics: one stream, nothing more to free.
        let mut gptq = tc(8, false);
        gptq.fp_stream = false;
        gptq.statistics = 1;
        assert_eq!(
            late_solve_weights(&gptq, gate_up_f32_released(&gptq), false),
            stretch_weights(&gptq, gate_up_f32_released(&gptq))[1]
        );
        if fp_down_early() {
            let (pm, pn) = (plan(&with_m)?, plan(&without_m)?);
            assert!(pn.fp_down_in_d && !pm.fp_down_in_d);
            let saved = pm.gpu_bytes_estimate - pn.gpu_bytes_estimate;
            assert!(
                saved > 0 && saved <= fp_mlp,
                "saved {saved} of {fp_mlp}: {:?}",
                pn.breakdown
            );
            assert!(
                pn.breakdown
                    .iter()
                    .any(|l| l.contains("the FP stream's MLP freed")),
                "{:?}",
                pn.breakdown
            );
            assert!(plan(&tc(7, false)).is_ok());
            assert!(matches!(plan(&tc(7, true)), Err(PlanError::Budget { .. })));
        }
        Ok(())
    }

    /// Tensor cores cost each stream an f16 copy of its weights and the two streams one shared
    /// scratch, and let gate/up's f32 weights go once they are solved; GPTAQ's split-f16 A costs
    /// its solve four n × n f16 copies where they fit. The Llama-3-8B GPTAQ plan with 128 × 2048
    /// tokens: at 8 GiB on tensor cores with A in f32, at 12 GiB with the split A too.
    #[test]
    fn tensor_cores_add_f16_weights_and_one_scratch() -> Result<(), Box<dyn std::error::Error>> {
        let c = llama3_8b_config()?;
        let with_tc = |gib: u64| {
            let mut i = input(&c, gib, StreamDType::F16);
            i.tensor_cores = true;
            i
        };
        let f16_weights = layer_weight_bytes(&c) / 2;
        let mlp = 3 * 4096 * 14336 * 4;
        // 4096 rows × 14336 f16 + 2048 × (4096 + 2·1024) f16 + 32 heads × 256 × 2048 × (4 + 2) B
        // (the attention of one sequence).
        let scratch = 4096 * 14336 * 2 + (2048 * 6144 * 2 + 32 * 256 * 2048 * 6);
        assert_eq!(tensor_core_scratch_bytes(&c, 2048), scratch);
        // Stages A–C: both streams' f16 copies and the scratch more; stages D–E: the MLP's
        // weights, gate/up's in f16 only, down's in both.
        let base8 = input(&c, 8, StreamDType::F16);
        let [early, late] = stretch_weights(&base8, gate_up_f32_released(&base8));
        let [early_tc, late_tc] = stretch_weights(&with_tc(8), gate_up_f32_released(&with_tc(8)));
        assert_eq!(early_tc - early, 2 * f16_weights + scratch);
        assert_eq!(late - layer_weight_bytes(&c) / 7 * 2, 2 * mlp);
        assert_eq!(
            late_tc - late,
            scratch + 2 * (mlp / 2) - 2 * (mlp / 3 * 2),
            "gate/up's f32 weights freed"
        );

        // 8 GiB: the tensor-core plan fits with A from the f32 GEMMs.
        let p8 = plan(&with_tc(8))?;
        assert!(
            p8.gate_up_f32_released && !p8.split_f16 && p8.batch_sequences == 1,
            "{:?}",
            p8.breakdown
        );
        assert!(p8.gpu_bytes_estimate <= 6 << 30, "{:?}", p8.breakdown);
        assert!(
            p8.breakdown
                .iter()
                .any(|l| l.contains("A with the f32 GEMMs")),
            "{:?}",
            p8.breakdown
        );
        assert!(plan_or_without_tensor_cores(&with_tc(8))?.1.is_none());
        // Where the metrics read W after the solve (--metric-products), gate/up keep their f32
        // weights and the tensor cores do not fit 8 GiB: the driver then runs the f32 kernels
        // with the f32 plan.
        let mut products = with_tc(8);
        products.metric_moments = false;
        assert!(!gate_up_f32_released(&products));
        let (fallback, refused) = plan_or_without_tensor_cores(&products)?;
        assert!(matches!(refused, Some(PlanError::Budget { .. })));
        let mut f32_products = input(&c, 8, StreamDType::F16);
        f32_products.metric_moments = false;
        let f32_plan = plan(&f32_products)?;
        assert_eq!(
            (fallback.gpu_bytes_estimate, fallback.breakdown),
            (f32_plan.gpu_bytes_estimate, f32_plan.breakdown)
        );
        // Without metrics nothing reads W: freed. Sequences whose tokens do not tile the
        // tensor-core blocks would need the f32 weights for their last rows: kept.
        let mut no_metrics = products.clone();
        no_metrics.metrics = false;
        assert!(gate_up_f32_released(&no_metrics));
        let mut ragged = with_tc(8);
        ragged.seqlen = 2040;
        assert!(!gate_up_f32_released(&ragged));
        assert!(!gate_up_f32_released(&input(&c, 8, StreamDType::F16)));

        // 12 GiB: the split A fits as well; the batch is at most the f32 plan's.
        let base = plan(&input(&c, 12, StreamDType::F16))?;
        let tc = plan(&with_tc(12))?;
        assert!(
            tc.split_f16 && tc.gate_up_f32_released,
            "{:?}",
            tc.breakdown
        );
        assert!(
            (1..=base.batch_sequences).contains(&tc.batch_sequences),
            "{} against {}: {:?}",
            tc.batch_sequences,
            base.batch_sequences,
            tc.breakdown
        );
        assert_eq!(
            (tc.weights_ahead, tc.streams_on_gpu),
            (base.weights_ahead, base.streams_on_gpu)
        );
        assert!(tc.gpu_bytes_estimate <= 10 << 30, "{:?}", tc.breakdown);
        assert!(tc.breakdown.iter().any(|l| l.contains("f16 copy")));
        // GPTQ has no A to split.
        let mut gptq = with_tc(12);
        gptq.statistics = 1;
        gptq.fp_stream = false;
        gptq.metrics = false;
        assert!(!plan(&gptq)?.split_f16);
        Ok(())
    }

    /// Below the fixed part (weights, then statistics and the solve's buffers) the run is refused,
    /// with numbers.
    #[test]
    fn too_small_a_budget_is_refused_with_numbers() -> Result<(), Box<dyn std::error::Error>> {
        let c = llama3_8b_config()?;
        let e = match plan(&input(&c, 4, StreamDType::F16)) {
            Ok(p) => return Err(format!("a 4 GiB budget was accepted: {:?}", p.breakdown).into()),
            Err(e) => e,
        };
        match &e {
            PlanError::Budget {
                need_mib,
                budget_mib,
                ..
            } => {
                assert_eq!(*budget_mib, 4096);
                assert!(*need_mib > 4096, "need {need_mib} MiB");
                // The budget the refusal names is enough (its reserve included), a bit less is not.
                let mut i = input(&c, 0, StreamDType::F16);
                i.gpu_budget_bytes = (*need_mib + 1) << 20;
                if let Err(e) = plan(&i) {
                    return Err(format!("the named {need_mib} MiB (+1) was refused: {e}").into());
                }
                i.gpu_budget_bytes = (*need_mib - 16) << 20;
                assert!(plan(&i).is_err(), "{} MiB already fits", *need_mib - 16);
            }
            other => return Err(format!("expected a budget error, got {other}").into()),
        }
        for part in ["layer weights", "accumulating", "solving"] {
            assert!(e.to_string().contains(part), "{part}: {e}");
        }
        Ok(())
    }

    /// A Llama-3-70B-shaped layer (intermediate 28672): its 3,136 MiB Hessian exceeds a 2 GiB
    /// binding but is stored in row panels, so the shape plans; a binding smaller than the widest
    /// weight (896 MiB) is refused up front, naming it.
    #[test]
    fn hessian_larger_than_one_binding_plans_in_panels() -> Result<(), Box<dyn std::error::Error>> {
        let c = ModelConfig::from_json_str(
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                "num_key_value_heads": 8, "num_hidden_layers": 80, "vocab_size": 128256,
                "rms_norm_eps": 1e-5, "rope_theta": 500000.0}"#,
        )?;
        let mut i = input(&c, 120, StreamDType::F16);
        i.max_buffer_bytes = 2 << 30;
        assert!(plan(&i).is_ok(), "{:?}", plan(&i).err());
        i.max_buffer_bytes = 512 << 20;
        match plan(&i) {
            Err(PlanError::Binding {
                need_mib,
                limit_mib,
                what,
            }) => {
                assert_eq!((need_mib, limit_mib), (896, 512), "{what}");
                assert!(what.contains("widest module's weight"), "{what}");
            }
            other => return Err(format!("expected a binding error, got {other:?}").into()),
        }
        Ok(())
    }
}
