//! The layer lab's UI state (plain data, no egui): its own quantizer settings, the capture the
//! worker holds, the last GPTQ-vs-GPTAQ study and step snapshot, and which request is in flight.
//! Settings changes turn into re-solves through [`AppState::lab_solve_command`]: one request at a
//! time, the latest settings win, so dragging the α slider never queues up stale solves.

use crate::lab::LabStudy;
use crate::lab::step::{StepRequest, StepSnapshot};
use crate::model::ModuleKind;
use crate::quant::{Method, QuantConfig};

use super::AppState;
use super::state::Settings;
use super::worker::{Command, LabCaptureInfo, LabStepAction, WorkerEvent};

/// The lab's quantizer settings (independent of the run's; initialised from them).
#[derive(Clone, Debug, PartialEq)]
pub struct LabSettings {
    pub bits: u32,
    /// Columns per group; -1 = one group per row.
    pub group_size: i64,
    pub sym: bool,
    pub act_order: bool,
    pub damp: f64,
    pub block_size: usize,
    /// GPTAQ's α (0 = GPTQ).
    pub alpha: f64,
}

impl LabSettings {
    pub fn from_run(s: &Settings) -> Self {
        Self {
            bits: s.bits,
            group_size: s.group_size,
            sym: s.sym,
            act_order: s.act_order,
            damp: s.damp,
            block_size: s.block_size,
            alpha: s.alpha,
        }
    }

    /// The settings of both solves (method GPTQ; GPTAQ adds α).
    pub fn quant_config(&self) -> QuantConfig {
        QuantConfig {
            method: Method::Gptq,
            bits: self.bits,
            group_size: usize::try_from(self.group_size).ok().filter(|g| *g > 0),
            sym: self.sym,
            act_order: self.act_order,
            damp_percent: self.damp,
            block_size: self.block_size.max(1),
            ..QuantConfig::default()
        }
    }
}

impl Default for LabSettings {
    fn default() -> Self {
        Self::from_run(&Settings::default())
    }
}

/// The lab's two pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabPage {
    Compare,
    Step,
}

/// Which method the step mode sweeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepMethod {
    Gptq,
    Gptaq,
}

/// One solve request: the settings and α.
pub type SolveKey = (QuantConfig, f64);

/// Layer-lab state.
#[derive(Clone, Debug)]
pub struct LabState {
    pub layer: usize,
    pub module: ModuleKind,
    pub settings: LabSettings,
    /// Whether `settings` were taken over from a run's settings yet.
    pub settings_from_run: bool,
    pub capture: Option<LabCaptureInfo>,
    /// A capture / open is in flight.
    pub capturing: bool,
    /// The solve in flight.
    pub solving: Option<SolveKey>,
    /// The settings of the last answered solve (success or not: a failing request is not resent).
    pub solved: Option<SolveKey>,
    pub study: Option<Box<LabStudy>>,
    pub page: LabPage,
    pub step_method: StepMethod,
    pub stepping: bool,
    pub step: Option<Box<StepSnapshot>>,
    /// The capture-file path field.
    pub path: String,
    /// The lab is shown without a session (a capture opened from the start screen).
    pub standalone: bool,
}

impl Default for LabState {
    fn default() -> Self {
        Self {
            layer: 0,
            module: ModuleKind::Down,
            settings: LabSettings::default(),
            settings_from_run: false,
            capture: None,
            capturing: false,
            solving: None,
            solved: None,
            study: None,
            page: LabPage::Compare,
            step_method: StepMethod::Gptaq,
            stepping: false,
            step: None,
            path: String::new(),
            standalone: false,
        }
    }
}

impl LabState {
    /// The solve the current settings ask for.
    pub fn wanted(&self) -> SolveKey {
        (self.settings.quant_config(), self.settings.alpha)
    }

    /// Whether the shown study is for other settings than the current ones.
    pub fn outdated(&self) -> bool {
        self.study.is_some() && self.solved.as_ref() != Some(&self.wanted())
    }

    /// The step mode's settings: the lab's, with the chosen method.
    pub fn step_config(&self) -> QuantConfig {
        let method = match self.step_method {
            StepMethod::Gptq => Method::Gptq,
            StepMethod::Gptaq => Method::Gptaq {
                alpha: self.settings.alpha,
            },
        };
        QuantConfig {
            method,
            ..self.settings.quant_config()
        }
    }
}

impl AppState {
    /// The re-solve to send now, if the settings changed since the last answer and nothing is in
    /// flight (marks it in flight).
    pub fn lab_solve_command(&mut self) -> Option<Command> {
        let lab = &mut self.lab;
        let capture = lab.capture.as_ref()?.id;
        let wanted = lab.wanted();
        if lab.capturing || lab.solving.is_some() || lab.solved.as_ref() == Some(&wanted) {
            return None;
        }
        lab.solving = Some(wanted.clone());
        let (quant, alpha) = wanted;
        Some(Command::LabSolve {
            capture,
            quant: Box::new(quant),
            alpha,
        })
    }

    /// A step-mode command (start/reset or a step), unless one is in flight.
    pub fn lab_step_command(&mut self, request: Option<StepRequest>) -> Option<Command> {
        let lab = &mut self.lab;
        let capture = lab.capture.as_ref()?.id;
        if lab.stepping || lab.capturing {
            return None;
        }
        let action = match request {
            None => LabStepAction::Start(Box::new(lab.step_config())),
            Some(r) => LabStepAction::Step(r),
        };
        lab.stepping = true;
        Some(Command::LabStep { capture, action })
    }

