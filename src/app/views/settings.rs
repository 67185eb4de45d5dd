//! The settings panel: every knob with a one-line tooltip, validation messages under the form,
//! and Start / Cancel.

use egui::RichText;

use super::super::AppState;
use super::super::state::{Field, Issue, MethodChoice};
use super::super::worker::Command;
use super::{UiAction, palette};

/// A labelled number field (the label names the field for screen readers and tests).
fn number<N: egui::emath::Numeric>(
    ui: &mut egui::Ui,
    label: &str,
    tip: &str,
    value: &mut N,
    range: std::ops::RangeInclusive<N>,
    speed: f64,
) {
    let l = ui.label(label).on_hover_text(tip);
    ui.add(egui::DragValue::new(value).range(range).speed(speed))
        .labelled_by(l.id)
        .on_hover_text(tip);
    ui.end_row();
}

fn issues_for(ui: &mut egui::Ui, issues: &[Issue], field: Field) {
    for i in issues.iter().filter(|i| i.field == field) {
        ui.label("");
        ui.add(egui::Label::new(RichText::new(&i.message).color(palette::ERROR)).wrap());
        ui.end_row();
    }
}

pub fn settings_ui(ui: &mut egui::Ui, st: &mut AppState, out: &mut Vec<UiAction>) {
    ui.heading("Settings");
    let busy = st.session.as_ref().is_some_and(|s| s.is_active());
    let config = st.model_info().map(|i| i.config.clone());
    let issues = st
        .settings
        .validate(st.model.as_ref(), st.calib.as_ref(), config.as_ref());
    // Why the opened GPU cannot run the tensor-core kernels, if it cannot (the option is then
    // ignored; the GPU panel says the same).
    let tc_unavailable = st.tensor_cores_unavailable();
    let s = &mut st.settings;
    ui.add_enabled_ui(!busy, |ui| {
        egui::Grid::new("settings_grid")
            .num_columns(2)
            .spacing([8.0, 4.0])
            .show(ui, |ui| {
                let l = ui.label("Method");
                egui::ComboBox::from_id_salt("method")
                    .selected_text(s.method.label())
                    .show_ui(ui, |ui| {
                        for m in MethodChoice::ALL {
                            ui.selectable_value(&mut s.method, m, m.label())
                                .on_hover_text(m.tooltip());
                        }
                    })
                    .response
                    .labelled_by(l.id)
                    .on_hover_text(s.method.tooltip());
                ui.end_row();

                let l = ui
                    .label("Bits")
                    .on_hover_text("Bits per weight: 2, 3, 4 or 8 (fewer = smaller and less accurate)");
                egui::ComboBox::from_id_salt("bits")
                    .selected_text(s.bits.to_string())
                    .show_ui(ui, |ui| {
                        for b in [2u32, 3, 4, 8] {
                            ui.selectable_value(&mut s.bits, b, b.to_string());
                        }
                    })
                    .response
                    .labelled_by(l.id);
                ui.end_row();

                number(
                    ui,
                    "Group size",
                    "Input columns that share one scale/zero; -1 = one group per row. Must divide every layer's width",
                    &mut s.group_size,
                    -1..=65536,
                    1.0,
                );
                issues_for(ui, &issues, Field::GroupSize);
                if let Some(c) = &config
                    && issues.iter().any(|i| i.field == Field::GroupSize)
                    && let Some(g) = s.group_suggestion(c)
                {
                    ui.label("");
                    if ui
                        .button(format!("Use group size {g}"))
                        .on_hover_text("The largest group size below yours that divides every layer width")
                        .clicked()
                    {
                        s.group_size = g as i64;
                    }
                    ui.end_row();
                }
                ui.label("");
                ui.checkbox(&mut s.sym, "Symmetric")
                    .on_hover_text("Symmetric grid around zero (off = per-group zero points)");
                ui.end_row();
                ui.label("");
                ui.checkbox(&mut s.act_order, "Act-order")
                    .on_hover_text("desc_act: quantize columns by decreasing Hessian diagonal (usually more accurate)");
                ui.end_row();
                ui.label("");
                ui.checkbox(&mut s.static_groups, "Static groups")
                    .on_hover_text("With act-order: compute group parameters up front on the original column groups (no g_idx permutation)");
                ui.end_row();
                issues_for(ui, &issues, Field::StaticGroups);
                number(
                    ui,
                    "Damping",
                    "Relative damping added to the Hessian diagonal (percdamp), raised automatically if Cholesky fails",
                    &mut s.damp,
                    0.0..=1.0,
                    0.001,
                );
                issues_for(ui, &issues, Field::Damp);
                let gptaq = matches!(s.method, MethodChoice::Gptaq | MethodChoice::SideBySide);
                let l = ui
                    .label("α (GPTAQ)")
                    .on_hover_text("GPTAQ's shrinkage of the asymmetry correction: 0 = GPTQ, 0.25 = the paper's default");
                ui.add_enabled(gptaq, egui::DragValue::new(&mut s.alpha).range(0.0..=1.0).speed(0.01))
                    .labelled_by(l.id)
                    .on_hover_text("Only used by GPTAQ");
                ui.end_row();
                issues_for(ui, &issues, Field::Alpha);
                number(
                    ui,
                    "Block size",
                    "Columns per lazy-update block of the solver (speed only, same result)",
                    &mut s.block_size,
                    1..=4096,
                    1.0,
                );
                issues_for(ui, &issues, Field::BlockSize);
                number(
                    ui,
                    "N samples",
                    "Calibration sequences (the paper uses 128)",
                    &mut s.nsamples,
                    1..=4096,
                    1.0,
                );
                issues_for(ui, &issues, Field::NSamples);
                number(
                    ui,
                    "Sequence length",
                    "Tokens per calibration sequence (2048 in the paper)",
                    &mut s.seqlen,
                    1..=131072,
                    1.0,
                );
                issues_for(ui, &issues, Field::SeqLen);
                number(
                    ui,
                    "Seed",
                    "Seed for sampling calibration windows (and the demo model)",
                    &mut s.seed,
                    0..=u64::MAX,
                    1.0,
                );
                number(
                    ui,
                    "GPU memory (GiB)",
                    "Memory the run may use; the plan spills activations to host RAM beyond it",
                    &mut s.gpu_memory_gib,
                    0.25..=1024.0,
                    0.25,
                );
                issues_for(ui, &issues, Field::GpuMemory);
                ui.label("");
                ui.checkbox(&mut s.mse, "MSE clipping")
                    .on_hover_text("Grid-search the clipping range per group (slower, sometimes better at 2–3 bits)");
                ui.end_row();
                ui.label("");
                ui.checkbox(&mut s.metrics, "Error metrics")
                    .on_hover_text("Measure the quant/asym/output errors: GPTQ/RTN then run the full-precision stream too (GPTAQ always runs it; unchecked, it only skips the measurements)");
                ui.end_row();
                ui.label("");
                ui.checkbox(&mut s.cpu_solver, "CPU reference solver")
                    .on_hover_text("Solve each module with the f64 CPU reference (slow; for verification)");
                ui.end_row();
                ui.label("");
                let tc_label = if tc_unavailable.is_some() {
                    "Tensor cores (f16): not on this GPU"
                } else {
                    "Tensor cores (f16)"
                };
                let tc = ui.checkbox(&mut s.tensor_cores, tc_label).on_hover_text("Run the calibration forward and the Hessians on f16 operands with f32 accumulation where the GPU grants cooperative matrices (like the reference's half-precision forward; on an H100 an 8B GPTQ layer took 3.8 s with it and 7.9 s without, 2.16 s with it after later kernel work). GPTAQ's solve then also computes its A = α·triu₁(D·Uᵀ) on the tensor cores from split-f16 operands (two halves per value: within a few times f32's round-off) where the width is a multiple of 128. Ignored elsewhere, and where the f16 copies do not fit the memory budget");
                if let Some(why) = &tc_unavailable {
                    tc.on_hover_text(format!("Not on this GPU: {why}; the f32 kernels run."));
                }
                ui.end_row();
                ui.label("");
                ui.checkbox(&mut s.kernel_times, "Time GPU kernels")
                    .on_hover_text("Time every GPU dispatch with timestamp queries: where the GPU time goes per stage and kernel, how long the GPU waited for the host (shown under Results, and in the saved report). Costs about 1 % of an 8B layer on an H100, more where many tiny dispatches run; needs timestamp queries");
                ui.end_row();
            });
    });
    for i in issues
        .iter()
        .filter(|i| matches!(i.field, Field::Model | Field::Calibration | Field::Bits))
    {
        ui.colored_label(palette::ERROR, &i.message);
    }
    ui.add_space(6.0);
    ui.horizontal(|ui| {
        if busy {
            if ui
                .button("Cancel")
                .on_hover_text("Stop after the current batch or module")
                .clicked()
            {
                out.push(UiAction::Send(Command::Cancel));
            }
        } else {
            let start = ui
                .add_enabled(
                    issues.is_empty(),
                    egui::Button::new(RichText::new("Start").strong()),
                )
                .on_hover_text("Quantize with these settings")
                .on_disabled_hover_text("Fix the settings above first");
            if start.clicked()
                && let Some(cmd) = st.start_command()
            {
                out.push(UiAction::Send(cmd));
            }
        }
    });
}
