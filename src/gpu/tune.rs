//! Which GEMM kernel to use for a shape, measured on this adapter (issue 10: "choose kernels per
//! shape, a small autotune table, cached").
//!
//! `gptaq-studio tune` times the GEMM kernels ([`GemmTile::Large`] 128×128 tiles, [`GemmTile::Small`]
//! 64×64, [`GemmTile::LargeDb`] 128×128 with double-buffered workgroup memory,
//! [`GemmTile::Narrow`] 32×64) over a grid of shapes and writes a [`GemmTable`] to the cache
//! directory, one file per adapter and driver. A context loads that file on its first GEMM;
//! [`GemmTable::lookup`] then answers with the faster kernel of the nearest measured shape
//! (distance in log₂ of M, N and K).
//! Runs never benchmark by themselves: kernel choice stays deterministic within a run and the
//! table only changes when the user tunes again. Without a table (or with `GPTAQ_GEMM_TABLE=off`)
//! the size rule of `ops::size_rule_for` decides; `GPTAQ_GEMM_TILE=large|small|large-db|narrow`
//! overrides both.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::ops::{self, GemmTile, MatView};
use super::{AdapterSummary, GpuContext, GpuError};

/// A measured shape: op(A) M×K times op(B) K×N, plain (non-transposed) operands.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TuneEntry {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Best of the timed runs, milliseconds.
    pub large_ms: f64,
    pub small_ms: f64,
    /// [`GemmTile::LargeDb`]; absent from tables written before that kernel existed.
    #[serde(default)]
    pub large_db_ms: Option<f64>,
    /// [`GemmTile::Narrow`]; absent from tables written before that kernel existed.
    #[serde(default)]
    pub narrow_ms: Option<f64>,
}

impl TuneEntry {
    /// Milliseconds of `tile` (`None`: not measured).
    pub fn ms(&self, tile: GemmTile) -> Option<f64> {
        match tile {
            GemmTile::Large => Some(self.large_ms),
            GemmTile::Small => Some(self.small_ms),
            GemmTile::LargeDb => self.large_db_ms,
            GemmTile::Narrow => self.narrow_ms,
        }
    }

    /// The fastest measured kernel (the first of [`GemmTile::ALL`] on a tie).
    pub fn best(&self) -> GemmTile {
        let mut best = (GemmTile::Large, self.large_ms);
        for tile in GemmTile::ALL {
            if let Some(ms) = self.ms(tile)
                && ms < best.1
            {
                best = (tile, ms);
            }
        }
        best.0
    }

    /// Milliseconds of [`Self::best`].
    pub fn best_ms(&self) -> f64 {
        self.ms(self.best()).unwrap_or(self.large_ms)
    }
}

/// The measured kernel choices of one adapter.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GemmTable {
    /// `name (backend, driver)` of the adapter the entries were measured on.
    pub adapter: String,
    /// gptaq-studio version that measured them (kernels change between versions).
    pub version: String,
    pub entries: Vec<TuneEntry>,
}

/// Shapes further than this from every entry (sum over M, N, K of |log₂ ratio|) fall back to the
/// size rule: a grid spaced by 8× per dimension has every in-range shape within 4.5.
const MAX_LOOKUP_DISTANCE: f64 = 6.0;

#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> TuneError {
    TuneError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// The identity a table is valid for.
pub fn adapter_key(s: &AdapterSummary) -> String {
    format!("{} ({}, {})", s.name, s.backend, s.driver)
}

impl GemmTable {
    /// The kernel of the nearest measured shape, if one is near enough.
    pub fn lookup(&self, m: usize, n: usize, k: usize) -> Option<GemmTile> {
        let lg = |x: usize| (x.max(1) as f64).log2();
        self.entries
            .iter()
            .map(|e| {
                let d = (lg(m) - lg(e.m)).abs() + (lg(n) - lg(e.n)).abs() + (lg(k) - lg(e.k)).abs();
                (d, e)
            })
            .filter(|(d, _)| *d <= MAX_LOOKUP_DISTANCE)
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, e)| e.best())
    }

    /// Whether this table was measured on `s` by this version.
    pub fn matches(&self, s: &AdapterSummary) -> bool {
        self.adapter == adapter_key(s) && self.version == env!("CARGO_PKG_VERSION")
    }

    /// Reads a table; `Ok(None)` if the file does not exist.
    pub fn load(path: &Path) -> Result<Option<Self>, TuneError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(file_err(path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| file_err(path, format!("not a GEMM tuning table: {e}")))
    }

    /// Writes the table next to `path` and renames it into place (a crash never leaves half a
    /// file for the next run to load).
    pub fn save(&self, path: &Path) -> Result<(), TuneError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        }
        let text = serde_json::to_string_pretty(self).map_err(|e| file_err(path, e))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| file_err(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
    }
}

