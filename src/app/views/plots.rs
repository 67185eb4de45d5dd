//! Error curves over the layer index: one line per module kind, GPTQ dashed and GPTAQ solid when
//! both runs of a comparison are shown. This is the picture of how the asymmetry error accumulates
//! under GPTQ and how GPTAQ compensates it.

use egui_plot::{Legend, Line, LineStyle, Plot, PlotPoints};

use crate::model::ModuleKind;

use super::super::AppState;
use super::super::state::{Metric, RunData, RunSlot};
use super::palette;

fn transform(pts: Vec<[f64; 2]>, log: bool) -> Vec<[f64; 2]> {
    if !log {
        return pts;
    }
    pts.into_iter()
        .filter(|p| p[1] > 0.0 && p[1].is_finite())
        .map(|p| [p[0], p[1].log10()])
        .collect()
}

fn style(slot: RunSlot) -> LineStyle {
    match slot {
        RunSlot::Gptq => LineStyle::dashed_loose(),
        _ => LineStyle::Solid,
    }
}

fn suffix(r: &RunData, comparison: bool) -> String {
    if comparison {
        format!(" ({})", r.slot.label())
    } else {
        String::new()
    }
}

fn plot<'a>(id: &str, title: &str, log: bool) -> Plot<'a> {
    let p = Plot::new(id)
        .height(230.0)
        .legend(Legend::default())
        .x_axis_label("layer")
        .y_axis_label(if log {
            format!("log10 {title}")
        } else {
            title.to_string()
        })
        .allow_scroll(false);
    if log {
        p.y_axis_formatter(|m, _| format!("1e{:.0}", m.value))
    } else {
        p
    }
}

pub fn plots_ui(ui: &mut egui::Ui, st: &mut AppState) {
    let Some(session) = st.session.as_ref() else {
        return;
    };
    let comparison = session.is_comparison();
    ui.horizontal(|ui| {
        if comparison {
            ui.checkbox(&mut st.show_gptq, "GPTQ curves")
                .on_hover_text("Overlay the GPTQ run (dashed)");
            ui.checkbox(&mut st.show_gptaq, "GPTAQ curves")
                .on_hover_text("Overlay the GPTAQ run (solid)");
        }
        ui.checkbox(&mut st.log_scale, "Log scale")
            .on_hover_text("Plot errors on a log10 axis");
    });
    let runs: Vec<&RunData> = session
        .runs
        .iter()
        .filter(|r| match r.slot {
            RunSlot::Gptq => st.show_gptq,
            RunSlot::Gptaq => st.show_gptaq,
            RunSlot::Single => true,
        })
        .collect();
    let log = st.log_scale;
    egui::ScrollArea::vertical()
        .id_salt("plots_scroll")
        .show(ui, |ui| {
            for metric in [Metric::Quant, Metric::Asym, Metric::Output] {
                ui.label(metric.title());
                let any = runs
                    .iter()
                    .any(|r| r.modules.iter().any(|m| metric.value(m).is_some()));
                if !any {
                    ui.label("(not measured: enable Error metrics or use GPTAQ)");
                    continue;
                }
                plot(&format!("plot_{metric:?}"), metric.title(), log).show(ui, |p| {
                    for r in &runs {
                        for (k, kind) in ModuleKind::ALL.into_iter().enumerate() {
                            let pts = transform(r.series(metric, kind), log);
                            if pts.is_empty() {
                                continue;
                            }
                            p.line(
                                Line::new(
                                    format!("{}{}", kind.short_name(), suffix(r, comparison)),
                                    PlotPoints::from(pts),
                                )
                                .color(palette::KINDS[k])
                                .style(style(r.slot))
                                .width(1.5),
                            );
                        }
                    }
                });
            }
            ui.label("hidden-state deviation ||h_q-h_fp||/||h_fp|| after each layer");
            plot("plot_hidden", "||h_q-h_fp||/||h_fp||", log).show(ui, |p| {
                for r in &runs {
                    let pts = transform(r.hidden_series(), log);
                    if pts.is_empty() {
                        continue;
                    }
                    p.line(
                        Line::new(
                            format!("hidden{}", suffix(r, comparison)),
                            PlotPoints::from(pts),
                        )
                        .color(palette::HIDDEN)
                        .style(style(r.slot))
                        .width(2.0),
                    );
                }
            });
            ui.label("proxy loss (what the solver minimises)");
            plot("plot_proxy", "proxy loss", log).show(ui, |p| {
                for r in &runs {
                    for (k, kind) in ModuleKind::ALL.into_iter().enumerate() {
                        let pts = transform(r.series(Metric::Proxy, kind), log);
                        if pts.is_empty() {
                            continue;
                        }
                        p.line(
                            Line::new(
                                format!("{}{}", kind.short_name(), suffix(r, comparison)),
                                PlotPoints::from(pts),
                            )
                            .color(palette::KINDS[k])
                            .style(style(r.slot)),
                        );
                    }
                }
            });
        });
}
