//! Step mode of the layer lab: the reference's blocked sweep (algorithm.md §1.2 step 8, §2.2)
//! advanced one column or one block at a time, so the lazy-batch structure becomes visible: a
//! column step quantizes one column and moves only the not-yet-quantized columns of its own block
//! (the rank-1 OBS update, GPTAQ's in-block P term); the block step applies everything the block
//! owes the later columns at once (one GEMM). The steps are `reference::SweepState`'s own, the same code
//! that [`reference::quantize_f64`](crate::quant::reference::quantize_f64) runs, so a stepped solve
//! ends bit for bit where the one-shot solve does (tested below).

use crate::quant::reference::{SweepAction, SweepStart, SweepState};
use crate::quant::{Method, QuantConfig, QuantResult};

use super::heatmap::Heatmap;
use super::{FixedTerms, Lab, LabError, LabMetrics};

/// Widest module the step mode accepts: every snapshot re-reads all rows × cols weights, and the
/// f64 factorisation of H takes minutes beyond this on a CPU.
pub const STEP_MAX_COLS: usize = 4096;
/// Most weights (rows × cols) the step mode accepts (f64 state copies of 128 MiB each).
pub const STEP_MAX_WEIGHTS: usize = 1 << 24;
/// Heatmap grid of the step view: columns get the finer resolution, the sweep moves along them.
const HEAT_ROWS: usize = 48;
const HEAT_COLS: usize = 128;

/// What the user asked the step mode to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepRequest {
    /// Quantize the next column (or, at a block's end, apply its cross-block update).
    NextColumn,
    /// Quantize the rest of the current block and apply its cross-block update.
    NextBlock,
    /// Finish the sweep.
    RunToEnd,
}

/// The kind of the last action of a request (what the explanation is about).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Set up (U, P), nothing quantized yet.
    Start,
    /// A column was quantized and its block's later columns updated.
    Column,
    /// A block's deferred updates were applied to every later column.
    BlockUpdate,
    /// Every column is quantized.
    Done,
}

/// The last column a request quantized.
#[derive(Clone, Debug, PartialEq)]
pub struct ColumnStep {
    /// Processing position.
    pub k: usize,
    /// The input feature (original column) at that position.
    pub original: usize,
    /// Its block `[i1, i2)`.
    pub i1: usize,
    pub i2: usize,
    /// Its proxy loss term `Σ_r (w−q)²/(2·U_kk²) / N`.
    pub proxy_loss: f64,
    /// `‖w − q‖` over the rows.
    pub error_norm: f64,
    /// Frobenius norm of the OBS update it applied to the block's later columns,
    /// `‖e ⊗ U[k, k+1..i2]‖ = ‖e‖·‖U[k, k+1..i2]‖` (`e = (w − q)/U_kk`).
    pub obs_update_norm: f64,
    /// GPTAQ: `‖w ⊗ P[k, k+1..i2]‖` (`w` the pre-quantization column).
    pub gptaq_update_norm: Option<f64>,
}

/// A cross-block update a request applied.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockUpdateStep {
    pub i1: usize,
    pub i2: usize,
    /// `‖Err1·U[i1:i2, i2:]‖` (Frobenius).
    pub obs_update_norm: f64,
    /// GPTAQ: `‖W1·P[i1:i2, i2:]‖`.
    pub gptaq_update_norm: Option<f64>,
}

/// What the step view shows after a request.
#[derive(Clone, Debug)]
pub struct StepSnapshot {
    pub method: Method,
    pub config: QuantConfig,
    pub rows: usize,
    pub cols: usize,
    pub block_size: usize,
    pub stage: Stage,
    /// Columns quantized by this request.
    pub columns_this_step: usize,
    pub last_column: Option<ColumnStep>,
    pub block_update: Option<BlockUpdateStep>,
    pub next: SweepAction,
    /// Columns quantized so far (processing positions `0..done_columns`).
    pub done_columns: usize,
    /// The block the sweep is in (or just finished).
    pub block: (usize, usize),
    /// Proxy loss so far `/ N`.
    pub proxy_loss: f64,
    /// Mean |W| per block of the weights as the sweep holds them (processing order).
    pub heat_now: Heatmap,
    /// Mean |W_now − W_start|: how far the updates (and rounding) moved each weight so far.
    pub heat_moved: Heatmap,
    /// Mean |W_now − W_before|: what this request changed.
    pub heat_step: Heatmap,
    /// The errors of the finished solve (Done only).
    pub final_metrics: Option<LabMetrics>,
}