/// `GPTAQ_CACHE_DIR`, else `$XDG_CACHE_HOME/gptaq-studio`, else `$HOME/.cache/gptaq-studio`.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("GPTAQ_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("gptaq-studio")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("gptaq-studio")))
}

/// The table file of an adapter inside `dir`: the adapter key with everything but ASCII letters
/// and digits replaced, so any name is a valid file name.
pub fn table_path(dir: &Path, s: &AdapterSummary) -> PathBuf {
    let name: String = adapter_key(s)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    dir.join(format!("gemm-{name}.json"))
}

/// The table a context uses: the cached file of its adapter, if any, valid for it and not
/// disabled with `GPTAQ_GEMM_TABLE=off`. Unreadable or stale files are ignored with a log line.
pub(crate) fn load_for(s: &AdapterSummary) -> Option<GemmTable> {
    if std::env::var("GPTAQ_GEMM_TABLE").is_ok_and(|v| v == "off") {
        return None;
    }
    let path = table_path(&cache_dir()?, s);
    match GemmTable::load(&path) {
        Ok(Some(t)) if t.matches(s) => Some(t),
        Ok(Some(_)) => {
            log::warn!(
                "{}: measured on another adapter or version, ignored",
                path.display()
            );
            None
        }
        Ok(None) => None,
        Err(e) => {
            log::warn!("{e}; GEMM kernels chosen by the size rule");
            None
        }
    }
}

/// The default grid: M, N, K ∈ {128, 1024, 8192} on GPUs (the solve's 128-column blocks, module
/// widths, token batches), {32, 128, 512} on CPU adapters (lavapipe runs ~5 GFLOP/s).
pub fn default_shapes(cpu_adapter: bool) -> Vec<(usize, usize, usize)> {
    let sizes: [usize; 3] = if cpu_adapter {
        [32, 128, 512]
    } else {
        [128, 1024, 8192]
    };
    let mut v = Vec::new();
    for &m in &sizes {
        for &n in &sizes {
            for &k in &sizes {
                v.push((m, n, k));
            }
        }
    }
    v
}

