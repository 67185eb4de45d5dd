// One 32×32 diagonal block of the blocked Cholesky of quant/factor.rs (algorithm.md §6.4): the
// block's Cholesky factor in workgroup memory, its inverse, and a failure flag. The panel solve and
// the trailing update that follow it are GEMMs (gemm.wgsl); see factor.wgsl for the buffers.
// Only the inverse L₁₁⁻¹ is written (into M's diagonal block): the panel solve needs nothing
// else, and the triangular inverse that follows starts from exactly these diagonal inverses, so
// the factor itself never has to be stored (one n×n matrix less, quant/factor.rs).

struct Params {
    n: u32,
    j0: u32,
    // First global row of the bound panels of K and M (same layout; the 32 rows from j0 lie in
    // one panel because panels are multiples of 32 rows, gpu/matrix.rs).
    r0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> kmat: array<f32>;
@group(0) @binding(2) var<storage, read_write> mmat: array<f32>;
// status[0]: 1 if a pivot was not strictly positive and finite; status[1]: first such column + 1.
@group(0) @binding(3) var<storage, read_write> status: array<u32>;

const NB: u32 = 32u;
var<workgroup> blk: array<f32, 1024>;
var<workgroup> inv: array<f32, 1024>;

// Largest finite f32: a pivot above it (inf) or not above 0 (incl. NaN) fails, like LAPACK potrf.
const F32_MAX: f32 = 3.4028235e38;

@compute @workgroup_size(256)
fn potrf_block(@builtin(local_invocation_index) tid: u32) {
    let n = p.n;
    let j0 = p.j0;
    let nb = min(NB, n - j0);
    // Load the block from K's upper triangle; pad with the identity beyond n.
    for (var e = tid; e < NB * NB; e += 256u) {
        let r = e / NB;
        let c = e % NB;
        var v = select(0.0, 1.0, r == c);
        if (r < nb && c < nb) {
            v = kmat[(j0 - p.r0 + min(r, c)) * n + j0 + max(r, c)];
        }
        blk[e] = v;
    }
    workgroupBarrier();
    // Right-looking unblocked Cholesky of the 32×32 block (lower factor in blk).
    for (var k = 0u; k < NB; k++) {
        if (tid == 0u) {
            var piv = blk[k * NB + k];
            if (!(piv > 0.0 && piv <= F32_MAX)) {
                // Record the failure and continue with a unit pivot so that no NaN spreads; the host
                // reads the flag once per attempt and retries with more damping (§1.5).
                if (status[0] == 0u) {
                    status[1] = j0 + k + 1u;
                }
                status[0] = 1u;
                piv = 1.0;
            }
            blk[k * NB + k] = sqrt(piv);
        }
        workgroupBarrier();
        if (tid > k && tid < NB) {
            blk[tid * NB + k] = blk[tid * NB + k] / blk[k * NB + k];
        }
        workgroupBarrier();
        for (var e = tid; e < NB * NB; e += 256u) {
            let r = e / NB;
            let c = e % NB;
            if (c > k && r >= c) {
                blk[e] = blk[e] - blk[r * NB + k] * blk[c * NB + k];
            }
        }
        workgroupBarrier();
    }
    // Inverse of the lower block by forward substitution, one column per invocation (each only
    // reads what it wrote itself, so no barrier is needed inside).
    if (tid < NB) {
        let j = tid;
        for (var i = 0u; i < NB; i++) {
            if (i < j) {
                inv[i * NB + j] = 0.0;
            } else if (i == j) {
                inv[j * NB + j] = 1.0 / blk[j * NB + j];
            } else {
                var s = 0.0;
                for (var t = j; t < i; t++) {
                    s = fma(blk[i * NB + t], inv[t * NB + j], s);
                }
                inv[i * NB + j] = -s / blk[i * NB + i];
            }
        }
    }
    workgroupBarrier();
    for (var e = tid; e < NB * NB; e += 256u) {
        let r = e / NB;
        let c = e % NB;
        if (r < nb && c < nb && r >= c) {
            mmat[(j0 - p.r0 + r) * n + j0 + c] = inv[e];
        }
    }
}

