// Tensor-core GEMM staged through workgroup memory (issue 10's fast path; the unstaged kernels
// in gemm_coop.wgsl are the fallback): C[M×N] += op(A)[M×K] · op(B)[K×N], A and B f16, C f32,
// the same contract, parameters and batching as gemm_coop.wgsl (see there and ops::CoopOp).
//
// Why: the unstaged kernels let every subgroup load its own fragments from global memory, so a
// fragment is fetched once per subgroup that needs it and each fetch's latency stalls the tensor
// cores (they reached 28–54 TFLOP/s at 4096³ on the H100, BENCHMARKS.md session 19). Here a
// workgroup of four subgroups computes a 128×128 block of C: per 32-deep step the workgroup copies
// A's 128×32 and B's 32×128 tiles into workgroup memory once, with coalesced loads, and each
// subgroup computes its 64×64 quarter (sixteen 16×16 accumulators, each fragment used four times)
// from there. The next step's tiles are loaded into registers while the tensor cores work on the
// current one (software pipelining), so global latency overlaps the multiply-adds.
//
// Staging: every invocation loads 32-bit words (two halves) and stores them as two halves. WGSL
// can only store a half at a time into the f16 array the fragment loads read; a first version
// loaded 16 bytes (eight halves) per invocation, and its eight scalar stores per load hit only 8 of
// the 32 banks per instruction (16-byte units start on every fourth bank): with the staging removed
// the kernel ran 2.3× faster (1.63 → 0.71 ms at 4096³ on the H100, BENCHMARKS.md session 21),
// while removing the fragment loads instead saved only 0.18 ms. With one word per invocation, 32
// consecutive invocations store into 32 different banks (up to one row boundary per instruction),
// and each invocation's addresses are one base plus constant steps: Nt128 went from 1.72 to
// 1.15 ms, Tn128 from 1.45 to 1.05 ms (same calls, session 21). Written out without branches
// (the prefetch of the last step reloads its own tiles, and the step's two 16-deep halves are
// not a loop) they took 0.98 and 0.84 ms (session 22).
//
// Tried in the kernel lab (benches/kernels.rs `wgsl_lab`, session 22, 4096³ on the H100) and
// slower than this kernel: double-buffered tiles with one barrier per step (1.96 ms; 40 KiB of
// workgroup memory), staging through cooperative loads and stores (1.61 ms), no staging at all
// (each subgroup prefetching its own fragments: 2.54 ms), 128×256 blocks of eight subgroups
// (1.18 ms) and 64-deep steps (2.71 ms).
//
// Layout in workgroup memory, padded so that consecutive rows start in different banks (and stay
// 16-byte aligned, which NVIDIA's fragment loads need):
//   nt128: op(A) rows and B rows (W's rows) are stored as they are in memory, 128 × 32 each, rows
//          40 halves apart; op(B) is read from B's rows as a column-major fragment.
//   tn128: A and B are K-major in memory (the Hessian's Xᵀ·X reads X itself), stored 32 × 128,
//          rows 136 halves apart; op(A) is read column-major, op(B) row-major.
//   nn128: A as in nt128, B (stored K×N, attention's V) as in tn128.
//
// Requirements (ops::check_coop_batched and ops::coop_staged_available): M and N multiples of 128,
// K of 32; every offset, row stride and batch stride of A and B even (A and B are read two halves
// per load); subgroups of exactly 32 invocations (so the 128
// invocations are four subgroups, told apart by subgroup_id); 20 KiB of workgroup memory. The grid
// is exactly (N/128, M/128, batch); no early return, so every cooperative operation stays in
// uniform control flow. As in gemm_coop.wgsl every cooperative load's index and stride is a `let`
// (naga 30's SPIR-V writer needs them cached).

enable f16;
enable wgpu_cooperative_matrix;

