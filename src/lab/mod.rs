//! Layer lab (compute side): re-solve one captured module ([`CapturedModule`]) with any settings and
//! measure it exactly, without re-running the model.
//!
//! With ΔX = X_fp − X_q, ΔW = W − Q and the captured `H = 2/N·X_qᵀX_q`, `D = 2/N·ΔXᵀX_q`,
//! `E = 2/N·ΔXᵀΔX`, the three relative errors of the pipeline (`pipeline::events::ModuleReport`)
//! are ratios of traces (the N/2 cancels):
//! - quantization error `tr(ΔW H ΔWᵀ) / tr(W F Wᵀ)`,
//! - asymmetry error `tr(W E Wᵀ) / tr(W F Wᵀ)`,
//! - output error `tr(ΔW H ΔWᵀ + W E Wᵀ + 2·ΔW Dᵀ Wᵀ) / tr(W F Wᵀ)`,
//!
//! where `F = H + D + Dᵀ + E = 2/N·X_fpᵀX_fp`. GPTQ minimises the first term only; GPTAQ's
//! objective (paper eq. 7) is `‖Q X_qᵀ − W X_fpᵀ‖²`, i.e. the output error, which it reaches through
//! the P term (`P = α·triu₁(D·Uᵀ)·U`, algorithm.md §2.2); α = 0 is GPTQ.
//!
//! [`Lab`] holds one capture and what re-solves share (the factorisation of H, GPTAQ's unscaled P,
//! the Q-independent error terms), so moving α or the bits only re-runs the sweep;
//! [`Lab::study`] adds the lab's per-column traces and pictures, and [`step`] the step mode.
//!
//! # Two solvers, one study
//!
//! [`Lab::solve_on`], [`Lab::alpha_sweep_on`] and [`Lab::study_on`] take a [`Backend`]; what a
//! study contains is decided in one place (`Lab::study_on` / `Lab::side`), only the solve and the
//! error terms differ (`Lab::measure`):
//!
//! - **f64 reference** ([`Backend::Reference`], [`Lab::solve`], [`Lab::study`]): every solve is the
//!   f64 reference's own sweep ([`reference::quantize_f64`]) on a cached factorisation, bit for
//!   bit, and the errors are f64 products (`FixedTerms`, O(rows·n²) per solution). Its recorded
//!   sweep also gives the compensation heatmap (`SideStudy::heat_comp`) and P's row norms. The step
//!   mode always runs here.
//! - **GPU path** ([`Backend::Gpu`], borrowing the caller's [`GpuContext`]; the lab never owns
//!   one): W, H, D and W·D are uploaded once per capture and device (`gpu::GpuTerms`; E only for
//!   the once-per-capture W·E), and with them `tr(W E Wᵀ)`, `tr(W F Wᵀ)` and the Q-independent
//!   part of the column shares. Each solve is the pipeline's
//!   [`crate::quant::gpu::quantize_gpu_resident`] (f32; W from the GPU copy; it factors H when
//!   act-order, damping or block size changed since the capture's last solve and reuses that
//!   factor otherwise, as it reuses GPTAQ's P for the same α) whose Q stays on the GPU:
//!   `ΔW = W − Q` (axpby), `ΔW·H` (one GEMM), `quant = Σ ΔW∘(ΔW·H)` and `cross = Σ ΔW∘(W·D)`
//!   as column sums of elementwise products (`gpu::ops::col_dot_partials`, partials added in f64
//!   on the host); a study's per-column output
//!   shares add one GEMM (`ΔW·Dᵀ`). Only scalars, `16·n`-float partials, n-vectors and the
//!   solve's codes (a byte per weight) cross the bus; Q is rebuilt from the codes on the host
//!   ([`QuantResult::weights`]) only where a study's pictures need it. `column_loss` comes from
//!   the solve, the uncompensated loss from it as `column_loss_k·U_kk²·H̃_kk`
//!   (`GpuSolve::u_diag`, H̃ damped).
//!   Exactness: the errors of a given Q match the f64 formulas to ~1e-6 relative (tests use 1e-4);
//!   Q itself is the f32 solve's, whose codes can differ from the reference's at f32/f64 near-ties
//!   (`quant::gpu` docs), so a study's errors match the reference's to ~1e-6 typically (tests
//!   allow 2e-3). Not available here: `heat_comp` and `p_row_norms` (empty; the view says why).
//!
//! When: [`Backend::choose`] (the worker and `gptaq-studio lab`) takes the GPU when a context
//! exists and the module has more than [`GPU_MIN_COLS`] = 512 input columns or more than
//! [`GPU_MIN_WEIGHTS`] = 2¹⁸ weights. Below that the f64 reference is both fast (a 256×256 study,
//! 13 solves, takes 0.15 s on the 2-core dev box) and exact with every picture; above it the
//! reference's O(rows·n²) sweeps and products and its O(n³) f64 factorisation grow to tens of
//! seconds per study at n = 4096, where a GPU re-solve takes 0.17 s with its errors (an 8B
//! model's q_proj on an H100; 0.76 s for its 4096 × 14336 down_proj: BENCHMARKS.md session 33).

mod gpu;
pub mod heatmap;
pub mod step;

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use crate::gpu::GpuContext;
use crate::model::ModuleKind;
use crate::pipeline::CapturedModule;
use crate::quant::reference::{self, FactorCache, SweepRecord, SweepStart, SweepState};
use crate::quant::{Method, QuantConfig, QuantError, QuantResult};

use heatmap::Heatmap;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    #[error(transparent)]
    QuantGpu(#[from] crate::quant::gpu::QuantGpuError),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error(
        "the step mode takes modules up to {max_cols} input columns and {max_weights} weights; this one is {rows} x {cols}",
        max_cols = step::STEP_MAX_COLS,
        max_weights = step::STEP_MAX_WEIGHTS
    )]
    StepTooLarge { rows: usize, cols: usize },
    #[error("nothing to step: {0}")]
    NoSweep(String),
    #[error("the step mode has not been started")]
    NoStepper,
}

fn file_err(path: &Path, message: impl Into<String>) -> LabError {
    LabError::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// The errors of one solution, on the captured calibration tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LabMetrics {
    pub quant_error: f64,
    pub asym_error: f64,
    pub output_error: f64,
    /// GPTQ proxy loss Σ(w−q)²/(2U_jj²) / N.
    pub proxy_loss: f64,
}

/// One re-solve.
#[derive(Clone, Debug)]
pub struct LabSolve {
    pub config: QuantConfig,
    /// From the GPU path without `result.q` (RTN fallbacks aside): [`QuantResult::weights`]
    /// rebuilds Q from the codes exactly.
    pub result: QuantResult,
    pub metrics: LabMetrics,
    pub secs: f64,
}

