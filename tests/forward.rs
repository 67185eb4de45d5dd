//! Forward pass: every decoder-layer kernel against the f64 CPU reference on awkward shapes, the full
//! model against transformers' logits (golden file), greedy decoding against llama2.c's output, and
//! GPU perplexity against the CPU reference.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use std::sync::atomic::AtomicBool;

use gptaq_studio::eval::{self, EvalOptions};
use gptaq_studio::forward::{self, AttnShape, GpuLayer, LayerScratch, Rope, cpu};
use gptaq_studio::gpu::{GpuContext, test_context};
use gptaq_studio::model::synthetic::SyntheticModel;
use gptaq_studio::model::weights::SafetensorsModel;
use gptaq_studio::model::{ModelConfig, RopeScaling, WeightSource};

fn config(hidden: usize, inter: usize, heads: usize, kv: usize, hd: usize) -> ModelConfig {
    let mut c = SyntheticModel::demo_config();
    c.hidden_size = hidden;
    c.intermediate_size = inter;
    c.num_heads = heads;
    c.num_kv_heads = kv;
    c.head_dim = hd;
    c.num_layers = 1;
    c.vocab_size = 97;
    c
}

/// Layer 0 of a synthetic model with `cfg`, the embeddings of `nseq × seqlen` fixed tokens, and
/// the f64 reference output of the layer on them.
fn layer_case(
    cfg: &ModelConfig,
    nseq: usize,
    seqlen: usize,
    seed: u64,
) -> (gptaq_studio::model::LayerWeights, Vec<f32>, Vec<f64>) {
    let model = SyntheticModel::with_config(cfg.clone(), seed);
    let lw = model.layer(0).unwrap();
    let ids: Vec<u32> = (0..nseq * seqlen)
        .map(|i| ((i * 31 + 7) % cfg.vocab_size) as u32)
        .collect();
    let h0 = model.embed(&ids).unwrap();
    let mut expected: Vec<f64> = h0.iter().map(|&v| f64::from(v)).collect();
    cpu::layer_forward(cfg, &lw, &mut expected, nseq, seqlen);
    (lw, h0, expected)
}

/// One layer on the GPU vs f64, relative to the output's RMS.
fn check_layer(
    ctx: &GpuContext,
    name: &str,
    cfg: ModelConfig,
    nseq: usize,
    seqlen: usize,
    seed: u64,
) {
    let t = nseq * seqlen;
    let (lw, h0, expected) = layer_case(&cfg, nseq, seqlen, seed);

    let gl = GpuLayer::upload(ctx, &cfg, &lw).unwrap();
    let rope = Rope::new(ctx, &cfg, seqlen).unwrap();
    let s = LayerScratch::new(ctx, &cfg, t).unwrap();
    let h = ctx.upload("h", &h0).unwrap();
    let mut rec = ctx.recorder();
    forward::forward_layer(&mut rec, &gl, &rope, &h, &s, nseq, seqlen).unwrap();
    rec.submit();
    let got = ctx.read(&h).unwrap();
    let rms = (expected.iter().map(|v| v * v).sum::<f64>() / expected.len() as f64).sqrt();
    common::assert_close(
        &format!(
            "{name}: layer output, hidden {} heads {}/{} hd {} nseq {nseq} seqlen {seqlen}",
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        ),
        &got,
        &expected,
        2e-5 * rms.max(1.0),
        1e-4,
    );
}

#[test]
fn layer_matches_reference_on_awkward_shapes() {
    // One context for all cases: NVIDIA's driver runs out of devices after a few dozen in one
    // test process.
    let Some(ctx) = test_context() else { return };
    // (name, config, nseq, seqlen): GQA 8/4 with hd 8 and intermediate 172 (stories260K-like);
    // seqlen 1, primes, more than one 64-key chunk; MHA; hd 128 and 256 (several dims per thread).
    check_layer(&ctx, "gqa-hd8", config(64, 172, 8, 4, 8), 2, 67, 1);
    check_layer(&ctx, "seqlen1", config(64, 172, 8, 4, 8), 3, 1, 2);
    check_layer(&ctx, "mha-prime", config(36, 50, 3, 3, 12), 1, 131, 3);
    check_layer(&ctx, "hd128", config(256, 96, 2, 1, 128), 2, 13, 4);
    check_layer(&ctx, "hd256", config(256, 64, 2, 2, 256), 1, 70, 5);
    // Several query blocks (BQ 64) and key chunks (BK 32) per sequence at hd 128, GQA 2.
    check_layer(&ctx, "hd128-blocks", config(256, 96, 2, 1, 128), 2, 131, 10);
}

