//! GPTAQ's pending flushes on the tensor cores, `G[:, c0..] += Q·A[first.., c0..]`, from
//! split-f16 operands (quant/gpu.rs's module docs, step 3; algorithm.md §2.2).
//!
//! With the deferred P (`PForm::Deferred`) the sweep keeps GPTAQ's pending terms in G (rows × n).
//! After every `L` blocks ([`super::gpu::lazy_blocks`]) their final values Q (K = L·block
//! columns, left negated by the sweep) times the matching rows of `A = α·triu₁(Dp·Uᵀ)` reach all
//! later columns of G: as many multiply-adds as GPTQ's own lazy update `W −= E·U`, and in f32
//! the largest part of what GPTAQ adds to the solve after A itself (23.9 ms of a 4096 × 14336
//! solve on an H100, BENCHMARKS.md session 33). Here it runs on the tensor cores at close to f32
//! accuracy, the way GPTAQ's A does (`split_f16.wgsl`): each operand as two f16 halves,
//! `X·2^s ≈ Xh + Xl` and `Y·2^−s ≈ Yh + Yl` (X = −Q, Y = A), and one product with K tripled,
//!
//! ```text
//! C −= X·Y:   C += [Xh | Xh | Xl] · [Yh; Yl; Yh]  with X negated in the halves
//!                 (= Xh·Yh + Xh·Yl + Xl·Yh; Xl·Yl, below 2^−22, dropped)
//! ```
//!
//! accumulated in f32 straight into C = G. On the staged kernels the three products run
//! interleaved instead, K = k, each 16-deep step staging both halves of both operands
//! (`gemm_staged_coop.wgsl`'s `SPLIT`, [`super::gpu::split_fused`]): the same sums in another
//! order, a third fewer loads and barriers (27 flushes of a 4096 × 14336 solve on an H100: 13.9
//! → 10.8 ms, BENCHMARKS.md session 39). The tensor cores cannot scale what they add, so the
//! two powers of two cancel: s comes from both operands' largest magnitudes, on the GPU, per
//! flush (`split_f16.wgsl`'s `pair_exp`), and nothing is read back.
//!
//! Accumulating into C has a cost in accuracy that the split does not: the tensor cores add each
//! 16-deep step's products to C with truncation (measured on the H100, session 34: 4 ulps of G
//! after 24 steps where the products were tiny), so the error is relative to C's own magnitude,
//! up to about an ulp of C per step and biased towards zero. For G — GPTAQ's correction, small
//! beside W, and reaching W only through U — that is far below the split A's own error. W's lazy
//! update `W −= E·U` could take the same path (it saved 10 ms of GPTQ's 4096 × 14336 solve), but
//! there the bias would shrink W itself, by up to 3·10⁻⁴ over a 14336-wide module's 27 flushes
//! of 96 steps, before it is quantized: W's updates stay f32. So do the per-block catch-ups (K
//! below L·block, N = one block) and the deferred P's in-block products.

use super::gpu::{SPLIT_F16, split_fused};
use crate::gpu::kernels::{Recorder, groups_1d};
use crate::gpu::ops::{self, CoopOp, CoopOperand, MatView, u32_of};
use crate::gpu::{GpuBuffer, GpuContext, GpuError, GpuMatrix};
use bytemuck::{Pod, Zeroable};

/// `split_f16.wgsl`'s `PairParams`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct PairParams {
    rows: u32,
    cols: u32,
    src: u32,
    ld: u32,
    dst: u32,
    dld: u32,
    hi2: u32,
    lo: u32,
    slot: u32,
    role: u32,
    sign: f32,
    _p: u32,
}

/// One f32 operand view for [`FlushSplit`]'s kernels: `rows` × `cols` from element `src` of
/// `buf`, rows `ld` apart.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub buf: &'a GpuBuffer<f32>,
    pub src: usize,
    pub ld: usize,
    pub rows: usize,
    pub cols: usize,
}

