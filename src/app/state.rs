//! Plain UI state: the settings form and its validation, and the run tables / plot series reduced
//! from the pipeline's [`Event`] stream. Nothing here touches egui or the GPU, so every reduction is
//! unit-testable with synthetic events.

use std::cmp::Ordering;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::lab::heatmap::Heatmap;
use crate::model::inspect::ModelSummary;
use crate::model::{ModelConfig, ModuleKind};
use crate::pipeline::plan::{self, PlanInput};
use crate::pipeline::{
    CalibInput, Event, Job, LayerReport, MemoryPlan, ModelInput, ModuleReport, PipelineConfig,
    RunReport, Solver, StreamDType,
};
use crate::quant::{Method, QuantConfig};

/// Which run of a session an event or a row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RunSlot {
    /// The only run of a GPTQ, GPTAQ or RTN session.
    Single,
    /// The GPTQ half of a side-by-side comparison.
    Gptq,
    /// The GPTAQ half of a side-by-side comparison.
    Gptaq,
}

impl RunSlot {
    pub fn label(self) -> &'static str {
        match self {
            RunSlot::Single => "run",
            RunSlot::Gptq => "GPTQ",
            RunSlot::Gptaq => "GPTAQ",
        }
    }
}

/// The method selector of the settings panel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MethodChoice {
    Gptq,
    Gptaq,
    Rtn,
    /// GPTQ then GPTAQ on the same calibration windows.
    SideBySide,
}

impl MethodChoice {
    pub const ALL: [MethodChoice; 4] = [
        MethodChoice::Gptaq,
        MethodChoice::Gptq,
        MethodChoice::Rtn,
        MethodChoice::SideBySide,
    ];

    pub fn label(self) -> &'static str {
        match self {
            MethodChoice::Gptq => "GPTQ",
            MethodChoice::Gptaq => "GPTAQ",
            MethodChoice::Rtn => "RTN",
            MethodChoice::SideBySide => "GPTQ vs GPTAQ side by side",
        }
    }

    pub fn tooltip(self) -> &'static str {
        match self {
            MethodChoice::Gptq => {
                "GPTQ: column-by-column rounding with Hessian error feedback on the quantized model's inputs"
            }
            MethodChoice::Gptaq => {
                "GPTAQ: GPTQ plus a correction for the deviation inherited from earlier quantized layers"
            }
            MethodChoice::Rtn => {
                "Round-to-nearest with the same quantizer: no calibration statistics, the baseline"
            }
            MethodChoice::SideBySide => {
                "Runs GPTQ and then GPTAQ on exactly the same calibration windows and overlays their curves"
            }
        }
    }
}

/// Every field of the settings panel, as edited (validated by [`Settings::validate`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub method: MethodChoice,
    pub bits: u32,
    /// Columns per group; -1 = one group per row.
    pub group_size: i64,
    pub act_order: bool,
    pub static_groups: bool,
    pub sym: bool,
    pub damp: f64,
    pub alpha: f64,
    pub block_size: usize,
    pub nsamples: usize,
    pub seqlen: usize,
    pub seed: u64,
    pub mse: bool,
    /// Measure the error metrics (runs the FP stream for GPTQ/RTN too; GPTAQ runs it anyway).
    pub metrics: bool,
    pub gpu_memory_gib: f64,
    pub cpu_solver: bool,
    /// Forward and statistics on tensor cores where the GPU grants them
    /// (`PipelineConfig::tensor_cores`).
    #[serde(default)]
    pub tensor_cores: bool,
    /// Time the run's GPU kernels (`PipelineConfig::kernel_times`): shown under Results.
    #[serde(default)]
    pub kernel_times: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            method: MethodChoice::Gptaq,
            bits: 4,
            group_size: 128,
            act_order: false,
            static_groups: false,
            sym: true,
            damp: 0.01,
            alpha: 0.25,
            block_size: 128,
            nsamples: 128,
            seqlen: 2048,
            seed: 0,
            mse: false,
            metrics: true,
            gpu_memory_gib: 8.0,
            cpu_solver: false,
            tensor_cores: false,
            kernel_times: false,
        }
    }
}

/// The settings field a validation message is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Model,
    Calibration,
    Bits,
    GroupSize,
    StaticGroups,
    Damp,
    Alpha,
    BlockSize,
    NSamples,
    SeqLen,
    GpuMemory,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Issue {
    pub field: Field,
    pub message: String,
}

