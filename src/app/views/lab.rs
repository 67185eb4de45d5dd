//! Layer lab view: one captured module, its own quantizer settings (every change re-solves on the
//! worker), GPTQ beside GPTAQ (errors as numbers and bars, per-column traces, heatmaps, P's row
//! norms, diag(H), output error vs α) and the step mode. Captures come from the session or from a
//! file; they can be saved for sharing. Large modules are solved on the worker's GPU (f32), which
//! leaves the compensation heatmaps and P's row norms to the f64 reference of smaller modules: the
//! view names the solver and says why a picture is missing. All strings are ASCII: egui's default
//! font lacks most maths glyphs.

use egui::{Color32, RichText, Vec2};
use egui_plot::{Bar, BarChart, Legend, Line, LineStyle, Plot, PlotPoints, VLine};

use super::super::AppState;
use super::super::lab::{LabPage, StepMethod};
use super::super::worker::Command;
use super::{UiAction, heatmap_ui, log10_points, palette};
use crate::lab::step::{STEP_MAX_COLS, STEP_MAX_WEIGHTS, Stage, StepRequest, StepSnapshot};
use crate::lab::{GPU_MIN_COLS, GPU_MIN_WEIGHTS, LabSolver, LabStudy, SideStudy};
use crate::model::ModuleKind;
use crate::quant::reference::SweepAction;

const EXPLAIN: &str = "GPTQ quantizes W column by column and, after each column, spreads that column's \
error over the columns not yet quantized with the inverse Hessian (the OBS update w <- w - e*U_j/U_jj), \
lazily in blocks: inside a block as rank-1 updates, across blocks as one GEMM. Its objective is \
||(W-Q) Xq^T||^2, the quantization error: it only sees the inputs of the already quantized model. \
GPTAQ (arXiv 2504.02692) minimises ||Q Xq^T - W Xfp^T||^2, the output error against the FP model: the \
update gains the term P = alpha * triu1(D U^T) U with D = 2/N (Xfp - Xq)^T Xq (paper eq. 7; \
algorithm.md 2.2), which also corrects the asymmetry error the module inherits from earlier layers. \
alpha = 0 is GPTQ; larger alpha trades a higher quantization error for a lower output error.";

const GPTQ_COLOR: Color32 = palette::KINDS[0];
const GPTAQ_COLOR: Color32 = palette::KINDS[1];

/// The lab tab of a session.
pub fn lab_ui(ui: &mut egui::Ui, st: &mut AppState, out: &mut Vec<UiAction>) {
    egui::ScrollArea::vertical()
        .id_salt("lab_scroll")
        .show(ui, |ui| lab_body_ui(ui, st, out));
}

/// The lab without a session (a capture opened from the start screen).
pub fn standalone_lab_ui(ui: &mut egui::Ui, st: &mut AppState, out: &mut Vec<UiAction>) {
    ui.horizontal(|ui| {
        ui.heading("Layer lab");
        if ui
            .button("Back to start")
            .on_hover_text("Close the lab (the capture stays loaded)")
            .clicked()
        {
            st.lab.standalone = false;
        }
    });
    lab_ui(ui, st, out);
}

/// "Open capture...", "Save capture as..." (file dialogs) and a path field with Load / Save.
pub fn capture_file_ui(
    ui: &mut egui::Ui,
    st: &mut AppState,
    out: &mut Vec<UiAction>,
    allow_save: bool,
) {
    let filter = ("layer-lab capture", &["safetensors"][..]);
    let can_save = allow_save && st.lab.capture.is_some();
    if ui
        .add_enabled(!st.lab.capturing, egui::Button::new("Open capture..."))
        .on_hover_text("Load a module saved from the lab (W, H, D, E as safetensors)")
        .clicked()
        && let Some(p) = rfd::FileDialog::new()
            .add_filter(filter.0, filter.1)
            .pick_file()
        && let Some(cmd) = st.lab_open_command(p)
    {
        out.push(UiAction::Send(cmd));
    }
    if allow_save
        && ui
            .add_enabled(can_save, egui::Button::new("Save capture as..."))
            .on_hover_text(
                "Write this module's W, H, D, E so the lesson can be shared and reproduced",
            )
            .clicked()
        && let Some(p) = rfd::FileDialog::new()
            .add_filter(filter.0, filter.1)
            .set_file_name("capture.safetensors")
            .save_file()
    {
        out.push(UiAction::Send(Command::LabSave(p)));
    }
    let label = ui.label("or path:");
    ui.add(
        egui::TextEdit::singleline(&mut st.lab.path)
            .desired_width(220.0)
            .hint_text("/path/to/capture.safetensors"),
    )
    .labelled_by(label.id)
    .on_hover_text("capture file");
    let path = st.lab.path.trim().to_string();
    if ui
        .add_enabled(
            !path.is_empty() && !st.lab.capturing,
            egui::Button::new("Load capture"),
        )
        .clicked()
        && let Some(cmd) = st.lab_open_command(path.clone().into())
    {
        out.push(UiAction::Send(cmd));
    }
    if allow_save
        && ui
            .add_enabled(
                can_save && !path.is_empty(),
                egui::Button::new("Save capture"),
            )
            .clicked()
    {
        out.push(UiAction::Send(Command::LabSave(path.into())));
    }
}

