//! GPTQ checkpoint export and import (algorithm.md §3): packing known answers and round trips,
//! export → `GptqModel::open` bit-exact round trips, atomic output handling, and refusal of bad
//! checkpoints. GPU-free.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gptaq_studio::export::pack::{
    self, PackError, pack_qweight, pack_qzeros, pack_stream, unpack_qweight, unpack_qzeros,
    unpack_qzeros_raw, unpack_stream,
};
use gptaq_studio::export::{ExportError, ExportOptions, GptqModel, write_checkpoint};
use gptaq_studio::model::synthetic::SyntheticModel;
use gptaq_studio::model::{ModelConfig, ModuleKind, WeightSource};
use gptaq_studio::pipeline::{MemoryPlan, QuantizedModel, RunReport};
use gptaq_studio::quant::reference::quantize_reference;
use gptaq_studio::quant::{Method, QuantConfig, QuantResult};
use rand::Rng;

// ------------------------------------------------------------------------------------------------
// Packing

#[test]
fn stream_and_qweight_round_trip_all_bits_awkward_shapes() {
    let mut rng = common::rng(1);
    for bits in [2u32, 3, 4, 8] {
        let maxq = (1u32 << bits) - 1;
        let unit = pack::multiple_for(bits);
        for k in 1..=3 {
            let len = unit * k;
            let vals: Vec<u32> = (0..len).map(|_| rng.random_range(0..=maxq)).collect();
            let words = pack_stream(&vals, bits, "t").unwrap();
            assert_eq!(words.len(), len * bits as usize / 32);
            assert_eq!(unpack_stream(&words, bits, len, "t").unwrap(), vals);
        }
        // qweight: out_features (rows) is not packed, so any count works; in_features must fill words.
        for rows in [1usize, 3, 7, 33] {
            for cols in [unit, 2 * unit, 5 * unit] {
                let codes: Vec<u8> = (0..rows * cols)
                    .map(|_| rng.random_range(0..=maxq) as u8)
                    .collect();
                let qw = pack_qweight(&codes, rows, cols, bits).unwrap();
                assert_eq!(qw.len(), cols * bits as usize / 32 * rows);
                assert_eq!(
                    unpack_qweight(&qw, rows, cols, bits).unwrap(),
                    codes,
                    "{bits}-bit {rows}x{cols}"
                );
            }
        }
        // qzeros: packed along out_features; zeros of 0 (asym) must survive the v1 wrap.
        for groups in [1usize, 3] {
            let rows = 3 * unit;
            let mut zeros: Vec<u32> = (0..groups * rows)
                .map(|_| rng.random_range(0..=maxq))
                .collect();
            zeros[0] = 0;
            zeros[rows - 1] = maxq;
            let qz = pack_qzeros(&zeros, groups, rows, bits).unwrap();
            assert_eq!(qz.len(), groups * rows * bits as usize / 32);
            assert_eq!(
                unpack_qzeros(&qz, groups, rows, bits).unwrap(),
                zeros,
                "{bits}-bit zeros"
            );
            // v1 stores zero − 1, wrapped field-wise (0 → maxq), neighbours untouched.
            let raw = unpack_qzeros_raw(&qz, groups, rows, bits).unwrap();
            for (r, z) in raw.iter().zip(&zeros) {
                assert_eq!(*r, z.wrapping_sub(1) & maxq);
            }
        }
    }
}

#[test]
fn packing_refuses_bad_lengths_bits_and_values() {
    for bits in [2u32, 3, 4, 8] {
        let unit = pack::multiple_for(bits);
        let bad = unit + 1;
        let e = pack_qweight(&vec![0u8; 2 * bad], 2, bad, bits).unwrap_err();
        assert!(matches!(e, PackError::PartialWord { .. }), "{e}");
        assert!(
            e.to_string().contains(&format!("multiple of {unit}")),
            "{e}"
        );
        let e = pack_qzeros(&vec![1u32; bad], 1, bad, bits).unwrap_err();
        assert!(matches!(e, PackError::PartialWord { .. }), "{e}");
        let e = pack_stream(&vec![1u32 << bits; unit], bits, "v").unwrap_err();
        assert!(
            matches!(e, PackError::ValueOutOfRange { index: 0, .. }),
            "{e}"
        );
    }
    // 3-bit needs 32 values: 8 (enough for 4-bit) is not.
    assert!(matches!(
        pack_stream(&[0; 8], 3, "v"),
        Err(PackError::PartialWord { .. })
    ));
    for bits in [0u32, 1, 5, 6, 7, 16] {
        assert_eq!(
            pack_stream(&[0; 32], bits, "v").unwrap_err(),
            PackError::UnsupportedBits { bits }
        );
    }
    // A code above maxq is reported with its flat [rows, cols] index.
    let mut codes = vec![0u8; 2 * 8];
    codes[8 + 3] = 16;
    let e = pack_qweight(&codes, 2, 8, 4).unwrap_err();
    assert!(
        matches!(
            e,
            PackError::ValueOutOfRange {
                index: 11,
                value: 16,
                ..
            }
        ),
        "{e}"
    );
    // Length mismatches.
    assert!(matches!(
        pack_qweight(&[0; 7], 1, 8, 4),
        Err(PackError::Length { .. })
    ));
    assert!(matches!(
        unpack_qweight(&[0; 3], 2, 8, 4),
        Err(PackError::Length { .. })
    ));
}

