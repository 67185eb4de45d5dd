//! Writing a quantized model as a Hugging Face GPTQ checkpoint directory (algorithm.md §3).
//!
//! Layout of the output (what transformers / vLLM / GPTQModel expect, §3.1, §3.5):
//! - every decoder linear `<prefix>` as `<prefix>.qweight` I32, `.qzeros` I32, `.scales` F16,
//!   `.g_idx` I32 (+ `.bias` F16 when the source has one); its float `.weight` is not written;
//! - every other tensor (embed_tokens, the norms, Qwen3 q/k norms, lm_head unless
//!   `tie_word_embeddings`) read through [`WeightSource`] and written as **F16**, with
//!   `torch_dtype: float16` in config.json. Why F16 and not the source dtype: the `WeightSource`
//!   trait hands out f32 whatever the storage was, vLLM's non-Marlin `gptq` path runs fp16
//!   activations only (§3.6), and GPTQModel/AutoGPTQ store scales and bias as F16 anyway. bf16 → f16
//!   is exact for normal-range values; values beyond ±65504 are refused (they would become inf), and
//!   f32 sources (the demo model) are rounded, so `eval` of the export can differ from the in-memory
//!   f32 model in the last digits (the quantized linears themselves are bit-exact);
//! - `model.safetensors`, or `model-0000k-of-0000N.safetensors` shards of at most
//!   `max_shard_bytes` (a single larger tensor gets a shard of its own, as in transformers) with
//!   `model.safetensors.index.json`;
//! - `config.json` (the source's, or one generated from [`crate::model::ModelConfig`] for the
//!   synthetic model) with a `quantization_config` block, and the same block as
//!   `quantize_config.json`;
//! - tokenizer files and generation_config.json copied from the source directory when present;
//! - the run report as `gptaq_report.json`.
//!
//! Zero points are written in checkpoint_format "gptq" (v1, `zero − 1`), the format every consumer
//! reads. Asymmetric zeros of 0 are wrapped field-wise (see [`super::pack::pack_qzeros`]) and counted
//! in a warning, because ExLlama-style decoders misread them (§3.3 "asym hazard").
//!
//! Atomicity: everything is written into a hidden temporary directory next to the target (same
//! parent, so the final `rename` never crosses a file system), every file and the directory are
//! fsynced, then the directory is renamed into place. An existing target is refused before any work
//! unless `force`; with `force` it is renamed aside, the new directory renamed in, and only then the
//! old one deleted. On any error the temporary directory is removed and the target is untouched.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::f16;
use serde_json::{Value, json};

use super::ExportError;
use super::pack::{self, SUPPORTED_BITS};
use crate::model::weights::{EMBED_NAME, FINAL_NORM_NAME, LM_HEAD_NAME};
use crate::model::{ModelConfig, ModuleKind, WeightSource};
use crate::pipeline::QuantizedModel;
use crate::quant::{Method, QuantConfig, QuantResult};

/// transformers' default `max_shard_size` is "5GB"; the issue asks for 4 GB (decimal, as HF parses it).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 4_000_000_000;

/// Side files copied verbatim from the source directory when present.
pub const SIDE_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
];

/// File name of the run report inside an exported directory.
pub const REPORT_FILE: &str = "gptaq_report.json";

/// Rows of embed_tokens / lm_head converted per chunk (bounds memory for large vocabularies).
const ROW_CHUNK: usize = 2048;

#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Largest safetensors shard in bytes (tensor data; a single larger tensor gets its own shard).
    pub max_shard_bytes: u64,
    /// Replace an existing non-empty output directory.
    pub force: bool,
    /// `meta.uri` of quantize_config.json (e.g. the project's URL); omitted when `None`.
    pub uri: Option<String>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            force: false,
            uri: None,
        }
    }
}

/// What [`write_checkpoint`] wrote.
#[derive(Clone, Debug)]
pub struct ExportSummary {
    pub dir: PathBuf,
    /// Safetensors file names, in order.
    pub shards: Vec<String>,
    pub tensors: usize,
    /// Total tensor bytes (the index's `total_size`).
    pub tensor_bytes: u64,
    pub quantized_modules: usize,
    /// The `desc_act` written (true iff some module's g_idx is not `j / group_size`, §3.4).
    pub desc_act: bool,
    /// Side files copied from the source directory.
    pub copied_files: Vec<String>,
    /// The `quantization_config` block written to config.json and quantize_config.json.
    pub quantization_config: Value,
    /// Consumer-compatibility notes (§3.6): which kernels cannot run this checkpoint, and why.
    /// Checked: vLLM `gptq_marlin` (4/8-bit, sym, group_size −1/32/64/128, in % 128, out % 64),
    /// vLLM `gptq` / ExLlama (group_size must divide in_features), ExLlama v1/v2 (4-bit only,
    /// in % 32), asymmetric zero points of 0 under v1, f16 rounding of non-quantized tensors.
    pub warnings: Vec<String>,
}

