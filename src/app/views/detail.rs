//! The module detail panel: the row's numbers (both runs in a comparison), and the worker's
//! pictures: |W| and |W-Q| heatmaps, the weights on the quantization grid, the per-column error
//! along the processing order, the diag(H) spectrum and GPTQ's per-column proxy loss.

use egui::{RichText, Vec2};
use egui_plot::{Bar, BarChart, Legend, Line, LineStyle, Plot, PlotPoints, VLine};

use super::super::AppState;
use super::super::state::{ModuleDetail, Origin, RunSlot};
use super::{fmt_sci, heatmap_ui, log10_points, palette};

pub fn detail_ui(ui: &mut egui::Ui, st: &mut AppState) {
    let Some(sel) = st.selected.clone() else {
        return;
    };
    ui.horizontal(|ui| {
        ui.heading("Module detail");
        if ui
            .button("Close")
            .on_hover_text("Close the module detail")
            .clicked()
        {
            st.selected = None;
            st.detail = None;
        }
    });
    ui.label(RichText::new(format!("layer {} · {}", sel.layer, sel.module)).strong());
    let Some(session) = st.session.as_ref() else {
        return;
    };
    let slots: Vec<RunSlot> = session.slots.clone();
    egui::Grid::new("detail_numbers")
        .num_columns(slots.len() + 1)
        .striped(true)
        .show(ui, |ui| {
            ui.label("");
            for s in &slots {
                ui.label(RichText::new(s.label()).strong());
            }
            ui.end_row();
            let reports: Vec<_> = slots
                .iter()
                .map(|s| session.run(*s).and_then(|r| r.find(sel.layer, &sel.module)))
                .collect();
            let mut row = |name: &str, f: &dyn Fn(&crate::pipeline::ModuleReport) -> String| {
                ui.label(name);
                for r in &reports {
                    ui.label(r.map_or_else(|| "–".into(), f));
                }
                ui.end_row();
            };
            row("shape", &|m| format!("{}×{}", m.rows, m.cols));
            row("samples", &|m| m.nsamples.to_string());
            row("proxy loss", &|m| format!("{:.4e}", m.proxy_loss));
            row("quant error", &|m| fmt_sci(m.quant_error));
            row("asym error", &|m| fmt_sci(m.asym_error));
            row("output error", &|m| fmt_sci(m.output_error));
            row("damp", &|m| format!("{:.4}", m.damp));
            row("fallback", &|m| {
                m.fallback.clone().unwrap_or_else(|| "none".into())
            });
            row("secs", &|m| format!("{:.3}", m.secs));
        });
    ui.separator();
    let from_report = matches!(session.origin, Origin::Report(_));
    let active = session.is_active();
    match &st.detail {
        Some(Ok(d)) => pictures_ui(ui, d),
        Some(Err(e)) => {
            ui.colored_label(palette::POOR, e);
        }
        None if from_report => {
            ui.label(
                "Weight pictures need the run's weights; a loaded report holds only the numbers.",
            );
        }
        None if active => {
            ui.label("Weight pictures appear when the run has finished.");
        }
        None => {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label("computing the weight pictures…");
            });
        }
    }
}

fn pictures_ui(ui: &mut egui::Ui, d: &ModuleDetail) {
    let side = Vec2::splat(190.0);
    let hover = "rows = output features, columns = input features";
    ui.horizontal(|ui| {
        heatmap_ui(ui, "|W|", &d.weight_heat, side, None, &[], hover);
        heatmap_ui(ui, "|W-Q|", &d.error_heat, side, None, &[], hover);
    });
    ui.label("weights on the quantization grid (w/scale + zero; lines = grid points)");
    let n = d.hist.len().max(1);
    let width = (d.hist_hi - d.hist_lo) / n as f64;
    let bars: Vec<Bar> = d
        .hist
        .iter()
        .enumerate()
        .map(|(i, c)| Bar::new(d.hist_lo + (i as f64 + 0.5) * width, f64::from(*c)).width(width))
        .collect();
    let maxq = d.maxq;
    Plot::new(format!("hist_{:?}_{}_{}", d.slot, d.layer, d.module))
        .height(170.0)
        .allow_scroll(false)
        .show(ui, |p| {
            p.bar_chart(BarChart::new("weights", bars).color(palette::INFO));
            if maxq <= 16 {
                for g in 0..=maxq {
                    p.vline(
                        VLine::new("grid", f64::from(g))
                            .color(palette::POOR)
                            .width(0.5),
                    );
                }
            }
        });
    ui.label(if d.act_order {
        "relative column error ||w_j-q_j||²/||w_j||² in act-order processing order"
    } else {
        "relative column error ||w_j-q_j||²/||w_j||² by column"
    });
    let pts: Vec<[f64; 2]> = d
        .column_error
        .iter()
        .enumerate()
        .map(|(i, e)| [i as f64, f64::from(*e)])
        .collect();
    Plot::new(format!("colerr_{:?}_{}_{}", d.slot, d.layer, d.module))
        .height(150.0)
        .allow_scroll(false)
        .show(ui, |p| {
            p.line(Line::new("column error", PlotPoints::from(pts)).color(palette::KINDS[3]));
        });
    spectrum_ui(ui, d);
    column_loss_ui(ui, d);
}

