//! Matrices larger than one storage binding, stored as row panels.
//!
//! A shader sees a storage buffer through one binding, and adapters cap a binding's size: 2 GiB on
//! NVIDIA's Vulkan driver and on DX12 (wgpu 30), 128 MiB on Mesa's lavapipe; Metal binds up to its
//! largest buffer. The n×n f32 matrices of the solve outgrow
//! that first — a Llama-3-70B MLP's 28672² Hessian is 3.1 GiB, a Llama-3-8B one's 14336² is
//! 784 MiB (over lavapipe's limit). A [`GpuMatrix`] therefore keeps `rows × cols` row-major as
//! consecutive panels of `panel_rows` rows, each panel its own buffer within the binding limit;
//! every kernel that touches such a matrix is launched once per panel (or per pair of panels for
//! gathers whose source row lies elsewhere), with the panel's first row as a parameter.
//!
//! When the whole matrix fits one binding there is exactly one panel and every launch is the same
//! single dispatch as for a plain [`GpuBuffer`]: the split costs nothing where it is not needed.
//! `panel_rows` is a multiple of an alignment the user chooses (the solve's block size, the
//! Cholesky's 32-column panels) so that the row blocks those kernels read never straddle panels.

use std::ops::Range;

use super::ops::MatView;
use super::{GpuBuffer, GpuContext, GpuError};

/// An f32 `rows × cols` row-major matrix in row panels (module docs).
pub struct GpuMatrix {
    rows: usize,
    cols: usize,
    panel_rows: usize,
    panels: Vec<GpuBuffer<f32>>,
}

impl GpuMatrix {
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Elements in the whole matrix.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Rows per panel (the last panel may hold fewer).
    pub fn panel_rows(&self) -> usize {
        self.panel_rows
    }
    pub fn panels(&self) -> &[GpuBuffer<f32>] {
        &self.panels
    }
    /// Global rows held by panel `p`.
    pub fn panel_range(&self, p: usize) -> Range<usize> {
        let start = p * self.panel_rows;
        start..(start + self.panel_rows).min(self.rows)
    }
    /// The panel holding global row `row`.
    pub fn panel_of(&self, row: usize) -> usize {
        row / self.panel_rows.max(1)
    }
    /// The panel buffer holding global row `row`, and `row`'s index inside it.
    pub fn locate(&self, row: usize) -> (&GpuBuffer<f32>, usize) {
        let p = self.panel_of(row).min(self.panels.len().saturating_sub(1));
        (&self.panels[p], row - p * self.panel_rows)
    }
    /// A [`MatView`] whose element (0, 0) is this matrix's (`row`, `col`); valid for the rows of
    /// `row`'s panel only (the launchers in `ops` split at panel boundaries before using it).
    pub fn view(&self, row: usize, col: usize) -> MatView<'_> {
        let (buf, local) = self.locate(row);
        MatView::new(buf, self.cols).at(local * self.cols + col)
    }
    /// `(panel, global rows)` for each panel that `rows` overlaps, in order.
    pub fn segments(&self, rows: Range<usize>) -> impl Iterator<Item = (usize, Range<usize>)> + '_ {
        let first = if rows.start < rows.end {
            self.panel_of(rows.start)
        } else {
            self.panels.len()
        };
        (first..self.panels.len()).map_while(move |p| {
            let r = self.panel_range(p);
            let s = r.start.max(rows.start);
            let e = r.end.min(rows.end);
            (s < e).then_some((p, s..e))
        })
    }
    /// Every (destination panel of `self`, source panel of `src`) pair, for gathers whose source
    /// row can lie in any panel: the kernel writes the elements whose source row is in the pair's
    /// source panel, so running all pairs writes every element once.
    pub fn panel_pairs<'a>(&'a self, src: &'a GpuMatrix) -> impl Iterator<Item = PanelPair<'a>> {
        (0..self.panels.len()).flat_map(move |pd| {
            (0..src.panels.len()).map(move |ps| PanelPair {
                dst: &self.panels[pd],
                dst_rows: self.panel_range(pd),
                src: &src.panels[ps],
                src_rows: src.panel_range(ps),
            })
        })
    }
    /// The only buffer when the matrix is a single panel (the tensor-core path needs one binding).
    pub fn single(&self) -> Option<&GpuBuffer<f32>> {
        match self.panels.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }
}

/// The panel-pair fields of a kernel's parameters (`dst_r0, dst_rows, src_r0, src_rows` in the
/// WGSL structs of mirror, factor and quant_gather): global first row and row count of the
/// destination and the source panel.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PanelRows {
    pub dst_r0: u32,
    pub dst_rows: u32,
    pub src_r0: u32,
    pub src_rows: u32,
}

impl PanelRows {
    pub fn new(dst: &Range<usize>, src: &Range<usize>) -> Result<Self, GpuError> {
        let u = |what: &str, v: usize| super::ops::u32_of(what, v);
        Ok(Self {
            dst_r0: u("panel row", dst.start)?,
            dst_rows: u("panel rows", dst.len())?,
            src_r0: u("panel row", src.start)?,
            src_rows: u("panel rows", src.len())?,
        })
    }
}

