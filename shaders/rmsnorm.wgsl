// RMSNorm over the rows of a row-major [rows, n] matrix, as LlamaRMSNorm computes it in float32:
// out[r, i] = x[r, i] · rsqrt(mean_i(x[r, i]²) + eps) · w[i].
// One workgroup per row; rows are folded into x/y workgroup ids (65535 limit per dimension).

struct Params {
    rows: u32,
    n: u32,
    eps: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn rmsnorm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wg.x + wg.y * nwg.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.n;
    var s = 0.0;
    for (var i = lid.x; i < p.n; i += 256u) {
        let v = x[base + i];
        s += v * v;
    }
    partial[lid.x] = s;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid.x < k) {
            partial[lid.x] += partial[lid.x + k];
        }
        workgroupBarrier();
    }
    let r = inverseSqrt(partial[0] / f32(p.n) + p.eps);
    for (var i = lid.x; i < p.n; i += 256u) {
        out[base + i] = x[base + i] * r * w[i];
    }
}
