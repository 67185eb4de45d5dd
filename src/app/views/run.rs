//! The session view: progress, tabs, and the sortable per-module table.

use egui::RichText;

use super::super::state::{
    Column, Grade, Outcome, Phase, RunSlot, Selection, grade_by_rank, grade_relative, sorted_rows,
};
use super::super::worker::Command;
use super::super::{AppState, Tab};
use super::{UiAction, fmt_sci, fmt_secs, grade_color, palette, plots, results, start};

pub fn session_ui(ui: &mut egui::Ui, st: &mut AppState, out: &mut Vec<UiAction>) {
    progress_ui(ui, st, out);
    ui.separator();
    ui.horizontal(|ui| {
        ui.selectable_value(&mut st.tab, Tab::Table, "Table");
        ui.selectable_value(&mut st.tab, Tab::Plots, "Plots");
        ui.selectable_value(&mut st.tab, Tab::Model, "Model");
        ui.selectable_value(&mut st.tab, Tab::Results, "Results");
        ui.selectable_value(&mut st.tab, Tab::Lab, "Layer lab");
        let comparison = st.session.as_ref().is_some_and(|s| s.is_comparison());
        if comparison && st.tab == Tab::Table {
            ui.separator();
            ui.label("Table shows:");
            ui.selectable_value(&mut st.table_slot, RunSlot::Gptq, "GPTQ run");
            ui.selectable_value(&mut st.table_slot, RunSlot::Gptaq, "GPTAQ run");
        }
    });
    ui.separator();
    match st.tab {
        Tab::Table => table_ui(ui, st, out),
        Tab::Plots => plots::plots_ui(ui, st),
        Tab::Model => {
            egui::ScrollArea::vertical()
                .id_salt("model_tab")
                .show(ui, |ui| start::model_overview_ui(ui, st, out));
        }
        Tab::Results => results::results_ui(ui, st, out),
        Tab::Lab => super::lab::lab_ui(ui, st, out),
    }
}

fn progress_ui(ui: &mut egui::Ui, st: &mut AppState, out: &mut Vec<UiAction>) {
    let Some(s) = st.session.as_ref() else {
        return;
    };
    let (done, total) = s.progress();
    let title = s
        .runs
        .first()
        .map(|r| r.model.clone())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "run".into());
    ui.horizontal(|ui| {
        ui.heading(title);
        let phase = match &s.phase {
            Phase::Preparing => "preparing calibration windows…".to_string(),
            Phase::Running => "running".into(),
            Phase::Finished => format!("finished in {}", fmt_secs(s.elapsed())),
            Phase::Failed(m) => format!("failed: {m}"),
            Phase::Cancelled => "cancelled".into(),
        };
        let color = match &s.phase {
            Phase::Failed(_) => palette::ERROR,
            Phase::Finished => palette::GOOD,
            _ => ui.visuals().text_color(),
        };
        ui.colored_label(color, phase);
        if let super::super::state::Origin::Report(p) = &s.origin {
            ui.label(format!("(report {})", p.display()));
        }
    });
    if !s.calibration.is_empty() {
        ui.label(format!("calibration: {}", s.calibration));
    }
    if s.is_active() {
        let frac = if total > 0 {
            done as f32 / total as f32
        } else {
            0.0
        };
        let current = s.current();
        let mut text = format!("{done}/{total} modules");
        if let Some(r) = current {
            if s.is_comparison() {
                text = format!("{} · {text}", r.slot.label());
            }
            if let Some((layer, module)) = r.current_module() {
                text = format!("{text} · layer {}/{} · {module}", layer + 1, r.layers);
            }
            if !r.status.is_empty() {
                text = format!("{text} · {}", r.status);
            }
        }
        text = format!("{text} · elapsed {}", fmt_secs(s.elapsed()));
        if let Some(eta) = s.eta_secs() {
            text = format!("{text} · ETA {}", fmt_secs(eta));
        }
        ui.horizontal(|ui| {
            ui.add(
                egui::ProgressBar::new(frac)
                    .text(text)
                    .desired_width(ui.available_width() - 90.0),
            );
            if ui
                .button("Cancel run")
                .on_hover_text("Stop after the current batch or module")
                .clicked()
            {
                out.push(UiAction::Send(Command::Cancel));
            }
        });
    }
    for r in &s.runs {
        for w in &r.warnings {
            ui.colored_label(palette::POOR, format!("warning ({}): {w}", r.slot.label()));
        }
    }
}

