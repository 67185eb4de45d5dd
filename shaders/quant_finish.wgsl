// Final fake-quantized weights in ORIGINAL column order (algorithm.md §1.2 "Q = Q[:, invperm]"):
//   q[r, j] = scale[g, r] · (code[r, k] − zero[g, r]),  k = invperm[j], g = group of processing column k.
// The sweep stores codes in processing order as bytes, 4 per u32 word (the code of processing
// column k of row r is bits 8·(k % 4) .. 8·(k % 4) + 7 of word r·nw + k/4, nw = ceil(n/4);
// quant_sweep.wgsl) and the parameter table `ptab` as [G][rows][2] = (scale, zero); scales are f16
// values and |code − zero| ≤ 255, so the product is exact in f32 and equals the sweep's own q bit
// for bit.
// `colmap` = invperm[0..n] followed by the group of every processing column [0..n].

struct Params {
    rows: u32,
    n: u32,
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> codes: array<u32>;
@group(0) @binding(2) var<storage, read> colmap: array<u32>;
@group(0) @binding(3) var<storage, read> ptab: array<f32>;
@group(0) @binding(4) var<storage, read_write> q: array<f32>;

@compute @workgroup_size(256)
fn finish_q(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.rows * p.n) {
        return;
    }
    let r = i / p.n;
    let j = i % p.n;
    let k = colmap[j];
    let g = colmap[p.n + k];
    let s = ptab[(g * p.rows + r) * 2u];
    let z = ptab[(g * p.rows + r) * 2u + 1u];
    let nw = (p.n + 3u) / 4u;
    let code = (codes[r * nw + k / 4u] >> (8u * (k % 4u))) & 0xffu;
    q[i] = s * (f32(code) - z);
}
