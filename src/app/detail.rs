//! The module detail pictures, computed on the worker from the original weights and the solver's
//! result it keeps: downsampled |W| and |W-Q| heatmaps, the weights' histogram on the quantization
//! grid, and the per-column error along the processing order.

use crate::quant::QuantResult;

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

/// Mean of `f(i)` over blocks of a `rows × cols` matrix reduced to at most `HEAT_MAX` per side.
fn block_means(rows: usize, cols: usize, f: impl Fn(usize) -> f32) -> (usize, usize, Vec<f32>) {
    let hr = rows.clamp(1, HEAT_MAX);
    let hc = cols.clamp(1, HEAT_MAX);
    let mut sum = vec![0f64; hr * hc];
    let mut cnt = vec![0u32; hr * hc];
    for r in 0..rows {
        let br = r * hr / rows.max(1);
        for c in 0..cols {
            let bc = c * hc / cols.max(1);
            let k = br * hc + bc;
            if let (Some(s), Some(n)) = (sum.get_mut(k), cnt.get_mut(k)) {
                *s += f64::from(f(r * cols + c));
                *n += 1;
            }
        }
    }
    let out = sum
        .iter()
        .zip(&cnt)
        .map(|(s, n)| {
            if *n == 0 {
                0.0
            } else {
                (*s / f64::from(*n)) as f32
            }
        })
        .collect();
    (hr, hc, out)
}

/// Computes the detail pictures of one module. `w` is the original `[rows, cols]` weight.
pub fn module_detail(
    slot: RunSlot,
    layer: usize,
    module: &str,
    w: &[f32],
    q: &QuantResult,
    maxq: u32,
    act_order: bool,
) -> Result<ModuleDetail, DetailError> {
    let (rows, cols) = (q.rows, q.cols);
    if w.len() != rows * cols || q.q.len() != rows * cols {
        return Err(DetailError::Shape {
            rows,
            cols,
            got: w.len().min(q.q.len()),
        });
    }
    let at = |v: &[f32], i: usize| v.get(i).copied().unwrap_or(0.0);
    let (heat_rows, heat_cols, weight_heat) = block_means(rows, cols, |i| at(w, i).abs());
    let (_, _, error_heat) = block_means(rows, cols, |i| (at(w, i) - at(&q.q, i)).abs());

    // Positions on the grid: w/scale + zero, per the group of each column.
    let maxq = maxq.max(1);
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
                let d = wv - f64::from(at(&q.q, r * cols + c));
                e += d * d;
                n += wv * wv;
            }
            if n > 0.0 { (e / n) as f32 } else { 0.0 }
        })
        .collect();

    Ok(ModuleDetail {
        slot,
        layer,
        module: module.to_string(),
        heat_rows,
        heat_cols,
        weight_heat,
        error_heat,
        hist,
        hist_lo,
        hist_hi,
        maxq,
        column_error,
        act_order,
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
                damp: 0.0,
                damp_percent: 0.01,
                fallback: None,
            },
        )
    }

    #[test]
    fn detail_shapes_and_histogram() -> Result<(), Box<dyn std::error::Error>> {
        let (w, q) = result(200, 100);
        let d = module_detail(RunSlot::Single, 3, "q_proj", &w, &q, 15, false)?;
        assert_eq!((d.heat_rows, d.heat_cols), (64, 64));
        assert_eq!(d.weight_heat.len(), 64 * 64);
        assert_eq!(d.hist.iter().map(|x| *x as usize).sum::<usize>(), 200 * 100);
        assert_eq!(d.maxq, 15);
        assert_eq!(d.column_error.len(), 100);
        assert!(d.error_heat.iter().all(|e| *e < 0.02));
        let small = module_detail(RunSlot::Single, 0, "k", &w[..10], &q, 15, false);
        assert!(small.is_err());
        Ok(())
    }
}
