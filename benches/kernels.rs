//! Criterion benches for the general-purpose kernels: f32 GEMM and the symmetric rank-k Hessian
//! update. Throughput is reported in FLOP (criterion prints it as elements/s = FLOP/s).
//!
//! Sizes come from `GPTAQ_BENCH_SIZES` (comma-separated, default "256,512" so that lavapipe
//! finishes; on a real GPU use e.g. `GPTAQ_BENCH_SIZES=1024,4096`). The rank-k update uses T = 4·n
//! tokens. The adapter is chosen by `GPTAQ_BACKEND` / `GPTAQ_ADAPTER`.
#![allow(clippy::expect_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gptaq_studio::gpu::ops::{self, MatView};
use gptaq_studio::gpu::{GpuContext, GpuOptions};

fn sizes() -> Vec<usize> {
    std::env::var("GPTAQ_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![256, 512])
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
    let mut g = c.benchmark_group("gemm_f32");
    g.sample_size(10);
    for n in sizes() {
        let a = ctx.upload("a", &data(n * n)).expect("upload a");
        let b = ctx.upload("b", &data(n * n)).expect("upload b");
        let out = ctx.zeros::<f32>("c", n * n).expect("alloc c");
        g.throughput(Throughput::Elements((2 * n * n * n) as u64));
        g.bench_function(format!("{n}x{n}x{n} A·Bᵀ"), |bch| {
            bch.iter(|| {
                let mut rec = ctx.recorder();
                ops::gemm(
                    &mut rec,
                    n,
                    n,
                    n,
                    1.0,
                    MatView::new(&a, n),
                    MatView::new(&b, n).t(),
                    0.0,
                    MatView::new(&out, n),
                )
                .expect("gemm");
                rec.submit();
                ctx.sync().expect("sync");
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("hessian_syrk");
    g.sample_size(10);
    for n in sizes() {
        let t = 4 * n;
        let x = ctx.upload("x", &data(t * n)).expect("upload x");
        let h = ctx.zeros::<f32>("h", n * n).expect("alloc h");
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
}

criterion_group!(benches, bench_kernels);
criterion_main!(benches);