/// The split operands of one solve's pending flushes (module docs) and the kernel they feed.
pub(crate) struct FlushSplit {
    op: CoopOp,
    rows: usize,
    n: usize,
    /// Columns of X per flush (L·block).
    k: usize,
    /// `[Xh | Xh | Xl]`, rows × 3k.
    x: GpuBuffer<half::f16>,
    /// `[Yh; Yl; Yh]`, 3k × n (columns from each flush's `c0` on are written).
    y: GpuBuffer<half::f16>,
    /// Two largest magnitudes (as f32 bits) per flush: X's, then Y's rows'.
    maxima: GpuBuffer<u32>,
}

impl FlushSplit {
    /// Bytes of the operands for `rows` × `n` with `k` columns per flush (the memory plan's).
    pub(crate) fn bytes(rows: usize, n: usize, k: usize) -> u64 {
        3 * k as u64 * (rows + n) as u64 * 2
    }

    /// The tensor-core kernel for flushes of `k` columns of a `rows` × `n` solve, starting at
    /// multiples of `k` — where one runs here, every flush's product tiles it (rows, n and k
    /// multiples of the kernel's block, K = 3k of its step) and the operands' offsets are whole
    /// vectors; `None` otherwise (the flushes then stay f32).
    pub(crate) fn kernel(ctx: &GpuContext, rows: usize, n: usize, k: usize) -> Option<CoopOp> {
        CoopOp::NN.into_iter().find(|&op| {
            op.available(ctx)
                && k.is_multiple_of(op.block())
                && ops::coop_shape_ok_for(op, rows, n, 3 * k)
        })
    }

    /// The operands for `flushes` flushes of `k` columns each, or `None` where no kernel applies
    /// ([`FlushSplit::kernel`]) or `GPTAQ_SPLIT_FLUSH=0`.
    pub(crate) fn new(
        ctx: &GpuContext,
        (rows, n, k): (usize, usize, usize),
        flushes: usize,
    ) -> Result<Option<Self>, GpuError> {
        // `GPTAQ_SPLIT_FLUSH=0`: the f32 GEMMs (A/B runs on a GPU machine).
        let off = crate::env_is!("GPTAQ_SPLIT_FLUSH", "0");
        match Self::kernel(ctx, rows, n, k).filter(|_| !off && flushes > 0) {
            Some(op) => Self::with_kernel(ctx, op, (rows, n, k), flushes).map(Some),
            None => Ok(None),
        }
    }

    /// The operands for `flushes` flushes with kernel `op` (not checked against the adapter:
    /// the tests split on any).
    fn with_kernel(
        ctx: &GpuContext,
        op: CoopOp,
        (rows, n, k): (usize, usize, usize),
        flushes: usize,
    ) -> Result<Self, GpuError> {
        Ok(Self {
            op,
            rows,
            n,
            k,
            x: ctx.scratch::<half::f16>("flush X halves", rows * 3 * k)?,
            y: ctx.scratch::<half::f16>("flush Y halves", 3 * k * n)?,
            maxima: ctx.zeros::<u32>("flush maxima", 2 * flushes)?,
        })
    }

