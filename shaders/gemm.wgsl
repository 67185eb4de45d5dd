// Tiled f32 GEMM: C = alpha · op(A) · op(B) + beta · C  over sub-matrix views.
//
// op(A) is M×K: row-major A[m, k] at off_a + m·lda + k, or (TRANS_A) A stored K×M at off_a + k·lda + m.
// op(B) is K×N: row-major B[k, n] at off_b + k·ldb + n, or (TRANS_B) B stored N×K at off_b + n·ldb + k.
// C is row-major M×N at off_c + m·ldc + n.
//
// Forms used by the project: Y = X·Wᵀ (linear layers, TRANS_B), H += XᵀX (Hessians, TRANS_A with
// UPPER_ONLY, mirrored afterwards by `mirror_upper`), W -= E·U (GPTQ lazy block update), the
// blocked Cholesky's panel and trailing updates (quant/factor.rs).
//
// Two entry points with the same bindings, chosen per shape by the launcher (gpu/ops.rs):
// - `gemm_large`: a 128×128 output tile per 16×16 workgroup, each invocation an 8×8 register block
//   (rows ty·4+{0..3} and 64+ty·4+{0..3}, likewise columns, so its shared-memory reads are four
//   vec4 loads per k step for 64 FMAs); by default one workgroup buffer per operand (8 KiB), or,
//   with DOUBLE_BUFFER, two workgroup buffers per operand (16 KiB in all, the portable limit):
//   slice t+1 is written into one while slice t is read from the other, so one barrier per slice
//   instead of two. That variant is a candidate for `gptaq-studio tune` (ops::GemmTile::LargeDb);
//   the size rule keeps the single-buffered one until a GPU measurement says otherwise.
//   Each invocation loads its share of a slice as one vec4 per operand (four consecutive stored
//   elements, through the vec4 bindings `a4` / `b4`) where the view's rows start on 16-byte
//   boundaries, else element by element (`ld4_a` / `ld4_b`): session 28's kernel lab on an H100
//   (BENCHMARKS.md) measured 4096³ 4.29 → 3.96 ms (A·Bᵀ), 4.27 → 3.86 (A·B), 4.08 → 3.83 (Aᵀ·B)
//   and a 4096 × 1792 × 12544 product 8–10 % faster against the four scalar loads per operand
//   before, 0–8 % slower at K = 128 (the sweep's updates); in the 4096 × 14336 solve the two
//   balance (its GEMMs 1 ms slower in all, BENCHMARKS.md session 28; turning the vec4 loads off
//   below K = 256 made the Cholesky's short-K GEMMs 10 % slower still, so they stay on). The
//   sums, their k order and the staging layout are unchanged, so results are bit for bit the same.
// - `gemm_small`: a 64×64 tile, 4×4 per invocation (two vec4 loads per 16 FMAs), for shapes with
//   too few 128×128 tiles to fill the GPU; scalar loads (`load_a` / `load_b`).
// - `gemm_narrow`: a 32×64 tile, 2×4 per invocation, k in slices of 32 (`NBK`) fetched as vec4
//   where aligned, for outputs too narrow or too small for `gemm_small` to fill a GPU
//   (ops::narrow_fits) — above all the solve's per-block products (rows × 128, K = 128 … 384:
//   the lazy updates' catch-ups, GPTAQ's pending terms). There `gemm_small` has one
//   workgroup of 8 subgroups per SM and waits on its global loads every 8 k (an H100 measured
//   38 µs per 4096 × 128 catch-up of K = 128 … 384, 7 TFLOP/s); twice the workgroups and four
//   times the k per barrier hide that latency: 24 µs (BENCHMARKS.md session 38). Same sums, same
//   order: the same bits as `gemm_small` (tests/gpu_kernels.rs).
// K advances in slices of 8 staged through workgroup memory; the next slice's global loads are
// issued into registers before the current slice is consumed (software prefetch), so global latency
// overlaps the FMAs.
//
// Why the accumulators are named variables and every k step is written out: naga emits WGSL loops
// as generic SPIR-V loops, and a function-local array indexed by a loop counter is not reliably
// promoted to registers by drivers (NVIDIA's put it in local memory: the earlier loop-indexed
// version of this kernel ran at 0.4 TFLOP/s on an H200). Only workgroup arrays are indexed
// dynamically here.
//
// Index audit (gpu/ops.rs creates this module without wgpu's index clamps, `indices_audited`):
// - global: `load_a` / `load_b` (and `ld4_a` / `ld4_b` element by element) read only row < m,
//   col < n, k_beg ≤ kk < k_end ≤ k; a whole vec4 only where all four of its elements pass the
//   same checks (`scol + 4 ≤ lim`) and the view is aligned, so the vec4 is `base / 4` with base a
//   multiple of 4; an element `i` read alone is component i % 4 of vec4 i / 4, inside the binding
//   because buffers are whole 16-byte slots (gpu/buffer.rs `padded_size`). `store_c` writes only
//   row < m, col < n. The launcher checks that each view's extent (offset + (rows − 1)·ld + cols,
//   in its stored layout), for a batched launch its last batch's (offset + (batches − 1)·stride
//   added), fits its buffer before every launch (ops::gemm_impl).
// - workgroup: `gemm_large`'s staging slots are `off + y·32 + swz(x, y)` with y = k % 8 < 8,
//   x < 128 so x / 4 < 32 and the XOR with k % 8 ≤ 7 stays < 32, or `off + y·32 + (tid % 32)`
//   for an x-contiguous operand (y = tid / 32 < 8), off ∈ {0, 256} only with DOUBLE_BUFFER
//   (512 slots, else 256); readers use `cur + kk·32 + {0, 16} + (t ^ x)` with kk < 8, t < 16 and
//   x ≤ 7, so < 16; `gemm_small` likewise `y·16 + (x / 4 ^ ·) < 128` with x < 64. Component indices
//   are `x % 4`. `gemm_narrow`'s `na[k·33 + r]` has k < 32 and r < 32 (writers: k = (tid % 8)·4
//   + j ≤ 31 with r = tid / 8 ≤ 31, or k = tid / 8 with r = (tid % 8)·4 + j ≤ 31; readers:
//   kk < 32, ty·2 + 1 ≤ 31), so < 1056; `nb[k·16 + x]` has k < 32 and x < 16 (writers: e < 512,
//   or (e % 8)·4 + j ≤ 31 with (e / 8) / 4 ≤ 15; readers kk < 32, tx < 16), so < 512. Changing a
//   tile or slot formula means redoing this audit (or dropping the flag).
//
// Every global load is bounds-checked, so any M, N, K (including 1 and primes) is valid. Operands
// with known zero triangles (GPTAQ's triu₁(D·Uᵀ)·U, quant/gpu.rs) declare them in `tri`; each
// output tile then sums only over the k range where both operands can be non-zero (`k_range`).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    off_a: u32,
    off_b: u32,
    off_c: u32,
    alpha: f32,
    beta: f32,
    // UPPER_ONLY: element (row, col) of this view is computed iff row <= col + diag — the view's
    // offset from the diagonal of the symmetric matrix it is a block of (0 for a square view on
    // the diagonal; launches over row panels pass the panel's shift, gpu/matrix.rs).
    diag: i32,
    // Known zero triangles of the operands (ops::KSkip), in this launch's coordinates; `tri` bit
    // 0: op(A)[i, k] = 0 for k < i + a_up; bit 1: op(A)[i, k] = 0 for k > i + a_lo; bit 2:
    // op(B)[k, j] = 0 for k > j + b_up; bit 3: op(B)[k, j] = 0 for k < j + b_lo. Each output tile
    // sums only over the k where both can be non-zero (`k_range`).
    tri: u32,
    a_up: i32,
    a_lo: i32,
    b_up: i32,
    b_lo: i32,
    // Batched launches (ops::gemm_batched): workgroup z computes the product of the operands at
    // off_a + z·bat_a, off_b + z·bat_b into off_c + z·bat_c; all 0 for a single product.
    bat_a: u32,
    bat_b: u32,
    bat_c: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
