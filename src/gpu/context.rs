//! Adapter selection and device creation.
//!
//! The context asks for the adapter's *real* limits instead of wgpu's WebGPU defaults (128 MiB per
//! binding, 256 MiB per buffer): an 8B model's 14336² f32 Hessian alone is 784 MiB. Optional
//! features (f16, subgroups, timestamps, cooperative matrices) are requested only when present and
//! recorded, so kernels can choose a fast path and fall back to plain f32 everywhere else.
//!
//! wgpu reports most errors asynchronously through the device's uncaptured-error handler; that
//! handler would panic by default. We record them instead and turn them into [`GpuError`]s at the
//! next synchronisation point ([`GpuContext::check`]), so a bad kernel launch or a lost device
//! becomes a message, not a crash.

use std::sync::{Arc, Mutex};

use super::kernels::KernelCache;

/// Which graphics API to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BackendChoice {
    /// Vulkan, Metal or DX12, whichever the platform has.
    #[default]
    Auto,
    Vulkan,
    Metal,
    Dx12,
}

impl BackendChoice {
    pub fn backends(self) -> wgpu::Backends {
        match self {
            BackendChoice::Auto => {
                wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12
            }
            BackendChoice::Vulkan => wgpu::Backends::VULKAN,
            BackendChoice::Metal => wgpu::Backends::METAL,
            BackendChoice::Dx12 => wgpu::Backends::DX12,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" | "" => Some(Self::Auto),
            "vulkan" | "vk" => Some(Self::Vulkan),
            "metal" | "mtl" => Some(Self::Metal),
            "dx12" | "d3d12" => Some(Self::Dx12),
            _ => None,
        }
    }
}

/// How to pick the adapter. `adapter` is a case-insensitive substring of the adapter name.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct GpuOptions {
    pub backend: BackendChoice,
    pub adapter: Option<String>,
}

impl GpuOptions {
    /// Options from `GPTAQ_BACKEND` / `GPTAQ_ADAPTER` (used by tests and benches; the CLI's flags
    /// read the same variables through clap).
    pub fn from_env() -> Self {
        let backend = std::env::var("GPTAQ_BACKEND")
            .ok()
            .and_then(|s| BackendChoice::parse(&s))
            .unwrap_or_default();
        let adapter = std::env::var("GPTAQ_ADAPTER")
            .ok()
            .filter(|s| !s.is_empty());
        Self { backend, adapter }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "no GPU adapter found for backend {backend:?}{filter}. Install a GPU driver with Vulkan, Metal or \
         DX12 support; on a machine without a GPU install Mesa's software Vulkan driver (Debian/Ubuntu: \
         `apt-get install mesa-vulkan-drivers libvulkan1`, which provides lavapipe)"
    )]
    NoAdapter {
        backend: BackendChoice,
        filter: String,
    },
    #[error("adapter `{name}` refused the device request: {message}")]
    RequestDevice { name: String, message: String },
    #[error(
        "GPU out of memory allocating {what} ({bytes} bytes); reduce --nsamples / --seqlen or use host streams"
    )]
    OutOfMemory { what: String, bytes: u64 },
    #[error(
        "{what} needs {bytes} bytes in one buffer but the adapter allows at most {limit} per binding"
    )]
    TooLarge {
        what: String,
        bytes: u64,
        limit: u64,
    },
    #[error("GPU validation error: {0}")]
    Validation(String),
    #[error("GPU device lost: {0}")]
    DeviceLost(String),
    #[error("GPU readback failed: {0}")]
    Readback(String),
}

/// The allocator's block sizes. Default `MemoryUsage` (wgpu-hal: 8–64 MiB blocks, so every buffer
/// above 64 MiB — all the n×n statistics, weights and activations of a large model — gets its own
/// allocation, returned to the driver when dropped, and the blocks that small buffers share stay
/// small): this tool's point is fitting a model in a given card, and on the H200 nvidia-smi showed
/// up to 2 GiB above our own buffers with `Performance` (128–256 MiB blocks, BENCHMARKS.md).
/// `GPTAQ_MEMORY_HINTS=performance` restores wgpu's default, to compare.
fn memory_hints() -> wgpu::MemoryHints {
    match std::env::var("GPTAQ_MEMORY_HINTS").as_deref() {
        Ok("performance") => wgpu::MemoryHints::Performance,
        _ => wgpu::MemoryHints::MemoryUsage,
    }
}