    /// Records flush `f` (its own two maxima): `C[:, c0..n] −= X·Y[first..first + k, c0..n]` with
    /// X a `rows` × k view (the sweep's −Q slots) and Y's rows from `y` (n × n panels: A), C = G.
    pub(crate) fn flush(
        &self,
        rec: &mut Recorder<'_>,
        f: usize,
        x: View<'_>,
        y: &GpuMatrix,
        (first, c0): (usize, usize),
        c: &GpuBuffer<f32>,
    ) -> Result<(), GpuError> {
        let (rows, n, k) = (self.rows, self.n, self.k);
        let width = n.saturating_sub(c0);
        if !ops::coop_shape_ok_for(self.op, rows, width, 3 * k) || c.len() < rows * n {
            return Err(GpuError::Validation(format!(
                "split flush {f}: {rows}×{width}×{} with {:?}, C of {} floats for {rows}×{n}",
                3 * k,
                self.op,
                c.len()
            )));
        }
        // A staged kernel reads the halves as split operands: K = k, hi·hi + hi·lo + lo·hi in one
        // pass (`gemm_staged_coop.wgsl`'s `SPLIT`), and the second copy of hi goes unread.
        let fused = split_fused() && ops::coop_split_shape_ok_for(self.op, rows, width, k);
        self.halves(rec, f, x, y, (first, c0), fused)?;
        let (xo, yo) = (
            CoopOperand::new(&self.x, 0, 3 * k),
            CoopOperand::new(&self.y, c0, n),
        );
        let (kk, xo, yo) = if fused {
            (k, xo.split(2 * k), yo.split(k * n))
        } else {
            (3 * k, xo, yo)
        };
        ops::gemm_coop_batched(
            rec,
            self.op,
            (rows, width, kk),
            ops::CoopBatch::flat(1, 0),
            xo,
            yo,
            MatView::new(c, n).at(c0),
            true,
        )
    }

