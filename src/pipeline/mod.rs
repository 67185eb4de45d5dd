//! Layer-by-layer quantization driver (algorithm.md §1.4, §2.3, §6.0).
//!
//! [`run`] takes a [`Job`] (model, calibration, settings), emits [`Event`]s as it goes and returns a
//! [`QuantizedModel`] (the solver's codes/scales/zeros for every module plus the run report). It
//! writes nothing to disk: exporting is a separate step, so a cancelled or failed run leaves no
//! partial output behind.

pub mod driver;
pub mod events;
pub mod metrics;
pub mod plan;
pub mod stream;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

pub use events::{Event, LayerReport, MemoryPlan, ModuleReport, RunReport};
pub use stream::StreamDType;

use crate::calib::{CalibSet, CalibSource, calibration_windows};
use crate::gpu::GpuContext;
use crate::model::synthetic::SyntheticModel;
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::SafetensorsModel;
use crate::model::{ModuleKind, WeightSource};
use crate::quant::{QuantConfig, QuantResult};

/// Where the model comes from.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ModelInput {
    /// A Hugging Face model directory (config.json + safetensors + tokenizer.json).
    Dir(PathBuf),
    /// The built-in synthetic Llama-shaped model, generated from a seed (no download needed).
    Demo { seed: u64 },
}

/// Where the calibration windows come from.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum CalibInput {
    /// .txt, .jsonl, .parquet or pre-tokenized .safetensors.
    File(PathBuf),
    /// Random token ids (used with the demo model).
    Synthetic,
}

/// Which implementation solves each module.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Solver {
    /// WGSL sweep on the GPU (the default).
    #[default]
    Gpu,
    /// The f64 CPU reference (slow; for verification and tiny models).
    CpuReference,
}

/// Settings of a run besides the quantizer's.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PipelineConfig {
    pub quant: QuantConfig,
    pub nsamples: usize,
    pub seqlen: usize,
    pub seed: u64,
    /// Measure the quantization / asymmetry / output errors (GPTQ and RTN then run the FP stream
    /// too; GPTAQ runs it anyway and without metrics only skips the measurements).
    pub metrics: bool,
    /// Element type of host-spilled streams.
    pub stream_dtype: StreamDType,
    /// GPU memory the run may use (the planner refuses runs that exceed it).
    pub gpu_budget_bytes: u64,
    /// Keep streams on the host even when they fit on the GPU.
    pub force_host_streams: bool,
    pub solver: Solver,
    /// Measure every module's metrics from `X·Wᵀ` products on the calibration tokens
    /// (`Y_w` per batch: one more GEMM per module and batch) even where the group statistics
    /// give the quantization and cross terms (GPTAQ's `H` and `D`; pipeline::metrics).
    #[serde(default)]
    pub metric_products: bool,
    /// Spend no spare GPU memory on speed, even where the plan has room: recompute the MLP
    /// activations for down_proj's outputs instead of keeping them from the stage that computed
    /// them (MemoryPlan::act_streams), and upload each layer's weights when it starts instead of
    /// during the previous layer's last stage (MemoryPlan::weights_ahead). For memory experiments and
    /// the tests that compare both ways.
    #[serde(default)]
    pub lean_memory: bool,
    /// Run the linears of the calibration forward and the statistics on tensor cores where the
    /// adapter grants f16 cooperative matrices (`forward::GpuLayer::enable_tensor_cores`,
    /// `gemm_coop.wgsl`): f16 operands, f32 accumulation, as the reference's half-precision
    /// forward. Ignored, with a warning, elsewhere. Also set by `GPTAQ_TENSOR_CORES=1`. GPTAQ's
    /// solve then also computes its `A = α·triu₁(D·Uᵀ)` from split-f16 operands
    /// (`quant::gpu::SolveFlags::split_f16`: each f32 operand as two halves, three products;
    /// near f32's accuracy) where the width is a multiple of 128, and its pending flushes
    /// (`quant::flush`) where rows and width are.
    #[serde(default)]
    pub tensor_cores: bool,
    /// Time every GPU dispatch of this run (`gpu::timing`): GPU seconds per scope and kernel, the
    /// GPU's idle time and the host's time in GPU calls, per layer and for the run in the report
    /// (`LayerReport::kernel_times`). Also on for every run with `GPTAQ_KERNEL_TIMES=1`.
    #[serde(default)]
    pub kernel_times: bool,
    /// Stop at this (layer, module) and return its statistics instead of solving it (layer lab).
    #[serde(skip)]
    pub capture: Option<(usize, ModuleKind)>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            quant: QuantConfig::default(),
            nsamples: 128,
            seqlen: 2048,
            seed: 0,
            metrics: true,
            stream_dtype: StreamDType::F32,
            gpu_budget_bytes: 8 << 30,
            force_host_streams: false,
            solver: Solver::Gpu,
            metric_products: false,
            lean_memory: false,
            tensor_cores: false,
            kernel_times: false,
            capture: None,
        }
    }
}

