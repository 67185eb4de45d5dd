//! Memory-mapped safetensors checkpoints (single file or sharded with an index).

/// Errors reading weights. Every variant names the file and, where relevant, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{path}: tensor `{tensor}`: {message}")]
    Tensor {
        path: String,
        tensor: String,
        message: String,
    },
}

/// A borrowed view of one stored tensor (raw little-endian bytes as safetensors stores them).
#[derive(Clone, Debug)]
pub struct TensorView<'a> {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

/// Named tensor lookup over one checkpoint (all shards). Implemented by the memory-mapped
/// safetensors loader; the GPTQ reader and the exporter are written against this trait so they can
/// be tested on in-memory tensors.
pub trait TensorStore: Send + Sync {
    /// All tensor names, sorted.
    fn tensor_names(&self) -> Vec<String>;
    fn contains(&self, name: &str) -> bool;
    fn tensor(&self, name: &str) -> Result<TensorView<'_>, WeightError>;
    /// The directory the checkpoint was read from (for error messages and for copying side files).
    fn source_dir(&self) -> &std::path::Path;
}

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::config::{ConfigError, ModelConfig};
use super::{LayerWeights, Linear, ModuleKind, WeightSource};

impl WeightError {
    fn file(path: &Path, message: impl Into<String>) -> Self {
        WeightError::File {
            path: path.display().to_string(),
            message: message.into(),
        }
    }
    fn tensor(path: &Path, tensor: &str, message: impl Into<String>) -> Self {
        WeightError::Tensor {
            path: path.display().to_string(),
            tensor: tensor.to_string(),
            message: message.into(),
        }
    }
}

impl From<ConfigError> for WeightError {
    fn from(e: ConfigError) -> Self {
        // ConfigError's Display already starts with the path.
        let path = match &e {
            ConfigError::Io { path, .. }
            | ConfigError::Json { path, .. }
            | ConfigError::Field { path, .. }
            | ConfigError::UnsupportedArchitecture { path, .. } => path.clone(),
        };
        let full = e.to_string();
        let message = full
            .strip_prefix(&format!("{path}: "))
            .unwrap_or(&full)
            .to_string();
        WeightError::File { path, message }
    }
}

/// Location of one tensor inside a safetensors file, as its header states it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorMeta {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range relative to the start of the data section.
    pub data_offsets: (usize, usize),
}

/// A parsed and validated safetensors header.
#[derive(Clone, Debug)]
pub struct SafetensorsHeader {
    /// Byte offset of the data section (8 + header length).
    pub data_start: usize,
    pub tensors: BTreeMap<String, TensorMeta>,
    pub metadata: BTreeMap<String, String>,
}

/// The safetensors crate refuses headers over 100 MB; so do we (a corrupt length must not make
/// us parse gigabytes of tensor data as JSON).
const MAX_HEADER_LEN: u64 = 100_000_000;

/// Bytes per element of the dtypes a tensor can have here (sub-byte formats are rejected).
fn dtype_size(dtype: Dtype) -> Option<usize> {
    let bits = dtype.bitsize();
    if bits.is_multiple_of(8) {
        Some(bits / 8)
    } else {
        None
    }
}

