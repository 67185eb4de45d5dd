// Elementwise pieces of the decoder layer. Same bindings for every entry (params, x, out).

struct Params {
    n: u32,      // elements of `out`
    cols: u32,   // row length for the broadcast in `bias_add`
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

fn gid(wg: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wg.x + wg.y * nwg.x) * 256u + lid.x;
}

// SwiGLU: out = silu(out) · x, with out = gate projection and x = up projection (LlamaMLP).
@compute @workgroup_size(256)
fn silu_mul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = gid(wg, nwg, lid);
    if (i < p.n) {
        let g = out[i];
        out[i] = g / (1.0 + exp(-g)) * x[i];
    }
}

// out[r, c] += x[c]: a linear layer's bias broadcast over the token rows.
@compute @workgroup_size(256)
fn bias_add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = gid(wg, nwg, lid);
    if (i < p.n) {
        out[i] = out[i] + x[i % p.cols];
    }
}
