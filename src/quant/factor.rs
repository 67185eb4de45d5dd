//! The inverse-Hessian factor `U` (`H⁻¹ = UᵀU`, upper) on the GPU in f32 — algorithm.md §6.4:
//! with `J` the index reversal, `J·H·J = L·Lᵀ` ⇒ `U = J·L⁻¹·J`, one Cholesky and one triangular
//! inverse, no explicit `H⁻¹`. The reference (IST GPTQ, GPTQModel) factors in fp32 as well; the
//! damping schedule and its retries are the f64 reference's own
//! ([`reference::damped_factorisation`]), so both solvers take the same decisions except where f32
//! round-off decides whether a borderline matrix is SPD.
//!
//! Per attempt (one damped diagonal):
//! 1. `prep` (factor.wgsl): `K = J·(H[o][:, o] with the damped diagonal)·J`, `o` the processing
//!    order — the permutation, dead columns and damping never touch the caller's `H`.
//! 2. Blocked right-looking Cholesky in blocks of 32 columns: `potrf.wgsl` factors the diagonal
//!    block in workgroup memory and writes only its inverse `L₁₁⁻¹` (into M's diagonal block), the
//!    block column is `L₂₁ = K₂₁·L₁₁⁻ᵀ` (a GEMM with the block inverse, into a scratch buffer) and
//!    is copied below the diagonal block of M. The update `K₂₂ −= L₂₁·L₂₁ᵀ` (upper triangle only,
//!    half the flops) follows each block; from n = 8192 on (`outer_panel` says why, with the
//!    measurements) it is split in two levels: within an outer panel of 128 columns each block
//!    updates only the panel's later rows (`gemm_mat_skip` with `upper`), and the trailing matrix
//!    below the panel gets the panel's four blocks at once, `K −= L·Lᵀ` with k = 128 read from M
//!    (`gemm_mat_upper`) — a quarter of the passes over it. A failed pivot sets a flag; the host
//!    reads the two-word flag once per attempt — the only readback of the factorisation — or,
//!    taken speculatively ([`upper_inverse_factor`]), only once the solve built on the
//!    first attempt is finished.
//!
//! Recorded right after each attempt's Cholesky, before its flag is read (so the GPU need not
//! wait for the host between them; a failed attempt's result is discarded), `L⁻¹` by recursive
//! doubling, in place in M: for block sizes `b = 32, 64, …` every pair `[A 0; C B]` of neighbouring diagonal blocks (M holds `A⁻¹`, `B⁻¹`
//! and `C`) gets its off-diagonal block `−B⁻¹·(C·A⁻¹)`: `(C·A⁻¹)ᵀ = A⁻ᵀ·Cᵀ` into K (free scratch
//! by now; each output tile skips `A⁻ᵀ`'s zero lower triangle, `ops::KSkip`, which halves that
//! GEMM), then `−B⁻¹·(C·A⁻¹)` in chunks of 128–256 rows through the scratch buffer over `C` — a
//! chunk of rows of the lower-triangular `B⁻¹` needs only its columns up to the chunk's end,
//! which halves that GEMM too. About n³/6 multiply-adds in all (n³/4 before session 23).
//! Finally `reverse_u` writes `U[a, b] = L⁻¹[n−1−a, n−1−b]` into K.
//!
//! Memory: two n×n f32 matrices (K, M) and a 128·n scratch while factoring; `U` is returned in
//! K's storage. (A factor kept in its own matrix would be a third n×n buffer: 784 MiB at
//! n = 14336, the down_proj input of an 8B model, on top of H and D.) GEMMs never write M
//! directly, because WebGPU forbids binding one buffer writable and read-only in one dispatch:
//! their results bound for M go through the scratch and `copy_in`. All n×n matrices are
//! [`GpuMatrix`] row panels (gpu/matrix.rs), so `n` is not bounded by one storage binding: GEMMs
//! split at panel boundaries (`ops::gemm_mat`), the 32-row Cholesky blocks never straddle a panel
//! (panels are multiples of 32 rows), copies run per panel segment, and the two gathers (`prep`,
//! `reverse_u`) run once per (destination panel, source panel) pair.

use bytemuck::{Pod, Zeroable};

