//! The general-purpose kernels against f64 CPU references, over random shapes that include 1,
//! primes and non-multiples of the 64×64 tile.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use common::{assert_close, rand_vec, rng};
use gptaq_studio::gpu::ops::{self, CoopOp, GemmTile, MatView, Operand};
use gptaq_studio::gpu::{GpuContext, GpuMatrix, test_context};

/// f64 reference of C = alpha·op(A)·op(B) + beta·C with the same storage conventions as the shader.
#[allow(clippy::too_many_arguments)]
fn gemm_ref(
    m: usize,
    n: usize,
    k: usize,
    alpha: f64,
    a: &[f32],
    lda: usize,
    ta: bool,
    b: &[f32],
    ldb: usize,
    tb: bool,
    beta: f64,
    c: &[f32],
) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for l in 0..k {
                let av = if ta { a[l * lda + i] } else { a[i * lda + l] };
                let bv = if tb { b[j * ldb + l] } else { b[l * ldb + j] };
                s += f64::from(av) * f64::from(bv);
            }
            // beta = 0 does not read C (it may hold NaNs), as the kernels' contract says.
            out[i * n + j] = if beta == 0.0 {
                alpha * s
            } else {
                alpha * s + beta * f64::from(c[i * n + j])
            };
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn run_gemm(
    ctx: &GpuContext,
    tile: GemmTile,
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    seed: u64,
) {
    let mut r = rng(seed);
    let (alpha, beta) = (0.75f32, if seed.is_multiple_of(2) { 0.0 } else { -0.5 });
    let a = rand_vec(&mut r, m * k);
    let b = rand_vec(&mut r, k * n);
    let c0 = rand_vec(&mut r, m * n);
    let lda = if ta { m } else { k };
    let ldb = if tb { k } else { n };
    let expected = gemm_ref(
        m,
        n,
        k,
        alpha.into(),
        &a,
        lda,
        ta,
        &b,
        ldb,
        tb,
        beta.into(),
        &c0,
    );
    let ga = ctx.upload("a", &a).unwrap();
    let gb = ctx.upload("b", &b).unwrap();
    let gc = ctx.upload("c", &c0).unwrap();
    let mut rec = ctx.recorder();
    let mut av = MatView::new(&ga, lda);
    av.trans = ta;
    let mut bv = MatView::new(&gb, ldb);
    bv.trans = tb;
    ops::gemm_tiled(
        &mut rec,
        tile,
        false,
        m,
        n,
        k,
        alpha,
        av,
        bv,
        beta,
        MatView::new(&gc, n),
    )
    .unwrap();
    rec.submit();
    let got = ctx.read(&gc).unwrap();
    // f32 accumulation of k products of values in [-1, 1): error grows like sqrt(k)·eps.
    let atol = 1e-5 * (k as f64).sqrt().max(1.0);
    assert_close(
        &format!("gemm {tile:?} m={m} n={n} k={k} transA={ta} transB={tb} beta={beta}"),
        &got,
        &expected,
        atol,
        1e-5,
    );
}

#[test]
fn gemm_matches_f64_reference_on_awkward_shapes() {
    let Some(ctx) = test_context() else { return };
    let shapes = [
        (1, 1, 1),
        (1, 7, 3),
        (7, 1, 13),
        (64, 64, 16),
        (65, 63, 17),
        (97, 131, 61),
        (128, 3, 200),
        (2, 130, 1),
        (129, 257, 9),
        (131, 127, 8),
        // Leading dimensions that are multiples of 4 (the 128 kernel's vec4 loads) with partial
        // tiles and slices; K = 36 and K = 300 end inside a slice.
        (132, 260, 36),
        (68, 132, 300),
    ];
    let mut seed = 0;
    for tile in GemmTile::ALL {
        for &(m, n, k) in &shapes {
            for ta in [false, true] {
                for tb in [false, true] {
                    seed += 1;
                    run_gemm(&ctx, tile, m, n, k, ta, tb, seed);
                }
            }
        }
    }
}

#[test]
fn gemm_on_sub_matrix_views_with_offsets() {
    let Some(ctx) = test_context() else { return };
    // C[2.., 3..] (5×4 block of a 9×11 matrix) -= A[1.., ..] (5×6 of 7×8) · B (6×4 of 10×9 at row 2, col 5)
    let mut r = rng(99);
    let (am, an, bm, bn, cm, cn) = (7, 8, 10, 9, 9, 11);
    let a = rand_vec(&mut r, am * an);
    let b = rand_vec(&mut r, bm * bn);
    let c = rand_vec(&mut r, cm * cn);
    let (m, n, k) = (5, 4, 6);
    let mut expected: Vec<f64> = c.iter().map(|&v| f64::from(v)).collect();
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for l in 0..k {
                s += f64::from(a[(1 + i) * an + l]) * f64::from(b[(2 + l) * bn + 5 + j]);
            }
            expected[(2 + i) * cn + 3 + j] -= s;
        }
    }
    let (ga, gb, gc) = (
        ctx.upload("a", &a).unwrap(),
        ctx.upload("b", &b).unwrap(),
        ctx.upload("c", &c).unwrap(),
    );
    let mut rec = ctx.recorder();
    ops::gemm(
        &mut rec,
        m,
        n,
        k,
        -1.0,
        MatView::new(&ga, an).at(an),
        MatView::new(&gb, bn).at(2 * bn + 5),
        1.0,
        MatView::new(&gc, cn).at(2 * cn + 3),
    )
    .unwrap();
    rec.submit();
    let got = ctx.read(&gc).unwrap();
    assert_close(
        "gemm on views (elements outside the block must be untouched)",
        &got,
        &expected,
        1e-5,
        1e-5,
    );
}

#[test]
fn gemm_upper_updates_only_the_upper_triangle_of_a_view() {
    let Some(ctx) = test_context() else { return };
    // C view: n×n block at (2, 3) of a (n+4)×(n+5) matrix; C −= A·Aᵀ on row ≤ col only.
    for tile in GemmTile::ALL {
        for &(n, k) in &[(1usize, 1usize), (67, 5), (131, 37)] {
            let mut r = rng(7000 + n as u64 + k as u64);
            let (cm, cn) = (n + 4, n + 5);
            let a = rand_vec(&mut r, n * k);
            let c = rand_vec(&mut r, cm * cn);
            let mut expected: Vec<f64> = c.iter().map(|&v| f64::from(v)).collect();
            for i in 0..n {
                for j in i..n {
                    let s: f64 = (0..k)
                        .map(|l| f64::from(a[i * k + l]) * f64::from(a[j * k + l]))
                        .sum();
                    expected[(2 + i) * cn + 3 + j] -= s;
                }
            }
            let (ga, gc) = (ctx.upload("a", &a).unwrap(), ctx.upload("c", &c).unwrap());
            let mut rec = ctx.recorder();
            ops::gemm_tiled(
                &mut rec,
                tile,
                true,
                n,
                n,
                k,
                -1.0,
                MatView::new(&ga, k),
                MatView::new(&ga, k).t(),
                1.0,
                MatView::new(&gc, cn).at(2 * cn + 3),
            )
            .unwrap();
            rec.submit();
            let got = ctx.read(&gc).unwrap();
            assert_close(
                &format!("gemm_upper {tile:?} n={n} k={k} (lower triangle and outside untouched)"),
                &got,
                &expected,
                1e-5 * (k as f64).sqrt(),
                1e-5,
            );
        }
    }
}

/// `XᵀX` into C stored whole and in row panels (`panel_rows` rows each, capped through the
/// context as on an adapter with small bindings): upper-triangle launches per panel with the
/// diagonal shift, then the same-panel and cross-panel mirrors.
#[test]
fn syrk_accumulates_xtx_symmetric() {
    let Some(ctx) = test_context() else { return };
    for (seed, &(t, n, panel_rows)) in [
        (1usize, 1usize, 0usize),
        (5, 3, 0),
        (5, 3, 1),
        (70, 65, 0),
        (70, 65, 17),
        (33, 130, 0),
        (33, 130, 64),
        (33, 130, 129),
        (200, 97, 0),
        (200, 97, 31),
    ]
    .iter()
    .enumerate()
    {
        let mut r = rng(1000 + seed as u64);
        let x = rand_vec(&mut r, t * n);
        let c0 = rand_vec(&mut r, n * n);
        // Start from a symmetric C so beta·C stays symmetric.
        let mut c_sym = c0.clone();
        for i in 0..n {
            for j in 0..i {
                c_sym[i * n + j] = c_sym[j * n + i];
            }
        }
        let mut expected = vec![0.0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                let s: f64 = (0..t)
                    .map(|l| f64::from(x[l * n + i]) * f64::from(x[l * n + j]))
                    .sum();
                expected[i * n + j] = 2.0 * s + f64::from(c_sym[i * n + j]);
            }
        }
        let gx = ctx.upload("x", &x).unwrap();
        ctx.set_panel_cap((panel_rows > 0).then_some((panel_rows * n * 4) as u64));
        let gc = ctx.matrix_upload("c", &c_sym, n, n, 1).unwrap();
        ctx.set_panel_cap(None);
        let want_panels = if panel_rows > 0 {
            n.div_ceil(panel_rows)
        } else {
            1
        };
        assert_eq!(
            gc.panels().len(),
            want_panels,
            "syrk n={n} panel rows {panel_rows}"
        );
        let mut rec = ctx.recorder();
        ops::syrk_xtx(&mut rec, t, n, 2.0, MatView::new(&gx, n), 1.0, &gc).unwrap();
        rec.submit();
        let got = ctx.read_matrix(&gc).unwrap();
        assert_close(
            &format!("syrk T={t} n={n} panels of {panel_rows} rows"),
            &got,
            &expected,
            1e-4 * (t as f64).sqrt(),
            1e-5,
        );
        for i in 0..n {
            for j in 0..i {
                assert_eq!(
                    got[i * n + j],
                    got[j * n + i],
                    "syrk T={t} n={n} panels of {panel_rows} rows: not symmetric at ({i},{j})"
                );
            }
        }
    }
}

/// A matrix operand as the test stores it: a plain buffer, or row panels of `panel_rows` rows.
enum Stored {
    Buf(gptaq_studio::gpu::GpuBuffer<f32>),
    Mat(GpuMatrix),
}

impl Stored {
    fn new(ctx: &GpuContext, data: &[f32], rows: usize, cols: usize, panel_rows: usize) -> Self {
        if panel_rows == 0 {
            return Stored::Buf(ctx.upload("operand", data).unwrap());
        }
        ctx.set_panel_cap(Some((panel_rows * cols * 4) as u64));
        let m = ctx.matrix_upload("operand", data, rows, cols, 1).unwrap();
        ctx.set_panel_cap(None);
        assert_eq!(m.panels().len(), rows.div_ceil(panel_rows.min(rows)));
        Stored::Mat(m)
    }
    /// The operand whose element (0, 0) is the stored (r0, c0), `ld` = stored columns.
    fn op(&self, r0: usize, c0: usize, ld: usize, trans: bool) -> Operand<'_> {
        let o: Operand<'_> = match self {
            Stored::Buf(b) => MatView::new(b, ld).at(r0 * ld + c0).into(),
            Stored::Mat(m) => m.op(r0, c0),
        };
        if trans { o.t() } else { o }
    }
    fn read(&self, ctx: &GpuContext) -> Vec<f32> {
        match self {
            Stored::Buf(b) => ctx.read(b).unwrap(),
            Stored::Mat(m) => ctx.read_matrix(m).unwrap(),
        }
    }
}

