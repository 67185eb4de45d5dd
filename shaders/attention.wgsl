// Causal self-attention with grouped-query heads, tiled over queries (flash-attention style):
// one workgroup per (sequence, block of BQ query tokens, head) streams over that sequence's keys in
// chunks of BK with the online-softmax recurrence (per query row: running max m, running sum l),
// so no seq × seq score matrix is ever materialised, and every K / V chunk read from global memory
// serves BQ query rows instead of one (the previous one-row-per-workgroup kernel re-read the whole
// K / V prefix for every query row: O(T²·hd) global traffic per head).
//
// q, out: [tokens, heads·hd]; k, v: [tokens, kv_heads·hd]; tokens = nseq·seqlen, sequences packed
// back to back, each attending only to its own earlier positions. Query head h reads kv head
// h / (heads / kv_heads) (repeat_kv in HF).
//
// Tile sizes come from the host (forward::attention_tiles): BQ·hd ≤ 2048 (the q tile), BK·hd ≤ 1536
// (one K or V chunk), BQ·BK ≤ 256 (the score tile, one score per invocation), BQ ≤ 16. That keeps
// workgroup memory at 15.2 KiB (portable 16 KiB limit) and the output tile BQ·hd ≤ 2048 = 8 values
// per invocation, held in eight named accumulators (no loop-indexed local array, see gemm.wgsl).