fn table_ui(ui: &mut egui::Ui, st: &mut AppState, out: &mut Vec<UiAction>) {
    let Some(session) = st.session.as_ref() else {
        return;
    };
    let slot = if session.is_comparison() {
        st.table_slot
    } else {
        session.slots.first().copied().unwrap_or(RunSlot::Single)
    };
    let Some(run) = session.run(slot) else {
        ui.label("waiting for the first module…");
        return;
    };
    if let Outcome::Failed(m) = &run.outcome {
        ui.colored_label(palette::ERROR, format!("{} run failed: {m}", slot.label()));
    }
    let rows = sorted_rows(&run.modules, st.sort);
    let proxies: Vec<f64> = run.modules.iter().map(|m| m.proxy_loss).collect();
    let mut clicked_header = None;
    let mut clicked_row = None;
    egui::ScrollArea::both()
        .id_salt("table_scroll")
        .auto_shrink([false, false])
        .show(ui, |ui| {
            egui::Grid::new("module_table")
                .num_columns(Column::ALL.len())
                .striped(true)
                .spacing([14.0, 3.0])
                .show(ui, |ui| {
                    for c in Column::ALL {
                        let arrow = if st.sort.column == c {
                            if st.sort.descending {
                                " (desc)"
                            } else {
                                " (asc)"
                            }
                        } else {
                            ""
                        };
                        if ui
                            .add(
                                egui::Button::new(
                                    RichText::new(format!("{}{arrow}", c.title())).strong(),
                                )
                                .frame(false),
                            )
                            .on_hover_text(c.tooltip())
                            .clicked()
                        {
                            clicked_header = Some(c);
                        }
                    }
                    ui.end_row();
                    for i in rows {
                        let Some(m) = run.modules.get(i) else {
                            continue;
                        };
                        let selected = st.selected.as_ref().is_some_and(|s| {
                            s.slot == slot && s.layer == m.layer && s.module == m.module
                        });
                        ui.label(m.layer.to_string());
                        if ui
                            .selectable_label(selected, m.module.as_str())
                            .on_hover_text("Open this module's detail")
                            .clicked()
                        {
                            clicked_row = Some(Selection {
                                slot,
                                layer: m.layer,
                                module: m.module.clone(),
                            });
                        }
                        ui.label(format!("{}×{}", m.rows, m.cols));
                        let g = grade_by_rank(&proxies, m.proxy_loss);
                        cell(ui, format!("{:.3e}", m.proxy_loss), Some(g));
                        for v in [m.quant_error, m.asym_error, m.output_error] {
                            cell(ui, fmt_sci(v), v.map(grade_relative));
                        }
                        ui.label(format!("{:.4}", m.damp));
                        match &m.fallback {
                            Some(f) => ui.colored_label(palette::POOR, f),
                            None => ui.label(""),
                        };
                        ui.label(format!("{:.2}", m.secs));
                        ui.end_row();
                    }
                });
        });
    if let Some(c) = clicked_header {
        st.sort.click(c);
    }
    if let Some(sel) = clicked_row
        && let Some(cmd) = st.select(sel)
    {
        out.push(UiAction::Send(cmd));
    }
}

fn cell(ui: &mut egui::Ui, text: String, grade: Option<Grade>) {
    let t = RichText::new(text).monospace();
    match grade {
        Some(g) => ui.label(t.color(grade_color(g))),
        None => ui.label(t),
    };
}
