// Tensor-core GEMM staged through workgroup memory (issue 10's fast path; the unstaged kernels
// in gemm_coop.wgsl are the fallback): C[M×N] += op(A)[M×K] · op(B)[K×N], A and B f16, C f32,
// the same contract, parameters and batching as gemm_coop.wgsl (see there and ops::CoopOp).
//
// Why: the unstaged kernels let every subgroup load its own fragments from global memory, so a
// fragment is fetched once per subgroup that needs it and each fetch's latency stalls the tensor
// cores (they reached 28–54 TFLOP/s at 4096³ on the H100, BENCHMARKS.md session 19). Here a
// workgroup of four subgroups computes a 128×128 block of C: per 32-deep step the workgroup copies
// A's 128×32 and B's 32×128 tiles into workgroup memory once, with 16-byte coalesced loads, and
// each subgroup computes its 64×64 quarter (sixteen 16×16 accumulators, each fragment used four
// times) from there. The next step's tiles are loaded into registers while the tensor cores work
// on the current one (software pipelining), so global latency overlaps the multiply-adds.
//
// Layout in workgroup memory, padded so that consecutive rows start in different banks (and stay
// 16-byte aligned, which NVIDIA's fragment loads need):
//   nt128: op(A) rows and B rows (W's rows) are stored as they are in memory, 128 × 32 each, rows
//          40 halves apart; op(B) is read from B's rows as a column-major fragment.
//   tn128: A and B are K-major in memory (the Hessian's Xᵀ·X reads X itself), stored 32 × 128,
//          rows 136 halves apart; op(A) is read column-major, op(B) row-major.
//
// Requirements (ops::check_coop_batched and ops::coop_staged_available): M and N multiples of 128,
// K of 32; every offset, row stride and batch stride of A and B a multiple of 8 halves (A and B are
// read 8 halves per load); subgroups of exactly 32 invocations (so the 128
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
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// The f16 operands, 8 halves (16 bytes) per element: a 2×4 matrix is the one 16-byte f16 type,
// and naga has no bitcast from u32 to vec2<f16>.
@group(0) @binding(1) var<storage, read> a: array<mat2x4<f16>>;
@group(0) @binding(2) var<storage, read> b: array<mat2x4<f16>>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

// One 128×32 (nt128) or 32×128 (tn128) tile of each operand: 4096 halves, plus padding.
var<workgroup> ta: array<f16, 5120>;
var<workgroup> tb: array<f16, 5120>;

// Element q (0..512) of a tile in 8-half units. Rows layout (nt128): 128 rows of 4 units, row r of
// the tile is the stored row `base/…` + r. K-major layout (tn128): 32 rows of 16 units.
fn a_rows(base: u32, ld: u32, q: u32) -> mat2x4<f16> {
    return a[(base + (q >> 2u) * ld + (q & 3u) * 8u) >> 3u];
}
fn b_rows(base: u32, ld: u32, q: u32) -> mat2x4<f16> {
    return b[(base + (q >> 2u) * ld + (q & 3u) * 8u) >> 3u];
}
fn a_kmajor(base: u32, ld: u32, q: u32) -> mat2x4<f16> {
    return a[(base + (q >> 4u) * ld + (q & 15u) * 8u) >> 3u];
}
fn b_kmajor(base: u32, ld: u32, q: u32) -> mat2x4<f16> {
    return b[(base + (q >> 4u) * ld + (q & 15u) * 8u) >> 3u];
}

// Workgroup-memory positions of unit q in the two layouts.
fn at_rows(q: u32) -> u32 {
    return (q >> 2u) * 40u + (q & 3u) * 8u;
}
fn at_kmajor(q: u32) -> u32 {
    return (q >> 4u) * 136u + (q & 15u) * 8u;
}

