//! Launchers for the general-purpose kernels: GEMM, symmetric rank-k update, elementwise ops and
//! squared-norm reductions. Forward-pass and quantization kernels live next to their users.

use bytemuck::{Pod, Zeroable};

use super::kernels::{Recorder, groups_1d};
use super::{GpuBuffer, GpuContext, GpuError, GpuMatrix};

// Indices audited (gemm.wgsl's header): created without wgpu's index clamps (gpu/kernels.rs).
crate::wgsl_shader!(GEMM, "gemm", indices_audited);
crate::wgsl_shader!(ELEMENTWISE, "elementwise");
crate::wgsl_shader!(MIRROR, "mirror");
crate::wgsl_shader!(COL_DOT, "col_dot");

/// The uniform block of the f32 GEMM kernels (`gemm.wgsl`'s `Params`). Public so that the kernel
/// lab (benches/kernels.rs) dispatches variant kernels with exactly what the shipped ones get.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct GemmParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub lda: u32,
    pub ldb: u32,
    pub ldc: u32,
    pub off_a: u32,
    pub off_b: u32,
    pub off_c: u32,
    pub alpha: f32,
    pub beta: f32,
    /// Upper-triangle launches: the view's shift from the diagonal (`gemm.wgsl`).
    pub diag: i32,
    /// [`KSkip`] in the launch's own coordinates: bit 0 `a_upper`, bit 1 `a_lower`, bit 2
    /// `b_upper`, bit 3 `b_lower` present, with their shifts.
    pub tri: u32,
    pub a_up: i32,
    pub a_lo: i32,
    pub b_up: i32,
    pub b_lo: i32,
    /// Batched launches ([`gemm_batched`]): per-batch element strides of A, B and C (0 for one
    /// product).
    pub bat_a: u32,
    pub bat_b: u32,
    pub bat_c: u32,
}

/// Zero triangles of a GEMM's operands, which the f32 kernels skip: each output tile sums only
/// over the `k` range where both operands can be non-zero (`gemm.wgsl`'s `k_range`). The caller
/// guarantees that every entry on the named side is an exact zero (a masked triangle, the zero
/// half of a triangular factor); the result is then bit for bit the dense product's, since a
/// product with an exact zero leaves an f32 sum unchanged. Shifts are in the coordinates of the
/// whole product (`op(A)` rows `i`, `op(B)` columns `j`, `k` from 0); [`gemm_mat_skip`] moves
/// them into each panel launch's coordinates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KSkip {
    /// `op(A)[i, k] == 0` for `k < i + s` (upper triangular; `s = 1`: strictly upper).
    pub a_upper: Option<i64>,
    /// `op(A)[i, k] == 0` for `k > i + s` (lower triangular).
    pub a_lower: Option<i64>,
    /// `op(B)[k, j] == 0` for `k > j + s` (upper triangular).
    pub b_upper: Option<i64>,
    /// `op(B)[k, j] == 0` for `k < j + s` (lower triangular, e.g. `Uᵀ` of an upper `U`).
    pub b_lower: Option<i64>,
}

impl KSkip {
    /// The same zeros for the launch covering rows from `m0`, columns from `n0` and `k` from `k0`
    /// of the whole product (a panel launch): the A shifts move by `m0 − k0`, the B shifts by
    /// `n0 − k0`.
    fn moved(&self, m0: usize, n0: usize, k0: usize) -> Self {
        let by = |s: Option<i64>, o: usize| s.map(|s| s + o as i64 - k0 as i64);
        Self {
            a_upper: by(self.a_upper, m0),
            a_lower: by(self.a_lower, m0),
            b_upper: by(self.b_upper, n0),
            b_lower: by(self.b_lower, n0),
        }
    }

    /// `gemm.wgsl`'s `(tri, a_up, a_lo, b_up, b_lo)`. Shifts are clamped to ±2³⁰: beyond that a
    /// bound lies outside every grid and K the kernels accept, so the clamp changes nothing.
    fn packed(&self) -> (u32, i32, i32, i32, i32) {
        const LIM: i64 = 1 << 30;
        let shift = |s: Option<i64>| s.unwrap_or(0).clamp(-LIM, LIM) as i32;
        let flags = u32::from(self.a_upper.is_some())
            | u32::from(self.a_lower.is_some()) << 1
            | u32::from(self.b_upper.is_some()) << 2
            | u32::from(self.b_lower.is_some()) << 3;
        (
            flags,
            shift(self.a_upper),
            shift(self.a_lower),
            shift(self.b_upper),
            shift(self.b_lower),
        )
    }
}

impl GemmParams {
    /// `C = op(A)·op(B)` (alpha 1, beta 0) over dense operands from element 0 of each buffer, with
    /// row strides `lda`, `ldb`, `ldc`.
    pub fn dense(
        shape: (usize, usize, usize),
        lds: (usize, usize, usize),
    ) -> Result<Self, GpuError> {
        let [m, n, k, lda, ldb, ldc] = dense_dims(shape, lds)?;
        Ok(Self {
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
            alpha: 1.0,
            ..Self::zeroed()
        })
    }
}

/// `[M, N, K, lda, ldb, ldc]` as the kernels' u32 parameters (the `dense` constructors of
/// [`GemmParams`] and [`CoopParams`]).
fn dense_dims(
    (m, n, k): (usize, usize, usize),
    (lda, ldb, ldc): (usize, usize, usize),
) -> Result<[u32; 6], GpuError> {
    Ok([
        u32_of("gemm M", m)?,
        u32_of("gemm N", n)?,
        u32_of("gemm K", k)?,
        u32_of("gemm lda", lda)?,
        u32_of("gemm ldb", ldb)?,
        u32_of("gemm ldc", ldc)?,
    ])
}

/// A row-major matrix view inside a buffer: element (r, c) at `offset + r·ld + c`.
#[derive(Clone, Copy)]
pub struct MatView<'a> {
    pub buf: &'a GpuBuffer<f32>,
    pub offset: usize,
    pub ld: usize,
    /// Use the transpose of the stored matrix.
    pub trans: bool,
}

impl<'a> MatView<'a> {
    pub fn new(buf: &'a GpuBuffer<f32>, ld: usize) -> Self {
        Self {
            buf,
            offset: 0,
            ld,
            trans: false,
        }
    }
    pub fn t(mut self) -> Self {
        self.trans = !self.trans;
        self
    }
    pub fn at(mut self, offset: usize) -> Self {
        self.offset = offset;
        self
    }
}

/// Out-of-bounds storage accesses are silently clamped or dropped by WGSL's robust buffer access,
/// so launchers check every extent up front: a too-small buffer is a bug to report, never a
/// silently wrong result.
fn check_len(what: &str, buf: &GpuBuffer<f32>, needed: usize) -> Result<(), GpuError> {
    if buf.len() < needed {
        return Err(GpuError::Validation(format!(
            "{what}: buffer holds {} elements, the kernel needs {needed}",
            buf.len()
        )));
    }
    Ok(())
}

/// A size as the `u32` WGSL parameters use, or a clear error naming what overflowed.
pub fn u32_of(what: &str, v: usize) -> Result<u32, GpuError> {
    u32::try_from(v).map_err(|_| GpuError::TooLarge {
        what: what.to_string(),
        bytes: v as u64 * 4,
        limit: u64::from(u32::MAX),
    })
}

/// Output tile of the GEMM kernels (`gemm.wgsl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmTile {
    /// 128×128 per workgroup, 8×8 per invocation: the fast kernel once there are enough tiles.
    Large,
    /// 64×64 per workgroup, 4×4 per invocation: more workgroups for small outputs.
    Small,
    /// [`GemmTile::Large`] with double-buffered workgroup memory (one barrier per k slice instead
    /// of two, 16 KiB): a candidate the tuning table can choose; the size rule never does.
    LargeDb,
    /// 32×64 per workgroup, 2×4 per invocation, 32 k per barrier: outputs too small or too
    /// narrow for [`GemmTile::Small`] to fill the GPU (the solve's per-block products, the
    /// factor's narrow panels and small blocks; [`narrow_fits`]). The same sums in the same order
    /// as [`GemmTile::Small`], so the same bits.
    Narrow,
}

impl GemmTile {
    /// Every kernel, in the order `tune` times them.
    pub const ALL: [GemmTile; 4] = [
        GemmTile::Large,
        GemmTile::Small,
        GemmTile::LargeDb,
        GemmTile::Narrow,
    ];

    /// The kernel's name in `GPTAQ_GEMM_TILE` and in the tuning output.
    pub fn name(self) -> &'static str {
        match self {
            GemmTile::Large => "large",
            GemmTile::Small => "small",
            GemmTile::LargeDb => "large-db",
            GemmTile::Narrow => "narrow",
        }
    }

    /// Rows and columns of the output tile one workgroup computes.
    fn tile_shape(self) -> (usize, usize) {
        match self {
            GemmTile::Large | GemmTile::LargeDb => (128, 128),
            GemmTile::Small => (64, 64),
            GemmTile::Narrow => (32, 64),
        }
    }
}

/// Large tiles once the output has at least this many of them: a workgroup per SM / compute unit
/// of a big GPU (132 on an H100/H200), below which the 4× more numerous small tiles keep more of
/// the GPU busy. `GPTAQ_GEMM_TILE=large|small|large-db|narrow` forces one kernel (benchmarks,
/// tests).
const LARGE_TILE_MIN_TILES: usize = 128;