// The same operands as vec4 (`gemm_large` reads them only this way, `gemm_small` only as f32; one
// entry point never uses both names of a binding). Buffers are whole 16-byte slots
// (gpu/buffer.rs `padded_size`), so every element lies in some vec4 of the binding.
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b4: array<vec4<f32>>;

override TRANS_A: bool = false;
override TRANS_B: bool = false;
// Only compute elements on or above the (shifted) diagonal: symmetric rank-k updates.
override UPPER_ONLY: bool = false;

const BK: u32 = 8u;

// gemm_small's [BK][64] slices as vec4.
var<workgroup> sa: array<vec4<f32>, 128>;
var<workgroup> sb: array<vec4<f32>, 128>;

// gemm_large's slices: [BK][128] as vec4, twice with DOUBLE_BUFFER (buffer `t % 2` at offset
// (t % 2)·256), sized by the override so the single-buffered kernel keeps its 8 KiB.
override DOUBLE_BUFFER: bool = false;
// The XOR mask of the staging swizzle (`swz`); 0 turns it off (kernel lab only).
override SWIZZLE: u32 = 7u;
var<workgroup> la: array<vec4<f32>, select(256u, 512u, DOUBLE_BUFFER)>;
var<workgroup> lb: array<vec4<f32>, select(256u, 512u, DOUBLE_BUFFER)>;

