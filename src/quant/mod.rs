//! Quantization core: the GPTQ quantizer (algorithm.md §1.3), the f64 CPU reference of GPTQ and
//! GPTAQ (§1.2, §2.2) and the GPU solve.
//!
//! Conventions shared by every implementation here:
//! - `W` is row-major `[rows, cols]` (`rows` = out_features, `cols` = in_features).
//! - `H` and `D` are row-major `[cols, cols]`; `H = 2/N·X_qᵀX_q`, `D = 2/N·(X_fp−X_q)ᵀX_q` with rows of
//!   `D` indexing the ΔX feature (algorithm.md §2.1).
//! - Scales are rounded to the nearest f16 *before* they are used (a deliberate deviation from the
//!   reference, algorithm.md §3.3 "optional improvement"): the sweep's error feedback then uses exactly
//!   the deployed scale, and an exported checkpoint dequantizes bit-for-bit to the solver's `Q`.

pub mod factor;
pub(crate) mod flush;
pub mod gpu;
pub mod metrics;
pub mod quantizer;
pub mod reference;

use serde::{Deserialize, Serialize};

/// Which algorithm to run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Method {
    /// Round-to-nearest with the same quantizer (no Hessian).
    Rtn,
    /// GPTQ (Frantar et al. 2022), IST-DASLab reference loop.
    Gptq,
    /// GPTAQ / GPTQv2 (arXiv 2504.02692) with the shrinkage `alpha` of the official code (0.25).
    Gptaq { alpha: f64 },
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::Gptaq { .. } => "gptaq",
        }
    }
    pub fn alpha(&self) -> f64 {
        match self {
            Method::Gptaq { alpha } => *alpha,
            _ => 0.0,
        }
    }
}

/// Settings of one module's quantization.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantConfig {
    pub method: Method,
    /// 2, 3, 4 or 8.
    pub bits: u32,
    /// `None` = one group per row (group_size −1).
    pub group_size: Option<usize>,
    pub sym: bool,
    /// desc_act: process columns by descending `diag(H)`.
    pub act_order: bool,
    /// Group parameters computed up front on the original column groups.
    pub static_groups: bool,
    /// Relative damping `percdamp` (added: `percdamp · mean(diag H)`).
    pub damp_percent: f64,
    /// Added to `damp_percent` on each Cholesky retry (GPTQModel `damp_auto_increment`).
    pub damp_auto_increment: f64,
    pub block_size: usize,
    /// MSE clipping grid search (norm 2.4, grid 100, maxshrink 0.8).
    pub mse: bool,
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self {
            method: Method::Gptaq { alpha: 0.25 },
            bits: 4,
            group_size: Some(128),
            sym: true,
            act_order: false,
            static_groups: false,
            damp_percent: 0.01,
            damp_auto_increment: 0.01,
            block_size: 128,
            mse: false,
        }
    }
}

impl QuantConfig {
    pub fn maxq(&self) -> u32 {
        (1u32 << self.bits) - 1
    }
    /// Effective group size for `cols` input features.
    pub fn group_len(&self, cols: usize) -> usize {
        self.group_size.unwrap_or(cols).max(1)
    }
    pub fn num_groups(&self, cols: usize) -> usize {
        cols.div_ceil(self.group_len(cols))
    }
}

/// Why a module did not get a normal solve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Fallback {
    /// Cholesky needed more damping than `damp_percent` (the value used is in [`QuantResult::damp`]).
    IncreasedDamping,
    /// Diagonal floor applied after damping retries failed (GPTQModel `hessian_inverse`).
    DiagonalFloor,
    /// No usable inverse Hessian: the module was round-to-nearest quantized.
    Rtn { reason: String },
}

/// Output of one module's quantization, everything in ORIGINAL column order.
#[derive(Clone, Debug)]
pub struct QuantResult {
    pub rows: usize,
    pub cols: usize,
    /// Fake-quantized weights `scale·(code − zero)`, row-major `[rows, cols]`, or empty when the
    /// producer left them out (the pipeline keeps Q on the GPU and only the codes on the host:
    /// f32 weights of a whole 8B model would be 28 GB of host memory). [`QuantResult::weights`]
    /// gives Q either way.
    pub q: Vec<f32>,
    /// Integer codes in `[0, maxq]`, row-major `[rows, cols]`.
    pub codes: Vec<u8>,
    /// `[num_groups, rows]`, each exactly representable in f16. Group `g` is the `g`-th group in the
    /// order groups were formed (processing order under act-order with dynamic groups, §3.4).
    pub scales: Vec<f32>,
    /// True zero points (not v1's `zero − 1`), `[num_groups, rows]`, in `[0, maxq]`.
    pub zeros: Vec<u32>,
    /// Group index of every input column (original order), length `cols`.
    pub g_idx: Vec<u32>,
    /// Processing order (act-order permutation) if any.
    pub perm: Option<Vec<usize>>,
    /// GPTQ proxy loss `Σ (w−q)²/(2·U_jj²)` (not yet divided by N).
    pub proxy_loss_sum: f64,
    /// Per column in PROCESSING order (the order of `perm`, original order when `None`): GPTQ's
    /// proxy loss contribution `Σ_rows (w−q)²/(2·U_jj²)` of that column, `w` its value when it was
    /// quantized — the terms whose sum is `proxy_loss_sum` (up to summation order). Empty = not
    /// available: RTN (the method or the fallback) has no sequential solve to attribute. The GPU
    /// solve sums them in f32 per block (`quant_colloss.wgsl`).
    pub column_loss: Vec<f64>,
    /// `diag(H)` in PROCESSING order, before damping, with dead columns (`H_jj = 0`) read as 1 the
    /// way the reference sets them (algorithm.md §1.2 step 3). RTN results give it in original
    /// order (their `perm` is `None`). Empty = not available (the GPU solve's RTN fallback).
    pub h_diag: Vec<f32>,
    /// Absolute damping actually added to the diagonal.
    pub damp: f64,
    /// Relative damping actually used (`damp / mean(diag H)`).
    pub damp_percent: f64,
    pub fallback: Option<Fallback>,
}