/// Parses and validates a safetensors header against the whole file `bytes` (normally the mmap).
///
/// Checks, each with a message naming `path` (and the tensor): the file holds the 8-byte length
/// prefix; the header fits in the file; the header is a JSON object of
/// `{dtype, shape, data_offsets}` entries; every tensor's byte range matches `shape × dtype` and
/// lies inside the file. These are the checks `safetensors::SafeTensors::deserialize` performs,
/// done here so the messages can say which file and which tensor are at fault.
pub fn parse_safetensors_header(
    bytes: &[u8],
    path: &Path,
) -> Result<SafetensorsHeader, WeightError> {
    let Some(prefix) = bytes.get(..8) else {
        return Err(WeightError::file(
            path,
            format!(
                "truncated safetensors file: {} bytes, shorter than the 8-byte header length",
                bytes.len()
            ),
        ));
    };
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(prefix);
    let header_len = u64::from_le_bytes(len_bytes);
    let available = (bytes.len() - 8) as u64;
    if header_len > available {
        return Err(WeightError::file(
            path,
            format!(
                "safetensors header length {header_len} runs past the end of the file ({} bytes): truncated or not a safetensors file",
                bytes.len()
            ),
        ));
    }
    if header_len > MAX_HEADER_LEN {
        return Err(WeightError::file(
            path,
            format!("safetensors header length {header_len} exceeds {MAX_HEADER_LEN} bytes"),
        ));
    }
    let data_start = 8 + header_len as usize;
    let header_bytes = &bytes[8..data_start];
    let value: serde_json::Value = serde_json::from_slice(header_bytes).map_err(|e| {
        WeightError::file(path, format!("safetensors header is not valid JSON: {e}"))
    })?;
    let obj = value
        .as_object()
        .ok_or_else(|| WeightError::file(path, "safetensors header is not a JSON object"))?;
    let data_len = bytes.len() - data_start;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, entry) in obj {
        if name == "__metadata__" {
            if let Some(m) = entry.as_object() {
                for (k, v) in m {
                    if let Some(s) = v.as_str() {
                        metadata.insert(k.clone(), s.to_string());
                    }
                }
            }
            continue;
        }
        let meta = parse_tensor_entry(entry).map_err(|m| WeightError::tensor(path, name, m))?;
        let esize = dtype_size(meta.dtype).ok_or_else(|| {
            WeightError::tensor(
                path,
                name,
                format!("sub-byte dtype {:?} is not supported", meta.dtype),
            )
        })?;
        let nbytes = meta
            .shape
            .iter()
            .try_fold(esize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                WeightError::tensor(path, name, format!("shape {:?} overflows", meta.shape))
            })?;
        let (b, e) = meta.data_offsets;
        if b > e {
            return Err(WeightError::tensor(
                path,
                name,
                format!("data_offsets [{b}, {e}] are reversed"),
            ));
        }
        if e - b != nbytes {
            return Err(WeightError::tensor(
                path,
                name,
                format!(
                    "data_offsets [{b}, {e}] span {} bytes but {:?} × {:?} needs {nbytes}",
                    e - b,
                    meta.shape,
                    meta.dtype
                ),
            ));
        }
        if e > data_len {
            return Err(WeightError::tensor(
                path,
                name,
                format!(
                    "data_offsets [{b}, {e}] point past the end of the file (data section is {data_len} bytes): truncated file?"
                ),
            ));
        }
        tensors.insert(name.clone(), meta);
    }
    Ok(SafetensorsHeader {
        data_start,
        tensors,
        metadata,
    })
}

fn parse_tensor_entry(entry: &serde_json::Value) -> Result<TensorMeta, String> {
    let obj = entry
        .as_object()
        .ok_or_else(|| format!("header entry is not an object: {entry}"))?;
    let dtype_v = obj.get("dtype").ok_or("header entry has no `dtype`")?;
    let dtype: Dtype =
        serde_json::from_value(dtype_v.clone()).map_err(|_| format!("unknown dtype {dtype_v}"))?;
    let shape_v = obj
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or("header entry has no `shape` list")?;
    let shape = shape_v
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| format!("shape {shape_v:?} is not a list of non-negative integers"))?;
    let offs = obj
        .get("data_offsets")
        .and_then(|s| s.as_array())
        .ok_or("header entry has no `data_offsets` list")?;
    let offs = offs
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .filter(|v| v.len() == 2)
        .ok_or_else(|| format!("data_offsets {offs:?} is not a pair of non-negative integers"))?;
    Ok(TensorMeta {
        dtype,
        shape,
        data_offsets: (offs[0], offs[1]),
    })
}

