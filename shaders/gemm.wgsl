// Tiled f32 GEMM: C = alpha · op(A) · op(B) + beta · C  over sub-matrix views.
//
// op(A) is M×K: row-major A[m, k] at off_a + m·lda + k, or (TRANS_A) A stored K×M at off_a + k·lda + m.
// op(B) is K×N: row-major B[k, n] at off_b + k·ldb + n, or (TRANS_B) B stored N×K at off_b + n·ldb + k.
// C is row-major M×N at off_c + m·ldc + n.
//
// Forms used by the project: Y = X·Wᵀ (linear layers, TRANS_B), H += XᵀX (Hessians, TRANS_A with
// UPPER_ONLY, mirrored afterwards by `mirror_upper`), W -= E·U (GPTQ lazy block update).
//
// Tiling: a 64×64 output tile per 16×16 workgroup, each invocation accumulating a 4×4 register
// block (rows ty+16i, columns tx+16j so neighbouring invocations touch neighbouring addresses),
// K consumed in slices of 16 staged through workgroup memory. Every load is bounds-checked, so
// any M, N, K (including 1 and primes) is valid.

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
    alpha: f32,
    beta: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

override TRANS_A: bool = false;
override TRANS_B: bool = false;
// Only compute tiles on or above the diagonal (symmetric rank-k update; M == N).
override UPPER_ONLY: bool = false;

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> sa: array<f32, 1024>; // [TK][TM]
var<workgroup> sb: array<f32, 1024>; // [TK][TN]

fn load_a(row: u32, kk: u32) -> f32 {
    if (row >= p.m || kk >= p.k) {
        return 0.0;
    }
    if (TRANS_A) {
        return a[p.off_a + kk * p.lda + row];
    }
    return a[p.off_a + row * p.lda + kk];
}

fn load_b(kk: u32, col: u32) -> f32 {
    if (kk >= p.k || col >= p.n) {
        return 0.0;
    }
    if (TRANS_B) {
        return b[p.off_b + col * p.ldb + kk];
    }
    return b[p.off_b + kk * p.ldb + col];
}

@compute @workgroup_size(16, 16, 1)
fn gemm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wg.y * TM;
    let col0 = wg.x * TN;
    // Whole-workgroup early exit (uniform), before any barrier.
    if (UPPER_ONLY && row0 > col0 + TN - 1u) {
        return;
    }
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;
    var acc: array<array<f32, 4>, 4>;
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            acc[i][j] = 0.0;
        }
    }
    let ktiles = (p.k + TK - 1u) / TK;
    for (var t = 0u; t < ktiles; t++) {
        let k0 = t * TK;
        for (var l = 0u; l < 4u; l++) {
            let idx = tid + l * 256u;
            // A tile: consecutive invocations walk the contiguous dimension of the stored matrix.
            var am: u32;
            var ak: u32;
            if (TRANS_A) {
                am = idx % TM;
                ak = idx / TM;
            } else {
                ak = idx % TK;
                am = idx / TK;
            }
            sa[ak * TM + am] = load_a(row0 + am, k0 + ak);
            var bn: u32;
            var bk: u32;
            if (TRANS_B) {
                bk = idx % TK;
                bn = idx / TK;
            } else {
                bn = idx % TN;
                bk = idx / TN;
            }
            sb[bk * TN + bn] = load_b(k0 + bk, col0 + bn);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            var av: array<f32, 4>;
            var bv: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                av[i] = sa[kk * TM + ty + 16u * i];
                bv[i] = sb[kk * TN + tx + 16u * i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i][j] = fma(av[i], bv[j], acc[i][j]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + ty + 16u * i;
        if (row >= p.m) {
            continue;
        }
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + tx + 16u * j;
            if (col >= p.n) {
                continue;
            }
            if (UPPER_ONLY && row > col) {
                continue;
            }
            let ci = p.off_c + row * p.ldc + col;
            var v = p.alpha * acc[i][j];
            // beta == 0 must not read C: it may hold garbage (NaN) from an earlier use.
            if (p.beta != 0.0) {
                v = v + p.beta * c[ci];
            }
            c[ci] = v;
        }
    }
}
