//! f64 CPU reference of GPTQ and GPTAQ (algorithm.md §1.2, §1.5, §2.2, §3.4, §6.4).
//!
//! [`quantize_f64`] follows IST-DASLab `fasterquant` step by step (and the GPTAQ sweep of the
//! official GPTQv2 code), in f64, on copies of the caller's data. The GPU solve is tested against
//! it. Deviations from the references, all deliberate:
//! - Scales are f16-rounded when computed (see `quantizer.rs` and `quant/mod.rs`).
//! - Act-order uses a *stable* descending sort of `diag(H)`: equal diagonals keep ascending
//!   original column order (`torch.argsort` is unstable, its tie order unspecified).
//! - Only the lower triangle of `H` is read (like `torch.linalg.cholesky`); `D` is read in full.
//! - `U` is computed as `(J·chol(J H J)·J)⁻¹` (§6.4) instead of chol → cholesky_inverse → chol; the
//!   two agree to round-off (tested).
//! - Damping retries follow GPTQModel `hessian_inverse` (§1.5), except that the first attempt is
//!   always made with `cfg.damp_percent` even when it is 0 or ≥ 1 (GPTQModel's `while 0 < damp < 1`
//!   would not try at all). Retries add `damp_auto_increment` while the new value is in (0, 1).
//! - Failure to factor the Hessian, or non-finite values appearing during the sweep, fall back to
//!   round-to-nearest of the *original* W ([`Fallback::Rtn`]) instead of raising.
//! - Non-finite W, H or D are rejected up front ([`QuantError::NonFinite`]).

use std::sync::Arc;

use super::quantizer::{
    GroupParams, QuantizerSpec, RowParams, check_matrix, dequantize, find_group_params,
    quantize_code, rtn_quantize_f64,
};
use super::{Fallback, Method, QuantConfig, QuantError, QuantResult};

/// Number of diagonal-floor attempts after the damping retries failed (GPTQModel).
pub const MAX_FLOOR_ATTEMPTS: usize = 6;
/// First diagonal floor, relative to `max|diag(H)|`; attempt `k` (1-based) uses `·10^(k−1)`.
pub const FLOOR_BASE_RELATIVE: f64 = 1e-6;

/// The upper Cholesky factor `U` of the damped inverse Hessian (`H⁻¹ = UᵀU`), row-major `n × n`
/// (strict lower part is 0), and how it was obtained.
#[derive(Clone, Debug, PartialEq)]
pub struct InverseHessianFactor {
    pub u: Vec<f64>,
    /// Absolute damping added to the diagonal: `damp_percent · mean(diag(H'))`, where `H'` is the
    /// input, or the diagonal-floored input when `fallback == Some(DiagonalFloor)`.
    pub damp: f64,
    /// Relative damping actually used.
    pub damp_percent: f64,
    /// `None` if `cfg.damp_percent` worked at once, `IncreasedDamping` if a retry was needed,
    /// `DiagonalFloor` if a diagonal floor was needed.
    pub fallback: Option<Fallback>,
}

/// Lower Cholesky factor `L` (`A = L Lᵀ`) of the symmetric `n × n` row-major `a`, reading only its
/// lower triangle. `None` if a pivot is not strictly positive or not finite (like LAPACK `potrf`).
pub fn cholesky_lower(a: &[f64], n: usize) -> Option<Vec<f64>> {
    if a.len() != n * n {
        return None;
    }
    let mut l = vec![0.0_f64; n * n];
    for j in 0..n {
        let (lj, _) = l.split_at(j * n + j);
        let row_j = &lj[j * n..j * n + j];
        let s = a[j * n + j] - row_j.iter().map(|v| v * v).sum::<f64>();
        if !(s > 0.0 && s.is_finite()) {
            return None;
        }
        let djj = s.sqrt();
        l[j * n + j] = djj;
        for i in j + 1..n {
            let dot: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            l[i * n + j] = (a[i * n + j] - dot) / djj;
        }
    }
    Some(l)
}

/// Inverse of an upper-triangular `n × n` row-major matrix with non-zero diagonal (result upper).
/// `None` on a length mismatch.
pub fn invert_upper_triangular(r: &[f64], n: usize) -> Option<Vec<f64>> {
    if r.len() != n * n {
        return None;
    }
    let mut x = vec![0.0_f64; n * n];
    for j in 0..n {
        x[j * n + j] = 1.0 / r[j * n + j];
        for i in (0..j).rev() {
            let s: f64 = (i + 1..=j).map(|k| r[i * n + k] * x[k * n + j]).sum();
            x[i * n + j] = -s / r[i * n + i];
        }
    }
    Some(x)
}

/// `U` with `H⁻¹ = UᵀU` for an (already damped) SPD `H`, by §6.4: with `J` the index reversal,
/// `J H J = L Lᵀ` ⇒ `H = R Rᵀ` with `R = J L J` upper ⇒ `H⁻¹ = R⁻ᵀR⁻¹` ⇒ `U = R⁻¹` (upper, positive
/// diagonal, hence *the* upper Cholesky factor of `H⁻¹`). One Cholesky and one triangular inverse,
/// no explicit `H⁻¹`. Reads only the lower triangle of `h`. `None` if `H` is not numerically SPD.
pub fn upper_inverse_factor(h: &[f64], n: usize) -> Option<Vec<f64>> {
    if h.len() != n * n {
        return None;
    }
    // (JHJ)[i][j] = H[n−1−i][n−1−j]; for i ≥ j take it from H's lower triangle (transposed index).
    let mut f = vec![0.0_f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            f[i * n + j] = h[(n - 1 - j) * n + (n - 1 - i)];
        }
    }
    let l = cholesky_lower(&f, n)?;
    let mut r = vec![0.0_f64; n * n];
    for i in 0..n {
        for j in i..n {
            r[i * n + j] = l[(n - 1 - i) * n + (n - 1 - j)];
        }
    }
    let u = invert_upper_triangular(&r, n)?;
    u.iter().all(|v| v.is_finite()).then_some(u)
}