/// The lab's stepping sweep and what the next snapshot compares against.
pub(super) struct Stepper {
    sweep: Option<Box<SweepState>>,
    method: Method,
    config: QuantConfig,
    start: Vec<f64>,
    previous: Vec<f64>,
    finished: Option<(QuantResult, StepSnapshot)>,
}

fn norm(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

fn heat_diff(a: &[f64], b: &[f64], rows: usize, cols: usize) -> Heatmap {
    Heatmap::block_means(rows, cols, HEAT_ROWS, HEAT_COLS, |i| {
        match (a.get(i), b.get(i)) {
            (Some(x), Some(y)) => (x - y).abs() as f32,
            _ => 0.0,
        }
    })
}

/// The column step's numbers for processing column `k`, read from the sweep right after it (its
/// block's scaled errors stay in the block buffer until the next block's first column).
fn column_step(s: &SweepState, k: usize, nsamples: usize) -> ColumnStep {
    let (rows, n, bs) = (s.rows(), s.cols(), s.block_size());
    let i1 = k / bs * bs;
    let i2 = (i1 + bs).min(n);
    let (err1, _) = s.block_buffers();
    let u = s.u();
    let urow = u.get(k * n + k + 1..k * n + i2).unwrap_or(&[]);
    let e_norm = norm((0..rows).map(|r| err1.get(r * bs + k - i1).copied().unwrap_or(0.0)));
    let (q, pre) = (s.q(), s.recorded().map(|r| r.pre.as_slice()));
    let col = |v: &[f64], r: usize| v.get(r * n + k).copied().unwrap_or(0.0);
    let error_norm = match pre {
        Some(pre) => norm((0..rows).map(|r| col(pre, r) - col(q, r))),
        None => 0.0,
    };
    let gptaq_update_norm = s.p().zip(pre).map(|(p, pre)| {
        let prow = p.get(k * n + k + 1..k * n + i2).unwrap_or(&[]);
        norm((0..rows).map(|r| col(pre, r))) * norm(prow.iter().copied())
    });
    ColumnStep {
        k,
        original: s.perm().and_then(|p| p.get(k).copied()).unwrap_or(k),
        i1,
        i2,
        proxy_loss: s.column_loss().get(k).copied().unwrap_or(0.0) / nsamples.max(1) as f64,
        error_norm,
        obs_update_norm: e_norm * norm(urow.iter().copied()),
        gptaq_update_norm,
    }
}

/// The norms of the pending cross-block update of block `[i1, i2)` (computed before it is applied).
fn block_update_step(s: &SweepState, i1: usize, i2: usize) -> BlockUpdateStep {
    let (rows, n, bs) = (s.rows(), s.cols(), s.block_size());
    let (err1, w1) = s.block_buffers();
    let product_norm = |a: &[f64], m: &[f64]| {
        let mut total = 0.0;
        let mut acc = vec![0.0f64; n - i2];
        for r in 0..rows {
            acc.fill(0.0);
            for t in 0..i2 - i1 {
                let x = a.get(r * bs + t).copied().unwrap_or(0.0);
                let row = m.get((i1 + t) * n + i2..(i1 + t + 1) * n).unwrap_or(&[]);
                for (y, &v) in acc.iter_mut().zip(row) {
                    *y += x * v;
                }
            }
            total += acc.iter().map(|v| v * v).sum::<f64>();
        }
        total.sqrt()
    };
    BlockUpdateStep {
        i1,
        i2,
        obs_update_norm: product_norm(err1, s.u()),
        gptaq_update_norm: s.p().map(|p| product_norm(w1, p)),
    }
}

impl Lab {
    /// Starts (or restarts) the step mode with `cfg` (method included). Refused for modules beyond
    /// [`STEP_MAX_COLS`] / [`STEP_MAX_WEIGHTS`] and when the solve has no sweep (RTN, or a Hessian
    /// that cannot be factored).
    pub fn step_start(&mut self, cfg: &QuantConfig) -> Result<StepSnapshot, LabError> {
        let (rows, cols) = (self.capture.rows, self.capture.cols);
        if cols > STEP_MAX_COLS || rows.saturating_mul(cols) > STEP_MAX_WEIGHTS {
            return Err(LabError::StepTooLarge { rows, cols });
        }
        self.stepper = None;
        let sweep = match self.start(cfg, true)? {
            SweepStart::Sweep(s) => s,
            SweepStart::Finished(r) => {
                let why = match (&r.fallback, cfg.method) {
                    (Some(crate::quant::Fallback::Rtn { reason }), _) => {
                        format!("the solve fell back to RTN ({reason})")
                    }
                    (_, Method::Rtn) => "RTN has no sweep".to_string(),
                    _ => "the module is empty".to_string(),
                };
                return Err(LabError::NoSweep(why));
            }
        };
        let start = sweep
            .recorded()
            .map(|r| r.start.clone())
            .unwrap_or_default();
        let mut st = Stepper {
            method: cfg.method,
            config: cfg.clone(),
            previous: start.clone(),
            start,
            sweep: Some(sweep),
            finished: None,
        };
        let snap = self.snapshot(&mut st, Stage::Start, 0, None, None)?;
        self.stepper = Some(st);
        Ok(snap)
    }

    /// Advances the step mode (see [`StepRequest`]). After the last column the sweep's result is
    /// final ([`Lab::step_result`]) and further requests repeat the final snapshot.
    pub fn step(&mut self, req: StepRequest) -> Result<StepSnapshot, LabError> {
        let mut st = self.stepper.take().ok_or(LabError::NoStepper)?;
        let out = self.advance(&mut st, req);
        self.stepper = Some(st);
        out
    }

    /// The finished step-mode solve (the same as [`Lab::solve`] of its settings).
    pub fn step_result(&self) -> Option<&QuantResult> {
        self.stepper
            .as_ref()
            .and_then(|s| s.finished.as_ref())
            .map(|(r, _)| r)
    }

    fn advance(&mut self, st: &mut Stepper, req: StepRequest) -> Result<StepSnapshot, LabError> {
        if let Some((_, snap)) = &st.finished {
            return Ok(snap.clone());
        }
        let Some(s) = st.sweep.as_mut() else {
            return Err(LabError::NoStepper);
        };
        let mut columns = 0;
        let mut last_k = None;
        let mut update = None;
        let mut stage = Stage::Start;
        loop {
            let action = s.next_action();
            match action {
                SweepAction::Column { k, .. } => {
                    s.step();
                    columns += 1;
                    last_k = Some(k);
                    stage = Stage::Column;
                }
                SweepAction::BlockUpdate { i1, i2 } => {
                    update = Some(block_update_step(s, i1, i2));
                    s.step();
                    stage = Stage::BlockUpdate;
                }
                SweepAction::Done => break,
            }
            let stop = match req {
                StepRequest::NextColumn => true,
                // A block ends with its update, or with the last column of the last block.
                StepRequest::NextBlock => {
                    matches!(action, SweepAction::BlockUpdate { .. })
                        || s.next_action() == SweepAction::Done
                }
                StepRequest::RunToEnd => false,
            };
            if stop {
                break;
            }
        }
        let nsamples = self.capture.nsamples;
        let last_column = last_k.map(|k| column_step(s, k, nsamples));
        if s.next_action() == SweepAction::Done {
            stage = Stage::Done;
        }
        self.snapshot(st, stage, columns, last_column, update)
    }

    /// The snapshot of the stepper's state; at the end it also takes the sweep's result.
    fn snapshot(
        &mut self,
        st: &mut Stepper,
        stage: Stage,
        columns: usize,
        last_column: Option<ColumnStep>,
        block_update: Option<BlockUpdateStep>,
    ) -> Result<StepSnapshot, LabError> {
        let Some(s) = st.sweep.as_ref() else {
            return Err(LabError::NoStepper);
        };
        let (rows, n) = (s.rows(), s.cols());
        let now = s.current_weights();
        let next = s.next_action();
        let (done_columns, block) = match next {
            SweepAction::Column { k, i1, i2 } => (k, (i1, i2)),
            SweepAction::BlockUpdate { i1, i2 } => (i2, (i1, i2)),
            SweepAction::Done => {
                let bs = s.block_size();
                (n, (n.saturating_sub(1) / bs * bs, n))
            }
        };
        let mut snap = StepSnapshot {
            method: st.method,
            config: st.config.clone(),
            rows,
            cols: n,
            block_size: s.block_size(),
            stage,
            columns_this_step: columns,
            last_column,
            block_update,
            next,
            done_columns,
            block,
            proxy_loss: s.proxy_loss_sum() / self.capture.nsamples.max(1) as f64,
            heat_now: Heatmap::mean_abs(&now, rows, n, HEAT_ROWS, HEAT_COLS),
            heat_moved: heat_diff(&now, &st.start, rows, n),
            heat_step: heat_diff(&now, &st.previous, rows, n),
            final_metrics: None,
        };
        st.previous = now;
        if stage == Stage::Done
            && let Some(sweep) = st.sweep.take()
        {
            let result = sweep.into_result(&self.w, &self.h)?;
            let fixed = self
                .fixed
                .get_or_insert_with(|| FixedTerms::new(&self.capture, &self.w));
            let (m, _, _) = fixed.metrics(&self.capture, &self.w, &result.q, result.proxy_loss_sum);
            snap.final_metrics = Some(m);
            let mut repeat = snap.clone();
            repeat.columns_this_step = 0;
            repeat.last_column = None;
            repeat.block_update = None;
            repeat.heat_step = Heatmap::block_means(rows, n, HEAT_ROWS, HEAT_COLS, |_| 0.0);
            st.finished = Some((result, repeat));
        }
        Ok(snap)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::model::ModuleKind;
    use crate::pipeline::CapturedModule;
    use crate::quant::reference;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// A capture from random activations: `H = 2/N·X_qᵀX_q`, `D = 2/N·ΔXᵀX_q`, `E = 2/N·ΔXᵀΔX`,
    /// with input feature `dead` never active (a dead column).
    pub(crate) fn capture(rows: usize, cols: usize, seed: u64, dead: usize) -> CapturedModule {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let t = 4 * cols;
        let mut xq = vec![0.0f64; t * cols];
        let mut xf = vec![0.0f64; t * cols];
        for k in 0..t {
            for j in 0..cols {
                if j == dead {
                    continue;
                }
                // Feature scales differ, so act-order has something to sort.
                let scale = 1.0 + (j % 7) as f64;
                let x = rng.random_range(-1.0..1.0) * scale;
                xq[k * cols + j] = x;
                xf[k * cols + j] = x + 0.1 * rng.random_range(-1.0..1.0) * scale;
            }
        }
        let nseq = 4.0;
        let gram = |a: &[f64], b: &[f64]| {
            let mut g = vec![0.0f32; cols * cols];
            for i in 0..cols {
                for j in 0..cols {
                    let s: f64 = (0..t).map(|k| a[k * cols + i] * b[k * cols + j]).sum();
                    g[i * cols + j] = (2.0 / nseq * s) as f32;
                }
            }
            g
        };
        let dx: Vec<f64> = xf.iter().zip(&xq).map(|(a, b)| a - b).collect();
        CapturedModule {
            layer: 1,
            module: ModuleKind::Down,
            rows,
            cols,
            nsamples: 4,
            w: (0..rows * cols)
                .map(|_| rng.random_range(-0.2f32..0.2))
                .collect(),
            h: gram(&xq, &xq),
            d: gram(&dx, &xq),
            e: gram(&dx, &dx),
        }
    }

    fn configs() -> Vec<QuantConfig> {
        let base = QuantConfig {
            bits: 3,
            block_size: 16,
            ..QuantConfig::default()
        };
        vec![
            QuantConfig {
                method: Method::Gptq,
                group_size: Some(8),
                ..base.clone()
            },
            QuantConfig {
                method: Method::Gptaq { alpha: 0.25 },
                group_size: Some(8),
                act_order: true,
                ..base.clone()
            },
            QuantConfig {
                method: Method::Gptaq { alpha: 1.0 },
                group_size: None,
                block_size: 7,
                ..base.clone()
            },
            QuantConfig {
                method: Method::Gptaq { alpha: 0.5 },
                group_size: Some(10),
                act_order: true,
                static_groups: true,
                sym: false,
                ..base
            },
        ]
    }

    /// Stepping a whole solve (columns, blocks, and the rest at once, in a pattern that crosses
    /// block boundaries mid-way) ends exactly where `quantize_f64` does, bit for bit.
    #[test]
    fn stepped_solve_equals_the_reference_bit_for_bit() -> TestResult {
        let cap = capture(9, 45, 7, 13);
        let mut lab = Lab::new(cap.clone());
        for (ci, cfg) in configs().iter().enumerate() {
            let want = reference::quantize_reference(&cap.w, 9, 45, &cap.h, Some(&cap.d), cfg)?;
            assert!(want.fallback.is_none(), "config {ci}: {:?}", want.fallback);
            let first = lab.step_start(cfg)?;
            assert_eq!((first.stage, first.done_columns), (Stage::Start, 0));
            let pattern = [
                StepRequest::NextColumn,
                StepRequest::NextColumn,
                StepRequest::NextBlock,
                StepRequest::NextColumn,
                StepRequest::NextBlock,
                StepRequest::NextBlock,
            ];
            let mut last = first;
            for req in pattern.iter().cycle().take(400) {
                last = lab.step(*req)?;
                if last.stage == Stage::Done {
                    break;
                }
            }
            assert_eq!(last.stage, Stage::Done, "config {ci}");
            assert!(last.final_metrics.is_some());
            let got = lab.step_result().ok_or("no result after Done")?;
            crate::quant::assert_same_result(got, &want, &format!("config {ci} stepped"));
            // The lab's cached one-shot solve is the same too.
            let solved = lab.solve(cfg)?;
            crate::quant::assert_same_result(
                &solved.result,
                &want,
                &format!("config {ci} cached solve"),
            );
        }
        Ok(())
    }

    #[test]
    fn steps_show_the_lazy_batch_structure() -> TestResult {
        let cap = capture(6, 40, 3, 99);
        let mut lab = Lab::new(cap);
        let cfg = QuantConfig {
            method: Method::Gptaq { alpha: 0.25 },
            bits: 3,
            group_size: None,
            block_size: 16,
            ..QuantConfig::default()
        };
        lab.step_start(&cfg)?;
        // Column 0: only the block's later columns (1..16) move; later blocks wait.
        let s = lab.step(StepRequest::NextColumn)?;
        assert_eq!(
            (s.stage, s.done_columns, s.block),
            (Stage::Column, 1, (0, 16))
        );
        let c = s.last_column.clone().ok_or("no column step")?;
        assert_eq!((c.k, c.i1, c.i2), (0, 0, 16));
        assert!(c.obs_update_norm > 0.0 && c.gptaq_update_norm.is_some_and(|g| g > 0.0));
        // 40 columns fit one cell each: cells beyond the block are untouched by the step.
        assert_eq!(s.heat_step.cols, 40);
        for r in 0..s.heat_step.rows {
            for col in 16..40 {
                assert_eq!(s.heat_step.values[r * 40 + col], 0.0, "cell ({r}, {col})");
            }
        }
        assert!(s.heat_step.values.iter().take(16).any(|v| *v > 0.0));
        // Next block: the rest of block 0, then one update of all columns 16..40.
        let b = lab.step(StepRequest::NextBlock)?;
        assert_eq!(
            (b.stage, b.columns_this_step, b.done_columns),
            (Stage::BlockUpdate, 15, 16)
        );
        let u = b.block_update.clone().ok_or("no block update")?;
        assert_eq!((u.i1, u.i2), (0, 16));
        assert!(u.obs_update_norm > 0.0 && u.gptaq_update_norm.is_some_and(|g| g > 0.0));
        assert!(b.heat_step.values[16..40].iter().any(|v| *v > 0.0));
        // At a block's end "next column" is the cross-block update on its own.
        for _ in 0..16 {
            lab.step(StepRequest::NextColumn)?;
        }
        let g = lab.step(StepRequest::NextColumn)?;
        assert_eq!((g.stage, g.columns_this_step), (Stage::BlockUpdate, 0));
        let end = lab.step(StepRequest::RunToEnd)?;
        assert_eq!((end.stage, end.done_columns), (Stage::Done, 40));
        let again = lab.step(StepRequest::NextColumn)?;
        assert_eq!((again.stage, again.columns_this_step), (Stage::Done, 0));
        assert_eq!(again.final_metrics, end.final_metrics);
        Ok(())
    }

    #[test]
    fn step_mode_refuses_rtn_and_needs_a_start() {
        let mut lab = Lab::new(capture(4, 8, 1, 99));
        assert!(matches!(
            lab.step(StepRequest::NextColumn),
            Err(LabError::NoStepper)
        ));
        let rtn = QuantConfig {
            method: Method::Rtn,
            ..QuantConfig::default()
        };
        assert!(matches!(lab.step_start(&rtn), Err(LabError::NoSweep(_))));
    }
}
