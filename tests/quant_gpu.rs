//! The GPU GPTQ / GPTAQ solve (src/quant/gpu.rs) against the f64 CPU reference
//! (`quant::reference::quantize_reference`) on random problems: awkward shapes (1×1 up to 200×384,
//! columns not multiples of the block or group size), rank-deficient H, dead columns, bits 2/3/4/8,
//! sym/asym, group −1 / 32 / other sizes, act-order ± static groups, GPTAQ α ∈ {0, 0.25, 1}, block
//! sizes 128 and small ones (the same block size for both sides: results depend on it, §1.2 quirk).
//!
//! Acceptance criteria (the GPU works in f32, the reference in f64; see src/quant/gpu.rs docs):
//! - perm, g_idx, damping and fallback identical;
//! - codes identical except near round-off ties: a tie flip changes the error fed forward, which may
//!   flip a few more codes of the same row, so we bound the fraction of differing codes
//!   (`MAX_CODE_MISMATCH`, printed per case) and require every difference to be ±1 … small;
//! - where codes agree, `q` agrees to one f16 ulp of the scale (parameters computed from f32 values
//!   may land on the other side of an f16 rounding tie);
//! - proxy loss within `LOSS_RTOL` relative;
//! - the GPU `q` buffer equals `result.q`; GPTAQ with α = 0 equals GPTQ on the GPU bit for bit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

mod common;

use gptaq_studio::gpu::{GpuContext, test_context};
use gptaq_studio::quant::gpu::quantize_gpu;
use gptaq_studio::quant::reference::quantize_reference;
use gptaq_studio::quant::{Method, QuantConfig, QuantResult};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Largest tolerated fraction of codes that differ from the f64 reference.
const MAX_CODE_MISMATCH: f64 = 0.02;
/// Relative tolerance of the proxy loss.
const LOSS_RTOL: f64 = 2e-3;

fn gauss(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

struct Problem {
    rows: usize,
    cols: usize,
    w: Vec<f32>,
    h: Vec<f32>,
    d: Vec<f32>,
}

/// Random W (with a few outliers), correlated inputs with per-column scales (act-order matters),
/// `tokens < cols` gives a rank-deficient H, dead columns have X_q = 0. `X_fp = X_q + noise`.
fn problem(rows: usize, cols: usize, tokens: usize, seed: u64, dead: &[usize]) -> Problem {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| {
            let g = gauss(&mut rng);
            (if rng.random::<f64>() < 0.02 {
                4.0 * g
            } else {
                0.5 * g
            }) as f32
        })
        .collect();
    let col_scale: Vec<f64> = (0..cols).map(|_| 0.2 + 2.0 * rng.random::<f64>()).collect();
    let mut xq = vec![0.0f64; tokens * cols];
    let mut dx = vec![0.0f64; tokens * cols];
    for t in 0..tokens {
        let shared = gauss(&mut rng);
        for j in 0..cols {
            xq[t * cols + j] = col_scale[j] * (gauss(&mut rng) + 0.5 * shared);
            dx[t * cols + j] = 0.1 * col_scale[j] * gauss(&mut rng) + 0.05 * xq[t * cols + j];
        }
        for &j in dead {
            xq[t * cols + j] = 0.0;
        }
    }
    let gram = |a: &[f64], b: &[f64]| -> Vec<f32> {
        let mut g = vec![0.0f64; cols * cols];
        for t in 0..tokens {
            for i in 0..cols {
                let ai = a[t * cols + i];
                for j in 0..cols {
                    g[i * cols + j] += ai * b[t * cols + j];
                }
            }
        }
        g.iter().map(|v| (v * 2.0 / tokens as f64) as f32).collect()
    };
    let h = gram(&xq, &xq);
    let d = gram(&dx, &xq);
    Problem {
        rows,
        cols,
        w,
        h,
        d,
    }
}

#[allow(clippy::too_many_arguments)]
fn cfg(
    method: Method,
    bits: u32,
    gs: Option<usize>,
    sym: bool,
    act_order: bool,
    static_groups: bool,
    bs: usize,
    mse: bool,
) -> QuantConfig {
    QuantConfig {
        method,
        bits,
        group_size: gs,
        sym,
        act_order,
        static_groups,
        damp_percent: 0.01,
        damp_auto_increment: 0.01,
        block_size: bs,
        mse,
    }
}

fn run_gpu(ctx: &GpuContext, p: &Problem, c: &QuantConfig) -> QuantResult {
    let n = p.cols;
    let gh = ctx.matrix_upload("h", &p.h, n, n, 1).unwrap();
    let gd = ctx.matrix_upload("d", &p.d, n, n, 1).unwrap();
    let solve = quantize_gpu(ctx, &p.w, p.rows, p.cols, &gh, Some(&gd), c)
        .unwrap_or_else(|e| panic!("GPU solve {}×{} {c:?}: {e}", p.rows, p.cols));
    // H and D must not be modified.
    assert_eq!(ctx.read_matrix(&gh).unwrap(), p.h, "H was modified");
    assert_eq!(ctx.read_matrix(&gd).unwrap(), p.d, "D was modified");
    let q = ctx
        .read(solve.q.as_ref().expect("quantize_gpu returns Q"))
        .unwrap();
    assert_eq!(q, solve.result.q, "GPU q buffer differs from result.q");
    solve.result
}

