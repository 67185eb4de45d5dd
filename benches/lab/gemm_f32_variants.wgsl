// lab-extends: gemm
//
// Kernel-lab variants of the f32 GEMM (benches/kernels.rs `wgsl_lab`, BENCHMARKS.md sessions
// 23–24), checked against the shipped gemm_large and timed on the GPU machine before one replaces
// it. Not part of the product. The lab prepends shaders/gemm.wgsl (the line above), so these
// entry points use its parameters, bindings, overrides, loads, stores and k ranges, and add only
// what differs.
//
// Why: before session 24 the shipped kernel staged k-contiguous operands (both of X·Wᵀ and of
// Dp·Uᵀ, A of T·U) by writing 8 consecutive k of one row from 8 invocations into workgroup rows 512
// bytes apart, an 8-way bank conflict on every staging store; it now XOR-swizzles the vec4 index of
// k-contiguous operands by k % 8 (gemm.wgsl `swz`). Here, beside the shipped entry points
// themselves (the baseline lines at the end):
// - gemm_large_plain / gemm_small_plain: the earlier, unswizzled layout (single and double
//   buffered), to measure what the swizzle is worth on a GPU;
// - gemm_large16: swizzled, 16-deep k slices (half the barriers per multiply-add);
// - gemm_large4: each invocation stages 4 consecutive rows (columns) of one k as one vec4 store,
//   2 stores per slice instead of 8; single or double buffered (DOUBLE_BUFFER).
// Each entry writes out its accumulators, multiply-adds and stores like the shipped kernel (named
// variables, no helper over a local array: gemm.wgsl's header says why), so the timings compare.

// ---- gemm_large_plain ----
fn store_plain(off: u32, sa0: vec2<u32>, sa1: vec2<u32>, sa2: vec2<u32>, sa3: vec2<u32>,
               sb0: vec2<u32>, sb1: vec2<u32>, sb2: vec2<u32>, sb3: vec2<u32>,
               ra: vec4<f32>, rb: vec4<f32>) {
    la[off + sa0.y * 32u + sa0.x / 4u][sa0.x % 4u] = ra.x;
    la[off + sa1.y * 32u + sa1.x / 4u][sa1.x % 4u] = ra.y;
    la[off + sa2.y * 32u + sa2.x / 4u][sa2.x % 4u] = ra.z;
    la[off + sa3.y * 32u + sa3.x / 4u][sa3.x % 4u] = ra.w;
    lb[off + sb0.y * 32u + sb0.x / 4u][sb0.x % 4u] = rb.x;
    lb[off + sb1.y * 32u + sb1.x / 4u][sb1.x % 4u] = rb.y;
    lb[off + sb2.y * 32u + sb2.x / 4u][sb2.x % 4u] = rb.z;
    lb[off + sb3.y * 32u + sb3.x / 4u][sb3.x % 4u] = rb.w;
}