/// Which solver produced a lab result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LabSolver {
    /// The f64 CPU reference sweep, errors in f64 (exact; every picture).
    Reference,
    /// `quant::gpu::quantize_gpu` (f32) with the errors on the GPU (module docs, "GPU path").
    Gpu,
}

impl LabSolver {
    /// How the UI and the CLI name it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Reference => "f64 CPU reference",
            Self::Gpu => "GPU (f32)",
        }
    }
}

/// Modules with more input columns than this are re-solved on the GPU when a context is available
/// (module docs, "GPU path").
pub const GPU_MIN_COLS: usize = 512;
/// Modules with more weights than this (`rows·cols`) are re-solved on the GPU when a context is
/// available.
pub const GPU_MIN_WEIGHTS: usize = 1 << 18;

/// Whether the lab's policy prefers the GPU for a `rows × cols` module (module docs).
pub fn prefers_gpu(rows: usize, cols: usize) -> bool {
    cols > GPU_MIN_COLS || rows.saturating_mul(cols) > GPU_MIN_WEIGHTS
}

/// Where the lab solves: the f64 reference, or the GPU through the caller's context (the lab
/// never owns one: the worker and the CLI do).
#[derive(Clone, Copy)]
pub enum Backend<'a> {
    Reference,
    Gpu(&'a GpuContext),
}

impl<'a> Backend<'a> {
    /// The lab's policy: the GPU when `ctx` is given and [`prefers_gpu`] says so, else the exact
    /// f64 reference.
    pub fn choose(ctx: Option<&'a GpuContext>, rows: usize, cols: usize) -> Self {
        match ctx {
            Some(ctx) if prefers_gpu(rows, cols) => Self::Gpu(ctx),
            _ => Self::Reference,
        }
    }

    pub fn solver(self) -> LabSolver {
        match self {
            Self::Reference => LabSolver::Reference,
            Self::Gpu(_) => LabSolver::Gpu,
        }
    }
}

/// The relative errors from the traces (module docs), whichever solver computed them.
fn lab_metrics(
    quant: f64,
    cross: f64,
    asym: f64,
    denom: f64,
    proxy_loss_sum: f64,
    nsamples: usize,
) -> LabMetrics {
    let rel = |x: f64| if denom > 0.0 { x / denom } else { 0.0 };
    LabMetrics {
        quant_error: rel(quant),
        asym_error: rel(asym),
        output_error: rel((quant + asym + 2.0 * cross).max(0.0)),
        proxy_loss: proxy_loss_sum / nsamples.max(1) as f64,
    }
}

/// `A·M` for `A` `[rows, n]` (f64) and `M` `[n, n]` (f32, widened), row-major.
fn mul(a: &[f64], m: &[f32], rows: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; rows * n];
    for (ar, or) in a.chunks_exact(n.max(1)).zip(out.chunks_exact_mut(n.max(1))) {
        for (i, &ai) in ar.iter().enumerate() {
            if ai == 0.0 {
                continue;
            }
            for (x, &mij) in or.iter_mut().zip(&m[i * n..(i + 1) * n]) {
                *x += ai * f64::from(mij);
            }
        }
    }
    out
}

/// `A·Mᵀ` for `A` `[rows, n]` and `M` `[n, n]`, row-major.
fn mul_t(a: &[f64], m: &[f32], rows: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; rows * n];
    for (ar, or) in a.chunks_exact(n.max(1)).zip(out.chunks_exact_mut(n.max(1))) {
        for (j, x) in or.iter_mut().enumerate() {
            *x = ar
                .iter()
                .zip(&m[j * n..(j + 1) * n])
                .map(|(p, &q)| p * f64::from(q))
                .sum();
        }
    }
    out
}

/// `Σ_r Σ_j A_rj·B_rj` (= `tr(A Bᵀ)`), summed row by row.
fn frob_dot(a: &[f64], b: &[f64], n: usize) -> f64 {
    a.chunks_exact(n.max(1))
        .zip(b.chunks_exact(n.max(1)))
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>())
        .sum()
}

/// The parts of the error formulas (module docs) that do not depend on `Q`: `W·D`, `W·E`, the
/// inherited `tr(W E Wᵀ)` and the denominator `tr(W F Wᵀ)`. Computed once per capture, so one
/// solution costs one more `[rows, n]·[n, n]` product (`ΔW·H`).
struct FixedTerms {
    wd: Vec<f64>,
    we: Vec<f64>,
    asym: f64,
    denom: f64,
}

impl FixedTerms {
    fn new(c: &CapturedModule, w: &[f64]) -> Self {
        let n = c.cols;
        let wh = mul(w, &c.h, c.rows, n);
        let wd = mul(w, &c.d, c.rows, n);
        let we = mul(w, &c.e, c.rows, n);
        let asym = frob_dot(w, &we, n);
        // tr(W (H + D + Dᵀ + E) Wᵀ), with tr(W Dᵀ Wᵀ) = tr(W D Wᵀ).
        let denom = frob_dot(w, &wh, n) + 2.0 * frob_dot(w, &wd, n) + asym;
        Self {
            wd,
            we,
            asym,
            denom,
        }
    }

    fn rel(&self, x: f64) -> f64 {
        if self.denom > 0.0 {
            x / self.denom
        } else {
            0.0
        }
    }

    /// The errors of `q` (original order) and `ΔW·H` for the caller's further use.
    fn metrics(
        &self,
        c: &CapturedModule,
        w: &[f64],
        q: &[f32],
        proxy_loss_sum: f64,
    ) -> (LabMetrics, Vec<f64>, Vec<f64>) {
        let n = c.cols;
        let dw: Vec<f64> = w.iter().zip(q).map(|(&a, &b)| a - f64::from(b)).collect();
        let dwh = mul(&dw, &c.h, c.rows, n);
        let quant = frob_dot(&dw, &dwh, n);
        // tr(ΔW Dᵀ Wᵀ) = tr(W D ΔWᵀ).
        let cross = frob_dot(&dw, &self.wd, n);
        let m = lab_metrics(
            quant,
            cross,
            self.asym,
            self.denom,
            proxy_loss_sum,
            c.nsamples,
        );
        (m, dw, dwh)
    }