/// Compares a GPU result with the reference; returns the number of differing codes.
fn compare(name: &str, got: &QuantResult, exp: &QuantResult, maxq: u32) -> usize {
    let n_el = exp.codes.len();
    assert_eq!(got.codes.len(), n_el, "{name}: codes length");
    assert_eq!(got.perm, exp.perm, "{name}: perm");
    assert_eq!(got.g_idx, exp.g_idx, "{name}: g_idx");
    assert_eq!(got.fallback, exp.fallback, "{name}: fallback");
    assert_eq!(got.damp_percent, exp.damp_percent, "{name}: damp_percent");
    assert!(
        (got.damp - exp.damp).abs() <= 1e-12 * exp.damp.abs().max(1.0),
        "{name}: damp got {} expected {}",
        got.damp,
        exp.damp
    );
    assert_eq!(got.scales.len(), exp.scales.len(), "{name}: scales length");
    assert_eq!(got.zeros.len(), exp.zeros.len(), "{name}: zeros length");
    let cols = exp.cols;
    let mut mismatches = 0usize;
    let mut first = None;
    for i in 0..n_el {
        let (g, e) = (got.codes[i], exp.codes[i]);
        assert!(u32::from(g) <= maxq, "{name}: code {g} > maxq at {i}");
        if g != e {
            mismatches += 1;
            first.get_or_insert((i / cols, i % cols, g, e));
        } else {
            // Same code: q differs at most by the scale difference (≤ one f16 ulp, ~2⁻¹⁰ rel).
            let (gq, eq) = (f64::from(got.q[i]), f64::from(exp.q[i]));
            let tol = 2e-3 * eq.abs() + 1e-12;
            assert!(
                (gq - eq).abs() <= tol,
                "{name}: q at row {} col {} (code {g}): got {gq} expected {eq}",
                i / cols,
                i % cols
            );
        }
    }
    let frac = mismatches as f64 / n_el.max(1) as f64;
    let scale_diff = got
        .scales
        .iter()
        .zip(&exp.scales)
        .filter(|(a, b)| a != b)
        .count();
    if let Some((i, (a, b))) = got
        .scales
        .iter()
        .zip(&exp.scales)
        .enumerate()
        .find(|(_, (a, b))| a != b)
    {
        eprintln!(
            "{name}: first scale diff at {i}: got {a:e} expected {b:e}, zeros {} vs {}",
            got.zeros[i], exp.zeros[i]
        );
    }
    let rel_loss =
        (got.proxy_loss_sum - exp.proxy_loss_sum).abs() / exp.proxy_loss_sum.abs().max(1e-30);
    eprintln!(
        "{name}: {mismatches}/{n_el} codes differ ({:.3}%), {scale_diff}/{} scales differ, \
         loss gpu {:.6e} ref {:.6e} (rel {rel_loss:.2e}){}",
        100.0 * frac,
        exp.scales.len(),
        got.proxy_loss_sum,
        exp.proxy_loss_sum,
        first
            .map(|(r, c, g, e)| format!("; first diff row {r} col {c}: got {g} expected {e}"))
            .unwrap_or_default()
    );
    assert!(
        frac <= MAX_CODE_MISMATCH,
        "{name}: {mismatches} of {n_el} codes differ ({:.3}% > {:.1}%); first (row, col, got, expected) {first:?}",
        100.0 * frac,
        100.0 * MAX_CODE_MISMATCH
    );
    assert!(
        rel_loss <= LOSS_RTOL || (got.proxy_loss_sum - exp.proxy_loss_sum).abs() < 1e-9,
        "{name}: proxy loss got {} expected {} (rel {rel_loss:.3e} > {LOSS_RTOL:e})",
        got.proxy_loss_sum,
        exp.proxy_loss_sum
    );
    // Per-column terms (processing order) and diag(H): the same quantities the detail view plots.
    assert_eq!(got.h_diag.len(), exp.h_diag.len(), "{name}: h_diag length");
    for (k, (g, e)) in got.h_diag.iter().zip(&exp.h_diag).enumerate() {
        assert!(
            (g - e).abs() <= 1e-6 * e.abs(),
            "{name}: h_diag[{k}] got {g} expected {e}"
        );
    }
    assert_eq!(
        got.column_loss.len(),
        exp.column_loss.len(),
        "{name}: column_loss length"
    );
    // A column with a differing code legitimately has a different loss term: skip those.
    let mut differs = vec![false; cols];
    for i in 0..n_el {
        if got.codes[i] != exp.codes[i] {
            let j = i % cols;
            let k = exp
                .perm
                .as_ref()
                .map_or(j, |p| p.iter().position(|&x| x == j).unwrap());
            differs[k] = true;
        }
    }
    let floor = 1e-6 * exp.proxy_loss_sum.abs() / cols.max(1) as f64 + 1e-12;
    for (k, (g, e)) in got.column_loss.iter().zip(&exp.column_loss).enumerate() {
        if differs[k] {
            continue;
        }
        assert!(
            (g - e).abs() <= LOSS_RTOL * e.abs() + floor,
            "{name}: column_loss[{k}] (processing order) got {g:e} expected {e:e}"
        );
    }
    let col_sum: f64 = got.column_loss.iter().sum();
    assert!(
        (col_sum - got.proxy_loss_sum).abs() <= 1e-4 * got.proxy_loss_sum.abs() + 1e-9,
        "{name}: Σ column_loss {col_sum:e} != proxy_loss_sum {:e}",
        got.proxy_loss_sum
    );
    mismatches
}

