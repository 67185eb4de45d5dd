// Tensor-core GEMM staged through workgroup memory (issue 10's fast path; the unstaged kernels
// in gemm_coop.wgsl are the fallback): C[M×N] += op(A)[M×K] · op(B)[K×N], A and B f16, C f32,
// the same contract, parameters and batching as gemm_coop.wgsl (see there and ops::CoopOp).
//
// Why: the unstaged kernels let every subgroup load its own fragments from global memory, so a
// fragment is fetched once per subgroup that needs it and each fetch's latency stalls the tensor
// cores (they reached 28–54 TFLOP/s at 4096³ on the H100, BENCHMARKS.md session 19). Here a
// workgroup of four subgroups computes a 128×128 block of C: per 32-deep step the workgroup copies
// A's 128×32 and B's 32×128 tiles into workgroup memory once, with coalesced loads, and each
// subgroup computes its 64×64 quarter (sixteen 16×16 accumulators, each fragment used four times)
// from there. The next step's tiles are loaded into registers while the tensor cores work on the
// current one (software pipelining), so global latency overlaps the multiply-adds.
//
// Staging: every invocation loads 8-byte vectors (four halves, `vec4<f16>`) and stores each as one
// `vec4<f16>` into workgroup memory, from which the fragments are loaded through that vector type
// (SPV_KHR_cooperative_matrix reads the pointed-to memory as the matrix's component type; the
// strides count vectors: 10 and 34 for the 40- and 136-half rows). History, 4096³ on the H100:
// a first version loaded 16 bytes per invocation and stored them as eight scalar halves, which hit
// only 8 of the 32 banks per instruction (1.63 ms; with the staging removed 0.71 ms, session 21);
// one 32-bit word per invocation stored as two halves ran Nt128 in 1.15 ms, Tn128 in 1.05 ms
// (session 21), written out without branches (the prefetch of the last step reloads its own
// tiles, and the step's two 16-deep halves are not a loop) 0.98 and 0.84 ms (session 22). WGSL
// stores into an `array<f16>` one half at a time, so those kernels spent two store instructions
// per word; staging through vector arrays (session 30's kernel lab, same operands, the same
// products bit for bit) took Nt128 / Tn128 from 939 / 842 µs (halves) to 841 / 758 µs (words as
// `vec2<f16>`) and 830 / 713 µs (this kernel: four halves per load and store), and a forward
// chunk's 4096 × 14336 × 4096 from 3.11 / 2.66 ms to 2.81 / 2.48 and 2.73 / 2.32 ms.
// Per 32-deep step an invocation moves eight vectors of each tile: K-contiguous, tile row
// (lid >> 3) + 16u at halves 4·(lid & 7) (eight invocations per 64-byte row segment, rows 80 bytes
// apart in workgroup memory); K-major, row (lid >> 5) + 4u at halves 4·(lid & 31) (a subgroup
// stores one 256-byte row).
//
// Tried in the kernel lab (benches/kernels.rs `wgsl_lab`, session 22, 4096³ on the H100) and
// slower than this kernel: double-buffered tiles with one barrier per step (1.96 ms; 40 KiB of
// workgroup memory), staging through cooperative loads and stores (1.61 ms), no staging at all
// (each subgroup prefetching its own fragments: 2.54 ms), 128×256 blocks of eight subgroups
// (1.18 ms) and 64-deep steps (2.71 ms).
//
// One kernel for every operand layout, chosen per pipeline by the override constants A_T (A
// stored K×M, op(A) = Aᵀ: the Hessian's Xᵀ·X reads X itself) and B_T (B stored N×K, op(B) = Bᵀ:
// a linear layer's X·Wᵀ reads W as it is): ops::CoopOp's Nt128 (A_T false, B_T true), Tn128 and
// Tn128Upper (true, false) and Nn128 (false, false; attention's P·V). An operand is staged one of
// two ways, by whether its stored rows run along K:
//   K-contiguous (A not transposed, B transposed): its 128 rows × 32 columns of K are stored as
//          they are, rows 40 halves apart; the fragments are read row-major (A) or column-major
//          (B, whose rows are op(B)'s columns);
//   K-major (A transposed, B not): its 32 rows of K × 128 columns are stored as they are, rows
//          136 halves apart; the fragments are read column-major (A) or row-major (B).
// Both paddings make consecutive rows start in different banks and keep them 16-byte aligned,
// which NVIDIA's fragment loads need. Every choice below between the two is a `select` or an `if`
// on an override constant, fixed when the pipeline is made, so control flow stays uniform and each
// pipeline compiles to a single-layout kernel. (It replaced three copies of itself, one per
// layout; on the H100 it passed the same tests and ran within 2–4 % of them, measured in
// different calls whose spread is about 3 %: BENCHMARKS.md session 22.)
//
// ACCUMULATE (override, default true) chooses C += op(A)·op(B), each subgroup's sixteen
// accumulators loaded from C, or C = op(A)·op(B) (ops::gemm_coop_overwrite), the accumulators
// starting at zero (a declared coop_mat16x16 is zero-initialised) and C never read: the forward's
// linear layers overwrite their outputs, which they had to clear first: the clear and the load
// were two of the three passes over an f32 C that is larger than both f16 operands together
// (gate_proj on 32768 tokens: C 1.9 GB, X and W 0.4 GB).
//
// Requirements (ops::check_coop_batched and ops::coop_staged_available): M and N multiples of 128,
// K of 32 (of 16 with SPLIT); every offset, row stride and batch stride of A and B, and the lo
// halves' offsets la and lb, a multiple of 4 (A and B are read four halves, 8 bytes, per load); subgroups of exactly 32 invocations (so the 128
// invocations are four subgroups, told apart by subgroup_id); 20 KiB of workgroup memory. The
// grid is exactly (N/128, M/128, batch), and no branch depends on the invocation (frag_a and
// frag_b branch and return early on the override constants, the upper entry's block index on the
// workgroup), so every cooperative operation and barrier stays in uniform control flow. As in
// gemm_coop.wgsl every cooperative load's index and stride is a `let` (naga 30's SPIR-V writer
// needs them cached).

