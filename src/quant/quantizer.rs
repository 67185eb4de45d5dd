//! The GPTQ weight quantizer (algorithm.md §1.3): per-row asymmetric / symmetric min-max parameters
//! with the optional MSE clipping grid, `quant`, `dequant`, and round-to-nearest of a whole matrix.
//!
//! Semantics (the GPU port must reproduce these, the tests of both pin them):
//! - `find_params` follows IST-DASLab `quant.py` exactly: `xmin = min(rowmin, 0)`, `xmax =
//!   max(rowmax, 0)`; sym: `xmax = max(|xmin|, xmax)` and `xmin = −xmax` only where `xmin < 0` (rows
//!   that are all ≥ 0 keep `xmin = 0`, the "sym quirk"); rows with `xmin == xmax == 0` become `−1/+1`;
//!   `scale = (xmax − xmin)/maxq`; sym zero `(maxq+1)/2`; asym zero `round(−xmin/scale)`.
//! - **Deviation (decided by the lead, algorithm.md §3.3 "optional improvement")**: every scale is
//!   rounded to f16 the moment it is computed, *before* the zero point is derived from it and before
//!   it is used. The asym zero is therefore `clamp(round(−xmin/scale_f16), 0, maxq)` (the clamp only
//!   matters when f16 rounding shrinks the scale; IST does not clamp because it cannot go out of
//!   range there). The MSE grid rounds every candidate scale to f16 the same way, so the candidate
//!   that wins is judged with the scale that will be deployed.
//! - f16 rounding is `f64 → f32 → f16`, both steps round-to-nearest-even ([`round_scale_to_f16`]).
//!   This is what a GPU computing the scale in f32 gets, and it is platform independent (the `half`
//!   crate's `from_f64` goes through f32 on x86 with F16C but truncates elsewhere). It differs from a
//!   single correctly rounded f64 → f16 step only for values within 2⁻²⁴ (relative) of an f16 tie.
//!   Scales that would round to 0 (rows with |x| < ~3e-8) become the smallest positive f16
//!   subnormal 2⁻²⁴; scales above 65504 become 65504 (no f16 infinities are ever produced).
//! - Rounding is round-half-to-even everywhere (`torch.round`, WGSL `round`): `f64::round_ties_even`.
//! - `quant(x) = clamp(round(x/scale) + zero, 0, maxq)`, `dequant(c) = scale·(c − zero)`. Because the
//!   scale is an f16 value (11 significant bits) and `|c − zero| ≤ 255`, `dequant` is exact in f32 as
//!   well as in f64, so the f32 and f64 paths produce bit-identical `q` for identical codes.
//! - f32 vs f64: the GPU divides `x/scale` in f32 ([`quantize_code_f32`]), the reference in f64
//!   ([`quantize_code`]). The two can give different codes only when `x/scale` is within f32
//!   round-off of a `.5` tie ("documented round-off ties"); comparisons between the two must allow a
//!   code difference of 1 exactly at such ties.
//! - Non-finite inputs never produce non-finite outputs: non-finite values are ignored by
//!   `find_params`, and `quant(NaN) = zero`, `quant(±∞) = maxq / 0`. (The GPTQ reference rejects
//!   non-finite inputs before it gets here, see `reference.rs`.)

use super::{QuantConfig, QuantError, QuantResult};

/// Exponent of the MSE clipping error `Σ|dequant(quant(x)) − x|^norm` (IST default 2.4).
pub const MSE_NORM: f64 = 2.4;
/// Grid resolution: candidate shrink factors are `p = 1 − i/MSE_GRID`.
pub const MSE_GRID: usize = 100;
/// Smallest shrink searched is `1 − MSE_MAXSHRINK` (exclusive): `i < MSE_MAXSHRINK·MSE_GRID = 80`.
pub const MSE_MAXSHRINK: f64 = 0.8;

/// Smallest positive f16 (subnormal), `2⁻²⁴`: floor of every scale.
pub const F16_MIN_POSITIVE_SUBNORMAL: f64 = 5.960_464_477_539_063e-8;
/// Largest finite f16: ceiling of every scale.
pub const F16_MAX: f64 = 65504.0;