// The k range of this workgroup's output tile: loads outside [k_beg, k_end) read as zero.
var<private> k_beg: u32;
var<private> k_end: u32;
// This workgroup's operand offsets: p.off_* plus its batch's (`set_batch`).
var<private> oa: u32;
var<private> ob: u32;
var<private> oc: u32;

// Whether A's and B's views allow whole vec4 loads in batch z: every stored row starts on a
// 16-byte boundary (uniform: from the parameters and the batch only).
fn operands_aligned(z: u32) -> vec2<bool> {
    return vec2<bool>(
        ((p.off_a + z * p.bat_a) % 4u) == 0u && (p.lda % 4u) == 0u,
        ((p.off_b + z * p.bat_b) % 4u) == 0u && (p.ldb % 4u) == 0u,
    );
}

fn set_batch(z: u32) {
    oa = p.off_a + z * p.bat_a;
    ob = p.off_b + z * p.bat_b;
    oc = p.off_c + z * p.bat_c;
}

// The k range [x, y) of the output tile with rows row0 .. row0 + tile and columns col0 .. col0 +
// tile: the products outside it involve an entry the caller declared zero (`p.tri`), so summing
// exactly over it leaves every sum bit for bit the dense one. Sets k_beg / k_end and returns
// (first slice start, y): the start is x rounded down to a multiple of 4 (16 B) so that
// k-contiguous loads stay aligned (the loads below x read as zero). Computed from the workgroup id
// and uniforms only, so the k loops and their barriers stay in uniform control flow (the loop
// bounds come from the returned value, not from the private copies).
fn k_range(row0: u32, col0: u32, tile: u32) -> vec2<u32> {
    return k_range_rc(row0, col0, tile, tile);
}

// `k_range` for a tile of `th` rows and `tw` columns (`gemm_narrow`'s 32 × 64).
fn k_range_rc(row0: u32, col0: u32, th: u32, tw: u32) -> vec2<u32> {
    var lo = 0;
    var hi = i32(p.k);
    let r = i32(row0);
    let c = i32(col0);
    if ((p.tri & 1u) != 0u) {
        lo = max(lo, r + p.a_up);
    }
    if ((p.tri & 2u) != 0u) {
        hi = min(hi, r + i32(th) + p.a_lo);
    }
    if ((p.tri & 4u) != 0u) {
        hi = min(hi, c + i32(tw) + p.b_up);
    }
    if ((p.tri & 8u) != 0u) {
        lo = max(lo, c + p.b_lo);
    }
    lo = min(lo, i32(p.k));
    let end = u32(max(hi, lo));
    k_beg = u32(lo);
    k_end = end;
    return vec2<u32>(u32(lo & ~3), end);
}

fn load_a(row: u32, kk: u32) -> f32 {
    if (row >= p.m || kk < k_beg || kk >= k_end) {
        return 0.0;
    }
    if (TRANS_A) {
        return a[oa + kk * p.lda + row];
    }
    return a[oa + row * p.lda + kk];
}

fn load_b(kk: u32, col: u32) -> f32 {
    if (kk < k_beg || kk >= k_end || col >= p.n) {
        return 0.0;
    }
    if (TRANS_B) {
        return b[ob + col * p.ldb + kk];
    }
    return b[ob + kk * p.ldb + col];
}

// Position (mn, k) inside a [TILE × BK] slice of element `e`: consecutive invocations walk the
// contiguous dimension of the stored matrix (k when not transposed for A / transposed for B).
fn slot(e: u32, tile: u32, k_contiguous: bool) -> vec2<u32> {
    if (k_contiguous) {
        return vec2<u32>(e / BK, e % BK);
    }
    return vec2<u32>(e % tile, e / tile);
}

fn store_c(row: u32, col: u32, v: f32) {
    if (row >= p.m || col >= p.n) {
        return;
    }
    if (UPPER_ONLY && i32(row) > i32(col) + p.diag) {
        return;
    }
    let ci = oc + row * p.ldc + col;
    var out = p.alpha * v;
    // beta == 0 must not read C: it may hold garbage (NaN) from an earlier use.
    if (p.beta != 0.0) {
        out = out + p.beta * c[ci];
    }
    c[ci] = out;
}