fn check(ctx: &GpuContext, name: &str, p: &Problem, c: &QuantConfig) -> QuantResult {
    let t0 = Instant::now();
    let exp = quantize_reference(&p.w, p.rows, p.cols, &p.h, Some(&p.d), c).unwrap();
    let t1 = Instant::now();
    let got = run_gpu(ctx, p, c);
    let t2 = Instant::now();
    let name = format!("{name} [{}×{}]", p.rows, p.cols);
    compare(&name, &got, &exp, c.maxq());
    eprintln!(
        "  {name}: reference {:.0} ms, gpu {:.0} ms",
        (t1 - t0).as_secs_f64() * 1e3,
        (t2 - t1).as_secs_f64() * 1e3
    );
    got
}

const GPTQ: Method = Method::Gptq;
const fn gptaq(alpha: f64) -> Method {
    Method::Gptaq { alpha }
}

#[test]
fn tiny_shapes() {
    let Some(ctx) = test_context() else { return };
    let p = problem(1, 1, 4, 1, &[]);
    check(
        &ctx,
        "1x1 gptq 4b sym",
        &p,
        &cfg(GPTQ, 4, None, true, false, false, 128, false),
    );
    check(
        &ctx,
        "1x1 gptaq 2b asym",
        &p,
        &cfg(gptaq(1.0), 2, Some(1), false, true, false, 128, false),
    );
    let p = problem(1, 7, 16, 2, &[3]);
    check(
        &ctx,
        "1x7 gptaq 3b asym",
        &p,
        &cfg(gptaq(0.25), 3, None, false, false, false, 128, false),
    );
    check(
        &ctx,
        "1x7 gptq 8b act bs2",
        &p,
        &cfg(GPTQ, 8, Some(7), true, true, false, 2, false),
    );
}

#[test]
fn odd_shapes_groups_and_act_order() {
    let Some(ctx) = test_context() else { return };
    let p = problem(13, 37, 64, 3, &[0, 20]);
    check(
        &ctx,
        "13x37 gptq 2b asym gs32 bs16 act",
        &p,
        &cfg(GPTQ, 2, Some(32), false, true, false, 16, false),
    );
    check(
        &ctx,
        "13x37 gptaq1 4b sym gs32 bs128",
        &p,
        &cfg(gptaq(1.0), 4, Some(32), true, false, false, 128, false),
    );
    // Blocks of 5 over 37 columns: most blocks start and end inside a 4-code word of the packed
    // codes (quant_sweep.wgsl), and the rows' last word is partial.
    check(
        &ctx,
        "13x37 gptaq.25 3b asym gs-1 bs5 act",
        &p,
        &cfg(gptaq(0.25), 3, None, false, true, false, 5, false),
    );
    check(
        &ctx,
        "13x37 gptq 8b sym gs8 bs5",
        &p,
        &cfg(GPTQ, 8, Some(8), true, false, false, 5, false),
    );
    let p = problem(64, 128, 256, 4, &[]);
    check(
        &ctx,
        "64x128 gptaq.25 4b sym gs32 bs128",
        &p,
        &cfg(gptaq(0.25), 4, Some(32), true, false, false, 128, false),
    );
    check(
        &ctx,
        "64x128 gptq 3b asym gs-1 bs32 act",
        &p,
        &cfg(GPTQ, 3, None, false, true, false, 32, false),
    );
    // Eight blocks with groups inside them: the cross-block updates run once per four blocks
    // with catch-ups in between (quant::gpu `lazy_blocks`).
    check(
        &ctx,
        "64x128 gptq 4b asym gs16 bs16 act (lazy updates)",
        &p,
        &cfg(GPTQ, 4, Some(16), false, true, false, 16, false),
    );
    check(
        &ctx,
        "64x128 gptaq1 8b sym gs16 bs128 act+static",
        &p,
        &cfg(gptaq(1.0), 8, Some(16), true, true, true, 128, false),
    );
}

#[test]
fn rank_deficient_and_dead_columns() {
    let Some(ctx) = test_context() else { return };
    // 257 columns (not a multiple of block or group), 100 tokens < 257: rank-deficient H.
    let p = problem(96, 257, 100, 5, &[1, 2, 100, 256]);
    check(
        &ctx,
        "96x257 gptaq.25 3b sym gs64 bs32 act+static",
        &p,
        &cfg(gptaq(0.25), 3, Some(64), true, true, true, 32, false),
    );
    check(
        &ctx,
        "96x257 gptq 4b asym gs32 bs128 act",
        &p,
        &cfg(GPTQ, 4, Some(32), false, true, false, 128, false),
    );
}

#[test]
fn largest_shape() {
    let Some(ctx) = test_context() else { return };
    let p = problem(200, 384, 512, 6, &[7]);
    check(
        &ctx,
        "200x384 gptaq.25 4b sym gs128 bs128",
        &p,
        &cfg(gptaq(0.25), 4, Some(128), true, false, false, 128, false),
    );
    check(
        &ctx,
        "200x384 gptq 2b asym gs96 bs64 act",
        &p,
        &cfg(GPTQ, 2, Some(96), false, true, false, 64, false),
    );
}