/// Parses `model.safetensors.index.json` into `tensor name → shard file name`.
///
/// Shard names must be plain file names (no `/`, no `..`): the index is untrusted input and must
/// not make us open files outside the checkpoint directory.
pub fn parse_safetensors_index(
    json: &str,
    path: &Path,
) -> Result<BTreeMap<String, String>, WeightError> {
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| WeightError::file(path, format!("malformed JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| WeightError::file(path, "field `weight_map`: missing or not an object"))?;
    let mut out = BTreeMap::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            WeightError::file(
                path,
                format!("field `weight_map.{name}`: expected a file name, got {file}"),
            )
        })?;
        if file.is_empty()
            || file.contains('/')
            || file.contains('\\')
            || file == "."
            || file == ".."
        {
            return Err(WeightError::file(
                path,
                format!(
                    "field `weight_map.{name}`: shard `{file}` is not a plain file name in the checkpoint directory"
                ),
            ));
        }
        out.insert(name.clone(), file.to_string());
    }
    if out.is_empty() {
        return Err(WeightError::file(path, "field `weight_map`: empty"));
    }
    Ok(out)
}

/// One memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    mmap: memmap2::Mmap,
    header: SafetensorsHeader,
}

impl Shard {
    fn open(path: &Path) -> Result<Self, WeightError> {
        let file = std::fs::File::open(path)
            .map_err(|e| WeightError::file(path, format!("cannot open: {e}")))?;
        // SAFETY: the mapping is read-only; a checkpoint being rewritten while we run is outside
        // what any loader can guard against (the same contract as safetensors' own mmap loading).
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| WeightError::file(path, format!("cannot mmap: {e}")))?;
        let header = parse_safetensors_header(&mmap, path)?;
        Ok(Shard {
            path: path.to_path_buf(),
            mmap,
            header,
        })
    }

    fn view(&self, name: &str) -> Option<TensorView<'_>> {
        let meta = self.header.tensors.get(name)?;
        let (b, e) = meta.data_offsets;
        let data = self
            .mmap
            .get(self.header.data_start + b..self.header.data_start + e)?;
        Some(TensorView {
            dtype: meta.dtype,
            shape: meta.shape.clone(),
            data,
        })
    }
}

/// File names whose presence means "this is a PyTorch pickle checkpoint".
fn is_pickle_name(name: &str) -> bool {
    name.ends_with(".bin")
        || name.ends_with(".pt")
        || name.ends_with(".pth")
        || name.ends_with(".ckpt")
}

/// A Hugging Face checkpoint directory: config.json plus memory-mapped safetensors (one file, or
/// shards listed by `model.safetensors.index.json`). Nothing but the maps and the parsed headers
/// is held; [`WeightSource::layer`] converts one layer at a time.
pub struct SafetensorsModel {
    dir: PathBuf,
    config_path: PathBuf,
    config: ModelConfig,
    index_path: Option<PathBuf>,
    shards: Vec<Shard>,
    /// tensor name → shard index.
    locations: HashMap<String, usize>,
    embed_name: String,
    lm_head_name: String,
}

pub const EMBED_NAME: &str = "model.embed_tokens.weight";
pub const LM_HEAD_NAME: &str = "lm_head.weight";
pub const FINAL_NORM_NAME: &str = "model.norm.weight";