impl QuantResult {
    /// `scale·(code − zero)` from the codes, scales, zeros and `g_idx`, row-major `[rows, cols]`:
    /// exactly `q` (scales are f16 values and |code − zero| ≤ 255, so the f32 product is exact, as
    /// the solvers' own is; the export writer checks the packed checkpoint against it). Empty if
    /// the parts do not have their documented lengths.
    pub fn dequantize(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        let groups = self
            .g_idx
            .iter()
            .map(|&g| g as usize + 1)
            .max()
            .unwrap_or(0);
        if self.codes.len() != rows * cols
            || self.g_idx.len() != cols
            || self.scales.len() < groups * rows
            || self.zeros.len() < groups * rows
        {
            return Vec::new();
        }
        quantizer::dequantize_matrix(
            &self.codes,
            &self.zeros,
            &self.scales,
            &self.g_idx,
            rows,
            cols,
        )
    }

    /// Q, `[rows, cols]`: `q` when present, else [`QuantResult::dequantize`].
    pub fn weights(&self) -> std::borrow::Cow<'_, [f32]> {
        if self.q.len() == self.rows * self.cols {
            std::borrow::Cow::Borrowed(&self.q)
        } else {
            std::borrow::Cow::Owned(self.dequantize())
        }
    }
}

/// For tests: asserts that `got` is `want` bit for bit — every field, floats by their bits —
/// naming the field and, for the vectors, the first index that differs with both values.
#[cfg(test)]
pub(crate) fn assert_same_result(got: &QuantResult, want: &QuantResult, what: &str) {
    use std::fmt::Debug;
    fn same<T: PartialEq + Debug>(what: &str, field: &str, got: &[T], want: &[T]) {
        assert_eq!(got.len(), want.len(), "{what}: {field}: length");
        if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
            panic!(
                "{what}: {field}[{i}] is {:?}, expected {:?}",
                got[i], want[i]
            );
        }
    }
    let bits32 = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let bits64 = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        (got.rows, got.cols),
        (want.rows, want.cols),
        "{what}: shape"
    );
    same(what, "q (bits)", &bits32(&got.q), &bits32(&want.q));
    same(what, "codes", &got.codes, &want.codes);
    same(
        what,
        "scales (bits)",
        &bits32(&got.scales),
        &bits32(&want.scales),
    );
    same(what, "zeros", &got.zeros, &want.zeros);
    same(what, "g_idx", &got.g_idx, &want.g_idx);
    assert_eq!(got.perm, want.perm, "{what}: perm");
    assert_eq!(
        got.proxy_loss_sum.to_bits(),
        want.proxy_loss_sum.to_bits(),
        "{what}: proxy loss {} vs {}",
        got.proxy_loss_sum,
        want.proxy_loss_sum
    );
    same(
        what,
        "column_loss (bits)",
        &bits64(&got.column_loss),
        &bits64(&want.column_loss),
    );
    same(
        what,
        "h_diag (bits)",
        &bits32(&got.h_diag),
        &bits32(&want.h_diag),
    );
    assert_eq!(
        (got.damp.to_bits(), got.damp_percent.to_bits()),
        (want.damp.to_bits(), want.damp_percent.to_bits()),
        "{what}: damping {} ({}) vs {} ({})",
        got.damp,
        got.damp_percent,
        want.damp,
        want.damp_percent
    );
    assert_eq!(got.fallback, want.fallback, "{what}: fallback");
}

/// Why the CPU reference (or the quantizer) refused its input. Cholesky failure is *not* an error
/// of `quantize_f64` (it falls back to RTN, see [`Fallback::Rtn`]); it is one of
/// [`reference::inverse_hessian_factor_f64`].
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum QuantError {
    #[error("{what}: expected {expected} elements, got {got}")]
    ShapeMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{what}: non-finite value {value} at flat index {index}")]
    NonFinite {
        what: &'static str,
        index: usize,
        value: f64,
    },
    #[error("invalid quantization config: {0}")]
    InvalidConfig(String),
    #[error(
        "Hessian ({n}×{n}) is not positive definite after damping up to {last_damp_percent} and {floor_attempts} diagonal floors"
    )]
    NotPositiveDefinite {
        n: usize,
        last_damp_percent: f64,
        floor_attempts: usize,
    },
}
