//! Model / calibration source, the adapter and the model summary with its memory plan.

use egui::RichText;

use crate::gpu::{BackendChoice, GpuOptions};
use crate::model::inspect::{format_bytes, format_count};
use crate::pipeline::{CalibInput, ModelInput};

use super::super::worker::Command;
use super::super::{AppState, ModelView};
use super::{UiAction, palette};

/// The source section of the side panel: Demo, model folder, calibration file, recent lists.
pub fn source_ui(ui: &mut egui::Ui, st: &mut AppState, out: &mut Vec<UiAction>) {
    ui.heading("Source");
    ui.horizontal_wrapped(|ui| {
        if ui
            .button("Demo")
            .on_hover_text("Quantize the built-in synthetic Llama-shaped model on synthetic tokens (no download)")
            .clicked()
        {
            let cmd = st.choose_demo();
            out.push(UiAction::Send(cmd));
        }
        if ui
            .button("Open model folder…")
            .on_hover_text("A Hugging Face model directory: config.json, *.safetensors, tokenizer.json (or drop it on the window)")
            .clicked()
            && let Some(dir) = rfd::FileDialog::new().pick_folder()
        {
            out.push(UiAction::Open(dir));
        }
        let calib_ok = !matches!(st.model, Some(ModelInput::Demo { .. }));
        if ui
            .add_enabled(calib_ok, egui::Button::new("Calibration file…"))
            .on_hover_text("Text (.txt), JSON lines with a `text` field (.jsonl), Parquet with a `text` column, or pre-tokenized .safetensors (`input_ids`)")
            .clicked()
            && let Some(f) = rfd::FileDialog::new()
                .add_filter("calibration", &["txt", "jsonl", "parquet", "safetensors"])
                .pick_file()
        {
            st.choose_calib(f);
        }
    });
    egui::Grid::new("source_grid")
        .num_columns(2)
        .show(ui, |ui| {
            ui.label("Model:");
            match &st.model {
                None => ui.label("none (drop a model folder here)"),
                Some(ModelInput::Demo { seed }) => {
                    ui.label(format!("demo (synthetic, seed {seed})"))
                }
                Some(ModelInput::Dir(d)) => ui.label(d.display().to_string()),
            };
            ui.end_row();
            ui.label("Calibration:");
            match &st.calib {
                None => ui.label("none"),
                Some(CalibInput::Synthetic) => ui.label("synthetic tokens"),
                Some(CalibInput::File(f)) => ui.label(f.display().to_string()),
            };
            ui.end_row();
        });
    if !st.recent_models.is_empty() || !st.recent_calib.is_empty() {
        ui.collapsing("Recent", |ui| {
            for p in st.recent_models.clone() {
                if ui
                    .link(format!("model: {}", p.display()))
                    .on_hover_text("Open this model folder again")
                    .clicked()
                {
                    out.push(UiAction::Open(p));
                }
            }
            for p in st.recent_calib.clone() {
                if ui
                    .link(format!("calibration: {}", p.display()))
                    .on_hover_text("Use this calibration file again")
                    .clicked()
                {
                    out.push(UiAction::Open(p));
                }
            }
        });
    }
}

/// Shown before the first run: what will happen, on which device, with how much memory.
pub fn start_screen_ui(ui: &mut egui::Ui, st: &mut AppState, out: &mut Vec<UiAction>) {
    egui::ScrollArea::vertical()
        .id_salt("start_scroll")
        .show(ui, |ui| {
            ui.heading("Quantize a Llama-family model with GPTQ or GPTAQ");
            ui.label(
                "Open a model folder and a calibration text, or press Demo to watch the built-in \
                 synthetic model being quantized layer by layer. Drop a folder, a calibration file or \
                 a saved report (.json) anywhere on the window.",
            );
            ui.add_space(4.0);
            ui.horizontal_wrapped(|ui| {
                ui.label("Or open a layer-lab capture (one module's W, H, D, E) to study GPTQ vs GPTAQ on it:");
                super::lab::capture_file_ui(ui, st, out, false);
            });
            ui.add_space(8.0);
            model_overview_ui(ui, st, out);
        });
}