enable f16;
enable wgpu_cooperative_matrix;

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
    sa: u32,
    sb: u32,
    sc: u32,
    ga: u32,
    gb: u32,
    zi: u32,
    xa: u32,
    xb: u32,
    xc: u32,
    // SPLIT: where each operand's lo half starts, in elements after its hi half.
    la: u32,
    lb: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// The f16 operands, read four halves (8 bytes) per load: see "Staging" above.
@group(0) @binding(1) var<storage, read> a: array<vec4<f16>>;
@group(0) @binding(2) var<storage, read> b: array<vec4<f16>>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

// The operands' layouts (see the top of the file).
override A_T: bool = false;
override B_T: bool = true;
// C += op(A)·op(B) (true) or C = op(A)·op(B) (false: C is neither read nor cleared first).
override ACCUMULATE: bool = true;
// Block (bi, bj) sums K only from its first column bj·128 on (ops::CoopOp::Nt128UpperTail, with
// the upper entry and M = N = K): op(B) upper triangular, as U is in GPTAQ's Dp·Uᵀ.
override K_FROM_COL: bool = false;
// Split-f16 operands (ops::CoopOperand::split; split_f16.wgsl): each operand is a hi and a lo f16
// matrix of the same layout, lo starting p.la (A) / p.lb (B) elements after hi, and C gets
// op(Ah)·op(Bh) + op(Ah)·op(Bl) + op(Al)·op(Bh) — GPTAQ's A and its pending flushes, f32 products
// on the tensor cores. Instead of three products (or one with K tripled), each step stages a
// 16-deep slice of both halves of each operand where the plain kernel stages 32 of one: the
// tiles' first 16 columns of K (K-contiguous) or rows (K-major) hold hi, the next 16 lo, so
// frag_a / frag_b at depth 0 read hi and at 16 lo. A step then does 48 multiply-adds per
// subgroup for the staging and 16 fragment loads that the plain kernel spends on 32: two thirds
// of the plain kernels' barriers, global loads, stores and fragment loads per product, one launch
// and one pass over C instead of three. K (the slice's depth) is a multiple of 16.
override SPLIT: bool = false;