/// What the adapter granted, for `devices`, reports and the GUI.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub features: Vec<String>,
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    /// The adapter's subgroup sizes (min, max): the staged tensor-core GEMM needs exactly 32.
    #[serde(default)]
    pub subgroup_sizes: (u32, u32),
    /// Storage buffers one kernel may bind: the solve's fastest sweep needs nine (quant/gpu.rs
    /// `SweepKernel`), one more than WebGPU's portable minimum.
    #[serde(default)]
    pub max_storage_buffers_per_stage: u32,
    /// The cooperative-matrix configurations the adapter offers, as `MxNxK a->c` (e.g.
    /// `16x16x16 f16->f32`); the tensor-core kernels use one of them only
    /// ([`KERNELS_COOP_CONFIG`]).
    #[serde(default)]
    pub coop_configs: Vec<String>,
}

/// The one cooperative-matrix configuration every tensor-core kernel is written for
/// (`coop_mat16x16` with f16 A and B and an f32 accumulator in shaders/gemm_coop.wgsl and
/// gemm_staged_coop.wgsl), as [`AdapterSummary::coop_configs`] names it (ASCII: the GUI's font
/// has no arrow glyph).
pub const KERNELS_COOP_CONFIG: &str = "16x16x16 f16->f32";

/// How [`AdapterSummary::coop_configs`] names a configuration.
fn coop_config_name(p: &wgpu::CooperativeMatrixProperties) -> String {
    let ty = |t: wgpu::CooperativeScalarType| match t {
        wgpu::CooperativeScalarType::F32 => "f32",
        wgpu::CooperativeScalarType::F16 => "f16",
        wgpu::CooperativeScalarType::I32 => "i32",
        wgpu::CooperativeScalarType::U32 => "u32",
    };
    format!(
        "{}x{}x{} {}->{}",
        p.m_size,
        p.n_size,
        p.k_size,
        ty(p.ab_type),
        ty(p.cr_type)
    )
}

/// Whether an adapter offering these configurations can run the tensor-core kernels. wgpu grants
/// `EXPERIMENTAL_COOPERATIVE_MATRIX` where any configuration exists, but the shapes differ by
/// vendor: Metal's simdgroup matrices are 8×8 only, and Intel's Vulkan driver offers shapes 8
/// rows tall, so the feature alone would let a 16×16 kernel reach a driver that cannot compile it.
pub fn coop_configs_fit_kernels(configs: &[String]) -> bool {
    configs.iter().any(|c| c == KERNELS_COOP_CONFIG)
}

impl AdapterSummary {
    /// Why the tensor-core kernels cannot run on this device, or `None` where they can (f16
    /// shaders and cooperative matrices granted, which `GpuContext::new` requests only where the
    /// kernels' [`KERNELS_COOP_CONFIG`] is offered). For the warnings of `--tensor-cores` and the
    /// app's GPU panel, on a device's summary (an adapter's lists what it offers, not what a
    /// device was granted).
    pub fn tensor_cores_unavailable(&self) -> Option<String> {
        let has = |f: &str| self.features.iter().any(|g| g == f);
        if has("SHADER_F16") && has("EXPERIMENTAL_COOPERATIVE_MATRIX") {
            return None;
        }
        Some(if self.coop_configs.is_empty() {
            "no cooperative matrices".into()
        } else if !coop_configs_fit_kernels(&self.coop_configs) {
            format!(
                "cooperative matrices {} offered, not the kernels' {KERNELS_COOP_CONFIG}",
                self.coop_configs.join(", ")
            )
        } else if !has("SHADER_F16") {
            "cooperative matrices without f16 shaders".into()
        } else {
            "the device did not grant cooperative matrices".into()
        })
    }
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} ({}, {}, driver: {})",
            self.name, self.backend, self.device_type, self.driver
        )?;
        writeln!(
            f,
            "  features: {}",
            if self.features.is_empty() {
                "-".into()
            } else {
                self.features.join(", ")
            }
        )?;
        if !self.coop_configs.is_empty() {
            writeln!(
                f,
                "  cooperative matrices: {} ({})",
                self.coop_configs.join(", "),
                if coop_configs_fit_kernels(&self.coop_configs) {
                    format!("the tensor-core kernels' {KERNELS_COOP_CONFIG} is among them")
                } else {
                    format!(
                        "not the tensor-core kernels' {KERNELS_COOP_CONFIG}: --tensor-cores runs \
                         the f32 kernels here"
                    )
                }
            )?;
        }
        writeln!(
            f,
            "  max buffer {} MiB, max storage binding {} MiB ({} per kernel), workgroup memory {} KiB, {} invocations/workgroup, subgroups of {}–{}",
            self.max_buffer_size >> 20,
            self.max_storage_buffer_binding_size >> 20,
            self.max_storage_buffers_per_stage,
            self.max_compute_workgroup_storage_size >> 10,
            self.max_compute_invocations_per_workgroup,
            self.subgroup_sizes.0,
            self.subgroup_sizes.1
        )?;
        // What the binding means for the solve: the widest n×n f32 matrix in one buffer; wider
        // ones are stored in row panels (gpu/matrix.rs), while each weight must fit one binding.
        let binding = self
            .max_storage_buffer_binding_size
            .min(self.max_buffer_size);
        writeln!(
            f,
            "  n×n f32 matrices up to n = {} in one binding (wider Hessians split into row panels); \
             weights up to {} M parameters per module",
            ((binding / 4) as f64).sqrt() as u64,
            binding / 4 / 1_000_000
        )
    }
}

