//! Downsampled pictures of a matrix: the mean of a per-element value over rectangular blocks, so a
//! 14336 × 4096 weight fits a few hundred screen pixels. Shared by the module detail pictures
//! (`app::detail`) and the layer lab; drawing is the GUI's business.

/// A `rows × cols` grid of block means summarising a `src_rows × src_cols` matrix. Cell `(a, b)`
/// covers the matrix rows `r` with `r·rows/src_rows == a` and columns `c` with `c·cols/src_cols ==
/// b`, so a matrix no larger than the grid maps one element per cell.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Heatmap {
    pub rows: usize,
    pub cols: usize,
    /// Row-major `[rows, cols]` means.
    pub values: Vec<f32>,
    pub src_rows: usize,
    pub src_cols: usize,
}

impl Heatmap {
    /// Mean of `f(i)` (`i = r·src_cols + c`, the row-major index) over blocks of a `src_rows ×
    /// src_cols` matrix reduced to at most `max_rows × max_cols` cells (at least 1 × 1).
    pub fn block_means(
        src_rows: usize,
        src_cols: usize,
        max_rows: usize,
        max_cols: usize,
        f: impl Fn(usize) -> f32,
    ) -> Self {
        let rows = src_rows.clamp(1, max_rows.max(1));
        let cols = src_cols.clamp(1, max_cols.max(1));
        let mut sum = vec![0f64; rows * cols];
        let mut cnt = vec![0u32; rows * cols];
        for r in 0..src_rows {
            let br = r * rows / src_rows.max(1);
            for c in 0..src_cols {
                let bc = c * cols / src_cols.max(1);
                let k = br * cols + bc;
                if let (Some(s), Some(n)) = (sum.get_mut(k), cnt.get_mut(k)) {
                    *s += f64::from(f(r * src_cols + c));
                    *n += 1;
                }
            }
        }
        let values = sum
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
        Self {
            rows,
            cols,
            values,
            src_rows,
            src_cols,
        }
    }

    /// Mean `|m|` per block of the row-major `[src_rows, src_cols]` matrix `m` (missing elements
    /// count as 0).
    pub fn mean_abs(
        m: &[f64],
        src_rows: usize,
        src_cols: usize,
        max_rows: usize,
        max_cols: usize,
    ) -> Self {
        Self::block_means(src_rows, src_cols, max_rows, max_cols, |i| {
            m.get(i).map_or(0.0, |v| v.abs() as f32)
        })
    }

    /// Largest cell value (0 for an empty map).
    pub fn max(&self) -> f32 {
        self.values.iter().copied().fold(0f32, f32::max)
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn means_cover_every_element_once() {
        // 5 × 7 into at most 2 × 3: every element lands in exactly one cell.
        let m = Heatmap::block_means(5, 7, 2, 3, |_| 1.0);
        assert_eq!((m.rows, m.cols, m.values.len()), (2, 3, 6));
        assert!(m.values.iter().all(|v| *v == 1.0), "{:?}", m.values);
        // Small matrices keep one element per cell.
        let v: Vec<f64> = (0..6).map(|i| -(i as f64)).collect();
        let s = Heatmap::mean_abs(&v, 2, 3, 64, 64);
        assert_eq!(s.values, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(s.max(), 5.0);
        // Column means: a 1 × 4 row halved into 2 cells.
        let h = Heatmap::mean_abs(&[1.0, 3.0, 10.0, 20.0], 1, 4, 1, 2);
        assert_eq!(h.values, vec![2.0, 15.0]);
    }
}
