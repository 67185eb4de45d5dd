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