use super::QuantError;
use super::reference::{self, Damped};
use crate::gpu::kernels::Recorder;
use crate::gpu::matrix::PanelRows;
use crate::gpu::ops::{self, MatView, u32_of};
use crate::gpu::{GpuBuffer, GpuContext, GpuError, GpuMatrix, PendingRead};

crate::wgsl_shader!(FACTOR, "factor");
crate::wgsl_shader!(POTRF, "potrf");

/// Columns per Cholesky block (`NB` in potrf.wgsl).
const NB: usize = 32;
/// Outer panel width of the two-level Cholesky, used from [`TWO_LEVEL_MIN_N`] columns on.
const OUTER_PANEL: usize = 128;
/// From this many columns on the Cholesky runs in two levels (`outer_panel`).
const TWO_LEVEL_MIN_N: usize = 8192;
/// Columns per outer panel of the Cholesky for an n×n matrix (rounded down to a multiple of `NB`
/// by `cholesky`): its `NB`-wide blocks update only the panel's own rows, and the trailing matrix
/// is updated once per panel with `k` = the panel width. `NB` is the plain one-level algorithm.
/// Why two levels pay on large matrices: updating the whole trailing matrix after every 32
/// columns reads and writes it n/32 times (at n = 14336, 448 rank-32 updates moving ≈ 120 GB by
/// count), with 128-column panels a quarter as often, in larger GEMMs. Measured on an H200
/// (BENCHMARKS.md, session 26): the 4096 × 14336 solve 456 → 426 ms (GPTQ) and 556 → 512 ms
/// (GPTAQ), the 8B layer's factors 0.38 → 0.29 s; but at n = 4096 the solves took 95 → 103 and
/// 98 → 117 ms (256-column panels: no better), hence one level below [`TWO_LEVEL_MIN_N`]. Its f32
/// round-off is about 1.5× the one-level algorithm's (max |ΔU| / max |U| against f64 3.2–3.6e-7
/// instead of 1.9–2.4e-7 at n = 300–1024; BENCHMARKS.md session 24), far inside the solve's
/// tolerances. `GPTAQ_CHOL_PANEL=W` (read once) forces W for every size, for A/B runs.
fn outer_panel(n: usize) -> usize {
    static FORCED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = *FORCED.get_or_init(|| {
        std::env::var("GPTAQ_CHOL_PANEL")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
    });
    forced.unwrap_or(if n >= TWO_LEVEL_MIN_N {
        OUTER_PANEL
    } else {
        NB
    })
}
/// Most rows per chunk of the doubling inverse's `−B⁻¹·T`: smaller chunks skip more of `B⁻¹`'s
/// zero upper triangle, larger ones need fewer launches. A chunk is also bounded by the scratch
/// (`chunk · |A| ≤ SCRATCH_ROWS · n`, so at least 128 rows).
const INV_CHUNK: usize = 256;
/// The scratch holds `SCRATCH_ROWS · n` floats: one 128-row panel of an n×n matrix, which the
/// planner already requires to fit one binding (pipeline/plan.rs), and more than the Cholesky's
/// `(n − 32) × 32` panel.
pub(crate) const SCRATCH_ROWS: usize = 128;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct FactorParams {
    n: u32,
    j0: u32,
    rows: u32,
    cols: u32,
    off: u32,
    panel: PanelRows,
    src_off: u32,
    /// `copy_in`'s batch strides (destination, source), 0 for one block.
    zdst: u32,
    zsrc: u32,
}

impl FactorParams {
    fn new(n: u32) -> Self {
        Self {
            n,
            j0: 0,
            rows: 0,
            cols: 0,
            off: 0,
            panel: PanelRows::default(),
            src_off: 0,
            zdst: 0,
            zsrc: 0,
        }
    }