fn store_row4(row: u32, col: u32, v: vec4<f32>) {
    store_c(row, col, v.x);
    store_c(row, col + 1u, v.y);
    store_c(row, col + 2u, v.z);
    store_c(row, col + 3u, v.w);
}

// The vec4 slot of slice element (x, k) in a row of `gemm_large` / `gemm_small`'s staging: x / 4,
// XOR-swizzled by k % 8 where the operand is k-contiguous (`on`: A not transposed, B transposed).
// Why: such an operand (both of X·Wᵀ and of P's D·Uᵀ, A of T·U) is staged by 8 consecutive
// invocations writing 8 consecutive k of one x, i.e. into 8 workgroup rows 512 (256) bytes apart —
// without the swizzle all in one bank, an 8-way conflict on every staging store. XOR by k % 8 puts
// them in 8 different vec4 slots; the readers XOR their vec4 index by the same k % 8
// (`kk` < BK = 8). An x-contiguous operand has no conflict to remove, and there the XOR only cost
// time (`on` comes from overrides, so it folds away). Session 24's kernel lab on the H100
// (BENCHMARKS.md): at 4096³ A·Bᵀ 5.08 → 4.44 ms and A·B 4.73 → 4.42 ms with the swizzle, Aᵀ·B
// 4.31 → 4.38 ms with it on both x-contiguous operands (hence `on`). `SWIZZLE = 0` (the mask
// applied to k) restores the unswizzled layout for the kernel lab's comparison (benches/lab).
fn swz(x: u32, k: u32, on: bool) -> u32 {
    return (x / 4u) ^ select(0u, k & SWIZZLE, on);
}

fn a_at(i: u32) -> f32 {
    return a4[i / 4u][i % 4u];
}

fn b_at(i: u32) -> f32 {
    return b4[i / 4u][i % 4u];
}

// Four consecutive elements of A's stored row `srow` from stored column `scol`; `lim` is the
// first stored column not to read (exclusive, ≤ the row's valid extent), `lo` the first to read.
// Out-of-range elements read as zero, like `load_a`.
fn ld4_a(srow: u32, scol: u32, lo: u32, lim: u32, aligned: bool) -> vec4<f32> {
    let base = oa + srow * p.lda + scol;
    if (aligned && scol >= lo && scol + 4u <= lim) {
        return a4[base / 4u];
    }
    // Written out (no loop-indexed vector components: drivers may put those in local memory).
    var v = vec4<f32>(0.0);
    if (scol >= lo && scol < lim) {
        v.x = a_at(base);
    }
    if (scol + 1u >= lo && scol + 1u < lim) {
        v.y = a_at(base + 1u);
    }
    if (scol + 2u >= lo && scol + 2u < lim) {
        v.z = a_at(base + 2u);
    }
    if (scol + 3u >= lo && scol + 3u < lim) {
        v.w = a_at(base + 3u);
    }
    return v;
}

fn ld4_b(srow: u32, scol: u32, lo: u32, lim: u32, aligned: bool) -> vec4<f32> {
    let base = ob + srow * p.ldb + scol;
    if (aligned && scol >= lo && scol + 4u <= lim) {
        return b4[base / 4u];
    }
    var v = vec4<f32>(0.0);
    if (scol >= lo && scol < lim) {
        v.x = b_at(base);
    }
    if (scol + 1u >= lo && scol + 1u < lim) {
        v.y = b_at(base + 1u);
    }
    if (scol + 2u >= lo && scol + 2u < lim) {
        v.z = b_at(base + 2u);
    }
    if (scol + 3u >= lo && scol + 3u < lim) {
        v.w = b_at(base + 3u);
    }
    return v;
}

// This invocation's share of slice k0 .. k0 + 8 of op(A) (written out per kernel, like
// `fetch_na` / `fetch_nb`: with the shares' divisors as parameters of one shared helper the H100
// ran `gemm_large` 1.4–1.7 % slower at 4096³ in the nn and tn layouts, BENCHMARKS.md session
// 39): k-contiguous (A row-major M×K), row
// tid / 2 and k0 + (tid % 2)·4 .. +4; x-contiguous (A stored K×M), k0 + tid / 32 and columns
// (tid % 32)·4 .. +4 of the tile.
fn fetch_a(row0: u32, k0: u32, tid: u32, aligned: bool) -> vec4<f32> {
    if (!TRANS_A) {
        let row = row0 + tid / 2u;
        if (row >= p.m) {
            return vec4<f32>(0.0);
        }
        return ld4_a(row, k0 + (tid % 2u) * 4u, k_beg, k_end, aligned);
    }
    let kk = k0 + tid / 32u;
    if (kk < k_beg || kk >= k_end) {
        return vec4<f32>(0.0);
    }
    return ld4_a(kk, row0 + (tid % 32u) * 4u, 0u, p.m, aligned);
}