    /// Flush `f`'s halves: both maxima, then `[Xh | Xh | Xl]` (X negated) and `[Yh; Yl; Yh]`
    /// (columns c0..); `fused`: the second copies of hi are not written (nothing reads them).
    fn halves(
        &self,
        rec: &mut Recorder<'_>,
        f: usize,
        x: View<'_>,
        y: &GpuMatrix,
        (first, c0): (usize, usize),
        fused: bool,
    ) -> Result<(), GpuError> {
        let (rows, n, k) = (self.rows, self.n, self.k);
        let width = n.saturating_sub(c0);
        let whole = |v: usize| v.is_multiple_of(4);
        if x.rows != rows
            || x.cols != k
            || x.ld < k
            || x.src + rows.saturating_sub(1) * x.ld + k > x.buf.len()
            || y.cols() != n
            || first + k > y.rows()
            || 2 * f + 1 >= self.maxima.len()
            || width == 0
            || ![k, c0, n, x.src, x.ld].into_iter().all(whole)
        {
            return Err(GpuError::Validation(format!(
                "split flush {f}: X {}×{} from {} (stride {}; want {rows}×{k}), Y rows {first}.. \
                 of {}×{}, columns {c0}..{n}",
                x.rows,
                x.cols,
                x.src,
                x.ld,
                y.rows(),
                y.cols()
            )));
        }
        let slot = u32_of("flush slot", 2 * f)?;
        // Y's rows first..first + k, columns c0.., per panel: as views, and where their halves go.
        let mut y_views = Vec::new();
        for (p, r) in y.segments(first..first + k) {
            let local = r.start - y.panel_range(p).start;
            y_views.push((
                View {
                    buf: &y.panels()[p],
                    src: local * n + c0,
                    ld: n,
                    rows: r.len(),
                    cols: width,
                },
                (r.start - first) * n + c0,
            ));
        }
        // X (role 0, negated) then Y (role 1): hi twice and lo, laid out as the product reads them
        // (`fused`: hi once, a second-copy offset of 0 meaning none).
        let (x_hi2, y_hi2) = if fused { (0, 0) } else { (k, 2 * k * n) };
        let x_part = [(x, 0usize, (3 * k, x_hi2, 2 * k), 0u32, -1.0f32)];
        let y_part = y_views
            .iter()
            .map(|&(v, dst)| (v, dst, (n, y_hi2, k * n), 1u32, 1.0f32));
        let parts: Vec<_> = x_part.into_iter().chain(y_part).collect();
        // Both maxima are complete before either operand is split (dispatches run in order).
        for entry in ["absmax_view", "split_pair"] {
            for &(v, dst, (dld, hi2, lo), role, sign) in &parts {
                let params = PairParams {
                    rows: u32_of("flush rows", v.rows)?,
                    cols: u32_of("flush columns", v.cols)?,
                    src: u32_of("flush offset", v.src)?,
                    ld: u32_of("flush stride", v.ld)?,
                    dst: u32_of("flush halves offset", dst)?,
                    dld: u32_of("flush halves stride", dld)?,
                    hi2: u32_of("flush halves offset", hi2)?,
                    lo: u32_of("flush halves offset", lo)?,
                    slot,
                    role,
                    sign,
                    _p: 0,
                };
                let out = if role == 0 { &self.x } else { &self.y };
                let mut bindings = vec![v.buf.binding(), self.maxima.binding()];
                if entry == "split_pair" {
                    bindings.push(out.binding());
                }
                let vecs = v.rows * v.cols / 4;
                rec.dispatch(
                    &SPLIT_F16,
                    entry,
                    &[],
                    &params,
                    &bindings,
                    groups_1d(u32_of("flush workgroups", vecs.div_ceil(256))?),
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{FlushSplit, View};
    use crate::gpu::GpuContext;
    use crate::gpu::ops::CoopOp;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// One flush's operands on the host: Q (`rows` × k) and A (n × n) at two magnitudes, and where
    /// the flush reads them.
    struct Problem {
        rows: usize,
        n: usize,
        k: usize,
        first: usize,
        c0: usize,
        /// Q itself (the sweep's slots hold −Q).
        q: Vec<f64>,
        a: Vec<f64>,
    }

    impl Problem {
        fn new(
            rng: &mut ChaCha8Rng,
            (rows, n, k): (usize, usize, usize),
            first: usize,
            c0: usize,
            (qm, am): (f64, f64),
        ) -> Self {
            let mut draw = |len: usize, m: f64| -> Vec<f64> {
                // f32 values over six binary orders of magnitude, both signs.
                (0..len)
                    .map(|_| {
                        let v =
                            m * rng.random_range(-1.0f64..1.0) * 2f64.powi(-rng.random_range(0..6));
                        f64::from(v as f32)
                    })
                    .collect()
            };
            let q = draw(rows * k, qm);
            let a = draw(n * n, am);
            Self {
                rows,
                n,
                k,
                first,
                c0,
                q,
                a,
            }
        }

        /// Q·A[first.., c0..] in f64 at (r, j) (j counted from c0), and the sum of the magnitudes
        /// of its terms.
        fn product(&self, r: usize, j: usize) -> (f64, f64) {
            (0..self.k).fold((0.0, 0.0), |(s, b), kk| {
                let t = self.q[r * self.k + kk] * self.a[(self.first + kk) * self.n + self.c0 + j];
                (s + t, b + t.abs())
            })
        }

        /// The halves' floor at (r, j) of the product (j counted from c0) with Q scaled by
        /// `scale` and A by its inverse: 2^−24 in scaled units per operand entry, times the other
        /// operand's entry.
        fn floor(&self, r: usize, j: usize, scale: f64) -> f64 {
            (0..self.k)
                .map(|kk| {
                    let a = self.a[(self.first + kk) * self.n + self.c0 + j];
                    2f64.powi(-24) * (a.abs() / scale + self.q[r * self.k + kk].abs() * scale)
                })
                .sum()
        }

        /// The largest magnitudes of Q and of the rows and columns of A the flush reads.
        fn maxima(&self) -> (f32, f32) {
            let mq = self.q.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let ma = (self.first..self.first + self.k)
                .flat_map(|i| (self.c0..self.n).map(move |j| (i, j)))
                .fold(0.0f64, |m, (i, j)| m.max(self.a[i * self.n + j].abs()));
            (mq as f32, ma as f32)
        }

        /// The sweep's error buffer: `rows` × 2k, E (NaN: never read) then −Q.
        fn err_buffer(&self) -> Vec<f32> {
            let mut e = vec![f32::NAN; self.rows * 2 * self.k];
            for r in 0..self.rows {
                for kk in 0..self.k {
                    e[r * 2 * self.k + self.k + kk] = -(self.q[r * self.k + kk] as f32);
                }
            }
            e
        }

        /// A with NaN outside the rows and columns the flush reads.
        fn poisoned_a(&self) -> Vec<f32> {
            (0..self.n * self.n)
                .map(|x| {
                    let (i, j) = (x / self.n, x % self.n);
                    let inside = (self.first..self.first + self.k).contains(&i) && j >= self.c0;
                    if inside { self.a[x] as f32 } else { f32::NAN }
                })
                .collect()
        }
    }

    /// `split_f16.wgsl`'s `pair_exp` on the host: frexp exponents (m = f·2^e, f ∈ [0.5, 1); 0
    /// for m = 0) meeting halfway, Q's bounded by 2^15.
    fn pair_exp(mq: f32, ma: f32) -> i32 {
        let e = |m: f32| {
            if m == 0.0 {
                0
            } else {
                m.log2().floor() as i32 + 1
            }
        };
        let (eq, ea) = (e(mq), e(ma));
        ((ea - eq) >> 1).min(15 - eq)
    }

    fn upload(
        ctx: &GpuContext,
        p: &Problem,
        panel_rows: usize,
    ) -> Result<(crate::gpu::GpuBuffer<f32>, crate::gpu::GpuMatrix), crate::gpu::GpuError> {
        let gerr = ctx.upload("errors", &p.err_buffer())?;
        ctx.set_panel_cap((panel_rows > 0).then_some((panel_rows * p.n * 4) as u64));
        let ga = ctx.matrix_upload("A", &p.poisoned_a(), p.n, p.n, 4);
        ctx.set_panel_cap(None);
        Ok((gerr, ga?))
    }

    fn neg_q<'a>(p: &Problem, gerr: &'a crate::gpu::GpuBuffer<f32>) -> View<'a> {
        View {
            buf: gerr,
            src: p.k,
            ld: 2 * p.k,
            rows: p.rows,
            cols: p.k,
        }
    }

    /// The flush's halves (`split_pair`) on any adapter, the product done on the host in f64
    /// from the halves read back: the maxima are Q's and the read part of A's, and never see the
    /// NaN around them; the two copies of each hi are equal (fused, flushes 1 and 3: the second
    /// is never written); `(hi + lo)·2^∓s` is Q (from the
    /// sweep's −Q) and A within 2^−21 of each entry plus 2^−24 in scaled units; the scaled
    /// maxima are below 2^15 and (both nonzero) meet within a factor of 4; and
    /// `[Qh | Qh | Ql]·[Ah; Al; Ah]`, unscaled by nothing, is Q·A within 2^−19 of its terms'
    /// magnitudes plus the halves' floor. Magnitudes from a layer's (Q ~ 0.05, A ~ 0.3) to a tiny
    /// A (a nearly exact D), a zero A (α = 0) and large ones; A's rows across two panels; shapes
    /// that no tensor-core block tiles (the halves need whole vectors only).
    #[test]
    fn flush_halves_represent_q_and_a() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0xf1a5_4a1f);
        let (rows, n, k, first, c0) = (6usize, 44usize, 12usize, 8usize, 20usize);
        for (f, mags) in [(0.05, 0.3), (0.05, 1e-7), (0.05, 0.0), (2000.0, 3000.0)]
            .into_iter()
            .enumerate()
        {
            let p = Problem::new(&mut rng, (rows, n, k), first, c0, mags);
            let (gerr, ga) = upload(&ctx, &p, 16)?;
            assert!(ga.panels().len() > 1, "A should span panels");
            // Flush f of four: each uses its own maxima.
            let fs = FlushSplit::with_kernel(&ctx, CoopOp::Nn, (rows, n, k), 4)?;
            // Flushes 1 and 3 as the fused products read them: the second copies of hi are not
            // written (a sentinel, above any scaled value, must survive there).
            let fused = f % 2 == 1;
            let sentinel = half::f16::from_f32(60000.0);
            ctx.write(&fs.x, 0, &vec![sentinel; fs.x.len()]);
            ctx.write(&fs.y, 0, &vec![sentinel; fs.y.len()]);
            let mut rec = ctx.recorder();
            fs.halves(&mut rec, f, neg_q(&p, &gerr), &ga, (first, c0), fused)?;
            rec.submit();
            let maxima = ctx.read(&fs.maxima)?;
            let (mq, ma) = p.maxima();
            let name = format!("flush {f} (fused {fused}), magnitudes {mags:?}");
            assert_eq!(
                (
                    f32::from_bits(maxima[2 * f]),
                    f32::from_bits(maxima[2 * f + 1])
                ),
                (mq, ma),
                "{name}: maxima (Q, A)"
            );
            let s = pair_exp(mq, ma);
            let halves =
                |b: &crate::gpu::GpuBuffer<half::f16>| -> Result<Vec<f64>, crate::gpu::GpuError> {
                    Ok(ctx.read(b)?.iter().map(|h| f64::from(h.to_f32())).collect())
                };
            let (qh, ah) = (halves(&fs.x)?, halves(&fs.y)?);
            let scale = 2f64.powi(s);
            // (value, hi, hi's copy, lo, scale) per entry of Q and of A's read part.
            let mut entries = Vec::new();
            for r in 0..rows {
                for kk in 0..k {
                    let o = r * 3 * k + kk;
                    entries.push((
                        "Q",
                        (r, kk),
                        p.q[r * k + kk],
                        qh[o],
                        qh[o + k],
                        qh[o + 2 * k],
                        scale,
                    ));
                }
            }
            for kk in 0..k {
                for j in c0..n {
                    let o = kk * n + j;
                    let v = p.a[(first + kk) * n + j];
                    entries.push((
                        "A",
                        (kk, j),
                        v,
                        ah[o],
                        ah[o + 2 * k * n],
                        ah[o + k * n],
                        1.0 / scale,
                    ));
                }
            }
            let mut top: [f64; 2] = [0.0; 2];
            for (what, at, v, hi, hi2, lo, sc) in entries {
                if fused {
                    assert_eq!(
                        hi2,
                        f64::from(sentinel.to_f32()),
                        "{name}: {what} {at:?}: the unread copy of hi was written"
                    );
                } else {
                    assert_eq!(hi, hi2, "{name}: {what} {at:?}: the copies of hi differ");
                }
                let x = v * sc;
                let got = hi + lo;
                let tol = 2f64.powi(-21) * x.abs() + 2f64.powi(-24);
                assert!(
                    (got - x).abs() <= tol,
                    "{name}: {what} {at:?}: hi + lo = {got}, expected {x} (scale 2^{s}), tolerance {tol}"
                );
                let t = &mut top[usize::from(what == "A")];
                *t = t.max(x.abs());
            }
            assert!(
                top[0] < 32768.0 && top[1] < 32768.0,
                "{name}: scaled maxima {top:?}"
            );
            if mq > 0.0 && ma > 0.0 {
                let ratio = top[0].max(top[1]) / top[0].min(top[1]);
                assert!(
                    ratio <= 4.0 * 64.0,
                    "{name}: scaled maxima {top:?} do not meet halfway"
                );
            }
            // The product as the tensor cores form it, in f64: K tripled, or (fused) per k the
            // three products of the halves where the split kernel reads them (hi at 0, Q's lo
            // 2k columns on, A's lo k rows on).
            for r in 0..rows {
                for j in 0..n - c0 {
                    let got: f64 = if fused {
                        (0..k)
                            .map(|kk| {
                                let (q, a) = (r * 3 * k + kk, kk * n + c0 + j);
                                qh[q] * ah[a] + qh[q] * ah[a + k * n] + qh[q + 2 * k] * ah[a]
                            })
                            .sum()
                    } else {
                        (0..3 * k)
                            .map(|kk| qh[r * 3 * k + kk] * ah[kk * n + c0 + j])
                            .sum()
                    };
                    let (want, terms) = p.product(r, j);
                    let tol = 2f64.powi(-19) * terms + p.floor(r, j, scale);
                    assert!(
                        (got - want).abs() <= tol,
                        "{name}: product ({r}, {}) = {got}, expected {want}, tolerance {tol}",
                        c0 + j
                    );
                }
            }
        }
        Ok(())
    }