/// The tensor-core linears (`GpuLayer::enable_tensor_cores`: f16 operands, f32 accumulation)
/// against the f64 reference, where the adapter grants cooperative matrices (the GPU machine; on
/// lavapipe enabling them must report false and change nothing). 2 × 100 tokens with 64-token f16
/// chunks: three whole chunks and eight rows left for the f32 GEMM, attention on the f32 kernel;
/// the second config's gate/up (200 rows) and down (K = 200) do not tile and stay f32 next to
/// tiled q/k/v/o; 2 × 128 tokens put the attention on tensor cores too (`forward::attend_tc`).
#[test]
fn tensor_core_layer_matches_reference_where_granted() {
    let Some(ctx) = test_context() else { return };
    for (name, cfg, seqlen) in [
        ("tiled", config(256, 192, 4, 2, 64), 100),
        ("partly tiled", config(256, 200, 4, 2, 64), 100),
        ("tiled with attention", config(256, 192, 4, 2, 64), 128),
    ] {
        let nseq = 2;
        let t = nseq * seqlen;
        let (lw, h0, expected) = layer_case(&cfg, nseq, seqlen, 11);
        let mut gl = GpuLayer::upload(&ctx, &cfg, &lw).unwrap();
        let mut rec = ctx.recorder();
        let on = gl.enable_tensor_cores(&mut rec, 64, seqlen).unwrap();
        rec.submit();
        use gptaq_studio::model::ModuleKind;
        if !gptaq_studio::gpu::ops::coop_available(&ctx) {
            eprintln!(
                "note: adapter without cooperative matrices; tensor-core forward not exercised"
            );
            assert!(!on && ModuleKind::ALL.iter().all(|&m| !gl.tensor_cores(m)));
            return;
        }
        let tiled: Vec<bool> = ModuleKind::ALL
            .iter()
            .map(|&m| gl.tensor_cores(m))
            .collect();
        let want_tiled = cfg.intermediate_size % 32 == 0;
        for (m, &on) in ModuleKind::ALL.iter().zip(&tiled) {
            let expect =
                !matches!(m, ModuleKind::Gate | ModuleKind::Up | ModuleKind::Down) || want_tiled;
            assert_eq!(on, expect, "{name}: {m:?} on tensor cores");
        }
        // The duplicate (the FP stream's copy) carries the f16 weights along.
        let mut rec = ctx.recorder();
        let dup = gl.duplicate(&mut rec).unwrap();
        rec.submit();
        // A layer sharing this one's scratch (the next layer's upload) allocates only its f16
        // weights: less than one enabled on its own.
        let grown = |shared| {
            let mut other = GpuLayer::upload(&ctx, &cfg, &lw).unwrap();
            let before = ctx.memory().0;
            let mut rec = ctx.recorder();
            other
                .enable_tensor_cores_with(&mut rec, 64, (seqlen, 1), shared)
                .unwrap();
            rec.submit();
            ctx.memory().0 - before
        };
        let (own, with_shared) = (grown(None), grown(gl.tc_scratch()));
        assert!(
            with_shared < own,
            "{name}: sharing the scratch grew memory by {with_shared} B, alone {own} B"
        );
        let rope = Rope::new(&ctx, &cfg, seqlen).unwrap();
        let s = LayerScratch::new(&ctx, &cfg, t).unwrap();
        // Compared on the layer's update (output − input), which the residual would dwarf.
        let want: Vec<f64> = expected
            .iter()
            .zip(&h0)
            .map(|(e, &x)| e - f64::from(x))
            .collect();
        let rms = (want.iter().map(|v| v * v).sum::<f64>() / want.len() as f64).sqrt();
        for (which, layer) in [("uploaded", &gl), ("duplicate", &dup)] {
            let h = ctx.upload("h", &h0).unwrap();
            let mut rec = ctx.recorder();
            forward::forward_layer(&mut rec, layer, &rope, &h, &s, nseq, seqlen).unwrap();
            rec.submit();
            let got: Vec<f32> = ctx
                .read(&h)
                .unwrap()
                .iter()
                .zip(&h0)
                .map(|(g, x)| g - x)
                .collect();
            // f16 operands: about 2^-11 relative per operand, so 1e-2 of the update's RMS (the
            // f32 path meets 2e-5); a chunk or the f32 tail left out is off by O(1).
            common::assert_close(
                &format!("tensor-core layer {name} ({which}) update, nseq {nseq} seqlen {seqlen}"),
                &got,
                &want,
                1e-2 * rms,
                1e-2,
            );
        }
    }
}