    /// Capture `(layer, module)` from the session. The first capture takes the run's quantizer
    /// settings over (later ones keep the lab's own).
    pub fn lab_capture_command(&mut self) -> Option<Command> {
        if self.lab.capturing {
            return None;
        }
        if !self.lab.settings_from_run {
            self.lab.settings = LabSettings::from_run(&self.settings);
            self.lab.settings_from_run = true;
        }
        self.lab.capturing = true;
        Some(Command::LabCapture {
            layer: self.lab.layer,
            module: self.lab.module,
        })
    }

    /// Open a capture file.
    pub fn lab_open_command(&mut self, path: std::path::PathBuf) -> Option<Command> {
        if self.lab.capturing {
            return None;
        }
        self.lab.capturing = true;
        self.lab.path = path.display().to_string();
        Some(Command::LabOpen(path))
    }

    /// Folds a layer-lab event into the state (other events are ignored).
    pub(super) fn apply_lab(&mut self, ev: WorkerEvent) {
        match ev {
            WorkerEvent::LabCaptured(Ok(info)) => {
                let lab = &mut self.lab;
                lab.capturing = false;
                lab.layer = info.layer;
                lab.module = info.module;
                lab.solving = None;
                lab.solved = None;
                lab.study = None;
                lab.step = None;
                lab.stepping = false;
                // Block sizes beyond the module's width act as one block: keep the field honest.
                lab.settings.block_size = lab.settings.block_size.clamp(1, info.cols.max(1));
                if self.session.is_none() {
                    lab.standalone = true;
                }
                let text = format!(
                    "layer lab: layer {} {} [{} x {}] from {}",
                    info.layer,
                    info.module.short_name(),
                    info.rows,
                    info.cols,
                    info.source
                );
                self.lab.capture = Some(info);
                self.info(text);
            }
            WorkerEvent::LabCaptured(Err(e)) => {
                self.lab.capturing = false;
                self.error(format!("layer lab: {e}"));
            }
            WorkerEvent::LabSaved(Ok(p)) => {
                self.lab.path = p.display().to_string();
                self.info(format!("layer lab: capture saved to {}", p.display()));
            }
            WorkerEvent::LabSaved(Err(e)) => self.error(format!("layer lab: saving: {e}")),
            WorkerEvent::LabSolved { capture, result } => {
                if self.lab.capture.as_ref().map(|c| c.id) != Some(capture) {
                    return;
                }
                self.lab.solved = self.lab.solving.take();
                match result {
                    Ok(s) => self.lab.study = Some(s),
                    Err(e) => self.error(format!("layer lab: {e}")),
                }
            }
            WorkerEvent::LabStepped { capture, result } => {
                if self.lab.capture.as_ref().map(|c| c.id) != Some(capture) {
                    return;
                }
                self.lab.stepping = false;
                match result {
                    Ok(s) => self.lab.step = Some(s),
                    Err(e) => self.error(format!("layer lab step mode: {e}")),
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u64) -> LabCaptureInfo {
        LabCaptureInfo {
            id,
            layer: 2,
            module: ModuleKind::O,
            rows: 16,
            cols: 32,
            nsamples: 4,
            source: "test".into(),
        }
    }

    /// Settings changes become one solve at a time; the latest settings win; stale answers of an
    /// older capture are ignored.
    #[test]
    fn solves_follow_the_settings_one_at_a_time() -> Result<(), String> {
        let mut st = AppState::default();
        assert!(st.lab_solve_command().is_none(), "no capture, no solve");
        st.apply_lab(WorkerEvent::LabCaptured(Ok(info(1))));
        assert!(st.lab.standalone && st.lab.settings.block_size == 32);
        let Some(Command::LabSolve {
            capture: 1, alpha, ..
        }) = st.lab_solve_command()
        else {
            return Err("a capture asks for its first solve".into());
        };
        assert_eq!(alpha, st.lab.settings.alpha);
        // Dragging alpha while the first solve runs sends nothing yet.
        st.lab.settings.alpha = 0.7;
        assert!(st.lab_solve_command().is_none());
        st.lab.settings.alpha = 0.9;
        // The first answer (a failure, for alpha 0.25) is reported; 0.9 goes out next.
        st.apply_lab(WorkerEvent::LabSolved {
            capture: 1,
            result: Err("boom".into()),
        });
        assert!(st.messages.iter().any(|m| m.text.contains("boom")));
        let Some(Command::LabSolve { alpha, .. }) = st.lab_solve_command() else {
            return Err("changed settings ask again".into());
        };
        assert_eq!(alpha, 0.9);
        // A failed request is not resent in a loop.
        st.apply_lab(WorkerEvent::LabSolved {
            capture: 1,
            result: Err("again".into()),
        });
        assert!(st.lab_solve_command().is_none());
        // A new capture: stale answers about capture 1 are ignored.
        st.apply_lab(WorkerEvent::LabCaptured(Ok(info(2))));
        assert!(st.lab_solve_command().is_some());
        st.apply_lab(WorkerEvent::LabSolved {
            capture: 1,
            result: Err("stale".into()),
        });
        assert!(
            st.lab.solving.is_some(),
            "stale answer must not end the new solve"
        );
        assert!(!st.messages.iter().any(|m| m.text.contains("stale")));
        // Step commands: one in flight at a time.
        assert!(st.lab_step_command(None).is_some());
        assert!(st.lab_step_command(Some(StepRequest::NextColumn)).is_none());
        Ok(())
    }
}