/// Known answers, derived by hand from §3.2 ("value k occupies stream bits b·k..b·k+b−1, LSB first")
/// and §3.3 (v1 stores zero − 1; symmetric zero = 2^(b−1)):
/// - sym zeros: 4-bit stores 7 = 0111 in every nibble → 0x77777777; 8-bit 127 → 0x7F7F7F7F;
///   2-bit 1 = 01 in every pair → 0x55555555.
/// - 3-bit sym stores 3 = bits (1,1,0) LSB first, so stream bit s is set iff s mod 3 ≠ 2. Word 0
///   covers s = 0..31: bit k set iff k mod 3 ≠ 2 → …1101 1011 = 0xDB6DB6DB. Word 1 starts at
///   s = 32 ≡ 2: bit k set iff (k+2) mod 3 ≠ 2 iff k mod 3 ≠ 0 → 0xB6DB6DB6. Word 2 starts at
///   s = 64 ≡ 1: bit k set iff k mod 3 ≠ 1 → 0x6DB6DB6D.
/// - 4-bit codes 0,1,…,7 of one output column → nibble j = j → 0x76543210; 2-bit 0,1,2,3 repeated →
///   each byte 11_10_01_00 = 0xE4; 8-bit 1,2,3,4 → 0x04030201.
/// - 3-bit straddling values: v10 = 7 alone sets stream bits 30, 31, 32 → word0 0xC0000000, word1
///   bit 0; v21 = 5 (101) alone sets stream bits 63 (its bit 0) and 65 (its bit 2) → word1 bit 31,
///   word2 bit 1.
#[test]
fn known_answer_words() {
    let sym = |bits: u32, rows: usize| {
        pack_qzeros(&vec![1u32 << (bits - 1); rows], 1, rows, bits).unwrap()
    };
    assert_eq!(sym(4, 8), vec![0x77777777u32 as i32]);
    assert_eq!(sym(8, 4), vec![0x7F7F7F7F]);
    assert_eq!(sym(2, 16), vec![0x55555555]);
    assert_eq!(
        sym(3, 32),
        vec![0xDB6DB6DBu32 as i32, 0xB6DB6DB6u32 as i32, 0x6DB6DB6D]
    );
    let col = |bits: u32, codes: &[u8]| pack_qweight(codes, 1, codes.len(), bits).unwrap();
    assert_eq!(col(4, &[0, 1, 2, 3, 4, 5, 6, 7]), vec![0x76543210]);
    assert_eq!(
        col(2, &[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]),
        vec![0xE4E4E4E4u32 as i32]
    );
    assert_eq!(col(8, &[1, 2, 3, 4]), vec![0x04030201]);
    let mut v = [0u8; 32];
    v[10] = 7;
    assert_eq!(col(3, &v), vec![0xC0000000u32 as i32, 1, 0]);
    let mut v = [0u8; 32];
    v[21] = 5;
    assert_eq!(col(3, &v), vec![0, 0x80000000u32 as i32, 2]);
    // Transpose: qweight is [in/pf, out]; output row o of the codes is column o of qweight.
    // 2 outputs × 16 inputs, 4-bit: out 0 has codes 1 then 2 (8 each), out 1 has 15 then 0.
    let mut codes = vec![1u8; 8];
    codes.extend([2u8; 8]);
    codes.extend([15u8; 8]);
    codes.extend([0u8; 8]);
    let qw = pack_qweight(&codes, 2, 16, 4).unwrap();
    assert_eq!(qw, vec![0x11111111, 0xFFFFFFFFu32 as i32, 0x22222222, 0]);
    // Asym zero of 0 in v1: wrapped to maxq in its own field only.
    let qz = pack_qzeros(&[0, 8, 8, 8, 8, 8, 8, 1], 1, 8, 4).unwrap();
    assert_eq!(qz, vec![0x0777777F]);
}

