// Completes a symmetric matrix whose upper triangle was computed by a rank-k update:
// m[i, j] = m[j, i] for i > j, on an n×n row-major matrix.

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> m: array<f32>;

@compute @workgroup_size(16, 16)
fn mirror_upper(@builtin(global_invocation_id) g: vec3<u32>) {
    let i = g.y;
    let j = g.x;
    if (i < p.n && j < i) {
        m[i * p.n + j] = m[j * p.n + i];
    }
}