fn forced_tile() -> Option<GemmTile> {
    static FORCED: std::sync::OnceLock<Option<GemmTile>> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| match std::env::var("GPTAQ_GEMM_TILE").ok().as_deref() {
        Some(name) => GemmTile::ALL.into_iter().find(|t| t.name() == name),
        None => None,
    })
}

/// The size rule: the kernel for an M×N output when no measurement says otherwise.
pub fn gemm_tile(m: usize, n: usize) -> GemmTile {
    if m.div_ceil(128) * n.div_ceil(128) >= LARGE_TILE_MIN_TILES {
        GemmTile::Large
    } else {
        GemmTile::Small
    }
}

/// Whether the size rule takes [`GemmTile::Narrow`] for an M×N output over K where it would take
/// [`GemmTile::Small`]: K of at least one 32-deep slice, and an output at most 128 wide or with at
/// most 128 of `gemm_small`'s 64×64 tiles (about one per SM of a big GPU) — where that kernel
/// leaves the GPU latency-bound (`gemm.wgsl`'s header). Measured on an H100 (BENCHMARKS.md
/// session 38, 50 launches per submission): 4096 × 128 × {128, 384, 896, 1920} 15–31 % faster,
/// 256³ 22 % and 512³ 34 % faster, but 1024³ (256 small tiles) 14 % slower, so that stays
/// `gemm_small`. In the 4096 × 14336 solve: the lazy catch-ups 38 → 24 µs each and the
/// Cholesky's 128-wide panel products 11.7 → 10.0 µs. GPUs only ([`size_rule_for`]). The tuning
/// table may pick either anywhere; `GPTAQ_GEMM_NARROW=0` turns the rule's use of it off (A/B
/// runs).
pub fn narrow_fits(m: usize, n: usize, k: usize) -> bool {
    k >= 32
        && (n <= 128 || m.div_ceil(64) * n.div_ceil(64) <= 128)
        && !crate::env_is!("GPTAQ_GEMM_NARROW", "0")
}

/// The size rule for op(A) M×K · op(B) K×N: [`gemm_tile`], with [`GemmTile::Narrow`] in place of
/// [`GemmTile::Small`] where [`narrow_fits`].
pub fn gemm_tile_rule(m: usize, n: usize, k: usize) -> GemmTile {
    match gemm_tile(m, n) {
        GemmTile::Small if narrow_fits(m, n, k) => GemmTile::Narrow,
        t => t,
    }
}

/// The size rule on `ctx`: [`gemm_tile_rule`] on GPUs; on CPU adapters (lavapipe) [`gemm_tile`],
/// without [`GemmTile::Narrow`]: there the latency it hides does not exist, and `tune` on
/// llvmpipe measured it 1.2–2.3× slower than `gemm_small` wherever M ≥ 128 (a tiny-llama-15m
/// GPTAQ quantization 84 s against 72 s; BENCHMARKS.md session 38).
pub fn size_rule_for(ctx: &GpuContext, m: usize, n: usize, k: usize) -> GemmTile {
    if ctx.summary.device_type == "Cpu" {
        gemm_tile(m, n)
    } else {
        gemm_tile_rule(m, n, k)
    }
}

/// The kernel [`gemm`] uses on `ctx` for op(A) M×K · op(B) K×N: `GPTAQ_GEMM_TILE` if set, else
/// the adapter's tuning table (`gptaq-studio tune`, [`super::tune`]) when it has a nearby shape,
/// else the size rule [`size_rule_for`].
pub fn gemm_tile_for(ctx: &GpuContext, m: usize, n: usize, k: usize) -> GemmTile {
    if let Some(t) = forced_tile() {
        return t;
    }
    ctx.gemm_table()
        .and_then(|t| t.lookup(m, n, k))
        .unwrap_or_else(|| size_rule_for(ctx, m, n, k))
}

/// Records `C = alpha·op(A)·op(B) + beta·C` with op(A) M×K, op(B) K×N, C M×N (row-major, leading
/// dimension `c.ld`). `c.trans` must be false.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    rec: &mut Recorder<'_>,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: MatView<'_>,
    b: MatView<'_>,
    beta: f32,
    c: MatView<'_>,
) -> Result<(), GpuError> {
    gemm_impl(
        rec,
        m,
        n,
        k,
        alpha,
        a,
        b,
        beta,
        c,
        None,
        None,
        KSkip::default(),
        SINGLE,
    )
}

/// [`gemm`] restricted to the upper triangle of a square C (`m == n`, elements `row ≤ col` of the
/// C view): symmetric updates such as the blocked Cholesky's trailing update, at about half the
/// flops.
#[allow(clippy::too_many_arguments)]
pub fn gemm_upper(
    rec: &mut Recorder<'_>,
    n: usize,
    k: usize,
    alpha: f32,
    a: MatView<'_>,
    b: MatView<'_>,
    beta: f32,
    c: MatView<'_>,
) -> Result<(), GpuError> {
    gemm_impl(
        rec,
        n,
        n,
        k,
        alpha,
        a,
        b,
        beta,
        c,
        Some(0),
        None,
        KSkip::default(),
        SINGLE,
    )
}

/// [`gemm`] / [`gemm_upper`] with the kernel forced (tests and benchmarks of both tiles).
#[allow(clippy::too_many_arguments)]
pub fn gemm_tiled(
    rec: &mut Recorder<'_>,
    tile: GemmTile,
    upper_only: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: MatView<'_>,
    b: MatView<'_>,
    beta: f32,
    c: MatView<'_>,
) -> Result<(), GpuError> {
    if upper_only && m != n {
        return Err(GpuError::Validation(format!(
            "upper-triangle gemm needs a square C, got {m}x{n}"
        )));
    }
    gemm_forced(
        rec,
        tile,
        upper_only.then_some(0),
        (m, n, k),
        alpha,
        a,
        b,
        beta,
        c,
        KSkip::default(),
        SINGLE,
    )
}

/// [`gemm_tiled`] with everything [`gemm_batched`] and [`gemm_mat_skip`] take besides: the
/// upper-triangle shift `upper`, declared zero triangles and `batch` products `strides` apart
/// (tests comparing the kernels bit for bit on every path).
#[allow(clippy::too_many_arguments)]
pub fn gemm_forced(
    rec: &mut Recorder<'_>,
    tile: GemmTile,
    upper: Option<i32>,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: MatView<'_>,
    b: MatView<'_>,
    beta: f32,
    c: MatView<'_>,
    skip: KSkip,
    (batch, strides): (usize, (usize, usize, usize)),
) -> Result<(), GpuError> {
    gemm_impl(
        rec,
        m,
        n,
        k,
        alpha,
        a,
        b,
        beta,
        c,
        upper,
        Some(tile),
        skip,
        (batch, strides),
    )
}

/// `batch` products `C_z = alpha·op(A_z)·op(B_z) + beta·C_z` (z < `batch`) of the same shape in
/// one launch, each operand's z-th view `strides.{0,1,2}·z` elements after the given one (A, B,
/// C), with the same [`KSkip`] in each product's own coordinates: many small products (the
/// factor's doubling inverse at its first levels: 224 pairs of 32×32 blocks at n = 14336) as
/// one dispatch instead of one each. Each product is computed exactly as a single launch would
/// compute it alone (same tile, same k order), so results are bit for bit the same.
#[allow(clippy::too_many_arguments)]
pub fn gemm_batched(
    rec: &mut Recorder<'_>,
    batch: usize,
    strides: (usize, usize, usize),
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: MatView<'_>,
    b: MatView<'_>,
    beta: f32,
    c: MatView<'_>,
    skip: KSkip,
) -> Result<(), GpuError> {
    gemm_impl(
        rec,
        m,
        n,
        k,
        alpha,
        a,
        b,
        beta,
        c,
        None,
        None,
        skip,
        (batch, strides),
    )
}

/// One product, for [`gemm_impl`]'s `batch`.
const SINGLE: (usize, (usize, usize, usize)) = (1, (0, 0, 0));

