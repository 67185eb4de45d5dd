//! Calibration data: text, JSON lines, Parquet, pre-tokenized safetensors; window sampling.
//!
//! # Sampling procedure (what [`calibration_windows`] does, exactly)
//!
//! Let `L = seqlen` and let `rng = ChaCha8Rng::seed_from_u64(seed)` (rand_chacha 0.9; the stream
//! is stable across platforms, so a seed names one calibration set forever). If
//! [`CalibOptions::add_bos`] is set, every window is `[BOS] + (L-1) sampled tokens`, and `L-1`
//! below replaces `L`.
//!
//! * **Plain text** (`.txt`, `.raw`, `.tokens`, `.text`, `.md`) — mirrors GPTQ's
//!   `get_wikitext2`: the whole file is tokenized once, without BOS (the reference tokenizes the
//!   joined text with the Hugging Face call, whose single BOS lands at position 0 and so is in
//!   almost no window; we leave it out so that no window is special). Then for each of
//!   `nsamples` samples: `i = rng.random_range(0..=len-L)`, window = `tokens[i..i+L]`. Windows
//!   may overlap (sampling with replacement), as in the reference.
//! * **Documents** (`.jsonl` `text` field, `.parquet` `text` column) — mirrors GPTQ's `get_c4`:
//!   every document is tokenized on its own, without BOS. For each sample: draw
//!   `d = rng.random_range(0..n_docs)` until document `d` has at least `L` tokens (the reference
//!   wants `> L` and then draws `randint(0, len-L-1)`; `≥ L` with an inclusive range is the same
//!   distribution without the off-by-one), then `i = rng.random_range(0..=len_d-L)`, window =
//!   `doc_d[i..i+L]`. All documents are tokenized up front so that the available token / window
//!   counts in the report are exact.
//! * **Pre-tokenized** (`.safetensors` with an integer `input_ids` tensor `[N, L']` or `[L']`):
//!   rows are used as given, the first `nsamples` rows, each cut to its first `L` tokens; the seed
//!   is not used. `L' < L` or `N < nsamples` is an error.
//!
//! `available_windows` counts non-overlapping windows: `⌊len/L⌋` for text, `Σ_d ⌊len_d/L⌋` for
//! documents, the number of rows for pre-tokenized input.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::tokenizer::{Tokenizer, TokenizerError};
use crate::model::weights::parse_safetensors_header;

/// Errors reading calibration data; every file-related variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{path}:{line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("invalid calibration request: {0}")]
    Invalid(String),
}

fn file_err(path: &Path, message: impl Into<String>) -> CalibError {
    CalibError::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// What kind of file a [`CalibSource`] was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum CalibKind {
    Text,
    Jsonl,
    Parquet,
    PreTokenized,
}

#[derive(Clone, Debug)]
enum CalibData {
    Text(String),
    Documents(Vec<String>),
    Tokens(Vec<Vec<u32>>),
}

/// Calibration data read into memory (text, documents or token rows), not yet tokenized.
#[derive(Clone, Debug)]
pub struct CalibSource {
    path: PathBuf,
    kind: CalibKind,
    data: CalibData,
}

/// Extensions read as plain text.
const TEXT_EXTS: [&str; 5] = ["txt", "raw", "tokens", "text", "md"];