/// diag(H) sorted (the spectrum) and along the processing order, on a log axis: with act-order
/// the two coincide, which is why act-order processes the large-diagonal columns first.
fn spectrum_ui(ui: &mut egui::Ui, d: &ModuleDetail) {
    ui.label("diag(H): sorted descending (spectrum) and along the processing order (log10)");
    let diag = match &d.h_diag {
        Ok(v) => v,
        Err(why) => {
            ui.label(RichText::new(why).italics());
            return;
        }
    };
    let sorted = log10_points(
        d.h_spectrum
            .iter()
            .enumerate()
            .map(|(i, v)| [i as f64, f64::from(*v)]),
    );
    let along = log10_points(
        diag.iter()
            .enumerate()
            .map(|(i, v)| [i as f64, f64::from(*v)]),
    );
    let (hi, lo) = (
        d.h_spectrum.first().copied().unwrap_or(0.0),
        d.h_spectrum.last().copied().unwrap_or(0.0),
    );
    ui.small(format!(
        "largest {hi:.3e}, smallest {lo:.3e}: a column with a large H_jj carries much input energy, \
         so its rounding error costs most; act-order quantizes those first while many columns are \
         still free to absorb the error{}",
        if d.act_order {
            " (act-order is on: the two lines coincide)"
        } else {
            " (act-order is off: columns go in their original order)"
        }
    ));
    Plot::new(format!("hdiag_{:?}_{}_{}", d.slot, d.layer, d.module))
        .height(160.0)
        .legend(Legend::default())
        .allow_scroll(false)
        .x_axis_label("rank / processing position")
        .y_axis_formatter(|m, _| format!("1e{:.1}", m.value))
        .show(ui, |p| {
            p.line(
                Line::new("diag(H) sorted", PlotPoints::from(sorted))
                    .color(palette::KINDS[0])
                    .width(2.0),
            );
            p.line(
                Line::new("diag(H) in processing order", PlotPoints::from(along))
                    .color(palette::KINDS[1])
                    .style(LineStyle::dashed_loose()),
            );
        });
}

/// GPTQ's proxy loss per column along the processing order, with its cumulative share.
fn column_loss_ui(ui: &mut egui::Ui, d: &ModuleDetail) {
    ui.label("proxy loss per column (w-q)^2/(2 U_jj^2) along the processing order");
    let loss = match &d.column_loss {
        Ok(v) => v,
        Err(why) => {
            ui.label(RichText::new(why).italics());
            return;
        }
    };
    let total: f64 = loss.iter().sum();
    let (peak_at, peak) = loss
        .iter()
        .copied()
        .enumerate()
        .fold((0, 0.0f64), |a, (i, v)| if v > a.1 { (i, v) } else { a });
    ui.small(format!(
        "total {total:.4e} per sequence, largest {peak:.3e} at position {peak_at}; \
         lines: each column / the largest, and the running sum / the total"
    ));
    let scale = if peak > 0.0 { peak } else { 1.0 };
    let per: Vec<[f64; 2]> = loss
        .iter()
        .enumerate()
        .map(|(i, v)| [i as f64, v / scale])
        .collect();
    let mut run = 0.0;
    let cumulative: Vec<[f64; 2]> = loss
        .iter()
        .enumerate()
        .map(|(i, v)| {
            run += v;
            [i as f64, if total > 0.0 { run / total } else { 0.0 }]
        })
        .collect();
    Plot::new(format!("colloss_{:?}_{}_{}", d.slot, d.layer, d.module))
        .height(160.0)
        .legend(Legend::default())
        .allow_scroll(false)
        .x_axis_label("processing position")
        .show(ui, |p| {
            p.line(Line::new("per column / max", PlotPoints::from(per)).color(palette::KINDS[3]));
            p.line(
                Line::new("cumulative / total", PlotPoints::from(cumulative))
                    .color(palette::KINDS[2])
                    .width(2.0),
            );
        });
}
