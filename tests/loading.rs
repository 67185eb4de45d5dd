//! Loading tests: real checkpoints from `$GPTAQ_TEST_DATA`, malformed inputs built in temp dirs,
//! and proptest fuzzing of every parser that reads user files.

// Test helpers outside #[test] fns unwrap freely: a failure there is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gptaq_studio::calib::{
    CalibError, CalibOptions, CalibSource, calibration_windows, calibration_windows_with,
    eval_windows, parse_jsonl, parse_text,
};
use gptaq_studio::model::config::{Architecture, ConfigDType, ModelConfig, RopeScaling};
use gptaq_studio::model::inspect::ModelSummary;
use gptaq_studio::model::tokenizer::Tokenizer;
use gptaq_studio::model::weights::{
    SafetensorsModel, TensorStore, parse_safetensors_header, parse_safetensors_index,
};
use gptaq_studio::model::{ModuleKind, WeightSource};

/// `$GPTAQ_TEST_DATA`, or `None` (with a note) when unset outside CI. Under `CI=true` a missing
/// data dir is a failure: data-dependent tests must never silently pass there.
fn test_data_dir() -> Option<PathBuf> {
    match std::env::var_os("GPTAQ_TEST_DATA") {
        Some(d) => {
            let d = PathBuf::from(d);
            assert!(
                d.is_dir(),
                "GPTAQ_TEST_DATA={} is not a directory",
                d.display()
            );
            Some(d)
        }
        None => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("GPTAQ_TEST_DATA is unset but CI=true: data-dependent tests must run in CI");
            }
            eprintln!("note: GPTAQ_TEST_DATA unset; skipping data-dependent test");
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Real checkpoints

fn check_layer_shapes(m: &SafetensorsModel) {
    let c = m.config().clone();
    for l in 0..c.num_layers {
        let lw = m.layer(l).unwrap();
        for k in ModuleKind::ALL {
            let lin = lw.linear(k);
            let (o, i) = c.linear_shape(k);
            assert_eq!(
                (lin.out_features, lin.in_features, lin.weight.len()),
                (o, i, o * i),
                "layer {l} {k:?}"
            );
            assert!(lin.bias.is_none());
            assert!(lin.weight.iter().all(|x| x.is_finite()));
        }
        assert_eq!(lw.input_norm.len(), c.hidden_size);
        assert_eq!(lw.post_norm.len(), c.hidden_size);
        assert!(lw.q_norm.is_none());
    }
    assert_eq!(m.final_norm().unwrap().len(), c.hidden_size);
    let e = m.layer(c.num_layers).unwrap_err().to_string();
    assert!(
        e.contains("config.json") && e.contains(&c.num_layers.to_string()),
        "{e}"
    );
}

#[test]
fn tiny_llama_15m_sharded_bf16() {
    let Some(d) = test_data_dir() else { return };
    let m = SafetensorsModel::open(d.join("tiny-llama-15m")).unwrap();
    let c = m.config();
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (
            c.hidden_size,
            c.intermediate_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.vocab_size
        ),
        (384, 1024, 8, 6, 2, 64, 4096)
    );
    assert_eq!(c.rope_theta, 10000.0); // from transformers-5 rope_parameters
    assert_eq!(c.rope_scaling, RopeScaling::Default);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.dtype, ConfigDType::Bf16);
    assert_eq!((c.bos_token_id, c.eos_token_id), (Some(0), Some(1)));
    assert!(!c.tie_word_embeddings);
    assert!(m.is_sharded());
    assert_eq!(m.shard_paths().len(), 3);
    assert!(
        m.index_path()
            .unwrap()
            .ends_with("model.safetensors.index.json")
    );
    assert!(!m.embeddings_shared());
    assert_eq!(
        m.tensor("model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .dtype,
        safetensors::Dtype::BF16
    );
    check_layer_shapes(&m);
    let e = m.embed(&[0, 5, 4095]).unwrap();
    assert_eq!(e.len(), 3 * 384);
    assert_eq!(m.lm_head_rows(10..20).unwrap().len(), 10 * 384);
    assert_ne!(
        m.embed(&[7]).unwrap(),
        m.lm_head_rows(7..8).unwrap(),
        "untied: different matrices"
    );
    let err = m.embed(&[4096]).unwrap_err().to_string();
    assert!(
        err.contains("model-00001-of-00003.safetensors")
            && err.contains("embed_tokens")
            && err.contains("4096"),
        "{err}"
    );
    assert!(m.lm_head_rows(4000..4097).is_err());

    // The index metadata says 15,735,168 parameters; inspect counts them from the stored shapes.
    let s = ModelSummary::from_safetensors(&m).unwrap();
    assert_eq!(s.param_count, 15_735_168);
    assert_eq!(s.shards.len(), 3);
    assert_eq!(s.stored_dtypes.get("BF16"), Some(&(8 * 9 + 3)));
    assert!(!s.tied_embeddings);
    assert_eq!(s.largest_in_features, 1024);
    let text = s.to_text();
    assert!(
        text.contains("LlamaForCausalLM") && text.contains("down_proj") && text.contains("15.74 M"),
        "{text}"
    );
    assert!(
        serde_json::to_value(&s).unwrap()["modules"]
            .as_array()
            .unwrap()
            .len()
            == 7
    );
}