impl CalibSource {
    /// Reads `path`, choosing the format by extension (see the module docs).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CalibError> {
        let path = path.as_ref();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        let (kind, data) = match ext.as_str() {
            e if TEXT_EXTS.contains(&e) => {
                let bytes =
                    std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
                (CalibKind::Text, CalibData::Text(parse_text(&bytes, path)?))
            }
            "jsonl" | "ndjson" => {
                let bytes =
                    std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
                let text = parse_text(&bytes, path)?;
                (
                    CalibKind::Jsonl,
                    CalibData::Documents(parse_jsonl(&text, path)?),
                )
            }
            "parquet" => (
                CalibKind::Parquet,
                CalibData::Documents(read_parquet_text(path)?),
            ),
            "safetensors" => (
                CalibKind::PreTokenized,
                CalibData::Tokens(read_input_ids(path)?),
            ),
            _ => {
                return Err(file_err(
                    path,
                    format!(
                        "unsupported calibration file extension `{ext}` (supported: {}, jsonl, parquet, safetensors with `input_ids`)",
                        TEXT_EXTS.join(", ")
                    ),
                ));
            }
        };
        Ok(CalibSource {
            path: path.to_path_buf(),
            kind,
            data,
        })
    }

    /// A source from in-memory text (tests, the GUI's paste box); `name` is used in messages.
    pub fn from_text(name: impl Into<PathBuf>, text: String) -> Self {
        CalibSource {
            path: name.into(),
            kind: CalibKind::Text,
            data: CalibData::Text(text),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn kind(&self) -> CalibKind {
        self.kind
    }
    /// Number of documents (1 for text, rows for pre-tokenized input).
    pub fn num_documents(&self) -> usize {
        match &self.data {
            CalibData::Text(_) => 1,
            CalibData::Documents(d) => d.len(),
            CalibData::Tokens(r) => r.len(),
        }
    }

    /// The whole source as one token stream, without BOS: text tokenized once; documents joined
    /// with `"\n\n"` (what GPTQ's `get_wikitext2` does with dataset rows) and tokenized once;
    /// token rows concatenated. Used for perplexity evaluation ([`eval_windows`]).
    pub fn token_stream(&self, tokenizer: Option<&Tokenizer>) -> Result<Vec<u32>, CalibError> {
        match &self.data {
            CalibData::Text(t) => Ok(self.need_tok(tokenizer)?.encode(t, false)?),
            CalibData::Documents(d) => {
                Ok(self.need_tok(tokenizer)?.encode(&d.join("\n\n"), false)?)
            }
            CalibData::Tokens(rows) => Ok(rows.concat()),
        }
    }

    fn need_tok<'t>(&self, tokenizer: Option<&'t Tokenizer>) -> Result<&'t Tokenizer, CalibError> {
        tokenizer.ok_or_else(|| {
            file_err(
                &self.path,
                "this calibration source is text and needs a tokenizer",
            )
        })
    }
}

/// Validates UTF-8 and non-emptiness of a text file's bytes.
pub fn parse_text(bytes: &[u8], path: &Path) -> Result<String, CalibError> {
    if bytes.is_empty() {
        return Err(file_err(path, "empty file (0 bytes): no calibration text"));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        file_err(
            path,
            format!(
                "not valid UTF-8 (first bad byte at offset {})",
                e.valid_up_to()
            ),
        )
    })?;
    if text.trim().is_empty() {
        return Err(file_err(
            path,
            format!(
                "contains only whitespace ({} bytes): no calibration text",
                bytes.len()
            ),
        ));
    }
    Ok(text.to_string())
}

/// JSON lines → the `text` field of every line that has one.
///
/// Blank lines and lines whose object has no string `text` are skipped (datasets carry metadata
/// rows); a line that is not JSON is an error naming the line; if no line has `text` at all the
/// error names the first line and the keys it does have, since that is almost always a
/// wrong-column dataset rather than bad luck.
pub fn parse_jsonl(text: &str, path: &Path) -> Result<Vec<String>, CalibError> {
    let mut docs = Vec::new();
    let mut first_without: Option<(usize, Vec<String>)> = None;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| CalibError::Line {
            path: path.display().to_string(),
            line: line_no,
            message: format!("not valid JSON: {e}"),
        })?;
        match v.get("text").and_then(|t| t.as_str()) {
            Some(t) => docs.push(t.to_string()),
            None => {
                if first_without.is_none() {
                    let keys = v
                        .as_object()
                        .map(|o| o.keys().cloned().collect())
                        .unwrap_or_default();
                    first_without = Some((line_no, keys));
                }
            }
        }
    }
    if docs.is_empty() {
        return Err(match first_without {
            Some((line, keys)) => CalibError::Line {
                path: path.display().to_string(),
                line,
                message: format!(
                    "no line has a string `text` field (this line's keys: [{}])",
                    keys.join(", ")
                ),
            },
            None => file_err(path, "no JSON lines (file is blank)"),
        });
    }
    Ok(docs)
}