fn lab_body_ui(ui: &mut egui::Ui, st: &mut AppState, out: &mut Vec<UiAction>) {
    ui.collapsing("How GPTQ and GPTAQ compensate", |ui| {
        ui.label(RichText::new(EXPLAIN).small());
    });
    source_ui(ui, st, out);
    let Some(cap) = st.lab.capture.clone() else {
        ui.label(
            "Capture a module of the finished run (or open a saved capture) to compare GPTQ with \
             GPTAQ on it.",
        );
        return;
    };
    ui.label(format!(
        "layer {} {} [{} x {}], {} calibration sequences, from {}",
        cap.layer,
        cap.module.short_name(),
        cap.rows,
        cap.cols,
        cap.nsamples,
        cap.source
    ));
    settings_ui(ui, st, cap.cols);
    if let Some(cmd) = st.lab_solve_command() {
        out.push(UiAction::Send(cmd));
    }
    ui.separator();
    ui.horizontal(|ui| {
        ui.selectable_value(&mut st.lab.page, LabPage::Compare, "Compare GPTQ vs GPTAQ");
        ui.selectable_value(&mut st.lab.page, LabPage::Step, "Step mode");
    });
    ui.separator();
    match st.lab.page {
        LabPage::Compare => compare_ui(ui, st),
        LabPage::Step => step_ui(ui, st, out, cap.rows, cap.cols),
    }
}

fn source_ui(ui: &mut egui::Ui, st: &mut AppState, out: &mut Vec<UiAction>) {
    let session = st.session.as_ref();
    let has_session = session.is_some();
    let finished = session.is_some_and(|s| !s.is_active());
    let layers = session
        .map(|s| s.runs.iter().map(|r| r.layers).max().unwrap_or(1))
        .unwrap_or(1)
        .max(1);
    ui.horizontal_wrapped(|ui| {
        if has_session {
            ui.label("layer");
            ui.add(egui::DragValue::new(&mut st.lab.layer).range(0..=layers - 1));
            egui::ComboBox::from_label("module")
                .selected_text(st.lab.module.short_name())
                .show_ui(ui, |ui| {
                    for m in ModuleKind::ALL {
                        ui.selectable_value(&mut st.lab.module, m, m.short_name());
                    }
                });
            if ui
                .add_enabled(finished && !st.lab.capturing, egui::Button::new("Capture"))
                .on_hover_text(
                    "Run the session's model up to this module (earlier modules quantized with the \
                     run's method) and keep its W, H, D and E",
                )
                .clicked()
                && let Some(cmd) = st.lab_capture_command()
            {
                out.push(UiAction::Send(cmd));
            }
            ui.separator();
        }
        capture_file_ui(ui, st, out, true);
        if st.lab.capturing {
            ui.spinner();
        }
    });
}

