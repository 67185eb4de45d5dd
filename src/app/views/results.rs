//! Results: perplexity (FP vs quantized), export, and the run report file.

use egui::RichText;

use super::super::AppState;
use super::super::state::RunSlot;
use super::super::worker::Command;
use super::{UiAction, fmt_secs, palette};

pub fn results_ui(ui: &mut egui::Ui, st: &mut AppState, out: &mut Vec<UiAction>) {
    let Some(session) = st.session.as_ref() else {
        return;
    };
    let finished = !session.is_active();
    let live = session.origin == super::super::state::Origin::Live;
    let slots = session.slots.clone();
    ui.heading("Summary");
    egui::Grid::new("summary_grid")
        .num_columns(5)
        .striped(true)
        .show(ui, |ui| {
            for h in [
                "run",
                "modules",
                "mean output err",
                "last hidden dev",
                "secs",
            ] {
                ui.label(RichText::new(h).strong());
            }
            ui.end_row();
            for r in &session.runs {
                ui.label(format!("{} ({})", r.slot.label(), r.method));
                ui.label(format!("{}/{}", r.modules.len(), r.total_modules()));
                let outs: Vec<f64> = r.modules.iter().filter_map(|m| m.output_error).collect();
                ui.label(if outs.is_empty() {
                    "–".into()
                } else {
                    format!("{:.3e}", outs.iter().sum::<f64>() / outs.len() as f64)
                });
                ui.label(
                    r.hidden_series()
                        .last()
                        .map_or_else(|| "–".into(), |p| format!("{:.4}", p[1])),
                );
                ui.label(
                    r.report
                        .as_ref()
                        .map_or_else(|| "–".into(), |x| fmt_secs(x.secs)),
                );
                ui.end_row();
            }
        });
    gpu_time_ui(ui, session);
    ui.add_space(8.0);
    let mut slot = if slots.len() > 1 {
        st.table_slot
    } else {
        RunSlot::Single
    };
    if slots.len() > 1 {
        ui.horizontal(|ui| {
            ui.label("Evaluate / export:");
            ui.selectable_value(&mut slot, RunSlot::Gptq, "GPTQ model");
            ui.selectable_value(&mut slot, RunSlot::Gptaq, "GPTAQ model");
        });
        st.table_slot = slot;
    }
    let enabled = finished && live;
    if !live {
        ui.label("A loaded report has no weights: run the quantization to evaluate or export.");
    }
    ui.heading("Perplexity");
    ui.horizontal(|ui| {
        if ui
            .button("Evaluation text…")
            .on_hover_text("A held-out text (e.g. wikitext-2 test) for perplexity")
            .clicked()
            && let Some(f) = rfd::FileDialog::new()
                .add_filter("text", &["txt", "jsonl", "parquet"])
                .pick_file()
        {
            st.eval_text = Some(f);
        }
        ui.label(
            st.eval_text
                .as_ref()
                .map_or_else(|| "no file".into(), |p| p.display().to_string()),
        );
    });
    let can_eval = enabled && st.eval_text.is_some();
    if ui
        .add_enabled(can_eval, egui::Button::new("Evaluate perplexity"))
        .on_hover_text("Perplexity of the FP and the quantized model on the chosen text")
        .clicked()
        && let Some(text) = st.eval_text.clone()
    {
        out.push(UiAction::Send(Command::Eval { text, slot }));
    }
    if !st.eval_rows.is_empty() {
        egui::Grid::new("eval_rows")
            .num_columns(2)
            .striped(true)
            .show(ui, |ui| {
                ui.label(RichText::new("model").strong());
                ui.label(RichText::new("perplexity").strong());
                ui.end_row();
                for r in &st.eval_rows {
                    ui.label(&r.label);
                    ui.label(format!("{:.3}", r.perplexity));
                    ui.end_row();
                }
            });
    }
    ui.add_space(8.0);
    ui.heading("Export");
    ui.horizontal(|ui| {
        if ui
            .button("Output folder…")
            .on_hover_text("Where to write the GPTQ checkpoint (config, safetensors, tokenizer)")
            .clicked()
            && let Some(d) = rfd::FileDialog::new().pick_folder()
        {
            st.export_dir = Some(d);
        }
        ui.label(
            st.export_dir
                .as_ref()
                .map_or_else(|| "no folder".into(), |p| p.display().to_string()),
        );
    });
    if ui
        .add_enabled(
            enabled && st.export_dir.is_some(),
            egui::Button::new("Export checkpoint"),
        )
        .on_hover_text("Write a GPTQ checkpoint loadable by transformers / vLLM")
        .clicked()
        && let Some(out_dir) = st.export_dir.clone()
    {
        out.push(UiAction::Send(Command::Export { out: out_dir, slot }));
    }
    if !finished {
        ui.colored_label(
            palette::INFO,
            "Evaluation and export unlock when the run has finished.",
        );
    }
}