    /// With the destination panel `dst` and source panel `src` (global row ranges).
    fn panels(
        self,
        dst: &std::ops::Range<usize>,
        src: &std::ops::Range<usize>,
    ) -> Result<Self, GpuError> {
        Ok(Self {
            panel: PanelRows::new(dst, src)?,
            ..self
        })
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct PotrfParams {
    n: u32,
    j0: u32,
    r0: u32,
    _p: u32,
}

/// diag(H) of an n×n GPU matrix (one n-float readback).
pub fn hessian_diag(ctx: &GpuContext, h: &GpuMatrix, n: usize) -> Result<Vec<f32>, GpuError> {
    let out = ctx.zeros::<f32>("H diagonal", n.max(1))?;
    let mut rec = ctx.recorder();
    record_diag(&mut rec, h, n, &out)?;
    rec.submit();
    let mut d = ctx.read(&out)?;
    d.truncate(n);
    Ok(d)
}

/// Records `out[..n] = diag(h)` for an n×n GPU matrix.
pub(crate) fn record_diag(
    rec: &mut Recorder<'_>,
    h: &GpuMatrix,
    n: usize,
    out: &GpuBuffer<f32>,
) -> Result<(), GpuError> {
    if h.rows() != n || h.cols() != n || out.len() < n {
        return Err(GpuError::Validation(format!(
            "diagonal of a {n}×{n} matrix asked of a {}×{} one, into {} floats",
            h.rows(),
            h.cols(),
            out.len()
        )));
    }
    let n32 = u32_of("n", n)?;
    for (p, panel) in h.panels().iter().enumerate() {
        let r = h.panel_range(p);
        rec.dispatch(
            &FACTOR,
            "diag_of",
            &[],
            &FactorParams::new(n32).panels(&r, &r)?,
            &[panel.binding(), out.binding()],
            [u32_of("diag workgroups", r.len().div_ceil(256))?, 1, 1],
        )?;
    }
    Ok(())
}

/// `U` of the damped, permuted `H` on the GPU (module docs). `order[k]` is the original column at
/// processing position `k`; `diag` is diag(H) in processing order with dead columns set to 1
/// (`reference::Prepared::diag`). The caller's `h` is not modified. The returned `U` is stored in
/// panels of a multiple of `align` rows (and of the Cholesky's 32), so that the solve's row blocks
/// of `align` rows never straddle two panels.
///
/// Returns the outer `Err` for GPU failures, the inner `Err` ([`QuantError::NotPositiveDefinite`])
/// when no damping made the matrix factorable in f32.
pub fn upper_inverse_factor_gpu(
    ctx: &GpuContext,
    h: &GpuMatrix,
    order: &[usize],
    diag: &[f64],
    damp_percent: f64,
    damp_auto_increment: f64,
    align: usize,
) -> Result<Result<Damped<GpuMatrix>, QuantError>, GpuError> {
    upper_inverse_factor(
        ctx,
        h,
        order,
        diag,
        damp_percent,
        damp_auto_increment,
        align,
        false,
    )
    .map(|r| r.map(|(f, _)| f))
}

/// [`upper_inverse_factor_gpu`], or with `speculate` its first attempt (damping `damp_percent`)
/// recorded and submitted but not waited for: the factor is returned as if its Cholesky
/// succeeded, with the pivots' flag on its way back ([`FactorCheck`]). Why: reading the flag made
/// the host wait for the whole factorisation before it could record the solve's sweep, and the
/// GPU then waited for that recording (BENCHMARKS.md, session 30). A matrix that needs more
/// damping than the first attempt's is rare; its caller finds out from the flag once the solve's
/// results are read, and solves again without speculating, which goes through the same schedule
/// of dampings from the start and so takes the same decisions.
///
/// Memory, speculating: the factor's second n×n matrix and its scratch are dropped here while the
/// GPU may still be using them, so their device memory is only released once the factorisation
/// has run — alongside whatever the caller allocates next. Memory-bound callers should wait.
#[allow(clippy::too_many_arguments)]
pub fn upper_inverse_factor(
    ctx: &GpuContext,
    h: &GpuMatrix,
    order: &[usize],
    diag: &[f64],
    damp_percent: f64,
    damp_auto_increment: f64,
    align: usize,
    speculate: bool,
) -> Result<Result<Factored, QuantError>, GpuError> {
    upper_inverse_factor_panels(
        ctx,
        h,
        order,
        diag,
        damp_percent,
        damp_auto_increment,
        align,
        outer_panel(diag.len()),
        true,
        speculate,
    )
}

/// The pivots' flag of a speculative factorisation ([`upper_inverse_factor`]), read
/// once by whichever of the solves sharing the factor finishes first.
pub struct FactorCheck {
    state: std::sync::Mutex<CheckState>,
}

enum CheckState {
    Pending(PendingRead<u32>),
    Known(bool),
}

impl FactorCheck {
    /// Whether every pivot of the Cholesky was positive (waits for the flag the first time).
    pub fn succeeded(&self, ctx: &GpuContext) -> Result<bool, GpuError> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| GpuError::Readback("factor check: a reader panicked".into()))?;
        let ok = match std::mem::replace(&mut *state, CheckState::Known(false)) {
            CheckState::Known(ok) => ok,
            CheckState::Pending(read) => {
                let mut st = Vec::new();
                ctx.finish_read(read, &mut st)?;
                st.first() == Some(&0)
            }
        };
        *state = CheckState::Known(ok);
        Ok(ok)
    }
}