#[allow(clippy::too_many_arguments)]
fn gemm_impl(
    rec: &mut Recorder<'_>,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: MatView<'_>,
    b: MatView<'_>,
    beta: f32,
    c: MatView<'_>,
    upper: Option<i32>,
    tile: Option<GemmTile>,
    skip: KSkip,
    (batch, (sa, sb, sc)): (usize, (usize, usize, usize)),
) -> Result<(), GpuError> {
    if m == 0 || n == 0 || batch == 0 {
        return Ok(());
    }
    debug_assert!(!c.trans, "C cannot be transposed");
    // The last batch's views must fit (the kernel reads and writes no others).
    let last = batch - 1;
    if k > 0 {
        // Stored shapes: op(A) is M×K, so A is stored K×M when transposed (likewise B).
        let extent = |v: &MatView<'_>, r: usize, c: usize, stride: usize| {
            let (sr, sc) = if v.trans { (c, r) } else { (r, c) };
            v.offset + last * stride + (sr - 1) * v.ld + sc
        };
        check_len("gemm A", a.buf, extent(&a, m, k, sa))?;
        check_len("gemm B", b.buf, extent(&b, k, n, sb))?;
    }
    check_len("gemm C", c.buf, c.offset + last * sc + (m - 1) * c.ld + n)?;
    let (tri, a_up, a_lo, b_up, b_lo) = skip.packed();
    let params = GemmParams {
        m: u32_of("gemm M", m)?,
        n: u32_of("gemm N", n)?,
        k: u32_of("gemm K", k)?,
        lda: u32_of("gemm lda", a.ld)?,
        ldb: u32_of("gemm ldb", b.ld)?,
        ldc: u32_of("gemm ldc", c.ld)?,
        off_a: u32_of("gemm A offset", a.offset)?,
        off_b: u32_of("gemm B offset", b.offset)?,
        off_c: u32_of("gemm C offset", c.offset)?,
        alpha,
        beta,
        diag: upper.unwrap_or(0),
        tri,
        a_up,
        a_lo,
        b_up,
        b_lo,
        bat_a: u32_of("gemm A batch stride", sa)?,
        bat_b: u32_of("gemm B batch stride", sb)?,
        bat_c: u32_of("gemm C batch stride", sc)?,
    };
    let tile = tile.unwrap_or_else(|| gemm_tile_for(rec.ctx(), m, n, k));
    let entry = match tile {
        GemmTile::Large | GemmTile::LargeDb => "gemm_large",
        GemmTile::Small => "gemm_small",
        GemmTile::Narrow => "gemm_narrow",
    };
    let (tile_rows, tile_cols) = tile.tile_shape();
    let constants = [
        ("TRANS_A", f64::from(u8::from(a.trans))),
        ("TRANS_B", f64::from(u8::from(b.trans))),
        ("UPPER_ONLY", f64::from(u8::from(upper.is_some()))),
        (
            "DOUBLE_BUFFER",
            f64::from(u8::from(tile == GemmTile::LargeDb)),
        ),
    ];
    let groups = [
        n.div_ceil(tile_cols) as u32,
        m.div_ceil(tile_rows) as u32,
        u32_of("gemm batch", batch)?,
    ];
    if groups[0] > 65535 || groups[1] > 65535 || groups[2] > 65535 {
        return Err(GpuError::TooLarge {
            what: format!("gemm {m}x{n} grid"),
            bytes: (m * n * 4) as u64,
            limit: 65535 * tile_rows.min(tile_cols) as u64,
        });
    }
    rec.dispatch(
        &GEMM,
        entry,
        &constants,
        &params,
        &[a.buf.binding(), b.buf.binding(), c.buf.binding()],
        groups,
    )
}

/// An operand of [`gemm_mat`]: a view into one buffer, or a block of a [`GpuMatrix`] that may
/// span several panels (split by the launcher, gpu/matrix.rs).
#[derive(Clone, Copy)]
pub enum Operand<'a> {
    View(MatView<'a>),
    /// The block whose element (0, 0) is the matrix's (`row`, `col`); `trans` as in [`MatView`].
    Panels {
        mat: &'a GpuMatrix,
        row: usize,
        col: usize,
        trans: bool,
    },
}

impl<'a> From<MatView<'a>> for Operand<'a> {
    fn from(v: MatView<'a>) -> Self {
        Operand::View(v)
    }
}

impl GpuMatrix {
    /// The block of this matrix starting at (`row`, `col`), as a GEMM operand.
    pub fn op(&self, row: usize, col: usize) -> Operand<'_> {
        Operand::Panels {
            mat: self,
            row,
            col,
            trans: false,
        }
    }
}

impl<'a> Operand<'a> {
    /// The transposed operand.
    pub fn t(self) -> Self {
        match self {
            Operand::View(v) => Operand::View(v.t()),
            Operand::Panels {
                mat,
                row,
                col,
                trans,
            } => Operand::Panels {
                mat,
                row,
                col,
                trans: !trans,
            },
        }
    }

    fn trans(&self) -> bool {
        match self {
            Operand::View(v) => v.trans,
            Operand::Panels { trans, .. } => *trans,
        }
    }

    /// Adds to `out` the offsets, among the first `len` stored rows, where a panel begins.
    fn panel_cuts(&self, len: usize, out: &mut Vec<usize>) {
        if let Operand::Panels { mat, row, .. } = *self {
            let pr = mat.panel_rows().max(1);
            let mut b = (row / pr + 1) * pr;
            while b < row + len {
                out.push(b - row);
                b += pr;
            }
        }
    }

    /// The single-buffer view at logical (`r`, `c`) of op(self) (stored (c, r) when transposed);
    /// callers have split at panel boundaries, so the view stays inside one panel.
    fn at_logical(&self, r: usize, c: usize) -> MatView<'a> {
        let (sr, sc) = if self.trans() { (c, r) } else { (r, c) };
        match *self {
            Operand::View(v) => MatView {
                offset: v.offset + sr * v.ld + sc,
                ..v
            },
            Operand::Panels {
                mat,
                row,
                col,
                trans,
            } => {
                let v = mat.view(row + sr, col + sc);
                if trans { v.t() } else { v }
            }
        }
    }
}

fn sorted_cuts(mut cuts: Vec<usize>) -> Vec<usize> {
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// [`gemm`] over operands that may be panelled matrices: `C = alpha·op(A)·op(B) + beta·C`, split
/// into one launch per combination of panels (M by the panels of C and of an untransposed A, N by
/// those of a transposed B, K by those of a transposed A and an untransposed B; the K slices after
/// the first accumulate with beta = 1). With single-panel operands this is exactly one [`gemm`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_mat(
    rec: &mut Recorder<'_>,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Operand<'_>,
    b: Operand<'_>,
    beta: f32,
    c: Operand<'_>,
) -> Result<(), GpuError> {
    gemm_split(rec, m, n, k, alpha, a, b, beta, c, None, KSkip::default())
}

/// [`gemm_mat`] over operands with known zero triangles ([`KSkip`]): per output tile only the
/// `k` range where both can be non-zero is summed, e.g. GPTAQ's `triu₁(T)·U` at about a third of
/// the dense multiply-adds (quant/gpu.rs). With `upper = Some(shift)` only the elements
/// `row ≤ col + shift` of the m×n C view are computed (`-1`: the strict upper triangle) and the
/// others are left as they were, whole output tiles below that line skipped — e.g. the rows of
/// GPTAQ's `T` that its mask discards.
#[allow(clippy::too_many_arguments)]
pub fn gemm_mat_skip(
    rec: &mut Recorder<'_>,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Operand<'_>,
    b: Operand<'_>,
    beta: f32,
    c: Operand<'_>,
    skip: KSkip,
    upper: Option<i64>,
) -> Result<(), GpuError> {
    gemm_split(rec, m, n, k, alpha, a, b, beta, c, upper, skip)
}

/// [`gemm_mat`] restricted to the upper triangle of the square n×n C block (like [`gemm_upper`]).
#[allow(clippy::too_many_arguments)]
pub fn gemm_mat_upper(
    rec: &mut Recorder<'_>,
    n: usize,
    k: usize,
    alpha: f32,
    a: Operand<'_>,
    b: Operand<'_>,
    beta: f32,
    c: Operand<'_>,
) -> Result<(), GpuError> {
    gemm_split(
        rec,
        n,
        n,
        k,
        alpha,
        a,
        b,
        beta,
        c,
        Some(0),
        KSkip::default(),
    )
}

#[allow(clippy::too_many_arguments)]
fn gemm_split(
    rec: &mut Recorder<'_>,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Operand<'_>,
    b: Operand<'_>,
    beta: f32,
    c: Operand<'_>,
    upper: Option<i64>,
    skip: KSkip,
) -> Result<(), GpuError> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if c.trans() {
        return Err(GpuError::Validation("gemm: C cannot be transposed".into()));
    }
    let (mut mc, mut nc, mut kc) = (vec![0, m], vec![0, n], vec![0, k]);
    c.panel_cuts(m, &mut mc);
    if a.trans() {
        a.panel_cuts(k, &mut kc);
    } else {
        a.panel_cuts(m, &mut mc);
    }
    if b.trans() {
        b.panel_cuts(n, &mut nc);
    } else {
        b.panel_cuts(k, &mut kc);
    }
    let (mc, nc, kc) = (sorted_cuts(mc), sorted_cuts(nc), sorted_cuts(kc));
    for mw in mc.windows(2) {
        let (m0, m1) = (mw[0], mw[1]);
        for nw in nc.windows(2) {
            let (mut n0, n1) = (nw[0], nw[1]);
            let diag = if let Some(shift) = upper {
                // Element (r, c) is computed iff r ≤ c + shift: rows m0.. only need columns
                // ≥ m0 − shift, and a block wholly below that line is skipped.
                let first_col = m0 as i64 - shift;
                if first_col >= n1 as i64 {
                    continue;
                }
                n0 = n0.max(usize::try_from(first_col).unwrap_or(0));
                // In the launch's coordinates: local r ≤ local c + (n0 − m0 + shift).
                let d = n0 as i64 - m0 as i64 + shift;
                Some(i32::try_from(d).map_err(|_| GpuError::TooLarge {
                    what: "gemm diagonal shift".into(),
                    bytes: d.unsigned_abs() * 4,
                    limit: i32::MAX as u64,
                })?)
            } else {
                None
            };
            for (i, kw) in kc.windows(2).enumerate() {
                let (k0, k1) = (kw[0], kw[1]);
                gemm_impl(
                    rec,
                    m1 - m0,
                    n1 - n0,
                    k1 - k0,
                    alpha,
                    a.at_logical(m0, k0),
                    b.at_logical(k0, n0),
                    if i == 0 { beta } else { 1.0 },
                    c.at_logical(m0, n0),
                    diag,
                    None,
                    skip.moved(m0, n0, k0),
                    SINGLE,
                )?;
            }
        }
    }
    Ok(())
}