// The same for op(B): k-contiguous (B stored N×K), column tid / 2; x-contiguous (B row-major
// K×N), k0 + tid / 32 and columns (tid % 32)·4 .. +4.
fn fetch_b(col0: u32, k0: u32, tid: u32, aligned: bool) -> vec4<f32> {
    if (TRANS_B) {
        let col = col0 + tid / 2u;
        if (col >= p.n) {
            return vec4<f32>(0.0);
        }
        return ld4_b(col, k0 + (tid % 2u) * 4u, k_beg, k_end, aligned);
    }
    let kk = k0 + tid / 32u;
    if (kk < k_beg || kk >= k_end) {
        return vec4<f32>(0.0);
    }
    return ld4_b(kk, col0 + (tid % 32u) * 4u, 0u, p.n, aligned);
}

// Stores the fetched vectors into buffer `off` in the staging layout: [k][x / 4 (swizzled where
// k-contiguous)][x % 4].
fn stage_v4(off: u32, tid: u32, ra: vec4<f32>, rb: vec4<f32>) {
    if (!TRANS_A) {
        let x = tid / 2u;
        let kq = (tid % 2u) * 4u;
        la[off + kq * 32u + swz(x, kq, true)][x % 4u] = ra.x;
        la[off + (kq + 1u) * 32u + swz(x, kq + 1u, true)][x % 4u] = ra.y;
        la[off + (kq + 2u) * 32u + swz(x, kq + 2u, true)][x % 4u] = ra.z;
        la[off + (kq + 3u) * 32u + swz(x, kq + 3u, true)][x % 4u] = ra.w;
    } else {
        la[off + (tid / 32u) * 32u + tid % 32u] = ra;
    }
    if (TRANS_B) {
        let x = tid / 2u;
        let kq = (tid % 2u) * 4u;
        lb[off + kq * 32u + swz(x, kq, true)][x % 4u] = rb.x;
        lb[off + (kq + 1u) * 32u + swz(x, kq + 1u, true)][x % 4u] = rb.y;
        lb[off + (kq + 2u) * 32u + swz(x, kq + 2u, true)][x % 4u] = rb.z;
        lb[off + (kq + 3u) * 32u + swz(x, kq + 3u, true)][x % 4u] = rb.w;
    } else {
        lb[off + (tid / 32u) * 32u + tid % 32u] = rb;
    }
}

