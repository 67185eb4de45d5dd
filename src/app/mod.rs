//! The egui desktop application.
