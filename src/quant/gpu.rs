//! The GPTQ / GPTAQ solve on the GPU (algorithm.md §1.2, §2.2, §6.3, §6.4), matching
//! [`super::reference::quantize_f64`] up to f32 round-off.
//!
//! Pipeline of [`quantize_gpu`]:
//! 1. **Preparation** (§1.2 steps 2–7): only `diag(H)` is read back (`factor::hessian_diag`).
//!    Per-row params (gs = −1), dead columns, static groups and the act-order permutation (stable
//!    descending sort) come from the reference's own `reference::prepare` on the host, in
//!    f64; the inverse factor `U` is computed on the GPU in f32 by
//!    [`factor::upper_inverse_factor_gpu`] (blocked Cholesky of the permuted, damped H and a
//!    triangular inverse, §6.4), driven by the reference's damping schedule
//!    ([`super::reference::damped_factorisation`]: GPTQModel's retries and diagonal floors, §1.5),
//!    so damping / fallback decisions are made by the same code as in the f64 reference. The
//!    whole H comes back only on the rare RTN-fallback paths (its proxy loss needs it). The
//!    caller's `H` and `D` buffers are never modified (§6.2). Modules solved from the same `H` and
//!    `D` (q/k/v, gate/up) can share diag(H), `U` and `P` through a [`SharedFactor`].
//!    Speculatively (`SolveOptions::speculate`, the default except in memory-bound pipeline
//!    plans) the first damping is taken without waiting for the Cholesky's pivots' flag
//!    ([`factor::upper_inverse_factor`] with `speculate`): the host records the rest while the GPU
//!    factors, and the flag is checked when the solve finishes; where it failed (H needed more
//!    damping) the module is solved again with every attempt waited for, so the damping and
//!    fallback decisions stay the reference's.
//! 2. **GPTAQ `P` on the GPU** (§2.2): `D` is permuted and its dead columns zeroed by a gather
//!    kernel (`quant_gather.wgsl`), then `A = α·triu₁(D·Uᵀ)` (`quant_mask.wgsl` for the mask)
//!    and, where the whole P is kept (`PForm`), `P = A·U` — GEMMs over column blocks that skip
//!    what the triangles of `U` and `A` make zero, per block and per output tile, in place of the
//!    permuted `D` (`gptaq_p_blocked`: about 0.35·n³ multiply-adds instead of the dense 2·n³,
//!    and no second n×n matrix). By default only `A` and P's diagonal blocks are formed (half of
//!    that) and the rest of P is applied through a pending matrix during the sweep
//!    (`PForm::Deferred`).
//! 3. **Blocked sweep on the GPU** (§1.2 step 8, §6.3): per block one `quant_sweep.wgsl` dispatch
//!    (workgroup per row chunk) does the per-column quantization, group parameters at group starts
//!    (stale-W quirk included), the in-block OBS update and GPTAQ's in-block term; then the lazy
//!    cross-block update `W[:, i2:] −= Err1·U[i1:i2, i2:]` as one GEMM, by default once per four
//!    blocks with their errors side by side and a small catch-up GEMM for each block's own
//!    columns (`lazy_blocks`). GPTAQ's cross-block term `W[:, i2:] += W1·P[i1:i2, i2:]`:
//!    deferred, through the pending matrix (`PForm`: a GEMM for W and one for the pending
//!    terms, lazy in the same way; each block's own share of them, before and after its sweep,
//!    inside `sweep_lanes` (`Sweep::fused`), or where that kernel does not run or
//!    `GPTAQ_FUSED_PENDING=0`, as two small GEMMs and `quant_pending.wgsl`); with the whole P,
//!    fused into one GEMM with K doubled: the block's rows of U and P are copied one above the
//!    other into a `2·bs × n` staging matrix and the sweep leaves `[Err1 | −W1]` side by side, so
//!    `W[:, i2:] −= [Err1 | −W1]·[U; P]` (a last, partial block has a gap between its two halves
//!    and takes the two-GEMM form).
//!    After each block's sweep, `quant_colloss.wgsl` reduces its scaled errors to the per-column
//!    proxy loss (`QuantResult::column_loss`).
//! 4. `quant_finish.wgsl` writes `Q` in the original column order on the GPU; codes, parameters,
//!    the per-row and per-column proxy losses and `diag(U)` are read back to build the
//!    [`QuantResult`] (and [`GpuSolve::u_diag`]).
//!
//! The integer codes (≤ maxq ≤ 255) live on the GPU as bytes, 4 per u32 word, in processing
//! column order: the code of column `k` of row `r` is bits `8·(k % 4) .. 8·(k % 4) + 7` of word
//! `r·⌈n/4⌉ + k/4` (rows start on a word boundary; `quant_sweep.wgsl` packs them, `quant_finish`
//! and the host unpack them): a quarter of a u32 per element in GPU memory and readback (59 MB
//! instead of 235 MB at a 4096 × 14336 module).
//!
//! `H`, `D`, `U` and `P` (in the permuted `D`'s storage) are [`GpuMatrix`] row panels
//! (gpu/matrix.rs): a single buffer when n² floats fit one storage binding, otherwise panels —
//! `U` and `P` of whole blocks, so each block's rows are read through one binding by the sweep
//! and the cross-block GEMMs; the gathers run once per (destination, source) panel pair and the
//! GEMMs split at panel boundaries.
//!
//! Deviations from the f64 reference (all f32 round-off, documented for the tests):
//! - `U` is an f32 factorisation (the reference's is f64): a damping retry can in principle be
//!   decided differently when H is within f32 round-off of indefinite.
//! - Updates and `x/scale` are computed in f32, so a code can differ from the reference's where
//!   `x/scale` lies within round-off of a `.5` tie; through the error feedback such a flip can
//!   change a few later codes of the same row. Dynamic group parameters are computed from f32
//!   values and can differ by one f16 ulp in the same near-tie situations.
//! - Non-finite `D` is not checked up front (it stays on the GPU); non-finite values reaching the
//!   sweep show up as a non-finite proxy loss and trigger the reference's RTN fallback.
//! - The proxy loss is accumulated per row in f32 and summed on the host in f64.
//! - With [`SolveFlags::split_f16`] (the pipeline's tensor-core runs) GPTAQ's `A = α·triu₁(Dp·Uᵀ)`
//!   comes from split-f16 operands on the tensor cores (`split_f16.wgsl`, `gptaq_a_split`):
//!   each f32 operand as two power-of-two-scaled halves (22 of f32's 24 bits), three products with
//!   f32 accumulation — on the staged kernels in one launch that interleaves them per 16-deep
//!   step (`gemm_staged_coop.wgsl`'s `SPLIT`; `split_fused`), elsewhere as three. A's error
//!   grows with K, the tensor cores' accumulation truncating once per 16-deep product: as three
//!   launches 3.5–6× the f32 GEMMs' (H100: 2.6·10⁻⁶ / 8.8·10⁻⁶ relative at n = 4096 / 14336
//!   against 0.75 / 1.5·10⁻⁶, BENCHMARKS.md session 32), in one launch about 3× that (7.5·10⁻⁶ /
//!   2.6·10⁻⁵, session 39: each accumulator now takes three truncations per step at its full
//!   magnitude) — still 11–40× below f16 operands' (3·10⁻⁴), and below the f16 rounding that
//!   the tensor-core statistics already put into D; the tests bound it per entry (2^−19 of
//!   `α·Σ|Dp||U|` plus 2^−23 per term of the sum). Like any
//!   round-off-level change it can flip near-tie codes. The statistics of such runs are
//!   f16-rounded already (their activations are cast to f16), far coarser than this. The
//!   deferred P's pending flushes `G[:, i2:] += Q·A` then take split operands too
//!   (`quant::flush`: the two operands scaled by 2^±s so that the tensor cores add straight
//!   into G, whose error is then relative to G itself; W's updates stay f32, see there).

use crate::gpu::profile::Profile;
use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use super::factor::{self, FactorCheck};
use super::flush;
use super::quantizer::{QuantizerSpec, rtn_quantize_f64};
use super::reference::{self, Damped};
use super::{Fallback, Method, QuantConfig, QuantError, QuantResult};
use crate::gpu::kernels::groups_1d;
use crate::gpu::ops::{self, MatView, Operand};
use crate::gpu::{GpuBuffer, GpuContext, GpuError, GpuMatrix};

crate::wgsl_shader!(QUANT_GATHER, "quant_gather");
crate::wgsl_shader!(QUANT_MASK, "quant_mask");
crate::wgsl_shader!(QUANT_SWEEP, "quant_sweep");
crate::wgsl_shader!(QUANT_FINISH, "quant_finish");
crate::wgsl_shader!(QUANT_COLLOSS, "quant_colloss");
crate::wgsl_shader!(QUANT_PENDING, "quant_pending");
crate::wgsl_shader!(SPLIT_F16, "split_f16");

/// Invocations per sweep workgroup (`WG` in `quant_sweep.wgsl`).
const SWEEP_WG: usize = 128;
/// Floats of the workgroup-resident block `W1` (`W1LEN` in `quant_sweep.wgsl`): bounds
/// `rows_per_workgroup · min(block_size, cols)`.
const SWEEP_W1_LEN: usize = 3584;
/// Most rows per sweep workgroup (`MAXR`): one quantizing invocation per row, ≤ `SWEEP_WG`.
const SWEEP_MAX_ROWS: usize = 64;