/// `gemm_mat` / `gemm_mat_upper` with any operand in row panels (1 row, primes, multiples of the
/// tile), on blocks that start inside a panel, both transposes: every element against f64, and
/// everything outside the written block (or below the diagonal) untouched.
#[test]
fn gemm_over_row_panels_matches_f64() {
    let Some(ctx) = test_context() else { return };
    // (m, n, k, panel rows of A, B, C (0 = one plain buffer), ta, tb, upper)
    type Case = (usize, usize, usize, [usize; 3], bool, bool, bool);
    let cases: &[Case] = &[
        (1, 1, 1, [1, 1, 1], false, false, false),
        (37, 29, 53, [7, 0, 5], false, false, false),
        (37, 29, 53, [0, 11, 0], false, true, false),
        (37, 29, 53, [13, 17, 0], true, false, false),
        (37, 29, 53, [13, 17, 19], true, true, false),
        (130, 130, 70, [0, 0, 64], true, false, true),
        (97, 97, 33, [31, 31, 31], false, true, true),
        (97, 97, 33, [1, 0, 3], true, false, true),
        (200, 65, 129, [128, 64, 128], false, false, false),
    ];
    for (seed, &(m, n, k, pr, ta, tb, upper)) in cases.iter().enumerate() {
        let mut r = rng(7000 + seed as u64);
        // Operands live inside larger stored matrices at offsets (1, 2) so blocks start mid-panel.
        let (oa, ob, oc) = ((1usize, 2usize), (2usize, 1usize), (3usize, 1usize));
        let (ar, ac) = if ta { (k, m) } else { (m, k) };
        let (br, bc) = if tb { (n, k) } else { (k, n) };
        let (a_rows, a_cols) = (ar + oa.0 + 1, ac + oa.1 + 2);
        let (b_rows, b_cols) = (br + ob.0 + 2, bc + ob.1 + 1);
        let (c_rows, c_cols) = (m + oc.0 + 1, n + oc.1 + 3);
        let a = rand_vec(&mut r, a_rows * a_cols);
        let b = rand_vec(&mut r, b_rows * b_cols);
        let c = rand_vec(&mut r, c_rows * c_cols);
        let (alpha, beta) = (0.5f32, if seed % 2 == 0 { 0.0 } else { 1.5 });
        let sa = Stored::new(&ctx, &a, a_rows, a_cols, pr[0]);
        let sb = Stored::new(&ctx, &b, b_rows, b_cols, pr[1]);
        let sc = Stored::new(&ctx, &c, c_rows, c_cols, pr[2]);
        let mut rec = ctx.recorder();
        let (opa, opb, opc) = (
            sa.op(oa.0, oa.1, a_cols, ta),
            sb.op(ob.0, ob.1, b_cols, tb),
            sc.op(oc.0, oc.1, c_cols, false),
        );
        if upper {
            ops::gemm_mat_upper(&mut rec, n, k, alpha, opa, opb, beta, opc).unwrap();
        } else {
            ops::gemm_mat(&mut rec, m, n, k, alpha, opa, opb, beta, opc).unwrap();
        }
        rec.submit();
        let got = sc.read(&ctx);
        let mut expected: Vec<f64> = c.iter().map(|&v| f64::from(v)).collect();
        for i in 0..m {
            for j in 0..n {
                if upper && i > j {
                    continue;
                }
                let mut s = 0.0f64;
                for l in 0..k {
                    let av = if ta {
                        a[(oa.0 + l) * a_cols + oa.1 + i]
                    } else {
                        a[(oa.0 + i) * a_cols + oa.1 + l]
                    };
                    let bv = if tb {
                        b[(ob.0 + j) * b_cols + ob.1 + l]
                    } else {
                        b[(ob.0 + l) * b_cols + ob.1 + j]
                    };
                    s += f64::from(av) * f64::from(bv);
                }
                let ci = (oc.0 + i) * c_cols + oc.1 + j;
                expected[ci] = f64::from(alpha) * s + f64::from(beta) * f64::from(c[ci]);
            }
        }
        assert_close(
            &format!(
                "gemm_mat {m}x{n}x{k} panels A/B/C {pr:?} ta={ta} tb={tb} upper={upper} \
                 (stored C {c_rows}x{c_cols}, block at {oc:?})"
            ),
            &got,
            &expected,
            1e-5 * (k as f64).sqrt(),
            1e-5,
        );
    }
}

/// `gemm_mat_skip` ([`ops::KSkip`]): each output tile sums over the union of its elements' k
/// ranges, so on masked operands (the declared triangles exact zeros) it is bit for bit the dense
/// `gemm_mat` and matches f64. Where no tile of either size (128, 64) can read a declared-zero
/// entry, the test stores garbage there instead, which any too-wide k range would pull into a sum
/// (single-buffer cases; panel launches tile from their own origin). Shapes span several tiles,
/// primes, both transposes, operands in row panels and blocks starting mid-panel; shifts include
/// negative ones and ones beyond the matrix.
#[test]
fn gemm_skipping_zero_triangles_is_exact() {
    let Some(ctx) = test_context() else { return };
    type Skip = (Option<i64>, Option<i64>, Option<i64>, Option<i64>);
    // (m, n, k, panel rows of A, B, C, ta, tb, (a_upper, a_lower, b_upper, b_lower))
    type Case = (usize, usize, usize, [usize; 3], bool, bool, Skip);
    #[rustfmt::skip]
    let cases: &[Case] = &[
        // GPTAQ's P: strictly upper A, upper B shifted by the block's first column.
        (300, 131, 300, [0, 0, 0], false, false, (Some(1), None, Some(150), None)),
        (300, 131, 300, [37, 64, 0], false, false, (Some(1), None, Some(150), None)),
        // GPTAQ's T: B = Uᵀ, lower.
        (261, 140, 257, [0, 0, 0], false, true, (None, None, None, Some(0))),
        (261, 140, 257, [29, 41, 53], false, true, (None, None, None, Some(0))),
        // The other two sides, transposed storage, negative and out-of-range shifts.
        (199, 211, 263, [0, 0, 0], true, false, (Some(-40), Some(70), None, None)),
        (199, 211, 263, [0, 0, 0], true, true, (None, None, Some(-3), Some(-90))),
        (77, 66, 55, [0, 0, 0], false, false, (Some(500), None, None, None)),
        (77, 66, 55, [0, 0, 0], false, false, (None, Some(-500), Some(-1000), Some(-7))),
        (1, 1, 1, [0, 0, 0], false, false, (Some(0), Some(0), Some(0), Some(0))),
        (130, 129, 140, [0, 0, 17], true, true, (Some(3), Some(90), Some(40), Some(-20))),
    ];
    for (seed, &(m, n, k, pr, ta, tb, (au, al, bu, bl))) in cases.iter().enumerate() {
        let skip = ops::KSkip {
            a_upper: au,
            a_lower: al,
            b_upper: bu,
            b_lower: bl,
        };
        let mut r = rng(9100 + seed as u64);
        // op(A)[i, l] / op(B)[l, j] are zero by declaration where these say so.
        let a_zero = |i: usize, l: usize| {
            let (i, l) = (i as i64, l as i64);
            au.is_some_and(|s| l < i + s) || al.is_some_and(|s| l > i + s)
        };
        let b_zero = |l: usize, j: usize| {
            let (l, j) = (l as i64, j as i64);
            bu.is_some_and(|s| l > j + s) || bl.is_some_and(|s| l < j + s)
        };
        // Operands inside larger stored matrices at offsets, so blocks start mid-panel.
        let (oa, ob, oc) = ((2usize, 1usize), (1usize, 3usize), (1usize, 2usize));
        let (ar, ac) = if ta { (k, m) } else { (m, k) };
        let (br, bc) = if tb { (n, k) } else { (k, n) };
        let (a_rows, a_cols) = (ar + oa.0 + 1, ac + oa.1 + 1);
        let (b_rows, b_cols) = (br + ob.0 + 1, bc + ob.1 + 2);
        let (c_rows, c_cols) = (m + oc.0, n + oc.1 + 1);
        let a_at = |i: usize, l: usize| {
            if ta {
                (oa.0 + l) * a_cols + oa.1 + i
            } else {
                (oa.0 + i) * a_cols + oa.1 + l
            }
        };
        let b_at = |l: usize, j: usize| {
            if tb {
                (ob.0 + j) * b_cols + ob.1 + l
            } else {
                (ob.0 + l) * b_cols + ob.1 + j
            }
        };
        // Whether some output tile of side 64 or 128 whose rows hold `i` (None: any row) and
        // whose columns hold `j` (None: any column) sums over `l`, with the k range gemm.wgsl's
        // k_range computes.
        let read = |l: usize, i: Option<usize>, j: Option<usize>| {
            [64usize, 128].iter().any(|&t| {
                let starts = |at: Option<usize>, len: usize| -> Vec<i64> {
                    at.map_or_else(
                        || (0..len).step_by(t).map(|v| v as i64).collect(),
                        |v| vec![(v / t * t) as i64],
                    )
                };
                let (t, kk, l) = (t as i64, k as i64, l as i64);
                starts(i, m).iter().any(|&r0| {
                    starts(j, n).iter().any(|&c0| {
                        let lo = [au.map(|s| r0 + s), bl.map(|s| c0 + s)]
                            .into_iter()
                            .flatten()
                            .fold(0, i64::max)
                            .min(kk);
                        let hi = [al.map(|s| r0 + t + s), bu.map(|s| c0 + t + s)]
                            .into_iter()
                            .flatten()
                            .fold(kk, i64::min);
                        (lo..hi).contains(&l)
                    })
                })
            })
        };
        let read_a = |i: usize, l: usize| read(l, Some(i), None);
        let read_b = |l: usize, j: usize| read(l, None, Some(j));
        let (mut a, mut b) = (
            rand_vec(&mut r, a_rows * a_cols),
            rand_vec(&mut r, b_rows * b_cols),
        );
        let c = rand_vec(&mut r, c_rows * c_cols);
        // Masked operands (declared zeros exact) and the garbage variant (declared zeros that no
        // tile reads keep their random values).
        let (mut garbage_a, mut garbage_b) = (a.clone(), b.clone());
        let (mut unread_a, mut unread_b) = (0usize, 0usize);
        for i in 0..m {
            for l in 0..k {
                if a_zero(i, l) {
                    a[a_at(i, l)] = 0.0;
                    if read_a(i, l) {
                        garbage_a[a_at(i, l)] = 0.0;
                    } else {
                        unread_a += 1;
                    }
                }
            }
        }
        for l in 0..k {
            for j in 0..n {
                if b_zero(l, j) {
                    b[b_at(l, j)] = 0.0;
                    if read_b(l, j) {
                        garbage_b[b_at(l, j)] = 0.0;
                    } else {
                        unread_b += 1;
                    }
                }
            }
        }
        let (alpha, beta) = (1.25f32, if seed % 2 == 0 { 0.0 } else { -0.5 });
        let mut expected: Vec<f64> = c.iter().map(|&v| f64::from(v)).collect();
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|l| f64::from(a[a_at(i, l)]) * f64::from(b[b_at(l, j)]))
                    .sum();
                let ci = (oc.0 + i) * c_cols + oc.1 + j;
                expected[ci] = f64::from(alpha) * s + f64::from(beta) * f64::from(c[ci]);
            }
        }
        let case = format!(
            "gemm_mat_skip {m}x{n}x{k} panels A/B/C {pr:?} ta={ta} tb={tb} {skip:?} beta={beta}"
        );
        let run = |av: &[f32], bv: &[f32], skipping: bool| -> Vec<f32> {
            let sa = Stored::new(&ctx, av, a_rows, a_cols, pr[0]);
            let sb = Stored::new(&ctx, bv, b_rows, b_cols, pr[1]);
            let sc = Stored::new(&ctx, &c, c_rows, c_cols, pr[2]);
            let mut rec = ctx.recorder();
            let (opa, opb, opc) = (
                sa.op(oa.0, oa.1, a_cols, ta),
                sb.op(ob.0, ob.1, b_cols, tb),
                sc.op(oc.0, oc.1, c_cols, false),
            );
            if skipping {
                ops::gemm_mat_skip(&mut rec, m, n, k, alpha, opa, opb, beta, opc, skip, None)
                    .unwrap();
            } else {
                ops::gemm_mat(&mut rec, m, n, k, alpha, opa, opb, beta, opc).unwrap();
            }
            rec.submit();
            sc.read(&ctx)
        };
        if pr == [0, 0, 0] {
            let got = run(&garbage_a, &garbage_b, true);
            assert_close(
                &format!("{case}, garbage in {unread_a} + {unread_b} unread zeros of A + B"),
                &got,
                &expected,
                1e-5 * (k as f64).sqrt(),
                1e-5,
            );
        }
        // Masked operands: the same bits as the dense GEMM.
        let skipped = run(&a, &b, true);
        let dense = run(&a, &b, false);
        for (idx, (x, y)) in skipped.iter().zip(&dense).enumerate() {
            assert!(
                x.to_bits() == y.to_bits(),
                "{case}: element ({}, {}) of the stored C: skipping gives {x:e}, dense {y:e}",
                idx / c_cols,
                idx % c_cols
            );
        }
    }
}