fn issue(field: Field, message: impl Into<String>) -> Issue {
    Issue {
        field,
        message: message.into(),
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl Settings {
    /// The demo's defaults: small enough to finish in seconds on a software rasteriser.
    pub fn demo() -> Self {
        Self {
            nsamples: 32,
            seqlen: 128,
            group_size: 128,
            ..Self::default()
        }
    }

    /// The quantizer settings of one run with `method`.
    pub fn quant_config(&self, method: Method) -> QuantConfig {
        QuantConfig {
            method,
            bits: self.bits,
            group_size: usize::try_from(self.group_size).ok().filter(|g| *g > 0),
            sym: self.sym,
            act_order: self.act_order,
            static_groups: self.static_groups,
            damp_percent: self.damp,
            block_size: self.block_size,
            mse: self.mse,
            ..QuantConfig::default()
        }
    }

    /// The method of the (first) run; GPTQ for the side-by-side mode.
    pub fn primary_method(&self) -> Method {
        match self.method {
            MethodChoice::Gptq | MethodChoice::SideBySide => Method::Gptq,
            MethodChoice::Gptaq => Method::Gptaq { alpha: self.alpha },
            MethodChoice::Rtn => Method::Rtn,
        }
    }

    /// Whether the run needs the full-precision stream (affects the memory plan).
    pub fn fp_stream(&self) -> bool {
        self.metrics || matches!(self.method, MethodChoice::Gptaq | MethodChoice::SideBySide)
    }

    pub fn pipeline_config(&self, method: Method) -> PipelineConfig {
        PipelineConfig {
            quant: self.quant_config(method),
            nsamples: self.nsamples,
            seqlen: self.seqlen,
            seed: self.seed,
            metrics: self.metrics,
            stream_dtype: StreamDType::F32,
            gpu_budget_bytes: (self.gpu_memory_gib.max(0.0) * (1u64 << 30) as f64) as u64,
            force_host_streams: false,
            solver: if self.cpu_solver {
                Solver::CpuReference
            } else {
                Solver::Gpu
            },
            tensor_cores: self.tensor_cores,
            kernel_times: self.kernel_times,
            ..PipelineConfig::default()
        }
    }

    /// Every problem with the current settings for `model` (empty = ready to start). Mirrors the
    /// CLI's and the driver's checks so the run is never refused after it starts.
    pub fn validate(
        &self,
        model: Option<&ModelInput>,
        calib: Option<&CalibInput>,
        config: Option<&ModelConfig>,
    ) -> Vec<Issue> {
        let mut out = Vec::new();
        match model {
            None => out.push(issue(
                Field::Model,
                "choose a model directory, or press Demo",
            )),
            Some(ModelInput::Demo { .. }) => {
                if let Some(CalibInput::File(p)) = calib {
                    out.push(issue(
                        Field::Calibration,
                        format!(
                            "the demo model has no tokenizer: it calibrates on synthetic tokens, not {}",
                            p.display()
                        ),
                    ));
                }
            }
            Some(ModelInput::Dir(_)) => {
                if calib.is_none() {
                    out.push(issue(
                        Field::Calibration,
                        "choose a calibration file (.txt, .jsonl, .parquet or pre-tokenized .safetensors)",
                    ));
                }
            }
        }
        if ![2, 3, 4, 8].contains(&self.bits) {
            out.push(issue(
                Field::Bits,
                format!("bits must be 2, 3, 4 or 8 (got {})", self.bits),
            ));
        }
        match self.group_size {
            -1 => {
                if self.static_groups {
                    out.push(issue(
                        Field::StaticGroups,
                        "static groups need a group size (not -1)",
                    ));
                }
            }
            g if g > 0 => {
                if let Some(c) = config {
                    let g = g as usize;
                    for m in ModuleKind::ALL {
                        let (_, cols) = c.linear_shape(m);
                        if cols % g != 0 {
                            let hint = self
                                .group_suggestion(c)
                                .map(|s| format!("; {s} divides every layer width"))
                                .unwrap_or_default();
                            out.push(issue(
                                Field::GroupSize,
                                format!(
                                    "group size {g} does not divide the {cols} input features of {}: a GPTQ \
                                     checkpoint needs equal-width groups. Pick a divisor of {cols} or -1 (one \
                                     group per row){hint}",
                                    m.short_name()
                                ),
                            ));
                            break;
                        }
                    }
                }
            }
            g => out.push(issue(
                Field::GroupSize,
                format!("group size must be positive or -1 (got {g})"),
            )),
        }
        if self.damp.is_nan() || self.damp <= 0.0 || self.damp >= 1.0 {
            out.push(issue(
                Field::Damp,
                format!("damping must be in (0, 1) (got {})", self.damp),
            ));
        }
        if matches!(self.method, MethodChoice::Gptaq | MethodChoice::SideBySide)
            && !(0.0..=1.0).contains(&self.alpha)
        {
            out.push(issue(
                Field::Alpha,
                format!("α must be in [0, 1] (got {})", self.alpha),
            ));
        }
        if self.block_size == 0 {
            out.push(issue(Field::BlockSize, "block size must be at least 1"));
        }
        if self.nsamples == 0 {
            out.push(issue(
                Field::NSamples,
                "at least one calibration sequence is needed",
            ));
        }
        if self.seqlen == 0 {
            out.push(issue(Field::SeqLen, "sequence length must be at least 1"));
        } else if let Some(c) = config
            && self.seqlen > c.max_position_embeddings
        {
            out.push(issue(
                Field::SeqLen,
                format!(
                    "sequence length {} exceeds the model's {} positions",
                    self.seqlen, c.max_position_embeddings
                ),
            ));
        }
        if self.gpu_memory_gib.is_nan() || self.gpu_memory_gib <= 0.0 {
            out.push(issue(
                Field::GpuMemory,
                "the GPU memory budget must be positive",
            ));
        }
        out
    }

    /// The largest group size not above the requested one that divides every in-feature width.
    pub fn group_suggestion(&self, c: &ModelConfig) -> Option<usize> {
        let g = ModuleKind::ALL
            .iter()
            .map(|&m| c.linear_shape(m).1)
            .fold(0, gcd);
        let want = usize::try_from(self.group_size).ok().filter(|x| *x > 0)?;
        (1..=want.min(g)).rev().find(|d| g % d == 0)
    }

    /// The job for the first run (the worker derives the second of a side-by-side session).
    pub fn job(
        &self,
        model: Option<&ModelInput>,
        calib: Option<&CalibInput>,
        config: Option<&ModelConfig>,
    ) -> Result<Job, Vec<Issue>> {
        let issues = self.validate(model, calib, config);
        let (Some(model), true) = (model, issues.is_empty()) else {
            return Err(issues);
        };
        let calib = match model {
            ModelInput::Demo { .. } => CalibInput::Synthetic,
            ModelInput::Dir(_) => calib.cloned().unwrap_or(CalibInput::Synthetic),
        };
        Ok(Job {
            model: model.clone(),
            calib,
            config: self.pipeline_config(self.primary_method()),
        })
    }

    /// The memory plan the pipeline will make for these settings on a device with
    /// `max_buffer_bytes` per buffer that grants tensor cores or not.
    pub fn plan(
        &self,
        c: &ModelConfig,
        max_buffer_bytes: u64,
        tensor_cores_granted: bool,
    ) -> Result<MemoryPlan, String> {
        if self.method == MethodChoice::Rtn && !self.fp_stream() {
            return Ok(plan::rtn_direct(
                (self.gpu_memory_gib.max(0.0) * (1u64 << 30) as f64) as u64,
            ));
        }
        let input = self.plan_input(
            c,
            max_buffer_bytes,
            self.tensor_cores && tensor_cores_granted,
        );
        // Where the f16 copies do not fit, the driver runs the f32 kernels, and so does this plan.
        plan::plan_or_without_tensor_cores(&input)
            .map(|(p, _)| p)
            .map_err(|e| e.to_string())
    }

    /// The smallest GPU memory budget, in bytes, at which these settings run (the f32 kernels
    /// where the tensor cores' plan would need more: the driver falls back to them), and the
    /// tensor cores' own where they are asked for and granted. `None` for RTN without metrics
    /// (no calibration forward) or where no budget fits (the plan's error says why).
    pub fn smallest_budget(
        &self,
        c: &ModelConfig,
        max_buffer_bytes: u64,
        tensor_cores_granted: bool,
    ) -> Option<(u64, Option<u64>)> {
        if self.method == MethodChoice::Rtn && !self.fp_stream() {
            return None;
        }
        let least = |tc| {
            plan::smallest_budget_mib(&self.plan_input(c, max_buffer_bytes, tc))
                .ok()
                .map(|mib| mib << 20)
        };
        let f32 = least(false)?;
        let tc = (self.tensor_cores && tensor_cores_granted)
            .then(|| least(true))
            .flatten();
        Some((tc.map_or(f32, |t| t.min(f32)), tc))
    }

    fn plan_input<'c>(
        &self,
        c: &'c ModelConfig,
        max_buffer_bytes: u64,
        tensor_cores: bool,
    ) -> PlanInput<'c> {
        PlanInput {
            config: c,
            nsamples: self.nsamples.max(1),
            seqlen: self.seqlen.max(1),
            fp_stream: self.fp_stream(),
            metrics: self.metrics,
            statistics: if matches!(self.method, MethodChoice::Gptaq | MethodChoice::SideBySide) {
                2
            } else {
                1
            },
            metric_moments: true,
            gpu_budget_bytes: (self.gpu_memory_gib.max(0.0) * (1u64 << 30) as f64) as u64,
            max_buffer_bytes,
            host_dtype: StreamDType::F32,
            force_host: false,
            lean_memory: false,
            tensor_cores,
        }
    }
}