impl SafetensorsModel {
    /// Opens `dir`: reads config.json, maps `model.safetensors` or every shard named in
    /// `model.safetensors.index.json`, validates every header, and resolves the embedding /
    /// lm_head tensors (tied checkpoints may store either one; see [`Self::embed_tensor_name`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, WeightError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(WeightError::file(
                &dir,
                "not a directory (expected a Hugging Face checkpoint directory)",
            ));
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(WeightError::file(
                &config_path,
                "missing: a checkpoint directory needs config.json",
            ));
        }
        let config = ModelConfig::from_file(&config_path)?;

        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut shards = Vec::new();
        let mut locations = HashMap::new();
        let mut used_index = None;
        if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| WeightError::file(&index_path, format!("cannot read: {e}")))?;
            let map = parse_safetensors_index(&text, &index_path)?;
            let mut shard_ids: BTreeMap<&str, usize> = BTreeMap::new();
            for file in map.values() {
                if shard_ids.contains_key(file.as_str()) {
                    continue;
                }
                let p = dir.join(file);
                if !p.is_file() {
                    return Err(WeightError::file(
                        &p,
                        format!(
                            "shard `{file}` listed in {} is missing",
                            index_path.display()
                        ),
                    ));
                }
                shard_ids.insert(file, shards.len());
                shards.push(Shard::open(&p)?);
            }
            for (name, file) in &map {
                let id = shard_ids[file.as_str()];
                if !shards[id].header.tensors.contains_key(name) {
                    return Err(WeightError::tensor(
                        &shards[id].path,
                        name,
                        format!(
                            "listed in {} but not stored in this shard",
                            index_path.display()
                        ),
                    ));
                }
                locations.insert(name.clone(), id);
            }
            used_index = Some(index_path);
        } else if single.is_file() {
            let shard = Shard::open(&single)?;
            for name in shard.header.tensors.keys() {
                locations.insert(name.clone(), 0);
            }
            shards.push(shard);
        } else {
            return Err(Self::no_weights_error(&dir));
        }

        let has = |n: &str| locations.contains_key(n);
        let first = shards
            .first()
            .map(|s| s.path.clone())
            .unwrap_or_else(|| dir.clone());
        // Tied embeddings: transformers ties lm_head to embed_tokens (same Parameter) before
        // loading, so a checkpoint may store either name (tinystories656k stores only lm_head).
        let (embed_name, lm_head_name) = match (has(EMBED_NAME), has(LM_HEAD_NAME)) {
            (true, true) => (EMBED_NAME, LM_HEAD_NAME),
            (true, false) if config.tie_word_embeddings => (EMBED_NAME, EMBED_NAME),
            (false, true) if config.tie_word_embeddings => (LM_HEAD_NAME, LM_HEAD_NAME),
            (true, false) => {
                return Err(WeightError::tensor(
                    &first,
                    LM_HEAD_NAME,
                    format!(
                        "missing and tie_word_embeddings is false in {}",
                        config_path.display()
                    ),
                ));
            }
            (false, true) => {
                return Err(WeightError::tensor(
                    &first,
                    EMBED_NAME,
                    format!(
                        "missing and tie_word_embeddings is false in {}",
                        config_path.display()
                    ),
                ));
            }
            (false, false) => {
                return Err(WeightError::tensor(
                    &first,
                    EMBED_NAME,
                    "missing (and no lm_head.weight to tie it to)",
                ));
            }
        };
        let model = SafetensorsModel {
            dir,
            config_path,
            config,
            index_path: used_index,
            shards,
            locations,
            embed_name: embed_name.to_string(),
            lm_head_name: lm_head_name.to_string(),
        };
        let (v, h) = (model.config.vocab_size, model.config.hidden_size);
        model.checked(&model.embed_name, &[v, h])?;
        model.checked(&model.lm_head_name, &[v, h])?;
        Ok(model)
    }

    fn no_weights_error(dir: &Path) -> WeightError {
        let mut pickles = Vec::new();
        let mut others = Vec::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if is_pickle_name(&name) {
                    pickles.push(name);
                } else if name.ends_with(".safetensors") {
                    others.push(name);
                }
            }
        }
        pickles.sort();
        others.sort();
        if !pickles.is_empty() {
            return WeightError::file(
                dir,
                format!(
                    "only PyTorch pickle weights found ({}); pickle files can execute code and are never loaded. \
                     Convert to safetensors with transformers: \
                     `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)`",
                    pickles.join(", ")
                ),
            );
        }
        let extra = if others.is_empty() {
            String::new()
        } else {
            format!(
                " (found {}, but without an index they are not a checkpoint)",
                others.join(", ")
            )
        };
        WeightError::file(
            dir,
            format!("no model.safetensors or model.safetensors.index.json{extra}"),
        )
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }
    /// The index file when the checkpoint is sharded.
    pub fn index_path(&self) -> Option<&Path> {
        self.index_path.as_deref()
    }
    /// Paths of all mapped safetensors files, in index order.
    pub fn shard_paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }
    pub fn is_sharded(&self) -> bool {
        self.index_path.is_some()
    }
    /// The stored tensor used as the input embedding (`lm_head.weight` for lm_head-only tied checkpoints).
    pub fn embed_tensor_name(&self) -> &str {
        &self.embed_name
    }
    /// The stored tensor used as lm_head (`model.embed_tokens.weight` when tied and lm_head is not stored).
    pub fn lm_head_tensor_name(&self) -> &str {
        &self.lm_head_name
    }
    /// True when one stored tensor serves as both embedding and lm_head.
    pub fn embeddings_shared(&self) -> bool {
        self.embed_name == self.lm_head_name
    }
    /// Path of the file that stores `name` (for messages).
    pub fn tensor_path(&self, name: &str) -> Option<&Path> {
        self.locations
            .get(name)
            .map(|&i| self.shards[i].path.as_path())
    }

    fn path_for(&self, name: &str) -> &Path {
        self.tensor_path(name).unwrap_or(&self.dir)
    }

    /// The tensor, checked to have exactly `shape`.
    fn checked(&self, name: &str, shape: &[usize]) -> Result<TensorView<'_>, WeightError> {
        let t = self.tensor(name)?;
        if t.shape != shape {
            return Err(WeightError::tensor(
                self.path_for(name),
                name,
                format!(
                    "shape {:?} does not match config (expected {:?})",
                    t.shape, shape
                ),
            ));
        }
        Ok(t)
    }

    fn f32_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, WeightError> {
        let t = self.checked(name, shape)?;
        to_f32(&t).map_err(|m| WeightError::tensor(self.path_for(name), name, m))
    }

    fn linear(
        &self,
        prefix: &str,
        m: ModuleKind,
        bias_required: bool,
    ) -> Result<Linear, WeightError> {
        let (out_f, in_f) = self.config.linear_shape(m);
        let wname = format!("{prefix}{}.weight", m.hf_name());
        let bname = format!("{prefix}{}.bias", m.hf_name());
        let weight = self.f32_tensor(&wname, &[out_f, in_f])?;
        let bias = if self.contains(&bname) {
            Some(self.f32_tensor(&bname, &[out_f])?)
        } else if bias_required {
            return Err(WeightError::tensor(
                self.path_for(&wname),
                &bname,
                format!(
                    "missing, but {} requires a bias here",
                    self.config.architecture_name
                ),
            ));
        } else {
            None
        };
        Ok(Linear {
            weight,
            out_features: out_f,
            in_features: in_f,
            bias,
        })
    }
}