#[test]
fn tinystories656k_lm_head_only_tied_f32() {
    let Some(d) = test_data_dir() else { return };
    let m = SafetensorsModel::open(d.join("tinystories656k")).unwrap();
    let c = m.config();
    assert_eq!(
        (
            c.hidden_size,
            c.intermediate_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim
        ),
        (128, 384, 2, 8, 4, 16)
    );
    assert_eq!(
        (c.vocab_size, c.dtype, c.tie_word_embeddings),
        (2048, ConfigDType::F32, true)
    );
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert!(!m.contains("model.embed_tokens.weight"));
    assert_eq!(m.embed_tensor_name(), "lm_head.weight");
    assert!(m.embeddings_shared());
    check_layer_shapes(&m);
    let ids: Vec<u32> = (0..2048).step_by(97).collect();
    let emb = m.embed(&ids).unwrap();
    for (k, &id) in ids.iter().enumerate() {
        let row = m.lm_head_rows(id as usize..id as usize + 1).unwrap();
        assert_eq!(&emb[k * 128..(k + 1) * 128], row.as_slice());
    }
    let s = ModelSummary::from_safetensors(&m).unwrap();
    assert!(s.tied_embeddings && s.embedding_storage.contains("lm_head only"));
    assert!(
        (600_000..700_000).contains(&s.param_count),
        "{}",
        s.param_count
    );
}

#[test]
fn tinystories656k_bf16_embed_only_tied_matches_f32_copy() {
    let Some(d) = test_data_dir() else { return };
    let m = SafetensorsModel::open(d.join("tinystories656k-bf16")).unwrap();
    assert_eq!(m.config().dtype, ConfigDType::Bf16);
    assert!(!m.contains("lm_head.weight"));
    assert_eq!(m.lm_head_tensor_name(), "model.embed_tokens.weight");
    check_layer_shapes(&m);
    let f32m = SafetensorsModel::open(d.join("tinystories656k")).unwrap();
    let a = m.lm_head_rows(0..2048).unwrap();
    assert_eq!(a, m.embed(&(0..2048).collect::<Vec<u32>>()).unwrap());
    let b = f32m.lm_head_rows(0..2048).unwrap();
    // The bf16 copy is the f32 model rounded: relative error ≤ 2^-8.
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= y.abs() / 256.0 + 1e-30, "{x} vs {y}");
    }
    let (la, lb) = (m.layer(1).unwrap(), f32m.layer(1).unwrap());
    for (x, y) in la.down.weight.iter().zip(&lb.down.weight) {
        assert!((x - y).abs() <= y.abs() / 256.0 + 1e-30);
    }
}

#[test]
fn stories260k_awkward_shapes() {
    let Some(d) = test_data_dir() else { return };
    let m = SafetensorsModel::open(d.join("stories260K")).unwrap();
    let c = m.config();
    assert_eq!(
        (
            c.hidden_size,
            c.intermediate_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.vocab_size
        ),
        (64, 172, 5, 8, 4, 8, 512)
    );
    assert!(c.tie_word_embeddings);
    check_layer_shapes(&m);
    let l = m.layer(4).unwrap();
    assert_eq!((l.gate.out_features, l.gate.in_features), (172, 64));
    assert_eq!((l.down.out_features, l.down.in_features), (64, 172));
    assert_eq!((l.k.out_features, l.o.in_features), (32, 64));
    assert_eq!(m.embed(&[3]).unwrap(), m.lm_head_rows(3..4).unwrap());
    assert!(m.describe().contains("safetensors"));
}

