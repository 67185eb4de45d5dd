// lab-extends: gemm
//
// Kernel-lab lines (benches/kernels.rs `wgsl_lab`) for `gemm_large`'s mapping of invocations to
// output blocks. The shipped kernel gives invocation tid the 8×8 block of thread row tid / 16 and
// thread column tid % 16, so a subgroup of 32 covers 2 thread rows × 16 thread columns: per k
// step it reads 2 of A's vec4 slots (broadcast) and all 32 of B's. `gemm_large_wtR` is the same
// kernel (same staging, same sums in the same order, so the same bits) with a subgroup covering
// R thread rows × 32 / R columns (4 × 8, 8 × 4): a squarer warp tile reads fewer distinct
// workgroup-memory vectors per k step (warp tiling). `wt2` is the shipped mapping through the
// same helper, to show what the helper itself costs. (An override for R instead of three entry
// points made naga 30's pipeline-constant pass panic: an override declared after the shipped
// shader's override-sized workgroup arrays.) Not part of the product. Measured on an H100
// (BENCHMARKS.md session 41): every mapping within 1.6 % of the shipped one, so it stays.

// lab32: gemm_large nt 128
// lab32: gemm_large nn 128
// lab32: gemm_large tn 128
// lab32: gemm_large_wt2 nt 128
// lab32: gemm_large_wt4 nt 128
// lab32: gemm_large_wt4 nn 128
// lab32: gemm_large_wt4 tn 128
// lab32: gemm_large_wt8 nt 128
// lab32: gemm_large_wt8 nn 128
// lab32: gemm_large_wt8 tn 128
// lab32: gemm_large_wt4 nn 128 DOUBLE_BUFFER=1