/// The optional features we use when present.
fn wanted_features() -> [(wgpu::Features, &'static str); 6] {
    [
        (wgpu::Features::SHADER_F16, "SHADER_F16"),
        (wgpu::Features::SUBGROUP, "SUBGROUP"),
        (wgpu::Features::TIMESTAMP_QUERY, "TIMESTAMP_QUERY"),
        // Timestamps around copies and clears (`gpu::timing`), which are not compute passes.
        (
            wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS,
            "TIMESTAMP_QUERY_INSIDE_ENCODERS",
        ),
        (
            wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX,
            "EXPERIMENTAL_COOPERATIVE_MATRIX",
        ),
        (wgpu::Features::SHADER_F64, "SHADER_F64"),
    ]
}

fn summarize(
    adapter_info: &wgpu::AdapterInfo,
    features: wgpu::Features,
    limits: &wgpu::Limits,
    coop: &[wgpu::CooperativeMatrixProperties],
) -> AdapterSummary {
    AdapterSummary {
        name: adapter_info.name.clone(),
        backend: format!("{:?}", adapter_info.backend),
        device_type: format!("{:?}", adapter_info.device_type),
        driver: format!("{} {}", adapter_info.driver, adapter_info.driver_info)
            .trim()
            .to_string(),
        features: wanted_features()
            .iter()
            .filter(|(f, _)| features.contains(*f))
            .map(|(_, n)| (*n).to_string())
            .collect(),
        max_buffer_size: limits.max_buffer_size,
        max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
        max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
        subgroup_sizes: (
            adapter_info.subgroup_min_size,
            adapter_info.subgroup_max_size,
        ),
        max_storage_buffers_per_stage: limits.max_storage_buffers_per_shader_stage,
        coop_configs: coop.iter().map(coop_config_name).collect(),
    }
}

fn instance(backend: BackendChoice) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backend.backends();
    wgpu::Instance::new(desc)
}

/// Every adapter visible for `opts.backend` (ignores the name filter), with what it offers.
pub fn list_adapters(opts: &GpuOptions) -> Vec<AdapterSummary> {
    let inst = instance(opts.backend);
    let adapters = pollster::block_on(inst.enumerate_adapters(opts.backend.backends()));
    adapters
        .iter()
        .map(|a| {
            summarize(
                &a.get_info(),
                a.features(),
                &a.limits(),
                &a.cooperative_matrix_properties(),
            )
        })
        .collect()
}

/// Errors recorded by wgpu's asynchronous error callbacks.
#[derive(Default)]
struct ErrorSink {
    errors: Vec<String>,
    lost: Option<String>,
}

