//! Layer lab view: one module of the session's model, GPTQ beside GPTAQ, and the output error as α
//! goes from 0 (GPTQ) to 1. The capture and the re-solves run on the worker (`Command::Lab`).

use egui::RichText;
use egui_plot::{Legend, Line, Plot, PlotPoints};

use super::super::AppState;
use super::super::worker::Command;
use super::UiAction;
use crate::model::ModuleKind;
use crate::quant::Method;

// ASCII only: egui's default font lacks most maths glyphs.
const EXPLAIN: &str = "GPTQ quantizes W column by column and, after each column, spreads that column's \
error over the columns not yet quantized with the inverse Hessian (the OBS update w <- w - e*U_j/U_jj), \
lazily in blocks: inside a block as rank-1 updates, across blocks as one GEMM. Its objective is \
||(W-Q) Xq^T||^2, the quantization error: it only sees the inputs of the already quantized model. \
GPTAQ (arXiv 2504.02692) minimises ||Q Xq^T - W Xfp^T||^2, the output error against the FP model: the \
update gains the term P = alpha * triu1(D U^T) U with D = 2/N (Xfp - Xq)^T Xq (paper eq. 7; \
algorithm.md 2.2), which also corrects the asymmetry error the module inherits from earlier layers. \
alpha = 0 is GPTQ; larger alpha trades a higher quantization error for a lower output error.";

pub fn lab_ui(ui: &mut egui::Ui, st: &mut AppState, out: &mut Vec<UiAction>) {
    let Some(session) = st.session.as_ref() else {
        ui.label("Run a quantization first: the lab captures a module from its model and calibration windows.");
        return;
    };
    let layers = session
        .runs
        .iter()
        .map(|r| r.layers)
        .max()
        .unwrap_or(1)
        .max(1);
    let finished = !session.is_active();
    ui.label(RichText::new(EXPLAIN).small());
    ui.separator();
    ui.horizontal(|ui| {
        ui.label("layer");
        ui.add(egui::DragValue::new(&mut st.lab.layer).range(0..=layers - 1));
        egui::ComboBox::from_label("module")
            .selected_text(st.lab.module.short_name())
            .show_ui(ui, |ui| {
                for m in ModuleKind::ALL {
                    ui.selectable_value(&mut st.lab.module, m, m.short_name());
                }
            });
        ui.add(egui::Slider::new(&mut st.lab.alpha, 0.0..=1.0).text("alpha"))
            .on_hover_text("GPTAQ shrinkage of the asymmetry correction; 0 = GPTQ");
        let can = finished && !st.lab.busy;
        if ui
            .add_enabled(can, egui::Button::new("Capture & solve"))
            .on_hover_text(
                "bits, groups, act-order, damping and block size come from the settings panel",
            )
            .clicked()
        {
            st.lab.busy = true;
            out.push(UiAction::Send(Command::Lab {
                layer: st.lab.layer,
                module: st.lab.module,
                quant: Box::new(st.settings.quant_config(Method::Gptq)),
                alpha: st.lab.alpha,
            }));
        }
        if st.lab.busy {
            ui.spinner();
        }
    });
    let Some(o) = st.lab.outcome.as_ref() else {
        return;
    };
    ui.label(format!(
        "layer {} {} [{} x {}], {} calibration sequences, solved in {:.2}s",
        o.layer,
        o.module.short_name(),
        o.rows,
        o.cols,
        o.nsamples,
        o.secs
    ));
    egui::Grid::new("lab_grid")
        .num_columns(5)
        .striped(true)
        .show(ui, |ui| {
            for h in [
                "method",
                "quant error",
                "asym error",
                "output error",
                "proxy loss",
            ] {
                ui.label(RichText::new(h).strong());
            }
            ui.end_row();
            for (name, m) in [
                ("GPTQ".to_string(), &o.gptq),
                (format!("GPTAQ a={:.2}", o.alpha), &o.gptaq),
            ] {
                ui.label(name);
                ui.label(format!("{:.4e}", m.quant_error));
                ui.label(format!("{:.4e}", m.asym_error));
                ui.label(format!("{:.4e}", m.output_error));
                ui.label(format!("{:.4e}", m.proxy_loss));
                ui.end_row();
            }
        });
    let change = if o.gptq.output_error > 0.0 {
        100.0 * (o.gptaq.output_error / o.gptq.output_error - 1.0)
    } else {
        0.0
    };
    ui.label(format!(
        "GPTAQ changes the output error by {change:+.1}% against GPTQ on the calibration tokens."
    ));
    let pts = |f: fn(&crate::lab::LabMetrics) -> f64| -> PlotPoints<'static> {
        o.sweep
            .iter()
            .map(|(a, m)| [*a, f(m)])
            .collect::<Vec<[f64; 2]>>()
            .into()
    };
    Plot::new("lab_alpha_sweep")
        .legend(Legend::default())
        .height(220.0)
        .x_axis_label("alpha")
        .y_axis_label("relative error")
        .show(ui, |p| {
            p.line(Line::new("output error", pts(|m| m.output_error)));
            p.line(Line::new("quant error", pts(|m| m.quant_error)));
            p.line(Line::new("asym error (inherited)", pts(|m| m.asym_error)));
        });
}