struct Params {
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
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// The f16 operands, read two halves (one 32-bit word) per load: see "Staging" above.
@group(0) @binding(1) var<storage, read> a: array<vec2<f16>>;
@group(0) @binding(2) var<storage, read> b: array<vec2<f16>>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

// Where batch entry z's A, B and C start (nested batches as in gemm_coop.wgsl).
fn batch_a(z: u32) -> u32 {
    return p.off_a + (z / p.zi) * p.xa + ((z % p.zi) / p.ga) * p.sa;
}
fn batch_b(z: u32) -> u32 {
    return p.off_b + (z / p.zi) * p.xb + ((z % p.zi) / p.gb) * p.sb;
}
fn batch_c(z: u32) -> u32 {
    return p.off_c + (z / p.zi) * p.xc + (z % p.zi) * p.sc;
}

// One 128×32 (nt128) or 32×128 (tn128) tile of each operand: 4096 halves, plus padding.
var<workgroup> ta: array<f16, 5120>;
var<workgroup> tb: array<f16, 5120>;

// Two consecutive halves into workgroup memory at s.
fn put_a(s: u32, v: vec2<f16>) {
    ta[s] = v.x;
    ta[s + 1u] = v.y;
}
fn put_b(s: u32, v: vec2<f16>) {
    tb[s] = v.x;
    tb[s + 1u] = v.y;
}

// op(A) = A stored M×K, op(B) = Bᵀ with B stored N×K (a linear layer's X·Wᵀ).
@compute @workgroup_size(128)
fn gemm_coop_nt128(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
) {
    let lda = p.lda;
    let ldb = p.ldb;
    let ldc = p.ldc;
    let kdim = p.k;
    // The tiles' first stored rows: A's rows i, B's rows j.
    let oa = batch_a(wg.z) + wg.y * 128u * lda;
    let ob = batch_b(wg.z) + wg.x * 128u * ldb;
    let wy = sg >> 1u;
    let wx = sg & 1u;
    let i0 = wg.y * 128u + wy * 64u;
    let j0 = wg.x * 128u + wx * 64u;
    let r0 = batch_c(wg.z) + i0 * ldc + j0;
    let r1 = r0 + 16u * ldc;
    let r2 = r1 + 16u * ldc;
    let r3 = r2 + 16u * ldc;
    let c00i = r0;
    let c01i = r0 + 16u;
    let c02i = r0 + 32u;
    let c03i = r0 + 48u;
    let c10i = r1;
    let c11i = r1 + 16u;
    let c12i = r1 + 32u;
    let c13i = r1 + 48u;
    let c20i = r2;
    let c21i = r2 + 16u;
    let c22i = r2 + 32u;
    let c23i = r2 + 48u;
    let c30i = r3;
    let c31i = r3 + 16u;
    let c32i = r3 + 32u;
    let c33i = r3 + 48u;
    var c00 = coopLoadT<coop_mat16x16<f32, C>>(&c[c00i], ldc);
    var c01 = coopLoadT<coop_mat16x16<f32, C>>(&c[c01i], ldc);
    var c02 = coopLoadT<coop_mat16x16<f32, C>>(&c[c02i], ldc);
    var c03 = coopLoadT<coop_mat16x16<f32, C>>(&c[c03i], ldc);
    var c10 = coopLoadT<coop_mat16x16<f32, C>>(&c[c10i], ldc);
    var c11 = coopLoadT<coop_mat16x16<f32, C>>(&c[c11i], ldc);
    var c12 = coopLoadT<coop_mat16x16<f32, C>>(&c[c12i], ldc);
    var c13 = coopLoadT<coop_mat16x16<f32, C>>(&c[c13i], ldc);
    var c20 = coopLoadT<coop_mat16x16<f32, C>>(&c[c20i], ldc);
    var c21 = coopLoadT<coop_mat16x16<f32, C>>(&c[c21i], ldc);
    var c22 = coopLoadT<coop_mat16x16<f32, C>>(&c[c22i], ldc);
    var c23 = coopLoadT<coop_mat16x16<f32, C>>(&c[c23i], ldc);
    var c30 = coopLoadT<coop_mat16x16<f32, C>>(&c[c30i], ldc);
    var c31 = coopLoadT<coop_mat16x16<f32, C>>(&c[c31i], ldc);
    var c32 = coopLoadT<coop_mat16x16<f32, C>>(&c[c32i], ldc);
    var c33 = coopLoadT<coop_mat16x16<f32, C>>(&c[c33i], ldc);
    // This invocation's sixteen words of each tile: word lid + 128·u is in the tile's row
    // (lid >> 4) + 8u at halves 2·(lid & 15) and the next, so in a[] and b[] (words) consecutive
    // ones are 8 rows = 4·ld words apart, in workgroup memory 8 rows = 320 halves. Offsets and
    // strides are even (ops::check_coop_batched): the halving is exact.
    let wa = (oa + (lid >> 4u) * lda + (lid & 15u) * 2u) >> 1u;
    let wb = (ob + (lid >> 4u) * ldb + (lid & 15u) * 2u) >> 1u;
    let ua = 4u * lda;
    let ub = 4u * ldb;
    let sw = (lid >> 4u) * 40u + (lid & 15u) * 2u;
    var ra0 = a[wa];
    var ra1 = a[wa + 1u * ua];
    var ra2 = a[wa + 2u * ua];
    var ra3 = a[wa + 3u * ua];
    var ra4 = a[wa + 4u * ua];
    var ra5 = a[wa + 5u * ua];
    var ra6 = a[wa + 6u * ua];
    var ra7 = a[wa + 7u * ua];
    var ra8 = a[wa + 8u * ua];
    var ra9 = a[wa + 9u * ua];
    var ra10 = a[wa + 10u * ua];
    var ra11 = a[wa + 11u * ua];
    var ra12 = a[wa + 12u * ua];
    var ra13 = a[wa + 13u * ua];
    var ra14 = a[wa + 14u * ua];
    var ra15 = a[wa + 15u * ua];
    var rb0 = b[wb];
    var rb1 = b[wb + 1u * ub];
    var rb2 = b[wb + 2u * ub];
    var rb3 = b[wb + 3u * ub];
    var rb4 = b[wb + 4u * ub];
    var rb5 = b[wb + 5u * ub];
    var rb6 = b[wb + 6u * ub];
    var rb7 = b[wb + 7u * ub];
    var rb8 = b[wb + 8u * ub];
    var rb9 = b[wb + 9u * ub];
    var rb10 = b[wb + 10u * ub];
    var rb11 = b[wb + 11u * ub];
    var rb12 = b[wb + 12u * ub];
    var rb13 = b[wb + 13u * ub];
    var rb14 = b[wb + 14u * ub];
    var rb15 = b[wb + 15u * ub];
    // This subgroup's fragment rows in the tiles.
    let fa = wy * 64u * 40u;
    let fb = wx * 64u * 40u;
    let lds = 40u;
    for (var kk = 0u; kk < kdim; kk += 32u) {
        // Everyone is done reading the previous tiles.
        workgroupBarrier();
        put_a(sw, ra0);
        put_a(sw + 320u, ra1);
        put_a(sw + 640u, ra2);
        put_a(sw + 960u, ra3);
        put_a(sw + 1280u, ra4);
        put_a(sw + 1600u, ra5);
        put_a(sw + 1920u, ra6);
        put_a(sw + 2240u, ra7);
        put_a(sw + 2560u, ra8);
        put_a(sw + 2880u, ra9);
        put_a(sw + 3200u, ra10);
        put_a(sw + 3520u, ra11);
        put_a(sw + 3840u, ra12);
        put_a(sw + 4160u, ra13);
        put_a(sw + 4480u, ra14);
        put_a(sw + 4800u, ra15);
        put_b(sw, rb0);
        put_b(sw + 320u, rb1);
        put_b(sw + 640u, rb2);
        put_b(sw + 960u, rb3);
        put_b(sw + 1280u, rb4);
        put_b(sw + 1600u, rb5);
        put_b(sw + 1920u, rb6);
        put_b(sw + 2240u, rb7);
        put_b(sw + 2560u, rb8);
        put_b(sw + 2880u, rb9);
        put_b(sw + 3200u, rb10);
        put_b(sw + 3520u, rb11);
        put_b(sw + 3840u, rb12);
        put_b(sw + 4160u, rb13);
        put_b(sw + 4480u, rb14);
        put_b(sw + 4800u, rb15);
        workgroupBarrier();
        // The next step's tiles, in flight while the tensor cores work on these. The last
        // step loads its own tiles again instead of branching (a uniform `if` around the
        // loads cost 15 % at 4096³ on the H100, BENCHMARKS.md session 22).
        let kn = min(kk + 32u, kdim - 32u);
        // 32 columns on: 16 words.
        let na = wa + (kn >> 1u);
        let nb = wb + (kn >> 1u);
        ra0 = a[na];
        ra1 = a[na + 1u * ua];
        ra2 = a[na + 2u * ua];
        ra3 = a[na + 3u * ua];
        ra4 = a[na + 4u * ua];
        ra5 = a[na + 5u * ua];
        ra6 = a[na + 6u * ua];
        ra7 = a[na + 7u * ua];
        ra8 = a[na + 8u * ua];
        ra9 = a[na + 9u * ua];
        ra10 = a[na + 10u * ua];
        ra11 = a[na + 11u * ua];
        ra12 = a[na + 12u * ua];
        ra13 = a[na + 13u * ua];
        ra14 = a[na + 14u * ua];
        ra15 = a[na + 15u * ua];
        rb0 = b[nb];
        rb1 = b[nb + 1u * ub];
        rb2 = b[nb + 2u * ub];
        rb3 = b[nb + 3u * ub];
        rb4 = b[nb + 4u * ub];
        rb5 = b[nb + 5u * ub];
        rb6 = b[nb + 6u * ub];
        rb7 = b[nb + 7u * ub];
        rb8 = b[nb + 8u * ub];
        rb9 = b[nb + 9u * ub];
        rb10 = b[nb + 10u * ub];
        rb11 = b[nb + 11u * ub];
        rb12 = b[nb + 12u * ub];
        rb13 = b[nb + 13u * ub];
        rb14 = b[nb + 14u * ub];
        rb15 = b[nb + 15u * ub];
        // The step's two 16-deep halves, written out: as a two-pass loop the kernel ran slower
        // (BENCHMARKS.md session 22).
        {
            let ks = 0u;
            let xa0 = fa + ks;
            let xa1 = xa0 + 16u * lds;
            let xa2 = xa1 + 16u * lds;
            let xa3 = xa2 + 16u * lds;
            let xb0 = fb + ks;
            let xb1 = xb0 + 16u * lds;
            let xb2 = xb1 + 16u * lds;
            let xb3 = xb2 + 16u * lds;
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&ta[xa0], lds);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&ta[xa1], lds);
            let a2 = coopLoadT<coop_mat16x16<f16, A>>(&ta[xa2], lds);
            let a3 = coopLoadT<coop_mat16x16<f16, A>>(&ta[xa3], lds);
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&tb[xb0], lds);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&tb[xb1], lds);
            let b2 = coopLoad<coop_mat16x16<f16, B>>(&tb[xb2], lds);
            let b3 = coopLoad<coop_mat16x16<f16, B>>(&tb[xb3], lds);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c02 = coopMultiplyAdd(a0, b2, c02);
            c03 = coopMultiplyAdd(a0, b3, c03);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
            c12 = coopMultiplyAdd(a1, b2, c12);
            c13 = coopMultiplyAdd(a1, b3, c13);
            c20 = coopMultiplyAdd(a2, b0, c20);
            c21 = coopMultiplyAdd(a2, b1, c21);
            c22 = coopMultiplyAdd(a2, b2, c22);
            c23 = coopMultiplyAdd(a2, b3, c23);
            c30 = coopMultiplyAdd(a3, b0, c30);
            c31 = coopMultiplyAdd(a3, b1, c31);
            c32 = coopMultiplyAdd(a3, b2, c32);
            c33 = coopMultiplyAdd(a3, b3, c33);
        }
        {
            let ks = 16u;
            let xa0 = fa + ks;
            let xa1 = xa0 + 16u * lds;
            let xa2 = xa1 + 16u * lds;
            let xa3 = xa2 + 16u * lds;
            let xb0 = fb + ks;
            let xb1 = xb0 + 16u * lds;
            let xb2 = xb1 + 16u * lds;
            let xb3 = xb2 + 16u * lds;
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&ta[xa0], lds);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&ta[xa1], lds);
            let a2 = coopLoadT<coop_mat16x16<f16, A>>(&ta[xa2], lds);
            let a3 = coopLoadT<coop_mat16x16<f16, A>>(&ta[xa3], lds);
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&tb[xb0], lds);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&tb[xb1], lds);
            let b2 = coopLoad<coop_mat16x16<f16, B>>(&tb[xb2], lds);
            let b3 = coopLoad<coop_mat16x16<f16, B>>(&tb[xb3], lds);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c02 = coopMultiplyAdd(a0, b2, c02);
            c03 = coopMultiplyAdd(a0, b3, c03);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
            c12 = coopMultiplyAdd(a1, b2, c12);
            c13 = coopMultiplyAdd(a1, b3, c13);
            c20 = coopMultiplyAdd(a2, b0, c20);
            c21 = coopMultiplyAdd(a2, b1, c21);
            c22 = coopMultiplyAdd(a2, b2, c22);
            c23 = coopMultiplyAdd(a2, b3, c23);
            c30 = coopMultiplyAdd(a3, b0, c30);
            c31 = coopMultiplyAdd(a3, b1, c31);
            c32 = coopMultiplyAdd(a3, b2, c32);
            c33 = coopMultiplyAdd(a3, b3, c33);
        }
    }
    coopStoreT(c00, &c[c00i], ldc);
    coopStoreT(c01, &c[c01i], ldc);
    coopStoreT(c02, &c[c02i], ldc);
    coopStoreT(c03, &c[c03i], ldc);
    coopStoreT(c10, &c[c10i], ldc);
    coopStoreT(c11, &c[c11i], ldc);
    coopStoreT(c12, &c[c12i], ldc);
    coopStoreT(c13, &c[c13i], ldc);
    coopStoreT(c20, &c[c20i], ldc);
    coopStoreT(c21, &c[c21i], ldc);
    coopStoreT(c22, &c[c22i], ldc);
    coopStoreT(c23, &c[c23i], ldc);
    coopStoreT(c30, &c[c30i], ldc);
    coopStoreT(c31, &c[c31i], ldc);
    coopStoreT(c32, &c[c32i], ldc);
    coopStoreT(c33, &c[c33i], ldc);
}