/// The quantizer's static settings (IST `configure(bits, perchannel=True, sym, mse)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantizerSpec {
    pub bits: u32,
    /// `2^bits − 1`.
    pub maxq: u32,
    pub sym: bool,
    pub mse: bool,
}

impl QuantizerSpec {
    /// Checks `1 ≤ bits ≤ 8` (codes are stored as `u8`).
    pub fn new(bits: u32, sym: bool, mse: bool) -> Result<Self, QuantError> {
        if !(1..=8).contains(&bits) {
            return Err(QuantError::InvalidConfig(format!(
                "bits must be in 1..=8, got {bits}"
            )));
        }
        Ok(Self {
            bits,
            maxq: (1u32 << bits) - 1,
            sym,
            mse,
        })
    }

    pub fn from_config(cfg: &QuantConfig) -> Result<Self, QuantError> {
        Self::new(cfg.bits, cfg.sym, cfg.mse)
    }

    /// The symmetric zero point `(maxq + 1)/2 = 2^(bits−1)`.
    pub fn sym_zero(&self) -> u32 {
        self.maxq.div_ceil(2)
    }
}

/// Quantization parameters of one row of one group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowParams {
    /// Always an exactly f16-representable positive value.
    pub scale: f64,
    /// In `[0, maxq]`.
    pub zero: u32,
}

/// Parameters of one group of columns, one entry per row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupParams {
    pub scale: Vec<f64>,
    pub zero: Vec<u32>,
}

impl GroupParams {
    pub fn row(&self, r: usize) -> Option<RowParams> {
        Some(RowParams {
            scale: *self.scale.get(r)?,
            zero: *self.zero.get(r)?,
        })
    }
}

/// Rounds a (positive) scale to the f16 grid: `f64 → f32 → f16`, round-to-nearest-even each step,
/// then clamped into `[2⁻²⁴, 65504]` so it is never 0 or infinite. Non-finite input → 65504 for
/// `+∞`, 2⁻²⁴ otherwise (never reached by `find_params`, which only produces finite scales).
pub fn round_scale_to_f16(scale: f64) -> f64 {
    if scale.is_nan() {
        return F16_MIN_POSITIVE_SUBNORMAL;
    }
    let h = half::f16::from_f32(scale as f32).to_f64();
    h.clamp(F16_MIN_POSITIVE_SUBNORMAL, F16_MAX)
}

/// Whether `x` is exactly representable as an f16 (used by tests and export self-checks).
pub fn is_f16_exact(x: f64) -> bool {
    half::f16::from_f32(x as f32).to_f64() == x
}

/// `quant(x) = clamp(round_ties_even(x/scale) + zero, 0, maxq)` in f64 (the reference semantics).
pub fn quantize_code(x: f64, p: RowParams, maxq: u32) -> u32 {
    let v = (x / p.scale).round_ties_even() + f64::from(p.zero);
    if v.is_nan() {
        return p.zero.min(maxq);
    }
    // The clamp bounds are exact small integers, so the cast is exact.
    v.clamp(0.0, f64::from(maxq)) as u32
}

/// `dequant(code) = scale·(code − zero)`, exact in f64 (and in f32, see the module docs).
pub fn dequantize(code: u32, p: RowParams) -> f64 {
    p.scale * (f64::from(code) - f64::from(p.zero))
}

/// The f32 semantics the GPU implements: `x/scale` divided and rounded in f32. Differs from
/// [`quantize_code`] only at round-off `.5` ties (module docs).
pub fn quantize_code_f32(x: f32, scale: f32, zero: u32, maxq: u32) -> u32 {
    let v = (x / scale).round_ties_even() + zero as f32;
    if v.is_nan() {
        return zero.min(maxq);
    }
    v.clamp(0.0, maxq as f32) as u32
}