fn settings_ui(ui: &mut egui::Ui, st: &mut AppState, cols: usize) {
    let s = &mut st.lab.settings;
    ui.horizontal_wrapped(|ui| {
        egui::ComboBox::from_label("bits")
            .selected_text(s.bits.to_string())
            .show_ui(ui, |ui| {
                for b in [2u32, 3, 4, 8] {
                    ui.selectable_value(&mut s.bits, b, b.to_string());
                }
            });
        let gname = |g: i64| {
            if g < 0 {
                "per row".to_string()
            } else {
                g.to_string()
            }
        };
        egui::ComboBox::from_label("group size")
            .selected_text(gname(s.group_size))
            .show_ui(ui, |ui| {
                for g in [-1i64, 16, 32, 64, 128, 256] {
                    if g < 0 || g as usize <= cols {
                        ui.selectable_value(&mut s.group_size, g, gname(g));
                    }
                }
            });
        ui.checkbox(&mut s.sym, "symmetric");
        ui.checkbox(&mut s.act_order, "act-order")
            .on_hover_text("Process columns by descending diag(H)");
        let l = ui.label("damping");
        ui.add(
            egui::DragValue::new(&mut s.damp)
                .range(0.0001..=0.5)
                .speed(0.001)
                .max_decimals(4),
        )
        .labelled_by(l.id)
        .on_hover_text("percdamp: damp_percent * mean(diag H) is added to diag(H)");
        let l = ui.label("block size");
        ui.add(egui::DragValue::new(&mut s.block_size).range(1..=cols.max(1)))
            .labelled_by(l.id)
            .on_hover_text("Columns per lazy batch (GPTQ's B); the step mode shows why it exists");
        ui.add(egui::Slider::new(&mut s.alpha, 0.0..=1.0).text("alpha"))
            .on_hover_text("GPTAQ's shrinkage of the asymmetry correction; 0 = GPTQ");
    });
    ui.horizontal(|ui| {
        if st.lab.solving.is_some() {
            ui.spinner();
            ui.label("solving on the worker...");
        } else if st.lab.outdated() {
            ui.label("(results below are for earlier settings)");
        }
    });
}

/// The three errors of both methods as bars (asymmetry is the same for both: it does not depend on
/// Q).
fn bars_ui(ui: &mut egui::Ui, s: &LabStudy) {
    let names = ["quant", "asym", "output"];
    let values = |m: &crate::lab::LabMetrics| [m.quant_error, m.asym_error, m.output_error];
    let bars = |m: &crate::lab::LabMetrics, dx: f64| -> Vec<Bar> {
        values(m)
            .iter()
            .enumerate()
            .map(|(i, v)| Bar::new(i as f64 + dx, *v).width(0.35))
            .collect()
    };
    Plot::new("lab_error_bars")
        .height(180.0)
        .width(320.0)
        .legend(Legend::default())
        .allow_scroll(false)
        .allow_drag(false)
        .y_axis_label("relative error")
        .x_axis_formatter(move |m, _| {
            let i = m.value.round();
            if (m.value - i).abs() < 1e-6 && (0.0..3.0).contains(&i) {
                names[i as usize].to_string()
            } else {
                String::new()
            }
        })
        .show(ui, |p| {
            p.bar_chart(BarChart::new("GPTQ", bars(&s.gptq.metrics, -0.2)).color(GPTQ_COLOR));
            p.bar_chart(
                BarChart::new(
                    format!("GPTAQ a={:.2}", s.alpha),
                    bars(&s.gptaq.metrics, 0.2),
                )
                .color(GPTAQ_COLOR),
            );
        });
}

fn numbers_ui(ui: &mut egui::Ui, s: &LabStudy) {
    ui.vertical(|ui| {
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
                for (name, side) in [
                    ("GPTQ".to_string(), &s.gptq),
                    (format!("GPTAQ a={:.2}", s.alpha), &s.gptaq),
                ] {
                    let m = side.metrics;
                    ui.label(name);
                    ui.label(format!("{:.4e}", m.quant_error));
                    ui.label(format!("{:.4e}", m.asym_error));
                    ui.label(format!("{:.4e}", m.output_error));
                    ui.label(format!("{:.4e}", m.proxy_loss));
                    ui.end_row();
                }
            });
        let (g, a) = (s.gptq.metrics.output_error, s.gptaq.metrics.output_error);
        let change = if g > 0.0 { 100.0 * (a / g - 1.0) } else { 0.0 };
        ui.label(format!(
            "GPTAQ changes the output error by {change:+.1}% against GPTQ on the calibration tokens."
        ));
        ui.small(why_text(s));
        for (name, side) in [("GPTQ", &s.gptq), ("GPTAQ", &s.gptaq)] {
            if let Some(f) = &side.fallback {
                ui.colored_label(palette::POOR, format!("{name}: fallback {f:?}"));
            }
        }
        ui.small(solver_text(s)).on_hover_text(format!(
            "Modules wider than {GPU_MIN_COLS} columns or with more than {GPU_MIN_WEIGHTS} weights \
             are solved on the GPU in f32 (errors computed on the GPU, summed in f64); smaller ones \
             on the f64 CPU reference, exactly."
        ));
    });
}

