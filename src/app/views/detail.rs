//! The module detail panel: the row's numbers (both runs in a comparison), and the worker's
//! pictures: |W| and |W-Q| heatmaps, the weights on the quantization grid, the per-column error
//! along the processing order.

use egui::{RichText, Sense, Vec2};
use egui_plot::{Bar, BarChart, Line, Plot, PlotPoints, VLine};

use super::super::AppState;
use super::super::state::{ModuleDetail, Origin, RunSlot};
use super::{fmt_sci, palette, ramp};

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
    ui.add_space(4.0);
    ui.small(
        "diag(H) spectrum and per-column proxy loss are not recorded by the pipeline yet \
         (they need the Hessian, which stays on the GPU).",
    );
}

fn heatmap_ui(ui: &mut egui::Ui, title: &str, rows: usize, cols: usize, v: &[f32]) {
    ui.vertical(|ui| {
        let max = v.iter().copied().fold(0f32, f32::max);
        ui.label(format!("{title} (max {max:.3e})"));
        let side = 190.0f32;
        let (rect, resp) = ui.allocate_exact_size(Vec2::splat(side), Sense::hover());
        let (cw, ch) = (side / cols.max(1) as f32, side / rows.max(1) as f32);
        let painter = ui.painter_at(rect);
        for r in 0..rows {
            for c in 0..cols {
                let x = v.get(r * cols + c).copied().unwrap_or(0.0);
                let t = if max > 0.0 { x / max } else { 0.0 };
                let min = rect.min + Vec2::new(c as f32 * cw, r as f32 * ch);
                painter.rect_filled(
                    egui::Rect::from_min_size(min, Vec2::new(cw + 0.5, ch + 0.5)),
                    0.0,
                    ramp(t.sqrt()),
                );
            }
        }
        resp.on_hover_text(format!(
            "{title}: rows = output features, columns = input features, {rows}×{cols} blocks (mean per block, colour ~ sqrt value)"
        ));
    });
}

fn pictures_ui(ui: &mut egui::Ui, d: &ModuleDetail) {
    ui.horizontal(|ui| {
        heatmap_ui(ui, "|W|", d.heat_rows, d.heat_cols, &d.weight_heat);
        heatmap_ui(ui, "|W-Q|", d.heat_rows, d.heat_cols, &d.error_heat);
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
}
