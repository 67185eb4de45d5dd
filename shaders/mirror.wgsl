// Completes a symmetric matrix whose upper triangle was computed by a rank-k update:
// m[i, j] = m[j, i] for i > j, on an n×n row-major matrix stored in row panels (gpu/matrix.rs).
//
// A launch covers one destination panel (global rows dst_r0 .. dst_r0 + dst_rows) and the columns
// j in one source panel (global rows src_r0 .. src_r0 + src_rows), since m[i, j] comes from row j:
//   mirror_upper  source panel == destination panel (one read-write binding; j < i only);
//   mirror_cross  an earlier source panel (every j < i there), read through its own binding.
// A single-panel matrix is one `mirror_upper` launch with dst_r0 = src_r0 = 0.

struct Params {
    n: u32,
    dst_r0: u32,
    dst_rows: u32,
    src_r0: u32,
    src_rows: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> m: array<f32>;
@group(0) @binding(2) var<storage, read> src: array<f32>;

@compute @workgroup_size(16, 16)
fn mirror_upper(@builtin(global_invocation_id) g: vec3<u32>) {
    // Local row i and local column-row j of the same panel.
    let i = g.y;
    let j = g.x;
    if (i < p.dst_rows && j < i) {
        m[i * p.n + p.dst_r0 + j] = m[j * p.n + p.dst_r0 + i];
    }
}

@compute @workgroup_size(16, 16)
fn mirror_cross(@builtin(global_invocation_id) g: vec3<u32>) {
    let i = g.y;
    let j = g.x;
    if (i < p.dst_rows && j < p.src_rows) {
        m[i * p.n + p.src_r0 + j] = src[j * p.n + p.dst_r0 + i];
    }
}