/// A factorisation obtained by [`damped_factorisation`], and how.
#[derive(Clone, Debug, PartialEq)]
pub struct Damped<T> {
    pub value: T,
    /// Absolute damping added to the diagonal.
    pub damp: f64,
    /// Relative damping actually used.
    pub damp_percent: f64,
    /// `None` if the first damping worked, `IncreasedDamping` after retries, `DiagonalFloor` if a
    /// floor was needed.
    pub fallback: Option<Fallback>,
}

/// GPTQModel's damping schedule (§1.5), independent of how a factorisation is attempted (f64 on
/// the CPU here, f32 on the GPU in `quant::factor`), so both make the same decisions.
/// `attempt(d)` factors the matrix whose diagonal is replaced by `d` (off-diagonal unchanged) and
/// returns `None` if it is not numerically SPD. Attempts: `d = diag + damp_percent·mean(diag)`,
/// retrying with `damp_percent += damp_auto_increment` while it stays in (0, 1); then up to
/// [`MAX_FLOOR_ATTEMPTS`] diagonal floors `diag ← max(diag + f, f)`, `f = 1e-6·max|diag|·10^(k−1)`,
/// each followed by the same damping loop (restarting at `damp_percent`, mean recomputed from the
/// floored diagonal). The outer `Err` is the attempt's own error (e.g. a GPU failure); the inner
/// one is [`QuantError::NotPositiveDefinite`] when no attempt succeeded.
pub fn damped_factorisation<T, E>(
    diag: &[f64],
    damp_percent: f64,
    damp_auto_increment: f64,
    mut attempt: impl FnMut(&[f64]) -> Result<Option<T>, E>,
) -> Result<Result<Damped<T>, QuantError>, E> {
    let n = diag.len();
    let mut last_pct = damp_percent;
    let mut damping_loop = |dg: &[f64]| -> Result<Option<(T, f64, f64, bool)>, E> {
        let mean = if n == 0 {
            0.0
        } else {
            dg.iter().sum::<f64>() / n as f64
        };
        let mut pct = damp_percent;
        let mut retried = false;
        let mut damped = vec![0.0_f64; n];
        loop {
            last_pct = pct;
            let damp = pct * mean;
            for (x, &d) in damped.iter_mut().zip(dg) {
                *x = d + damp;
            }
            if let Some(v) = attempt(&damped)? {
                return Ok(Some((v, damp, pct, retried)));
            }
            if damp_auto_increment <= 0.0 {
                return Ok(None);
            }
            pct += damp_auto_increment;
            retried = true;
            if !(pct > 0.0 && pct < 1.0) {
                return Ok(None);
            }
        }
    };
    if let Some((value, damp, pct, retried)) = damping_loop(diag)? {
        return Ok(Ok(Damped {
            value,
            damp,
            damp_percent: pct,
            fallback: retried.then_some(Fallback::IncreasedDamping),
        }));
    }
    let max_abs = diag.iter().fold(0.0_f64, |m, v| m.max(v.abs()));
    for k in 0..MAX_FLOOR_ATTEMPTS {
        let f = FLOOR_BASE_RELATIVE * max_abs * 10f64.powi(k as i32);
        let floored: Vec<f64> = diag.iter().map(|&d| (d + f).max(f)).collect();
        if let Some((value, damp, pct, _)) = damping_loop(&floored)? {
            return Ok(Ok(Damped {
                value,
                damp,
                damp_percent: pct,
                fallback: Some(Fallback::DiagonalFloor),
            }));
        }
    }
    Ok(Err(QuantError::NotPositiveDefinite {
        n,
        last_damp_percent: last_pct,
        floor_attempts: MAX_FLOOR_ATTEMPTS,
    }))
}

/// GPTQModel-style damped factorisation (§1.5) in f64: [`damped_factorisation`] with
/// [`upper_inverse_factor`] as the attempt. `h` (`n × n`, row-major, lower triangle read) is not
/// modified. Dead-column handling and permutation are the caller's business.
///
/// Errors: wrong length, non-finite `h` or damping settings, or no attempt succeeded
/// ([`QuantError::NotPositiveDefinite`]).
pub fn inverse_hessian_factor_f64(
    h: &[f64],
    n: usize,
    damp_percent: f64,
    damp_auto_increment: f64,
) -> Result<InverseHessianFactor, QuantError> {
    check_matrix("H", h, n * n)?;
    check_damping(damp_percent, damp_auto_increment)?;
    let diag: Vec<f64> = (0..n).map(|j| h[j * n + j]).collect();
    let mut hb = h.to_vec();
    let outcome = damped_factorisation(&diag, damp_percent, damp_auto_increment, |d| {
        for (j, &v) in d.iter().enumerate() {
            hb[j * n + j] = v;
        }
        Ok::<_, std::convert::Infallible>(upper_inverse_factor(&hb, n))
    });
    let damped = match outcome {
        Ok(r) => r?,
        Err(never) => match never {},
    };
    Ok(InverseHessianFactor {
        u: damped.value,
        damp: damped.damp,
        damp_percent: damped.damp_percent,
        fallback: damped.fallback,
    })
}

fn check_damping(damp_percent: f64, inc: f64) -> Result<(), QuantError> {
    if !(damp_percent.is_finite() && damp_percent >= 0.0 && inc.is_finite() && inc >= 0.0) {
        return Err(QuantError::InvalidConfig(format!(
            "damp_percent ({damp_percent}) and damp_auto_increment ({inc}) must be finite and ≥ 0"
        )));
    }
    Ok(())
}