/// f32 dequantization; exact for f16 scales (module docs).
pub fn dequantize_f32(code: u32, scale: f32, zero: u32) -> f32 {
    scale * (code as f32 - zero as f32)
}

/// `W[o, i] = scales[g, o] · (codes[o, i] − zeros[g, o])` with `g = g_idx[i]`, row-major
/// `[rows, cols]` (the GPTQ checkpoint layout: `zeros`/`scales` `[G, rows]`). Callers guarantee the
/// lengths (`codes` `[rows, cols]`, every `g_idx < G`).
pub fn dequantize_matrix(
    codes: &[u8],
    zeros: &[u32],
    scales: &[f32],
    g_idx: &[u32],
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    let mut w = Vec::with_capacity(rows * cols);
    for (o, row) in codes.chunks_exact(cols.max(1)).take(rows).enumerate() {
        w.extend(row.iter().zip(g_idx).map(|(&c, &g)| {
            let k = g as usize * rows + o;
            dequantize_f32(u32::from(c), scales[k], zeros[k])
        }));
    }
    w
}

/// `dequant(quant(x))`.
pub fn fake_quantize(x: f64, p: RowParams, maxq: u32) -> f64 {
    dequantize(quantize_code(x, p, maxq), p)
}

/// Min-max scale (already f16-rounded) and zero from a range containing 0 (§1.3, module docs).
fn params_from_range(xmin: f64, xmax: f64, spec: &QuantizerSpec) -> RowParams {
    let maxq = f64::from(spec.maxq);
    let scale = round_scale_to_f16((xmax - xmin) / maxq);
    let zero = if spec.sym {
        spec.sym_zero()
    } else {
        // −xmin ≥ 0 and scale > 0, so the rounded value is ≥ 0; clamp guards f16 rounding.
        (-xmin / scale).round_ties_even().clamp(0.0, maxq) as u32
    };
    RowParams { scale, zero }
}

/// IST `find_params` for one row of a group: `x` are that row's values in the group's columns.
/// Non-finite values are skipped (module docs). An empty slice is treated as an all-zero row.
pub fn find_row_params(x: &[f64], spec: &QuantizerSpec) -> RowParams {
    let finite = || x.iter().copied().filter(|v| v.is_finite());
    // xmin = min(rowmin, 0), xmax = max(rowmax, 0): fold from 0 does both at once.
    let mut xmin = finite().fold(0.0_f64, f64::min);
    let mut xmax = finite().fold(0.0_f64, f64::max);
    if spec.sym {
        xmax = xmax.max(xmin.abs());
        if xmin < 0.0 {
            xmin = -xmax;
        }
    }
    if xmin == 0.0 && xmax == 0.0 {
        xmin = -1.0;
        xmax = 1.0;
    }
    let base = params_from_range(xmin, xmax, spec);
    if !spec.mse {
        return base;
    }

    // Clipping grid: p = 1 − i/grid for i in 0..floor(maxshrink·grid); strictly-less comparison
    // keeps the first (least shrunk) of equal errors. best starts at +∞, so p = 1 is always taken
    // first (unless its error is NaN, impossible for finite x).
    let steps = (MSE_MAXSHRINK * MSE_GRID as f64).floor() as usize;
    let mut best = f64::INFINITY;
    let mut chosen = base;
    for i in 0..steps {
        let p = 1.0 - i as f64 / MSE_GRID as f64;
        let xmin1 = p * xmin;
        let xmax1 = p * xmax;
        let cand = params_from_range(xmin1, xmax1, spec);
        let err: f64 = finite()
            .map(|v| (fake_quantize(v, cand, spec.maxq) - v).abs().powf(MSE_NORM))
            .sum();
        if err < best {
            best = err;
            chosen = cand;
        }
    }
    chosen
}