/// Symmetric rank-k update `C = alpha·XᵀX + beta·C` for `X` of shape T×n (row-major, leading
/// dimension `x.ld`, `x.trans` false) and `C` n×n. Only elements on or above the diagonal are
/// computed (about half the flops of a full GEMM); the lower triangle is filled by mirroring.
pub fn syrk_xtx(
    rec: &mut Recorder<'_>,
    t: usize,
    n: usize,
    alpha: f32,
    x: MatView<'_>,
    beta: f32,
    c: &GpuMatrix,
) -> Result<(), GpuError> {
    check_square("syrk C", c, n)?;
    gemm_mat_upper(rec, n, t, alpha, x.t().into(), x.into(), beta, c.op(0, 0))?;
    mirror_upper(rec, c)
}

/// `C = alpha·AᵀB + beta·C` for A (T×n) and B (T×n): the cross term of GPTAQ's `D` statistic.
#[allow(clippy::too_many_arguments)]
pub fn gemm_atb(
    rec: &mut Recorder<'_>,
    t: usize,
    n: usize,
    alpha: f32,
    a: MatView<'_>,
    b: MatView<'_>,
    beta: f32,
    c: &GpuMatrix,
) -> Result<(), GpuError> {
    check_square("gemm_atb C", c, n)?;
    gemm_mat(
        rec,
        n,
        n,
        t,
        alpha,
        a.t().into(),
        b.into(),
        beta,
        c.op(0, 0),
    )
}