    /// Each input column's share of the output error, relative, in original column order. The
    /// output residual is `R = ΔW X_qᵀ + W ΔXᵀ = Σ_j R_j` with `R_j` the part caused by input
    /// feature j (its weight error seen through X_q, its input error seen through W), so
    /// `‖R‖² = Σ_j ⟨R, R_j⟩` and, in the captured Grams (`D = 2/N·ΔXᵀX_q`, `E = 2/N·ΔXᵀΔX`),
    /// `⟨R, R_j⟩ ∝ Σ_r ΔW_rj·(ΔW H + W D)_rj + W_rj·(ΔW Dᵀ + W E)_rj`. The shares sum to the
    /// output error (before its clamp at 0); a share can be negative (the column cancels part of
    /// the others' residual).
    fn column_output(&self, c: &CapturedModule, w: &[f64], dw: &[f64], dwh: &[f64]) -> Vec<f64> {
        let n = c.cols;
        let dwdt = mul_t(dw, &c.d, c.rows, n);
        let mut col = vec![0.0f64; n];
        for r in 0..c.rows {
            let o = r * n;
            for (j, x) in col.iter_mut().enumerate() {
                let i = o + j;
                *x += dw[i] * (dwh[i] + self.wd[i]) + w[i] * (dwdt[i] + self.we[i]);
            }
        }
        col.iter().map(|&x| self.rel(x)).collect()
    }
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// Exact relative errors of `q` for the captured module (see the module docs).
pub fn metrics(c: &CapturedModule, q: &[f32], proxy_loss_sum: f64) -> LabMetrics {
    let w = widen(&c.w);
    FixedTerms::new(c, &w).metrics(c, &w, q, proxy_loss_sum).0
}

/// Re-solves the captured module with `cfg` on the f64 reference solver (exact; [`Lab::solve_on`]
/// with a [`Backend`] for the GPU path).
pub fn solve(c: &CapturedModule, cfg: &QuantConfig) -> Result<LabSolve, LabError> {
    Lab::new(c.clone()).solve(cfg)
}

/// GPTAQ at each α (α = 0 is GPTQ), other settings from `base`.
pub fn alpha_sweep(
    c: &CapturedModule,
    base: &QuantConfig,
    alphas: &[f64],
) -> Result<Vec<(f64, LabMetrics)>, LabError> {
    Lab::new(c.clone()).alpha_sweep(base, alphas)
}

/// The α values of the lab's "output error vs α" curve.
pub fn sweep_alphas() -> Vec<f64> {
    (0..=10).map(|i| f64::from(i) / 10.0).collect()
}

/// Largest heatmap side of the lab's solution pictures (cells).
const STUDY_HEAT: usize = 64;

/// One method's solution of the captured module with the lab's pictures; every per-column vector
/// is in that solve's PROCESSING order (`LabStudy::perm`; original order for an RTN fallback).
#[derive(Clone, Debug)]
pub struct SideStudy {
    pub method: Method,
    pub metrics: LabMetrics,
    pub fallback: Option<crate::quant::Fallback>,
    /// The proxy loss each column adds once the OBS update has moved the later columns,
    /// `Σ_r (w−q)²/(2·U_kk²) / N` (`QuantResult::column_loss`). Empty for an RTN fallback.
    pub column_loss: Vec<f64>,
    /// What rounding the same values would add with no compensation of the later columns,
    /// `Σ_r (w−q)²·H̃_kk/2 / N` (H̃ the damped H). `H̃_kk ≥ 1/U_kk²`, so the gap to `column_loss` is
    /// what the OBS update removes downstream. Empty for an RTN fallback.
    pub column_loss_uncompensated: Vec<f64>,
    /// Each column's share of the relative output error (they sum to `metrics.output_error`).
    pub column_output: Vec<f64>,
    /// Mean |Q| per block.
    pub heat_q: Heatmap,
    /// Mean |W − Q| per block.
    pub heat_err: Heatmap,
    /// Mean |w_pre − w| per block: how far the OBS (and GPTAQ) updates moved each weight before it
    /// was quantized. Empty for an RTN fallback.
    pub heat_comp: Heatmap,
    pub secs: f64,
}

/// GPTQ beside GPTAQ on the captured module, with the α sweep.
#[derive(Clone, Debug)]
pub struct LabStudy {
    /// The settings of both solves (method GPTQ; GPTAQ uses `alpha`).
    pub config: QuantConfig,
    pub alpha: f64,
    pub gptq: SideStudy,
    pub gptaq: SideStudy,
    /// Processing order (act-order permutation) of the solves, `None` = original order.
    pub perm: Option<Vec<usize>>,
    /// `diag(H)` before damping, processing order.
    pub h_diag: Vec<f32>,
    /// `‖P[k, :]‖` per processing column at `alpha` (GPTAQ's correction per input feature). Empty
    /// when GPTAQ fell back to RTN.
    pub p_row_norms: Vec<f64>,
    /// Mean |W| per block (dead columns zeroed), processing order.
    pub heat_w: Heatmap,
    /// `(α, metrics)` for [`sweep_alphas`].
    pub sweep: Vec<(f64, LabMetrics)>,
    /// Which solver produced every number of this study.
    pub solver: LabSolver,
    pub secs: f64,
}

/// A captured module and everything the lab reuses between re-solves: its widened arrays, the
/// Q-independent error terms, the factorisation of H (and GPTAQ's unscaled P), the α sweep of the
/// last settings, the step mode's sweep, and — once the GPU path ran — the capture's matrices and
/// fixed terms on the GPU. Changing bits, groups, block size or α re-runs only the O(rows·n²)
/// sweep on the reference path; act-order or damping refactor H. The GPU path factors H on the GPU
/// at every solve (cheap there).
pub struct Lab {
    capture: CapturedModule,
    w: Vec<f64>,
    h: Vec<f64>,
    d: Vec<f64>,
    fixed: Option<FixedTerms>,
    factors: FactorCache,
    sweep: Option<SweepCache>,
    stepper: Option<step::Stepper>,
    gpu: Option<gpu::GpuTerms>,
}

/// The α sweep of the last study: its settings, its solver and the points.
type SweepCache = (QuantConfig, LabSolver, Vec<(f64, LabMetrics)>);

/// One solve measured, whichever solver ran it; `detail` asks for the study's extras.
struct Measured {
    result: QuantResult,
    metrics: LabMetrics,
    /// Relative output share per column, ORIGINAL order (empty without `detail`).
    column_output: Vec<f64>,
    /// `SideStudy::column_loss_uncompensated` (empty without `detail` or when unavailable).
    uncompensated: Vec<f64>,
    /// `SideStudy::heat_comp` (empty unless the reference path recorded its sweep).
    heat_comp: Heatmap,
    /// The solve-independent pictures (`None` for an RTN fallback or without `detail`).
    extra: Option<SideExtra>,
}

impl Lab {
    pub fn new(capture: CapturedModule) -> Self {
        Self {
            w: widen(&capture.w),
            h: widen(&capture.h),
            d: widen(&capture.d),
            capture,
            fixed: None,
            factors: FactorCache::default(),
            sweep: None,
            stepper: None,
            gpu: None,
        }
    }

    pub fn capture(&self) -> &CapturedModule {
        &self.capture
    }

