//! Exact per-module error metrics on the calibration tokens, accumulated on the GPU.
//!
//! For a module with FP weights `W`, quantized weights `Q`, quantized-model input `X_q` and
//! FP-model input `X_fp` (rows = tokens) we compute per batch `Y_q = X_q·Qᵀ`, `Y_fp = X_fp·Wᵀ`,
//! `Y_w = X_q·Wᵀ` and four squared norms:
//! `‖Y_w − Y_q‖²` (quantization), `‖Y_fp − Y_w‖²` (asymmetry), `‖Y_q − Y_fp‖²` (output) and
//! `‖Y_fp‖²` (normaliser); see [`super::events::ModuleReport`] for the definitions. Partial sums
//! stay on the GPU (one slot range per batch) and are read back once per stage.
//!
//! `Y_q` and `Y_fp` are the module outputs the two streams' forward passes compute anyway, so the
//! driver passes them in ([`MetricAccumulator::record_outputs`]) and only `Y_w` is an extra GEMM;
//! [`MetricAccumulator::record`] forms all three products from the inputs, for modules whose
//! forward output is not `X·Wᵀ` alone (a bias) and must not be reused.

use crate::gpu::ops::{self, MatView};
use crate::gpu::{GpuBuffer, GpuContext, GpuError, Recorder};

/// Scratch outputs shared by all modules of a layer, each `max_tokens × max_rows`.
pub struct MetricScratch {
    yq: GpuBuffer<f32>,
    yfp: GpuBuffer<f32>,
    yw: GpuBuffer<f32>,
}

impl MetricScratch {
    pub fn new(ctx: &GpuContext, max_tokens: usize, max_rows: usize) -> Result<Self, GpuError> {
        let n = max_tokens * max_rows;
        Ok(Self {
            yq: ctx.zeros("metric Y_q", n)?,
            yfp: ctx.zeros("metric Y_fp", n)?,
            yw: ctx.zeros("metric Y_w", n)?,
        })
    }

    /// The `Y_q` buffer, free for the caller between metric recordings: the driver computes o's
    /// and down's quantized-stream outputs here before the residual add, and passes it back to
    /// [`MetricAccumulator::record_outputs`] (which writes only `Y_w`). [`MetricAccumulator::record`]
    /// overwrites it.
    pub fn y_q(&self) -> &GpuBuffer<f32> {
        &self.yq
    }

    /// The `Y_fp` buffer, free for the caller as [`Self::y_q`] is (the FP stream's outputs).
    pub fn y_fp(&self) -> &GpuBuffer<f32> {
        &self.yfp
    }
}

/// Partial sums of one module over all batches of a stage.
pub struct MetricAccumulator {
    parts: GpuBuffer<f32>,
    per_sum: usize,
    batches: usize,
    rows: usize,
    cols: usize,
}

impl MetricAccumulator {
    pub fn new(
        ctx: &GpuContext,
        batches: usize,
        max_tokens: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Self, GpuError> {
        let per_sum = ops::sq_partials_len(max_tokens * rows);
        Ok(Self {
            parts: ctx.zeros("metric partials", 4 * batches * per_sum)?,
            per_sum,
            batches,
            rows,
            cols,
        })
    }

    /// Records the module's products for batch `b` (`tokens` rows of `x_q`, `x_fp`, each `cols`
    /// wide) and their squared-norm partial sums.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        rec: &mut Recorder<'_>,
        scratch: &MetricScratch,
        b: usize,
        tokens: usize,
        x_q: &GpuBuffer<f32>,
        x_fp: &GpuBuffer<f32>,
        q: &GpuBuffer<f32>,
        w: &GpuBuffer<f32>,
    ) -> Result<(), GpuError> {
        let (r, c) = (self.rows, self.cols);
        let y = |buf| MatView::new(buf, r);
        ops::gemm(
            rec,
            tokens,
            r,
            c,
            1.0,
            MatView::new(x_q, c),
            MatView::new(q, c).t(),
            0.0,
            y(&scratch.yq),
        )?;
        ops::gemm(
            rec,
            tokens,
            r,
            c,
            1.0,
            MatView::new(x_fp, c),
            MatView::new(w, c).t(),
            0.0,
            y(&scratch.yfp),
        )?;
        self.record_outputs(rec, scratch, b, tokens, x_q, &scratch.yq, &scratch.yfp, w)
    }

    /// As [`Self::record`], with the module outputs given: `y_q = X_q·Qᵀ` and `y_fp = X_fp·Wᵀ`
    /// (`tokens × rows`, row-major, without bias), as the streams' forward passes computed them.
    /// Only `Y_w = X_q·Wᵀ` is formed here (into the scratch's own `Y_w`, so `y_q` / `y_fp` may be
    /// the scratch's [`MetricScratch::y_q`] / [`MetricScratch::y_fp`]); this saves two of the
    /// three `2·tokens·rows·cols`-flop GEMMs per module and batch.
    #[allow(clippy::too_many_arguments)]
    pub fn record_outputs(
        &self,
        rec: &mut Recorder<'_>,
        scratch: &MetricScratch,
        b: usize,
        tokens: usize,
        x_q: &GpuBuffer<f32>,
        y_q: &GpuBuffer<f32>,
        y_fp: &GpuBuffer<f32>,
        w: &GpuBuffer<f32>,
    ) -> Result<(), GpuError> {
        let (r, c) = (self.rows, self.cols);
        let n = tokens * r;
        // The reductions take no shapes: a short output buffer would be read out of bounds
        // (clamped by the shader's robust access, i.e. silently wrong).
        for (what, buf) in [("Y_q", y_q), ("Y_fp", y_fp)] {
            if buf.len() < n {
                return Err(GpuError::Validation(format!(
                    "metric {what}: {} elements, expected at least {tokens}×{r}",
                    buf.len()
                )));
            }
        }
        ops::gemm(
            rec,
            tokens,
            r,
            c,
            1.0,
            MatView::new(x_q, c),
            MatView::new(w, c).t(),
            0.0,
            MatView::new(&scratch.yw, r),
        )?;
        let yw = &scratch.yw;
        let slot = |k: usize| (k * self.batches + b) * self.per_sum;
        ops::sq_diff_partials(rec, n, yw, 1.0, y_q, &self.parts, slot(0))?;
        ops::sq_diff_partials(rec, n, y_fp, 1.0, yw, &self.parts, slot(1))?;
        ops::sq_diff_partials(rec, n, y_q, 1.0, y_fp, &self.parts, slot(2))?;
        ops::sq_diff_partials(rec, n, y_fp, 0.0, y_fp, &self.parts, slot(3))?;
        Ok(())
    }

    /// Reads the partial sums back (blocks) and returns (quant, asym, output) relative errors.
    pub fn finish(&self, ctx: &GpuContext) -> Result<(f64, f64, f64), GpuError> {
        let parts = ctx.read(&self.parts)?;
        let span = self.batches * self.per_sum;
        let sum = |k: usize| -> f64 {
            parts[k * span..(k + 1) * span]
                .iter()
                .map(|&v| f64::from(v))
                .sum()
        };
        let norm = sum(3);
        // An all-zero output (e.g. a dead module) has no meaningful relative error.
        if norm <= 0.0 {
            return Ok((0.0, 0.0, 0.0));
        }
        Ok((sum(0) / norm, sum(1) / norm, sum(2) / norm))
    }
}