/// Rows per sweep workgroup (`rchunk` of `quant_sweep.wgsl`) for `rows` rows and blocks of `bs`
/// columns: as many as the workgroup's memory holds (28 at bs = 128). Fewer rows per workgroup
/// give more workgroups to hide each one's barriers behind (a 4096-row module has 147 of 28 rows,
/// about one per multiprocessor of an H100), but each then reloads the block's U rows for fewer
/// rows: with `rows / 512` rows per workgroup (at least 4) the 8B layer's sweeps took 194 ms of
/// kernel time against 140 ms with 28 (H100, BENCHMARKS.md session 29). Results do not depend on
/// it (every row's arithmetic is its own). `forced` (the tests), else `GPTAQ_SWEEP_ROWS=N` (A/B
/// runs), sets the count within the memory bound.
fn sweep_rows(rows: usize, bs: usize, forced: Option<usize>) -> usize {
    forced
        .or_else(|| {
            std::env::var("GPTAQ_SWEEP_ROWS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
        })
        .filter(|&v| v > 0)
        .unwrap_or(usize::MAX)
        .min(sweep_rows_max(bs))
        .min(rows.max(1))
}

/// The most rows per sweep workgroup that its memory holds with blocks of `bs` columns.
fn sweep_rows_max(bs: usize) -> usize {
    (SWEEP_W1_LEN / bs.max(1))
        .clamp(1, SWEEP_MAX_ROWS)
        .min(SWEEP_WG)
}

/// Result of [`quantize_gpu`].
pub struct GpuSolve {
    /// Same semantics as the reference, ORIGINAL column order (`result.q` empty from
    /// [`quantize_gpu_resident`]: [`QuantResult::weights`] rebuilds it).
    pub result: QuantResult,
    /// Fake-quantized `Q` `[rows, cols]` on the GPU, original column order (equal to
    /// `result.weights()`); `None` only where the caller released it ([`Solving::release_q`]).
    pub q: Option<GpuBuffer<f32>>,
    /// `U_kk`, the diagonal of the inverse-Hessian factor, processing order (what turns
    /// `result.column_loss` back into the rounding errors: the layer lab's uncompensated loss).
    /// Empty for an RTN fallback (no factor).
    pub u_diag: Vec<f32>,
    /// Seconds per phase of this solve (prepare, factor, upload, p, sweep, update, finish,
    /// readback, host), only with `GPTAQ_PROFILE=1` (`gpu::profile`); empty otherwise.
    pub phases: Vec<(String, f64)>,
    /// From [`quantize_gpu_resident`]: the integer codes, still on their way to the host
    /// (`result.codes` is empty until [`PendingCodes::finish`] fills it). `None` when they are in
    /// `result` already ([`quantize_gpu`], RTN fallbacks).
    pub codes: Option<PendingCodes>,
}

/// A solve's integer codes being copied back (the only large readback of a solve: one byte per
/// weight, 58 MB for a Llama-3-8B down_proj). Waiting for it and unpacking it took about 0.4 s of an
/// 8B layer's 1.5 s of solving on the H100 (BENCHMARKS.md, session 21) with the GPU idle; the
/// pipeline finishes it later, once the next stage's work is queued, so the copy and the unpacking
/// overlap that work.
pub struct PendingCodes {
    read: crate::gpu::PendingRead<u32>,
    rows: usize,
    n: usize,
    /// Processing order (act-order); `None`: the identity.
    order: Option<Vec<usize>>,
}

impl PendingCodes {
    /// Waits for the copy and writes the codes, original column order, into `result.codes`.
    pub fn finish(self, ctx: &GpuContext, result: &mut QuantResult) -> Result<(), GpuError> {
        let (rows, n, order) = (self.rows, self.n, self.order);
        // Unpacked straight from the mapped copy: no intermediate copy of the words.
        result.codes = ctx.finish_read_bytes(self.read, |bytes| {
            unpack_codes(bytes, rows, n, order.as_deref())
        })?;
        Ok(())
    }
}

/// The sweep's code words as the GPU stored them (little-endian bytes = processing columns, 4
/// per word, each row padded to whole words; module docs) as one byte per weight in original
/// column order: the bytes of a row are its processing-order codes followed by up to 3 bytes of
/// padding, on any host.
fn unpack_codes(code_bytes: &[u8], rows: usize, n: usize, order: Option<&[usize]>) -> Vec<u8> {
    if n == 0 {
        return vec![0_u8; rows * n];
    }
    let rows_in = code_bytes.chunks_exact(4 * n.div_ceil(4)).take(rows);
    match order {
        // Filled row by row without zeroing first (58 MB at an 8B down_proj).
        None => {
            let mut codes = Vec::with_capacity(rows * n);
            rows_in.for_each(|src| codes.extend_from_slice(&src[..n]));
            codes.resize(rows * n, 0);
            codes
        }
        Some(order) => {
            let mut codes = vec![0_u8; rows * n];
            for (dst, src) in codes.chunks_exact_mut(n).zip(rows_in) {
                order.iter().zip(src).for_each(|(&j, &b)| dst[j] = b);
            }
            codes
        }
    }
}

/// Why the GPU solve refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum QuantGpuError {
    #[error("GPU error in the quantization solve: {0}")]
    Gpu(#[from] GpuError),
    #[error("quantization input rejected: {0}")]
    Quant(#[from] QuantError),
    #[error("not supported by the GPU solve: {0}")]
    Unsupported(String),
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct NParams {
    n: u32,
    alpha: f32,
    r0: u32,
    rows: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SplitParams {
    rows: u32,
    n: u32,
    r0: u32,
    dst: u32,
    slot: u32,
    tri: u32,
    alpha: f32,
    lo: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct GatherParams {
    n: u32,
    rows: crate::gpu::matrix::PanelRows,
    _p: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct FinishParams {
    rows: u32,
    n: u32,
    _p: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ColLossParams {
    rows: u32,
    i1: u32,
    cnt: u32,
    lde: u32,
    /// The block's first error column in the error buffer.
    eoff: u32,
    _p: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SweepParams {
    rows: u32,
    n: u32,
    i1: u32,
    cnt: u32,
    rchunk: u32,
    gs: u32,
    dynamic_groups: u32,
    maxq: u32,
    sym: u32,
    mse: u32,
    gptaq: u32,
    lde: u32,
    woff: u32,
    urow0: u32,
    /// Where the sweep reads GPTAQ's in-block `P[k, i1 + j]`: `pm[(k − prow0)·ldp + pcol0 + j]`
    /// (`quant_sweep.wgsl`).
    prow0: u32,
    ldp: u32,
    pcol0: u32,
    /// The block's first error column in the error buffer (its slot, `lazy_blocks`).
    eoff: u32,
    /// `sweep_lanes`' fused deferred-P steps ([`Sweep::fused`]): bit 0 the block's pending share
    /// before the sweep, bit 1 its pending errors after.
    pend: u32,
    /// Where the block's pure errors go for the column loss (`eoff` unless fused).
    loff: u32,
    /// Where A's diagonal blocks start in the bound P (`gptaq_a_diag`; fused only).
    aoff: u32,
    _p: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct PendingParams {
    rows: u32,
    n: u32,
    i1: u32,
    cnt: u32,
    lde: u32,
    eoff: u32,
    _p: [u32; 2],
}

fn u32_of(what: &str, v: usize) -> Result<u32, QuantGpuError> {
    Ok(crate::gpu::ops::u32_of(what, v)?)
}

/// Checks what the reference's `check_config` checks (it is private there), plus GPU limits.
fn check_config(cfg: &QuantConfig, cols: usize) -> Result<QuantizerSpec, QuantGpuError> {
    let spec = QuantizerSpec::from_config(cfg)?;
    if cfg.method == Method::Rtn {
        return Err(QuantGpuError::Unsupported(
            "Method::Rtn has no solve; use quantizer::rtn_quantize".into(),
        ));
    }
    if cfg.block_size == 0 {
        return Err(QuantError::InvalidConfig("block_size must be ≥ 1".into()).into());
    }
    if cfg.group_size == Some(0) {
        return Err(
            QuantError::InvalidConfig("group_size must be ≥ 1 (None = per row)".into()).into(),
        );
    }
    let ok = |v: f64| v.is_finite() && v >= 0.0;
    if !(ok(cfg.damp_percent) && ok(cfg.damp_auto_increment)) {
        return Err(QuantError::InvalidConfig(format!(
            "damp_percent ({}) and damp_auto_increment ({}) must be finite and ≥ 0",
            cfg.damp_percent, cfg.damp_auto_increment
        ))
        .into());
    }
    if !cfg.method.alpha().is_finite() {
        return Err(QuantError::InvalidConfig(format!(
            "GPTAQ alpha must be finite, got {}",
            cfg.method.alpha()
        ))
        .into());
    }
    // The block W1 must fit the sweep's workgroup memory for at least one row.
    let bs = cfg.block_size.min(cols.max(1));
    if bs > SWEEP_W1_LEN {
        return Err(QuantGpuError::Unsupported(format!(
            "block_size {} > {SWEEP_W1_LEN} (workgroup memory of the sweep kernel)",
            cfg.block_size
        )));
    }
    Ok(spec)
}

/// RTN of the original W with the reference's proxy loss `½·tr(ΔW H ΔWᵀ)` on the undamped H,
/// clamped at 0 (reference `rtn_with_h`).
fn rtn_fallback(
    ctx: &GpuContext,
    w: &[f64],
    rows: usize,
    cols: usize,
    h: &[f64],
    cfg: &QuantConfig,
    reason: String,
) -> Result<GpuSolve, QuantGpuError> {
    let mut res = rtn_quantize_f64(w, rows, cols, cfg)?;
    let delta: Vec<f64> = w
        .iter()
        .zip(&res.q)
        .map(|(&a, &b)| a - f64::from(b))
        .collect();
    let loss =
        super::metrics::quadratic_form_trace(&delta, rows, cols, h).map_or(f64::NAN, |v| 0.5 * v);
    res.proxy_loss_sum = if loss.is_finite() { loss.max(0.0) } else { 0.0 };
    res.fallback = Some(Fallback::Rtn { reason });
    let q = ctx.upload("quant q", &res.q)?;
    Ok(GpuSolve {
        result: res,
        q: Some(q),
        u_diag: Vec::new(),
        phases: Vec::new(),
        codes: None,
    })
}

/// `reference::prepare`'s W in f32: dead columns zeroed, columns in processing order. The caller's
/// W itself when that changes nothing (no act-order, no dead column): no copy of a matrix that
/// is 235 MB at an 8B model's down_proj.
fn prepare_w_f32<'w>(
    w: &'w [f32],
    rows: usize,
    n: usize,
    dead: &[bool],
    perm: Option<&[usize]>,
) -> std::borrow::Cow<'w, [f32]> {
    // Dead columns in processing order.
    let dead_k: Vec<usize> = match perm {
        Some(p) => (0..n).filter(|&k| dead[p[k]]).collect(),
        None => (0..n).filter(|&k| dead[k]).collect(),
    };
    let mut out = match perm {
        Some(p) => reference::permute_cols(w, rows, n, p),
        None if dead_k.is_empty() => return std::borrow::Cow::Borrowed(w),
        None => w.to_vec(),
    };
    if !dead_k.is_empty() {
        for row in out.chunks_exact_mut(n) {
            for &k in &dead_k {
                row[k] = 0.0;
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Floor of GPTAQ P's scratch in floats (64 MiB), or `n × n` where that is less: the whole matrix
/// up to n = 4096, so P is then two launches; wider inputs get `n × n/16` or this, whichever is
/// larger.
const P_SCRATCH_MIN_FLOATS: usize = 1 << 24;

/// Floats of the block scratch of [`gptaq_p_blocked`] for an `n`-column input:
/// `max(n × ⌈n/16⌉₃₂, min(n², 2²⁴))`, within one binding of `max_bytes` but never less than one
/// 32-column block (`32 · n`). Monotone in `n`, so the widest input bounds the plan's solve
/// memory; and a small model's plan is not burdened with the 64 MiB floor.
pub(crate) fn p_scratch_floats(n: usize, max_bytes: u64) -> usize {
    let fit = usize::try_from(max_bytes / 4).unwrap_or(usize::MAX);
    let want = n
        .saturating_mul(n.div_ceil(16).next_multiple_of(32))
        .max(n.saturating_mul(n).min(P_SCRATCH_MIN_FLOATS));
    want.min(fit).max(32 * n.max(1))
}

/// The column blocks `[j0, j1)` of [`gptaq_p_blocked`] for a scratch of `scratch` floats.
///
/// Block `J` needs `j1 × (j1 − j0)` floats (rows `0..j1` of its columns), so the early blocks can
/// be much wider than the last for the same scratch: each block is the widest with
/// `j1 · width ≤ scratch`, a multiple of 128 columns (of 32 below 128), and the rest of the
/// columns is one block where it fits. Why: every block is two GEMM launches, each as long as its
/// longest tile, and T's longest tiles are in the early blocks (k up to n − j0) — with equal
/// widths the first blocks have only a few output tiles (rows `0..j1`) that each run the whole k
/// range while most of the GPU idles. A greedy list-scheduling model of the two products (132 SMs,
/// a tile's time ∝ its k range) gives 544 units at n = 4096 for the earlier sixteen equal blocks
/// against 99 for the one block the scratch now allows (ideal 91), and 4,222 against 3,815 at
/// 14336 (eight blocks; ideal 3,643; widths rounded to 32 instead of 128 columns would cost
/// 3,945, their diagonal tiles more work). Measured on an H200 (session 25, BENCHMARKS.md): P
/// 20.8 → 10.2 ms at n = 4096, 108.9 → 95.2 ms at 14336. The multiply-adds are the same either
/// way, and so are the results, bit for bit (the skipped terms are exact zeros).
///
/// `GPTAQ_P_BLOCKS=N` (read once) forces `N` equal blocks instead, for A/B runs on a GPU machine
/// (still within the scratch).
pub(crate) fn p_blocks(n: usize, scratch: usize) -> Vec<(usize, usize)> {
    static FORCED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = *FORCED.get_or_init(|| {
        std::env::var("GPTAQ_P_BLOCKS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&b| b > 0)
    });
    p_blocks_with(n, scratch, forced)
}

fn p_blocks_with(n: usize, scratch: usize, forced: Option<usize>) -> Vec<(usize, usize)> {
    // Whole 128-column tiles where a block is that wide: the tiles then straddle the triangles'
    // diagonals no more than the matrix's own tile grid does.
    let fit = |w: usize| if w >= 128 { w / 128 * 128 } else { w / 32 * 32 };
    let mut blocks = Vec::new();
    let mut j0 = 0;
    while j0 < n {
        let w = match forced {
            Some(count) => n
                .div_ceil(count)
                .next_multiple_of(32)
                .min(scratch / n / 32 * 32),
            // The rest in one block where it fits, else the largest w with (j0 + w)·w ≤ scratch.
            None if n.saturating_mul(n - j0) <= scratch => n - j0,
            None => {
                let (j, s) = (j0 as f64, scratch as f64);
                let mut w = fit((((j * j + 4.0 * s).sqrt() - j) / 2.0) as usize);
                while w > 32 && (j0 + w) * w > scratch {
                    w = fit(w - 1);
                }
                w
            }
        };
        let j1 = (j0 + w.max(32)).min(n);
        blocks.push((j0, j1));
        j0 = j1;
    }
    blocks
}

/// GPTAQ's `P = triu₁(α·Dp·Uᵀ)·U` (algorithm.md §2.2) in place of the permuted `D` in `dp`, from
/// the upper factor `U` (same shape and panel layout), column block by column block (`blocks`, in
/// order, from [`p_blocks`]) through a scratch of at least `j1 · (j1 − j0)` floats for each.
///
/// Dense, the two products cost 2·n³ multiply-adds — at the 4096 × 14336 down_proj shape about a
/// quarter of the whole GPTAQ solve (11.8 TFLOP). The triangles make most of it zero (the f64
/// reference `reference::gptaq_p` sums only the non-zero terms too):
/// - `T[i, j] = Σ_c Dp[i, c]·U[j, c]` has `U[j, c] = 0` for `c < j`, and only `i < j` survives
///   the mask: a column block `J = [j0, j1)` needs rows `0..j1` and `c ≥ j0`.
/// - `P[i, j] = Σ_m T[i, m]·U[m, j]` is non-zero only for `i < m ≤ j`: block `J` needs rows
///   `0..j1` and `m < j1`.
///
/// Within a block the GEMMs skip more per output tile ([`ops::KSkip`]): T's tile of
/// columns `j ≥ c0` sums only over `c ≥ c0`, and P's tile of rows `i ≥ r0` and columns `j < c1`
/// only over `r0 < m < c1`; T's tiles wholly on or below its mask's line (`i ≥ j`) are not
/// computed at all ([`ops::gemm_mat_skip`] with `upper`). That is ≈ 0.34–0.36·n³ multiply-adds
/// (T ≈ n³/6, P ≈ n³/6, plus tile granularity), 5.6× less than dense and nearly independent of
/// the blocks ([`p_blocks`]); the blocks alone (session 22) gave 0.56·n³. The skipped
/// terms are products with exact zeros, so the result is bit for bit the dense GEMMs'
/// (tests/gpu_kernels.rs checks the skipping GEMM against the dense one). (Blocking P's rows
/// into separate GEMMs instead made it slower: 0.165 → 0.20 s at 4096 × 14336 on the H100, its
/// 136 smaller GEMMs filling the GPU worse; BENCHMARKS.md session 22. The in-kernel skips keep
/// two launches per column block.)
///
/// Memory: a scratch, not a second n×n matrix (except where n × n is under the scratch's 64 MiB
/// floor, [`p_scratch_floats`]). `T` overwrites `Dp` block by block in ascending order (block
/// `J` reads `Dp[:, c ≥ j0]`, which no earlier block has overwritten), `P` overwrites `T` in
/// descending order (block `J` reads `T[:, m < j1]`, which no later block has overwritten); each
/// block goes through the scratch because a GEMM cannot write the matrix it reads (WebGPU). The
/// rows no block writes (`i ≥ j1` in block `J`) and T's skipped entries (stale scratch, copied
/// along with the block) lie on or below the diagonal; the masks overwrite them with zeros, so
/// `P` is exactly strictly upper, as the dense product of the two triangles is.
#[cfg(test)]
fn gptaq_p_blocked(
    rec: &mut crate::gpu::kernels::Recorder<'_>,
    n: usize,
    u: &GpuMatrix,
    dp: &GpuMatrix,
    scratch: &GpuBuffer<f32>,
    blocks: &[(usize, usize)],
    alpha: f32,
) -> Result<(), QuantGpuError> {
    gptaq_a_blocked(rec, n, u, dp, scratch, blocks, alpha)?;
    gptaq_p_from_a(rec, n, u, dp, scratch, blocks)
}

/// The first half of [`gptaq_p_blocked`]: `A = α·triu₁(Dp·Uᵀ)` in place of the permuted `D` in
/// `dp` — all that the deferred form ([`PForm::Deferred`]) keeps besides P's diagonal blocks.
fn gptaq_a_blocked(
    rec: &mut crate::gpu::kernels::Recorder<'_>,
    n: usize,
    u: &GpuMatrix,
    dp: &GpuMatrix,
    scratch: &GpuBuffer<f32>,
    blocks: &[(usize, usize)],
    alpha: f32,
) -> Result<(), QuantGpuError> {
    let mut next = 0;
    for &(j0, j1) in blocks {
        if j0 != next || j1 <= j0 || j1 > n || scratch.len() < j1 * (j1 - j0) {
            return Err(GpuError::Validation(format!(
                "GPTAQ P: block {j0}..{j1} of {n} columns after {next}, scratch of {} floats",
                scratch.len()
            ))
            .into());
        }
        next = j1;
    }
    if next != n {
        return Err(GpuError::Validation(format!("GPTAQ P: blocks end at {next} of {n}")).into());
    }
    for &(j0, j1) in blocks {
        // T[0..j1, J] = Dp[0..j1, j0..n]·U[J, j0..n]ᵀ; op(B)[c, j] = U[j0 + j, j0 + c] is zero
        // for c < j (U upper). Only rows i < j0 + j survive the mask: the tiles wholly on or
        // below that line are skipped, and the entries left unwritten there (stale scratch) are
        // zeroed by the mask (`triu1_scale` writes 0, never multiplies them).
        let blk = MatView::new(scratch, j1 - j0);
        ops::gemm_mat_skip(
            rec,
            j1,
            j1 - j0,
            n - j0,
            1.0,
            dp.op(0, j0),
            u.op(j0, j0).t(),
            0.0,
            blk.into(),
            ops::KSkip {
                b_lower: Some(0),
                ..Default::default()
            },
            Some(j0 as i64 - 1),
        )?;
        factor::copy_in(rec, scratch, dp, 0..j1, j0, j1 - j0)?;
    }
    triu1_scale(rec, n, dp, alpha)
}

/// Products of split operands that [`gptaq_a_split`] sums (`GPTAQ_SPLIT_F16`): 3 = `Dh·Uhᵀ +
/// Dh·Ulᵀ + Dl·Uhᵀ`, within a few times f32's round-off (`split_f16.wgsl`); 2 drops `Dl·Uhᵀ`
/// (D to f16's 11 bits, as the tensor-core statistics already round the activations it sums); 1
/// keeps only `Dh·Uhᵀ` (both operands to 11 bits, TF32's precision). Two are no more accurate
/// than one (D's rounding dominates; BENCHMARKS.md session 32). For A/B runs; the pipeline uses
/// 3.
pub(crate) const SPLIT_TERMS: usize = 3;

/// Whether the split products run as one launch each on the staged tensor-core kernels
/// (`gemm_staged_coop.wgsl`'s `SPLIT`: GPTAQ's A where [`Halves::together`], and the pending
/// flushes); `GPTAQ_SPLIT_FUSED=0` keeps three products (A) or one with K tripled (the flushes),
/// for A/B runs. Both sum the same three products of the same halves; only the order of the f32
/// additions differs.
pub(crate) fn split_fused() -> bool {
    !crate::env_is!("GPTAQ_SPLIT_FUSED", "0")
}

/// Whether GPTAQ's `A = α·triu₁(Dp·Uᵀ)` at width `n` can run on the tensor cores
/// ([`gptaq_a_split`]): a tensor-core `X·Wᵀ` kernel runs here ([`split_op`]), `n` is a multiple
/// of 128 (the staged kernels' blocks) and one n × n f16 operand fits a binding.
pub(crate) fn split_eligible(ctx: &GpuContext, n: usize) -> bool {
    n > 0
        && n.is_multiple_of(128)
        && split_op(ctx).is_some()
        && (n as u64).pow(2) * 2 <= ctx.max_binding_bytes()
}

/// The tensor-core kernel of [`gptaq_a_split`]: the staged `Nt128` where granted, else the
/// first `X·Wᵀ` kernel that runs here (every block of a multiple of 128 tiles for all of them).
/// The unstaged ones run where subgroups are not 32 wide (lavapipe: the tests' adapter).
fn split_op(ctx: &GpuContext) -> Option<ops::CoopOp> {
    ops::CoopOp::NT.into_iter().find(|op| op.available(ctx))
}

/// The split terms a solve uses: `wanted` (its [`SolveFlags::split_f16`]) unless
/// `GPTAQ_SPLIT_F16=0` / `1` / `2` / `3` sets them (0: the f32 GEMMs; A/B runs and the error
/// study of `split_a_error_study`).
fn split_terms(wanted: bool) -> usize {
    match std::env::var("GPTAQ_SPLIT_F16")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        Some(t) => t.min(3),
        None if wanted => SPLIT_TERMS,
        None => 0,
    }
}

/// Column-block width of [`gptaq_a_split`]: each block is one dense product over rows `0..j1`
/// and K `j0..n`, so wider blocks compute more of the triangles' zeros (1.11·n³/6 multiply-adds
/// per term at n = 14336 with 512, 1.22 with 1024) and narrower ones fill the GPU less (the
/// first blocks have few output tiles over a long K).
fn split_block(n: usize) -> usize {
    if n >= 8192 { 512 } else { 256 }
}

/// [`gptaq_a_blocked`] on the tensor cores: `A = α·triu₁(Dp·Uᵀ)` in place of `Dp` from split-f16
/// copies of `Dp` and `U` ([`split_operands`]; `terms` products of them summed with f32
/// accumulation, see [`SPLIT_TERMS`]), written straight into `Dp` (the products read only the
/// copies). Where `Dp` is one buffer and the staged kernels run, each product is one
/// [`ops::CoopOp::Nt128UpperTail`] launch (the 128-blocks on and above the diagonal, K from each
/// block's first column). Otherwise column block `J = [j0, j1)` is `Dp[0..j1, j0..n]·U[J,
/// j0..n]ᵀ`, one dense product per term and row panel (1.1–1.4·n³/6 multiply-adds,
/// [`split_block`]). The copies hold exact zeros outside the triangles that A reads, so the
/// blocks add nothing from there, and [`split_unscale`] applies α·2^−(s₀+s₁) and the mask.
/// Memory: four n × n f16 matrices (as much as two f32 ones) instead of the f32 path's block
/// scratch. Needs [`split_eligible`].
#[allow(clippy::too_many_arguments)]
fn gptaq_a_split(
    ctx: &GpuContext,
    rec: &mut crate::gpu::kernels::Recorder<'_>,
    n: usize,
    u: &GpuMatrix,
    dp: &GpuMatrix,
    alpha: f32,
    terms: usize,
) -> Result<(), QuantGpuError> {
    let op = split_op(ctx).filter(|_| split_eligible(ctx, n) && (1..=3).contains(&terms));
    let Some(op) = op else {
        return Err(GpuError::Validation(format!(
            "GPTAQ A on the tensor cores: n = {n} ({terms} products) is not eligible"
        ))
        .into());
    };
    let sp = split_operands(ctx, rec, n, u, dp)?;
    // The smaller products first, the leading one last.
    let all = [
        (sp.d.lo(), sp.u.hi()),
        (sp.d.hi(), sp.u.lo()),
        (sp.d.hi(), sp.u.hi()),
    ];
    let products = &all[3 - terms..];
    if !op.staged() {
        // The unstaged kernels only add: every product then adds into zeros (the mask writes
        // every entry of A, so clearing all of Dp costs one pass and nothing else).
        for (pt, buf) in dp.panels().iter().enumerate() {
            rec.clear(buf, 0, dp.panel_range(pt).len() * n)?;
        }
    }
    if let (true, Some(buf)) = (op.staged(), dp.single()) {
        // One launch per product over all of A: the blocks on and above the diagonal, each
        // summing K from its own first column on (U's zeros before it): ≈ n³/6 multiply-adds.
        let tail = ops::CoopOp::Nt128UpperTail;
        let x = ops::CoopOperand::new(sp.d.hi().0, 0, n);
        let y = ops::CoopOperand::new(sp.u.hi().0, 0, n);
        match (sp.d.together(), sp.u.together()) {
            // All three in one launch, where the halves share their buffers.
            (Some(dl), Some(ul))
                if terms == 3 && split_fused() && ops::coop_split_shape_ok_for(tail, n, n, n) =>
            {
                ops::gemm_coop_batched(
                    rec,
                    tail,
                    (n, n, n),
                    ops::CoopBatch::flat(1, 0),
                    x.split(dl),
                    y.split(ul),
                    MatView::new(buf, n),
                    false,
                )?;
            }
            _ => {
                for (i, &(x, y)) in products.iter().enumerate() {
                    ops::gemm_coop_batched(
                        rec,
                        tail,
                        (n, n, n),
                        ops::CoopBatch::flat(1, 0),
                        ops::CoopOperand::new(x.0, x.1, n),
                        ops::CoopOperand::new(y.0, y.1, n),
                        MatView::new(buf, n),
                        i > 0,
                    )?;
                }
            }
        }
        return split_unscale(rec, n, dp, &sp.maxima, alpha);
    }
    // Row panels (or the unstaged kernels): column blocks of dense products.
    let w = split_block(n);
    for j0 in (0..n).step_by(w) {
        let j1 = (j0 + w).min(n);
        for (pt, buf) in dp.panels().iter().enumerate() {
            let r = dp.panel_range(pt);
            let (a, b) = (r.start, r.end.min(j1));
            if b <= a {
                continue;
            }
            for (i, &(x, y)) in products.iter().enumerate() {
                ops::gemm_coop_batched(
                    rec,
                    op,
                    (b - a, j1 - j0, n - j0),
                    ops::CoopBatch::flat(1, 0),
                    ops::CoopOperand::new(x.0, x.1 + a * n + j0, n),
                    ops::CoopOperand::new(y.0, y.1 + j0 * n + j0, n),
                    MatView::new(buf, n).at((a - r.start) * n + j0),
                    i > 0 || !op.staged(),
                )?;
            }
        }
    }
    split_unscale(rec, n, dp, &sp.maxima, alpha)
}

/// The split-f16 copies of [`gptaq_a_split`]'s operands (`split_f16.wgsl`): `Dp ≈ (dh + dl)·2^−s₀`
/// with zeros on and below the diagonal, `U ≈ (uh + ul)·2^−s₁` with zeros below it, each n × n
/// dense; `maxima` holds the two largest magnitudes the scales come from.
struct SplitOperands {
    d: Halves,
    u: Halves,
    maxima: GpuBuffer<u32>,
}

/// One operand's two n × n f16 halves: in one buffer, lo `n²` elements after hi, where that fits
/// a binding (the staged tensor-core kernels then read both halves in one product,
/// [`ops::CoopOperand::split`]), else in two. The limit is the panel size
/// ([`GpuContext::panel_bytes`]: the binding limit, or the tests' smaller cap).
struct Halves {
    hi: GpuBuffer<half::f16>,
    lo: Option<GpuBuffer<half::f16>>,
    nn: usize,
}

impl Halves {
    fn new(ctx: &GpuContext, what: &str, n: usize) -> Result<Self, GpuError> {
        let nn = n * n;
        // Every element is written (the panels cover all rows).
        Ok(if (2 * nn * 2) as u64 <= ctx.panel_bytes() {
            Self {
                hi: ctx.scratch::<half::f16>(&format!("split {what} hi, lo"), 2 * nn)?,
                lo: None,
                nn,
            }
        } else {
            Self {
                hi: ctx.scratch::<half::f16>(&format!("split {what} hi"), nn)?,
                lo: Some(ctx.scratch::<half::f16>(&format!("split {what} lo"), nn)?),
                nn,
            }
        })
    }

    fn hi(&self) -> (&GpuBuffer<half::f16>, usize) {
        (&self.hi, 0)
    }

    fn lo(&self) -> (&GpuBuffer<half::f16>, usize) {
        match &self.lo {
            Some(b) => (b, 0),
            None => (&self.hi, self.nn),
        }
    }

    /// Both halves in one buffer: `Some(lo's offset)` (for [`ops::CoopOperand::split`]).
    fn together(&self) -> Option<usize> {
        self.lo.is_none().then_some(self.nn)
    }
}

fn split_operands(
    ctx: &GpuContext,
    rec: &mut crate::gpu::kernels::Recorder<'_>,
    n: usize,
    u: &GpuMatrix,
    dp: &GpuMatrix,
) -> Result<SplitOperands, QuantGpuError> {
    let n32 = u32_of("cols", n)?;
    if !n.is_multiple_of(4) || u.rows() != n || u.cols() != n || dp.rows() != n || dp.cols() != n {
        return Err(GpuError::Validation(format!(
            "split operands: U {}×{} and D {}×{} for n = {n} (a multiple of 4)",
            u.rows(),
            u.cols(),
            dp.rows(),
            dp.cols()
        ))
        .into());
    }
    let sp = SplitOperands {
        d: Halves::new(ctx, "D", n)?,
        u: Halves::new(ctx, "U", n)?,
        maxima: ctx.zeros::<u32>("split maxima", 2)?,
    };
    let operands = [(dp, 0u32, 1u32, &sp.d), (u, 1, 0, &sp.u)];
    // Both maxima are complete before either split reads them (passes run in order).
    for entry in ["absmax", "split"] {
        for &(m, slot, tri, halves) in &operands {
            let (hi, lo) = (halves.hi().0, halves.lo());
            for (pt, buf) in m.panels().iter().enumerate() {
                let r = m.panel_range(pt);
                let params = SplitParams {
                    rows: u32_of("split rows", r.len())?,
                    n: n32,
                    r0: u32_of("split row", r.start)?,
                    dst: u32_of("split offset", r.start * n)?,
                    slot,
                    tri,
                    alpha: 0.0,
                    lo: u32_of("split lo offset", lo.1)?,
                };
                let groups =
                    groups_1d(u32_of("split workgroups", (r.len() * n / 4).div_ceil(256))?);
                let mut bindings = vec![buf.binding(), sp.maxima.binding()];
                if entry == "split" {
                    // One buffer for both halves: bound twice, written at disjoint offsets.
                    bindings.extend([hi.binding(), lo.0.binding()]);
                }
                rec.dispatch(&SPLIT_F16, entry, &[], &params, &bindings, groups)?;
            }
        }
    }
    Ok(sp)
}

/// `t ← α·2^−(s₀+s₁)·triu₁(t)` in place ([`split_operands`]' scales; `split_f16.wgsl`'s
/// `unscale`), one launch per row panel.
fn split_unscale(
    rec: &mut crate::gpu::kernels::Recorder<'_>,
    n: usize,
    t: &GpuMatrix,
    maxima: &GpuBuffer<u32>,
    alpha: f32,
) -> Result<(), QuantGpuError> {
    for (pt, buf) in t.panels().iter().enumerate() {
        let r = t.panel_range(pt);
        rec.dispatch(
            &SPLIT_F16,
            "unscale",
            &[],
            &SplitParams {
                rows: u32_of("split rows", r.len())?,
                n: u32_of("cols", n)?,
                r0: u32_of("split row", r.start)?,
                dst: 0,
                slot: 0,
                tri: 1,
                alpha,
                lo: 0,
            },
            &[buf.binding(), maxima.binding()],
            groups_1d(u32_of("split workgroups", (r.len() * n / 4).div_ceil(256))?),
        )?;
    }
    Ok(())
}

/// The second half of [`gptaq_p_blocked`]: `P = A·U` in place of `A` (from
/// [`gptaq_a_blocked`], with the same blocks and scratch).
fn gptaq_p_from_a(
    rec: &mut crate::gpu::kernels::Recorder<'_>,
    n: usize,
    u: &GpuMatrix,
    dp: &GpuMatrix,
    scratch: &GpuBuffer<f32>,
    blocks: &[(usize, usize)],
) -> Result<(), QuantGpuError> {
    for &(j0, j1) in blocks.iter().rev() {
        // P[0..j1, J] = T[0..j1, 0..j1]·U[0..j1, J]: T[i, m] is zero for m ≤ i (masked) and
        // U[m, j0 + j] for m > j0 + j, so an output tile sums only over i < m ≤ j.
        let blk = MatView::new(scratch, j1 - j0);
        ops::gemm_mat_skip(
            rec,
            j1,
            j1 - j0,
            j1,
            1.0,
            dp.op(0, 0),
            u.op(0, j0),
            0.0,
            blk.into(),
            ops::KSkip {
                a_upper: Some(1),
                b_upper: Some(j0 as i64),
                ..Default::default()
            },
            None,
        )?;
        factor::copy_in(rec, scratch, dp, 0..j1, j0, j1 - j0)?;
    }
    triu1_scale(rec, n, dp, 1.0)
}

/// P's diagonal blocks for the deferred form ([`PForm::Deferred`]): for every sweep block
/// `b = [i1, i2)`, `P[b, b] = A[b, b]·U[b, b]` (`P[i, j] = Σ_{i<m≤j} A[i, m]·U[m, j]` with i, j in
/// the block keeps m in it, §2.2), stacked into `out` (`n × bs`, the block's rows at its own rows,
/// columns `0..i2 − i1`). The full blocks of each row panel are one batched launch (their
/// diagonal steps `bs·(n + 1)` apart in A and U, panels being whole blocks), the last partial
/// block a launch of its own; each product sums only over `i < m ≤ j` (A strictly upper, U upper),
/// so the stacked blocks are exactly strictly upper, like P.
fn gptaq_p_diag(
    rec: &mut crate::gpu::kernels::Recorder<'_>,
    n: usize,
    bs: usize,
    u: &GpuMatrix,
    a: &GpuMatrix,
    out: &GpuBuffer<f32>,
) -> Result<(), QuantGpuError> {
    let skip = ops::KSkip {
        a_upper: Some(1),
        b_upper: Some(0),
        ..Default::default()
    };
    if bs == 0 || out.len() < n * bs || a.panel_rows() != u.panel_rows() {
        return Err(GpuError::Validation(format!(
            "GPTAQ P diagonal blocks: block size {bs}, {} floats for n = {n}, panels of {} and {} rows",
            out.len(),
            a.panel_rows(),
            u.panel_rows()
        ))
        .into());
    }
    let full_end = n / bs * bs;
    for pt in 0..a.panels().len() {
        let r = a.panel_range(pt);
        let end = r.end.min(full_end);
        if end <= r.start {
            continue;
        }
        if !r.start.is_multiple_of(bs) {
            return Err(GpuError::Validation(format!(
                "GPTAQ P diagonal blocks: panel at row {} is not on a block boundary of {bs}",
                r.start
            ))
            .into());
        }
        let step = bs * n + bs;
        ops::gemm_batched(
            rec,
            (end - r.start) / bs,
            (step, step, bs * bs),
            bs,
            bs,
            bs,
            1.0,
            a.view(r.start, r.start),
            u.view(r.start, r.start),
            0.0,
            MatView::new(out, bs).at(r.start * bs),
            skip,
        )?;
    }
    if full_end < n {
        let cnt = n - full_end;
        ops::gemm_mat_skip(
            rec,
            cnt,
            cnt,
            cnt,
            1.0,
            a.op(full_end, full_end),
            u.op(full_end, full_end),
            0.0,
            MatView::new(out, bs).at(full_end * bs).into(),
            skip,
            None,
        )?;
    }
    Ok(())
}

/// A's diagonal blocks for the fused sweep ([`Sweep::fused`]): for every sweep block
/// `b = [i1, i2)`, `A[b, b]` stacked into `out` from element `off` (`n × bs`, the block's rows at
/// their own rows, columns `0..i2 − i1`, zero beyond), the same layout as P's
/// ([`gptaq_p_diag`]), so that the sweep reads both through one binding. One launch per row panel
/// of A (`quant_pending.wgsl`'s `a_diag_blocks`). Made for every deferred P, fused or not (12 µs
/// and n·bs floats at n = 14336), so that terms shared through [`SharedFactor`] serve both.
fn gptaq_a_diag(
    rec: &mut crate::gpu::kernels::Recorder<'_>,
    n: usize,
    bs: usize,
    a: &GpuMatrix,
    out: &GpuBuffer<f32>,
    off: usize,
) -> Result<(), QuantGpuError> {
    if bs == 0 || out.len() < off + n * bs {
        return Err(GpuError::Validation(format!(
            "GPTAQ A diagonal blocks: block size {bs}, {} floats for n = {n} from {off}",
            out.len()
        ))
        .into());
    }
    for pt in 0..a.panels().len() {
        let r = a.panel_range(pt);
        let total = u32_of("A diagonal elements", r.len() * bs)?;
        rec.dispatch(
            &QUANT_PENDING,
            "a_diag_blocks",
            &[],
            &PendingParams {
                rows: u32_of("rows", r.len())?,
                n: u32_of("cols", n)?,
                i1: u32_of("panel row", r.start)?,
                cnt: u32_of("block size", bs)?,
                lde: 0,
                eoff: u32_of("A diagonal offset", off)?,
                _p: [0; 2],
            },
            &[a.panels()[pt].binding(), out.binding()],
            groups_1d(total.div_ceil(256)),
        )?;
    }
    Ok(())
}

/// `m ← alpha·triu₁(m)` in place (`quant_mask.wgsl`), one launch per row panel.
fn triu1_scale(
    rec: &mut crate::gpu::kernels::Recorder<'_>,
    n: usize,
    m: &GpuMatrix,
    alpha: f32,
) -> Result<(), QuantGpuError> {
    let n32 = u32_of("cols", n)?;
    let gx = u32_of("mask workgroups", n.div_ceil(16))?;
    for (pt, tp) in m.panels().iter().enumerate() {
        let r = m.panel_range(pt);
        rec.dispatch(
            &QUANT_MASK,
            "triu1_scale",
            &[],
            &NParams {
                n: n32,
                alpha,
                r0: u32_of("panel row", r.start)?,
                rows: u32_of("panel rows", r.len())?,
            },
            &[tp.binding()],
            [gx, u32_of("mask workgroups", r.len().div_ceil(16))?, 1],
        )?;
    }
    Ok(())
}

/// The whole H on the host in f64, checked finite (only for the rare RTN-fallback paths).
fn read_h64(ctx: &GpuContext, h: &GpuMatrix, nn: usize) -> Result<Vec<f64>, QuantGpuError> {
    let h32 = ctx.read_matrix(h)?;
    super::quantizer::check_matrix("H", &h32, nn)?;
    Ok(h32.iter().map(|&v| f64::from(v)).collect())
}

/// How GPTAQ's `P = α·triu₁(Dp·Uᵀ)·U` (algorithm.md §2.2) reaches the sweep.
///
/// Write `A = α·triu₁(Dp·Uᵀ)`, so `P[i, j] = Σ_{i<m≤j} A[i, m]·U[m, j]`. The reference adds
/// `q_i·P[i, j]` to every later column `j` of a later block when block `b ∋ i` is done (the
/// block's final values `q_i`; §2.2 "Subtlety"). Split by where the middle index `m` lies:
/// - `m` in block `b` itself: `Σ_m (Q_b·triu₁(A[b, b]))[:, m]·U[m, j]` — the same shape as GPTQ's
///   `Err_b·U[b, j]`, so it joins the errors of that update;
/// - `m` in a later block `c`: `(Q_b·A[b, m])·U[m, j]` can wait until block `c` — the same as
///   GPTQ's errors of column `m` — if `Q_b·A[b, m]` is kept meanwhile. The pending matrix
///   `G[:, m] = Σ_{finished b} Q_b·A[b, m]` (rows × n) keeps it.
///
/// So per block `c = [i1, i2)` ([`PForm::Deferred`]): `W[:, c] += G[:, c]·U[c, c]` (U's upper
/// triangle with its diagonal: every pending term whose `m` and `j` both lie in `c`) before the
/// sweep — which then sees exactly the reference's W, so the stale-W group parameters read the
/// same values — then the sweep with P's diagonal block `P[c, c] = A[c, c]·U[c, c]` (the in-block
/// term with the pre-quantization values, unchanged), then `G[:, c] += Q_c·triu₁(A[c, c])`,
/// `E = Err_c − G[:, c]` (`quant_pending.wgsl`), `W[:, i2:] −= E·U[c, i2:]` and
/// `G[:, i2:] += Q_c·A[c, i2:]` (these two for several blocks at once, [`lazy_blocks`]). Every
/// term of the reference appears once, before the column it lands on is quantized; only the
/// order of the f32 sums differs.
///
/// What it saves: the second n×n product `P = A·U` (≈ n³/6 multiply-adds, half of P's cost; about
/// 29 ms of a 4096 × 14336 solve on the H100, BENCHMARKS.md session 27), and the staging copies of
/// P's rows, for one rows × n pending matrix (235 MB at down_proj) and the n × 128 diagonal
/// blocks. The cross-block multiply-adds stay those of the fused `[Err | −W1]·[U; P]` GEMM (a
/// GEMM for W and one for G instead of one with K doubled; measured, the pair cost 16 ms more
/// per 4096 × 14336 solve than the fused GEMM until the lazy updates batched them).
///
/// Where a dynamic group's columns span two blocks (the group size does not divide the block
/// size), the group's stale-W parameters would read columns whose pending terms are not applied
/// yet; those configurations keep the whole P ([`PForm::Whole`]), and so does
/// `GPTAQ_P_FORM=whole` (read once; A/B runs on a GPU machine).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PForm {
    /// P materialized in the permuted D's storage; `W[:, i2:] −= [Err | −W1]·[U; P]`.
    Whole,
    /// Only `A` (in the permuted D's storage) and P's diagonal blocks; see the type's docs.
    Deferred,
}

impl PForm {
    /// The form for a solve with these groups (`dynamic`: groups found during the sweep, of `gs`
    /// processing columns) and sweep blocks of `bs` columns.
    fn choose(dynamic: bool, gs: usize, bs: usize) -> Self {
        if crate::env_is!("GPTAQ_P_FORM", "whole") || group_spans_blocks(dynamic, gs, bs) {
            PForm::Whole
        } else {
            PForm::Deferred
        }
    }
}

/// Whether a dynamic group's columns can span two sweep blocks (the group size does not divide the
/// block size): the stale-W group parameters then read columns of later blocks, which must hold
/// every earlier block's update when they are read — no deferred P ([`PForm`]), no lazy
/// updates across blocks ([`lazy_blocks`]).
fn group_spans_blocks(dynamic: bool, gs: usize, bs: usize) -> bool {
    dynamic && (gs == 0 || !bs.is_multiple_of(gs))
}

/// Blocks per cross-block update: two-level lazy updates. GPTQ's lazy batch updates apply a
/// block's errors to all later columns once per block (`W[:, i2:] −= Err·U[block, i2:]`, K = the
/// block size): each such GEMM reads and writes the whole rows × (n − i2) rest of W for only 128
/// multiply-adds per element (at 4096 × 14336 on the H100 ≈ 0.33 ms per launch, of it ≈ 0.15 ms
/// independent of K; BENCHMARKS.md session 28). Here the errors of `L` consecutive blocks are kept
/// side by side and applied in one GEMM with K = L·block after the L-th; before each block's
/// sweep a small catch-up GEMM applies the errors of the group's earlier blocks to this block's
/// own columns only (K = up to (L − 1)·block, N = the block). Every column still receives every
/// update before it is quantized — the same terms, summed in another f32 order. GPTAQ's pending
/// matrix (the deferred P) is updated the same way. Where a dynamic group spans blocks
/// ([`group_spans_blocks`]) and with the whole P (its fused `[Err | −W1]·[U; P]` GEMM), L = 1.
/// `GPTAQ_LAZY_BLOCKS=L` (read once, ≥ 1) sets L for A/B runs; the default is [`LAZY_BLOCKS`].
pub(crate) fn lazy_blocks() -> usize {
    static FORCED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    FORCED
        .get_or_init(|| {
            std::env::var("GPTAQ_LAZY_BLOCKS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&l| l > 0)
        })
        .unwrap_or(LAZY_BLOCKS)
}

/// The default of [`lazy_blocks`]. On an H100 at 4096 × 14336 (BENCHMARKS.md session 38) L = 2
/// made GPTAQ 7 ms slower; L = 8 halves the flushes and W's cross-block launches but doubles the
/// catch-ups' K, and came out within 2 ms either way in wall time — not worth changing every
/// result's f32 summation order.
const LAZY_BLOCKS: usize = 4;

/// GPTAQ's precomputed terms for one `(H, D)`: [`PForm`]'s matrix (P, or A) in the permuted D's
/// storage, and for the deferred form P's diagonal blocks and A's below them (`2·n × bs`).
struct GptaqTerms {
    m: GpuMatrix,
    diag: Option<GpuBuffer<f32>>,
}

impl GptaqTerms {
    /// Which form these terms are: only the deferred form keeps P's diagonal blocks.
    fn form(&self) -> PForm {
        if self.diag.is_some() {
            PForm::Deferred
        } else {
            PForm::Whole
        }
    }
}

/// What the modules of one true-sequential group share when they are solved one after another
/// from the same `H` and `D` with the same config (q/k/v; gate/up): diag(H), the inverse factor
/// `U` (or its failure) and GPTAQ's `P`. The first solve computes them, the later ones reuse them:
/// the same computation on the same inputs, so the results are bit for bit those of separate
/// solves (tests/quant_gpu.rs), without a factorisation and a P per module. The layer lab keeps
/// one per capture: its re-solves reuse the factor while act-order, damping and block size stay
/// (bits, groups, method and α do not change it) and P while α and D do. One
/// entry: the factor is recognised by the address of `H` and P by that of `D`, which must stay
/// alive and unchanged while the cache is.
#[derive(Default)]
pub struct SharedFactor {
    entry: Option<SharedEntry>,
    hits: usize,
}

#[derive(Clone)]
struct SharedEntry {
    h: usize,
    /// The settings the factor was taken with.
    key: FactorKey,
    h_diag32: Vec<f32>,
    /// `Err`: no damping made H factorable (every module falls back to RTN with this reason).
    factor: Result<Arc<Damped<GpuMatrix>>, String>,
    /// Where the factor was taken speculatively, its pivots' flag (each solve checks it when it
    /// finishes: [`SubmittedSolve`]).
    check: Option<Arc<FactorCheck>>,
    /// GPTAQ's terms from this factor, and what else they were computed from.
    p: Option<(PKey, Arc<GptaqTerms>)>,
}

/// What the inverse factor depends on besides H: the processing order (act-order), the damping
/// and its retries, and the block size (U's panels hold whole blocks). A pipeline group's modules
/// share one config; the layer lab's re-solves of one capture change bits, groups, method and α
/// (which leave the factor as it is) as well as these (which do not).
#[derive(Clone, Copy, Debug, PartialEq)]
struct FactorKey {
    act_order: bool,
    damp: f64,
    damp_increment: f64,
    bs: usize,
}

impl FactorKey {
    fn of(cfg: &QuantConfig, bs: usize) -> Self {
        Self {
            act_order: cfg.act_order,
            damp: cfg.damp_percent,
            damp_increment: cfg.damp_auto_increment,
            bs,
        }
    }
}

/// What GPTAQ's terms depend on besides the factor and their form ([`GptaqTerms::form`]): D (by
/// address), α and the precision of A ([`split_terms`]).
#[derive(Clone, Copy, Debug, PartialEq)]
struct PKey {
    d: usize,
    alpha: f64,
    split_terms: usize,
}

impl SharedFactor {
    /// Solves that reused an entry.
    pub fn hits(&self) -> usize {
        self.hits
    }
}

fn addr(m: &GpuMatrix) -> usize {
    std::ptr::from_ref(m) as usize
}

/// GPTQ / GPTAQ solve of one module on the GPU. Same inputs and semantics as
/// [`reference::quantize_reference`] (see there and the module docs for the f32 deviations), except
/// that `h` (`[cols, cols]`) and `d` (`[cols, cols]`, GPTAQ only) are GPU matrices (any panel
/// layout, gpu/matrix.rs). Neither is modified. `d = None` with `Method::Gptaq` is GPTQ (like the
/// reference).
///
/// Errors: `Method::Rtn` (not a solve), shape mismatch, non-finite `w`/`h`, invalid config,
/// block size beyond the kernel's workgroup memory, GPU failures. A Hessian that cannot be factored
/// is not an error: the result is RTN with [`Fallback::Rtn`], like the reference.
pub fn quantize_gpu(
    ctx: &GpuContext,
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &GpuMatrix,
    d: Option<&GpuMatrix>,
    cfg: &QuantConfig,
) -> Result<GpuSolve, QuantGpuError> {
    let opts = SolveOptions {
        host_q: true,
        speculate: true,
        ..SolveOptions::default()
    };
    // `split_f16` stays off unless `GPTAQ_SPLIT_F16` asks (`split_terms`).
    solve(ctx, w, None, rows, cols, h, d, cfg, None, opts)?.finish(ctx)
}

/// [`quantize_gpu`] when `W` is also on the GPU already (`w_gpu`, the same values as `w`; the
/// pipeline's layer weights): the solve's working copy of W is then made on the GPU instead of
/// uploaded — a copy where the preparation leaves W as it is (no act-order, no dead column), a
/// gather (`gather_cols`) where act-order permutes it or dead columns are zeroed. On an 8B model
/// a module's W is up to 235 MB, and the solves of a layer moved 0.8 GiB over the host link
/// before, through the driver's staging. `w` is still read on the host (the finiteness check,
/// the reference's per-row and static-group params, the RTN fallbacks).
///
/// Unlike [`quantize_gpu`], `result.q` is left empty (RTN fallbacks aside): Q is in
/// [`GpuSolve::q`] on the GPU, and [`QuantResult::weights`] rebuilds it exactly from the codes, so
/// the pipeline neither reads rows·cols floats back per module nor keeps them on the host.
///
/// `shared`: a [`SharedFactor`] (a pipeline group's, or the layer lab's for one capture), filled
/// by a solve and reused by the next ones with the same `h` and factor settings (P: also `d`
/// and α).
#[allow(clippy::too_many_arguments)]
pub fn quantize_gpu_resident(
    ctx: &GpuContext,
    w: &[f32],
    w_gpu: Option<&GpuBuffer<f32>>,
    rows: usize,
    cols: usize,
    h: &GpuMatrix,
    d: Option<&GpuMatrix>,
    cfg: &QuantConfig,
    shared: Option<&mut SharedFactor>,
) -> Result<GpuSolve, QuantGpuError> {
    submit_gpu_resident(
        ctx,
        w,
        w_gpu,
        rows,
        cols,
        h,
        d,
        cfg,
        shared,
        SolveFlags::default(),
    )?
    .finish(ctx)
}

/// [`quantize_gpu_resident`] up to the GPU's work being submitted: [`Solving::finish`] then waits
/// for the results. Solving a group's modules one after another this way (all submitted, then all
/// finished) keeps the GPU from draining between them. Q is on the GPU at once
/// ([`Solving::q`]), final unless the finish replaces it (an RTN fallback, or a solve again where
/// the speculative factor failed: [`GpuSolve::q`] is then the new Q).
///
/// `flags`: how the solve runs ([`SolveFlags`]).
#[allow(clippy::too_many_arguments)]
pub fn submit_gpu_resident<'a>(
    ctx: &GpuContext,
    w: &'a [f32],
    w_gpu: Option<&GpuBuffer<f32>>,
    rows: usize,
    cols: usize,
    h: &'a GpuMatrix,
    d: Option<&'a GpuMatrix>,
    cfg: &'a QuantConfig,
    shared: Option<&mut SharedFactor>,
    flags: SolveFlags,
) -> Result<Solving<'a>, QuantGpuError> {
    solve(
        ctx,
        w,
        w_gpu,
        rows,
        cols,
        h,
        d,
        cfg,
        shared,
        SolveOptions {
            speculate: flags.speculate,
            split_f16: flags.split_f16,
            ..SolveOptions::default()
        },
    )
}

/// How a pipeline solve runs, beside what it solves ([`submit_gpu_resident`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SolveFlags {
    /// The factor's first attempt is taken without waiting for its pivots' flag
    /// ([`factor::upper_inverse_factor`] with `speculate`), so the host records the sweep while
    /// the GPU factors. Its buffers then outlive the factor's host code until the GPU is done
    /// with them, so memory-bound callers (the pipeline's plans without the buffer pool) pass
    /// `false`.
    pub speculate: bool,
    /// GPTAQ's `A = α·triu₁(Dp·Uᵀ)`, the largest product of its solve (n³/6 multiply-adds), on the
    /// tensor cores from split-f16 operands (`split_f16.wgsl`, within a few times f32's
    /// round-off) where the width is a multiple of 128 and the staged or unstaged tensor-core
    /// kernels run: the pipeline's tensor-core runs, whose plan counts its four n × n f16
    /// copies. `GPTAQ_SPLIT_F16=0` turns it off, `=1`/`2`/`3` forces it with that many products.
    /// With it the deferred P's pending flushes `G += Q·A` run on the tensor cores from split
    /// operands as well (`quant::flush`; three products), where the rows and the width are
    /// multiples of the kernel's block; `GPTAQ_SPLIT_FLUSH=0` keeps them f32.
    pub split_f16: bool,
}

impl Default for SolveFlags {
    /// What [`quantize_gpu`] and [`quantize_gpu_resident`] do: speculate, f32 products.
    fn default() -> Self {
        Self {
            speculate: true,
            split_f16: false,
        }
    }
}

/// Step 2 of the module docs: D permuted (and its dead columns zeroed) into U's panel layout by
/// `gather_sym` through the perm/dead table `gmeta_d`, then A = α·triu₁(Dp·Uᵀ) in its place,
/// and either P = A·U there ([`PForm::Whole`]) or P's diagonal blocks beside it
/// ([`PForm::Deferred`]). Submits `rec` (replacing it with a fresh recorder) so that the block
/// scratch is freed before the sweep.
#[allow(clippy::too_many_arguments)]
fn gptaq_terms<'c>(
    ctx: &'c GpuContext,
    rec: &mut crate::gpu::kernels::Recorder<'c>,
    (n, bs): (usize, usize),
    gu: &GpuMatrix,
    d: &GpuMatrix,
    gmeta_d: &GpuBuffer<u32>,
    form: PForm,
    alpha: f32,
    split: usize,
) -> Result<GptaqTerms, QuantGpuError> {
    let n32 = u32_of("cols", n)?;
    let split = if split_eligible(ctx, n) { split } else { 0 };
    // Dp (then T, then P) shares U's panel layout (same shape and alignment). The gathers below
    // write every element (each once, from the source panel holding its row), so it is not
    // cleared first (0.26 ms at n = 14336 on an H100, BENCHMARKS.md session 38).
    let dp = ctx.matrix_scratch("quant D perm", n, n, gu.panel_rows())?;
    if dp.panel_rows() != gu.panel_rows() {
        return Err(QuantGpuError::Gpu(GpuError::Validation(format!(
            "P panels of {} rows differ from U's {}",
            dp.panel_rows(),
            gu.panel_rows()
        ))));
    }
    let scratch_len = p_scratch_floats(n, ctx.panel_bytes());
    let blocks = p_blocks(n, scratch_len);
    // The f32 path's block scratch; the split path needs none for A (the whole P's second product
    // allocates it once A is done).
    let mut scratch = if split > 0 {
        None
    } else {
        Some(ctx.zeros::<f32>("quant P block", scratch_len)?)
    };
    let gx = n.div_ceil(16) as u32;
    for pp in dp.panel_pairs(d) {
        rec.dispatch(
            &QUANT_GATHER,
            "gather_sym",
            &[],
            &GatherParams {
                n: n32,
                rows: crate::gpu::matrix::PanelRows::new(&pp.dst_rows, &pp.src_rows)?,
                _p: [0; 3],
            },
            &[pp.src.binding(), gmeta_d.binding(), pp.dst.binding()],
            [
                gx,
                u32_of("gather workgroups", pp.dst_rows.len().div_ceil(16))?,
                1,
            ],
        )?;
    }
    match &scratch {
        Some(s) => gptaq_a_blocked(rec, n, gu, &dp, s, &blocks, alpha)?,
        None => gptaq_a_split(ctx, rec, n, gu, &dp, alpha, split)?,
    }
    let diag = match form {
        PForm::Whole => {
            let s = match scratch.take() {
                Some(s) => s,
                None => {
                    // The split copies are gone once this runs (the plan counts them or the
                    // scratch, not both).
                    std::mem::replace(rec, ctx.recorder()).submit();
                    ctx.zeros::<f32>("quant P block", scratch_len)?
                }
            };
            gptaq_p_from_a(rec, n, gu, &dp, &s, &blocks)?;
            scratch = Some(s);
            None
        }
        PForm::Deferred => {
            // P's diagonal blocks, then A's (the fused sweep's, `Sweep::fused`).
            let diag = ctx.zeros::<f32>("quant P and A diagonal blocks", 2 * n * bs)?;
            gptaq_p_diag(rec, n, bs, gu, &dp, &diag)?;
            gptaq_a_diag(rec, n, bs, &dp, &diag, n * bs)?;
            Some(diag)
        }
    };
    // Submit now, so that the scratch can be freed early (wgpu keeps recorded buffers
    // alive until their commands have run).
    std::mem::replace(rec, ctx.recorder()).submit();
    drop(scratch);
    Ok(GptaqTerms { m: dp, diag })
}

/// One solve's blocked sweep (step 3 of the module docs) and what it reads and writes: per block
/// the lazy updates' catch-up ([`lazy_blocks`]), the deferred P's injection ([`PForm`]),
/// `quant_sweep.wgsl`, the column losses, and the cross-block updates.
struct Sweep<'a> {
    ctx: &'a GpuContext,
    rows: usize,
    n: usize,
    bs: usize,
    /// Rows per sweep workgroup ([`sweep_rows`]) of `sweep_block`.
    rchunk: usize,
    /// The sweep's kernel ([`SweepKernel::for_blocks`]).
    sweep_kernel: SweepKernel,
    /// The deferred P's per-block steps inside `sweep_lanes` ([`fuse_pending`]): before each
    /// block's sweep `W[:, c] += G[:, c]·U[c, c]`, after it `E = Err − (G[:, c] + Q·triu₁(A[c, c]))`
    /// (two small GEMMs and `err_minus_pending` per block otherwise); the pure errors then go to
    /// the error buffer's last slot, `loff`, for the column loss.
    fused: bool,
    /// The column loss's slot in `gerr` (the block's own error slot unless `fused`).
    loff: Option<usize>,
    /// Blocks per cross-block update ([`lazy_blocks`], 1 where it does not apply).
    lazy: usize,
    /// Row stride of `gerr`: `lazy` error slots, and as many −Q slots with GPTAQ (then the
    /// column loss's slot where `fused`).
    lde: usize,
    spec: &'a QuantizerSpec,
    dynamic: bool,
    gs: usize,
    /// The working W (processing order).
    gw: &'a GpuBuffer<f32>,
    /// The inverse-Hessian factor U.
    gu: &'a GpuMatrix,
    /// GPTAQ's P or A and P's diagonal blocks ([`PForm`]); `None` for GPTQ.
    gp: Option<&'a GptaqTerms>,
    /// The deferred P's pending matrix G.
    pending: Option<&'a GpuBuffer<f32>>,
    /// G's flushes on the tensor cores ([`flush::FlushSplit`]; with `pending` only).
    fsplit: Option<&'a flush::FlushSplit>,
    /// The whole P's `[U; P]` block-row staging.
    stage: Option<&'a GpuBuffer<f32>>,
    /// Bound in P's place for GPTQ (bindings are fixed per pipeline).
    dummy: Option<&'a GpuBuffer<f32>>,
    gmeta: &'a GpuBuffer<u32>,
    gptab: &'a GpuBuffer<f32>,
    gcodes: &'a GpuBuffer<u32>,
    gerr: &'a GpuBuffer<f32>,
    gloss: &'a GpuBuffer<f32>,
    gcolloss: &'a GpuBuffer<f32>,
}

impl<'a> Sweep<'a> {
    /// Records every block's work into `rec` (submitting every 256 dispatches), returning the
    /// recorder with the last blocks' work unsubmitted.
    fn run(
        &self,
        mut rec: crate::gpu::kernels::Recorder<'a>,
        prof: &mut Profile,
    ) -> Result<crate::gpu::kernels::Recorder<'a>, QuantGpuError> {
        let Sweep {
            ctx,
            rows,
            n,
            bs,
            rchunk,
            sweep_kernel,
            fused,
            loff,
            lazy,
            lde,
            spec,
            dynamic,
            gs,
            gw,
            gu,
            gp,
            pending,
            fsplit,
            stage,
            dummy,
            gmeta,
            gptab,
            gcodes,
            gerr,
            gloss,
            gcolloss,
        } = *self;
        let n32 = u32_of("cols", n)?;
        let gptaq = gp.is_some();
        let wgs = groups_1d(u32_of("sweep workgroups", rows.div_ceil(rchunk))?);
        let lane_wgs = groups_1d(u32_of("sweep workgroups", rows.div_ceil(SWEEP_LANE_ROWS))?);
        // The updates owed by the blocks whose errors sit in `gerr`'s first `k / bs` slots (rows
        // `first .. first + k` of U and A) to the columns `c0 .. c0 + width`: W −= E·U and, with the
        // deferred P, G += Q·A (the sweep left −Q in the second half of the slots).
        // `split`: G's flush of blocks first..c0 on the tensor cores (`flush::FlushSplit`,
        // flush number c0 / (L·bs) − 1) instead of in f32 here.
        let lazy_update = |rec: &mut crate::gpu::kernels::Recorder<'_>,
                           first: usize,
                           k: usize,
                           c0: usize,
                           width: usize,
                           split: Option<&flush::FlushSplit>|
         -> Result<(), QuantGpuError> {
            ops::gemm_mat(
                rec,
                rows,
                width,
                k,
                -1.0,
                MatView::new(gerr, lde).into(),
                gu.op(first, c0),
                1.0,
                MatView::new(gw, n).at(c0).into(),
            )?;
            if let (Some(t), Some(g), Some(fs)) = (gp, pending, split) {
                let neg_q = flush::View {
                    buf: gerr,
                    src: lazy * bs,
                    ld: lde,
                    rows,
                    cols: k,
                };
                fs.flush(rec, c0 / (lazy * bs) - 1, neg_q, &t.m, (first, c0), g)?;
            } else if let (Some(t), Some(g)) = (gp, pending) {
                ops::gemm_mat(
                    rec,
                    rows,
                    width,
                    k,
                    -1.0,
                    MatView::new(gerr, lde).at(lazy * bs).into(),
                    t.m.op(first, c0),
                    1.0,
                    MatView::new(g, n).at(c0).into(),
                )?;
            }
            Ok(())
        };
        for i1 in (0..n).step_by(bs) {
            let i2 = (i1 + bs).min(n);
            let cnt = i2 - i1;
            // The panel of U (and P, same layout) holding this block's rows.
            let (up, urow) = gu.locate(i1);
            // Where the sweep reads the in-block P: (buffer, prow0, ldp, pcol0), quant_sweep.wgsl.
            let (pp, prow0, ldp, pcol0) = match (gp, dummy) {
                (
                    Some(GptaqTerms {
                        diag: Some(diag), ..
                    }),
                    _,
                ) => (diag, 0, bs, 0),
                (Some(t), _) => {
                    let (buf, prow) = t.m.locate(i1);
                    (buf, i1 - prow, n, i1)
                }
                (None, Some(d)) => (d, 0, 0, 0),
                (None, None) => {
                    return Err(GpuError::Validation(
                        "sweep: neither P nor its placeholder".into(),
                    )
                    .into());
                }
            };
            // This block's slot among the `lazy` blocks since the last cross-block update, and the
            // first row (of U, A) of those blocks.
            let slot = (i1 / bs) % lazy;
            let first = i1 - slot * bs;
            if slot > 0 {
                // Catch-up (`lazy_blocks`): the updates that the earlier blocks since the last flush
                // owe this block's columns, W[:, c] −= E·U[first..i1, c], and with the deferred P
                // their pending terms, G[:, c] += Q·A[first..i1, c].
                lazy_update(&mut rec, first, i1 - first, i1, cnt, None)?;
            }
            if let (Some(g), true, false) = (pending, i1 > 0, fused) {
                // Deferred P: W[:, c] += G[:, c]·U[c, c], U's upper triangle with its diagonal (the
                // pending terms whose middle index and column both lie in this block, PForm).
                ops::gemm_mat_skip(
                    &mut rec,
                    rows,
                    cnt,
                    cnt,
                    1.0,
                    MatView::new(g, n).at(i1).into(),
                    gu.op(i1, i1),
                    1.0,
                    MatView::new(gw, n).at(i1).into(),
                    ops::KSkip {
                        b_upper: Some(0),
                        ..Default::default()
                    },
                    None,
                )?;
            }
            let sp = SweepParams {
                rows: u32_of("rows", rows)?,
                n: n32,
                i1: i1 as u32,
                cnt: cnt as u32,
                rchunk: rchunk as u32,
                gs: if dynamic { gs as u32 } else { 0 },
                dynamic_groups: u32::from(dynamic),
                maxq: spec.maxq,
                sym: u32::from(spec.sym),
                mse: u32::from(spec.mse),
                gptaq: u32::from(gptaq),
                lde: lde as u32,
                woff: u32_of("error slot", (lazy + slot) * bs)?,
                urow0: u32_of("panel row", i1 - urow)?,
                prow0: u32_of("P panel row", prow0)?,
                ldp: u32_of("P row stride", ldp)?,
                pcol0: u32_of("P column", pcol0)?,
                eoff: u32_of("error slot", slot * bs)?,
                pend: if fused {
                    u32::from(i1 > 0) | (u32::from(i2 < n) << 1)
                } else {
                    0
                },
                loff: u32_of("error slot", loff.unwrap_or(slot * bs))?,
                aoff: if fused {
                    u32_of("A diagonal offset", n * bs)?
                } else {
                    0
                },
                _p: [0; 3],
            };
            let mut bindings = vec![
                gw.binding(),
                up.binding(),
                pp.binding(),
                gmeta.binding(),
                gptab.binding(),
                gcodes.binding(),
                gerr.binding(),
                gloss.binding(),
            ];
            let (entry, groups) = match sweep_kernel {
                SweepKernel::Rows => ("sweep_block", wgs),
                SweepKernel::Lanes => {
                    // G where fused; otherwise a read-only buffer bound already (unused).
                    bindings.push(match (pending, fused) {
                        (Some(g), true) => g.binding(),
                        _ => up.binding(),
                    });
                    ("sweep_lanes", lane_wgs)
                }
            };
            rec.dispatch(&QUANT_SWEEP, entry, &[], &sp, &bindings, groups)?;
            // The block's per-column proxy loss (QuantResult::column_loss), from its errors.
            rec.dispatch(
                &QUANT_COLLOSS,
                "column_loss",
                &[],
                &ColLossParams {
                    rows: sp.rows,
                    i1: sp.i1,
                    cnt: sp.cnt,
                    lde: sp.lde,
                    eoff: sp.loff,
                    _p: [0; 3],
                },
                &[gerr.binding(), gcolloss.binding()],
                groups_1d(sp.cnt),
            )?;
            rec = prof.lap(rec, "sweep")?;
            if let (Some(_), true, true) = (pending, i2 < n, fused) {
                // Deferred P, fused: the sweep left E; the group's updates as below.
                if slot + 1 == lazy {
                    lazy_update(&mut rec, first, i2 - first, i2, n - i2, fsplit)?;
                }
            } else if let (Some(t), Some(g), true) = (gp, pending, i2 < n) {
                // Deferred P (PForm): G[:, c] += Q_c·triu₁(A[c, c]) (the sweep left −Q_c = −W1),
                // E = Err_c − G[:, c]; at the group's last block (`lazy_blocks`) W[:, i2:] −= E·U and
                // G[:, i2:] += Q·A over the group's rows first..i2.
                let neg_q = MatView::new(gerr, lde).at((lazy + slot) * bs);
                ops::gemm_mat_skip(
                    &mut rec,
                    rows,
                    cnt,
                    cnt,
                    -1.0,
                    neg_q.into(),
                    t.m.op(i1, i1),
                    1.0,
                    MatView::new(g, n).at(i1).into(),
                    ops::KSkip {
                        b_upper: Some(-1),
                        ..Default::default()
                    },
                    None,
                )?;
                let total = u32_of("pending elements", rows * cnt)?;
                rec.dispatch(
                    &QUANT_PENDING,
                    "err_minus_pending",
                    &[],
                    &PendingParams {
                        rows: sp.rows,
                        n: n32,
                        i1: sp.i1,
                        cnt: sp.cnt,
                        lde: sp.lde,
                        eoff: sp.eoff,
                        _p: [0; 2],
                    },
                    &[g.binding(), gerr.binding()],
                    groups_1d(total.div_ceil(256)),
                )?;
                if slot + 1 == lazy {
                    lazy_update(&mut rec, first, i2 - first, i2, n - i2, fsplit)?;
                }
            } else if let (Some(t), Some(stage), true) = (gp, stage, i2 < n && cnt == bs) {
                let gp = &t.m;
                // W[:, i2:] −= [Err1 | −W1]·[U[i1:i2, i2:]; P[i1:i2, i2:]] (GPTQ term and GPTAQ
                // cross-block term, §2.2, in one GEMM with K = 2·bs).
                let (pp, prow) = gp.locate(i1);
                rec.copy(up, urow * n, stage, 0, bs * n);
                rec.copy(pp, prow * n, stage, bs * n, bs * n);
                ops::gemm(
                    &mut rec,
                    rows,
                    n - i2,
                    2 * bs,
                    -1.0,
                    MatView::new(gerr, lde),
                    MatView::new(stage, n).at(i2),
                    1.0,
                    MatView::new(gw, n).at(i2),
                )?;
            } else if i2 < n && slot + 1 == lazy {
                // W[:, i2:] −= Err·U[first..i2, i2:]: this block's errors and those of the blocks
                // since the last such update (`lazy_blocks`; one block where lazy = 1). No pending
                // matrix here (GPTQ, or the whole P).
                lazy_update(&mut rec, first, i2 - first, i2, n - i2, None)?;
                if let Some(gp) = gp.map(|t| &t.m) {
                    // GPTAQ cross-block term: W[:, i2:] += W1·P[i1:i2, i2:] (W1 = the block's final
                    // values, §2.2; the sweep left −W1).
                    ops::gemm_mat(
                        &mut rec,
                        rows,
                        n - i2,
                        cnt,
                        -1.0,
                        Operand::View(MatView::new(gerr, lde).at(bs)),
                        gp.op(i1, i2),
                        1.0,
                        MatView::new(gw, n).at(i2).into(),
                    )?;
                }
            }
            rec = prof.lap(rec, "update")?;
            // Bound the number of recorded-but-unsubmitted dispatches on huge problems.
            if rec.dispatches() >= 256 {
                rec.submit();
                rec = ctx.recorder();
            }
        }

        Ok(rec)
    }
}

/// How [`solve`] runs, beside what it solves (the tests choose the forms the defaults pick by
/// shape, to check that they agree).
#[derive(Clone, Copy, Debug, Default)]
struct SolveOptions {
    /// Fill `result.q` (from the codes on the host, exactly the GPU's `finish_q`, which the
    /// tests compare).
    host_q: bool,
    /// GPTAQ's [`PForm`] (`None`: [`PForm::choose`]).
    p_form: Option<PForm>,
    /// Rows per sweep workgroup (`None`: [`sweep_rows`]).
    sweep_rows: Option<usize>,
    /// The sweep's kernel (`None`: [`SweepKernel::for_blocks`]; `sweep_lanes` only where it fits).
    sweep_kernel: Option<SweepKernel>,
    /// Take the factor's first attempt without waiting for its pivots' flag
    /// ([`factor::upper_inverse_factor`] with `speculate`; off with `GPTAQ_SPECULATE=0`): checked when
    /// the solve finishes, which solves again, waiting, where the first damping was not enough.
    speculate: bool,
    /// GPTAQ's `A` on the tensor cores ([`SolveFlags::split_f16`]).
    split_f16: bool,
    /// The deferred P's per-block steps inside the sweep (`None`: [`fuse_pending`]'s default).
    fused: Option<bool>,
}

/// Whether a solve that may speculate ([`SolveOptions::speculate`]) does: not with
/// `GPTAQ_SPECULATE=0` (A/B runs).
fn speculation(wanted: bool) -> bool {
    wanted && std::env::var("GPTAQ_SPECULATE").map_or(true, |v| v != "0")
}

/// Rows per workgroup of `sweep_lanes` (`LR` in `quant_sweep.wgsl`).
const SWEEP_LANE_ROWS: usize = 4;

/// The two kernels of the blocked sweep (`quant_sweep.wgsl`), which give the same results bit for
/// bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SweepKernel {
    /// `sweep_block`: rows of a workgroup in workgroup memory, two barriers per column.
    Rows,
    /// `sweep_lanes`: four rows per 32-invocation workgroup in registers, each lane four of the
    /// block's columns, one barrier per column; blocks of at most 128 columns, no MSE grid.
    Lanes,
}

impl SweepKernel {
    /// The kernel for blocks of `bs` columns: `wanted` (the tests), else `sweep_lanes` unless
    /// `GPTAQ_SWEEP=rows` (read once; A/B runs), and `sweep_block` wherever `sweep_lanes` does not
    /// fit: blocks wider than its 32 lanes × 4 columns, the MSE grid (whose per-row search stays
    /// in `sweep_block`), or an adapter that binds fewer than the nine storage buffers of
    /// `sweep_lanes` (the pending matrix of [`Sweep::fused`] beside `sweep_block`'s eight,
    /// WebGPU's portable minimum; native Vulkan, Metal and DX12 adapters allow more).
    fn for_blocks(ctx: &GpuContext, wanted: Option<Self>, bs: usize, mse: bool) -> Self {
        let chosen = wanted.unwrap_or_else(|| {
            if crate::env_is!("GPTAQ_SWEEP", "rows") {
                SweepKernel::Rows
            } else {
                SweepKernel::Lanes
            }
        });
        if chosen == SweepKernel::Lanes
            && (bs > 4 * 32 || mse || ctx.limits.max_storage_buffers_per_shader_stage < 9)
        {
            SweepKernel::Rows
        } else {
            chosen
        }
    }
}

/// Whether GPTAQ's deferred P runs its per-block steps inside the sweep ([`Sweep::fused`]): with
/// `sweep_lanes`, the kernel that has them, unless `wanted` (the tests) or `GPTAQ_FUSED_PENDING=0`
/// (read once; A/B runs) says otherwise. The default since session 37: the form here (U's or A's
/// rows loaded eight at a time) takes GPTAQ's 4096 × 14336 solve from 251.3–253.5 to 246.1–246.8
/// ms on an H100 (three interleaved pairs), its sweep 126 → 151 µs per block on an H200 against
/// 5.8 ms of launches saved (BENCHMARKS.md session 37). Its first two forms were slower than the
/// launches on an H100 (one row per step: 216 µs per block, session 35; rows staged through 10
/// KiB of workgroup memory: 316 µs, session 36). The results are the same bit for bit either way.
fn fuse_pending(kernel: SweepKernel, wanted: Option<bool>) -> bool {
    kernel == SweepKernel::Lanes
        && wanted.unwrap_or_else(|| !crate::env_is!("GPTAQ_FUSED_PENDING", "0"))
}

/// Both entry points: submits the solve ([`Solving::finish`] waits for its results).
#[allow(clippy::too_many_arguments)]
fn solve<'a>(
    ctx: &GpuContext,
    w: &'a [f32],
    w_gpu: Option<&GpuBuffer<f32>>,
    rows: usize,
    cols: usize,
    h: &'a GpuMatrix,
    d: Option<&'a GpuMatrix>,
    cfg: &'a QuantConfig,
    mut shared: Option<&mut SharedFactor>,
    opts: SolveOptions,
) -> Result<Solving<'a>, QuantGpuError> {
    let SolveOptions {
        host_q,
        p_form,
        sweep_rows: rchunk,
        sweep_kernel,
        speculate,
        split_f16,
        fused,
    } = opts;
    let spec = check_config(cfg, cols)?;
    let n = cols;
    let n_el = rows
        .checked_mul(cols)
        .ok_or_else(|| QuantError::InvalidConfig(format!("rows·cols overflows: {rows}×{cols}")))?;
    super::quantizer::check_matrix("W", w, n_el)?;
    if let Some(src) = w_gpu
        && src.len() != n_el
    {
        return Err(QuantError::ShapeMismatch {
            what: "W on the GPU",
            expected: n_el,
            got: src.len(),
        }
        .into());
    }
    let nn = n * n;
    if h.len() != nn || h.rows() != n {
        return Err(QuantError::ShapeMismatch {
            what: "H",
            expected: nn,
            got: h.len(),
        }
        .into());
    }
    let d = match cfg.method {
        Method::Gptaq { .. } => d,
        _ => None,
    };
    if let Some(d) = d
        && (d.len() != nn || d.rows() != n)
    {
        return Err(QuantError::ShapeMismatch {
            what: "D",
            expected: nn,
            got: d.len(),
        }
        .into());
    }
    u32_of("rows·cols", n_el)?;

    // With GPTAQ_PROFILE=1 every phase boundary below waits for the GPU (gpu::profile).
    let mut prof = Profile::from_env();
    // With GPTAQ_KERNEL_TIMES=1 the solve's dispatches are charged to these scopes (gpu::timing).
    let scope = ctx.time_scope("solve/prepare");
    // Step 1: host preparation in f64 from diag(H) only (module docs).
    // U (and P) in panels of whole blocks: a block's rows of U and P are then in one panel.
    let bs = cfg.block_size.min(n);
    // An earlier solve's factor of the same H with the same settings (SharedFactor).
    let key = FactorKey::of(cfg, bs);
    let cached: Option<SharedEntry> = shared.as_deref_mut().and_then(|s| {
        let e = s.entry.as_ref()?;
        if e.h != addr(h) || e.key != key {
            return None;
        }
        s.hits += 1;
        Some(e.clone())
    });
    let h_diag32 = match &cached {
        Some(c) => c.h_diag32.clone(),
        None => factor::hessian_diag(ctx, h, n)?,
    };
    if let Some((index, &value)) = h_diag32.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(QuantError::NonFinite {
            what: "H (diagonal)",
            index: index * n + index,
            value: f64::from(value),
        }
        .into());
    }
    // W in f64 only where the host needs it (the reference's decisions on whole rows or static
    // groups, the RTN fallbacks): on a 4096 × 14336 module the f64 copies and the way back cost
    // about half a second of host time per solve (a lavapipe run of 4096 × 1024 measured 35 ms of
    // "prepare", almost all of it these copies).
    let w64 = || -> Vec<f64> { w.iter().map(|&v| f64::from(v)).collect() };
    if n == 0 || rows == 0 {
        // Nothing to solve: the reference's result (RTN of an empty matrix) on the CPU.
        let h64 = read_h64(ctx, h, nn)?;
        let res = reference::quantize_f64(&w64(), rows, cols, &h64, None, cfg)?;
        let q = ctx.upload("quant q", &res.q)?;
        return Ok(Solving::Done(Box::new(GpuSolve {
            result: res,
            q: Some(q),
            u_diag: Vec::new(),
            phases: Vec::new(),
            codes: None,
        })));
    }
    let h_diag: Vec<f64> = h_diag32.iter().map(|&v| f64::from(v)).collect();

    // Steps 2–5 exactly as the reference (one shared implementation).
    // The reference reads W only for per-row params (no groups) and static groups; otherwise it
    // gets no rows, and W's own preparation (dead columns zeroed, act-order permutation) is done
    // below in f32 (on the GPU where W is there already, in every case) — the same values the
    // f64 round trip gives, since f32 → f64 → f32 is exact.
    let host_w = cfg.group_size.is_none() || cfg.static_groups;
    let prepared = if host_w {
        reference::prepare(&w64(), &h_diag, rows, n, cfg, &spec)
    } else {
        reference::prepare(&[], &h_diag, 0, n, cfg, &spec)
    };
    let order: Vec<usize> = prepared.perm.clone().unwrap_or_else(|| (0..n).collect());
    prof.sync(ctx, "prepare")?;
    scope.set("solve/factor");
    let (computed, check) = match cached.as_ref() {
        Some(c) => (c.factor.clone(), c.check.clone()),
        None => match factor::upper_inverse_factor(
            ctx,
            h,
            &order,
            &prepared.diag,
            cfg.damp_percent,
            cfg.damp_auto_increment,
            bs,
            speculation(speculate),
        )? {
            Ok((f, c)) => (Ok(Arc::new(f)), c.map(Arc::new)),
            Err(e) => (Err(e.to_string()), None),
        },
    };
    let factor = match computed {
        Ok(f) => f,
        Err(reason) => {
            if cached.is_none()
                && let Some(s) = shared.as_deref_mut()
            {
                s.entry = Some(SharedEntry {
                    h: addr(h),
                    key,
                    h_diag32: h_diag32.clone(),
                    factor: Err(reason.clone()),
                    check: None,
                    p: None,
                });
            }
            // Rare path: the whole H is needed for the RTN proxy loss (and a non-finite H is an
            // input error, as in the reference).
            let h64 = read_h64(ctx, h, nn)?;
            return rtn_fallback(ctx, &w64(), rows, cols, &h64, cfg, reason)
                .map(|s| Solving::Done(Box::new(s)));
        }
    };
    let reference::Prepared {
        row_params,
        dead,
        static_groups,
        perm,
        w: wprep,
        diag: prep_diag,
    } = prepared;
    // diag(H) before damping, processing order, dead columns as 1 (QuantResult::h_diag).
    let solve_h_diag: Vec<f32> = prep_diag.iter().map(|&v| v as f32).collect();
    // With W already on the GPU (the pipeline) the solve's copy is made there: a plain copy where
    // the preparation leaves W as it is, else act-order's permutation and the dead columns are
    // applied by a gather (`gather_cols`) — the same data movement as `prepare_w_f32` and as the
    // reference's own preparation (`wprep`, whose f64 values are the f32 ones): no host pass over
    // W (≈ 59 M floats at down_proj) and no upload of a prepared copy, whose staging would be
    // device memory at the solve's memory peak on resizable-BAR machines.
    let needs_prep = perm.is_some() || dead.iter().any(|&x| x);
    let wp: Option<std::borrow::Cow<'_, [f32]>> = if w_gpu.is_some() {
        None
    } else if host_w {
        Some(wprep.iter().map(|&v| v as f32).collect())
    } else {
        Some(prepare_w_f32(w, rows, n, &dead, perm.as_deref()))
    };
    drop(wprep);
    let gu = &factor.value;
    prof.sync(ctx, "factor")?;
    scope.set("solve/w");

    // Group bookkeeping: table of (scale, zero) per [group][row] and the group of every processing
    // column. gs = −1: one group; static: perm[k]/gs; dynamic: k/gs, filled by the sweep.
    let gs = cfg.group_len(n);
    let (num_groups, dynamic, col_group): (usize, bool, Vec<u32>) =
        match (cfg.group_size, &static_groups) {
            (None, _) => (1, false, vec![0; n]),
            (Some(_), Some(sg)) => (
                sg.len(),
                false,
                order.iter().map(|&j| (j / gs) as u32).collect(),
            ),
            (Some(_), None) => (
                n.div_ceil(gs),
                true,
                (0..n).map(|k| (k / gs) as u32).collect(),
            ),
        };
    let mut ptab = vec![0.0_f32; num_groups * rows * 2];
    let table: Option<Vec<&super::quantizer::GroupParams>> = match (&row_params, &static_groups) {
        (Some(rp), _) => Some(vec![rp]),
        (None, Some(sg)) => Some(sg.iter().collect()),
        (None, None) => None,
    };
    if let Some(t) = &table {
        for (g, gp) in t.iter().enumerate() {
            for r in 0..rows {
                ptab[(g * rows + r) * 2] = gp.scale[r] as f32;
                ptab[(g * rows + r) * 2 + 1] = gp.zero[r] as f32;
            }
        }
    }
    let mut invperm = vec![0_u32; n];
    for (k, &j) in order.iter().enumerate() {
        invperm[j] = k as u32;
    }
    let mut meta_finish = invperm.clone();
    meta_finish.extend_from_slice(&col_group);

    // The permutation (act-order) and the dead columns as one table for the gathers of W and D
    // (quant_gather.wgsl): `perm[0..n]` then the dead flags `[0..n]` by original column. Uploaded
    // once, where either gather runs (a group's later solves reuse its P, so D is not gathered).
    let form = p_form.unwrap_or_else(|| PForm::choose(dynamic, gs, bs));
    let p_key = d.map(|d| PKey {
        d: addr(d),
        alpha: cfg.method.alpha(),
        split_terms: split_terms(split_f16),
    });
    let cached_p = cached
        .as_ref()
        .and_then(|c| c.p.clone())
        .filter(|(k, p)| Some(*k) == p_key && p.form() == form)
        .map(|(_, p)| p);
    let gperm_dead = if (w_gpu.is_some() && needs_prep) || (d.is_some() && cached_p.is_none()) {
        let table: Vec<u32> = order
            .iter()
            .map(|&j| j as u32)
            .chain(dead.iter().map(|&x| u32::from(x)))
            .collect();
        Some(ctx.upload("quant perm/dead", &table)?)
    } else {
        None
    };
    // Uploads (W copied on the GPU when it is there already and unchanged by the preparation).
    let gw = match (w_gpu, &wp, &gperm_dead) {
        (Some(src), None, _) if !needs_prep => {
            let gw = ctx.scratch::<f32>("quant W", n_el)?;
            let mut rec = ctx.recorder();
            rec.copy(src, 0, &gw, 0, n_el);
            rec.submit();
            gw
        }
        (Some(src), None, Some(table)) => {
            let gw = ctx.scratch::<f32>("quant W", n_el)?;
            let mut rec = ctx.recorder();
            rec.dispatch(
                &QUANT_GATHER,
                "gather_cols",
                &[],
                &GatherParams {
                    n: u32_of("cols", n)?,
                    rows: crate::gpu::matrix::PanelRows::new(&(0..rows), &(0..rows))?,
                    _p: [0; 3],
                },
                &[src.binding(), table.binding(), gw.binding()],
                groups_1d(u32_of("gather workgroups", n_el.div_ceil(256))?),
            )?;
            rec.submit();
            gw
        }
        (_, Some(wp), _) => ctx.upload("quant W", wp)?,
        (_, None, _) => {
            return Err(
                GpuError::Validation("solve: W neither on the GPU nor prepared".into()).into(),
            );
        }
    };
    drop(wp);
    let gmeta = ctx.upload("quant meta", &meta_finish)?;
    let gptab = ctx.upload("quant params", &ptab)?;
    // Codes as bytes, 4 per word, rows padded to whole words (module docs).
    let code_words = n.div_ceil(4);
    let gcodes = ctx.zeros::<u32>("quant codes", rows * code_words)?;
    let gloss = ctx.zeros::<f32>("quant loss", rows)?;
    let gcolloss = ctx.zeros::<f32>("quant column loss", n)?;
    // Two-level lazy updates (`lazy_blocks`): the errors (and GPTAQ's −Q) of the `lazy` blocks
    // since the last cross-block update, slot by slot: [E of slot 0 .. lazy | −Q of slot 0 ..].
    let lazy = if (form == PForm::Whole && d.is_some()) || group_spans_blocks(dynamic, gs, bs) {
        1
    } else {
        lazy_blocks()
    };
    let sweep_kernel = SweepKernel::for_blocks(ctx, sweep_kernel, bs, spec.mse);
    // The deferred P's pending matrix exists where there is more than one block (below).
    let fused =
        d.is_some() && form == PForm::Deferred && n > bs && fuse_pending(sweep_kernel, fused);
    // Fused, the pure errors of the block being swept get a slot of their own after the others
    // (`Sweep::loff`).
    let loff = fused.then_some(lazy * bs * 2);
    let lde = lazy * bs * if d.is_some() { 2 } else { 1 } + if fused { bs } else { 0 };
    let gerr = ctx.zeros::<f32>("quant err", rows * lde)?;

    let n32 = u32_of("cols", n)?;
    let mut rec = prof.lap(ctx.recorder(), "upload")?;
    scope.set("solve/p");

    // Step 2: GPTAQ P (§2.2).
    let alpha = cfg.method.alpha();
    let gp: Option<Arc<GptaqTerms>> = match (d, cached_p, &gperm_dead) {
        (Some(_), Some(p), _) => Some(p),
        (Some(d), None, Some(gmeta_d)) => Some(Arc::new(gptaq_terms(
            ctx,
            &mut rec,
            (n, bs),
            gu,
            d,
            gmeta_d,
            form,
            alpha as f32,
            split_terms(split_f16),
        )?)),
        (Some(_), None, None) => {
            return Err(GpuError::Validation("GPTAQ P: no perm/dead table for D".into()).into());
        }
        (None, _, _) => None,
    };
    drop(gperm_dead);
    if let Some(s) = shared {
        let p = p_key.zip(gp.clone());
        match s.entry.as_mut().filter(|_| cached.is_some()) {
            // The factor came from the entry: keep it, with these GPTAQ terms where they are new
            // (another D or α; GPTQ leaves the entry's as they are).
            Some(e) => {
                if p.is_some() {
                    e.p = p;
                }
            }
            None => {
                s.entry = Some(SharedEntry {
                    h: addr(h),
                    key,
                    h_diag32: h_diag32.clone(),
                    factor: Ok(factor.clone()),
                    check: check.clone(),
                    p,
                });
            }
        }
    }
    rec = prof.lap(rec, "p")?;
    scope.set("solve/blocks");
    // Whole P: the fused cross-block GEMM reads the block's U rows and P rows from one binding
    // (copied there per block). Two GEMMs without the copies were no faster on an H200
    // (session 25: 164.8 / 825.1 ms against 165.8–178.5 / 800.7–835.8 ms per solve).
    let stage = match gp.as_deref() {
        Some(t) if t.form() == PForm::Whole && n > bs => {
            Some(ctx.scratch::<f32>("quant [U; P] block rows", 2 * bs * n)?)
        }
        _ => None,
    };
    // Deferred P: the pending matrix G (PForm), zero before the first block.
    let pending = match gp.as_deref() {
        Some(t) if t.form() == PForm::Deferred && n > bs => {
            Some(ctx.zeros::<f32>("quant GPTAQ pending terms", n_el)?)
        }
        _ => None,
    };
    if fused && pending.is_none() {
        return Err(GpuError::Validation(
            "solve: the fused sweep needs the deferred P's pending matrix".into(),
        )
        .into());
    }
    // The tensor-core runs' flushes of G (`SolveOptions::split_f16` or `GPTAQ_SPLIT_F16`, like
    // A; `flush` module docs): one after every `lazy` blocks but the last.
    let k = lazy * bs;
    let fsplit = match (&pending, split_terms(split_f16) > 0) {
        (Some(_), true) if n > k => flush::FlushSplit::new(ctx, (rows, n, k), (n - 1) / k)?,
        _ => None,
    };
    // Bound but unused by GPTQ (bindings are fixed per pipeline).
    let dummy = match gp {
        Some(_) => None,
        None => Some(ctx.zeros::<f32>("quant P (unused)", 4)?),
    };

    // Step 3: the blocked sweep.
    let sweep = Sweep {
        ctx,
        rows,
        n,
        bs,
        rchunk: sweep_rows(rows, bs, rchunk),
        sweep_kernel,
        fused,
        loff,
        lazy,
        lde,
        spec: &spec,
        dynamic,
        gs,
        gw: &gw,
        gu,
        gp: gp.as_deref(),
        pending: pending.as_ref(),
        fsplit: fsplit.as_ref(),
        stage: stage.as_ref(),
        dummy: dummy.as_ref(),
        gmeta: &gmeta,
        gptab: &gptab,
        gcodes: &gcodes,
        gerr: &gerr,
        gloss: &gloss,
        gcolloss: &gcolloss,
    };
    let mut rec = sweep.run(rec, &mut prof)?;

    // Step 4: Q in original order.
    scope.set("solve/finish");
    let gq = ctx.zeros::<f32>("quant q", n_el)?;
    rec.dispatch(
        &QUANT_FINISH,
        "finish_q",
        &[],
        &FinishParams {
            rows: rows as u32,
            n: n32,
            _p: [0; 2],
        },
        &[
            gcodes.binding(),
            gmeta.binding(),
            gptab.binding(),
            gq.binding(),
        ],
        groups_1d(u32_of("finish workgroups", n_el.div_ceil(256))?),
    )?;
    let rec = prof.lap(rec, "finish")?;
    rec.submit();

    // The small results in one submission and one wait (the losses, U's diagonal — n floats,
    // and only U's diagonal is meaningful outside the solve — and the scale / zero table), then
    // the codes, started here and finished below (quantize_gpu) or by the caller
    // (PendingCodes).
    let gudiag = ctx.zeros::<f32>("U diagonal", n.max(1))?;
    let mut rec = ctx.recorder();
    factor::record_diag(&mut rec, gu, n, &gudiag)?;
    let small = ctx.read_async_many(
        rec,
        &[
            (&gloss, 0, gloss.len()),
            (&gcolloss, 0, gcolloss.len()),
            (&gudiag, 0, n),
            (&gptab, 0, gptab.len()),
        ],
    )?;
    let pending_codes = PendingCodes {
        read: ctx.read_async(ctx.recorder(), &gcodes, 0, gcodes.len())?,
        rows,
        n,
        order: perm.as_ref().map(|_| order.clone()),
    };
    Ok(Solving::Submitted(Box::new(SubmittedSolve {
        small,
        codes: pending_codes,
        q: Some(gq),
        rows,
        cols,
        num_groups,
        g_idx: if dynamic {
            invperm.iter().map(|&k| k / gs as u32).collect()
        } else {
            (0..n).map(|j| (j / gs) as u32).collect()
        },
        perm,
        h_diag: solve_h_diag,
        damp: factor.damp,
        damp_percent: factor.damp_percent,
        fallback: factor.fallback.clone(),
        host_q,
        prof,
        check,
        opts,
        w,
        h,
        d,
        cfg,
    })))
}

