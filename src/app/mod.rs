//! The egui desktop application: a view over the pipeline's events.
//!
//! - [`state`]: plain data (settings, validation, run tables and curves) reduced from events;
//!   testable without a GPU or a window.
//! - [`worker`]: the thread that owns the wgpu device and runs the pipeline; typed
//!   [`worker::Command`]s in, typed [`worker::WorkerEvent`]s out.
//! - [`views`]: the `*_ui` functions that draw the state and turn clicks into commands.
//!
//! [`StudioApp::logic`] drains worker events and dropped files (no drawing); [`StudioApp::ui`] only
//! draws. The same two entry points drive the eframe window and the `egui_kittest` tests.

pub mod detail;
pub mod lab;
pub mod state;
pub mod views;
pub mod worker;

use std::path::{Path, PathBuf};

use crate::gpu::{AdapterSummary, GpuOptions};
use crate::pipeline::{CalibInput, ModelInput};

use lab::LabState;
use state::{EvalRow, ModelInfo, ModuleDetail, RunSlot, Selection, Session, Settings, TableSort};
use worker::{Command, WorkerEvent, WorkerHandle};

const STORAGE_KEY: &str = "gptaq-studio";
const RECENT_MAX: usize = 8;

/// The central area's tabs once a session exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tab {
    Table,
    Plots,
    Model,
    Results,
    Lab,
}

/// How loud a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Info,
    Error,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub level: Level,
    pub text: String,
}

/// What the model summary looks like right now.
#[derive(Clone, Debug)]
pub enum ModelView {
    None,
    Loading(ModelInput),
    Ready(Box<ModelInfo>),
    Failed(ModelInput, String),
}

/// Persisted between launches (eframe storage).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Persisted {
    pub recent_models: Vec<PathBuf>,
    pub recent_calib: Vec<PathBuf>,
    pub settings: Option<Settings>,
}

/// Everything the UI shows. Plain data: tests build it, feed it events and inspect it.
pub struct AppState {
    pub settings: Settings,
    pub model: Option<ModelInput>,
    pub calib: Option<CalibInput>,
    pub model_view: ModelView,
    pub adapters: Vec<AdapterSummary>,
    pub device: Option<Result<AdapterSummary, String>>,
    /// A worker is opening the GPU (spinner until `device` is known).
    pub gpu_pending: bool,
    pub session: Option<Session>,
    pub selected: Option<Selection>,
    pub detail: Option<Result<Box<ModuleDetail>, String>>,
    pub sort: TableSort,
    /// Which run the table shows in a comparison.
    pub table_slot: RunSlot,
    pub show_gptq: bool,
    pub show_gptaq: bool,
    /// Plot errors on a log10 axis.
    pub log_scale: bool,
    pub tab: Tab,
    pub messages: Vec<Message>,
    pub recent_models: Vec<PathBuf>,
    pub recent_calib: Vec<PathBuf>,
    pub eval_text: Option<PathBuf>,
    pub export_dir: Option<PathBuf>,
    pub eval_rows: Vec<EvalRow>,
    pub lab: LabState,
}

impl Default for AppState {
    fn default() -> Self {
        Self {
            settings: Settings::default(),
            model: None,
            calib: None,
            model_view: ModelView::None,
            adapters: Vec::new(),
            device: None,
            gpu_pending: false,
            session: None,
            selected: None,
            detail: None,
            sort: TableSort::default(),
            table_slot: RunSlot::Single,
            show_gptq: true,
            show_gptaq: true,
            log_scale: true,
            tab: Tab::Table,
            messages: Vec::new(),
            recent_models: Vec::new(),
            recent_calib: Vec::new(),
            eval_text: None,
            export_dir: None,
            eval_rows: Vec::new(),
            lab: LabState::default(),
        }
    }
}

fn push_recent(list: &mut Vec<PathBuf>, p: &Path) {
    list.retain(|x| x != p);
    list.insert(0, p.to_path_buf());
    list.truncate(RECENT_MAX);
}

impl AppState {
    pub fn info(&mut self, text: impl Into<String>) {
        self.messages.push(Message {
            level: Level::Info,
            text: text.into(),
        });
    }

    pub fn error(&mut self, text: impl Into<String>) {
        self.messages.push(Message {
            level: Level::Error,
            text: text.into(),
        });
    }

    pub fn model_info(&self) -> Option<&ModelInfo> {
        match &self.model_view {
            ModelView::Ready(i) => Some(i),
            _ => None,
        }
    }

