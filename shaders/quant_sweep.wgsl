// One block of the GPTQ / GPTAQ sweep (algorithm.md §1.2 step 8, §2.2, §6.3).
//
// Launched once per block of columns [i1, i1 + cnt) (processing order). Rows are independent, so a
// workgroup owns a chunk of `rchunk` rows and keeps their block W1 (rchunk × cnt) in workgroup
// memory. Columns are processed one after another:
//   1. group start (dynamic groups, k % gs == 0): per-row min/max over W[:, k .. k+gs] read from the
//      GLOBAL W, which holds only the cross-block updates, never this block's in-block updates: the
//      reference's stale-W quirk, reproduced on purpose (algorithm.md §1.2 "Quirks"). Params are
//      written to the table `ptab` ([G][rows][2] = scale, zero) and kept in registers.
//      Static groups / per-row params (gs = −1) come precomputed in `ptab`, looked up through the
//      processing-column → group map in `colmap[n + k]`.
//   2. invocation t < rchunk quantizes row t: code = clamp(round(w/s) + z, 0, maxq) (WGSL round is
//      half-to-even like torch.round), q = s·(code − z), e = (w − q)/U_kk, loss += (w − q)²/U_kk²/2.
//      Codes (≤ maxq ≤ 255) are stored as bytes, 4 per u32 word, little-endian by column: the code
//      of processing column k is bits 8·(k % 4) .. 8·(k % 4) + 7 of word `row·nw + k/4`, with
//      nw = ceil(n/4) words per row (rows start on a word boundary). The row's invocation builds
//      the word in a register and stores it when complete (k % 4 == 3) or at the block's last
//      column; a block starting inside a word first reloads the bytes the previous block's
//      dispatch stored there (dispatches in one queue are ordered; one invocation owns a row, so
//      no atomics).
//   3. all invocations update W1[:, j] for j ≥ i (invocation t the columns j ≡ t mod WG):
//        GPTQ:  W1[:, j] −= e·U[k, i1+j]
//        GPTAQ: W1[:, j] −= e·U[k, i1+j] − w·P[k, i1+j]   (w = pre-quantization value, §2.2)
// At the end the errors e (ebuf[:, eoff..eoff+cnt]) and, for GPTAQ, the NEGATED final W1
// (ebuf[:, woff..woff+cnt], ≈ the quantized values, §2.2 "Subtlety") are left for the host's
// cross-block update (quant/gpu.rs `PForm`): with the whole P, W[:, i2:] −= [e | −W1]·[U; P][block
// rows, i2:] is one GEMM with K doubled (−e·U + W1·P, the GPTQ and GPTAQ terms together); in the
// deferred form −W1 feeds the pending matrix G instead, and only P's diagonal blocks are read here.
//
// Latency: a step's work is small (one quantization per row, rchunk multiply-adds per column),
// so its time is the two barriers and the global loads' latency. Each invocation therefore fetches
// the next step's pivot U[k+1, k+1] and its first update column's U (and P) entries while the
// current step runs: the 8B layer's sweeps 193 → 140 ms of kernel time on an H100 (BENCHMARKS.md
// session 29). This changes no arithmetic, and neither does rchunk (quant/gpu.rs `sweep_rows`):
// every element sees the same operations in the same order.
//
// Scales are rounded to f16 when computed (quant/mod.rs deviation), with an exact
// round-to-nearest-even f32 → f16 emulation (no f16 shader feature needed).

