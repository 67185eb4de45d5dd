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
//!
//! **From the statistics** ([`Moments`]): where the group has `H = 2/N·X_qᵀX_q` and
//! `D = 2/N·(X_fp − X_q)ᵀX_q` (GPTAQ's own; GPTQ accumulates one for its metrics where that costs
//! fewer flops than the products, plan::metric_d_pays), `Y_w` is not formed at all. With `ΔW = W − Q`,
//! `A = Y_q − Y_w = −X_q·ΔWᵀ` and `B = Y_w − Y_fp = −(X_fp − X_q)·Wᵀ`:
//! - quantization `‖A‖² = N/2·tr(ΔW H ΔWᵀ)`,
//! - the cross term `⟨A, B⟩ = N/2·tr(ΔW Dᵀ Wᵀ) = N/2·⟨ΔW, W·D⟩`,
//! - output `‖A + B‖² = ‖Y_q − Y_fp‖²` (from the forward outputs, as before), so
//! - asymmetry `‖B‖² = ‖Y_q − Y_fp‖² − ‖A‖² − 2⟨A, B⟩` (the layer lab's identity, lab/mod.rs).
//!
//! That costs two `[rows, n]·[n, n]` GEMMs per module once, instead of a `[tokens, n]·[n, rows]`
//! GEMM per batch: on a Llama-3-8B layer with 128 × 2048 tokens, ≈ 6 instead of ≈ 114 TFLOP. The
//! asymmetry is then a difference, so its absolute round-off is that of the output and
//! quantization terms (≈ 1e-6 of them in f32, against ≈ 1e-7 for the products); where the two
//! streams' inputs are bit for bit equal (the first layer's q/k/v) it is exactly 0 and the
//! quantization error is the output error, as with the products.

use crate::gpu::ops::{self, MatView};
use crate::gpu::{GpuBuffer, GpuContext, GpuError, GpuMatrix, Recorder};

/// One module's error terms from the group statistics, in the token-sum units of the partial sums
/// (`‖A‖²` and `⟨A, B⟩` of the module docs).
#[derive(Clone, Copy, Debug)]
pub struct Moments {
    /// `‖(W − Q)·X_qᵀ‖² = N/2·tr(ΔW H ΔWᵀ)`.
    pub quant: f64,
    /// `⟨(Q − W)·X_qᵀ, W·(X_q − X_fp)ᵀ⟩ = N/2·⟨ΔW, W·D⟩`.
    pub cross: f64,
    /// The two streams' inputs of the group were bit for bit equal on every token.
    pub same_inputs: bool,
}

/// Floats of each per-chunk temporary of [`moments`] (16 MiB): bounds the rows per chunk.
pub(crate) const MOMENT_CHUNK_FLOATS: usize = 4 << 20;

/// [`Moments`] of the module with FP weights `w` and quantized weights `q` (`[rows, n]`, original
/// column order, on the GPU) from its group's `h` and `d` (`n × n`, any panel layout), which were
/// accumulated with `2/nsamples`. Row chunks of at most `MOMENT_CHUNK_FLOATS` keep the
/// temporaries small (three chunk buffers and the partials) next to the statistics; the partial
/// column sums come back once and are added in f64.
#[allow(clippy::too_many_arguments)]
pub fn moments(
    ctx: &GpuContext,
    w: &GpuBuffer<f32>,
    q: &GpuBuffer<f32>,
    rows: usize,
    n: usize,
    h: &GpuMatrix,
    d: &GpuMatrix,
    nsamples: usize,
    same_inputs: bool,
) -> Result<Moments, GpuError> {
    let n_el = rows * n;
    for (what, buf) in [("W", w), ("Q", q)] {
        if buf.len() < n_el {
            return Err(GpuError::Validation(format!(
                "metric moments: {what} has {} elements, expected {rows}×{n}",
                buf.len()
            )));
        }
    }
    for (what, m) in [("H", h), ("D", d)] {
        if m.rows() != n || m.cols() != n {
            return Err(GpuError::Validation(format!(
                "metric moments: {what} is {}×{}, expected {n}×{n}",
                m.rows(),
                m.cols()
            )));
        }
    }
    if n_el == 0 {
        return Ok(Moments {
            quant: 0.0,
            cross: 0.0,
            same_inputs,
        });
    }
    let rc = (MOMENT_CHUNK_FLOATS / n).clamp(1, rows);
    let chunks: Vec<(usize, usize)> = (0..rows)
        .step_by(rc)
        .map(|r0| (r0, rc.min(rows - r0)))
        .collect();
    let len = ops::col_dot_partials_len(rc, n);
    let dw = ctx.zeros::<f32>("metric ΔW rows", rc * n)?;
    let qc = ctx.zeros::<f32>("metric Q rows", rc * n)?;
    let g = ctx.zeros::<f32>("metric ΔW·H rows", rc * n)?;
    let parts = ctx.zeros::<f32>("metric moment partials", 2 * chunks.len() * len)?;
    let mut rec = ctx.recorder();
    for (c, &(r0, r)) in chunks.iter().enumerate() {
        let m_el = r * n;
        // ΔW rows = W rows − Q rows, through `g` (a dispatch may not read and write one buffer).
        rec.copy(w, r0 * n, &g, 0, m_el);
        rec.copy(q, r0 * n, &qc, 0, m_el);
        ops::axpby(&mut rec, m_el, 1.0, &g, -1.0, &qc, &dw)?;
        ops::gemm_mat(
            &mut rec,
            r,
            n,
            n,
            1.0,
            MatView::new(&dw, n).into(),
            h.op(0, 0),
            0.0,
            MatView::new(&g, n).into(),
        )?;
        ops::col_dot_partials(&mut rec, r, n, &dw, &g, &parts, 2 * c * len)?;
        // W·D reuses the product buffer once ΔW·H's partials are recorded.
        ops::gemm_mat(
            &mut rec,
            r,
            n,
            n,
            1.0,
            MatView::new(w, n).at(r0 * n).into(),
            d.op(0, 0),
            0.0,
            MatView::new(&g, n).into(),
        )?;
        ops::col_dot_partials(&mut rec, r, n, &dw, &g, &parts, (2 * c + 1) * len)?;
    }
    rec.submit();
    let p = ctx.read(&parts)?;
    let (mut quant, mut cross) = (0.0f64, 0.0f64);
    for (c, &(_, r)) in chunks.iter().enumerate() {
        let sum = |k: usize| -> f64 {
            let s = (2 * c + k) * len;
            ops::col_dot_sums(p.get(s..s + len).unwrap_or(&[]), r, n)
                .iter()
                .sum()
        };
        quant += sum(0);
        cross += sum(1);
    }
    // Back from the 2/N-scaled statistics to sums over the tokens.
    let half_n = nsamples as f64 / 2.0;
    Ok(Moments {
        quant: half_n * quant,
        cross: half_n * cross,
        same_inputs,
    })
}

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
            // Products written before they are read: no clear for pooled ones.
            yq: ctx.scratch("metric Y_q", n)?,
            yfp: ctx.scratch("metric Y_fp", n)?,
            yw: ctx.scratch("metric Y_w", n)?,
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
    /// The quantization and cross terms come from the statistics ([`Moments`]): only the output
    /// and normaliser sums are recorded, and no `Y_w` is formed.
    from_moments: bool,
}