/// Which solver produced the numbers, and how long the study took.
fn solver_text(s: &LabStudy) -> String {
    let how = match s.solver {
        LabSolver::Reference => "exact",
        LabSolver::Gpu => "f32 solve, errors to ~1e-4 relative",
    };
    format!(
        "solved in {:.2} s on the worker: {} ({how}; GPTQ, GPTAQ and {} alpha points)",
        s.secs,
        s.solver.describe(),
        s.sweep.len()
    )
}

/// Why a study lacks a picture the f64 reference records (its recorded sweep / its P).
fn gpu_missing(s: &LabStudy, what: &str) -> String {
    format!(
        "({what}: only with the f64 CPU reference, i.e. modules up to {GPU_MIN_COLS} columns and \
         {GPU_MIN_WEIGHTS} weights; the {} solve does not record it)",
        s.solver.describe()
    )
}

/// Why GPTAQ helps here, or why it does not: the inherited asymmetry error bounds what its P term
/// can recover.
fn why_text(s: &LabStudy) -> String {
    let (g, a, asym) = (
        s.gptq.metrics.output_error,
        s.gptaq.metrics.output_error,
        s.gptq.metrics.asym_error,
    );
    if s.alpha == 0.0 {
        "alpha = 0: the P term vanishes and GPTAQ is GPTQ.".into()
    } else if asym <= 1e-12 {
        "The inputs of this module are the same in the quantized and the FP model (asym error 0, \
         e.g. layer 0's first modules): D = 0, so P = 0 and GPTAQ equals GPTQ."
            .into()
    } else if a < g {
        format!(
            "The module inherits an asymmetry error of {asym:.3e}; GPTAQ's P term lets the columns not \
             yet quantized absorb part of it, at the price of a quantization error that is higher than \
             GPTQ's."
        )
    } else {
        format!(
            "Here GPTAQ does not lower the output error: the inherited asymmetry error ({asym:.3e}) is \
             small against the rounding error, and the P term, fitted on the calibration tokens, moves \
             weights that are then rounded again. Try a smaller alpha or more bits."
        )
    }
}

fn sweep_ui(ui: &mut egui::Ui, s: &LabStudy) {
    ui.vertical(|ui| {
        ui.label("output error vs alpha (alpha = 0 is GPTQ; the line marks the slider)");
        let pts = |f: fn(&crate::lab::LabMetrics) -> f64| -> PlotPoints<'static> {
            s.sweep
                .iter()
                .map(|(a, m)| [*a, f(m)])
                .collect::<Vec<[f64; 2]>>()
                .into()
        };
        Plot::new("lab_alpha_sweep")
            .legend(Legend::default())
            .height(200.0)
            .allow_scroll(false)
            .x_axis_label("alpha")
            .y_axis_label("relative error")
            .show(ui, |p| {
                p.line(Line::new("output error", pts(|m| m.output_error)).width(2.0));
                p.line(Line::new("quant error", pts(|m| m.quant_error)));
                p.line(Line::new("asym error (inherited)", pts(|m| m.asym_error)));
                p.vline(VLine::new("alpha", s.alpha).color(palette::POOR).width(1.0));
            });
    });
}

fn series(v: &[f64]) -> Vec<[f64; 2]> {
    v.iter().enumerate().map(|(i, x)| [i as f64, *x]).collect()
}

fn cumulative(v: &[f64]) -> Vec<[f64; 2]> {
    let mut run = 0.0;
    v.iter()
        .enumerate()
        .map(|(i, x)| {
            run += x;
            [i as f64, run]
        })
        .collect()
}