    /// A flush on the tensor cores (`FlushSplit::flush`; only where a kernel runs, the GPU
    /// machine): two consecutive flushes into one G, each `G[:, c0..] += Q·A[first.., c0..]` from
    /// its own maxima, against f64 within 2^−19 of the terms' magnitudes plus 2^−23 per term of
    /// the sum, an ulp per 16-deep step of the larger of G and the terms (the tensor cores'
    /// truncating accumulation into G: 4 ulps of G over 24 steps on the H100 where the products
    /// are tiny, session 34), G's own rounding and the halves' floor; with A = 0 G is unchanged
    /// bit for bit. A's rows across panels.
    #[test]
    fn split_flush_adds_q_times_a() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let (rows, n, k) = (128usize, 384usize, 128usize);
        let Some(op) = FlushSplit::kernel(&ctx, rows, n, k) else {
            eprintln!("split flush: no tensor-core A·B kernel on this adapter, not run");
            return Ok(());
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0xf1a5_a44d);
        for mags in [(0.05, 0.3), (0.05, 1e-7), (0.05, 0.0)] {
            let g0: Vec<f32> = (0..rows * n)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let gg = ctx.upload("G", &g0)?;
            let fs = FlushSplit::with_kernel(&ctx, op, (rows, n, k), 2)?;
            let mut want: Vec<f64> = g0.iter().map(|&v| f64::from(v)).collect();
            let mut tol = vec![0.0f64; rows * n];
            for (f, (first, c0)) in [(0usize, 128usize), (1, 256)].into_iter().enumerate() {
                let p = Problem::new(&mut rng, (rows, n, k), first, c0, mags);
                let (gerr, ga) = upload(&ctx, &p, 128)?;
                let mut rec = ctx.recorder();
                fs.flush(&mut rec, f, neg_q(&p, &gerr), &ga, (first, c0), &gg)?;
                rec.submit();
                let s = 2f64.powi(pair_exp(p.maxima().0, p.maxima().1));
                for r in 0..rows {
                    for j in 0..n - c0 {
                        let (v, terms) = p.product(r, j);
                        let floor = p.floor(r, j, s);
                        let x = r * n + c0 + j;
                        // The tensor cores' truncation per 16-deep step: up to an ulp of the
                        // larger of G so far and the step's sum (module docs).
                        let steps = (3 * k / 16) as f64;
                        tol[x] += terms * (2f64.powi(-19) + (3 * k) as f64 * 2f64.powi(-23))
                            + floor
                            + steps * 2f64.powi(-23) * (want[x].abs() + terms);
                        want[x] += v;
                    }
                }
            }
            let got = ctx.read(&gg)?;
            let name = format!("split flush {rows}x{n} k {k} {op:?}, magnitudes {mags:?}");
            for (x, (&g, &w)) in got.iter().zip(&want).enumerate() {
                let bound = tol[x] + 2f64.powi(-23) * w.abs();
                if mags.1 == 0.0 {
                    assert_eq!(
                        g,
                        g0[x],
                        "{name}: G ({}, {}) changed with A = 0",
                        x / n,
                        x % n
                    );
                }
                assert!(
                    (f64::from(g) - w).abs() <= bound,
                    "{name}: G ({}, {}) = {g}, expected {w}, tolerance {bound}",
                    x / n,
                    x % n
                );
            }
        }
        Ok(())
    }
}