fn check_config(cfg: &QuantConfig) -> Result<QuantizerSpec, QuantError> {
    let spec = QuantizerSpec::from_config(cfg)?;
    if cfg.block_size == 0 {
        return Err(QuantError::InvalidConfig("block_size must be ≥ 1".into()));
    }
    if cfg.group_size == Some(0) {
        return Err(QuantError::InvalidConfig(
            "group_size must be ≥ 1 (None = per row)".into(),
        ));
    }
    check_damping(cfg.damp_percent, cfg.damp_auto_increment)?;
    if !cfg.method.alpha().is_finite() {
        return Err(QuantError::InvalidConfig(format!(
            "GPTAQ alpha must be finite, got {}",
            cfg.method.alpha()
        )));
    }
    Ok(spec)
}

/// `½·tr(ΔW H ΔWᵀ)` with `ΔW = W − Q`: what GPTQ's `Σ Losses` equals (for the damped `H`).
fn half_quadratic_form(w: &[f64], q: &[f32], rows: usize, cols: usize, h: &[f64]) -> f64 {
    let delta: Vec<f64> = w.iter().zip(q).map(|(&a, &b)| a - f64::from(b)).collect();
    super::metrics::quadratic_form_trace(&delta, rows, cols, h).map_or(f64::NAN, |v| 0.5 * v)
}

/// `diag(H)` as the solve sees it before damping: dead diagonals (`H_jj = 0`) read as 1 (§1.2
/// step 3), in the order of `perm` (original order when `None`); see [`QuantResult::h_diag`].
fn solver_h_diag(h: &[f64], n: usize, perm: Option<&[usize]>) -> Vec<f32> {
    (0..n)
        .map(|k| {
            let j = perm.and_then(|p| p.get(k).copied()).unwrap_or(k);
            let v = h.get(j * n + j).copied().unwrap_or(0.0);
            (if v == 0.0 { 1.0 } else { v }) as f32
        })
        .collect()
}

/// RTN of the original W, with the proxy loss `½·tr(ΔW H ΔWᵀ)` on the caller's (undamped) H.
/// `column_loss` stays empty (RTN has no sequential solve whose per-column terms it could report);
/// `h_diag` is filled in original column order.
fn rtn_with_h(
    w: &[f64],
    rows: usize,
    cols: usize,
    h: &[f64],
    cfg: &QuantConfig,
    fallback: Option<Fallback>,
) -> Result<QuantResult, QuantError> {
    let mut res = rtn_quantize_f64(w, rows, cols, cfg)?;
    let loss = half_quadratic_form(w, &res.q, rows, cols, h);
    // An indefinite H (the fallback case) can make the quadratic form negative: clamp at 0.
    res.proxy_loss_sum = if loss.is_finite() { loss.max(0.0) } else { 0.0 };
    res.h_diag = solver_h_diag(h, cols, None);
    res.fallback = fallback;
    Ok(res)
}

/// GPTQ / GPTAQ reference solve of one module (algorithm.md §1.2 steps 1–8, §2.2).
///
/// Inputs: `w` row-major `[rows, cols]`; `h` row-major `[cols, cols]` (`2/N·X_qᵀX_q`, lower
/// triangle read); `d` row-major `[cols, cols]` (`2/N·(X_fp−X_q)ᵀX_q`, rows index the ΔX feature),
/// used only when `cfg.method` is `Gptaq` (GPTAQ without `d` is GPTQ). Nothing the caller owns is
/// modified.
///
/// Steps (processing order = act-order permutation if enabled):
/// 1. `gs == None`: per-row params from the whole rows of the *original* W (IST step 2, which runs
///    before dead-column zeroing — so zeroed dead columns still count for these params).
/// 2. Dead columns (`H_jj == 0`): `H_jj = 1`, `W[:, j] = 0`, `D[:, j] = 0`.
/// 3. Static groups: params of original group `g` from W after step 2, before permutation.
/// 4. Act-order: `perm` = stable descending argsort of `diag(H)` (after step 2); W columns, H and
///    D permuted (`H[perm][:, perm]`).
/// 5. `U` by [`inverse_hessian_factor_f64`] on the permuted H (damping, retries, floors). Failure
///    → RTN of the original W with `Fallback::Rtn`.
/// 6. GPTAQ: `P = alpha·(triu₁(D·Uᵀ)·U)` ([`gptaq_p`]).
/// 7. Blocked sweep with `cfg.block_size` (`SweepState`), exactly the IST loop: dynamic group
///    params at processing position `k` with `k % gs == 0` come from `W[:, k..k+gs]` — the matrix
///    that only has the cross-block updates, **not** the in-block updates held in `W1` (the
///    reference quirk inherited by AutoGPTQ/GPTQModel; results depend on the block size when a group
///    starts mid-block). Static groups use `groups[perm[k] / gs]`. In-block: `W1[:, i:] −=
///    e⊗U1[i, i:]` (GPTAQ: `−= e⊗U1[i, i:] − w⊗P1[i, i:]`, `w` the pre-quantization column).
///    Cross-block: `W[:, i2:] −= Err1·U[i1:i2, i2:]` (GPTAQ: `− W1·P[i1:i2, i2:]`, W1 = the block
///    after its loop ≈ its quantized values).
///
/// Outputs in original column order: `q`, `codes`; `scales`/`zeros` `[num_groups, rows]` with group
/// `g` the `g`-th group formed (processing order for act-order with dynamic groups, original order
/// for static groups); `g_idx[j] = invperm[j] / gs` for act-order + dynamic groups, else `j / gs`;
/// `perm = Some(perm)` iff act-order; `proxy_loss_sum = Σ (w−q)²/(2·U_kk²)` (for GPTQ this equals
/// `½·tr(ΔW H_damped ΔWᵀ)`; for GPTAQ it is the same per-column expression, *not* the GPTAQ
/// objective) and its per-column terms `column_loss` (processing order); `h_diag` = `diag(H)` after
/// step 2, before damping, in processing order; `damp`, `damp_percent`, `fallback` from step 5.
///
/// `Method::Rtn`: [`rtn_quantize_f64`] of W (H and D only used for `proxy_loss_sum =
/// ½·tr(ΔW H ΔWᵀ)` with the undamped H, clamped at 0). The RTN fallback reports the same quantity
/// (H may be indefinite there, hence the clamp), `damp = damp_percent = 0`. Both leave
/// `column_loss` empty and give `h_diag` in original order.
///
/// Errors: shape mismatch, non-finite W/H/D, invalid config (bits ∉ 1..=8, block_size 0,
/// group_size 0, negative or non-finite damping, non-finite alpha). Never returns non-finite values.
pub fn quantize_f64(
    w: &[f64],
    rows: usize,
    cols: usize,
    h: &[f64],
    d: Option<&[f64]>,
    cfg: &QuantConfig,
) -> Result<QuantResult, QuantError> {
    match start_sweep(w, rows, cols, h, d, cfg, None, false)? {
        SweepStart::Finished(res) => Ok(*res),
        SweepStart::Sweep(mut sweep) => {
            sweep.run();
            sweep.into_result(w, h)
        }
    }
}