/// `GpuLayer::release_f32` (the pipeline frees gate/up's f32 weights once solved in tensor-core
/// runs, plan::gate_up_f32_released): the forward then reads their f16 copies only, so batches
/// whose rows tile the tensor-core blocks (2 × 128 tokens) give the same output bit for bit as
/// before, and a batch with rows left for the f32 GEMM (2 × 100: 8 rows) is refused instead of
/// reading a freed weight; replacing a freed weight is refused too. Without f16 copies (lavapipe:
/// no cooperative matrices) nothing is freed.
#[test]
fn freed_f32_weights_leave_the_tensor_core_forward_unchanged() {
    use gptaq_studio::model::ModuleKind;
    let Some(ctx) = test_context() else { return };
    let cfg = config(256, 192, 4, 2, 64);
    let gate_up = [ModuleKind::Gate, ModuleKind::Up];
    for seqlen in [128, 100] {
        let nseq = 2;
        let t = nseq * seqlen;
        let (lw, h0, _) = layer_case(&cfg, nseq, seqlen, 12);
        let mut gl = GpuLayer::upload(&ctx, &cfg, &lw).unwrap();
        let mut rec = ctx.recorder();
        gl.enable_tensor_cores(&mut rec, t, seqlen).unwrap();
        rec.submit();
        if !gptaq_studio::gpu::ops::coop_available(&ctx) {
            let e = gl.release_f32(&ctx, &gate_up).unwrap_err().to_string();
            assert!(e.contains("no f16 copy"), "{e}");
            assert!(gate_up.iter().all(|&m| !gl.f32_released(m)));
            eprintln!(
                "note: adapter without cooperative matrices; freed f32 weights not exercised"
            );
            return;
        }
        let rope = Rope::new(&ctx, &cfg, seqlen).unwrap();
        let s = LayerScratch::new(&ctx, &cfg, t).unwrap();
        let run = |layer: &GpuLayer| {
            let h = ctx.upload("h", &h0).unwrap();
            let mut rec = ctx.recorder();
            let r = forward::forward_layer(&mut rec, layer, &rope, &h, &s, nseq, seqlen);
            rec.submit();
            r.map(|()| ctx.read(&h).unwrap())
        };
        let before = run(&gl).unwrap();
        gl.release_f32(&ctx, &gate_up).unwrap();
        assert!(
            gate_up
                .iter()
                .all(|&m| gl.f32_released(m) && !gl.released(m))
        );
        assert!(gate_up.iter().all(|&m| gl.tensor_cores(m)));
        let q = ctx
            .upload("q", &lw.linear(ModuleKind::Gate).weight)
            .unwrap();
        let mut rec = ctx.recorder();
        let e = gl
            .set_linear_gpu(&mut rec, ModuleKind::Gate, &q)
            .unwrap_err();
        assert!(e.to_string().contains("was freed"), "{e}");
        match (t % forward::TC_ROW_TILE, run(&gl)) {
            (0, Ok(after)) => {
                let diff = before
                    .iter()
                    .zip(&after)
                    .position(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!(
                    diff, None,
                    "seqlen {seqlen}: output changed after freeing f32 weights"
                );
            }
            (0, Err(e)) => panic!("seqlen {seqlen}: tiled batch refused: {e}"),
            (_, Ok(_)) => panic!("seqlen {seqlen}: {t} rows ran with freed f32 weights"),
            (_, Err(e)) => assert!(e.to_string().contains("do not tile"), "{e}"),
        }
    }
}

/// The attention kernel's tiles fit its fixed workgroup arrays and named accumulators for every
/// supported head dim (the numbers are those of `attention.wgsl`'s header).
#[test]
fn attention_tiles_fit_the_kernel() {
    use gptaq_studio::forward::{ATTN_BK, ATTN_BQ, AttnTiles, MAX_HEAD_DIM, attention_tiles};
    // 256 invocations: 16 row bands of 4 rows × 16 key pairs (scores) / dim quads (outputs).
    assert_eq!((ATTN_BQ, ATTN_BK), (64, 32));
    for hd in (2..=MAX_HEAD_DIM).step_by(2) {
        let AttnTiles { ds, ks, nv } = attention_tiles(hd);
        let hdp = hd.next_multiple_of(4);
        // Q / K slices: [ds][17] vec4 / vec2 in `stage` (272 vec4) and `kt` (272 vec2), staged by
        // invocations tid < 16·ds; the slices cover hd with less than one slice of padding.
        assert!((1..=16).contains(&ds), "hd {hd}: ds {ds}");
        assert!(ds * 17 <= 272, "hd {hd}: Q/K slice {ds}×17 > 272");
        let slices = hd.div_ceil(ds);
        assert!(
            slices * ds >= hd && (slices - 1) * ds < hd,
            "hd {hd}: ds {ds}"
        );
        assert_eq!(
            slices,
            hd.div_ceil(16),
            "hd {hd}: ds {ds} takes extra slices"
        );
        // V slices: ks keys × hdp dims, one vec4 per invocation (≤ 256), and the idle lanes'
        // reads up to ks·hdp/4 + 16 stay inside `stage`; ks divides the 32-key chunk (P rows).
        assert!(ks.is_power_of_two() && ks <= ATTN_BK, "hd {hd}: ks {ks}");
        assert!(
            ks * hdp <= 1024,
            "hd {hd}: V slice {ks}×{hdp} > 1024 floats"
        );
        assert!(ks * hdp / 4 + 16 <= 272, "hd {hd}: V reads past `stage`");
        assert!(
            ks == ATTN_BK || 2 * ks * hdp > 1024,
            "hd {hd}: ks {ks} not maximal"
        );
        // Output tile: dims 64·g + 4·tx..+3, g < nv ≤ 4 (sixteen named vec4 accumulators).
        assert!((1..=4).contains(&nv), "hd {hd}: nv {nv}");
        assert!(nv * 64 >= hdp && (nv - 1) * 64 < hd, "hd {hd}: nv {nv}");
    }
    assert_eq!(
        attention_tiles(128),
        AttnTiles {
            ds: 16,
            ks: 8,
            nv: 2
        }
    );
    assert_eq!(
        attention_tiles(256),
        AttnTiles {
            ds: 16,
            ks: 4,
            nv: 4
        }
    );
    assert_eq!(
        attention_tiles(2),
        AttnTiles {
            ds: 2,
            ks: 32,
            nv: 1
        }
    );
    assert_eq!(
        attention_tiles(20),
        AttnTiles {
            ds: 10,
            ks: 32,
            nv: 1
        }
    );
}

/// The attention shape of `nseq` sequences of `seqlen` tokens, `heads` query heads of `hd` dims
/// and `kv_heads` key/value heads.
fn attn_shape(hd: usize, seqlen: usize, nseq: usize, heads: usize, kv_heads: usize) -> AttnShape {
    AttnShape {
        heads,
        kv_heads,
        head_dim: hd,
        nseq,
        seqlen,
    }
}

/// One causal GQA attention dispatch ([`forward::attend`]) on random q/k/v against the f64
/// reference, element by element, within `2e-5·rms(expected) + 1e-5`.
fn check_attend(ctx: &GpuContext, shape: AttnShape, seed: u64) {
    use rand::{Rng, SeedableRng};
    let AttnShape {
        heads,
        kv_heads,
        head_dim: hd,
        nseq,
        seqlen,
    } = shape;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let t = nseq * seqlen;
    // q ~ U(-6, 6), k ~ U(-1, 1): scaled scores with a standard deviation of about 2, so the
    // softmax is peaked and its running maximum moves from chunk to chunk (exercises the
    // online-softmax rescaling); a rising offset on some dims of k makes later keys win more
    // often in some heads.
    let q: Vec<f32> = (0..t * heads * hd)
        .map(|_| rng.random_range(-6.0f32..6.0))
        .collect();
    let k: Vec<f32> = (0..t * kv_heads * hd)
        .map(|i| {
            let pos = (i / (kv_heads * hd)) % seqlen;
            let ramp = if i % 3 == 0 { 0.01 * pos as f32 } else { 0.0 };
            rng.random_range(-1.0f32..1.0) + ramp
        })
        .collect();
    let v: Vec<f32> = (0..t * kv_heads * hd)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let f64s = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
    let expected =
        cpu::causal_attention(&f64s(&q), &f64s(&k), &f64s(&v), heads, kv_heads, hd, seqlen);
    let qb = ctx.upload("q", &q).unwrap();
    let kb = ctx.upload("k", &k).unwrap();
    let vb = ctx.upload("v", &v).unwrap();
    // NaN-filled output: an element the kernel forgets to write fails the comparison.
    let ob = ctx.upload("out", &vec![f32::NAN; t * heads * hd]).unwrap();
    let mut rec = ctx.recorder();
    forward::attend(&mut rec, &qb, &kb, &vb, &ob, shape).unwrap();
    rec.submit();
    let got = ctx.read(&ob).unwrap();
    let rms = (expected.iter().map(|x| x * x).sum::<f64>() / expected.len() as f64).sqrt();
    let tol = 2e-5 * rms + 1e-5;
    let qd = heads * hd;
    let mut bad = 0;
    let mut first = None;
    for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
        #[allow(clippy::neg_cmp_op_on_partial_ord)] // NaN must count as out of tolerance
        if !((f64::from(g) - e).abs() <= tol) {
            bad += 1;
            first.get_or_insert((i, g, e));
        }
    }
    if let Some((i, g, e)) = first {
        let (tok, head, d) = (i / qd, i % qd / hd, i % hd);
        panic!(
            "attention hd {hd} seqlen {seqlen} nseq {nseq} heads {heads}/{kv_heads}: {bad} of {} \
             elements off by more than {tol:.3e}; first at sequence {} position {} head {head} \
             dim {d} (flat {i}): got {g}, expected {e}",
            got.len(),
            tok / seqlen,
            tok % seqlen
        );
    }
}

