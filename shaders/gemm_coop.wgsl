// Tensor-core GEMM through wgpu's cooperative matrices (optional fast path, issue 10):
//   C[M×N] += op(A)[M×K] · B[K×N],   A and B f16, C f32 (f32 accumulation),
// where op(A) = A (row-major, lda) or Aᵀ with A stored K×M (TRANS_A; the Hessian's Xᵀ·X reads X
// itself; entry gemm_coop_tn, else gemm_coop_nn). One workgroup = one subgroup of 32 invocations computes a 32×32 block of C as four
// 16×16 accumulator tiles, reusing each loaded A and B fragment twice. M and N must be multiples
// of 32 and K of 16 (the host checks; other shapes use the f32 kernels). Scaling happens when the
// f16 operands are made (cast_f16.wgsl), so this kernel only accumulates. The grid is exactly
// (N/32, M/32): cooperative operations need uniform control flow, and naga's analysis counts any
// early `return` against it, so there is no bounds check or triangle skipping in here (a
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
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f16>;
@group(0) @binding(2) var<storage, read> b: array<f16>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

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
    let oa = p.off_a;
    let ob = p.off_b;
    let i0 = wg.y * 32u;
    let j0 = wg.x * 32u;
    let c00i = p.off_c + i0 * ldc + j0;
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
    let oa = p.off_a;
    let ob = p.off_b;
    let i0 = wg.y * 32u;
    let j0 = wg.x * 32u;
    let c00i = p.off_c + i0 * ldc + j0;
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