impl PipelineConfig {
    /// Whether the run measures the error metrics: when asked for, and always for a layer-lab
    /// capture.
    pub(crate) fn measures_metrics(&self) -> bool {
        self.metrics || self.capture.is_some()
    }
}

/// A complete run request.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Job {
    pub model: ModelInput,
    pub calib: CalibInput,
    pub config: PipelineConfig,
}

/// The result of a finished run: everything export and evaluation need.
pub struct QuantizedModel {
    /// Codes, scales, zeros and losses per module; `q` is left empty (an 8B model's f32 Q would
    /// be 28 GB of host memory): [`QuantResult::weights`] rebuilds a module's Q exactly.
    pub modules: BTreeMap<(usize, ModuleKind), QuantResult>,
    pub report: RunReport,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error("{0}")]
    Input(String),
    #[error("layer {layer} {module}: {message}")]
    Module {
        layer: usize,
        module: String,
        message: String,
    },
    #[error("cancelled")]
    Cancelled,
    /// Internal: the configured capture point was reached ([`capture`] turns this into `Ok`).
    #[error("stopped at the capture point (layer {}, {})", .0.layer, .0.module.short_name())]
    Captured(Box<CapturedModule>),
}

/// One module's solve inputs, captured from a real run for the layer lab: re-solving it with any
/// settings reproduces what the pipeline would have done at that point, and every error metric is
/// exact from these n×n matrices (X rows are calibration tokens, N sequences, ΔX = X_fp − X_q):
/// `H = 2/N·X_qᵀX_q`, `D = 2/N·ΔXᵀX_q`, `E = 2/N·ΔXᵀΔX`, so with ΔW = W − Q
/// - ‖ΔW X_qᵀ‖² = N/2·tr(ΔW H ΔWᵀ),
/// - ‖W ΔXᵀ‖² = N/2·tr(W E Wᵀ),
/// - ‖Q X_qᵀ − W X_fpᵀ‖² = ‖ΔW X_qᵀ + W ΔXᵀ‖² = N/2·tr(ΔW H ΔWᵀ + W E Wᵀ + 2·ΔW Dᵀ Wᵀ),
/// - ‖W X_fpᵀ‖² = N/2·tr(W (H + D + Dᵀ + E) Wᵀ).
#[derive(Clone, Debug)]
pub struct CapturedModule {
    pub layer: usize,
    pub module: ModuleKind,
    pub rows: usize,
    pub cols: usize,
    pub nsamples: usize,
    /// Original weights `[rows, cols]`.
    pub w: Vec<f32>,
    pub h: Vec<f32>,
    pub d: Vec<f32>,
    pub e: Vec<f32>,
}

/// Runs the pipeline on `inputs` up to `(layer, module)` (earlier modules quantized with
/// `config`'s method) and returns that module's statistics.
pub fn capture(
    ctx: &GpuContext,
    inputs: &Inputs,
    config: &PipelineConfig,
    layer: usize,
    module: ModuleKind,
    emit: &mut dyn FnMut(Event),
    cancel: &AtomicBool,
) -> Result<CapturedModule, PipelineError> {
    let layers = inputs.source.config().num_layers;
    if layer >= layers {
        return Err(PipelineError::Input(format!(
            "layer {layer} does not exist (the model has {layers})"
        )));
    }
    let mut cfg = config.clone();
    cfg.capture = Some((layer, module));
    match run_prepared(ctx, inputs, &cfg, emit, cancel) {
        Err(PipelineError::Captured(c)) => Ok(*c),
        Err(e) => Err(e),
        Ok(_) => Err(PipelineError::Input(format!(
            "capture point layer {layer} {} was not reached",
            module.short_name()
        ))),
    }
}