fn traces_ui(ui: &mut egui::Ui, s: &LabStudy) {
    let order = if s.perm.is_some() {
        "act-order processing order"
    } else {
        "processing order = column order"
    };
    ui.label(format!("per-column traces along the {order}"));
    let removed = |side: &SideStudy| {
        let raw: f64 = side.column_loss_uncompensated.iter().sum();
        let kept: f64 = side.column_loss.iter().sum();
        if raw > 0.0 {
            100.0 * (1.0 - kept / raw)
        } else {
            0.0
        }
    };
    ui.small(format!(
        "Proxy loss each column adds: rounding it without compensation would cost (w-q)^2 H_jj/2 \
         (dashed); after the OBS update moved the later columns it costs (w-q)^2/(2 U_jj^2) (solid): \
         the OBS update removes {:.1}% of it for GPTQ, {:.1}% for GPTAQ.",
        removed(&s.gptq),
        removed(&s.gptaq)
    ));
    ui.horizontal(|ui| {
        let w = (ui.available_width() / 2.0 - 8.0).max(200.0);
        ui.vertical(|ui| {
            ui.set_width(w);
            ui.label("proxy loss per column (log10)");
            Plot::new("lab_trace_proxy")
                .height(200.0)
                .legend(Legend::default())
                .allow_scroll(false)
                .x_axis_label("processing position")
                .y_axis_formatter(|m, _| format!("1e{:.1}", m.value))
                .show(ui, |p| {
                    for (name, side, color) in [
                        ("GPTQ", &s.gptq, GPTQ_COLOR),
                        ("GPTAQ", &s.gptaq, GPTAQ_COLOR),
                    ] {
                        p.line(
                            Line::new(
                                format!("{name} uncompensated"),
                                PlotPoints::from(log10_points(series(
                                    &side.column_loss_uncompensated,
                                ))),
                            )
                            .color(color)
                            .style(LineStyle::dashed_loose()),
                        );
                        p.line(
                            Line::new(
                                format!("{name} after OBS update"),
                                PlotPoints::from(log10_points(series(&side.column_loss))),
                            )
                            .color(color),
                        );
                    }
                });
        });
        ui.vertical(|ui| {
            ui.set_width(w);
            ui.label("output error, running sum of the columns' shares");
            Plot::new("lab_trace_output")
                .height(200.0)
                .legend(Legend::default())
                .allow_scroll(false)
                .x_axis_label("processing position")
                .show(ui, |p| {
                    for (name, side, color) in [
                        ("GPTQ", &s.gptq, GPTQ_COLOR),
                        (&*format!("GPTAQ a={:.2}", s.alpha), &s.gptaq, GPTAQ_COLOR),
                    ] {
                        p.line(
                            Line::new(name, PlotPoints::from(cumulative(&side.column_output)))
                                .color(color)
                                .width(2.0),
                        );
                    }
                });
        });
    });
    ui.small(
        "Each column's share of the output error is <R, R_j>, R = (W-Q) Xq^T + W (Xfp-Xq)^T the \
         output residual and R_j the part input feature j causes; the running sums end at the \
         output errors. Where the GPTAQ curve runs below GPTQ's, the P term has removed residual \
         downstream.",
    );
}

fn heatmaps_ui(ui: &mut egui::Ui, s: &LabStudy) {
    ui.label(
        "heatmaps (mean |.| per block; rows = output features, columns = input features in \
         processing order; GPTQ and GPTAQ share each colour scale)",
    );
    let size = Vec2::splat(150.0);
    let hover = "the compensation is w_pre - w: how far the updates moved each weight before it was \
                 quantized";
    let shared = |a: &crate::lab::heatmap::Heatmap, b: &crate::lab::heatmap::Heatmap| {
        Some(a.max().max(b.max()))
    };
    let q_scale = shared(&s.gptq.heat_q, &s.gptaq.heat_q).map(|m| m.max(s.heat_w.max()));
    let e_scale = shared(&s.gptq.heat_err, &s.gptaq.heat_err);
    let c_scale = shared(&s.gptq.heat_comp, &s.gptaq.heat_comp);
    egui::Grid::new("lab_heatmaps").show(ui, |ui| {
        heatmap_ui(ui, "W", &s.heat_w, size, q_scale, &[], hover);
        for (name, side) in [("GPTQ", &s.gptq), ("GPTAQ", &s.gptaq)] {
            heatmap_ui(
                ui,
                &format!("{name} Q"),
                &side.heat_q,
                size,
                q_scale,
                &[],
                hover,
            );
        }
        ui.end_row();
        ui.label("");
        for (name, side) in [("GPTQ", &s.gptq), ("GPTAQ", &s.gptaq)] {
            heatmap_ui(
                ui,
                &format!("{name} W-Q"),
                &side.heat_err,
                size,
                e_scale,
                &[],
                hover,
            );
        }
        ui.end_row();
        ui.label("");
        for (name, side) in [("GPTQ", &s.gptq), ("GPTAQ", &s.gptaq)] {
            if side.heat_comp.is_empty() && s.solver == LabSolver::Gpu {
                ui.label(format!(
                    "{name} compensation {}",
                    gpu_missing(s, "w_pre - w")
                ));
            } else if side.heat_comp.is_empty() {
                ui.label(format!("{name}: no compensation (RTN fallback)"));
            } else {
                heatmap_ui(
                    ui,
                    &format!("{name} compensation"),
                    &side.heat_comp,
                    size,
                    c_scale,
                    &[],
                    hover,
                );
            }
        }
        ui.end_row();
    });
}

