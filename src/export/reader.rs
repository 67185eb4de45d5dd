//! Reading GPTQ checkpoints (checkpoint_format "gptq" v1 and "gptq_v2") as a [`WeightSource`] (algorithm.md §3).
//!
//! [`GptqModel::open`] validates the whole checkpoint up front — the quantization config, and for
//! every decoder linear the presence, dtype and shape of `qweight`/`qzeros`/`scales`/`g_idx` and the
//! range of `g_idx` — so that a bad checkpoint fails at open with an error naming the file and the
//! tensor, not halfway through an evaluation. [`WeightSource::layer`] then dequantizes one layer to
//! f32: `W[o, i] = scales[g, o] · (q[i, o] − z[g, o])`, `g = g_idx[i]`, `z = (qzeros field + 1)`
//! wrapped to `b` bits (§3.3, and [`super::pack::unpack_qzeros`] for why the wrap). With f16 scales
//! and `|q − z| < 256` the product is exact in f32, so the result equals the solver's `Q` bit for bit.
//!
//! `checkpoint_format` "gptq_v2" (GPTQModel) is read with its own zero convention (the stored
//! field is the zero itself, no +1). Refused: "marlin" and any
//! other format, `is_marlin_format`, `lm_head: true`, `pack_dtype` other than int32, bits outside
//! {2, 3, 4, 8}. A linear stored unquantized (`.weight` instead of `.qweight`, as GPTQModel's
//! dynamic per-module config can produce) is read as a float weight.

use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::Value;

use super::ExportError;
use super::pack::{self, SUPPORTED_BITS};
use crate::model::weights::{SafetensorsModel, TensorStore, TensorView, WeightError, to_f32};
use crate::model::{LayerWeights, Linear, ModelConfig, ModuleKind, WeightSource};

/// The quantization settings a checkpoint declares.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqSettings {
    pub bits: u32,
    /// `None` for group_size −1.
    pub group_size: Option<usize>,
    pub desc_act: bool,
    pub sym: bool,
    /// `checkpoint_format "gptq_v2"` (GPTQModel): qzeros store the true zero point, not zero − 1
    /// (algorithm.md §3.3).
    pub v2: bool,
    /// Where the settings were read from (config.json or quantize_config.json).
    pub source: PathBuf,
    /// The block as written.
    pub raw: Value,
}

/// A GPTQ checkpoint directory served as a [`WeightSource`], dequantized one layer at a time.
pub struct GptqModel {
    inner: SafetensorsModel,
    settings: GptqSettings,
}

