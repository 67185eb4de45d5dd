// f32 ⇄ packed f16 for the host-spilled activation streams (pipeline/stream.rs): the stream keeps
// two halves per u32 word (element 2w in the low 16 bits of word w, element 2w+1 in the high
// bits), so only 2 bytes per element cross the host link and the conversion runs here instead of
// on the CPU.
//
// The conversion is integer bit arithmetic, not pack2x16float / unpack2x16float: those are core
// WGSL but need the SHADER_F16_IN_F32 downlevel capability, which wgpu withholds on Mesa drivers
// without SHADER_F16 (llvmpipe among them) and on GL ES; and WGSL leaves their rounding to the
// implementation. The bit arithmetic runs on every adapter, needs no `enable f16`, and rounds to
// nearest, ties to even, everywhere — the same bits as the `half` crate, which packs the
// embeddings on the host (Stream::set_host) — with f16 subnormals kept, not flushed. Its few
// integer operations per element are free next to the memory traffic.
//
// Out-of-range rule (pack_f16): f16 streams are the user's memory choice, so values f16 cannot
// hold are reported, not silently corrupted:
//   - |x| > 65504 (f16's largest finite value), ±inf included, is clamped to ±65504;
//   - NaN is written as the f16 quiet NaN 0x7e00 (its sign and payload dropped);
// and either case sets flag[0] |= 1 (the stream reads and clears it: Stream::overflowed). Values in
// (65504, 65520), which round-to-nearest would also give 65504, count as out of range too: the
// rule is the simple one. All tests are on the bits (bitcast to u32), because WGSL lets
// implementations assume floats are never NaN or infinite, which could fold a float comparison
// such as x != x away. An odd `len` packs 0 into the last word's high half.
//
// The entry points share one declaration set: x is the f32 side (pack's input, unpack's output),
// words the packed side, so a launcher passes [f32 buffer, words(, flag)] as bindings 1...
// `pack_f16_x4` / `unpack_f16_x4` do four elements (two words) per invocation through vector
// views of the same bindings, where len is a multiple of 4 (gpu/ops.rs picks them): 16-byte f32
// and 8-byte word accesses instead of 4-byte ones, the same bits. On an 8B model's activation
// streams the one-word entry points moved about 2.0 TB/s on the H100, the four-element ones about
// 2.7 TB/s (BENCHMARKS.md session 31).

struct Params {
    len: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> words: array<u32>;
@group(0) @binding(3) var<storage, read_write> flag: array<atomic<u32>>;
// Vector views of bindings 1 and 2 for the four-element entry points.
@group(0) @binding(1) var<storage, read_write> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> words2: array<vec2<u32>>;

// 65504.0 as f32 bits: the largest finite f16.
const F16_MAX_BITS: u32 = 0x477fe000u;
const F32_INF_BITS: u32 = 0x7f800000u;
const F16_QNAN: u32 = 0x7e00u;

// |v| > 65504, NaN and ±inf included.
fn out_of_range(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > F16_MAX_BITS;
}

// The f16 bits of v (low 16 bits): NaN → 0x7e00, |v| > 65504 → ±65504, otherwise rounded to
// nearest, ties to even.
fn to_f16(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if (a > F32_INF_BITS) {
        return F16_QNAN;
    }
    if (a > F16_MAX_BITS) {
        return sign | 0x7bffu;
    }
    if (a >= 0x38800000u) {
        // f16 normal (|v| ≥ 2⁻¹⁴): rebias the exponent (127 → 15: −112·2²³) and drop 13 mantissa
        // bits, adding just under half plus the kept lowest bit (ties to even). A carry out of the
        // mantissa correctly bumps the exponent; it cannot reach inf below 65504.
        let m = a - 0x38000000u;
        return sign | ((m + 0x0fffu + ((m >> 13u) & 1u)) >> 13u);
    }
    // f16 subnormal or zero: |v| / 2⁻²⁴ = full · 2^(e − 126), rounded the same way. Below 2⁻²⁵
    // (e < 102, f32 subnormals included) that rounds to ±0; a result of 0x400 is the smallest
    // normal, which is right.
    let e = a >> 23u;
    if (e < 102u) {
        return sign;
    }
    let full = (a & 0x7fffffu) | 0x800000u;
    let s = 126u - e; // 14 ..= 24
    return sign | ((full + ((1u << (s - 1u)) - 1u) + ((full >> s) & 1u)) >> s);
}

// The f32 of f16 bits h (exact: every f16 is an f32).
fn from_f16(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0x1fu) {
        return bitcast<f32>(sign | F32_INF_BITS | (m << 13u)); // inf, NaN
    }
    if (e != 0u) {
        return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
    }
    if (m == 0u) {
        return bitcast<f32>(sign); // ±0
    }
    // Subnormal m·2⁻²⁴ = 1.f · 2^(t − 24), t the leading bit of m: normal in f32.
    let t = firstLeadingBit(m);
    return bitcast<f32>(sign | ((t + 103u) << 23u) | ((m << (23u - t)) & 0x7fffffu));
}

@compute @workgroup_size(256)
fn pack_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let w = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    let i = 2u * w;
    if (w >= (p.len + 1u) / 2u) {
        return;
    }
    let a = x[i];
    var b = 0.0;
    if (i + 1u < p.len) {
        b = x[i + 1u];
    }
    if (out_of_range(a) || out_of_range(b)) {
        atomicOr(&flag[0], 1u);
    }
    words[w] = to_f16(a) | (to_f16(b) << 16u);
}

@compute @workgroup_size(256)
fn unpack_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let w = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    let i = 2u * w;
    if (w >= (p.len + 1u) / 2u) {
        return;
    }
    let h = words[w];
    x[i] = from_f16(h & 0xffffu);
    if (i + 1u < p.len) {
        x[i + 1u] = from_f16(h >> 16u);
    }
}

// pack_f16 for len a multiple of 4: elements 4v..4v+3 into words 2v, 2v+1.
@compute @workgroup_size(256)
fn pack_f16_x4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let v = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (v >= p.len / 4u) {
        return;
    }
    let a = x4[v];
    if (out_of_range(a.x) || out_of_range(a.y) || out_of_range(a.z) || out_of_range(a.w)) {
        atomicOr(&flag[0], 1u);
    }
    words2[v] = vec2<u32>(to_f16(a.x) | (to_f16(a.y) << 16u), to_f16(a.z) | (to_f16(a.w) << 16u));
}

// unpack_f16 for len a multiple of 4: words 2v, 2v+1 into elements 4v..4v+3.
@compute @workgroup_size(256)
fn unpack_f16_x4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let v = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (v >= p.len / 4u) {
        return;
    }
    let h = words2[v];
    x4[v] = vec4<f32>(from_f16(h.x & 0xffffu), from_f16(h.x >> 16u), from_f16(h.y & 0xffffu), from_f16(h.y >> 16u));
}