    /// [`Backend::choose`] for this capture.
    pub fn backend<'a>(&self, ctx: Option<&'a GpuContext>) -> Backend<'a> {
        Backend::choose(ctx, self.capture.rows, self.capture.cols)
    }

    /// Frees the capture's GPU buffers (the worker calls this before a run needs the memory); the
    /// next GPU solve uploads them again.
    pub fn release_gpu(&mut self) {
        self.gpu = None;
    }

    /// The sweep of `cfg` set up (factorisation from the cache), not run yet.
    fn start(&mut self, cfg: &QuantConfig, record: bool) -> Result<SweepStart, LabError> {
        let c = &self.capture;
        let d = matches!(cfg.method, Method::Gptaq { .. }).then_some(self.d.as_slice());
        Ok(reference::start_sweep(
            &self.w,
            c.rows,
            c.cols,
            &self.h,
            d,
            cfg,
            Some(&mut self.factors),
            record,
        )?)
    }

    /// One solve on `backend` and its errors; with `detail` also the per-column traces and the
    /// pictures the solver can provide.
    fn measure(
        &mut self,
        backend: Backend<'_>,
        cfg: &QuantConfig,
        detail: bool,
    ) -> Result<Measured, LabError> {
        match backend {
            Backend::Reference => self.measure_reference(cfg, detail),
            Backend::Gpu(ctx) => self.measure_gpu(ctx, cfg, detail),
        }
    }

    fn measure_reference(&mut self, cfg: &QuantConfig, detail: bool) -> Result<Measured, LabError> {
        let per_n = 1.0 / self.capture.nsamples.max(1) as f64;
        let (result, traces) = match self.start(cfg, detail)? {
            SweepStart::Finished(r) => (*r, None),
            SweepStart::Sweep(mut s) => {
                s.run();
                let traces = s.recorded().map(|rec| recorded_pictures(&s, rec, per_n));
                (s.into_result(&self.w, &self.h)?, traces)
            }
        };
        let fixed = self
            .fixed
            .get_or_insert_with(|| FixedTerms::new(&self.capture, &self.w));
        let (metrics, dw, dwh) =
            fixed.metrics(&self.capture, &self.w, &result.q, result.proxy_loss_sum);
        let column_output = if detail {
            fixed.column_output(&self.capture, &self.w, &dw, &dwh)
        } else {
            Vec::new()
        };
        let (uncompensated, heat_comp, extra) = match traces {
            Some((u, h, ex)) => (u, h, Some(ex)),
            None => (Vec::new(), Heatmap::default(), None),
        };
        Ok(Measured {
            result,
            metrics,
            column_output,
            uncompensated,
            heat_comp,
            extra,
        })
    }

    fn measure_gpu(
        &mut self,
        ctx: &GpuContext,
        cfg: &QuantConfig,
        detail: bool,
    ) -> Result<Measured, LabError> {
        let c = &self.capture;
        let terms = match &mut self.gpu {
            Some(t) if t.is_on(ctx) => t,
            slot => {
                // Free the old device's buffers before allocating on the new one.
                *slot = None;
                slot.insert(gpu::GpuTerms::new(ctx, c)?)
            }
        };
        // The pipeline's solve: W from the capture's GPU copy, the capture's factor (and P) shared
        // between re-solves, Q left on the GPU (the errors come from there; the results rebuild
        // it from the codes, `QuantResult::weights`).
        let mut solve = crate::quant::gpu::quantize_gpu_resident(
            ctx,
            &c.w,
            Some(&terms.w),
            c.rows,
            c.cols,
            &terms.h,
            Some(&terms.d),
            cfg,
            Some(&mut terms.shared),
        )?;
        if let Some(codes) = solve.codes.take() {
            codes.finish(ctx, &mut solve.result)?;
        }
        // The solve always returns Q on the GPU (only a caller of Solving::release_q can lose it).
        let q = solve.q.as_ref().ok_or_else(|| {
            crate::gpu::GpuError::Validation("the lab's solve returned no Q".into())
        })?;
        let m = terms.measure(ctx, q, detail)?;
        let result = solve.result;
        let metrics = lab_metrics(
            m.quant,
            m.cross,
            terms.asym,
            terms.denom,
            result.proxy_loss_sum,
            c.nsamples,
        );
        let rel = |x: f64| {
            if terms.denom > 0.0 {
                x / terms.denom
            } else {
                0.0
            }
        };
        let column_output = m.columns.iter().map(|&x| rel(x)).collect();
        let solved = detail && result.fallback.is_none();
        // column_loss_k = Σ_r (w−q)²/(2U_kk²), so the uncompensated Σ_r (w−q)²·H̃_kk/2 is
        // column_loss_k·U_kk²·H̃_kk, H̃ the damped H (h_diag is the undamped diagonal).
        let per_n = 1.0 / c.nsamples.max(1) as f64;
        let uncompensated = if solved && solve.u_diag.len() == c.cols {
            result
                .column_loss
                .iter()
                .zip(&solve.u_diag)
                .zip(&result.h_diag)
                .map(|((&l, &u), &hd)| {
                    let u2 = f64::from(u) * f64::from(u);
                    l * u2 * (f64::from(hd) + result.damp) * per_n
                })
                .collect()
        } else {
            Vec::new()
        };
        let extra = solved.then(|| SideExtra {
            perm: result.perm.clone(),
            h_diag: result.h_diag.clone(),
            // P stays inside the GPU solve (module docs).
            p_row_norms: Vec::new(),
            heat_w: processing_heat_w(c, result.perm.as_deref()),
        });
        Ok(Measured {
            result,
            metrics,
            column_output,
            uncompensated,
            heat_comp: Heatmap::default(),
            extra,
        })
    }

    /// [`reference::quantize_reference`] of the capture with `cfg` (bit-identical: the same sweep
    /// on the same factorisation), and its errors.
    pub fn solve(&mut self, cfg: &QuantConfig) -> Result<LabSolve, LabError> {
        self.solve_on(Backend::Reference, cfg)
    }

    /// One re-solve with `cfg` on `backend`, and its errors.
    pub fn solve_on(
        &mut self,
        backend: Backend<'_>,
        cfg: &QuantConfig,
    ) -> Result<LabSolve, LabError> {
        let t = Instant::now();
        let m = self.measure(backend, cfg, false)?;
        Ok(LabSolve {
            config: cfg.clone(),
            result: m.result,
            metrics: m.metrics,
            secs: t.elapsed().as_secs_f64(),
        })
    }

    /// GPTAQ at each α (α = 0 is GPTQ), other settings from `base`, on the f64 reference.
    pub fn alpha_sweep(
        &mut self,
        base: &QuantConfig,
        alphas: &[f64],
    ) -> Result<Vec<(f64, LabMetrics)>, LabError> {
        self.alpha_sweep_on(Backend::Reference, base, alphas)
    }

    /// GPTAQ at each α (α = 0 is GPTQ), other settings from `base`, on `backend`.
    pub fn alpha_sweep_on(
        &mut self,
        backend: Backend<'_>,
        base: &QuantConfig,
        alphas: &[f64],
    ) -> Result<Vec<(f64, LabMetrics)>, LabError> {
        alphas
            .iter()
            .map(|&alpha| {
                let cfg = QuantConfig {
                    method: Method::Gptaq { alpha },
                    ..base.clone()
                };
                Ok((alpha, self.solve_on(backend, &cfg)?.metrics))
            })
            .collect()
    }

    /// [`Lab::study_on`] with the f64 reference.
    pub fn study(&mut self, base: &QuantConfig, alpha: f64) -> Result<LabStudy, LabError> {
        self.study_on(Backend::Reference, base, alpha)
    }

    /// GPTQ and GPTAQ at `alpha` with `base`'s other settings (its method is ignored), with the
    /// per-column traces, the pictures, P's row norms and the α sweep (recomputed only when `base`
    /// or the solver changed since the last call), all on `backend` (what the GPU path leaves
    /// empty: module docs).
    pub fn study_on(
        &mut self,
        backend: Backend<'_>,
        base: &QuantConfig,
        alpha: f64,
    ) -> Result<LabStudy, LabError> {
        let t = Instant::now();
        let solver = backend.solver();
        let base = QuantConfig {
            method: Method::Gptq,
            ..base.clone()
        };
        let (gptq, gptq_extra) = self.side(backend, &base)?;
        let gptaq_cfg = QuantConfig {
            method: Method::Gptaq { alpha },
            ..base.clone()
        };
        let (gptaq, gptaq_extra) = self.side(backend, &gptaq_cfg)?;
        let sweep = match &self.sweep {
            Some((cfg, by, s)) if *cfg == base && *by == solver => s.clone(),
            _ => {
                let s = self.alpha_sweep_on(backend, &base, &sweep_alphas())?;
                self.sweep = Some((base.clone(), solver, s.clone()));
                s
            }
        };
        // P's norms only exist for a GPTAQ sweep; GPTQ's extras stand in if GPTAQ fell back.
        let c = &self.capture;
        let extra = gptaq_extra.or(gptq_extra).unwrap_or_else(|| SideExtra {
            perm: None,
            h_diag: reference_h_diag(&self.h, c.cols),
            p_row_norms: Vec::new(),
            heat_w: Heatmap::mean_abs(&self.w, c.rows, c.cols, STUDY_HEAT, STUDY_HEAT),
        });
        Ok(LabStudy {
            config: base,
            alpha,
            gptq,
            gptaq,
            perm: extra.perm,
            h_diag: extra.h_diag,
            p_row_norms: extra.p_row_norms,
            heat_w: extra.heat_w,
            sweep,
            solver,
            secs: t.elapsed().as_secs_f64(),
        })
    }

    /// One solve turned into the lab's traces and pictures, with the solve-independent pictures
    /// (processing order, diag(H), P's row norms) when the solver provides them.
    fn side(
        &mut self,
        backend: Backend<'_>,
        cfg: &QuantConfig,
    ) -> Result<(SideStudy, Option<SideExtra>), LabError> {
        let t = Instant::now();
        let (rows, n, nsamples) = (self.capture.rows, self.capture.cols, self.capture.nsamples);
        let per_n = 1.0 / nsamples.max(1) as f64;
        let Measured {
            result,
            metrics,
            column_output: column_output_orig,
            uncompensated,
            heat_comp,
            extra,
        } = self.measure(backend, cfg, true)?;
        // Traces and pictures in the solve's processing order.
        let order: Vec<usize> = result.perm.clone().unwrap_or_else(|| (0..n).collect());
        let column_output = order
            .iter()
            .map(|&j| column_output_orig.get(j).copied().unwrap_or(0.0))
            .collect();
        let at = |i: usize| {
            let (r, k) = (i / n.max(1), i % n.max(1));
            r * n + order.get(k).copied().unwrap_or(k)
        };
        let qw = result.weights();
        let qv = |j: usize| f64::from(qw.get(j).copied().unwrap_or(0.0));
        let heat_q =
            Heatmap::block_means(rows, n, STUDY_HEAT, STUDY_HEAT, |i| qv(at(i)).abs() as f32);
        let heat_err = Heatmap::block_means(rows, n, STUDY_HEAT, STUDY_HEAT, |i| {
            let j = at(i);
            (self.w.get(j).copied().unwrap_or(0.0) - qv(j)).abs() as f32
        });
        let side = SideStudy {
            method: cfg.method,
            metrics,
            fallback: result.fallback.clone(),
            column_loss: result.column_loss.iter().map(|l| l * per_n).collect(),
            column_loss_uncompensated: uncompensated,
            column_output,
            heat_q,
            heat_err,
            heat_comp,
            secs: t.elapsed().as_secs_f64(),
        };
        Ok((side, extra))
    }
}