/// A model and calibration set resolved from a [`Job`], kept so that a side-by-side comparison can
/// run twice on exactly the same windows.
pub struct Inputs {
    pub source: Box<dyn WeightSource>,
    pub model_name: String,
    pub calib: CalibSet,
}

/// Opens the model and samples the calibration windows of `job`.
pub fn prepare(job: &Job) -> Result<Inputs, PipelineError> {
    let c = &job.config;
    match &job.model {
        ModelInput::Demo { seed } => {
            let model = SyntheticModel::new(*seed);
            let vocab = model.config().vocab_size;
            let calib = match &job.calib {
                CalibInput::Synthetic => CalibSet::synthetic(vocab, c.nsamples, c.seqlen, c.seed),
                CalibInput::File(p) => {
                    return Err(PipelineError::Input(format!(
                        "the synthetic demo model has no tokenizer; it calibrates on synthetic tokens, not {}",
                        p.display()
                    )));
                }
            };
            Ok(Inputs {
                model_name: model.describe(),
                source: Box::new(model),
                calib,
            })
        }
        ModelInput::Dir(dir) => {
            let model =
                SafetensorsModel::open(dir).map_err(|e| PipelineError::Input(e.to_string()))?;
            let calib = match &job.calib {
                CalibInput::Synthetic => {
                    CalibSet::synthetic(model.config().vocab_size, c.nsamples, c.seqlen, c.seed)
                }
                CalibInput::File(p) => {
                    let src =
                        CalibSource::open(p).map_err(|e| PipelineError::Input(e.to_string()))?;
                    // Pre-tokenized input needs no tokenizer; text does.
                    let tok = match Tokenizer::from_dir(dir) {
                        Ok(t) => Some(t),
                        Err(e) if src.kind() != crate::calib::CalibKind::PreTokenized => {
                            return Err(PipelineError::Input(e.to_string()));
                        }
                        Err(_) => None,
                    };
                    calibration_windows(&src, tok.as_ref(), c.nsamples, c.seqlen, c.seed)
                        .map_err(|e| PipelineError::Input(e.to_string()))?
                }
            };
            Ok(Inputs {
                model_name: dir.display().to_string(),
                source: Box::new(model),
                calib,
            })
        }
    }
}

/// Runs `job` on `ctx`, calling `emit` with every progress event (the last one is `Finished`,
/// `Failed` or `Cancelled`). `cancel` is polled between batches and modules.
pub fn run(
    ctx: &GpuContext,
    job: &Job,
    emit: &mut dyn FnMut(Event),
    cancel: &AtomicBool,
) -> Result<QuantizedModel, PipelineError> {
    let result =
        prepare(job).and_then(|inputs| run_prepared(ctx, &inputs, &job.config, emit, cancel));
    match &result {
        Ok(q) => emit(Event::Finished(Box::new(q.report.clone()))),
        Err(PipelineError::Cancelled) => emit(Event::Cancelled),
        Err(e) => emit(Event::Failed(e.to_string())),
    }
    result
}

/// Runs the driver on already prepared inputs (no terminal event is emitted).
pub fn run_prepared(
    ctx: &GpuContext,
    inputs: &Inputs,
    config: &PipelineConfig,
    emit: &mut dyn FnMut(Event),
    cancel: &AtomicBool,
) -> Result<QuantizedModel, PipelineError> {
    let prep = driver::Prepared {
        source: inputs.source.as_ref(),
        model_name: inputs.model_name.clone(),
        windows: &inputs.calib.windows,
        calibration: inputs.calib.description.clone(),
        device: format!("{} ({})", ctx.summary.name, ctx.summary.backend),
    };
    // Kernel timing for this run only (the context outlives it in the GUI's worker).
    let timing_before = ctx.kernel_timing();
    if config.kernel_times && !ctx.set_kernel_timing(true) {
        emit(Event::Warning(
            "kernel times: this adapter has no TIMESTAMP_QUERY, so the run is not timed".into(),
        ));
    }
    let out = driver::quantize(ctx, &prep, config, emit, cancel);
    ctx.set_kernel_timing(timing_before);
    out
}