    /// Largest buffer the device allows (for the memory plan); 2 GiB until a device is known.
    pub fn max_buffer_bytes(&self) -> u64 {
        match &self.device {
            Some(Ok(d)) => d.max_storage_buffer_binding_size.min(d.max_buffer_size),
            _ => 2 << 30,
        }
    }

    /// Whether the device grants the tensor-core kernels (f16 cooperative matrices); false until a
    /// device is known.
    pub fn tensor_cores_granted(&self) -> bool {
        matches!(&self.device, Some(Ok(d)) if d.tensor_cores_unavailable().is_none())
    }

    /// Why the opened GPU cannot run the tensor-core kernels (`AdapterSummary::
    /// tensor_cores_unavailable`); `None` where it can or no device is known. The settings'
    /// checkbox says so.
    pub fn tensor_cores_unavailable(&self) -> Option<String> {
        match &self.device {
            Some(Ok(d)) => d.tensor_cores_unavailable(),
            _ => None,
        }
    }

    /// What the opened GPU offers the tensor-core option, for the GPU panel: available, or why
    /// `--tensor-cores` runs the f32 kernels here (`AdapterSummary::tensor_cores_unavailable`);
    /// `None` until a device is known.
    pub fn tensor_core_note(&self) -> Option<String> {
        let Some(Ok(d)) = &self.device else {
            return None;
        };
        Some(match d.tensor_cores_unavailable() {
            None => format!(
                "tensor cores: available ({} cooperative matrices)",
                crate::gpu::KERNELS_COOP_CONFIG
            ),
            Some(why) => format!("tensor cores: not here ({why}); the f32 kernels run"),
        })
    }

    /// Selects the demo model (synthetic calibration, demo-sized settings).
    pub fn choose_demo(&mut self) -> Command {
        let input = ModelInput::Demo {
            seed: self.settings.seed,
        };
        let keep = self.settings.method;
        self.settings = Settings {
            method: keep,
            ..Settings::demo()
        };
        self.model = Some(input.clone());
        self.calib = Some(CalibInput::Synthetic);
        self.model_view = ModelView::Loading(input.clone());
        Command::Inspect(input)
    }

    pub fn choose_model_dir(&mut self, dir: PathBuf) -> Command {
        push_recent(&mut self.recent_models, &dir);
        let input = ModelInput::Dir(dir);
        if matches!(self.model, Some(ModelInput::Demo { .. }) | None) {
            self.settings = Settings {
                method: self.settings.method,
                ..Settings::default()
            };
        }
        if matches!(self.calib, Some(CalibInput::Synthetic)) {
            self.calib = None;
        }
        self.model = Some(input.clone());
        self.model_view = ModelView::Loading(input.clone());
        Command::Inspect(input)
    }

    pub fn choose_calib(&mut self, file: PathBuf) {
        push_recent(&mut self.recent_calib, &file);
        self.calib = Some(CalibInput::File(file));
    }

    /// Builds the Start command, or explains why not.
    pub fn start_command(&mut self) -> Option<Command> {
        let config = self.model_info().map(|i| i.config.clone());
        match self
            .settings
            .job(self.model.as_ref(), self.calib.as_ref(), config.as_ref())
        {
            Ok(job) => {
                let compare = (self.settings.method == state::MethodChoice::SideBySide)
                    .then_some(self.settings.alpha);
                self.session = Some(Session::live(compare.is_some()));
                self.selected = None;
                self.detail = None;
                self.eval_rows.clear();
                self.table_slot = if compare.is_some() {
                    RunSlot::Gptaq
                } else {
                    RunSlot::Single
                };
                self.tab = Tab::Table;
                Some(Command::Start {
                    job: Box::new(job),
                    compare,
                })
            }
            Err(issues) => {
                for i in issues {
                    self.error(i.message);
                }
                None
            }
        }
    }

    /// Selects a table row and asks the worker for its pictures (when it holds the weights).
    pub fn select(&mut self, sel: Selection) -> Option<Command> {
        if self.selected.as_ref() == Some(&sel) {
            return None;
        }
        let live = self
            .session
            .as_ref()
            .is_some_and(|s| s.origin == state::Origin::Live && !s.is_active());
        let kind = crate::model::ModuleKind::from_short_name(&sel.module);
        self.detail = None;
        let cmd = match (live, kind) {
            (true, Some(module)) => Some(Command::ModuleDetail {
                slot: sel.slot,
                layer: sel.layer,
                module,
            }),
            _ => None,
        };
        self.selected = Some(sel);
        cmd
    }