// ---------------------------------------------------------------------------------------------
// Tokenizers

#[test]
fn tokenizer_tiny_llama_15m() {
    let Some(d) = test_data_dir() else { return };
    let t = Tokenizer::from_dir(d.join("tiny-llama-15m")).unwrap();
    assert_eq!(t.vocab_size(), 4096);
    assert_eq!((t.bos_id(), t.eos_id()), (Some(0), Some(1)));
    // No add_bos_token in tokenizer_config.json: the post-processor template adds <s>.
    assert!(t.default_add_bos());
    // Ids from tokenizer.json model.vocab: "The"=464, "Ġcat"=3296, "Ġthe"=264, "Ġtime"=579, "."=16.
    assert_eq!(t.encode("The cat", false).unwrap(), vec![464, 3296]);
    assert_eq!(t.encode("The cat", true).unwrap(), vec![0, 464, 3296]);
    assert_eq!(t.encode(" the time.", false).unwrap(), vec![264, 579, 16]);
    assert_eq!(t.decode(&[464, 3296]).unwrap(), "The cat");
    assert!(t.encode("", false).unwrap().is_empty());
}

#[test]
fn tokenizer_stories260k_and_656k() {
    let Some(d) = test_data_dir() else { return };
    let t = Tokenizer::from_dir(d.join("stories260K")).unwrap();
    assert_eq!(t.vocab_size(), 512);
    assert!(t.default_add_bos());
    assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(2)));
    // "▁Once"=403 "▁upon"=407 "▁a"=261 "▁time"=378, and the golden greedy run starts the same way.
    let ids = t.encode("Once upon a time", true).unwrap();
    assert_eq!(ids, vec![1, 403, 407, 261, 378]);
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("stories260K/golden_greedy_256.json")).unwrap(),
    )
    .unwrap();
    let g: Vec<u32> = golden["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(&g[..5], ids.as_slice());
    assert_eq!(t.decode(&ids[1..]).unwrap(), "Once upon a time");

    let t = Tokenizer::from_dir(d.join("tinystories656k")).unwrap();
    assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(2)));
    assert!(t.default_add_bos());
    assert_eq!(t.encode("a", true).unwrap()[0], 1);
}

#[test]
fn golden_wikitext_ids_and_eval_window_counts() {
    let Some(d) = test_data_dir() else { return };
    let t = Tokenizer::from_dir(d.join("tiny-llama-15m")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("tiny-llama-15m/reference.json")).unwrap(),
    )
    .unwrap();
    let golden: Vec<u32> = reference["golden"]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(golden.len(), 64);
    let raw = CalibSource::open(d.join("corpora/wikitext-2-raw-v1/wiki.test.raw")).unwrap();
    let tokens = raw.token_stream(Some(&t)).unwrap();
    assert_eq!(
        &tokens[..64],
        golden.as_slice(),
        "prefix of the whole-file tokenization"
    );
    // The perplexity protocol of reference.json: 1514 windows at 256, 757 at 512.
    assert_eq!(eval_windows(&tokens, 256, None).total_windows, 1514);
    let w = eval_windows(&tokens, 512, Some(10));
    assert_eq!((w.total_windows, w.windows.len()), (757, 10));
    assert_eq!(&w.windows[0][..64], golden.as_slice());

    // The golden_logits.safetensors `input_ids` (I32 [64]) as a pre-tokenized calibration source.
    let pre = CalibSource::open(d.join("tiny-llama-15m/golden_logits.safetensors")).unwrap();
    let set = calibration_windows(&pre, Some(&t), 1, 64, 0).unwrap();
    assert_eq!(set.windows, vec![golden.clone()]);
    assert_eq!(
        calibration_windows(&pre, None, 1, 32, 0).unwrap().windows[0],
        golden[..32]
    );
    let e = calibration_windows(&pre, None, 2, 64, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("golden_logits.safetensors") && e.contains("nsamples 2"),
        "{e}"
    );
}

