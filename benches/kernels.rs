//! Criterion benches for the general-purpose kernels: f32 GEMM and the symmetric rank-k Hessian
//! update. Throughput is reported in FLOP (criterion prints it as elements/s = FLOP/s).
//!
//! Sizes come from `GPTAQ_BENCH_SIZES` (comma-separated, default "256,512" so that lavapipe
//! finishes; on a real GPU use e.g. `GPTAQ_BENCH_SIZES=1024,4096`). The rank-k update uses T = 4·n
//! tokens. The adapter is chosen by `GPTAQ_BACKEND` / `GPTAQ_ADAPTER`.
//!
//! GEMM is timed with every f32 tile (`gemm.wgsl`'s `gemm_large`, its double-buffered variant,
//! `gemm_small` and `gemm_narrow`; `gemm_f32_block` at the solve's block-wide shapes of
//! `GPTAQ_BENCH_BLOCK_GEMM`, 50 launches per submission) and, where the adapter grants
//! cooperative matrices, `gemm_coop` (f16 operands, f32 accumulation; n³, or the shapes of
//! `GPTAQ_BENCH_COOP_SHAPES`) in each operand layout (`CoopOp`), the tensor-core candidates for the forward. `inverse_factor`
//! times the f32 GPU factor `U` of `quant::factor` (blocked Cholesky + doubling inverse) at the
//! same sizes. `quant_solve` times the whole GPU GPTQ / GPTAQ solve (`quant::gpu::quantize_gpu`:
//! diag readback, GPU factor, P, the blocked sweep, readback of codes / params / Q) for the
//! `r×n` shapes of `GPTAQ_BENCH_SOLVE` (default "256x256,512x512"; issue 10's targets are
//! "4096x4096,4096x14336"), 4-bit sym, gs = 128, B = 128 (algorithm.md §2.6); that ends with Q
//! dequantized on the host, which the pipeline never does (that `host` phase, with the codes'
//! readback, took 0.26–0.38 s of a 4096 × 14336 solve on session 24's H100 host, the same for both
//! methods, so it flattens their ratio). The `… codes` entries time what the pipeline pays per
//! module instead (`quantize_gpu_resident` from W already on the GPU, then the codes to the
//! host; Q stays on the GPU, as the PyTorch reference's does — its W is a GPU tensor too: the
//! host-to-GPU copy of W, 0.03 / 0.10 s per solve on session 25's H200 and the noisiest part of
//! it, is not the solve's). The `… gpu` entries time the same solve up to the GPU's completion
//! without the codes' host side (fetching and unpacking 58 MB at 4096 × 14336, ≈ 140 ms of the
//! GPU waiting between two `… codes` solves on session 27's H100s), which the pipeline overlaps
//! with its next stage. With `GPTAQ_PROFILE=1` one synchronised solve per shape first
//! prints its seconds per phase, and every timed solve is synchronised per phase too: take
//! medians without it. With `GPTAQ_KERNEL_TIMES=1` (`gpu::timing`) the `… codes` entries first
//! print the GPU time per kernel and scope of one solve (mean of three, after a warm-up).
//! Both `inverse_factor` and `quant_solve` run with the buffer pool on, as the
//! pipeline's solves do (`GPTAQ_BENCH_POOL_GIB`, default 32; 0 turns it off).
//! `hessian_coop` (where cooperative matrices are granted) times the statistics' tensor-core
//! products at the pipeline's shape: an n-wide input over `GPTAQ_BENCH_TOKENS` tokens (default
//! 4·n), `Tn128Upper` (H) and `Tn128` (GPTAQ's D), each also with its blocks in the grid's own
//! order and in groups of 8 and 16 (`RASTER=0|8|16`, the staged kernel dispatched directly).
//! `cast_f16` times the f32 → f16 operand casts at the same shape, in bytes moved per second
//! (four-wide, scalar, and GPTAQ's ΔX from two inputs). `host_write` times a host write of
//! `GPTAQ_BENCH_WRITE_MIB` (default 16) into a GPU buffer through the kept upload staging and
//! through `queue.write_buffer`'s, filled by 1, 2, 4 and 8 threads
//! (`GpuContext::write_with_threads`), in bytes per second; `host_read` the readback of that
//! buffer into a host `Vec`, copied out of its staging by 1, 2, 4 and 8 threads
//! (`GpuContext::finish_read_with_threads`), and with the `Vec` zero-filled first as before.
//! `attention` times the causal GQA attention kernel alone (`forward::attend`, `attention.wgsl`,
//! and where granted the tensor-core `forward::attend_tc`)
//! at the shape `GPTAQ_BENCH_ATTN` = "heads:kv_heads:head_dim:seqlen:nseq" (default
//! "8:2:64:256:1" for lavapipe; Llama-3-8B is "32:8:128:2048:1"), in causal flops
//! (2·2·heads·hd·seqlen·(seqlen+1)/2·nseq: q·kᵀ and p·v over the unmasked half).
//!
//! `wgsl_lab` (only with `GPTAQ_BENCH_WGSL_DIR`) is a kernel lab for the GPU machine, which has no
//! Rust toolchain: every `.wgsl` file in that directory is loaded at run time, and each of its
//! lines `// lab: ENTRY OP BM BN [NAME=value …]` names an entry point with
//! `gemm_staged_coop.wgsl`'s parameters and bindings computing `C = op(A)·op(B)` (OP `nt` or
//! `tn`) in BM×BN blocks, grid (N/BN, M/BM); where the file declares the shipped kernel's `A_T`
//! / `B_T` overrides (a `lab-extends: gemm_staged_coop` file) they are set from OP, so the
//! shipped entry points and variants built on its `block128` run in either layout.
//! Each is first checked against the shipped `Nt128` / `Tn128` on the same operands (it prints
//! the largest difference and where; a mismatch is reported and the variant not timed), then
//! timed at every `GPTAQ_BENCH_SIZES` n (n³), or at the M×N×K shapes of
//! `GPTAQ_BENCH_WGSL_SHAPES` ("4096x14336x4096,…"). Lines `// lab32: ENTRY OP TILE` (OP `nn`, `nt`
//! or `tn`) name f32 variants with `gemm.wgsl`'s parameters, bindings and `TRANS_A` / `TRANS_B`
//! overrides (and any `NAME=value` overrides after TILE), computing TILE×TILE blocks with bounds
//! checks (any shape); they are checked against the shipped `gemm_large` in the same layout (to
//! 1e-5 of the largest |C|; `benches/lab/` holds such variants). A file with a `// lab-extends:
//! NAME` line gets the shipped `shaders/NAME.wgsl` prepended. Variant kernels are tried this
//! way before one replaces a shipped kernel (BENCHMARKS.md, sessions 22 and 23).
#![allow(clippy::expect_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gptaq_studio::forward::{self, AttnShape};
use gptaq_studio::gpu::ops::{self, CoopOp, GemmTile, MatView};
use gptaq_studio::gpu::{GpuContext, GpuOptions};
use gptaq_studio::quant::factor::upper_inverse_factor_gpu;
use gptaq_studio::quant::gpu::{quantize_gpu, quantize_gpu_resident};
use gptaq_studio::quant::{Method, QuantConfig};