struct Params {
    heads: u32,
    kv_heads: u32,
    hd: u32,
    seqlen: u32,
    scale: f32,     // 1/sqrt(hd)
    bq: u32,        // query rows per workgroup
    bk: u32,        // keys per chunk
    nqb: u32,       // query blocks per sequence = ceil(seqlen / bq)
    groups: u32,    // workgroups in total = nseq · nqb · heads
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;
const NEG: f32 = -3.0e38;

var<workgroup> qs: array<f32, 2048>;   // [bq][hd], scaled by 1/sqrt(hd)
var<workgroup> kvs: array<f32, 1536>;  // [bk][hd]: the K chunk, then the V chunk
var<workgroup> ss: array<f32, 256>;    // [bq][bk]: scores, then probabilities
var<workgroup> row_m: array<f32, 16>;
var<workgroup> row_l: array<f32, 16>;
var<workgroup> row_c: array<f32, 16>;  // exp(m_old − m_new) of the current chunk

@compute @workgroup_size(256)
fn attention(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let w = wg.x + wg.y * nwg.x;
    // Uniform across the workgroup, so returning here keeps the barriers below uniform.
    if (w >= p.groups) {
        return;
    }
    let tid = lid3.x;
    let hd = p.hd;
    let bq = p.bq;
    let bk = p.bk;
    let h = w % p.heads;
    let blk = w / p.heads;
    let sq = blk / p.nqb;
    let qb = blk % p.nqb;
    let kvh = h / (p.heads / p.kv_heads);
    let qd = p.heads * hd;
    let kvd = p.kv_heads * hd;
    let s0 = sq * p.seqlen;                         // first token of the sequence
    let p0 = qb * bq;                               // first query position in the sequence
    let nrows = min(bq, p.seqlen - p0);             // valid query rows of this block
    let last = p0 + nrows - 1u;                     // last query position: keys 0..=last needed

    for (var idx = tid; idx < bq * hd; idx += WG) {
        let i = idx / hd;
        let d = idx % hd;
        var x = 0.0;
        if (i < nrows) {
            x = q[(s0 + p0 + i) * qd + h * hd + d] * p.scale;
        }
        qs[idx] = x;
    }
    if (tid < bq) {
        row_m[tid] = NEG;
        row_l[tid] = 0.0;
    }

    // This invocation's outputs: flat tile indices tid + c·WG (c = 0..7) of the [bq][hd] tile.
    var a0 = 0.0;
    var a1 = 0.0;
    var a2 = 0.0;
    var a3 = 0.0;
    var a4 = 0.0;
    var a5 = 0.0;
    var a6 = 0.0;
    var a7 = 0.0;

    for (var kb = 0u; kb <= last; kb += bk) {
        let nk = min(bk, last + 1u - kb);
        workgroupBarrier();  // the previous chunk's V and probabilities are consumed
        for (var idx = tid; idx < bk * hd; idx += WG) {
            let j = idx / hd;
            var x = 0.0;
            if (j < nk) {
                x = k[(s0 + kb + j) * kvd + kvh * hd + idx % hd];
            }
            kvs[idx] = x;
        }
        workgroupBarrier();
        // Scores: one (row, key) pair per invocation; causal and padding masks give NEG.
        if (tid < bq * bk) {
            let i = tid / bk;
            let j = tid % bk;
            var s = NEG;
            if (i < nrows && j < nk && kb + j <= p0 + i) {
                var dot = 0.0;
                for (var d = 0u; d < hd; d += 1u) {
                    dot += qs[i * hd + d] * kvs[j * hd + d];
                }
                s = dot;
            }
            ss[tid] = s;
        }
        workgroupBarrier();
        // Online softmax per row (bq invocations); the others load the V chunk meanwhile.
        if (tid < bq) {
            let m_old = row_m[tid];
            var mx = m_old;
            for (var j = 0u; j < bk; j += 1u) {
                mx = max(mx, ss[tid * bk + j]);
            }
            var sum = 0.0;
            for (var j = 0u; j < bk; j += 1u) {
                let s = ss[tid * bk + j];
                var pj = 0.0;
                if (s > NEG) {
                    pj = exp(s - mx);
                }
                ss[tid * bk + j] = pj;
                sum += pj;
            }
            let corr = exp(m_old - mx);
            row_c[tid] = corr;
            row_l[tid] = row_l[tid] * corr + sum;
            row_m[tid] = mx;
        }
        for (var idx = tid; idx < bk * hd; idx += WG) {
            let j = idx / hd;
            var x = 0.0;
            if (j < nk) {
                x = v[(s0 + kb + j) * kvd + kvh * hd + idx % hd];
            }
            kvs[idx] = x;
        }
        workgroupBarrier();
        a0 = acc_pv(a0, tid);
        a1 = acc_pv(a1, tid + WG);
        a2 = acc_pv(a2, tid + 2u * WG);
        a3 = acc_pv(a3, tid + 3u * WG);
        a4 = acc_pv(a4, tid + 4u * WG);
        a5 = acc_pv(a5, tid + 5u * WG);
        a6 = acc_pv(a6, tid + 6u * WG);
        a7 = acc_pv(a7, tid + 7u * WG);
    }
    workgroupBarrier();
    store_out(s0 + p0, nrows, qd, h, tid, a0);
    store_out(s0 + p0, nrows, qd, h, tid + WG, a1);
    store_out(s0 + p0, nrows, qd, h, tid + 2u * WG, a2);
    store_out(s0 + p0, nrows, qd, h, tid + 3u * WG, a3);
    store_out(s0 + p0, nrows, qd, h, tid + 4u * WG, a4);
    store_out(s0 + p0, nrows, qd, h, tid + 5u * WG, a5);
    store_out(s0 + p0, nrows, qd, h, tid + 6u * WG, a6);
    store_out(s0 + p0, nrows, qd, h, tid + 7u * WG, a7);
}

// Output tile element `idx` = (row i, dim d): a·corr_i + Σ_j P[i, j]·V[j, d] over this chunk
// (masked keys have P = 0 and a zero V row). Elements beyond the tile are left alone.
fn acc_pv(a: f32, idx: u32) -> f32 {
    if (idx >= p.bq * p.hd) {
        return a;
    }
    let i = idx / p.hd;
    let d = idx % p.hd;
    var x = a * row_c[i];
    for (var j = 0u; j < p.bk; j += 1u) {
        x += ss[i * p.bk + j] * kvs[j * p.hd + d];
    }
    return x;
}

fn store_out(t0: u32, nrows: u32, qd: u32, h: u32, idx: u32, a: f32) {
    if (idx >= p.bq * p.hd) {
        return;
    }
    let i = idx / p.hd;
    if (i < nrows) {
        out[(t0 + i) * qd + h * p.hd + idx % p.hd] = a / row_l[i];
    }
}