/// How a solve begins: RTN (the method itself, an empty module, or a Hessian that cannot be
/// factored) needs no sweep.
pub(crate) enum SweepStart {
    Finished(Box<QuantResult>),
    Sweep(Box<SweepState>),
}

/// Steps 1–6 of [`quantize_f64`] (checks, preparation, factorisation, `P`), leaving the sweep
/// (step 7) to the caller: [`SweepState::run`] for a one-shot solve, or its single steps (the layer
/// lab's step mode). `cache`: reuse the factorisation of an earlier call on the SAME `h` and `d`
/// (see [`FactorCache`]); `None` computes it for this call only. `record`: keep the prepared W and
/// every column's pre-quantization values ([`SweepState::recorded`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_sweep(
    w: &[f64],
    rows: usize,
    cols: usize,
    h: &[f64],
    d: Option<&[f64]>,
    cfg: &QuantConfig,
    cache: Option<&mut FactorCache>,
    record: bool,
) -> Result<SweepStart, QuantError> {
    let spec = check_config(cfg)?;
    let n = cols;
    let n_el = rows
        .checked_mul(cols)
        .ok_or_else(|| QuantError::InvalidConfig(format!("rows·cols overflows: {rows}×{cols}")))?;
    check_matrix("W", w, n_el)?;
    check_matrix("H", h, n * n)?;
    if let Some(d) = d {
        check_matrix("D", d, n * n)?;
    }
    if cfg.method == Method::Rtn || n == 0 {
        return rtn_with_h(w, rows, cols, h, cfg, None).map(|r| SweepStart::Finished(Box::new(r)));
    }
    let alpha = cfg.method.alpha();
    let d = match cfg.method {
        Method::Gptaq { .. } => d,
        _ => None,
    };
    let diag: Vec<f64> = (0..n).map(|j| h[j * n + j]).collect();
    let prepared = prepare(w, &diag, rows, n, cfg, &spec);
    let h_diag: Vec<f32> = prepared.diag.iter().map(|&v| v as f32).collect();

    // Steps 5–6: U (damping, retries) and P, from the cache when its key matches.
    let keep = cache.is_some();
    let mut local = FactorCache::default();
    let cache = match cache {
        Some(c) => c,
        None => &mut local,
    };
    let entry = cache.entry(&prepared, h, n, cfg);
    let factor = match &entry.factor {
        Ok(f) => Arc::clone(f),
        Err(e) => {
            let reason = e.to_string();
            return rtn_with_h(w, rows, cols, h, cfg, Some(Fallback::Rtn { reason }))
                .map(|r| SweepStart::Finished(Box::new(r)));
        }
    };
    let p = d.map(|d| entry.p(d, &prepared.dead, n, alpha, keep));
    Ok(SweepStart::Sweep(Box::new(SweepState::new(
        prepared, rows, n, spec, cfg, factor, p, h_diag, record,
    ))))
}

/// [`quantize_f64`] on f32 inputs (widened exactly to f64).
pub fn quantize_reference(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f32],
    d: Option<&[f32]>,
    cfg: &QuantConfig,
) -> Result<QuantResult, QuantError> {
    let widen = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
    let d64 = d.map(widen);
    quantize_f64(&widen(w), rows, cols, &widen(h), d64.as_deref(), cfg)
}

/// `P = alpha·(triu₁(D·Uᵀ)·U)` (strictly upper; algorithm.md §2.2 writes the same product as
/// `(alpha·triu₁(D·Uᵀ))·U`). The layer lab reuses the unscaled product for every α, so the
/// reference scales last too: a solve at α is then bit-identical however it was started. `None` on
/// a length mismatch.
pub fn gptaq_p(d: &[f64], u: &[f64], n: usize, alpha: f64) -> Option<Vec<f64>> {
    let mut p = gptaq_p_unit(d, u, n)?;
    p.iter_mut().for_each(|v| *v *= alpha);
    Some(p)
}