/// `gemm_mat_skip` with `upper = Some(shift)`: exactly the elements `row ≤ col + shift` of the C
/// view are written, bit for bit as the plain GEMM writes them (and within f64 tolerance), every
/// other stored element keeps its bits — for negative, zero, positive and out-of-range shifts, C
/// (and the operands) in row panels with the view starting mid-panel, with and without declared
/// zero triangles (GPTAQ's T: `Uᵀ` lower, shift `j0 − 1`).
#[test]
fn gemm_upper_shift_writes_exactly_the_shifted_triangle() {
    let Some(ctx) = test_context() else { return };
    // (m, n, k, panel rows of A, B, C, ta, tb, shift, B lower-triangular from k = j)
    type Case = (usize, usize, usize, [usize; 3], bool, bool, i64, bool);
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (300, 131, 300, [0, 0, 0], false, true, 149, true),
        (261, 140, 257, [29, 41, 53], false, true, -1, true),
        (199, 211, 63, [0, 0, 17], true, false, 40, false),
        (130, 300, 70, [0, 0, 64], false, false, -150, false),
        (77, 66, 55, [0, 0, 0], false, false, -100, false),
        (130, 129, 140, [0, 0, 0], true, true, 500, false),
        (1, 1, 1, [0, 0, 0], false, false, 0, false),
        (1, 1, 1, [0, 0, 0], false, false, -1, false),
    ];
    for (seed, &(m, n, k, pr, ta, tb, shift, lower_b)) in cases.iter().enumerate() {
        let mut r = rng(9700 + seed as u64);
        let (oc0, oc1) = (3usize, 2usize);
        let (ar, ac) = if ta { (k, m) } else { (m, k) };
        let (br, bc) = if tb { (n, k) } else { (k, n) };
        let a = rand_vec(&mut r, ar * ac);
        let mut b = rand_vec(&mut r, br * bc);
        let b_at = |l: usize, j: usize| if tb { j * bc + l } else { l * bc + j };
        if lower_b {
            // op(B)[l, j] = 0 for l < j, as declared below.
            for l in 0..k {
                for j in (l + 1)..n {
                    b[b_at(l, j)] = 0.0;
                }
            }
        }
        let skip = ops::KSkip {
            b_lower: lower_b.then_some(0),
            ..Default::default()
        };
        let (c_rows, c_cols) = (m + oc0 + 1, n + oc1 + 1);
        let c = rand_vec(&mut r, c_rows * c_cols);
        let (alpha, beta) = (0.75f32, if seed % 2 == 0 { 0.0 } else { 1.5 });
        let case = format!(
            "gemm_mat_skip upper {m}x{n}x{k} panels A/B/C {pr:?} ta={ta} tb={tb} shift {shift} \
             lower B {lower_b} beta={beta}"
        );
        let run = |upper: bool| -> Vec<f32> {
            let sa = Stored::new(&ctx, &a, ar, ac, pr[0]);
            let sb = Stored::new(&ctx, &b, br, bc, pr[1]);
            let sc = Stored::new(&ctx, &c, c_rows, c_cols, pr[2]);
            let mut rec = ctx.recorder();
            let (opa, opb, opc) = (
                sa.op(0, 0, ac, ta),
                sb.op(0, 0, bc, tb),
                sc.op(oc0, oc1, c_cols, false),
            );
            if upper {
                ops::gemm_mat_skip(
                    &mut rec,
                    m,
                    n,
                    k,
                    alpha,
                    opa,
                    opb,
                    beta,
                    opc,
                    skip,
                    Some(shift),
                )
                .unwrap();
            } else {
                ops::gemm_mat(&mut rec, m, n, k, alpha, opa, opb, beta, opc).unwrap();
            }
            rec.submit();
            sc.read(&ctx)
        };
        let (got, dense) = (run(true), run(false));
        let a_at = |i: usize, l: usize| if ta { l * ac + i } else { i * ac + l };
        for (idx, &g) in got.iter().enumerate() {
            let (sr, sc) = (idx / c_cols, idx % c_cols);
            let inside = (oc0..oc0 + m).contains(&sr) && (oc1..oc1 + n).contains(&sc);
            let (i, j) = (sr.wrapping_sub(oc0), sc.wrapping_sub(oc1));
            if inside && (i as i64) <= j as i64 + shift {
                assert!(
                    g.to_bits() == dense[idx].to_bits(),
                    "{case}: ({i}, {j}) got {g:e}, the plain GEMM {:e}",
                    dense[idx]
                );
                let s: f64 = (0..k)
                    .map(|l| f64::from(a[a_at(i, l)]) * f64::from(b[b_at(l, j)]))
                    .sum();
                let want = f64::from(alpha) * s + f64::from(beta) * f64::from(c[idx]);
                assert!(
                    (f64::from(g) - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                    "{case}: ({i}, {j}) got {g} expected {want}"
                );
            } else {
                assert!(
                    g.to_bits() == c[idx].to_bits(),
                    "{case}: stored ({sr}, {sc}) (view ({i}, {j}) inside: {inside}) changed from \
                     {} to {g}",
                    c[idx]
                );
            }
        }
    }
}

#[test]
fn elementwise_and_reductions() {
    let Some(ctx) = test_context() else { return };
    for &n in &[1usize, 255, 256, 4097, 70_001] {
        let mut r = rng(n as u64);
        let x = rand_vec(&mut r, n);
        let y = rand_vec(&mut r, n);
        let (gx, gy) = (ctx.upload("x", &x).unwrap(), ctx.upload("y", &y).unwrap());
        let out = ctx.zeros::<f32>("out", n).unwrap();
        let mut rec = ctx.recorder();
        ops::axpby(&mut rec, n, 2.0, &gx, -3.0, &gy, &out).unwrap();
        rec.submit();
        let expected: Vec<f64> = x
            .iter()
            .zip(&y)
            .map(|(&a, &b)| 2.0 * f64::from(a) - 3.0 * f64::from(b))
            .collect();
        assert_close(
            &format!("axpby n={n}"),
            &ctx.read(&out).unwrap(),
            &expected,
            1e-6,
            1e-6,
        );

        let mut rec = ctx.recorder();
        ops::mul(&mut rec, n, 0.5, &gx, &gy, &out).unwrap();
        rec.submit();
        let expected: Vec<f64> = x
            .iter()
            .zip(&y)
            .map(|(&a, &b)| 0.5 * f64::from(a) * f64::from(b))
            .collect();
        assert_close(
            &format!("mul n={n}"),
            &ctx.read(&out).unwrap(),
            &expected,
            1e-7,
            1e-6,
        );

        let got = ops::sq_diff_sum(&ctx, n, &gx, 1.0, &gy).unwrap();
        let want: f64 = x
            .iter()
            .zip(&y)
            .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
            .sum();
        assert!(
            (got - want).abs() <= 1e-5 * want.max(1.0),
            "sq_diff_sum n={n}: got {got}, expected {want}"
        );
        let got = ops::sq_diff_sum(&ctx, n, &gx, 0.0, &gy).unwrap();
        let want: f64 = x.iter().map(|&a| f64::from(a).powi(2)).sum();
        assert!(
            (got - want).abs() <= 1e-5 * want.max(1.0),
            "sq norm n={n}: got {got}, expected {want}"
        );
    }
}

/// Column sums of x∘y (the layer lab's Frobenius products and per-column shares) against an f64
/// reference, on shapes with 1, primes, non-multiples of the 256-wide workgroup and of the 64-row
/// chunk, more rows than the 16-chunk cap; also written at an offset into a shared partials buffer.
#[test]
fn col_dot_matches_f64_column_sums() {
    let Some(ctx) = test_context() else { return };
    for &(rows, n) in &[
        (1usize, 1usize),
        (1, 257),
        (7, 1),
        (63, 5),
        (65, 131),
        (97, 256),
        (131, 300),
        (1031, 3),
    ] {
        let mut r = rng(5000 + (rows * 1000 + n) as u64);
        let x = rand_vec(&mut r, rows * n);
        let y = rand_vec(&mut r, rows * n);
        let (gx, gy) = (ctx.upload("x", &x).unwrap(), ctx.upload("y", &y).unwrap());
        let mut want = vec![0.0f64; n];
        for row in 0..rows {
            for (j, w) in want.iter_mut().enumerate() {
                *w += f64::from(x[row * n + j]) * f64::from(y[row * n + j]);
            }
        }
        let got = ops::col_dot(&ctx, rows, n, &gx, &gy).unwrap();
        let atol = 1e-5 * (rows as f64).sqrt().max(1.0);
        for (j, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= atol,
                "col_dot rows={rows} n={n}: column {j}: got {g}, expected {w} (atol {atol:e})"
            );
        }
        assert_eq!(got.len(), n, "col_dot rows={rows} n={n}: length");
        // At an offset: the elements before it stay untouched.
        let len = ops::col_dot_partials_len(rows, n);
        let parts = ctx.upload("parts", &vec![7.0f32; 3 + len]).unwrap();
        let mut rec = ctx.recorder();
        ops::col_dot_partials(&mut rec, rows, n, &gx, &gy, &parts, 3).unwrap();
        rec.submit();
        let back = ctx.read(&parts).unwrap();
        assert_eq!(
            &back[..3],
            &[7.0; 3],
            "col_dot rows={rows} n={n}: prefix overwritten"
        );
        let sums = ops::col_dot_sums(&back[3..], rows, n);
        for (j, (g, w)) in sums.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= atol,
                "col_dot at offset 3, rows={rows} n={n}: column {j}: got {g}, expected {w}"
            );
        }
    }
    // A too-small output buffer is an error, not a silent clamp.
    let x = ctx.upload("x", &[1.0f32; 12]).unwrap();
    let small = ctx.zeros::<f32>("small", 2).unwrap();
    let mut rec = ctx.recorder();
    assert!(ops::col_dot_partials(&mut rec, 3, 4, &x, &x, &small, 0).is_err());
}

#[test]
fn pipeline_cache_reuses_pipelines() {
    let Some(ctx) = test_context() else { return };
    let x = ctx.upload("x", &[1.0f32, 2.0]).unwrap();
    let out = ctx.zeros::<f32>("out", 2).unwrap();
    for _ in 0..3 {
        let mut rec = ctx.recorder();
        ops::axpby(&mut rec, 2, 1.0, &x, 1.0, &x, &out).unwrap();
        rec.submit();
    }
    let n = ctx.cached_pipelines();
    let mut rec = ctx.recorder();
    ops::mul(&mut rec, 2, 1.0, &x, &x, &out).unwrap();
    rec.submit();
    ctx.sync().unwrap();
    assert_eq!(
        ctx.cached_pipelines(),
        n + 1,
        "a new entry point adds exactly one pipeline"
    );
    assert_eq!(ctx.read(&out).unwrap(), vec![1.0, 4.0]);
}

/// The tuning path end to end on this adapter: both kernels are timed on a small grid, the table
/// round-trips through a file, a context given the table follows it for nearby shapes (and falls
/// back to the size rule far away), and a GEMM recorded through that choice is still correct.
#[test]
fn gemm_tuning_table_drives_the_kernel_choice() {
    use gptaq_studio::gpu::tune::{self, GemmTable, TuneEntry};
    let Some(ctx) = test_context() else { return };
    if std::env::var_os("GPTAQ_GEMM_TILE").is_some() {
        eprintln!("note: GPTAQ_GEMM_TILE forces the kernel; the table is not consulted");
        return;
    }
    let shapes = [(33, 65, 17), (130, 129, 64)];
    let measured = tune::measure(&ctx, &shapes, 1, &mut |_| {}).unwrap();
    assert_eq!(measured.entries.len(), 2);
    for e in &measured.entries {
        assert!(
            GemmTile::ALL
                .iter()
                .all(|&t| e.ms(t).is_some_and(|ms| ms.is_finite() && ms > 0.0)),
            "{e:?}"
        );
    }
    assert!(measured.matches(&ctx.summary));
    let dir = tempfile::tempdir().unwrap();
    let path = tune::table_path(dir.path(), &ctx.summary);
    measured.save(&path).unwrap();
    // serde_json's float text round-trips to within an ulp, not bit for bit.
    let loaded = GemmTable::load(&path).unwrap().expect("table file");
    assert_eq!(
        (&loaded.adapter, loaded.entries.len()),
        (&measured.adapter, 2)
    );
    for (l, m) in loaded.entries.iter().zip(&measured.entries) {
        assert_eq!((l.m, l.n, l.k, l.best()), (m.m, m.n, m.k, m.best()));
        assert!(
            (l.large_ms - m.large_ms).abs() <= 1e-12 * m.large_ms,
            "{l:?} vs {m:?}"
        );
    }

    // A table that contradicts the size rule at 512×512×128 (the rule picks Narrow there).
    assert_eq!(ops::gemm_tile_rule(512, 512, 128), GemmTile::Narrow);
    let forced = GemmTable {
        entries: vec![TuneEntry {
            m: 512,
            n: 512,
            k: 128,
            large_ms: 1.0,
            small_ms: 2.0,
            large_db_ms: None,
            narrow_ms: None,
        }],
        ..measured
    };
    ctx.set_gemm_table(Some(forced));
    assert_eq!(ops::gemm_tile_for(&ctx, 500, 520, 100), GemmTile::Large);
    assert_eq!(
        ops::gemm_tile_for(&ctx, 3, 5, 7),
        ops::size_rule_for(&ctx, 3, 5, 7)
    );
    // Correct results through the table's choice (shape near the entry, awkward sizes).
    let (m, n, k) = (257, 509, 131);
    let mut r = rng(77);
    let (a, b) = (rand_vec(&mut r, m * k), rand_vec(&mut r, k * n));
    let expected = gemm_ref(
        m,
        n,
        k,
        1.0,
        &a,
        k,
        false,
        &b,
        n,
        false,
        0.0,
        &vec![0.0; m * n],
    );
    let (ga, gb) = (ctx.upload("a", &a).unwrap(), ctx.upload("b", &b).unwrap());
    let gc = ctx.zeros::<f32>("c", m * n).unwrap();
    let mut rec = ctx.recorder();
    ops::gemm(
        &mut rec,
        m,
        n,
        k,
        1.0,
        MatView::new(&ga, k),
        MatView::new(&gb, n),
        0.0,
        MatView::new(&gc, n),
    )
    .unwrap();
    rec.submit();
    assert_close(
        &format!("gemm via the tuning table m={m} n={n} k={k}"),
        &ctx.read(&gc).unwrap(),
        &expected,
        1e-5 * (k as f64).sqrt(),
        1e-5,
    );
    ctx.set_gemm_table(None);
    // The size rule without a table: gemm_narrow on GPUs, gemm_small on CPU adapters (and with
    // GPTAQ_GEMM_NARROW=0).
    let narrow_off = std::env::var("GPTAQ_GEMM_NARROW").is_ok_and(|v| v.trim() == "0");
    let want = if ctx.summary.device_type == "Cpu" || narrow_off {
        GemmTile::Small
    } else {
        GemmTile::Narrow
    };
    assert_eq!(ops::gemm_tile_for(&ctx, 500, 520, 100), want);
    assert_eq!(ops::size_rule_for(&ctx, 500, 520, 100), want);
}