#[test]
fn calibration_sampling_real_corpora() {
    let Some(d) = test_data_dir() else { return };
    let t = Tokenizer::from_dir(d.join("tiny-llama-15m")).unwrap();
    let src = CalibSource::open(d.join("corpora/tinyshakespeare/input.txt")).unwrap();
    let a = calibration_windows(&src, Some(&t), 8, 128, 0).unwrap();
    let b = calibration_windows(&src, Some(&t), 8, 128, 0).unwrap();
    let c = calibration_windows(&src, Some(&t), 8, 128, 1).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.windows, c.windows);
    assert_eq!(a.windows.len(), 8);
    assert!(a.windows.iter().all(|w| w.len() == 128));
    let all = src.token_stream(Some(&t)).unwrap();
    assert_eq!(a.available_tokens, all.len());
    assert_eq!(a.available_windows, all.len() / 128);
    for w in &a.windows {
        assert!(
            all.windows(128).any(|x| x == w.as_slice()),
            "window is a contiguous slice of the text"
        );
    }
    assert!(a.description.contains("input.txt") && a.description.contains("seed 0"));

    let bos = calibration_windows_with(
        &src,
        Some(&t),
        &CalibOptions {
            nsamples: 2,
            seqlen: 64,
            seed: 3,
            add_bos: true,
        },
    )
    .unwrap();
    assert!(bos.windows.iter().all(|w| w.len() == 64 && w[0] == 0));

    let c4 = CalibSource::open(d.join("corpora/c4/c4_validation_2k.jsonl")).unwrap();
    assert_eq!(c4.num_documents(), 2000);
    let x = calibration_windows(&c4, Some(&t), 4, 256, 0).unwrap();
    assert_eq!(x, calibration_windows(&c4, Some(&t), 4, 256, 0).unwrap());
    assert_ne!(
        x.windows,
        calibration_windows(&c4, Some(&t), 4, 256, 9)
            .unwrap()
            .windows
    );
    assert!(x.windows.iter().all(|w| w.len() == 256));
    assert!(
        x.available_windows > 4 && x.available_tokens > 500_000,
        "{x:?}"
    );

    let e = calibration_windows(&c4, Some(&t), 4, 1_000_000, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("c4_validation_2k.jsonl") && e.contains("longest"),
        "{e}"
    );
    let e = calibration_windows(&c4, None, 4, 16, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs a tokenizer"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// A small synthetic checkpoint written to a temp dir, then broken in specific ways.

const TINY_CONFIG: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":8,"intermediate_size":16,
"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"vocab_size":16,
"tie_word_embeddings":true,"torch_dtype":"float32"}"#;

struct T {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn f32_tensor(name: &str, shape: &[usize], seed: f32) -> T {
    let n: usize = shape.iter().product();
    let data = (0..n)
        .flat_map(|i| ((i as f32) * 0.01 + seed).to_le_bytes())
        .collect();
    T {
        name: name.into(),
        dtype: "F32",
        shape: shape.to_vec(),
        data,
    }
}

fn safetensors_bytes(ts: &[T]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut off = 0;
    for t in ts {
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + t.data.len()]}),
        );
        off += t.data.len();
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for t in ts {
        out.extend(&t.data);
    }
    out
}

fn tiny_tensors() -> Vec<T> {
    let cfg = ModelConfig::from_json_str(TINY_CONFIG).unwrap();
    let mut ts = vec![
        f32_tensor("model.embed_tokens.weight", &[16, 8], 0.0),
        f32_tensor("model.norm.weight", &[8], 1.0),
    ];
    ts.push(f32_tensor(
        "model.layers.0.input_layernorm.weight",
        &[8],
        1.0,
    ));
    ts.push(f32_tensor(
        "model.layers.0.post_attention_layernorm.weight",
        &[8],
        1.0,
    ));
    for m in ModuleKind::ALL {
        let (o, i) = cfg.linear_shape(m);
        ts.push(f32_tensor(
            &format!("model.layers.0.{}.weight", m.hf_name()),
            &[o, i],
            0.5,
        ));
    }
    ts
}

fn write_checkpoint(dir: &Path, ts: &[T]) {
    std::fs::write(dir.join("config.json"), TINY_CONFIG).unwrap();
    std::fs::write(dir.join("model.safetensors"), safetensors_bytes(ts)).unwrap();
}

