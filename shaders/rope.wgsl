// Rotary position embedding in place on q or k ([tokens, heads·hd] row-major), HF "rotate_half"
// layout: for i < hd/2, (a, b) = (x[i], x[i + hd/2]) → (a·cos − b·sin, b·cos + a·sin) with the
// angle of (position, i) from precomputed tables [max_pos, hd/2]. Position = token % seqlen (every
// sequence of a batch starts at 0).
//
// With `has_norm` (Qwen3), the per-head RMSNorm with weight `nw` [hd] is applied first — it runs
// before RoPE in Qwen3Attention — fused here so q/k are read and written once.

struct Params {
    rows: u32,    // tokens · heads
    heads: u32,
    hd: u32,
    seqlen: u32,
    has_norm: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> cos_t: array<f32>;
@group(0) @binding(2) var<storage, read> sin_t: array<f32>;
@group(0) @binding(3) var<storage, read> nw: array<f32>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;

var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn rope(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wg.x + wg.y * nwg.x;
    if (row >= p.rows) {
        return;
    }
    let t = row / p.heads;
    let pos = t % p.seqlen;
    let base = row * p.hd;
    let half = p.hd / 2u;

    var r = 1.0;
    if (p.has_norm != 0u) {
        var s = 0.0;
        for (var i = lid.x; i < p.hd; i += 64u) {
            let v = x[base + i];
            s += v * v;
        }
        partial[lid.x] = s;
        workgroupBarrier();
        for (var k = 32u; k > 0u; k >>= 1u) {
            if (lid.x < k) {
                partial[lid.x] += partial[lid.x + k];
            }
            workgroupBarrier();
        }
        r = inverseSqrt(partial[0] / f32(p.hd) + p.eps);
    }
    // Every pair (i, i + half) is read and written by one thread only, so no barrier is needed
    // between the norm's reads above and these writes.
    for (var i = lid.x; i < half; i += 64u) {
        var a = x[base + i];
        var b = x[base + i + half];
        if (p.has_norm != 0u) {
            a = a * r * nw[i];
            b = b * r * nw[i + half];
        }
        let c = cos_t[pos * half + i];
        let s = sin_t[pos * half + i];
        x[base + i] = a * c - b * s;
        x[base + i + half] = b * c + a * s;
    }
}