impl GptqModel {
    /// Opens and fully validates a GPTQ checkpoint directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<GptqModel, ExportError> {
        let dir = dir.as_ref();
        let settings = read_settings(dir)?;
        let inner = SafetensorsModel::open(dir)?;
        let model = GptqModel { inner, settings };
        model.validate()?;
        Ok(model)
    }

    pub fn settings(&self) -> &GptqSettings {
        &self.settings
    }

    pub fn dir(&self) -> &Path {
        self.inner.dir()
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.inner
            .tensor_path(name)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.inner.dir().to_path_buf())
    }

    fn terr(&self, name: &str, message: impl Into<String>) -> ExportError {
        ExportError::tensor(&self.path_of(name), name, message)
    }

    /// The tensor, checked to have `dtype` (one of `dtypes`) and exactly `shape`.
    fn checked(
        &self,
        name: &str,
        dtypes: &[Dtype],
        shape: &[usize],
    ) -> Result<TensorView<'_>, ExportError> {
        let t = self.inner.tensor(name)?;
        if !dtypes.contains(&t.dtype) {
            return Err(self.terr(name, format!("dtype {:?}, expected {:?}", t.dtype, dtypes)));
        }
        if t.shape != shape {
            return Err(self.terr(
                name,
                format!(
                    "shape {:?}, expected {:?} for {}-bit{} (in_features, out_features and group_size from config.json)",
                    t.shape,
                    shape,
                    self.settings.bits,
                    self.settings
                        .group_size
                        .map_or(String::new(), |g| format!(" group_size {g}"))
                ),
            ));
        }
        Ok(t)
    }

    fn groups(&self, cols: usize) -> usize {
        match self.settings.group_size {
            Some(gs) => cols.div_ceil(gs),
            None => 1,
        }
    }

    /// Expected shapes of one quantized linear, with the packing constraints checked.
    fn shapes(&self, prefix: &str, rows: usize, cols: usize) -> Result<QShapes, ExportError> {
        let bits = self.settings.bits;
        let qname = format!("{prefix}.qweight");
        let zname = format!("{prefix}.qzeros");
        let in_w = pack::packed_words(cols, bits, "in_features")
            .map_err(|e| self.terr(&qname, e.to_string()))?;
        let out_w = pack::packed_words(rows, bits, "out_features")
            .map_err(|e| self.terr(&zname, e.to_string()))?;
        let groups = self.groups(cols);
        Ok(QShapes {
            qweight: vec![in_w, rows],
            qzeros: vec![groups, out_w],
            scales: vec![groups, rows],
            g_idx: vec![cols],
            groups,
        })
    }

    /// Checks every layer's tensors without dequantizing them.
    fn validate(&self) -> Result<(), ExportError> {
        let cfg = self.inner.config().clone();
        for layer in 0..cfg.num_layers {
            for m in ModuleKind::ALL {
                let prefix = format!("model.layers.{layer}.{}", m.hf_name());
                let (rows, cols) = cfg.linear_shape(m);
                if !self.inner.contains(&format!("{prefix}.qweight")) {
                    let wname = format!("{prefix}.weight");
                    if self.inner.contains(&wname) {
                        self.checked(
                            &wname,
                            &[Dtype::F32, Dtype::F16, Dtype::BF16],
                            &[rows, cols],
                        )?;
                        continue;
                    }
                    return Err(self.terr(
                        &format!("{prefix}.qweight"),
                        "missing (and no float .weight either)",
                    ));
                }
                self.read_quant(&prefix, rows, cols, false)?;
            }
        }
        Ok(())
    }

    /// Reads (and, with `dequant`, dequantizes) one quantized linear; validates shapes and g_idx.
    fn read_quant(
        &self,
        prefix: &str,
        rows: usize,
        cols: usize,
        dequant: bool,
    ) -> Result<Option<Vec<f32>>, ExportError> {
        let s = self.shapes(prefix, rows, cols)?;
        let names = ["qweight", "qzeros", "scales", "g_idx"].map(|n| format!("{prefix}.{n}"));
        for n in &names {
            if !self.inner.contains(n) {
                return Err(self.terr(
                    n,
                    "missing (a GPTQ linear needs qweight, qzeros, scales and g_idx)",
                ));
            }
        }
        let qw = self.checked(&names[0], &[Dtype::I32], &s.qweight)?;
        let qz = self.checked(&names[1], &[Dtype::I32], &s.qzeros)?;
        let sc = self.checked(&names[2], &[Dtype::F16, Dtype::BF16, Dtype::F32], &s.scales)?;
        let gi = self.checked(&names[3], &[Dtype::I32], &s.g_idx)?;
        let g_idx: Vec<i32> = i32s(gi.data);
        if let Some((j, &g)) = g_idx
            .iter()
            .enumerate()
            .find(|&(_, &g)| g < 0 || g as usize >= s.groups)
        {
            return Err(self.terr(
                &names[3],
                format!("g_idx[{j}] = {g} outside 0..{} (groups)", s.groups),
            ));
        }
        if !dequant {
            return Ok(None);
        }
        let bits = self.settings.bits;
        let pe = |n: &str, e: pack::PackError| self.terr(n, e.to_string());
        let codes =
            pack::unpack_qweight(&i32s(qw.data), rows, cols, bits).map_err(|e| pe(&names[0], e))?;
        // v1 stores zero − 1 (read back with +1 and the wrap), v2 the zero itself (§3.3).
        let zeros = if self.settings.v2 {
            pack::unpack_qzeros_raw(&i32s(qz.data), s.groups, rows, bits)
        } else {
            pack::unpack_qzeros(&i32s(qz.data), s.groups, rows, bits)
        }
        .map_err(|e| pe(&names[1], e))?;
        let scales = to_f32(&sc).map_err(|e| self.terr(&names[2], e))?;
        if let Some((i, s)) = scales.iter().enumerate().find(|(_, s)| !s.is_finite()) {
            return Err(self.terr(&names[2], format!("non-finite scale {s} at flat index {i}")));
        }
        let g_idx: Vec<u32> = g_idx.iter().map(|&g| g as u32).collect();
        Ok(Some(dequantize(
            &codes, &zeros, &scales, &g_idx, rows, cols,
        )))
    }

    fn linear(&self, layer: usize, m: ModuleKind) -> Result<Linear, ExportError> {
        let cfg = self.inner.config();
        let (rows, cols) = cfg.linear_shape(m);
        let prefix = format!("model.layers.{layer}.{}", m.hf_name());
        let weight = if self.inner.contains(&format!("{prefix}.qweight")) {
            self.read_quant(&prefix, rows, cols, true)?
                .ok_or_else(|| self.terr(&format!("{prefix}.qweight"), "not dequantized"))?
        } else {
            let wname = format!("{prefix}.weight");
            let t = self.checked(
                &wname,
                &[Dtype::F32, Dtype::F16, Dtype::BF16],
                &[rows, cols],
            )?;
            to_f32(&t).map_err(|e| self.terr(&wname, e))?
        };
        let bname = format!("{prefix}.bias");
        let bias = if self.inner.contains(&bname) {
            let t = self.checked(&bname, &[Dtype::F32, Dtype::F16, Dtype::BF16], &[rows])?;
            Some(to_f32(&t).map_err(|e| self.terr(&bname, e))?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            out_features: rows,
            in_features: cols,
            bias,
        })
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ExportError> {
        let t = self.checked(name, &[Dtype::F32, Dtype::F16, Dtype::BF16], &[len])?;
        to_f32(&t).map_err(|e| self.terr(name, e))
    }

    fn layer_checked(&self, index: usize) -> Result<LayerWeights, ExportError> {
        let c = self.inner.config();
        if index >= c.num_layers {
            return Err(ExportError::format(
                self.inner.config_path(),
                format!(
                    "layer {index} requested but num_hidden_layers is {}",
                    c.num_layers
                ),
            ));
        }
        let p = format!("model.layers.{index}.");
        let (q_norm, k_norm) = if c.qk_norm {
            (
                Some(self.vector(&format!("{p}self_attn.q_norm.weight"), c.head_dim)?),
                Some(self.vector(&format!("{p}self_attn.k_norm.weight"), c.head_dim)?),
            )
        } else {
            (None, None)
        };
        Ok(LayerWeights {
            input_norm: self.vector(&format!("{p}input_layernorm.weight"), c.hidden_size)?,
            q: self.linear(index, ModuleKind::Q)?,
            k: self.linear(index, ModuleKind::K)?,
            v: self.linear(index, ModuleKind::V)?,
            o: self.linear(index, ModuleKind::O)?,
            q_norm,
            k_norm,
            post_norm: self.vector(
                &format!("{p}post_attention_layernorm.weight"),
                c.hidden_size,
            )?,
            gate: self.linear(index, ModuleKind::Gate)?,
            up: self.linear(index, ModuleKind::Up)?,
            down: self.linear(index, ModuleKind::Down)?,
        })
    }
}