/// Mean |W| per block in processing order with dead columns (`H_jj = 0`) zeroed: what the
/// reference's recorded sweep starts from, for the GPU path (which records nothing).
fn processing_heat_w(c: &CapturedModule, perm: Option<&[usize]>) -> Heatmap {
    let n = c.cols;
    let dead: Vec<bool> = (0..n)
        .map(|j| c.h.get(j * n + j).copied().unwrap_or(0.0) == 0.0)
        .collect();
    let col = |k: usize| perm.and_then(|p| p.get(k).copied()).unwrap_or(k);
    Heatmap::block_means(c.rows, n, STUDY_HEAT, STUDY_HEAT, |i| {
        let (r, j) = (i / n.max(1), col(i % n.max(1)));
        if dead.get(j).copied().unwrap_or(false) {
            0.0
        } else {
            c.w.get(r * n + j).copied().unwrap_or(0.0).abs()
        }
    })
}

/// From a finished recorded sweep: the uncompensated per-column loss (`SideStudy`), the
/// compensation heatmap and the solve-independent pictures.
fn recorded_pictures(
    s: &SweepState,
    rec: &SweepRecord,
    per_n: f64,
) -> (Vec<f64>, Heatmap, SideExtra) {
    let (rows, n) = (s.rows(), s.cols());
    let (damp, hd, q, pre) = (s.damp(), s.h_diag(), s.q(), &rec.pre);
    let uncompensated: Vec<f64> = (0..n)
        .map(|k| {
            let hkk = f64::from(hd.get(k).copied().unwrap_or(0.0)) + damp;
            let s2: f64 = (0..rows)
                .map(|r| (pre[r * n + k] - q[r * n + k]).powi(2))
                .sum();
            s2 * hkk / 2.0 * per_n
        })
        .collect();
    let moved: Vec<f64> = pre.iter().zip(&rec.start).map(|(a, b)| a - b).collect();
    let heat_comp = Heatmap::mean_abs(&moved, rows, n, STUDY_HEAT, STUDY_HEAT);
    let p_row_norms = s
        .p()
        .map(|p| {
            p.chunks_exact(n.max(1))
                .map(|row| row.iter().map(|v| v * v).sum::<f64>().sqrt())
                .collect()
        })
        .unwrap_or_default();
    let extra = SideExtra {
        perm: s.perm().map(<[usize]>::to_vec),
        h_diag: hd.to_vec(),
        p_row_norms,
        heat_w: Heatmap::mean_abs(&rec.start, rows, n, STUDY_HEAT, STUDY_HEAT),
    };
    (uncompensated, heat_comp, extra)
}