fn check_square(what: &str, c: &GpuMatrix, n: usize) -> Result<(), GpuError> {
    if c.rows() != n || c.cols() != n {
        return Err(GpuError::Validation(format!(
            "{what}: expected {n}×{n}, the matrix is {}×{}",
            c.rows(),
            c.cols()
        )));
    }
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MirrorParams {
    n: u32,
    rows: super::matrix::PanelRows,
    _pad: [u32; 3],
}

/// Copies the upper triangle of a square matrix onto its lower triangle: per panel, the part
/// whose source lies in the same panel, then one launch per earlier panel (`mirror.wgsl`).
pub fn mirror_upper(rec: &mut Recorder<'_>, c: &GpuMatrix) -> Result<(), GpuError> {
    let n = c.rows();
    check_square("mirror", c, n)?;
    let n32 = u32_of("mirror n", n)?;
    for (pd, dst) in c.panels().iter().enumerate() {
        let dr = c.panel_range(pd);
        for ps in 0..=pd {
            let sr = c.panel_range(ps);
            let params = MirrorParams {
                n: n32,
                rows: super::matrix::PanelRows::new(&dr, &sr)?,
                _pad: [0; 3],
            };
            let groups = [
                u32_of("mirror workgroups", sr.len().div_ceil(16))?,
                u32_of("mirror workgroups", dr.len().div_ceil(16))?,
                1,
            ];
            if ps == pd {
                rec.dispatch(
                    &MIRROR,
                    "mirror_upper",
                    &[],
                    &params,
                    &[dst.binding()],
                    groups,
                )?;
            } else {
                let src = &c.panels()[ps];
                rec.dispatch(
                    &MIRROR,
                    "mirror_cross",
                    &[],
                    &params,
                    &[dst.binding(), src.binding()],
                    groups,
                )?;
            }
        }
    }
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct EwParams {
    n: u32,
    /// Output offset for `sq_diff_partial`; unused by the other entries.
    cols: u32,
    alpha: f32,
    beta: f32,
}

/// `out[..n] = alpha·x + beta·y`.
pub fn axpby(
    rec: &mut Recorder<'_>,
    n: usize,
    alpha: f32,
    x: &GpuBuffer<f32>,
    beta: f32,
    y: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
) -> Result<(), GpuError> {
    check_len("axpby x", x, n)?;
    check_len("axpby y", y, n)?;
    check_len("axpby out", out, n)?;
    let params = EwParams {
        n: u32_of("axpby n", n)?,
        cols: 0,
        alpha,
        beta,
    };
    rec.dispatch(
        &ELEMENTWISE,
        "axpby",
        &[],
        &params,
        &[x.binding(), y.binding(), out.binding()],
        groups_1d(n.div_ceil(256) as u32),
    )
}

/// `out[..n] = alpha·x·y` elementwise.
pub fn mul(
    rec: &mut Recorder<'_>,
    n: usize,
    alpha: f32,
    x: &GpuBuffer<f32>,
    y: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
) -> Result<(), GpuError> {
    check_len("mul x", x, n)?;
    check_len("mul y", y, n)?;
    check_len("mul out", out, n)?;
    let params = EwParams {
        n: u32_of("mul n", n)?,
        cols: 0,
        alpha,
        beta: 0.0,
    };
    rec.dispatch(
        &ELEMENTWISE,
        "mul",
        &[],
        &params,
        &[x.binding(), y.binding(), out.binding()],
        groups_1d(n.div_ceil(256) as u32),
    )
}

/// Elements reduced by one workgroup of `sq_diff_partial` (256 invocations × CHUNK 16).
const SQ_PER_GROUP: usize = 256 * 16;

/// Number of partial sums [`sq_diff_partials`] writes for `n` elements.
pub fn sq_partials_len(n: usize) -> usize {
    n.div_ceil(SQ_PER_GROUP).max(1)
}

/// Records partial sums of `(x − beta·y)²` into `out[out_offset .. out_offset + sq_partials_len(n)]`.
/// With `beta = 0` this is `‖x‖²`. The partials are few (n / 4096) and are added on the host in
/// f64, typically once per stage for many batches (so no readback happens per batch).
pub fn sq_diff_partials(
    rec: &mut Recorder<'_>,
    n: usize,
    x: &GpuBuffer<f32>,
    beta: f32,
    y: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
    out_offset: usize,
) -> Result<(), GpuError> {
    let params = EwParams {
        n: u32_of("reduce n", n)?,
        cols: u32_of("reduce offset", out_offset)?,
        alpha: 1.0,
        beta,
    };
    rec.dispatch(
        &ELEMENTWISE,
        "sq_diff_partial",
        &[],
        &params,
        &[x.binding(), y.binding(), out.binding()],
        groups_1d(sq_partials_len(n) as u32),
    )
}

/// Convenience: `Σ (x − beta·y)²` over the first `n` elements, read back as f64 (blocks).
pub fn sq_diff_sum(
    ctx: &GpuContext,
    n: usize,
    x: &GpuBuffer<f32>,
    beta: f32,
    y: &GpuBuffer<f32>,
) -> Result<f64, GpuError> {
    let parts = ctx.zeros::<f32>("reduce partials", sq_partials_len(n))?;
    let mut rec = ctx.recorder();
    sq_diff_partials(&mut rec, n, x, beta, y, &parts, 0)?;
    rec.submit();
    Ok(ctx.read(&parts)?.iter().map(|&v| f64::from(v)).sum())
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ColDotParams {
    rows: u32,
    n: u32,
    rchunk: u32,
    out_off: u32,
}

/// Most row chunks of [`col_dot_partials`]: with n ≥ a few hundred columns this already gives
/// thousands of invocations, and it bounds the partials read back to `16·n`.
const COL_DOT_MAX_CHUNKS: usize = 16;
/// Fewest rows per chunk (short f32 sums matter less than enough work per invocation).
const COL_DOT_MIN_ROWS: usize = 64;

/// Row chunks `(count, rows per chunk)` of [`col_dot_partials`] for `rows` rows.
pub fn col_dot_chunks(rows: usize) -> (usize, usize) {
    let count = rows.div_ceil(COL_DOT_MIN_ROWS).clamp(1, COL_DOT_MAX_CHUNKS);
    (count, rows.div_ceil(count).max(1))
}

/// Number of partial sums [`col_dot_partials`] writes for a `[rows, n]` pair.
pub fn col_dot_partials_len(rows: usize, n: usize) -> usize {
    col_dot_chunks(rows).0 * n
}

/// Records the row-chunk partials of the column sums of `x∘y` (`x`, `y` row-major `[rows, n]`)
/// into `out[out_offset ..][.. col_dot_partials_len(rows, n)]`, chunk-major: partial `c` of
/// column `j` at `out_offset + c·n + j`. [`col_dot_sums`] adds them up on the host.
pub fn col_dot_partials(
    rec: &mut Recorder<'_>,
    rows: usize,
    n: usize,
    x: &GpuBuffer<f32>,
    y: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
    out_offset: usize,
) -> Result<(), GpuError> {
    if n == 0 {
        return Ok(());
    }
    let n_el = rows * n;
    check_len("col_dot x", x, n_el)?;
    check_len("col_dot y", y, n_el)?;
    let len = col_dot_partials_len(rows, n);
    check_len("col_dot out", out, out_offset + len)?;
    u32_of("col_dot rows·n", n_el)?;
    u32_of("col_dot output end", out_offset + len)?;
    let (count, rchunk) = col_dot_chunks(rows);
    let params = ColDotParams {
        rows: u32_of("col_dot rows", rows)?,
        n: u32_of("col_dot n", n)?,
        rchunk: u32_of("col_dot chunk", rchunk)?,
        out_off: u32_of("col_dot offset", out_offset)?,
    };
    let groups_x = u32_of("col_dot workgroups", n.div_ceil(256))?;
    if groups_x > 65535 {
        return Err(GpuError::TooLarge {
            what: format!("col_dot over {n} columns"),
            bytes: n as u64 * 4,
            limit: 65535 * 256 * 4,
        });
    }
    rec.dispatch(
        &COL_DOT,
        "col_dot_partial",
        &[],
        &params,
        &[x.binding(), y.binding(), out.binding()],
        [groups_x, count as u32, 1],
    )
}

/// The column sums (f64) from partials read back from `col_dot_partials(.., out_offset)`:
/// `partials` starts at that offset.
pub fn col_dot_sums(partials: &[f32], rows: usize, n: usize) -> Vec<f64> {
    let mut sums = vec![0.0f64; n];
    for chunk in partials[..col_dot_partials_len(rows, n).min(partials.len())].chunks(n.max(1)) {
        for (s, &v) in sums.iter_mut().zip(chunk) {
            *s += f64::from(v);
        }
    }
    sums
}

/// Convenience: the column sums of `x∘y` for `[rows, n]` matrices, read back as f64.
pub fn col_dot(
    ctx: &GpuContext,
    rows: usize,
    n: usize,
    x: &GpuBuffer<f32>,
    y: &GpuBuffer<f32>,
) -> Result<Vec<f64>, GpuError> {
    let parts = ctx.zeros::<f32>("col_dot partials", col_dot_partials_len(rows, n))?;
    let mut rec = ctx.recorder();
    col_dot_partials(&mut rec, rows, n, x, y, &parts, 0)?;
    rec.submit();
    Ok(col_dot_sums(&ctx.read(&parts)?, rows, n))
}

crate::wgsl_shader!(CAST_F16, "cast_f16");
crate::wgsl_shader!(GEMM_COOP, "gemm_coop");
crate::wgsl_shader!(GEMM_STAGED_COOP, "gemm_staged_coop");

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct CastParams {
    rows: u32,
    cols: u32,
    ld: u32,
    off: u32,
    scale: f32,
    sub: u32,
    _p: [u32; 2],
}

/// Records `out = f16(scale · x)` for the `rows × cols` view `x` (non-transposed), written densely
/// (`rows × cols`, row-major): the operands of [`gemm_coop`]. Needs `SHADER_F16`.
pub fn cast_f16(
    rec: &mut Recorder<'_>,
    rows: usize,
    cols: usize,
    x: MatView<'_>,
    scale: f32,
    out: &GpuBuffer<half::f16>,
) -> Result<(), GpuError> {
    cast_impl(rec, rows, cols, x, None, scale, out)
}

/// Records `out = f16(scale · (x − y))` with `y` read at the view `x`'s positions (same offset and
/// leading dimension): GPTAQ's `ΔX = X_fp − X_q` as a tensor-core operand in one pass, the same
/// halves as [`axpby`] into f32 followed by [`cast_f16`]. Needs `SHADER_F16`.
pub fn cast_f16_diff(
    rec: &mut Recorder<'_>,
    rows: usize,
    cols: usize,
    x: MatView<'_>,
    y: &GpuBuffer<f32>,
    scale: f32,
    out: &GpuBuffer<half::f16>,
) -> Result<(), GpuError> {
    cast_impl(rec, rows, cols, x, Some(y), scale, out)
}

fn cast_impl(
    rec: &mut Recorder<'_>,
    rows: usize,
    cols: usize,
    x: MatView<'_>,
    y: Option<&GpuBuffer<f32>>,
    scale: f32,
    out: &GpuBuffer<half::f16>,
) -> Result<(), GpuError> {
    let n_el = rows * cols;
    if n_el == 0 {
        return Ok(());
    }
    if !rec.ctx().features.contains(wgpu::Features::SHADER_F16) {
        return Err(GpuError::Validation(
            "cast_f16 needs the SHADER_F16 feature, which this adapter did not grant".into(),
        ));
    }
    if x.trans {
        return Err(GpuError::Validation(
            "cast_f16 reads a non-transposed view".into(),
        ));
    }
    let extent = x.offset + (rows - 1) * x.ld + cols;
    check_len("cast_f16 x", x.buf, extent)?;
    if let Some(y) = y {
        check_len("cast_f16 y", y, extent)?;
    }
    if out.len() < n_el {
        return Err(GpuError::Validation(format!(
            "cast_f16 out: {} elements, needs {n_el}",
            out.len()
        )));
    }
    let params = CastParams {
        rows: u32_of("cast_f16 rows", rows)?,
        cols: u32_of("cast_f16 cols", cols)?,
        ld: u32_of("cast_f16 ld", x.ld)?,
        off: u32_of("cast_f16 offset", x.offset)?,
        scale,
        sub: u32::from(y.is_some()),
        _p: [0; 2],
    };
    // Four elements per invocation where every row starts on a 16-byte boundary and holds whole
    // vectors (cast_f16.wgsl).
    let x4 = [cols, x.ld, x.offset].iter().all(|v| v.is_multiple_of(4));
    let (entry, per) = if x4 {
        ("cast_f16_x4", 4)
    } else {
        ("cast_f16", 1)
    };
    rec.dispatch(
        &CAST_F16,
        entry,
        &[],
        &params,
        &[x.buf.binding(), out.binding(), y.unwrap_or(x.buf).binding()],
        groups_1d(u32_of("cast_f16 workgroups", (n_el / per).div_ceil(256))?),
    )
}

crate::wgsl_shader!(F16_PACK, "f16_pack");

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct F16PackParams {
    len: u32,
    _p: [u32; 3],
}

/// Words that hold `len` packed halves (two per `u32`).
pub fn f16_words(len: usize) -> usize {
    len.div_ceil(2)
}

fn check_words(what: &str, words: &GpuBuffer<u32>, len: usize) -> Result<(), GpuError> {
    let needed = f16_words(len);
    if words.len() < needed {
        return Err(GpuError::Validation(format!(
            "{what}: the word buffer holds {} u32, {len} packed f16 need {needed}",
            words.len()
        )));
    }
    Ok(())
}

/// Records `words ← f16(x[..len])` (`f16_pack.wgsl`), two halves per word, element `2w` in the low
/// 16 bits of word `w` (the odd tail's high half is 0): the GPU side of the f16 host streams
/// (`pipeline::stream`), so that 2 bytes per element cross the host link instead of 4 and no CPU
/// converts them. The conversion is integer bit arithmetic (not `pack2x16float`, which wgpu grants
/// only with `SHADER_F16_IN_F32`, absent e.g. on Mesa without `SHADER_F16`), so it runs on every
/// adapter and rounds to nearest, ties to even, f16 subnormals kept: the same bits as the `half`
/// crate.
///
/// Values f16 cannot hold are clamped to ±65504 (NaN becomes the f16 NaN `0x7e00`) and set
/// `flag[0]` to 1 (it is only ever OR-ed, never cleared here): the caller reads and resets it to
/// report the overflow.
pub fn pack_f16(
    rec: &mut Recorder<'_>,
    x: &GpuBuffer<f32>,
    len: usize,
    words: &GpuBuffer<u32>,
    flag: &GpuBuffer<u32>,
) -> Result<(), GpuError> {
    if len == 0 {
        return Ok(());
    }
    check_len("pack_f16 x", x, len)?;
    check_words("pack_f16 words", words, len)?;
    if flag.is_empty() {
        return Err(GpuError::Validation(
            "pack_f16 flag: needs a buffer of at least one u32".into(),
        ));
    }
    let params = F16PackParams {
        len: u32_of("pack_f16 len", len)?,
        _p: [0; 3],
    };
    let (entry, per) = f16_pack_entry(true, len);
    rec.dispatch(
        &F16_PACK,
        entry,
        &[],
        &params,
        &[x.binding(), words.binding(), flag.binding()],
        groups_1d(u32_of(
            "pack_f16 workgroups",
            len.div_ceil(per).div_ceil(256),
        )?),
    )
}

/// Records `out[..len] ← f32(words)`, the inverse layout of [`pack_f16`] (exact: every f16 is an
/// f32; integer bit arithmetic like [`pack_f16`], so it runs on every adapter). Only `out[..len]`
/// is written.
pub fn unpack_f16(
    rec: &mut Recorder<'_>,
    words: &GpuBuffer<u32>,
    len: usize,
    out: &GpuBuffer<f32>,
) -> Result<(), GpuError> {
    if len == 0 {
        return Ok(());
    }
    check_words("unpack_f16 words", words, len)?;
    check_len("unpack_f16 out", out, len)?;
    let params = F16PackParams {
        len: u32_of("unpack_f16 len", len)?,
        _p: [0; 3],
    };
    let (entry, per) = f16_pack_entry(false, len);
    rec.dispatch(
        &F16_PACK,
        entry,
        &[],
        &params,
        &[out.binding(), words.binding()],
        groups_1d(u32_of(
            "unpack_f16 workgroups",
            len.div_ceil(per).div_ceil(256),
        )?),
    )
}

/// `f16_pack.wgsl`'s entry point (`pack`: packing, else unpacking) for `len` elements and the
/// elements each invocation converts: four (`…_x4`) where `len` is a multiple of 4, else two.
fn f16_pack_entry(pack: bool, len: usize) -> (&'static str, usize) {
    match (pack, len.is_multiple_of(4)) {
        (true, true) => ("pack_f16_x4", 4),
        (true, false) => ("pack_f16", 2),
        (false, true) => ("unpack_f16_x4", 4),
        (false, false) => ("unpack_f16", 2),
    }
}

/// Whether [`gemm_coop`] can run here: f16 shaders and cooperative matrices granted.
pub fn coop_available(ctx: &GpuContext) -> bool {
    ctx.features.contains(wgpu::Features::SHADER_F16)
        && ctx
            .features
            .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
}

/// Whether the staged tensor-core kernels ([`CoopOp::Nt128`], [`CoopOp::Tn128`],
/// `gemm_staged_coop.wgsl`) can run here: [`coop_available`], subgroups granted and always 32 wide
/// (the kernel's 128 invocations must be four subgroups; NVIDIA, AMD RDNA in wave32-only drivers),
/// 20 KiB of workgroup memory and 128 invocations per workgroup. `GPTAQ_COOP_STAGED=0` turns them
/// off (the unstaged kernels are then chosen), for side-by-side timing.
pub fn coop_staged_available(ctx: &GpuContext) -> bool {
    coop_available(ctx)
        && ctx.features.contains(wgpu::Features::SUBGROUP)
        && ctx.summary.subgroup_sizes == (32, 32)
        && ctx.limits.max_compute_workgroup_storage_size >= 20 * 1024
        && ctx.limits.max_compute_invocations_per_workgroup >= 128
        && !staged_off()
}

/// `GPTAQ_COOP_STAGED=0`, read once: the kernel choice asks per dispatch.
fn staged_off() -> bool {
    crate::env_is!("GPTAQ_COOP_STAGED", "0")
}

/// Block rows per group of the staged kernel's grouped rasterisation of its full grid (`RASTER`
/// in `gemm_staged_coop.wgsl`: the order in which the workgroups take their blocks, so that the
/// blocks in flight share operand panels in L2; 0 or 1 keeps the grid's own order; the upper
/// entry's is [`coop_raster_upper`]). 8 by default: on an H100 a forward GEMM of
/// 32768 × 14336 × 4096 took 17.2 ms against 18.6 ms in the grid's order (BENCHMARKS.md
/// session 40). `GPTAQ_COOP_RASTER=N` sets it, read once; the order changes no block's sums, so
/// the products are the same bit for bit either way (`coop_raster_keeps_products` in
/// tests/gpu_kernels.rs).
pub fn coop_raster() -> u32 {
    static ROWS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| env_u32("GPTAQ_COOP_RASTER").unwrap_or(8))
}

/// [`coop_raster`] for the upper entry (the Hessian's and D's `Tn128Upper`, GPTAQ's
/// `Nt128UpperTail`) of an n-wide C: block columns per chunk of its triangle, each chunk taken
/// top-down in bands of as many block rows (0: the triangle's column order). By the width: 8 from
/// [`COOP_RASTER_UPPER_MIN_N`] columns on, else 0. On H100s at 32768 tokens the chunks took
/// n = 14336 from 27.0–27.5 to 25.4–26.0 ms (two hosts), left n = 8192 as it was (8.35 against
/// 8.21 ms, within the spread) and slowed n = 4096 from 1.97 to 2.06 ms (BENCHMARKS.md session
/// 41). `GPTAQ_COOP_RASTER_UPPER=N` sets it for every width, read once; the order changes no
/// block's sums (`coop_raster_keeps_products`).
pub fn coop_raster_upper(n: usize) -> u32 {
    static COLS: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    COLS.get_or_init(|| env_u32("GPTAQ_COOP_RASTER_UPPER"))
        .unwrap_or(if n >= COOP_RASTER_UPPER_MIN_N { 8 } else { 0 })
}

/// The narrowest C whose upper entry takes its triangle in chunks by default
/// ([`coop_raster_upper`]): between 8192 (no gain) and 14336 (6 % faster) columns; the widths in
/// between are unmeasured.
pub const COOP_RASTER_UPPER_MIN_N: usize = 12288;

fn env_u32(var: &str) -> Option<u32> {
    std::env::var(var).ok().and_then(|v| v.trim().parse().ok())
}

/// Operand layouts of the tensor-core GEMM (`C += op(A)·op(B)`, A and B dense f16 row-major).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CoopOp {
    /// A stored M×K, B stored K×N.
    Nn,
    /// A stored K×M (op(A) = Aᵀ: the Hessian's Xᵀ·X reads X itself), B stored K×N.
    Tn,
    /// A stored M×K, B stored N×K (op(B) = Bᵀ: a linear layer's `X·Wᵀ` reads W as it is).
    Nt,
    /// [`CoopOp::Nt`] with a 64×64 block per subgroup (M and N multiples of 64).
    Nt64,
    /// [`CoopOp::Nt`] staged through workgroup memory: 128×128 blocks of four subgroups, K in
    /// steps of 32, operands at offsets and strides that are multiples of 4
    /// ([`coop_staged_available`]).
    Nt128,
    /// [`CoopOp::Tn`] staged like [`CoopOp::Nt128`].
    Tn128,
    /// [`CoopOp::Nn`] staged like [`CoopOp::Nt128`] (attention's `P·V`).
    Nn128,
    /// [`CoopOp::Tn128`] on the blocks of a square C on and above the diagonal only: symmetric
    /// products (`Xᵀ·X`) at half the work. C's blocks below the diagonal are left as they were,
    /// and the diagonal blocks are computed whole; [`mirror_upper`] completes C.
    Tn128Upper,
    /// [`CoopOp::Nt128`] on the blocks of a square C on and above the diagonal only, each
    /// summing K only from its own first column on (M = N = K): the upper triangle of `A·Bᵀ`
    /// where B is upper triangular (`B[j, k] = 0` for k < j), at a sixth of the dense work —
    /// GPTAQ's `Dp·Uᵀ` (quant/gpu.rs `gptaq_a_split`). C's blocks below the diagonal are left as
    /// they were; within a block the terms of K before its first column are left out, so B's
    /// entries there are never read.
    Nt128UpperTail,
}

impl CoopOp {
    pub const ALL: [CoopOp; 9] = [
        CoopOp::Nn,
        CoopOp::Tn,
        CoopOp::Nt,
        CoopOp::Nt64,
        CoopOp::Nt128,
        CoopOp::Tn128,
        CoopOp::Tn128Upper,
        CoopOp::Nn128,
        CoopOp::Nt128UpperTail,
    ];
    /// The `X·Wᵀ` kernels, fastest first (the forward's linears and attention's `Q·Kᵀ` take the
    /// first that runs here and tiles the product).
    pub const NT: [CoopOp; 3] = [CoopOp::Nt128, CoopOp::Nt64, CoopOp::Nt];
    /// The `A·B` kernels (attention's `P·V`), fastest first.
    pub const NN: [CoopOp; 2] = [CoopOp::Nn128, CoopOp::Nn];

    /// The square block of C one workgroup computes.
    pub fn block(self) -> usize {
        match self {
            CoopOp::Nt128
            | CoopOp::Tn128
            | CoopOp::Tn128Upper
            | CoopOp::Nn128
            | CoopOp::Nt128UpperTail => 128,
            CoopOp::Nt64 => 64,
            _ => 32,
        }
    }

    /// K must be a multiple of this.
    pub fn k_step(self) -> usize {
        if self.staged() { 32 } else { 16 }
    }

    /// K (each half's depth) must be a multiple of this for the products of split operands
    /// ([`CoopOperand::split`]): 16 on the staged kernels, which stage 16 of each half per step;
    /// `None` for the unstaged ones, which take split operands as three products or one with K
    /// tripled (quant/gpu.rs `gptaq_a_split`, quant/flush.rs).
    pub fn split_k_step(self) -> Option<usize> {
        self.staged().then_some(16)
    }

    /// Whether this is a staged kernel (`gemm_staged_coop.wgsl`, [`coop_staged_available`]).
    pub fn staged(self) -> bool {
        matches!(
            self,
            CoopOp::Nt128
                | CoopOp::Tn128
                | CoopOp::Tn128Upper
                | CoopOp::Nn128
                | CoopOp::Nt128UpperTail
        )
    }

    fn entry(self) -> &'static str {
        match self {
            CoopOp::Nn => "gemm_coop_nn",
            CoopOp::Tn => "gemm_coop_tn",
            CoopOp::Nt => "gemm_coop_nt",
            CoopOp::Nt64 => "gemm_coop_nt64",
            // One staged kernel for every layout, specialised by `staged_constants`.
            CoopOp::Nt128 | CoopOp::Tn128 | CoopOp::Nn128 => "gemm_coop_128",
            CoopOp::Tn128Upper | CoopOp::Nt128UpperTail => "gemm_coop_128_upper",
        }
    }

    /// The staged kernel's override constants for this layout (`A_T`, `B_T` in
    /// `gemm_staged_coop.wgsl`), for adding to C or overwriting it (`ACCUMULATE`) and for the
    /// grid's order ([`coop_raster`], [`coop_raster_upper`] of the n-wide C); none for the
    /// unstaged kernels, which always add.
    fn staged_constants(self, n: usize, accumulate: bool, split: bool) -> Vec<(&'static str, f64)> {
        if !self.staged() {
            return Vec::new();
        }
        let (ta, tb) = self.transposes();
        let mut c = vec![
            ("A_T", f64::from(u8::from(ta))),
            ("B_T", f64::from(u8::from(tb))),
            ("ACCUMULATE", f64::from(u8::from(accumulate))),
        ];
        if self == CoopOp::Nt128UpperTail {
            c.push(("K_FROM_COL", 1.0));
        }
        let raster = if self.entry() == "gemm_coop_128" {
            coop_raster()
        } else {
            coop_raster_upper(n)
        };
        if raster > 1 {
            c.push(("RASTER", f64::from(raster)));
        }
        if split {
            c.push(("SPLIT", 1.0));
        }
        c
    }

    /// Whether A is stored K×M (transposed) and B N×K (transposed).
    pub fn transposes(self) -> (bool, bool) {
        match self {
            CoopOp::Nn | CoopOp::Nn128 => (false, false),
            CoopOp::Tn | CoopOp::Tn128 | CoopOp::Tn128Upper => (true, false),
            CoopOp::Nt | CoopOp::Nt64 | CoopOp::Nt128 | CoopOp::Nt128UpperTail => (false, true),
        }
    }

    /// Row strides of the stored A and B when dense.
    fn strides(self, m: usize, n: usize, k: usize) -> (usize, usize) {
        let (ta, tb) = self.transposes();
        (if ta { m } else { k }, if tb { k } else { n })
    }

    /// Whether this kernel can run on `ctx` at all.
    pub fn available(self, ctx: &GpuContext) -> bool {
        if self.staged() {
            coop_staged_available(ctx)
        } else {
            coop_available(ctx)
        }
    }
}