fn large_wt(wg: vec3<u32>, nw: vec3<u32>, lid: vec3<u32>, wr: u32) {
    set_batch(wg.z);
    let tile = raster_tile(wg, nw);
    let row0 = tile.x * 128u;
    let col0 = tile.y * 128u;
    // Whole-workgroup early exit (uniform), before any barrier.
    if (UPPER_ONLY && i32(row0) > i32(col0) + 127 + p.diag) {
        return;
    }
    let tid = lid.y * 16u + lid.x;
    // The warp tile: each subgroup of 32 invocations covers wr thread rows × 32 / wr thread
    // columns (wr = 2 is the shipped kernel's mapping, tx = tid % 16 and ty = tid / 16).
    let wc = 32u / wr;
    let bands = 16u / wc;
    let w = tid / 32u;
    let lane = tid % 32u;
    let ty = (w / bands) * wr + lane / wc;
    let tx = (w % bands) * wc + lane % wc;
    let aligned = operands_aligned(wg.z);
    let aligned_a = aligned.x;
    let aligned_b = aligned.y;

    var c00 = vec4<f32>(0.0);
    var c01 = vec4<f32>(0.0);
    var c10 = vec4<f32>(0.0);
    var c11 = vec4<f32>(0.0);
    var c20 = vec4<f32>(0.0);
    var c21 = vec4<f32>(0.0);
    var c30 = vec4<f32>(0.0);
    var c31 = vec4<f32>(0.0);
    var c40 = vec4<f32>(0.0);
    var c41 = vec4<f32>(0.0);
    var c50 = vec4<f32>(0.0);
    var c51 = vec4<f32>(0.0);
    var c60 = vec4<f32>(0.0);
    var c61 = vec4<f32>(0.0);
    var c70 = vec4<f32>(0.0);
    var c71 = vec4<f32>(0.0);

    // Slice 0 into buffer 0; afterwards, per slice t: the global loads of slice t + 1 are issued
    // into registers (in flight while slice t is consumed; out of range → 0), slice t is read from
    // buffer `cur`, the registers are written into buffer `nxt`, then a barrier. Single-buffered,
    // `nxt` is `cur`, so a second barrier first waits until every invocation has read it. Double-
    // buffered, the one barrier also separates each read of a buffer (slice t) from its next write
    // (slice t + 2, after the following iteration's barrier).
    let kr = k_range(row0, col0, 128u);
    let k0 = kr.x;
    var ra = fetch_a(row0, k0, tid, aligned_a);
    var rb = fetch_b(col0, k0, tid, aligned_b);
    stage_v4(0u, tid, ra, rb);
    workgroupBarrier();
    let ktiles = (kr.y - k0 + BK - 1u) / BK;
    for (var t = 0u; t < ktiles; t++) {
        var cur = 0u;
        var nxt = 0u;
        if (DOUBLE_BUFFER) {
            cur = (t % 2u) * 256u;
            nxt = 256u - cur;
        }
        let k1 = k0 + (t + 1u) * BK;
        ra = fetch_a(row0, k1, tid, aligned_a);
        rb = fetch_b(col0, k1, tid, aligned_b);
        for (var kk = 0u; kk < BK; kk++) {
            // The readers' half of `swz`.
            let xa = select(0u, kk & SWIZZLE, !TRANS_A);
            let xb = select(0u, kk & SWIZZLE, TRANS_B);
            let a0 = la[cur + kk * 32u + (ty ^ xa)];
            let a1 = la[cur + kk * 32u + 16u + (ty ^ xa)];
            let b0 = lb[cur + kk * 32u + (tx ^ xb)];
            let b1 = lb[cur + kk * 32u + 16u + (tx ^ xb)];
            c00 = fma(vec4<f32>(a0.x), b0, c00);
            c01 = fma(vec4<f32>(a0.x), b1, c01);
            c10 = fma(vec4<f32>(a0.y), b0, c10);
            c11 = fma(vec4<f32>(a0.y), b1, c11);
            c20 = fma(vec4<f32>(a0.z), b0, c20);
            c21 = fma(vec4<f32>(a0.z), b1, c21);
            c30 = fma(vec4<f32>(a0.w), b0, c30);
            c31 = fma(vec4<f32>(a0.w), b1, c31);
            c40 = fma(vec4<f32>(a1.x), b0, c40);
            c41 = fma(vec4<f32>(a1.x), b1, c41);
            c50 = fma(vec4<f32>(a1.y), b0, c50);
            c51 = fma(vec4<f32>(a1.y), b1, c51);
            c60 = fma(vec4<f32>(a1.z), b0, c60);
            c61 = fma(vec4<f32>(a1.z), b1, c61);
            c70 = fma(vec4<f32>(a1.w), b0, c70);
            c71 = fma(vec4<f32>(a1.w), b1, c71);
        }
        if (!DOUBLE_BUFFER) {
            workgroupBarrier();
        }
        stage_v4(nxt, tid, ra, rb);
        workgroupBarrier();
    }
    let r0 = row0 + ty * 4u;
    let r1 = row0 + 64u + ty * 4u;
    let q0 = col0 + tx * 4u;
    let q1 = col0 + 64u + tx * 4u;
    store_row4(r0, q0, c00);
    store_row4(r0, q1, c01);
    store_row4(r0 + 1u, q0, c10);
    store_row4(r0 + 1u, q1, c11);
    store_row4(r0 + 2u, q0, c20);
    store_row4(r0 + 2u, q1, c21);
    store_row4(r0 + 3u, q0, c30);
    store_row4(r0 + 3u, q1, c31);
    store_row4(r1, q0, c40);
    store_row4(r1, q1, c41);
    store_row4(r1 + 1u, q0, c50);
    store_row4(r1 + 1u, q1, c51);
    store_row4(r1 + 2u, q0, c60);
    store_row4(r1 + 2u, q1, c61);
    store_row4(r1 + 3u, q0, c70);
    store_row4(r1 + 3u, q1, c71);
}

@compute @workgroup_size(16, 16, 1)
fn gemm_large_wt2(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nw: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    large_wt(wg, nw, lid, 2u);
}

@compute @workgroup_size(16, 16, 1)
fn gemm_large_wt4(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nw: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    large_wt(wg, nw, lid, 4u);
}

@compute @workgroup_size(16, 16, 1)
fn gemm_large_wt8(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nw: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    large_wt(wg, nw, lid, 8u);
}