/// f32 → f16 operand conversion (strided view, scale), plain and of a difference `x − y`, on every
/// adapter that grants SHADER_F16 (lavapipe does): within one f16 rounding step of `half`'s
/// round-to-nearest (WGSL leaves the choice between the two neighbours to the implementation).
/// Views whose columns, leading dimension and offset are multiples of 4 take the four-wide entry
/// point, the others the scalar one (`ops::cast_f16`); both kinds are here, with 1 and primes.
#[test]
fn cast_f16_rounds_to_a_neighbouring_f16() {
    let Some(ctx) = test_context() else { return };
    if !ctx.features.contains(wgpu::Features::SHADER_F16) {
        eprintln!("note: adapter without SHADER_F16; cast_f16 not exercised");
        return;
    }
    for &(rows, cols, ld, off) in &[
        (1usize, 1usize, 1usize, 0usize),
        (7, 13, 17, 5),
        (33, 257, 257, 0),
        (1, 4, 4, 0),
        (5, 12, 16, 4),
        (67, 260, 264, 8),
        (3, 8, 10, 2),
    ] {
        for diff in [false, true] {
            let mut r = rng((rows * 1000 + cols) as u64 + u64::from(diff));
            let len = off + (rows - 1) * ld + cols;
            let x = rand_vec(&mut r, len);
            let y = rand_vec(&mut r, len);
            let scale = 3.7f32;
            let (gx, gy) = (ctx.upload("x", &x).unwrap(), ctx.upload("y", &y).unwrap());
            let out = ctx
                .upload("x16", &vec![half::f16::NAN; rows * cols])
                .unwrap();
            let mut rec = ctx.recorder();
            let mut v = MatView::new(&gx, ld);
            v.offset = off;
            if diff {
                ops::cast_f16_diff(&mut rec, rows, cols, v, &gy, scale, &out).unwrap();
            } else {
                ops::cast_f16(&mut rec, rows, cols, v, scale, &out).unwrap();
            }
            rec.submit();
            let got = ctx.read(&out).unwrap();
            for (i, g) in got.iter().enumerate().take(rows * cols) {
                let (row, col) = (i / cols, i % cols);
                let at = off + row * ld + col;
                let want = if diff { x[at] - y[at] } else { x[at] } * scale;
                let g = g.to_f32();
                let ulp = half::f16::from_f32(want).to_f32().abs() * 2f32.powi(-10) + 6e-8;
                assert!(
                    (g - want).abs() <= ulp,
                    "cast_f16 (diff {diff}) {rows}x{cols} ld {ld} off {off}: index ({row}, {col}): \
                     got {g}, expected {want} (±{ulp})"
                );
            }
        }
    }
}

/// The tensor-core GEMM against an f64 reference of the same f16 operands, both operand layouts,
/// accumulating into a non-zero C, and (but for the upper-triangle kernel) overwriting a C of NaNs
/// (the upper tail overwrites a non-zero C, whose blocks below the diagonal it must keep). Runs only where the adapter grants cooperative matrices (the
/// H100/H200 through Vulkan; not lavapipe, where it prints a note): `tools/device_pack.sh` carries
/// this test binary to the GPU machine.
#[test]
fn coop_gemm_matches_f64_where_granted() {
    let Some(ctx) = test_context() else { return };
    if !ops::coop_available(&ctx) {
        eprintln!("note: adapter without cooperative matrices; tensor-core GEMM not exercised");
        assert!(
            ops::coop_shape_ok_for(CoopOp::Nn, 64, 96, 48)
                && !ops::coop_shape_ok_for(CoopOp::Nn, 48, 96, 48)
                && !ops::coop_shape_ok_for(CoopOp::Nt64, 64, 96, 48)
                && ops::coop_shape_ok_for(CoopOp::Nt128, 128, 256, 96)
                && !ops::coop_shape_ok_for(CoopOp::Tn128, 128, 256, 48)
                && !ops::coop_shape_ok_for(CoopOp::Tn128Upper, 128, 256, 64)
                && !ops::coop_staged_available(&ctx)
        );
        return;
    }
    let staged = ops::coop_staged_available(&ctx);
    eprintln!("staged tensor-core kernels available: {staged}");
    // 128-multiples for the staged kernels: one 32-deep step (no prefetch), several (prefetch of
    // every next step), a grid of 2×3 workgroups.
    let shapes = [
        (32usize, 32usize, 16usize),
        (64, 96, 48),
        (96, 64, 272),
        (128, 64, 16),
        (128, 128, 32),
        (256, 384, 96),
        (384, 128, 544),
        (256, 256, 64),
        (256, 256, 256),
    ];
    let mut ran = 0;
    for &(m, n, k) in &shapes {
        for op in CoopOp::ALL {
            if !ops::coop_shape_ok_for(op, m, n, k) || (op.staged() && !staged) {
                continue;
            }
            ran += 1;
            let mut r = rng((m * 7 + n * 3 + k) as u64 + op as u64);
            let to16 = |v: Vec<f32>| -> Vec<half::f16> {
                v.into_iter().map(half::f16::from_f32).collect()
            };
            // Operands start at an offset into their buffers (the forward reads one batch of a
            // larger activation buffer this way).
            let (off_a, off_b) = (16 * (k % 3), 32);
            let a16 = to16(rand_vec(&mut r, off_a + m * k));
            let b16 = to16(rand_vec(&mut r, off_b + k * n));
            let c0 = rand_vec(&mut r, m * n);
            let a32: Vec<f32> = a16[off_a..].iter().map(|v| v.to_f32()).collect();
            let b32: Vec<f32> = b16[off_b..].iter().map(|v| v.to_f32()).collect();
            let (trans_a, trans_b) = op.transposes();
            let lda = if trans_a { m } else { k };
            let ldb = if trans_b { k } else { n };
            let mut expected = gemm_ref(
                m, n, k, 1.0, &a32, lda, trans_a, &b32, ldb, trans_b, 1.0, &c0,
            );
            // Nt128UpperTail: on the blocks on and above the diagonal, K only from the block's
            // first column on (B taken as upper triangular); with `c` as C's start.
            let tail = |c: &[f32], add: bool| -> Vec<f64> {
                (0..m * n)
                    .map(|e| {
                        let (i, j) = (e / n, e % n);
                        if i / 128 > j / 128 {
                            return f64::from(c[e]);
                        }
                        let s: f64 = (j / 128 * 128..k)
                            .map(|l| f64::from(a32[i * lda + l]) * f64::from(b32[j * ldb + l]))
                            .sum();
                        s + if add { f64::from(c[e]) } else { 0.0 }
                    })
                    .collect()
            };
            if op == CoopOp::Tn128Upper {
                // Blocks below the diagonal are left as they were.
                for (i, e) in expected.iter_mut().enumerate() {
                    if i / n / 128 > i % n / 128 {
                        *e = f64::from(c0[i]);
                    }
                }
            }
            let tail_over = if op == CoopOp::Nt128UpperTail {
                expected = tail(&c0, true);
                tail(&c0, false)
            } else {
                Vec::new()
            };
            let (ga, gb) = (
                ctx.upload("a16", &a16).unwrap(),
                ctx.upload("b16", &b16).unwrap(),
            );
            // C += op(A)·op(B) over c0; then (but for the upper-triangle kernel) C = op(A)·op(B)
            // over a C of NaNs: the staged kernels must not read C, the others clear it first.
            let overwritten = gemm_ref(
                m,
                n,
                k,
                1.0,
                &a32,
                lda,
                trans_a,
                &b32,
                ldb,
                trans_b,
                0.0,
                &vec![0.0; m * n],
            );
            let nans = vec![f32::NAN; m * n];
            let modes: &[(&str, bool, &[f32], &[f64])] = if op == CoopOp::Tn128Upper {
                &[("", true, &c0, &expected)]
            } else if op == CoopOp::Nt128UpperTail {
                // Overwriting: the upper blocks' products replace C, the lower blocks keep it.
                &[
                    ("", true, &c0, &expected),
                    (", C overwritten", false, &c0, &tail_over),
                ]
            } else {
                &[
                    ("", true, &c0, &expected),
                    (", C overwritten", false, &nans, &overwritten),
                ]
            };
            for &(what, accumulate, start, want) in modes {
                let gc = ctx.upload("c", start).unwrap();
                let mut rec = ctx.recorder();
                ops::gemm_coop(
                    &mut rec,
                    op,
                    (m, n, k),
                    (&ga, off_a),
                    (&gb, off_b),
                    MatView::new(&gc, n),
                    accumulate,
                )
                .unwrap();
                rec.submit();
                assert_close(
                    &format!("tensor-core gemm {op:?} m={m} n={n} k={k}{what}"),
                    &ctx.read(&gc).unwrap(),
                    want,
                    1e-4 * (k as f64).sqrt(),
                    1e-4,
                );
            }
        }
    }
    // The three 32×32 layouts on all nine shapes, the 64×64 kernel on the six that tile by 64,
    // and where granted the three staged kernels on the five that tile by 128 × 128 × 32, the
    // upper-triangle one on the three square ones among them and the upper tail on the one with
    // K = N too.
    assert_eq!(
        ran,
        33 + if staged { 19 } else { 0 },
        "tensor-core cases run"
    );
}

