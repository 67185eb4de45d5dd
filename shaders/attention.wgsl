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
    // Four named accumulators (dims lid, lid+64, lid+128, lid+192) rather than a loop-indexed
    // local array, which drivers may keep in local memory (see gemm.wgsl).
    var acc0 = 0.0;
    var acc1 = 0.0;
    var acc2 = 0.0;
    var acc3 = 0.0;
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
        acc0 = acc_v(acc0 * corr, lid, kb, count, kvd, kvh);
        acc1 = acc_v(acc1 * corr, lid + WG, kb, count, kvd, kvh);
        acc2 = acc_v(acc2 * corr, lid + 2u * WG, kb, count, kvd, kvh);
        acc3 = acc_v(acc3 * corr, lid + 3u * WG, kb, count, kvd, kvh);
        m = m_new;
        workgroupBarrier();
    }
    store_out(t, h, qd, lid, acc0 / l);
    store_out(t, h, qd, lid + WG, acc1 / l);
    store_out(t, h, qd, lid + 2u * WG, acc2 / l);
    store_out(t, h, qd, lid + 3u * WG, acc3 / l);
}

// a + Σ_jj probs[jj]·v[kb + jj, d] over this chunk's `count` keys (dims beyond hd: unchanged).
fn acc_v(a0: f32, d: u32, kb: u32, count: u32, kvd: u32, kvh: u32) -> f32 {
    if (d >= p.hd) {
        return a0;
    }
    var a = a0;
    for (var jj = 0u; jj < count; jj += 1u) {
        a += probs[jj] * v[(kb + jj) * kvd + kvh * p.hd + d];
    }
    return a;
}

fn store_out(t: u32, h: u32, qd: u32, d: u32, val: f32) {
    if (d < p.hd) {
        out[t * qd + h * p.hd + d] = val;
    }
}