fn open_err(dir: &Path) -> String {
    match SafetensorsModel::open(dir) {
        Ok(_) => panic!("expected an error opening {}", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn synthetic_checkpoint_loads() {
    let d = tempfile::tempdir().unwrap();
    write_checkpoint(d.path(), &tiny_tensors());
    let m = SafetensorsModel::open(d.path()).unwrap();
    let l = m.layer(0).unwrap();
    assert_eq!(
        (l.q.out_features, l.k.out_features, l.down.in_features),
        (8, 4, 16)
    );
    assert_eq!(l.q.weight[1], 0.51);
    assert_eq!(m.embed(&[1]).unwrap(), m.lm_head_rows(1..2).unwrap());
}

#[test]
fn config_errors_name_file_and_field() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("model.safetensors"),
        safetensors_bytes(&tiny_tensors()),
    )
    .unwrap();
    let e = open_err(d.path());
    assert!(e.contains("config.json") && e.contains("missing"), "{e}");

    std::fs::write(d.path().join("config.json"), "{\"architectures\": [").unwrap();
    let e = open_err(d.path());
    assert!(
        e.contains("config.json") && e.contains("malformed JSON"),
        "{e}"
    );

    std::fs::write(
        d.path().join("config.json"),
        TINY_CONFIG.replace("LlamaForCausalLM", "GPTNeoXForCausalLM"),
    )
    .unwrap();
    let e = open_err(d.path());
    assert!(
        e.contains("config.json")
            && e.contains("GPTNeoXForCausalLM")
            && e.contains("Qwen2ForCausalLM"),
        "{e}"
    );

    std::fs::write(
        d.path().join("config.json"),
        TINY_CONFIG.replace("\"num_key_value_heads\":1", "\"num_key_value_heads\":3"),
    )
    .unwrap();
    let e = open_err(d.path());
    assert!(
        e.contains("config.json") && e.contains("num_key_value_heads"),
        "{e}"
    );

    let e = ModelConfig::from_file(d.path().join("nope.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.json"), "{e}");
}

#[test]
fn safetensors_corruption_errors() {
    let d = tempfile::tempdir().unwrap();
    let good = safetensors_bytes(&tiny_tensors());
    std::fs::write(d.path().join("config.json"), TINY_CONFIG).unwrap();
    let st = d.path().join("model.safetensors");

    // Shorter than the length prefix.
    std::fs::write(&st, &good[..5]).unwrap();
    let e = open_err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );

    // Header length past the end of the file.
    std::fs::write(&st, &good[..40]).unwrap();
    let e = open_err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("header length"),
        "{e}"
    );

    // Truncated data section: the last tensor's offsets now point past the end.
    std::fs::write(&st, &good[..good.len() - 10]).unwrap();
    let e = open_err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("past the end") && e.contains("down_proj"),
        "{e}"
    );

    // Header JSON broken.
    let mut bad = good.clone();
    bad[8] = b'!';
    std::fs::write(&st, &bad).unwrap();
    let e = open_err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("not valid JSON"),
        "{e}"
    );

    // Explicit header pointing past the file end.
    let header = br#"{"model.norm.weight":{"dtype":"F32","shape":[8],"data_offsets":[0,32]}}"#;
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header);
    f.extend_from_slice(&[0u8; 16]);
    let e = parse_safetensors_header(&f, Path::new("x.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("x.safetensors")
            && e.contains("model.norm.weight")
            && e.contains("past the end"),
        "{e}"
    );
}