/// A factor, and its unread pivots' flag where it was taken speculatively ([`upper_inverse_factor`]
/// with `speculate`; `None` otherwise).
pub type Factored = (Damped<GpuMatrix>, Option<FactorCheck>);

/// [`upper_inverse_factor_gpu`] with the Cholesky's outer panel width (`outer_panel`) given,
/// whether the inverse's levels may be batched (`inverse_level_batched`; off only in tests, to
/// compare), and whether the first attempt is taken as it is, its flag returned unread
/// ([`upper_inverse_factor`]).
#[allow(clippy::too_many_arguments)]
fn upper_inverse_factor_panels(
    ctx: &GpuContext,
    h: &GpuMatrix,
    order: &[usize],
    diag: &[f64],
    damp_percent: f64,
    damp_auto_increment: f64,
    align: usize,
    outer: usize,
    batch_inverse: bool,
    speculate: bool,
) -> Result<Result<Factored, QuantError>, GpuError> {
    let n = diag.len();
    let n32 = u32_of("n", n)?;
    if h.rows() != n || h.cols() != n || order.len() != n {
        return Err(GpuError::Validation(format!(
            "factor: H is {}×{}, {} order entries, {n} diagonal entries",
            h.rows(),
            h.cols(),
            order.len()
        )));
    }
    let order32: Vec<u32> = order
        .iter()
        .map(|&j| u32_of("column index", j))
        .collect::<Result<_, _>>()?;
    let align = lcm(NB, align.max(1));
    let gorder = ctx.upload("factor order", &order32)?;
    let k = ctx.matrix_zeros("factor K", n, n, align)?;
    let m = ctx.matrix_zeros("factor L | L^-1", n, n, align)?;
    let tmp = ctx.zeros::<f32>("factor scratch", SCRATCH_ROWS * n.max(1))?;
    let status = ctx.zeros::<u32>("factor status", 2)?;
    let gx = u32_of("factor workgroups", n.div_ceil(16))?;

    // Scopes of GPTAQ_KERNEL_TIMES (gpu::timing), inside the caller's.
    let scope = ctx.time_scope("solve/factor/prep");
    let mut check = None;
    let attempt = |damped: &[f64]| -> Result<Option<()>, GpuError> {
        let dg: Vec<f32> = damped.iter().map(|&v| v as f32).collect();
        let gdg = ctx.upload("factor damped diagonal", &dg)?;
        ctx.write(&status, 0, &[0u32, 0]);
        let mut rec = ctx.recorder();
        for pp in k.panel_pairs(h) {
            rec.dispatch(
                &FACTOR,
                "prep",
                &[],
                &FactorParams::new(n32).panels(&pp.dst_rows, &pp.src_rows)?,
                &[
                    pp.src.binding(),
                    pp.dst.binding(),
                    gorder.binding(),
                    gdg.binding(),
                ],
                [
                    gx,
                    u32_of("factor workgroups", pp.dst_rows.len().div_ceil(16))?,
                    1,
                ],
            )?;
        }
        scope.set("solve/factor/cholesky");
        cholesky(ctx, &mut rec, n, &k, &m, &tmp, &status, outer)?;
        // The inverse is recorded before the pivots' flag is read, so that the GPU goes on from
        // the Cholesky to it without waiting for the host; on a failed attempt (rare: only
        // matrices that need more damping) its result is discarded, and the next attempt
        // overwrites K and M from H.
        scope.set("solve/factor/inverse");
        lower_inverse_to_u(ctx, n, &k, &m, &tmp, batch_inverse)?;
        scope.set("solve/factor/prep");
        if speculate {
            let read = ctx.read_async(ctx.recorder(), &status, 0, 2)?;
            check = Some(FactorCheck {
                state: std::sync::Mutex::new(CheckState::Pending(read)),
            });
            return Ok(Some(()));
        }
        let st = ctx.read(&status)?;
        Ok((st.first() == Some(&0)).then_some(()))
    };
    let outcome =
        reference::damped_factorisation(diag, damp_percent, damp_auto_increment, attempt)?;
    let damped = match outcome {
        Ok(d) => d,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok((
        Damped {
            value: k,
            damp: damped.damp,
            damp_percent: damped.damp_percent,
            fallback: damped.fallback,
        },
        check,
    )))
}

