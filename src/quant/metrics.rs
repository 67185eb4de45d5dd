//! Per-module error metrics on the calibration tokens (f64), plotted by the GUI.
//!
//! Notation: `W` (original weights) and `Q` (fake-quantized weights) are row-major `[rows, n]`;
//! `X_q` (the module's inputs in the quantized model) and `X_fp` (the same tokens' inputs in the
//! full-precision model) are row-major `[T, n]`, one token per row. `‖·‖` is the Frobenius norm and
//! every error is relative to the full-precision output energy `‖W X_fpᵀ‖²`:
//!
//! - `quant_error  = ‖(W − Q) X_qᵀ‖² / ‖W X_fpᵀ‖²` — what GPTQ minimises (both sides see `X_q`);
//! - `asym_error   = ‖W (X_fp − X_q)ᵀ‖² / ‖W X_fpᵀ‖²` — the error already present in the inputs,
//!   which no choice of `Q` for this module can remove by itself (the error inherited from earlier
//!   layers, propagated through the *unquantized* weights);
//! - `output_error = ‖Q X_qᵀ − W X_fpᵀ‖² / ‖W X_fpᵀ‖²` — the true output error of the quantized
//!   module on quantized inputs vs. the FP module on FP inputs; what GPTAQ minimises.
//!
//! With `E = X_fp − X_q`: `Q X_qᵀ − W X_fpᵀ = −(ΔW X_qᵀ + W Eᵀ)` (`ΔW = W − Q`), so
//! `output = quant + asym + 2·⟨ΔW X_qᵀ, W Eᵀ⟩ / ‖W X_fpᵀ‖²` — GPTAQ lowers `output` by making the
//! cross term negative.
//!
//! The same numbers follow from the `n × n` Gram matrices `G_qq = X_qᵀX_q`, `G_dq = EᵀX_q`
//! (rows index the E feature, the layout of GPTAQ's `D`), `G_dd = EᵀE`, with `tr(A G Bᵀ)` sums:
//! `‖ΔW X_qᵀ‖² = tr(ΔW G_qq ΔWᵀ)`, `‖W Eᵀ‖² = tr(W G_dd Wᵀ)`, `⟨ΔW X_qᵀ, W Eᵀ⟩ = tr(W G_dq ΔWᵀ)`,
//! `‖W X_fpᵀ‖² = tr(W (G_qq + G_dq + G_dqᵀ + G_dd) Wᵀ)`. Only ratios are reported, so the Grams may
//! carry any common factor: the pipeline can pass `H = 2/N·G_qq` and `D = 2/N·G_dq` directly, with
//! `G_dd` accumulated under the same normalisation.
//!
//! A zero denominator gives 0 for a zero numerator and `+∞` otherwise (never NaN).

use super::QuantError;

/// Relative errors of one module (definitions in the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ModuleErrors {
    /// `‖(W − Q) X_qᵀ‖² / ‖W X_fpᵀ‖²`.
    pub quant_error: f64,
    /// `‖W (X_fp − X_q)ᵀ‖² / ‖W X_fpᵀ‖²`.
    pub asym_error: f64,
    /// `‖Q X_qᵀ − W X_fpᵀ‖² / ‖W X_fpᵀ‖²`.
    pub output_error: f64,
}

fn ratio(num: f64, den: f64) -> f64 {
    if den == 0.0 {
        if num == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        num / den
    }
}

fn check_len(what: &'static str, v: &[f64], expected: usize) -> Result<(), QuantError> {
    if v.len() == expected {
        Ok(())
    } else {
        Err(QuantError::ShapeMismatch {
            what,
            expected,
            got: v.len(),
        })
    }
}