fn p_and_diag_ui(ui: &mut egui::Ui, s: &LabStudy) {
    ui.horizontal(|ui| {
        let w = (ui.available_width() / 2.0 - 8.0).max(200.0);
        ui.vertical(|ui| {
            ui.set_width(w);
            ui.label(format!(
                "row norms of P = alpha triu1(D U^T) U at alpha = {:.2}",
                s.alpha
            ));
            if s.p_row_norms.is_empty() && s.solver == LabSolver::Gpu && s.gptaq.fallback.is_none() {
                ui.label(gpu_missing(s, "P stays on the GPU"));
            } else if s.p_row_norms.is_empty() {
                ui.label("(no P: GPTAQ fell back to RTN)");
            } else {
                Plot::new("lab_p_norms")
                    .height(170.0)
                    .allow_scroll(false)
                    .x_axis_label("processing position")
                    .show(ui, |p| {
                        p.line(
                            Line::new("||P[k,:]||", PlotPoints::from(series(&s.p_row_norms)))
                                .color(GPTAQ_COLOR),
                        );
                    });
                ui.small(
                    "Row k of P is how strongly feature k's inherited input error w_k (Xfp-Xq)_k \
                     is pushed onto the later columns; the last row is 0 (nothing left to absorb it).",
                );
            }
        });
        ui.vertical(|ui| {
            ui.set_width(w);
            ui.label("diag(H) along the processing order (log10)");
            let pts: Vec<f64> = s.h_diag.iter().map(|v| f64::from(*v)).collect();
            Plot::new("lab_hdiag")
                .height(170.0)
                .allow_scroll(false)
                .x_axis_label("processing position")
                .y_axis_formatter(|m, _| format!("1e{:.1}", m.value))
                .show(ui, |p| {
                    p.line(
                        Line::new("diag(H)", PlotPoints::from(log10_points(series(&pts))))
                            .color(palette::KINDS[2]),
                    );
                });
        });
    });
}

fn compare_ui(ui: &mut egui::Ui, st: &mut AppState) {
    let Some(s) = st.lab.study.as_deref() else {
        if st.lab.solving.is_some() {
            ui.label("Solving GPTQ and GPTAQ on the worker...");
        }
        return;
    };
    ui.horizontal(|ui| {
        numbers_ui(ui, s);
        bars_ui(ui, s);
    });
    sweep_ui(ui, s);
    traces_ui(ui, s);
    heatmaps_ui(ui, s);
    p_and_diag_ui(ui, s);
}

