//! GPU compute through wgpu: adapter selection ([`context`]), typed buffers ([`buffer`]), matrices
//! larger than one binding ([`matrix`]), the shader registry and pipeline cache ([`kernels`]) and
//! the general-purpose kernels ([`ops`]).
//! Nothing in here knows about models or quantization.

pub mod buffer;
pub mod context;
pub mod kernels;
pub mod matrix;
pub mod ops;
pub(crate) mod profile;
pub mod timing;
pub mod tune;

pub use buffer::{GpuBuffer, PendingRead, WriteWindow};
pub use context::{AdapterSummary, BackendChoice, GpuContext, GpuError, GpuOptions, list_adapters};
pub use kernels::Recorder;
pub use matrix::GpuMatrix;
pub use timing::{KernelTime, format_kernel_times};

/// For tests and benches: a context from the environment (`GPTAQ_BACKEND`, `GPTAQ_ADAPTER`), or
/// `None` with a note when no adapter exists. Under `CI=true` a missing adapter is an error
/// (GPU tests must fail there, never skip silently).
pub fn test_context() -> Option<GpuContext> {
    match GpuContext::new(&GpuOptions::from_env()) {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            let ci = std::env::var("CI")
                .map(|v| v == "true" || v == "1")
                .unwrap_or(false);
            assert!(!ci, "CI=true but no GPU adapter: {e}");
            eprintln!("note: skipping GPU test, no adapter: {e}");
            None
        }
    }
}