/// Records and submits `L⁻¹` by recursive doubling in M (module docs), then `U = J·L⁻¹·J` into
/// K's storage (free once the Cholesky is done); `batched`: each level's full pairs in one launch
/// per step where they fit (`inverse_level_batched`).
fn lower_inverse_to_u(
    ctx: &GpuContext,
    n: usize,
    k: &GpuMatrix,
    m: &GpuMatrix,
    tmp: &GpuBuffer<f32>,
    batched: bool,
) -> Result<(), GpuError> {
    let n32 = u32_of("n", n)?;
    let gx = u32_of("factor workgroups", n.div_ceil(16))?;
    let mut rec = ctx.recorder();
    let mut b = NB;
    while b < n {
        // The level's full pairs in one batched launch per step where they fit (one panel per
        // matrix, all their −B⁻¹·T blocks in the scratch at once); the rest (a last partial
        // pair, wide levels, matrices in several panels) one pair at a time below.
        let first = if batched {
            inverse_level_batched(&mut rec, n, b, k, m, tmp)?
        } else {
            0
        };
        for s in (first..n).step_by(2 * b) {
            if s + b >= n {
                continue;
            }
            let (ba, bb) = (b, b.min(n - s - b));
            // Tᵀ = A⁻ᵀ·Cᵀ (A⁻¹ = M[s.., s..], C = M[s+b.., s..]) into K at rows s.., cols s+b...
            // A⁻ᵀ is upper triangular (M's upper triangle is never written, so exact zeros):
            // each output tile skips the k below its first row (ops::KSkip), half the product.
            ops::gemm_mat_skip(
                &mut rec,
                ba,
                bb,
                ba,
                1.0,
                m.op(s, s).t(),
                m.op(s + b, s).t(),
                0.0,
                k.op(s, s + b),
                ops::KSkip {
                    a_upper: Some(0),
                    ..Default::default()
                },
                None,
            )?;
            // −B⁻¹·T (B⁻¹ = M[s+b.., s+b..], lower triangular: rows r0..r1 need its columns
            // 0..r1 only) over C's place in M, through the scratch (C is no longer needed).
            let chunk = (tmp.len() / ba).clamp(1, INV_CHUNK);
            for r0 in (0..bb).step_by(chunk) {
                let r1 = (r0 + chunk).min(bb);
                ops::gemm_mat(
                    &mut rec,
                    r1 - r0,
                    ba,
                    r1,
                    -1.0,
                    m.op(s + b + r0, s + b),
                    k.op(s, s + b).t(),
                    0.0,
                    MatView::new(tmp, ba).into(),
                )?;
                copy_in(&mut rec, tmp, m, s + b + r0..s + b + r1, s, ba)?;
            }
            if rec.dispatches() >= 256 {
                rec.submit();
                rec = ctx.recorder();
            }
        }
        b *= 2;
    }
    for pp in k.panel_pairs(m) {
        rec.dispatch(
            &FACTOR,
            "reverse_u",
            &[],
            &FactorParams::new(n32).panels(&pp.dst_rows, &pp.src_rows)?,
            &[pp.src.binding(), pp.dst.binding()],
            [
                gx,
                u32_of("factor workgroups", pp.dst_rows.len().div_ceil(16))?,
                1,
            ],
        )?;
    }
    rec.submit();
    Ok(())
}

