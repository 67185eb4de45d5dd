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
// Three entry points for A, all over the panel's vec4s (n is a multiple of 4: the split path
// needs n a multiple of 128):
//   `absmax`    amax[slot] = max(amax[slot], bits of |x|) over the kept entries. Non-negative
//               f32 values order like their bits, so an atomic u32 maximum is the f32 maximum.
//   `split`     hi, lo at dense offset `dst` + the panel's element index (one n × n f16 matrix
//               per operand across all panels), lo `lo` elements further into its binding (lo is
//               hi's buffer, bound twice, where both halves share one: the staged tensor-core
//               kernels read them in one product).
//   `unscale`   A's mask and scale in place: t ← α·2^−(s₀+s₁)·t strictly above the diagonal,
//               0 on and below it (quant_mask.wgsl's `triu1_scale` with the split's scales).
//
// Two more, `absmax_view` and `split_pair`, split the operands of the deferred P's pending
// flushes `G[:, i2:] += Q·A[first..i2, i2:]` (quant/flush.rs; algorithm.md §2.2 via quant/gpu.rs
// `PForm`) for one tensor-core product with K tripled. There G is added to by the tensor
// cores, which cannot scale their accumulators, so the two operands' powers of two cancel: Q is
// scaled by 2^s and A by 2^−s, with s chosen so that their largest magnitudes meet halfway
// (`pair_exp`). Both stay below 2^15 as long as max|Q|·max|A| < 2^28. Each entry's error is,
// as above, at most 2^−22 (2^−21) of its scaled magnitude plus 2^−25 (scaled units).
// With max|Q|·max|A| ≥ 2^−4 both scaled maxima are at least 2^−3 and that floor matters only for
// entries far below the largest (as for A above); for smaller products it costs bits relative to
// Q·A itself, which is then small against the errors it is added to (a nearly exact D).

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
    // `split`: lo's offset in its binding past hi's (a multiple of 4).
    lo: u32,
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

// amax[slot] = max(amax[slot], the workgroup's largest m) (non-negative m; called by all 256
// invocations, in uniform control flow).
fn max_into(slot: u32, m: f32, lid: u32) {
    red[lid] = bitcast<u32>(m);
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        atomicMax(&amax[slot], red[0]);
    }
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
    max_into(p.slot, m, lid.x);
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
    lo4[o + (p.lo >> 2u)] = vec4<f16>(x - hi);
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

// The pending flush's operands (`absmax_view`, `split_pair`; quant/flush.rs `FlushSplit`).
struct PairParams {
    // The f32 view: `rows` × `cols` from element `src` of x4's buffer, rows `ld` apart (`cols`,
    // `src` and `ld` multiples of 4).
    rows: u32,
    cols: u32,
    src: u32,
    ld: u32,
    // `split_pair`: hi's first copy of view entry (r, c) at `dst + r·dld + c` of the f16 output,
    // its second copy `hi2` elements later (0: none, for the staged kernels' split products,
    // which read hi once), lo `lo` elements later (all multiples of 4).
    dst: u32,
    dld: u32,
    hi2: u32,
    lo: u32,
    // Q's maximum is amax[slot], A's amax[slot + 1]; `role` 0 scales by 2^s (Q), 1 by 2^−s (A).
    slot: u32,
    role: u32,
    // ±1: the sweep leaves −Q, the product wants Q (negation is exact).
    sign: f32,
    _p: u32,
}

@group(0) @binding(0) var<uniform> pp: PairParams;

// The view's vec4 `v` as an index into x4 (callers keep v below rows·cols/4).
fn view_vec(v: u32) -> u32 {
    let per_row = pp.cols >> 2u;
    return (pp.src >> 2u) + (v / per_row) * (pp.ld >> 2u) + v % per_row;
}

// Q's power of two s (A takes −s), from mQ < 2^eq and mA < 2^ea: ⌊(ea − eq)/2⌋ makes the scaled
// bounds 2^(eq + s) = 2^⌊(eq + ea)/2⌋ and 2^(ea − s) = 2^⌈(eq + ea)/2⌉, at most 2^15 while
// eq + ea ≤ 30 (max|Q|·max|A| < 2^28 ensures it); past that, Q's bound wins and A's products
// overflow (never a real layer's weights and D; it would reach the sweep as a non-finite loss,
// quant/gpu.rs' documented fallback). A zero maximum (exp 0) leaves the other operand's scale
// near 2^(e/2): its products are all zero.
fn pair_exp(slot: u32) -> i32 {
    let eq = frexp(bitcast<f32>(atomicLoad(&amax[slot]))).exp;
    let ea = frexp(bitcast<f32>(atomicLoad(&amax[slot + 1u]))).exp;
    return min((ea - eq) >> 1u, 15 - eq);
}

@compute @workgroup_size(256)
fn absmax_view(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let v = vec_index(wg, nwg, lid.x);
    var m = 0.0;
    if (v < pp.rows * (pp.cols >> 2u)) {
        let a = abs(x4[view_vec(v)]);
        m = max(max(a.x, a.y), max(a.z, a.w));
    }
    max_into(pp.slot + pp.role, m, lid.x);
}

@compute @workgroup_size(256)
fn split_pair(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let v = vec_index(wg, nwg, lid.x);
    let per_row = pp.cols >> 2u;
    if (v >= pp.rows * per_row) {
        return;
    }
    let s = pair_exp(pp.slot);
    let e = select(s, -s, pp.role == 1u);
    let x = pp.sign * ldexp(x4[view_vec(v)], vec4<i32>(e));
    let hi = split_hi(x);
    let o = ((pp.dst >> 2u) + (v / per_row) * (pp.dld >> 2u)) + v % per_row;
    hi4[o] = vec4<f16>(hi);
    if (pp.hi2 != 0u) {
        hi4[o + (pp.hi2 >> 2u)] = vec4<f16>(hi);
    }
    hi4[o + (pp.lo >> 2u)] = vec4<f16>(x - hi);
}