/// A solve in progress ([`submit_gpu_resident`]): either done on the host already (the RTN and
/// empty-matrix paths), or submitted to the GPU with its results on their way back.
pub enum Solving<'a> {
    Done(Box<GpuSolve>),
    Submitted(Box<SubmittedSolve<'a>>),
}

impl Solving<'_> {
    /// Q on the GPU, original column order: final unless [`Self::finish`] replaces it — an RTN
    /// fallback (non-finite values in the sweep) or a solve again (a failed speculative factor) —
    /// in which case the finished [`GpuSolve::q`] is the new one. `None` once released.
    pub fn q(&self) -> Option<&GpuBuffer<f32>> {
        match self {
            Solving::Done(s) => s.q.as_ref(),
            Solving::Submitted(s) => s.q.as_ref(),
        }
    }

    /// Drops a submitted solve's Q once the caller has recorded its copy of it (the copy keeps the
    /// buffer alive on the GPU until it is made): a group's solves, all submitted before the first
    /// is finished, then do not hold their Q's side by side (235 MB each for Llama-3-8B's gate and
    /// up) beyond what the memory plan counts. The finished [`GpuSolve::q`] is then `None`, unless
    /// the finish replaced Q (an RTN fallback, a solve again: a new buffer).
    pub fn release_q(&mut self) {
        if let Solving::Submitted(s) = self {
            s.q = None;
        }
    }

    /// Waits for the solve's small results and builds its [`GpuSolve`] (codes left pending, as
    /// [`quantize_gpu_resident`] leaves them, unless the solve was asked for Q on the host).
    pub fn finish(self, ctx: &GpuContext) -> Result<GpuSolve, QuantGpuError> {
        match self {
            Solving::Done(s) => Ok(*s),
            Solving::Submitted(s) => s.finish(ctx),
        }
    }
}