fn sizes() -> Vec<usize> {
    std::env::var("GPTAQ_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![256, 512])
}

/// `gemm_coop`'s M×N×K shapes: `GPTAQ_BENCH_COOP_SHAPES` ("MxNxK,…"; GPTAQ's pending flush at
/// 4096 × 14336 is about "4096x7168x1536"), else n³ for every `GPTAQ_BENCH_SIZES` n.
fn coop_shapes() -> Vec<(usize, usize, usize)> {
    match std::env::var("GPTAQ_BENCH_COOP_SHAPES") {
        Ok(spec) => parse_shapes(&spec),
        Err(_) => sizes().into_iter().map(|n| (n, n, n)).collect(),
    }
}

/// "MxNxK,…" as shapes (malformed entries are skipped).
fn parse_shapes(spec: &str) -> Vec<(usize, usize, usize)> {
    spec.split(',')
        .filter_map(|s| {
            let v: Vec<usize> = s.trim().split('x').filter_map(|x| x.parse().ok()).collect();
            (v.len() == 3).then(|| (v[0], v[1], v[2]))
        })
        .collect()
}

/// `gemm_f32_block`'s shapes: `GPTAQ_BENCH_BLOCK_GEMM` ("MxNxK,…"; the 4096 × 14336 solve's
/// catch-ups are "4096x128x128,4096x128x384,4096x128x896"), default "512x128x256" for lavapipe.
fn block_gemm_shapes() -> Vec<(usize, usize, usize)> {
    parse_shapes(&std::env::var("GPTAQ_BENCH_BLOCK_GEMM").unwrap_or_else(|_| "512x128x256".into()))
}

/// A group timing the f32 GEMM kernels `tiles` at `shapes` (M×N×K), `reps` launches per
/// submission: `C = A·Bᵀ` (a linear layer's form), or with `update` the solve's `C −= A·B`.
fn bench_gemm_f32(
    c: &mut Criterion,
    ctx: &GpuContext,
    group: &str,
    shapes: &[(usize, usize, usize)],
    tiles: &[GemmTile],
    update: bool,
    reps: usize,
) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    for &(m, n, k) in shapes {
        let a = ctx.upload("a", &data(m * k)).expect("upload a");
        let b = ctx.upload("b", &data(k * n)).expect("upload b");
        let out = ctx.zeros::<f32>("c", m * n).expect("alloc c");
        g.throughput(Throughput::Elements((reps * 2 * m * n * k) as u64));
        let (form, bv, alpha, beta) = if update {
            ("C−=A·B", MatView::new(&b, n), -1.0, 1.0)
        } else {
            ("A·Bᵀ", MatView::new(&b, k).t(), 1.0, 0.0)
        };
        for &tile in tiles {
            g.bench_function(format!("{m}x{n}x{k} {form} {tile:?}"), |bch| {
                bch.iter(|| {
                    let mut rec = ctx.recorder();
                    for _ in 0..reps {
                        ops::gemm_tiled(
                            &mut rec,
                            tile,
                            false,
                            m,
                            n,
                            k,
                            alpha,
                            MatView::new(&a, k),
                            bv,
                            beta,
                            MatView::new(&out, n),
                        )
                        .expect("gemm");
                    }
                    rec.submit();
                    ctx.sync().expect("sync");
                })
            });
        }
    }
    g.finish();
}