/// What the worker learnt about the selected model.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub input: ModelInput,
    pub summary: ModelSummary,
    pub config: ModelConfig,
}

/// How a run ended (or that it has not).
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Running,
    Finished,
    Failed(String),
    Cancelled,
}

/// One run's table and curves, reduced from its events (or loaded from a report).
#[derive(Clone, Debug)]
pub struct RunData {
    pub slot: RunSlot,
    pub model: String,
    pub method: String,
    pub layers: usize,
    pub modules_per_layer: usize,
    pub plan: Option<MemoryPlan>,
    pub modules: Vec<ModuleReport>,
    pub layer_reports: Vec<LayerReport>,
    pub current_layer: Option<usize>,
    pub status: String,
    pub warnings: Vec<String>,
    pub outcome: Outcome,
    /// The full report once the run finished (or when loaded from a file).
    pub report: Option<RunReport>,
}

/// The error measures plotted over the layer index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Proxy,
    Quant,
    Asym,
    Output,
}

impl Metric {
    pub fn value(self, m: &ModuleReport) -> Option<f64> {
        match self {
            Metric::Proxy => Some(m.proxy_loss),
            Metric::Quant => m.quant_error,
            Metric::Asym => m.asym_error,
            Metric::Output => m.output_error,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Metric::Proxy => "proxy loss",
            Metric::Quant => "quantization error ||(W-Q)X_q||²/||WX_fp||²",
            Metric::Asym => "asymmetry error ||W(X_fp-X_q)||²/||WX_fp||²",
            Metric::Output => "output error ||QX_q-WX_fp||²/||WX_fp||²",
        }
    }
}

