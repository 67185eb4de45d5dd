// Causal self-attention with grouped-query heads (flash-attention style, register-blocked).
//
// q, out: [tokens, heads·hd]; k, v: [tokens, kv_heads·hd]; tokens = nseq·seqlen, sequences packed
// back to back, each attending only to its own earlier positions. Query head h reads kv head
// h / (heads / kv_heads) (repeat_kv in HF). Scores are scaled by 1/sqrt(hd); softmax is the
// online recurrence (per query row a running maximum m and sum l), so no seq × seq matrix exists.
//
// Tiling. One workgroup of 256 invocations, seen as a 16 × 16 grid (ty = tid / 16, tx = tid % 16),
// owns BQ = 64 query rows of one (sequence, head) and streams that sequence's keys in chunks of
// BK = 32, stopping at the block's last query position (chunks past it are fully masked and never
// loaded). Per chunk:
//   1. Scores S = Q·Kᵀ (64 × 32): invocation (ty, tx) holds rows 4ty..4ty+3 × keys 2tx, 2tx+1 in two
//      vec4 registers. The head dim is walked in slices of DS ≤ 16 dims staged through workgroup
//      memory, Q transposed as [DS][rows] (one vec4 = 4 rows at one dim) and K as [DS][keys] (one
//      vec2 = the invocation's 2 keys): per dim 1 vec4 + 1 vec2 load feed 8 FMAs, and within a warp
//      the Q load is a broadcast and the K load one contiguous 128-byte line. Q is not resident (a
//      64 × 128 block is 32 KiB): it is re-read per chunk from global memory, where L1/L2 hold it.
//   2. Softmax: each invocation reduces its 2 keys, the 16 invocations of a row band exchange
//      their vec4 of maxima through workgroup memory (one barrier) and each one re-reduces all 16
//      itself, so every invocation of band ty has the same new maxima m and rescale factors
//      exp(m_old − m_new) of its 4 rows in registers: no serial per-row pass and no broadcast
//      barrier. It writes its probabilities to P (stored [keys][rows]); the row sums l stay
//      per-invocation partial sums over its own keys, reduced across the band once at the end.
//   3. O += P·V: invocation (ty, tx) holds the output tile rows 4ty..4ty+3 (the same rows as its
//      scores, hence the rescale is local) × dims 64g + 4tx..4tx+3 for g < NV = ceil(hd / 64)
//      (NV ≤ 4: up to 16 named vec4 accumulators). V is staged in slices of KS keys, row-major
//      [KS][hd rounded up to 4]; per key 1 + NV vec4 loads feed 16·NV FMAs.
// Global loads are software-prefetched into registers one stage ahead (the next Q/K slice, or the
// first V slice of the chunk during the last score slice, or the next chunk's first Q/K slice
// during the last V slice), as gemm.wgsl does, so their latency overlaps the FMAs.
// Barriers per chunk: 2 per score slice (ceil(hd / DS) slices), 2 for the softmax, 2 per V slice
// (32 / KS slices): 26 at hd = 128 for 64·32·128·2 = 524288 FMAs (the previous one-score-per-
// invocation kernel: 4 per 16·12·128·2 = 49152 FMAs).
//
// Why 64 × 32: P is the largest array and must hold the whole chunk for the P·V phase; 64 keys
// would make it 64·68 floats = 17 KiB alone. Fewer than 64 rows would mean fewer output rows per
// staged V value (per key, one V vec4 feeds 4 rows × 4 dims) and more K/V passes per query row.
//
// Tile sizes from the host (forward::attention_tiles, checked for every even hd in 2..=256 by
// tests/forward.rs): DS = ceil(hd / ceil(hd / 16)) ≤ 16, KS = the largest power of two ≤ 32 with
// KS·roundup4(hd) ≤ 1024 (so a V slice is ≤ 256 vec4: one per invocation), NV = ceil(hd / 64).
//
// Workgroup memory (f32 = 4 bytes), within the portable 16 KiB:
//   stage: 272 vec4 = 4352 B   Q slice [DS ≤ 16][17] (4 rows per vec4, row stride 17 vec4 so the
//                              staging stores spread over the banks), or a V slice (≤ 256 vec4,
//                              + 16 vec4 of slack for the idle lanes' reads past it), or the
//                              16 × 17 band reduction;
//   kt:    272 vec2 = 2176 B   K slice [DS ≤ 16][17] (2 keys per vec2);
//   pt:    544 vec4 = 8704 B   P [32 keys][17] (4 rows per vec4);
//   total 15232 B ≤ 16384 B.
//
// Per invocation per chunk: 8 scores (8·hd FMAs), 12 exp2 (8 probabilities, 4 rescale factors),
// and 16·NV·32 FMAs of P·V: 1024 + 1024 at hd = 128 (× 256 invocations = the 524288 above).
// Registers: 4·NV output vec4 (≤ 64 floats), 2 score vec4, m and l, three prefetch registers.
//
// Why named accumulators and unrolled row/group steps: a function-local array indexed by a loop
// counter is not reliably promoted to registers by drivers (see gemm.wgsl); only workgroup arrays
// are indexed dynamically here. The `NV > g` branches test an override constant, so a pipeline
// specialised for its head dim compiles the unused groups away.
//
// Masking: a score (row i, key j) counts iff i < nrows (the block's valid rows) and key position
// ≤ query position; masked scores are −3e38 before the max and their probabilities exactly 0.
// Keys past the block's last position and dims ≥ hd are loaded as 0, so staged padding adds
// nothing (and never NaN·0). A padding row keeps m = −3e38 and l = 0 and is never stored.

