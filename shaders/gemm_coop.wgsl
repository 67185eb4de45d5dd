// Tensor-core GEMM through wgpu's cooperative matrices (optional fast path, issue 10):
//   C[M×N] += op(A)[M×K] · op(B)[K×N],   A and B f16, C f32 (f32 accumulation),
// with any row strides (lda, ldb, ldc) and, over workgroup z, a batch of such products at fixed
// element strides (sa, sb, sc; see Params), with entries for the operand layouts (ops::CoopOp):
// gemm_coop_nn (A M×K, B K×N), gemm_coop_tn (A stored K×M: the Hessian's Xᵀ·X reads X itself),
// gemm_coop_nt (B stored N×K: a linear layer's X·Wᵀ reads W as it is) and gemm_coop_nt64. One workgroup = one subgroup of 32 invocations
// computes a 32×32 block of C as four 16×16 accumulator tiles, reusing each loaded A and B
// fragment twice (nt64: a 64×64 block, sixteen tiles, each fragment used four times). M and N
// must be multiples of the block and K of 16 (the host checks; other shapes use the f32
// kernels). Scaling happens when the f16 operands are made (cast_f16.wgsl), so this kernel only
// accumulates (callers clear C first for a plain product). The grid is exactly (N/block,
// M/block, batch): cooperative operations need uniform control flow, and naga's analysis counts
// any early `return` against it, so there is no bounds check or triangle skipping in here (a
// symmetric update computes the full square: twice the flops, still far fewer cycles than f32).
// Needs SHADER_F16 and EXPERIMENTAL_COOPERATIVE_MATRIX with 16×16 f16×f16→f32; SPIR-V and MSL 2.3
// only (tests/shaders.rs). The f32 kernels in gemm.wgsl are the fallback everywhere else.

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
    // Batch strides (elements) of A, B and C: workgroup z computes batch entry z, whose A starts
    // (z / ga)·sa after off_a and whose B starts (z / gb)·sb after off_b (attention: z is the
    // query head, and gb query heads share one key/value head); 0 for a single product.
    sa: u32,
    sb: u32,
    sc: u32,
    ga: u32,
    gb: u32,
    // Nested batches (attention over several sequences, each with its heads): workgroup z is
    // entry z % zi of outer entry z / zi, whose A, B and C start xa, xb and xc further on. A flat
    // batch has zi ≥ the batch size, so z / zi = 0.
    zi: u32,
    xa: u32,
    xb: u32,
    xc: u32,
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f16>;
@group(0) @binding(2) var<storage, read> b: array<f16>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

// Where batch entry z's A, B and C start (see Params).
fn batch_a(z: u32) -> u32 {
    return p.off_a + (z / p.zi) * p.xa + ((z % p.zi) / p.ga) * p.sa;
}
fn batch_b(z: u32) -> u32 {
    return p.off_b + (z / p.zi) * p.xb + ((z % p.zi) / p.gb) * p.sb;
}
fn batch_c(z: u32) -> u32 {
    return p.off_c + (z / p.zi) * p.xc + (z % p.zi) * p.sc;
}

// Two entry points instead of an override branch, and every stride and index computed into a
// `let` first: naga 30's SPIR-V writer panics ("Expression is not cached") when a cooperative
// load's stride or pointer index is an expression written in place.