    /// Folds one worker event into the state.
    pub fn apply(&mut self, ev: WorkerEvent) {
        match ev {
            WorkerEvent::Adapters(a) => self.adapters = a,
            WorkerEvent::Device(d) => {
                self.gpu_pending = false;
                if let Err(e) = &d {
                    self.error(format!("GPU: {e}"));
                }
                self.device = Some(d);
            }
            WorkerEvent::Model(Ok(info)) => {
                if self.model.as_ref() == Some(&info.input) {
                    self.model_view = ModelView::Ready(info);
                }
            }
            WorkerEvent::Model(Err((input, msg))) => {
                if self.model.as_ref() == Some(&input) {
                    self.error(format!("opening the model: {msg}"));
                    self.model_view = ModelView::Failed(input, msg);
                }
            }
            WorkerEvent::Prepared { calibration, .. } => {
                if let Some(s) = self.session.as_mut() {
                    s.calibration = calibration;
                }
            }
            WorkerEvent::Pipeline { slot, event } => {
                let failed = match &event {
                    crate::pipeline::Event::Failed(m) => Some(m.clone()),
                    _ => None,
                };
                if let Some(s) = self.session.as_mut() {
                    s.apply(slot, event);
                }
                if let Some(m) = failed {
                    self.error(format!("{} run failed: {m}", slot.label()));
                }
            }
            WorkerEvent::SessionEnded => {
                if let Some(s) = self.session.as_mut() {
                    s.end();
                }
            }
            WorkerEvent::SessionFailed(msg) => {
                if let Some(s) = self.session.as_mut() {
                    s.phase = state::Phase::Failed(msg.clone());
                    s.end();
                }
                self.error(msg);
            }
            WorkerEvent::Detail(d) => self.detail = Some(d),
            WorkerEvent::ReportLoaded { path, report } => {
                let s = Session::from_report(path.clone(), *report);
                self.table_slot = s.slots.last().copied().unwrap_or(RunSlot::Single);
                self.session = Some(s);
                self.selected = None;
                self.detail = None;
                self.tab = Tab::Table;
                self.info(format!("loaded {}", path.display()));
            }
            WorkerEvent::ReportSaved(p) => self.info(format!("report saved to {}", p.display())),
            WorkerEvent::EvalDone(rows) => {
                self.eval_rows = rows;
                self.tab = Tab::Results;
            }
            WorkerEvent::Exported(p) => self.info(format!("checkpoint written to {}", p.display())),
            ev @ (WorkerEvent::LabCaptured(_)
            | WorkerEvent::LabSaved(_)
            | WorkerEvent::LabSolved { .. }
            | WorkerEvent::LabStepped { .. }) => self.apply_lab(ev),
            WorkerEvent::Error(m) => self.error(m),
        }
    }

    pub fn persisted(&self) -> Persisted {
        Persisted {
            recent_models: self.recent_models.clone(),
            recent_calib: self.recent_calib.clone(),
            settings: Some(self.settings.clone()),
        }
    }

    pub fn restore(&mut self, p: Persisted) {
        self.recent_models = p.recent_models;
        self.recent_calib = p.recent_calib;
        if let Some(s) = p.settings {
            self.settings = s;
        }
    }
}

/// The application: state plus the worker (spawned on the first frame, when the `egui::Context`
/// for repaints is known).
pub struct StudioApp {
    pub state: AppState,
    worker: Option<WorkerHandle>,
    /// Adapter options for the worker; `None` = headless (tests feed events by hand).
    spawn_with: Option<GpuOptions>,
    /// Commands issued while no worker exists (inspected by tests).
    pub outbox: Vec<Command>,
}

impl StudioApp {
    /// An app that starts its worker thread on the first frame.
    pub fn new(gpu: GpuOptions) -> Self {
        Self {
            state: AppState {
                gpu_pending: true,
                ..AppState::default()
            },
            worker: None,
            spawn_with: Some(gpu),
            outbox: Vec::new(),
        }
    }

    /// An app without a worker: commands collect in [`StudioApp::outbox`], events come from
    /// [`AppState::apply`].
    pub fn headless() -> Self {
        Self {
            state: AppState::default(),
            worker: None,
            spawn_with: None,
            outbox: Vec::new(),
        }
    }

    pub fn send(&mut self, cmd: Command) {
        match &self.worker {
            Some(w) => {
                if let Err(e) = w.send(cmd) {
                    self.state.error(e);
                    if let Some(s) = self.state.session.as_mut() {
                        s.end();
                    }
                }
            }
            None => self.outbox.push(cmd),
        }
    }