/// The whole solve with H and D in row panels of 100 rows and U, P, T in panels of whole blocks
/// (as on an adapter whose storage bindings hold fewer than n rows): the same acceptance as the
/// single-buffer solve, over dead columns, act-order, groups, static groups and GPTAQ. A block
/// larger than a panel is refused with a message naming the matrix.
#[test]
fn solve_in_row_panels_matches_reference() {
    let Some(ctx) = test_context() else { return };
    let (rows, n) = (40, 320);
    let p = problem(rows, n, 360, 11, &[3, 250]);
    ctx.set_panel_cap(Some((100 * n * 4) as u64));
    check(
        &ctx,
        "gptaq.25 4b sym gs-1 bs32 act, H/D panels 100, U/P panels 96",
        &p,
        &cfg(gptaq(0.25), 4, None, true, true, false, 32, false),
    );
    check(
        &ctx,
        "gptq 3b asym gs80 bs64, H panels 100, U panels 64",
        &p,
        &cfg(GPTQ, 3, Some(80), false, false, false, 64, false),
    );
    check(
        &ctx,
        "gptaq1 4b sym gs64 static act bs64, panels",
        &p,
        &cfg(gptaq(1.0), 4, Some(64), true, true, true, 64, false),
    );
    check(
        &ctx,
        "gptaq.25 3b asym gs96 act bs64 (whole P), panels",
        &p,
        &cfg(gptaq(0.25), 3, Some(96), false, true, false, 64, false),
    );
    let gh = ctx.matrix_upload("h", &p.h, n, n, 1).unwrap();
    let err = quantize_gpu(
        &ctx,
        &p.w,
        rows,
        n,
        &gh,
        None,
        &cfg(GPTQ, 4, None, true, false, false, 128, false),
    )
    .err()
    .expect("a 128-row block cannot fit a 100-row panel");
    ctx.set_panel_cap(None);
    assert!(err.to_string().contains("factor K"), "{err}");
}

#[test]
fn mse_grid_and_group_larger_than_block() {
    let Some(ctx) = test_context() else { return };
    let p = problem(24, 96, 128, 7, &[]);
    check(
        &ctx,
        "24x96 gptq 4b asym gs48 bs16 mse",
        &p,
        &cfg(GPTQ, 4, Some(48), false, false, false, 16, true),
    );
    check(
        &ctx,
        "24x96 gptaq.25 3b sym gs-1 bs32 mse",
        &p,
        &cfg(gptaq(0.25), 3, None, true, false, false, 32, true),
    );
    // Dynamic groups spanning three blocks: GPTAQ keeps the whole P here (quant::gpu's
    // `PForm`: the stale-W group parameters read columns of later blocks).
    check(
        &ctx,
        "24x96 gptaq1 4b asym gs48 bs16 (whole P)",
        &p,
        &cfg(gptaq(1.0), 4, Some(48), false, false, false, 16, false),
    );
}

#[test]
fn gptaq_alpha_zero_equals_gptq_on_gpu() {
    let Some(ctx) = test_context() else { return };
    let p = problem(48, 100, 160, 8, &[5]);
    for (gs, act, bs) in [
        (Some(32), false, 128),
        (Some(25), true, 16),
        (None, true, 32),
    ] {
        let c0 = cfg(GPTQ, 4, gs, true, act, false, bs, false);
        let c1 = QuantConfig {
            method: gptaq(0.0),
            ..c0.clone()
        };
        let a = run_gpu(&ctx, &p, &c0);
        let b = run_gpu(&ctx, &p, &c1);
        assert_eq!(a.codes, b.codes, "gs {gs:?} act {act} bs {bs}: codes");
        assert_eq!(a.q, b.q, "gs {gs:?} act {act} bs {bs}: q");
        assert_eq!(a.scales, b.scales, "gs {gs:?} act {act} bs {bs}: scales");
        assert_eq!(
            a.proxy_loss_sum, b.proxy_loss_sum,
            "gs {gs:?} act {act} bs {bs}: loss"
        );
    }
}

/// GPTAQ's solve reads only D's strict upper triangle in processing order (the pipeline then
/// accumulates only D's upper blocks, pipeline/driver.rs `d_upper`): without act-order, garbage
/// on and below D's diagonal gives bit for bit the same result on the GPU and in the f64
/// reference; with act-order the processing order is permuted, and the same garbage changes it
/// (which is why the pipeline keeps the whole D there).
#[test]
fn gptaq_reads_only_the_strict_upper_triangle_of_d() {
    let Some(ctx) = test_context() else { return };
    let p = problem(40, 300, 400, 12, &[7]);
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let n = p.cols;
    let mut d = p.d.clone();
    for i in 0..n {
        for j in 0..=i {
            d[i * n + j] = (10.0 * gauss(&mut rng)) as f32;
        }
    }
    let garbage = Problem {
        rows: p.rows,
        cols: n,
        w: p.w.clone(),
        h: p.h.clone(),
        d,
    };
    for (gs, act, bs) in [
        (Some(32), false, 128),
        (None, false, 64),
        (Some(32), true, 128),
    ] {
        let c = cfg(gptaq(0.25), 4, gs, true, act, false, bs, false);
        let (a, b) = (run_gpu(&ctx, &p, &c), run_gpu(&ctx, &garbage, &c));
        let ra = quantize_reference(&p.w, p.rows, p.cols, &p.h, Some(&p.d), &c).unwrap();
        let rb = quantize_reference(&p.w, p.rows, p.cols, &p.h, Some(&garbage.d), &c).unwrap();
        if act {
            assert_ne!(
                a.q, b.q,
                "act-order: the GPU solve ignored D's lower triangle"
            );
            assert_ne!(
                ra.q, rb.q,
                "act-order: the reference ignored D's lower triangle"
            );
        } else {
            assert_eq!(a.codes, b.codes, "gs {gs:?} bs {bs}: GPU codes");
            assert_eq!(a.q, b.q, "gs {gs:?} bs {bs}: GPU q");
            assert_eq!(a.scales, b.scales, "gs {gs:?} bs {bs}: GPU scales");
            assert_eq!(ra.codes, rb.codes, "gs {gs:?} bs {bs}: reference codes");
            assert_eq!(ra.q, rb.q, "gs {gs:?} bs {bs}: reference q");
        }
    }
}