/// The solve-independent pictures a recorded sweep provides.
struct SideExtra {
    perm: Option<Vec<usize>>,
    h_diag: Vec<f32>,
    p_row_norms: Vec<f64>,
    heat_w: Heatmap,
}

/// `diag(H)` in original order with dead columns read as 1 (what an RTN fallback reports).
fn reference_h_diag(h: &[f64], n: usize) -> Vec<f32> {
    (0..n)
        .map(|j| {
            let v = h.get(j * n + j).copied().unwrap_or(0.0);
            (if v == 0.0 { 1.0 } else { v }) as f32
        })
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes a capture as safetensors (`w`, `h`, `d`, `e` f32 + metadata), atomically.
pub fn save(c: &CapturedModule, path: &Path) -> Result<(), LabError> {
    let n = c.cols;
    let bufs = [
        ("w", vec![c.rows, n], f32_bytes(&c.w)),
        ("h", vec![n, n], f32_bytes(&c.h)),
        ("d", vec![n, n], f32_bytes(&c.d)),
        ("e", vec![n, n], f32_bytes(&c.e)),
    ];
    let mut views = Vec::new();
    for (name, shape, bytes) in &bufs {
        let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
            .map_err(|e| file_err(path, e.to_string()))?;
        views.push((*name, v));
    }
    let meta: HashMap<String, String> = [
        (
            "format".to_string(),
            "gptaq-studio-lab-capture-v1".to_string(),
        ),
        ("layer".to_string(), c.layer.to_string()),
        ("module".to_string(), c.module.short_name().to_string()),
        ("nsamples".to_string(), c.nsamples.to_string()),
    ]
    .into();
    let bytes =
        safetensors::serialize(views, Some(meta)).map_err(|e| file_err(path, e.to_string()))?;
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, bytes).map_err(|e| file_err(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e.to_string()))
}

/// Reads a capture written by [`save`], validating every shape.
pub fn load(path: &Path) -> Result<CapturedModule, LabError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e.to_string()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| file_err(path, format!("not a safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some("gptaq-studio-lab-capture-v1") {
        return Err(file_err(
            path,
            "not a gptaq-studio layer-lab capture (metadata `format` missing)",
        ));
    }
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| file_err(path, e.to_string()))?;
    let get = |name: &str| -> Result<(Vec<usize>, Vec<f32>), LabError> {
        let t = st
            .tensor(name)
            .map_err(|e| file_err(path, format!("tensor `{name}`: {e}")))?;
        if t.dtype() != safetensors::Dtype::F32 {
            return Err(file_err(
                path,
                format!("tensor `{name}` is {:?}, expected F32", t.dtype()),
            ));
        }
        let v = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok((t.shape().to_vec(), v))
    };
    let (ws, w) = get("w")?;
    let [rows, cols] = ws[..] else {
        return Err(file_err(
            path,
            format!("tensor `w` has shape {ws:?}, expected 2-D"),
        ));
    };
    let mut sq = Vec::new();
    for name in ["h", "d", "e"] {
        let (s, v) = get(name)?;
        if s != [cols, cols] {
            return Err(file_err(
                path,
                format!("tensor `{name}` has shape {s:?}, expected [{cols}, {cols}]"),
            ));
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(file_err(
                path,
                format!("tensor `{name}` has a non-finite value at {i}"),
            ));
        }
        sq.push(v);
    }
    let parse = |k: &str| -> Result<usize, LabError> {
        meta.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| file_err(path, format!("metadata `{k}` missing or not a number")))
    };
    let module = meta
        .get("module")
        .and_then(|m| ModuleKind::from_short_name(m))
        .ok_or_else(|| file_err(path, "metadata `module` missing or unknown"))?;
    let e = sq.pop().unwrap_or_default();
    let d = sq.pop().unwrap_or_default();
    let h = sq.pop().unwrap_or_default();
    Ok(CapturedModule {
        layer: parse("layer")?,
        module,
        rows,
        cols,
        nsamples: parse("nsamples")?,
        w,
        h,
        d,
        e,
    })
}