// op(A) = A, stored M×K row-major.
@compute @workgroup_size(32)
fn gemm_coop_nn(@builtin(workgroup_id) wg: vec3<u32>) {
    let lda = p.lda;
    let ldb = p.ldb;
    let ldc = p.ldc;
    let kdim = p.k;
    let oa = batch_a(wg.z);
    let ob = batch_b(wg.z);
    let i0 = wg.y * 32u;
    let j0 = wg.x * 32u;
    let c00i = batch_c(wg.z) + i0 * ldc + j0;
    let c01i = c00i + 16u;
    let c10i = c00i + 16u * ldc;
    let c11i = c10i + 16u;
    var c00 = coopLoadT<coop_mat16x16<f32, C>>(&c[c00i], ldc);
    var c01 = coopLoadT<coop_mat16x16<f32, C>>(&c[c01i], ldc);
    var c10 = coopLoadT<coop_mat16x16<f32, C>>(&c[c10i], ldc);
    var c11 = coopLoadT<coop_mat16x16<f32, C>>(&c[c11i], ldc);
    for (var kk = 0u; kk < kdim; kk += 16u) {
        let ia0 = oa + i0 * lda + kk;
        let ia1 = ia0 + 16u * lda;
        let ib0 = ob + kk * ldb + j0;
        let ib1 = ib0 + 16u;
        let a0 = coopLoadT<coop_mat16x16<f16, A>>(&a[ia0], lda);
        let a1 = coopLoadT<coop_mat16x16<f16, A>>(&a[ia1], lda);
        let b0 = coopLoadT<coop_mat16x16<f16, B>>(&b[ib0], ldb);
        let b1 = coopLoadT<coop_mat16x16<f16, B>>(&b[ib1], ldb);
        c00 = coopMultiplyAdd(a0, b0, c00);
        c01 = coopMultiplyAdd(a0, b1, c01);
        c10 = coopMultiplyAdd(a1, b0, c10);
        c11 = coopMultiplyAdd(a1, b1, c11);
    }
    coopStoreT(c00, &c[c00i], ldc);
    coopStoreT(c01, &c[c01i], ldc);
    coopStoreT(c10, &c[c10i], ldc);
    coopStoreT(c11, &c[c11i], ldc);
}

// op(A) = Aᵀ with A stored K×M row-major: op(A)[r][s] = A[kk + s][i + r], a column-major load.
@compute @workgroup_size(32)
fn gemm_coop_tn(@builtin(workgroup_id) wg: vec3<u32>) {
    let lda = p.lda;
    let ldb = p.ldb;
    let ldc = p.ldc;
    let kdim = p.k;
    let oa = batch_a(wg.z);
    let ob = batch_b(wg.z);
    let i0 = wg.y * 32u;
    let j0 = wg.x * 32u;
    let c00i = batch_c(wg.z) + i0 * ldc + j0;
    let c01i = c00i + 16u;
    let c10i = c00i + 16u * ldc;
    let c11i = c10i + 16u;
    var c00 = coopLoadT<coop_mat16x16<f32, C>>(&c[c00i], ldc);
    var c01 = coopLoadT<coop_mat16x16<f32, C>>(&c[c01i], ldc);
    var c10 = coopLoadT<coop_mat16x16<f32, C>>(&c[c10i], ldc);
    var c11 = coopLoadT<coop_mat16x16<f32, C>>(&c[c11i], ldc);
    for (var kk = 0u; kk < kdim; kk += 16u) {
        let ia0 = oa + kk * lda + i0;
        let ia1 = ia0 + 16u;
        let ib0 = ob + kk * ldb + j0;
        let ib1 = ib0 + 16u;
        let a0 = coopLoad<coop_mat16x16<f16, A>>(&a[ia0], lda);
        let a1 = coopLoad<coop_mat16x16<f16, A>>(&a[ia1], lda);
        let b0 = coopLoadT<coop_mat16x16<f16, B>>(&b[ib0], ldb);
        let b1 = coopLoadT<coop_mat16x16<f16, B>>(&b[ib1], ldb);
        c00 = coopMultiplyAdd(a0, b0, c00);
        c01 = coopMultiplyAdd(a0, b1, c01);
        c10 = coopMultiplyAdd(a1, b0, c10);
        c11 = coopMultiplyAdd(a1, b1, c11);
    }
    coopStoreT(c00, &c[c00i], ldc);
    coopStoreT(c01, &c[c01i], ldc);
    coopStoreT(c10, &c[c10i], ldc);
    coopStoreT(c11, &c[c11i], ldc);
}