#[test]
fn wrong_shape_and_dtype_errors() {
    let d = tempfile::tempdir().unwrap();
    let mut ts = tiny_tensors();
    let q = ts.iter_mut().find(|t| t.name.contains("q_proj")).unwrap();
    q.shape = vec![4, 16];
    write_checkpoint(d.path(), &ts);
    let m = SafetensorsModel::open(d.path()).unwrap();
    let e = m.layer(0).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors")
            && e.contains("self_attn.q_proj.weight")
            && e.contains("[4, 16]")
            && e.contains("[8, 8]"),
        "{e}"
    );

    let mut ts = tiny_tensors();
    let up = ts.iter_mut().find(|t| t.name.contains("up_proj")).unwrap();
    up.dtype = "I32";
    write_checkpoint(d.path(), &ts);
    let e = SafetensorsModel::open(d.path())
        .unwrap()
        .layer(0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("mlp.up_proj.weight") && e.contains("I32"),
        "{e}"
    );

    let mut ts = tiny_tensors();
    ts[0].shape = vec![15, 8];
    ts[0].data.truncate(15 * 8 * 4);
    write_checkpoint(d.path(), &ts);
    let e = open_err(d.path());
    assert!(
        e.contains("embed_tokens") && e.contains("[15, 8]") && e.contains("[16, 8]"),
        "{e}"
    );

    // Untied config without lm_head.
    write_checkpoint(d.path(), &tiny_tensors());
    std::fs::write(
        d.path().join("config.json"),
        TINY_CONFIG.replace(
            "\"tie_word_embeddings\":true",
            "\"tie_word_embeddings\":false",
        ),
    )
    .unwrap();
    let e = open_err(d.path());
    assert!(
        e.contains("lm_head.weight") && e.contains("tie_word_embeddings"),
        "{e}"
    );
}