@compute @workgroup_size(16, 16, 1)
fn gemm_large_plain(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wg.y * 128u;
    let col0 = wg.x * 128u;
    // Whole-workgroup early exit (uniform), before any barrier.
    if (UPPER_ONLY && i32(row0) > i32(col0) + 127 + p.diag) {
        return;
    }
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;
    // This invocation's four A and four B elements of every [128 × BK] slice.
    let sa0 = slot(tid, 128u, !TRANS_A);
    let sa1 = slot(tid + 256u, 128u, !TRANS_A);
    let sa2 = slot(tid + 512u, 128u, !TRANS_A);
    let sa3 = slot(tid + 768u, 128u, !TRANS_A);
    let sb0 = slot(tid, 128u, TRANS_B);
    let sb1 = slot(tid + 256u, 128u, TRANS_B);
    let sb2 = slot(tid + 512u, 128u, TRANS_B);
    let sb3 = slot(tid + 768u, 128u, TRANS_B);

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
    var ra = vec4<f32>(load_a(row0 + sa0.x, k0 + sa0.y), load_a(row0 + sa1.x, k0 + sa1.y),
                       load_a(row0 + sa2.x, k0 + sa2.y), load_a(row0 + sa3.x, k0 + sa3.y));
    var rb = vec4<f32>(load_b(k0 + sb0.y, col0 + sb0.x), load_b(k0 + sb1.y, col0 + sb1.x),
                       load_b(k0 + sb2.y, col0 + sb2.x), load_b(k0 + sb3.y, col0 + sb3.x));
    store_plain(0u, sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3, ra, rb);
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
        ra = vec4<f32>(load_a(row0 + sa0.x, k1 + sa0.y), load_a(row0 + sa1.x, k1 + sa1.y),
                       load_a(row0 + sa2.x, k1 + sa2.y), load_a(row0 + sa3.x, k1 + sa3.y));
        rb = vec4<f32>(load_b(k1 + sb0.y, col0 + sb0.x), load_b(k1 + sb1.y, col0 + sb1.x),
                       load_b(k1 + sb2.y, col0 + sb2.x), load_b(k1 + sb3.y, col0 + sb3.x));
        for (var kk = 0u; kk < BK; kk++) {
            let a0 = la[cur + kk * 32u + ty];
            let a1 = la[cur + kk * 32u + 16u + ty];
            let b0 = lb[cur + kk * 32u + tx];
            let b1 = lb[cur + kk * 32u + 16u + tx];
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
        store_plain(nxt, sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3, ra, rb);
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

// ---- gemm_small_plain ----
@compute @workgroup_size(16, 16, 1)
fn gemm_small_plain(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wg.y * 64u;
    let col0 = wg.x * 64u;
    if (UPPER_ONLY && i32(row0) > i32(col0) + 63 + p.diag) {
        return;
    }
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;
    let sa0 = slot(tid, 64u, !TRANS_A);
    let sa1 = slot(tid + 256u, 64u, !TRANS_A);
    let sb0 = slot(tid, 64u, TRANS_B);
    let sb1 = slot(tid + 256u, 64u, TRANS_B);

    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);

    let kr = k_range(row0, col0, 64u);
    let k0 = kr.x;
    var ra = vec2<f32>(load_a(row0 + sa0.x, k0 + sa0.y), load_a(row0 + sa1.x, k0 + sa1.y));
    var rb = vec2<f32>(load_b(k0 + sb0.y, col0 + sb0.x), load_b(k0 + sb1.y, col0 + sb1.x));
    let ktiles = (kr.y - k0 + BK - 1u) / BK;
    for (var t = 0u; t < ktiles; t++) {
        sa[sa0.y * 16u + sa0.x / 4u][sa0.x % 4u] = ra.x;
        sa[sa1.y * 16u + sa1.x / 4u][sa1.x % 4u] = ra.y;
        sb[sb0.y * 16u + sb0.x / 4u][sb0.x % 4u] = rb.x;
        sb[sb1.y * 16u + sb1.x / 4u][sb1.x % 4u] = rb.y;
        workgroupBarrier();
        let k1 = k0 + (t + 1u) * BK;
        ra = vec2<f32>(load_a(row0 + sa0.x, k1 + sa0.y), load_a(row0 + sa1.x, k1 + sa1.y));
        rb = vec2<f32>(load_b(k1 + sb0.y, col0 + sb0.x), load_b(k1 + sb1.y, col0 + sb1.x));
        for (var kk = 0u; kk < BK; kk++) {
            let av = sa[kk * 16u + ty];
            let bv = sb[kk * 16u + tx];
            c0 = fma(vec4<f32>(av.x), bv, c0);
            c1 = fma(vec4<f32>(av.y), bv, c1);
            c2 = fma(vec4<f32>(av.z), bv, c2);
            c3 = fma(vec4<f32>(av.w), bv, c3);
        }
        workgroupBarrier();
    }
    let r = row0 + ty * 4u;
    let q = col0 + tx * 4u;
    store_row4(r, q, c0);
    store_row4(r + 1u, q, c1);
    store_row4(r + 2u, q, c2);
    store_row4(r + 3u, q, c3);
}

// ---- gemm_large16 ----
const BK16: u32 = 16u;
var<workgroup> ma: array<vec4<f32>, 512>;
var<workgroup> mb: array<vec4<f32>, 512>;

// Element e (0..2047) of a [128 × 16] slice: k-contiguous operands put 8 consecutive k of 4 rows
// in a warp (two halves of 8 k), the others 32 consecutive rows.
fn slot16(e: u32, k_contiguous: bool) -> vec2<u32> {
    if (k_contiguous) {
        return vec2<u32>((e % 1024u) / 8u, (e / 1024u) * 8u + e % 8u);
    }
    return vec2<u32>(e % 128u, e / 128u);
}

fn put16(s: vec2<u32>, v: f32, is_a: bool) {
    let i = s.y * 32u + ((s.x / 4u) ^ (s.y & 7u));
    if (is_a) {
        ma[i][s.x % 4u] = v;
    } else {
        mb[i][s.x % 4u] = v;
    }
}

@compute @workgroup_size(16, 16, 1)
fn gemm_large16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wg.y * 128u;
    let col0 = wg.x * 128u;
    if (UPPER_ONLY && i32(row0) > i32(col0) + 127 + p.diag) {
        return;
    }
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;
    let s0 = slot16(tid, !TRANS_A);
    let s1 = slot16(tid + 256u, !TRANS_A);
    let s2 = slot16(tid + 512u, !TRANS_A);
    let s3 = slot16(tid + 768u, !TRANS_A);
    let s4 = slot16(tid + 1024u, !TRANS_A);
    let s5 = slot16(tid + 1280u, !TRANS_A);
    let s6 = slot16(tid + 1536u, !TRANS_A);
    let s7 = slot16(tid + 1792u, !TRANS_A);
    let u0 = slot16(tid, TRANS_B);
    let u1 = slot16(tid + 256u, TRANS_B);
    let u2 = slot16(tid + 512u, TRANS_B);
    let u3 = slot16(tid + 768u, TRANS_B);
    let u4 = slot16(tid + 1024u, TRANS_B);
    let u5 = slot16(tid + 1280u, TRANS_B);
    let u6 = slot16(tid + 1536u, TRANS_B);
    let u7 = slot16(tid + 1792u, TRANS_B);

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

    let kr = k_range(row0, col0, 128u);
    var k1 = kr.x;
    var ra0 = vec4<f32>(load_a(row0 + s0.x, k1 + s0.y), load_a(row0 + s1.x, k1 + s1.y),
                        load_a(row0 + s2.x, k1 + s2.y), load_a(row0 + s3.x, k1 + s3.y));
    var ra1 = vec4<f32>(load_a(row0 + s4.x, k1 + s4.y), load_a(row0 + s5.x, k1 + s5.y),
                        load_a(row0 + s6.x, k1 + s6.y), load_a(row0 + s7.x, k1 + s7.y));
    var rb0 = vec4<f32>(load_b(k1 + u0.y, col0 + u0.x), load_b(k1 + u1.y, col0 + u1.x),
                        load_b(k1 + u2.y, col0 + u2.x), load_b(k1 + u3.y, col0 + u3.x));
    var rb1 = vec4<f32>(load_b(k1 + u4.y, col0 + u4.x), load_b(k1 + u5.y, col0 + u5.x),
                        load_b(k1 + u6.y, col0 + u6.x), load_b(k1 + u7.y, col0 + u7.x));
    let ktiles = (kr.y - kr.x + BK16 - 1u) / BK16;
    for (var t = 0u; t < ktiles; t++) {
        put16(s0, ra0.x, true);
        put16(s1, ra0.y, true);
        put16(s2, ra0.z, true);
        put16(s3, ra0.w, true);
        put16(s4, ra1.x, true);
        put16(s5, ra1.y, true);
        put16(s6, ra1.z, true);
        put16(s7, ra1.w, true);
        put16(u0, rb0.x, false);
        put16(u1, rb0.y, false);
        put16(u2, rb0.z, false);
        put16(u3, rb0.w, false);
        put16(u4, rb1.x, false);
        put16(u5, rb1.y, false);
        put16(u6, rb1.z, false);
        put16(u7, rb1.w, false);
        workgroupBarrier();
        k1 = kr.x + (t + 1u) * BK16;
        ra0 = vec4<f32>(load_a(row0 + s0.x, k1 + s0.y), load_a(row0 + s1.x, k1 + s1.y),
                        load_a(row0 + s2.x, k1 + s2.y), load_a(row0 + s3.x, k1 + s3.y));
        ra1 = vec4<f32>(load_a(row0 + s4.x, k1 + s4.y), load_a(row0 + s5.x, k1 + s5.y),
                        load_a(row0 + s6.x, k1 + s6.y), load_a(row0 + s7.x, k1 + s7.y));
        rb0 = vec4<f32>(load_b(k1 + u0.y, col0 + u0.x), load_b(k1 + u1.y, col0 + u1.x),
                        load_b(k1 + u2.y, col0 + u2.x), load_b(k1 + u3.y, col0 + u3.x));
        rb1 = vec4<f32>(load_b(k1 + u4.y, col0 + u4.x), load_b(k1 + u5.y, col0 + u5.x),
                        load_b(k1 + u6.y, col0 + u6.x), load_b(k1 + u7.y, col0 + u7.x));
        for (var kk = 0u; kk < BK16; kk++) {
            let sw = kk & 7u;
            let a0 = ma[kk * 32u + (ty ^ sw)];
            let a1 = ma[kk * 32u + 16u + (ty ^ sw)];
            let b0 = mb[kk * 32u + (tx ^ sw)];
            let b1 = mb[kk * 32u + 16u + (tx ^ sw)];
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

// ---- gemm_large4 ----
var<workgroup> ya: array<vec4<f32>, select(256u, 512u, DOUBLE_BUFFER)>;
var<workgroup> yb: array<vec4<f32>, select(256u, 512u, DOUBLE_BUFFER)>;

// Group (q, k) of this invocation in a [128 × 8] slice: q = 4-row group (0..31), k (0..7).
fn grp(tid: u32, k_contiguous: bool) -> vec2<u32> {
    if (k_contiguous) {
        return vec2<u32>(tid / 8u, tid % 8u);
    }
    return vec2<u32>(tid % 32u, tid / 32u);
}

@compute @workgroup_size(16, 16, 1)
fn gemm_large4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wg.y * 128u;
    let col0 = wg.x * 128u;
    if (UPPER_ONLY && i32(row0) > i32(col0) + 127 + p.diag) {
        return;
    }
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;
    let ga = grp(tid, !TRANS_A);
    let gb = grp(tid, TRANS_B);
    let ar = row0 + ga.x * 4u;
    let bc = col0 + gb.x * 4u;
    let ia = ga.y * 32u + (ga.x ^ ga.y);
    let ib = gb.y * 32u + (gb.x ^ gb.y);

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

    let kr = k_range(row0, col0, 128u);
    var ka = kr.x + ga.y;
    var kb = kr.x + gb.y;
    var ra = vec4<f32>(load_a(ar, ka), load_a(ar + 1u, ka), load_a(ar + 2u, ka), load_a(ar + 3u, ka));
    var rb = vec4<f32>(load_b(kb, bc), load_b(kb, bc + 1u), load_b(kb, bc + 2u), load_b(kb, bc + 3u));
    let ktiles = (kr.y - kr.x + BK - 1u) / BK;
    ya[ia] = ra;
    yb[ib] = rb;
    workgroupBarrier();
    for (var t = 0u; t < ktiles; t++) {
        // As gemm_large: with DOUBLE_BUFFER slice t + 1 goes into the other half while slice t
        // is read (one barrier), else into the same buffer after a second barrier.
        var cur = 0u;
        var nxt = 0u;
        if (DOUBLE_BUFFER) {
            cur = (t % 2u) * 256u;
            nxt = 256u - cur;
        }
        ka = kr.x + (t + 1u) * BK + ga.y;
        kb = kr.x + (t + 1u) * BK + gb.y;
        ra = vec4<f32>(load_a(ar, ka), load_a(ar + 1u, ka), load_a(ar + 2u, ka), load_a(ar + 3u, ka));
        rb = vec4<f32>(load_b(kb, bc), load_b(kb, bc + 1u), load_b(kb, bc + 2u), load_b(kb, bc + 3u));
        for (var kk = 0u; kk < BK; kk++) {
            let a0 = ya[cur + kk * 32u + (ty ^ kk)];
            let a1 = ya[cur + kk * 32u + 16u + (ty ^ kk)];
            let b0 = yb[cur + kk * 32u + (tx ^ kk)];
            let b1 = yb[cur + kk * 32u + 16u + (tx ^ kk)];
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
        ya[nxt + ia] = ra;
        yb[nxt + ib] = rb;
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

// The shipped kernels (the baseline).
// lab32: gemm_large nt 128
// lab32: gemm_large nn 128
// lab32: gemm_large tn 128
// lab32: gemm_large nn 128 DOUBLE_BUFFER=1
// lab32: gemm_small nt 64
// lab32: gemm_small nn 64
// lab32: gemm_large_plain nt 128
// lab32: gemm_large_plain nn 128
// lab32: gemm_large_plain tn 128
// lab32: gemm_large_plain nn 128 DOUBLE_BUFFER=1
// lab32: gemm_small_plain nt 64
// lab32: gemm_small_plain nn 64
// lab32: gemm_large16 nt 128
// lab32: gemm_large16 nn 128
// lab32: gemm_large16 tn 128
// lab32: gemm_large4 nt 128
// lab32: gemm_large4 nn 128
// lab32: gemm_large4 tn 128
// lab32: gemm_large4 nt 128 DOUBLE_BUFFER=1
// lab32: gemm_large4 nn 128 DOUBLE_BUFFER=1
// lab32: gemm_large4 tn 128 DOUBLE_BUFFER=1