    /// Per-frame work without drawing: start the worker, drain its events, take dropped files.
    pub fn logic(&mut self, ctx: &egui::Context) {
        if self.worker.is_none()
            && let Some(opts) = self.spawn_with.take()
        {
            let repaint_ctx = ctx.clone();
            match WorkerHandle::spawn(opts, move || repaint_ctx.request_repaint()) {
                Ok(w) => self.worker = Some(w),
                Err(e) => self
                    .state
                    .error(format!("could not start the worker thread: {e}")),
            }
        }
        if let Some(w) = &self.worker {
            for ev in w.drain() {
                self.state.apply(ev);
            }
            if !w.is_alive() && self.state.session.as_ref().is_some_and(Session::is_active) {
                self.state.error("the worker thread stopped unexpectedly");
                if let Some(s) = self.state.session.as_mut() {
                    s.end();
                }
            }
        }
        let dropped: Vec<PathBuf> = ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        });
        for p in dropped {
            self.open_path(p);
        }
        if self.state.session.as_ref().is_some_and(Session::is_active) {
            // Keep the elapsed time / ETA ticking between events.
            ctx.request_repaint_after(std::time::Duration::from_millis(500));
        }
    }

    /// A dropped or chosen path: a directory is a model, a file a calibration source or a report.
    pub fn open_path(&mut self, p: PathBuf) {
        if p.is_dir() {
            let cmd = self.state.choose_model_dir(p);
            self.send(cmd);
            return;
        }
        let ext = p
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        match ext.as_str() {
            "txt" | "jsonl" | "parquet" | "safetensors" => self.state.choose_calib(p),
            "json" => self.send(Command::LoadReport(p)),
            _ => self.state.error(format!(
                "{}: drop a model folder, a calibration file (.txt, .jsonl, .parquet, .safetensors) or a report (.json)",
                p.display()
            )),
        }
    }

    /// Draws the whole window.
    pub fn ui(&mut self, ui: &mut egui::Ui) {
        let mut cmds = Vec::new();
        views::root_ui(ui, &mut self.state, &mut cmds);
        for c in cmds {
            match c {
                views::UiAction::Send(cmd) => self.send(cmd),
                views::UiAction::Open(p) => self.open_path(p),
            }
        }
    }
}

impl eframe::App for StudioApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        StudioApp::logic(self, ctx);
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        StudioApp::ui(self, ui);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, STORAGE_KEY, &self.state.persisted());
    }
}

/// Opens the desktop window (blocks until it is closed).
pub fn run_app(gpu: GpuOptions) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("gptaq-studio")
            .with_inner_size([1400.0, 900.0])
            .with_min_inner_size([900.0, 600.0])
            .with_drag_and_drop(true),
        ..Default::default()
    };
    eframe::run_native(
        "gptaq-studio",
        options,
        Box::new(move |cc| {
            let mut app = StudioApp::new(gpu);
            if let Some(storage) = cc.storage
                && let Some(p) = eframe::get_value::<Persisted>(storage, STORAGE_KEY)
            {
                app.state.restore(p);
            }
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| e.to_string().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Event;

    #[test]
    fn demo_then_events_then_detail_request() -> Result<(), Box<dyn std::error::Error>> {
        let mut st = AppState::default();
        let cmd = st.choose_demo();
        assert!(matches!(cmd, Command::Inspect(ModelInput::Demo { .. })));
        let Some(model) = st.model.as_ref() else {
            panic!("Demo must select a model")
        };
        let info = worker::inspect_model(model)?;
        st.apply(WorkerEvent::Model(Ok(Box::new(info))));
        assert!(st.model_info().is_some());
        let Some(Command::Start { compare, .. }) = st.start_command() else {
            panic!("demo settings must validate: {:?}", st.messages)
        };
        assert!(compare.is_none());
        st.apply(WorkerEvent::Pipeline {
            slot: RunSlot::Single,
            event: Event::ModuleDone(state::tests::module(0, crate::model::ModuleKind::Q, 1e-3)),
        });
        st.apply(WorkerEvent::SessionEnded);
        let sel = Selection {
            slot: RunSlot::Single,
            layer: 0,
            module: "q_proj".into(),
        };
        assert!(matches!(
            st.select(sel.clone()),
            Some(Command::ModuleDetail { layer: 0, .. })
        ));
        assert!(st.select(sel).is_none(), "same row twice asks once");
        Ok(())
    }

    #[test]
    fn errors_become_messages() {
        let mut st = AppState::default();
        st.settings.group_size = 100;
        assert!(st.start_command().is_none());
        assert!(st.messages.iter().any(|m| m.level == Level::Error));
        st.apply(WorkerEvent::Error("disk full".into()));
        assert!(st.messages.iter().any(|m| m.text == "disk full"));
    }
}