/// Whether `op`'s blocks and K steps tile an M×N×K product exactly (the staged kernels also need
/// offsets and strides that are multiples of 4: [`check_coop_batched`]; [`CoopOp::Tn128Upper`] a
/// square C, [`CoopOp::Nt128UpperTail`] also K = N).
pub fn coop_shape_ok_for(op: CoopOp, m: usize, n: usize, k: usize) -> bool {
    coop_tiles(op, (m, n, k), op.k_step())
}

/// [`coop_shape_ok_for`] for split operands ([`CoopOperand::split`]; K is each half's depth):
/// staged kernels only, K a multiple of [`CoopOp::split_k_step`].
pub fn coop_split_shape_ok_for(op: CoopOp, m: usize, n: usize, k: usize) -> bool {
    op.split_k_step()
        .is_some_and(|ks| coop_tiles(op, (m, n, k), ks))
}

/// Whether `op`'s blocks and K steps of `k_step` tile the product exactly.
fn coop_tiles(op: CoopOp, (m, n, k): (usize, usize, usize), k_step: usize) -> bool {
    let b = op.block();
    (op != CoopOp::Tn128Upper || m == n)
        && (op != CoopOp::Nt128UpperTail || (m == n && k == n))
        && m > 0
        && n > 0
        && k > 0
        && m.is_multiple_of(b)
        && n.is_multiple_of(b)
        && k.is_multiple_of(k_step)
}