/// `find_params` for the columns `c0..c1` (clipped to `cols`) of every row of the row-major matrix
/// `w` (`rows × cols`).
pub fn find_group_params(
    w: &[f64],
    rows: usize,
    cols: usize,
    c0: usize,
    c1: usize,
    spec: &QuantizerSpec,
) -> GroupParams {
    let c1 = c1.min(cols);
    let c0 = c0.min(c1);
    let mut out = GroupParams {
        scale: Vec::with_capacity(rows),
        zero: Vec::with_capacity(rows),
    };
    for r in 0..rows {
        let row = w.get(r * cols + c0..r * cols + c1).unwrap_or(&[]);
        let p = find_row_params(row, spec);
        out.scale.push(p.scale);
        out.zero.push(p.zero);
    }
    out
}

/// Index of the first non-finite entry of `m`. Blocks of 4096 entries are tested without a branch
/// per entry (so the compiler vectorises the test) and only a failing block is searched; inputs
/// of a million entries and more are split over up to eight threads. Why: the GPU solve checks
/// each module's W on the host before its first dispatch, while the GPU, drained by the previous
/// module's last readback, waits; on a Llama-3-8B MLP weight (58.7 M entries) the single-threaded
/// search took 9.6 ms on the 2-core development machine, this 4.6–6.3 ms there.
pub(crate) fn first_non_finite<T: Copy + Into<f64> + Sync>(m: &[T]) -> Option<usize> {
    const BLOCK: usize = 4096;
    let scan = |part: &[T], base: usize| -> Option<usize> {
        for (b, block) in part.chunks(BLOCK).enumerate() {
            if !block.iter().fold(true, |ok, &v| ok & v.into().is_finite()) {
                let i = block.iter().position(|&v| !v.into().is_finite())?;
                return Some(base + b * BLOCK + i);
            }
        }
        None
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(8);
    if m.len() < (1 << 20) || threads < 2 {
        return scan(m, 0);
    }
    let per = m.len().div_ceil(threads).div_ceil(BLOCK) * BLOCK;
    std::thread::scope(|s| {
        let handles: Vec<_> = m
            .chunks(per)
            .enumerate()
            .map(|(t, part)| s.spawn(move || scan(part, t * per)))
            .collect();
        // Every part's first hit; the smallest is the matrix's first.
        handles
            .into_iter()
            .filter_map(|h| h.join().ok().flatten())
            .min()
    })
}

/// Checks a row-major matrix's length and finiteness; `what` names it in the error.
pub(crate) fn check_matrix<T: Copy + Into<f64> + Sync>(
    what: &'static str,
    m: &[T],
    expected_len: usize,
) -> Result<(), QuantError> {
    if m.len() != expected_len {
        return Err(QuantError::ShapeMismatch {
            what,
            expected: expected_len,
            got: m.len(),
        });
    }
    if let Some(index) = first_non_finite(m) {
        return Err(QuantError::NonFinite {
            what,
            index,
            value: m.get(index).map_or(f64::NAN, |&v| v.into()),
        });
    }
    Ok(())
}

/// Round-to-nearest of a whole `rows × cols` row-major matrix with the GPTQ quantizer: groups of
/// `cfg.group_len(cols)` consecutive columns (the last one may be shorter), no act-order, no
/// Hessian. `g_idx[j] = j / gs`, `scales`/`zeros` are `[num_groups, rows]`, `perm = None`,
/// `damp = damp_percent = 0`, `fallback = None` and `proxy_loss_sum = 0` (there is no Hessian; see
/// `reference::quantize_f64` for the RTN proxy loss with one). `cfg.method`, `act_order`,
/// `static_groups`, damping and block size are ignored.
///
/// Errors: wrong length, non-finite weight, unsupported bits.
pub fn rtn_quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    cfg: &QuantConfig,
) -> Result<QuantResult, QuantError> {
    let w64: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
    rtn_quantize_f64(&w64, rows, cols, cfg)
}