#[test]
fn indefinite_hessian_falls_back_to_rtn_like_reference() {
    let Some(ctx) = test_context() else { return };
    let mut p = problem(8, 16, 32, 9, &[]);
    // A negative-definite H: no damping makes it SPD → RTN fallback on both sides.
    for v in p.h.iter_mut() {
        *v = -*v;
    }
    let c = cfg(GPTQ, 4, Some(8), true, false, false, 128, false);
    let exp = quantize_reference(&p.w, p.rows, p.cols, &p.h, None, &c).unwrap();
    let got = run_gpu(&ctx, &p, &c);
    assert!(
        matches!(
            got.fallback,
            Some(gptaq_studio::quant::Fallback::Rtn { .. })
        ),
        "expected RTN fallback, got {:?}",
        got.fallback
    );
    assert_eq!(got.codes, exp.codes);
    assert_eq!(got.q, exp.q);
    assert_eq!(got.proxy_loss_sum, exp.proxy_loss_sum);
}

#[test]
fn rtn_method_is_rejected_with_a_clear_error() {
    let Some(ctx) = test_context() else { return };
    let p = problem(2, 4, 8, 10, &[]);
    let gh = ctx.matrix_upload("h", &p.h, 4, 4, 1).unwrap();
    let c = cfg(Method::Rtn, 4, None, true, false, false, 128, false);
    let err = quantize_gpu(&ctx, &p.w, 2, 4, &gh, None, &c)
        .err()
        .expect("Rtn must be refused");
    assert!(err.to_string().contains("Rtn"), "{err}");
    // Wrong W length is an error, not a panic.
    let err = quantize_gpu(
        &ctx,
        &p.w[..3],
        2,
        4,
        &gh,
        None,
        &cfg(GPTQ, 4, None, true, false, false, 128, false),
    );
    assert!(err.is_err());
}

/// The f32 GPU factor (quant/factor.rs) against the f64 reference, on sizes around the 32-column
/// panel and the doubling inverse's levels, with a permuted processing order and damping retries.
#[test]
fn inverse_factor_matches_f64_reference_on_awkward_sizes() {
    use gptaq_studio::quant::factor::upper_inverse_factor_gpu;
    use gptaq_studio::quant::reference::inverse_hessian_factor_f64;
    let Some(ctx) = test_context() else { return };
    // (n, panel cap in rows: 0 = whole matrices; else H in panels of that many rows and K, M and U
    // in panels of its multiple of 32 — different layouts, so the gathers cross panels).
    for (seed, &(n, cap_rows)) in [
        (1usize, 0usize),
        (2, 0),
        (31, 0),
        (32, 0),
        (33, 0),
        (33, 32),
        (64, 0),
        (65, 0),
        (65, 40),
        (97, 0),
        (97, 33),
        (130, 0),
        (130, 64),
        (257, 0),
        (257, 100),
        // The doubling inverse's last level splits −B⁻¹·T into row chunks (b = 512, 188 rows
        // of B, at most 175 per chunk), also across panels.
        (700, 0),
        (700, 96),
    ]
    .iter()
    .enumerate()
    {
        ctx.set_panel_cap((cap_rows > 0).then_some((cap_rows * n * 4) as u64));
        let p = problem(1, n, 3 * n, 100 + seed as u64, &[]);
        // A processing order that reverses odd positions' halves: not the identity, not sorted.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&j| ((j * 7919) % n.max(1), j));
        let hp: Vec<f64> = (0..n * n)
            .map(|i| f64::from(p.h[order[i / n] * n + order[i % n]]))
            .collect();
        let diag: Vec<f64> = (0..n).map(|k| hp[k * n + k]).collect();
        let exp = inverse_hessian_factor_f64(&hp, n, 0.01, 0.0025).unwrap();
        let gh = ctx.matrix_upload("h", &p.h, n, n, 1).unwrap();
        let got = upper_inverse_factor_gpu(&ctx, &gh, &order, &diag, 0.01, 0.0025, 1)
            .unwrap()
            .unwrap_or_else(|e| panic!("n={n}: GPU factor failed: {e}"));
        assert_eq!(
            (got.fallback.clone(), got.damp_percent),
            (exp.fallback.clone(), exp.damp_percent),
            "n={n}: damping decisions differ"
        );
        ctx.set_panel_cap(None);
        if cap_rows > 0 {
            assert!(gh.panels().len() > 1, "n={n}: H not split");
            assert_eq!(
                got.value.panel_rows(),
                cap_rows / 32 * 32,
                "n={n}: U panel rows"
            );
        }
        let u = ctx.read_matrix(&got.value).unwrap();
        let scale = exp.u.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        // f32 factorisation of a damped H: round-off grows with n and the condition number.
        common::assert_close(
            &format!("U n={n} panels of {cap_rows} rows (max |U| {scale:.3e})"),
            &u,
            &exp.u,
            2e-4 * scale,
            2e-3,
        );
    }
}

