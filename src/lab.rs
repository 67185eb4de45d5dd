//! Layer lab (compute side): re-solve one captured module ([`CapturedModule`]) with any settings and
//! measure it exactly, without re-running the model.
//!
//! With ΔX = X_fp − X_q, ΔW = W − Q and the captured `H = 2/N·X_qᵀX_q`, `D = 2/N·ΔXᵀX_q`,
//! `E = 2/N·ΔXᵀΔX`, the three relative errors of the pipeline (`pipeline::events::ModuleReport`)
//! are ratios of traces (the N/2 cancels):
//! - quantization error `tr(ΔW H ΔWᵀ) / tr(W F Wᵀ)`,
//! - asymmetry error `tr(W E Wᵀ) / tr(W F Wᵀ)`,
//! - output error `tr(ΔW H ΔWᵀ + W E Wᵀ + 2·ΔW Dᵀ Wᵀ) / tr(W F Wᵀ)`,
//!
//! where `F = H + D + Dᵀ + E = 2/N·X_fpᵀX_fp`. GPTQ minimises the first term only; GPTAQ's
//! objective (paper eq. 7) is `‖Q X_qᵀ − W X_fpᵀ‖²`, i.e. the output error, which it reaches through
//! the P term (`P = α·triu₁(D·Uᵀ)·U`, algorithm.md §2.2); α = 0 is GPTQ.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use crate::model::ModuleKind;
use crate::pipeline::CapturedModule;
use crate::quant::{Method, QuantConfig, QuantError, QuantResult, reference};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

fn file_err(path: &Path, message: impl Into<String>) -> LabError {
    LabError::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// The errors of one solution, on the captured calibration tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LabMetrics {
    pub quant_error: f64,
    pub asym_error: f64,
    pub output_error: f64,
    /// GPTQ proxy loss Σ(w−q)²/(2U_jj²) / N.
    pub proxy_loss: f64,
}

/// One re-solve.
#[derive(Clone, Debug)]
pub struct LabSolve {
    pub config: QuantConfig,
    pub result: QuantResult,
    pub metrics: LabMetrics,
    pub secs: f64,
}

/// `tr(A M Bᵀ)` for A, B `[rows, n]` and M `[n, n]`, in f64.
fn trace_amb(a: &[f64], m: &[f32], b: &[f64], rows: usize, n: usize) -> f64 {
    let mut total = 0.0;
    let mut am = vec![0.0f64; n];
    for r in 0..rows {
        let ar = &a[r * n..(r + 1) * n];
        am.iter_mut().for_each(|x| *x = 0.0);
        for (i, &ai) in ar.iter().enumerate() {
            if ai == 0.0 {
                continue;
            }
            let mr = &m[i * n..(i + 1) * n];
            for (x, &mij) in am.iter_mut().zip(mr) {
                *x += ai * f64::from(mij);
            }
        }
        total += am
            .iter()
            .zip(&b[r * n..(r + 1) * n])
            .map(|(x, y)| x * y)
            .sum::<f64>();
    }
    total
}

/// Exact relative errors of `q` for the captured module (see the module docs).
pub fn metrics(c: &CapturedModule, q: &[f32], proxy_loss_sum: f64) -> LabMetrics {
    let n = c.cols;
    let w: Vec<f64> = c.w.iter().map(|&x| f64::from(x)).collect();
    let dw: Vec<f64> =
        c.w.iter()
            .zip(q)
            .map(|(&a, &b)| f64::from(a) - f64::from(b))
            .collect();
    let quant = trace_amb(&dw, &c.h, &dw, c.rows, n);
    let asym = trace_amb(&w, &c.e, &w, c.rows, n);
    // tr(ΔW Dᵀ Wᵀ) = tr(W D ΔWᵀ).
    let cross = trace_amb(&w, &c.d, &dw, c.rows, n);
    let whw = trace_amb(&w, &c.h, &w, c.rows, n);
    let wdw = trace_amb(&w, &c.d, &w, c.rows, n);
    let denom = whw + 2.0 * wdw + asym;
    let rel = |x: f64| if denom > 0.0 { x / denom } else { 0.0 };
    LabMetrics {
        quant_error: rel(quant),
        asym_error: rel(asym),
        output_error: rel((quant + asym + 2.0 * cross).max(0.0)),
        proxy_loss: proxy_loss_sum / c.nsamples.max(1) as f64,
    }
}