/// A device, its queue and the kernel cache. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub summary: AdapterSummary,
    pub features: wgpu::Features,
    pub limits: wgpu::Limits,
    pub(crate) kernels: KernelCache,
    sink: Arc<Mutex<ErrorSink>>,
    /// Bytes currently allocated through [`GpuContext`] buffer helpers, and the high-water mark.
    pub(crate) mem: super::buffer::MemCounter,
    /// The GEMM tuning table ([`super::tune`]): `None` until the first GEMM asks for it.
    gemm_table: Mutex<Option<Option<Arc<super::tune::GemmTable>>>>,
    /// Cap on the bytes of one [`super::GpuMatrix`] panel below the binding limit (0 = none):
    /// `GPTAQ_PANEL_BYTES`, or [`GpuContext::set_panel_cap`]. Lets tests and diagnostics run the
    /// multi-panel paths with small matrices; it never raises the adapter's limit.
    panel_cap: std::sync::atomic::AtomicU64,
    /// GPU time per kernel (`GPTAQ_KERNEL_TIMES=1`, [`super::timing`]).
    pub(crate) timer: super::timing::KernelTimer,
    /// Host-readable staging buffers of finished readbacks, kept for the next ones
    /// (`GpuContext::read_async`).
    pub(crate) readbacks: Mutex<Vec<wgpu::Buffer>>,
    /// Upload staging kept for large writes (`gpu::upload`), and whether writes use it.
    pub(crate) uploads: Mutex<super::upload::UploadRing>,
    pub(crate) upload_ring: std::sync::atomic::AtomicBool,
}

impl Drop for GpuContext {
    /// Frees what this context still holds and waits for the GPU, so that wgpu's deferred
    /// destruction runs before the device goes (gfx-rs/wgpu#3498). The pool is emptied here, not
    /// left to the last `GpuBuffer`: a buffer outliving the context would otherwise keep every
    /// pooled buffer, and with them the device, alive. (This did not cure the H100's "no
    /// adapter" after a few dozen contexts in one test process; BENCHMARKS.md, session 20.)
    fn drop(&mut self) {
        self.set_pool_limit(0);
        if let Ok(mut r) = self.readbacks.lock() {
            r.clear();
        }
        if let Ok(mut u) = self.uploads.lock() {
            u.clear();
        }
        self.kernels.clear();
        if let Err(e) = self.device.poll(wgpu::PollType::wait_indefinitely()) {
            log::warn!("waiting for the GPU before releasing the device: {e}");
        }
    }
}

