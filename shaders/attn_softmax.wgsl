// Causal softmax between the two tensor-core GEMMs of attention (forward::attend_tc):
//   P[z][r][j] = f16( exp(S[z][r][j] − max_r) / Σ_j' exp(S[z][r][j'] − max_r) )  for j ≤ q0 + r,
//   P[z][r][j] = 0                                                              for q0 + r < j < keys,
// over the rows r < rows of one query chunk (query positions q0 + r of the sequence) and the
// keys j < keys that chunk can see, for every head z. S (f32, scores already scaled by 1/√hd:
// the scale is folded into the f16 queries) is the output of the cooperative-matrix GEMM. The
// staged kernels overwrite it; where the forward uses an unstaged one, which adds into it, `zero`
// is set and each row is zeroed here once read: the next chunk's GEMM starts from zeros without
// a separate clear. Row base: z·zstride + r·ld, for S and P alike.
// One workgroup per (row, head): 256 invocations stride over the keys. Two passes over S: the
// first keeps each invocation's running maximum m and sum l of exp(s − m) (rescaling l when m
// grows, the "online softmax" of Milakov & Gimelshein 2018), and the workgroup combines the 256
// (m, l) pairs in workgroup memory; the second writes P (exp recomputed instead of kept). The
// three-pass form (maximum, sum, write) read S once more; with the zeroing gone that was 3 of the
// 4 passes over an f32 S (BENCHMARKS.md session 31).

enable f16;

struct Params {
    rows: u32,
    keys: u32,
    ld: u32,
    q0: u32,
    zstride: u32,
    // 1: zero the scores once read (see above).
    zero: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> s: array<f32>;
@group(0) @binding(2) var<storage, read_write> pm: array<f16>;

const WG: u32 = 256u;
var<workgroup> red_m: array<f32, 256>;
var<workgroup> red_l: array<f32, 256>;

@compute @workgroup_size(256)
fn attn_softmax(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wg.x;
    let z = wg.y;
    let t = lid.x;
    let base = z * p.zstride + r * p.ld;
    // Causal: query position q0 + r sees keys 0 ..= q0 + r.
    let visible = min(p.q0 + r + 1u, p.keys);
    // −3e38 rather than −inf: exp(−3e38 − m) underflows to 0 for any finite m, and an invocation
    // with no key (more invocations than visible keys) then adds l = 0 with a factor that is 0.
    var m = -3.0e38;
    var l = 0.0;
    for (var j = t; j < visible; j += WG) {
        let v = s[base + j];
        if (v > m) {
            l = l * exp(m - v);
            m = v;
        }
        l += exp(v - m);
    }
    red_m[t] = m;
    red_l[t] = l;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off >>= 1u) {
        if (t < off) {
            let m1 = red_m[t];
            let m2 = red_m[t + off];
            let mx = max(m1, m2);
            red_l[t] = red_l[t] * exp(m1 - mx) + red_l[t + off] * exp(m2 - mx);
            red_m[t] = mx;
        }
        workgroupBarrier();
    }
    let mx = red_m[0];
    let inv = 1.0 / red_l[0];
    for (var j = t; j < p.keys; j += WG) {
        var v = 0.0;
        if (j < visible) {
            v = exp(s[base + j] - mx) * inv;
        }
        pm[base + j] = f16(v);
        if (p.zero != 0u) {
            s[base + j] = 0.0;
        }
    }
}