/// Reads the string column `text` of a Parquet file (all row groups; nulls skipped).
///
/// Compression is checked first against the codecs this build links (uncompressed, snappy, gzip,
/// lz4, brotli): zstd is common on the Hub but not built in, and the parquet crate's own error
/// for it does not say which file or what to do.
pub fn read_parquet_text(path: &Path) -> Result<Vec<String>, CalibError> {
    use parquet::basic::Compression;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;

    let file =
        std::fs::File::open(path).map_err(|e| file_err(path, format!("cannot open: {e}")))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| file_err(path, format!("not a readable Parquet file: {e}")))?;
    let meta = reader.metadata();
    let schema = meta.file_metadata().schema();
    let fields = schema.get_fields();
    let Some(text_field) = fields.iter().find(|f| f.name() == "text") else {
        let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
        return Err(file_err(
            path,
            format!("no `text` column (columns: [{}])", names.join(", ")),
        ));
    };
    if !text_field.is_primitive() {
        return Err(file_err(
            path,
            "column `text` is nested, expected a string column",
        ));
    }
    for rg in meta.row_groups() {
        for col in rg.columns() {
            if col.column_path().string() != "text" {
                continue;
            }
            match col.compression() {
                Compression::UNCOMPRESSED
                | Compression::SNAPPY
                | Compression::GZIP(_)
                | Compression::LZ4
                | Compression::LZ4_RAW
                | Compression::BROTLI(_) => {}
                other => {
                    return Err(file_err(
                        path,
                        format!(
                            "column `text` is compressed with {other:?}, which this build cannot decode \
                             (supported: uncompressed, snappy, gzip, lz4, brotli); re-save it, e.g. \
                             `pyarrow.parquet.write_table(t, out, compression=\"snappy\")`, or convert to JSON lines"
                        ),
                    ));
                }
            }
        }
    }
    let projection = parquet::schema::types::Type::group_type_builder(schema.name())
        .with_fields(vec![text_field.clone()])
        .build()
        .map_err(|e| file_err(path, format!("cannot project column `text`: {e}")))?;
    let rows = reader
        .get_row_iter(Some(projection))
        .map_err(|e| file_err(path, format!("cannot read column `text`: {e}")))?;
    let mut docs = Vec::new();
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| file_err(path, format!("row {i}: {e}")))?;
        for (_, field) in row.get_column_iter() {
            match field {
                Field::Str(s) => docs.push(s.clone()),
                Field::Bytes(b) => match std::str::from_utf8(b.data()) {
                    Ok(s) => docs.push(s.to_string()),
                    Err(_) => {
                        return Err(file_err(
                            path,
                            format!("row {i}: column `text` is not valid UTF-8"),
                        ));
                    }
                },
                Field::Null => {}
                other => {
                    return Err(file_err(
                        path,
                        format!("row {i}: column `text` holds {other:?}, expected a string"),
                    ));
                }
            }
        }
    }
    if docs.is_empty() {
        return Err(file_err(path, "column `text` has no non-null rows"));
    }
    Ok(docs)
}