/// Times every kernel on every shape: one untimed run, then the best of `reps` timed runs (each
/// submitted alone and waited for, so the times include the launch as a real GEMM's do).
pub fn measure(
    ctx: &GpuContext,
    shapes: &[(usize, usize, usize)],
    reps: usize,
    progress: &mut dyn FnMut(&TuneEntry),
) -> Result<GemmTable, GpuError> {
    let mut entries = Vec::with_capacity(shapes.len());
    for &(m, n, k) in shapes {
        // Small deterministic values: the timing does not depend on them, and finite ones keep
        // the validation layers quiet.
        let fill = |len: usize, s: f32| -> Vec<f32> {
            (0..len).map(|i| s * ((i % 7) as f32 - 3.0)).collect()
        };
        let a = ctx.upload("tune A", &fill(m * k, 0.01))?;
        let b = ctx.upload("tune B", &fill(k * n, 0.02))?;
        let c = ctx.zeros::<f32>("tune C", m * n)?;
        let time = |tile: GemmTile| -> Result<f64, GpuError> {
            let mut best = f64::INFINITY;
            for rep in 0..=reps.max(1) {
                let mut rec = ctx.recorder();
                ops::gemm_tiled(
                    &mut rec,
                    tile,
                    false,
                    m,
                    n,
                    k,
                    1.0,
                    MatView::new(&a, k),
                    MatView::new(&b, n),
                    0.0,
                    MatView::new(&c, n),
                )?;
                let t = Instant::now();
                rec.submit();
                ctx.sync()?;
                if rep > 0 {
                    best = best.min(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            Ok(best)
        };
        let e = TuneEntry {
            m,
            n,
            k,
            large_ms: time(GemmTile::Large)?,
            small_ms: time(GemmTile::Small)?,
            large_db_ms: Some(time(GemmTile::LargeDb)?),
            narrow_ms: Some(time(GemmTile::Narrow)?),
        };
        progress(&e);
        entries.push(e);
    }
    Ok(GemmTable {
        adapter: adapter_key(&ctx.summary),
        version: env!("CARGO_PKG_VERSION").to_string(),
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(m: usize, n: usize, k: usize, large_ms: f64, small_ms: f64) -> TuneEntry {
        TuneEntry {
            m,
            n,
            k,
            large_ms,
            small_ms,
            large_db_ms: None,
            narrow_ms: None,
        }
    }

    /// The double-buffered kernel wins only where it was measured faster; tables written before
    /// it existed (no `large_db_ms`) still load and choose between the other two.
    #[test]
    fn best_of_three_and_old_tables() -> Result<(), Box<dyn std::error::Error>> {
        let mut e = entry(1, 1, 1, 2.0, 3.0);
        assert_eq!((e.best(), e.best_ms()), (GemmTile::Large, 2.0));
        e.large_db_ms = Some(1.5);
        assert_eq!((e.best(), e.best_ms()), (GemmTile::LargeDb, 1.5));
        e.small_ms = 1.0;
        assert_eq!((e.best(), e.best_ms()), (GemmTile::Small, 1.0));
        e.large_db_ms = Some(2.0);
        e.small_ms = 3.0;
        assert_eq!(e.best(), GemmTile::Large, "a tie goes to the first kernel");
        let old: TuneEntry =
            serde_json::from_str(r#"{"m":8,"n":8,"k":8,"large_ms":2.0,"small_ms":1.0}"#)?;
        assert_eq!((old.large_db_ms, old.best()), (None, GemmTile::Small));
        assert_eq!(old.narrow_ms, None);
        e.narrow_ms = Some(1.9);
        assert_eq!((e.best(), e.best_ms()), (GemmTile::Narrow, 1.9));
        Ok(())
    }

    fn table() -> GemmTable {
        GemmTable {
            adapter: "x".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            entries: vec![
                entry(128, 128, 128, 2.0, 1.0),
                entry(1024, 1024, 1024, 1.0, 2.0),
                entry(8192, 128, 1024, 3.0, 1.0),
            ],
        }
    }

    #[test]
    fn lookup_takes_the_nearest_shape_and_gives_up_far_away() {
        let t = table();
        assert_eq!(t.lookup(100, 150, 128), Some(GemmTile::Small));
        assert_eq!(t.lookup(1000, 2000, 900), Some(GemmTile::Large));
        assert_eq!(t.lookup(6000, 100, 1500), Some(GemmTile::Small));
        // Exactly on an entry.
        assert_eq!(t.lookup(1024, 1024, 1024), Some(GemmTile::Large));
        // Far from every entry (1×1×1 is 21 doublings from 128³): the size rule decides.
        assert_eq!(t.lookup(1, 1, 1), None);
        assert_eq!(
            GemmTable {
                entries: vec![],
                ..t
            }
            .lookup(128, 128, 128),
            None
        );
    }

    #[test]
    fn save_load_round_trip_and_missing_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("sub").join("gemm-x.json");
        assert_eq!(GemmTable::load(&path)?, None);
        table().save(&path)?;
        assert_eq!(GemmTable::load(&path)?, Some(table()));
        std::fs::write(&path, "{ not json")?;
        let e = match GemmTable::load(&path) {
            Err(e) => e.to_string(),
            Ok(t) => return Err(format!("corrupt table accepted: {t:?}").into()),
        };
        assert!(
            e.contains("gemm-x.json") && e.contains("not a GEMM tuning table"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn table_paths_are_plain_file_names() {
        let s = AdapterSummary {
            name: "NVIDIA H200 / (x)".into(),
            backend: "Vulkan".into(),
            driver: "NVIDIA 580.159.04".into(),
            ..Default::default()
        };
        let p = table_path(Path::new("/c"), &s);
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        assert_eq!(
            name.as_deref(),
            Some("gemm-NVIDIA_H200____x___Vulkan__NVIDIA_580_159_04_.json")
        );
        assert_eq!(default_shapes(true).len(), 27);
    }
}