/// The staged tensor-core kernels with split-f16 operands (`CoopOperand::split`,
/// `gemm_staged_coop.wgsl`'s `SPLIT`: `C += Ah·Bh + Ah·Bl + Al·Bh` in one launch, GPTAQ's A and
/// its pending flushes) against f64, for every staged layout, adding to a non-zero C and
/// overwriting it; each operand's hi half at an offset and its lo half at another in the same
/// buffer. Shapes: one 16-deep step, several, a grid of several blocks, the upper-triangle
/// kernels on square ones. Everywhere (lavapipe too): split operands are refused by the unstaged
/// kernels, alone (one operand split) and at depths that are not multiples of 16.
#[test]
fn coop_split_gemm_matches_f64_where_granted() {
    let Some(ctx) = test_context() else { return };
    let h = |v: f32| half::f16::from_f32(v);
    let one = ctx.upload("one", &vec![h(0.5); 128 * 128 * 2]).unwrap();
    let c1 = ctx.upload("c1", &vec![0f32; 128 * 128]).unwrap();
    // The checks the kernels rely on (`check_coop_batched`, adapter-independent).
    let refused = |op: CoopOp, k: usize, a_lo: Option<usize>, b_lo: Option<usize>| {
        let mut a = ops::CoopOperand::new(&one, 0, 128);
        let mut b = ops::CoopOperand::new(&one, 0, 128);
        a.lo = a_lo;
        b.lo = b_lo;
        let batch = ops::CoopBatch::flat(1, 0);
        ops::check_coop_batched(op, (128, 128, k), &batch, &a, &b, &MatView::new(&c1, 128)).is_err()
    };
    for op in [CoopOp::Nt, CoopOp::Nn, CoopOp::Tn, CoopOp::Nt64] {
        assert!(
            refused(op, 64, Some(128 * 64), Some(128 * 64)),
            "{op:?} accepted split operands"
        );
        assert!(!ops::coop_split_shape_ok_for(op, 128, 128, 64));
    }
    assert!(
        refused(CoopOp::Nt128, 64, Some(128 * 64), None),
        "a lone split A accepted"
    );
    assert!(
        refused(CoopOp::Nt128, 64, None, Some(128 * 64)),
        "a lone split B accepted"
    );
    assert!(
        refused(CoopOp::Nt128, 24, Some(128 * 64), Some(128 * 64)),
        "K = 24 accepted"
    );
    assert!(
        refused(CoopOp::Nt128, 64, Some(128 * 64 + 2), Some(128 * 64)),
        "a lo offset that is not a multiple of 4 accepted"
    );
    assert!(
        refused(CoopOp::Nt128, 64, Some(128 * 192), Some(128 * 64)),
        "a lo half past the buffer's end accepted"
    );
    assert!(ops::coop_split_shape_ok_for(CoopOp::Nt128, 128, 128, 48));
    assert!(
        !refused(CoopOp::Nt128, 64, Some(128 * 64), Some(128 * 64)),
        "a valid split product refused"
    );
    if !ops::coop_staged_available(&ctx) {
        eprintln!("note: no staged tensor-core kernels here; split products not exercised");
        return;
    }
    let staged = [
        CoopOp::Nt128,
        CoopOp::Tn128,
        CoopOp::Nn128,
        CoopOp::Tn128Upper,
        CoopOp::Nt128UpperTail,
    ];
    let shapes = [
        (128usize, 128usize, 16usize),
        (128, 256, 48),
        (384, 128, 400),
        (256, 256, 256),
        (384, 384, 384),
    ];
    let mut ran = 0;
    for &(m, n, k) in &shapes {
        for op in staged {
            if !ops::coop_split_shape_ok_for(op, m, n, k) {
                continue;
            }
            ran += 1;
            let mut r = rng((m * 5 + n * 11 + k) as u64 + op as u64);
            let (trans_a, trans_b) = op.transposes();
            let (sa, sb) = (m * k, k * n);
            // hi from offset 8, lo after a gap (both multiples of 4), lo entries 2^−11 smaller.
            let (off_a, off_b) = (8, 4 * (k % 5));
            let (lo_a, lo_b) = (sa + 12, sb + 4);
            let mut a16 = vec![h(f32::NAN); off_a + lo_a + sa];
            let mut b16 = vec![h(f32::NAN); off_b + lo_b + sb];
            let fill = |buf: &mut Vec<half::f16>,
                        off: usize,
                        lo: usize,
                        len: usize,
                        r: &mut rand_chacha::ChaCha8Rng| {
                let hi = rand_vec(r, len);
                let small = rand_vec(r, len);
                for e in 0..len {
                    buf[off + e] = h(hi[e]);
                    buf[off + lo + e] = h(small[e] * 2f32.powi(-11));
                }
            };
            fill(&mut a16, off_a, lo_a, sa, &mut r);
            fill(&mut b16, off_b, lo_b, sb, &mut r);
            let lda = if trans_a { m } else { k };
            let ldb = if trans_b { k } else { n };
            let at = |lo: usize, i: usize, l: usize| {
                let e = if trans_a { l * lda + i } else { i * lda + l };
                f64::from(a16[off_a + lo + e].to_f32())
            };
            let bt = |lo: usize, l: usize, j: usize| {
                let e = if trans_b { j * ldb + l } else { l * ldb + j };
                f64::from(b16[off_b + lo + e].to_f32())
            };
            let c0 = rand_vec(&mut r, m * n);
            let upper = matches!(op, CoopOp::Tn128Upper | CoopOp::Nt128UpperTail);
            let want = |add: bool| -> Vec<f64> {
                (0..m * n)
                    .map(|e| {
                        let (i, j) = (e / n, e % n);
                        if upper && i / 128 > j / 128 {
                            return f64::from(c0[e]);
                        }
                        let k0 = if op == CoopOp::Nt128UpperTail {
                            j / 128 * 128
                        } else {
                            0
                        };
                        let s: f64 = (k0..k)
                            .map(|l| {
                                at(0, i, l) * bt(0, l, j)
                                    + at(0, i, l) * bt(lo_b, l, j)
                                    + at(lo_a, i, l) * bt(0, l, j)
                            })
                            .sum();
                        s + if add { f64::from(c0[e]) } else { 0.0 }
                    })
                    .collect()
            };
            let (ga, gb) = (
                ctx.upload("a16", &a16).unwrap(),
                ctx.upload("b16", &b16).unwrap(),
            );
            for accumulate in [true, false] {
                if op == CoopOp::Tn128Upper && !accumulate {
                    continue;
                }
                let gc = ctx.upload("c", &c0).unwrap();
                let mut rec = ctx.recorder();
                ops::gemm_coop_batched(
                    &mut rec,
                    op,
                    (m, n, k),
                    ops::CoopBatch::flat(1, 0),
                    ops::CoopOperand::new(&ga, off_a, lda).split(lo_a),
                    ops::CoopOperand::new(&gb, off_b, ldb).split(lo_b),
                    MatView::new(&gc, n),
                    accumulate,
                )
                .unwrap();
                rec.submit();
                assert_close(
                    &format!(
                        "split tensor-core gemm {op:?} m={m} n={n} k={k} accumulate {accumulate}"
                    ),
                    &ctx.read(&gc).unwrap(),
                    &want(accumulate),
                    1e-4 * (k as f64).sqrt(),
                    1e-4,
                );
            }
        }
    }
    // Nt128, Tn128 and Nn128 on all five shapes, the upper-triangle kernels on the three square
    // ones, the upper tail where K = N as well (two of them).
    assert_eq!(ran, 15 + 3 + 2, "split tensor-core cases run");
}

/// The batched tensor-core GEMM with the strides attention uses: four A's as column slices of
/// one wider matrix (ld = 4·K, batch stride K, like the query heads), two B's each shared by two
/// consecutive entries (group 2, like a key/value head shared by its query heads), and the four
/// C's as column slices of one output (ldc = 4·N, stride N), for the Nt (Q·Kᵀ) and Nn (P·V)
/// layouts and the staged Nt128 and Nn128 where granted, against f64. Each twice: as a flat
/// batch of four, and nested as two outer entries (sequences) of two (heads), which reaches the
/// same products through the outer strides. GPU machine only, like the test above.
#[test]
fn coop_gemm_batched_strided_matches_f64_where_granted() {
    let Some(ctx) = test_context() else { return };
    if !ops::coop_available(&ctx) {
        eprintln!(
            "note: adapter without cooperative matrices; batched tensor-core GEMM not exercised"
        );
        return;
    }
    let batch = 4usize;
    let staged = ops::coop_staged_available(&ctx);
    for ((op, m, n, k), nested) in [
        (CoopOp::Nt, 64usize, 32usize, 48usize),
        (CoopOp::Nn, 64, 32, 48),
        (CoopOp::Nt128, 128, 128, 64),
        (CoopOp::Nn128, 128, 128, 64),
    ]
    .into_iter()
    .flat_map(|c| [(c, false), (c, true)])
    {
        if op.staged() && !staged {
            continue;
        }
        // The staged kernels also overwrite C (`accumulate` false), here a C of NaNs; the
        // unstaged ones only add and refuse to overwrite.
        for accumulate in [true, false] {
            if !accumulate && !op.staged() {
                let c = ctx.zeros::<f32>("c", m * batch * n).unwrap();
                let a = ctx.zeros::<half::f16>("a", m * batch * k).unwrap();
                let b = ctx.zeros::<half::f16>("b", 2 * k * n).unwrap();
                let ldb = if op.transposes().1 { k } else { n };
                let got = ops::gemm_coop_batched(
                    &mut ctx.recorder(),
                    op,
                    (m, n, k),
                    ops::CoopBatch::flat(batch, n),
                    ops::CoopOperand::new(&a, 0, batch * k).batched(k, 1),
                    ops::CoopOperand::new(&b, 0, ldb).batched(k * n, 2),
                    MatView::new(&c, batch * n),
                    false,
                );
                assert!(
                    got.is_err(),
                    "{op:?}: an overwriting unstaged GEMM was accepted"
                );
                continue;
            }
            let mut r = rng(77 + op as u64);
            let to16 = |v: Vec<f32>| -> Vec<half::f16> {
                v.into_iter().map(half::f16::from_f32).collect()
            };
            // A: m × (batch·k) row-major; two B's back to back, each stored n×k (Nt) or k×n (Nn).
            let a16 = to16(rand_vec(&mut r, m * batch * k));
            let b16 = to16(rand_vec(&mut r, 2 * k * n));
            let c0 = if accumulate {
                rand_vec(&mut r, m * batch * n)
            } else {
                vec![f32::NAN; m * batch * n]
            };
            let a32: Vec<f32> = a16.iter().map(|v| v.to_f32()).collect();
            let b32: Vec<f32> = b16.iter().map(|v| v.to_f32()).collect();
            let trans_b = op.transposes().1;
            let ldb = if trans_b { k } else { n };
            let (ga, gb, gc) = (
                ctx.upload("a16", &a16).unwrap(),
                ctx.upload("b16", &b16).unwrap(),
                ctx.upload("c", &c0).unwrap(),
            );
            let mut rec = ctx.recorder();
            let (spec, a_op, b_op) = if nested {
                // Entry o·2 + i: A's slice 2o + i, B o (its two heads share it), C's slice 2o + i.
                (
                    ops::CoopBatch::nested(2, 2, n, 2 * n),
                    ops::CoopOperand::new(&ga, 0, batch * k)
                        .batched(k, 1)
                        .outer(2 * k),
                    ops::CoopOperand::new(&gb, 0, ldb)
                        .batched(k * n, 2)
                        .outer(k * n),
                )
            } else {
                (
                    ops::CoopBatch::flat(batch, n),
                    ops::CoopOperand::new(&ga, 0, batch * k).batched(k, 1),
                    ops::CoopOperand::new(&gb, 0, ldb).batched(k * n, 2),
                )
            };
            ops::gemm_coop_batched(
                &mut rec,
                op,
                (m, n, k),
                spec,
                a_op,
                b_op,
                MatView::new(&gc, batch * n),
                accumulate,
            )
            .unwrap();
            rec.submit();
            if op.staged() {
                // The staged kernels load four halves (8 bytes) at a time: an offset that is not a
                // multiple of 4 is refused, not misread.
                for off in [1, 2] {
                    let mut rec = ctx.recorder();
                    let got = ops::gemm_coop_batched(
                        &mut rec,
                        op,
                        (m, n, k),
                        ops::CoopBatch::flat(1, n),
                        ops::CoopOperand::new(&ga, off, batch * k),
                        ops::CoopOperand::new(&gb, 0, ldb),
                        MatView::new(&gc, batch * n),
                        true,
                    );
                    assert!(got.is_err(), "{op:?}: offset {off} of A accepted");
                }
            }
            let got = ctx.read(&gc).unwrap();
            for z in 0..batch {
                let az: Vec<f32> = (0..m)
                    .flat_map(|i| a32[i * batch * k + z * k..i * batch * k + (z + 1) * k].to_vec())
                    .collect();
                let cz: Vec<f32> = (0..m)
                    .flat_map(|i| c0[i * batch * n + z * n..i * batch * n + (z + 1) * n].to_vec())
                    .collect();
                let bz = &b32[(z / 2) * k * n..(z / 2 + 1) * k * n];
                let beta = if accumulate { 1.0 } else { 0.0 };
                let want = gemm_ref(m, n, k, 1.0, &az, k, false, bz, ldb, trans_b, beta, &cz);
                let gz: Vec<f32> = (0..m)
                    .flat_map(|i| got[i * batch * n + z * n..i * batch * n + (z + 1) * n].to_vec())
                    .collect();
                assert_close(
                    &format!(
                        "batched tensor-core gemm {op:?} m={m} n={n} k={k} entry {z} of {batch} \
                     (nested: {nested}, accumulate: {accumulate})"
                    ),
                    &gz,
                    &want,
                    1e-4 * (k as f64).sqrt(),
                    1e-4,
                );
            }
        }
    }
}

/// The extent checks of a nested batch (`ops::check_coop_batched`, which the kernels rely on: they
/// do no bounds checks): the last outer entry of A, B or C one element past its buffer is refused,
/// an exact fit accepted, and outer strides that are not multiples of 4 refused by the staged
/// kernels. Runs everywhere (no kernel is dispatched).
#[test]
fn nested_coop_batches_are_checked_to_their_last_entry() {
    let Some(ctx) = test_context() else { return };
    // 3 outer × 4 inner entries of 32×32×32 Nt products: A's entries k apart within an outer
    // entry and 4·k·… between; B shared by pairs (group 2); C's 32×32 blocks.
    let (m, n, k, outer, inner) = (32usize, 32usize, 32usize, 3usize, 4usize);
    let a_need = (outer - 1) * (inner * k * m) + (inner - 1) * k + (m - 1) * inner * k + k;
    let b_need = (outer - 1) * (2 * n * k) + (n - 1) * k + k + n * k;
    let c_need = (outer - 1) * (inner * m * n) + (inner - 1) * m * n + (m - 1) * n + n;
    let batch = ops::CoopBatch::nested(outer, inner, m * n, inner * m * n);
    let check = |op: CoopOp, extra: [usize; 3], a_outer: usize| {
        let a = ctx.zeros::<half::f16>("a", a_need - extra[0]).unwrap();
        let b = ctx.zeros::<half::f16>("b", b_need - extra[1]).unwrap();
        let c = ctx.zeros::<f32>("c", c_need - extra[2]).unwrap();
        ops::check_coop_batched(
            op,
            (m, n, k),
            &batch,
            &ops::CoopOperand::new(&a, 0, inner * k)
                .batched(k, 1)
                .outer(a_outer),
            &ops::CoopOperand::new(&b, 0, k)
                .batched(n * k, 2)
                .outer(2 * n * k),
            &MatView::new(&c, n),
        )
    };
    let a_outer = inner * k * m;
    check(CoopOp::Nt, [0; 3], a_outer).unwrap();
    for (i, what) in ["A", "B", "C"].iter().enumerate() {
        let mut short = [0; 3];
        short[i] = 1;
        assert!(
            check(CoopOp::Nt, short, a_outer).is_err(),
            "{what} one element short of its last nested entry accepted"
        );
    }
    // The staged kernels read four halves at a time: an outer stride that is not a multiple of 4
    // is refused there, as such offsets and strides are.
    let (a, b, c) = (
        ctx.zeros::<half::f16>("a", 3 * 128 * 32).unwrap(),
        ctx.zeros::<half::f16>("b", 128 * 32).unwrap(),
        ctx.zeros::<f32>("c", 2 * 128 * 128).unwrap(),
    );
    for (a_outer, ok) in [
        (128 * 32, true),
        (128 * 32 + 1, false),
        (128 * 32 + 2, false),
    ] {
        let got = ops::check_coop_batched(
            CoopOp::Nt128,
            (128, 128, 32),
            &ops::CoopBatch::nested(2, 1, 0, 128 * 128),
            &ops::CoopOperand::new(&a, 0, 32).outer(a_outer),
            &ops::CoopOperand::new(&b, 0, 32),
            &MatView::new(&c, 128),
        );
        assert_eq!(
            got.is_ok(),
            ok,
            "Nt128, A's outer stride {a_outer}: {got:?}"
        );
    }
}