struct Params {
    heads: u32,
    kv_heads: u32,
    hd: u32,
    seqlen: u32,
    scale: f32,     // 1/sqrt(hd)
    nqb: u32,       // query blocks per sequence = ceil(seqlen / BQ)
    groups: u32,    // workgroups in total = nseq · nqb · heads
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// Head-dim slice of the score phase (1..=16), keys per V slice (1..=32, a power of two), output
// dim groups of 64 per invocation (1..=4): set by the host for the head dim.
override DS: u32 = 16u;
override KS: u32 = 8u;
override NV: u32 = 2u;

const BQ: u32 = 64u;
const BK: u32 = 32u;
const RS: u32 = 17u;  // row stride (in vec4 / vec2) of stage, kt, pt: 16 used + 1 against bank conflicts
const NEG: f32 = -3.0e38;
const LOG2E: f32 = 1.4426950408889634;

var<workgroup> stage: array<vec4<f32>, 272>;
var<workgroup> kt: array<vec2<f32>, 272>;
var<workgroup> pt: array<vec4<f32>, 544>;

// q at rows r..r+3 of the block (from `base` = the block's first row, this head's dim 0) and dim
// `d`; 0 for padding rows and dims ≥ hd.
fn load_q4(base: u32, qd: u32, nrows: u32, r: u32, d: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    if (d < p.hd) {
        let i = base + r * qd + d;
        if (r < nrows) {
            x.x = q[i];
        }
        if (r + 1u < nrows) {
            x.y = q[i + qd];
        }
        if (r + 2u < nrows) {
            x.z = q[i + 2u * qd];
        }
        if (r + 3u < nrows) {
            x.w = q[i + 3u * qd];
        }
    }
    return x;
}

// k at key positions j, j+1 of the sequence (`base` = its first token, this kv head's dim 0) and
// dim `d`; 0 past position `last` and for dims ≥ hd.
fn load_k2(base: u32, kvd: u32, last: u32, j: u32, d: u32) -> vec2<f32> {
    var x = vec2<f32>(0.0);
    if (d < p.hd) {
        let i = base + j * kvd + d;
        if (j <= last) {
            x.x = k[i];
        }
        if (j + 1u <= last) {
            x.y = k[i + kvd];
        }
    }
    return x;
}

// v at key position j, dims d..d+3; 0 past position `last` and for dims ≥ hd.
fn load_v4(base: u32, kvd: u32, last: u32, j: u32, d: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    if (j <= last) {
        let i = base + j * kvd + d;
        // hd is even, so the first two dims are valid together, and so are the last two.
        if (d < p.hd) {
            x.x = v[i];
            x.y = v[i + 1u];
        }
        if (d + 2u < p.hd) {
            x.z = v[i + 2u];
            x.w = v[i + 3u];
        }
    }
    return x;
}

// out row `r` of the block, dims d..d+3 (those < hd), unless r is a padding row.
fn store4(base: u32, qd: u32, nrows: u32, r: u32, d: u32, x: vec4<f32>) {
    if (r >= nrows) {
        return;
    }
    let i = base + r * qd + d;
    if (d < p.hd) {
        out[i] = x.x;
        out[i + 1u] = x.y;
    }
    if (d + 2u < p.hd) {
        out[i + 2u] = x.z;
        out[i + 3u] = x.w;
    }
}

@compute @workgroup_size(256)
fn attention(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let w = wg.x + wg.y * nwg.x;
    // Uniform across the workgroup, so returning here keeps the barriers below uniform.
    if (w >= p.groups) {
        return;
    }
    let ty = tid / 16u;
    let tx = tid % 16u;
    let hd = p.hd;
    let h = w % p.heads;
    let blk = w / p.heads;
    let sq = blk / p.nqb;
    // Last query block first: it streams the most keys, so starting the long workgroups early
    // shortens the tail of the dispatch.
    let qb = p.nqb - 1u - blk % p.nqb;
    let kvh = h / (p.heads / p.kv_heads);
    let qd = p.heads * hd;
    let kvd = p.kv_heads * hd;
    let p0 = qb * BQ;                                // first query position of the block
    let nrows = min(BQ, p.seqlen - p0);              // valid query rows of the block
    let last = p0 + nrows - 1u;                      // last query position: keys 0..=last needed
    let qbase = (sq * p.seqlen + p0) * qd + h * hd;  // q / out: the block's row 0, dim 0
    let kvbase = sq * p.seqlen * kvd + kvh * hd;     // k / v: the sequence's position 0, dim 0
    let c = p.scale * LOG2E;                         // scores in log2 units: exp(x) = exp2(x·log2 e)
    let hdp4 = (hd + 3u) / 4u;                       // vec4 per staged V row

    // Staging roles. Q/K slice: dim sd of row band / key pair sg (consecutive invocations walk
    // consecutive dims, so each global row segment is read contiguously).
    let sd = tid % DS;
    let sg = tid / DS;
    let qk_stager = tid < 16u * DS;
    // V slice: vec4 number tid of the row-major [KS][hdp4] slice.
    let vkey = tid / hdp4;
    let vd = 4u * (tid % hdp4);
    let v_stager = tid < KS * hdp4;

    let rows = vec4<u32>(4u * ty) + vec4<u32>(0u, 1u, 2u, 3u);
    let row_ok = rows < vec4<u32>(nrows);
    let qpos = vec4<u32>(p0) + rows;

    var m = vec4<f32>(NEG);   // running maxima of rows 4ty..4ty+3 (log2 units)
    var l = vec4<f32>(0.0);   // partial sums of this invocation's keys, same scale as the outputs
    var o00 = vec4<f32>(0.0); // o<row><group>: rows 4ty + row, dims 64·group + 4tx..+3
    var o10 = vec4<f32>(0.0);
    var o20 = vec4<f32>(0.0);
    var o30 = vec4<f32>(0.0);
    var o01 = vec4<f32>(0.0);
    var o11 = vec4<f32>(0.0);
    var o21 = vec4<f32>(0.0);
    var o31 = vec4<f32>(0.0);
    var o02 = vec4<f32>(0.0);
    var o12 = vec4<f32>(0.0);
    var o22 = vec4<f32>(0.0);
    var o32 = vec4<f32>(0.0);
    var o03 = vec4<f32>(0.0);
    var o13 = vec4<f32>(0.0);
    var o23 = vec4<f32>(0.0);
    var o33 = vec4<f32>(0.0);

    // Prefetch of chunk 0's first Q/K slice.
    var qn = vec4<f32>(0.0);
    var kn = vec2<f32>(0.0);
    var vn = vec4<f32>(0.0);
    if (qk_stager) {
        qn = load_q4(qbase, qd, nrows, 4u * sg, sd);
        kn = load_k2(kvbase, kvd, last, 2u * sg, sd);
    }

    for (var kb = 0u; kb <= last; kb += BK) {
        // 1. Scores of rows 4ty..+3 against keys kb + 2tx (sa) and kb + 2tx + 1 (sb).
        var sa = vec4<f32>(0.0);
        var sb = vec4<f32>(0.0);
        for (var ds = 0u; ds < hd; ds += DS) {
            if (qk_stager) {
                stage[sd * RS + sg] = qn;
                kt[sd * RS + sg] = kn;
            }
            workgroupBarrier();
            if (ds + DS < hd) {
                if (qk_stager) {
                    qn = load_q4(qbase, qd, nrows, 4u * sg, ds + DS + sd);
                    kn = load_k2(kvbase, kvd, last, kb + 2u * sg, ds + DS + sd);
                }
            } else if (v_stager) {
                vn = load_v4(kvbase, kvd, last, kb + vkey, vd);
            }
            for (var d = 0u; d < DS; d += 1u) {
                let a = stage[d * RS + ty];
                let b = kt[d * RS + tx];
                sa = fma(a, vec4<f32>(b.x), sa);
                sb = fma(a, vec4<f32>(b.y), sb);
            }
            workgroupBarrier();
        }

        // 2. Online softmax. Causal + padding mask, then the band's maxima via `stage`.
        let ka = kb + 2u * tx;
        let ok_a = row_ok & (vec4<u32>(ka) <= qpos);
        let ok_b = row_ok & (vec4<u32>(ka + 1u) <= qpos);
        let ta = select(vec4<f32>(NEG), sa * c, ok_a);
        let tb = select(vec4<f32>(NEG), sb * c, ok_b);
        stage[ty * RS + tx] = max(ta, tb);
        workgroupBarrier();
        var mx = stage[ty * RS];
        for (var i = 1u; i < 16u; i += 1u) {
            mx = max(mx, stage[ty * RS + i]);
        }
        let m_new = max(m, mx);
        // 1 while a row has seen no key (NEG − NEG), 0 on its first key (exp2(−3e38 − m)).
        let corr = exp2(m - m_new);
        m = m_new;
        let pa = select(vec4<f32>(0.0), exp2(ta - m_new), ok_a);
        let pb = select(vec4<f32>(0.0), exp2(tb - m_new), ok_b);
        l = l * corr + pa + pb;
        pt[2u * tx * RS + ty] = pa;
        pt[(2u * tx + 1u) * RS + ty] = pb;
        o00 *= corr.x;
        o10 *= corr.y;
        o20 *= corr.z;
        o30 *= corr.w;
        if (NV > 1u) {
            o01 *= corr.x;
            o11 *= corr.y;
            o21 *= corr.z;
            o31 *= corr.w;
        }
        if (NV > 2u) {
            o02 *= corr.x;
            o12 *= corr.y;
            o22 *= corr.z;
            o32 *= corr.w;
        }
        if (NV > 3u) {
            o03 *= corr.x;
            o13 *= corr.y;
            o23 *= corr.z;
            o33 *= corr.w;
        }
        // P complete; every invocation is done reading the maxima before V overwrites `stage`.
        workgroupBarrier();

        // 3. O += P·V over the chunk's valid keys, KS at a time.
        let nk = min(BK, last + 1u - kb);
        for (var kk = 0u; kk < nk; kk += KS) {
            if (v_stager) {
                stage[tid] = vn;
            }
            workgroupBarrier();
            if (kk + KS < nk) {
                if (v_stager) {
                    vn = load_v4(kvbase, kvd, last, kb + kk + KS + vkey, vd);
                }
            } else if (kb + BK <= last && qk_stager) {
                qn = load_q4(qbase, qd, nrows, 4u * sg, sd);
                kn = load_k2(kvbase, kvd, last, kb + BK + 2u * sg, sd);
            }
            // Keys past nk have P = 0 and a zero V row. Lanes whose dims are ≥ hd read padding
            // (or the next row) and are never stored; indices stay < KS·hdp4 + 16 ≤ 272.
            for (var j = 0u; j < KS; j += 1u) {
                let pr = pt[(kk + j) * RS + ty];
                let vi = j * hdp4 + tx;
                let v0 = stage[vi];
                o00 = fma(vec4<f32>(pr.x), v0, o00);
                o10 = fma(vec4<f32>(pr.y), v0, o10);
                o20 = fma(vec4<f32>(pr.z), v0, o20);
                o30 = fma(vec4<f32>(pr.w), v0, o30);
                if (NV > 1u) {
                    let v1 = stage[vi + 16u];
                    o01 = fma(vec4<f32>(pr.x), v1, o01);
                    o11 = fma(vec4<f32>(pr.y), v1, o11);
                    o21 = fma(vec4<f32>(pr.z), v1, o21);
                    o31 = fma(vec4<f32>(pr.w), v1, o31);
                }
                if (NV > 2u) {
                    let v2 = stage[vi + 32u];
                    o02 = fma(vec4<f32>(pr.x), v2, o02);
                    o12 = fma(vec4<f32>(pr.y), v2, o12);
                    o22 = fma(vec4<f32>(pr.z), v2, o22);
                    o32 = fma(vec4<f32>(pr.w), v2, o32);
                }
                if (NV > 3u) {
                    let v3 = stage[vi + 48u];
                    o03 = fma(vec4<f32>(pr.x), v3, o03);
                    o13 = fma(vec4<f32>(pr.y), v3, o13);
                    o23 = fma(vec4<f32>(pr.z), v3, o23);
                    o33 = fma(vec4<f32>(pr.w), v3, o33);
                }
            }
            workgroupBarrier();
        }
    }

    // Row sums: the band's 16 partial sums (the last V slice's barrier freed `stage`).
    stage[ty * RS + tx] = l;
    workgroupBarrier();
    var ls = stage[ty * RS];
    for (var i = 1u; i < 16u; i += 1u) {
        ls += stage[ty * RS + i];
    }
    // Padding rows have ls = 0 (inf here) and are not stored.
    let inv = 1.0 / ls;
    let r = 4u * ty;
    let d0 = 4u * tx;
    store4(qbase, qd, nrows, r, d0, o00 * inv.x);
    store4(qbase, qd, nrows, r + 1u, d0, o10 * inv.y);
    store4(qbase, qd, nrows, r + 2u, d0, o20 * inv.z);
    store4(qbase, qd, nrows, r + 3u, d0, o30 * inv.w);
    if (NV > 1u) {
        store4(qbase, qd, nrows, r, d0 + 64u, o01 * inv.x);
        store4(qbase, qd, nrows, r + 1u, d0 + 64u, o11 * inv.y);
        store4(qbase, qd, nrows, r + 2u, d0 + 64u, o21 * inv.z);
        store4(qbase, qd, nrows, r + 3u, d0 + 64u, o31 * inv.w);
    }
    if (NV > 2u) {
        store4(qbase, qd, nrows, r, d0 + 128u, o02 * inv.x);
        store4(qbase, qd, nrows, r + 1u, d0 + 128u, o12 * inv.y);
        store4(qbase, qd, nrows, r + 2u, d0 + 128u, o22 * inv.z);
        store4(qbase, qd, nrows, r + 3u, d0 + 128u, o32 * inv.w);
    }
    if (NV > 3u) {
        store4(qbase, qd, nrows, r, d0 + 192u, o03 * inv.x);
        store4(qbase, qd, nrows, r + 1u, d0 + 192u, o13 * inv.y);
        store4(qbase, qd, nrows, r + 2u, d0 + 192u, o23 * inv.z);
        store4(qbase, qd, nrows, r + 3u, d0 + 192u, o33 * inv.w);
    }
}
