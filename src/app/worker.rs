//! The worker thread: it owns its own wgpu device and the pipeline, receives typed [`Command`]s
//! from the UI and answers with typed [`WorkerEvent`]s, calling `request_repaint` after each one.
//! The UI thread never waits on it.
//!
//! Eval (FP vs fake-quantized perplexity) and export (GPTQ checkpoint) of a finished run go
//! through `Worker::eval_or_export`; the layer lab through `Worker::lab` (it holds one
//! [`crate::lab::Lab`]: the capture and what its re-solves reuse). Lab studies of large modules
//! run on the worker's GPU context (`lab::Backend::choose`), smaller ones on the exact f64
//! reference; the lab's GPU buffers are released before a run and when the device changes.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use crate::gpu::{AdapterSummary, GpuContext, GpuOptions, list_adapters};
use crate::model::inspect::ModelSummary;
use crate::model::synthetic::SyntheticModel;
use crate::model::weights::SafetensorsModel;
use crate::model::{ModuleKind, WeightSource};
use crate::pipeline::{self, Event, Inputs, Job, ModelInput, PipelineError, QuantizedModel};
use crate::quant::Method;

use super::detail::{SolveInfo, module_detail};
use super::state::{EvalRow, ModelInfo, ModuleDetail, RunSlot, SavedReport};

/// UI → worker.
#[derive(Clone, Debug)]
pub enum Command {
    /// Enumerate adapters (answered by [`WorkerEvent::Adapters`]).
    ListAdapters,
    /// Use another adapter from the next run on (answered by [`WorkerEvent::Device`]).
    SelectAdapter(GpuOptions),
    /// Read a model's summary (answered by [`WorkerEvent::Model`]).
    Inspect(ModelInput),
    /// Quantize. With `compare` the job runs twice on the same windows: GPTQ, then GPTAQ with
    /// `alpha` (the job's own method is ignored).
    Start {
        job: Box<Job>,
        compare: Option<f64>,
    },
    /// Stop the current run at the next batch / module boundary.
    Cancel,
    /// Compute the detail pictures of one module of the last session.
    ModuleDetail {
        slot: RunSlot,
        layer: usize,
        module: ModuleKind,
    },
    LoadReport(PathBuf),
    SaveReport {
        path: PathBuf,
        report: Box<SavedReport>,
    },
    /// Perplexity of the FP and quantized models on a text file.
    Eval {
        text: PathBuf,
        slot: RunSlot,
    },
    /// Write a GPTQ checkpoint of one run of the last session.
    Export {
        out: PathBuf,
        slot: RunSlot,
    },
    /// Layer lab: capture `(layer, module)` from the session's model and calibration windows (the
    /// earlier modules quantized with the session job's method). Answered by `LabCaptured`.
    LabCapture {
        layer: usize,
        module: ModuleKind,
    },
    /// Layer lab: load a capture saved by `lab::save` (no session needed). Answered by
    /// `LabCaptured`.
    LabOpen(PathBuf),
    /// Layer lab: write the held capture (W, H, D, E as safetensors). Answered by `LabSaved`.
    LabSave(PathBuf),
    /// Layer lab: GPTQ beside GPTAQ at `alpha` on capture `capture` (`quant`'s method is ignored).
    /// Answered by `LabSolved`.
    LabSolve {
        capture: u64,
        quant: Box<crate::quant::QuantConfig>,
        alpha: f64,
    },
    /// Layer lab step mode on capture `capture`. Answered by `LabStepped`.
    LabStep {
        capture: u64,
        action: LabStepAction,
    },
    Shutdown,
}

/// Worker → UI.
#[derive(Clone, Debug)]
pub enum WorkerEvent {
    Adapters(Vec<AdapterSummary>),
    /// The device in use, or why none could be opened.
    Device(Result<AdapterSummary, String>),
    Model(Result<Box<ModelInfo>, (ModelInput, String)>),
    /// The model is open and the calibration windows are sampled.
    Prepared {
        model: String,
        calibration: String,
    },
    /// A pipeline event of one run of the session.
    Pipeline {
        slot: RunSlot,
        event: Event,
    },
    /// Every run of the session has ended (see the runs' outcomes).
    SessionEnded,
    /// The session could not start (no device, bad input…).
    SessionFailed(String),
    Detail(Result<Box<ModuleDetail>, String>),
    ReportLoaded {
        path: PathBuf,
        report: Box<SavedReport>,
    },
    ReportSaved(PathBuf),
    EvalDone(Vec<EvalRow>),
    Exported(PathBuf),
    LabCaptured(Result<LabCaptureInfo, String>),
    LabSaved(Result<PathBuf, String>),
    /// `capture` names the capture the answer is about (stale answers are ignored).
    LabSolved {
        capture: u64,
        result: Result<Box<crate::lab::LabStudy>, String>,
    },
    LabStepped {
        capture: u64,
        result: Result<Box<crate::lab::step::StepSnapshot>, String>,
    },
    Error(String),
}