/// One paragraph per stage of the sweep (ASCII; GPTQ paper = Frantar et al. 2022, Algorithm 1).
fn stage_text(snap: &StepSnapshot) -> (&'static str, String) {
    let gptaq = matches!(snap.method, crate::quant::Method::Gptaq { .. });
    match snap.stage {
        Stage::Start => (
            "start: U and P are ready, nothing is quantized",
            format!(
                "The solver has zeroed dead columns, {}damped H and computed U, the upper Cholesky \
                 factor of H^-1 (algorithm.md 1.2 steps 3-7){}. The columns are now quantized one \
                 by one in blocks of {}: press \"Next column\" to watch one rank-1 update, \"Next \
                 block\" to finish a block and apply its deferred update to all later columns.",
                if snap.config.act_order {
                    "sorted the columns by descending diag(H) (act-order), "
                } else {
                    ""
                },
                if gptaq {
                    "; GPTAQ has also built P = alpha * triu1(D U^T) U from the asymmetry statistics D \
                     (algorithm.md 2.2)"
                } else {
                    ""
                },
                snap.block_size
            ),
        ),
        Stage::Column => (
            "in-block OBS update (a rank-1 update of the block)",
            format!(
                "Column k was rounded to its group's grid: q = quant(w), e = (w - q) / U_kk. The OBS \
                 update w_j <- w_j - e * U_kj for the later columns j of the same block (GPTQ paper, \
                 Algorithm 1; algorithm.md 1.2) makes the not yet quantized weights absorb the \
                 rounding error as well as the Hessian allows; the error left is (w-q)^2/(2 U_kk^2).{} \
                 Columns of later blocks are not touched: their share of the update is deferred to the \
                 block's end (lazy batch). \"changed by this step\" shows exactly this band.",
                if gptaq {
                    " GPTAQ adds + w * P_kj (the in-block part of the paper's eq. 18; algorithm.md 2.2): \
                     the later columns also take over feature k's inherited output residual \
                     w_k (Xfp - Xq)_k, scaled by alpha."
                } else {
                    ""
                }
            ),
        ),
        Stage::BlockUpdate => (
            "cross-block lazy batch update (one GEMM)",
            format!(
                "Every column of the block [i1, i2) is quantized. The updates the block owes the \
                 columns after it were collected and are now applied at once: W[:, i2:] -= Err1 * \
                 U[i1:i2, i2:] (GPTQ paper, 'Lazy Batch-Updates'; algorithm.md 1.2){}. This is \
                 mathematically the same as applying each rank-1 update immediately, but one \
                 compute-bound matrix product replaces {} memory-bound rank-1 updates of the whole \
                 matrix. \"changed by this step\" now covers every later column.",
                if gptaq {
                    " and W[:, i2:] += W1 * P[i1:i2, i2:] for GPTAQ, where W1 holds the block's \
                     quantized values (algorithm.md 2.2)"
                } else {
                    ""
                },
                snap.block_size
            ),
        ),
        Stage::Done => (
            "done: every column is quantized",
            "The sweep is finished. The result is bit for bit the one-shot solve of the same \
             settings (the step mode runs the reference solver's own steps); its errors are below."
                .to_string(),
        ),
    }
}