/// `pack_f16` then `unpack_f16` of `x` on the GPU: (packed words, unpacked values, flag).
fn f16_round_trip(ctx: &GpuContext, x: &[f32]) -> (Vec<u32>, Vec<f32>, u32) {
    let len = x.len();
    let gx = ctx.upload("x", x).unwrap();
    let words = ctx.zeros::<u32>("words", ops::f16_words(len)).unwrap();
    let flag = ctx.zeros::<u32>("flag", 1).unwrap();
    let out = ctx.zeros::<f32>("out", len).unwrap();
    let mut rec = ctx.recorder();
    ops::pack_f16(&mut rec, &gx, len, &words, &flag).unwrap();
    ops::unpack_f16(&mut rec, &words, len, &out).unwrap();
    rec.submit();
    (
        ctx.read(&words).unwrap(),
        ctx.read(&out).unwrap(),
        ctx.read(&flag).unwrap()[0],
    )
}

/// The f16 bits `half` gives `v` (round to nearest, ties to even) — the reference for the shader.
fn rne_bits(v: f32) -> u16 {
    half::f16::from_f32(v).to_bits()
}

/// Asserts the packed words and the unpacked values of `x` are exactly `half`'s round-to-nearest-
/// even (bit for bit, signed zeros and f16 subnormals included), naming the case, length, index,
/// input, got and expected. Exact rather than "within one f16 step": `f16_pack.wgsl` rounds with
/// integer bit arithmetic (not pack2x16float, whose rounding WGSL leaves to the implementation),
/// so it is the same on every adapter, and the streams' host path (`half`, for the embeddings)
/// must give the same bits.
fn assert_f16_exact(case: &str, x: &[f32], words: &[u32], back: &[f32]) {
    let len = x.len();
    assert_eq!(words.len(), len.div_ceil(2), "{case}: words for len {len}");
    for (i, &v) in x.iter().enumerate() {
        let want = rne_bits(v);
        let got = (words[i / 2] >> (16 * (i % 2))) as u16;
        assert_eq!(
            got,
            want,
            "{case}: len {len}, index {i}: input {v:e} ({:#010x}) packed to f16 bits {got:#06x}, \
             expected {want:#06x} (round to nearest even)",
            v.to_bits()
        );
        let want_f = half::f16::from_bits(want).to_f32();
        assert_eq!(
            back[i].to_bits(),
            want_f.to_bits(),
            "{case}: len {len}, index {i}: input {v:e} unpacked to {:e}, expected {want_f:e}",
            back[i]
        );
    }
    if len % 2 == 1 {
        assert_eq!(
            words[len / 2] >> 16,
            0,
            "{case}: len {len}: the odd tail's high half must be 0"
        );
    }
}

/// Round trip through `f16_pack.wgsl` on awkward lengths (1, 2, odd, around the 256-word
/// workgroup, 131,075 elements = 257 workgroups), random values in ±1e4 mixed with f16 rounding
/// ties (both parities), f16 subnormals and their ties, values that round to 0 and ±0.
#[test]
fn f16_pack_unpack_round_trips_bit_exact() {
    let Some(ctx) = test_context() else { return };
    let ulp1 = 2f32.powi(-10); // one f16 step at [1, 2)
    let sub = 2f32.powi(-24); // smallest f16 subnormal
    let specials = [
        0.0f32,
        -0.0,
        1.0 + 0.5 * ulp1,    // tie: rounds down to the even 1.0
        1.0 + 1.5 * ulp1,    // tie: rounds up to the even 1 + 2·ulp
        -(1.0 + 0.5 * ulp1), // negative tie
        1000.0 + 0.25,       // tie at an f16 step of 0.5
        sub,
        -sub,
        3.0 * sub,
        0.5 * sub,      // tie between 0 and the smallest subnormal: rounds to +0
        1.5 * sub,      // tie: rounds to 2·sub
        2.5 * sub,      // tie: rounds to 2·sub
        0.25 * sub,     // rounds to 0
        -0.25 * sub,    // rounds to -0
        2f32.powi(-14), // smallest normal f16
        2f32.powi(-14) - sub,
        65504.0,
        -65504.0,
        1e4,
        -1e4,
        std::f32::consts::PI,
    ];
    // Multiples of 4 take the four-element entry points, the others the one-word ones.
    for (k, &len) in [1usize, 2, 3, 4, 255, 256, 257, 1000, 1002, 65537 * 2 + 1]
        .iter()
        .enumerate()
    {
        let mut r = rng(4000 + k as u64);
        let mut x: Vec<f32> = rand_vec(&mut r, len).iter().map(|v| v * 1e4).collect();
        // Specials at the front and, for long vectors, in the last (odd-tail) word too.
        for (d, s) in x.iter_mut().zip(&specials) {
            *d = *s;
        }
        if len > 2 * specials.len() {
            let n = specials.len();
            x[len - n..].copy_from_slice(&specials);
        }
        let (words, back, flag) = f16_round_trip(&ctx, &x);
        assert_f16_exact("random ±1e4 + ties/subnormals", &x, &words, &back);
        assert_eq!(flag, 0, "len {len}: in-range values set the overflow flag");
    }
}

/// Random f32 bit patterns of every exponent up to 65504 (f32 subnormals, values far below f16's
/// subnormals, every f16 binade), both signs: the bit-arithmetic rounding equals `half`'s.
#[test]
fn f16_pack_rounds_random_f32_bit_patterns_like_half() {
    use rand::Rng;
    let Some(ctx) = test_context() else { return };
    let mut r = rng(4242);
    let x: Vec<f32> = (0..200_001)
        .map(|_| {
            let mag = r.random_range(0u32..=0x477f_e000);
            f32::from_bits(mag | if r.random::<bool>() { 0x8000_0000 } else { 0 })
        })
        .collect();
    let (words, back, flag) = f16_round_trip(&ctx, &x);
    assert_f16_exact("random f32 bit patterns", &x, &words, &back);
    assert_eq!(flag, 0, "in-range bit patterns set the overflow flag");
}

/// Every finite f16 packs to itself and every midpoint between neighbouring finite f16 values
/// rounds to the even one, exhaustively; and `unpack_f16` widens every finite f16 bit pattern
/// exactly.
#[test]
fn f16_pack_is_exact_on_every_f16_and_every_tie() {
    let Some(ctx) = test_context() else { return };
    // Non-negative finite f16 in order: 0x0000..=0x7bff; the sign bit mirrors them.
    let pos: Vec<f32> = (0u16..=0x7bff)
        .map(|b| half::f16::from_bits(b).to_f32())
        .collect();
    let mut x: Vec<f32> = pos.iter().flat_map(|&v| [v, -v]).collect();
    let (words, back, flag) = f16_round_trip(&ctx, &x);
    assert_f16_exact("every finite f16", &x, &words, &back);
    assert_eq!(flag, 0, "finite f16 values set the overflow flag");
    // Midpoints (exact in f32): ties to even.
    x = pos
        .windows(2)
        .flat_map(|w| {
            let m = ((f64::from(w[0]) + f64::from(w[1])) / 2.0) as f32;
            [m, -m]
        })
        .collect();
    let (words, back, flag) = f16_round_trip(&ctx, &x);
    assert_f16_exact("f16 midpoints", &x, &words, &back);
    assert_eq!(flag, 0, "midpoints below 65504 set the overflow flag");
    // unpack_f16 alone on all 65,536 bit patterns (inf and NaN included, which pack never writes
    // except 0x7e00): equal to `half`'s widening, NaN as NaN.
    let all: Vec<u32> = (0u32..0x8000)
        .map(|w| (2 * w) | ((2 * w + 1) << 16))
        .collect();
    let gw = ctx.upload("all f16", &all).unwrap();
    let out = ctx.zeros::<f32>("widened", 0x10000).unwrap();
    let mut rec = ctx.recorder();
    ops::unpack_f16(&mut rec, &gw, 0x10000, &out).unwrap();
    rec.submit();
    let got = ctx.read(&out).unwrap();
    for (bits, g) in got.iter().enumerate() {
        let want = half::f16::from_bits(bits as u16).to_f32();
        assert!(
            if want.is_nan() {
                g.is_nan()
            } else {
                g.to_bits() == want.to_bits()
            },
            "unpack_f16 of f16 bits {bits:#06x}: got {g:e} ({:#010x}), expected {want:e} ({:#010x})",
            g.to_bits(),
            want.to_bits()
        );
    }
}

/// Values f16 cannot hold: |x| > 65504 and ±inf are clamped to ±65504 and NaN becomes 0x7e00, and
/// each sets the flag; 65504 itself and in-range values do not. The flag is only ever raised by
/// the kernel (pipeline::stream reads and clears it).
#[test]
fn f16_pack_clamps_and_flags_out_of_range_values() {
    let Some(ctx) = test_context() else { return };
    let max = half::f16::MAX.to_bits();
    let min = half::f16::MIN.to_bits();
    let cases: [(f32, u16); 8] = [
        (65505.0, max),
        (65519.0, max), // would round to 65504 anyway: still beyond the rule's ±65504
        (1e5, max),
        (-1e5, min),
        (f32::MAX, max),
        (f32::INFINITY, max),
        (f32::NEG_INFINITY, min),
        (f32::NAN, 0x7e00),
    ];
    for (k, &(bad, want)) in cases.iter().enumerate() {
        // The bad value at an even and at an odd position, in a small and a multi-group vector;
        // lengths that are multiples of 4 take the four-element entry point (each lane of it).
        for (len, pos) in [
            (2usize, 0usize),
            (3, 1),
            (3, 2),
            (1001, 777),
            (1001, 1000),
            (4, 0),
            (4, 3),
            (1004, 777),
            (1004, 1002),
        ] {
            let mut x: Vec<f32> = rand_vec(&mut rng(k as u64), len);
            x[pos] = bad;
            let (words, back, flag) = f16_round_trip(&ctx, &x);
            assert_eq!(
                flag, 1,
                "case {k}: {bad:e} at index {pos} of {len}: overflow flag not set"
            );
            let got = (words[pos / 2] >> (16 * (pos % 2))) as u16;
            assert_eq!(
                got, want,
                "case {k}: {bad:e} at index {pos} of {len}: packed {got:#06x}, expected {want:#06x}"
            );
            if bad.is_nan() {
                assert!(
                    back[pos].is_nan(),
                    "NaN at {pos} of {len} unpacked to {}",
                    back[pos]
                );
            }
            // Its neighbours are untouched by the clamping.
            for i in (0..len).filter(|&i| i != pos && i / 2 == pos / 2) {
                let g = (words[i / 2] >> (16 * (i % 2))) as u16;
                assert_eq!(
                    g,
                    rne_bits(x[i]),
                    "case {k}: neighbour {i} of the bad value at {pos} (len {len}): {:e}",
                    x[i]
                );
            }
        }
    }
    // Exactly ±65504 is in range.
    let (_, back, flag) = f16_round_trip(&ctx, &[65504.0, -65504.0, 0.0]);
    assert_eq!(flag, 0, "±65504 set the overflow flag");
    assert_eq!(back, vec![65504.0, -65504.0, 0.0]);
}

