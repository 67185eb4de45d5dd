// Causal self-attention with grouped-query heads, one workgroup per (query token, head), streaming
// over keys in chunks of 64 with the online-softmax recurrence (running max m, running sum l), so no
// seq × seq score matrix is ever materialised.
//
// q, out: [tokens, heads·hd]; k, v: [tokens, kv_heads·hd]; tokens = nseq·seqlen, sequences packed
// back to back, each attending only to its own earlier positions. Query head h reads kv head
// h / (heads / kv_heads) (repeat_kv in HF). Each thread owns output dims lid, lid+64, … (hd ≤ 256).

struct Params {
    rows: u32,      // tokens · heads
    heads: u32,
    kv_heads: u32,
    hd: u32,
    seqlen: u32,
    scale: f32,     // 1/sqrt(hd)
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const WG: u32 = 64u;
const MAX_SLOTS: u32 = 4u;
const NEG: f32 = -3.0e38;

var<workgroup> qs: array<f32, 256>;
var<workgroup> probs: array<f32, 64>;
var<workgroup> red: array<f32, 64>;

fn reduce_max(lid: u32, val: f32) -> f32 {
    red[lid] = val;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn reduce_sum(lid: u32, val: f32) -> f32 {
    red[lid] = val;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = red[lid] + red[lid + s];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let row = wg.x + wg.y * nwg.x;
    if (row >= p.rows) {
        return;
    }
    let lid = lid3.x;
    let t = row / p.heads;
    let h = row % p.heads;
    let kvh = h / (p.heads / p.kv_heads);
    let qd = p.heads * p.hd;
    let kvd = p.kv_heads * p.hd;
    let start = t - t % p.seqlen;

    for (var d = lid; d < p.hd; d += WG) {
        qs[d] = q[t * qd + h * p.hd + d] * p.scale;
    }
    workgroupBarrier();

    var m = NEG;
    var l = 0.0;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var kb = start; kb <= t; kb += WG) {
        let j = kb + lid;
        var s = NEG;
        if (j <= t) {
            let kbase = j * kvd + kvh * p.hd;
            var dot = 0.0;
            for (var d = 0u; d < p.hd; d += 1u) {
                dot += qs[d] * k[kbase + d];
            }
            s = dot;
        }
        let m_new = max(m, reduce_max(lid, s));
        var pj = 0.0;
        if (j <= t) {
            pj = exp(s - m_new);
        }
        probs[lid] = pj;
        let corr = exp(m - m_new);
        l = l * corr + reduce_sum(lid, pj);
        let count = min(WG, t + 1u - kb);
        for (var slot = 0u; slot < MAX_SLOTS; slot += 1u) {
            let d = lid + slot * WG;
            if (d < p.hd) {
                var a = acc[slot] * corr;
                for (var jj = 0u; jj < count; jj += 1u) {
                    a += probs[jj] * v[(kb + jj) * kvd + kvh * p.hd + d];
                }
                acc[slot] = a;
            }
        }
        m = m_new;
        workgroupBarrier();
    }
    for (var slot = 0u; slot < MAX_SLOTS; slot += 1u) {
        let d = lid + slot * WG;
        if (d < p.hd) {
            out[t * qd + h * p.hd + d] = acc[slot] / l;
        }
    }
}