// Grouped rasterisation of gemm_coop_128's grid (gemm_coop_128_upper's order is described
// there): consecutive workgroups walk down RASTER block rows before moving one block column on (a
// last group of fewer rows likewise), instead of along a whole block row, so the blocks in flight
// at one time share fewer of A's and B's panels: for a forward GEMM of 32768 tokens × 14336
// outputs (112 × 256 blocks, about 264 resident) a wave in the grid's order reads 2 of A's
// 128-row panels and all 112 of B's, in groups of 8 rows 8 and 33. The H100 ran that GEMM in
// 17.2 ms with 8 rows against 18.6 ms in the grid's order (4 rows 17.6, 16 rows 17.3; BENCHMARKS.md
// session 40). Set by ops::coop_raster (GPTAQ_COOP_RASTER); 0 or 1: the grid as it is
// (bi = y, bj = x).
override RASTER: u32 = 0u;

// Block (bi, bj) of workgroup wg in a grid of nw (see RASTER). Uniform: it derives from
// workgroup_id and num_workgroups only.
fn raster_block(wg: vec3<u32>, nw: vec3<u32>) -> vec2<u32> {
    if (RASTER < 2u) {
        return vec2<u32>(wg.y, wg.x);
    }
    let g = max(RASTER, 1u);
    let l = wg.y * nw.x + wg.x;
    let per = g * nw.x;
    let first = (l / per) * g;
    let rows = min(g, nw.y - first);
    let r = l % per;
    return vec2<u32>(first + r % rows, r / rows);
}

// Where batch entry z's A, B and C start (nested batches as in gemm_coop.wgsl).
fn batch_a(z: u32) -> u32 {
    return p.off_a + (z / p.zi) * p.xa + ((z % p.zi) / p.ga) * p.sa;
}
fn batch_b(z: u32) -> u32 {
    return p.off_b + (z / p.zi) * p.xb + ((z % p.zi) / p.gb) * p.sb;
}
fn batch_c(z: u32) -> u32 {
    return p.off_c + (z / p.zi) * p.xc + (z % p.zi) * p.sc;
}

// One 128×32 (K-contiguous) or 32×128 (K-major) tile of each operand: 4096 halves, plus padding,
// as vectors of four (rows of 10 or 34 vectors).
var<workgroup> ta: array<vec4<f16>, 1280>;
var<workgroup> tb: array<vec4<f16>, 1280>;

// op(A)'s fragment t (rows 16t.. of this subgroup's 64, which start at tile row or column f) at
// depth ks of the staged tile. Every fragment starts on a multiple of four halves (row strides 40
// and 136, f + 16t and ks multiples of 16), so the vector index x / 4 is exact.
fn frag_a(f: u32, t: u32, ks: u32) -> coop_mat16x16<f16, A> {
    if (A_T) {
        let x = ks * 136u + f + 16u * t;
        return coopLoad<coop_mat16x16<f16, A>>(&ta[x >> 2u], 34u);
    }
    let x = (f + 16u * t) * 40u + ks;
    return coopLoadT<coop_mat16x16<f16, A>>(&ta[x >> 2u], 10u);
}

// op(B)'s fragment t (columns 16t.. of this subgroup's 64) at depth ks of the staged tile.
fn frag_b(f: u32, t: u32, ks: u32) -> coop_mat16x16<f16, B> {
    if (B_T) {
        let x = (f + 16u * t) * 40u + ks;
        return coopLoad<coop_mat16x16<f16, B>>(&tb[x >> 2u], 10u);
    }
    let x = ks * 136u + f + 16u * t;
    return coopLoadT<coop_mat16x16<f16, B>>(&tb[x >> 2u], 34u);
}

