// Elementwise ops and reductions over f32 arrays.
//
// Every entry point takes the same bindings (params, x, y, out) so one pipeline layout fits all;
// entries that do not need `y` still declare it (auto layouts drop unused bindings otherwise).
// Workgroups are folded into x/y (65535 limit per dimension): i = (wg.x + wg.y·nwg.x)·256 + lid.x.

struct Params {
    n: u32,
    // Matrix width for `mirror_upper` / row-wise ops.
    cols: u32,
    alpha: f32,
    beta: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn gid(wg: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wg.x + wg.y * nwg.x) * 256u + lid.x;
}

// out = alpha·x + beta·y
@compute @workgroup_size(256)
fn axpby(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = gid(wg, nwg, lid);
    if (i < p.n) {
        out[i] = p.alpha * x[i] + p.beta * y[i];
    }
}

// out = alpha·x·y (elementwise product)
@compute @workgroup_size(256)
fn mul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = gid(wg, nwg, lid);
    if (i < p.n) {
        out[i] = p.alpha * x[i] * y[i];
    }
}

// Partial sums for squared-norm reductions: out[wg] = Σ over this workgroup's 256·CHUNK elements of
// (x − beta·y)². With beta = 0 this is ‖x‖²; with beta = 1 it is ‖x − y‖². A second pass (or the
// host, over at most a few thousand partials) adds the partials.
const CHUNK: u32 = 16u;
var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn sq_diff_partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let w = wg.x + wg.y * nwg.x;
    let base = w * 256u * CHUNK;
    var s = 0.0;
    for (var c = 0u; c < CHUNK; c++) {
        let i = base + c * 256u + lid.x;
        if (i < p.n) {
            let d = x[i] - p.beta * y[i];
            s = fma(d, d, s);
        }
    }
    red[lid.x] = s;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride = stride / 2u) {
        if (lid.x < stride) {
            red[lid.x] = red[lid.x] + red[lid.x + stride];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        out[w] = red[0];
    }
}