impl MetricAccumulator {
    pub fn new(
        ctx: &GpuContext,
        batches: usize,
        max_tokens: usize,
        rows: usize,
        cols: usize,
        from_moments: bool,
    ) -> Result<Self, GpuError> {
        let per_sum = ops::sq_partials_len(max_tokens * rows);
        Ok(Self {
            parts: ctx.zeros("metric partials", 4 * batches * per_sum)?,
            per_sum,
            batches,
            rows,
            cols,
            from_moments,
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
    /// three `2·tokens·rows·cols`-flop GEMMs per module and batch. From moments, not even that:
    /// only `‖Y_q − Y_fp‖²` and `‖Y_fp‖²` are recorded.
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
        let slot = |k: usize| (k * self.batches + b) * self.per_sum;
        if !self.from_moments {
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
            ops::sq_diff_partials(rec, n, yw, 1.0, y_q, &self.parts, slot(0))?;
            ops::sq_diff_partials(rec, n, y_fp, 1.0, yw, &self.parts, slot(1))?;
        }
        ops::sq_diff_partials(rec, n, y_q, 1.0, y_fp, &self.parts, slot(2))?;
        ops::sq_diff_partials(rec, n, y_fp, 0.0, y_fp, &self.parts, slot(3))?;
        Ok(())
    }

    /// Whether this accumulator records only the output and normaliser sums ([`Moments`]).
    pub fn from_moments(&self) -> bool {
        self.from_moments
    }

    /// Reads the partial sums back (blocks) and returns (quant, asym, output) relative errors;
    /// `moments` must be given exactly when the accumulator was made `from_moments`.
    pub fn finish(
        &self,
        ctx: &GpuContext,
        moments: Option<&Moments>,
    ) -> Result<(f64, f64, f64), GpuError> {
        let parts = ctx.read(&self.parts)?;
        let span = self.batches * self.per_sum;
        let sum = |k: usize| -> f64 {
            parts[k * span..(k + 1) * span]
                .iter()
                .map(|&v| f64::from(v))
                .sum()
        };
        let norm = sum(3);
        let output = sum(2);
        let (quant, asym) = match (self.from_moments, moments) {
            (false, None) => (sum(0), sum(1)),
            (true, Some(m)) => combine(m, output),
            (true, None) | (false, Some(_)) => {
                return Err(GpuError::Validation(format!(
                    "metrics of a {}×{} module: moments {} but the accumulator {} them",
                    self.rows,
                    self.cols,
                    if moments.is_some() {
                        "given"
                    } else {
                        "missing"
                    },
                    if self.from_moments {
                        "expects"
                    } else {
                        "does not take"
                    },
                )));
            }
        };
        // An all-zero output (e.g. a dead module) has no meaningful relative error.
        if norm <= 0.0 {
            return Ok((0.0, 0.0, 0.0));
        }
        Ok((quant / norm, asym / norm, output / norm))
    }
}

/// (quantization, asymmetry) sums from the moments and the measured output sum (module docs):
/// `‖B‖² = ‖A + B‖² − ‖A‖² − 2⟨A, B⟩`, clamped at 0 (a difference can go below by round-off).
/// With bit-for-bit equal inputs `B = 0`: asymmetry 0 and quantization = output exactly.
pub fn combine(m: &Moments, output: f64) -> (f64, f64) {
    if m.same_inputs {
        return (output, 0.0);
    }
    (m.quant, (output - m.quant - 2.0 * m.cross).max(0.0))
}