// Block (bi, bj) of C (rows bi·128.., columns bj·128..) for batch entry z.
fn block128(bi: u32, bj: u32, z: u32, lid: u32, sg: u32) {
    let lda = p.lda;
    let ldb = p.ldb;
    let ldc = p.ldc;
    // K_FROM_COL: the block's K starts at its first column (a multiple of 128, below K there).
    let kb = select(0u, bj * 128u, K_FROM_COL);
    let kdim = p.k - kb;
    // K-contiguous operands (A not transposed, B transposed): see the top of the file.
    let kca = !A_T;
    let kcb = B_T;
    // The tiles' first stored elements: rows bi·128 of A (K-contiguous) or its columns, likewise
    // B, at depth kb.
    let oa = batch_a(z) + select(bi * 128u, bi * 128u * lda, kca) + select(kb * lda, kb, kca);
    let ob = batch_b(z) + select(bj * 128u, bj * 128u * ldb, kcb) + select(kb * ldb, kb, kcb);
    let wy = sg >> 1u;
    let wx = sg & 1u;
    let i0 = bi * 128u + wy * 64u;
    let j0 = bj * 128u + wx * 64u;
    let r0 = batch_c(z) + i0 * ldc + j0;
    let r1 = r0 + 16u * ldc;
    let r2 = r1 + 16u * ldc;
    let r3 = r2 + 16u * ldc;
    let c00i = r0;
    let c01i = r0 + 16u;
    let c02i = r0 + 32u;
    let c03i = r0 + 48u;
    let c10i = r1;
    let c11i = r1 + 16u;
    let c12i = r1 + 32u;
    let c13i = r1 + 48u;
    let c20i = r2;
    let c21i = r2 + 16u;
    let c22i = r2 + 32u;
    let c23i = r2 + 48u;
    let c30i = r3;
    let c31i = r3 + 16u;
    let c32i = r3 + 32u;
    let c33i = r3 + 48u;
    var c00: coop_mat16x16<f32, C>;
    var c01: coop_mat16x16<f32, C>;
    var c02: coop_mat16x16<f32, C>;
    var c03: coop_mat16x16<f32, C>;
    var c10: coop_mat16x16<f32, C>;
    var c11: coop_mat16x16<f32, C>;
    var c12: coop_mat16x16<f32, C>;
    var c13: coop_mat16x16<f32, C>;
    var c20: coop_mat16x16<f32, C>;
    var c21: coop_mat16x16<f32, C>;
    var c22: coop_mat16x16<f32, C>;
    var c23: coop_mat16x16<f32, C>;
    var c30: coop_mat16x16<f32, C>;
    var c31: coop_mat16x16<f32, C>;
    var c32: coop_mat16x16<f32, C>;
    var c33: coop_mat16x16<f32, C>;
    if (ACCUMULATE) {
        c00 = coopLoadT<coop_mat16x16<f32, C>>(&c[c00i], ldc);
        c01 = coopLoadT<coop_mat16x16<f32, C>>(&c[c01i], ldc);
        c02 = coopLoadT<coop_mat16x16<f32, C>>(&c[c02i], ldc);
        c03 = coopLoadT<coop_mat16x16<f32, C>>(&c[c03i], ldc);
        c10 = coopLoadT<coop_mat16x16<f32, C>>(&c[c10i], ldc);
        c11 = coopLoadT<coop_mat16x16<f32, C>>(&c[c11i], ldc);
        c12 = coopLoadT<coop_mat16x16<f32, C>>(&c[c12i], ldc);
        c13 = coopLoadT<coop_mat16x16<f32, C>>(&c[c13i], ldc);
        c20 = coopLoadT<coop_mat16x16<f32, C>>(&c[c20i], ldc);
        c21 = coopLoadT<coop_mat16x16<f32, C>>(&c[c21i], ldc);
        c22 = coopLoadT<coop_mat16x16<f32, C>>(&c[c22i], ldc);
        c23 = coopLoadT<coop_mat16x16<f32, C>>(&c[c23i], ldc);
        c30 = coopLoadT<coop_mat16x16<f32, C>>(&c[c30i], ldc);
        c31 = coopLoadT<coop_mat16x16<f32, C>>(&c[c31i], ldc);
        c32 = coopLoadT<coop_mat16x16<f32, C>>(&c[c32i], ldc);
        c33 = coopLoadT<coop_mat16x16<f32, C>>(&c[c33i], ldc);
    }
    // This invocation's eight vectors of each tile, vector lid + 128·u: K-contiguous, in tile row
    // (lid >> 3) + 16u at halves 4·(lid & 7), consecutive ones 16 rows = 4·ld vectors apart in
    // a[] / b[] and 160 vectors in workgroup memory; K-major, in row (lid >> 5) + 4u at halves
    // 4·(lid & 31), ld vectors and 136 apart. Offsets and strides are multiples of 4
    // (ops::check_coop_batched): the quartering is exact.
    // SPLIT: K-contiguous, the lanes with (lid & 7) ≥ 4 load lo's columns 4·(lid & 3) instead of
    // hi's 4·(lid & 7); K-major, vectors 4–7 (rows 16–31 of the tile) load lo's rows 0–15
    // instead of hi's rows 16–31. `va` is vector 4's distance from vector 0.
    let ka = select((lid & 7u) * 4u, (lid & 3u) * 4u + select(0u, p.la, (lid & 4u) != 0u), SPLIT);
    let kb4 = select((lid & 7u) * 4u, (lid & 3u) * 4u + select(0u, p.lb, (lid & 4u) != 0u), SPLIT);
    let wa = select(
        (oa + (lid >> 5u) * lda + (lid & 31u) * 4u) >> 2u,
        (oa + (lid >> 3u) * lda + ka) >> 2u,
        kca,
    );
    let wb = select(
        (ob + (lid >> 5u) * ldb + (lid & 31u) * 4u) >> 2u,
        (ob + (lid >> 3u) * ldb + kb4) >> 2u,
        kcb,
    );
    let ua = select(lda, 4u * lda, kca);
    let ub = select(ldb, 4u * ldb, kcb);
    let va = select(4u * ua, p.la >> 2u, SPLIT && !kca);
    let vb = select(4u * ub, p.lb >> 2u, SPLIT && !kcb);
    // K per step: 32 of one matrix, or 16 of hi and lo each (SPLIT).
    let kstep = select(32u, 16u, SPLIT);
    let sk = (lid >> 5u) * 34u + (lid & 31u);
    let sc = (lid >> 3u) * 10u + (lid & 7u);
    let swa = select(sk, sc, kca);
    let swb = select(sk, sc, kcb);
    let sua = select(136u, 160u, kca);
    let sub = select(136u, 160u, kcb);
    var ra0 = a[wa];
    var ra1 = a[wa + 1u * ua];
    var ra2 = a[wa + 2u * ua];
    var ra3 = a[wa + 3u * ua];
    var ra4 = a[wa + va];
    var ra5 = a[wa + va + 1u * ua];
    var ra6 = a[wa + va + 2u * ua];
    var ra7 = a[wa + va + 3u * ua];
    var rb0 = b[wb];
    var rb1 = b[wb + 1u * ub];
    var rb2 = b[wb + 2u * ub];
    var rb3 = b[wb + 3u * ub];
    var rb4 = b[wb + vb];
    var rb5 = b[wb + vb + 1u * ub];
    var rb6 = b[wb + vb + 2u * ub];
    var rb7 = b[wb + vb + 3u * ub];
    // This subgroup's rows of op(A) and columns of op(B) in the tiles.
    let fa = wy * 64u;
    let fb = wx * 64u;
    for (var kk = 0u; kk < kdim; kk += kstep) {
        // Everyone is done reading the previous tiles.
        workgroupBarrier();
        ta[swa] = ra0;
        ta[swa + 1u * sua] = ra1;
        ta[swa + 2u * sua] = ra2;
        ta[swa + 3u * sua] = ra3;
        ta[swa + 4u * sua] = ra4;
        ta[swa + 5u * sua] = ra5;
        ta[swa + 6u * sua] = ra6;
        ta[swa + 7u * sua] = ra7;
        tb[swb] = rb0;
        tb[swb + 1u * sub] = rb1;
        tb[swb + 2u * sub] = rb2;
        tb[swb + 3u * sub] = rb3;
        tb[swb + 4u * sub] = rb4;
        tb[swb + 5u * sub] = rb5;
        tb[swb + 6u * sub] = rb6;
        tb[swb + 7u * sub] = rb7;
        workgroupBarrier();
        // The next step's tiles, in flight while the tensor cores work on these. The last step
        // loads its own tiles again instead of branching (a uniform `if` around the loads cost
        // 15 % at 4096³ on the H100, BENCHMARKS.md session 22). kn columns of K on are kn / 4
        // vectors (K-contiguous), kn rows kn·ld / 4 vectors (K-major).
        let kn = min(kk + kstep, kdim - kstep);
        let na = wa + select((kn * lda) >> 2u, kn >> 2u, kca);
        let nb = wb + select((kn * ldb) >> 2u, kn >> 2u, kcb);
        ra0 = a[na];
        ra1 = a[na + 1u * ua];
        ra2 = a[na + 2u * ua];
        ra3 = a[na + 3u * ua];
        ra4 = a[na + va];
        ra5 = a[na + va + 1u * ua];
        ra6 = a[na + va + 2u * ua];
        ra7 = a[na + va + 3u * ua];
        rb0 = b[nb];
        rb1 = b[nb + 1u * ub];
        rb2 = b[nb + 2u * ub];
        rb3 = b[nb + 3u * ub];
        rb4 = b[nb + vb];
        rb5 = b[nb + vb + 1u * ub];
        rb6 = b[nb + vb + 2u * ub];
        rb7 = b[nb + vb + 3u * ub];
        if (SPLIT) {
            // hi·hi, hi·lo, lo·hi of the 16-deep slice (split_f16.wgsl drops lo·lo, below 2^−22
            // of each product), into the same accumulators.
            {
                let ah0 = frag_a(fa, 0u, 0u);
                let ah1 = frag_a(fa, 1u, 0u);
                let ah2 = frag_a(fa, 2u, 0u);
                let ah3 = frag_a(fa, 3u, 0u);
                let bh0 = frag_b(fb, 0u, 0u);
                let bh1 = frag_b(fb, 1u, 0u);
                let bh2 = frag_b(fb, 2u, 0u);
                let bh3 = frag_b(fb, 3u, 0u);
                c00 = coopMultiplyAdd(ah0, bh0, c00);
                c01 = coopMultiplyAdd(ah0, bh1, c01);
                c02 = coopMultiplyAdd(ah0, bh2, c02);
                c03 = coopMultiplyAdd(ah0, bh3, c03);
                c10 = coopMultiplyAdd(ah1, bh0, c10);
                c11 = coopMultiplyAdd(ah1, bh1, c11);
                c12 = coopMultiplyAdd(ah1, bh2, c12);
                c13 = coopMultiplyAdd(ah1, bh3, c13);
                c20 = coopMultiplyAdd(ah2, bh0, c20);
                c21 = coopMultiplyAdd(ah2, bh1, c21);
                c22 = coopMultiplyAdd(ah2, bh2, c22);
                c23 = coopMultiplyAdd(ah2, bh3, c23);
                c30 = coopMultiplyAdd(ah3, bh0, c30);
                c31 = coopMultiplyAdd(ah3, bh1, c31);
                c32 = coopMultiplyAdd(ah3, bh2, c32);
                c33 = coopMultiplyAdd(ah3, bh3, c33);
                let bl0 = frag_b(fb, 0u, 16u);
                let bl1 = frag_b(fb, 1u, 16u);
                let bl2 = frag_b(fb, 2u, 16u);
                let bl3 = frag_b(fb, 3u, 16u);
                c00 = coopMultiplyAdd(ah0, bl0, c00);
                c01 = coopMultiplyAdd(ah0, bl1, c01);
                c02 = coopMultiplyAdd(ah0, bl2, c02);
                c03 = coopMultiplyAdd(ah0, bl3, c03);
                c10 = coopMultiplyAdd(ah1, bl0, c10);
                c11 = coopMultiplyAdd(ah1, bl1, c11);
                c12 = coopMultiplyAdd(ah1, bl2, c12);
                c13 = coopMultiplyAdd(ah1, bl3, c13);
                c20 = coopMultiplyAdd(ah2, bl0, c20);
                c21 = coopMultiplyAdd(ah2, bl1, c21);
                c22 = coopMultiplyAdd(ah2, bl2, c22);
                c23 = coopMultiplyAdd(ah2, bl3, c23);
                c30 = coopMultiplyAdd(ah3, bl0, c30);
                c31 = coopMultiplyAdd(ah3, bl1, c31);
                c32 = coopMultiplyAdd(ah3, bl2, c32);
                c33 = coopMultiplyAdd(ah3, bl3, c33);
                let al0 = frag_a(fa, 0u, 16u);
                let al1 = frag_a(fa, 1u, 16u);
                let al2 = frag_a(fa, 2u, 16u);
                let al3 = frag_a(fa, 3u, 16u);
                c00 = coopMultiplyAdd(al0, bh0, c00);
                c01 = coopMultiplyAdd(al0, bh1, c01);
                c02 = coopMultiplyAdd(al0, bh2, c02);
                c03 = coopMultiplyAdd(al0, bh3, c03);
                c10 = coopMultiplyAdd(al1, bh0, c10);
                c11 = coopMultiplyAdd(al1, bh1, c11);
                c12 = coopMultiplyAdd(al1, bh2, c12);
                c13 = coopMultiplyAdd(al1, bh3, c13);
                c20 = coopMultiplyAdd(al2, bh0, c20);
                c21 = coopMultiplyAdd(al2, bh1, c21);
                c22 = coopMultiplyAdd(al2, bh2, c22);
                c23 = coopMultiplyAdd(al2, bh3, c23);
                c30 = coopMultiplyAdd(al3, bh0, c30);
                c31 = coopMultiplyAdd(al3, bh1, c31);
                c32 = coopMultiplyAdd(al3, bh2, c32);
                c33 = coopMultiplyAdd(al3, bh3, c33);
            }
        } else {
            // The step's two 16-deep halves, written out: as a two-pass loop the kernel ran slower
            // (BENCHMARKS.md session 22).
            {
                let ks = 0u;
                let a0 = frag_a(fa, 0u, ks);
                let a1 = frag_a(fa, 1u, ks);
                let a2 = frag_a(fa, 2u, ks);
                let a3 = frag_a(fa, 3u, ks);
                let b0 = frag_b(fb, 0u, ks);
                let b1 = frag_b(fb, 1u, ks);
                let b2 = frag_b(fb, 2u, ks);
                let b3 = frag_b(fb, 3u, ks);
                c00 = coopMultiplyAdd(a0, b0, c00);
                c01 = coopMultiplyAdd(a0, b1, c01);
                c02 = coopMultiplyAdd(a0, b2, c02);
                c03 = coopMultiplyAdd(a0, b3, c03);
                c10 = coopMultiplyAdd(a1, b0, c10);
                c11 = coopMultiplyAdd(a1, b1, c11);
                c12 = coopMultiplyAdd(a1, b2, c12);
                c13 = coopMultiplyAdd(a1, b3, c13);
                c20 = coopMultiplyAdd(a2, b0, c20);
                c21 = coopMultiplyAdd(a2, b1, c21);
                c22 = coopMultiplyAdd(a2, b2, c22);
                c23 = coopMultiplyAdd(a2, b3, c23);
                c30 = coopMultiplyAdd(a3, b0, c30);
                c31 = coopMultiplyAdd(a3, b1, c31);
                c32 = coopMultiplyAdd(a3, b2, c32);
                c33 = coopMultiplyAdd(a3, b3, c33);
            }
            {
                let ks = 16u;
                let a0 = frag_a(fa, 0u, ks);
                let a1 = frag_a(fa, 1u, ks);
                let a2 = frag_a(fa, 2u, ks);
                let a3 = frag_a(fa, 3u, ks);
                let b0 = frag_b(fb, 0u, ks);
                let b1 = frag_b(fb, 1u, ks);
                let b2 = frag_b(fb, 2u, ks);
                let b3 = frag_b(fb, 3u, ks);
                c00 = coopMultiplyAdd(a0, b0, c00);
                c01 = coopMultiplyAdd(a0, b1, c01);
                c02 = coopMultiplyAdd(a0, b2, c02);
                c03 = coopMultiplyAdd(a0, b3, c03);
                c10 = coopMultiplyAdd(a1, b0, c10);
                c11 = coopMultiplyAdd(a1, b1, c11);
                c12 = coopMultiplyAdd(a1, b2, c12);
                c13 = coopMultiplyAdd(a1, b3, c13);
                c20 = coopMultiplyAdd(a2, b0, c20);
                c21 = coopMultiplyAdd(a2, b1, c21);
                c22 = coopMultiplyAdd(a2, b2, c22);
                c23 = coopMultiplyAdd(a2, b3, c23);
                c30 = coopMultiplyAdd(a3, b0, c30);
                c31 = coopMultiplyAdd(a3, b1, c31);
                c32 = coopMultiplyAdd(a3, b2, c32);
                c33 = coopMultiplyAdd(a3, b3, c33);
            }
        }
    }
    coopStoreT(c00, &c[c00i], ldc);
    coopStoreT(c01, &c[c01i], ldc);
    coopStoreT(c02, &c[c02i], ldc);
    coopStoreT(c03, &c[c03i], ldc);
    coopStoreT(c10, &c[c10i], ldc);
    coopStoreT(c11, &c[c11i], ldc);
    coopStoreT(c12, &c[c12i], ldc);
    coopStoreT(c13, &c[c13i], ldc);
    coopStoreT(c20, &c[c20i], ldc);
    coopStoreT(c21, &c[c21i], ldc);
    coopStoreT(c22, &c[c22i], ldc);
    coopStoreT(c23, &c[c23i], ldc);
    coopStoreT(c30, &c[c30i], ldc);
    coopStoreT(c31, &c[c31i], ldc);
    coopStoreT(c32, &c[c32i], ldc);
    coopStoreT(c33, &c[c33i], ldc);
}