// ------------------------------------------------------------------------------------------------
// Export → read round trips

fn small_config(tied: bool, bias: bool) -> ModelConfig {
    let mut c = SyntheticModel::demo_config();
    c.hidden_size = 64;
    c.intermediate_size = 96;
    c.num_layers = 2;
    c.num_heads = 2;
    c.num_kv_heads = 1;
    c.head_dim = 32;
    c.vocab_size = 96;
    c.tie_word_embeddings = tied;
    c.attention_bias = bias;
    c
}

/// `H = XᵀX` of `4·cols` random rows with a few heavy columns (so act-order permutes).
fn hessian(cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = common::rng(seed);
    let n = 4 * cols;
    let x: Vec<f32> = (0..n * cols)
        .map(|i| {
            rng.random_range(-1.0f32..1.0)
                * if (i % cols).is_multiple_of(7) {
                    4.0
                } else {
                    1.0
                }
        })
        .collect();
    let mut h = vec![0f32; cols * cols];
    for a in 0..cols {
        for b in 0..cols {
            h[a * cols + b] = (0..n)
                .map(|r| x[r * cols + a] * x[r * cols + b])
                .sum::<f32>()
                / n as f32;
        }
    }
    h
}

fn report(cfg: &QuantConfig) -> RunReport {
    RunReport {
        model: "test".into(),
        method: cfg.method.name().into(),
        config: cfg.clone(),
        device: "cpu".into(),
        calibration: "random".into(),
        nsamples: 1,
        seqlen: 1,
        seed: 0,
        plan: MemoryPlan::default(),
        modules: Vec::new(),
        layers: Vec::new(),
        peak_gpu_bytes: 0,
        peak_reserved_bytes: 0,
        peak_allocator_bytes: None,
        peak_staging_bytes: None,
        kernel_times: Vec::new(),
        secs: 0.0,
        warnings: Vec::new(),
    }
}

/// Quantizes every linear of `src` with the CPU reference. `positive_row0`: row 0 of every weight
/// is made non-negative first (asymmetric zero point 0, the v1 wrap case).
fn quantize_all(src: &SyntheticModel, qcfg: &QuantConfig, positive_row0: bool) -> QuantizedModel {
    let c = src.config();
    let mut hs: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    let mut modules = BTreeMap::new();
    for layer in 0..c.num_layers {
        let lw = src.layer(layer).unwrap();
        for m in ModuleKind::ALL {
            let lin = lw.linear(m);
            let (rows, cols) = (lin.out_features, lin.in_features);
            let h = hs
                .entry(cols)
                .or_insert_with(|| hessian(cols, cols as u64))
                .clone();
            let mut w = lin.weight.clone();
            if positive_row0 {
                w[..cols].iter_mut().for_each(|x| *x = x.abs());
            }
            let r = quantize_reference(&w, rows, cols, &h, None, qcfg).unwrap();
            modules.insert((layer, m), r);
        }
    }
    QuantizedModel {
        modules,
        report: report(qcfg),
    }
}