@compute @workgroup_size(16, 16, 1)
fn gemm_large(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    set_batch(wg.z);
    let row0 = wg.y * 128u;
    let col0 = wg.x * 128u;
    // Whole-workgroup early exit (uniform), before any barrier.
    if (UPPER_ONLY && i32(row0) > i32(col0) + 127 + p.diag) {
        return;
    }
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;
    let aligned = operands_aligned(wg.z);
    let aligned_a = aligned.x;
    let aligned_b = aligned.y;

    var c00 = vec4<f32>(0.0);
    var c01 = vec4<f32>(0.0);
    var c10 = vec4<f32>(0.0);
    var c11 = vec4<f32>(0.0);
    var c20 = vec4<f32>(0.0);
    var c21 = vec4<f32>(0.0);
    var c30 = vec4<f32>(0.0);
    var c31 = vec4<f32>(0.0);
    var c40 = vec4<f32>(0.0);
    var c41 = vec4<f32>(0.0);
    var c50 = vec4<f32>(0.0);
    var c51 = vec4<f32>(0.0);
    var c60 = vec4<f32>(0.0);
    var c61 = vec4<f32>(0.0);
    var c70 = vec4<f32>(0.0);
    var c71 = vec4<f32>(0.0);

    // Slice 0 into buffer 0; afterwards, per slice t: the global loads of slice t + 1 are issued
    // into registers (in flight while slice t is consumed; out of range → 0), slice t is read from
    // buffer `cur`, the registers are written into buffer `nxt`, then a barrier. Single-buffered,
    // `nxt` is `cur`, so a second barrier first waits until every invocation has read it. Double-
    // buffered, the one barrier also separates each read of a buffer (slice t) from its next write
    // (slice t + 2, after the following iteration's barrier).
    let kr = k_range(row0, col0, 128u);
    let k0 = kr.x;
    var ra = fetch_a(row0, k0, tid, aligned_a);
    var rb = fetch_b(col0, k0, tid, aligned_b);
    stage_v4(0u, tid, ra, rb);
    workgroupBarrier();
    let ktiles = (kr.y - k0 + BK - 1u) / BK;
    for (var t = 0u; t < ktiles; t++) {
        var cur = 0u;
        var nxt = 0u;
        if (DOUBLE_BUFFER) {
            cur = (t % 2u) * 256u;
            nxt = 256u - cur;
        }
        let k1 = k0 + (t + 1u) * BK;
        ra = fetch_a(row0, k1, tid, aligned_a);
        rb = fetch_b(col0, k1, tid, aligned_b);
        for (var kk = 0u; kk < BK; kk++) {
            // The readers' half of `swz`.
            let xa = select(0u, kk & SWIZZLE, !TRANS_A);
            let xb = select(0u, kk & SWIZZLE, TRANS_B);
            let a0 = la[cur + kk * 32u + (ty ^ xa)];
            let a1 = la[cur + kk * 32u + 16u + (ty ^ xa)];
            let b0 = lb[cur + kk * 32u + (tx ^ xb)];
            let b1 = lb[cur + kk * 32u + 16u + (tx ^ xb)];
            c00 = fma(vec4<f32>(a0.x), b0, c00);
            c01 = fma(vec4<f32>(a0.x), b1, c01);
            c10 = fma(vec4<f32>(a0.y), b0, c10);
            c11 = fma(vec4<f32>(a0.y), b1, c11);
            c20 = fma(vec4<f32>(a0.z), b0, c20);
            c21 = fma(vec4<f32>(a0.z), b1, c21);
            c30 = fma(vec4<f32>(a0.w), b0, c30);
            c31 = fma(vec4<f32>(a0.w), b1, c31);
            c40 = fma(vec4<f32>(a1.x), b0, c40);
            c41 = fma(vec4<f32>(a1.x), b1, c41);
            c50 = fma(vec4<f32>(a1.y), b0, c50);
            c51 = fma(vec4<f32>(a1.y), b1, c51);
            c60 = fma(vec4<f32>(a1.z), b0, c60);
            c61 = fma(vec4<f32>(a1.z), b1, c61);
            c70 = fma(vec4<f32>(a1.w), b0, c70);
            c71 = fma(vec4<f32>(a1.w), b1, c71);
        }
        if (!DOUBLE_BUFFER) {
            workgroupBarrier();
        }
        stage_v4(nxt, tid, ra, rb);
        workgroupBarrier();
    }
    let r0 = row0 + ty * 4u;
    let r1 = row0 + 64u + ty * 4u;
    let q0 = col0 + tx * 4u;
    let q1 = col0 + 64u + tx * 4u;
    store_row4(r0, q0, c00);
    store_row4(r0, q1, c01);
    store_row4(r0 + 1u, q0, c10);
    store_row4(r0 + 1u, q1, c11);
    store_row4(r0 + 2u, q0, c20);
    store_row4(r0 + 2u, q1, c21);
    store_row4(r0 + 3u, q0, c30);
    store_row4(r0 + 3u, q1, c31);
    store_row4(r1, q0, c40);
    store_row4(r1, q1, c41);
    store_row4(r1 + 1u, q0, c50);
    store_row4(r1 + 1u, q1, c51);
    store_row4(r1 + 2u, q0, c60);
    store_row4(r1 + 2u, q1, c61);
    store_row4(r1 + 3u, q0, c70);
    store_row4(r1 + 3u, q1, c71);
}