/// A matrix that is SPD only after more damping: both factors retry the same schedule.
#[test]
fn inverse_factor_retries_damping_like_reference() {
    use gptaq_studio::quant::Fallback;
    use gptaq_studio::quant::factor::upper_inverse_factor_gpu;
    use gptaq_studio::quant::reference::inverse_hessian_factor_f64;
    let Some(ctx) = test_context() else { return };
    let n = 40;
    // Fewer tokens than columns: H is singular, so H − 0.02·mean·I has eigenvalues at −0.02·mean.
    let p = problem(1, n, n / 2, 77, &[]);
    let mean = (0..n).map(|j| f64::from(p.h[j * n + j])).sum::<f64>() / n as f64;
    // H − 0.02·mean·I: indefinite; 1% damping is not enough, 1% + 2·0.5% … is.
    let h: Vec<f32> = (0..n * n)
        .map(|i| {
            p.h[i]
                - if i / n == i % n {
                    (0.02 * mean) as f32
                } else {
                    0.0
                }
        })
        .collect();
    let h64: Vec<f64> = h.iter().map(|&v| f64::from(v)).collect();
    let order: Vec<usize> = (0..n).collect();
    let diag: Vec<f64> = (0..n).map(|j| h64[j * n + j]).collect();
    let exp = inverse_hessian_factor_f64(&h64, n, 0.01, 0.005).unwrap();
    assert_eq!(exp.fallback, Some(Fallback::IncreasedDamping));
    let gh = ctx.matrix_upload("h", &h, n, n, 1).unwrap();
    let got = upper_inverse_factor_gpu(&ctx, &gh, &order, &diag, 0.01, 0.005, 1)
        .unwrap()
        .unwrap_or_else(|e| panic!("GPU factor failed: {e}"));
    assert_eq!(got.fallback, exp.fallback);
    assert!(
        (got.damp_percent - exp.damp_percent).abs() < 1e-12,
        "damp_percent: got {} expected {}",
        got.damp_percent,
        exp.damp_percent
    );
}

/// A Hessian larger than this adapter's storage binding (5,824² against lavapipe's 128 MiB;
/// adapters that bind more than 256 MiB are capped to 64 MiB panels, n = 4,128, so the test stays
/// affordable): accumulated by the rank-k update into row panels, factored, and checked
/// through a probe vector, `Uᵀ·U·(H + λI)·v = v` (matrix–vector products, O(n²)).
#[test]
fn factor_of_a_hessian_beyond_one_binding() {
    use gptaq_studio::gpu::ops::{self, MatView};
    use gptaq_studio::quant::factor::{hessian_diag, upper_inverse_factor_gpu};
    let Some(ctx) = test_context() else { return };
    let mut limit = ctx.max_binding_bytes();
    if limit > 256 << 20 {
        limit = 64 << 20;
        ctx.set_panel_cap(Some(limit));
    }
    // The smallest multiple of 32 whose n² f32 exceed the limit.
    let n = (((limit / 4) as f64).sqrt() as usize / 32 + 1) * 32;
    assert!((n * n * 4) as u64 > limit);
    let t = 64;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let x: Vec<f32> = (0..t * n).map(|_| gauss(&mut rng) as f32).collect();
    let eye: Vec<f32> = (0..n * n)
        .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
        .collect();
    let h = ctx.matrix_upload("H", &eye, n, n, 32).unwrap();
    drop(eye);
    assert!(h.panels().len() > 1, "n={n}: H fits one binding");
    let gx = ctx.upload("X", &x).unwrap();
    let mut rec = ctx.recorder();
    // H = XᵀX/T + I: eigenvalues in [1, ≈ n/T + 1], so κ ≈ 100.
    ops::syrk_xtx(
        &mut rec,
        t,
        n,
        1.0 / t as f32,
        MatView::new(&gx, n),
        1.0,
        &h,
    )
    .unwrap();
    rec.submit();
    let diag: Vec<f64> = hessian_diag(&ctx, &h, n)
        .unwrap()
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    let t0 = Instant::now();
    let order: Vec<usize> = (0..n).collect();
    let f = upper_inverse_factor_gpu(&ctx, &h, &order, &diag, 0.01, 0.0025, 128)
        .unwrap()
        .unwrap_or_else(|e| panic!("n={n}: factor failed: {e}"));
    ctx.sync().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    ctx.set_panel_cap(None);
    let v: Vec<f32> = (0..n).map(|_| gauss(&mut rng) as f32).collect();
    let matvec = |m: &gptaq_studio::gpu::GpuMatrix, trans: bool, v: &[f32]| -> Vec<f32> {
        let gv = ctx.upload("v", v).unwrap();
        let out = ctx.zeros::<f32>("Mv", n).unwrap();
        let mut rec = ctx.recorder();
        let a = if trans { m.op(0, 0).t() } else { m.op(0, 0) };
        ops::gemm_mat(
            &mut rec,
            n,
            1,
            n,
            1.0,
            a,
            MatView::new(&gv, 1).into(),
            0.0,
            MatView::new(&out, 1).into(),
        )
        .unwrap();
        rec.submit();
        ctx.read(&out).unwrap()
    };
    // (H + λI)·v, in f64 for the λ part.
    let hv: Vec<f32> = matvec(&h, false, &v)
        .iter()
        .zip(&v)
        .map(|(&a, &b)| (f64::from(a) + f.damp * f64::from(b)) as f32)
        .collect();
    let w = matvec(&f.value, true, &matvec(&f.value, false, &hv));
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in w.iter().zip(&v) {
        num += (f64::from(a) - f64::from(b)).powi(2);
        den += f64::from(b).powi(2);
    }
    let rel = (num / den).sqrt();
    eprintln!(
        "n={n} ({} MiB, {} panels of {} rows; binding {} MiB): factor {secs:.1} s, ‖UᵀU(H+λI)v − v‖/‖v‖ = {rel:.2e}",
        (n * n * 4) >> 20,
        f.value.panels().len(),
        f.value.panel_rows(),
        limit >> 20
    );
    assert!(
        rel < 1e-4,
        "n={n}: UᵀU(H+λI)v differs from v by {rel:e} (relative)"
    );
}