impl GpuContext {
    pub fn new(opts: &GpuOptions) -> Result<Self, GpuError> {
        let inst = instance(opts.backend);
        let mut adapters = pollster::block_on(inst.enumerate_adapters(opts.backend.backends()));
        if let Some(filter) = &opts.adapter {
            let needle = filter.to_ascii_lowercase();
            adapters.retain(|a| a.get_info().name.to_ascii_lowercase().contains(&needle));
        }
        // Prefer real GPUs over software rasterisers; keep enumeration order otherwise.
        adapters.sort_by_key(|a| match a.get_info().device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Other => 3,
            wgpu::DeviceType::Cpu => 4,
        });
        let Some(adapter) = adapters.into_iter().next() else {
            return Err(GpuError::NoAdapter {
                backend: opts.backend,
                filter: opts
                    .adapter
                    .as_ref()
                    .map(|f| format!(" matching `{f}`"))
                    .unwrap_or_default(),
            });
        };
        let info = adapter.get_info();
        let offered = adapter.features();
        let mut required = wgpu::Features::empty();
        for (f, _) in wanted_features() {
            if offered.contains(f) {
                required |= f;
            }
        }
        // Cooperative matrices only where the kernels' configuration is offered
        // (`coop_configs_fit_kernels`): elsewhere the tensor-core paths fall back to the f32
        // kernels, as on adapters without the feature, instead of failing to compile.
        let coop = adapter.cooperative_matrix_properties();
        let coop_names: Vec<String> = coop.iter().map(coop_config_name).collect();
        if required.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
            && !coop_configs_fit_kernels(&coop_names)
        {
            log::info!(
                "{}: cooperative matrices {} offered, not the kernels' {KERNELS_COOP_CONFIG}: \
                 tensor-core paths use the f32 kernels",
                info.name,
                coop_names.join(", ")
            );
            required.remove(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
        }
        // The adapter's own limits: these are the largest it can do, and what we need.
        let limits = adapter.limits();
        let experimental = if required.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            // SAFETY: cooperative matrices are used only by kernels that check the granted feature and
            // are tested against the f32 path; wgpu marks the feature experimental, not unsound.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let desc = wgpu::DeviceDescriptor {
            label: Some("gptaq-studio"),
            required_features: required,
            required_limits: limits.clone(),
            experimental_features: experimental,
            memory_hints: memory_hints(),
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc)).map_err(|e| {
            GpuError::RequestDevice {
                name: info.name.clone(),
                message: e.to_string(),
            }
        })?;
        let sink = Arc::new(Mutex::new(ErrorSink::default()));
        {
            let sink = sink.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                log::error!("wgpu: {e}");
                if let Ok(mut s) = sink.lock() {
                    s.errors.push(e.to_string());
                }
            }));
        }
        {
            let sink = sink.clone();
            device.set_device_lost_callback(move |reason, msg| {
                if let Ok(mut s) = sink.lock() {
                    s.lost = Some(format!("{reason:?}: {msg}"));
                }
            });
        }
        let features = device.features();
        let limits = device.limits();
        Ok(Self {
            timer: super::timing::KernelTimer::new(features, &queue),
            readbacks: Mutex::new(Vec::new()),
            uploads: Mutex::new(Default::default()),
            upload_ring: std::sync::atomic::AtomicBool::new(super::upload::ring_default()),
            summary: summarize(&info, features, &limits, &coop),
            device,
            queue,
            features,
            limits,
            kernels: KernelCache::default(),
            sink,
            mem: Default::default(),
            gemm_table: Mutex::new(None),
            panel_cap: std::sync::atomic::AtomicU64::new(
                std::env::var("GPTAQ_PANEL_BYTES")
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0),
            ),
        })
    }

    /// The GEMM tuning table of this adapter (loaded from the cache directory on first use; see
    /// [`super::tune`]), if there is a valid one.
    pub fn gemm_table(&self) -> Option<Arc<super::tune::GemmTable>> {
        let Ok(mut slot) = self.gemm_table.lock() else {
            return None;
        };
        slot.get_or_insert_with(|| super::tune::load_for(&self.summary).map(Arc::new))
            .clone()
    }

    /// Replaces the tuning table for this context (after `gptaq-studio tune`, and in tests);
    /// `None` = the size rule.
    pub fn set_gemm_table(&self, table: Option<super::tune::GemmTable>) {
        if let Ok(mut slot) = self.gemm_table.lock() {
            *slot = Some(table.map(Arc::new));
        }
    }

    /// Turns errors recorded since the last call into a [`GpuError`].
    pub fn check(&self) -> Result<(), GpuError> {
        let Ok(mut s) = self.sink.lock() else {
            return Err(GpuError::Validation("error sink poisoned".into()));
        };
        if let Some(l) = s.lost.take() {
            return Err(GpuError::DeviceLost(l));
        }
        if !s.errors.is_empty() {
            let all = std::mem::take(&mut s.errors);
            return Err(GpuError::Validation(all.join("; ")));
        }
        Ok(())
    }

    /// Blocks until the submission `index` (and those before it) has finished, then reports any
    /// recorded error.
    pub fn wait_for(&self, index: wgpu::SubmissionIndex) -> Result<(), GpuError> {
        let _host = self.host_span("wait");
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(index),
                timeout: None,
            })
            .map_err(|e| GpuError::DeviceLost(e.to_string()))?;
        self.check()
    }

    /// Blocks until all submitted work has finished, then reports any recorded error.
    pub fn sync(&self) -> Result<(), GpuError> {
        let _host = self.host_span("wait");
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| GpuError::DeviceLost(e.to_string()))?;
        self.check()
    }

    pub fn has_f16(&self) -> bool {
        self.features.contains(wgpu::Features::SHADER_F16)
    }

    pub fn max_binding_bytes(&self) -> u64 {
        // Whole 16-byte slots, like every buffer (gpu/buffer.rs `padded_size`).
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
            / 16
            * 16
    }

    /// Largest bytes of one panel of a [`super::GpuMatrix`]: the binding limit, or less when capped
    /// ([`GpuContext::set_panel_cap`]).
    pub fn panel_bytes(&self) -> u64 {
        let limit = self.max_binding_bytes();
        match self.panel_cap.load(std::sync::atomic::Ordering::Relaxed) {
            0 => limit,
            cap => cap.min(limit),
        }
    }

    /// Caps the panel size of matrices created from now on (`None` = the binding limit).
    pub fn set_panel_cap(&self, bytes: Option<u64>) {
        self.panel_cap
            .store(bytes.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes currently allocated by this context's buffers, pooled ones included (they hold device
    /// memory; [`GpuContext::set_pool_limit`]), and the peak since creation (or since
    /// [`GpuContext::reset_peak`]).
    pub fn memory(&self) -> (u64, u64) {
        self.mem.get()
    }

    /// [`GpuContext::memory`] without the buffers the pool keeps for reuse: what live buffers
    /// hold now and their peak (PyTorch's "allocated" beside `memory`'s "reserved").
    pub fn allocated(&self) -> (u64, u64) {
        self.mem.get_live()
    }

    pub fn reset_peak(&self) {
        self.mem.reset_peak();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgpu::CooperativeScalarType::{F16, F32};

    fn config(
        (m, n, k): (u32, u32, u32),
        ab: wgpu::CooperativeScalarType,
        cr: wgpu::CooperativeScalarType,
    ) -> String {
        coop_config_name(&wgpu::CooperativeMatrixProperties {
            m_size: m,
            n_size: n,
            k_size: k,
            ab_type: ab,
            cr_type: cr,
            saturating_accumulation: false,
        })
    }

    /// Configuration lists as drivers report them (wgpu-hal's Metal list, the H100's Vulkan list
    /// from `devices` in BENCHMARKS.md session 41, an 8-row one like Intel's): the kernels'
    /// 16×16×16 f16→f32 must be offered as such, not merely some cooperative matrix, nor the
    /// same shape with another accumulator.
    #[test]
    fn coop_kernels_need_their_own_configuration() {
        assert_eq!(config((16, 16, 16), F16, F32), KERNELS_COOP_CONFIG);
        let metal = [
            config((8, 8, 8), F32, F32),
            config((8, 8, 8), F16, F16),
            config((8, 8, 8), F16, F32),
        ];
        let nvidia = [
            config((16, 16, 16), F16, F16),
            config((16, 8, 16), F16, F16),
            config((16, 8, 8), F16, F16),
            config((16, 16, 16), F16, F32),
            config((16, 8, 16), F16, F32),
            config((16, 8, 8), F16, F32),
        ];
        let eight_rows = [config((8, 16, 16), F16, F32), config((8, 16, 16), F16, F16)];
        let f16_acc = [config((16, 16, 16), F16, F16)];
        assert!(!coop_configs_fit_kernels(&metal), "{metal:?}");
        assert!(coop_configs_fit_kernels(&nvidia), "{nvidia:?}");
        assert!(!coop_configs_fit_kernels(&eight_rows), "{eight_rows:?}");
        assert!(!coop_configs_fit_kernels(&f16_acc), "{f16_acc:?}");
        assert!(!coop_configs_fit_kernels(&[]));
    }

    /// `devices` says which configurations exist and whether the kernels can use them.
    #[test]
    fn summary_names_the_coop_configurations() {
        let mut s = AdapterSummary {
            name: "Apple M3".into(),
            backend: "Metal".into(),
            features: vec!["EXPERIMENTAL_COOPERATIVE_MATRIX".into()],
            coop_configs: vec![config((8, 8, 8), F16, F32)],
            ..Default::default()
        };
        let text = s.to_string();
        assert!(
            text.contains("cooperative matrices: 8x8x8 f16->f32 (not the tensor-core kernels'"),
            "{text}"
        );
        s.coop_configs.push(KERNELS_COOP_CONFIG.into());
        let text = s.to_string();
        assert!(text.contains("is among them"), "{text}");
        s.coop_configs.clear();
        assert!(!s.to_string().contains("cooperative matrices"));
    }

    /// Why `--tensor-cores` falls back, by what the device was granted and offered.
    #[test]
    fn tensor_cores_say_why_not() {
        let summary = |features: &[&str], configs: &[&str]| AdapterSummary {
            features: features.iter().map(|f| f.to_string()).collect(),
            coop_configs: configs.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        };
        let coop = "EXPERIMENTAL_COOPERATIVE_MATRIX";
        let why = |f: &[&str], c: &[&str]| summary(f, c).tensor_cores_unavailable();
        assert_eq!(why(&["SHADER_F16", coop], &[KERNELS_COOP_CONFIG]), None);
        assert_eq!(
            why(&["SHADER_F16"], &[]).as_deref(),
            Some("no cooperative matrices")
        );
        assert_eq!(
            why(&["SHADER_F16"], &["8x8x8 f16->f32"]).as_deref(),
            Some("cooperative matrices 8x8x8 f16->f32 offered, not the kernels' 16x16x16 f16->f32")
        );
        assert_eq!(
            why(&[coop], &[KERNELS_COOP_CONFIG]).as_deref(),
            Some("cooperative matrices without f16 shaders")
        );
        assert_eq!(
            why(&["SHADER_F16"], &[KERNELS_COOP_CONFIG]).as_deref(),
            Some("the device did not grant cooperative matrices")
        );
    }
}