fn qcfg(bits: u32, group_size: Option<usize>, act_order: bool, sym: bool) -> QuantConfig {
    QuantConfig {
        method: Method::Gptq,
        bits,
        group_size,
        sym,
        act_order,
        ..QuantConfig::default()
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn assert_bits_eq(ctx: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{ctx}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!("{ctx}: index {i}: got {} want {}", got[i], want[i]);
    }
}

fn f16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// Export, reopen, compare every module with the solver's Q bit for bit and every other tensor with
/// the source rounded to f16.
fn round_trip(
    src: &SyntheticModel,
    q: &QuantizedModel,
    opts: &ExportOptions,
) -> (tempfile::TempDir, gptaq_studio::export::ExportSummary) {
    let dir = tmp();
    let out = dir.path().join("out");
    let summary = write_checkpoint(&out, src, None, q, opts).unwrap();
    let g = GptqModel::open(&out).unwrap();
    let c = src.config();
    assert_eq!(g.config().hidden_size, c.hidden_size);
    assert_eq!(g.settings().bits, q.report.config.bits);
    assert_eq!(g.settings().group_size, q.report.config.group_size);
    for layer in 0..c.num_layers {
        let got = g.layer(layer).unwrap();
        let want = src.layer(layer).unwrap();
        for m in ModuleKind::ALL {
            let r = &q.modules[&(layer, m)];
            assert_bits_eq(
                &format!("layer {layer} {}", m.short_name()),
                &got.linear(m).weight,
                &r.weights(),
            );
            match (&got.linear(m).bias, &want.linear(m).bias) {
                (Some(a), Some(b)) => assert_bits_eq("bias", a, &f16_round(b)),
                (None, None) => {}
                other => panic!("bias presence differs: {other:?}"),
            }
        }
        assert_bits_eq("input_norm", &got.input_norm, &f16_round(&want.input_norm));
        assert_bits_eq("post_norm", &got.post_norm, &f16_round(&want.post_norm));
    }
    assert_bits_eq(
        "final_norm",
        &g.final_norm().unwrap(),
        &f16_round(&src.final_norm().unwrap()),
    );
    let v = c.vocab_size;
    assert_bits_eq(
        "lm_head",
        &g.lm_head_rows(0..v).unwrap(),
        &f16_round(&src.lm_head_rows(0..v).unwrap()),
    );
    let ids: Vec<u32> = (0..v as u32).collect();
    assert_bits_eq(
        "embed",
        &g.embed(&ids).unwrap(),
        &f16_round(&src.embed(&ids).unwrap()),
    );
    (dir, summary)
}

#[test]
fn export_round_trip_bit_exact_act_order_and_groups() {
    let src = SyntheticModel::with_config(small_config(false, false), 5);
    for bits in [4u32, 3] {
        for (gs, act) in [
            (None, false),
            (Some(32), false),
            (None, true),
            (Some(32), true),
        ] {
            let cfg = qcfg(bits, gs, act, true);
            let q = quantize_all(&src, &cfg, false);
            let (dir, s) = round_trip(&src, &q, &ExportOptions::default());
            let ctx = format!("{bits}-bit gs {gs:?} act {act}");
            // desc_act exactly when g_idx is non-trivial: act-order with real groups.
            assert_eq!(s.desc_act, act && gs.is_some(), "{ctx}");
            assert_eq!(s.shards, vec!["model.safetensors".to_string()], "{ctx}");
            let out = dir.path().join("out");
            let qc: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("quantize_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(qc["bits"], bits, "{ctx}");
            assert_eq!(qc["group_size"], gs.map_or(-1, |g| g as i64), "{ctx}");
            assert_eq!(qc["checkpoint_format"], "gptq");
            assert_eq!(qc["quant_method"], "gptq");
            assert_eq!(qc["desc_act"], s.desc_act);
            assert!(
                qc["meta"]["quantizer"][0]
                    .as_str()
                    .unwrap()
                    .starts_with("gptaq-studio:")
            );
            let cj: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(cj["quantization_config"], qc);
            assert_eq!(cj["torch_dtype"], "float16");
            assert!(out.join("gptaq_report.json").is_file());
            assert!(!out.join("model.safetensors.index.json").exists());
            // Symmetric 4-bit zeros are the canonical 0x77777777 (§3.3).
            if bits == 4 {
                let st = std::fs::read(out.join("model.safetensors")).unwrap();
                let t = safetensors::SafeTensors::deserialize(&st).unwrap();
                let z = t.tensor("model.layers.0.self_attn.q_proj.qzeros").unwrap();
                assert!(
                    z.data().chunks(4).all(|c| c == [0x77, 0x77, 0x77, 0x77]),
                    "{ctx}"
                );
                assert_eq!(z.dtype(), safetensors::Dtype::I32);
                assert_eq!(
                    t.tensor("model.layers.0.mlp.down_proj.qweight")
                        .unwrap()
                        .shape(),
                    &[96 * 4 / 32, 64]
                );
                assert_eq!(
                    t.tensor("model.layers.0.mlp.down_proj.scales")
                        .unwrap()
                        .dtype(),
                    safetensors::Dtype::F16
                );
            }
        }
    }
}

#[test]
fn export_round_trip_2_and_8_bit_gptaq_asym_zero_wrap() {
    let src = SyntheticModel::with_config(small_config(false, false), 6);
    for bits in [2u32, 8] {
        let mut cfg = qcfg(bits, Some(32), true, false);
        cfg.method = Method::Gptaq { alpha: 0.25 };
        let q = quantize_all(&src, &cfg, true);
        let zeros0 = q
            .modules
            .values()
            .flat_map(|r| &r.zeros)
            .filter(|&&z| z == 0)
            .count();
        assert!(zeros0 > 0, "test setup: expected some zero points of 0");
        let (_dir, s) = round_trip(&src, &q, &ExportOptions::default());
        assert!(
            s.warnings.iter().any(|w| w.contains("zero points are 0")),
            "{:?}",
            s.warnings
        );
        assert_eq!(s.quantization_config["meta"]["method"], "gptaq");
        assert_eq!(s.quantization_config["meta"]["alpha"], 0.25);
        assert_eq!(s.quantization_config["sym"], false);
    }
}

#[test]
fn export_tied_embeddings_bias_sharding_and_side_files() {
    let src = SyntheticModel::with_config(small_config(true, true), 7);
    let q = quantize_all(&src, &qcfg(4, Some(32), false, true), false);
    // A fake source directory with config.json and tokenizer files.
    let srcdir = tmp();
    let mut cj = src.config().to_hf_json();
    cj["custom_field"] = serde_json::json!("kept");
    std::fs::write(srcdir.path().join("config.json"), cj.to_string()).unwrap();
    std::fs::write(srcdir.path().join("tokenizer.json"), "{}").unwrap();
    std::fs::write(
        srcdir.path().join("generation_config.json"),
        "{\"do_sample\":false}",
    )
    .unwrap();
    let dir = tmp();
    let out = dir.path().join("q");
    let opts = ExportOptions {
        max_shard_bytes: 20_000,
        ..ExportOptions::default()
    };
    let s = write_checkpoint(&out, &src, Some(srcdir.path()), &q, &opts).unwrap();
    assert!(s.shards.len() > 2, "{:?}", s.shards);
    assert_eq!(
        s.shards[0],
        format!("model-00001-of-{:05}.safetensors", s.shards.len())
    );
    assert_eq!(
        s.copied_files,
        vec!["tokenizer.json", "generation_config.json"]
    );
    assert!(out.join("tokenizer.json").is_file());
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert!(map.contains_key("model.embed_tokens.weight"));
    assert!(
        !map.contains_key("lm_head.weight"),
        "tied: lm_head must not be stored"
    );
    assert!(map.contains_key("model.layers.1.self_attn.k_proj.bias"));
    assert!(!map.contains_key("model.layers.1.self_attn.k_proj.weight"));
    assert_eq!(index["metadata"]["total_size"], s.tensor_bytes);
    let cj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cj["custom_field"], "kept");
    assert_eq!(cj["quantization_config"]["bits"], 4);
    // Reads back bit-exactly (tied lm_head = f16 embedding, biases f16).
    let g = GptqModel::open(&out).unwrap();
    let lw = g.layer(1).unwrap();
    assert_bits_eq("k", &lw.k.weight, &q.modules[&(1, ModuleKind::K)].weights());
    assert_bits_eq(
        "k bias",
        lw.k.bias.as_ref().unwrap(),
        &f16_round(src.layer(1).unwrap().k.bias.as_ref().unwrap()),
    );
    assert_bits_eq(
        "lm_head",
        &g.lm_head_rows(0..96).unwrap(),
        &f16_round(&src.embed(&(0..96).collect::<Vec<_>>()).unwrap()),
    );
    assert!(g.describe().contains("GPTQ 4-bit g32"));
}

#[test]
fn demo_model_exports_with_generated_config() {
    // The full demo model with group size 96: it divides the intermediate width 384 but not the
    // hidden width 128, so the exporter must warn about the 128-wide modules.
    let src = SyntheticModel::new(1);
    let cfg = QuantConfig {
        method: Method::Rtn,
        group_size: Some(96),
        ..QuantConfig::default()
    };
    let q = quantize_all(&src, &cfg, false);
    let dir = tmp();
    let out = dir.path().join("demo");
    let s = write_checkpoint(&out, &src, None, &q, &ExportOptions::default()).unwrap();
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("does not divide in_features 128")),
        "{:?}",
        s.warnings
    );
    let parsed = ModelConfig::from_file(out.join("config.json")).unwrap();
    let mut want = src.config().clone();
    want.dtype = gptaq_studio::model::config::ConfigDType::F16;
    assert_eq!(parsed, want);
    let g = GptqModel::open(&out).unwrap();
    assert_bits_eq(
        "down",
        &g.layer(3).unwrap().down.weight,
        &q.modules[&(3, ModuleKind::Down)].weights(),
    );
}