/// Too-small buffers are refused up front (WGSL would silently drop the out-of-bounds accesses).
#[test]
fn f16_pack_launchers_validate_lengths() {
    let Some(ctx) = test_context() else { return };
    let x = ctx.zeros::<f32>("x", 5).unwrap();
    let words = ctx.zeros::<u32>("words", 2).unwrap(); // 5 elements need 3
    let flag = ctx.zeros::<u32>("flag", 1).unwrap();
    let mut rec = ctx.recorder();
    for (what, r) in [
        ("pack", ops::pack_f16(&mut rec, &x, 5, &words, &flag)),
        ("unpack", ops::unpack_f16(&mut rec, &words, 5, &x)),
        ("pack x", ops::pack_f16(&mut rec, &x, 6, &words, &flag)),
    ] {
        match r {
            Err(gptaq_studio::gpu::GpuError::Validation(m)) => {
                assert!(m.contains("needs") || m.contains("need"), "{what}: {m}")
            }
            other => panic!("{what}: expected a validation error, got {other:?}"),
        }
    }
    let big = ctx.zeros::<u32>("words", 3).unwrap();
    assert!(ops::pack_f16(&mut rec, &x, 5, &big, &flag).is_ok());
    assert!(ops::unpack_f16(&mut rec, &big, 5, &x).is_ok());
}

/// A dispatch beyond 65,535 workgroups in x (`groups_1d` goes 2-D): 65,536 workgroups of 256
/// words, 33,553,922 elements (128 MiB of f32, just under wgpu's default 128 MiB binding). Values
/// are small integers (exact in f16) that vary with the index, so a kernel that ignored the
/// workgroup's y index would leave the last words zero or write the wrong ones. Skipped (with a
/// note) on adapters that cannot bind that much.
#[test]
fn f16_pack_unpack_beyond_65535_workgroups() {
    let Some(ctx) = test_context() else { return };
    let words = 65535 * 256 + 1; // one word past what a 1-D dispatch can reach
    let len = 2 * words; // even: the last word holds two real elements
    if (len * 4) as u64 > ctx.max_binding_bytes() {
        eprintln!(
            "note: adapter binds < {} bytes; 2-D f16_pack not exercised",
            len * 4
        );
        return;
    }
    let x: Vec<f32> = (0..len).map(|i| ((i * 7) % 2039) as f32 - 1019.0).collect();
    let (packed, back, flag) = f16_round_trip(&ctx, &x);
    assert_eq!(
        flag, 0,
        "2-D dispatch: in-range values set the overflow flag"
    );
    assert_eq!(packed.len(), words);
    if let Some(i) = (0..len).find(|&i| back[i] != x[i]) {
        panic!(
            "2-D dispatch (len {len}, {} workgroups): first mismatch at index {i} (word {}): got {}, \
             expected {}",
            words.div_ceil(256),
            i / 2,
            back[i],
            x[i]
        );
    }
}

/// `Recorder::clear` zeroes exactly the range asked for (the tensor-core forward clears a module
/// output before accumulating into it) and refuses ranges beyond the buffer or off 4-byte words.
#[test]
fn recorder_clear_zeroes_exactly_its_range() {
    let Some(ctx) = test_context() else { return };
    let len = 37;
    let x: Vec<f32> = (0..len).map(|i| i as f32 + 1.0).collect();
    let buf = ctx.upload("x", &x).unwrap();
    let mut rec = ctx.recorder();
    rec.clear(&buf, 5, 17).unwrap();
    assert!(
        rec.clear(&buf, 30, 8).is_err(),
        "range past the end accepted"
    );
    rec.submit();
    let got = ctx.read(&buf).unwrap();
    for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
        let want = if (5..22).contains(&i) { 0.0 } else { v };
        assert_eq!(
            g, want,
            "clear(5, 17) of {len}: index {i}: got {g}, expected {want}"
        );
    }
    let h = ctx.zeros::<half::f16>("h", 8).unwrap();
    let mut rec = ctx.recorder();
    assert!(
        rec.clear(&h, 1, 2).is_err(),
        "f16 range off a word accepted"
    );
    assert!(
        rec.clear(&h, 2, 3).is_err(),
        "f16 length off a word accepted"
    );
    rec.clear(&h, 2, 4).unwrap();
    rec.submit();
}

/// The buffer pool (`GpuContext::set_pool_limit`): a freed buffer is kept, counted as allocated,
/// and handed out again cleared; one freed while a recorder that used it is still open is not
/// reused before that recorder is submitted (else its clear would run before the recorded copy
/// that reads it); nothing is pooled beyond the limit; a limit of 0 frees everything.
#[test]
fn buffer_pool_reuses_cleared_buffers_within_its_limit() {
    let Some(ctx) = test_context() else { return };
    let n = 1usize << 19; // 2 MiB of f32, above the pool's 1 MiB minimum
    let bytes = (n * 4) as u64;
    let base = ctx.memory().0;
    ctx.set_pool_limit(base + 3 * bytes);
    ctx.reset_peak();
    let live = ctx.allocated().0;

    let a = ctx.upload("a", &vec![1.0f32; n]).unwrap();
    drop(a);
    assert_eq!(ctx.pooled_bytes(), bytes, "a freed buffer is pooled");
    assert_eq!(ctx.memory().0, base + bytes, "a pooled buffer still counts");
    assert_eq!(ctx.allocated().0, live, "but not as live");
    let b = ctx.zeros::<f32>("b", n).unwrap();
    assert_eq!(ctx.pooled_bytes(), 0, "zeros of the same size reuses it");
    assert_eq!(ctx.memory().0, base + bytes);
    assert_eq!(
        ctx.allocated(),
        (live + bytes, live + bytes),
        "reused: live again"
    );
    let got = ctx.read(&b).unwrap();
    if let Some(i) = got.iter().position(|&v| v != 0.0) {
        panic!(
            "reused buffer not cleared: index {i} of {n}: got {}, expected 0",
            got[i]
        );
    }

    // Freed while a recorder that copies from it is open: quarantined until the submit.
    let c = ctx.upload("c", &vec![2.0f32; n]).unwrap();
    let mut rec = ctx.recorder();
    rec.copy(&c, 0, &b, 0, n);
    drop(c);
    assert_eq!(ctx.pooled_bytes(), bytes, "c is held back, not freed");
    let d = ctx.zeros::<f32>("d", n).unwrap();
    assert_eq!(
        ctx.pooled_bytes(),
        bytes,
        "d must not take the quarantined buffer"
    );
    rec.submit();
    let (got_b, got_d) = (ctx.read(&b).unwrap(), ctx.read(&d).unwrap());
    for (what, got, want) in [("b (copy of c)", &got_b, 2.0), ("d", &got_d, 0.0)] {
        if let Some(i) = got.iter().position(|&v| v != want) {
            panic!("{what}: index {i} of {n}: got {}, expected {want}", got[i]);
        }
    }
    // After the submit c's buffer is free for reuse.
    let e = ctx.zeros::<f32>("e", n).unwrap();
    assert_eq!(ctx.pooled_bytes(), 0, "c's buffer reused after the submit");

    // Limit: b, d, e are live (3 buffers = the limit's headroom); freeing one more than fits.
    let f = ctx.zeros::<f32>("f", n).unwrap();
    assert_eq!(ctx.memory().0, base + 4 * bytes);
    drop(f);
    assert_eq!(ctx.pooled_bytes(), 0, "over the limit: freed, not pooled");
    assert_eq!(ctx.memory().0, base + 3 * bytes);
    drop(e);
    assert_eq!(ctx.pooled_bytes(), bytes);
    // Peaks: f made four buffers live; reserved counted the quarantined c beside b and d.
    assert_eq!(ctx.allocated(), (live + 2 * bytes, live + 4 * bytes));
    assert_eq!(ctx.memory(), (base + 3 * bytes, base + 4 * bytes));
    ctx.set_pool_limit(0);
    assert_eq!(ctx.pooled_bytes(), 0, "limit 0 empties the pool");
    assert_eq!(ctx.memory().0, base + 2 * bytes);
    drop((b, d));
    assert_eq!(ctx.memory().0, base);

    // An upload into a reused buffer whose data ends in half a word (an odd number of halves).
    ctx.set_pool_limit(base + 2 * bytes);
    let m = (1usize << 20) + 1;
    let first: Vec<half::f16> = (0..m)
        .map(|i| half::f16::from_f32((i % 7) as f32))
        .collect();
    drop(ctx.upload("h1", &first).unwrap());
    let pooled = ctx.pooled_bytes();
    assert!(pooled > 0, "the f16 buffer is pooled");
    let second: Vec<half::f16> = (0..m)
        .map(|i| half::f16::from_f32(-((i % 5) as f32) - 1.0))
        .collect();
    let h2 = ctx.upload("h2", &second).unwrap();
    assert_eq!(ctx.pooled_bytes(), 0, "the upload reused it");
    let got = ctx.read(&h2).unwrap();
    if let Some(i) = (0..m).find(|&i| got[i] != second[i]) {
        panic!(
            "upload into a reused buffer: index {i} of {m}: got {}, expected {}",
            got[i], second[i]
        );
    }
    drop(h2);
    ctx.set_pool_limit(0);
}

/// `gemm_batched`: every product of a batch equals the f64 reference and, bit for bit, the same
/// product launched alone — with gaps between the batch's views, transposed operands, a zero
/// triangle declared (`KSkip`, as the factor's inverse does), both tiles' shapes, sizes of 1,
/// primes and non-multiples of the tiles; C outside the views stays untouched.
#[test]
fn gemm_batched_equals_single_launches_bit_for_bit() {
    let Some(ctx) = test_context() else { return };
    // (batch, m, n, k, ta, tb, a_upper skip)
    type Case = (usize, usize, usize, usize, bool, bool, Option<i64>);
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (1, 1, 1, 1, false, false, None),
        (3, 37, 29, 41, true, true, Some(0)),
        (5, 32, 32, 32, true, true, Some(0)),
        (2, 130, 7, 129, false, true, None),
        (4, 64, 64, 64, false, false, None),
        (2, 200, 140, 131, true, false, Some(3)),
    ];
    for (seed, &(batch, m, n, k, ta, tb, au)) in cases.iter().enumerate() {
        let mut r = rng(7300 + seed as u64);
        let skip = ops::KSkip {
            a_upper: au,
            ..Default::default()
        };
        let (lda, ldb, ldc) = (
            if ta { m } else { k } + 3,
            if tb { k } else { n } + 5,
            n + 2,
        );
        let (rows_a, rows_b) = (if ta { k } else { m }, if tb { n } else { k });
        // Each view followed by a gap: strides larger than the views.
        let (sa, sb, sc) = (rows_a * lda + 11, rows_b * ldb + 7, m * ldc + 13);
        let mut a = rand_vec(&mut r, batch * sa);
        // The declared zero triangle is really zero (op(A)[i, l] = 0 for l < i + s).
        if let Some(s) = au {
            for z in 0..batch {
                for i in 0..m {
                    for l in 0..k {
                        if (l as i64) < i as i64 + s {
                            let idx = if ta { l * lda + i } else { i * lda + l };
                            a[z * sa + idx] = 0.0;
                        }
                    }
                }
            }
        }
        let b = rand_vec(&mut r, batch * sb);
        let c0 = rand_vec(&mut r, batch * sc);
        let (alpha, beta) = (-0.75f32, 0.5f32);
        let ga = ctx.upload("a", &a).unwrap();
        let gb = ctx.upload("b", &b).unwrap();
        let batched = ctx.upload("c batched", &c0).unwrap();
        let single = ctx.upload("c single", &c0).unwrap();
        let view = |buf, ld, off, t| {
            let mut v = MatView::new(buf, ld).at(off);
            v.trans = t;
            v
        };
        let mut rec = ctx.recorder();
        ops::gemm_batched(
            &mut rec,
            batch,
            (sa, sb, sc),
            m,
            n,
            k,
            alpha,
            view(&ga, lda, 0, ta),
            view(&gb, ldb, 0, tb),
            beta,
            MatView::new(&batched, ldc),
            skip,
        )
        .unwrap();
        for z in 0..batch {
            ops::gemm_mat_skip(
                &mut rec,
                m,
                n,
                k,
                alpha,
                view(&ga, lda, z * sa, ta).into(),
                view(&gb, ldb, z * sb, tb).into(),
                beta,
                MatView::new(&single, ldc).at(z * sc).into(),
                skip,
                None,
            )
            .unwrap();
        }
        rec.submit();
        let (got, one) = (ctx.read(&batched).unwrap(), ctx.read(&single).unwrap());
        let case = format!("batch {batch} m={m} n={n} k={k} ta={ta} tb={tb} skip {au:?}");
        for (i, (&g, &o)) in got.iter().zip(&one).enumerate() {
            assert!(
                g.to_bits() == o.to_bits(),
                "{case}: element {i} (batch {}, offset {}): batched {g} single {o}",
                i / sc,
                i % sc
            );
        }
        for z in 0..batch {
            let exp = gemm_ref(
                m,
                n,
                k,
                alpha.into(),
                &a[z * sa..],
                lda,
                ta,
                &b[z * sb..],
                ldb,
                tb,
                0.0,
                &vec![0.0; m * n],
            );
            for i in 0..m {
                for j in 0..n {
                    let e = exp[i * n + j] + f64::from(beta) * f64::from(c0[z * sc + i * ldc + j]);
                    let g = f64::from(got[z * sc + i * ldc + j]);
                    let tol = 1e-5 * (k as f64).sqrt().max(1.0) + 1e-5 * e.abs();
                    assert!(
                        (g - e).abs() <= tol,
                        "{case}: batch {z} ({i}, {j}): got {g} expected {e}"
                    );
                }
            }
            // Outside the views (the gaps and the columns beyond n): untouched.
            for idx in 0..sc {
                let (i, j) = (idx / ldc, idx % ldc);
                if i >= m || j >= n {
                    assert_eq!(
                        got[z * sc + idx].to_bits(),
                        c0[z * sc + idx].to_bits(),
                        "{case}: batch {z} element {idx} outside the view was written"
                    );
                }
            }
        }
    }
}