/// Writes `model` (quantized from `source`) as a GPTQ checkpoint directory at `out`.
///
/// `source_dir` is the Hugging Face directory `source` was read from (config.json and tokenizer
/// files are taken from it); `None` for the synthetic model, whose config.json is generated.
pub fn write_checkpoint(
    out: &Path,
    source: &dyn WeightSource,
    source_dir: Option<&Path>,
    model: &QuantizedModel,
    opts: &ExportOptions,
) -> Result<ExportSummary, ExportError> {
    // 1. The target, before any work.
    let target = check_target(out, source_dir, opts.force)?;
    if opts.max_shard_bytes == 0 {
        return Err(ExportError::Invalid("max_shard_bytes must be > 0".into()));
    }
    let qcfg = &model.report.config;
    let cfg = source.config();
    check_source_config(cfg, source_dir)?;

    // 2. Every module present, consistent and packable; consumer warnings.
    let checked = validate_modules(cfg, qcfg, model)?;
    let mut warnings = checked.warnings;

    // 3. Small float tensors (norms, biases) in f16, with the source's linear shapes checked.
    let small = collect_small_tensors(source, cfg, model)?;
    if cfg.dtype != crate::model::config::ConfigDType::F16 {
        warnings.push(format!(
            "non-quantized tensors (embeddings, norms, lm_head) and biases were converted from {} to float16 (torch_dtype float16; vLLM's gptq kernels run fp16 only){}",
            cfg.dtype.name(),
            if cfg.dtype == crate::model::config::ConfigDType::F32 {
                ": perplexity of the export can differ from the in-memory f32 run in the last digits"
            } else {
                ""
            }
        ));
    }

    // 4. Plan tensors and shards.
    let plan = plan_tensors(cfg, qcfg, model, &small)?;
    let shards = assign_shards(&plan, opts.max_shard_bytes);
    let nshards = shards.len();
    let shard_names: Vec<String> = if nshards == 1 {
        vec!["model.safetensors".to_string()]
    } else {
        (1..=nshards)
            .map(|k| format!("model-{k:05}-of-{nshards:05}.safetensors"))
            .collect()
    };

    let qconf = quantization_config(qcfg, checked.desc_act, opts);
    let config_json = build_config_json(cfg, source_dir, &qconf)?;

    // 5. Write everything into the temporary directory.
    let tmp = TempDir::create(&target)?;
    let producer = Producer {
        source,
        model,
        small: &small,
        qcfg,
    };
    for (ids, name) in shards.iter().zip(&shard_names) {
        let tensors: Vec<&Planned> = ids.iter().map(|&i| &plan[i]).collect();
        write_safetensors(&tmp.path.join(name), &tensors, &producer)?;
    }
    let tensor_bytes: u64 = plan.iter().map(|t| t.nbytes).sum();
    if nshards > 1 {
        let mut weight_map = serde_json::Map::new();
        for (ids, name) in shards.iter().zip(&shard_names) {
            for &i in ids {
                weight_map.insert(plan[i].name.clone(), Value::String(name.clone()));
            }
        }
        let index = json!({"metadata": {"total_size": tensor_bytes}, "weight_map": weight_map});
        write_json(&tmp.path.join("model.safetensors.index.json"), &index)?;
    }
    write_json(&tmp.path.join("config.json"), &config_json)?;
    write_json(&tmp.path.join("quantize_config.json"), &qconf)?;
    let report = serde_json::to_value(&model.report)
        .map_err(|e| ExportError::Invalid(format!("run report is not serializable: {e}")))?;
    write_json(&tmp.path.join(REPORT_FILE), &report)?;
    let mut copied_files = Vec::new();
    if let Some(dir) = source_dir {
        for f in SIDE_FILES {
            let src = dir.join(f);
            if src.is_file() {
                let dst = tmp.path.join(f);
                std::fs::copy(&src, &dst).map_err(|e| ExportError::io(&src, "cannot copy", e))?;
                sync_file(&dst)?;
                copied_files.push(f.to_string());
            }
        }
    }
    sync_dir(&tmp.path)?;

    // 6. Into place.
    tmp.commit(&target)?;
    Ok(ExportSummary {
        dir: target,
        shards: shard_names,
        tensors: plan.len(),
        tensor_bytes,
        quantized_modules: model.modules.len(),
        desc_act: checked.desc_act,
        copied_files,
        quantization_config: qconf,
        warnings,
    })
}

// ------------------------------------------------------------------------------------------------
// Target directory handling

