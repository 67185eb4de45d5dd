// GPTAQ: T ← alpha · triu₁(T) in place (strictly upper part scaled, diagonal and below zeroed), the
// middle step of P = alpha·triu₁(D·Uᵀ)·U (algorithm.md §2.2). One launch per row panel of T
// (gpu/matrix.rs): the bound panel holds global rows r0 .. r0 + rows.

struct Params {
    n: u32,
    alpha: f32,
    r0: u32,
    rows: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> t: array<f32>;

@compute @workgroup_size(16, 16, 1)
fn triu1_scale(@builtin(global_invocation_id) gid: vec3<u32>) {
    let b = gid.x;
    let r = gid.y;
    if (r >= p.rows || b >= p.n) {
        return;
    }
    let i = r * p.n + b;
    if (b > p.r0 + r) {
        t[i] = p.alpha * t[i];
    } else {
        t[i] = 0.0;
    }
}