/// One level `b` of the doubling inverse for all its full pairs at once (`ops::gemm_batched` and
/// a batched `copy_in`): the same three steps as the per-pair loop of [`lower_inverse_to_u`],
/// bit for bit, in three dispatches instead of three per pair — at n = 14336 the first levels
/// are 224, 112, 56, … pairs of 32-, 64-, 128-wide blocks whose launches were ~1,000 small
/// dispatches of 6–25 µs each (BENCHMARKS.md, session 27). Returns the first column of the
/// pairs left to the per-pair loop (0 when nothing was batched).
fn inverse_level_batched(
    rec: &mut Recorder<'_>,
    n: usize,
    b: usize,
    k: &GpuMatrix,
    m: &GpuMatrix,
    tmp: &GpuBuffer<f32>,
) -> Result<usize, GpuError> {
    let pairs = n / (2 * b);
    let (Some(kp), Some(mp)) = (k.panels().first(), m.panels().first()) else {
        return Ok(0);
    };
    // One panel each (views by plain offsets), at least two pairs, and the per-pair loop would
    // take each pair's −B⁻¹·T in one chunk (b ≤ INV_CHUNK) that all fit the scratch together.
    if k.panels().len() != 1
        || m.panels().len() != 1
        || pairs < 2
        || b > INV_CHUNK
        || pairs * b * b > tmp.len()
    {
        return Ok(0);
    }
    let diag = 2 * b * (n + 1); // from one pair's diagonal block to the next one's
    let at = |buf, row: usize, col: usize| MatView::new(buf, n).at(row * n + col);
    // Tᵀ = A⁻ᵀ·Cᵀ into K at rows s.., cols s+b.. (A⁻ᵀ's zero lower triangle skipped).
    ops::gemm_batched(
        rec,
        pairs,
        (diag, diag, diag),
        b,
        b,
        b,
        1.0,
        at(mp, 0, 0).t(),
        at(mp, b, 0).t(),
        0.0,
        at(kp, 0, b),
        ops::KSkip {
            a_upper: Some(0),
            ..Default::default()
        },
    )?;
    // −B⁻¹·T into the scratch, pair z's block at z·b² (ld b).
    ops::gemm_batched(
        rec,
        pairs,
        (diag, diag, b * b),
        b,
        b,
        b,
        -1.0,
        at(mp, b, b),
        at(kp, 0, b).t(),
        0.0,
        MatView::new(tmp, b),
        ops::KSkip::default(),
    )?;
    // …over C's place in M (rows s+b.., cols s..).
    let zdst = u32_of("copy batch stride", diag)?;
    let zsrc = u32_of("copy batch stride", b * b)?;
    let b32 = u32_of("copy size", b)?;
    rec.dispatch(
        &FACTOR,
        "copy_in",
        &[],
        &FactorParams {
            rows: b32,
            cols: b32,
            off: u32_of("copy offset", b * n)?,
            src_off: 0,
            zdst,
            zsrc,
            ..FactorParams::new(u32_of("n", n)?)
        },
        &[tmp.binding(), mp.binding()],
        [
            u32_of("copy workgroups", b.div_ceil(16))?,
            u32_of("copy workgroups", b.div_ceil(16))?,
            u32_of("copy batch", pairs)?,
        ],
    )?;
    Ok(pairs * 2 * b)
}

fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    a / gcd(a, b) * b
}

/// Records `dst[rows, c0 .. c0 + cols] = scratch` (`factor.wgsl` `copy_in`): a `rows.len() × cols`
/// block stored contiguously at the start of `src` (leading dimension `cols`), copied into the
/// n-column matrix `dst` panel segment by panel segment. The GEMMs whose results belong in a
/// matrix they also read write to the scratch first (module docs).
pub(crate) fn copy_in(
    rec: &mut Recorder<'_>,
    src: &GpuBuffer<f32>,
    dst: &GpuMatrix,
    rows: std::ops::Range<usize>,
    c0: usize,
    cols: usize,
) -> Result<(), GpuError> {
    let n = dst.cols();
    if rows.is_empty() || cols == 0 {
        return Ok(());
    }
    if c0 + cols > n || rows.end > dst.rows() || src.len() < rows.len() * cols {
        return Err(GpuError::Validation(format!(
            "copy of a {}×{cols} block to rows {rows:?}, columns {c0}.. of a {}×{n} matrix from \
             {} scratch floats",
            rows.len(),
            dst.rows(),
            src.len()
        )));
    }
    let n32 = u32_of("n", n)?;
    for (p, seg) in dst.segments(rows.clone()) {
        let off = (seg.start - dst.panel_range(p).start) * n + c0;
        rec.dispatch(
            &FACTOR,
            "copy_in",
            &[],
            &FactorParams {
                rows: u32_of("copy rows", seg.len())?,
                cols: u32_of("copy cols", cols)?,
                off: u32_of("copy offset", off)?,
                src_off: u32_of("copy source offset", (seg.start - rows.start) * cols)?,
                ..FactorParams::new(n32)
            },
            &[src.binding(), dst.panels()[p].binding()],
            [
                u32_of("copy workgroups", cols.div_ceil(16))?,
                u32_of("copy workgroups", seg.len().div_ceil(16))?,
                1,
            ],
        )?;
    }
    Ok(())
}