struct QShapes {
    qweight: Vec<usize>,
    qzeros: Vec<usize>,
    scales: Vec<usize>,
    g_idx: Vec<usize>,
    groups: usize,
}

/// Little-endian I32 bytes → values (the length is a multiple of 4: the header check guarantees it).
fn i32s(data: &[u8]) -> Vec<i32> {
    data.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The dequantization of a GPTQ checkpoint's decoded tensors: the quantizer's own.
pub use crate::quant::quantizer::dequantize_matrix as dequantize;

/// Reads the quantization settings: `config.json["quantization_config"]` (what transformers and
/// vLLM read first), else `quantize_config.json` (AutoGPTQ/GPTQModel; vLLM's fallback).
fn read_settings(dir: &Path) -> Result<GptqSettings, ExportError> {
    let cfg_path = dir.join("config.json");
    let qc_path = dir.join("quantize_config.json");
    let mut found: Option<(PathBuf, Value)> = None;
    if cfg_path.is_file() {
        let v = read_json(&cfg_path)?;
        if let Some(q) = v.get("quantization_config").filter(|q| !q.is_null()) {
            found = Some((cfg_path.clone(), q.clone()));
        }
    }
    if found.is_none() && qc_path.is_file() {
        found = Some((qc_path.clone(), read_json(&qc_path)?));
    }
    let Some((path, raw)) = found else {
        return Err(ExportError::format(
            dir,
            "not a GPTQ checkpoint: no `quantization_config` in config.json and no quantize_config.json",
        ));
    };
    parse_settings(&raw, &path)
}

fn read_json(path: &Path) -> Result<Value, ExportError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ExportError::io(path, "cannot read", e))?;
    serde_json::from_str(&text)
        .map_err(|e| ExportError::format(path, format!("malformed JSON: {e}")))
}