/// `‖A Xᵀ‖²` for `A` `[rows, n]` and `X` `[t, n]`, both row-major.
fn frob2_a_xt(a: &[f64], rows: usize, x: &[f64], t: usize, n: usize) -> f64 {
    let mut s = 0.0;
    for r in 0..rows {
        let ar = &a[r * n..(r + 1) * n];
        for k in 0..t {
            let xk = &x[k * n..(k + 1) * n];
            let v: f64 = ar.iter().zip(xk).map(|(p, q)| p * q).sum();
            s += v * v;
        }
    }
    s
}

/// [`ModuleErrors`] from the activations themselves (`x_q`, `x_fp` row-major `[tokens, cols]`).
pub fn module_errors(
    w: &[f64],
    q: &[f64],
    rows: usize,
    cols: usize,
    x_q: &[f64],
    x_fp: &[f64],
    tokens: usize,
) -> Result<ModuleErrors, QuantError> {
    check_len("W", w, rows * cols)?;
    check_len("Q", q, rows * cols)?;
    check_len("X_q", x_q, tokens * cols)?;
    check_len("X_fp", x_fp, tokens * cols)?;
    let delta: Vec<f64> = w.iter().zip(q).map(|(a, b)| a - b).collect();
    let e: Vec<f64> = x_fp.iter().zip(x_q).map(|(a, b)| a - b).collect();
    let den = frob2_a_xt(w, rows, x_fp, tokens, cols);
    let quant = frob2_a_xt(&delta, rows, x_q, tokens, cols);
    let asym = frob2_a_xt(w, rows, &e, tokens, cols);
    // Q X_qᵀ − W X_fpᵀ directly (not via the expansion), as the definition reads.
    let mut out = 0.0;
    for r in 0..rows {
        let (qr, wr) = (&q[r * cols..(r + 1) * cols], &w[r * cols..(r + 1) * cols]);
        for k in 0..tokens {
            let xq = &x_q[k * cols..(k + 1) * cols];
            let xf = &x_fp[k * cols..(k + 1) * cols];
            let a: f64 = qr.iter().zip(xq).map(|(p, v)| p * v).sum();
            let b: f64 = wr.iter().zip(xf).map(|(p, v)| p * v).sum();
            out += (a - b) * (a - b);
        }
    }
    Ok(ModuleErrors {
        quant_error: ratio(quant, den),
        asym_error: ratio(asym, den),
        output_error: ratio(out, den),
    })
}

/// `tr(A G Bᵀ) = Σ_r a_r G b_rᵀ` for `A`, `B` `[rows, n]` and `G` `[n, n]`, all row-major.
pub fn bilinear_trace(
    a: &[f64],
    b: &[f64],
    rows: usize,
    n: usize,
    g: &[f64],
) -> Result<f64, QuantError> {
    check_len("A", a, rows * n)?;
    check_len("B", b, rows * n)?;
    check_len("G", g, n * n)?;
    let mut s = 0.0;
    let mut gb = vec![0.0_f64; n];
    for r in 0..rows {
        let br = &b[r * n..(r + 1) * n];
        for (i, v) in gb.iter_mut().enumerate() {
            *v = g[i * n..(i + 1) * n]
                .iter()
                .zip(br)
                .map(|(x, y)| x * y)
                .sum();
        }
        s += a[r * n..(r + 1) * n]
            .iter()
            .zip(&gb)
            .map(|(x, y)| x * y)
            .sum::<f64>();
    }
    Ok(s)
}

/// `tr(A G Aᵀ)`, e.g. the GPTQ proxy objective `tr((W−Q) H (W−Q)ᵀ)` with `A = W − Q`.
pub fn quadratic_form_trace(
    a: &[f64],
    rows: usize,
    n: usize,
    g: &[f64],
) -> Result<f64, QuantError> {
    bilinear_trace(a, a, rows, n, g)
}