/// Widens F32 / F16 / BF16 little-endian bytes to f32. Other dtypes are an error (the message
/// lists what is accepted); integer tensors are never silently reinterpreted as weights.
pub fn to_f32(t: &TensorView<'_>) -> Result<Vec<f32>, String> {
    let d = t.data;
    match t.dtype {
        Dtype::F32 => Ok(d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        Dtype::F16 => Ok(d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        Dtype::BF16 => Ok(d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        other => Err(format!(
            "unsupported dtype {other:?} for a weight (expected F32, F16 or BF16)"
        )),
    }
}

/// Bytes per row for a row slice: `row_elems × dtype size`, for F32/F16/BF16.
fn float_elem_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

impl TensorStore for SafetensorsModel {
    fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.locations.keys().cloned().collect();
        v.sort();
        v
    }
    fn contains(&self, name: &str) -> bool {
        self.locations.contains_key(name)
    }
    fn tensor(&self, name: &str) -> Result<TensorView<'_>, WeightError> {
        let shard = self
            .locations
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| {
                let p = self
                    .index_path
                    .clone()
                    .or_else(|| self.shards.first().map(|s| s.path.clone()));
                WeightError::tensor(
                    p.as_deref().unwrap_or(&self.dir),
                    name,
                    "not found in the checkpoint",
                )
            })?;
        shard.view(name).ok_or_else(|| {
            WeightError::tensor(&shard.path, name, "byte range outside the mapped file")
        })
    }
    fn source_dir(&self) -> &Path {
        &self.dir
    }
}