/// A host stand-in for `ops::gemm_coop_batched` with the same contract (f16 operands, C += op(A)
/// op(B) per batch entry, or C = op(A) op(B) for the staged kernels only; the same checks):
/// submits what `rec` holds, reads the operands back,
/// multiplies in f64 and writes C. Lets `attend_tc_with`'s offsets and strides be checked on
/// adapters without cooperative matrices (lavapipe); the GPU machine runs the real kernel.
#[allow(clippy::too_many_arguments)]
fn host_coop_gemm(
    rec: &mut gptaq_studio::gpu::Recorder<'_>,
    op: gptaq_studio::gpu::ops::CoopOp,
    (m, n, k): (usize, usize, usize),
    batch: gptaq_studio::gpu::ops::CoopBatch,
    a: gptaq_studio::gpu::ops::CoopOperand<'_>,
    b: gptaq_studio::gpu::ops::CoopOperand<'_>,
    c: gptaq_studio::gpu::ops::MatView<'_>,
    accumulate: bool,
) -> Result<(), gptaq_studio::gpu::GpuError> {
    use gptaq_studio::gpu::ops;
    ops::check_coop_batched(op, (m, n, k), &batch, &a, &b, &c)?;
    if !accumulate && !op.staged() {
        return Err(gptaq_studio::gpu::GpuError::Validation(format!(
            "{op:?} only adds"
        )));
    }
    let ctx = rec.ctx();
    std::mem::replace(rec, ctx.recorder()).submit();
    let (av, bv, mut cv) = (ctx.read(a.buf)?, ctx.read(b.buf)?, ctx.read(c.buf)?);
    for z in 0..batch.count() {
        // Outer entry o, inner entry i (ops::CoopBatch).
        let (o, i) = (z / batch.inner, z % batch.inner);
        let (ao, bo) = (
            a.off + o * a.outer + i / a.group * a.stride,
            b.off + o * b.outer + i / b.group * b.stride,
        );
        let co = c.offset + o * batch.c_outer + i * batch.c_stride;
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f64;
                for l in 0..k {
                    let (ta, tb) = op.transposes();
                    let x = if ta {
                        av[ao + l * a.ld + i]
                    } else {
                        av[ao + i * a.ld + l]
                    };
                    let y = if tb {
                        bv[bo + j * b.ld + l]
                    } else {
                        bv[bo + l * b.ld + j]
                    };
                    acc += f64::from(x.to_f32()) * f64::from(y.to_f32());
                }
                let e = &mut cv[co + i * c.ld + j];
                *e = if accumulate {
                    (f64::from(*e) + acc) as f32
                } else {
                    acc as f32
                };
            }
        }
    }
    ctx.write(c.buf, 0, &cv);
    Ok(())
}