/// Records the blocked Cholesky of K's upper triangle into M (the factor below the 32×32 diagonal
/// blocks, the blocks' inverses on them; module docs: 32-column blocks in `outer`-column panels),
/// and submits it. `tmp` holds at least `32·n` floats.
#[allow(clippy::too_many_arguments)]
fn cholesky<'c>(
    ctx: &'c GpuContext,
    rec: &mut Recorder<'c>,
    n: usize,
    k: &GpuMatrix,
    m: &GpuMatrix,
    tmp: &GpuBuffer<f32>,
    status: &GpuBuffer<u32>,
    outer: usize,
) -> Result<(), GpuError> {
    let n32 = u32_of("n", n)?;
    let outer = outer.max(NB) / NB * NB;
    for j in (0..n).step_by(outer) {
        let jend = (j + outer).min(n);
        for j0 in (j..jend).step_by(NB) {
            let r = &mut *rec;
            let p = k.panel_of(j0);
            r.dispatch(
                &POTRF,
                "potrf_block",
                &[],
                &PotrfParams {
                    n: n32,
                    j0: u32_of("j0", j0)?,
                    r0: u32_of("panel row", k.panel_range(p).start)?,
                    _p: 0,
                },
                &[
                    k.panels()[p].binding(),
                    m.panels()[p].binding(),
                    status.binding(),
                ],
                [1, 1, 1],
            )?;
            let j1 = j0 + NB;
            if j1 < n {
                let rest = n - j1;
                let l21 = MatView::new(tmp, NB);
                // L₂₁ = K₂₁·L₁₁⁻ᵀ: K₂₁[i, c] is K[j0+c, j1+i] (upper storage), L₁₁⁻¹ sits in M.
                ops::gemm_mat(
                    r,
                    rest,
                    NB,
                    NB,
                    1.0,
                    k.op(j0, j1).t(),
                    m.op(j0, j0).t(),
                    0.0,
                    l21.into(),
                )?;
                if j1 < jend {
                    // Within the panel (two levels): K₂₂ −= L₂₁·L₂₁ᵀ only on the rows the
                    // panel's later blocks read (up to jend, every column to their right, upper
                    // triangle); the rows below wait for the panel's one update.
                    ops::gemm_mat_skip(
                        r,
                        jend - j1,
                        rest,
                        NB,
                        -1.0,
                        l21.into(),
                        l21.t().into(),
                        1.0,
                        k.op(j1, j1),
                        ops::KSkip::default(),
                        Some(0),
                    )?;
                }
                copy_in(r, tmp, m, j1..n, j0, NB)?;
            }
            // Bound the recorded-but-unsubmitted work on huge matrices.
            if r.dispatches() >= 256 {
                std::mem::replace(r, ctx.recorder()).submit();
            }
        }
        // The panel's update of the trailing matrix, K −= L·Lᵀ with k = the panel width at once
        // (with one-level panels, outer = NB, the plain rank-32 update after every block). Its L
        // columns are in M by now, below the diagonal blocks (`copy_in` above; M is not K, so a
        // GEMM may read it).
        if jend < n {
            let lo = m.op(jend, j);
            ops::gemm_mat_upper(
                rec,
                n - jend,
                jend - j,
                -1.0,
                lo,
                lo.t(),
                1.0,
                k.op(jend, jend),
            )?;
        }
    }
    let last = std::mem::replace(rec, ctx.recorder());
    last.submit();
    Ok(())
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::{NB, upper_inverse_factor_panels};

    /// `H = 2/t·XᵀX` (n×n, f64) of t random token rows drawn from `next`.
    fn hessian_of_random_tokens(n: usize, t: usize, next: &mut dyn FnMut() -> f64) -> Vec<f64> {
        let x: Vec<f64> = (0..t * n).map(|_| next()).collect();
        let mut h = vec![0f64; n * n];
        for r in 0..t {
            let row = &x[r * n..(r + 1) * n];
            for i in 0..n {
                for j in 0..n {
                    h[i * n + j] += 2.0 * row[i] * row[j] / t as f64;
                }
            }
        }
        h
    }

    /// The doubling inverse with its levels batched gives U bit for bit as one pair at a time
    /// does, at sizes with and without a last partial pair and with levels too wide to batch.
    #[test]
    fn batched_inverse_levels_match_pair_by_pair_bit_for_bit()
    -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0x9e37_79b9_7f4a_7c15u64);
        for &n in &[64usize, 200, 300, 1100] {
            let h = hessian_of_random_tokens(n, n + 17, &mut || rng.random_range(-1.0f64..1.0));
            let diag: Vec<f64> = (0..n).map(|k| h[k * n + k]).collect();
            let order: Vec<usize> = (0..n).collect();
            let h32: Vec<f32> = h.iter().map(|&v| v as f32).collect();
            let gh = ctx.matrix_upload("h", &h32, n, n, 1)?;
            let mut us = Vec::new();
            for batched in [true, false] {
                let (f, _) = upper_inverse_factor_panels(
                    &ctx, &gh, &order, &diag, 0.01, 0.0025, 1, NB, batched, false,
                )??;
                us.push(ctx.read_matrix(&f.value)?);
            }
            for (i, (a, b)) in us[0].iter().zip(&us[1]).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits(),
                    "n={n} U({}, {}): batched {a}, pair by pair {b}",
                    i / n,
                    i % n
                );
            }
        }
        Ok(())
    }

    /// The Cholesky with outer panels (the default from n = 8192, `GPTAQ_CHOL_PANEL`) against the
    /// f64 reference, with panels wider than, equal to and not a power-of-two multiple of the
    /// 32-column blocks, sizes that end mid-panel and matrices in row panels; below n = 8192 the
    /// default (`NB`-wide panels) is the one-level algorithm that tests/quant_gpu.rs checks.
    #[test]
    fn two_level_cholesky_matches_f64() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0x2545_f491_4f6c_dd1du64);
        let mut next = || rng.random_range(-1.0f64..1.0);
        // (n, outer panel width, panel cap in rows (0: one buffer))
        for &(n, outer, cap_rows) in &[
            (257usize, 128usize, 0usize),
            (300, 96, 64),
            (130, 128, 0),
            (200, NB, 0),
        ] {
            let h = hessian_of_random_tokens(n, 2 * n, &mut next);
            let diag: Vec<f64> = (0..n).map(|k| h[k * n + k]).collect();
            let order: Vec<usize> = (0..n).collect();
            let exp = crate::quant::reference::inverse_hessian_factor_f64(&h, n, 0.01, 0.0025)?;
            let h32: Vec<f32> = h.iter().map(|&v| v as f32).collect();
            ctx.set_panel_cap((cap_rows > 0).then_some((cap_rows * n * 4) as u64));
            let gh = ctx.matrix_upload("h", &h32, n, n, 1);
            let got = gh.and_then(|gh| {
                upper_inverse_factor_panels(
                    &ctx, &gh, &order, &diag, 0.01, 0.0025, 1, outer, true, false,
                )
            });
            // The cap is the context's: lifted before an error returns.
            ctx.set_panel_cap(None);
            let (got, _) = got??;
            let u = ctx.read_matrix(&got.value)?;
            let scale = exp.u.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (i, (&g, &w)) in u.iter().zip(&exp.u).enumerate() {
                assert!(
                    (f64::from(g) - w).abs() <= 2e-5 * scale,
                    "U n={n} outer {outer} panels of {cap_rows} rows: ({}, {}) got {g} expected \
                     {w} (max |U| {scale})",
                    i / n,
                    i % n
                );
            }
        }
        Ok(())
    }
}
