//! Drawing: every function here reads [`AppState`], draws it and records what the user asked for
//! as [`UiAction`]s (never blocking, never talking to the GPU).

mod detail;
mod lab;
mod plots;
mod results;
mod run;
mod settings;
mod start;

use std::path::PathBuf;

use egui::{Color32, RichText, Sense, Vec2};

use super::state::Grade;
use super::worker::Command;
use super::{AppState, Level};
use crate::lab::heatmap::Heatmap;

/// What a click asked for; the app turns these into worker commands or path handling.
pub enum UiAction {
    Send(Command),
    Open(PathBuf),
}

/// The colour tokens of the app (the only place colours are chosen).
pub mod palette {
    use egui::Color32;

    pub const GOOD: Color32 = Color32::from_rgb(0x4c, 0xaf, 0x50);
    pub const FAIR: Color32 = Color32::from_rgb(0xcd, 0xdc, 0x39);
    pub const POOR: Color32 = Color32::from_rgb(0xff, 0x98, 0x00);
    pub const BAD: Color32 = Color32::from_rgb(0xf4, 0x43, 0x36);
    pub const ERROR: Color32 = Color32::from_rgb(0xff, 0x6b, 0x6b);
    pub const INFO: Color32 = Color32::from_rgb(0x90, 0xca, 0xf9);
    /// One colour per module kind, in pipeline order (q, k, v, o, gate, up, down).
    pub const KINDS: [Color32; 7] = [
        Color32::from_rgb(0x1f, 0x77, 0xb4),
        Color32::from_rgb(0xff, 0x7f, 0x0e),
        Color32::from_rgb(0x2c, 0xa0, 0x2c),
        Color32::from_rgb(0xd6, 0x27, 0x28),
        Color32::from_rgb(0x94, 0x67, 0xbd),
        Color32::from_rgb(0x8c, 0x56, 0x4b),
        Color32::from_rgb(0xe3, 0x77, 0xc2),
    ];
    pub const HIDDEN: Color32 = Color32::from_rgb(0x17, 0xbe, 0xcf);
    /// Heatmap ramp, low to high (viridis-like).
    pub const RAMP: [Color32; 5] = [
        Color32::from_rgb(0x44, 0x01, 0x54),
        Color32::from_rgb(0x3b, 0x52, 0x8b),
        Color32::from_rgb(0x21, 0x90, 0x8d),
        Color32::from_rgb(0x5d, 0xc8, 0x63),
        Color32::from_rgb(0xfd, 0xe7, 0x25),
    ];
}

pub fn grade_color(g: Grade) -> Color32 {
    match g {
        Grade::Good => palette::GOOD,
        Grade::Fair => palette::FAIR,
        Grade::Poor => palette::POOR,
        Grade::Bad => palette::BAD,
    }
}

/// `t` in [0, 1] on the heatmap ramp.
pub fn ramp(t: f32) -> Color32 {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let n = palette::RAMP.len() - 1;
    let x = t * n as f32;
    let i = (x.floor() as usize).min(n - 1);
    let f = x - i as f32;
    let (a, b) = (palette::RAMP[i], palette::RAMP[i + 1]);
    let mix = |p: u8, q: u8| (f32::from(p) + (f32::from(q) - f32::from(p)) * f).round() as u8;
    Color32::from_rgb(mix(a.r(), b.r()), mix(a.g(), b.g()), mix(a.b(), b.b()))
}

/// Draws a heatmap of block means (colour ~ sqrt(value / scale), `scale` = its own maximum unless
/// given, e.g. shared by two maps that should be compared) with a title line, vertical marker
/// lines at matrix columns (`markers`), and `hover` as the tooltip.
pub fn heatmap_ui(
    ui: &mut egui::Ui,
    title: &str,
    map: &Heatmap,
    size: Vec2,
    scale: Option<f32>,
    markers: &[(usize, Color32)],
    hover: &str,
) {
    ui.vertical(|ui| {
        let max = scale.unwrap_or_else(|| map.max());
        ui.label(format!("{title} (max {:.2e})", map.max()));
        let (rect, resp) = ui.allocate_exact_size(size, Sense::hover());
        let painter = ui.painter_at(rect);
        let (rows, cols) = (map.rows.max(1), map.cols.max(1));
        let (cw, ch) = (size.x / cols as f32, size.y / rows as f32);
        for r in 0..map.rows {
            for c in 0..map.cols {
                let x = map.values.get(r * map.cols + c).copied().unwrap_or(0.0);
                let t = if max > 0.0 { x / max } else { 0.0 };
                let min = rect.min + Vec2::new(c as f32 * cw, r as f32 * ch);
                painter.rect_filled(
                    egui::Rect::from_min_size(min, Vec2::new(cw + 0.5, ch + 0.5)),
                    0.0,
                    ramp(t.sqrt()),
                );
            }
        }
        for &(col, color) in markers {
            let x = rect.left() + col as f32 / map.src_cols.max(1) as f32 * size.x;
            painter.vline(x, rect.y_range(), egui::Stroke::new(1.5, color));
        }
        resp.on_hover_text(format!(
            "{hover} ({} x {} matrix shown as {} x {} blocks, mean per block)",
            map.src_rows, map.src_cols, map.rows, map.cols
        ));
    });
}

