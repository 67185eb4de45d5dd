// Split-f16 operands: f32 products on the tensor cores at close to f32 accuracy, for GPTAQ's
// A = α·triu₁(Dp·Uᵀ) (quant/gpu.rs `gptaq_a_split`; algorithm.md §2.2).
//
// An f32 matrix X (one row panel of a GpuMatrix per launch: `rows` × `n`, dense, its first row
// being global row `r0`) is scaled by a power of two 2^s, chosen from X's largest magnitude so
// that |X·2^s| < 2^15 (f16's largest finite value is 65504), and written as two f16 matrices:
//   hi = X·2^s rounded to f16's precision,   lo = f16(X·2^s − hi),
//   X·2^s = hi + lo + e,  |e| ≤ 2^−22·|X·2^s| (2^−21 if the conversion of lo truncates) + 2^−25
// (X·2^s − hi is exact in f32: hi is X·2^s rounded to 11 significant bits). hi is rounded by
// integer arithmetic on the bits (`split_hi`), not by converting to f16 and back: NVIDIA's Vulkan
// compiler folds that round trip `f32(f16(v))` to `v`, which left lo = 0 (H100, session 32). A
// product then sums hi·hi′ + hi·lo′ + lo·hi′ with f32 accumulation (the dropped lo·lo′ is below
// 2^−22 of each product) and is unscaled by 2^−(s+s′) — exact, a power of two. (Measured on the
// H100, the tensor cores' accumulation, not the split, limits the result: 8.8·10⁻⁶ relative at
// K = 14336, BENCHMARKS.md session 32.) The scaling keeps lo out
// of f16's subnormals except where |X·2^s| < 2^−3, i.e. below 2^−18 of the largest entry, whose
// absolute error stays below 2^−25 in scaled units (2^−40 of the largest entry).
//
// The solve reads only triangles: U's upper triangle with its diagonal, Dp's strict upper
// triangle (A's entry (i, j), i < j, sums Dp[i, k]·U[j, k] over k ≥ j > i). Entries outside
// (`col < row + tri`) are written as zeros and left out of the maximum: they need not be zero,
// or even finite, in X (the f32 GEMMs never read them either), and the dense column blocks of
// `gptaq_a_split` then multiply exact zeros there.
//
// Three entry points, all over the panel's vec4s (n is a multiple of 4: the split path needs
// n a multiple of 128):
//   `absmax`    amax[slot] = max(amax[slot], bits of |x|) over the kept entries. Non-negative
//               f32 values order like their bits, so an atomic u32 maximum is the f32 maximum.
//   `split`     hi, lo at dense offset `dst` + the panel's element index (one n × n f16 matrix
//               per operand across all panels).
//   `unscale`   A's mask and scale in place: t ← α·2^−(s₀+s₁)·t strictly above the diagonal,
//               0 on and below it (quant_mask.wgsl's `triu1_scale` with the split's scales).

enable f16;

struct Params {
    // Rows of the bound panel, the matrix's columns, its first row's global index.
    rows: u32,
    n: u32,
    r0: u32,
    // Element offset of the panel's first row in the dense f16 outputs (`split`).
    dst: u32,
    // Which maximum this operand's scale comes from (`absmax`, `split`).
    slot: u32,
    // Entries with col < row + tri are outside the operand's triangle (0: U, 1: Dp).
    tri: u32,
    // `unscale`: α.
    alpha: f32,
    _p: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> amax: array<atomic<u32>>;
@group(0) @binding(3) var<storage, read_write> hi4: array<vec4<f16>>;
@group(0) @binding(4) var<storage, read_write> lo4: array<vec4<f16>>;
// `unscale` updates the product in place.
@group(0) @binding(1) var<storage, read_write> t4: array<vec4<f32>>;

var<workgroup> red: array<u32, 256>;

// v rounded to the nearest f16 value (ties away from zero), as f32: from 2^−14 on, f16's normal
// range, the 13 mantissa bits below f16's 10 are rounded off (adding half their range first
// carries into the exponent where it should); below it, f16's subnormals are the multiples of
// 2^−24. |v| < 2^15 here, so nothing reaches infinity.
fn split_hi(v: vec4<f32>) -> vec4<f32> {
    let normal = bitcast<vec4<f32>>((bitcast<vec4<u32>>(v) + vec4<u32>(0x1000u)) & vec4<u32>(0xffffe000u));
    let tiny = round(v * 16777216.0) * (1.0 / 16777216.0);
    return select(normal, tiny, abs(v) < vec4<f32>(6.103515625e-5));
}

// Flat vec4 index of this invocation (2-D grids: more than 65535 workgroups of 256).
fn vec_index(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.x + wg.y * nwg.x) * 256u + lid;
}

// The kept lanes of vec4 `v` (its four columns c..c+3 of global row r).
fn kept(v: u32) -> vec4<bool> {
    let per_row = p.n >> 2u;
    let r = p.r0 + v / per_row;
    let c = (v % per_row) * 4u;
    let first = r + p.tri;
    return vec4<bool>(c >= first, c + 1u >= first, c + 2u >= first, c + 3u >= first);
}

// The power of two that brings the operand in `slot` below 2^15: 15 − e for a largest
// magnitude m = f·2^e, f ∈ [0.5, 1). An all-zero operand (m = 0) gets 15; its products are 0.
fn scale_exp(slot: u32) -> i32 {
    let m = bitcast<f32>(atomicLoad(&amax[slot]));
    return 15 - frexp(m).exp;
}

@compute @workgroup_size(256)
fn absmax(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let v = vec_index(wg, nwg, lid.x);
    var m = 0.0;
    if (v < p.rows * (p.n >> 2u)) {
        let a = select(vec4<f32>(0.0), abs(x4[v]), kept(v));
        m = max(max(a.x, a.y), max(a.z, a.w));
    }
    red[lid.x] = bitcast<u32>(m);
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if (lid.x < s) {
            red[lid.x] = max(red[lid.x], red[lid.x + s]);
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        atomicMax(&amax[p.slot], red[0]);
    }
}

@compute @workgroup_size(256)
fn split(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let v = vec_index(wg, nwg, lid.x);
    if (v >= p.rows * (p.n >> 2u)) {
        return;
    }
    let e = scale_exp(p.slot);
    let x = select(vec4<f32>(0.0), ldexp(x4[v], vec4<i32>(e)), kept(v));
    let hi = split_hi(x);
    let o = (p.dst >> 2u) + v;
    // hi is exact in f16; x − hi is exact in f32 and rounded once here.
    hi4[o] = vec4<f16>(hi);
    lo4[o] = vec4<f16>(x - hi);
}

@compute @workgroup_size(256)
fn unscale(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let v = vec_index(wg, nwg, lid.x);
    if (v >= p.rows * (p.n >> 2u)) {
        return;
    }
    // α·2^−(s₀+s₁) is exact (α times a power of two, far from f32's limits for any finite
    // operands), so the product is rounded once, as the f32 path's α·T.
    let f = ldexp(p.alpha, -(scale_exp(0u) + scale_exp(1u)));
    // Strictly upper: col ≥ row + 1 (the `kept` test with tri = 1).
    t4[v] = select(vec4<f32>(0.0), f * t4[v], kept(v));
}