/// `gemm_narrow` (32×64 tiles, 32 k per barrier) sums what `gemm_small` sums in the same order, so
/// the two write the same bits: over shapes of 1, primes, non-multiples of both tiles and of the
/// 32-deep slice, the solve's block shape, both transposes, unaligned and aligned views, beta 0
/// and not, the upper triangle with shifts, declared zero triangles (really zero, the other
/// entries random) and batches with gaps between their views.
#[test]
fn gemm_narrow_equals_gemm_small_bit_for_bit() {
    let Some(ctx) = test_context() else { return };
    // (m, n, k, ta, tb, upper shift, a_upper, b_upper, batch)
    type Case = (
        usize,
        usize,
        usize,
        bool,
        bool,
        Option<i32>,
        Option<i64>,
        Option<i64>,
        usize,
    );
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (1, 1, 1, false, false, None, None, None, 1),
        (1, 7, 3, true, false, None, None, None, 1),
        (31, 65, 33, false, true, None, None, None, 1),
        (33, 63, 32, true, true, None, None, None, 2),
        (97, 131, 61, false, false, None, None, None, 1),
        (1031, 128, 130, false, false, None, None, None, 1),
        (1024, 1, 67, false, true, None, None, None, 1),
        (260, 132, 300, false, false, None, None, None, 3),
        (68, 132, 36, true, false, None, None, None, 1),
        (131, 131, 37, false, true, Some(0), None, None, 1),
        (96, 96, 40, true, true, Some(-5), None, None, 2),
        (200, 140, 131, false, false, None, Some(3), Some(70), 1),
        (130, 129, 140, true, true, None, Some(-20), Some(40), 2),
    ];
    for (seed, &(m, n, k, ta, tb, upper, au, bu, batch)) in cases.iter().enumerate() {
        let mut r = rng(7700 + seed as u64);
        let skip = ops::KSkip {
            a_upper: au,
            b_upper: bu,
            ..Default::default()
        };
        // Every other case has odd leading dimensions and views starting one element into their
        // buffers (scalar loads); the rest start 4 elements in with leading dimensions that are
        // multiples of 4 (whole vec4 loads where the kernel can).
        let (pad, off) = if seed % 2 == 0 { (4, 4) } else { (3, 1) };
        let lda = if ta { m } else { k }.next_multiple_of(4) + pad;
        let ldb = if tb { k } else { n }.next_multiple_of(4) + pad;
        let ldc = n + 2;
        let (rows_a, rows_b) = (if ta { k } else { m }, if tb { n } else { k });
        let (sa, sb, sc) = (rows_a * lda + 12, rows_b * ldb + 8, m * ldc + 13);
        let mut a = rand_vec(&mut r, batch * sa);
        let mut b = rand_vec(&mut r, batch * sb);
        for z in 0..batch {
            for i in 0..m {
                for l in 0..k {
                    if au.is_some_and(|s| (l as i64) < i as i64 + s) {
                        a[z * sa + off + if ta { l * lda + i } else { i * lda + l }] = 0.0;
                    }
                }
            }
            for l in 0..k {
                for j in 0..n {
                    if bu.is_some_and(|s| l as i64 > j as i64 + s) {
                        b[z * sb + off + if tb { j * ldb + l } else { l * ldb + j }] = 0.0;
                    }
                }
            }
        }
        let c0 = rand_vec(&mut r, batch * sc);
        let beta = if seed % 3 == 0 { 0.0 } else { 0.5 };
        let ga = ctx.upload("a", &a).unwrap();
        let gb = ctx.upload("b", &b).unwrap();
        let view = |buf, ld, t| {
            let mut v = MatView::new(buf, ld).at(off);
            v.trans = t;
            v
        };
        let run = |tile: GemmTile| -> Vec<f32> {
            let gc = ctx.upload("c", &c0).unwrap();
            let mut rec = ctx.recorder();
            ops::gemm_forced(
                &mut rec,
                tile,
                upper,
                (m, n, k),
                -0.75,
                view(&ga, lda, ta),
                view(&gb, ldb, tb),
                beta,
                MatView::new(&gc, ldc),
                skip,
                (batch, (sa, sb, sc)),
            )
            .unwrap();
            rec.submit();
            ctx.read(&gc).unwrap()
        };
        let (small, narrow) = (run(GemmTile::Small), run(GemmTile::Narrow));
        let case = format!(
            "m={m} n={n} k={k} ta={ta} tb={tb} upper {upper:?} skip {au:?}/{bu:?} batch {batch} \
             lda {lda} ldb {ldb}"
        );
        if let Some(i) = (0..small.len()).find(|&i| small[i].to_bits() != narrow[i].to_bits()) {
            panic!(
                "{case}: element {i} (batch {}, row {}, column {}): narrow {} small {}",
                i / sc,
                (i % sc) / ldc,
                (i % sc) % ldc,
                narrow[i],
                small[i]
            );
        }
        // And the product is there: the first batch's first element against f64.
        let exp = gemm_ref(
            m,
            n,
            k,
            -0.75,
            &a[off..],
            lda,
            ta,
            &b[off..],
            ldb,
            tb,
            0.0,
            &vec![0.0; m * n],
        );
        if upper.is_none_or(|d| d >= 0) {
            let want = exp[0] + f64::from(beta) * f64::from(c0[0]);
            assert!(
                (f64::from(narrow[0]) - want).abs() <= 1e-4 * (k as f64).sqrt().max(1.0),
                "{case}: element 0: narrow {} expected {want}",
                narrow[0]
            );
        }
    }
}

/// The size rule's kernels at the shapes measured on an H100 (`ops::narrow_fits`).
#[test]
fn size_rule_takes_narrow_where_gemm_small_cannot_fill_the_gpu() {
    if std::env::var_os("GPTAQ_GEMM_NARROW").is_some() {
        eprintln!("note: GPTAQ_GEMM_NARROW is set; the rule's default is not checked");
        return;
    }
    for (m, n, k, want) in [
        // The solve's catch-ups and the factor's 128-wide panels.
        (4096, 128, 384, GemmTile::Narrow),
        (14336, 128, 128, GemmTile::Narrow),
        (1024, 96, 32, GemmTile::Narrow),
        // The factor's small square blocks.
        (256, 256, 256, GemmTile::Narrow),
        (512, 512, 512, GemmTile::Narrow),
        // 256 small tiles: gemm_small was faster there.
        (1024, 1024, 1024, GemmTile::Small),
        (4096, 256, 384, GemmTile::Small),
        // Less than one slice of K.
        (4096, 128, 16, GemmTile::Small),
        (4096, 14336, 512, GemmTile::Large),
    ] {
        assert_eq!(ops::gemm_tile_rule(m, n, k), want, "{m}×{n}×{k}");
    }
}

/// One staged-kernel product for `coop_raster_keeps_products`: `entry` over `groups`, layouts
/// (A_T, B_T), K_FROM_COL and RASTER (0: not set) as given, overwriting a C that starts as NaN.
fn staged_into_nan(
    ctx: &GpuContext,
    entry: &'static str,
    (ta, tb, from_col, raster): (bool, bool, bool, u32),
    (m, n, k): (usize, usize, usize),
    a: &gptaq_studio::gpu::GpuBuffer<half::f16>,
    b: &gptaq_studio::gpu::GpuBuffer<half::f16>,
    groups: [u32; 3],
) -> Vec<f32> {
    let c = ctx.upload("c", &vec![f32::NAN; m * n]).unwrap();
    let flag = |v: bool| f64::from(u8::from(v));
    let mut consts = vec![
        ("A_T", flag(ta)),
        ("B_T", flag(tb)),
        ("ACCUMULATE", 0.0),
        ("K_FROM_COL", flag(from_col)),
    ];
    if raster > 0 {
        consts.push(("RASTER", f64::from(raster)));
    }
    let ld = (if ta { m } else { k }, if tb { k } else { n }, n);
    let mut rec = ctx.recorder();
    rec.dispatch(
        &ops::GEMM_STAGED_COOP,
        entry,
        &consts,
        &ops::CoopParams::dense((m, n, k), ld).unwrap(),
        &[a.binding(), b.binding(), c.binding()],
        groups,
    )
    .unwrap();
    rec.submit();
    ctx.read(&c).unwrap()
}

/// The staged kernel's grouped rasterisation (`RASTER` in gemm_staged_coop.wgsl,
/// `ops::coop_raster`, `ops::coop_raster_upper`) only reorders which workgroup takes which block:
/// every block of C is written exactly once, with the same sums. The full grid: block rows not a
/// multiple of the group (a short last group), a single block row or column, each operand
/// layout; the upper entry: triangles of 1 to 24 block columns, groups that divide them and one
/// that mostly does not. C starts as NaN and is overwritten, so a block left out shows. Needs the
/// staged tensor-core kernels.
#[test]
fn coop_raster_keeps_products() {
    let Some(ctx) = test_context() else { return };
    if !ops::coop_staged_available(&ctx) {
        eprintln!("note: no staged tensor-core kernels here; the grouped raster not exercised");
        return;
    }
    let mut r = rng(0x7a57);
    let mut f16s = |len: usize| {
        let v: Vec<half::f16> = rand_vec(&mut r, len)
            .into_iter()
            .map(half::f16::from_f32)
            .collect();
        ctx.upload("operand", &v).unwrap()
    };
    // Bit-for-bit equality with the plain order, naming the first element that differs.
    let same = |what: &str, got: &[f32], want: &[f32], n: usize| {
        if let Some(i) = (0..want.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            panic!(
                "{what}: C[{}, {}] got {} expected {}",
                i / n,
                i % n,
                got[i],
                want[i]
            );
        }
    };
    for (m, n, k) in [
        (640usize, 384usize, 64usize),
        (128, 896, 32),
        (1152, 256, 96),
        (256, 128, 32),
    ] {
        for (ta, tb) in [(false, true), (true, false), (false, false)] {
            let (a, b) = (f16s(m * k), f16s(n * k));
            let groups = [(n / 128) as u32, (m / 128) as u32, 1];
            let run = |raster| {
                staged_into_nan(
                    &ctx,
                    "gemm_coop_128",
                    (ta, tb, false, raster),
                    (m, n, k),
                    &a,
                    &b,
                    groups,
                )
            };
            let want = run(0);
            if let Some(i) = want.iter().position(|v| v.is_nan()) {
                panic!(
                    "{m}x{n}x{k} (A_T {ta}, B_T {tb}), grid order: C[{}, {}] never written",
                    i / n,
                    i % n
                );
            }
            for raster in [2u32, 3, 4, 8, 16] {
                let what = format!("{m}x{n}x{k} (A_T {ta}, B_T {tb}), RASTER {raster}");
                same(&what, &run(raster), &want, n);
            }
        }
    }
    // The upper entry (the Hessian's Tn128Upper and GPTAQ's Nt128UpperTail): its triangle in
    // chunks of RASTER block columns where RASTER divides them (3 does only for 3 and 24 block
    // columns; elsewhere the column order stays), blocks below the diagonal never written.
    for bn in [1usize, 2, 3, 8, 16, 24] {
        let n = 128 * bn;
        for (ta, tb, from_col) in [(true, false, false), (false, true, true)] {
            let k = if from_col { n } else { 64 };
            let (a, b) = (f16s(n * k), f16s(n * k));
            let groups = [(bn * (bn + 1) / 2) as u32, 1, 1];
            let run = |raster| {
                staged_into_nan(
                    &ctx,
                    "gemm_coop_128_upper",
                    (ta, tb, from_col, raster),
                    (n, n, k),
                    &a,
                    &b,
                    groups,
                )
            };
            let want = run(0);
            for (i, w) in want.iter().enumerate() {
                let upper = (i / n) / 128 <= (i % n) / 128;
                assert!(
                    w.is_nan() != upper,
                    "{n}x{n}x{k} upper (K_FROM_COL {from_col}), column order: C[{}, {}] = {w} \
                     (blocks on and above the diagonal are written, the others not)",
                    i / n,
                    i % n
                );
            }
            for raster in [2u32, 3, 4, 8] {
                let what = format!("{n}x{n}x{k} upper (K_FROM_COL {from_col}), RASTER {raster}");
                same(&what, &run(raster), &want, n);
            }
        }
    }
}
