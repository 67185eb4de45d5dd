// GPTAQ's deferred cross-block term (quant/gpu.rs, `PForm::Deferred`), where the sweep does not
// fuse it (quant_sweep.wgsl's `pend`: by default, and always with sweep_block): after a block's sweep and
// the block's own share of the pending matrix G (G[:, blk] += Q1·triu₁(A[blk, blk])), the errors
// that drive the lazy cross-block update become E = Err1 − G[:, blk]:
//     ebuf[r, eoff + j] −= g[r, i1 + j]      for r < rows, j < cnt
// so that W[:, i2:] −= E·U[blk, i2:] applies GPTQ's term and every GPTAQ term whose middle index m
// (P[i, j] = Σ_{i<m≤j} A[i, m]·U[m, j], algorithm.md §2.2) lies in this block, in one GEMM.
// Runs after `column_loss`, which needs the pure errors.

struct Params {
    rows: u32,
    n: u32,
    i1: u32,
    cnt: u32,
    lde: u32,
    // The block's first error column in ebuf (its slot, quant/gpu.rs `lazy_blocks`).
    eoff: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read_write> ebuf: array<f32>;

@compute @workgroup_size(256)
fn err_minus_pending(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 256u;
    if (idx >= p.rows * p.cnt) {
        return;
    }
    let r = idx / p.cnt;
    let j = idx % p.cnt;
    ebuf[r * p.lde + p.eoff + j] -= g[r * p.n + p.i1 + j];
}

// GPTAQ's A diagonal blocks for quant_sweep.wgsl's fused form (quant/gpu.rs `gptaq_a_diag`): for
// global row r of A (bound as `g`, one row panel of `rows` rows starting at global row i1) and
// j < cnt (the block size),
//     ebuf[eoff + r·cnt + j] = A[r, b + j]   with b = the first column of r's block, 0 past n,
// the same stack as P's diagonal blocks (n × block size, the block's rows at its own rows). One
// invocation per element, the workgroups folded into x and y (gpu/kernels.rs `groups_1d`).
@compute @workgroup_size(256)
fn a_diag_blocks(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 256u;
    if (idx >= p.rows * p.cnt) {
        return;
    }
    let i = idx / p.cnt;
    let j = idx % p.cnt;
    let r = p.i1 + i;
    let c = r / p.cnt * p.cnt + j;
    var v = 0.0;
    if (c < p.n) {
        v = g[i * p.n + c];
    }
    ebuf[p.eoff + r * p.cnt + j] = v;
}