fn step_ui(
    ui: &mut egui::Ui,
    st: &mut AppState,
    out: &mut Vec<UiAction>,
    rows: usize,
    cols: usize,
) {
    ui.small(format!(
        "The step mode runs the f64 reference sweep on the CPU of the worker: modules up to \
         {STEP_MAX_COLS} input columns and {STEP_MAX_WEIGHTS} weights."
    ));
    if cols > STEP_MAX_COLS || rows.saturating_mul(cols) > STEP_MAX_WEIGHTS {
        ui.colored_label(
            palette::POOR,
            format!("This module ({rows} x {cols}) is too large for the step mode."),
        );
        return;
    }
    let alpha = st.lab.settings.alpha;
    let busy = st.lab.stepping;
    let started = st.lab.step.is_some();
    let done = st
        .lab
        .step
        .as_ref()
        .is_some_and(|s| s.next == SweepAction::Done);
    let mut request: Option<Option<StepRequest>> = None;
    ui.horizontal_wrapped(|ui| {
        ui.label("sweep:");
        ui.radio_value(&mut st.lab.step_method, StepMethod::Gptq, "GPTQ");
        ui.radio_value(
            &mut st.lab.step_method,
            StepMethod::Gptaq,
            format!("GPTAQ (alpha {alpha:.2})"),
        );
        let start_label = if started { "Reset" } else { "Start stepping" };
        if ui
            .add_enabled(!busy, egui::Button::new(start_label))
            .on_hover_text("(Re)start the sweep with the settings above")
            .clicked()
        {
            request = Some(None);
        }
        let can = started && !busy && !done;
        for (label, req, tip) in [
            (
                "Next column",
                StepRequest::NextColumn,
                "Quantize one column (at a block's end: apply the block's update)",
            ),
            (
                "Next block",
                StepRequest::NextBlock,
                "Finish the block and apply the cross-block GEMM update",
            ),
            ("Run to end", StepRequest::RunToEnd, "Finish the sweep"),
        ] {
            if ui
                .add_enabled(can, egui::Button::new(label))
                .on_hover_text(tip)
                .clicked()
            {
                request = Some(Some(req));
            }
        }
        if busy {
            ui.spinner();
        }
    });
    if let Some(req) = request
        && let Some(cmd) = st.lab_step_command(req)
    {
        out.push(UiAction::Send(cmd));
    }
    let Some(snap) = st.lab.step.as_deref() else {
        return;
    };
    let c = &snap.config;
    ui.label(format!(
        "stepping {} W{} {} {} damp {} block {}",
        match snap.method {
            crate::quant::Method::Gptaq { alpha } => format!("GPTAQ alpha={alpha:.2}"),
            m => m.name().to_uppercase(),
        },
        c.bits,
        c.group_size
            .map_or_else(|| "per-row".to_string(), |g| format!("g{g}")),
        if c.act_order { "act-order" } else { "" },
        c.damp_percent,
        snap.block_size
    ));
    let (name, text) = stage_text(snap);
    ui.label(RichText::new(format!("stage: {name}")).strong());
    ui.label(text);
    ui.add(
        egui::ProgressBar::new(snap.done_columns as f32 / snap.cols.max(1) as f32).text(format!(
            "{} / {} columns quantized, block [{}, {}), proxy loss so far {:.4e}",
            snap.done_columns, snap.cols, snap.block.0, snap.block.1, snap.proxy_loss
        )),
    );
    if let Some(k) = &snap.last_column {
        let mut line = format!(
            "last column: position {} (input feature {}), |w-q| = {:.3e}, proxy loss {:.3e}, \
             in-block OBS update |e x U[k, k+1:{}]| = {:.3e}",
            k.k, k.original, k.error_norm, k.proxy_loss, k.i2, k.obs_update_norm
        );
        if let Some(g) = k.gptaq_update_norm {
            line.push_str(&format!(", GPTAQ term |w x P[k, k+1:{}]| = {g:.3e}", k.i2));
        }
        if snap.columns_this_step > 1 {
            line = format!("{} columns this step; {line}", snap.columns_this_step);
        }
        ui.small(line);
    }
    if let Some(b) = &snap.block_update {
        let mut line = format!(
            "cross-block update of [{}, {}) onto columns {}..{}: |Err1 U| = {:.3e}",
            b.i1, b.i2, b.i2, snap.cols, b.obs_update_norm
        );
        if let Some(g) = b.gptaq_update_norm {
            line.push_str(&format!(", |W1 P| = {g:.3e}"));
        }
        ui.small(line);
    }
    if let Some(m) = &snap.final_metrics {
        ui.label(format!(
            "final errors: quant {:.4e}, asym {:.4e}, output {:.4e}, proxy loss {:.4e}",
            m.quant_error, m.asym_error, m.output_error, m.proxy_loss
        ));
    }
    let markers = [
        (snap.done_columns, palette::GOOD),
        (snap.block.0, palette::POOR),
        (snap.block.1, palette::POOR),
    ];
    let w = ((ui.available_width() - 24.0) / 3.0).clamp(160.0, 420.0);
    let size = Vec2::new(w, (w * 0.6).max(120.0));
    ui.horizontal(|ui| {
        heatmap_ui(
            ui,
            "weights now |W|",
            &snap.heat_now,
            size,
            None,
            &markers,
            "quantized columns hold q, the current block its in-block values, later columns W with \
             the cross-block updates so far (green line: quantized so far; orange: current block)",
        );
        heatmap_ui(
            ui,
            "moved since start",
            &snap.heat_moved,
            size,
            None,
            &markers,
            "|W_now - W_start|: rounding (quantized columns) and compensation (the rest)",
        );
        heatmap_ui(
            ui,
            "changed by this step",
            &snap.heat_step,
            size,
            None,
            &markers,
            "|W_now - W_before|: a column step moves only its own block, a block update every later \
             column",
        );
    });
}