/// The GPTQ proxy objective `tr((W−Q) H (W−Q)ᵀ)` (twice GPTQ's `Σ Losses` for the damped H).
pub fn proxy_objective(
    w: &[f64],
    q: &[f64],
    rows: usize,
    cols: usize,
    h: &[f64],
) -> Result<f64, QuantError> {
    check_len("W", w, rows * cols)?;
    check_len("Q", q, rows * cols)?;
    let delta: Vec<f64> = w.iter().zip(q).map(|(a, b)| a - b).collect();
    quadratic_form_trace(&delta, rows, cols, h)
}

/// [`ModuleErrors`] from Gram matrices `g_qq = X_qᵀX_q`, `g_dq = (X_fp−X_q)ᵀX_q`,
/// `g_dd = (X_fp−X_q)ᵀ(X_fp−X_q)` (all `[cols, cols]`, any common scale factor).
pub fn module_errors_from_gram(
    w: &[f64],
    q: &[f64],
    rows: usize,
    cols: usize,
    g_qq: &[f64],
    g_dq: &[f64],
    g_dd: &[f64],
) -> Result<ModuleErrors, QuantError> {
    check_len("W", w, rows * cols)?;
    check_len("Q", q, rows * cols)?;
    check_len("G_qq", g_qq, cols * cols)?;
    check_len("G_dq", g_dq, cols * cols)?;
    check_len("G_dd", g_dd, cols * cols)?;
    let delta: Vec<f64> = w.iter().zip(q).map(|(a, b)| a - b).collect();
    let quant = quadratic_form_trace(&delta, rows, cols, g_qq)?;
    let asym = quadratic_form_trace(w, rows, cols, g_dd)?;
    let cross = bilinear_trace(w, &delta, rows, cols, g_dq)?;
    let w_qq = quadratic_form_trace(w, rows, cols, g_qq)?;
    let w_dq = bilinear_trace(w, w, rows, cols, g_dq)?;
    let den = w_qq + 2.0 * w_dq + asym;
    // Clamp round-off: these are norms.
    let out = (quant + asym + 2.0 * cross).max(0.0);
    Ok(ModuleErrors {
        quant_error: ratio(quant.max(0.0), den.max(0.0)),
        asym_error: ratio(asym.max(0.0), den.max(0.0)),
        output_error: ratio(out, den.max(0.0)),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn gram_matches_activations() {
        let (rows, cols, t) = (3, 4, 6);
        let f = |i: usize, s: f64| ((i as f64 * 0.7 + s).sin() * 1.3).round() / 4.0 + 0.1 * s;
        let w: Vec<f64> = (0..rows * cols).map(|i| f(i, 0.3)).collect();
        let q: Vec<f64> = w.iter().map(|v| (v * 2.0).round() / 2.0).collect();
        let xq: Vec<f64> = (0..t * cols).map(|i| f(i, 1.1)).collect();
        let xf: Vec<f64> = xq
            .iter()
            .enumerate()
            .map(|(i, v)| v + 0.05 * f(i, 2.0))
            .collect();
        let a = module_errors(&w, &q, rows, cols, &xq, &xf, t).unwrap();
        let gram = |x: &[f64], y: &[f64]| {
            let mut g = vec![0.0; cols * cols];
            for k in 0..t {
                for i in 0..cols {
                    for j in 0..cols {
                        g[i * cols + j] += x[k * cols + i] * y[k * cols + j];
                    }
                }
            }
            g
        };
        let e: Vec<f64> = xf.iter().zip(&xq).map(|(a, b)| a - b).collect();
        let b = module_errors_from_gram(
            &w,
            &q,
            rows,
            cols,
            &gram(&xq, &xq),
            &gram(&e, &xq),
            &gram(&e, &e),
        )
        .unwrap();
        for (x, y, name) in [
            (a.quant_error, b.quant_error, "quant"),
            (a.asym_error, b.asym_error, "asym"),
            (a.output_error, b.output_error, "output"),
        ] {
            assert!(
                (x - y).abs() <= 1e-12 * x.abs().max(1e-300),
                "{name}: {x} vs {y}"
            );
        }
    }
}
