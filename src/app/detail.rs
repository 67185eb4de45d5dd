//! The module detail pictures, computed on the worker from the original weights and the solver's
//! result it keeps: downsampled |W| and |W-Q| heatmaps, the weights' histogram on the quantization
//! grid, the per-column error along the processing order, diag(H) (sorted: the spectrum; and along
//! the processing order) and GPTQ's per-column proxy loss along the processing order.

use crate::lab::heatmap::Heatmap;
use crate::pipeline::Solver;
use crate::quant::{Fallback, Method, QuantResult};

use super::state::{ModuleDetail, RunSlot};

/// Largest heatmap side (cells).
const HEAT_MAX: usize = 64;
const HIST_BINS_PER_STEP: usize = 8;
const HIST_MAX_BINS: usize = 256;

/// Why a detail could not be computed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DetailError {
    #[error("weights have {got} elements but the quantized module is {rows}×{cols}")]
    Shape {
        rows: usize,
        cols: usize,
        got: usize,
    },
}

/// How the module was solved: what the pictures need besides the weights, and what explains a
/// missing picture.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SolveInfo {
    pub method: Method,
    pub solver: Solver,
    pub maxq: u32,
    pub act_order: bool,
    /// Calibration sequences (the proxy loss is reported per sequence).
    pub nsamples: usize,
}

/// Why `column_loss` is empty (ASCII: shown in the GUI).
fn column_loss_missing(q: &QuantResult, info: &SolveInfo) -> String {
    match (&q.fallback, info.method, info.solver) {
        (_, Method::Rtn, _) => {
            "RTN rounds every weight on its own: there is no per-column proxy loss.".into()
        }
        (Some(Fallback::Rtn { reason }), _, _) => {
            format!("This module fell back to RTN ({reason}): there is no per-column proxy loss.")
        }
        _ => "The solver did not record a per-column proxy loss.".into(),
    }
}

/// Why `h_diag` is empty (ASCII).
fn h_diag_missing(q: &QuantResult, info: &SolveInfo) -> String {
    match (&q.fallback, info.method) {
        (_, Method::Rtn) => "RTN runs without calibration statistics: there is no Hessian.".into(),
        (Some(Fallback::Rtn { .. }), _) => {
            "This module fell back to RTN on the GPU solver, which does not report diag(H) then."
                .into()
        }
        _ => "The solver did not report diag(H).".into(),
    }
}

