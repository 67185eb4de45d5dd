//! tokenizer.json through the `tokenizers` crate.
//!
//! Special tokens are never added by the `tokenizers` post-processor: [`Tokenizer::encode`] always
//! encodes with `add_special_tokens = false` and prepends BOS itself when asked. The reason is
//! that the post-processor's template is an opaque per-checkpoint choice (tiny-llama-15m's adds
//! `<s>`, others add nothing), and calibration / perplexity windows must contain exactly the
//! tokens we decide on, the same for every model.

use std::path::{Path, PathBuf};

/// Errors loading or using a tokenizer; every variant names the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: missing{hint}")]
    Missing { path: String, hint: String },
    #[error("{path}: cannot load tokenizer: {message}")]
    Load { path: String, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Field {
        path: String,
        field: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Encode { path: String, message: String },
}

/// A Hugging Face fast tokenizer plus the model's BOS/EOS policy.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    default_add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("default_add_bos", &self.default_add_bos)
            .finish()
    }
}

/// `bos_token` / `eos_token` in tokenizer_config.json: a string or an `AddedToken` object
/// (`{"content": "<s>", ...}`), or null.
fn special_token_content(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, TokenizerError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| TokenizerError::Load {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Load {
            path: path.display().to_string(),
            message: format!("malformed JSON: {e}"),
        })
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, with the BOS/EOS policy from `dir/tokenizer_config.json` and
    /// `dir/config.json` (both optional).
    ///
    /// BOS/EOS ids: the `bos_token` / `eos_token` strings of tokenizer_config.json looked up in the
    /// vocabulary, else config.json's `bos_token_id` / `eos_token_id` (first of a list).
    /// Default BOS policy ([`Self::default_add_bos`]): tokenizer_config.json's `add_bos_token` when
    /// present (what transformers' `LlamaTokenizer(Fast)` obeys); otherwise whatever the
    /// tokenizer.json post-processor would do, found by encoding a probe string with and without
    /// special tokens (transformers 5 `TokenizersBackend` relies on the post-processor alone).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let dir = dir.as_ref();
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            let hint = if dir.join("tokenizer.model").is_file() {
                " (only a SentencePiece tokenizer.model is present; convert it with transformers: \
                 `AutoTokenizer.from_pretrained(dir).save_pretrained(dir)` writes tokenizer.json)"
                    .to_string()
            } else {
                " (a checkpoint needs a Hugging Face fast-tokenizer tokenizer.json)".to_string()
            };
            return Err(TokenizerError::Missing {
                path: tok_path.display().to_string(),
                hint,
            });
        }
        let tc_path = dir.join("tokenizer_config.json");
        let tok_config = read_json(&tc_path)?;
        let model_config = read_json(&dir.join("config.json"))?;
        Self::load(
            &tok_path,
            tok_config.as_ref().map(|v| (v, tc_path.as_path())),
            model_config.as_ref(),
        )
    }

    /// Loads a bare tokenizer.json (BOS/EOS policy from the post-processor only).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(TokenizerError::Missing {
                path: path.display().to_string(),
                hint: String::new(),
            });
        }
        Self::load(path, None, None)
    }

    fn load(
        tok_path: &Path,
        tok_config: Option<(&serde_json::Value, &Path)>,
        model_config: Option<&serde_json::Value>,
    ) -> Result<Self, TokenizerError> {
        let inner =
            tokenizers::Tokenizer::from_file(tok_path).map_err(|e| TokenizerError::Load {
                path: tok_path.display().to_string(),
                message: e.to_string(),
            })?;
        let lookup = |key: &str, id_key: &str| -> Option<u32> {
            tok_config
                .and_then(|(c, _)| special_token_content(c.get(key)))
                .and_then(|s| inner.token_to_id(&s))
                .or_else(|| {
                    let v = model_config?.get(id_key)?;
                    let v = v.as_array().and_then(|a| a.first()).unwrap_or(v);
                    v.as_u64().and_then(|n| u32::try_from(n).ok())
                })
        };
        let bos_id = lookup("bos_token", "bos_token_id");
        let eos_id = lookup("eos_token", "eos_token_id");

        let explicit = match tok_config.and_then(|(c, p)| c.get("add_bos_token").map(|v| (v, p))) {
            None => None,
            Some((serde_json::Value::Null, _)) => None,
            Some((serde_json::Value::Bool(b), _)) => Some(*b),
            Some((other, p)) => {
                return Err(TokenizerError::Field {
                    path: p.display().to_string(),
                    field: "add_bos_token".into(),
                    message: format!("expected true or false, got {other}"),
                });
            }
        };
        let default_add_bos = match explicit {
            Some(b) => b,
            None => Self::post_processor_adds_bos(&inner, bos_id),
        };
        Ok(Tokenizer {
            inner,
            path: tok_path.to_path_buf(),
            bos_id,
            eos_id,
            default_add_bos,
        })
    }

    /// Whether the tokenizer.json post-processor prepends the BOS token.
    fn post_processor_adds_bos(inner: &tokenizers::Tokenizer, bos_id: Option<u32>) -> bool {
        let Some(bos) = bos_id else { return false };
        let (Ok(with), Ok(without)) = (inner.encode_fast("a", true), inner.encode_fast("a", false))
        else {
            return false;
        };
        with.get_ids().len() == without.get_ids().len() + 1 && with.get_ids().first() == Some(&bos)
    }

    /// Token ids of `text`, never with post-processor specials; `add_bos` prepends [`Self::bos_id`]
    /// (an error if the model has no BOS token).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode {
                path: self.path.display().to_string(),
                message: e.to_string(),
            })?;
        let ids = enc.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 1);
        if add_bos {
            let bos = self.bos_id.ok_or_else(|| TokenizerError::Encode {
                path: self.path.display().to_string(),
                message: "BOS requested but the tokenizer defines no BOS token".into(),
            })?;
            out.push(bos);
        }
        out.extend_from_slice(ids);
        Ok(out)
    }

    /// Text of `ids` (special tokens kept, so what the model saw is what is shown).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError::Encode {
                path: self.path.display().to_string(),
                message: e.to_string(),
            })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }
    /// Whether this model's tokenizer adds BOS by default (see [`Self::from_dir`]). Calibration
    /// and the GPTQ perplexity protocol do not use it; generation from a prompt does.
    pub fn default_add_bos(&self) -> bool {
        self.default_add_bos
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