/// A solve whose GPU work is all recorded and submitted, its small results (the losses, U's
/// diagonal, the scale / zero table) and its codes on their way back. Why a separate step: the
/// pipeline submits every module of a group before it waits for the first one's results, so the
/// GPU goes from one module's sweep to the next instead of draining while the host reads the
/// results back and records the next module.
pub struct SubmittedSolve<'a> {
    small: Vec<crate::gpu::PendingRead<f32>>,
    codes: PendingCodes,
    q: Option<GpuBuffer<f32>>,
    rows: usize,
    cols: usize,
    num_groups: usize,
    g_idx: Vec<u32>,
    perm: Option<Vec<usize>>,
    h_diag: Vec<f32>,
    damp: f64,
    damp_percent: f64,
    fallback: Option<Fallback>,
    host_q: bool,
    prof: Profile,
    /// The speculative factor's pivots' flag (`None`: the factor was waited for).
    check: Option<Arc<FactorCheck>>,
    opts: SolveOptions,
    /// For the RTN fallback when the sweep met non-finite values, and for solving again where the
    /// speculative factor failed.
    w: &'a [f32],
    h: &'a GpuMatrix,
    d: Option<&'a GpuMatrix>,
    cfg: &'a QuantConfig,
}

impl SubmittedSolve<'_> {
    fn finish(self, ctx: &GpuContext) -> Result<GpuSolve, QuantGpuError> {
        let SubmittedSolve {
            small,
            codes: pending_codes,
            q: gq,
            rows,
            cols,
            num_groups,
            g_idx,
            perm,
            h_diag,
            damp,
            damp_percent,
            fallback,
            host_q,
            mut prof,
            check,
            opts,
            w,
            h,
            d,
            cfg,
        } = self;
        if let Some(check) = check
            && !check.succeeded(ctx)?
        {
            // The first damping left H indefinite in f32, so this solve ran on a failed factor
            // (its results are discarded with it). Solved again from the start, each attempt's
            // flag waited for: the same schedule of dampings as the reference's, from the host's
            // W (the GPU's copy may hold this solve's Q by now). Rare: H is singular or nearly.
            drop((small, pending_codes, gq, check));
            let again = SolveOptions {
                speculate: false,
                ..opts
            };
            return solve(ctx, w, None, rows, cols, h, d, cfg, None, again)?.finish(ctx);
        }
        let mut small_reads = Vec::with_capacity(small.len());
        for p in small {
            let mut v = Vec::new();
            ctx.finish_read(p, &mut v)?;
            small_reads.push(v);
        }
        let [loss_rows, column_loss, u_diag, ptab]: [Vec<f32>; 4] =
            small_reads.try_into().map_err(|_| {
                GpuError::Readback("the solve's four small readbacks did not all return".into())
            })?;
        let column_loss: Vec<f64> = column_loss.iter().map(|&v| f64::from(v)).collect();
        let proxy_loss_sum: f64 = loss_rows.iter().map(|&v| f64::from(v)).sum();
        if !proxy_loss_sum.is_finite() {
            let h64 = read_h64(ctx, h, cols * cols)?;
            let w64: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
            return rtn_fallback(
                ctx,
                &w64,
                rows,
                cols,
                &h64,
                cfg,
                "non-finite values during the GPTQ sweep".into(),
            );
        }
        prof.sync(ctx, "readback")?;
        let mut scales = Vec::with_capacity(num_groups * rows);
        let mut zeros = Vec::with_capacity(num_groups * rows);
        for g in 0..num_groups {
            for r in 0..rows {
                scales.push(ptab[(g * rows + r) * 2]);
                zeros.push(ptab[(g * rows + r) * 2 + 1] as u32);
            }
        }
        let mut result = QuantResult {
            rows,
            cols,
            q: Vec::new(),
            codes: Vec::new(),
            scales,
            zeros,
            g_idx,
            perm,
            proxy_loss_sum,
            column_loss,
            h_diag,
            damp,
            damp_percent,
            fallback,
        };
        let codes = if host_q {
            pending_codes.finish(ctx, &mut result)?;
            result.q = result.dequantize();
            None
        } else {
            Some(pending_codes)
        };
        Ok(GpuSolve {
            result,
            q: gq,
            u_diag,
            codes,
            phases: {
                prof.sync(ctx, "host")?;
                prof.take()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::{
        PForm, SolveOptions, SweepKernel, gptaq_a_blocked, gptaq_a_split, gptaq_p_blocked,
        gptaq_p_diag, p_blocks, p_blocks_with, p_scratch_floats, solve, split_eligible,
        split_operands, split_unscale, sweep_rows, sweep_rows_max,
    };
    use crate::quant::{Method, QuantConfig};

    /// `H = 2/T·XᵀX` and `D = 2/T·δᵀX` (n × n, row-major, f32) of T random tokens X and a small
    /// deviation δ of them: with T = 2n a well-conditioned GPTAQ problem, with T < n a singular H.
    fn hessian_and_d(n: usize, t: usize, rng: &mut ChaCha8Rng) -> (Vec<f32>, Vec<f32>) {
        let x: Vec<f64> = (0..t * n).map(|_| rng.random_range(-1.0f64..1.0)).collect();
        let dx: Vec<f64> = (0..t * n)
            .map(|_| 0.1 * rng.random_range(-1.0f64..1.0))
            .collect();
        let mut h = vec![0f32; n * n];
        let mut d = vec![0f32; n * n];
        for i in 0..n {
            for j in 0..n {
                let (mut sh, mut sd) = (0f64, 0f64);
                for k in 0..t {
                    sh += x[k * n + i] * x[k * n + j];
                    sd += dx[k * n + i] * x[k * n + j];
                }
                h[i * n + j] = (2.0 * sh / t as f64) as f32;
                d[i * n + j] = (2.0 * sd / t as f64) as f32;
            }
        }
        (h, d)
    }

    /// A random test problem, rows × n: W uniform in [−1, 1) and H, D of 2n tokens
    /// ([`hessian_and_d`], drawn first), H and D on the GPU in panels of multiples of `align` rows.
    #[allow(clippy::type_complexity)]
    fn random_problem(
        ctx: &crate::gpu::GpuContext,
        rng: &mut ChaCha8Rng,
        (rows, n): (usize, usize),
        align: usize,
    ) -> Result<(Vec<f32>, crate::gpu::GpuMatrix, crate::gpu::GpuMatrix), Box<dyn std::error::Error>>
    {
        let (h, d) = hessian_and_d(n, 2 * n, rng);
        let w: Vec<f32> = (0..rows * n)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let gh = ctx.matrix_upload("H", &h, n, n, align)?;
        let gd = ctx.matrix_upload("D", &d, n, n, align)?;
        Ok((w, gh, gd))
    }

    /// The comparison tests' asymmetric config: `bits`, groups of `gs`, act-order and static
    /// groups as given, blocks of `bs`, 1 % damping.
    fn asym_config(
        (method, bits): (Method, u32),
        gs: Option<usize>,
        (act, stat): (bool, bool),
        bs: usize,
    ) -> QuantConfig {
        QuantConfig {
            method,
            bits,
            group_size: gs,
            sym: false,
            act_order: act,
            static_groups: stat,
            damp_percent: 0.01,
            damp_auto_increment: 0.01,
            block_size: bs,
            mse: false,
        }
    }

    /// A random upper-triangular `U` (positive diagonal) and a dense `D`, n × n, row-major.
    fn random_u_d(rng: &mut ChaCha8Rng, n: usize) -> (Vec<f64>, Vec<f64>) {
        let d: Vec<f64> = (0..n * n).map(|_| rng.random_range(-1.0f64..1.0)).collect();
        let u: Vec<f64> = (0..n * n)
            .map(|i| match (i / n).cmp(&(i % n)) {
                std::cmp::Ordering::Greater => 0.0,
                std::cmp::Ordering::Equal => 0.5 + rng.random_range(0.0f64..1.0),
                std::cmp::Ordering::Less => rng.random_range(-1.0f64..1.0),
            })
            .collect();
        (u, d)
    }

    /// The deferred form's diagonal blocks of P (`gptaq_p_diag`, after `gptaq_a_blocked`) equal
    /// the f64 reference P's diagonal blocks, stacked `n × bs`, for full and partial last blocks,
    /// in one buffer and in row panels of whole blocks (the batched launch per panel). The
    /// stack starts as NaN: every element the sweep reads must be written.
    #[test]
    fn p_diagonal_blocks_match_f64() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_d1a6);
        // (n, block size, panel rows (0: one buffer), alpha)
        for &(n, bs, panel_rows, alpha) in &[
            (1usize, 1usize, 0usize, 1.0f64),
            (37, 5, 0, 0.25),
            (200, 64, 0, 1.0),
            (131, 32, 64, 0.25),
            (257, 128, 128, 1.0),
        ] {
            let (u, d) = random_u_d(&mut rng, n);
            let want = crate::quant::reference::gptaq_p(&d, &u, n, alpha).ok_or("reference P")?;
            let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            ctx.set_panel_cap((panel_rows > 0).then_some((panel_rows * n * 4) as u64));
            let gu = ctx.matrix_upload("U", &f(&u), n, n, bs);
            let gd = ctx.matrix_upload("D", &f(&d), n, n, bs);
            ctx.set_panel_cap(None);
            let (gu, gd) = (gu?, gd?);
            let scratch_len = n * n;
            let scratch = ctx.upload("A scratch", &vec![f32::NAN; scratch_len])?;
            let diag = ctx.upload("P diagonal blocks", &vec![f32::NAN; n * bs])?;
            let mut rec = ctx.recorder();
            gptaq_a_blocked(&mut rec, n, &gu, &gd, &scratch, &[(0, n)], alpha as f32)?;
            gptaq_p_diag(&mut rec, n, bs, &gu, &gd, &diag)?;
            rec.submit();
            let got = ctx.read(&diag)?;
            let scale = want.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
            for i in 0..n {
                let b0 = i / bs * bs;
                for j in b0..(b0 + bs).min(n) {
                    let g = f64::from(got[i * bs + (j - b0)]);
                    let w = want[i * n + j];
                    assert!(
                        (g - w).abs() <= 1e-5 * scale,
                        "P diagonal block n={n} bs={bs} panel rows {panel_rows}: ({i}, {j}) got \
                         {g} expected {w} (max |P| {scale})"
                    );
                }
            }
        }
        Ok(())
    }

    /// A test problem for GPTAQ's `A = α·triu₁(Dp·Uᵀ)`: U upper with a positive diagonal, Dp
    /// dense, entries spread over 2^−12 .. 2^12 in magnitude (scaled per row of Dp and per
    /// column of U, as outlier channels do), as f32; the f64 A from those f32 values, and the
    /// componentwise bound `α·Σ_k |Dp_ik|·|U_jk|` of its round-off.
    struct SplitProblem {
        n: usize,
        alpha: f64,
        u: Vec<f32>,
        d: Vec<f32>,
        want: Vec<f64>,
        bound: Vec<f64>,
        /// The split's powers of two for Dp and U.
        scales: (i32, i32),
        /// Σ_{k≥j} |Dp_ik| at (i, j), and Σ_{k≥j} |U_jk| at j.
        d_tail: Vec<f64>,
        u_tail: Vec<f64>,
    }

    impl SplitProblem {
        fn new(rng: &mut ChaCha8Rng, n: usize, alpha: f64) -> Self {
            let spread = |r: &mut ChaCha8Rng| 2f64.powf(r.random_range(-12.0..12.0));
            let rows: Vec<f64> = (0..n).map(|_| spread(rng)).collect();
            let cols: Vec<f64> = (0..n).map(|_| spread(rng)).collect();
            let mut d = vec![0f32; n * n];
            let mut u = vec![0f32; n * n];
            for i in 0..n {
                for j in 0..n {
                    d[i * n + j] = (rows[i] * rng.random_range(-1.0f64..1.0)) as f32;
                    u[i * n + j] = match i.cmp(&j) {
                        std::cmp::Ordering::Greater => 0.0,
                        std::cmp::Ordering::Equal => (cols[j] * (0.5 + rng.random::<f64>())) as f32,
                        std::cmp::Ordering::Less => {
                            (cols[j] * rng.random_range(-1.0f64..1.0)) as f32
                        }
                    };
                }
            }
            let mut want = vec![0f64; n * n];
            let mut bound = vec![0f64; n * n];
            let mut d_tail = vec![0f64; n * n];
            let mut u_tail = vec![0f64; n];
            for i in 0..n {
                let mut acc = 0f64;
                for k in (0..n).rev() {
                    acc += f64::from(d[i * n + k].abs());
                    d_tail[i * n + k] = acc;
                }
                u_tail[i] = (i..n).map(|k| f64::from(u[i * n + k].abs())).sum();
            }
            for i in 0..n {
                for j in i + 1..n {
                    let (mut s, mut b) = (0f64, 0f64);
                    for k in j..n {
                        let t = f64::from(d[i * n + k]) * f64::from(u[j * n + k]);
                        s += t;
                        b += t.abs();
                    }
                    want[i * n + j] = alpha * s;
                    bound[i * n + j] = alpha * b;
                }
            }
            // The split's powers of two for Dp and U: 15 − e for the largest kept magnitude
            // f·2^e, f ∈ [0.5, 1) (`split_f16.wgsl`'s `scale_exp`).
            let largest = |x: &[f32], first: usize| {
                (0..n * n)
                    .filter(|&e| e % n >= e / n + first)
                    .fold(0f32, |m, e| m.max(x[e].abs()))
            };
            let s = |m: f32| 15 - (f64::from(m).log2().floor() as i32 + 1);
            let scales = (s(largest(&d, 1)), s(largest(&u, 0)));
            Self {
                n,
                alpha,
                scales,
                u,
                d,
                want,
                bound,
                d_tail,
                u_tail,
            }
        }

        /// Tolerance of the split A at (i, j), i < j: 2^−19 of the round-off bound (products of
        /// two splits of 21–22 bits and the dropped lo·lo) plus `per_k`·K of it (the sum's K = n − j terms,
        /// 2^−23 for the tensor cores' accumulation, 0 for the host's f64), plus the split's
        /// absolute floor: 2^−24 in scaled units per operand entry (twice `split_f16.wgsl`'s
        /// 2^−25), times the other operand's entries.
        fn tolerance(&self, i: usize, j: usize, per_k: f64) -> f64 {
            let (s0, s1) = self.scales;
            let n = self.n;
            let b = self.bound[i * n + j];
            (2f64.powi(-19) + per_k * (n - j) as f64) * b
                + self.alpha
                    * 2f64.powi(-24)
                    * (2f64.powi(-s0) * self.u_tail[j] + 2f64.powi(-s1) * self.d_tail[i * n + j])
        }

        /// Dp and U with NaN on and below Dp's diagonal and 1e30 below U's: entries the split
        /// must keep out of its products and scales.
        fn poisoned(&self) -> (Vec<f32>, Vec<f32>) {
            let n = self.n;
            let (mut d, mut u) = (self.d.clone(), self.u.clone());
            for i in 0..n {
                for j in 0..=i {
                    d[i * n + j] = f32::NAN;
                    if j < i {
                        u[i * n + j] = 1e30;
                    }
                }
            }
            (d, u)
        }

        /// ‖got − want‖_F / ‖want‖_F, and the largest |got − want| / bound.
        fn errors(&self, got: &[f32]) -> (f64, f64) {
            let (mut num, mut den, mut worst) = (0f64, 0f64, 0f64);
            for ((&g, &w), &b) in got.iter().zip(&self.want).zip(&self.bound) {
                let e = f64::from(g) - w;
                num += e * e;
                den += w * w;
                if b > 0.0 {
                    worst = worst.max(e.abs() / b);
                }
            }
            ((num / den.max(f64::MIN_POSITIVE)).sqrt(), worst)
        }
    }

    /// The split-f16 copies (`split_operands`, `split_f16.wgsl`) on any adapter, with the
    /// tensor-core products done on the host in f64 from the copies read back: every kept entry is
    /// `(hi + lo)·2^−s` within 2^−21 of its magnitude (plus 2^−24 in scaled units), the scale puts
    /// the largest kept magnitude in [2^14, 2^15), entries outside the triangles (NaN below Dp's
    /// diagonal, 1e30 below U's) are exact zeros in both halves and left out of the maxima, and
    /// `split_unscale` turns the three products into A to f32-level accuracy with exact zeros on
    /// and below the diagonal. Sizes: one buffer, 128-row panels, and n = 100 (not a multiple of
    /// the tensor-core blocks; the copies only need n a multiple of 4).
    #[test]
    fn split_operands_represent_and_unscale() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0x5b1f_0b5e);
        for &(n, panel_rows, alpha) in
            &[(128usize, 0usize, 1.0f64), (384, 128, 0.25), (100, 0, 0.25)]
        {
            let p = SplitProblem::new(&mut rng, n, alpha);
            let (d, u) = p.poisoned();
            ctx.set_panel_cap((panel_rows > 0).then_some((panel_rows * n * 4) as u64));
            let gu = ctx.matrix_upload("U", &u, n, n, 4);
            let gd = ctx.matrix_upload("D", &d, n, n, 4);
            let (gu, gd) = (gu?, gd?);
            let mut rec = ctx.recorder();
            // Under the cap the halves get a buffer each, as past the binding limit.
            let sp = split_operands(&ctx, &mut rec, n, &gu, &gd);
            ctx.set_panel_cap(None);
            let sp = sp?;
            rec.submit();
            // One n × n half from wherever it lies (both in one buffer where it fits a binding).
            let half = |(b, off): (&crate::gpu::GpuBuffer<half::f16>, usize)| -> Result<
                Vec<f64>,
                crate::gpu::GpuError,
            > {
                Ok(ctx.read(b)?[off..off + n * n]
                    .iter()
                    .map(|h| f64::from(h.to_f32()))
                    .collect())
            };
            assert_eq!(
                (sp.d.together().is_some(), sp.u.together().is_some()),
                (panel_rows == 0, panel_rows == 0),
                "split n={n} panel rows {panel_rows}: both halves in one buffer"
            );
            let maxima = ctx.read(&sp.maxima)?;
            let mut scaled = Vec::new();
            for (what, x, hi, lo, slot, first) in [
                ("Dp", &p.d, half(sp.d.hi())?, half(sp.d.lo())?, 0, 1),
                ("U", &p.u, half(sp.u.hi())?, half(sp.u.lo())?, 1, 0),
            ] {
                let kept = |i: usize, j: usize| j >= i + first;
                let m = (0..n * n)
                    .filter(|&e| kept(e / n, e % n))
                    .fold(0f32, |m, e| m.max(x[e].abs()));
                assert_eq!(
                    f32::from_bits(maxima[slot]),
                    m,
                    "split n={n}: largest |{what}|"
                );
                let s = 15 - (f64::from(m).log2().floor() as i32 + 1);
                let big = hi.iter().fold(0f64, |a, v| a.max(v.abs()));
                assert!(
                    (2f64.powi(14)..=2f64.powi(15)).contains(&big),
                    "split n={n}: {what}'s largest hi {big} outside [2^14, 2^15] (scale 2^{s})"
                );
                for e in 0..n * n {
                    let (i, j) = (e / n, e % n);
                    let want = if kept(i, j) {
                        f64::from(x[e]) * 2f64.powi(s)
                    } else {
                        0.0
                    };
                    let got = hi[e] + lo[e];
                    // 2^−22 and 2^−25 where lo's conversion rounds to nearest, twice that where
                    // it truncates (WGSL leaves the choice to the implementation).
                    let tol = 2f64.powi(-21) * want.abs() + 2f64.powi(-24);
                    assert!(
                        (got - want).abs() <= tol && (kept(i, j) || (hi[e] == 0.0 && lo[e] == 0.0)),
                        "split n={n} panel rows {panel_rows}: {what} ({i}, {j}) hi {} + lo {} = \
                         {got}, expected {want} (x {} · 2^{s}, tolerance {tol})",
                        hi[e],
                        lo[e],
                        x[e]
                    );
                }
                scaled.push((hi, lo, s));
            }
            // The three products, on the host, exactly as the kernels would sum them (in f64).
            let (dh, dl, s0) = &scaled[0];
            let (uh, ul, s1) = &scaled[1];
            let mut t = vec![0f32; n * n];
            for i in 0..n {
                for j in 0..n {
                    let mut acc = 0f64;
                    for k in 0..n {
                        let (a, b) = (i * n + k, j * n + k);
                        acc += dh[a] * uh[b] + dh[a] * ul[b] + dl[a] * uh[b];
                    }
                    // Below the diagonal: stale values that the mask must replace.
                    t[i * n + j] = if j > i { acc as f32 } else { f32::NAN };
                }
            }
            ctx.set_panel_cap((panel_rows > 0).then_some((panel_rows * n * 4) as u64));
            let gt = ctx.matrix_upload("T", &t, n, n, 4);
            ctx.set_panel_cap(None);
            let gt = gt?;
            let mut rec = ctx.recorder();
            split_unscale(&mut rec, n, &gt, &sp.maxima, alpha as f32)?;
            rec.submit();
            let got = ctx.read_matrix(&gt)?;
            let (rel, worst) = p.errors(&got);
            eprintln!(
                "split n={n} (scales 2^{s0}, 2^{s1}), host products: relative error {rel:.3e}, \
                 largest error / bound {worst:.3e}"
            );
            for i in 0..n {
                for j in 0..n {
                    let (g, w) = (f64::from(got[i * n + j]), p.want[i * n + j]);
                    let tol = if j > i { p.tolerance(i, j, 0.0) } else { 0.0 };
                    assert!(
                        if j <= i {
                            g == 0.0
                        } else {
                            (g - w).abs() <= tol
                        },
                        "split n={n} panel rows {panel_rows} alpha {alpha}, host products: \
                         ({i}, {j}) got {g} expected {w} (tolerance {tol})"
                    );
                }
            }
        }
        Ok(())
    }

    /// A = α·triu₁(Dp·Uᵀ) of `u`, `d` (n × n) on the GPU, read back: the f32 GEMMs (`terms` = 0,
    /// `gptaq_a_blocked` with the default blocks) or `terms` split products (`gptaq_a_split`), in
    /// row panels of `panel_rows` (0: one buffer); with the seconds from submission to completion
    /// (a first run: pipelines are compiled then).
    fn a_on_gpu(
        ctx: &crate::gpu::GpuContext,
        (u, d): (&[f32], &[f32]),
        n: usize,
        alpha: f32,
        terms: usize,
        panel_rows: usize,
    ) -> Result<(Vec<f32>, f64), Box<dyn std::error::Error>> {
        ctx.set_panel_cap((panel_rows > 0).then_some((panel_rows * n * 4) as u64));
        let gu = ctx.matrix_upload("U", u, n, n, 128);
        let gd = ctx.matrix_upload("D", d, n, n, 128);
        // The cap is the context's: lifted before an upload error returns.
        ctx.set_panel_cap(None);
        let (gu, gd) = (gu?, gd?);
        let len = p_scratch_floats(n, ctx.panel_bytes());
        let scratch = (terms == 0)
            .then(|| ctx.zeros::<f32>("A scratch", len))
            .transpose()?;
        ctx.sync()?;
        let t = std::time::Instant::now();
        let mut rec = ctx.recorder();
        match &scratch {
            Some(s) => gptaq_a_blocked(&mut rec, n, &gu, &gd, s, &p_blocks(n, len), alpha)?,
            None => gptaq_a_split(ctx, &mut rec, n, &gu, &gd, alpha, terms)?,
        }
        rec.submit();
        ctx.sync()?;
        let secs = t.elapsed().as_secs_f64();
        Ok((ctx.read_matrix(&gd)?, secs))
    }

    /// How `a_on_gpu` computed A, for the printed tables.
    fn a_variant(terms: usize) -> String {
        if terms == 0 {
            "f32 GEMMs".to_string()
        } else {
            format!("{terms} products")
        }
    }

    /// GPTAQ's A from split-f16 operands on the tensor cores (`gptaq_a_split`, three products)
    /// equals the f64 A to within a few times f32's round-off, over a 2^±12 spread of magnitudes,
    /// in one buffer (one upper-tail launch per product) and in row panels of 128 rows (column
    /// blocks of dense products), with NaN below Dp's diagonal and huge values below U's (the
    /// split must keep them out of the products and the scales). With one or two products the
    /// error is that of f16 operands (≈ 2^−12; D's rounding dominates both): the threshold between
    /// them is the test's teeth (a lost `lo` half, a wrong power of two or a block written twice
    /// fails it). Entries on and below the diagonal are exact zeros. Prints every variant's errors,
    /// the f32 path's beside them.
    #[test]
    fn split_a_matches_f64() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        if !split_eligible(&ctx, 128) {
            eprintln!("split A: no staged tensor-core GEMM on this adapter, not run");
            return Ok(());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(0x5b1f_f16a);
        for &(n, panel_rows, alpha) in
            &[(128usize, 0usize, 1.0f64), (384, 128, 0.25), (256, 0, 0.25)]
        {
            let p = SplitProblem::new(&mut rng, n, alpha);
            let (d, u) = p.poisoned();
            let mut rel = [0f64; 4];
            for (terms, slot) in rel.iter_mut().enumerate() {
                // The f32 path reads the clean triangles (it never reads the others either).
                let (uu, dd) = if terms == 0 { (&p.u, &p.d) } else { (&u, &d) };
                let (got, _) = a_on_gpu(&ctx, (uu, dd), n, alpha as f32, terms, panel_rows)?;
                let (r, worst) = p.errors(&got);
                *slot = r;
                eprintln!(
                    "split A n={n} panel rows {panel_rows}: {} relative error {r:.3e}, largest \
                     error / bound {worst:.3e}",
                    a_variant(terms)
                );
                if terms == 3 {
                    for i in 0..n {
                        for j in 0..n {
                            let (g, w) = (f64::from(got[i * n + j]), p.want[i * n + j]);
                            let tol = if j > i {
                                p.tolerance(i, j, 2f64.powi(-23))
                            } else {
                                0.0
                            };
                            assert!(
                                if j <= i {
                                    g == 0.0
                                } else {
                                    (g - w).abs() <= tol
                                },
                                "split A n={n} panel rows {panel_rows} alpha {alpha}: ({i}, {j}) \
                                 got {g} expected {w} (tolerance {tol})"
                            );
                        }
                    }
                }
            }
            assert!(
                rel[3] <= 1e-5 && rel[1] > 4.0 * rel[3],
                "split A n={n} panel rows {panel_rows}: relative error {:.3e} with three products \
                 (≤ 1e-5 wanted), {:.3e} with one (f32 GEMMs: {:.3e})",
                rel[3],
                rel[1],
                rel[0]
            );
        }
        Ok(())
    }

    /// The split A's error and time: at n = 512 with the other tests where the split is eligible
    /// (the GPU machine), and at the solve's sizes on request (`cargo test --lib --release
    /// split_a_error_study -- --nocapture` with `GPTAQ_SPLIT_STUDY_N`, e.g. "4096,14336": 3 GB
    /// of host and GPU memory at 14336, which is why it is not the default): the f32 GEMMs and
    /// one, two and three split products on the same random U and Dp (entries spread over 2^±6
    /// per row of Dp and column of U), each compared with f64 at 4,096 sampled entries above
    /// the diagonal: ‖error‖ / ‖A‖ over them and the largest error / `α·Σ_k|Dp_ik||U_jk|`.
    /// Prints them, and asserts that three products are at least 10× more accurate than one
    /// (34–115× on the H100, BENCHMARKS.md session 32; a lost `lo` half makes them equal).
    #[test]
    fn split_a_error_study() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let sizes: Vec<usize> = std::env::var("GPTAQ_SPLIT_STUDY_N")
            .ok()
            .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![512]);
        let alpha = 0.25f64;
        for n in sizes {
            if !split_eligible(&ctx, n) {
                eprintln!("split study n={n}: not eligible on this adapter");
                continue;
            }
            let mut rng = ChaCha8Rng::seed_from_u64(n as u64);
            let rows: Vec<f64> = (0..n)
                .map(|_| 2f64.powf(rng.random_range(-6.0..6.0)))
                .collect();
            let cols: Vec<f64> = (0..n)
                .map(|_| 2f64.powf(rng.random_range(-6.0..6.0)))
                .collect();
            let mut d = vec![0f32; n * n];
            let mut u = vec![0f32; n * n];
            for (e, (dv, uv)) in d.iter_mut().zip(u.iter_mut()).enumerate() {
                let (i, j) = (e / n, e % n);
                *dv = (rows[i] * rng.random_range(-1.0f64..1.0)) as f32;
                *uv = match i.cmp(&j) {
                    std::cmp::Ordering::Greater => 0.0,
                    std::cmp::Ordering::Equal => (cols[j] * (0.5 + rng.random::<f64>())) as f32,
                    std::cmp::Ordering::Less => (cols[j] * rng.random_range(-1.0f64..1.0)) as f32,
                };
            }
            let samples: Vec<(usize, usize, f64, f64)> = (0..4096)
                .map(|_| {
                    let i = rng.random_range(0..n - 1);
                    let j = rng.random_range(i + 1..n);
                    let (mut s, mut b) = (0f64, 0f64);
                    for k in j..n {
                        let t = f64::from(d[i * n + k]) * f64::from(u[j * n + k]);
                        s += t;
                        b += t.abs();
                    }
                    (i, j, alpha * s, alpha * b)
                })
                .collect();
            let mut rel = [0f64; 4];
            for (terms, slot) in rel.iter_mut().enumerate() {
                let (got, secs) = a_on_gpu(&ctx, (&u, &d), n, alpha as f32, terms, 0)?;
                let (mut num, mut den, mut worst) = (0f64, 0f64, 0f64);
                for &(i, j, w, b) in &samples {
                    let e = f64::from(got[i * n + j]) - w;
                    num += e * e;
                    den += w * w;
                    worst = worst.max(e.abs() / b.max(f64::MIN_POSITIVE));
                }
                *slot = (num / den).sqrt();
                eprintln!(
                    "split study n={n}: {:<11} {:>8.2} ms (first run, with the copies), relative \
                     error {:.3e}, largest error / bound {worst:.3e}",
                    a_variant(terms),
                    secs * 1e3,
                    *slot
                );
            }
            assert!(
                10.0 * rel[3] <= rel[1],
                "split study n={n}: relative error {:.3e} with three products, {:.3e} with one \
                 (three should be at least 10× more accurate)",
                rel[3],
                rel[1]
            );
        }
        Ok(())
    }

    /// A Hessian that the first damping leaves indefinite: the speculative factor fails, the
    /// solve finds out when it finishes and solves again, waiting for each attempt. The results
    /// equal, bit for bit, those of solves that wait from the start — the damping the schedule
    /// settles on, its fallback, the codes, Q and the losses — for GPTQ and GPTAQ, and for a second
    /// module that reuses the failed factor through a [`super::SharedFactor`], submitted before
    /// the first is finished (as the pipeline does with q, k and v).
    #[test]
    fn failed_speculative_factor_solves_again() -> Result<(), Box<dyn std::error::Error>> {
        use super::{SharedFactor, Solving};
        use crate::quant::Fallback;
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0x5bec_f00d);
        let (rows, n, bs) = (7usize, 72usize, 32usize);
        // 20 tokens against 72 columns: H is singular, and without damping its f32 Cholesky
        // meets a pivot at round-off level, which the flag reports when it is not positive.
        let (h, d) = hessian_and_d(n, 20, &mut rng);
        let gh = ctx.matrix_upload("H", &h, n, n, 1)?;
        let gd = ctx.matrix_upload("D", &d, n, n, 1)?;
        let ws: Vec<Vec<f32>> = (0..2)
            .map(|_| {
                (0..rows * n)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect()
            })
            .collect();
        for method in [Method::Gptq, Method::Gptaq { alpha: 0.25 }] {
            let cfg = QuantConfig {
                method,
                bits: 3,
                group_size: Some(24),
                damp_percent: 0.0,
                damp_auto_increment: 0.01,
                block_size: bs,
                ..QuantConfig::default()
            };
            // Module i's solve, speculative or waiting, with or without the group's factor.
            let run = |i: usize, shared: Option<&mut SharedFactor>, speculate: bool| {
                let opts = SolveOptions {
                    host_q: true,
                    speculate,
                    ..SolveOptions::default()
                };
                solve(
                    &ctx,
                    &ws[i],
                    None,
                    rows,
                    n,
                    &gh,
                    Some(&gd),
                    &cfg,
                    shared,
                    opts,
                )
            };
            let waited: Vec<_> = (0..ws.len())
                .map(|i| run(i, None, false)?.finish(&ctx))
                .collect::<Result<_, _>>()?;
            assert_eq!(
                waited[0].result.fallback,
                Some(Fallback::IncreasedDamping),
                "{method:?}: the problem must need more damping than the first attempt's"
            );
            let mut shared = SharedFactor::default();
            let submitted: Vec<Solving<'_>> = (0..ws.len())
                .map(|i| run(i, Some(&mut shared), true))
                .collect::<Result<_, _>>()?;
            assert_eq!(
                shared.hits(),
                1,
                "{method:?}: the second module reuses the factor"
            );
            for (i, (s, want)) in submitted.into_iter().zip(&waited).enumerate() {
                assert!(
                    matches!(s, Solving::Submitted(_)),
                    "{method:?} module {i}: submitted without waiting for the factor"
                );
                let got = s.finish(&ctx)?;
                crate::quant::assert_same_result(
                    &got.result,
                    &want.result,
                    &format!("{method:?} module {i} ({rows}×{n}) after solving again"),
                );
                assert!(
                    got.q.is_some(),
                    "{method:?} module {i}: the new Q on the GPU"
                );
            }
        }
        Ok(())
    }

    /// GPTAQ with P deferred (`PForm::Deferred`) and with the whole P solve the same problems
    /// alike: the same terms in another f32 summation order, so the codes agree except where a
    /// value sits within round-off of a rounding boundary, and the weights and the proxy loss
    /// agree to round-off. Over several blocks, act-order, groups dividing the block, static
    /// groups and per-row parameters.
    #[test]
    fn deferred_p_solves_like_the_whole_p() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0xdefe_44ed);
        // (rows, n, block, group, act-order, static groups, alpha)
        for &(rows, n, bs, gs, act, stat, alpha) in &[
            (
                33usize,
                200usize,
                32usize,
                Some(32usize),
                false,
                false,
                0.25f64,
            ),
            (17, 131, 16, None, true, false, 1.0),
            (24, 190, 64, Some(64), true, true, 1.0),
        ] {
            let (w, gh, gd) = random_problem(&ctx, &mut rng, (rows, n), 1)?;
            let cfg = asym_config((Method::Gptaq { alpha }, 4), gs, (act, stat), bs);
            let run = |form| {
                solved(
                    &ctx,
                    (&w, rows, n),
                    (&gh, Some(&gd)),
                    &cfg,
                    SolveOptions {
                        host_q: true,
                        p_form: Some(form),
                        ..SolveOptions::default()
                    },
                )
            };
            let whole = run(PForm::Whole)?;
            let deferred = run(PForm::Deferred)?;
            let name = format!("{rows}x{n} bs{bs} gs{gs:?} act {act} static {stat} alpha {alpha}");
            assert_round_off_apart(
                &name,
                ("the whole P", &whole),
                ("the deferred P", &deferred),
            );
        }
        Ok(())
    }

    /// The deferred P's per-block steps inside `sweep_lanes` (`Sweep::fused`: `W[:, c] +=
    /// G[:, c]·U[c, c]` before the block's sweep, `E = Err − (G[:, c] + Q·triu₁(A[c, c]))` after)
    /// give the unfused form's results bit for bit: like the f32 GEMM kernels (`gemm.wgsl`), the
    /// sweep sums each element over k in ascending order from zero with explicit fma's and adds
    /// the sum to its target once (the GEMMs' skipped triangles and the sweep's masks add exact
    /// zeros; their α = ±1 and β = 1 are exact), and `err_minus_pending` subtracts the same G.
    /// Over partial last blocks, rows that are not a multiple of the kernel's four (one row
    /// among them), dynamic groups smaller than and equal to the block (whose parameters read the
    /// global W the fused step writes), per-row parameters, act-order with and without static
    /// groups, and more blocks than one cross-block update takes (`lazy_blocks`), at α = 1, where
    /// GPTAQ's terms are largest. The default form (`fuse_pending`) gives the same results.
    #[test]
    fn fused_pending_solves_like_gemms() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0xf05e_d9e7);
        // (rows, n, block, group, act-order, static groups)
        for &(rows, n, bs, gs, act, stat) in &[
            (37usize, 300usize, 128usize, Some(64usize), false, false),
            (61, 160, 128, Some(32), false, false),
            (41, 256, 64, Some(32), true, true),
            (1, 200, 64, None, false, false),
            (18, 520, 64, Some(64), true, false),
            (130, 640, 128, Some(128), false, false),
        ] {
            let (w, gh, gd) = random_problem(&ctx, &mut rng, (rows, n), 1)?;
            let cfg = asym_config((Method::Gptaq { alpha: 1.0 }, 4), gs, (act, stat), bs);
            let run = |fused| {
                solved(
                    &ctx,
                    (&w, rows, n),
                    (&gh, Some(&gd)),
                    &cfg,
                    SolveOptions {
                        host_q: true,
                        p_form: Some(PForm::Deferred),
                        sweep_kernel: Some(SweepKernel::Lanes),
                        fused,
                        ..SolveOptions::default()
                    },
                )
            };
            let gemms = run(Some(false))?;
            let fused = run(Some(true))?;
            let name = format!(
                "{rows}x{n} bs{bs} gs{gs:?} act {act} static {stat}: the fused sweep against the \
                 GEMMs"
            );
            crate::quant::assert_same_result(&fused, &gemms, &name);
            crate::quant::assert_same_result(&run(None)?, &gemms, &format!("{name}: default"));
        }
        Ok(())
    }

    /// One test problem (`w`: rows × n, H, optional D) solved with `opts` from W on the host,
    /// without a shared factor, and finished: the tests that compare two ways of solving.
    fn solved(
        ctx: &crate::gpu::GpuContext,
        (w, rows, n): (&[f32], usize, usize),
        (h, d): (&crate::gpu::GpuMatrix, Option<&crate::gpu::GpuMatrix>),
        cfg: &QuantConfig,
        opts: SolveOptions,
    ) -> Result<crate::quant::QuantResult, Box<dyn std::error::Error>> {
        Ok(solve(ctx, w, None, rows, n, h, d, cfg, None, opts)?
            .finish(ctx)?
            .result)
    }

    /// Two solves of one problem whose arithmetic differs by f32 round-off: at most 1 code in 200
    /// differs (near-tie flips and their feedback), ‖ΔQ‖² ≤ 10⁻⁴·‖Q‖², proxy losses within 10⁻³
    /// relative. Prints the differences.
    fn assert_round_off_apart(
        name: &str,
        (what_a, a): (&str, &crate::quant::QuantResult),
        (what_b, b): (&str, &crate::quant::QuantResult),
    ) {
        let total = a.codes.len();
        let differ = a.codes.iter().zip(&b.codes).filter(|(x, y)| x != y).count();
        let num: f64 =
            a.q.iter()
                .zip(&b.q)
                .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
                .sum();
        let den: f64 = a.q.iter().map(|&x| f64::from(x).powi(2)).sum();
        let (la, lb) = (a.proxy_loss_sum, b.proxy_loss_sum);
        eprintln!(
            "{name}: {differ} of {total} codes differ, ‖ΔQ‖²/‖Q‖² {:.3e}, proxy loss {la} \
             ({what_a}) / {lb} ({what_b})",
            num / den.max(f64::MIN_POSITIVE)
        );
        assert!(
            differ * 200 <= total,
            "{name}: {differ} of {total} codes differ between {what_a} and {what_b}"
        );
        assert!(
            num <= 1e-4 * den,
            "{name}: ‖ΔQ‖² = {num} between {what_a} and {what_b} against ‖Q‖² = {den}"
        );
        assert!(
            (la - lb).abs() <= 1e-3 * la.abs().max(1e-12),
            "{name}: proxy loss {la} ({what_a}) against {lb} ({what_b})"
        );
    }

    /// GPTAQ's A on the tensor cores (`SolveOptions::split_f16`, three split products) solves
    /// like the f32 GEMMs, in both P forms, with act-order and groups: within the thresholds of
    /// `deferred_p_solves_like_the_whole_p` (A differs by f32-sized round-off, which can flip
    /// near-tie codes). The two cases with rows a multiple of 128 also flush the pending terms
    /// on the tensor cores (`flush::FlushSplit`: two and one flushes of four blocks). Only where
    /// the split is eligible (the GPU machine); elsewhere both runs would take the f32 path.
    #[test]
    fn split_solves_like_f32() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        if !split_eligible(&ctx, 128) {
            eprintln!("split A: no tensor-core GEMM on this adapter, not run");
            return Ok(());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(0x5b1f_50e5);
        // (rows, n, block, group, act-order, P form)
        for &(rows, n, bs, gs, act, form) in &[
            (
                33usize,
                256usize,
                128usize,
                Some(128usize),
                false,
                PForm::Deferred,
            ),
            (40, 384, 64, Some(32), true, PForm::Deferred),
            (24, 256, 128, Some(96), false, PForm::Whole),
            (128, 1280, 128, Some(128), false, PForm::Deferred),
            (256, 768, 128, Some(128), true, PForm::Deferred),
        ] {
            if rows % 128 == 0 {
                assert!(
                    super::flush::FlushSplit::kernel(&ctx, rows, n, super::lazy_blocks() * bs)
                        .is_some(),
                    "{rows}x{n}: the flushes should run on the tensor cores here"
                );
            }
            let (w, gh, gd) = random_problem(&ctx, &mut rng, (rows, n), 128)?;
            let cfg = QuantConfig {
                method: Method::Gptaq { alpha: 0.25 },
                group_size: gs,
                act_order: act,
                block_size: bs,
                ..QuantConfig::default()
            };
            let run = |split_f16| {
                solved(
                    &ctx,
                    (&w, rows, n),
                    (&gh, Some(&gd)),
                    &cfg,
                    SolveOptions {
                        host_q: true,
                        p_form: Some(form),
                        split_f16,
                        ..SolveOptions::default()
                    },
                )
            };
            let f32_run = run(false)?;
            let split = run(true)?;
            assert_round_off_apart(
                &format!("split A solve {rows}x{n} bs{bs} gs{gs:?} act {act} {form:?}"),
                ("the f32 A", &f32_run),
                ("the split A", &split),
            );
        }
        Ok(())
    }

    /// The sweep's kernels and its rows per workgroup (`sweep_rows`) change how rows and columns
    /// are spread over invocations, never a row's arithmetic: codes, Q and losses are the same bit
    /// for bit from one row per `sweep_block` workgroup to as many as its memory holds and with
    /// `sweep_lanes`, with blocks wider than the workgroup (`sweep_block`'s invocations then
    /// update several columns, fetching all but the first when used; `sweep_lanes` does not take
    /// them), blocks that start inside a codes word, a partial last block, rows not a multiple of
    /// four, dynamic and static groups, per-row parameters and act-order, for GPTQ and GPTAQ.
    #[test]
    fn sweep_kernels_agree_bit_for_bit() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0a75);
        let (gptq, gptaq) = (Method::Gptq, Method::Gptaq { alpha: 0.25 });
        // (rows, n, block, group, act-order, static groups, method)
        for &(rows, n, bs, gs, act, stat, method) in &[
            (
                37usize,
                300usize,
                256usize,
                Some(64usize),
                false,
                false,
                gptq,
            ),
            (37, 300, 256, Some(64), true, false, gptaq),
            (29, 131, 32, None, true, false, Method::Gptaq { alpha: 1.0 }),
            (61, 160, 128, Some(32), false, false, gptaq),
            (37, 300, 128, Some(64), true, false, gptaq),
            (23, 97, 30, None, false, false, gptq),
            (41, 256, 64, Some(32), true, true, gptaq),
            (6, 129, 128, Some(128), false, false, gptq),
        ] {
            let (w, gh, gd) = random_problem(&ctx, &mut rng, (rows, n), 1)?;
            let cfg = asym_config((method, 3), gs, (act, stat), bs);
            let with_d = matches!(method, Method::Gptaq { .. });
            let run = |r: usize, kernel: SweepKernel| {
                solved(
                    &ctx,
                    (&w, rows, n),
                    (&gh, with_d.then_some(&gd)),
                    &cfg,
                    SolveOptions {
                        host_q: true,
                        p_form: None,
                        sweep_rows: Some(r),
                        sweep_kernel: Some(kernel),
                        speculate: false,
                        split_f16: false,
                        // sweep_block has no fused form (`Sweep::fused`), which sums in
                        // another order.
                        fused: Some(false),
                    },
                )
            };
            let base = run(1, SweepKernel::Rows)?;
            for (r, kernel) in [
                (2, SweepKernel::Rows),
                (5, SweepKernel::Rows),
                (sweep_rows_max(bs), SweepKernel::Rows),
                (sweep_rows(rows, bs, None), SweepKernel::Rows),
                (1, SweepKernel::Lanes),
            ] {
                let other = run(r, kernel)?;
                let name = format!(
                    "{rows}x{n} bs{bs} gs{gs:?} act {act} static {stat} {method:?}: {kernel:?} \
                     with {r} rows per workgroup against sweep_block with 1"
                );
                crate::quant::assert_same_result(&other, &base, &name);
            }
        }
        Ok(())
    }

    /// GPTAQ's P on the GPU against the f64 reference (`reference::gptaq_p`) with column blocks
    /// wider than the GEMM tiles, so the per-tile k ranges (ops::KSkip) of both products are
    /// exercised at every tile edge, in one buffer and in row panels. U's lower triangle is
    /// exactly zero, as the factor leaves it.
    #[test]
    fn gptaq_p_matches_f64_with_blocks_spanning_tiles() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0x9e37_79b9_7f4a_7c15u64);
        let mut next = || rng.random_range(-1.0f64..1.0);
        // (n, block width (0: p_blocks_with's), panel rows (0: one buffer), alpha)
        for &(n, b, panel_rows, alpha) in &[
            (300usize, 160usize, 0usize, 0.25f64),
            (300, 96, 96, 1.0),
            (257, 224, 64, 0.25),
            (300, 0, 0, 1.0),
            (257, 0, 96, 0.25),
        ] {
            let d: Vec<f64> = (0..n * n).map(|_| next()).collect();
            let u: Vec<f64> = (0..n * n)
                .map(|i| {
                    let (r, c) = (i / n, i % n);
                    match r.cmp(&c) {
                        std::cmp::Ordering::Greater => 0.0,
                        std::cmp::Ordering::Equal => 0.5 + next().abs(),
                        std::cmp::Ordering::Less => next(),
                    }
                })
                .collect();
            let want = crate::quant::reference::gptaq_p(&d, &u, n, alpha).ok_or("reference P")?;
            let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            ctx.set_panel_cap((panel_rows > 0).then_some((panel_rows * n * 4) as u64));
            let gu = ctx.matrix_upload("U", &f(&u), n, n, 32);
            let gd = ctx.matrix_upload("D", &f(&d), n, n, 32);
            // The cap is the context's: lifted before an upload error returns.
            ctx.set_panel_cap(None);
            let (gu, gd) = (gu?, gd?);
            // NaN in the scratch: the entries T skips are copied along stale, and only the
            // masks' zeros may remove them.
            // b > 0: equal blocks of b columns; b = 0: the default widths for a scratch of
            // n · 64 floats (wide first blocks, narrow last ones).
            let (blocks, len) = if b > 0 {
                let blocks: Vec<(usize, usize)> =
                    (0..n).step_by(b).map(|j0| (j0, (j0 + b).min(n))).collect();
                (blocks, n * b)
            } else {
                (p_blocks_with(n, n * 64, None), n * 64)
            };
            let scratch = ctx.upload("P scratch", &vec![f32::NAN; len])?;
            let mut rec = ctx.recorder();
            gptaq_p_blocked(&mut rec, n, &gu, &gd, &scratch, &blocks, alpha as f32)?;
            rec.submit();
            let got = ctx.read_matrix(&gd)?;
            let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(g) - w).abs() <= 1e-5 * scale,
                    "P n={n} blocks {blocks:?} panel rows {panel_rows} alpha {alpha}: ({}, {}) got {g} \
                     expected {w} (max |P| {scale})",
                    i / n,
                    i % n
                );
            }
        }
        Ok(())
    }

    /// The blocks of GPTAQ's P tile `0..n` exactly, in order, each within the scratch
    /// (`j1 · width` floats) and a multiple of 32 wide except the last; the scratch fits the
    /// binding limit it was given (or is the one 32-column block that must exist) and never
    /// shrinks as n grows (the plan bounds it at the widest input); with the 64 MiB floor
    /// n ≤ 4096 is one block.
    #[test]
    fn p_blocks_tile_the_columns_within_the_scratch() {
        let mut last = 0;
        for n in [1usize, 31, 32, 33, 100, 511, 4096, 4097, 14336, 28672] {
            for max_bytes in [u64::MAX, 2 << 30, 64 << 20, 1 << 20] {
                let s = p_scratch_floats(n, max_bytes);
                let fits = (s * 4) as u64 <= max_bytes || s == 32 * n;
                assert!(
                    fits,
                    "n {n}: scratch of {s} floats exceeds {max_bytes} bytes"
                );
                if max_bytes == u64::MAX {
                    assert!(
                        s >= last,
                        "n {n}: scratch {s} < {last} for a narrower input"
                    );
                    last = s;
                }
                for forced in [None, Some(16), Some(3), Some(1)] {
                    let blocks = p_blocks_with(n, s, forced);
                    let mut next = 0;
                    for &(j0, j1) in &blocks {
                        assert_eq!(j0, next, "n {n} {forced:?}: block at {j0}, expected {next}");
                        let w = j1 - j0;
                        assert!(
                            j1 > j0 && j1 * w <= s && (w.is_multiple_of(32) || j1 == n),
                            "n {n} {forced:?}: block {j0}..{j1} with a scratch of {s}"
                        );
                        next = j1;
                    }
                    assert_eq!(next, n, "n {n} {forced:?}: blocks end at {next}");
                    if forced.is_none() && n <= 4096 && max_bytes == u64::MAX {
                        assert_eq!(blocks.len(), 1, "n {n}: {blocks:?}");
                    }
                }
            }
        }
        // The widths shrink towards the end: j1 · width stays within the scratch.
        let b = p_blocks_with(14336, 14336 * 896, None);
        assert_eq!(b.first(), Some(&(0, 3584)), "{b:?}");
        assert_eq!(b.len(), 10, "{b:?}");
        let b = p_blocks_with(14336, p_scratch_floats(14336, u64::MAX), None);
        assert_eq!(b.len(), 8, "{b:?}");
    }
}
