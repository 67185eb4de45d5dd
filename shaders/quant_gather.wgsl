// Gathers of the solve's inputs (quant/gpu.rs). `gather_sym`: GPTAQ's statistic D (algorithm.md
// §2.2) with dead input columns zeroed and the act-order permutation applied symmetrically:
//   out[a, b] = 0                       if column perm[b] is dead (diag(H) == 0)
//             = d[perm[a], perm[b]]     otherwise
// `colmap` holds perm[0..n] followed by the dead flags[0..n] (1 = dead). Without act-order perm is the
// identity. The input D is never modified (q/k/v share one D, algorithm.md §6.2).
//
// Both matrices are stored in row panels (gpu/matrix.rs): a launch binds one panel of `out`
// (global rows dst_r0 .. dst_r0 + dst_rows) and one of `d` (src_r0 .. src_r0 + src_rows) and writes
// the elements whose source row perm[a] lies in that source panel; the host runs every pair.

struct Params {
    n: u32,
    dst_r0: u32,
    dst_rows: u32,
    src_r0: u32,
    src_rows: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> d: array<f32>;
@group(0) @binding(2) var<storage, read> colmap: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(16, 16, 1)
fn gather_sym(@builtin(global_invocation_id) gid: vec3<u32>) {
    let b = gid.x;
    let i = gid.y;
    if (i >= p.dst_rows || b >= p.n) {
        return;
    }
    let pa = colmap[p.dst_r0 + i];
    if (pa < p.src_r0 || pa >= p.src_r0 + p.src_rows) {
        return;
    }
    let pb = colmap[b];
    var v = 0.0;
    if (colmap[p.n + pb] == 0u) {
        v = d[(pa - p.src_r0) * p.n + pb];
    }
    out[i * p.n + b] = v;
}

// The solve's W from the caller's copy on the GPU, exactly as quant/gpu.rs `prepare_w_f32` does it
// on the host: columns in processing order, dead ones zeroed,
//   out[r, k] = 0               if column perm[k] is dead
//             = w[r, perm[k]]   otherwise
// for the rows × n matrix W in one buffer, bound as `d` (`dst_rows` = rows; the other row fields
// are unused). `colmap` as above. One invocation per element, the workgroups folded into x and y
// (gpu/kernels.rs `groups_1d`).
@compute @workgroup_size(256)
fn gather_cols(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.dst_rows * p.n) {
        return;
    }
    let r = i / p.n;
    let j = colmap[i % p.n];
    var v = 0.0;
    if (colmap[p.n + j] == 0u) {
        v = d[r * p.n + j];
    }
    out[i] = v;
}
