// GPTAQ statistic D for the solve (algorithm.md §2.2): dead input columns zeroed and the act-order
// permutation applied symmetrically, in one gather:
//   out[a, b] = 0                       if column perm[b] is dead (diag(H) == 0)
//             = d[perm[a], perm[b]]     otherwise
// `colmap` holds perm[0..n] followed by the dead flags[0..n] (1 = dead). Without act-order perm is the
// identity. The input D is never modified (q/k/v share one D, algorithm.md §6.2).

struct Params {
    n: u32,
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
    let a = gid.y;
    if (a >= p.n || b >= p.n) {
        return;
    }
    let pa = colmap[a];
    let pb = colmap[b];
    var v = 0.0;
    if (colmap[p.n + pb] == 0u) {
        v = d[pa * p.n + pb];
    }
    out[a * p.n + b] = v;
}