/// `triu₁(D·Uᵀ)·U` (P at α = 1). `U` is upper, so `T[a][b] = (D·Uᵀ)[a][b] = Σ_{c≥b} D[a][c]·U[b][c]`
/// and `P[a][e] = Σ_{a<b≤e} T[a][b]·U[b][e]`. `None` on a length mismatch.
fn gptaq_p_unit(d: &[f64], u: &[f64], n: usize) -> Option<Vec<f64>> {
    if d.len() != n * n || u.len() != n * n {
        return None;
    }
    let mut t = vec![0.0_f64; n * n];
    for a in 0..n {
        for b in a + 1..n {
            t[a * n + b] = (b..n).map(|c| d[a * n + c] * u[b * n + c]).sum();
        }
    }
    let mut p = vec![0.0_f64; n * n];
    for a in 0..n {
        let (prow, trow) = (&mut p[a * n..(a + 1) * n], &t[a * n..(a + 1) * n]);
        for b in a + 1..n {
            let tb = trow[b];
            for e in b..n {
                prow[e] += tb * u[b * n + e];
            }
        }
    }
    Some(p)
}

/// Steps 2–5 of the reference before the factorisation, shared by the f64 solve and the GPU
/// solve's host preparation (`quant::gpu`), so both make identical decisions.
pub(crate) struct Prepared {
    /// Per-row params of the whole original rows (group size −1 only; IST step 2).
    pub row_params: Option<GroupParams>,
    /// Columns with `H_jj = 0`.
    pub dead: Vec<bool>,
    /// Params of the original column groups (static groups), after dead zeroing.
    pub static_groups: Option<Vec<GroupParams>>,
    /// Act-order permutation (stable descending `diag(H)`), if any.
    pub perm: Option<Vec<usize>>,
    /// W with dead columns zeroed, in processing order.
    pub w: Vec<f64>,
    /// diag(H) with dead diagonals set to 1, in processing order. Only the diagonal is needed for
    /// these decisions, so the GPU solve never reads the whole H back.
    pub diag: Vec<f64>,
}

impl Prepared {
    /// The full H of the solve: `h` with dead diagonals set to 1, permuted to processing order.
    pub(crate) fn permuted_h(&self, h: &[f64], n: usize) -> Vec<f64> {
        let mut hm = h.to_vec();
        for j in (0..n).filter(|&j| self.dead[j]) {
            hm[j * n + j] = 1.0;
        }
        match &self.perm {
            Some(p) => permute_sym(&hm, n, p),
            None => hm,
        }
    }
}

/// `h_diag` is diag(H) in the original column order.
pub(crate) fn prepare(
    w: &[f64],
    h_diag: &[f64],
    rows: usize,
    n: usize,
    cfg: &QuantConfig,
    spec: &QuantizerSpec,
) -> Prepared {
    let mut wm = w.to_vec();
    let mut diag = h_diag.to_vec();
    // Step 2 of IST: per-row params on the whole (original) rows; used only when gs == None.
    let row_params = cfg
        .group_size
        .is_none()
        .then(|| find_group_params(&wm, rows, n, 0, n, spec));
    // Step 3: dead columns.
    let dead: Vec<bool> = diag.iter().map(|&d| d == 0.0).collect();
    for j in (0..n).filter(|&j| dead[j]) {
        diag[j] = 1.0;
        for r in 0..rows {
            wm[r * n + j] = 0.0;
        }
    }
    // Step 4: static groups (original column groups, after dead zeroing, before permutation).
    let static_groups = match cfg.group_size {
        Some(gs) if cfg.static_groups => Some(
            (0..n.div_ceil(gs))
                .map(|g| find_group_params(&wm, rows, n, g * gs, (g + 1) * gs, spec))
                .collect::<Vec<_>>(),
        ),
        _ => None,
    };
    // Step 5: act-order. Stable sort: ties keep ascending original index.
    let perm: Option<Vec<usize>> = cfg.act_order.then(|| {
        let mut p: Vec<usize> = (0..n).collect();
        p.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
        p
    });
    if let Some(p) = &perm {
        wm = permute_cols(&wm, rows, n, p);
        diag = p.iter().map(|&j| diag[j]).collect();
    }
    Prepared {
        row_params,
        dead,
        static_groups,
        perm,
        w: wm,
        diag,
    }
}

/// `w` (`rows × n`) with its columns in the order `perm` (column k of the result is column
/// `perm[k]` of `w`); f64 here, f32 in the GPU solve's preparation of W.
pub(crate) fn permute_cols<T: Copy + Default>(
    w: &[T],
    rows: usize,
    n: usize,
    perm: &[usize],
) -> Vec<T> {
    let mut out = vec![T::default(); rows * n];
    for r in 0..rows {
        for (k, &j) in perm.iter().enumerate() {
            out[r * n + k] = w[r * n + j];
        }
    }
    out
}

fn permute_sym(m: &[f64], n: usize, perm: &[usize]) -> Vec<f64> {
    let mut out = vec![0.0_f64; n * n];
    for (a, &pa) in perm.iter().enumerate() {
        for (b, &pb) in perm.iter().enumerate() {
            out[a * n + b] = m[pa * n + pb];
        }
    }
    out
}

/// One-entry cache of the O(n³) part of a solve — `U` (§1.2 steps 6–7) and GPTAQ's unscaled `P`
/// (§2.2) — which depends only on H, D, act-order and damping, not on bits, groups, block size or
/// α. Valid for ONE `(H, D)` pair: its owner must not use it with other statistics (the layer lab
/// keeps one per capture). A key mismatch (act-order, damping or the permutation) refactors.
#[derive(Debug, Default)]
pub(crate) struct FactorCache {
    entry: Option<FactorEntry>,
}

#[derive(Debug)]
struct FactorEntry {
    act_order: bool,
    damp_percent: f64,
    damp_auto_increment: f64,
    perm: Option<Vec<usize>>,
    /// The factor of the prepared (dead-handled, permuted) H, or why there is none.
    factor: Result<Arc<InverseHessianFactor>, QuantError>,
    /// `triu₁(D·Uᵀ)·U` in processing order, computed on first GPTAQ use.
    p_unit: Option<Vec<f64>>,
}