/// The tensor-core attention (`forward::attend_tc`) against the f64 reference, on random q/k/v
/// like `check_attend`. With cooperative matrices the real kernels run; without, the chunking,
/// the per-head strides, the key/value groups and the causal softmax (a real shader) are checked
/// through `host_coop_gemm`. f16 operands and probabilities: 1e-2 of the output's RMS (a chunk,
/// head or sequence read from the wrong place is off by O(1)).
fn check_attend_tc(ctx: &GpuContext, shape: AttnShape, (seed, seqs): (u64, usize)) {
    let AttnShape {
        heads,
        kv_heads,
        head_dim: hd,
        nseq,
        seqlen,
    } = shape;
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let t = nseq * seqlen;
    let mut uniform =
        |n: usize, r: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-r..r)).collect() };
    let (q, k, v) = (
        uniform(t * heads * hd, 3.0),
        uniform(t * kv_heads * hd, 1.0),
        uniform(t * kv_heads * hd, 1.0),
    );
    let f64s = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
    let expected =
        cpu::causal_attention(&f64s(&q), &f64s(&k), &f64s(&v), heads, kv_heads, hd, seqlen);
    // Scratch for `seqs` sequences at a time: passes of seqs, the last one possibly shorter.
    let sc = forward::AttnTc::new(
        ctx,
        &AttnShape {
            nseq: seqs,
            ..shape
        },
    )
    .unwrap()
    .expect("shape tiles");
    assert_eq!(sc.sequences(), seqs);
    let (qb, kb, vb) = (
        ctx.upload("q", &q).unwrap(),
        ctx.upload("k", &k).unwrap(),
        ctx.upload("v", &v).unwrap(),
    );
    let ob = ctx.upload("out", &vec![f32::NAN; t * heads * hd]).unwrap();
    let real = gptaq_studio::gpu::ops::coop_available(ctx);
    // Twice through the same scratch: the second call must not see the first's scores.
    for round in 0..2 {
        let mut rec = ctx.recorder();
        if real {
            forward::attend_tc(&mut rec, &qb, &kb, &vb, &ob, shape, &sc).unwrap();
        } else {
            forward::attend_tc_with(
                &mut rec,
                &qb,
                &kb,
                &vb,
                &ob,
                shape,
                &sc,
                &mut host_coop_gemm,
            )
            .unwrap();
        }
        rec.submit();
        let got = ctx.read(&ob).unwrap();
        let rms = (expected.iter().map(|x| x * x).sum::<f64>() / expected.len() as f64).sqrt();
        common::assert_close(
            &format!(
                "tensor-core attention ({}) round {round}: hd {hd} seqlen {seqlen} nseq {nseq} \
                 ({seqs} at a time) heads {heads}/{kv_heads}",
                if real {
                    "cooperative matrices"
                } else {
                    "host GEMM stand-in"
                }
            ),
            &got,
            &expected,
            1e-2 * rms,
            1e-2,
        );
    }
}

/// `attend_tc` over chunk sizes 256 (two chunks), 128 and 64 (three chunks), GQA groups of 2 and
/// 4 and MHA, one to three sequences, taken one, two (three sequences: a pass of two and one of
/// one) or all at a time (the nested batches' sequence strides).
#[test]
fn tensor_core_attention_matches_reference() {
    let Some(ctx) = test_context() else { return };
    check_attend_tc(&ctx, attn_shape(32, 512, 2, 4, 2), (1, 1));
    check_attend_tc(&ctx, attn_shape(32, 512, 2, 4, 2), (1, 2));
    check_attend_tc(&ctx, attn_shape(64, 192, 1, 3, 3), (2, 1));
    check_attend_tc(&ctx, attn_shape(32, 128, 2, 4, 1), (3, 2));
    check_attend_tc(&ctx, attn_shape(32, 128, 3, 4, 2), (4, 2));
}