/// Reads an integer `input_ids` tensor (`[N, L]` or `[L]`) from a safetensors file.
pub fn read_input_ids(path: &Path) -> Result<Vec<Vec<u32>>, CalibError> {
    use safetensors::Dtype;
    let bytes = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let header =
        parse_safetensors_header(&bytes, path).map_err(|e| file_err(path, e.to_string()))?;
    let Some(meta) = header.tensors.get("input_ids") else {
        let names: Vec<&str> = header.tensors.keys().map(String::as_str).collect();
        return Err(file_err(
            path,
            format!("no `input_ids` tensor (tensors: [{}])", names.join(", ")),
        ));
    };
    let (n, l) = match meta.shape.as_slice() {
        [l] => (1, *l),
        [n, l] => (*n, *l),
        s => {
            return Err(file_err(
                path,
                format!("tensor `input_ids`: shape {s:?}, expected [N, L] or [L]"),
            ));
        }
    };
    let start = header.data_start + meta.data_offsets.0;
    let data = &bytes[start..header.data_start + meta.data_offsets.1];
    let bad = |v: i128| {
        file_err(
            path,
            format!("tensor `input_ids`: value {v} is not a valid token id"),
        )
    };
    let conv = |v: i128| u32::try_from(v).map_err(|_| bad(v));
    let flat: Vec<u32> = match meta.dtype {
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|c| conv(i64::from_le_bytes(arr(c)) as i128))
            .collect::<Result<_, _>>()?,
        Dtype::U64 => data
            .chunks_exact(8)
            .map(|c| conv(u64::from_le_bytes(arr(c)) as i128))
            .collect::<Result<_, _>>()?,
        Dtype::I32 => data
            .chunks_exact(4)
            .map(|c| conv(i32::from_le_bytes(arr(c)) as i128))
            .collect::<Result<_, _>>()?,
        Dtype::U32 => data
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(arr(c)))
            .collect(),
        Dtype::I16 => data
            .chunks_exact(2)
            .map(|c| conv(i16::from_le_bytes(arr(c)) as i128))
            .collect::<Result<_, _>>()?,
        Dtype::U16 => data
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes(arr(c)) as u32)
            .collect(),
        Dtype::U8 => data.iter().map(|&b| b as u32).collect(),
        Dtype::I8 => data
            .iter()
            .map(|&b| conv(i128::from(b as i8)))
            .collect::<Result<_, _>>()?,
        other => {
            return Err(file_err(
                path,
                format!("tensor `input_ids`: dtype {other:?}, expected an integer dtype"),
            ));
        }
    };
    if n == 0 || l == 0 {
        return Err(file_err(
            path,
            format!("tensor `input_ids` is empty (shape [{n}, {l}])"),
        ));
    }
    Ok(flat.chunks_exact(l).map(<[u32]>::to_vec).collect())
}

fn arr<const N: usize>(c: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(c);
    a
}

/// Options of [`calibration_windows_with`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CalibOptions {
    pub nsamples: usize,
    pub seqlen: usize,
    pub seed: u64,
    /// Start every window with BOS (see the module docs). Off by default, as in the GPTQ reference.
    pub add_bos: bool,
}

/// Sampled calibration windows and how much data they were drawn from.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CalibSet {
    /// `nsamples` windows of exactly `seqlen` tokens.
    pub windows: Vec<Vec<u32>>,
    /// Tokens in the whole source (after tokenization).
    pub available_tokens: usize,
    /// Non-overlapping `seqlen` windows the source holds (see the module docs).
    pub available_windows: usize,
    /// One line for reports: file, procedure, counts, seed.
    pub description: String,
}

impl CalibSet {
    pub fn nsamples(&self) -> usize {
        self.windows.len()
    }
    pub fn seqlen(&self) -> usize {
        self.windows.first().map_or(0, Vec::len)
    }

    /// Random token windows for the synthetic demo model: token `r`-th most frequent with
    /// probability ∝ 1/(r+1)^1.1 (Zipf-like, like natural text, so a few embedding rows dominate
    /// the statistics), rank → id through a seeded permutation. Deterministic in `seed`.
    pub fn synthetic(vocab: usize, nsamples: usize, seqlen: usize, seed: u64) -> CalibSet {
        let vocab = vocab.max(1);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut perm: Vec<u32> = (0..vocab as u32).collect();
        for i in (1..vocab).rev() {
            let j = rng.random_range(0..=i);
            perm.swap(i, j);
        }
        let mut cdf = Vec::with_capacity(vocab);
        let mut acc = 0.0f64;
        for r in 0..vocab {
            acc += 1.0 / ((r + 1) as f64).powf(1.1);
            cdf.push(acc);
        }
        let windows = (0..nsamples)
            .map(|_| {
                (0..seqlen)
                    .map(|_| {
                        let u = rng.random::<f64>() * acc;
                        let r = cdf.partition_point(|&c| c < u).min(vocab - 1);
                        perm[r]
                    })
                    .collect()
            })
            .collect();
        CalibSet {
            windows,
            available_tokens: nsamples * seqlen,
            available_windows: nsamples,
            description: format!(
                "synthetic Zipf tokens (vocab {vocab}), {nsamples} × {seqlen}, seed {seed}"
            ),
        }
    }
}