/// A W already on the GPU (the pipeline's layer weights) gives bit for bit the solve of the host
/// W: a device copy replaces the upload where the preparation leaves W alone, a device gather
/// (`gather_cols`) where act-order permutes or dead columns are zeroed — with dynamic groups, per-
/// row params and static groups alike (the last two still read W on the host for their params).
/// The GPU copy is only read; a W of the wrong length is an error. The resident solve keeps Q on
/// the GPU only (`result.q` empty, `weights()` rebuilds it) and hands its codes back as
/// `PendingCodes`, identical once finished (act-order's permutation included).
#[test]
fn resident_w_solves_exactly_like_the_host_w() {
    use gptaq_studio::quant::gpu::quantize_gpu_resident;
    let Some(ctx) = test_context() else { return };
    let gptaq = Method::Gptaq { alpha: 0.25 };
    for (what, p, c) in [
        (
            "gptaq g16",
            problem(21, 67, 90, 40, &[]),
            cfg(gptaq, 3, Some(16), true, false, false, 32, false),
        ),
        (
            "gptq act-order",
            problem(9, 40, 60, 41, &[]),
            cfg(GPTQ, 4, Some(8), true, true, false, 16, false),
        ),
        (
            "gptaq dead columns",
            problem(7, 33, 50, 42, &[3, 20]),
            cfg(gptaq, 4, None, false, false, false, 8, false),
        ),
        (
            "gptaq act-order, dead columns, g8",
            problem(19, 37, 50, 44, &[0, 5, 36]),
            cfg(gptaq, 3, Some(8), false, true, false, 16, false),
        ),
        (
            "gptq dead columns g16",
            problem(17, 45, 60, 45, &[2, 44]),
            cfg(GPTQ, 4, Some(16), true, false, false, 8, false),
        ),
        (
            "gptq per-row params",
            problem(11, 29, 40, 46, &[]),
            cfg(GPTQ, 4, None, true, false, false, 8, false),
        ),
        (
            "gptaq act-order, static groups",
            problem(13, 40, 60, 47, &[7]),
            cfg(gptaq, 4, Some(8), false, true, true, 16, false),
        ),
    ] {
        let n = p.cols;
        let gh = ctx.matrix_upload("h", &p.h, n, n, 1).unwrap();
        let gd = ctx.matrix_upload("d", &p.d, n, n, 1).unwrap();
        let gw = ctx.upload("w", &p.w).unwrap();
        let host = quantize_gpu(&ctx, &p.w, p.rows, n, &gh, Some(&gd), &c).unwrap();
        let mut res =
            quantize_gpu_resident(&ctx, &p.w, Some(&gw), p.rows, n, &gh, Some(&gd), &c, None)
                .unwrap();
        // The codes come back later (PendingCodes): empty until finished.
        assert!(res.result.codes.is_empty(), "{what}: codes before finish");
        let pending = res
            .codes
            .take()
            .expect("the resident solve defers its codes");
        pending.finish(&ctx, &mut res.result).unwrap();
        let (a, b) = (&host.result, &res.result);
        assert_eq!(a.codes, b.codes, "{what}: codes");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // The resident solve leaves result.q out; its Q rebuilt from the codes is the same, and
        // so is the GPU's own Q.
        assert!(b.q.is_empty(), "{what}: the resident solve filled q");
        assert_eq!(bits(&a.q), bits(&b.weights()), "{what}: q");
        assert_eq!(
            bits(&a.q),
            bits(&ctx.read(res.q.as_ref().expect("Q on the GPU")).unwrap()),
            "{what}: GPU q"
        );
        assert_eq!(bits(&a.scales), bits(&b.scales), "{what}: scales");
        assert_eq!(a.zeros, b.zeros, "{what}: zeros");
        assert_eq!(
            a.proxy_loss_sum.to_bits(),
            b.proxy_loss_sum.to_bits(),
            "{what}: proxy loss {} vs {}",
            a.proxy_loss_sum,
            b.proxy_loss_sum
        );
        assert_eq!(
            ctx.read(&gw).unwrap(),
            p.w,
            "{what}: the resident W was modified"
        );
    }
    let p = problem(4, 8, 16, 43, &[]);
    let gh = ctx.matrix_upload("h", &p.h, 8, 8, 1).unwrap();
    let short = ctx.upload("w", &p.w[..20]).unwrap();
    let c = cfg(GPTQ, 4, None, true, false, false, 128, false);
    let err = quantize_gpu_resident(&ctx, &p.w, Some(&short), 4, 8, &gh, None, &c, None)
        .err()
        .expect("a 20-element W on the GPU for a 4×8 module must be refused");
    assert!(err.to_string().contains("W on the GPU"), "{err}");
}