impl RunData {
    pub fn new(slot: RunSlot) -> Self {
        Self {
            slot,
            model: String::new(),
            method: String::new(),
            layers: 0,
            modules_per_layer: ModuleKind::ALL.len(),
            plan: None,
            modules: Vec::new(),
            layer_reports: Vec::new(),
            current_layer: None,
            status: String::new(),
            warnings: Vec::new(),
            outcome: Outcome::Running,
            report: None,
        }
    }

    /// Reopens a saved report: the same tables and curves, no recomputation.
    pub fn from_report(slot: RunSlot, r: RunReport) -> Self {
        let status = format!("loaded from a report: {}", finished_status(&r));
        Self {
            slot,
            model: r.model.clone(),
            method: r.method.clone(),
            layers: r
                .layers
                .len()
                .max(r.modules.iter().map(|m| m.layer + 1).max().unwrap_or(0)),
            modules_per_layer: ModuleKind::ALL.len(),
            plan: Some(r.plan.clone()),
            modules: r.modules.clone(),
            layer_reports: r.layers.clone(),
            current_layer: None,
            status,
            warnings: r.warnings.clone(),
            outcome: Outcome::Finished,
            report: Some(r),
        }
    }

    pub fn apply(&mut self, e: Event) {
        match e {
            Event::Started {
                model,
                method,
                layers,
                modules_per_layer,
                plan,
            } => {
                self.model = model;
                self.method = method;
                self.layers = layers;
                self.modules_per_layer = modules_per_layer;
                self.plan = Some(plan);
            }
            Event::Status(s) => self.status = s,
            Event::LayerStarted { layer } => {
                self.current_layer = Some(layer);
                self.status = format!("layer {layer}");
            }
            Event::ModuleDone(m) => {
                self.status = format!("layer {} {} done", m.layer, m.module);
                self.modules.push(m);
            }
            Event::LayerDone(l) => self.layer_reports.push(l),
            Event::Warning(w) => self.warnings.push(w),
            Event::Finished(r) => {
                self.outcome = Outcome::Finished;
                self.status = finished_status(&r);
                self.report = Some(*r);
            }
            Event::Failed(msg) => {
                self.status = format!("failed: {msg}");
                self.outcome = Outcome::Failed(msg);
            }
            Event::Cancelled => {
                self.status = "cancelled".into();
                self.outcome = Outcome::Cancelled;
            }
        }
    }

    pub fn total_modules(&self) -> usize {
        self.layers * self.modules_per_layer
    }

    /// The module currently being solved: the one after the last finished, in pipeline order.
    pub fn current_module(&self) -> Option<(usize, &'static str)> {
        if self.outcome != Outcome::Running {
            return None;
        }
        let layer = self.current_layer?;
        let done = self.modules.iter().filter(|m| m.layer == layer).count();
        ModuleKind::ALL.get(done).map(|k| (layer, k.short_name()))
    }

    /// `(layer, value)` points of `metric` for one module kind, in layer order.
    pub fn series(&self, metric: Metric, kind: ModuleKind) -> Vec<[f64; 2]> {
        let mut pts: Vec<[f64; 2]> = self
            .modules
            .iter()
            .filter(|m| m.kind() == Some(kind))
            .filter_map(|m| metric.value(m).map(|v| [m.layer as f64, v]))
            .collect();
        pts.sort_by(|a, b| a[0].total_cmp(&b[0]));
        pts
    }

    /// `(layer, ||h_q-h_fp||/||h_fp||)` points.
    pub fn hidden_series(&self) -> Vec<[f64; 2]> {
        let mut pts: Vec<[f64; 2]> = self
            .layer_reports
            .iter()
            .filter_map(|l| l.hidden_rel_error.map(|v| [l.layer as f64, v]))
            .collect();
        pts.sort_by(|a, b| a[0].total_cmp(&b[0]));
        pts
    }

    pub fn find(&self, layer: usize, module: &str) -> Option<&ModuleReport> {
        self.modules
            .iter()
            .find(|m| m.layer == layer && m.module == module)
    }
}

/// How a session came to be.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    Live,
    Report(PathBuf),
}

/// The state of a whole session (one run, or the two runs of a comparison).
#[derive(Clone, Debug, PartialEq)]
pub enum Phase {
    /// Opening the model and sampling calibration windows.
    Preparing,
    Running,
    Finished,
    Failed(String),
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct Session {
    pub origin: Origin,
    pub slots: Vec<RunSlot>,
    pub runs: Vec<RunData>,
    pub phase: Phase,
    pub calibration: String,
    pub started: Option<Instant>,
    pub elapsed_secs: f64,
}

impl Session {
    pub fn live(compare: bool) -> Self {
        Self {
            origin: Origin::Live,
            slots: if compare {
                vec![RunSlot::Gptq, RunSlot::Gptaq]
            } else {
                vec![RunSlot::Single]
            },
            runs: Vec::new(),
            phase: Phase::Preparing,
            calibration: String::new(),
            started: Some(Instant::now()),
            elapsed_secs: 0.0,
        }
    }