/// [`calibration_windows_with`] without BOS.
pub fn calibration_windows(
    source: &CalibSource,
    tokenizer: Option<&Tokenizer>,
    nsamples: usize,
    seqlen: usize,
    seed: u64,
) -> Result<CalibSet, CalibError> {
    calibration_windows_with(
        source,
        tokenizer,
        &CalibOptions {
            nsamples,
            seqlen,
            seed,
            add_bos: false,
        },
    )
}

/// Samples `nsamples` windows of `seqlen` tokens by the procedure in the module docs.
pub fn calibration_windows_with(
    source: &CalibSource,
    tokenizer: Option<&Tokenizer>,
    opts: &CalibOptions,
) -> Result<CalibSet, CalibError> {
    let CalibOptions {
        nsamples,
        seqlen,
        seed,
        add_bos,
    } = *opts;
    if nsamples == 0 || seqlen == 0 {
        return Err(CalibError::Invalid(format!(
            "nsamples ({nsamples}) and seqlen ({seqlen}) must be positive"
        )));
    }
    let path = source.path.as_path();
    let shown = path.display();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);

    if let CalibData::Tokens(rows) = &source.data {
        let row_len = rows.first().map_or(0, Vec::len);
        if row_len < seqlen {
            return Err(file_err(
                path,
                format!("pre-tokenized rows have {row_len} tokens, fewer than seqlen {seqlen}"),
            ));
        }
        if rows.len() < nsamples {
            return Err(file_err(
                path,
                format!(
                    "{} pre-tokenized rows, fewer than nsamples {nsamples}",
                    rows.len()
                ),
            ));
        }
        if let Some(tok) = tokenizer {
            let v = tok.vocab_size();
            if let Some(&bad) = rows.iter().flatten().find(|&&id| id as usize >= v) {
                return Err(file_err(
                    path,
                    format!("token id {bad} is outside the tokenizer's vocabulary ({v})"),
                ));
            }
        }
        return Ok(CalibSet {
            windows: rows[..nsamples]
                .iter()
                .map(|r| r[..seqlen].to_vec())
                .collect(),
            available_tokens: rows.len() * row_len,
            available_windows: rows.len(),
            description: format!(
                "{shown}: pre-tokenized, first {nsamples} of {} rows, first {seqlen} of {row_len} tokens each",
                rows.len()
            ),
        });
    }

    let tok = source.need_tok(tokenizer)?;
    let bos = if add_bos {
        Some(tok.bos_id().ok_or_else(|| {
            file_err(
                tok.path(),
                "BOS requested for calibration but the tokenizer has none",
            )
        })?)
    } else {
        None
    };
    let take = seqlen - usize::from(bos.is_some());
    let finish =
        |body: &[u32]| -> Vec<u32> { bos.into_iter().chain(body.iter().copied()).collect() };
    let bos_note = if add_bos { ", BOS + " } else { ", " };

    match &source.data {
        CalibData::Text(text) => {
            let tokens = tok.encode(text, false)?;
            let len = tokens.len();
            if len < take.max(1) {
                return Err(file_err(
                    path,
                    format!(
                        "only {len} tokens after tokenization, fewer than the {take} a window needs (seqlen {seqlen})"
                    ),
                ));
            }
            let windows = (0..nsamples)
                .map(|_| {
                    let i = rng.random_range(0..=len - take);
                    finish(&tokens[i..i + take])
                })
                .collect();
            let available_windows = len / take.max(1);
            Ok(CalibSet {
                windows,
                available_tokens: len,
                available_windows,
                description: format!(
                    "{shown}: text, {len} tokens, {nsamples} random windows{bos_note}{seqlen} tokens, seed {seed} (GPTQ wikitext2-style)"
                ),
            })
        }
        CalibData::Documents(docs) => {
            let encoded: Vec<Vec<u32>> = docs
                .iter()
                .map(|d| tok.encode(d, false))
                .collect::<Result<_, _>>()?;
            let available_tokens: usize = encoded.iter().map(Vec::len).sum();
            let longest = encoded.iter().map(Vec::len).max().unwrap_or(0);
            let eligible = encoded.iter().filter(|d| d.len() >= take.max(1)).count();
            if eligible == 0 {
                return Err(file_err(
                    path,
                    format!(
                        "no document has the {take} tokens a window needs (seqlen {seqlen}): {} documents, {available_tokens} tokens, longest {longest}",
                        docs.len()
                    ),
                ));
            }
            let mut windows = Vec::with_capacity(nsamples);
            for _ in 0..nsamples {
                let doc = loop {
                    let d = &encoded[rng.random_range(0..encoded.len())];
                    if d.len() >= take.max(1) {
                        break d;
                    }
                };
                let i = rng.random_range(0..=doc.len() - take);
                windows.push(finish(&doc[i..i + take]));
            }
            let available_windows = encoded.iter().map(|d| d.len() / take.max(1)).sum();
            Ok(CalibSet {
                windows,
                available_tokens,
                available_windows,
                description: format!(
                    "{shown}: {} documents ({eligible} with ≥ {take} tokens), {available_tokens} tokens, {nsamples} random windows{bos_note}{seqlen} tokens, seed {seed} (GPTQ c4-style)",
                    docs.len()
                ),
            })
        }
        CalibData::Tokens(_) => Err(CalibError::Invalid(
            "unreachable: token rows handled above".into(),
        )),
    }
}