/// Where each run's GPU time went, for runs timed with "Time GPU kernels" (`--kernel-times`,
/// `gpu::timing`): GPU milliseconds per scope (the forward, the statistics, the factor, P, the
/// sweep, …), the GPU's idle time between submissions and the host's time in GPU calls, and the
/// kernels that took longest.
fn gpu_time_ui(ui: &mut egui::Ui, session: &super::super::state::Session) {
    use crate::gpu::timing::{HOST, IDLE, is_pseudo, pseudo_total, scope_totals};
    let timed: Vec<_> = session
        .runs
        .iter()
        .filter_map(|r| {
            let rep = r.report.as_ref()?;
            (!rep.kernel_times.is_empty()).then_some((r, rep))
        })
        .collect();
    if timed.is_empty() {
        return;
    }
    ui.add_space(8.0);
    ui.heading("GPU time");
    for (r, rep) in timed {
        let times = &rep.kernel_times;
        let kernels: f64 = times
            .iter()
            .filter(|t| !is_pseudo(t))
            .map(|t| t.seconds)
            .sum();
        let scopes = scope_totals(times);
        ui.label(format!(
            "{} ({}): kernels {}, GPU idle between submissions {}, host in GPU calls {}, wall {}",
            r.slot.label(),
            r.method,
            fmt_secs(kernels),
            fmt_secs(pseudo_total(times, IDLE)),
            fmt_secs(pseudo_total(times, HOST)),
            fmt_secs(rep.secs)
        ));
        egui::Grid::new(("gpu_time_scopes", r.slot.label()))
            .num_columns(3)
            .striped(true)
            .show(ui, |ui| {
                for h in ["scope", "GPU ms", "share"] {
                    ui.label(RichText::new(h).strong());
                }
                ui.end_row();
                for &(scope, _, secs) in &scopes {
                    ui.label(scope);
                    ui.label(format!("{:.1}", secs * 1e3));
                    ui.label(format!(
                        "{:.1} %",
                        if kernels > 0.0 {
                            100.0 * secs / kernels
                        } else {
                            0.0
                        }
                    ));
                    ui.end_row();
                }
            });
        egui::CollapsingHeader::new(format!("Slowest kernels ({})", r.slot.label()))
            .id_salt(("gpu_time_kernels", r.slot.label()))
            .show(ui, |ui| {
                egui::Grid::new(("gpu_time_kernel_grid", r.slot.label()))
                    .num_columns(5)
                    .striped(true)
                    .show(ui, |ui| {
                        for h in ["scope", "kernel", "calls", "GPU ms", "mean µs"] {
                            ui.label(RichText::new(h).strong());
                        }
                        ui.end_row();
                        for t in times.iter().filter(|t| !is_pseudo(t)).take(20) {
                            ui.label(&t.scope);
                            ui.label(&t.kernel);
                            ui.label(t.calls.to_string());
                            ui.label(format!("{:.1}", t.seconds * 1e3));
                            ui.label(format!("{:.1}", t.seconds / t.calls.max(1) as f64 * 1e6));
                            ui.end_row();
                        }
                    });
            });
    }
}