@compute @workgroup_size(16, 16, 1)
fn gemm_small(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    set_batch(wg.z);
    let row0 = wg.y * 64u;
    let col0 = wg.x * 64u;
    if (UPPER_ONLY && i32(row0) > i32(col0) + 63 + p.diag) {
        return;
    }
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;
    let sa0 = slot(tid, 64u, !TRANS_A);
    let sa1 = slot(tid + 256u, 64u, !TRANS_A);
    let sb0 = slot(tid, 64u, TRANS_B);
    let sb1 = slot(tid + 256u, 64u, TRANS_B);

    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);

    let kr = k_range(row0, col0, 64u);
    let k0 = kr.x;
    var ra = vec2<f32>(load_a(row0 + sa0.x, k0 + sa0.y), load_a(row0 + sa1.x, k0 + sa1.y));
    var rb = vec2<f32>(load_b(k0 + sb0.y, col0 + sb0.x), load_b(k0 + sb1.y, col0 + sb1.x));
    let ktiles = (kr.y - k0 + BK - 1u) / BK;
    for (var t = 0u; t < ktiles; t++) {
        sa[sa0.y * 16u + swz(sa0.x, sa0.y, !TRANS_A)][sa0.x % 4u] = ra.x;
        sa[sa1.y * 16u + swz(sa1.x, sa1.y, !TRANS_A)][sa1.x % 4u] = ra.y;
        sb[sb0.y * 16u + swz(sb0.x, sb0.y, TRANS_B)][sb0.x % 4u] = rb.x;
        sb[sb1.y * 16u + swz(sb1.x, sb1.y, TRANS_B)][sb1.x % 4u] = rb.y;
        workgroupBarrier();
        let k1 = k0 + (t + 1u) * BK;
        ra = vec2<f32>(load_a(row0 + sa0.x, k1 + sa0.y), load_a(row0 + sa1.x, k1 + sa1.y));
        rb = vec2<f32>(load_b(k1 + sb0.y, col0 + sb0.x), load_b(k1 + sb1.y, col0 + sb1.x));
        for (var kk = 0u; kk < BK; kk++) {
            // The readers' half of `swz`.
            let xa = select(0u, kk & SWIZZLE, !TRANS_A);
            let xb = select(0u, kk & SWIZZLE, TRANS_B);
            let av = sa[kk * 16u + (ty ^ xa)];
            let bv = sb[kk * 16u + (tx ^ xb)];
            c0 = fma(vec4<f32>(av.x), bv, c0);
            c1 = fma(vec4<f32>(av.y), bv, c1);
            c2 = fma(vec4<f32>(av.z), bv, c2);
            c3 = fma(vec4<f32>(av.w), bv, c3);
        }
        workgroupBarrier();
    }
    let r = row0 + ty * 4u;
    let q = col0 + tx * 4u;
    store_row4(r, q, c0);
    store_row4(r + 1u, q, c1);
    store_row4(r + 2u, q, c2);
    store_row4(r + 3u, q, c3);
}

// gemm_narrow's staging: a slice of NBK = 32 k of op(A)'s 32 tile rows as [k][row], each k's row
// padded to 33 floats, and of op(B)'s 64 tile columns as [k][column / 4] (vec4). The padding: the
// k-contiguous fill (`stage_narrow`, A not transposed) has the 32 invocations of a subgroup write
// rows tid / 8 at k = (tid % 8)·4 + j, i.e. floats (k·33 + row) ≡ (k + row) mod 32 — 32 distinct
// banks, where a 32-float row would put the 8 invocations of one row in one bank.
const NBK: u32 = 32u;
const NA_LD: u32 = 33u;
var<workgroup> na: array<f32, 1056>;
var<workgroup> nb: array<vec4<f32>, 512>;

// This invocation's share of slice k0 .. k0 + 32 of op(A)'s tile rows row0 .. row0 + 32:
// k-contiguous (A row-major M×K), row tid / 8 and k0 + (tid % 8)·4 .. +4; x-contiguous (A stored
// K×M), k0 + tid / 8 and rows (tid % 8)·4 .. +4.
fn fetch_na(row0: u32, k0: u32, tid: u32, aligned: bool) -> vec4<f32> {
    if (!TRANS_A) {
        let row = row0 + tid / 8u;
        if (row >= p.m) {
            return vec4<f32>(0.0);
        }
        return ld4_a(row, k0 + (tid % 8u) * 4u, k_beg, k_end, aligned);
    }
    let kk = k0 + tid / 8u;
    if (kk < k_beg || kk >= k_end) {
        return vec4<f32>(0.0);
    }
    return ld4_a(kk, row0 + (tid % 8u) * 4u, 0u, p.m, aligned);
}