/// The attention kernel alone against the f64 reference: every tiled head dim class (tiny, not a
/// multiple of 4 or 16, one and several output groups), seqlen 1 and primes spanning several
/// query blocks and key chunks, one and three sequences, MHA and GQA (group sizes 2 and 8).
#[test]
fn attention_kernel_matches_reference() {
    let Some(ctx) = test_context() else { return };
    // (hd, seqlen, nseq, heads, kv_heads)
    let cases = [
        (2, 131, 1, 4, 2),
        (2, 1, 3, 3, 3),
        (8, 67, 3, 8, 1),
        (8, 2, 1, 1, 1),
        (12, 33, 3, 4, 2),
        (12, 131, 1, 3, 3),
        (64, 7, 3, 8, 1),
        (64, 131, 1, 4, 2),
        (64, 1, 1, 3, 3),
        (128, 67, 1, 4, 2),
        (128, 33, 3, 1, 1),
        (128, 2, 3, 8, 1),
        (256, 131, 1, 3, 3),
        (256, 7, 3, 4, 2),
        (256, 67, 3, 8, 1),
    ];
    for (i, &(hd, seqlen, nseq, heads, kv)) in cases.iter().enumerate() {
        check_attend(
            &ctx,
            attn_shape(hd, seqlen, nseq, heads, kv),
            100 + i as u64,
        );
    }
}

/// The kernel is deterministic: the pipeline's solver comparison relies on bit-identical module
/// inputs between two runs of the same forward (a race would show up here as differing bits).
#[test]
fn attention_is_deterministic() {
    let Some(ctx) = test_context() else { return };
    for (hd, seqlen, nseq, heads, kv) in [(64, 131, 2, 4, 2), (16, 70, 1, 6, 3), (128, 67, 1, 2, 1)]
    {
        let t = nseq * seqlen;
        let data = |n: usize, m: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * m) % 1009) as f32 / 250.0 - 2.0)
                .collect()
        };
        let q = ctx.upload("q", &data(t * heads * hd, 7919)).unwrap();
        let k = ctx.upload("k", &data(t * kv * hd, 104_729)).unwrap();
        let v = ctx.upload("v", &data(t * kv * hd, 1_299_709)).unwrap();
        let shape = attn_shape(hd, seqlen, nseq, heads, kv);
        let mut first: Option<Vec<f32>> = None;
        for run in 0..4 {
            let out = ctx.zeros::<f32>("out", t * heads * hd).unwrap();
            let mut rec = ctx.recorder();
            forward::attend(&mut rec, &q, &k, &v, &out, shape).unwrap();
            rec.submit();
            let got = ctx.read(&out).unwrap();
            match &first {
                None => first = Some(got),
                Some(f) => {
                    let diff = f
                        .iter()
                        .zip(&got)
                        .position(|(a, b)| a.to_bits() != b.to_bits());
                    assert!(
                        diff.is_none(),
                        "hd {hd} seqlen {seqlen} nseq {nseq} heads {heads}/{kv}: run {run} differs \
                         from run 0 at {diff:?}"
                    );
                }
            }
        }
    }
}

/// Shapes the kernel cannot run are errors, not wrong answers.
#[test]
fn attend_rejects_bad_shapes() {
    let Some(ctx) = test_context() else { return };
    let buf = ctx.zeros::<f32>("x", 4 * 8 * 64).unwrap();
    let shape = attn_shape(64, 8, 1, 4, 2);
    for (what, bad) in [
        (
            "odd head dim",
            AttnShape {
                head_dim: 7,
                ..shape
            },
        ),
        (
            "head dim > 256",
            AttnShape {
                head_dim: 258,
                ..shape
            },
        ),
        (
            "heads not a multiple",
            AttnShape {
                kv_heads: 3,
                ..shape
            },
        ),
        ("buffers too short", AttnShape { seqlen: 9, ..shape }),
    ] {
        let mut rec = ctx.recorder();
        assert!(
            forward::attend(&mut rec, &buf, &buf, &buf, &buf, bad).is_err(),
            "{what}: accepted"
        );
    }
}

#[test]
fn layer_variants_bias_qknorm_rope_scaling() {
    let Some(ctx) = test_context() else { return };
    let mut qwen2 = config(48, 80, 4, 2, 12);
    qwen2.attention_bias = true;
    check_layer(&ctx, "qwen2-bias", qwen2, 2, 19, 6);
    let mut qwen3 = config(64, 96, 4, 2, 16);
    qwen3.qk_norm = true;
    check_layer(&ctx, "qwen3-qknorm", qwen3, 1, 33, 7);
    let mut mlpb = config(32, 64, 2, 1, 16);
    mlpb.mlp_bias = true;
    check_layer(&ctx, "mlp-bias", mlpb, 2, 5, 8);
    let mut l3 = config(64, 128, 4, 2, 16);
    l3.rope_theta = 500000.0;
    l3.rope_scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64.0,
    };
    check_layer(&ctx, "llama3-rope", l3, 1, 100, 9);
}

#[test]
fn unsupported_head_dim_is_an_error() {
    let Some(ctx) = test_context() else { return };
    let cfg = config(32, 32, 1, 1, 512);
    let model = SyntheticModel::with_config(config(32, 32, 1, 1, 32), 1);
    let lw = model.layer(0).unwrap();
    let e = GpuLayer::upload(&ctx, &cfg, &lw)
        .err()
        .expect("head_dim 512 must be refused");
    assert!(e.to_string().contains("head_dim 512"), "{e}");
}

