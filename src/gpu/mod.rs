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
pub(crate) mod upload;

pub use buffer::{GpuBuffer, PendingRead, WriteWindow};
pub use context::{
    AdapterSummary, BackendChoice, GpuContext, GpuError, GpuOptions, KERNELS_COOP_CONFIG,
    list_adapters,
};
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
            assert!(!under_ci(), "CI=true but no GPU adapter: {e}");
            eprintln!("note: skipping GPU test, no adapter: {e}");
            None
        }
    }
}

/// For tests: turns kernel timing on ([`timing`]) and says whether it is on. Without the
/// adapter's TIMESTAMP_QUERY a test is skipped with a note, except under `CI=true`, where it
/// fails (CI's lavapipe has timestamps).
pub fn test_kernel_timing(ctx: &GpuContext) -> bool {
    let on = ctx.set_kernel_timing(true);
    if !on {
        assert!(
            !under_ci(),
            "CI=true but the adapter has no TIMESTAMP_QUERY"
        );
        eprintln!("note: skipping GPU timing test, no TIMESTAMP_QUERY");
    }
    on
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