/// `log10` of the positive, finite points (for plots on a log y axis).
pub fn log10_points(pts: impl IntoIterator<Item = [f64; 2]>) -> Vec<[f64; 2]> {
    pts.into_iter()
        .filter(|p| p[1] > 0.0 && p[1].is_finite())
        .map(|p| [p[0], p[1].log10()])
        .collect()
}

pub fn fmt_sci(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |x| format!("{x:.3e}"))
}

pub fn fmt_secs(s: f64) -> String {
    if s >= 3600.0 {
        format!(
            "{}h {:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    } else if s >= 60.0 {
        format!("{}m {:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{s:.1} s")
    }
}

/// The whole window.
pub fn root_ui(ui: &mut egui::Ui, st: &mut AppState, out: &mut Vec<UiAction>) {
    egui::Panel::top("top_bar").show(ui, |ui| top_bar_ui(ui, st, out));
    if !st.messages.is_empty() {
        egui::Panel::bottom("messages").show(ui, |ui| messages_ui(ui, st));
    }
    egui::Panel::left("side")
        .resizable(true)
        .default_size(340.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical()
                .id_salt("side_scroll")
                .show(ui, |ui| {
                    start::source_ui(ui, st, out);
                    ui.separator();
                    settings::settings_ui(ui, st, out);
                });
        });
    if st.selected.is_some() {
        egui::Panel::right("detail")
            .resizable(true)
            .default_size(440.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical()
                    .id_salt("detail_scroll")
                    .show(ui, |ui| detail::detail_ui(ui, st));
            });
    }
    egui::CentralPanel::default().show(ui, |ui| {
        if st.session.is_some() {
            run::session_ui(ui, st, out);
        } else if st.lab.standalone {
            lab::standalone_lab_ui(ui, st, out);
        } else {
            start::start_screen_ui(ui, st, out);
        }
    });
}

fn top_bar_ui(ui: &mut egui::Ui, st: &mut AppState, out: &mut Vec<UiAction>) {
    ui.horizontal(|ui| {
        ui.label(RichText::new("gptaq-studio").strong().size(16.0));
        ui.separator();
        if ui
            .button("Open report…")
            .on_hover_text("Reopen a saved run report (JSON) without recomputing")
            .clicked()
            && let Some(p) = rfd::FileDialog::new()
                .add_filter("run report", &["json"])
                .pick_file()
        {
            out.push(UiAction::Send(Command::LoadReport(p)));
        }
        let saved = st.session.as_ref().and_then(|s| s.saved_report());
        let save = ui
            .add_enabled(saved.is_some(), egui::Button::new("Save report…"))
            .on_hover_text("Save the finished run(s) as JSON (the CLI's --report format)");
        if save.clicked()
            && let Some(report) = saved
            && let Some(path) = rfd::FileDialog::new()
                .add_filter("run report", &["json"])
                .set_file_name("report.json")
                .save_file()
        {
            out.push(UiAction::Send(Command::SaveReport {
                path,
                report: Box::new(report),
            }));
        }
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            match &st.device {
                Some(Ok(d)) => ui.label(format!("GPU: {} ({})", d.name, d.backend)),
                Some(Err(_)) => ui.colored_label(palette::ERROR, "GPU: none"),
                None if st.gpu_pending => ui.label("GPU: opening…"),
                None => ui.label("GPU: none"),
            };
        });
    });
}

fn messages_ui(ui: &mut egui::Ui, st: &mut AppState) {
    let first = st.messages.len().saturating_sub(4);
    let mut dismiss = None;
    for (i, m) in st.messages.iter().enumerate().skip(first) {
        ui.horizontal(|ui| {
            let (color, tag) = match m.level {
                Level::Error => (palette::ERROR, "error"),
                Level::Info => (palette::INFO, "note"),
            };
            if ui.small_button("x").on_hover_text("Dismiss").clicked() {
                dismiss = Some(i);
            }
            ui.colored_label(color, format!("{tag}: {}", m.text));
        });
    }
    if let Some(i) = dismiss {
        st.messages.remove(i);
    }
    if st.messages.len() > 1 && ui.small_button("Clear messages").clicked() {
        st.messages.clear();
    }
}