struct Params {
    rows: u32,
    n: u32,
    i1: u32,
    cnt: u32,
    rchunk: u32,
    gs: u32,
    dynamic_groups: u32,
    maxq: u32,
    sym: u32,
    mse: u32,
    gptaq: u32,
    lde: u32,
    woff: u32,
    // First global row of the bound panel of U (gpu/matrix.rs; the block's rows i1 .. i1 + cnt
    // lie in that one panel because panels are multiples of the block size).
    urow0: u32,
    // GPTAQ's in-block P[k, i1 + j] is pm[(k − prow0)·ldp + pcol0 + j]: the whole P's panel
    // (prow0 = urow0, ldp = n, pcol0 = i1), or the stack of P's diagonal blocks that the deferred
    // form keeps (prow0 = 0, ldp = block size, pcol0 = 0; quant/gpu.rs `PForm`).
    prow0: u32,
    ldp: u32,
    pcol0: u32,
    // The block's errors go to ebuf[:, eoff .. eoff + cnt], its −W1 (GPTAQ) to
    // ebuf[:, woff .. woff + cnt]: the slots of the blocks awaiting one cross-block update
    // (quant/gpu.rs `lazy_blocks`).
    eoff: u32,
    // sweep_lanes' fused deferred-P steps (quant/gpu.rs `Sweep::fused`; 0 elsewhere): bit 0 the
    // block's share of the pending matrix before the sweep, bit 1 the block's pending errors after.
    pend: u32,
    // Where the block's pure errors go for the column loss (= eoff unless fused).
    loff: u32,
    // GPTAQ's A[k, i1 + j] (the deferred form's diagonal blocks) is pm[aoff + (k − prow0)·ldp +
    // pcol0 + j], stacked after P's (fused only).
    aoff: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// read_write: sweep_lanes' fused form stores the block's W with its pending share (bit 0 of
// `pend`) where the group parameters read it; sweep_block only reads it.
@group(0) @binding(1) var<storage, read_write> w: array<f32>;
@group(0) @binding(2) var<storage, read> u: array<f32>;
@group(0) @binding(3) var<storage, read> pm: array<f32>;
@group(0) @binding(4) var<storage, read> colmap: array<u32>;
@group(0) @binding(5) var<storage, read_write> ptab: array<f32>;
@group(0) @binding(6) var<storage, read_write> codes: array<u32>;
@group(0) @binding(7) var<storage, read_write> ebuf: array<f32>;
@group(0) @binding(8) var<storage, read_write> loss: array<f32>;
// GPTAQ's pending matrix G (rows × n), read by sweep_lanes' fused form only (another read-only
// buffer is bound in its place otherwise). sweep_block does not use it: its eight storage bindings
// are WebGPU's portable minimum, and quant/gpu.rs picks sweep_lanes only where the adapter allows
// nine.
@group(0) @binding(9) var<storage, read> g: array<f32>;

const WG: u32 = 128u;
// Workgroup memory: 3584 + 2·64 + 2·128 floats = 15.5 KiB (portable 16 KiB limit).
const W1LEN: u32 = 3584u;
const MAXR: u32 = 64u;

var<workgroup> w1: array<f32, 3584>;
var<workgroup> es: array<f32, 64>;
var<workgroup> ws: array<f32, 64>;
var<workgroup> smin: array<f32, 128>;
var<workgroup> smax: array<f32, 128>;

const F16_MIN_SUB: f32 = 5.9604644775390625e-08; // 2^-24
const F16_MIN_NORMAL: f32 = 6.103515625e-05; // 2^-14
const F16_MAX: f32 = 65504.0;

// f32 → nearest f16 value (ties to even), clamped into [2^-24, 65504] like
// quantizer::round_scale_to_f16 (never 0, never infinite).
fn round_f16(x: f32) -> f32 {
    if (!(x > 0.0)) {
        return F16_MIN_SUB;
    }
    if (x >= F16_MAX) {
        return F16_MAX;
    }
    if (x < F16_MIN_NORMAL) {
        // Subnormal f16: multiples of 2^-24; the scaling by 2^24 is exact.
        return max(round(x * 16777216.0) * F16_MIN_SUB, F16_MIN_SUB);
    }
    // Normal: keep 10 of the 23 mantissa bits, round to nearest even on the 13 dropped bits.
    let b = bitcast<u32>(x);
    let lsb = (b >> 13u) & 1u;
    return bitcast<f32>((b + 0xfffu + lsb) & 0xffffe000u);
}

// quantizer.rs `params_from_range`: (scale, zero) from a range containing 0.
fn params_from_range(xmin: f32, xmax: f32) -> vec2<f32> {
    let maxq = f32(p.maxq);
    let s = round_f16((xmax - xmin) / maxq);
    var z = f32((p.maxq + 1u) / 2u);
    if (p.sym == 0u) {
        z = clamp(round(-xmin / s), 0.0, maxq);
    }
    return vec2<f32>(s, z);
}

fn fake_quant(v: f32, prm: vec2<f32>) -> f32 {
    let c = clamp(round(v / prm.x) + prm.y, 0.0, f32(p.maxq));
    return prm.x * (c - prm.y);
}

// quantizer.rs `find_row_params` for row r, columns [c0, c1) of the global W, given the row's
// min(rowmin, 0) and max(rowmax, 0).
fn find_params(mn: f32, mx: f32, r: u32, c0: u32, c1: u32) -> vec2<f32> {
    var xmin = mn;
    var xmax = mx;
    if (p.sym != 0u) {
        xmax = max(abs(xmin), xmax);
        if (xmin < 0.0) {
            xmin = -xmax;
        }
    }
    if (xmin == 0.0 && xmax == 0.0) {
        xmin = -1.0;
        xmax = 1.0;
    }
    var best = params_from_range(xmin, xmax);
    if (p.mse != 0u) {
        // Clipping grid (norm 2.4, grid 100, maxshrink 0.8): 80 candidates, first minimum wins.
        var best_err = 0.0;
        for (var i = 0u; i < 80u; i++) {
            let pp = 1.0 - f32(i) / 100.0;
            let cand = params_from_range(pp * xmin, pp * xmax);
            var err = 0.0;
            for (var c = c0; c < c1; c++) {
                let v = w[r * p.n + c];
                let dq = abs(fake_quant(v, cand) - v);
                if (dq > 0.0) {
                    err += pow(dq, 2.4);
                }
            }
            if (i == 0u || err < best_err) {
                best_err = err;
                best = cand;
            }
        }
    }
    return best;
}

// The first block column j ≥ i with j ≡ t (mod WG): invocation t's first update column at step i.
fn first_col(t: u32, i: u32) -> u32 {
    if (t >= i) {
        return t;
    }
    return t + ((i - t + WG - 1u) / WG) * WG;
}

@compute @workgroup_size(128)
fn sweep_block(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = lid.x;
    let rc = p.rchunk;
    let n = p.n;
    let i1 = p.i1;
    let cnt = p.cnt;
    let row0 = (wg.x + wg.y * nwg.x) * rc;

    for (var idx = t; idx < rc * cnt; idx += WG) {
        let rr = idx / cnt;
        let j = idx % cnt;
        let r = row0 + rr;
        var v = 0.0;
        if (r < p.rows) {
            v = w[r * n + i1 + j];
        }
        w1[rr * cnt + j] = v;
    }

    let my_row = row0 + t;
    let row_live = t < rc && my_row < p.rows;
    var prm = vec2<f32>(1.0, 0.0);
    var lacc = 0.0;
    // The row's codes word being filled: at a block start inside a word, the bytes of the columns
    // before i1 stored by the previous block (only those: the bytes from i1 on are this block's).
    let nw = (n + 3u) / 4u;
    var cword = 0u;
    if (row_live && (i1 % 4u) != 0u) {
        cword = codes[my_row * nw + i1 / 4u] & ((1u << (8u * (i1 % 4u))) - 1u);
    }
    // A dynamic group that started in an earlier block: its params are already in the table.
    if (row_live && p.dynamic_groups != 0u && (i1 % p.gs) != 0u) {
        let g = i1 / p.gs;
        prm = vec2<f32>(ptab[(g * p.rows + my_row) * 2u], ptab[(g * p.rows + my_row) * 2u + 1u]);
    }
    // The next step's U (and P) entries, fetched a step ahead (see "Latency" at the top): this
    // invocation's first update column of step 0 and the first pivot U[i1, i1].
    var u_nx = 0.0;
    var p_nx = 0.0;
    var d_nx = u[(i1 - p.urow0) * n + i1];
    if (t < cnt) {
        u_nx = u[(i1 - p.urow0) * n + i1 + t];
        if (p.gptaq != 0u) {
            p_nx = pm[(i1 - p.prow0) * p.ldp + p.pcol0 + t];
        }
    }
    workgroupBarrier();

    for (var i = 0u; i < cnt; i++) {
        let k = i1 + i;
        let d = d_nx;
        let u_cur = u_nx;
        let p_cur = p_nx;
        if (i + 1u < cnt) {
            let kn = k + 1u;
            d_nx = u[(kn - p.urow0) * n + kn];
            let jn = first_col(t, i + 1u);
            if (jn < cnt) {
                u_nx = u[(kn - p.urow0) * n + i1 + jn];
                if (p.gptaq != 0u) {
                    p_nx = pm[(kn - p.prow0) * p.ldp + p.pcol0 + jn];
                }
            }
        }
        if (p.dynamic_groups != 0u && (k % p.gs) == 0u) {
            // Per-row min/max over the group's columns: WG / rc invocations per row, then the
            // row's own invocation t (< rc) combines the partials.
            let tpr = WG / rc;
            let rr = t % rc;
            let sub = t / rc;
            let r = row0 + rr;
            let c1 = min(k + p.gs, n);
            var mn = 0.0;
            var mx = 0.0;
            if (sub < tpr && r < p.rows) {
                for (var c = k + sub; c < c1; c += tpr) {
                    let v = w[r * n + c];
                    mn = min(mn, v);
                    mx = max(mx, v);
                }
            }
            smin[t] = mn;
            smax[t] = mx;
            workgroupBarrier();
            if (row_live) {
                var a = 0.0;
                var b = 0.0;
                for (var s = 0u; s < tpr; s++) {
                    a = min(a, smin[s * rc + t]);
                    b = max(b, smax[s * rc + t]);
                }
                prm = find_params(a, b, my_row, k, c1);
                let g = k / p.gs;
                ptab[(g * p.rows + my_row) * 2u] = prm.x;
                ptab[(g * p.rows + my_row) * 2u + 1u] = prm.y;
            }
            workgroupBarrier();
        }
        if (row_live) {
            if (p.dynamic_groups == 0u) {
                let g = colmap[n + k];
                prm = vec2<f32>(ptab[(g * p.rows + my_row) * 2u], ptab[(g * p.rows + my_row) * 2u + 1u]);
            }
            let wv = w1[t * cnt + i];
            let code = clamp(round(wv / prm.x) + prm.y, 0.0, f32(p.maxq));
            let q = prm.x * (code - prm.y);
            let diff = wv - q;
            lacc += diff * diff / (d * d) / 2.0;
            let e = diff / d;
            cword |= u32(code) << (8u * (k % 4u));
            // Word complete, or the block's last column (which is also where column n − 1 lies).
            if ((k % 4u) == 3u || i + 1u == cnt) {
                codes[my_row * nw + k / 4u] = cword;
                cword = 0u;
            }
            ebuf[my_row * p.lde + p.eoff + i] = e;
            es[t] = e;
            ws[t] = wv;
        }
        workgroupBarrier();
        // Invocation t updates the block columns j ≥ i with j ≡ t (mod WG): the same columns at
        // every step, so that their first one's U and P entries could be fetched a step ahead.
        let jf = first_col(t, i);
        for (var j = jf; j < cnt; j += WG) {
            var uij = u_cur;
            if (j != jf) {
                uij = u[(k - p.urow0) * n + i1 + j];
            }
            // Explicit fma in both branches, GPTQ's term first: compilers contract `a -= b·c`
            // on their own, and NVIDIA's Vulkan driver did so differently for the GPTQ and the
            // GPTAQ expression, so GPTAQ with α = 0 (P = 0) drifted from GPTQ in the last bit of
            // w (tests/quant_gpu.rs gptaq_alpha_zero_equals_gptq_on_gpu, H200). With fma(ws, 0,
            // x) = x the two branches are now the same arithmetic when P = 0.
            if (p.gptaq != 0u) {
                var pij = p_cur;
                if (j != jf) {
                    pij = pm[(k - p.prow0) * p.ldp + p.pcol0 + j];
                }
                for (var rr = 0u; rr < rc; rr++) {
                    w1[rr * cnt + j] = fma(ws[rr], pij, fma(-es[rr], uij, w1[rr * cnt + j]));
                }
            } else {
                for (var rr = 0u; rr < rc; rr++) {
                    w1[rr * cnt + j] = fma(-es[rr], uij, w1[rr * cnt + j]);
                }
            }
        }
        workgroupBarrier();
    }

    if (row_live) {
        loss[my_row] += lacc;
    }
    if (p.gptaq != 0u) {
        for (var idx = t; idx < rc * cnt; idx += WG) {
            let rr = idx / cnt;
            let j = idx % cnt;
            let r = row0 + rr;
            if (r < p.rows) {
                ebuf[r * p.lde + p.woff + j] = -w1[rr * cnt + j];
            }
        }
    }
}

// ---- sweep_lanes: the same block, without a barrier per column half (quant/gpu.rs picks it for
// blocks of at most 128 columns without the MSE grid).
//
// sweep_block's steps are two workgroup barriers around a little work each (one quantization per
// row, rchunk multiply-adds per invocation), and with 28 rows per workgroup a 4096-row module has
// 147 workgroups, about one per multiprocessor of an H100: nothing hides the barriers. Here a
// workgroup is 32 invocations (one subgroup on NVIDIA, where its barrier costs next to nothing)
// for LR = 4 rows, and keeps the rows' block in registers instead of workgroup memory: lane l owns
// block columns l, l + 32, l + 64 and l + 96, component c of the vec4 `w<r>` holding row r's
// column 32·c + l. At step i the lane owning column i (lane i % 32, component i / 32) puts the
// rows' values of that column in workgroup memory, one barrier, and every lane quantizes them
// (the same arithmetic as sweep_block, repeated per lane) and updates its own columns j ≥ i with
// one vec4 fma per row. The broadcast slot alternates with the step's parity, so one barrier per
// step suffices: a lane writes slot i % 2 again only at step i + 2, after the barrier of step i + 1,
// which every lane reaches only after reading step i's values. A module of r rows has r / 4
// workgroups (1,024 at 4096 rows).
//
// Measured on the H100 (BENCHMARKS.md session 29): 115–128 µs per 4096-row block against
// sweep_block's 195 µs. Every lane repeats the four rows' quantizations, which SIMT lanes do not
// share; a version where lane r quantized row r and a second barrier per step passed the errors
// on was 5–7 % slower (124–137 µs): the step is bound by its chain of latencies (barrier, the
// divisions, the update feeding the next column), not by instructions.
//
// Every value sees exactly sweep_block's operations in the same order (the quantization, the
// explicit fma's of the update, the loss sum per row, min/max for the groups, which are exact in
// any order), so the results are the same bit for bit (tests: quant/gpu.rs
// `sweep_kernels_agree_bit_for_bit`). The errors and −W1 are stored once at the end, each lane its
// own columns (coalesced across lanes), instead of per step.
//
// GPTAQ's deferred P (`pend`, quant/gpu.rs `Sweep::fused`) adds a step before the loop and one
// after it, the block's own share of the pending matrix G: both are triangular bs × bs products
// per row, which the unfused form runs as two small GEMMs and `err_minus_pending` per block (three
// launches, 26 µs each for the GEMMs at 4096 rows on an H100, BENCHMARKS.md session 33). Here the
// rows' G (before) or final W1 (after) are broadcast through workgroup memory and each lane sums
// its four columns over the block's rows in order, with the GEMMs' arithmetic (ascending k from
// zero, explicit fma, added once), so the results are the unfused form's bit for bit (quant/gpu.rs
// `fused_pending_solves_like_gemms`). This takes a ninth storage binding (G), beyond WebGPU's
// portable eight, which sweep_block keeps to. The rows of U (before) or A (after) are loaded
// eight at a time (`block_product`). Measured on an H100 (BENCHMARKS.md sessions 35–36): one row
// per step took 91 µs per 4096-row block against the 5 µs their multiply-adds need, more than the
// launches they replace; staging 16 rows through 10 KiB of workgroup memory was slower still and
// slowed the unfused sweep too (`brow`). Eight rows' loads in flight: 151 µs per block against the
// unfused 126 µs plus 52 µs of launches (H200, session 37), so this form is the default
// (GPTAQ_FUSED_PENDING=0 turns it off).

const LANES: u32 = 32u;
const LR: u32 = 4u;

// The step's column, one value per row, in slot (step % 2)·LR + row.
var<workgroup> bcol: array<f32, 8>;
// Per-row partial min / max of a group's columns: [row·LANES + lane], max after LR·LANES.
var<workgroup> bred: array<f32, 256>;
// The fused form's (`pend`) broadcast of the workgroup's four rows' G (before the sweep) or final
// W1 (after): [row·128 + block column]. Kept at 2 KiB: with 10 KiB here (session 35's staged
// form) the default, unfused sweep also slowed from 125 to 182 µs per 4096-row block on an H100
// (BENCHMARKS.md session 36). The workgroup memory an entry point declares is reserved for every
// workgroup whether or not a launch uses it; most likely it took its share from the L1 cache
// that the sweep's U and P rows go through.
var<workgroup> brow: array<f32, 512>;

// Component s of v (s uniform, 0..3), without indexing a vector variable dynamically.
fn comp4(v: vec4<f32>, s: u32) -> f32 {
    return select(select(v.x, v.y, s == 1u), select(v.z, v.w, s == 3u), s >= 2u);
}

// The components s (of 4) of v set to x where `on`.
fn with4(v: vec4<f32>, s: u32, x: f32, on: bool) -> vec4<f32> {
    let m = vec4<bool>(on && s == 0u, on && s == 1u, on && s == 2u, on && s == 3u);
    return select(v, vec4<f32>(x), m);
}

// Block column j of the given row of W (0 outside the rows or the block).
fn w_at(row: u32, j: u32) -> f32 {
    if (row < p.rows && j < p.cnt) {
        return w[row * p.n + p.i1 + j];
    }
    return 0.0;
}

// U[k, i1 + j] and P[k, i1 + j] for this lane's four columns j = cols (0 outside the block).
fn u_row(k: u32, cols: vec4<u32>) -> vec4<f32> {
    let base = (k - p.urow0) * p.n + p.i1;
    var r = vec4<f32>(0.0);
    if (cols.x < p.cnt) { r.x = u[base + cols.x]; }
    if (cols.y < p.cnt) { r.y = u[base + cols.y]; }
    if (cols.z < p.cnt) { r.z = u[base + cols.z]; }
    if (cols.w < p.cnt) { r.w = u[base + cols.w]; }
    return r;
}
fn p_row(k: u32, cols: vec4<u32>) -> vec4<f32> {
    if (p.gptaq == 0u) {
        return vec4<f32>(0.0);
    }
    return pm_at(k, cols, 0u);
}

// A[k, i1 + j] for this lane's four columns (the fused form's diagonal blocks of A, `aoff`).
fn a_row(k: u32, cols: vec4<u32>) -> vec4<f32> {
    return pm_at(k, cols, p.aoff);
}

// Row k of the matrix stored in `pm` from element `off` (P's, or A's diagonal blocks) at this
// lane's four columns (0 outside the block).
fn pm_at(k: u32, cols: vec4<u32>, off: u32) -> vec4<f32> {
    let base = off + (k - p.prow0) * p.ldp + p.pcol0;
    var r = vec4<f32>(0.0);
    if (cols.x < p.cnt) { r.x = pm[base + cols.x]; }
    if (cols.y < p.cnt) { r.y = pm[base + cols.y]; }
    if (cols.z < p.cnt) { r.z = pm[base + cols.z]; }
    if (cols.w < p.cnt) { r.w = pm[base + cols.w]; }
    return r;
}

// G[row, i1 + j] for this lane's four columns (0 outside the rows or the block).
fn g_row(row: u32, cols: vec4<u32>) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    if (row < p.rows) {
        let base = row * p.n + p.i1;
        if (cols.x < p.cnt) { r.x = g[base + cols.x]; }
        if (cols.y < p.cnt) { r.y = g[base + cols.y]; }
        if (cols.z < p.cnt) { r.z = g[base + cols.z]; }
        if (cols.w < p.cnt) { r.w = g[base + cols.w]; }
    }
    return r;
}