impl FactorCache {
    /// `h`: the caller's H (original order); the solve's H is derived from it only on a miss.
    fn entry(
        &mut self,
        prepared: &Prepared,
        h: &[f64],
        n: usize,
        cfg: &QuantConfig,
    ) -> &mut FactorEntry {
        let hit = self.entry.as_ref().is_some_and(|e| {
            e.act_order == cfg.act_order
                && e.damp_percent.to_bits() == cfg.damp_percent.to_bits()
                && e.damp_auto_increment.to_bits() == cfg.damp_auto_increment.to_bits()
                && e.perm == prepared.perm
        });
        if !hit {
            self.entry = None;
        }
        self.entry.get_or_insert_with(|| FactorEntry {
            act_order: cfg.act_order,
            damp_percent: cfg.damp_percent,
            damp_auto_increment: cfg.damp_auto_increment,
            perm: prepared.perm.clone(),
            factor: inverse_hessian_factor_f64(
                &prepared.permuted_h(h, n),
                n,
                cfg.damp_percent,
                cfg.damp_auto_increment,
            )
            .map(Arc::new),
            p_unit: None,
        })
    }
}

impl FactorEntry {
    /// `P = alpha·p_unit` for the caller's `d` (dead columns zeroed and permuted like H, step 2/4).
    /// `keep`: leave the unscaled product in the cache (else it is scaled in place and handed out).
    fn p(&mut self, d: &[f64], dead: &[bool], n: usize, alpha: f64, keep: bool) -> Vec<f64> {
        let unit = match self.p_unit.take() {
            Some(unit) => unit,
            None => {
                let mut dm = d.to_vec();
                for a in 0..n {
                    for j in (0..n).filter(|&j| dead[j]) {
                        dm[a * n + j] = 0.0;
                    }
                }
                if let Some(p) = &self.perm {
                    dm = permute_sym(&dm, n, p);
                }
                let u = match &self.factor {
                    Ok(f) => f.u.as_slice(),
                    Err(_) => &[],
                };
                // Lengths match by construction (n×n each); an empty P would only come from a
                // missing factor, which the caller has already turned into the RTN fallback.
                gptaq_p_unit(&dm, u, n).unwrap_or_default()
            }
        };
        if keep {
            let p = unit.iter().map(|v| alpha * v).collect();
            self.p_unit = Some(unit);
            p
        } else {
            let mut p = unit;
            p.iter_mut().for_each(|v| *v *= alpha);
            p
        }
    }
}

/// What the sweep does next (or did, see `SweepState::step`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SweepAction {
    /// Quantize processing column `k` of the block `[i1, i2)` and apply the in-block updates.
    Column { k: usize, i1: usize, i2: usize },
    /// The block `[i1, i2)` is quantized: apply its deferred updates to columns `i2..n` (the lazy
    /// batch GEMM).
    BlockUpdate { i1: usize, i2: usize },
    /// Every column is quantized (or a non-finite value stopped the sweep).
    Done,
}

/// The pictures' raw material, kept when a sweep is started with `record`.
#[derive(Clone, Debug)]
pub(crate) struct SweepRecord {
    /// W after preparation (dead columns zeroed, processing order), `[rows, n]`.
    pub start: Vec<f64>,
    /// Each column's value at the moment it was quantized (after every update it received),
    /// processing order, `[rows, n]`; 0 for columns not quantized yet.
    pub pre: Vec<f64>,
}

/// The blocked sweep of §1.2 step 8 (and §2.2) as an explicit state machine over processing
/// columns, so that the one-shot solve ([`SweepState::run`]) and the layer lab's step mode execute
/// the very same arithmetic in the very same order. Position: the block `[i1, i2)` with its next
/// column `i1 + i`; `i == cnt` means the block is quantized and its cross-block update is due.
pub(crate) struct SweepState {
    rows: usize,
    n: usize,
    /// Block size (`cfg.block_size`, at most `n`: the stride of `w1`/`err1`).
    bs: usize,
    spec: QuantizerSpec,
    cfg: QuantConfig,
    factor: Arc<InverseHessianFactor>,
    /// GPTAQ's `P` (α applied), processing order.
    p: Option<Vec<f64>>,
    perm: Option<Vec<usize>>,
    row_params: Option<GroupParams>,
    static_groups: Option<Vec<GroupParams>>,
    h_diag: Vec<f32>,
    /// W with the cross-block updates applied so far (processing order).
    w: Vec<f64>,
    /// The current block's columns with their in-block updates, `[rows, bs]`.
    w1: Vec<f64>,
    /// The current block's scaled errors `e = (w − q)/U_kk`, `[rows, bs]`.
    err1: Vec<f64>,
    acc_u: Vec<f64>,
    acc_p: Vec<f64>,
    q: Vec<f64>,
    codes: Vec<u8>,
    loss: f64,
    column_loss: Vec<f64>,
    dyn_groups: Vec<GroupParams>,
    cur: Vec<RowParams>,
    i1: usize,
    i: usize,
    failed: bool,
    record: Option<SweepRecord>,
}

impl SweepState {
    #[allow(clippy::too_many_arguments)]
    fn new(
        prepared: Prepared,
        rows: usize,
        n: usize,
        spec: QuantizerSpec,
        cfg: &QuantConfig,
        factor: Arc<InverseHessianFactor>,
        p: Option<Vec<f64>>,
        h_diag: Vec<f32>,
        record: bool,
    ) -> Self {
        let Prepared {
            row_params,
            static_groups,
            perm,
            w,
            ..
        } = prepared;
        let bs = cfg.block_size.min(n).max(1);
        let cur: Vec<RowParams> = match &row_params {
            Some(g) => (0..rows).filter_map(|r| g.row(r)).collect(),
            None => Vec::new(),
        };
        let record = record.then(|| SweepRecord {
            start: w.clone(),
            pre: vec![0.0; rows * n],
        });
        let mut s = Self {
            rows,
            n,
            bs,
            spec,
            cfg: cfg.clone(),
            factor,
            p,
            perm,
            row_params,
            static_groups,
            h_diag,
            w,
            w1: vec![0.0; rows * bs],
            err1: vec![0.0; rows * bs],
            acc_u: vec![0.0; n],
            acc_p: vec![0.0; n],
            q: vec![0.0; rows * n],
            codes: vec![0; rows * n],
            loss: 0.0,
            column_loss: vec![0.0; n],
            dyn_groups: Vec::new(),
            cur,
            i1: 0,
            i: 0,
            failed: false,
            record,
        };
        s.load_block();
        s
    }