// ------------------------------------------------------------------------------------------------
// Refusals and atomicity

fn hidden_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn export_refuses_missing_module_bad_shapes_and_unpackable_dims() {
    let src = SyntheticModel::with_config(small_config(false, false), 8);
    let q = quantize_all(&src, &qcfg(4, None, false, true), false);
    let dir = tmp();
    let out = dir.path().join("o");

    let mut missing = QuantizedModel {
        modules: q.modules.clone(),
        report: q.report.clone(),
    };
    missing.modules.remove(&(1, ModuleKind::Up));
    let e = write_checkpoint(&out, &src, None, &missing, &ExportOptions::default()).unwrap_err();
    assert!(
        matches!(&e, ExportError::Module { layer: 1, module, .. } if module == "up_proj"),
        "{e}"
    );
    assert!(e.to_string().contains("layer 1 up_proj"), "{e}");

    let mut wrong = QuantizedModel {
        modules: q.modules.clone(),
        report: q.report.clone(),
    };
    let r: &mut QuantResult = wrong.modules.get_mut(&(0, ModuleKind::Q)).unwrap();
    r.rows = 32;
    let e = write_checkpoint(&out, &src, None, &wrong, &ExportOptions::default()).unwrap_err();
    assert!(
        e.to_string().contains("layer 0 q_proj") && e.to_string().contains("[32, 64]"),
        "{e}"
    );

    let mut bad_scale = QuantizedModel {
        modules: q.modules.clone(),
        report: q.report.clone(),
    };
    bad_scale
        .modules
        .get_mut(&(0, ModuleKind::V))
        .unwrap()
        .scales[3] = 0.1;
    let e = write_checkpoint(&out, &src, None, &bad_scale, &ExportOptions::default()).unwrap_err();
    assert!(
        e.to_string().contains("layer 0 v_proj") && e.to_string().contains("f16"),
        "{e}"
    );

    // 3-bit needs every dimension % 32: intermediate 80 is not.
    let mut c = small_config(false, false);
    c.intermediate_size = 80;
    let src3 = SyntheticModel::with_config(c, 8);
    let q3 = quantize_all(&src3, &qcfg(3, None, false, true), false);
    let e = write_checkpoint(&out, &src3, None, &q3, &ExportOptions::default()).unwrap_err();
    assert!(
        e.to_string().contains("gate_proj") && e.to_string().contains("multiple of 32"),
        "{e}"
    );

    assert!(!out.exists());
    assert!(
        hidden_entries(dir.path()).is_empty(),
        "{:?}",
        hidden_entries(dir.path())
    );
}