    pub fn from_report(path: PathBuf, report: SavedReport) -> Self {
        let runs = match report {
            SavedReport::Single(r) => vec![RunData::from_report(RunSlot::Single, *r)],
            SavedReport::Comparison { gptq, gptaq } => vec![
                RunData::from_report(RunSlot::Gptq, *gptq),
                RunData::from_report(RunSlot::Gptaq, *gptaq),
            ],
        };
        let calibration = runs
            .first()
            .and_then(|r| r.report.as_ref())
            .map(|r| r.calibration.clone())
            .unwrap_or_default();
        let elapsed_secs = runs
            .iter()
            .filter_map(|r| r.report.as_ref())
            .map(|r| r.secs)
            .sum();
        Self {
            origin: Origin::Report(path),
            slots: runs.iter().map(|r| r.slot).collect(),
            runs,
            phase: Phase::Finished,
            calibration,
            started: None,
            elapsed_secs,
        }
    }

    pub fn is_comparison(&self) -> bool {
        self.slots.len() > 1
    }

    pub fn is_active(&self) -> bool {
        matches!(self.phase, Phase::Preparing | Phase::Running)
    }

    pub fn run(&self, slot: RunSlot) -> Option<&RunData> {
        self.runs.iter().find(|r| r.slot == slot)
    }

    pub fn apply(&mut self, slot: RunSlot, e: Event) {
        if self.phase == Phase::Preparing {
            self.phase = Phase::Running;
        }
        let i = match self.runs.iter().position(|r| r.slot == slot) {
            Some(i) => i,
            None => {
                self.runs.push(RunData::new(slot));
                self.runs.len() - 1
            }
        };
        let terminal = matches!(e, Event::Failed(_) | Event::Cancelled);
        if let Some(run) = self.runs.get_mut(i) {
            run.apply(e);
            if terminal {
                self.phase = match &run.outcome {
                    Outcome::Failed(m) => Phase::Failed(format!("{}: {m}", slot.label())),
                    _ => Phase::Cancelled,
                };
            }
        }
    }

    /// The worker finished the whole session (every run ended one way or another).
    pub fn end(&mut self) {
        if self.is_active() {
            let all_finished = self
                .slots
                .iter()
                .all(|s| self.run(*s).is_some_and(|r| r.outcome == Outcome::Finished));
            self.phase = if all_finished {
                Phase::Finished
            } else {
                Phase::Failed("the run stopped before every layer was quantized".into())
            };
        }
        if let Some(t) = self.started.take() {
            self.elapsed_secs = t.elapsed().as_secs_f64();
        }
    }

    /// `(done, total)` modules over all runs of the session (total estimated from the first run).
    pub fn progress(&self) -> (usize, usize) {
        let done = self.runs.iter().map(|r| r.modules.len()).sum();
        let per_run = self
            .runs
            .iter()
            .map(RunData::total_modules)
            .max()
            .unwrap_or(0);
        (done, per_run * self.slots.len())
    }

    pub fn elapsed(&self) -> f64 {
        self.started
            .map_or(self.elapsed_secs, |t| t.elapsed().as_secs_f64())
    }

    /// Seconds left at the average pace so far.
    pub fn eta_secs(&self) -> Option<f64> {
        let (done, total) = self.progress();
        if done == 0 || total == 0 || !self.is_active() {
            return None;
        }
        let per = self.elapsed() / done as f64;
        Some(per * (total.saturating_sub(done)) as f64)
    }

    /// The run that is currently producing events.
    pub fn current(&self) -> Option<&RunData> {
        self.runs
            .iter()
            .rev()
            .find(|r| r.outcome == Outcome::Running)
            .or(self.runs.last())
    }

    /// The file form of this session's finished runs.
    pub fn saved_report(&self) -> Option<SavedReport> {
        let rep = |s: RunSlot| self.run(s).and_then(|r| r.report.clone());
        if self.is_comparison() {
            Some(SavedReport::Comparison {
                gptq: Box::new(rep(RunSlot::Gptq)?),
                gptaq: Box::new(rep(RunSlot::Gptaq)?),
            })
        } else {
            rep(RunSlot::Single).map(|r| SavedReport::Single(Box::new(r)))
        }
    }
}

/// A report file: the CLI's `--report` JSON for one run, or both reports of a comparison.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SavedReport {
    Comparison {
        gptq: Box<RunReport>,
        gptaq: Box<RunReport>,
    },
    Single(Box<RunReport>),
}

/// Table columns (also the sort keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Column {
    Layer,
    Module,
    Shape,
    Proxy,
    Quant,
    Asym,
    Output,
    Damp,
    Fallback,
    Secs,
}