// Eight consecutive halves into workgroup memory at s.
fn put_a(s: u32, v: mat2x4<f16>) {
    ta[s] = v[0].x;
    ta[s + 1u] = v[0].y;
    ta[s + 2u] = v[0].z;
    ta[s + 3u] = v[0].w;
    ta[s + 4u] = v[1].x;
    ta[s + 5u] = v[1].y;
    ta[s + 6u] = v[1].z;
    ta[s + 7u] = v[1].w;
}
fn put_b(s: u32, v: mat2x4<f16>) {
    tb[s] = v[0].x;
    tb[s + 1u] = v[0].y;
    tb[s + 2u] = v[0].z;
    tb[s + 3u] = v[0].w;
    tb[s + 4u] = v[1].x;
    tb[s + 5u] = v[1].y;
    tb[s + 6u] = v[1].z;
    tb[s + 7u] = v[1].w;
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
    let oa = p.off_a + (wg.z / p.ga) * p.sa + wg.y * 128u * lda;
    let ob = p.off_b + (wg.z / p.gb) * p.sb + wg.x * 128u * ldb;
    let wy = sg >> 1u;
    let wx = sg & 1u;
    let i0 = wg.y * 128u + wy * 64u;
    let j0 = wg.x * 128u + wx * 64u;
    let r0 = p.off_c + wg.z * p.sc + i0 * ldc + j0;
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
    // This invocation's four units of each tile (q = lid + 128·u).
    let q0 = lid;
    let q1 = lid + 128u;
    let q2 = lid + 256u;
    let q3 = lid + 384u;
    var ra0 = a_rows(oa, lda, q0);
    var ra1 = a_rows(oa, lda, q1);
    var ra2 = a_rows(oa, lda, q2);
    var ra3 = a_rows(oa, lda, q3);
    var rb0 = b_rows(ob, ldb, q0);
    var rb1 = b_rows(ob, ldb, q1);
    var rb2 = b_rows(ob, ldb, q2);
    var rb3 = b_rows(ob, ldb, q3);
    // This subgroup's fragment rows in the tiles.
    let fa = wy * 64u * 40u;
    let fb = wx * 64u * 40u;
    let lds = 40u;
    for (var kk = 0u; kk < kdim; kk += 32u) {
        // Everyone is done reading the previous tiles.
        workgroupBarrier();
        put_a(at_rows(q0), ra0);
        put_a(at_rows(q1), ra1);
        put_a(at_rows(q2), ra2);
        put_a(at_rows(q3), ra3);
        put_b(at_rows(q0), rb0);
        put_b(at_rows(q1), rb1);
        put_b(at_rows(q2), rb2);
        put_b(at_rows(q3), rb3);
        workgroupBarrier();
        // The next step's tiles, in flight while the tensor cores work on these.
        if (kk + 32u < kdim) {
            let na = oa + kk + 32u;
            let nb = ob + kk + 32u;
            ra0 = a_rows(na, lda, q0);
            ra1 = a_rows(na, lda, q1);
            ra2 = a_rows(na, lda, q2);
            ra3 = a_rows(na, lda, q3);
            rb0 = b_rows(nb, ldb, q0);
            rb1 = b_rows(nb, ldb, q1);
            rb2 = b_rows(nb, ldb, q2);
            rb3 = b_rows(nb, ldb, q3);
        }
        for (var ks = 0u; ks < 32u; ks += 16u) {
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

// op(A) = Aᵀ with A stored K×M, op(B) = B stored K×N (the statistics' Xᵀ·X, δᵀ·X, δᵀ·δ).
// Block (bi, bj) of C (rows bi·128.., columns bj·128..) for batch entry z.
fn tn128_block(bi: u32, bj: u32, z: u32, lid: u32, sg: u32) {
    let lda = p.lda;
    let ldb = p.ldb;
    let ldc = p.ldc;
    let kdim = p.k;
    // The tiles' first stored columns: A's columns i, B's columns j.
    let oa = p.off_a + (z / p.ga) * p.sa + bi * 128u;
    let ob = p.off_b + (z / p.gb) * p.sb + bj * 128u;
    let wy = sg >> 1u;
    let wx = sg & 1u;
    let i0 = bi * 128u + wy * 64u;
    let j0 = bj * 128u + wx * 64u;
    let r0 = p.off_c + z * p.sc + i0 * ldc + j0;
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
    let q0 = lid;
    let q1 = lid + 128u;
    let q2 = lid + 256u;
    let q3 = lid + 384u;
    var ra0 = a_kmajor(oa, lda, q0);
    var ra1 = a_kmajor(oa, lda, q1);
    var ra2 = a_kmajor(oa, lda, q2);
    var ra3 = a_kmajor(oa, lda, q3);
    var rb0 = b_kmajor(ob, ldb, q0);
    var rb1 = b_kmajor(ob, ldb, q1);
    var rb2 = b_kmajor(ob, ldb, q2);
    var rb3 = b_kmajor(ob, ldb, q3);
    // This subgroup's fragment columns in the tiles.
    let fa = wy * 64u;
    let fb = wx * 64u;
    let lds = 136u;
    for (var kk = 0u; kk < kdim; kk += 32u) {
        workgroupBarrier();
        put_a(at_kmajor(q0), ra0);
        put_a(at_kmajor(q1), ra1);
        put_a(at_kmajor(q2), ra2);
        put_a(at_kmajor(q3), ra3);
        put_b(at_kmajor(q0), rb0);
        put_b(at_kmajor(q1), rb1);
        put_b(at_kmajor(q2), rb2);
        put_b(at_kmajor(q3), rb3);
        workgroupBarrier();
        if (kk + 32u < kdim) {
            let na = oa + (kk + 32u) * lda;
            let nb = ob + (kk + 32u) * ldb;
            ra0 = a_kmajor(na, lda, q0);
            ra1 = a_kmajor(na, lda, q1);
            ra2 = a_kmajor(na, lda, q2);
            ra3 = a_kmajor(na, lda, q3);
            rb0 = b_kmajor(nb, ldb, q0);
            rb1 = b_kmajor(nb, ldb, q1);
            rb2 = b_kmajor(nb, ldb, q2);
            rb3 = b_kmajor(nb, ldb, q3);
        }
        for (var ks = 0u; ks < 32u; ks += 16u) {
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
