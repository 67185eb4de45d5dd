//! The lab's error terms on the GPU (module docs of [`super`], "GPU path").
//!
//! [`GpuTerms`] holds one capture's matrices on the GPU — `W`, `H`, `D` and `W·D` — and the
//! Q-independent parts of the error formulas, computed once: `tr(W E Wᵀ)`, the denominator
//! `tr(W F Wᵀ)` and the per-column `Σ_r W∘(W·E)`. [`GpuTerms::measure`] then costs, per solution,
//! one `ΔW = W − Q`, one `[rows, n]·[n, n]` GEMM (`ΔW·H`), with the per-column output shares a
//! second one (`ΔW·Dᵀ`), and column sums of elementwise products (`ops::col_dot_partials`): only
//! `chunks·n` partial sums come back, added on the host in f64.

use crate::gpu::ops::{self, MatView};
use crate::gpu::{GpuBuffer, GpuContext, GpuError, GpuMatrix};
use crate::pipeline::CapturedModule;

/// One capture's matrices and Q-independent terms on one device.
pub(super) struct GpuTerms {
    /// The device the buffers live on: a context for another device (the worker reopened the
    /// adapter) must not be handed these buffers.
    device: wgpu::Device,
    rows: usize,
    n: usize,
    pub(super) w: GpuBuffer<f32>,
    /// n×n, in row panels when larger than one storage binding (gpu/matrix.rs).
    pub(super) h: GpuMatrix,
    pub(super) d: GpuMatrix,
    wd: GpuBuffer<f32>,
    /// `tr(W E Wᵀ)`.
    pub(super) asym: f64,
    /// `tr(W F Wᵀ)`, `F = H + D + Dᵀ + E`.
    pub(super) denom: f64,
    /// `Σ_r W∘(W·E)` per original column (the Q-independent part of the column shares).
    wwe: Vec<f64>,
    /// The re-solves' inverse factor (and GPTAQ's P) of `h` (and `d`), kept while the settings
    /// it depends on stay (`quant::gpu::SharedFactor`): dropped with `h` and `d`.
    pub(super) shared: crate::quant::gpu::SharedFactor,
}

/// What [`GpuTerms::measure`] returns for one `Q`.
pub(super) struct GpuMeasure {
    /// `tr(ΔW H ΔWᵀ)`.
    pub quant: f64,
    /// `tr(ΔW Dᵀ Wᵀ)`.
    pub cross: f64,
    /// Unnormalised per-column output shares, original order (empty unless asked for).
    pub columns: Vec<f64>,
}

impl GpuTerms {
    /// Uploads the capture (E only for the once-per-capture `W·E`) and computes the fixed terms.
    pub(super) fn new(ctx: &GpuContext, c: &CapturedModule) -> Result<Self, GpuError> {
        let (rows, n) = (c.rows, c.cols);
        let n_el = rows * n;
        let w = ctx.upload("lab W", &c.w)?;
        let h = ctx.matrix_upload("lab H", &c.h, n, n, 32)?;
        let d = ctx.matrix_upload("lab D", &c.d, n, n, 32)?;
        let wd = ctx.zeros::<f32>("lab W·D", n_el)?;
        let mut asym = 0.0;
        let mut denom = 0.0;
        let mut wwe = vec![0.0; n];
        if n_el > 0 {
            let e = ctx.matrix_upload("lab E", &c.e, n, n, 32)?;
            let wh = ctx.zeros::<f32>("lab W·H", n_el)?;
            let we = ctx.zeros::<f32>("lab W·E", n_el)?;
            let len = ops::col_dot_partials_len(rows, n);
            let parts = ctx.zeros::<f32>("lab fixed partials", 3 * len)?;
            let mut rec = ctx.recorder();
            for (m, out) in [(&h, &wh), (&d, &wd), (&e, &we)] {
                ops::gemm_mat(
                    &mut rec,
                    rows,
                    n,
                    n,
                    1.0,
                    MatView::new(&w, n).into(),
                    m.op(0, 0),
                    0.0,
                    MatView::new(out, n).into(),
                )?;
            }
            for (k, y) in [&wh, &wd, &we].into_iter().enumerate() {
                ops::col_dot_partials(&mut rec, rows, n, &w, y, &parts, k * len)?;
            }
            rec.submit();
            let p = ctx.read(&parts)?;
            let sum = |k: usize| -> Vec<f64> {
                ops::col_dot_sums(p.get(k * len..(k + 1) * len).unwrap_or(&[]), rows, n)
            };
            let (wwh, wwd) = (sum(0), sum(1));
            wwe = sum(2);
            asym = wwe.iter().sum();
            // tr(W (H + D + Dᵀ + E) Wᵀ), with tr(W Dᵀ Wᵀ) = tr(W D Wᵀ).
            denom = wwh.iter().sum::<f64>() + 2.0 * wwd.iter().sum::<f64>() + asym;
        }
        Ok(Self {
            device: ctx.device.clone(),
            rows,
            n,
            w,
            h,
            d,
            wd,
            asym,
            denom,
            wwe,
            shared: Default::default(),
        })
    }