impl Column {
    pub const ALL: [Column; 10] = [
        Column::Layer,
        Column::Module,
        Column::Shape,
        Column::Proxy,
        Column::Quant,
        Column::Asym,
        Column::Output,
        Column::Damp,
        Column::Fallback,
        Column::Secs,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Column::Layer => "layer",
            Column::Module => "module",
            Column::Shape => "shape",
            Column::Proxy => "proxy loss",
            Column::Quant => "quant err",
            Column::Asym => "asym err",
            Column::Output => "output err",
            Column::Damp => "damp",
            Column::Fallback => "fallback",
            Column::Secs => "secs",
        }
    }

    pub fn tooltip(self) -> &'static str {
        match self {
            Column::Layer => "Decoder layer index",
            Column::Module => "Linear module inside the layer",
            Column::Shape => "out_features × in_features",
            Column::Proxy => {
                "GPTQ proxy loss Σ(w-q)²/(2U_jj²) per sequence (what the solver minimises)"
            }
            Column::Quant => "||(W-Q)X_q||²/||WX_fp||²: what quantizing this module alone costs",
            Column::Asym => {
                "||W(X_fp-X_q)||²/||WX_fp||²: deviation inherited from earlier quantized modules"
            }
            Column::Output => "||QX_q-WX_fp||²/||WX_fp||²: the module's output versus the FP model",
            Column::Damp => "Relative Hessian damping actually used",
            Column::Fallback => "Why the normal solve was not used, if it was not",
            Column::Secs => "Seconds spent on this module",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableSort {
    pub column: Column,
    pub descending: bool,
}

impl Default for TableSort {
    fn default() -> Self {
        Self {
            column: Column::Layer,
            descending: false,
        }
    }
}

impl TableSort {
    /// Clicking a header sorts by it; clicking it again flips the direction.
    pub fn click(&mut self, c: Column) {
        if self.column == c {
            self.descending = !self.descending;
        } else {
            self.column = c;
            // Errors are most interesting largest-first.
            self.descending = !matches!(c, Column::Layer | Column::Module | Column::Shape);
        }
    }
}

fn module_order(m: &ModuleReport) -> usize {
    m.kind().map_or(usize::MAX, |k| k as usize)
}

fn cmp_opt(a: Option<f64>, b: Option<f64>) -> Ordering {
    match (a, b) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => Ordering::Greater,
        (None, Some(_)) => Ordering::Less,
        (None, None) => Ordering::Equal,
    }
}

/// Row indices of `modules` in display order (ties broken by layer, then pipeline order).
pub fn sorted_rows(modules: &[ModuleReport], sort: TableSort) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..modules.len()).collect();
    let natural = |a: &ModuleReport, b: &ModuleReport| {
        a.layer
            .cmp(&b.layer)
            .then(module_order(a).cmp(&module_order(b)))
    };
    idx.sort_by(|&i, &j| {
        let (Some(a), Some(b)) = (modules.get(i), modules.get(j)) else {
            return Ordering::Equal;
        };
        let primary = match sort.column {
            Column::Layer => natural(a, b),
            Column::Module => module_order(a)
                .cmp(&module_order(b))
                .then(a.layer.cmp(&b.layer)),
            Column::Shape => (a.rows * a.cols).cmp(&(b.rows * b.cols)),
            Column::Proxy => a.proxy_loss.total_cmp(&b.proxy_loss),
            Column::Quant => cmp_opt(a.quant_error, b.quant_error),
            Column::Asym => cmp_opt(a.asym_error, b.asym_error),
            Column::Output => cmp_opt(a.output_error, b.output_error),
            Column::Damp => a.damp.total_cmp(&b.damp),
            Column::Fallback => a.fallback.cmp(&b.fallback),
            Column::Secs => a.secs.total_cmp(&b.secs),
        };
        let primary = if sort.descending {
            primary.reverse()
        } else {
            primary
        };
        primary.then_with(|| natural(a, b))
    });
    idx
}

/// Colour class of an error cell (mapped to colours in one place, `views::palette`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Grade {
    Good,
    Fair,
    Poor,
    Bad,
}

/// Relative squared errors: < 0.1 % good, < 1 % fair, < 5 % poor, above that bad.
pub fn grade_relative(v: f64) -> Grade {
    match v {
        v if v < 1e-3 => Grade::Good,
        v if v < 1e-2 => Grade::Fair,
        v if v < 5e-2 => Grade::Poor,
        _ => Grade::Bad,
    }
}

/// The proxy loss has no absolute scale, so it is graded by rank within its run (quartiles),
/// the way GPTQModel's loss column highlights the worst modules.
pub fn grade_by_rank(values: &[f64], v: f64) -> Grade {
    if values.is_empty() {
        return Grade::Good;
    }
    let below = values.iter().filter(|x| **x < v).count();
    let q = below as f64 / values.len() as f64;
    match q {
        q if q < 0.5 => Grade::Good,
        q if q < 0.75 => Grade::Fair,
        q if q < 0.9 => Grade::Poor,
        _ => Grade::Bad,
    }
}

/// Downsampled per-module pictures computed by the worker from the weights it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleDetail {
    pub slot: RunSlot,
    pub layer: usize,
    pub module: String,
    /// Mean |W| per block.
    pub weight_heat: Heatmap,
    /// Mean |W-Q| per block.
    pub error_heat: Heatmap,
    /// Histogram of w/scale + zero (the weight in units of its group's quantization step).
    pub hist: Vec<u32>,
    pub hist_lo: f64,
    pub hist_hi: f64,
    pub maxq: u32,
    /// ||w_j-q_j||²/||w_j||² per column, in processing order (act-order permutation if any).
    pub column_error: Vec<f32>,
    pub act_order: bool,
    /// diag(H) before damping in processing order (`QuantResult::h_diag`), or why it is missing.
    pub h_diag: Result<Vec<f32>, String>,
    /// diag(H) sorted descending (the spectrum); empty when `h_diag` is missing.
    pub h_spectrum: Vec<f32>,
    /// GPTQ's proxy loss per column in processing order, per calibration sequence
    /// (`QuantResult::column_loss / N`), or why it is missing.
    pub column_loss: Result<Vec<f64>, String>,
}

/// A selected table row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    pub slot: RunSlot,
    pub layer: usize,
    pub module: String,
}

impl Selection {
    /// The label of the row's first cell (unique per run, used by the table and tests).
    pub fn row_label(layer: usize, module: &str) -> String {
        format!("{layer}.{module}")
    }
}