/// Computes the detail pictures of one module. `w` is the original `[rows, cols]` weight.
pub fn module_detail(
    slot: RunSlot,
    layer: usize,
    module: &str,
    w: &[f32],
    q: &QuantResult,
    info: &SolveInfo,
) -> Result<ModuleDetail, DetailError> {
    let (rows, cols) = (q.rows, q.cols);
    // The pipeline keeps only the codes on the host: Q rebuilt from them (exactly).
    let qw = q.weights();
    if w.len() != rows * cols || qw.len() != rows * cols {
        return Err(DetailError::Shape {
            rows,
            cols,
            got: w.len().min(qw.len()),
        });
    }
    let at = |v: &[f32], i: usize| v.get(i).copied().unwrap_or(0.0);
    let weight_heat = Heatmap::block_means(rows, cols, HEAT_MAX, HEAT_MAX, |i| at(w, i).abs());
    let error_heat = Heatmap::block_means(rows, cols, HEAT_MAX, HEAT_MAX, |i| {
        (at(w, i) - at(&qw, i)).abs()
    });

    // Positions on the grid: w/scale + zero, per the group of each column.
    let maxq = info.maxq.max(1);
    let hist_lo = -1.0;
    let hist_hi = f64::from(maxq) + 1.0;
    let bins = ((maxq as usize + 2) * HIST_BINS_PER_STEP).min(HIST_MAX_BINS);
    let mut hist = vec![0u32; bins];
    for r in 0..rows {
        for c in 0..cols {
            let g = q.g_idx.get(c).copied().unwrap_or(0) as usize;
            let (Some(&s), Some(&z)) = (q.scales.get(g * rows + r), q.zeros.get(g * rows + r))
            else {
                continue;
            };
            if s == 0.0 || !s.is_finite() {
                continue;
            }
            let t = f64::from(at(w, r * cols + c) / s) + f64::from(z);
            let b = ((t - hist_lo) / (hist_hi - hist_lo) * bins as f64).floor();
            let b = b.clamp(0.0, (bins - 1) as f64) as usize;
            if let Some(h) = hist.get_mut(b) {
                *h += 1;
            }
        }
    }

    let order: Vec<usize> = q.perm.clone().unwrap_or_else(|| (0..cols).collect());
    let column_error = order
        .iter()
        .map(|&c| {
            let (mut e, mut n) = (0f64, 0f64);
            for r in 0..rows {
                let wv = f64::from(at(w, r * cols + c));
                let d = wv - f64::from(at(&qw, r * cols + c));
                e += d * d;
                n += wv * wv;
            }
            if n > 0.0 { (e / n) as f32 } else { 0.0 }
        })
        .collect();

    let h_diag = if q.h_diag.is_empty() {
        Err(h_diag_missing(q, info))
    } else {
        Ok(q.h_diag.clone())
    };
    let h_spectrum = h_diag.as_ref().map_or_else(
        |_| Vec::new(),
        |d| {
            let mut s = d.clone();
            s.sort_by(|a, b| b.total_cmp(a));
            s
        },
    );
    let per_n = 1.0 / info.nsamples.max(1) as f64;
    let column_loss = if q.column_loss.is_empty() {
        Err(column_loss_missing(q, info))
    } else {
        Ok(q.column_loss.iter().map(|l| l * per_n).collect())
    };

    Ok(ModuleDetail {
        slot,
        layer,
        module: module.to_string(),
        weight_heat,
        error_heat,
        hist,
        hist_lo,
        hist_hi,
        maxq,
        column_error,
        act_order: info.act_order,
        h_diag,
        h_spectrum,
        column_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(rows: usize, cols: usize) -> (Vec<f32>, QuantResult) {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i % 7) as f32 - 3.0) * 0.1 + 0.01)
            .collect();
        // 4-bit symmetric, scale 0.1, zero 8, one group
        let codes: Vec<u8> = w
            .iter()
            .map(|x| ((x / 0.1).round() + 8.0).clamp(0.0, 15.0) as u8)
            .collect();
        let q = codes.iter().map(|c| (f32::from(*c) - 8.0) * 0.1).collect();
        (
            w,
            QuantResult {
                rows,
                cols,
                q,
                codes,
                scales: vec![0.1; rows],
                zeros: vec![8; rows],
                g_idx: vec![0; cols],
                perm: None,
                proxy_loss_sum: 0.0,
                column_loss: Vec::new(),
                h_diag: Vec::new(),
                damp: 0.0,
                damp_percent: 0.01,
                fallback: None,
            },
        )
    }

    fn info(solver: Solver) -> SolveInfo {
        SolveInfo {
            method: Method::Gptq,
            solver,
            maxq: 15,
            act_order: false,
            nsamples: 4,
        }
    }

    #[test]
    fn detail_shapes_and_histogram() -> Result<(), Box<dyn std::error::Error>> {
        let (w, q) = result(200, 100);
        let d = module_detail(RunSlot::Single, 3, "q_proj", &w, &q, &info(Solver::Gpu))?;
        assert_eq!((d.weight_heat.rows, d.weight_heat.cols), (64, 64));
        assert_eq!(d.weight_heat.values.len(), 64 * 64);
        assert_eq!(d.hist.iter().map(|x| *x as usize).sum::<usize>(), 200 * 100);
        assert_eq!(d.maxq, 15);
        assert_eq!(d.column_error.len(), 100);
        assert!(d.error_heat.values.iter().all(|e| *e < 0.02));
        // This hand-made result records neither series: the reasons say so.
        assert!(matches!(&d.column_loss, Err(m) if m.contains("did not record")));
        assert!(d.h_diag.is_err() && d.h_spectrum.is_empty());
        let small = module_detail(RunSlot::Single, 0, "k", &w[..10], &q, &info(Solver::Gpu));
        assert!(small.is_err());
        Ok(())
    }

    #[test]
    fn spectrum_and_column_loss_from_the_result() -> Result<(), Box<dyn std::error::Error>> {
        let (w, mut q) = result(4, 3);
        q.h_diag = vec![2.0, 8.0, 1.0];
        q.column_loss = vec![4.0, 2.0, 0.0];
        let d = module_detail(
            RunSlot::Single,
            0,
            "o_proj",
            &w,
            &q,
            &info(Solver::CpuReference),
        )?;
        assert_eq!(d.h_diag, Ok(vec![2.0, 8.0, 1.0]));
        assert_eq!(d.h_spectrum, vec![8.0, 2.0, 1.0]);
        // Per calibration sequence, like the table's proxy loss.
        assert_eq!(d.column_loss, Ok(vec![1.0, 0.5, 0.0]));
        Ok(())
    }
}