/// The absolute target path, after refusing: a path without a final component, an existing
/// non-directory, an existing non-empty directory without `force`, and a target that is (or
/// contains) the source model directory (with `force` that would delete the model being exported).
fn check_target(
    out: &Path,
    source_dir: Option<&Path>,
    force: bool,
) -> Result<PathBuf, ExportError> {
    let shown = || out.display().to_string();
    let Some(name) = out.file_name() else {
        return Err(ExportError::Io {
            path: shown(),
            message: "output path has no final directory name".into(),
        });
    };
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let parent = parent
        .canonicalize()
        .map_err(|e| ExportError::io(&parent, "parent directory of the output is not usable", e))?;
    let target = parent.join(name);
    match std::fs::symlink_metadata(&target) {
        Ok(meta) if !meta.is_dir() => {
            return Err(ExportError::Io {
                path: shown(),
                message: "exists and is not a directory; refusing to replace it".into(),
            });
        }
        Ok(_) => {
            let non_empty = std::fs::read_dir(&target)
                .map_err(|e| ExportError::io(&target, "cannot list", e))?
                .next()
                .is_some();
            if non_empty && !force {
                return Err(ExportError::OutputExists { path: shown() });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ExportError::io(&target, "cannot inspect", e)),
    }
    if let Some(src) = source_dir
        && let Ok(src) = src.canonicalize()
        && src.starts_with(&target)
    {
        return Err(ExportError::Io {
            path: shown(),
            message: format!(
                "is (or contains) the source model directory {}; choose another output directory",
                src.display()
            ),
        });
    }
    Ok(target)
}

/// The hidden temporary output directory; removed on drop unless committed.
struct TempDir {
    path: PathBuf,
    nonce: String,
    committed: bool,
}

impl TempDir {
    fn create(target: &Path) -> Result<Self, ExportError> {
        let (parent, name) = split(target)?;
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let nonce = format!("{}-{nonce}", std::process::id());
        let path = parent.join(format!(".{name}.tmp-{nonce}"));
        std::fs::create_dir(&path)
            .map_err(|e| ExportError::io(&path, "cannot create temporary directory", e))?;
        Ok(TempDir {
            path,
            nonce,
            committed: false,
        })
    }

    /// Renames the temporary directory to `target`, moving an existing target aside first and
    /// deleting it only after the new one is in place.
    fn commit(mut self, target: &Path) -> Result<(), ExportError> {
        let (parent, name) = split(target)?;
        let old = if target.exists() {
            // Same nonce as the temporary directory: unique per export, recognisable as ours.
            let aside = parent.join(format!(".{name}.old-{}", self.nonce));
            std::fs::rename(target, &aside)
                .map_err(|e| ExportError::io(target, "cannot move the existing output aside", e))?;
            Some(aside)
        } else {
            None
        };
        if let Err(e) = std::fs::rename(&self.path, target) {
            // Put the old output back so a failed commit leaves the target as it was.
            if let Some(aside) = &old {
                let _ = std::fs::rename(aside, target);
            }
            return Err(ExportError::io(
                target,
                "cannot rename the new output into place",
                e,
            ));
        }
        self.committed = true;
        sync_dir(&parent)?;
        if let Some(aside) = old {
            std::fs::remove_dir_all(&aside).map_err(|e| {
                ExportError::io(
                    &aside,
                    "new output is in place but the old one could not be deleted",
                    e,
                )
            })?;
        }
        Ok(())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: an error here must not mask the error that caused the unwind.
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn split(target: &Path) -> Result<(PathBuf, String), ExportError> {
    match (target.parent(), target.file_name()) {
        (Some(p), Some(n)) => Ok((p.to_path_buf(), n.to_string_lossy().to_string())),
        _ => Err(ExportError::Io {
            path: target.display().to_string(),
            message: "output path has no parent directory".into(),
        }),
    }
}

fn sync_file(path: &Path) -> Result<(), ExportError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| ExportError::io(path, "cannot fsync", e))
}

fn sync_dir(path: &Path) -> Result<(), ExportError> {
    // Directory fsync makes the renames / new entries durable (POSIX); Windows cannot open a
    // directory as a file, and there NTFS journals the metadata anyway.
    #[cfg(unix)]
    {
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| ExportError::io(path, "cannot fsync directory", e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn write_json(path: &Path, value: &Value) -> Result<(), ExportError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| ExportError::io(path, "cannot serialize", e))?;
    text.push('\n');
    let mut f =
        std::fs::File::create(path).map_err(|e| ExportError::io(path, "cannot create", e))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| ExportError::io(path, "cannot write", e))
}

// ------------------------------------------------------------------------------------------------
// Validation

struct Checked {
    desc_act: bool,
    warnings: Vec<String>,
}

fn module_err(layer: usize, m: ModuleKind, message: impl Into<String>) -> ExportError {
    ExportError::Module {
        layer,
        module: m.short_name().to_string(),
        message: message.into(),
    }
}

/// Refuses a source_dir whose config.json describes another model than `source`.
fn check_source_config(cfg: &ModelConfig, source_dir: Option<&Path>) -> Result<(), ExportError> {
    let Some(dir) = source_dir else {
        return Ok(());
    };
    let p = dir.join("config.json");
    if !p.is_file() {
        return Ok(());
    }
    let theirs = ModelConfig::from_file(&p).map_err(|e| ExportError::format(&p, e.to_string()))?;
    if theirs.hidden_size != cfg.hidden_size
        || theirs.num_layers != cfg.num_layers
        || theirs.intermediate_size != cfg.intermediate_size
        || theirs.vocab_size != cfg.vocab_size
        || theirs.q_dim() != cfg.q_dim()
        || theirs.kv_dim() != cfg.kv_dim()
        || theirs.tie_word_embeddings != cfg.tie_word_embeddings
    {
        return Err(ExportError::format(
            &p,
            "describes a different model than the weight source being exported",
        ));
    }
    Ok(())
}

/// Checks every (layer, module) result against the model config and the format; computes
/// `desc_act` and the consumer warnings. Also decodes each module from its packed form and compares
/// with the solver's `q` (the self-check of §3.3), reporting mismatches as warnings.
fn validate_modules(
    cfg: &ModelConfig,
    qcfg: &QuantConfig,
    model: &QuantizedModel,
) -> Result<Checked, ExportError> {
    let bits = qcfg.bits;
    if !SUPPORTED_BITS.contains(&bits) {
        return Err(ExportError::Invalid(format!(
            "{bits}-bit quantization cannot be stored as a GPTQ checkpoint (supported: 2, 3, 4, 8)"
        )));
    }
    if qcfg.group_size == Some(0) {
        return Err(ExportError::Invalid("group_size 0".into()));
    }
    let maxq = qcfg.maxq();
    let mut desc_act = false;
    let mut warnings = Vec::new();
    let mut zero_zeros = 0usize;
    let mut total_zeros = 0usize;
    let mut mismatches = Vec::new();
    for layer in 0..cfg.num_layers {
        for m in ModuleKind::ALL {
            let r = model.modules.get(&(layer, m)).ok_or_else(|| {
                module_err(
                    layer,
                    m,
                    "missing from the quantized model (no QuantResult)",
                )
            })?;
            let (rows, cols) = cfg.linear_shape(m);
            if (r.rows, r.cols) != (rows, cols) {
                return Err(module_err(
                    layer,
                    m,
                    format!(
                        "quantized shape [{}, {}] does not match the model's [{rows}, {cols}]",
                        r.rows, r.cols
                    ),
                ));
            }
            let groups = qcfg.num_groups(cols);
            // `q` may be absent (the pipeline keeps only the codes; QuantResult::weights).
            let q_len = if r.q.is_empty() {
                rows * cols
            } else {
                r.q.len()
            };
            let lens = [
                ("codes", r.codes.len(), rows * cols),
                ("q", q_len, rows * cols),
                ("scales", r.scales.len(), groups * rows),
                ("zeros", r.zeros.len(), groups * rows),
                ("g_idx", r.g_idx.len(), cols),
            ];
            for (what, got, want) in lens {
                if got != want {
                    return Err(module_err(
                        layer,
                        m,
                        format!("{what} has {got} elements, expected {want} ({groups} groups)"),
                    ));
                }
            }
            for (what, len) in [("in_features", cols), ("out_features", rows)] {
                pack::packed_words(len, bits, what)
                    .map_err(|e| module_err(layer, m, e.to_string()))?;
            }
            if let Some((i, &c)) = r
                .codes
                .iter()
                .enumerate()
                .find(|&(_, &c)| u32::from(c) > maxq)
            {
                return Err(module_err(
                    layer,
                    m,
                    format!(
                        "code {c} at [{}, {}] exceeds maxq {maxq}",
                        i / cols,
                        i % cols
                    ),
                ));
            }
            if let Some((i, &z)) = r.zeros.iter().enumerate().find(|&(_, &z)| z > maxq) {
                return Err(module_err(
                    layer,
                    m,
                    format!(
                        "zero point {z} of group {} row {} exceeds maxq {maxq}",
                        i / rows,
                        i % rows
                    ),
                ));
            }
            if let Some((j, &g)) = r
                .g_idx
                .iter()
                .enumerate()
                .find(|&(_, &g)| g as usize >= groups)
            {
                return Err(module_err(
                    layer,
                    m,
                    format!("g_idx[{j}] = {g} but there are {groups} groups"),
                ));
            }
            if let Some((i, &s)) = r
                .scales
                .iter()
                .enumerate()
                .find(|&(_, &s)| !s.is_finite() || f16::from_f32(s).to_f32() != s)
            {
                return Err(module_err(
                    layer,
                    m,
                    format!(
                        "scale {s} of group {} row {} is not exactly representable in f16 (the solver must round scales to f16, quant/mod.rs)",
                        i / rows,
                        i % rows
                    ),
                ));
            }
            let gs = qcfg.group_len(cols);
            if r.g_idx
                .iter()
                .enumerate()
                .any(|(j, &g)| g as usize != j / gs)
            {
                desc_act = true;
            }
            total_zeros += r.zeros.len();
            zero_zeros += r.zeros.iter().filter(|&&z| z == 0).count();
            // Self-check: decode the packed tensors exactly as a loader would.
            let deq = dequant_packed(r, bits).map_err(|e| module_err(layer, m, e.to_string()))?;
            let bad = deq
                .iter()
                .zip(r.weights().iter())
                .filter(|(a, b)| a.to_bits() != b.to_bits() && **a != **b)
                .count();
            if bad > 0 {
                mismatches.push(format!("layer {layer} {} ({bad} weights)", m.short_name()));
            }
        }
    }
    if !mismatches.is_empty() {
        warnings.push(format!(
            "the packed checkpoint does not reproduce the solver's fake-quantized weights exactly in {} module(s): {} (q ≠ scale·(code − zero); the checkpoint holds the codes)",
            mismatches.len(),
            mismatches.join(", ")
        ));
    }
    if zero_zeros > 0 {
        warnings.push(format!(
            "{zero_zeros} of {total_zeros} zero points are 0 (asymmetric groups); checkpoint_format \"gptq\" (v1) stores zero−1, so they are stored wrapped as {maxq}. gptaq-studio reads them back exactly, but ExLlama, vLLM gptq_gemm and Triton kernels decode them as {} (those groups shift by one scale step), and GPTQModel's word-wise v1→v2 conversion carries into the neighbouring field",
            maxq + 1
        ));
    }
    kernel_warnings(cfg, qcfg, &mut warnings);
    Ok(Checked { desc_act, warnings })
}

/// `W[o, i] = scale[g, o] · (code − zero)` decoded from the packed form of `r` (what any v1 loader
/// computes, with the field-wise wrap of zeros undone).
fn dequant_packed(r: &QuantResult, bits: u32) -> Result<Vec<f32>, pack::PackError> {
    let (rows, cols) = (r.rows, r.cols);
    let groups = r.scales.len() / rows.max(1);
    let qw = pack::pack_qweight(&r.codes, rows, cols, bits)?;
    let qz = pack::pack_qzeros(&r.zeros, groups, rows, bits)?;
    let codes = pack::unpack_qweight(&qw, rows, cols, bits)?;
    let zeros = pack::unpack_qzeros(&qz, groups, rows, bits)?;
    let scales: Vec<f32> = r
        .scales
        .iter()
        .map(|&s| f16::from_f32(s).to_f32())
        .collect();
    Ok(super::reader::dequantize(
        &codes, &zeros, &scales, &r.g_idx, rows, cols,
    ))
}

/// §3.6: which consumers will not run this checkpoint.
fn kernel_warnings(cfg: &ModelConfig, qcfg: &QuantConfig, warnings: &mut Vec<String>) {
    let mut in_dims: Vec<usize> = ModuleKind::ALL
        .iter()
        .map(|&m| cfg.linear_shape(m).1)
        .collect();
    let mut out_dims: Vec<usize> = ModuleKind::ALL
        .iter()
        .map(|&m| cfg.linear_shape(m).0)
        .collect();
    in_dims.sort_unstable();
    in_dims.dedup();
    out_dims.sort_unstable();
    out_dims.dedup();
    let bits = qcfg.bits;
    if let Some(gs) = qcfg.group_size {
        let bad: Vec<String> = in_dims
            .iter()
            .filter(|&&n| !n.is_multiple_of(gs))
            .map(|n| n.to_string())
            .collect();
        if !bad.is_empty() {
            warnings.push(format!(
                "group_size {gs} does not divide in_features {}: vLLM (gptq and gptq_marlin) and ExLlama refuse these layers; transformers with GPTQModel's torch kernel loads them",
                bad.join(", ")
            ));
        }
    }
    let mut marlin = Vec::new();
    if bits != 4 && bits != 8 {
        marlin.push(format!("{bits}-bit (needs 4 or 8)"));
    }
    if !qcfg.sym {
        marlin.push("asymmetric (Marlin ignores qzeros)".to_string());
    }
    if !matches!(qcfg.group_size, None | Some(32) | Some(64) | Some(128)) {
        marlin.push("group_size not in {-1, 32, 64, 128}".to_string());
    }
    if in_dims.iter().any(|n| !n.is_multiple_of(128)) {
        marlin.push("an in_features not a multiple of 128".to_string());
    }
    if out_dims.iter().any(|n| !n.is_multiple_of(64)) {
        marlin.push("an out_features not a multiple of 64".to_string());
    }
    if !marlin.is_empty() {
        warnings.push(format!(
            "vLLM will not use gptq_marlin ({}); it falls back to gptq_gemm (fp16 only, slower)",
            marlin.join("; ")
        ));
    }
    if bits != 4 {
        warnings.push(format!(
            "ExLlama v1/v2 kernels (transformers/AutoGPTQ default) support only 4-bit; {bits}-bit loads with the slower torch/Triton kernels"
        ));
    } else if in_dims.iter().any(|n| !n.is_multiple_of(32)) {
        warnings.push(
            "ExLlama needs in_features % 32 == 0; some layers will use the torch kernel"
                .to_string(),
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Tensors

/// Small float tensors (norms, biases) as f16 bytes, keyed by tensor name.
fn collect_small_tensors(
    source: &dyn WeightSource,
    cfg: &ModelConfig,
    model: &QuantizedModel,
) -> Result<BTreeMap<String, Vec<u8>>, ExportError> {
    let mut out = BTreeMap::new();
    for layer in 0..cfg.num_layers {
        let lw = source.layer(layer)?;
        let p = format!("model.layers.{layer}.");
        let mut put = |name: String, v: &[f32]| -> Result<(), ExportError> {
            let bytes = f16_bytes(v, &name)?;
            out.insert(name, bytes);
            Ok(())
        };
        put(format!("{p}input_layernorm.weight"), &lw.input_norm)?;
        put(format!("{p}post_attention_layernorm.weight"), &lw.post_norm)?;
        if let Some(n) = &lw.q_norm {
            put(format!("{p}self_attn.q_norm.weight"), n)?;
        }
        if let Some(n) = &lw.k_norm {
            put(format!("{p}self_attn.k_norm.weight"), n)?;
        }
        for m in ModuleKind::ALL {
            let lin = lw.linear(m);
            if let Some(r) = model.modules.get(&(layer, m))
                && (lin.out_features, lin.in_features) != (r.rows, r.cols)
            {
                return Err(module_err(
                    layer,
                    m,
                    format!(
                        "source weight is [{}, {}] but the quantized result is [{}, {}]",
                        lin.out_features, lin.in_features, r.rows, r.cols
                    ),
                ));
            }
            if let Some(b) = &lin.bias {
                if b.len() != lin.out_features {
                    return Err(module_err(
                        layer,
                        m,
                        format!(
                            "bias has {} elements, expected {}",
                            b.len(),
                            lin.out_features
                        ),
                    ));
                }
                put(format!("{p}{}.bias", m.hf_name()), b)?;
            }
        }
    }
    out.insert(
        FINAL_NORM_NAME.to_string(),
        f16_bytes(&source.final_norm()?, FINAL_NORM_NAME)?,
    );
    Ok(out)
}

/// f32 → f16 little-endian bytes, refusing values f16 cannot hold (they would become ±inf).
fn f16_bytes(v: &[f32], name: &str) -> Result<Vec<u8>, ExportError> {
    let mut out = Vec::with_capacity(v.len() * 2);
    for (i, &x) in v.iter().enumerate() {
        let h = f16::from_f32(x);
        if !h.is_finite() {
            return Err(ExportError::Invalid(format!(
                "tensor `{name}`: value {x} at index {i} is not representable in float16"
            )));
        }
        out.extend_from_slice(&h.to_le_bytes());
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug)]
enum Part {
    QWeight,
    QZeros,
    Scales,
    GIdx,
}

#[derive(Clone, Debug)]
enum Source {
    Small,
    Embed,
    LmHead,
    Quant(usize, ModuleKind, Part),
}

#[derive(Clone, Debug)]
struct Planned {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    nbytes: u64,
    src: Source,
}

fn plan_tensors(
    cfg: &ModelConfig,
    qcfg: &QuantConfig,
    model: &QuantizedModel,
    small: &BTreeMap<String, Vec<u8>>,
) -> Result<Vec<Planned>, ExportError> {
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let mut plan = Vec::new();
    let f16_t = |name: String, shape: Vec<usize>, src: Source| Planned {
        nbytes: 2 * shape.iter().product::<usize>() as u64,
        name,
        dtype: "F16",
        shape,
        src,
    };
    plan.push(f16_t(EMBED_NAME.into(), vec![v, h], Source::Embed));
    let small_t = |name: String| -> Option<Planned> {
        small.get(&name).map(|b| Planned {
            nbytes: b.len() as u64,
            shape: vec![b.len() / 2],
            name,
            dtype: "F16",
            src: Source::Small,
        })
    };
    let bits = qcfg.bits as usize;
    for layer in 0..cfg.num_layers {
        let p = format!("model.layers.{layer}.");
        for n in [
            "input_layernorm.weight",
            "self_attn.q_norm.weight",
            "self_attn.k_norm.weight",
            "post_attention_layernorm.weight",
        ] {
            plan.extend(small_t(format!("{p}{n}")));
        }
        for m in ModuleKind::ALL {
            let r = model
                .modules
                .get(&(layer, m))
                .ok_or_else(|| module_err(layer, m, "missing from the quantized model"))?;
            let (rows, cols) = (r.rows, r.cols);
            let groups = qcfg.num_groups(cols);
            let prefix = format!("{p}{}", m.hf_name());
            let i32_t = |suffix: &str, shape: Vec<usize>, part: Part| Planned {
                nbytes: 4 * shape.iter().product::<usize>() as u64,
                name: format!("{prefix}.{suffix}"),
                dtype: "I32",
                shape,
                src: Source::Quant(layer, m, part),
            };
            plan.push(i32_t(
                "qweight",
                vec![cols * bits / 32, rows],
                Part::QWeight,
            ));
            plan.push(i32_t(
                "qzeros",
                vec![groups, rows * bits / 32],
                Part::QZeros,
            ));
            plan.push(Planned {
                nbytes: 2 * (groups * rows) as u64,
                name: format!("{prefix}.scales"),
                dtype: "F16",
                shape: vec![groups, rows],
                src: Source::Quant(layer, m, Part::Scales),
            });
            plan.push(i32_t("g_idx", vec![cols], Part::GIdx));
            plan.extend(small_t(format!("{prefix}.bias")));
        }
    }
    plan.extend(small_t(FINAL_NORM_NAME.into()));
    // Tied embeddings: transformers ties lm_head to embed_tokens; store it once (§3.1, as the
    // source checkpoints do).
    if !cfg.tie_word_embeddings {
        plan.push(f16_t(LM_HEAD_NAME.into(), vec![v, h], Source::LmHead));
    }
    Ok(plan)
}

/// Greedy, in plan order: a shard is closed when the next tensor would exceed `max`.
fn assign_shards(plan: &[Planned], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, t) in plan.iter().enumerate() {
        if size > 0 && size + t.nbytes > max {
            shards.push(Vec::new());
            size = 0;
        }
        if let Some(s) = shards.last_mut() {
            s.push(i);
        }
        size += t.nbytes;
    }
    shards
}

struct Producer<'a> {
    source: &'a dyn WeightSource,
    model: &'a QuantizedModel,
    small: &'a BTreeMap<String, Vec<u8>>,
    qcfg: &'a QuantConfig,
}

impl Producer<'_> {
    fn write(&self, t: &Planned, w: &mut dyn Write, path: &Path) -> Result<(), ExportError> {
        let io = |e: std::io::Error| ExportError::io(path, "cannot write", e);
        match &t.src {
            Source::Small => {
                let b = self.small.get(&t.name).ok_or_else(|| {
                    ExportError::Invalid(format!("internal: tensor `{}` not collected", t.name))
                })?;
                w.write_all(b).map_err(io)
            }
            Source::Embed | Source::LmHead => {
                let (v, h) = (t.shape[0], t.shape[1]);
                let mut start = 0;
                while start < v {
                    let end = (start + ROW_CHUNK).min(v);
                    let rows = match t.src {
                        Source::Embed => {
                            let ids: Vec<u32> = (start as u32..end as u32).collect();
                            self.source.embed(&ids)?
                        }
                        _ => self.source.lm_head_rows(start..end)?,
                    };
                    if rows.len() != (end - start) * h {
                        return Err(ExportError::tensor(
                            path,
                            &t.name,
                            format!(
                                "source returned {} values for rows {start}..{end}",
                                rows.len()
                            ),
                        ));
                    }
                    w.write_all(&f16_bytes(&rows, &t.name)?).map_err(io)?;
                    start = end;
                }
                Ok(())
            }
            Source::Quant(layer, m, part) => {
                let r =
                    self.model.modules.get(&(*layer, *m)).ok_or_else(|| {
                        module_err(*layer, *m, "missing from the quantized model")
                    })?;
                let bits = self.qcfg.bits;
                let groups = self.qcfg.num_groups(r.cols);
                let perr = |e: pack::PackError| module_err(*layer, *m, e.to_string());
                let bytes: Vec<u8> = match part {
                    Part::QWeight => i32_bytes(
                        &pack::pack_qweight(&r.codes, r.rows, r.cols, bits).map_err(perr)?,
                    ),
                    Part::QZeros => {
                        i32_bytes(&pack::pack_qzeros(&r.zeros, groups, r.rows, bits).map_err(perr)?)
                    }
                    Part::Scales => f16_bytes(&r.scales, &t.name)?,
                    Part::GIdx => r
                        .g_idx
                        .iter()
                        .flat_map(|&g| (g as i32).to_le_bytes())
                        .collect(),
                };
                w.write_all(&bytes).map_err(io)
            }
        }
    }
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Counts bytes written, so each tensor can be checked to fill exactly its header byte range.
struct Counting<W: Write> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes one safetensors file: u64 LE header length, the JSON header (with
/// `__metadata__.format = "pt"`, which transformers requires, padded with spaces to 8 bytes as the
/// safetensors crate does), then the tensors back to back in plan order.
fn write_safetensors(
    path: &Path,
    tensors: &[&Planned],
    producer: &Producer<'_>,
) -> Result<(), ExportError> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0u64;
    for t in tensors {
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + t.nbytes]}),
        );
        off += t.nbytes;
    }
    let mut hbytes = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| ExportError::io(path, "cannot serialize header", e))?;
    while !(hbytes.len() + 8).is_multiple_of(8) {
        hbytes.push(b' ');
    }
    let file =
        std::fs::File::create(path).map_err(|e| ExportError::io(path, "cannot create", e))?;
    let mut w = Counting {
        inner: std::io::BufWriter::with_capacity(1 << 20, file),
        n: 0,
    };
    let io = |e: std::io::Error| ExportError::io(path, "cannot write", e);
    w.write_all(&(hbytes.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&hbytes).map_err(io)?;
    let data_start = w.n;
    for t in tensors {
        let before = w.n;
        producer.write(t, &mut w, path)?;
        if w.n - before != t.nbytes {
            return Err(ExportError::tensor(
                path,
                &t.name,
                format!("wrote {} bytes, header says {}", w.n - before, t.nbytes),
            ));
        }
    }
    debug_assert_eq!(w.n - data_start, off);
    let file = w
        .inner
        .into_inner()
        .map_err(|e| ExportError::io(path, "cannot flush", e.error()))?;
    file.sync_all()
        .map_err(|e| ExportError::io(path, "cannot fsync", e))
}