#[cfg(test)]
mod tests {
    use super::step::tests::capture;
    use super::*;
    use crate::quant::metrics::module_errors_from_gram;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-300)
    }

    /// The lab's error terms equal the Gram-matrix formulas of `quant::metrics` (with H, D, E as
    /// the Grams), and the per-column traces add up to what they decompose.
    #[test]
    fn study_traces_add_up() -> TestResult {
        let cap = capture(10, 48, 11, 5);
        let mut lab = Lab::new(cap.clone());
        let base = QuantConfig {
            bits: 3,
            group_size: Some(16),
            block_size: 16,
            act_order: true,
            ..QuantConfig::default()
        };
        let study = lab.study(&base, 0.5)?;
        let (w, f) = (widen(&cap.w), |v: &[f32]| widen(v));
        for side in [&study.gptq, &study.gptaq] {
            let solved = lab.solve(&QuantConfig {
                method: side.method,
                ..base.clone()
            })?;
            let q = widen(&solved.result.q);
            let want = module_errors_from_gram(&w, &q, 10, 48, &f(&cap.h), &f(&cap.d), &f(&cap.e))?;
            let m = side.metrics;
            assert!(
                close(m.quant_error, want.quant_error, 1e-9),
                "{m:?} {want:?}"
            );
            assert!(close(m.asym_error, want.asym_error, 1e-9), "{m:?} {want:?}");
            assert!(
                close(m.output_error, want.output_error, 1e-9),
                "{m:?} {want:?}"
            );
            let out: f64 = side.column_output.iter().sum();
            assert!(
                close(out, m.output_error, 1e-9),
                "{out} vs {}",
                m.output_error
            );
            let proxy: f64 = side.column_loss.iter().sum();
            assert!(
                close(proxy, m.proxy_loss, 1e-9),
                "{proxy} vs {}",
                m.proxy_loss
            );
            // No compensation can only cost more than the OBS-compensated rounding.
            for (k, (a, b)) in side
                .column_loss
                .iter()
                .zip(&side.column_loss_uncompensated)
                .enumerate()
            {
                assert!(*b >= a * (1.0 - 1e-12), "column {k}: {b} < {a}");
            }
            assert_eq!((side.heat_comp.rows, side.heat_comp.cols), (10, 48));
        }
        assert_eq!(study.sweep.len(), sweep_alphas().len());
        assert!(close(
            study.sweep[0].1.output_error,
            study.gptq.metrics.output_error,
            1e-12
        ));
        assert!(close(
            study.sweep[5].1.output_error,
            study.gptaq.metrics.output_error,
            1e-12
        ));
        // act-order: diag(H) descending along the processing order; P has n row norms, the last 0.
        assert!(study.h_diag.windows(2).all(|p| p[0] >= p[1]));
        assert_eq!(study.perm.as_ref().map(Vec::len), Some(48));
        assert_eq!(study.p_row_norms.len(), 48);
        assert_eq!(study.p_row_norms.last().copied(), Some(0.0));
        assert!(study.p_row_norms.iter().any(|v| *v > 0.0));
        // P scales with alpha.
        let doubled = lab.study(&base, 1.0)?;
        for (a, b) in study.p_row_norms.iter().zip(&doubled.p_row_norms) {
            assert!(close(2.0 * a, *b, 1e-12), "{a} {b}");
        }
        Ok(())
    }

    #[test]
    fn gpu_policy_thresholds() {
        assert!(
            !prefers_gpu(512, 512),
            "512 x 512 = 2^18 weights stays on the reference"
        );
        assert!(prefers_gpu(8, 513), "wider than GPU_MIN_COLS");
        assert!(prefers_gpu(1025, 256), "more than GPU_MIN_WEIGHTS");
        assert!(matches!(
            Backend::choose(None, 4096, 4096),
            Backend::Reference
        ));
    }

    fn rel_close(what: &str, got: f64, want: f64, rel: f64) {
        assert!(
            got.is_finite() && close(got, want, rel),
            "{what}: got {got}, expected {want} (relative tolerance {rel:e}, off by {:.3e})",
            (got - want).abs() / want.abs().max(1e-300)
        );
    }

    /// Relative tolerance of the GPU path's errors against the f64 formulas for the SAME Q: f32
    /// ΔW, f32 GEMMs over ≤ a few hundred terms and f32 partial sums of ≤ 64 rows.
    const GPU_METRICS_RTOL: f64 = 1e-4;

    /// The GPU path's errors and per-column output shares equal the f64 path's for the Q the GPU
    /// solved, on awkward sizes (prime columns, a dead column, rows not a multiple of anything).
    #[test]
    fn gpu_metrics_match_f64_for_the_same_q() -> TestResult {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        for (rows, cols, cfg) in [
            (
                37,
                131,
                QuantConfig {
                    bits: 3,
                    group_size: Some(32),
                    block_size: 32,
                    act_order: true,
                    method: Method::Gptaq { alpha: 0.5 },
                    ..QuantConfig::default()
                },
            ),
            (
                1,
                67,
                QuantConfig {
                    bits: 4,
                    method: Method::Gptq,
                    ..QuantConfig::default()
                },
            ),
        ] {
            let cap = capture(rows, cols, 31 + cols as u64, 5);
            let mut lab = Lab::new(cap.clone());
            let m = lab.measure(Backend::Gpu(&ctx), &cfg, true)?;
            let w = widen(&cap.w);
            let fixed = FixedTerms::new(&cap, &w);
            let (want, dw, dwh) =
                fixed.metrics(&cap, &w, &m.result.weights(), m.result.proxy_loss_sum);
            let shape = format!("{rows}x{cols} {:?}", cfg.method);
            let got = m.metrics;
            rel_close(
                &format!("{shape} quant"),
                got.quant_error,
                want.quant_error,
                GPU_METRICS_RTOL,
            );
            rel_close(
                &format!("{shape} asym"),
                got.asym_error,
                want.asym_error,
                GPU_METRICS_RTOL,
            );
            rel_close(
                &format!("{shape} output"),
                got.output_error,
                want.output_error,
                GPU_METRICS_RTOL,
            );
            assert_eq!(
                got.proxy_loss, want.proxy_loss,
                "{shape}: same proxy loss input"
            );
            let cols_want = fixed.column_output(&cap, &w, &dw, &dwh);
            assert_eq!(m.column_output.len(), cols, "{shape}: column shares");
            let scale = cols_want.iter().map(|v| v.abs()).fold(0.0, f64::max);
            for (j, (g, e)) in m.column_output.iter().zip(&cols_want).enumerate() {
                assert!(
                    (g - e).abs() <= GPU_METRICS_RTOL * scale,
                    "{shape}: column {j} output share: got {g}, expected {e} (tolerance {:.3e})",
                    GPU_METRICS_RTOL * scale
                );
            }
        }
        Ok(())
    }

    /// A whole study on the GPU path against the f64 reference's: the same errors within
    /// `STUDY_RTOL` (codes can differ on f32/f64 near-ties, so errors are compared, not codes),
    /// the same processing order and diag(H), an 11-point finite α sweep whose ends are the two
    /// solves, traces that add up, and the uncompensated loss at or above the compensated one.
    #[test]
    fn gpu_study_matches_reference_study() -> TestResult {
        /// A near-tie flip changes one code and, through the error feedback, a few more of its row.
        const STUDY_RTOL: f64 = 2e-3;
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let (rows, cols) = (29, 97);
        let cap = capture(rows, cols, 77, 3);
        let base = QuantConfig {
            bits: 3,
            group_size: Some(32),
            block_size: 32,
            act_order: true,
            ..QuantConfig::default()
        };
        let mut lab = Lab::new(cap);
        let cpu = lab.study(&base, 0.5)?;
        let gpu = lab.study_on(Backend::Gpu(&ctx), &base, 0.5)?;
        assert_eq!(
            (cpu.solver, gpu.solver),
            (LabSolver::Reference, LabSolver::Gpu)
        );
        assert_eq!(gpu.perm, cpu.perm, "processing order");
        assert_eq!(gpu.h_diag, cpu.h_diag, "diag(H) in processing order");
        assert_eq!(gpu.sweep.len(), sweep_alphas().len());
        for (name, g, c) in [
            ("GPTQ", &gpu.gptq, &cpu.gptq),
            ("GPTAQ", &gpu.gptaq, &cpu.gptaq),
        ] {
            let (gm, cm) = (g.metrics, c.metrics);
            rel_close(
                &format!("{name} quant"),
                gm.quant_error,
                cm.quant_error,
                STUDY_RTOL,
            );
            rel_close(
                &format!("{name} asym"),
                gm.asym_error,
                cm.asym_error,
                GPU_METRICS_RTOL,
            );
            rel_close(
                &format!("{name} output"),
                gm.output_error,
                cm.output_error,
                STUDY_RTOL,
            );
            rel_close(
                &format!("{name} proxy"),
                gm.proxy_loss,
                cm.proxy_loss,
                STUDY_RTOL,
            );
            let proxy: f64 = g.column_loss.iter().sum();
            rel_close(&format!("{name} Σ column loss"), proxy, gm.proxy_loss, 1e-4);
            let out: f64 = g.column_output.iter().sum();
            rel_close(
                &format!("{name} Σ column output"),
                out,
                gm.output_error,
                1e-4,
            );
            assert_eq!(g.column_loss_uncompensated.len(), cols, "{name}");
            for (k, (a, b)) in g
                .column_loss
                .iter()
                .zip(&g.column_loss_uncompensated)
                .enumerate()
            {
                assert!(
                    *b >= a * (1.0 - 1e-4),
                    "{name} column {k}: uncompensated {b} < {a}"
                );
            }
            let (gu, cu) = (
                g.column_loss_uncompensated.iter().sum::<f64>(),
                c.column_loss_uncompensated.iter().sum::<f64>(),
            );
            rel_close(&format!("{name} Σ uncompensated"), gu, cu, 1e-2);
            assert!(
                g.heat_comp.is_empty(),
                "{name}: no recorded sweep on the GPU"
            );
            assert_eq!(
                (g.heat_q.rows, g.heat_q.cols, g.heat_err.cols),
                (c.heat_q.rows, c.heat_q.cols, c.heat_err.cols),
                "{name}: heatmap shapes"
            );
        }
        for ((a, g), (_, c)) in gpu.sweep.iter().zip(&cpu.sweep) {
            assert!(
                g.output_error.is_finite() && g.quant_error.is_finite(),
                "α = {a}: {g:?}"
            );
            rel_close(
                &format!("sweep α = {a} output"),
                g.output_error,
                c.output_error,
                STUDY_RTOL,
            );
        }
        rel_close(
            "sweep α = 0 is GPTQ",
            gpu.sweep[0].1.output_error,
            gpu.gptq.metrics.output_error,
            1e-12,
        );
        rel_close(
            "sweep α = 0.5 is the GPTAQ side",
            gpu.sweep[5].1.output_error,
            gpu.gptaq.metrics.output_error,
            1e-12,
        );
        assert!(gpu.p_row_norms.is_empty(), "P stays on the GPU");
        for (i, (g, c)) in gpu.heat_w.values.iter().zip(&cpu.heat_w.values).enumerate() {
            assert!(
                (g - c).abs() <= 1e-6 * c.abs().max(1.0),
                "heat_w cell {i}: {g} vs {c}"
            );
        }
        Ok(())
    }

    /// The GPU re-solves of one capture share the factor (and GPTAQ's P) while the settings they
    /// depend on stay (`quant::gpu::SharedFactor`): a run through settings that keep, change and
    /// change back what the factor and P depend on gives every solve bit for bit what a fresh lab
    /// (nothing shared) gives. A cache that ignored α would reuse a wrong P, one that ignored
    /// damping or act-order a wrong factor.
    #[test]
    fn gpu_resolves_share_the_factor_and_match_fresh_solves() -> TestResult {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let (rows, cols) = (23, 160);
        let cap = capture(rows, cols, 77, 3);
        let base = QuantConfig {
            bits: 4,
            group_size: Some(32),
            block_size: 32,
            method: Method::Gptaq { alpha: 0.25 },
            ..QuantConfig::default()
        };
        let gptaq = |alpha: f64| QuantConfig {
            method: Method::Gptaq { alpha },
            ..base.clone()
        };
        let steps = [
            base.clone(),
            gptaq(1.0),
            QuantConfig {
                method: Method::Gptq,
                ..base.clone()
            },
            QuantConfig {
                bits: 3,
                ..gptaq(1.0)
            },
            QuantConfig {
                damp_percent: 0.1,
                ..gptaq(1.0)
            },
            QuantConfig {
                act_order: true,
                ..gptaq(1.0)
            },
            base.clone(),
            gptaq(0.0),
        ];
        let mut shared = Lab::new(cap.clone());
        for (i, cfg) in steps.iter().enumerate() {
            let got = shared.solve_on(Backend::Gpu(&ctx), cfg)?;
            let want = Lab::new(cap.clone()).solve_on(Backend::Gpu(&ctx), cfg)?;
            let what = format!("step {i} ({cfg:?}), {rows}x{cols}");
            let (gc, wc) = (&got.result.codes, &want.result.codes);
            let differ: Vec<usize> = (0..gc.len().min(wc.len()))
                .filter(|&j| gc[j] != wc[j])
                .collect();
            assert!(
                differ.is_empty() && gc.len() == wc.len(),
                "{what}: {} of {} codes differ, the first at {:?} ({} codes got)",
                differ.len(),
                wc.len(),
                differ.first(),
                gc.len()
            );
            let (gq, wq) = (got.result.weights(), want.result.weights());
            assert_eq!(gq.len(), rows * cols, "{what}: Q's length");
            for (j, (g, w)) in gq.iter().zip(wq.iter()).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{what}: Q[{j}] got {g}, expected {w}"
                );
            }
            assert_eq!(
                got.metrics.output_error.to_bits(),
                want.metrics.output_error.to_bits(),
                "{what}: output error got {}, expected {}",
                got.metrics.output_error,
                want.metrics.output_error
            );
        }
        // One entry, the last factor: steps 1–3 and 7 reuse it; 4 and 5 change the damping and
        // the order, and 6 returns to the first settings after those replaced its factor.
        let hits = shared.gpu.as_ref().map_or(0, |t| t.shared.hits());
        assert_eq!(hits, 4, "solves that reused a factor");
        Ok(())
    }

    /// Timing of one study (GPTQ + GPTAQ + the 11-point α sweep) on both paths, not a check:
    /// `cargo test --release --lib lab::tests::study_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing report, run by hand"]
    fn study_timing() -> TestResult {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let base = QuantConfig {
            bits: 4,
            group_size: Some(128),
            ..QuantConfig::default()
        };
        for (rows, cols) in [(256, 256), (512, 512)] {
            let mut lab = Lab::new(capture(rows, cols, 1, 0));
            let t = Instant::now();
            lab.study(&base, 0.25)?;
            let cpu_secs = t.elapsed().as_secs_f64();
            // The first GPU study also uploads the capture and builds the pipelines.
            let t = Instant::now();
            lab.study_on(Backend::Gpu(&ctx), &base, 0.25)?;
            let first = t.elapsed().as_secs_f64();
            let next = QuantConfig {
                bits: 3,
                ..base.clone()
            };
            let t = Instant::now();
            let gpu = lab.study_on(Backend::Gpu(&ctx), &next, 0.25)?;
            let again = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let cpu = lab.study(&next, 0.25)?;
            let cpu_again = t.elapsed().as_secs_f64();
            eprintln!(
                "{rows}x{cols} study (13 solves): reference {cpu_secs:.2} s (H factor cached: \
                 {cpu_again:.2} s), GPU first {first:.2} s, GPU next {again:.2} s on {}; W3 GPTAQ \
                 output error reference {:.6e}, GPU {:.6e}",
                ctx.summary.name, cpu.gptaq.metrics.output_error, gpu.gptaq.metrics.output_error
            );
        }
        Ok(())
    }
}