/// One launch of a panel-pair gather ([`GpuMatrix::panel_pairs`]).
pub struct PanelPair<'a> {
    pub dst: &'a GpuBuffer<f32>,
    /// Global rows of the destination panel.
    pub dst_rows: Range<usize>,
    pub src: &'a GpuBuffer<f32>,
    /// Global rows of the source panel.
    pub src_rows: Range<usize>,
}

/// Rows per panel for a `rows × cols` f32 matrix: the largest multiple of `align` whose panel fits
/// `panel_bytes`, or all rows when the whole matrix fits.
pub fn panel_rows_for(
    what: &str,
    rows: usize,
    cols: usize,
    align: usize,
    panel_bytes: u64,
) -> Result<usize, GpuError> {
    let align = align.max(1);
    let row_bytes = (cols.max(1) * 4) as u64;
    let fit = (panel_bytes / row_bytes) as usize;
    if fit >= rows {
        return Ok(rows.max(1));
    }
    let pr = fit / align * align;
    if pr == 0 {
        return Err(GpuError::TooLarge {
            what: format!("{what}: one panel of {align} rows × {cols} columns"),
            bytes: align as u64 * row_bytes,
            limit: panel_bytes,
        });
    }
    Ok(pr)
}

impl GpuContext {
    /// A zero `rows × cols` matrix, panels aligned to `align` rows (module docs).
    pub fn matrix_zeros(
        &self,
        what: &str,
        rows: usize,
        cols: usize,
        align: usize,
    ) -> Result<GpuMatrix, GpuError> {
        self.matrix_with(what, rows, cols, align, true)
    }

    /// [`Self::matrix_zeros`] without the zeros: panels from [`GpuContext::scratch`] (a pooled
    /// buffer keeps what it held; debug builds fill reused ones with NaN), for a matrix whose
    /// every element is written before it is read.
    pub fn matrix_scratch(
        &self,
        what: &str,
        rows: usize,
        cols: usize,
        align: usize,
    ) -> Result<GpuMatrix, GpuError> {
        self.matrix_with(what, rows, cols, align, false)
    }

    fn matrix_with(
        &self,
        what: &str,
        rows: usize,
        cols: usize,
        align: usize,
        zeroed: bool,
    ) -> Result<GpuMatrix, GpuError> {
        let panel_rows = panel_rows_for(what, rows, cols, align, self.panel_bytes())?;
        let count = rows.div_ceil(panel_rows).max(1);
        let mut panels = Vec::with_capacity(count);
        for p in 0..count {
            let r = (rows - (p * panel_rows).min(rows)).min(panel_rows);
            let label = if count == 1 {
                what.to_string()
            } else {
                format!("{what} (panel {}/{count})", p + 1)
            };
            panels.push(if zeroed {
                self.zeros::<f32>(&label, r * cols)?
            } else {
                self.scratch::<f32>(&label, r * cols)?
            });
        }
        Ok(GpuMatrix {
            rows,
            cols,
            panel_rows,
            panels,
        })
    }

    /// A `rows × cols` matrix initialised with `data` (row-major).
    pub fn matrix_upload(
        &self,
        what: &str,
        data: &[f32],
        rows: usize,
        cols: usize,
        align: usize,
    ) -> Result<GpuMatrix, GpuError> {
        if data.len() != rows * cols {
            return Err(GpuError::Validation(format!(
                "{what}: {} values for a {rows}×{cols} matrix",
                data.len()
            )));
        }
        let panel_rows = panel_rows_for(what, rows, cols, align, self.panel_bytes())?;
        let chunk = (panel_rows * cols).max(1);
        let count = rows.div_ceil(panel_rows).max(1);
        let mut panels = Vec::with_capacity(count);
        if data.is_empty() {
            panels.push(self.zeros::<f32>(what, 0)?);
        }
        for (p, part) in data.chunks(chunk).enumerate() {
            let label = if count == 1 {
                what.to_string()
            } else {
                format!("{what} (panel {}/{count})", p + 1)
            };
            panels.push(self.upload(&label, part)?);
        }
        Ok(GpuMatrix {
            rows,
            cols,
            panel_rows,
            panels,
        })
    }

    /// The whole matrix back on the host, row-major. Blocks until the GPU is done.
    pub fn read_matrix(&self, m: &GpuMatrix) -> Result<Vec<f32>, GpuError> {
        let mut out = Vec::with_capacity(m.len());
        for p in &m.panels {
            out.extend(self.read(p)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panel_rows_respect_alignment_and_limit() {
        // Fits whole: one panel of all rows.
        assert_eq!(panel_rows_for("m", 10, 10, 32, 400).ok(), Some(10));
        // 100 rows of 10 floats (40 B) under 1000 B: 25 fit, aligned down to 8 → 24.
        assert_eq!(panel_rows_for("m", 100, 10, 8, 1000).ok(), Some(24));
        // Not even one aligned block fits: a clear error naming the matrix.
        match panel_rows_for("the Hessian", 100, 10, 32, 1000) {
            Err(GpuError::TooLarge { what, bytes, limit }) => {
                assert!(what.contains("the Hessian"), "{what}");
                assert_eq!((bytes, limit), (1280, 1000));
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // Llama-3-70B's 28672² Hessian on a 2 GiB binding: 18,688 rows (146 blocks of 128) per
        // panel, two panels.
        let pr = panel_rows_for("H", 28672, 28672, 128, (2 << 30) - (1 << 20)).ok();
        assert_eq!(pr, Some(18688));
    }
}
