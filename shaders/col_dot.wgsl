// Column sums of an elementwise product, in row chunks: for a row-major [rows, n] pair x, y,
// out[out_off + c·n + j] = Σ_{r in chunk c} x[r·n + j]·y[r·n + j], chunk c = rows [c·rchunk, (c+1)·rchunk).
//
// The layer lab's error terms are Frobenius products Σ A∘B of [rows, n] matrices (tr(A Bᵀ)), and its
// per-column output shares are their column sums; one kernel gives both (the host adds the few chunk
// partials of each column in f64, and the columns for the trace). Chunking the rows keeps enough
// invocations busy for short-and-wide and tall matrices alike while each f32 partial stays a short sum.
// Invocation (j, c): adjacent invocations read adjacent columns of the same row (coalesced).

struct Params {
    rows: u32,
    n: u32,
    rchunk: u32,
    out_off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn col_dot_partial(@builtin(global_invocation_id) g: vec3<u32>) {
    let j = g.x;
    let c = g.y;
    if (j >= p.n) {
        return;
    }
    let r0 = c * p.rchunk;
    let r1 = min(r0 + p.rchunk, p.rows);
    var s = 0.0;
    for (var r = r0; r < r1; r++) {
        let i = r * p.n + j;
        s = fma(x[i], y[i], s);
    }
    out[p.out_off + c * p.n + j] = s;
}