    fn i2(&self) -> usize {
        (self.i1 + self.bs).min(self.n)
    }

    /// Copies the current block of W into W1 (the start of an IST block iteration).
    fn load_block(&mut self) {
        let (i1, i2, n, bs) = (self.i1, self.i2(), self.n, self.bs);
        let cnt = i2 - i1;
        for r in 0..self.rows {
            self.w1[r * bs..r * bs + cnt].copy_from_slice(&self.w[r * n + i1..r * n + i2]);
        }
    }

    /// What [`SweepState::step`] would do now.
    pub fn next_action(&self) -> SweepAction {
        let (i1, i2) = (self.i1, self.i2());
        if self.failed || i1 >= self.n {
            SweepAction::Done
        } else if self.i < i2 - i1 {
            SweepAction::Column {
                k: i1 + self.i,
                i1,
                i2,
            }
        } else if i2 < self.n {
            SweepAction::BlockUpdate { i1, i2 }
        } else {
            SweepAction::Done
        }
    }

    /// Performs the next action and returns it.
    pub fn step(&mut self) -> SweepAction {
        let a = self.next_action();
        match a {
            SweepAction::Column { .. } => self.quantize_column(),
            SweepAction::BlockUpdate { .. } => self.update_later_blocks(),
            SweepAction::Done => {}
        }
        a
    }

    /// The whole sweep (IST's two nested loops).
    pub fn run(&mut self) {
        while self.step() != SweepAction::Done {}
    }

    /// IST's inner loop body for processing column `k = i1 + i`: group parameters, quantization,
    /// the proxy loss term, and the in-block rank-1 update of `W1[:, i:]` (GPTAQ: plus its P term).
    fn quantize_column(&mut self) {
        let (rows, n, bs) = (self.rows, self.n, self.bs);
        let (i1, i2, i) = (self.i1, self.i2(), self.i);
        let cnt = i2 - i1;
        let k = i1 + i;
        if let Some(gs) = self.cfg.group_size {
            let params = match &self.static_groups {
                None if k % gs == 0 => {
                    // Reads W (cross-block updates only), not W1: the reference quirk.
                    let g = find_group_params(&self.w, rows, n, k, k + gs, &self.spec);
                    self.dyn_groups.push(g);
                    self.dyn_groups.last()
                }
                None => None,
                Some(groups) => {
                    let kk = self.perm.as_ref().map_or(k, |p| p[k]);
                    groups.get(kk / gs)
                }
            };
            if let Some(g) = params {
                self.cur = (0..rows).filter_map(|r| g.row(r)).collect();
            }
        }
        let maxq = self.spec.maxq;
        let u = &self.factor.u;
        let dkk = u[k * n + k];
        let urow = &u[k * n + i1..k * n + i2];
        let prow = self.p.as_ref().map(|p| &p[k * n + i1..k * n + i2]);
        let mut col_loss = 0.0_f64;
        for r in 0..rows {
            let Some(&params) = self.cur.get(r) else {
                self.failed = true;
                return;
            };
            let wv = self.w1[r * bs + i];
            if !wv.is_finite() {
                self.failed = true;
                return;
            }
            let code = quantize_code(wv, params, maxq);
            let qv = dequantize(code, params);
            self.q[r * n + k] = qv;
            self.codes[r * n + k] = code as u8;
            let l = (wv - qv) * (wv - qv) / (dkk * dkk) / 2.0;
            self.loss += l;
            col_loss += l;
            if let Some(rec) = &mut self.record {
                rec.pre[r * n + k] = wv;
            }
            let e = (wv - qv) / dkk;
            let w1row = &mut self.w1[r * bs..r * bs + cnt];
            match prow {
                None => {
                    for j in i..cnt {
                        w1row[j] -= e * urow[j];
                    }
                }
                Some(prow) => {
                    for j in i..cnt {
                        w1row[j] -= e * urow[j] - wv * prow[j];
                    }
                }
            }
            self.err1[r * bs + i] = e;
        }
        self.column_loss[k] = col_loss;
        self.i += 1;
    }

