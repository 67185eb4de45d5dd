// The inverse-Hessian factor U (H⁻¹ = UᵀU, U upper) on the GPU in f32, by algorithm.md §6.4:
// with J the index reversal, J·H·J = L·Lᵀ  ⇒  U = J·L⁻¹·J. One blocked Cholesky and one blocked
// triangular inverse; the GEMM-shaped parts run through gemm.wgsl (quant/factor.rs drives them).
//
// The 32×32 diagonal blocks of the Cholesky (and their inverses) are `potrf.wgsl`.
//
// Matrices (n×n row-major, separate so that no dispatch binds one buffer twice with a writable
// binding, which WebGPU forbids), each stored in row panels (gpu/matrix.rs): a launch binds one
// panel of the destination (global rows dst_r0 .. dst_r0 + dst_rows) and, for the gathers whose
// source row can lie anywhere (prep, reverse_u), one panel of the source (src_r0 .. src_r0 +
// src_rows); an element is written by the launch whose source panel holds its source row, so the
// host runs every (destination, source) pair once. With one panel all offsets are 0.
//   K  the matrix to factor, only its upper triangle (row ≤ col) is read and updated; scratch
//      of the triangular inverse afterwards, and finally U;
//   M  strictly below its 32×32 diagonal blocks the Cholesky factor L, on them the blocks'
//      inverses; the doubling inverse then turns M into L⁻¹ in place (quant/factor.rs).
// GEMM results bound for M go through a small contiguous scratch buffer and `copy_in`: a GEMM
// cannot write M while it reads M.
//
// Entry points:
//   diag_of      d[i] = H[i, i] for the rows of one panel  (the host decides damping from it)
//   prep         K = J·(H[o][:, o] with diagonal dg)·J   (o = processing order, dg = damped diagonal
//                                                         with dead columns set to 1, §1.2 steps 3–6)
//   copy_in      dst[block] = scratch                    (a GEMM result from scratch into M)
//   reverse_u    U[a, b] = M[n−1−a, n−1−b] for a ≤ b, 0 below

struct Params {
    n: u32,
    j0: u32,
    rows: u32,
    cols: u32,
    off: u32,
    dst_r0: u32,
    dst_rows: u32,
    src_r0: u32,
    src_rows: u32,
    src_off: u32,
    // copy_in over a batch (z = global_invocation_id.z): the z-th block's destination and
    // source start zdst·z and zsrc·z elements later (0 for one block).
    zdst: u32,
    zsrc: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// ---- diag_of / prep ----------------------------------------------------------------------------
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
// prep only: the processing order o and the damped diagonal dg.
@group(0) @binding(3) var<storage, read> order: array<u32>;
@group(0) @binding(4) var<storage, read> dg: array<f32>;

@compute @workgroup_size(256)
fn diag_of(@builtin(global_invocation_id) g: vec3<u32>) {
    let i = g.x;
    if (i < p.dst_rows) {
        dst[p.dst_r0 + i] = src[i * p.n + p.dst_r0 + i];
    }
}

// K[i, j] = H[o[n−1−i], o[n−1−j]] off the diagonal, dg[n−1−i] on it (only i ≤ j is needed; the
// whole matrix is written so that no stale value survives from an earlier use of the buffer).
@compute @workgroup_size(16, 16)
fn prep(@builtin(global_invocation_id) g: vec3<u32>) {
    let i = g.y;
    let j = g.x;
    let n = p.n;
    if (i >= p.dst_rows || j >= n) {
        return;
    }
    let ri = n - 1u - (p.dst_r0 + i);
    let rj = n - 1u - j;
    // The source row order[ri] decides which launch writes (i, j) — the diagonal included.
    let sr = order[ri];
    if (sr < p.src_r0 || sr >= p.src_r0 + p.src_rows) {
        return;
    }
    if (p.dst_r0 + i == j) {
        dst[i * n + j] = dg[ri];
    } else {
        dst[i * n + j] = src[(sr - p.src_r0) * n + order[rj]];
    }
}

// ---- copy_in / reverse_u ---------------------------------------------------------------------
// copy_in: dst[off + z·zdst + r·n + c] = src[src_off + z·zsrc + r·cols + c] for r < rows,
// c < cols: a dense block from a contiguous scratch buffer (leading dimension `cols`) into one
// panel of an n-column matrix; a batch of such blocks along z.
@compute @workgroup_size(16, 16)
fn copy_in(@builtin(global_invocation_id) g: vec3<u32>) {
    let r = g.y;
    let c = g.x;
    if (r < p.rows && c < p.cols) {
        dst[p.off + g.z * p.zdst + r * p.n + c] = src[p.src_off + g.z * p.zsrc + r * p.cols + c];
    }
}

@compute @workgroup_size(16, 16)
fn reverse_u(@builtin(global_invocation_id) g: vec3<u32>) {
    let i = g.y;
    let b = g.x;
    let n = p.n;
    if (i >= p.dst_rows || b >= n) {
        return;
    }
    let a = p.dst_r0 + i;
    // Source row n−1−a decides which launch writes (a, b), the zeros below the diagonal included.
    let sr = n - 1u - a;
    if (sr < p.src_r0 || sr >= p.src_r0 + p.src_rows) {
        return;
    }
    var v = 0.0;
    if (a <= b) {
        v = src[(sr - p.src_r0) * n + (n - 1u - b)];
    }
    dst[i * n + b] = v;
}