impl SafetensorsModel {
    /// Rows `[start, end)` of a `[vocab, hidden]` float tensor as f32, reading only those rows
    /// from the map.
    fn rows_f32(&self, name: &str, rows: &[usize]) -> Result<Vec<f32>, WeightError> {
        let (v, h) = (self.config.vocab_size, self.config.hidden_size);
        let t = self.checked(name, &[v, h])?;
        let path = self.path_for(name);
        let es = float_elem_size(t.dtype).ok_or_else(|| {
            WeightError::tensor(
                path,
                name,
                format!(
                    "unsupported dtype {:?} (expected F32, F16 or BF16)",
                    t.dtype
                ),
            )
        })?;
        let mut out = Vec::with_capacity(rows.len() * h);
        for &r in rows {
            if r >= v {
                return Err(WeightError::tensor(
                    path,
                    name,
                    format!("row {r} out of range (vocab_size {v})"),
                ));
            }
            let view = TensorView {
                dtype: t.dtype,
                shape: vec![h],
                data: &t.data[r * h * es..(r + 1) * h * es],
            };
            out.extend(to_f32(&view).map_err(|m| WeightError::tensor(path, name, m))?);
        }
        Ok(out)
    }
}

impl WeightSource for SafetensorsModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, WeightError> {
        let rows: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        self.rows_f32(&self.embed_name, &rows)
    }

    fn layer(&self, index: usize) -> Result<LayerWeights, WeightError> {
        let c = &self.config;
        if index >= c.num_layers {
            return Err(WeightError::file(
                &self.config_path,
                format!(
                    "layer {index} requested but num_hidden_layers is {}",
                    c.num_layers
                ),
            ));
        }
        let p = format!("model.layers.{index}.");
        let h = c.hidden_size;
        let qkv_bias = c.attention_bias;
        let (q_norm, k_norm) = if c.qk_norm {
            (
                Some(self.f32_tensor(&format!("{p}self_attn.q_norm.weight"), &[c.head_dim])?),
                Some(self.f32_tensor(&format!("{p}self_attn.k_norm.weight"), &[c.head_dim])?),
            )
        } else {
            (None, None)
        };
        Ok(LayerWeights {
            input_norm: self.f32_tensor(&format!("{p}input_layernorm.weight"), &[h])?,
            q: self.linear(&p, ModuleKind::Q, qkv_bias)?,
            k: self.linear(&p, ModuleKind::K, qkv_bias)?,
            v: self.linear(&p, ModuleKind::V, qkv_bias)?,
            // Qwen2 has no o_proj bias; Llama's attention_bias covers o_proj too: accept whatever is stored.
            o: self.linear(&p, ModuleKind::O, false)?,
            q_norm,
            k_norm,
            post_norm: self.f32_tensor(&format!("{p}post_attention_layernorm.weight"), &[h])?,
            gate: self.linear(&p, ModuleKind::Gate, c.mlp_bias)?,
            up: self.linear(&p, ModuleKind::Up, c.mlp_bias)?,
            down: self.linear(&p, ModuleKind::Down, c.mlp_bias)?,
        })
    }

    fn final_norm(&self) -> Result<Vec<f32>, WeightError> {
        self.f32_tensor(FINAL_NORM_NAME, &[self.config.hidden_size])
    }

    fn lm_head_rows(&self, rows: std::ops::Range<usize>) -> Result<Vec<f32>, WeightError> {
        if rows.start > rows.end || rows.end > self.config.vocab_size {
            return Err(WeightError::tensor(
                self.path_for(&self.lm_head_name),
                &self.lm_head_name,
                format!("row range {rows:?} outside 0..{}", self.config.vocab_size),
            ));
        }
        let idx: Vec<usize> = rows.collect();
        self.rows_f32(&self.lm_head_name, &idx)
    }

    fn describe(&self) -> String {
        let dtypes: std::collections::BTreeSet<String> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.header
                    .tensors
                    .values()
                    .map(|t| format!("{:?}", t.dtype).to_lowercase())
            })
            .collect();
        let dt = dtypes.into_iter().collect::<Vec<_>>().join("+");
        let layout = if self.shards.len() > 1 {
            format!("{} shards", self.shards.len())
        } else {
            "1 file".to_string()
        };
        let tied = if self.embeddings_shared() {
            ", tied embeddings"
        } else {
            ""
        };
        format!("safetensors {dt}, {layout}{tied} ({})", self.dir.display())
    }
}