// The fused steps' product for the workgroup's four rows, this lane's columns j:
//     Σ_k brow[row r, k]·M[k, j]   over the block's rows k ≤ j (U, `from_a` false) or k < j (A)
// summed in order from zero with explicit fma's (the f32 GEMMs' arithmetic, so that the fused
// form gives the unfused one's results bit for bit). M's rows are loaded eight at a time, all
// eight loads issued before the first is used: one row per step, each a round trip to L2 that
// nothing hid, took 91 µs per 4096-row block on an H100 (BENCHMARKS.md session 35). Called in
// uniform control flow (its barrier), after the rows' values are in `brow`.
struct Rows4 {
    r0: vec4<f32>,
    r1: vec4<f32>,
    r2: vec4<f32>,
    r3: vec4<f32>,
}
fn block_product(cols: vec4<u32>, from_a: bool) -> Rows4 {
    workgroupBarrier();
    var acc = Rows4(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    // U's upper triangle with its diagonal, A's without (A's diagonal is stored as zero already;
    // the masks keep the sums independent of what lies below them).
    let first = select(vec4<u32>(0u), vec4<u32>(1u), from_a);
    for (var k0 = 0u; k0 < p.cnt; k0 += 8u) {
        let m0 = mat_row(k0, cols, from_a);
        let m1 = mat_row(k0 + 1u, cols, from_a);
        let m2 = mat_row(k0 + 2u, cols, from_a);
        let m3 = mat_row(k0 + 3u, cols, from_a);
        let m4 = mat_row(k0 + 4u, cols, from_a);
        let m5 = mat_row(k0 + 5u, cols, from_a);
        let m6 = mat_row(k0 + 6u, cols, from_a);
        let m7 = mat_row(k0 + 7u, cols, from_a);
        acc = product_step(acc, k0, m0, cols, first);
        acc = product_step(acc, k0 + 1u, m1, cols, first);
        acc = product_step(acc, k0 + 2u, m2, cols, first);
        acc = product_step(acc, k0 + 3u, m3, cols, first);
        acc = product_step(acc, k0 + 4u, m4, cols, first);
        acc = product_step(acc, k0 + 5u, m5, cols, first);
        acc = product_step(acc, k0 + 6u, m6, cols, first);
        acc = product_step(acc, k0 + 7u, m7, cols, first);
    }
    return acc;
}

// One k of `block_product`: row k of M (`mk`, masked to the triangle) times the four rows'
// broadcast values, added to `acc` (nothing past the block).
fn product_step(acc: Rows4, k: u32, mk: vec4<f32>, cols: vec4<u32>, first: vec4<u32>) -> Rows4 {
    if (k >= p.cnt) {
        return acc;
    }
    let m = select(vec4<f32>(0.0), mk, cols >= vec4<u32>(k) + first);
    return Rows4(
        fma(vec4<f32>(brow[k]), m, acc.r0),
        fma(vec4<f32>(brow[128u + k]), m, acc.r1),
        fma(vec4<f32>(brow[256u + k]), m, acc.r2),
        fma(vec4<f32>(brow[384u + k]), m, acc.r3),
    );
}

// Block row k of U or A at this lane's columns (0 past the block).
fn mat_row(k: u32, cols: vec4<u32>, from_a: bool) -> vec4<f32> {
    if (k >= p.cnt) {
        return vec4<f32>(0.0);
    }
    if (from_a) {
        return a_row(p.i1 + k, cols);
    }
    return u_row(p.i1 + k, cols);
}

// Row r's (of the workgroup's four) values v of this lane's columns into `brow`.
fn put_brow(r: u32, cols: vec4<u32>, v: vec4<f32>) {
    if (cols.x < p.cnt) { brow[r * 128u + cols.x] = v.x; }
    if (cols.y < p.cnt) { brow[r * 128u + cols.y] = v.y; }
    if (cols.z < p.cnt) { brow[r * 128u + cols.z] = v.z; }
    if (cols.w < p.cnt) { brow[r * 128u + cols.w] = v.w; }
}

// This lane's columns of `row`'s W back into the global W (the fused form's pending share, where
// the group parameters read it).
fn put_w(row: u32, cols: vec4<u32>, v: vec4<f32>) {
    if (row >= p.rows) {
        return;
    }
    let base = row * p.n + p.i1;
    if (cols.x < p.cnt) { w[base + cols.x] = v.x; }
    if (cols.y < p.cnt) { w[base + cols.y] = v.y; }
    if (cols.z < p.cnt) { w[base + cols.z] = v.z; }
    if (cols.w < p.cnt) { w[base + cols.w] = v.w; }
}

// Group parameters of `row` stored for group g, or (1, 0) outside the rows.
fn ptab_at(g: u32, row: u32) -> vec2<f32> {
    if (row < p.rows) {
        return vec2<f32>(ptab[(g * p.rows + row) * 2u], ptab[(g * p.rows + row) * 2u + 1u]);
    }
    return vec2<f32>(1.0, 0.0);
}

// This lane's min / max of `row`'s global W over [c0, c1), then the row's over all lanes.
fn lane_min_max(row: u32, r: u32, l: u32, c0: u32, c1: u32) {
    var mn = 0.0;
    var mx = 0.0;
    if (row < p.rows) {
        for (var c = c0 + l; c < c1; c += LANES) {
            let v = w[row * p.n + c];
            mn = min(mn, v);
            mx = max(mx, v);
        }
    }
    bred[r * LANES + l] = mn;
    bred[LR * LANES + r * LANES + l] = mx;
}
fn row_params(row: u32, r: u32, c0: u32, c1: u32) -> vec2<f32> {
    var a = 0.0;
    var b = 0.0;
    for (var s = 0u; s < LANES; s++) {
        a = min(a, bred[r * LANES + s]);
        b = max(b, bred[LR * LANES + r * LANES + s]);
    }
    return find_params(a, b, row, c0, c1);
}

// One row's quantization of value x at pivot d with params prm, as sweep_block's: returns
// (code, error e, loss term).
fn quant_one(x: f32, prm: vec2<f32>, d: f32) -> vec3<f32> {
    let code = clamp(round(x / prm.x) + prm.y, 0.0, f32(p.maxq));
    let q = prm.x * (code - prm.y);
    let diff = x - q;
    return vec3<f32>(code, diff / d, diff * diff / (d * d) / 2.0);
}

@compute @workgroup_size(32)
fn sweep_lanes(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let l = lid.x;
    let n = p.n;
    let i1 = p.i1;
    let cnt = p.cnt;
    let row0 = (wg.x + wg.y * nwg.x) * LR;
    let rows = vec4<u32>(row0, row0 + 1u, row0 + 2u, row0 + 3u);
    let live = rows < vec4<u32>(p.rows);
    let cols = vec4<u32>(l, l + 32u, l + 64u, l + 96u);
    var w0 = vec4<f32>(w_at(rows.x, cols.x), w_at(rows.x, cols.y), w_at(rows.x, cols.z), w_at(rows.x, cols.w));
    var w1r = vec4<f32>(w_at(rows.y, cols.x), w_at(rows.y, cols.y), w_at(rows.y, cols.z), w_at(rows.y, cols.w));
    var w2 = vec4<f32>(w_at(rows.z, cols.x), w_at(rows.z, cols.y), w_at(rows.z, cols.z), w_at(rows.z, cols.w));
    var w3 = vec4<f32>(w_at(rows.w, cols.x), w_at(rows.w, cols.y), w_at(rows.w, cols.z), w_at(rows.w, cols.w));
    // Errors of this lane's columns, stored at the end.
    var e0 = vec4<f32>(0.0);
    var e1 = vec4<f32>(0.0);
    var e2 = vec4<f32>(0.0);
    var e3 = vec4<f32>(0.0);
    var lacc = vec4<f32>(0.0);
    var prm0 = vec2<f32>(1.0, 0.0);
    var prm1 = vec2<f32>(1.0, 0.0);
    var prm2 = vec2<f32>(1.0, 0.0);
    var prm3 = vec2<f32>(1.0, 0.0);
    // The rows' codes words being filled (as sweep_block's; lane 0 stores them).
    let nw = (n + 3u) / 4u;
    var cw = vec4<u32>(0u);
    if ((i1 % 4u) != 0u) {
        let keep = (1u << (8u * (i1 % 4u))) - 1u;
        if (live.x) { cw.x = codes[rows.x * nw + i1 / 4u] & keep; }
        if (live.y) { cw.y = codes[rows.y * nw + i1 / 4u] & keep; }
        if (live.z) { cw.z = codes[rows.z * nw + i1 / 4u] & keep; }
        if (live.w) { cw.w = codes[rows.w * nw + i1 / 4u] & keep; }
    }
    if (p.dynamic_groups != 0u && (i1 % p.gs) != 0u) {
        let g = i1 / p.gs;
        prm0 = ptab_at(g, rows.x);
        prm1 = ptab_at(g, rows.y);
        prm2 = ptab_at(g, rows.z);
        prm3 = ptab_at(g, rows.w);
    }
    // Fused deferred P, before the sweep (bit 0 of `pend`; quant/gpu.rs `Sweep::fused`): the
    // pending terms whose middle index and column both lie in this block,
    //     W[:, blk] += G[:, blk]·U[blk, blk]      (U's upper triangle with its diagonal),
    // each element summed over the block's rows k in order. The unfused form runs this as a GEMM
    // before the sweep; its result must reach the global W too, where the group parameters read
    // the block's stale W (algorithm.md §1.2 "Quirks": the global W holds every cross-block
    // update, and these are cross-block terms of P, §2.2). The workgroup owns its rows, so a
    // storage barrier orders those stores before its own reads.
    if ((p.pend & 1u) != 0u) {
        put_brow(0u, cols, g_row(rows.x, cols));
        put_brow(1u, cols, g_row(rows.y, cols));
        put_brow(2u, cols, g_row(rows.z, cols));
        put_brow(3u, cols, g_row(rows.w, cols));
        let a = block_product(cols, false);
        w0 += a.r0;
        w1r += a.r1;
        w2 += a.r2;
        w3 += a.r3;
        put_w(rows.x, cols, w0);
        put_w(rows.y, cols, w1r);
        put_w(rows.z, cols, w2);
        put_w(rows.w, cols, w3);
        storageBarrier();
    }
    // The first step's pivot and U / P entries; each step then fetches the next one's.
    var d_nx = u[(i1 - p.urow0) * n + i1];
    var u_nx = u_row(i1, cols);
    var p_nx = p_row(i1, cols);

    for (var i = 0u; i < cnt; i++) {
        let k = i1 + i;
        let d = d_nx;
        let u4 = u_nx;
        let p4 = p_nx;
        if (i + 1u < cnt) {
            d_nx = u[(k + 1u - p.urow0) * n + k + 1u];
            u_nx = u_row(k + 1u, cols);
            p_nx = p_row(k + 1u, cols);
        }
        if (p.dynamic_groups != 0u && (k % p.gs) == 0u) {
            let c1 = min(k + p.gs, n);
            lane_min_max(rows.x, 0u, l, k, c1);
            lane_min_max(rows.y, 1u, l, k, c1);
            lane_min_max(rows.z, 2u, l, k, c1);
            lane_min_max(rows.w, 3u, l, k, c1);
            workgroupBarrier();
            prm0 = row_params(rows.x, 0u, k, c1);
            prm1 = row_params(rows.y, 1u, k, c1);
            prm2 = row_params(rows.z, 2u, k, c1);
            prm3 = row_params(rows.w, 3u, k, c1);
            let g = k / p.gs;
            if (l == 0u) {
                if (live.x) { ptab[(g * p.rows + rows.x) * 2u] = prm0.x; ptab[(g * p.rows + rows.x) * 2u + 1u] = prm0.y; }
                if (live.y) { ptab[(g * p.rows + rows.y) * 2u] = prm1.x; ptab[(g * p.rows + rows.y) * 2u + 1u] = prm1.y; }
                if (live.z) { ptab[(g * p.rows + rows.z) * 2u] = prm2.x; ptab[(g * p.rows + rows.z) * 2u + 1u] = prm2.y; }
                if (live.w) { ptab[(g * p.rows + rows.w) * 2u] = prm3.x; ptab[(g * p.rows + rows.w) * 2u + 1u] = prm3.y; }
            }
            // bred is read above before any lane can write it again (the next group start comes
            // after at least one more step barrier).
        }
        if (p.dynamic_groups == 0u) {
            let g = colmap[n + k];
            prm0 = ptab_at(g, rows.x);
            prm1 = ptab_at(g, rows.y);
            prm2 = ptab_at(g, rows.z);
            prm3 = ptab_at(g, rows.w);
        }
        // Column i's values: lane i % 32 holds them in component i / 32.
        let s = i / LANES;
        let par = (i % 2u) * LR;
        if (l == i % LANES) {
            bcol[par] = comp4(w0, s);
            bcol[par + 1u] = comp4(w1r, s);
            bcol[par + 2u] = comp4(w2, s);
            bcol[par + 3u] = comp4(w3, s);
        }
        workgroupBarrier();
        let x = vec4<f32>(bcol[par], bcol[par + 1u], bcol[par + 2u], bcol[par + 3u]);
        let q0 = quant_one(x.x, prm0, d);
        let q1 = quant_one(x.y, prm1, d);
        let q2 = quant_one(x.z, prm2, d);
        let q3 = quant_one(x.w, prm3, d);
        lacc += vec4<f32>(q0.z, q1.z, q2.z, q3.z);
        let e = vec4<f32>(q0.y, q1.y, q2.y, q3.y);
        cw |= vec4<u32>(u32(q0.x), u32(q1.x), u32(q2.x), u32(q3.x)) << vec4<u32>(8u * (k % 4u));
        if ((k % 4u) == 3u || i + 1u == cnt) {
            if (l == 0u) {
                if (live.x) { codes[rows.x * nw + k / 4u] = cw.x; }
                if (live.y) { codes[rows.y * nw + k / 4u] = cw.y; }
                if (live.z) { codes[rows.z * nw + k / 4u] = cw.z; }
                if (live.w) { codes[rows.w * nw + k / 4u] = cw.w; }
            }
            cw = vec4<u32>(0u);
        }
        let own = l == i % LANES;
        e0 = with4(e0, s, e.x, own);
        e1 = with4(e1, s, e.y, own);
        e2 = with4(e2, s, e.z, own);
        e3 = with4(e3, s, e.w, own);
        // This lane's columns j ≥ i (of the block), as sweep_block's update.
        let upd = (cols >= vec4<u32>(i)) & (cols < vec4<u32>(cnt));
        if (p.gptaq != 0u) {
            w0 = select(w0, fma(vec4<f32>(x.x), p4, fma(vec4<f32>(-e.x), u4, w0)), upd);
            w1r = select(w1r, fma(vec4<f32>(x.y), p4, fma(vec4<f32>(-e.y), u4, w1r)), upd);
            w2 = select(w2, fma(vec4<f32>(x.z), p4, fma(vec4<f32>(-e.z), u4, w2)), upd);
            w3 = select(w3, fma(vec4<f32>(x.w), p4, fma(vec4<f32>(-e.w), u4, w3)), upd);
        } else {
            w0 = select(w0, fma(vec4<f32>(-e.x), u4, w0), upd);
            w1r = select(w1r, fma(vec4<f32>(-e.y), u4, w1r), upd);
            w2 = select(w2, fma(vec4<f32>(-e.z), u4, w2), upd);
            w3 = select(w3, fma(vec4<f32>(-e.w), u4, w3), upd);
        }
    }

    if (l == 0u) {
        if (live.x) { loss[rows.x] += lacc.x; }
        if (live.y) { loss[rows.y] += lacc.y; }
        if (live.z) { loss[rows.z] += lacc.z; }
        if (live.w) { loss[rows.w] += lacc.w; }
    }
    // Fused deferred P, after the sweep (bit 1 of `pend`): the block's own pending terms and the
    // errors that drive the cross-block updates,
    //     E = Err − (G[:, blk] + W1·triu₁(A[blk, blk]))
    // (W1 = the block's final values, ≈ Q, §2.2 "Subtlety"), each product summed over the
    // block's rows k in order: the unfused form's GEMM `G[:, c] += Q_c·triu₁(A[c, c])` and
    // quant_pending.wgsl's `err_minus_pending` in one. G's block columns are not needed again
    // (later blocks read only their own), so G is not written. The pure errors go to `loff` for
    // the column loss.
    var x0 = e0;
    var x1 = e1;
    var x2 = e2;
    var x3 = e3;
    if ((p.pend & 2u) != 0u) {
        // The before-step's product read `brow`. The sweep loop's barriers already order those
        // reads before these writes (a block has at least one column); this one makes the order
        // explicit instead of depending on the loop (one barrier per block).
        workgroupBarrier();
        put_brow(0u, cols, w0);
        put_brow(1u, cols, w1r);
        put_brow(2u, cols, w2);
        put_brow(3u, cols, w3);
        let t = block_product(cols, true);
        x0 = e0 - (g_row(rows.x, cols) + t.r0);
        x1 = e1 - (g_row(rows.y, cols) + t.r1);
        x2 = e2 - (g_row(rows.z, cols) + t.r2);
        x3 = e3 - (g_row(rows.w, cols) + t.r3);
    }
    store_lane_row(rows.x, cols, e0, x0, w0);
    store_lane_row(rows.y, cols, e1, x1, w1r);
    store_lane_row(rows.z, cols, e2, x2, w2);
    store_lane_row(rows.w, cols, e3, x3, w3);
}

// This lane's columns of one row: the errors x that the cross-block updates take (ebuf's `eoff`;
// the pure errors e as well, at `loff`, where they differ), and for GPTAQ the negated final W1.
fn store_lane_row(row: u32, cols: vec4<u32>, e: vec4<f32>, x: vec4<f32>, wv: vec4<f32>) {
    if (row >= p.rows) {
        return;
    }
    let eb = row * p.lde + p.eoff;
    let wb = row * p.lde + p.woff;
    if (cols.x < p.cnt) { ebuf[eb + cols.x] = x.x; if (p.gptaq != 0u) { ebuf[wb + cols.x] = -wv.x; } }
    if (cols.y < p.cnt) { ebuf[eb + cols.y] = x.y; if (p.gptaq != 0u) { ebuf[wb + cols.y] = -wv.y; } }
    if (cols.z < p.cnt) { ebuf[eb + cols.z] = x.z; if (p.gptaq != 0u) { ebuf[wb + cols.z] = -wv.z; } }
    if (cols.w < p.cnt) { ebuf[eb + cols.w] = x.w; if (p.gptaq != 0u) { ebuf[wb + cols.w] = -wv.w; } }
    if (p.loff != p.eoff) {
        let lb = row * p.lde + p.loff;
        if (cols.x < p.cnt) { ebuf[lb + cols.x] = e.x; }
        if (cols.y < p.cnt) { ebuf[lb + cols.y] = e.y; }
        if (cols.z < p.cnt) { ebuf[lb + cols.z] = e.z; }
        if (cols.w < p.cnt) { ebuf[lb + cols.w] = e.w; }
    }
}