/// One line of the perplexity table.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalRow {
    pub label: String,
    pub perplexity: f64,
}

/// A finished run's status line: its time and what it held on the GPU (the live peak, which the
/// memory plan bounds; the peak with the freed buffers kept for reuse; wgpu's allocator where
/// sampled higher, its upload staging included, which nvidia-smi sees too; the plan's estimate).
/// Reports saved before these were measured show the time only.
fn finished_status(r: &RunReport) -> String {
    use crate::model::inspect::format_bytes;
    let mut line = format!("finished in {:.1} s", r.secs);
    if r.peak_gpu_bytes > 0 {
        line += &format!("; peak GPU memory {}", format_bytes(r.peak_gpu_bytes));
        if r.peak_reserved_bytes > r.peak_gpu_bytes {
            line += &format!(
                " ({} with the buffers kept for reuse)",
                format_bytes(r.peak_reserved_bytes)
            );
        }
        if let Some(a) = r.peak_allocator_bytes
            && a > r.peak_reserved_bytes
        {
            // Upload staging and wgpu's own buffers, which nvidia-smi counts too.
            line += &format!(", wgpu's allocator {}", format_bytes(a));
        }
        if r.plan.gpu_bytes_estimate > 0 {
            line += &format!(", plan {}", format_bytes(r.plan.gpu_bytes_estimate));
        }
    }
    line
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::WeightSource;
    use crate::model::synthetic::SyntheticModel;

    pub fn module(layer: usize, kind: ModuleKind, err: f64) -> ModuleReport {
        ModuleReport {
            layer,
            module: kind.short_name().into(),
            rows: 128,
            cols: 128,
            nsamples: 4,
            damp: 0.01,
            proxy_loss: err * 10.0,
            quant_error: Some(err),
            asym_error: Some(err / 2.0),
            output_error: Some(err * 1.5),
            fallback: None,
            secs: 0.01,
        }
    }

    fn events(layers: usize) -> Vec<Event> {
        let mut v = vec![Event::Started {
            model: "demo".into(),
            method: "gptq".into(),
            layers,
            modules_per_layer: 7,
            plan: MemoryPlan::default(),
        }];
        for l in 0..layers {
            v.push(Event::LayerStarted { layer: l });
            for (i, k) in ModuleKind::ALL.into_iter().enumerate() {
                v.push(Event::ModuleDone(module(
                    l,
                    k,
                    1e-3 * (l + 1) as f64 + i as f64 * 1e-4,
                )));
            }
            v.push(Event::LayerDone(LayerReport {
                layer: l,
                hidden_rel_error: Some(0.01 * (l + 1) as f64),
                secs: 0.1,
                phases: Vec::new(),
                kernel_times: Vec::new(),
            }));
        }
        v
    }

    #[test]
    fn events_fill_table_and_series() {
        let mut s = Session::live(false);
        for e in events(3) {
            s.apply(RunSlot::Single, e);
        }
        assert_eq!(s.phase, Phase::Running);
        let Some(run) = s.run(RunSlot::Single) else {
            panic!("no single run after its events")
        };
        assert_eq!(run.modules.len(), 21);
        assert_eq!(s.progress(), (21, 21));
        let q = run.series(Metric::Quant, ModuleKind::Down);
        assert_eq!(q.len(), 3);
        assert!(q.windows(2).all(|w| w[0][0] < w[1][0]));
        assert_eq!(run.hidden_series().len(), 3);
        assert!(run.find(2, "up_proj").is_some());
        assert!(s.saved_report().is_none(), "no report before Finished");
        s.end();
        assert!(matches!(s.phase, Phase::Failed(_)));
    }

    #[test]
    fn comparison_runs_are_kept_apart_and_saved_together() -> Result<(), Box<dyn std::error::Error>>
    {
        let mut s = Session::live(true);
        for slot in [RunSlot::Gptq, RunSlot::Gptaq] {
            for e in events(2) {
                s.apply(slot, e);
            }
        }
        assert_eq!(s.progress(), (28, 28));
        let report = |method: &str| RunReport {
            model: "demo".into(),
            method: method.into(),
            config: QuantConfig::default(),
            device: "cpu".into(),
            calibration: "synthetic".into(),
            nsamples: 4,
            seqlen: 16,
            seed: 0,
            plan: MemoryPlan::default(),
            modules: vec![module(0, ModuleKind::Q, 1e-3)],
            layers: vec![],
            peak_gpu_bytes: 0,
            peak_reserved_bytes: 0,
            peak_allocator_bytes: None,
            peak_staging_bytes: None,
            kernel_times: Vec::new(),
            secs: 1.0,
            warnings: vec![],
        };
        s.apply(RunSlot::Gptq, Event::Finished(Box::new(report("gptq"))));
        let mut measured = report("gptaq");
        measured.peak_gpu_bytes = 3 << 30;
        measured.peak_reserved_bytes = 5 << 30;
        measured.plan.gpu_bytes_estimate = 4 << 30;
        measured.peak_allocator_bytes = Some(6 << 30);
        s.apply(RunSlot::Gptaq, Event::Finished(Box::new(measured)));
        // The status tells the time and, where measured, the memory.
        assert_eq!(
            (s.runs[0].status.as_str(), s.runs[1].status.as_str()),
            (
                "finished in 1.0 s",
                "finished in 1.0 s; peak GPU memory 3.0 GiB (5.0 GiB with the buffers kept for \
                 reuse), wgpu's allocator 6.0 GiB, plan 4.0 GiB"
            )
        );
        s.end();
        assert_eq!(s.phase, Phase::Finished);
        let Some(saved) = s.saved_report() else {
            panic!("a finished comparison must be savable")
        };
        let json = serde_json::to_string(&saved)?;
        let back: SavedReport = serde_json::from_str(&json)?;
        let re = Session::from_report("x.json".into(), back);
        assert!(re.is_comparison());
        assert_eq!(
            re.run(RunSlot::Gptaq).map(|r| r.method.as_str()),
            Some("gptaq")
        );
        // A single CLI report parses as `Single`.
        let single = serde_json::to_string(&report("gptq"))?;
        let back: SavedReport = serde_json::from_str(&single)?;
        assert!(matches!(back, SavedReport::Single(_)));
        Ok(())
    }

    #[test]
    fn failure_marks_session() {
        let mut s = Session::live(false);
        s.apply(RunSlot::Single, Event::Failed("boom".into()));
        assert!(matches!(&s.phase, Phase::Failed(m) if m.contains("boom")));
    }

    #[test]
    fn sorting() {
        let ms = vec![
            module(1, ModuleKind::Q, 0.5),
            module(0, ModuleKind::K, 0.1),
            module(0, ModuleKind::Q, 0.9),
        ];
        assert_eq!(sorted_rows(&ms, TableSort::default()), vec![2, 1, 0]);
        let mut s = TableSort::default();
        s.click(Column::Quant);
        assert!(s.descending);
        assert_eq!(sorted_rows(&ms, s), vec![2, 0, 1]);
        s.click(Column::Quant);
        assert_eq!(sorted_rows(&ms, s), vec![1, 0, 2]);
    }

    #[test]
    fn grades() {
        assert_eq!(grade_relative(1e-4), Grade::Good);
        assert_eq!(grade_relative(0.2), Grade::Bad);
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(grade_by_rank(&v, 1.0), Grade::Good);
        assert_eq!(grade_by_rank(&v, 4.0), Grade::Poor);
    }

    #[test]
    fn validation_explains_group_size() {
        let demo = SyntheticModel::new(0);
        let c = demo.config().clone();
        let input = ModelInput::Demo { seed: 0 };
        let mut s = Settings::demo();
        assert!(s.validate(Some(&input), None, Some(&c)).is_empty());
        s.group_size = 100;
        let issues = s.validate(Some(&input), None, Some(&c));
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert!(
            issues[0].message.contains("does not divide the 128"),
            "{issues:?}"
        );
        assert_eq!(s.group_suggestion(&c), Some(64));
        s.group_size = 0;
        s.bits = 5;
        s.alpha = 2.0;
        let fields: Vec<Field> = s
            .validate(Some(&input), None, Some(&c))
            .iter()
            .map(|i| i.field)
            .collect();
        assert!(
            fields.contains(&Field::GroupSize)
                && fields.contains(&Field::Bits)
                && fields.contains(&Field::Alpha)
        );
        assert!(s.job(Some(&input), None, Some(&c)).is_err());
        let ok = match Settings::demo().job(Some(&input), None, Some(&c)) {
            Ok(j) => j,
            Err(issues) => panic!("demo settings must validate: {issues:?}"),
        };
        assert_eq!(ok.calib, CalibInput::Synthetic);
        assert!(Settings::demo().plan(&c, 1 << 30, false).is_ok());
        let tc = Settings {
            tensor_cores: true,
            ..Settings::demo()
        };
        // Tensor cores add the f16 copies to the plan only where the device grants them.
        let estimate =
            |s: &Settings, granted| s.plan(&c, 1 << 30, granted).map(|p| p.gpu_bytes_estimate);
        match (
            estimate(&tc, true),
            estimate(&tc, false),
            estimate(&Settings::demo(), false),
        ) {
            (Ok(on), Ok(off), Ok(base)) => assert!(on > off && off == base, "{on} {off} {base}"),
            other => panic!("demo plans: {other:?}"),
        }
        // The smallest budget the view names is one the plan accepts, and a MiB less is not;
        // with tensor cores granted their own is named too, and the run's is the smaller.
        let at = |s: &Settings, bytes: u64| Settings {
            gpu_memory_gib: bytes as f64 / (1u64 << 30) as f64,
            ..s.clone()
        };
        let Some((least, None)) = Settings::demo().smallest_budget(&c, 1 << 30, false) else {
            panic!("demo settings: no smallest budget");
        };
        assert!(
            at(&Settings::demo(), least)
                .plan(&c, 1 << 30, false)
                .is_ok()
        );
        assert!(
            at(&Settings::demo(), least - (1 << 20))
                .plan(&c, 1 << 30, false)
                .is_err()
        );
        match tc.smallest_budget(&c, 1 << 30, true) {
            Some((run, Some(with_tc))) => assert!(run == least.min(with_tc) && with_tc > least),
            other => panic!("tensor cores: {other:?}"),
        }
        let dir = ModelInput::Dir("m".into());
        assert!(
            Settings::demo()
                .validate(Some(&dir), None, Some(&c))
                .iter()
                .any(|i| i.field == Field::Calibration)
        );
    }
}