#[test]
fn tiny_llama_logits_match_transformers() {
    let Some(dir) = common::test_data_dir() else {
        return;
    };
    let Some(ctx) = test_context() else { return };
    let model = SafetensorsModel::open(dir.join("tiny-llama-15m")).unwrap();
    let golden = std::fs::read(dir.join("tiny-llama-15m/golden_logits.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&golden).unwrap();
    let ids_t = st.tensor("input_ids").unwrap();
    let ids: Vec<u32> = match ids_t.dtype() {
        safetensors::Dtype::I64 => ids_t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect(),
        safetensors::Dtype::I32 => ids_t
            .data()
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect(),
        d => panic!("unexpected input_ids dtype {d:?}"),
    };
    let lt = st.tensor("logits").unwrap();
    assert_eq!(lt.dtype(), safetensors::Dtype::F32);
    let expected: Vec<f64> = lt
        .data()
        .chunks_exact(4)
        .map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap())))
        .collect();
    let got = eval::logits(&ctx, &model, &ids).unwrap();
    // bf16 weights widened exactly; differences are f32 summation order only.
    common::assert_close(
        "tiny-llama-15m logits vs transformers fp32 [64, 4096]",
        &got,
        &expected,
        1e-3,
        1e-4,
    );
}

#[test]
fn stories260k_greedy_matches_golden() {
    let Some(dir) = common::test_data_dir() else {
        return;
    };
    let Some(ctx) = test_context() else { return };
    let model = SafetensorsModel::open(dir.join("stories260K")).unwrap();
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("stories260K/golden_greedy_256.json")).unwrap(),
    )
    .unwrap();
    let want: Vec<u32> = golden["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let tok = gptaq_studio::model::tokenizer::Tokenizer::from_dir(dir.join("stories260K")).unwrap();
    let prompt = tok
        .encode(golden["prompt"].as_str().unwrap(), true)
        .unwrap();
    assert_eq!(
        prompt[..],
        want[..prompt.len()],
        "tokenized prompt differs from the golden ids"
    );
    let v = model.config().vocab_size;
    // Greedy decoding is "each next token is the argmax given the prefix"; with the golden prefix
    // fed in full (teacher forcing) one causal forward checks every step at once.
    let lg = eval::logits(&ctx, &model, &want[..want.len() - 1]).unwrap();
    for pos in prompt.len()..want.len() {
        let row = &lg[(pos - 1) * v..pos * v];
        let next = row
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &x)| if x > b.1 { (i, x) } else { b },
            )
            .0 as u32;
        assert_eq!(
            next, want[pos],
            "greedy token {pos} differs: got {next}, expected {}",
            want[pos]
        );
    }
}

#[test]
fn perplexity_matches_cpu_reference() {
    let Some(ctx) = test_context() else { return };
    let mut cfg = SyntheticModel::demo_config();
    cfg.num_layers = 2;
    let model = SyntheticModel::with_config(cfg, 11);
    let windows: Vec<Vec<u32>> = (0..3)
        .map(|w| {
            (0..37)
                .map(|i| ((i * 13 + w * 101 + 5) % 512) as u32)
                .collect()
        })
        .collect();
    let expected = cpu::mean_nll(&model, &windows).unwrap();
    let run = |opts: &EvalOptions| {
        eval::perplexity(
            &ctx,
            &model,
            &windows,
            opts,
            &mut |_, _| {},
            &AtomicBool::new(false),
        )
        .unwrap()
    };
    // Small batches force several batches and vocabulary chunks.
    let opts = EvalOptions {
        batch_tokens: 40,
        ..Default::default()
    };
    let got = run(&opts);
    assert_eq!(got.predictions, 3 * 36);
    assert!(
        (got.mean_nll - expected).abs() < 1e-4 * expected.max(1.0),
        "mean NLL got {} expected {expected}",
        got.mean_nll
    );
    // Each layer uploaded when it starts instead of during the previous one: bit for bit the same.
    let opts = EvalOptions {
        batch_tokens: 40,
        weights_ahead: false,
        ..Default::default()
    };
    let at_start = run(&opts);
    assert_eq!(
        at_start.mean_nll.to_bits(),
        got.mean_nll.to_bits(),
        "weights uploaded ahead {} vs at each layer's start {}",
        got.mean_nll,
        at_start.mean_nll
    );
    // Host-spilled stream gives the same answer.
    let opts = EvalOptions {
        stream_budget_bytes: 0,
        batch_tokens: 40,
        ..Default::default()
    };
    let spilled = run(&opts);
    assert!(
        (spilled.mean_nll - got.mean_nll).abs() < 1e-6,
        "spilled {} vs {}",
        spilled.mean_nll,
        got.mean_nll
    );
    // An f16 host stream (packed on the GPU, pipeline/stream.rs) rounds the hidden state between
    // layers to f16 (≤ 2⁻¹¹ relative): the NLL moves, but only slightly.
    let opts = EvalOptions {
        stream_budget_bytes: 0,
        stream_dtype: gptaq_studio::pipeline::StreamDType::F16,
        batch_tokens: 40,
        ..Default::default()
    };
    let half = run(&opts);
    // A budget that holds the first of the three one-window batches: it stays on the GPU (in
    // the host's element type) and the others spill, bit for bit the all-host answer, f32 and
    // f16 alike.
    let batch_bytes = 37 * model.config().hidden_size as u64;
    for (dtype, all_host) in [
        (gptaq_studio::pipeline::StreamDType::F32, &spilled),
        (gptaq_studio::pipeline::StreamDType::F16, &half),
    ] {
        let opts = EvalOptions {
            stream_budget_bytes: batch_bytes * dtype.bytes() as u64,
            stream_dtype: dtype,
            batch_tokens: 40,
            ..Default::default()
        };
        let part = run(&opts);
        assert_eq!(
            (
                part.spilled_windows,
                all_host.spilled_windows,
                got.spilled_windows
            ),
            (2, 3, 0),
            "{dtype:?}: windows on the host"
        );
        assert_eq!(
            part.mean_nll.to_bits(),
            all_host.mean_nll.to_bits(),
            "{dtype:?}: first batch on the GPU {} vs all on the host {}",
            part.mean_nll,
            all_host.mean_nll
        );
    }
    assert!(
        (half.mean_nll - got.mean_nll).abs() < 1e-3 * got.mean_nll.max(1.0),
        "f16 host stream {} vs f32 {}",
        half.mean_nll,
        got.mean_nll
    );
    eprintln!(
        "mean NLL: f32 {}, f16 host stream {}",
        got.mean_nll, half.mean_nll
    );
}