#[test]
fn sharding_errors_and_success() {
    let d = tempfile::tempdir().unwrap();
    let ts = tiny_tensors();
    let (a, b) = ts.split_at(3);
    std::fs::write(d.path().join("config.json"), TINY_CONFIG).unwrap();
    std::fs::write(d.path().join("s1.safetensors"), safetensors_bytes(a)).unwrap();
    std::fs::write(d.path().join("s2.safetensors"), safetensors_bytes(b)).unwrap();
    let map: serde_json::Map<String, serde_json::Value> = a
        .iter()
        .map(|t| (t.name.clone(), "s1.safetensors".into()))
        .chain(b.iter().map(|t| (t.name.clone(), "s2.safetensors".into())))
        .collect();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let m = SafetensorsModel::open(d.path()).unwrap();
    assert_eq!(m.shard_paths().len(), 2);
    assert_eq!(m.layer(0).unwrap().gate.out_features, 16);

    std::fs::remove_file(d.path().join("s2.safetensors")).unwrap();
    let e = open_err(d.path());
    assert!(
        e.contains("s2.safetensors")
            && e.contains("model.safetensors.index.json")
            && e.contains("missing"),
        "{e}"
    );

    let e = parse_safetensors_index(
        r#"{"weight_map":{"a":"../etc/passwd"}}"#,
        Path::new("i.json"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("i.json") && e.contains("weight_map.a"), "{e}");
    let e = parse_safetensors_index(r#"{"metadata":{}}"#, Path::new("i.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("weight_map"), "{e}");
}

#[test]
fn pickle_only_and_empty_dirs() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.json"), TINY_CONFIG).unwrap();
    std::fs::write(d.path().join("pytorch_model.bin"), b"PK\x03\x04").unwrap();
    let e = open_err(d.path());
    assert!(
        e.contains("pytorch_model.bin")
            && e.contains("pickle")
            && e.contains("safe_serialization=True"),
        "{e}"
    );
    std::fs::remove_file(d.path().join("pytorch_model.bin")).unwrap();
    let e = open_err(d.path());
    assert!(e.contains("no model.safetensors"), "{e}");
    let e = open_err(&d.path().join("does-not-exist"));
    assert!(e.contains("does-not-exist"), "{e}");
}

#[test]
fn tokenizer_missing_and_malformed() {
    let d = tempfile::tempdir().unwrap();
    let e = Tokenizer::from_dir(d.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");
    std::fs::write(d.path().join("tokenizer.model"), b"x").unwrap();
    let e = Tokenizer::from_dir(d.path()).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.model") && e.contains("save_pretrained"),
        "{e}"
    );
    std::fs::write(d.path().join("tokenizer.json"), b"{not json").unwrap();
    let e = Tokenizer::from_dir(d.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Calibration files

fn write_parquet(path: &Path, columns: &[(&str, Vec<&str>)]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let fields: String = columns
        .iter()
        .map(|(n, _)| format!("REQUIRED BYTE_ARRAY {n} (UTF8); "))
        .collect();
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(&format!("message schema {{ {fields} }}"))
            .unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build(),
    );
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut i = 0;
    while let Some(mut col) = rg.next_column().unwrap() {
        let vals: Vec<ByteArray> = columns[i].1.iter().map(|s| ByteArray::from(*s)).collect();
        col.typed::<ByteArrayType>()
            .write_batch(&vals, None, None)
            .unwrap();
        col.close().unwrap();
        i += 1;
    }
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn calibration_file_errors() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("empty.txt");
    std::fs::write(&p, b"").unwrap();
    let e = CalibSource::open(&p).unwrap_err().to_string();
    assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");

    let p = d.path().join("notext.jsonl");
    std::fs::write(&p, "{\"url\": \"a\"}\n{\"id\": 3}\n").unwrap();
    let e = CalibSource::open(&p).unwrap_err().to_string();
    assert!(
        e.contains("notext.jsonl:1") && e.contains("`text`") && e.contains("url"),
        "{e}"
    );

    let p = d.path().join("nocol.parquet");
    write_parquet(&p, &[("content", vec!["a", "b"]), ("url", vec!["u", "v"])]);
    let e = CalibSource::open(&p).unwrap_err().to_string();
    assert!(
        e.contains("nocol.parquet") && e.contains("`text`") && e.contains("content, url"),
        "{e}"
    );

    let p = d.path().join("ok.parquet");
    write_parquet(
        &p,
        &[
            ("url", vec!["u", "v", "w"]),
            ("text", vec!["one doc", "two", "three"]),
        ],
    );
    let src = CalibSource::open(&p).unwrap();
    assert_eq!(src.num_documents(), 3);

    let p = d.path().join("data.csv");
    std::fs::write(&p, "a,b").unwrap();
    let e = CalibSource::open(&p).unwrap_err().to_string();
    assert!(e.contains("data.csv") && e.contains("unsupported"), "{e}");

    let p = d.path().join("bad.safetensors");
    std::fs::write(&p, safetensors_bytes(&[f32_tensor("x", &[2], 0.0)])).unwrap();
    let e = CalibSource::open(&p).unwrap_err().to_string();
    assert!(
        e.contains("bad.safetensors") && e.contains("input_ids"),
        "{e}"
    );

    // Pre-tokenized: I64 [3, 5] and a negative id.
    let ids: Vec<u8> = (0..15i64).flat_map(|v| v.to_le_bytes()).collect();
    let p = d.path().join("ids.safetensors");
    std::fs::write(
        &p,
        safetensors_bytes(&[T {
            name: "input_ids".into(),
            dtype: "I64",
            shape: vec![3, 5],
            data: ids,
        }]),
    )
    .unwrap();
    let src = CalibSource::open(&p).unwrap();
    let set = calibration_windows(&src, None, 2, 4, 0).unwrap();
    assert_eq!(set.windows, vec![vec![0, 1, 2, 3], vec![5, 6, 7, 8]]);
    assert_eq!((set.available_tokens, set.available_windows), (15, 3));
    let e = calibration_windows(&src, None, 2, 6, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ids.safetensors") && e.contains("seqlen 6"),
        "{e}"
    );
    let neg: Vec<u8> = [-1i32, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(
        &p,
        safetensors_bytes(&[T {
            name: "input_ids".into(),
            dtype: "I32",
            shape: vec![2],
            data: neg,
        }]),
    )
    .unwrap();
    let e = CalibSource::open(&p).unwrap_err().to_string();
    assert!(e.contains("ids.safetensors") && e.contains("-1"), "{e}");
}

#[test]
fn calibration_too_short_with_real_tokenizer() {
    let Some(dd) = test_data_dir() else { return };
    let t = Tokenizer::from_dir(dd.join("tiny-llama-15m")).unwrap();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("short.txt");
    std::fs::write(&p, "The cat sat on the mat.").unwrap();
    let src = CalibSource::open(&p).unwrap();
    let e = calibration_windows(&src, Some(&t), 4, 128, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("short.txt") && e.contains("128") && e.contains("tokens"),
        "{e}"
    );
    let ok = calibration_windows(&src, Some(&t), 3, 4, 0).unwrap();
    assert_eq!(ok.windows.len(), 3);

    let p = d.path().join("docs.parquet");
    write_parquet(
        &p,
        &[(
            "text",
            vec!["The cat sat on the mat. The cat sat on the mat.", "tiny"],
        )],
    );
    let src = CalibSource::open(&p).unwrap();
    let s = calibration_windows(&src, Some(&t), 5, 8, 1).unwrap();
    assert!(s.windows.iter().all(|w| w.len() == 8));
    let e = calibration_windows(&src, Some(&t), 5, 64, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("docs.parquet") && e.contains("longest"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Fuzzing: parsers must return errors, never panic, on arbitrary input.

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            (0u64..5000).prop_map(serde_json::Value::from),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
                .map_or(serde_json::Value::Null, serde_json::Value::Number)),
            "[a-zA-Z0-9_./]{0,12}".prop_map(serde_json::Value::from),
            prop::sample::select(vec![
                "LlamaForCausalLM",
                "Qwen3ForCausalLM",
                "llama3",
                "linear",
                "yarn",
                "bfloat16"
            ])
            .prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                prop::collection::vec(("[a-z_]{1,8}", inner), 0..4)
                    .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    const CONFIG_KEYS: [&str; 16] = [
        "architectures",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "tie_word_embeddings",
        "torch_dtype",
        "eos_token_id",
        "attention_bias",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        #[test]
        fn config_random_text(s in ".{0,200}") {
            let _ = ModelConfig::from_json_str(&s);
        }

        #[test]
        fn safetensors_header_random_bytes(b in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_safetensors_header(&b, Path::new("f.safetensors"));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(600))]
        #[test]
        fn config_mutated_fields(edits in prop::collection::vec((prop::sample::select(CONFIG_KEYS.to_vec()), json_value()), 0..6)) {
            let mut v: serde_json::Value = serde_json::from_str(TINY_CONFIG).unwrap();
            for (k, val) in edits {
                v[k] = val;
            }
            if let Ok(c) = ModelConfig::from_json_str(&v.to_string()) {
                prop_assert!(c.hidden_size > 0 && c.head_dim > 0 && c.num_heads % c.num_kv_heads == 0);
            }
        }

        #[test]
        fn safetensors_header_mutated(
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            cut in any::<prop::sample::Index>(),
            do_cut in any::<bool>(),
        ) {
            let mut b = safetensors_bytes(&tiny_tensors()[..3]);
            for (i, x) in flips {
                let at = i.index(b.len());
                b[at] = x;
            }
            if do_cut {
                let n = cut.index(b.len() + 1);
                b.truncate(n);
            }
            if let Ok(h) = parse_safetensors_header(&b, Path::new("f.safetensors")) {
                for t in h.tensors.values() {
                    prop_assert!(h.data_start + t.data_offsets.1 <= b.len());
                }
            }
        }

        #[test]
        fn safetensors_header_json(v in json_value()) {
            let h = v.to_string().into_bytes();
            let mut b = (h.len() as u64).to_le_bytes().to_vec();
            b.extend(h);
            b.extend([0u8; 64]);
            let _ = parse_safetensors_header(&b, Path::new("f.safetensors"));
        }

        #[test]
        fn index_parser(v in json_value(), s in ".{0,64}") {
            let _ = parse_safetensors_index(&serde_json::json!({"weight_map": v}).to_string(), Path::new("i.json"));
            let _ = parse_safetensors_index(&s, Path::new("i.json"));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn jsonl_and_text(b in prop::collection::vec(any::<u8>(), 0..200), lines in prop::collection::vec(json_value(), 0..5)) {
            if let Ok(t) = parse_text(&b, Path::new("f.txt")) {
                let _ = parse_jsonl(&t, Path::new("f.jsonl"));
            }
            let text: String = lines.iter().map(|l| l.to_string() + "\n").collect();
            if let Ok(docs) = parse_jsonl(&text, Path::new("f.jsonl")) {
                prop_assert!(!docs.is_empty());
            }
        }

        #[test]
        fn windows_from_text_source(text in "[a-z \n]{0,64}", n in 1usize..4, l in 1usize..8, seed in any::<u64>()) {
            // Without a tokenizer a text source must error, not panic; eval windows never panic.
            let src = CalibSource::from_text("mem.txt", text);
            let is_file_err = matches!(calibration_windows(&src, None, n, l, seed), Err(CalibError::File { .. }));
            prop_assert!(is_file_err);
            let toks: Vec<u32> = (0..(seed % 50) as u32).collect();
            let w = eval_windows(&toks, l, Some(n));
            prop_assert!(w.windows.iter().all(|x| x.len() == l));
        }
    }
}