/// The UI's end of the worker.
pub struct WorkerHandle {
    tx: Sender<Command>,
    rx: Receiver<WorkerEvent>,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Starts the worker thread. `repaint` is called after every event it sends.
    pub fn spawn(opts: GpuOptions, repaint: impl Fn() + Send + 'static) -> std::io::Result<Self> {
        let (tx, cmd_rx) = channel();
        let (ev_tx, rx) = channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            opts,
            ctx: None,
            held: None,
            lab: None,
            lab_ids: 0,
            sink: Sink {
                tx: ev_tx,
                repaint: Box::new(repaint),
            },
            cancel: cancel.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("gptaq-worker".into())
            .spawn(move || worker.run(&cmd_rx))?;
        Ok(Self {
            tx,
            rx,
            cancel,
            thread: Some(thread),
        })
    }

    /// Sends a command. `Cancel` takes effect immediately (the worker polls a shared flag).
    pub fn send(&self, cmd: Command) -> Result<(), String> {
        if matches!(cmd, Command::Cancel) {
            self.cancel.store(true, Ordering::Relaxed);
            return Ok(());
        }
        self.tx
            .send(cmd)
            .map_err(|_| "the worker thread has stopped".to_string())
    }

    /// Every event received since the last call.
    pub fn drain(&self) -> Vec<WorkerEvent> {
        self.rx.try_iter().collect()
    }

    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        let _ = self.tx.send(Command::Shutdown);
        // Not joined: a GPU submission in flight must not freeze the closing window.
        self.thread.take();
    }
}

struct Sink {
    tx: Sender<WorkerEvent>,
    repaint: Box<dyn Fn() + Send>,
}

impl Sink {
    fn send(&self, e: WorkerEvent) {
        // The UI may be gone (window closed); nothing to report to then.
        let _ = self.tx.send(e);
        (self.repaint)();
    }
}

/// What the last session left behind: the prepared inputs (for the original weights) and every
/// finished run's quantized model (for detail pictures, eval and export).
struct Held {
    job: Job,
    inputs: Inputs,
    results: Vec<(RunSlot, Method, QuantizedModel)>,
}

/// What the step mode should do.
#[derive(Clone, Debug)]
pub enum LabStepAction {
    /// (Re)start with these settings (method included).
    Start(Box<crate::quant::QuantConfig>),
    Step(crate::lab::step::StepRequest),
}

/// The capture the worker's lab holds.
#[derive(Clone, Debug, PartialEq)]
pub struct LabCaptureInfo {
    /// Changes with every capture or load (answers about older ones are stale).
    pub id: u64,
    pub layer: usize,
    pub module: ModuleKind,
    pub rows: usize,
    pub cols: usize,
    pub nsamples: usize,
    /// Where it came from: the session's model or a file.
    pub source: String,
}

struct Worker {
    /// The layer lab's capture and caches, with the capture's id.
    lab: Option<(u64, crate::lab::Lab)>,
    lab_ids: u64,
    opts: GpuOptions,
    ctx: Option<GpuContext>,
    held: Option<Held>,
    sink: Sink,
    cancel: Arc<AtomicBool>,
}

/// The worker's lab if it holds capture `capture`.
fn lab_for(
    lab: &mut Option<(u64, crate::lab::Lab)>,
    capture: u64,
) -> Result<&mut crate::lab::Lab, String> {
    match lab {
        Some((id, lab)) if *id == capture => Ok(lab),
        Some(_) => Err("the lab holds another capture now".into()),
        None => Err("no capture: capture a module or open one first".into()),
    }
}