#[test]
fn existing_output_is_refused_survives_failures_and_force_replaces() {
    let src = SyntheticModel::with_config(small_config(false, false), 9);
    let q = quantize_all(&src, &qcfg(4, Some(32), false, true), false);
    let dir = tmp();
    let out = dir.path().join("existing");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("marker.txt"), "old").unwrap();

    let e = write_checkpoint(&out, &src, None, &q, &ExportOptions::default()).unwrap_err();
    assert!(matches!(e, ExportError::OutputExists { .. }), "{e}");
    assert!(e.to_string().contains("--force"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("marker.txt")).unwrap(),
        "old"
    );

    // A failing export with force leaves the old directory untouched and no temporary behind.
    let mut broken = QuantizedModel {
        modules: q.modules.clone(),
        report: q.report.clone(),
    };
    broken.modules.remove(&(0, ModuleKind::K));
    let force = ExportOptions {
        force: true,
        ..ExportOptions::default()
    };
    assert!(write_checkpoint(&out, &src, None, &broken, &force).is_err());
    assert_eq!(
        std::fs::read_to_string(out.join("marker.txt")).unwrap(),
        "old"
    );
    assert!(
        hidden_entries(dir.path()).is_empty(),
        "{:?}",
        hidden_entries(dir.path())
    );

    // Failing late (while writing tensors: a source whose weights overflow f16).
    struct Huge(SyntheticModel);
    impl WeightSource for Huge {
        fn config(&self) -> &ModelConfig {
            self.0.config()
        }
        fn embed(
            &self,
            ids: &[u32],
        ) -> Result<Vec<f32>, gptaq_studio::model::weights::WeightError> {
            Ok(vec![1e6; ids.len() * self.0.config().hidden_size])
        }
        fn layer(
            &self,
            i: usize,
        ) -> Result<gptaq_studio::model::LayerWeights, gptaq_studio::model::weights::WeightError>
        {
            self.0.layer(i)
        }
        fn final_norm(&self) -> Result<Vec<f32>, gptaq_studio::model::weights::WeightError> {
            self.0.final_norm()
        }
        fn lm_head_rows(
            &self,
            r: std::ops::Range<usize>,
        ) -> Result<Vec<f32>, gptaq_studio::model::weights::WeightError> {
            self.0.lm_head_rows(r)
        }
        fn describe(&self) -> String {
            "huge".into()
        }
    }
    let huge = Huge(SyntheticModel::with_config(small_config(false, false), 9));
    let e = write_checkpoint(&out, &huge, None, &q, &force).unwrap_err();
    assert!(
        e.to_string().contains("model.embed_tokens.weight") && e.to_string().contains("float16"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("marker.txt")).unwrap(),
        "old"
    );
    assert!(
        hidden_entries(dir.path()).is_empty(),
        "{:?}",
        hidden_entries(dir.path())
    );

    // Force replaces.
    write_checkpoint(&out, &src, None, &q, &force).unwrap();
    assert!(!out.join("marker.txt").exists());
    assert!(out.join("model.safetensors").is_file());
    assert!(hidden_entries(dir.path()).is_empty());
    GptqModel::open(&out).unwrap();

    // An existing empty directory is fine without force.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    write_checkpoint(&empty, &src, None, &q, &ExportOptions::default()).unwrap();

    // Never over the source model directory, even with force.
    let srcdir = dir.path().join("model");
    std::fs::create_dir(&srcdir).unwrap();
    std::fs::write(
        srcdir.join("config.json"),
        src.config().to_hf_json().to_string(),
    )
    .unwrap();
    let e = write_checkpoint(&srcdir, &src, Some(&srcdir), &q, &force).unwrap_err();
    assert!(e.to_string().contains("source model directory"), "{e}");
    assert!(srcdir.join("config.json").is_file());
}