// Element-share `e` (< 512; each invocation fetches e = tid and tid + 256) of the slice of op(B)'s
// tile columns col0 .. col0 + 64: x-contiguous (B row-major K×N), k0 + e / 16 and columns
// (e % 16)·4 .. +4; k-contiguous (B stored N×K), column e / 8 and k0 + (e % 8)·4 .. +4.
fn fetch_nb(col0: u32, k0: u32, e: u32, aligned: bool) -> vec4<f32> {
    if (TRANS_B) {
        let col = col0 + e / 8u;
        if (col >= p.n) {
            return vec4<f32>(0.0);
        }
        return ld4_b(col, k0 + (e % 8u) * 4u, k_beg, k_end, aligned);
    }
    let kk = k0 + e / 16u;
    if (kk < k_beg || kk >= k_end) {
        return vec4<f32>(0.0);
    }
    return ld4_b(kk, col0 + (e % 16u) * 4u, 0u, p.n, aligned);
}

// Stores what `fetch_nb` fetched for share `e` into the [k][column / 4] staging. The k-contiguous
// form (B transposed; the solve's products never are) writes components of vec4 slots 64 floats
// apart, a bank conflict this kernel accepts.
fn stage_nb(e: u32, v: vec4<f32>) {
    if (TRANS_B) {
        let col = e / 8u;
        let kq = (e % 8u) * 4u;
        nb[kq * 16u + col / 4u][col % 4u] = v.x;
        nb[(kq + 1u) * 16u + col / 4u][col % 4u] = v.y;
        nb[(kq + 2u) * 16u + col / 4u][col % 4u] = v.z;
        nb[(kq + 3u) * 16u + col / 4u][col % 4u] = v.w;
    } else {
        nb[e] = v;
    }
}

fn stage_narrow(tid: u32, ra: vec4<f32>, rb0: vec4<f32>, rb1: vec4<f32>) {
    if (!TRANS_A) {
        let r = tid / 8u;
        let kq = (tid % 8u) * 4u;
        na[kq * NA_LD + r] = ra.x;
        na[(kq + 1u) * NA_LD + r] = ra.y;
        na[(kq + 2u) * NA_LD + r] = ra.z;
        na[(kq + 3u) * NA_LD + r] = ra.w;
    } else {
        let kk = tid / 8u;
        let r = (tid % 8u) * 4u;
        na[kk * NA_LD + r] = ra.x;
        na[kk * NA_LD + r + 1u] = ra.y;
        na[kk * NA_LD + r + 2u] = ra.z;
        na[kk * NA_LD + r + 3u] = ra.w;
    }
    stage_nb(tid, rb0);
    stage_nb(tid + 256u, rb1);
}

// A 32 × 64 output tile per 16×16 workgroup, rows ty·2 + {0, 1} and columns tx·4 .. +4 per
// invocation (header). Each output element is `fma(a, b, c)` over k in the same order from the same
// start as in `gemm_small`, so the two give the same bits.
@compute @workgroup_size(16, 16, 1)
fn gemm_narrow(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    set_batch(wg.z);
    let row0 = wg.y * 32u;
    let col0 = wg.x * 64u;
    if (UPPER_ONLY && i32(row0) > i32(col0) + 63 + p.diag) {
        return;
    }
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;
    let aligned = operands_aligned(wg.z);
    let aligned_a = aligned.x;
    let aligned_b = aligned.y;

    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);

    let kr = k_range_rc(row0, col0, 32u, 64u);
    let k0 = kr.x;
    var ra = fetch_na(row0, k0, tid, aligned_a);
    var rb0 = fetch_nb(col0, k0, tid, aligned_b);
    var rb1 = fetch_nb(col0, k0, tid + 256u, aligned_b);
    let ktiles = (kr.y - k0 + NBK - 1u) / NBK;
    for (var t = 0u; t < ktiles; t++) {
        stage_narrow(tid, ra, rb0, rb1);
        workgroupBarrier();
        // The next slice's loads in flight while this one is consumed (out of range → 0).
        let k1 = k0 + (t + 1u) * NBK;
        ra = fetch_na(row0, k1, tid, aligned_a);
        rb0 = fetch_nb(col0, k1, tid, aligned_b);
        rb1 = fetch_nb(col0, k1, tid + 256u, aligned_b);
        for (var kk = 0u; kk < NBK; kk++) {
            let a0 = na[kk * NA_LD + ty * 2u];
            let a1 = na[kk * NA_LD + ty * 2u + 1u];
            let bv = nb[kk * 16u + tx];
            c0 = fma(vec4<f32>(a0), bv, c0);
            c1 = fma(vec4<f32>(a1), bv, c1);
        }
        workgroupBarrier();
    }
    let r = row0 + ty * 2u;
    let q = col0 + tx * 4u;
    store_row4(r, q, c0);
    store_row4(r + 1u, q, c1);
}