/// Modules of one group (the same H and D, as q/k/v or gate/up) solved through a shared
/// `SharedFactor` get bit for bit the results of separate solves, with the factor and P computed
/// once: GPTAQ with act-order, GPTQ, and an indefinite H whose RTN fallback is shared too. A
/// different H is not mistaken for the cached one; another D reuses the factor but not GPTAQ's P.
#[test]
fn group_modules_share_factor_and_p_bit_for_bit() {
    use gptaq_studio::quant::gpu::{SharedFactor, quantize_gpu_resident};
    let Some(ctx) = test_context() else { return };
    let gptaq = Method::Gptaq { alpha: 0.25 };
    let base = problem(1, 48, 80, 50, &[5]);
    let mut neg = base.h.clone();
    neg.iter_mut().for_each(|v| *v = -*v);
    for (what, h, c, rtn) in [
        (
            "gptaq act-order",
            base.h.clone(),
            cfg(gptaq, 3, Some(16), true, true, false, 16, false),
            false,
        ),
        (
            "gptq",
            base.h.clone(),
            cfg(GPTQ, 4, Some(8), false, false, false, 32, false),
            false,
        ),
        (
            "indefinite H",
            neg,
            cfg(GPTQ, 4, Some(8), true, false, false, 32, false),
            true,
        ),
    ] {
        let n = base.cols;
        let gh = ctx.matrix_upload("h", &h, n, n, 1).unwrap();
        let gd = ctx.matrix_upload("d", &base.d, n, n, 1).unwrap();
        let mut shared = SharedFactor::default();
        // Three modules of 17, 5 and 9 rows (q/k/v-like), their own W each.
        for (i, rows) in [17usize, 5, 9].into_iter().enumerate() {
            let w = problem(rows, n, 8, 60 + i as u64, &[]).w;
            let alone = quantize_gpu_resident(&ctx, &w, None, rows, n, &gh, Some(&gd), &c, None)
                .unwrap()
                .result;
            let with = quantize_gpu_resident(
                &ctx,
                &w,
                None,
                rows,
                n,
                &gh,
                Some(&gd),
                &c,
                Some(&mut shared),
            )
            .unwrap()
            .result;
            let ctx_s = format!("{what}, module {i} ({rows} rows)");
            assert_eq!(alone.codes, with.codes, "{ctx_s}: codes");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&alone.weights()), bits(&with.weights()), "{ctx_s}: Q");
            assert_eq!(bits(&alone.scales), bits(&with.scales), "{ctx_s}: scales");
            assert_eq!(
                alone.proxy_loss_sum.to_bits(),
                with.proxy_loss_sum.to_bits(),
                "{ctx_s}: proxy loss"
            );
            assert_eq!(alone.damp.to_bits(), with.damp.to_bits(), "{ctx_s}: damp");
            assert_eq!(alone.fallback, with.fallback, "{ctx_s}: fallback");
            assert_eq!(
                matches!(
                    with.fallback,
                    Some(gptaq_studio::quant::Fallback::Rtn { .. })
                ),
                rtn,
                "{ctx_s}: RTN fallback {:?}",
                with.fallback
            );
            assert_eq!(shared.hits(), i, "{ctx_s}: reuses");
        }
        // Another H (a copy at another address) is solved afresh, not from the cache.
        let gh2 = ctx.matrix_upload("h2", &h, n, n, 1).unwrap();
        let w = problem(3, n, 8, 70, &[]).w;
        quantize_gpu_resident(&ctx, &w, None, 3, n, &gh2, Some(&gd), &c, Some(&mut shared))
            .unwrap();
        assert_eq!(
            shared.hits(),
            2,
            "{what}: a different H was served from the cache"
        );
        // The cache now holds H2's entry. H2 with another D (other values): the factor is reused,
        // GPTAQ's P is not (a P from the first D would change the codes), GPTQ ignores D.
        let d2: Vec<f32> = base.d.iter().map(|v| 3.0 * v).collect();
        let gd2 = ctx.matrix_upload("d2", &d2, n, n, 1).unwrap();
        let alone = quantize_gpu_resident(&ctx, &w, None, 3, n, &gh2, Some(&gd2), &c, None)
            .unwrap()
            .result;
        let with = quantize_gpu_resident(
            &ctx,
            &w,
            None,
            3,
            n,
            &gh2,
            Some(&gd2),
            &c,
            Some(&mut shared),
        )
        .unwrap()
        .result;
        assert_eq!(alone.codes, with.codes, "{what}: another D, codes");
        assert_eq!(
            alone.proxy_loss_sum.to_bits(),
            with.proxy_loss_sum.to_bits(),
            "{what}: another D, proxy loss"
        );
        assert_eq!(shared.hits(), 3, "{what}: another D reuses the factor");
    }
}