/// Writes an exported checkpoint once for the refusal tests.
fn exported(bits: u32) -> (tempfile::TempDir, PathBuf) {
    let src = SyntheticModel::with_config(small_config(false, false), 10);
    let q = quantize_all(&src, &qcfg(bits, Some(32), true, true), false);
    let dir = tmp();
    let out = dir.path().join("ck");
    write_checkpoint(&out, &src, None, &q, &ExportOptions::default()).unwrap();
    (dir, out)
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn open_err(dir: &Path) -> String {
    match GptqModel::open(dir) {
        Ok(_) => panic!("{} opened but should be refused", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites model.safetensors with `f` applied to the (name → (dtype, shape, bytes)) map.
type TensorMap = BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

fn edit_tensors(path: &Path, f: impl FnOnce(&mut TensorMap)) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map: TensorMap = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect();
    f(&mut map);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = map
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

#[test]
fn reader_refuses_bad_formats_and_bits() {
    let (_d, out) = exported(4);
    GptqModel::open(&out).unwrap();
    let cfg = out.join("config.json");
    let original = std::fs::read_to_string(&cfg).unwrap();

    // gptq_v2 stores the true zero: the same files read as v2 dequantize one scale step higher
    // (scale·(q − z) instead of scale·(q − (z + 1))), exactly.
    let v1 = GptqModel::open(&out).unwrap().layer(0).unwrap();
    edit_json(&cfg, |v| {
        v["quantization_config"]["checkpoint_format"] = "gptq_v2".into()
    });
    let m2 = GptqModel::open(&out).unwrap();
    assert!(m2.settings().v2);
    let v2 = m2.layer(0).unwrap();
    let step_up = v1.q.weight.iter().zip(&v2.q.weight).all(|(a, b)| b > a);
    assert!(
        step_up,
        "v2 reading must shift every weight up by its group's scale"
    );

    std::fs::write(&cfg, &original).unwrap();
    edit_json(&cfg, |v| {
        v["quantization_config"]["format"] = "marlin".into()
    });
    assert!(open_err(&out).contains("unknown checkpoint format"));

    for bits in [5, 1, 16] {
        std::fs::write(&cfg, &original).unwrap();
        edit_json(&cfg, |v| v["quantization_config"]["bits"] = bits.into());
        let e = open_err(&out);
        assert!(e.contains("`bits`") && e.contains(&bits.to_string()), "{e}");
    }

    // Bits the shapes disagree with: 8-bit expects qweight [64·8/32, …].
    std::fs::write(&cfg, &original).unwrap();
    edit_json(&cfg, |v| v["quantization_config"]["bits"] = 8.into());
    let e = open_err(&out);
    assert!(
        e.contains("model.safetensors") && e.contains("qweight") && e.contains("8-bit"),
        "{e}"
    );

    // Group size the shapes disagree with.
    std::fs::write(&cfg, &original).unwrap();
    edit_json(&cfg, |v| v["quantization_config"]["group_size"] = 16.into());
    let e = open_err(&out);
    assert!(e.contains("qzeros") || e.contains("scales"), "{e}");

    // No quantization config at all.
    std::fs::write(&cfg, &original).unwrap();
    edit_json(&cfg, |v| {
        v.as_object_mut().unwrap().remove("quantization_config");
    });
    std::fs::remove_file(out.join("quantize_config.json")).unwrap();
    assert!(open_err(&out).contains("not a GPTQ checkpoint"));
}

#[test]
fn reader_refuses_corrupt_tensors() {
    let (_d, out) = exported(3);
    let st = out.join("model.safetensors");
    let original = std::fs::read(&st).unwrap();

    edit_tensors(&st, |m| {
        m.remove("model.layers.1.mlp.up_proj.g_idx");
    });
    let e = open_err(&out);
    assert!(
        e.contains("model.layers.1.mlp.up_proj.g_idx") && e.contains("missing"),
        "{e}"
    );

    std::fs::write(&st, &original).unwrap();
    edit_tensors(&st, |m| {
        let t = m.get_mut("model.layers.0.self_attn.o_proj.g_idx").unwrap();
        t.2[0..4].copy_from_slice(&99i32.to_le_bytes());
    });
    let e = open_err(&out);
    assert!(e.contains("o_proj.g_idx") && e.contains("99"), "{e}");

    std::fs::write(&st, &original).unwrap();
    edit_tensors(&st, |m| {
        let t = m
            .get_mut("model.layers.0.self_attn.v_proj.qweight")
            .unwrap();
        t.0 = safetensors::Dtype::F32;
    });
    let e = open_err(&out);
    assert!(e.contains("v_proj.qweight") && e.contains("dtype"), "{e}");

    std::fs::write(&st, &original).unwrap();
    edit_tensors(&st, |m| {
        let t = m.get_mut("model.layers.0.mlp.down_proj.qzeros").unwrap();
        t.1 = vec![t.1[1], t.1[0]];
    });
    let e = open_err(&out);
    assert!(e.contains("down_proj.qzeros") && e.contains("shape"), "{e}");

    // Truncations and byte flips: errors or valid loads, never panics.
    let mut rng = common::rng(11);
    for _ in 0..40 {
        let mut b = original.clone();
        if rng.random_bool(0.5) {
            b.truncate(rng.random_range(0..original.len()));
        } else {
            for _ in 0..8 {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
        }
        std::fs::write(&st, &b).unwrap();
        if let Ok(g) = GptqModel::open(&out) {
            for l in 0..2 {
                let _ = g.layer(l);
            }
        }
    }
}

/// With `GPTAQ_EXPORT_DUMP=DIR`, writes exports (3-bit act-order asym, 4-bit sym) and the solver's
/// Q as `DIR/<name>.q.safetensors` for `tools/gptq_dequant_check.py --expect` (an independent
/// decoder of the format). Does nothing otherwise.
#[test]
fn dump_for_python_check() {
    let Some(root) = std::env::var_os("GPTAQ_EXPORT_DUMP") else {
        return;
    };
    let root = PathBuf::from(root);
    let src = SyntheticModel::with_config(small_config(false, true), 12);
    for (name, cfg, pos) in [
        ("w3_act_asym", qcfg(3, Some(32), true, false), true),
        ("w4_sym", qcfg(4, Some(32), false, true), false),
        ("w2_act_g-1", qcfg(2, None, true, false), true),
        ("w8_act", qcfg(8, Some(32), true, true), false),
    ] {
        let q = quantize_all(&src, &cfg, pos);
        let out = root.join(name);
        let force = ExportOptions {
            force: true,
            ..ExportOptions::default()
        };
        let s = write_checkpoint(&out, &src, None, &q, &force).unwrap();
        eprintln!("{name}: {:?}", s.warnings);
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = q
            .modules
            .iter()
            .map(|((l, m), r)| {
                (
                    format!("model.layers.{l}.{}.weight", m.hf_name()),
                    r.weights().iter().flat_map(|x| x.to_le_bytes()).collect(),
                    vec![r.rows, r.cols],
                )
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
            .iter()
            .map(|(n, b, s)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &root.join(format!("{name}.q.safetensors")))
            .unwrap();
    }
}