/// Rows of the statistics' and casts' benches: `GPTAQ_BENCH_TOKENS`, default 4·n.
fn bench_tokens(n: usize) -> usize {
    std::env::var("GPTAQ_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(4 * n)
}

fn data(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

fn bench_kernels(c: &mut Criterion) {
    let ctx = match GpuContext::new(&GpuOptions::from_env()) {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("no GPU adapter, kernel benches skipped: {e}");
            return;
        }
    };
    eprintln!("adapter: {}", ctx.summary.name);
    if let Ok(dir) = std::env::var("GPTAQ_BENCH_WGSL_DIR") {
        wgsl_lab(c, &ctx, &dir);
    }
    // What recording one dispatch costs the CPU (uniform buffer, bind group, pass), apart from
    // the GPU: the factor and the solve record thousands of small ones (`GPTAQ_KERNEL_TIMES`
    // shows their GPU time far below the solve's wall time). 1,000 tiny dispatches per
    // iteration: recorded and dropped, and recorded, submitted and waited for.
    let mut g = c.benchmark_group("dispatch");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1000));
    {
        let x = ctx.upload("x", &data(64)).expect("upload x");
        let y = ctx.upload("y", &data(64)).expect("upload y");
        let out = ctx.zeros::<f32>("out", 64).expect("alloc out");
        let record = || {
            let mut rec = ctx.recorder();
            for _ in 0..1000 {
                ops::axpby(&mut rec, 64, 1.0, &x, 1.0, &y, &out).expect("axpby");
            }
            rec
        };
        g.bench_function("record 1000", |bch| bch.iter(|| drop(record())));
        g.bench_function("record, submit, wait 1000", |bch| {
            bch.iter(|| {
                record().submit();
                ctx.sync().expect("sync");
            })
        });
    }
    g.finish();
    let cubes: Vec<_> = sizes().into_iter().map(|n| (n, n, n)).collect();
    bench_gemm_f32(c, &ctx, "gemm_f32", &cubes, &GemmTile::ALL, false, 1);
    // The solve's per-block products (`quant::gpu`: rows × block outputs, K = 128 … 384): each
    // tile at the M×N×K shapes of `GPTAQ_BENCH_BLOCK_GEMM`, 50 launches per submission, as the
    // solve records them (a launch alone would time the submission and the wait).
    bench_gemm_f32(
        c,
        &ctx,
        "gemm_f32_block",
        &block_gemm_shapes(),
        &[GemmTile::Small, GemmTile::Narrow, GemmTile::Large],
        true,
        50,
    );
    if ops::coop_available(&ctx) {
        let mut g = c.benchmark_group("gemm_coop");
        g.sample_size(10);
        for (m, n, k) in coop_shapes() {
            let h: Vec<half::f16> = data(m.max(n) * k)
                .into_iter()
                .map(half::f16::from_f32)
                .collect();
            let a = ctx.upload("a16", &h).expect("upload a");
            let b = ctx.upload("b16", &h).expect("upload b");
            let out = ctx.zeros::<f32>("c", m * n).expect("alloc c");
            g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            for op in CoopOp::ALL {
                if !op.available(&ctx) || !ops::coop_shape_ok_for(op, m, n, k) {
                    continue;
                }
                g.bench_function(format!("{m}x{n}x{k} {op:?}"), |bch| {
                    bch.iter(|| {
                        let mut rec = ctx.recorder();
                        ops::gemm_coop(
                            &mut rec,
                            op,
                            (m, n, k),
                            (&a, 0),
                            (&b, 0),
                            MatView::new(&out, n),
                            true,
                        )
                        .expect("gemm_coop");
                        rec.submit();
                        ctx.sync().expect("sync");
                    })
                });
            }
        }
        g.finish();
    } else {
        eprintln!("adapter without cooperative matrices: gemm_coop not benched");
    }
    if ops::coop_available(&ctx) {
        // The statistics' products at the pipeline's shape (driver::Stats): one batch of
        // `GPTAQ_BENCH_TOKENS` tokens (default 4·n; the 8B speed plan's batch is 16 × 2048 =
        // 32768) of an n-wide input, H's Xᵀ·X on and above the diagonal, D's full δᵀ·X; in
        // full-GEMM-equivalent flops 2·n²·T, as issue 10's Hessian target counts them.
        let mut g = c.benchmark_group("hessian_coop");
        g.sample_size(10);
        for n in sizes() {
            let t = bench_tokens(n);
            let h: Vec<half::f16> = data(t * n).into_iter().map(half::f16::from_f32).collect();
            let x = ctx.upload("x16", &h).expect("upload x");
            let out = ctx.zeros::<f32>("h", n * n).expect("alloc h");
            g.throughput(Throughput::Elements((2 * n * n * t) as u64));
            for op in [CoopOp::Tn128Upper, CoopOp::Tn128] {
                if !op.available(&ctx) || !ops::coop_shape_ok_for(op, n, n, t) {
                    continue;
                }
                g.bench_function(format!("n={n} T={t} {op:?}"), |bch| {
                    bch.iter(|| {
                        let mut rec = ctx.recorder();
                        ops::gemm_coop(
                            &mut rec,
                            op,
                            (n, n, t),
                            (&x, 0),
                            (&x, 0),
                            MatView::new(&out, n),
                            true,
                        )
                        .expect("gemm_coop");
                        rec.submit();
                        ctx.sync().expect("sync");
                    })
                });
                // The same product in each block order (`RASTER`, ops::coop_raster /
                // coop_raster_upper, which the pipeline picks by the width and reads
                // `GPTAQ_COOP_RASTER*` once per process): an A/B in one run, the order set per
                // pipeline here.
                if !op.staged() {
                    continue;
                }
                let (entry, groups) = if op == CoopOp::Tn128Upper {
                    let bn = (n / 128) as u32;
                    ("gemm_coop_128_upper", [bn * (bn + 1) / 2, 1, 1])
                } else {
                    ("gemm_coop_128", [(n / 128) as u32, (n / 128) as u32, 1])
                };
                let params = ops::CoopParams::dense((n, n, t), (n, n, n)).expect("params");
                for raster in [0u32, 8, 16] {
                    let consts = [("A_T", 1.0), ("B_T", 0.0), ("RASTER", f64::from(raster))];
                    g.bench_function(format!("n={n} T={t} {op:?} RASTER={raster}"), |bch| {
                        bch.iter(|| {
                            let mut rec = ctx.recorder();
                            rec.dispatch(
                                &ops::GEMM_STAGED_COOP,
                                entry,
                                &consts,
                                &params,
                                &[x.binding(), x.binding(), out.binding()],
                                groups,
                            )
                            .expect("dispatch");
                            rec.submit();
                            ctx.sync().expect("sync");
                        })
                    });
                }
            }
        }
        g.finish();
    }
    if ctx.has_f16() {
        // The f32 → f16 operand casts (`ops::cast_f16`, `ops::cast_f16_diff`), a pure bandwidth
        // pass, in bytes moved (criterion's elements/s = bytes/s): an n-wide input over
        // `GPTAQ_BENCH_TOKENS` rows (default 4·n). `x4` is the four-wide entry point (aligned
        // view), `x1` the scalar one (the same view at offset 1), `diff` GPTAQ's ΔX operand.
        let mut g = c.benchmark_group("cast_f16");
        g.sample_size(10);
        for n in sizes() {
            let t = bench_tokens(n);
            let x = ctx.upload("x", &data(t * n + 4)).expect("upload x");
            let y = ctx.upload("y", &data(t * n + 4)).expect("upload y");
            let out = ctx.zeros::<half::f16>("x16", t * n).expect("alloc out");
            for (name, off, diff) in [("x4", 0, false), ("x1", 1, false), ("diff x4", 0, true)] {
                let bytes = t * n * if diff { 10 } else { 6 };
                g.throughput(Throughput::Elements(bytes as u64));
                g.bench_function(format!("{t}x{n} {name}"), |bch| {
                    bch.iter(|| {
                        let mut rec = ctx.recorder();
                        let v = MatView::new(&x, n).at(off);
                        if diff {
                            ops::cast_f16_diff(&mut rec, t, n, v, &y, 0.5, &out)
                        } else {
                            ops::cast_f16(&mut rec, t, n, v, 0.5, &out)
                        }
                        .expect("cast_f16");
                        rec.submit();
                        ctx.sync().expect("sync");
                    })
                });
            }
        }
        g.finish();
    }
    // Host writes into GPU buffers (`GpuContext::write_with_threads`: a host stream's batch is
    // one, 16 MiB for an 8B model's f16 hidden state of one sequence), in bytes per second,
    // through the kept upload staging (`gpu::upload`) and through `queue.write_buffer`'s
    // per-write staging, filled by 1, 2, 4 and 8 threads; `GPTAQ_BENCH_WRITE_MIB` sets the size.
    let mib: usize = std::env::var("GPTAQ_BENCH_WRITE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let mut g = c.benchmark_group("host_write");
    g.sample_size(10);
    let src: Vec<u32> = (0..(mib << 18) as u32).collect();
    let dst = ctx
        .zeros::<u32>("write target", src.len())
        .expect("alloc target");
    g.throughput(Throughput::Bytes((mib << 20) as u64));
    let ring = ctx.upload_ring();
    for (kept, staging) in [(true, "kept staging"), (false, "write_buffer staging")] {
        ctx.set_upload_ring(kept);
        for threads in [1, 2, 4, 8] {
            g.bench_function(
                format!("{mib} MiB, {staging}, {threads} thread(s)"),
                |bch| {
                    bch.iter(|| {
                        ctx.write_with_threads(&dst, 0, &src, threads);
                        ctx.recorder().submit();
                        ctx.sync().expect("sync");
                    })
                },
            );
        }
    }
    // Back to back, as a host stream loads its batches: 8 writes, two in flight at most
    // (`WriteWindow`, pipeline/stream.rs), then one wait; the threads `write` picks.
    g.throughput(Throughput::Bytes(((8 * mib) << 20) as u64));
    for (kept, staging) in [(true, "kept staging"), (false, "write_buffer staging")] {
        ctx.set_upload_ring(kept);
        g.bench_function(format!("8 × {mib} MiB in a row, {staging}"), |bch| {
            bch.iter(|| {
                let mut window = gptaq_studio::gpu::WriteWindow::new(2);
                for _ in 0..8 {
                    ctx.write(&dst, 0, &src);
                    window.submit(&ctx).expect("submit");
                }
                ctx.sync().expect("sync");
            })
        });
    }
    ctx.set_upload_ring(ring);
    g.finish();
    // Readbacks of the same size into a host Vec, as a host stream stores its batches: copied out
    // of the mapped staging by 1–8 threads into a Vec of the read's length (overwritten in
    // place), and the copy before session 44 (the Vec cleared and zero-filled first, one thread).
    let mut g = c.benchmark_group("host_read");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((mib << 20) as u64));
    let mut out: Vec<u32> = Vec::new();
    for (threads, fill) in [(1, true), (1, false), (2, false), (4, false), (8, false)] {
        let name = if fill {
            format!("{mib} MiB, zero-filled Vec, {threads} thread(s)")
        } else {
            format!("{mib} MiB, {threads} thread(s)")
        };
        g.bench_function(name, |bch| {
            bch.iter(|| {
                if fill {
                    out.clear();
                }
                let read = ctx
                    .read_async(ctx.recorder(), &dst, 0, src.len())
                    .expect("read");
                ctx.finish_read_with_threads(read, &mut out, threads)
                    .expect("finish read");
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("hessian_syrk");
    g.sample_size(10);
    for n in sizes() {
        let t = 4 * n;
        if (t * n * 4) as u64 > ctx.max_binding_bytes() {
            // X in one binding (n = 14336: 3.3 GB); the other groups still run at this size.
            eprintln!("hessian_syrk n={n}: X of {t} × {n} floats exceeds one binding, skipped");
            continue;
        }
        let x = ctx.upload("x", &data(t * n)).expect("upload x");
        let h = ctx.matrix_zeros("h", n, n, 32).expect("alloc h");
        // Reported in full-GEMM-equivalent flops (2·T·n²), the convention of the speed targets.
        g.throughput(Throughput::Elements((2 * t * n * n) as u64));
        g.bench_function(format!("n={n} T={t} XᵀX"), |bch| {
            bch.iter(|| {
                let mut rec = ctx.recorder();
                ops::syrk_xtx(&mut rec, t, n, 1.0, MatView::new(&x, n), 1.0, &h).expect("syrk");
                rec.submit();
                ctx.sync().expect("sync");
            })
        });
    }
    g.finish();
    // The factor and the solves allocate their n×n work matrices per call; the pipeline draws
    // them from its buffer pool (pipeline/driver.rs, `PoolScope`), as PyTorch's caching
    // allocator does for the reference, so these groups time them the same way.
    ctx.set_pool_limit(bench_pool_bytes());
    let mut g = c.benchmark_group("inverse_factor");
    g.sample_size(10);
    for n in sizes() {
        let h = spd(&ctx, n, 2 * n);
        let order: Vec<usize> = (0..n).collect();
        let hd = ctx.read_matrix(&h).expect("read h");
        let diag: Vec<f64> = (0..n).map(|j| f64::from(hd[j * n + j])).collect();
        // Cholesky ≈ n³/3 and the triangular inverse ≈ n³/3 flops (full-GEMM convention: ×2).
        g.throughput(Throughput::Elements((2 * n * n * n / 3 * 2) as u64));
        g.bench_function(format!("U of {n}x{n}"), |bch| {
            bch.iter(|| {
                let f = upper_inverse_factor_gpu(&ctx, &h, &order, &diag, 0.01, 0.0025, 128)
                    .expect("gpu")
                    .expect("spd");
                ctx.sync().expect("sync");
                f
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("quant_solve");
    g.sample_size(10);
    for (r, n) in solve_shapes() {
        let h = spd(&ctx, n, 2 * n);
        let d: Vec<f32> = ctx
            .read_matrix(&h)
            .expect("read h")
            .iter()
            .map(|v| 0.05 * v)
            .collect();
        let d = ctx.matrix_upload("d", &d, n, n, 32).expect("upload d");
        let w: Vec<f32> = data(r * n).iter().map(|v| v * 0.37 + 0.01).collect();
        for (name, method) in [
            ("gptq", Method::Gptq),
            ("gptaq", Method::Gptaq { alpha: 0.25 }),
        ] {
            let cfg = QuantConfig {
                method,
                ..QuantConfig::default()
            };
            if std::env::var("GPTAQ_PROFILE").is_ok_and(|v| v == "1") {
                // One synchronised solve first: where its time goes (the timed ones below are
                // then also synchronised, so read their medians only without GPTAQ_PROFILE).
                let s = quantize_gpu(&ctx, &w, r, n, &h, Some(&d), &cfg).expect("solve");
                let parts: Vec<String> = s
                    .phases
                    .iter()
                    .map(|(p, t)| format!("{p} {t:.4}s"))
                    .collect();
                eprintln!("quant_solve {name} {r}x{n} phases: {}", parts.join(", "));
            }
            g.bench_function(format!("{name} {r}x{n}"), |bch| {
                bch.iter(|| quantize_gpu(&ctx, &w, r, n, &h, Some(&d), &cfg).expect("solve"))
            });
            let gw = ctx.upload("w", &w).expect("upload w");
            let solve_codes = || {
                let mut s =
                    quantize_gpu_resident(&ctx, &w, Some(&gw), r, n, &h, Some(&d), &cfg, None)
                        .expect("solve");
                if let Some(codes) = s.codes.take() {
                    codes.finish(&ctx, &mut s.result).expect("codes");
                }
                s
            };
            if ctx.kernel_timing() {
                // GPTAQ_KERNEL_TIMES=1: GPU time per kernel of the pipeline's solve, averaged
                // over three solves after a warm-up one (the timed ones below carry the queries'
                // small cost too).
                drop(solve_codes());
                ctx.kernel_times(true).expect("kernel times");
                for _ in 0..3 {
                    drop(solve_codes());
                }
                let (times, lost) = ctx.kernel_times(true).expect("kernel times");
                eprintln!(
                    "quant_solve {name} {r}x{n} codes: GPU time per kernel, per solve (mean of 3; \
                     {lost} passes lost)\n{}",
                    gptaq_studio::gpu::format_kernel_times(&times, 3.0, 40)
                );
            }
            g.bench_function(format!("{name} {r}x{n} codes"), |bch| bch.iter(solve_codes));
            // The same solve up to the GPU's completion, the codes' host side left out (their
            // copy still runs): what the GPU spends, as PyTorch's reference keeps its Q on the
            // GPU; the pipeline overlaps the codes' fetching and unpacking with its next stage.
            g.bench_function(format!("{name} {r}x{n} gpu"), |bch| {
                bch.iter(|| {
                    let s =
                        quantize_gpu_resident(&ctx, &w, Some(&gw), r, n, &h, Some(&d), &cfg, None)
                            .expect("solve");
                    ctx.sync().expect("sync");
                    s.result
                })
            });
        }
    }
    g.finish();
    ctx.set_pool_limit(0);
    let mut g = c.benchmark_group("attention");
    g.sample_size(10);
    let a = attn_shape();
    let t = a.nseq * a.seqlen;
    let q = ctx
        .upload("q", &data(t * a.heads * a.head_dim))
        .expect("upload q");
    let k = ctx
        .upload("k", &data(t * a.kv_heads * a.head_dim))
        .expect("upload k");
    let v = ctx
        .upload("v", &data(t * a.kv_heads * a.head_dim))
        .expect("upload v");
    let out = ctx
        .zeros::<f32>("out", t * a.heads * a.head_dim)
        .expect("alloc out");
    let flops = 2 * 2 * a.heads * a.head_dim * a.seqlen * (a.seqlen + 1) / 2 * a.nseq;
    g.throughput(Throughput::Elements(flops as u64));
    g.bench_function(
        format!(
            "heads {}/{} hd {} seqlen {} nseq {}",
            a.heads, a.kv_heads, a.head_dim, a.seqlen, a.nseq
        ),
        |bch| {
            bch.iter(|| {
                let mut rec = ctx.recorder();
                forward::attend(&mut rec, &q, &k, &v, &out, a).expect("attend");
                rec.submit();
                ctx.sync().expect("sync");
            })
        },
    );
    // The tensor-core attention at the same shape, in the same causal flops (it computes about
    // half again as many: each 256-query chunk's keys run to its last query), one sequence at a
    // time, forward::ATTN_SEQS (the pipeline's most) and all `nseq` at once (nested batches).
    let mut seqs_tried = vec![1, forward::ATTN_SEQS.min(a.nseq.max(1)), a.nseq.max(1)];
    seqs_tried.dedup();
    for seqs in seqs_tried {
        match forward::AttnTc::new(&ctx, &AttnShape { nseq: seqs, ..a }) {
            Ok(Some(sc)) if ops::coop_available(&ctx) => {
                g.bench_function(
                    format!(
                        "tensor cores heads {}/{} hd {} seqlen {} nseq {} ({seqs} at a time)",
                        a.heads, a.kv_heads, a.head_dim, a.seqlen, a.nseq
                    ),
                    |bch| {
                        bch.iter(|| {
                            let mut rec = ctx.recorder();
                            forward::attend_tc(&mut rec, &q, &k, &v, &out, a, &sc)
                                .expect("attend_tc");
                            rec.submit();
                            ctx.sync().expect("sync");
                        })
                    },
                );
            }
            _ => eprintln!("tensor-core attention not benched (no cooperative matrices or shape)"),
        }
    }
    g.finish();
}

/// The attention bench's shape (`GPTAQ_BENCH_ATTN` = "heads:kv_heads:head_dim:seqlen:nseq").
fn attn_shape() -> AttnShape {
    let parse = |s: &str| -> Option<AttnShape> {
        let f: Vec<usize> = s
            .split(':')
            .map(|x| x.trim().parse().ok())
            .collect::<Option<_>>()?;
        let [heads, kv_heads, head_dim, seqlen, nseq] = f[..] else {
            return None;
        };
        Some(AttnShape {
            heads,
            kv_heads,
            head_dim,
            nseq,
            seqlen,
        })
    };
    std::env::var("GPTAQ_BENCH_ATTN")
        .ok()
        .and_then(|s| parse(&s))
        .unwrap_or(AttnShape {
            heads: 8,
            kv_heads: 2,
            head_dim: 64,
            nseq: 1,
            seqlen: 256,
        })
}

/// The buffer pool's limit for `inverse_factor` and `quant_solve`: `GPTAQ_BENCH_POOL_GIB`
/// (default 32; 0 allocates every buffer anew, as these benches did before session 26).
fn bench_pool_bytes() -> u64 {
    std::env::var("GPTAQ_BENCH_POOL_GIB")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(32)
        << 30
}

/// `r×n` shapes of the solve bench (`GPTAQ_BENCH_SOLVE`).
fn solve_shapes() -> Vec<(usize, usize)> {
    let parse = |s: &str| -> Option<(usize, usize)> {
        let (r, n) = s.trim().split_once('x')?;
        Some((r.parse().ok()?, n.parse().ok()?))
    };
    std::env::var("GPTAQ_BENCH_SOLVE")
        .ok()
        .map(|s| s.split(',').filter_map(parse).collect())
        .filter(|v: &Vec<(usize, usize)>| !v.is_empty())
        .unwrap_or_else(|| vec![(256, 256), (512, 512)])
}

/// `H = 2/T·XᵀX + I` on the GPU (well conditioned), T tokens of deterministic pseudo-random data.
fn spd(ctx: &GpuContext, n: usize, t: usize) -> gptaq_studio::gpu::GpuMatrix {
    let x = ctx.upload("x", &data(t * n)).expect("upload x");
    let eye: Vec<f32> = (0..n * n)
        .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
        .collect();
    let h = ctx.matrix_upload("h", &eye, n, n, 32).expect("upload h");
    let mut rec = ctx.recorder();
    ops::syrk_xtx(&mut rec, t, n, 2.0 / t as f32, MatView::new(&x, n), 1.0, &h).expect("syrk");
    rec.submit();
    h
}

/// What a lab variant computes, and the shipped kernel it is checked and timed against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum LabKind {
    /// `// lab:` — `gemm_staged_coop.wgsl`'s parameters and bindings (f16 A, B; f32 C).
    Coop(CoopOp),
    /// `// lab32:` — `gemm.wgsl`'s parameters and bindings (f32), `C = op(A)·op(B)` with the
    /// transposes given to the variant as its `TRANS_A` / `TRANS_B` overrides.
    F32 { ta: bool, tb: bool },
}

/// One `// lab:` or `// lab32:` line of a variant file.
struct LabEntry {
    shader: gptaq_studio::gpu::kernels::Shader,
    entry: &'static str,
    kind: LabKind,
    bm: usize,
    bn: usize,
    /// Further override constants (`NAME=value` after the line's tile size).
    overrides: Vec<(&'static str, f64)>,
}

impl LabEntry {
    /// The entry point with its overrides, as the lab prints and names it.
    fn label(&self) -> String {
        let mut s = self.entry.to_string();
        for (k, v) in &self.overrides {
            s.push_str(&format!(" {k}={v}"));
        }
        s
    }
}

/// Parses `ENTRY OP BM BN [NAME=value …]` (coop) or `ENTRY OP TILE [NAME=value …]` (f32) after
/// the line's tag.
fn lab_line(
    shader: gptaq_studio::gpu::kernels::Shader,
    f32_kernel: bool,
    spec: &'static str,
) -> Option<LabEntry> {
    let f: Vec<&'static str> = spec.split_whitespace().collect();
    let mut overrides = Vec::new();
    let (entry, op, bm, bn, rest) = match (f32_kernel, &f[..]) {
        (false, [entry, op, bm, bn, rest @ ..]) => {
            (*entry, *op, bm.parse().ok()?, bn.parse().ok()?, rest)
        }
        (true, [entry, op, tile, rest @ ..]) => {
            let t = tile.parse().ok()?;
            (*entry, *op, t, t, rest)
        }
        _ => return None,
    };
    for kv in rest {
        let (k, v) = kv.split_once('=')?;
        overrides.push((k, v.parse().ok()?));
    }
    let kind = match (f32_kernel, op) {
        (false, "nt") => LabKind::Coop(CoopOp::Nt128),
        (false, "tn") => LabKind::Coop(CoopOp::Tn128),
        (true, "nn") => LabKind::F32 {
            ta: false,
            tb: false,
        },
        (true, "nt") => LabKind::F32 {
            ta: false,
            tb: true,
        },
        (true, "tn") => LabKind::F32 {
            ta: true,
            tb: false,
        },
        _ => return None,
    };
    Some(LabEntry {
        shader,
        entry,
        kind,
        bm,
        bn,
        overrides,
    })
}

/// The variants of `dir` (see the module docs). Sources and names are leaked: the pipeline cache
/// keys on `&'static str`, and a bench run loads each file once.
fn lab_entries(dir: &str) -> Vec<LabEntry> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("GPTAQ_BENCH_WGSL_DIR {dir}: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wgsl"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let source =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name: &'static str = path.display().to_string().leak();
        let source: &'static str = lab_source(name, source).leak();
        for line in source.lines() {
            // Not audited: lab kernels keep wgpu's index clamps, the shipped entry points the
            // lab file prepends too, so the lab compares like with like.
            let shader = gptaq_studio::gpu::kernels::Shader {
                name,
                source,
                indices_audited: false,
            };
            let parsed = if let Some(spec) = line.strip_prefix("// lab32:") {
                lab_line(shader, true, spec)
            } else if let Some(spec) = line.strip_prefix("// lab:") {
                lab_line(shader, false, spec)
            } else {
                continue;
            };
            match parsed {
                Some(e) => out.push(e),
                None => eprintln!(
                    "{name}: cannot read lab line {line:?} (lab: ENTRY nt|tn BM BN, or lab32: \
                     ENTRY nn|nt|tn TILE)"
                ),
            }
        }
    }
    out
}

/// A variant file's full source: a `// lab-extends: NAME` line prepends the shipped
/// `shaders/NAME.wgsl` (as embedded in this binary), so a variant writes only its own entry
/// points and reuses the shipped parameters, bindings and helpers (`tests/shaders.rs` validates
/// the same concatenation).
fn lab_source(name: &str, source: String) -> String {
    let base = source
        .lines()
        .find_map(|l| l.strip_prefix("// lab-extends:"));
    match base.map(str::trim) {
        None => source,
        Some(b) => {
            let shipped = [&ops::GEMM, &ops::GEMM_COOP, &ops::GEMM_STAGED_COOP]
                .into_iter()
                .find(|s| s.name == b)
                .unwrap_or_else(|| {
                    panic!("{name}: lab-extends {b:?} names no shipped GEMM shader")
                });
            format!("{}\n{source}", shipped.source)
        }
    }
}

/// The lab's operands for one shape: A holds M·K and B N·K elements in either layout, different
/// data so that a variant that swaps or transposes one shows.
enum LabOperands {
    F16(
        gptaq_studio::gpu::GpuBuffer<half::f16>,
        gptaq_studio::gpu::GpuBuffer<half::f16>,
    ),
    F32(
        gptaq_studio::gpu::GpuBuffer<f32>,
        gptaq_studio::gpu::GpuBuffer<f32>,
    ),
}

impl LabOperands {
    fn new(ctx: &GpuContext, f16: bool, (m, n, k): (usize, usize, usize)) -> Self {
        let a = data(m * k);
        let b: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104_729) % 997) as f32 / 997.0 - 0.5)
            .collect();
        let h =
            |v: Vec<f32>| -> Vec<half::f16> { v.into_iter().map(half::f16::from_f32).collect() };
        if f16 {
            LabOperands::F16(
                ctx.upload("lab a", &h(a)).expect("upload a"),
                ctx.upload("lab b", &h(b)).expect("upload b"),
            )
        } else {
            LabOperands::F32(
                ctx.upload("lab a", &a).expect("upload a"),
                ctx.upload("lab b", &b).expect("upload b"),
            )
        }
    }
}

/// Records the shipped kernel a variant of `kind` is compared with, into `c` (cleared first).
fn lab_reference(
    rec: &mut gptaq_studio::gpu::kernels::Recorder<'_>,
    kind: LabKind,
    (m, n, k): (usize, usize, usize),
    ops_ab: &LabOperands,
    c: &gptaq_studio::gpu::GpuBuffer<f32>,
) -> Result<(), gptaq_studio::gpu::GpuError> {
    rec.clear(c, 0, m * n)?;
    match (kind, ops_ab) {
        (LabKind::Coop(op), LabOperands::F16(a, b)) => {
            ops::gemm_coop(rec, op, (m, n, k), (a, 0), (b, 0), MatView::new(c, n), true)
        }
        (LabKind::F32 { ta, tb }, LabOperands::F32(a, b)) => {
            let va = MatView::new(a, if ta { m } else { k });
            let vb = MatView::new(b, if tb { k } else { n });
            ops::gemm_tiled(
                rec,
                GemmTile::Large,
                false,
                m,
                n,
                k,
                1.0,
                if ta { va.t() } else { va },
                if tb { vb.t() } else { vb },
                0.0,
                MatView::new(c, n),
            )
        }
        _ => Err(gptaq_studio::gpu::GpuError::Validation(
            "lab operands of the wrong type".into(),
        )),
    }
}

fn lab_dispatch(
    rec: &mut gptaq_studio::gpu::kernels::Recorder<'_>,
    e: &LabEntry,
    (m, n, k): (usize, usize, usize),
    ops_ab: &LabOperands,
    c: &gptaq_studio::gpu::GpuBuffer<f32>,
) -> Result<(), gptaq_studio::gpu::GpuError> {
    let (ta, tb) = match e.kind {
        LabKind::Coop(op) => op.transposes(),
        LabKind::F32 { ta, tb } => (ta, tb),
    };
    // Dense operands in the layout the entry's OP names (as ops::gemm_coop / gemm lay them out).
    let ld = (if ta { m } else { k }, if tb { k } else { n }, n);
    let groups = [n.div_ceil(e.bn) as u32, m.div_ceil(e.bm) as u32, 1];
    match ops_ab {
        // Entry points of the shipped staged kernel (a `lab-extends: gemm_staged_coop` file)
        // take their layout from its A_T / B_T overrides; self-contained variants have none.
        LabOperands::F16(a, b) => rec.dispatch(
            &e.shader,
            e.entry,
            &e.shader
                .source
                .contains("override A_T")
                .then_some([
                    ("A_T", f64::from(u8::from(ta))),
                    ("B_T", f64::from(u8::from(tb))),
                ])
                .into_iter()
                .flatten()
                .chain(e.overrides.iter().copied())
                .collect::<Vec<_>>(),
            &ops::CoopParams::dense((m, n, k), ld)?,
            &[a.binding(), b.binding(), c.binding()],
            groups,
        ),
        LabOperands::F32(a, b) => rec.dispatch(
            &e.shader,
            e.entry,
            &[
                ("TRANS_A", f64::from(u8::from(ta))),
                ("TRANS_B", f64::from(u8::from(tb))),
            ]
            .into_iter()
            .chain(e.overrides.iter().copied())
            .collect::<Vec<_>>(),
            &ops::GemmParams::dense((m, n, k), ld)?,
            &[a.binding(), b.binding(), c.binding()],
            groups,
        ),
    }
}

/// The lab's shapes: `GPTAQ_BENCH_WGSL_SHAPES` ("MxNxK,…", e.g. a forward chunk's
/// "4096x14336x4096"), else n³ for every `GPTAQ_BENCH_SIZES` n.
fn lab_shapes() -> Vec<(usize, usize, usize)> {
    let parse = |s: &str| -> Option<(usize, usize, usize)> {
        let f: Vec<usize> = s
            .trim()
            .split('x')
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        let [m, n, k] = f[..] else { return None };
        Some((m, n, k))
    };
    std::env::var("GPTAQ_BENCH_WGSL_SHAPES")
        .ok()
        .map(|s| s.split(',').filter_map(parse).collect())
        .filter(|v: &Vec<_>| !v.is_empty())
        .unwrap_or_else(|| sizes().into_iter().map(|n| (n, n, n)).collect())
}

fn wgsl_lab(c: &mut Criterion, ctx: &GpuContext, dir: &str) {
    let coop = CoopOp::Nt128.available(ctx) && CoopOp::Tn128.available(ctx);
    let entries: Vec<LabEntry> = lab_entries(dir)
        .into_iter()
        .filter(|e| {
            let keep = coop || !matches!(e.kind, LabKind::Coop(_));
            if !keep {
                eprintln!(
                    "lab {}: the adapter runs no staged tensor-core GEMM to compare with; skipped",
                    e.entry
                );
            }
            keep
        })
        .collect();
    let mut g = c.benchmark_group("wgsl_lab");
    g.sample_size(10);
    for (m, n, k) in lab_shapes() {
        let mut operands: [Option<LabOperands>; 2] = [None, None];
        let out = ctx.zeros::<f32>("lab c", m * n).expect("alloc c");
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        let mut reference = std::collections::HashMap::new();
        for e in &entries {
            // Coop kernels have no bounds checks: their shapes must tile. f32 ones take any.
            if let LabKind::Coop(op) = e.kind
                && (m % e.bm != 0 || n % e.bn != 0 || !ops::coop_shape_ok_for(op, m, n, k))
            {
                eprintln!("lab {}: {m}x{n}x{k} does not tile", e.entry);
                continue;
            }
            let f16 = matches!(e.kind, LabKind::Coop(_));
            let ab: &LabOperands = operands[usize::from(f16)]
                .get_or_insert_with(|| LabOperands::new(ctx, f16, (m, n, k)));
            let want: &[f32] = reference.entry(e.kind).or_insert_with(|| {
                let mut rec = ctx.recorder();
                lab_reference(&mut rec, e.kind, (m, n, k), ab, &out).expect("reference gemm");
                rec.submit();
                ctx.read(&out).expect("read reference")
            });
            let mut rec = ctx.recorder();
            rec.clear(&out, 0, m * n).expect("clear");
            if let Err(err) = lab_dispatch(&mut rec, e, (m, n, k), ab, &out) {
                eprintln!("lab {} ({}): {err}", e.label(), e.shader.name);
                continue;
            }
            rec.submit();
            let got = match ctx.read(&out) {
                Ok(v) => v,
                Err(err) => {
                    eprintln!("lab {}: {err}", e.entry);
                    continue;
                }
            };
            let scale = want.iter().fold(0f32, |mx, x| mx.max(x.abs())).max(1e-30);
            let (at, diff) = got
                .iter()
                .zip(want)
                .map(|(x, y)| (x - y).abs())
                .enumerate()
                .fold(
                    (0, 0f32),
                    |mx, (i, d)| {
                        if d > mx.1 || d.is_nan() { (i, d) } else { mx }
                    },
                );
            // f16 variants may sum in another order over f16 products; f32 ones over K terms.
            let tol = if f16 { 1e-3 } else { 1e-5 };
            let ok = diff <= tol * scale;
            eprintln!(
                "lab {} {} {:?} {m}x{n}x{k}: max |Δ| {diff:.3e} (max |C| {scale:.3e}) at ({}, {}): \
                 got {} expected {}{}",
                e.shader.name,
                e.label(),
                e.kind,
                at / n,
                at % n,
                got[at],
                want[at],
                if ok { "" } else { "  MISMATCH, not timed" }
            );
            if !ok {
                continue;
            }
            // Files may reuse entry names: the file's stem keeps the ids distinct.
            let stem = std::path::Path::new(e.shader.name)
                .file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
            g.bench_function(
                format!("{m}x{n}x{k} {stem} {} {:?}", e.label(), e.kind),
                |bch| {
                    bch.iter(|| {
                        let mut rec = ctx.recorder();
                        lab_dispatch(&mut rec, e, (m, n, k), ab, &out).expect("lab dispatch");
                        rec.submit();
                        ctx.sync().expect("sync");
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, bench_kernels);
criterion_main!(benches);