// op(A) = A stored M×K, op(B) = B stored K×N (attention's P·V): A staged as in nt128, B as in
// tn128 (K-major), read row-major.
@compute @workgroup_size(128)
fn gemm_coop_nn128(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
) {
    let lda = p.lda;
    let ldb = p.ldb;
    let ldc = p.ldc;
    let kdim = p.k;
    // The tiles' first stored rows: A's rows i, B's rows j.
    let oa = batch_a(wg.z) + wg.y * 128u * lda;
    let ob = batch_b(wg.z) + wg.x * 128u;
    let wy = sg >> 1u;
    let wx = sg & 1u;
    let i0 = wg.y * 128u + wy * 64u;
    let j0 = wg.x * 128u + wx * 64u;
    let r0 = batch_c(wg.z) + i0 * ldc + j0;
    let r1 = r0 + 16u * ldc;
    let r2 = r1 + 16u * ldc;
    let r3 = r2 + 16u * ldc;
    let c00i = r0;
    let c01i = r0 + 16u;
    let c02i = r0 + 32u;
    let c03i = r0 + 48u;
    let c10i = r1;
    let c11i = r1 + 16u;
    let c12i = r1 + 32u;
    let c13i = r1 + 48u;
    let c20i = r2;
    let c21i = r2 + 16u;
    let c22i = r2 + 32u;
    let c23i = r2 + 48u;
    let c30i = r3;
    let c31i = r3 + 16u;
    let c32i = r3 + 32u;
    let c33i = r3 + 48u;
    var c00 = coopLoadT<coop_mat16x16<f32, C>>(&c[c00i], ldc);
    var c01 = coopLoadT<coop_mat16x16<f32, C>>(&c[c01i], ldc);
    var c02 = coopLoadT<coop_mat16x16<f32, C>>(&c[c02i], ldc);
    var c03 = coopLoadT<coop_mat16x16<f32, C>>(&c[c03i], ldc);
    var c10 = coopLoadT<coop_mat16x16<f32, C>>(&c[c10i], ldc);
    var c11 = coopLoadT<coop_mat16x16<f32, C>>(&c[c11i], ldc);
    var c12 = coopLoadT<coop_mat16x16<f32, C>>(&c[c12i], ldc);
    var c13 = coopLoadT<coop_mat16x16<f32, C>>(&c[c13i], ldc);
    var c20 = coopLoadT<coop_mat16x16<f32, C>>(&c[c20i], ldc);
    var c21 = coopLoadT<coop_mat16x16<f32, C>>(&c[c21i], ldc);
    var c22 = coopLoadT<coop_mat16x16<f32, C>>(&c[c22i], ldc);
    var c23 = coopLoadT<coop_mat16x16<f32, C>>(&c[c23i], ldc);
    var c30 = coopLoadT<coop_mat16x16<f32, C>>(&c[c30i], ldc);
    var c31 = coopLoadT<coop_mat16x16<f32, C>>(&c[c31i], ldc);
    var c32 = coopLoadT<coop_mat16x16<f32, C>>(&c[c32i], ldc);
    var c33 = coopLoadT<coop_mat16x16<f32, C>>(&c[c33i], ldc);
    // This invocation's sixteen words of each tile: A's as in nt128 (8 rows = 4·ld words apart,
    // 320 halves in workgroup memory), B's as in tn128 (2 rows = ld words apart, 272 halves).
    let wa = (oa + (lid >> 4u) * lda + (lid & 15u) * 2u) >> 1u;
    let wb = (ob + (lid >> 6u) * ldb + (lid & 63u) * 2u) >> 1u;
    let ua = 4u * lda;
    let ub = ldb;
    let sw = (lid >> 4u) * 40u + (lid & 15u) * 2u;
    let swb = (lid >> 6u) * 136u + (lid & 63u) * 2u;
    var ra0 = a[wa];
    var ra1 = a[wa + 1u * ua];
    var ra2 = a[wa + 2u * ua];
    var ra3 = a[wa + 3u * ua];
    var ra4 = a[wa + 4u * ua];
    var ra5 = a[wa + 5u * ua];
    var ra6 = a[wa + 6u * ua];
    var ra7 = a[wa + 7u * ua];
    var ra8 = a[wa + 8u * ua];
    var ra9 = a[wa + 9u * ua];
    var ra10 = a[wa + 10u * ua];
    var ra11 = a[wa + 11u * ua];
    var ra12 = a[wa + 12u * ua];
    var ra13 = a[wa + 13u * ua];
    var ra14 = a[wa + 14u * ua];
    var ra15 = a[wa + 15u * ua];
    var rb0 = b[wb];
    var rb1 = b[wb + 1u * ub];
    var rb2 = b[wb + 2u * ub];
    var rb3 = b[wb + 3u * ub];
    var rb4 = b[wb + 4u * ub];
    var rb5 = b[wb + 5u * ub];
    var rb6 = b[wb + 6u * ub];
    var rb7 = b[wb + 7u * ub];
    var rb8 = b[wb + 8u * ub];
    var rb9 = b[wb + 9u * ub];
    var rb10 = b[wb + 10u * ub];
    var rb11 = b[wb + 11u * ub];
    var rb12 = b[wb + 12u * ub];
    var rb13 = b[wb + 13u * ub];
    var rb14 = b[wb + 14u * ub];
    var rb15 = b[wb + 15u * ub];
    // This subgroup's fragment rows in the tiles.
    let fa = wy * 64u * 40u;
    let fb = wx * 64u;
    let lds = 40u;
    for (var kk = 0u; kk < kdim; kk += 32u) {
        // Everyone is done reading the previous tiles.
        workgroupBarrier();
        put_a(sw, ra0);
        put_a(sw + 320u, ra1);
        put_a(sw + 640u, ra2);
        put_a(sw + 960u, ra3);
        put_a(sw + 1280u, ra4);
        put_a(sw + 1600u, ra5);
        put_a(sw + 1920u, ra6);
        put_a(sw + 2240u, ra7);
        put_a(sw + 2560u, ra8);
        put_a(sw + 2880u, ra9);
        put_a(sw + 3200u, ra10);
        put_a(sw + 3520u, ra11);
        put_a(sw + 3840u, ra12);
        put_a(sw + 4160u, ra13);
        put_a(sw + 4480u, ra14);
        put_a(sw + 4800u, ra15);
        put_b(swb, rb0);
        put_b(swb + 272u, rb1);
        put_b(swb + 544u, rb2);
        put_b(swb + 816u, rb3);
        put_b(swb + 1088u, rb4);
        put_b(swb + 1360u, rb5);
        put_b(swb + 1632u, rb6);
        put_b(swb + 1904u, rb7);
        put_b(swb + 2176u, rb8);
        put_b(swb + 2448u, rb9);
        put_b(swb + 2720u, rb10);
        put_b(swb + 2992u, rb11);
        put_b(swb + 3264u, rb12);
        put_b(swb + 3536u, rb13);
        put_b(swb + 3808u, rb14);
        put_b(swb + 4080u, rb15);
        workgroupBarrier();
        // The next step's tiles, in flight while the tensor cores work on these. The last
        // step loads its own tiles again instead of branching (a uniform `if` around the
        // loads cost 15 % at 4096³ on the H100, BENCHMARKS.md session 22).
        let kn = min(kk + 32u, kdim - 32u);
        // 32 columns on: 16 words.
        let na = wa + (kn >> 1u);
        let nb = wb + ((kn * ldb) >> 1u);
        ra0 = a[na];
        ra1 = a[na + 1u * ua];
        ra2 = a[na + 2u * ua];
        ra3 = a[na + 3u * ua];
        ra4 = a[na + 4u * ua];
        ra5 = a[na + 5u * ua];
        ra6 = a[na + 6u * ua];
        ra7 = a[na + 7u * ua];
        ra8 = a[na + 8u * ua];
        ra9 = a[na + 9u * ua];
        ra10 = a[na + 10u * ua];
        ra11 = a[na + 11u * ua];
        ra12 = a[na + 12u * ua];
        ra13 = a[na + 13u * ua];
        ra14 = a[na + 14u * ua];
        ra15 = a[na + 15u * ua];
        rb0 = b[nb];
        rb1 = b[nb + 1u * ub];
        rb2 = b[nb + 2u * ub];
        rb3 = b[nb + 3u * ub];
        rb4 = b[nb + 4u * ub];
        rb5 = b[nb + 5u * ub];
        rb6 = b[nb + 6u * ub];
        rb7 = b[nb + 7u * ub];
        rb8 = b[nb + 8u * ub];
        rb9 = b[nb + 9u * ub];
        rb10 = b[nb + 10u * ub];
        rb11 = b[nb + 11u * ub];
        rb12 = b[nb + 12u * ub];
        rb13 = b[nb + 13u * ub];
        rb14 = b[nb + 14u * ub];
        rb15 = b[nb + 15u * ub];
        // The step's two 16-deep halves, written out: as a two-pass loop the kernel ran slower
        // (BENCHMARKS.md session 22).
        {
            let ks = 0u;
            let xa0 = fa + ks;
            let xa1 = xa0 + 16u * lds;
            let xa2 = xa1 + 16u * lds;
            let xa3 = xa2 + 16u * lds;
            let xb0 = ks * 136u + fb;
            let xb1 = xb0 + 16u;
            let xb2 = xb1 + 16u;
            let xb3 = xb2 + 16u;
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&ta[xa0], lds);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&ta[xa1], lds);
            let a2 = coopLoadT<coop_mat16x16<f16, A>>(&ta[xa2], lds);
            let a3 = coopLoadT<coop_mat16x16<f16, A>>(&ta[xa3], lds);
            let b0 = coopLoadT<coop_mat16x16<f16, B>>(&tb[xb0], 136u);
            let b1 = coopLoadT<coop_mat16x16<f16, B>>(&tb[xb1], 136u);
            let b2 = coopLoadT<coop_mat16x16<f16, B>>(&tb[xb2], 136u);
            let b3 = coopLoadT<coop_mat16x16<f16, B>>(&tb[xb3], 136u);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c02 = coopMultiplyAdd(a0, b2, c02);
            c03 = coopMultiplyAdd(a0, b3, c03);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
            c12 = coopMultiplyAdd(a1, b2, c12);
            c13 = coopMultiplyAdd(a1, b3, c13);
            c20 = coopMultiplyAdd(a2, b0, c20);
            c21 = coopMultiplyAdd(a2, b1, c21);
            c22 = coopMultiplyAdd(a2, b2, c22);
            c23 = coopMultiplyAdd(a2, b3, c23);
            c30 = coopMultiplyAdd(a3, b0, c30);
            c31 = coopMultiplyAdd(a3, b1, c31);
            c32 = coopMultiplyAdd(a3, b2, c32);
            c33 = coopMultiplyAdd(a3, b3, c33);
        }
        {
            let ks = 16u;
            let xa0 = fa + ks;
            let xa1 = xa0 + 16u * lds;
            let xa2 = xa1 + 16u * lds;
            let xa3 = xa2 + 16u * lds;
            let xb0 = ks * 136u + fb;
            let xb1 = xb0 + 16u;
            let xb2 = xb1 + 16u;
            let xb3 = xb2 + 16u;
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&ta[xa0], lds);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&ta[xa1], lds);
            let a2 = coopLoadT<coop_mat16x16<f16, A>>(&ta[xa2], lds);
            let a3 = coopLoadT<coop_mat16x16<f16, A>>(&ta[xa3], lds);
            let b0 = coopLoadT<coop_mat16x16<f16, B>>(&tb[xb0], 136u);
            let b1 = coopLoadT<coop_mat16x16<f16, B>>(&tb[xb1], 136u);
            let b2 = coopLoadT<coop_mat16x16<f16, B>>(&tb[xb2], 136u);
            let b3 = coopLoadT<coop_mat16x16<f16, B>>(&tb[xb3], 136u);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c02 = coopMultiplyAdd(a0, b2, c02);
            c03 = coopMultiplyAdd(a0, b3, c03);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
            c12 = coopMultiplyAdd(a1, b2, c12);
            c13 = coopMultiplyAdd(a1, b3, c13);
            c20 = coopMultiplyAdd(a2, b0, c20);
            c21 = coopMultiplyAdd(a2, b1, c21);
            c22 = coopMultiplyAdd(a2, b2, c22);
            c23 = coopMultiplyAdd(a2, b3, c23);
            c30 = coopMultiplyAdd(a3, b0, c30);
            c31 = coopMultiplyAdd(a3, b1, c31);
            c32 = coopMultiplyAdd(a3, b2, c32);
            c33 = coopMultiplyAdd(a3, b3, c33);
        }
    }
    coopStoreT(c00, &c[c00i], ldc);
    coopStoreT(c01, &c[c01i], ldc);
    coopStoreT(c02, &c[c02i], ldc);
    coopStoreT(c03, &c[c03i], ldc);
    coopStoreT(c10, &c[c10i], ldc);
    coopStoreT(c11, &c[c11i], ldc);
    coopStoreT(c12, &c[c12i], ldc);
    coopStoreT(c13, &c[c13i], ldc);
    coopStoreT(c20, &c[c20i], ldc);
    coopStoreT(c21, &c[c21i], ldc);
    coopStoreT(c22, &c[c22i], ldc);
    coopStoreT(c23, &c[c23i], ldc);
    coopStoreT(c30, &c[c30i], ldc);
    coopStoreT(c31, &c[c31i], ldc);
    coopStoreT(c32, &c[c32i], ldc);
    coopStoreT(c33, &c[c33i], ldc);
}

