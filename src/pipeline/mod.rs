//! Layer-by-layer quantization driver.

pub mod events;

pub use events::{Event, LayerReport, MemoryPlan, ModuleReport, RunReport};