/// [`rtn_quantize`] on f64 weights (identical semantics).
pub fn rtn_quantize_f64(
    w: &[f64],
    rows: usize,
    cols: usize,
    cfg: &QuantConfig,
) -> Result<QuantResult, QuantError> {
    let spec = QuantizerSpec::from_config(cfg)?;
    let n_el = rows.checked_mul(cols).ok_or(QuantError::ShapeMismatch {
        what: "W",
        expected: usize::MAX,
        got: w.len(),
    })?;
    check_matrix("W", w, n_el)?;
    let gs = cfg.group_len(cols);
    let ng = cfg.num_groups(cols);
    let mut q = vec![0.0_f32; n_el];
    let mut codes = vec![0_u8; n_el];
    let mut scales = Vec::with_capacity(ng * rows);
    let mut zeros = Vec::with_capacity(ng * rows);
    for g in 0..ng {
        let c0 = g * gs;
        let c1 = (c0 + gs).min(cols);
        let params = find_group_params(w, rows, cols, c0, c1, &spec);
        for r in 0..rows {
            let p = RowParams {
                scale: params.scale[r],
                zero: params.zero[r],
            };
            for c in c0..c1 {
                let i = r * cols + c;
                let code = quantize_code(w[i], p, spec.maxq);
                codes[i] = code as u8;
                q[i] = dequantize(code, p) as f32;
            }
        }
        scales.extend(params.scale.iter().map(|&s| s as f32));
        zeros.extend_from_slice(&params.zero);
    }
    Ok(QuantResult {
        rows,
        cols,
        q,
        codes,
        scales,
        zeros,
        g_idx: (0..cols).map(|j| (j / gs) as u32).collect(),
        perm: None,
        proxy_loss_sum: 0.0,
        column_loss: Vec::new(),
        h_diag: Vec::new(),
        damp: 0.0,
        damp_percent: 0.0,
        fallback: None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The first non-finite entry is found wherever it lies: in the first and last block, at a
    /// block edge, at the edges of the threads' parts of a large input, with later ones after it
    /// (the smallest wins), in f32 and f64, and none in a finite matrix.
    #[test]
    fn first_non_finite_finds_the_first_bad_entry() {
        let n: usize = (1 << 21) + 12_345;
        let threads = std::thread::available_parallelism()
            .map_or(1, |t| t.get())
            .min(8);
        let per = n.div_ceil(threads).div_ceil(4096) * 4096;
        let mut spots = vec![0usize, 1, 4095, 4096, 4097, n / 2, n - 1];
        for t in 1..threads {
            spots.extend([t * per - 1, t * per, t * per + 1]);
        }
        let mut m = vec![0.5f32; n];
        assert_eq!(first_non_finite(&m), None, "finite {n} entries");
        for &i in &spots {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                m[i] = bad;
                // A later bad entry does not hide the first.
                let later = (i + per / 2 + 3).min(n - 1);
                let keep = m[later];
                if later > i {
                    m[later] = f32::NAN;
                }
                assert_eq!(first_non_finite(&m), Some(i), "{bad} at {i} of {n}");
                let m64: Vec<f64> = m[..(i + 1).max(5000).min(n)]
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect();
                if i < m64.len() {
                    assert_eq!(first_non_finite(&m64), Some(i), "f64: {bad} at {i}");
                }
                m[later] = keep;
                m[i] = 0.5;
            }
        }
        assert_eq!(first_non_finite::<f32>(&[]), None);
    }

    fn spec(bits: u32, sym: bool, mse: bool) -> QuantizerSpec {
        QuantizerSpec::new(bits, sym, mse).unwrap()
    }

    #[test]
    fn sym4_known_row() {
        // [-1, 0.5, 1]: xmin=-1, xmax=1 → sym: xmax=1, xmin=-1; scale = 2/15 → f16.
        let s = spec(4, true, false);
        let p = find_row_params(&[-1.0, 0.5, 1.0], &s);
        let expect_scale = f64::from(half::f16::from_f32((2.0_f64 / 15.0) as f32));
        assert_eq!(p.scale, expect_scale);
        assert_eq!(p.zero, 8);
        // codes: round(-1/s)+8 = round(-7.5002..)+8; s_f16 = 0.13330078125 → -1/s = -7.5018 → -8 → 0
        let codes: Vec<u32> = [-1.0, 0.5, 1.0]
            .iter()
            .map(|&x| quantize_code(x, p, s.maxq))
            .collect();
        assert_eq!(codes, vec![0, 12, 15], "scale {}", p.scale);
    }

    #[test]
    fn sym_quirk_nonnegative_row_keeps_xmin_zero() {
        let s = spec(4, true, false);
        let p = find_row_params(&[0.0, 1.5, 3.0], &s);
        // xmin stays 0 → scale = xmax/15 = 0.2 → f16, zero 8.
        assert_eq!(p.scale, round_scale_to_f16(0.2));
        assert_eq!(p.zero, 8);
        // 3.0/0.2 = 15 → 23 → clamped to 15: only codes 8..=15 are usable.
        assert_eq!(quantize_code(3.0, p, s.maxq), 15);
    }

    #[test]
    fn degenerate_row() {
        for sym in [true, false] {
            let s = spec(3, sym, false);
            let p = find_row_params(&[0.0, 0.0], &s);
            assert_eq!(p.scale, round_scale_to_f16(2.0 / 7.0));
            let z = if sym {
                4
            } else {
                (1.0 / p.scale).round_ties_even() as u32
            };
            assert_eq!(p.zero, z);
        }
    }

    #[test]
    fn asym_known_row() {
        // [-1, 3] 2-bit asym: scale = 4/3 → f16 1.3330078125, zero = round(1/1.333) = round(0.7502) = 1
        let s = spec(2, false, false);
        let p = find_row_params(&[-1.0, 3.0], &s);
        assert_eq!(p.scale, 1.3330078125);
        assert_eq!(p.zero, 1);
        assert_eq!(quantize_code(-1.0, p, 3), 0);
        assert_eq!(quantize_code(3.0, p, 3), 3);
    }

    #[test]
    fn ties_to_even() {
        let p = RowParams {
            scale: 1.0,
            zero: 8,
        };
        assert_eq!(quantize_code(0.5, p, 15), 8);
        assert_eq!(quantize_code(1.5, p, 15), 10);
        assert_eq!(quantize_code(-0.5, p, 15), 8);
        assert_eq!(quantize_code(-1.5, p, 15), 6);
        assert_eq!(quantize_code_f32(2.5, 1.0, 8, 15), 10);
    }

    #[test]
    fn f16_rounding_clamps() {
        assert_eq!(round_scale_to_f16(1e-12), F16_MIN_POSITIVE_SUBNORMAL);
        assert_eq!(round_scale_to_f16(1e9), F16_MAX);
        assert!(is_f16_exact(round_scale_to_f16(0.1234567)));
        // Tiny row still quantizes to finite values.
        let s = spec(4, false, true);
        let p = find_row_params(&[1e-10, -2e-10], &s);
        assert!(p.scale > 0.0 && p.zero <= 15);
    }

    #[test]
    fn nan_inputs_are_deterministic() {
        let s = spec(4, false, false);
        let p = find_row_params(&[f64::NAN, 1.0, -1.0, f64::INFINITY], &s);
        assert_eq!(p, find_row_params(&[1.0, -1.0], &s));
        assert_eq!(quantize_code(f64::NAN, p, 15), p.zero);
        assert_eq!(quantize_code(f64::INFINITY, p, 15), 15);
        assert_eq!(quantize_code(f64::NEG_INFINITY, p, 15), 0);
    }

    #[test]
    fn mse_never_worse_than_minmax() {
        let s0 = spec(3, false, false);
        let s1 = spec(3, false, true);
        let x: Vec<f64> = (0..50)
            .map(|i| ((i * 37 % 17) as f64 - 8.0).powi(3) * 0.01)
            .collect();
        let err = |p: RowParams| -> f64 {
            x.iter()
                .map(|&v| (fake_quantize(v, p, 7) - v).abs().powf(MSE_NORM))
                .sum()
        };
        let e0 = err(find_row_params(&x, &s0));
        let e1 = err(find_row_params(&x, &s1));
        assert!(e1 <= e0, "mse {e1} > minmax {e0}");
    }
}