/// One f16 operand of [`gemm_coop_batched`]: stored row-major from element `off` of `buf`, rows
/// `ld` elements apart; inner batch entry z reads the one starting `(z / group)·stride` elements
/// later (`group` > 1: that many consecutive entries share an operand, as the query heads of one
/// key/value head share its K and V), and outer entry o ([`CoopBatch`]) `o·outer` elements later
/// again (the next sequence).
#[derive(Clone, Copy)]
pub struct CoopOperand<'a> {
    pub buf: &'a GpuBuffer<half::f16>,
    pub off: usize,
    pub ld: usize,
    pub stride: usize,
    pub group: usize,
    pub outer: usize,
    /// A split-f16 operand's lo half: the same layout, starting this many elements after the hi
    /// half it is read with ([`CoopOperand::split`]).
    pub lo: Option<usize>,
}

impl<'a> CoopOperand<'a> {
    /// A single operand (batch stride 0) with rows `ld` apart.
    pub fn new(buf: &'a GpuBuffer<half::f16>, off: usize, ld: usize) -> Self {
        Self {
            buf,
            off,
            ld,
            stride: 0,
            group: 1,
            outer: 0,
            lo: None,
        }
    }

    /// This operand as the hi half of a split-f16 pair (`split_f16.wgsl`) whose lo half starts
    /// `lo` elements later in the same buffer. With both operands split, a staged kernel adds
    /// `op(Ah)·op(Bh) + op(Ah)·op(Bl) + op(Al)·op(Bh)` to C in one launch
    /// (`gemm_staged_coop.wgsl`'s `SPLIT`; [`CoopOp::split_k_step`]).
    pub fn split(mut self, lo: usize) -> Self {
        self.lo = Some(lo);
        self
    }

    /// Batch entries `stride` elements apart, `group` consecutive entries per operand.
    pub fn batched(mut self, stride: usize, group: usize) -> Self {
        self.stride = stride;
        self.group = group;
        self
    }

    /// Outer batch entries `stride` elements apart.
    pub fn outer(mut self, stride: usize) -> Self {
        self.outer = stride;
        self
    }
}

/// The products of one [`gemm_coop_batched`] dispatch: `outer × inner` of them (workgroup
/// z = o·inner + i), with C's entries `c_stride` elements apart within an outer entry and
/// `c_outer` apart between them. Attention batches the heads (inner) of several sequences
/// (outer); everything else is flat (one outer entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopBatch {
    pub outer: usize,
    pub inner: usize,
    pub c_stride: usize,
    pub c_outer: usize,
}

impl CoopBatch {
    /// `count` products, C's `c_stride` elements apart.
    pub fn flat(count: usize, c_stride: usize) -> Self {
        Self {
            outer: 1,
            inner: count,
            c_stride,
            c_outer: 0,
        }
    }

    /// `outer` groups of `inner` products.
    pub fn nested(outer: usize, inner: usize, c_stride: usize, c_outer: usize) -> Self {
        Self {
            outer,
            inner,
            c_stride,
            c_outer,
        }
    }

    /// All products.
    pub fn count(&self) -> usize {
        self.outer * self.inner
    }
}

/// The coop kernels' parameter block (`Params` in `gemm_coop.wgsl` and `gemm_staged_coop.wgsl`).
/// Public for the kernel lab (`benches/kernels.rs`), which dispatches variant kernels with it.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct CoopParams {
    m: u32,
    n: u32,
    k: u32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    off_a: u32,
    off_b: u32,
    off_c: u32,
    sa: u32,
    sb: u32,
    sc: u32,
    ga: u32,
    gb: u32,
    zi: u32,
    xa: u32,
    xb: u32,
    xc: u32,
    /// Split operands' lo halves, elements after their hi halves (`gemm_staged_coop.wgsl`).
    la: u32,
    lb: u32,
}

impl CoopParams {
    /// One dense product `C[M×N] += op(A)·op(B)` from element 0 of each buffer, with row strides
    /// `lda`, `ldb`, `ldc` (no batch).
    pub fn dense(
        shape: (usize, usize, usize),
        lds: (usize, usize, usize),
    ) -> Result<Self, GpuError> {
        let [m, n, k, lda, ldb, ldc] = dense_dims(shape, lds)?;
        Ok(Self {
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
            ga: 1,
            gb: 1,
            zi: 1,
            ..Self::zeroed()
        })
    }
}

/// Records `C += op(A)·op(B)` (`accumulate`) or `C = op(A)·op(B)` on tensor cores: A, B dense f16
/// row-major in the layout `op` names, read from element offsets `off_a` / `off_b`; C an f32 view.
/// For shapes [`coop_shape_ok_for`] accepts, on adapters where [`coop_available`]; everything else
/// is the caller's f32 [`gemm`]. Overwriting, the staged kernels start their accumulators at zero
/// instead of loading C, so C is neither cleared first nor read (per Llama-3-8B GPTQ layer on an
/// H100 the forward's clears went from 39 to 25 ms and its tensor-core GEMMs from 760 to 743 ms,
/// BENCHMARKS.md session 29); for the unstaged ones (which always add) C's rows are cleared first.
pub fn gemm_coop(
    rec: &mut Recorder<'_>,
    op: CoopOp,
    (m, n, k): (usize, usize, usize),
    a: (&GpuBuffer<half::f16>, usize),
    b: (&GpuBuffer<half::f16>, usize),
    c: MatView<'_>,
    accumulate: bool,
) -> Result<(), GpuError> {
    let (lda, ldb) = op.strides(m, n, k);
    let (a, b) = (
        CoopOperand::new(a.0, a.1, lda),
        CoopOperand::new(b.0, b.1, ldb),
    );
    let batch = CoopBatch::flat(1, 0);
    if !accumulate && !op.staged() {
        // The unstaged kernels always add: C's rows are cleared for them.
        check_coop_batched(op, (m, n, k), &batch, &a, &b, &c)?;
        if c.ld == n {
            rec.clear(c.buf, c.offset, m * n)?;
        } else {
            for i in 0..m {
                rec.clear(c.buf, c.offset + i * c.ld, n)?;
            }
        }
    }
    gemm_coop_dispatch(rec, op, (m, n, k), batch, a, b, c, accumulate)
}

