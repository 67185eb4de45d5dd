// f32 → f16 operands for the tensor-core GEMMs (gemm_coop.wgsl, gemm_staged_coop.wgsl):
//   out[i] = f16(scale · x[i])            (plain cast), or
//   out[i] = f16(scale · (x[i] − y[i]))   (SUB: GPTAQ's ΔX = X_fp − X_q, cast straight from the
//                                          two streams instead of through an f32 difference),
// over a strided row-major view (rows × cols, leading dimension ld, offset off; y read at x's
// positions), written densely (rows × cols). `scale` carries the GEMM's α: for the Hessian
// H += α·XᵀX both operands are X, so the host passes sqrt(α). Values beyond f16's range become
// ±inf; the caller checks the result (the f32 path is the fallback).
//
// The difference is rounded to f32 before the scale, as `axpby` followed by the plain cast did,
// so the fused form gives the same halves.
//
// Two entry points, chosen by the launcher (gpu/ops.rs `cast_f16`): `cast_f16` converts one
// element per invocation and takes any view; `cast_f16_x4` converts four consecutive elements
// per invocation, one 16-byte load per input and one 8-byte store, where cols, ld and off are
// multiples of 4 (every tensor-core operand: the staged kernels need that alignment anyway).
// The cast is a pure bandwidth pass: one-element invocations issue 2-byte stores and four times
// the instructions; they reached about a third of the H100's bandwidth, the four-wide ones about
// three quarters (BENCHMARKS.md session 31).

enable f16;

struct Params {
    rows: u32,
    cols: u32,
    ld: u32,
    off: u32,
    scale: f32,
    // 1: subtract y (SUB above); 0: y is bound but unread.
    sub: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f16>;
@group(0) @binding(3) var<storage, read> y: array<f32>;
// The same bindings as vectors, for `cast_f16_x4` (each entry point uses one view of each).
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out4: array<vec4<f16>>;
@group(0) @binding(3) var<storage, read> y4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn cast_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.rows * p.cols) {
        return;
    }
    let r = i / p.cols;
    let col = i % p.cols;
    let at = p.off + r * p.ld + col;
    var v = x[at];
    if (p.sub != 0u) {
        v = v - y[at];
    }
    out[i] = f16(v * p.scale);
}

// Vector i of the dense output: row i / (cols/4), vector i % (cols/4) of that row; the source
// vector is (off + r·ld)/4 + that, exact since off, ld and cols are multiples of 4.
@compute @workgroup_size(256)
fn cast_f16_x4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    let per_row = p.cols >> 2u;
    if (i >= p.rows * per_row) {
        return;
    }
    let r = i / per_row;
    let at = ((p.off + r * p.ld) >> 2u) + i % per_row;
    var v = x4[at];
    if (p.sub != 0u) {
        v = v - y4[at];
    }
    out4[i] = vec4<f16>(v * p.scale);
}