// The full grid (N/128, M/128, batch): ops::CoopOp's Nt128, Tn128 and Nn128.
@compute @workgroup_size(128)
fn gemm_coop_128(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nw: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
) {
    let bl = raster_block(wg, nw);
    block128(bl.x, bl.y, wg.z, lid, sg);
}


// gemm_coop_128 on the blocks of a square C on or above the diagonal only (bi ≤ bj): a
// symmetric product such as the Hessian's Xᵀ·X at half the work; the caller mirrors the upper
// triangle into the lower one (ops::mirror_upper). With K_FROM_COL, the upper triangle of a
// product with an upper-triangular op(B) (ops::CoopOp::Nt128UpperTail). The grid is one row of
// bn·(bn + 1)/2 workgroups (bn = N/128), numbered column by column: t = bj·(bj + 1)/2 + bi.
// Everything here derives from workgroup_id, so control flow stays uniform.
//
// With RASTER ≥ 2 dividing the block columns bn, the triangle is taken in chunks of RASTER block
// columns, each chunk from the top in bands of RASTER rows (RASTER² blocks a band, the diagonal
// band's triangle last): the blocks in flight then read a few bands' row panels and one chunk's
// column panels, where the column order had them read all the rows above a few columns (the
// Hessian of a 14336-wide input: 112 row panels of 8 MiB per 32768-token batch). A chunk starts
// where the plain numbering's column RASTER·c does (both count the T(RASTER·c) blocks of the
// columns before it), so only the order within a chunk changes. On an H100 at 32768 tokens that
// took the 14336-wide Hessian from 27.0 to 25.4 ms, left the 8192-wide one as it was and slowed
// the 4096-wide one from 1.97 to 2.06 ms, so ops::coop_raster_upper sets RASTER 8 from 12288
// columns on only (BENCHMARKS.md session 41).
@compute @workgroup_size(128)
fn gemm_coop_128_upper(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
) {
    let t = wg.x;
    let j = tri_col(t);
    // At least 1: naga refuses a remainder by a constant 0 even on a path RASTER < 2 never takes.
    let g = max(RASTER, 1u);
    let bn = p.n / 128u;
    if (g < 2u || bn % g != 0u) {
        block128(t - tri(j), j, wg.z, lid, sg);
        return;
    }
    let c0 = (j / g) * g;
    let u = t - tri(c0);
    let full = c0 * g;
    if (u < full) {
        let w = u % (g * g);
        block128((u / (g * g)) * g + w % g, c0 + w / g, wg.z, lid, sg);
    } else {
        let v = u - full;
        let lc = tri_col(v);
        block128(c0 + v - tri(lc), c0 + lc, wg.z, lid, sg);
    }
}

// T(x) = x(x + 1)/2: the blocks on and above the diagonal of the first x block columns.
fn tri(x: u32) -> u32 {
    return x * (x + 1u) / 2u;
}

// The column j with T(j) ≤ t < T(j + 1): ⌊(√(8t + 1) − 1)/2⌋, corrected by one either way for
// f32 rounding.
fn tri_col(t: u32) -> u32 {
    var j = u32((sqrt(f32(8u * t + 1u)) - 1.0) * 0.5);
    if (tri(j + 1u) <= t) {
        j += 1u;
    }
    if (tri(j) > t) {
        j -= 1u;
    }
    return j;
}