/// Non-overlapping evaluation windows of a token stream (the GPTQ-paper perplexity protocol:
/// `nsamples = numel // seqlen`, window `i` = `tokens[i*seqlen .. (i+1)*seqlen]`, the tail shorter
/// than `seqlen` dropped).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EvalWindows {
    pub windows: Vec<Vec<u32>>,
    /// `⌊tokens / seqlen⌋`, before any `max_windows` cut.
    pub total_windows: usize,
    /// Tail tokens that do not fill a window.
    pub dropped_tokens: usize,
}

/// See [`EvalWindows`]; `max_windows` keeps only the first windows (quick evaluations).
pub fn eval_windows(tokens: &[u32], seqlen: usize, max_windows: Option<usize>) -> EvalWindows {
    if seqlen == 0 {
        return EvalWindows {
            windows: Vec::new(),
            total_windows: 0,
            dropped_tokens: tokens.len(),
        };
    }
    let total_windows = tokens.len() / seqlen;
    let keep = max_windows.map_or(total_windows, |m| m.min(total_windows));
    EvalWindows {
        windows: tokens
            .chunks_exact(seqlen)
            .take(keep)
            .map(<[u32]>::to_vec)
            .collect(),
        total_windows,
        dropped_tokens: tokens.len() % seqlen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_windows_counts() {
        let t: Vec<u32> = (0..1000).collect();
        let w = eval_windows(&t, 256, None);
        assert_eq!(
            (w.windows.len(), w.total_windows, w.dropped_tokens),
            (3, 3, 232)
        );
        assert_eq!(w.windows[1][0], 256);
        assert_eq!(eval_windows(&t, 256, Some(1)).windows.len(), 1);
    }

    #[test]
    fn synthetic_is_deterministic() {
        let a = CalibSet::synthetic(512, 4, 64, 7);
        assert_eq!(a, CalibSet::synthetic(512, 4, 64, 7));
        assert_ne!(a.windows, CalibSet::synthetic(512, 4, 64, 8).windows);
        assert!(a.windows.iter().flatten().all(|&t| t < 512));
        assert_eq!(a.seqlen(), 64);
    }

    #[test]
    fn jsonl_rules() {
        let p = Path::new("x.jsonl");
        assert_eq!(
            parse_jsonl("{\"text\":\"a\"}\n\n{\"url\":1}\n{\"text\":\"b\"}", p).unwrap(),
            vec!["a", "b"]
        );
        let e = parse_jsonl("{\"url\":1}\n{\"id\":2}", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.jsonl:1") && e.contains("url"), "{e}");
        let e = parse_jsonl("{\"text\":\"a\"}\nnot json", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.jsonl:2"), "{e}");
    }
}