// op(A) = Aᵀ with A stored K×M, op(B) = B stored K×N (the statistics' Xᵀ·X, δᵀ·X, δᵀ·δ).
// Block (bi, bj) of C (rows bi·128.., columns bj·128..) for batch entry z.
fn tn128_block(bi: u32, bj: u32, z: u32, lid: u32, sg: u32) {
    let lda = p.lda;
    let ldb = p.ldb;
    let ldc = p.ldc;
    let kdim = p.k;
    // The tiles' first stored columns: A's columns i, B's columns j.
    let oa = batch_a(z) + bi * 128u;
    let ob = batch_b(z) + bj * 128u;
    let wy = sg >> 1u;
    let wx = sg & 1u;
    let i0 = bi * 128u + wy * 64u;
    let j0 = bj * 128u + wx * 64u;
    let r0 = batch_c(z) + i0 * ldc + j0;
    let r1 = r0 + 16u * ldc;
    let r2 = r1 + 16u * ldc;
    let r3 = r2 + 16u * ldc;
    let c00i = r0;
    let c01i = r0 + 16u;
    let c02i = r0 + 32u;
    let c03i = r0 + 48u;
    let c10i = r1;
    let c11i = r1 + 16u;
    let c12i = r1 + 32u;
    let c13i = r1 + 48u;
    let c20i = r2;
    let c21i = r2 + 16u;
    let c22i = r2 + 32u;
    let c23i = r2 + 48u;
    let c30i = r3;
    let c31i = r3 + 16u;
    let c32i = r3 + 32u;
    let c33i = r3 + 48u;
    var c00 = coopLoadT<coop_mat16x16<f32, C>>(&c[c00i], ldc);
    var c01 = coopLoadT<coop_mat16x16<f32, C>>(&c[c01i], ldc);
    var c02 = coopLoadT<coop_mat16x16<f32, C>>(&c[c02i], ldc);
    var c03 = coopLoadT<coop_mat16x16<f32, C>>(&c[c03i], ldc);
    var c10 = coopLoadT<coop_mat16x16<f32, C>>(&c[c10i], ldc);
    var c11 = coopLoadT<coop_mat16x16<f32, C>>(&c[c11i], ldc);
    var c12 = coopLoadT<coop_mat16x16<f32, C>>(&c[c12i], ldc);
    var c13 = coopLoadT<coop_mat16x16<f32, C>>(&c[c13i], ldc);
    var c20 = coopLoadT<coop_mat16x16<f32, C>>(&c[c20i], ldc);
    var c21 = coopLoadT<coop_mat16x16<f32, C>>(&c[c21i], ldc);
    var c22 = coopLoadT<coop_mat16x16<f32, C>>(&c[c22i], ldc);
    var c23 = coopLoadT<coop_mat16x16<f32, C>>(&c[c23i], ldc);
    var c30 = coopLoadT<coop_mat16x16<f32, C>>(&c[c30i], ldc);
    var c31 = coopLoadT<coop_mat16x16<f32, C>>(&c[c31i], ldc);
    var c32 = coopLoadT<coop_mat16x16<f32, C>>(&c[c32i], ldc);
    var c33 = coopLoadT<coop_mat16x16<f32, C>>(&c[c33i], ldc);
    // Word lid + 128·u of a K-major tile is in its row (lid >> 6) + 2u at halves 2·(lid & 63):
    // consecutive ones are 2 rows = ld words apart in a[] and b[], 272 halves in workgroup memory.
    let wa = (oa + (lid >> 6u) * lda + (lid & 63u) * 2u) >> 1u;
    let wb = (ob + (lid >> 6u) * ldb + (lid & 63u) * 2u) >> 1u;
    let ua = lda;
    let ub = ldb;
    let sw = (lid >> 6u) * 136u + (lid & 63u) * 2u;
    var ra0 = a[wa];
    var ra1 = a[wa + 1u * ua];
    var ra2 = a[wa + 2u * ua];
    var ra3 = a[wa + 3u * ua];
    var ra4 = a[wa + 4u * ua];
    var ra5 = a[wa + 5u * ua];
    var ra6 = a[wa + 6u * ua];
    var ra7 = a[wa + 7u * ua];
    var ra8 = a[wa + 8u * ua];
    var ra9 = a[wa + 9u * ua];
    var ra10 = a[wa + 10u * ua];
    var ra11 = a[wa + 11u * ua];
    var ra12 = a[wa + 12u * ua];
    var ra13 = a[wa + 13u * ua];
    var ra14 = a[wa + 14u * ua];
    var ra15 = a[wa + 15u * ua];
    var rb0 = b[wb];
    var rb1 = b[wb + 1u * ub];
    var rb2 = b[wb + 2u * ub];
    var rb3 = b[wb + 3u * ub];
    var rb4 = b[wb + 4u * ub];
    var rb5 = b[wb + 5u * ub];
    var rb6 = b[wb + 6u * ub];
    var rb7 = b[wb + 7u * ub];
    var rb8 = b[wb + 8u * ub];
    var rb9 = b[wb + 9u * ub];
    var rb10 = b[wb + 10u * ub];
    var rb11 = b[wb + 11u * ub];
    var rb12 = b[wb + 12u * ub];
    var rb13 = b[wb + 13u * ub];
    var rb14 = b[wb + 14u * ub];
    var rb15 = b[wb + 15u * ub];
    // This subgroup's fragment columns in the tiles.
    let fa = wy * 64u;
    let fb = wx * 64u;
    let lds = 136u;
    for (var kk = 0u; kk < kdim; kk += 32u) {
        workgroupBarrier();
        put_a(sw, ra0);
        put_a(sw + 272u, ra1);
        put_a(sw + 544u, ra2);
        put_a(sw + 816u, ra3);
        put_a(sw + 1088u, ra4);
        put_a(sw + 1360u, ra5);
        put_a(sw + 1632u, ra6);
        put_a(sw + 1904u, ra7);
        put_a(sw + 2176u, ra8);
        put_a(sw + 2448u, ra9);
        put_a(sw + 2720u, ra10);
        put_a(sw + 2992u, ra11);
        put_a(sw + 3264u, ra12);
        put_a(sw + 3536u, ra13);
        put_a(sw + 3808u, ra14);
        put_a(sw + 4080u, ra15);
        put_b(sw, rb0);
        put_b(sw + 272u, rb1);
        put_b(sw + 544u, rb2);
        put_b(sw + 816u, rb3);
        put_b(sw + 1088u, rb4);
        put_b(sw + 1360u, rb5);
        put_b(sw + 1632u, rb6);
        put_b(sw + 1904u, rb7);
        put_b(sw + 2176u, rb8);
        put_b(sw + 2448u, rb9);
        put_b(sw + 2720u, rb10);
        put_b(sw + 2992u, rb11);
        put_b(sw + 3264u, rb12);
        put_b(sw + 3536u, rb13);
        put_b(sw + 3808u, rb14);
        put_b(sw + 4080u, rb15);
        workgroupBarrier();
        let kn = min(kk + 32u, kdim - 32u);
        // 32 rows on: 16·ld words.
        let na = wa + ((kn * lda) >> 1u);
        let nb = wb + ((kn * ldb) >> 1u);
        ra0 = a[na];
        ra1 = a[na + 1u * ua];
        ra2 = a[na + 2u * ua];
        ra3 = a[na + 3u * ua];
        ra4 = a[na + 4u * ua];
        ra5 = a[na + 5u * ua];
        ra6 = a[na + 6u * ua];
        ra7 = a[na + 7u * ua];
        ra8 = a[na + 8u * ua];
        ra9 = a[na + 9u * ua];
        ra10 = a[na + 10u * ua];
        ra11 = a[na + 11u * ua];
        ra12 = a[na + 12u * ua];
        ra13 = a[na + 13u * ua];
        ra14 = a[na + 14u * ua];
        ra15 = a[na + 15u * ua];
        rb0 = b[nb];
        rb1 = b[nb + 1u * ub];
        rb2 = b[nb + 2u * ub];
        rb3 = b[nb + 3u * ub];
        rb4 = b[nb + 4u * ub];
        rb5 = b[nb + 5u * ub];
        rb6 = b[nb + 6u * ub];
        rb7 = b[nb + 7u * ub];
        rb8 = b[nb + 8u * ub];
        rb9 = b[nb + 9u * ub];
        rb10 = b[nb + 10u * ub];
        rb11 = b[nb + 11u * ub];
        rb12 = b[nb + 12u * ub];
        rb13 = b[nb + 13u * ub];
        rb14 = b[nb + 14u * ub];
        rb15 = b[nb + 15u * ub];
        // The step's two 16-deep halves, written out: as a two-pass loop the kernel ran slower
        // (BENCHMARKS.md session 22).
        {
            let ks = 0u;
            // op(A)[r][s] = A[k + s][i + r]: column-major from the K-major tile; op(B) row-major.
            let xa0 = ks * lds + fa;
            let xa1 = xa0 + 16u;
            let xa2 = xa1 + 16u;
            let xa3 = xa2 + 16u;
            let xb0 = ks * lds + fb;
            let xb1 = xb0 + 16u;
            let xb2 = xb1 + 16u;
            let xb3 = xb2 + 16u;
            let a0 = coopLoad<coop_mat16x16<f16, A>>(&ta[xa0], lds);
            let a1 = coopLoad<coop_mat16x16<f16, A>>(&ta[xa1], lds);
            let a2 = coopLoad<coop_mat16x16<f16, A>>(&ta[xa2], lds);
            let a3 = coopLoad<coop_mat16x16<f16, A>>(&ta[xa3], lds);
            let b0 = coopLoadT<coop_mat16x16<f16, B>>(&tb[xb0], lds);
            let b1 = coopLoadT<coop_mat16x16<f16, B>>(&tb[xb1], lds);
            let b2 = coopLoadT<coop_mat16x16<f16, B>>(&tb[xb2], lds);
            let b3 = coopLoadT<coop_mat16x16<f16, B>>(&tb[xb3], lds);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c02 = coopMultiplyAdd(a0, b2, c02);
            c03 = coopMultiplyAdd(a0, b3, c03);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
            c12 = coopMultiplyAdd(a1, b2, c12);
            c13 = coopMultiplyAdd(a1, b3, c13);
            c20 = coopMultiplyAdd(a2, b0, c20);
            c21 = coopMultiplyAdd(a2, b1, c21);
            c22 = coopMultiplyAdd(a2, b2, c22);
            c23 = coopMultiplyAdd(a2, b3, c23);
            c30 = coopMultiplyAdd(a3, b0, c30);
            c31 = coopMultiplyAdd(a3, b1, c31);
            c32 = coopMultiplyAdd(a3, b2, c32);
            c33 = coopMultiplyAdd(a3, b3, c33);
        }
        {
            let ks = 16u;
            // op(A)[r][s] = A[k + s][i + r]: column-major from the K-major tile; op(B) row-major.
            let xa0 = ks * lds + fa;
            let xa1 = xa0 + 16u;
            let xa2 = xa1 + 16u;
            let xa3 = xa2 + 16u;
            let xb0 = ks * lds + fb;
            let xb1 = xb0 + 16u;
            let xb2 = xb1 + 16u;
            let xb3 = xb2 + 16u;
            let a0 = coopLoad<coop_mat16x16<f16, A>>(&ta[xa0], lds);
            let a1 = coopLoad<coop_mat16x16<f16, A>>(&ta[xa1], lds);
            let a2 = coopLoad<coop_mat16x16<f16, A>>(&ta[xa2], lds);
            let a3 = coopLoad<coop_mat16x16<f16, A>>(&ta[xa3], lds);
            let b0 = coopLoadT<coop_mat16x16<f16, B>>(&tb[xb0], lds);
            let b1 = coopLoadT<coop_mat16x16<f16, B>>(&tb[xb1], lds);
            let b2 = coopLoadT<coop_mat16x16<f16, B>>(&tb[xb2], lds);
            let b3 = coopLoadT<coop_mat16x16<f16, B>>(&tb[xb3], lds);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c02 = coopMultiplyAdd(a0, b2, c02);
            c03 = coopMultiplyAdd(a0, b3, c03);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
            c12 = coopMultiplyAdd(a1, b2, c12);
            c13 = coopMultiplyAdd(a1, b3, c13);
            c20 = coopMultiplyAdd(a2, b0, c20);
            c21 = coopMultiplyAdd(a2, b1, c21);
            c22 = coopMultiplyAdd(a2, b2, c22);
            c23 = coopMultiplyAdd(a2, b3, c23);
            c30 = coopMultiplyAdd(a3, b0, c30);
            c31 = coopMultiplyAdd(a3, b1, c31);
            c32 = coopMultiplyAdd(a3, b2, c32);
            c33 = coopMultiplyAdd(a3, b3, c33);
        }
    }
    coopStoreT(c00, &c[c00i], ldc);
    coopStoreT(c01, &c[c01i], ldc);
    coopStoreT(c02, &c[c02i], ldc);
    coopStoreT(c03, &c[c03i], ldc);
    coopStoreT(c10, &c[c10i], ldc);
    coopStoreT(c11, &c[c11i], ldc);
    coopStoreT(c12, &c[c12i], ldc);
    coopStoreT(c13, &c[c13i], ldc);
    coopStoreT(c20, &c[c20i], ldc);
    coopStoreT(c21, &c[c21i], ldc);
    coopStoreT(c22, &c[c22i], ldc);
    coopStoreT(c23, &c[c23i], ldc);
    coopStoreT(c30, &c[c30i], ldc);
    coopStoreT(c31, &c[c31i], ldc);
    coopStoreT(c32, &c[c32i], ldc);
    coopStoreT(c33, &c[c33i], ldc);
}

@compute @workgroup_size(128)
fn gemm_coop_tn128(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
) {
    tn128_block(wg.y, wg.x, wg.z, lid, sg);
}

// gemm_coop_tn128 on the blocks of a square C on or above the diagonal only (bi ≤ bj): a
// symmetric product such as the Hessian's Xᵀ·X at half the work; the caller mirrors the upper
// triangle into the lower one (ops::mirror_upper). The grid is one row of bn·(bn + 1)/2
// workgroups (bn = N/128), numbered column by column: t = bj·(bj + 1)/2 + bi. Everything here
// derives from workgroup_id, so control flow stays uniform.
@compute @workgroup_size(128)
fn gemm_coop_tn128_upper(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
) {
    let t = wg.x;
    // bj = ⌊(√(8t + 1) − 1)/2⌋, corrected by one either way for f32 rounding.
    var bj = u32((sqrt(f32(8u * t + 1u)) - 1.0) * 0.5);
    if ((bj + 1u) * (bj + 2u) / 2u <= t) {
        bj += 1u;
    }
    if (bj * (bj + 1u) / 2u > t) {
        bj -= 1u;
    }
    let bi = t - bj * (bj + 1u) / 2u;
    tn128_block(bi, bj, wg.z, lid, sg);
}
