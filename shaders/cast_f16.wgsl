// f32 → f16 operands for the tensor-core GEMM (gemm_coop.wgsl): out[i] = f16(scale · x[i]),
// over `len` elements of a strided row-major view (rows × cols, leading dimension ld, offset off),
// written densely (rows × cols). `scale` carries the GEMM's α: for the Hessian H += α·XᵀX both
// operands are X, so the host passes sqrt(α). Values beyond f16's range become ±inf; the caller
// checks the result (the f32 path is the fallback).

enable f16;

struct Params {
    rows: u32,
    cols: u32,
    ld: u32,
    off: u32,
    scale: f32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f16>;

@compute @workgroup_size(256)
fn cast_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.rows * p.cols) {
        return;
    }
    let r = i / p.cols;
    let col = i % p.cols;
    out[i] = f16(x[p.off + r * p.ld + col] * p.scale);
}
