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
//! 2. Blocked right-looking Cholesky, panels of 32 columns: `potrf.wgsl` factors the diagonal
//!    block in workgroup memory (and inverts it), the panel is `L₂₁ = K₂₁·L₁₁⁻ᵀ` (a GEMM with the
//!    block inverse) and the trailing update `K₂₂ −= L₂₁·L₂₁ᵀ` touches only the upper triangle
//!    (`gemm_upper`, half the flops). A failed pivot sets a flag; the host reads the two-word flag
//!    once per attempt — the only readback of the factorisation.
//!
//! After a successful attempt, `L⁻¹` by recursive doubling: the 32×32 diagonal inverses come from
//! step 2; for block sizes `b = 32, 64, …` every pair `[A 0; C B]` of neighbouring diagonal blocks
//! gets its off-diagonal block `−B⁻¹·C·A⁻¹` from two GEMMs (about n³/3 flops in all). Finally
//! `reverse_u` writes `U[a, b] = L⁻¹[n−1−a, n−1−b]`.
//!
//! Memory: three n×n f32 matrices (K, L, L⁻¹) while factoring; `U` is returned in K's storage.
//! All of them are [`GpuMatrix`] row panels (gpu/matrix.rs), so `n` is not bounded by one storage
//! binding: GEMMs split at panel boundaries (`ops::gemm_mat`), the 32-row Cholesky blocks never
//! straddle a panel (panels are multiples of 32 rows), and the two gathers (`prep`, `reverse_u`)
//! run once per (destination panel, source panel) pair.

use bytemuck::{Pod, Zeroable};

use super::QuantError;
use super::reference::{self, Damped};
use crate::gpu::kernels::Recorder;
use crate::gpu::matrix::PanelRows;
use crate::gpu::ops::{self, u32_of};
use crate::gpu::{GpuBuffer, GpuContext, GpuError, GpuMatrix};

crate::wgsl_shader!(FACTOR, "factor");
crate::wgsl_shader!(POTRF, "potrf");

/// Columns per Cholesky panel (`NB` in potrf.wgsl).
const NB: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct FactorParams {
    n: u32,
    j0: u32,
    rows: u32,
    cols: u32,
    off: u32,
    panel: PanelRows,
    _p: [u32; 3],
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
            _p: [0; 3],
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
    if h.rows() != n || h.cols() != n {
        return Err(GpuError::Validation(format!(
            "diagonal of a {n}×{n} matrix asked of a {}×{} one",
            h.rows(),
            h.cols()
        )));
    }
    let out = ctx.zeros::<f32>("H diagonal", n.max(1))?;
    let mut rec = ctx.recorder();
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
    rec.submit();
    let mut d = ctx.read(&out)?;
    d.truncate(n);
    Ok(d)
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
    let l = ctx.matrix_zeros("factor L", n, n, align)?;
    let x = ctx.matrix_zeros("factor L^-1", n, n, align)?;
    let status = ctx.zeros::<u32>("factor status", 2)?;
    let gx = u32_of("factor workgroups", n.div_ceil(16))?;

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
        cholesky(ctx, &mut rec, n, &k, &l, &x, &status)?;
        let st = ctx.read(&status)?;
        Ok((st.first() == Some(&0)).then_some(()))
    };
    let outcome =
        reference::damped_factorisation(diag, damp_percent, damp_auto_increment, attempt)?;
    let damped = match outcome {
        Ok(d) => d,
        Err(e) => return Ok(Err(e)),
    };
    // L⁻¹ by recursive doubling, then U = J·L⁻¹·J into K's (now free) storage.
    let mut rec = ctx.recorder();
    let mut b = NB;
    while b < n {
        for s in (0..n).step_by(2 * b) {
            if s + b >= n {
                continue;
            }
            let (ba, bb) = (b, b.min(n - s - b));
            // Tᵀ = A⁻ᵀ·Cᵀ (A⁻¹ = X[s.., s..], C = L[s+b.., s..]) into K at rows s.., cols s+b...
            ops::gemm_mat(
                &mut rec,
                ba,
                bb,
                ba,
                1.0,
                x.op(s, s).t(),
                l.op(s + b, s).t(),
                0.0,
                k.op(s, s + b),
            )?;
            // −B⁻¹·T (B⁻¹ = X[s+b.., s+b..]) over C's place in L (C is no longer needed) ...
            ops::gemm_mat(
                &mut rec,
                bb,
                ba,
                bb,
                -1.0,
                x.op(s + b, s + b),
                k.op(s, s + b).t(),
                0.0,
                l.op(s + b, s),
            )?;
            // ... and into X (a GEMM cannot write X while reading it: WebGPU forbids binding one
            // buffer as read-only and writable storage in the same dispatch). L and X share one
            // panel layout, so each panel's part of the block is one copy.
            for (p, rows) in l.segments(s + b..s + b + bb) {
                let off = (rows.start - l.panel_range(p).start) * n + s;
                rec.dispatch(
                    &FACTOR,
                    "copy_block",
                    &[],
                    &FactorParams {
                        rows: u32_of("block rows", rows.len())?,
                        cols: u32_of("block cols", ba)?,
                        off: u32_of("block offset", off)?,
                        ..FactorParams::new(n32)
                    },
                    &[l.panels()[p].binding(), x.panels()[p].binding()],
                    [
                        u32_of("copy workgroups", ba.div_ceil(16))?,
                        u32_of("copy workgroups", rows.len().div_ceil(16))?,
                        1,
                    ],
                )?;
            }
            if rec.dispatches() >= 256 {
                rec.submit();
                rec = ctx.recorder();
            }
        }
        b *= 2;
    }
    for pp in k.panel_pairs(&x) {
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
    Ok(Ok(Damped {
        value: k,
        damp: damped.damp,
        damp_percent: damped.damp_percent,
        fallback: damped.fallback,
    }))
}

fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    a / gcd(a, b) * b
}

/// Records the blocked Cholesky of K's upper triangle into L (lower) with the diagonal blocks'
/// inverses in X, and submits it.
fn cholesky<'c>(
    ctx: &'c GpuContext,
    rec: &mut Recorder<'c>,
    n: usize,
    k: &GpuMatrix,
    l: &GpuMatrix,
    x: &GpuMatrix,
    status: &GpuBuffer<u32>,
) -> Result<(), GpuError> {
    let n32 = u32_of("n", n)?;
    for j0 in (0..n).step_by(NB) {
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
                l.panels()[p].binding(),
                x.panels()[p].binding(),
                status.binding(),
            ],
            [1, 1, 1],
        )?;
        let j1 = j0 + NB;
        if j1 < n {
            let rest = n - j1;
            // L₂₁ = K₂₁·L₁₁⁻ᵀ: K₂₁[i, c] is K[j0+c, j1+i] (upper storage), L₁₁⁻¹ sits in X.
            ops::gemm_mat(
                r,
                rest,
                NB,
                NB,
                1.0,
                k.op(j0, j1).t(),
                x.op(j0, j0).t(),
                0.0,
                l.op(j1, j0),
            )?;
            // K₂₂ −= L₂₁·L₂₁ᵀ on the upper triangle.
            ops::gemm_mat_upper(
                r,
                rest,
                NB,
                -1.0,
                l.op(j1, j0),
                l.op(j1, j0).t(),
                1.0,
                k.op(j1, j1),
            )?;
        }
        // Bound the recorded-but-unsubmitted work on huge matrices.
        if r.dispatches() >= 256 {
            std::mem::replace(r, ctx.recorder()).submit();
        }
    }
    let last = std::mem::replace(rec, ctx.recorder());
    last.submit();
    Ok(())
}