/// Adapter, model summary and memory plan (the start screen and the Model tab).
pub fn model_overview_ui(ui: &mut egui::Ui, st: &mut AppState, out: &mut Vec<UiAction>) {
    adapter_ui(ui, st, out);
    ui.add_space(8.0);
    match &st.model_view {
        ModelView::None => {}
        ModelView::Loading(_) => {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label("reading the model…");
            });
        }
        ModelView::Failed(_, msg) => {
            ui.colored_label(
                palette::ERROR,
                format!("The model could not be opened: {msg}"),
            );
        }
        ModelView::Ready(info) => {
            let s = &info.summary;
            ui.heading("Model summary");
            egui::Grid::new("model_summary")
                .num_columns(2)
                .striped(true)
                .show(ui, |ui| {
                    let mut row = |k: &str, v: String| {
                        ui.label(k);
                        ui.label(v);
                        ui.end_row();
                    };
                    row("description", s.description.clone());
                    row("architecture", s.architecture.clone());
                    row("dtype", s.config_dtype.clone());
                    row(
                        "parameters",
                        format!(
                            "{} (from {})",
                            format_count(s.param_count),
                            s.param_count_source
                        ),
                    );
                    if s.stored_bytes > 0 {
                        row("stored size", format_bytes(s.stored_bytes));
                    }
                    row(
                        "layers",
                        format!(
                            "{} × hidden {}, intermediate {}, heads {}/{} × {}",
                            s.num_layers,
                            s.hidden_size,
                            s.intermediate_size,
                            s.num_heads,
                            s.num_kv_heads,
                            s.head_dim
                        ),
                    );
                    row("vocabulary", s.vocab_size.to_string());
                    row(
                        "rope",
                        format!("{}, {} positions", s.rope, s.max_position_embeddings),
                    );
                    row("embeddings", s.embedding_storage.clone());
                    row(
                        "quantizable",
                        format!(
                            "{} params in decoder linears",
                            format_count(s.quantizable_params)
                        ),
                    );
                });
            ui.add_space(4.0);
            egui::CollapsingHeader::new("Decoder linears (per layer)")
                .default_open(true)
                .show(ui, |ui| {
                    egui::Grid::new("module_shapes")
                        .num_columns(4)
                        .striped(true)
                        .show(ui, |ui| {
                            for h in ["module", "out", "in", "params"] {
                                ui.label(RichText::new(h).strong());
                            }
                            ui.end_row();
                            for m in &s.modules {
                                ui.label(&m.name);
                                ui.label(m.out_features.to_string());
                                ui.label(m.in_features.to_string());
                                ui.label(format_count(m.params));
                                ui.end_row();
                            }
                        });
                });
            ui.add_space(8.0);
            ui.heading("Memory plan");
            match st.settings.plan(
                &info.config,
                st.max_buffer_bytes(),
                st.tensor_cores_granted(),
            ) {
                Ok(p) => {
                    for line in &p.breakdown {
                        ui.label(format!("- {line}"));
                    }
                    ui.label(format!(
                        "~ {} on the GPU (budget {}), {} in host RAM; {} sequence(s) per batch",
                        format_bytes(p.gpu_bytes_estimate),
                        format_bytes(p.gpu_budget_bytes),
                        format_bytes(p.host_bytes_estimate),
                        p.batch_sequences
                    ));
                    if let Some((least, tc)) = st.settings.smallest_budget(
                        &info.config,
                        st.max_buffer_bytes(),
                        st.tensor_cores_granted(),
                    ) {
                        ui.label(format!(
                            "the smallest GPU memory budget for these settings: {}{}",
                            format_bytes(least),
                            match tc {
                                Some(tc) if tc > least => format!(
                                    " (the f32 kernels; with the tensor cores {})",
                                    format_bytes(tc)
                                ),
                                _ => String::new(),
                            }
                        ));
                    }
                }
                Err(e) => {
                    ui.colored_label(palette::ERROR, e);
                }
            }
        }
    }
}

fn adapter_ui(ui: &mut egui::Ui, st: &mut AppState, out: &mut Vec<UiAction>) {
    ui.heading("GPU");
    match &st.device {
        None if st.gpu_pending => {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label("opening the GPU…");
            });
        }
        None => {
            ui.label("no GPU opened");
        }
        Some(Err(e)) => {
            ui.colored_label(palette::ERROR, e);
        }
        Some(Ok(d)) => {
            ui.label(format!("{} — {}, {}", d.name, d.backend, d.device_type));
            ui.label(format!(
                "driver {}; max buffer {}, max storage binding {}, {} KiB workgroup memory",
                if d.driver.is_empty() { "?" } else { &d.driver },
                format_bytes(d.max_buffer_size),
                format_bytes(d.max_storage_buffer_binding_size),
                d.max_compute_workgroup_storage_size >> 10
            ));
            if !d.features.is_empty() {
                ui.label(format!("features: {}", d.features.join(", ")));
            }
        }
    }
    if let Some(note) = st.tensor_core_note() {
        ui.label(note);
    }
    if st.adapters.len() > 1 {
        let current = match &st.device {
            Some(Ok(d)) => d.name.clone(),
            _ => String::new(),
        };
        let busy = st.session.as_ref().is_some_and(|s| s.is_active());
        let mut chosen = None;
        ui.add_enabled_ui(!busy, |ui| {
            egui::ComboBox::from_label("Adapter")
                .selected_text(current.clone())
                .show_ui(ui, |ui| {
                    for a in &st.adapters {
                        let label = format!("{} ({}, {})", a.name, a.backend, a.device_type);
                        if ui.selectable_label(a.name == current, label).clicked() {
                            chosen = Some(a.name.clone());
                        }
                    }
                });
        });
        if let Some(name) = chosen
            && name != current
        {
            st.device = None;
            st.gpu_pending = true;
            out.push(UiAction::Send(Command::SelectAdapter(GpuOptions {
                backend: BackendChoice::Auto,
                adapter: Some(name),
            })));
        }
    }
}