/// Re-solves the captured module with `cfg` (the f64 reference solver: exact, and fast enough for
/// modules up to ~1k wide; the GPU solve takes over for wider ones when available).
pub fn solve(c: &CapturedModule, cfg: &QuantConfig) -> Result<LabSolve, LabError> {
    let t = Instant::now();
    let d = matches!(cfg.method, Method::Gptaq { .. }).then_some(c.d.as_slice());
    let result = reference::quantize_reference(&c.w, c.rows, c.cols, &c.h, d, cfg)?;
    let metrics = metrics(c, &result.q, result.proxy_loss_sum);
    Ok(LabSolve {
        config: cfg.clone(),
        result,
        metrics,
        secs: t.elapsed().as_secs_f64(),
    })
}

/// GPTAQ at each α (α = 0 is GPTQ), other settings from `base`.
pub fn alpha_sweep(
    c: &CapturedModule,
    base: &QuantConfig,
    alphas: &[f64],
) -> Result<Vec<(f64, LabMetrics)>, LabError> {
    alphas
        .iter()
        .map(|&alpha| {
            let cfg = QuantConfig {
                method: Method::Gptaq { alpha },
                ..base.clone()
            };
            Ok((alpha, solve(c, &cfg)?.metrics))
        })
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes a capture as safetensors (`w`, `h`, `d`, `e` f32 + metadata), atomically.
pub fn save(c: &CapturedModule, path: &Path) -> Result<(), LabError> {
    let n = c.cols;
    let bufs = [
        ("w", vec![c.rows, n], f32_bytes(&c.w)),
        ("h", vec![n, n], f32_bytes(&c.h)),
        ("d", vec![n, n], f32_bytes(&c.d)),
        ("e", vec![n, n], f32_bytes(&c.e)),
    ];
    let mut views = Vec::new();
    for (name, shape, bytes) in &bufs {
        let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
            .map_err(|e| file_err(path, e.to_string()))?;
        views.push((*name, v));
    }
    let meta: HashMap<String, String> = [
        (
            "format".to_string(),
            "gptaq-studio-lab-capture-v1".to_string(),
        ),
        ("layer".to_string(), c.layer.to_string()),
        ("module".to_string(), c.module.short_name().to_string()),
        ("nsamples".to_string(), c.nsamples.to_string()),
    ]
    .into();
    let bytes =
        safetensors::serialize(views, Some(meta)).map_err(|e| file_err(path, e.to_string()))?;
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, bytes).map_err(|e| file_err(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e.to_string()))
}

/// Reads a capture written by [`save`], validating every shape.
pub fn load(path: &Path) -> Result<CapturedModule, LabError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e.to_string()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| file_err(path, format!("not a safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some("gptaq-studio-lab-capture-v1") {
        return Err(file_err(
            path,
            "not a gptaq-studio layer-lab capture (metadata `format` missing)",
        ));
    }
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| file_err(path, e.to_string()))?;
    let get = |name: &str| -> Result<(Vec<usize>, Vec<f32>), LabError> {
        let t = st
            .tensor(name)
            .map_err(|e| file_err(path, format!("tensor `{name}`: {e}")))?;
        if t.dtype() != safetensors::Dtype::F32 {
            return Err(file_err(
                path,
                format!("tensor `{name}` is {:?}, expected F32", t.dtype()),
            ));
        }
        let v = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok((t.shape().to_vec(), v))
    };
    let (ws, w) = get("w")?;
    let [rows, cols] = ws[..] else {
        return Err(file_err(
            path,
            format!("tensor `w` has shape {ws:?}, expected 2-D"),
        ));
    };
    let mut sq = Vec::new();
    for name in ["h", "d", "e"] {
        let (s, v) = get(name)?;
        if s != [cols, cols] {
            return Err(file_err(
                path,
                format!("tensor `{name}` has shape {s:?}, expected [{cols}, {cols}]"),
            ));
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(file_err(
                path,
                format!("tensor `{name}` has a non-finite value at {i}"),
            ));
        }
        sq.push(v);
    }
    let parse = |k: &str| -> Result<usize, LabError> {
        meta.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| file_err(path, format!("metadata `{k}` missing or not a number")))
    };
    let module = meta
        .get("module")
        .and_then(|m| ModuleKind::from_short_name(m))
        .ok_or_else(|| file_err(path, "metadata `module` missing or unknown"))?;
    let e = sq.pop().unwrap_or_default();
    let d = sq.pop().unwrap_or_default();
    let h = sq.pop().unwrap_or_default();
    Ok(CapturedModule {
        layer: parse("layer")?,
        module,
        rows,
        cols,
        nsamples: parse("nsamples")?,
        w,
        h,
        d,
        e,
    })
}