/// The shape and extent checks of [`gemm_coop_batched`] (everything but the adapter's features):
/// exact block tiling, strides at least a row, every batch entry inside its buffer. Public so that
/// a stand-in for the kernel (the tests' host emulation) refuses exactly what the kernel refuses.
pub fn check_coop_batched(
    op: CoopOp,
    (m, n, k): (usize, usize, usize),
    batch: &CoopBatch,
    a: &CoopOperand<'_>,
    b: &CoopOperand<'_>,
    c: &MatView<'_>,
) -> Result<(), GpuError> {
    let split = match (a.lo, b.lo) {
        (None, None) => false,
        (Some(_), Some(_)) => true,
        _ => {
            return Err(GpuError::Validation(format!(
                "tensor-core GEMM {op:?}: split operands come in pairs (A lo {:?}, B lo {:?})",
                a.lo, b.lo
            )));
        }
    };
    let blk = op.block();
    let ks = match (split, op.split_k_step()) {
        (false, _) => op.k_step(),
        (true, Some(ks)) => ks,
        (true, None) => {
            return Err(GpuError::Validation(format!(
                "tensor-core GEMM {op:?} takes no split operands (staged kernels only)"
            )));
        }
    };
    if !coop_tiles(op, (m, n, k), ks) || c.trans || c.ld < n || batch.count() == 0 {
        return Err(GpuError::Validation(format!(
            "tensor-core GEMM {op:?} takes M, N multiples of {blk} and K of {ks}, ldc ≥ N (got \
             {m}x{n}x{k}, ldc {}, batch {batch:?})",
            c.ld
        )));
    }
    // Stored (rows, cols) of A and B.
    let (ta, tb) = op.transposes();
    let sa = if ta { (k, m) } else { (m, k) };
    let sb = if tb { (n, k) } else { (k, n) };
    for (what, x, (rows, cols)) in [("A", a, sa), ("B", b, sb)] {
        // The staged kernels read 4 halves (8 bytes) at a time.
        let lo = x.lo.unwrap_or(0);
        if op.staged()
            && [x.off, x.ld, x.stride, x.outer, lo]
                .iter()
                .any(|v| !v.is_multiple_of(4))
        {
            return Err(GpuError::Validation(format!(
                "staged tensor-core GEMM {what}: offset {}, row stride {}, batch strides {} / {} \
                 and lo offset {lo} must be multiples of 4",
                x.off, x.ld, x.stride, x.outer
            )));
        }
        // Offsets grow with both batch indices: the last entry reaches furthest (its lo half
        // `lo` elements further still).
        let need = x.off
            + lo
            + (batch.outer - 1) * x.outer
            + (batch.inner - 1) / x.group.max(1) * x.stride
            + (rows - 1) * x.ld
            + cols;
        if x.ld < cols || x.group == 0 || x.buf.len() < need {
            return Err(GpuError::Validation(format!(
                "tensor-core GEMM {what} ({rows}×{cols}, ld {}, offset {}, batch {} × {} of {} \
                 × {}): {} elements, needs {need}",
                x.ld,
                x.off,
                batch.outer,
                x.outer,
                batch.inner,
                x.stride,
                x.buf.len()
            )));
        }
    }
    check_len(
        "gemm_coop C",
        c.buf,
        c.offset
            + (batch.outer - 1) * batch.c_outer
            + (batch.inner - 1) * batch.c_stride
            + (m - 1) * c.ld
            + n,
    )?;
    Ok(())
}

/// [`gemm_coop`] over the products of `batch` at once (workgroup z = o·inner + i), each operand
/// with its own row and batch strides: `C_z += op(A_z)·op(B_z)`, with `A_z` starting
/// `o·outer + (i / group)·stride` elements after A's first ([`CoopOperand`]), likewise `B_z`, and
/// `C_z` `o·c_outer + i·c_stride` after C's ([`CoopBatch`]). Attention's heads are such a batch:
/// per key/value head, the query heads of its group read strided column slices of one activation
/// matrix, and the sequences of a pass are the outer entries. With `accumulate` false the staged
/// kernels overwrite each `C_z` (`C_z = op(A_z)·op(B_z)`, C never read); the unstaged ones only
/// add, and refuse it (the caller clears C for them).
#[allow(clippy::too_many_arguments)]
pub fn gemm_coop_batched(
    rec: &mut Recorder<'_>,
    op: CoopOp,
    shape: (usize, usize, usize),
    batch: CoopBatch,
    a: CoopOperand<'_>,
    b: CoopOperand<'_>,
    c: MatView<'_>,
    accumulate: bool,
) -> Result<(), GpuError> {
    if !accumulate && !op.staged() {
        return Err(GpuError::Validation(format!(
            "tensor-core GEMM {op:?} only adds into C: clear C and accumulate"
        )));
    }
    gemm_coop_dispatch(rec, op, shape, batch, a, b, c, accumulate)
}

/// [`gemm_coop_batched`], adding to C or (staged kernels only; [`gemm_coop`] clears C
/// for the others) overwriting it.
#[allow(clippy::too_many_arguments)]
fn gemm_coop_dispatch(
    rec: &mut Recorder<'_>,
    op: CoopOp,
    (m, n, k): (usize, usize, usize),
    batch: CoopBatch,
    a: CoopOperand<'_>,
    b: CoopOperand<'_>,
    c: MatView<'_>,
    accumulate: bool,
) -> Result<(), GpuError> {
    if !op.available(rec.ctx()) {
        return Err(GpuError::Validation(format!(
            "tensor-core GEMM {op:?} needs SHADER_F16 and EXPERIMENTAL_COOPERATIVE_MATRIX{}",
            if op.staged() {
                ", subgroups of 32 and 20 KiB of workgroup memory"
            } else {
                ""
            }
        )));
    }
    check_coop_batched(op, (m, n, k), &batch, &a, &b, &c)?;
    let count = batch.count();
    let blk = op.block();
    let params = CoopParams {
        off_a: u32_of("gemm A offset", a.off)?,
        off_b: u32_of("gemm B offset", b.off)?,
        off_c: u32_of("gemm C offset", c.offset)?,
        sa: u32_of("gemm A batch stride", a.stride)?,
        sb: u32_of("gemm B batch stride", b.stride)?,
        sc: u32_of("gemm C batch stride", batch.c_stride)?,
        ga: u32_of("gemm A batch group", a.group)?,
        gb: u32_of("gemm B batch group", b.group)?,
        zi: u32_of("gemm inner batch", batch.inner)?,
        xa: u32_of("gemm A outer batch stride", a.outer)?,
        xb: u32_of("gemm B outer batch stride", b.outer)?,
        xc: u32_of("gemm C outer batch stride", batch.c_outer)?,
        la: u32_of("gemm A lo offset", a.lo.unwrap_or(0))?,
        lb: u32_of("gemm B lo offset", b.lo.unwrap_or(0))?,
        ..CoopParams::dense((m, n, k), (a.ld, b.ld, c.ld))?
    };
    let groups = if matches!(op, CoopOp::Tn128Upper | CoopOp::Nt128UpperTail) {
        let nb = n / blk;
        let tri = u32::try_from(nb * (nb + 1) / 2).unwrap_or(u32::MAX);
        [tri, 1, count as u32]
    } else {
        [(n / blk) as u32, (m / blk) as u32, count as u32]
    };
    if groups.iter().any(|&g| g > 65535) || count > 65535 {
        return Err(GpuError::TooLarge {
            what: format!("tensor-core gemm {m}x{n} batch {count} grid"),
            bytes: (m * n * 4) as u64,
            limit: 65535 * blk as u64,
        });
    }
    rec.dispatch(
        if op.staged() {
            &GEMM_STAGED_COOP
        } else {
            &GEMM_COOP
        },
        op.entry(),
        &op.staged_constants(n, accumulate, a.lo.is_some()),
        &params,
        &[a.buf.binding(), b.buf.binding(), c.buf.binding()],
        groups,
    )
}

#[cfg(test)]
mod tests {
    use super::KSkip;

    /// Whether op(A)[i, l] / op(B)[l, j] are declared zero, in the coordinates the shifts are in.
    fn zero_a(s: &KSkip, i: i64, l: i64) -> bool {
        s.a_upper.is_some_and(|v| l < i + v) || s.a_lower.is_some_and(|v| l > i + v)
    }
    fn zero_b(s: &KSkip, l: i64, j: i64) -> bool {
        s.b_upper.is_some_and(|v| l > j + v) || s.b_lower.is_some_and(|v| l < j + v)
    }

    /// A panel launch covering rows from m0, columns from n0 and k from k0 declares exactly the
    /// zeros of the whole product, in its own coordinates.
    #[test]
    fn moved_skip_declares_the_same_zeros_in_launch_coordinates() {
        let shifts = [None, Some(-5), Some(0), Some(1), Some(7)];
        for (t, &(m0, n0, k0)) in [(0, 0, 0), (3, 0, 5), (0, 6, 2), (4, 9, 0), (7, 2, 11)]
            .iter()
            .enumerate()
        {
            let whole = KSkip {
                a_upper: shifts[t % 5],
                a_lower: shifts[(t + 2) % 5],
                b_upper: shifts[(t + 1) % 5],
                b_lower: shifts[(t + 3) % 5],
            };
            let local = whole.moved(m0, n0, k0);
            for i in 0..12i64 {
                for l in 0..12i64 {
                    let g = (i + m0 as i64, l + k0 as i64);
                    assert_eq!(
                        zero_a(&local, i, l),
                        zero_a(&whole, g.0, g.1),
                        "A ({i}, {l}) of the launch at ({m0}, {n0}, {k0}), {whole:?} → {local:?}"
                    );
                    let g = (l + k0 as i64, i + n0 as i64);
                    assert_eq!(
                        zero_b(&local, l, i),
                        zero_b(&whole, g.0, g.1),
                        "B ({l}, {i}) of the launch at ({m0}, {n0}, {k0}), {whole:?} → {local:?}"
                    );
                }
            }
        }
    }
}