/// Parses and checks a quantization config block (see the module docs for what is refused).
pub fn parse_settings(raw: &Value, path: &Path) -> Result<GptqSettings, ExportError> {
    let err = |field: &str, m: String| ExportError::format(path, format!("field `{field}`: {m}"));
    let obj = raw
        .as_object()
        .ok_or_else(|| ExportError::format(path, "quantization config is not a JSON object"))?;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    if let Some(m) = get("quant_method")
        && m.as_str() != Some("gptq")
    {
        return Err(err("quant_method", format!("{m} is not \"gptq\"")));
    }
    if get("is_marlin_format").and_then(Value::as_bool) == Some(true) {
        return Err(err("is_marlin_format", "Marlin-repacked checkpoints are not GPTQ format; re-export with checkpoint_format \"gptq\"".into()));
    }
    let mut v2 = false;
    for key in ["checkpoint_format", "format"] {
        if let Some(f) = get(key) {
            match f.as_str() {
                Some("gptq") => {}
                Some("gptq_v2") => v2 = true,
                _ => {
                    return Err(err(
                        key,
                        format!(
                            "unknown checkpoint format {f} (only \"gptq\" and \"gptq_v2\" are read)"
                        ),
                    ));
                }
            }
        }
    }
    if let Some(p) = get("pack_dtype")
        && p.as_str() != Some("int32")
    {
        return Err(err(
            "pack_dtype",
            format!("{p}: only int32 packing is read"),
        ));
    }
    if get("lm_head").and_then(Value::as_bool) == Some(true) {
        return Err(err(
            "lm_head",
            "a quantized lm_head is not supported".into(),
        ));
    }
    let bits = get("bits")
        .and_then(Value::as_u64)
        .ok_or_else(|| err("bits", "missing or not an integer".into()))?;
    let bits = u32::try_from(bits)
        .ok()
        .filter(|b| SUPPORTED_BITS.contains(b))
        .ok_or_else(|| err("bits", format!("{bits} is not supported (2, 3, 4 or 8)")))?;
    let group_size = match get("group_size") {
        None => None,
        Some(v) => match v.as_i64() {
            Some(-1) => None,
            Some(g) if g > 0 => Some(g as usize),
            _ => {
                return Err(err(
                    "group_size",
                    format!("{v}: expected -1 or a positive integer"),
                ));
            }
        },
    };
    let bool_field = |k: &str, default: bool| -> Result<bool, ExportError> {
        match get(k) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| err(k, format!("{v}: expected true or false"))),
        }
    };
    Ok(GptqSettings {
        bits,
        group_size,
        desc_act: bool_field("desc_act", false)?,
        sym: bool_field("sym", true)?,
        v2,
        source: path.to_path_buf(),
        raw: raw.clone(),
    })
}

fn werr(e: ExportError) -> WeightError {
    match e {
        ExportError::Weights(w) => w,
        ExportError::Tensor {
            path,
            tensor,
            message,
        } => WeightError::Tensor {
            path,
            tensor,
            message,
        },
        ExportError::Format { path, message } | ExportError::Io { path, message } => {
            WeightError::File { path, message }
        }
        other => WeightError::File {
            path: String::new(),
            message: other.to_string(),
        },
    }
}

impl WeightSource for GptqModel {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, WeightError> {
        self.inner.embed(ids)
    }
    fn layer(&self, index: usize) -> Result<LayerWeights, WeightError> {
        self.layer_checked(index).map_err(werr)
    }
    fn final_norm(&self) -> Result<Vec<f32>, WeightError> {
        self.inner.final_norm()
    }
    fn lm_head_rows(&self, rows: std::ops::Range<usize>) -> Result<Vec<f32>, WeightError> {
        self.inner.lm_head_rows(rows)
    }
    fn describe(&self) -> String {
        let s = &self.settings;
        format!(
            "GPTQ {}-bit {}{}{} ({})",
            s.bits,
            s.group_size
                .map_or("per-channel".to_string(), |g| format!("g{g}")),
            if s.desc_act { ", act-order" } else { "" },
            if s.sym { "" } else { ", asym" },
            self.inner.dir().display()
        )
    }
}