// op(B) = Bᵀ with B stored N×K row-major (a linear layer's weight: Y = X·Wᵀ reads W as it is):
// op(B)[s][t] = B[j + t][kk + s], a column-major load with stride ldb = K.
@compute @workgroup_size(32)
fn gemm_coop_nt(@builtin(workgroup_id) wg: vec3<u32>) {
    let lda = p.lda;
    let ldb = p.ldb;
    let ldc = p.ldc;
    let kdim = p.k;
    let oa = batch_a(wg.z);
    let ob = batch_b(wg.z);
    let i0 = wg.y * 32u;
    let j0 = wg.x * 32u;
    let c00i = batch_c(wg.z) + i0 * ldc + j0;
    let c01i = c00i + 16u;
    let c10i = c00i + 16u * ldc;
    let c11i = c10i + 16u;
    var c00 = coopLoadT<coop_mat16x16<f32, C>>(&c[c00i], ldc);
    var c01 = coopLoadT<coop_mat16x16<f32, C>>(&c[c01i], ldc);
    var c10 = coopLoadT<coop_mat16x16<f32, C>>(&c[c10i], ldc);
    var c11 = coopLoadT<coop_mat16x16<f32, C>>(&c[c11i], ldc);
    for (var kk = 0u; kk < kdim; kk += 16u) {
        let ia0 = oa + i0 * lda + kk;
        let ia1 = ia0 + 16u * lda;
        let ib0 = ob + j0 * ldb + kk;
        let ib1 = ib0 + 16u * ldb;
        let a0 = coopLoadT<coop_mat16x16<f16, A>>(&a[ia0], lda);
        let a1 = coopLoadT<coop_mat16x16<f16, A>>(&a[ia1], lda);
        let b0 = coopLoad<coop_mat16x16<f16, B>>(&b[ib0], ldb);
        let b1 = coopLoad<coop_mat16x16<f16, B>>(&b[ib1], ldb);
        c00 = coopMultiplyAdd(a0, b0, c00);
        c01 = coopMultiplyAdd(a0, b1, c01);
        c10 = coopMultiplyAdd(a1, b0, c10);
        c11 = coopMultiplyAdd(a1, b1, c11);
    }
    coopStoreT(c00, &c[c00i], ldc);
    coopStoreT(c01, &c[c01i], ldc);
    coopStoreT(c10, &c[c10i], ldc);
    coopStoreT(c11, &c[c11i], ldc);
}

// gemm_coop_nt with a 64×64 block per subgroup: sixteen accumulators, each A and B fragment used
// four times instead of twice, so half the fragment loads per multiply-add (the 32×32 kernels
// load straight from global memory, no workgroup staging, and are bound by those loads). Costs
// 128 f32 accumulator registers per invocation. M and N must be multiples of 64.
@compute @workgroup_size(32)
fn gemm_coop_nt64(@builtin(workgroup_id) wg: vec3<u32>) {
    let lda = p.lda;
    let ldb = p.ldb;
    let ldc = p.ldc;
    let kdim = p.k;
    let oa = batch_a(wg.z);
    let ob = batch_b(wg.z);
    let i0 = wg.y * 64u;
    let j0 = wg.x * 64u;
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
    for (var kk = 0u; kk < kdim; kk += 16u) {
        let ia0 = oa + i0 * lda + kk;
        let ia1 = ia0 + 16u * lda;
        let ia2 = ia1 + 16u * lda;
        let ia3 = ia2 + 16u * lda;
        let ib0 = ob + j0 * ldb + kk;
        let ib1 = ib0 + 16u * ldb;
        let ib2 = ib1 + 16u * ldb;
        let ib3 = ib2 + 16u * ldb;
        let a0 = coopLoadT<coop_mat16x16<f16, A>>(&a[ia0], lda);
        let a1 = coopLoadT<coop_mat16x16<f16, A>>(&a[ia1], lda);
        let a2 = coopLoadT<coop_mat16x16<f16, A>>(&a[ia2], lda);
        let a3 = coopLoadT<coop_mat16x16<f16, A>>(&a[ia3], lda);
        let b0 = coopLoad<coop_mat16x16<f16, B>>(&b[ib0], ldb);
        let b1 = coopLoad<coop_mat16x16<f16, B>>(&b[ib1], ldb);
        let b2 = coopLoad<coop_mat16x16<f16, B>>(&b[ib2], ldb);
        let b3 = coopLoad<coop_mat16x16<f16, B>>(&b[ib3], ldb);
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