// ------------------------------------------------------------------------------------------------
// Configs

/// The `quantization_config` block (§3.5), written both into config.json and as quantize_config.json.
pub fn quantization_config(qcfg: &QuantConfig, desc_act: bool, opts: &ExportOptions) -> Value {
    let group_size: i64 = qcfg.group_size.map_or(-1, |g| g as i64);
    let mut meta = json!({
        "quantizer": [format!("gptaq-studio:{}", env!("CARGO_PKG_VERSION"))],
        "method": qcfg.method.name(),
        "damp_percent": qcfg.damp_percent,
        "damp_auto_increment": qcfg.damp_auto_increment,
        "static_groups": qcfg.static_groups,
        "true_sequential": true,
        "act_order": qcfg.act_order,
        // GPTQModel's `mse` is the clipping norm (0.0 = off); ours searches with norm 2.4.
        "mse": if qcfg.mse { 2.4 } else { 0.0 },
    });
    if let Method::Gptaq { alpha } = qcfg.method {
        meta["alpha"] = json!(alpha);
        meta["gptaq"] = json!({"alpha": alpha});
    }
    if let Some(uri) = &opts.uri {
        meta["uri"] = json!(uri);
    }
    json!({
        "bits": qcfg.bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": qcfg.sym,
        "lm_head": false,
        "static_groups": qcfg.static_groups,
        "true_sequential": true,
        "damp_percent": qcfg.damp_percent,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "format": "gptq",
        "pack_dtype": "int32",
        "model_name_or_path": null,
        "model_file_base_name": "model",
        "meta": meta,
    })
}

fn build_config_json(
    cfg: &ModelConfig,
    source_dir: Option<&Path>,
    qconf: &Value,
) -> Result<Value, ExportError> {
    let from_dir = source_dir
        .map(|d| d.join("config.json"))
        .filter(|p| p.is_file());
    let mut value = match from_dir {
        Some(p) => {
            let text =
                std::fs::read_to_string(&p).map_err(|e| ExportError::io(&p, "cannot read", e))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| ExportError::format(&p, format!("malformed JSON: {e}")))?;
            if !v.is_object() {
                return Err(ExportError::format(&p, "top level is not a JSON object"));
            }
            v
        }
        None => cfg.to_hf_json(),
    };
    if let Some(obj) = value.as_object_mut() {
        obj.insert("quantization_config".into(), qconf.clone());
        obj.insert("torch_dtype".into(), json!("float16"));
        // transformers 5 writes `dtype`; keep both spellings consistent.
        if obj.contains_key("dtype") {
            obj.insert("dtype".into(), json!("float16"));
        }
    }
    Ok(value)
}