#[test]
fn perplexity_rejects_bad_input() {
    let Some(ctx) = test_context() else { return };
    let model = SyntheticModel::new(1);
    let c = AtomicBool::new(false);
    let e = eval::perplexity(
        &ctx,
        &model,
        &[],
        &EvalOptions::default(),
        &mut |_, _| {},
        &c,
    )
    .unwrap_err();
    assert!(e.to_string().contains("at least one window"), "{e}");
    let e = eval::perplexity(
        &ctx,
        &model,
        &[vec![1, 99999]],
        &EvalOptions::default(),
        &mut |_, _| {},
        &c,
    )
    .unwrap_err();
    assert!(e.to_string().contains("99999"), "{e}");
}

/// `GpuLayer::duplicate` (the pipeline's FP-stream copy, made on the GPU) computes bit for bit what
/// the uploaded layer computes, biases and q/k norms included, and is an independent copy:
/// replacing a module in it leaves the original alone.
#[test]
fn duplicated_layer_is_an_independent_identical_copy() {
    let Some(ctx) = test_context() else { return };
    let mut cfg = config(48, 80, 4, 2, 12);
    cfg.attention_bias = true;
    cfg.qk_norm = true;
    let (nseq, seqlen) = (2, 9);
    let t = nseq * seqlen;
    let model = SyntheticModel::with_config(cfg.clone(), 21);
    let lw = model.layer(0).unwrap();
    let ids: Vec<u32> = (0..t)
        .map(|i| ((i * 13 + 5) % cfg.vocab_size) as u32)
        .collect();
    let h0 = model.embed(&ids).unwrap();
    let rope = Rope::new(&ctx, &cfg, seqlen).unwrap();
    let s = LayerScratch::new(&ctx, &cfg, t).unwrap();
    let run = |l: &GpuLayer| -> Vec<f32> {
        let h = ctx.upload("h", &h0).unwrap();
        let mut rec = ctx.recorder();
        forward::forward_layer(&mut rec, l, &rope, &h, &s, nseq, seqlen).unwrap();
        rec.submit();
        ctx.read(&h).unwrap()
    };
    let orig = GpuLayer::upload(&ctx, &cfg, &lw).unwrap();
    let mut rec = ctx.recorder();
    let dup = orig.duplicate(&mut rec).unwrap();
    rec.submit();
    let (a, b) = (run(&orig), run(&dup));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(
            x.to_bits(),
            y.to_bits(),
            "output {i} of {}: {x} vs {y}",
            a.len()
        );
    }
    // Zero the duplicate's down_proj: its output changes, the original's does not.
    let zeros = ctx
        .zeros::<f32>("zeros", cfg.hidden_size * cfg.intermediate_size)
        .unwrap();
    let mut rec = ctx.recorder();
    dup.set_linear_gpu(&mut rec, gptaq_studio::model::ModuleKind::Down, &zeros)
        .unwrap();
    rec.submit();
    assert_eq!(run(&orig), a, "the original changed with its duplicate");
    assert_ne!(
        run(&dup),
        a,
        "zeroing the duplicate's down_proj changed nothing"
    );
    // Releasing the attention weights (as the pipeline does before the MLP stages) leaves the
    // MLP usable and makes a forward through attention an error naming the module.
    use gptaq_studio::model::ModuleKind;
    let mut rec = ctx.recorder();
    let mut rel = orig.duplicate(&mut rec).unwrap();
    rec.submit();
    let before = ctx.memory().0;
    rel.release(&ctx, &[ModuleKind::Q, ModuleKind::O]).unwrap();
    assert!(rel.released(ModuleKind::Q) && !rel.released(ModuleKind::K));
    assert!(ctx.memory().0 < before, "release freed nothing");
    let h = ctx.upload("h", &h0).unwrap();
    let mut rec = ctx.recorder();
    let err = forward::forward_layer(&mut rec, &rel, &rope, &h, &s, nseq, seqlen)
        .expect_err("forward through released q_proj");
    assert!(err.to_string().contains("q_proj"), "{err}");
    let mut rec = ctx.recorder();
    forward::mlp_act(&mut rec, &rel, &s, t, s.act()).expect("gate/up still run");
    forward::down_residual(&mut rec, &rel, s.act(), &h, &s, t).expect("down still runs");
    rec.submit();
}