    /// Whether the buffers belong to `ctx`'s device.
    pub(super) fn is_on(&self, ctx: &GpuContext) -> bool {
        self.device == ctx.device
    }

    /// The error terms of `q` (`[rows, n]`, original order, on this device); with `columns` also
    /// each column's unnormalised output share `Σ_r ΔW∘(ΔW·H + W·D) + W∘(ΔW·Dᵀ + W·E)`
    /// (`FixedTerms::column_output` in the f64 path), through the linearity of the column sums:
    /// `colsum(ΔW∘ΔWH) + colsum(ΔW∘WD) + colsum(W∘ΔWDᵀ) + colsum(W∘WE)`, the first two also giving
    /// `quant` and `cross`.
    pub(super) fn measure(
        &self,
        ctx: &GpuContext,
        q: &GpuBuffer<f32>,
        columns: bool,
    ) -> Result<GpuMeasure, GpuError> {
        let (rows, n) = (self.rows, self.n);
        let n_el = rows * n;
        if n_el == 0 {
            return Ok(GpuMeasure {
                quant: 0.0,
                cross: 0.0,
                columns: if columns { vec![0.0; n] } else { Vec::new() },
            });
        }
        let dw = ctx.zeros::<f32>("lab ΔW", n_el)?;
        let t = ctx.zeros::<f32>("lab ΔW·H", n_el)?;
        let len = ops::col_dot_partials_len(rows, n);
        let slots = if columns { 3 } else { 2 };
        let parts = ctx.zeros::<f32>("lab partials", slots * len)?;
        let mut rec = ctx.recorder();
        ops::axpby(&mut rec, n_el, 1.0, &self.w, -1.0, q, &dw)?;
        ops::gemm_mat(
            &mut rec,
            rows,
            n,
            n,
            1.0,
            MatView::new(&dw, n).into(),
            self.h.op(0, 0),
            0.0,
            MatView::new(&t, n).into(),
        )?;
        ops::col_dot_partials(&mut rec, rows, n, &dw, &t, &parts, 0)?;
        ops::col_dot_partials(&mut rec, rows, n, &dw, &self.wd, &parts, len)?;
        if columns {
            // ΔW·Dᵀ reuses T (ΔW·H's partials are recorded before it).
            ops::gemm_mat(
                &mut rec,
                rows,
                n,
                n,
                1.0,
                MatView::new(&dw, n).into(),
                self.d.op(0, 0).t(),
                0.0,
                MatView::new(&t, n).into(),
            )?;
            ops::col_dot_partials(&mut rec, rows, n, &self.w, &t, &parts, 2 * len)?;
        }
        rec.submit();
        let p = ctx.read(&parts)?;
        let sum = |k: usize| -> Vec<f64> {
            ops::col_dot_sums(p.get(k * len..(k + 1) * len).unwrap_or(&[]), rows, n)
        };
        let (c1, c2) = (sum(0), sum(1));
        let quant = c1.iter().sum();
        let cross = c2.iter().sum();
        let columns = if columns {
            let c3 = sum(2);
            (0..n)
                .map(|j| c1[j] + c2[j] + c3[j] + self.wwe.get(j).copied().unwrap_or(0.0))
                .collect()
        } else {
            Vec::new()
        };
        Ok(GpuMeasure {
            quant,
            cross,
            columns,
        })
    }
}