    /// IST's lazy batch update after a block: `W[:, i2:] −= Err1·U[i1:i2, i2:]` (GPTAQ: `+=
    /// W1·P[i1:i2, i2:]`), then the next block is loaded.
    fn update_later_blocks(&mut self) {
        let (rows, n, bs) = (self.rows, self.n, self.bs);
        let (i1, i2) = (self.i1, self.i2());
        let cnt = i2 - i1;
        let u = &self.factor.u;
        // Element-wise the same operations, in the same order, as IST's `Err1·U[i1:i2, i2:]`
        // accumulated row by row (what keeps the stepped and the one-shot solve bit-identical).
        for r in 0..rows {
            let (acc_u, acc_p) = (&mut self.acc_u[i2..], &mut self.acc_p[i2..]);
            acc_u.fill(0.0);
            acc_p.fill(0.0);
            for t in 0..cnt {
                let e = self.err1[r * bs + t];
                let urow = &u[(i1 + t) * n + i2..(i1 + t + 1) * n];
                for (a, &uc) in acc_u.iter_mut().zip(urow) {
                    *a += e * uc;
                }
                if let Some(p) = &self.p {
                    let wq = self.w1[r * bs + t];
                    let prow = &p[(i1 + t) * n + i2..(i1 + t + 1) * n];
                    for (a, &pc) in acc_p.iter_mut().zip(prow) {
                        *a += wq * pc;
                    }
                }
            }
            let wrow = &mut self.w[r * n + i2..(r + 1) * n];
            if self.p.is_some() {
                for ((x, &au), &ap) in wrow.iter_mut().zip(acc_u.iter()).zip(acc_p.iter()) {
                    *x -= au - ap;
                }
            } else {
                for (x, &au) in wrow.iter_mut().zip(acc_u.iter()) {
                    *x -= au;
                }
            }
        }
        self.i1 = i2;
        self.i = 0;
        self.load_block();
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.n
    }
    pub fn block_size(&self) -> usize {
        self.bs
    }
    /// `U` (processing order, `n × n`).
    pub fn u(&self) -> &[f64] {
        &self.factor.u
    }
    /// GPTAQ's `P` with α applied (processing order, `n × n`).
    pub fn p(&self) -> Option<&[f64]> {
        self.p.as_deref()
    }
    pub fn perm(&self) -> Option<&[usize]> {
        self.perm.as_deref()
    }
    /// Absolute damping added to the diagonal.
    pub fn damp(&self) -> f64 {
        self.factor.damp
    }
    /// `diag(H)` before damping, processing order.
    pub fn h_diag(&self) -> &[f32] {
        &self.h_diag
    }
    /// Σ of the proxy loss terms so far.
    pub fn proxy_loss_sum(&self) -> f64 {
        self.loss
    }
    /// Per-column proxy loss so far (processing order; 0 for columns not quantized yet).
    pub fn column_loss(&self) -> &[f64] {
        &self.column_loss
    }
    /// Fake-quantized values so far (processing order; 0 for columns not quantized yet).
    pub fn q(&self) -> &[f64] {
        &self.q
    }
    pub fn recorded(&self) -> Option<&SweepRecord> {
        self.record.as_ref()
    }
    /// The current block's scaled errors and its W1, both `[rows, block_size]` (stride
    /// `block_size`, the first `i2 − i1` columns used).
    pub fn block_buffers(&self) -> (&[f64], &[f64]) {
        (&self.err1, &self.w1)
    }

    /// Every weight as the sweep holds it now, processing order `[rows, n]`: `q` for quantized
    /// columns, the in-block values of the current block's other columns, and W (with the
    /// cross-block updates so far) beyond the block.
    pub fn current_weights(&self) -> Vec<f64> {
        let (rows, n, bs) = (self.rows, self.n, self.bs);
        let (i1, i2) = (self.i1, self.i2());
        let done = i1 + self.i;
        let mut out = self.w.clone();
        for r in 0..rows {
            out[r * n..r * n + done].copy_from_slice(&self.q[r * n..r * n + done]);
            for c in done..i2 {
                out[r * n + c] = self.w1[r * bs + c - i1];
            }
        }
        out
    }

    /// The solve's result in original column order (`quantize_f64`'s outputs), or the RTN fallback
    /// of the caller's `w` / `h` (the arrays the sweep was started from) when a non-finite value
    /// stopped the sweep or it was not run to the end.
    pub fn into_result(self, w: &[f64], h: &[f64]) -> Result<QuantResult, QuantError> {
        let (rows, n) = (self.rows, self.n);
        let reason = if self.failed || !self.loss.is_finite() {
            Some("non-finite values during the GPTQ sweep")
        } else if self.next_action() != SweepAction::Done {
            Some("the sweep was stopped before its last column")
        } else {
            None
        };
        if let Some(reason) = reason {
            let reason = reason.to_string();
            return rtn_with_h(w, rows, n, h, &self.cfg, Some(Fallback::Rtn { reason }));
        }
        // Back to original column order: processing position k holds original column perm[k].
        let n_el = rows * n;
        let mut q = vec![0.0_f32; n_el];
        let mut codes = vec![0_u8; n_el];
        for r in 0..rows {
            for k in 0..n {
                let j = self.perm.as_ref().map_or(k, |p| p[k]);
                q[r * n + j] = self.q[r * n + k] as f32;
                codes[r * n + j] = self.codes[r * n + k];
            }
        }
        let groups = match (self.cfg.group_size, self.static_groups, self.row_params) {
            (Some(_), Some(s), _) => s,
            (Some(_), None, _) => self.dyn_groups,
            (None, _, Some(rp)) => vec![rp],
            (None, _, None) => Vec::new(),
        };
        let (scales, zeros): (Vec<f32>, Vec<u32>) = groups
            .iter()
            .flat_map(|g| g.scale.iter().zip(&g.zero))
            .map(|(&s, &z)| (s as f32, z))
            .unzip();
        let gs = self.cfg.group_len(n);
        let g_idx: Vec<u32> = match (&self.perm, self.cfg.group_size, self.cfg.static_groups) {
            (Some(p), Some(_), false) => {
                let mut inv = vec![0_usize; n];
                for (k, &j) in p.iter().enumerate() {
                    inv[j] = k;
                }
                inv.iter().map(|&k| (k / gs) as u32).collect()
            }
            _ => (0..n).map(|j| (j / gs) as u32).collect(),
        };
        Ok(QuantResult {
            rows,
            cols: n,
            q,
            codes,
            scales,
            zeros,
            g_idx,
            perm: self.perm,
            proxy_loss_sum: self.loss,
            column_loss: self.column_loss,
            h_diag: self.h_diag,
            damp: self.factor.damp,
            damp_percent: self.factor.damp_percent,
            fallback: self.factor.fallback.clone(),
        })
    }
}
