// Per-column proxy loss of one sweep block (algorithm.md §1.2 step 8: the reference's Losses1 column
// sums). After `sweep_block`, ebuf[r, eoff + i] holds e = (w − q)/U_kk for block column i, so column k = i1 + i
// contributed Σ_r (w − q)²/(2·U_kk²) = Σ_r e²/2 to the proxy loss. One workgroup per block column
// reduces over the rows; the result is written (not added) to colloss[i1 + i], so no
// cross-workgroup accumulation is needed. The host reads colloss once, after the whole sweep.

struct Params {
    rows: u32,
    i1: u32,
    cnt: u32,
    lde: u32,
    // The block's first column in ebuf (its slot, quant/gpu.rs `lazy_blocks`).
    eoff: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ebuf: array<f32>;
@group(0) @binding(2) var<storage, read_write> colloss: array<f32>;

const WG: u32 = 64u;
var<workgroup> part: array<f32, 64>;

@compute @workgroup_size(64)
fn column_loss(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let i = wg.x;
    let t = lid3.x;
    var s = 0.0;
    if (i < p.cnt) {
        for (var r = t; r < p.rows; r += WG) {
            let e = ebuf[r * p.lde + p.eoff + i];
            s += e * e;
        }
    }
    part[t] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (t < stride) {
            part[t] += part[t + stride];
        }
        workgroupBarrier();
    }
    if (t == 0u && i < p.cnt) {
        colloss[p.i1 + i] = 0.5 * part[0];
    }
}