/// Reads a model's summary and config (CPU only: safetensors headers and config.json).
pub fn inspect_model(input: &ModelInput) -> Result<ModelInfo, String> {
    match input {
        ModelInput::Demo { seed } => {
            let m = SyntheticModel::new(*seed);
            let summary = ModelSummary::from_store(&m, &m).map_err(|e| e.to_string())?;
            Ok(ModelInfo {
                input: input.clone(),
                summary,
                config: m.config().clone(),
            })
        }
        ModelInput::Dir(dir) => {
            let m = SafetensorsModel::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let summary = ModelSummary::from_safetensors(&m).map_err(|e| e.to_string())?;
            Ok(ModelInfo {
                input: input.clone(),
                summary,
                config: m.config().clone(),
            })
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Worker {
    fn run(mut self, rx: &Receiver<Command>) {
        self.sink
            .send(WorkerEvent::Adapters(list_adapters(&self.opts)));
        self.open_device();
        while let Ok(cmd) = rx.recv() {
            if matches!(cmd, Command::Shutdown) {
                break;
            }
            // A bug in a command handler must not take the whole app down: report it and go on.
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.handle(cmd)));
            if let Err(p) = outcome {
                self.sink.send(WorkerEvent::Error(format!(
                    "internal error in the worker: {}",
                    panic_message(p.as_ref())
                )));
                self.sink.send(WorkerEvent::SessionEnded);
            }
        }
    }

    fn open_device(&mut self) {
        if self.ctx.is_some() {
            return;
        }
        match GpuContext::new(&self.opts) {
            Ok(ctx) => {
                self.sink.send(WorkerEvent::Device(Ok(ctx.summary.clone())));
                self.ctx = Some(ctx);
            }
            Err(e) => self.sink.send(WorkerEvent::Device(Err(e.to_string()))),
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::ListAdapters => self
                .sink
                .send(WorkerEvent::Adapters(list_adapters(&self.opts))),
            Command::SelectAdapter(opts) => {
                self.opts = opts;
                // The lab's GPU buffers belong to the old device.
                if let Some((_, lab)) = &mut self.lab {
                    lab.release_gpu();
                }
                self.ctx = None;
                self.open_device();
            }
            Command::Inspect(input) => {
                let r = inspect_model(&input).map(Box::new).map_err(|e| (input, e));
                self.sink.send(WorkerEvent::Model(r));
            }
            Command::Start { job, compare } => self.start(*job, compare),
            Command::Cancel => self.cancel.store(true, Ordering::Relaxed),
            Command::ModuleDetail {
                slot,
                layer,
                module,
            } => {
                let d = self.detail(slot, layer, module).map(Box::new);
                self.sink.send(WorkerEvent::Detail(d));
            }
            Command::LoadReport(path) => self.sink.send(load_report(&path)),
            Command::SaveReport { path, report } => self.sink.send(save_report(&path, &report)),
            cmd @ (Command::Eval { .. } | Command::Export { .. }) => {
                let e = self.eval_or_export(cmd);
                self.sink.send(e);
            }
            Command::LabCapture { layer, module } => {
                let r = self.lab_capture(layer, module);
                self.sink.send(WorkerEvent::LabCaptured(r));
            }
            Command::LabOpen(path) => {
                let r = crate::lab::load(&path)
                    .map_err(|e| e.to_string())
                    .map(|c| self.hold_capture(c, path.display().to_string()));
                self.sink.send(WorkerEvent::LabCaptured(r));
            }
            Command::LabSave(path) => {
                let r = match &self.lab {
                    Some((_, lab)) => crate::lab::save(lab.capture(), &path)
                        .map(|()| path)
                        .map_err(|e| e.to_string()),
                    None => Err("no capture to save: capture a module or open one first".into()),
                };
                self.sink.send(WorkerEvent::LabSaved(r));
            }
            Command::LabSolve {
                capture,
                quant,
                alpha,
            } => {
                // Large modules on the GPU when the worker has one (lab module docs, "GPU path").
                let ctx = self.ctx.as_ref();
                let result = lab_for(&mut self.lab, capture)
                    .and_then(|lab| {
                        let backend = lab.backend(ctx);
                        lab.study_on(backend, &quant, alpha)
                            .map_err(|e| e.to_string())
                    })
                    .map(Box::new);
                self.sink.send(WorkerEvent::LabSolved { capture, result });
            }
            Command::LabStep { capture, action } => {
                let result = lab_for(&mut self.lab, capture)
                    .and_then(|lab| {
                        match action {
                            LabStepAction::Start(cfg) => lab.step_start(&cfg),
                            LabStepAction::Step(req) => lab.step(req),
                        }
                        .map_err(|e| e.to_string())
                    })
                    .map(Box::new);
                self.sink.send(WorkerEvent::LabStepped { capture, result });
            }
            Command::Shutdown => {}
        }
    }

    fn start(&mut self, job: Job, compare: Option<f64>) {
        self.cancel.store(false, Ordering::Relaxed);
        self.held = None;
        // The run needs the GPU memory more than the lab's cached capture (re-uploaded on demand).
        if let Some((_, lab)) = &mut self.lab {
            lab.release_gpu();
        }
        self.open_device();
        let Some(ctx) = self.ctx.as_ref() else {
            self.sink.send(WorkerEvent::SessionFailed(
                "no GPU device is open (see the adapter section)".into(),
            ));
            return;
        };
        let inputs = match pipeline::prepare(&job) {
            Ok(i) => i,
            Err(e) => {
                self.sink.send(WorkerEvent::SessionFailed(format!(
                    "preparing the run: {e}"
                )));
                return;
            }
        };
        self.sink.send(WorkerEvent::Prepared {
            model: inputs.model_name.clone(),
            calibration: inputs.calib.description.clone(),
        });
        let runs: Vec<(RunSlot, Method)> = match compare {
            Some(alpha) => vec![
                (RunSlot::Gptq, Method::Gptq),
                (RunSlot::Gptaq, Method::Gptaq { alpha }),
            ],
            None => vec![(RunSlot::Single, job.config.quant.method)],
        };
        let mut results = Vec::new();
        let mut lost = false;
        for (slot, method) in runs {
            let mut cfg = job.config.clone();
            cfg.quant.method = method;
            let sink = &self.sink;
            let mut emit = |event: Event| sink.send(WorkerEvent::Pipeline { slot, event });
            match pipeline::run_prepared(ctx, &inputs, &cfg, &mut emit, &self.cancel) {
                Ok(q) => {
                    emit(Event::Finished(Box::new(q.report.clone())));
                    results.push((slot, method, q));
                }
                Err(PipelineError::Cancelled) => {
                    emit(Event::Cancelled);
                    break;
                }
                Err(e) => {
                    lost = matches!(e, PipelineError::Gpu(crate::gpu::GpuError::DeviceLost(_)));
                    emit(Event::Failed(e.to_string()));
                    break;
                }
            }
        }
        if lost {
            // Reopened on the next run.
            if let Some((_, lab)) = &mut self.lab {
                lab.release_gpu();
            }
            self.ctx = None;
        }
        self.held = Some(Held {
            job,
            inputs,
            results,
        });
        self.sink.send(WorkerEvent::SessionEnded);
    }

    fn detail(
        &self,
        slot: RunSlot,
        layer: usize,
        kind: ModuleKind,
    ) -> Result<ModuleDetail, String> {
        let held = self
            .held
            .as_ref()
            .ok_or("module pictures need the run's weights: run the quantization in this session (a loaded report has only the numbers)")?;
        let (_, method, q) = held
            .results
            .iter()
            .find(|(s, _, _)| *s == slot)
            .ok_or_else(|| format!("the {} run did not finish", slot.label()))?;
        let r = q
            .modules
            .get(&(layer, kind))
            .ok_or_else(|| format!("layer {layer} {} was not quantized", kind.short_name()))?;
        let lw = held.inputs.source.layer(layer).map_err(|e| e.to_string())?;
        let nsamples = q
            .report
            .modules
            .iter()
            .find(|m| m.layer == layer && m.module == kind.short_name())
            .map_or(held.job.config.nsamples, |m| m.nsamples);
        let info = SolveInfo {
            method: *method,
            solver: held.job.config.solver,
            maxq: held.job.config.quant.maxq(),
            act_order: held.job.config.quant.act_order,
            nsamples,
        };
        module_detail(
            slot,
            layer,
            kind.short_name(),
            &lw.linear(kind).weight,
            r,
            &info,
        )
        .map_err(|e| e.to_string())
    }

    /// Captures one module from the last session's model and windows.
    fn lab_capture(&mut self, layer: usize, module: ModuleKind) -> Result<LabCaptureInfo, String> {
        let held = self.held.as_ref().ok_or(
            "run a quantization first: the lab captures from its model and calibration windows",
        )?;
        let ctx = self.ctx.as_ref().ok_or("no GPU device is open")?;
        let mut cfg = held.job.config.clone();
        cfg.metrics = true;
        let cap = pipeline::capture(
            ctx,
            &held.inputs,
            &cfg,
            layer,
            module,
            &mut |_| {},
            &self.cancel,
        )
        .map_err(|e| e.to_string())?;
        let source = format!(
            "{} ({})",
            held.inputs.model_name,
            held.job.config.quant.method.name()
        );
        Ok(self.hold_capture(cap, source))
    }

    /// Makes `cap` the lab's capture (a fresh id: answers about the previous one become stale).
    fn hold_capture(
        &mut self,
        cap: crate::pipeline::CapturedModule,
        source: String,
    ) -> LabCaptureInfo {
        self.lab_ids += 1;
        let info = LabCaptureInfo {
            id: self.lab_ids,
            layer: cap.layer,
            module: cap.module,
            rows: cap.rows,
            cols: cap.cols,
            nsamples: cap.nsamples,
            source,
        };
        self.lab = Some((self.lab_ids, crate::lab::Lab::new(cap)));
        info
    }

    /// Evaluation and export of a finished run. `Eval`: perplexity of the FP model and of the run's
    /// fake-quantized overlay on the chosen text (GPTQ protocol, the session's sequence length).
    /// `Export`: the GPTQ checkpoint, written atomically (replacing an existing directory the
    /// user picked in the save dialog). Errors come back as `WorkerEvent::Error`.
    fn eval_or_export(&mut self, cmd: Command) -> WorkerEvent {
        let Some(held) = self.held.as_ref() else {
            return WorkerEvent::Error(
                "run a quantization first (a loaded report has no weights)".into(),
            );
        };
        let model_of = |slot: RunSlot| {
            held.results
                .iter()
                .find(|(s, _, _)| *s == slot)
                .map(|(_, _, q)| q)
        };
        match cmd {
            Command::Eval { text, slot } => {
                let Some(model) = model_of(slot) else {
                    return WorkerEvent::Error(format!("the {} run did not finish", slot.label()));
                };
                let Some(ctx) = self.ctx.as_ref() else {
                    return WorkerEvent::Error("no GPU device is open".into());
                };
                let dir = match &held.job.model {
                    ModelInput::Dir(d) => Some(d.as_path()),
                    ModelInput::Demo { .. } => None,
                };
                let windows = match crate::eval::windows_from_file(
                    dir,
                    &text,
                    held.job.config.seqlen,
                    None,
                ) {
                    Ok(w) => w.windows,
                    Err(e) => return WorkerEvent::Error(format!("evaluation text: {e}")),
                };
                let base = held.inputs.source.as_ref();
                let overlay = crate::eval::Overlay {
                    base,
                    modules: &model.modules,
                };
                let opts = crate::eval::EvalOptions::default();
                let mut rows = Vec::new();
                let sources: [(&str, &dyn crate::model::WeightSource); 2] =
                    [("FP", base), (slot.label(), &overlay)];
                for (label, src) in sources {
                    match crate::eval::perplexity(
                        ctx,
                        src,
                        &windows,
                        &opts,
                        &mut |_, _| {},
                        &self.cancel,
                    ) {
                        Ok(r) => rows.push(EvalRow {
                            label: format!("{label} ({} × {})", r.windows, r.seqlen),
                            perplexity: r.ppl,
                        }),
                        Err(e) => return WorkerEvent::Error(format!("perplexity of {label}: {e}")),
                    }
                }
                WorkerEvent::EvalDone(rows)
            }
            Command::Export { out, slot } => {
                let Some(model) = model_of(slot) else {
                    return WorkerEvent::Error(format!("the {} run did not finish", slot.label()));
                };
                let dir = match &held.job.model {
                    ModelInput::Dir(d) => Some(d.as_path()),
                    ModelInput::Demo { .. } => None,
                };
                let opts = crate::export::ExportOptions {
                    force: true,
                    ..Default::default()
                };
                match crate::export::write_checkpoint(
                    &out,
                    held.inputs.source.as_ref(),
                    dir,
                    model,
                    &opts,
                ) {
                    Ok(summary) => WorkerEvent::Exported(summary.dir),
                    Err(e) => WorkerEvent::Error(format!("export to {}: {e}", out.display())),
                }
            }
            _ => WorkerEvent::Error("internal: not an eval/export command".into()),
        }
    }
}

fn load_report(path: &Path) -> WorkerEvent {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return WorkerEvent::Error(format!("reading {}: {e}", path.display())),
    };
    match serde_json::from_str::<SavedReport>(&text) {
        Ok(r) => WorkerEvent::ReportLoaded {
            path: path.to_path_buf(),
            report: Box::new(r),
        },
        Err(e) => WorkerEvent::Error(format!(
            "{} is not a gptaq-studio run report: {e}",
            path.display()
        )),
    }
}

fn save_report(path: &Path, report: &SavedReport) -> WorkerEvent {
    let json = match serde_json::to_string_pretty(report) {
        Ok(j) => j,
        Err(e) => return WorkerEvent::Error(format!("encoding the report: {e}")),
    };
    match std::fs::write(path, json) {
        Ok(()) => WorkerEvent::ReportSaved(path.to_path_buf()),
        Err(e) => WorkerEvent::Error(format!("writing {}: {e}", path.display())),
    }
}
