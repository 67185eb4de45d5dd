//! Shader registry, pipeline cache and command recording.
//!
//! Every WGSL file lives in `shaders/` and is embedded with `include_str!` next to the Rust code
//! that launches it (a [`Shader`] constant). Pipelines are created on first use and cached by
//! (shader, entry point, override constants): specialisation uses WGSL `override` constants, never
//! string templating, so each variant is an ordinary validated pipeline.
//!
//! Binding convention for every kernel: `@group(0) @binding(0)` is a uniform parameter struct,
//! `@binding(1..)` are the storage buffers in the order the launcher passes them.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bytemuck::Pod;

use super::context::{GpuContext, GpuError};

/// One embedded WGSL source file.
#[derive(Debug)]
pub struct Shader {
    pub name: &'static str,
    pub source: &'static str,
    /// Every array and buffer index in the shader is in range by construction, given the
    /// launcher's length checks (audited where the shader says so): its module is created without
    /// wgpu's index clamps (`runtime_checks`). Only for hot kernels whose clamps cost time.
    pub indices_audited: bool,
}

/// Declares a [`Shader`] constant for `shaders/<file>.wgsl`; with a third argument
/// `indices_audited`, one whose indices are all in range by construction ([`Shader`]).
#[macro_export]
macro_rules! wgsl_shader {
    ($ident:ident, $file:literal) => {
        $crate::wgsl_shader!(@make $ident, $file, false);
    };
    ($ident:ident, $file:literal, indices_audited) => {
        $crate::wgsl_shader!(@make $ident, $file, true);
    };
    (@make $ident:ident, $file:literal, $audited:literal) => {
        pub const $ident: $crate::gpu::kernels::Shader = $crate::gpu::kernels::Shader {
            name: $file,
            source: include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/shaders/",
                $file,
                ".wgsl"
            )),
            indices_audited: $audited,
        };
    };
}

/// Whether environment variable `$var` is set to `$value` (trimmed, ASCII case ignored), read
/// once per use site: the A/B switches of GPU-machine runs (`GPTAQ_COOP_STAGED=0`,
/// `GPTAQ_P_FORM=whole`, …), which the hot paths ask per dispatch or per solve.
#[macro_export]
macro_rules! env_is {
    ($var:literal, $value:literal) => {{
        static SET: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SET.get_or_init(|| {
            std::env::var($var).is_ok_and(|v| v.trim().eq_ignore_ascii_case($value))
        })
    }};
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PipelineKey {
    shader: &'static str,
    entry: &'static str,
    /// Override constants as (name, f64 bit pattern) so the key is hashable.
    constants: Vec<(&'static str, u64)>,
}

#[derive(Default)]
pub(crate) struct KernelCache {
    modules: RwLock<HashMap<&'static str, Arc<wgpu::ShaderModule>>>,
    pipelines: RwLock<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
}

impl KernelCache {
    pub(crate) fn len(&self) -> usize {
        self.pipelines.read().map(|p| p.len()).unwrap_or(0)
    }

    /// Drops every compiled pipeline and module.
    pub(crate) fn clear(&self) {
        if let Ok(mut p) = self.pipelines.write() {
            p.clear();
        }
        if let Ok(mut m) = self.modules.write() {
            m.clear();
        }
    }
}

/// wgpu's runtime checks for a shader module. By default wgpu's own, less the loop-bounding
/// counter it wraps around every loop against infinite loops in untrusted shaders: naga puts it
/// (a two-word counter, decremented and tested every iteration) into the f32 GEMM's innermost
/// eight-step loop too, and without it NVIDIA's compiler makes that kernel faster — H200, session
/// 25, `kernels-bench gemm_f32` at 4096³ A·Bᵀ: 128-tile 4.64 → 4.28 ms, 64-tile 7.55 → 5.44 ms
/// (BENCHMARKS.md). Every loop in shaders/ is a `for` over a constant or uniform bound with a
/// positive constant step (or a halving stride), so none is infinite, which is the condition wgpu
/// states for dropping the counter. A shader marked [`Shader::indices_audited`] (the f32 GEMM)
/// also goes without the index clamps naga puts on every dynamic index into workgroup arrays (four
/// per eight-step of 64 FMAs there; without them 4.28 → 4.07 ms above).
///
/// `GPTAQ_SHADER_CHECKS` (read once) overrides it for measurements: `default` → wgpu's checks,
/// counters and clamps included, for every shader; `nochecks` → no clamps in any shader (and none
/// on buffers where the driver has no robust access of its own): not for production runs.
fn runtime_checks(shader: &Shader) -> wgpu::ShaderRuntimeChecks {
    #[derive(Clone, Copy)]
    enum Mode {
        /// `GPTAQ_SHADER_CHECKS=default`: wgpu's own checks.
        WgpuChecks,
        /// Unset: no loop counters, no clamps in audited shaders.
        Shipped,
        /// `GPTAQ_SHADER_CHECKS=nochecks`: no loop counters, no clamps anywhere.
        NoChecks,
    }
    static MODE: std::sync::OnceLock<Mode> = std::sync::OnceLock::new();
    let mode = *MODE.get_or_init(|| match std::env::var("GPTAQ_SHADER_CHECKS").as_deref() {
        Ok("default") => Mode::WgpuChecks,
        Ok("nochecks") => Mode::NoChecks,
        _ => Mode::Shipped,
    });
    let mut checks = wgpu::ShaderRuntimeChecks::checked();
    match mode {
        Mode::WgpuChecks => {}
        Mode::Shipped => {
            checks.force_loop_bounding = false;
            checks.bounds_checks = !shader.indices_audited;
        }
        Mode::NoChecks => {
            checks.force_loop_bounding = false;
            checks.bounds_checks = false;
        }
    }
    checks
}

impl GpuContext {
    fn module(&self, shader: &Shader) -> Result<Arc<wgpu::ShaderModule>, GpuError> {
        if let Ok(m) = self.kernels.modules.read()
            && let Some(found) = m.get(shader.name)
        {
            return Ok(found.clone());
        }
        let mut map = self
            .kernels
            .modules
            .write()
            .map_err(|_| GpuError::Validation("shader cache poisoned".into()))?;
        if let Some(found) = map.get(shader.name) {
            return Ok(found.clone());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(shader.name),
            source: wgpu::ShaderSource::Wgsl(shader.source.into()),
        };
        // SAFETY: `runtime_checks` drops the loop-bounding counters (every loop in shaders/ is
        // finite, see there) and the index clamps only of shaders whose indices are in range by
        // construction (`Shader::indices_audited`), unless `GPTAQ_SHADER_CHECKS=nochecks` asks for
        // a measurement without any clamps, which then relies on the host-side length checks of
        // every launcher.
        let module = unsafe {
            self.device
                .create_shader_module_trusted(desc, runtime_checks(shader))
        };
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Validation(format!("shader {}: {e}", shader.name)));
        }
        let module = Arc::new(module);
        map.insert(shader.name, module.clone());
        Ok(module)
    }

    /// The compute pipeline for `entry` of `shader` specialised with `constants` (cached).
    pub fn pipeline(
        &self,
        shader: &Shader,
        entry: &'static str,
        constants: &[(&'static str, f64)],
    ) -> Result<Arc<wgpu::ComputePipeline>, GpuError> {
        let key = PipelineKey {
            shader: shader.name,
            entry,
            constants: constants.iter().map(|(n, v)| (*n, v.to_bits())).collect(),
        };
        if let Ok(p) = self.kernels.pipelines.read()
            && let Some(found) = p.get(&key)
        {
            return Ok(found.clone());
        }
        let module = self.module(shader)?;
        let mut map = self
            .kernels
            .pipelines
            .write()
            .map_err(|_| GpuError::Validation("pipeline cache poisoned".into()))?;
        if let Some(found) = map.get(&key) {
            return Ok(found.clone());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Validation(format!(
                "pipeline {}::{entry} {constants:?}: {e}",
                shader.name
            )));
        }
        let pipeline = Arc::new(pipeline);
        map.insert(key, pipeline.clone());
        Ok(pipeline)
    }

    /// Number of distinct pipelines compiled so far.
    pub fn cached_pipelines(&self) -> usize {
        self.kernels.len()
    }

    /// Starts recording a batch of dispatches.
    pub fn recorder(&self) -> Recorder<'_> {
        Recorder {
            ctx: self,
            encoder: self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None }),
            dispatches: 0,
            uniforms: UniformArena::default(),
            timing: self
                .kernel_timing()
                .then(super::timing::RecorderTiming::default),
            _open: self.mem.open_recorder(),
        }
    }
}

/// Workgroup counts for `n` workgroups along one logical axis, folded into x and y because each
/// dimension is limited to 65535. Kernels recover the index as `wg.x + wg.y * nwg.x`.
pub fn groups_1d(n: u32) -> [u32; 3] {
    const MAX: u32 = 65535;
    if n <= MAX {
        [n.max(1), 1, 1]
    } else {
        [MAX, n.div_ceil(MAX), 1]
    }
}

/// Bytes per uniform arena buffer: 256 dispatches' parameters at the usual 256-byte offset
/// alignment.
const ARENA_BYTES: u64 = 64 << 10;

/// The recorder's dispatch parameters, packed into shared uniform buffers at the adapter's
/// uniform offset alignment and written with one `Queue::write_buffer` per buffer at submit.
/// Why: a buffer created and initialised per dispatch (`create_buffer_init`: an allocation, a
/// mapped staging copy) was most of the ~25 µs of CPU each dispatch cost to record (lavapipe's
/// host, `kernels-bench dispatch`: 25.1 → 1.7 ms per 1,000 dispatches), and the factor alone
/// records ~3,300 small dispatches of 6–40 µs of GPU time each at n = 14336
/// (`GPTAQ_KERNEL_TIMES`, BENCHMARKS.md session 27; on the H100's host the solve's wall time did
/// not change measurably). A buffer is used by one recorder only, so nothing is overwritten in
/// flight.
#[derive(Default)]
struct UniformArena {
    /// Filled buffers and their bytes, and the one being filled (last).
    bufs: Vec<(wgpu::Buffer, Vec<u8>)>,
}

impl UniformArena {
    /// Places `raw` (padded to 16 bytes: uniform structs are laid out in 16-byte units) and
    /// returns its buffer, offset and size for a binding.
    fn push(&mut self, ctx: &GpuContext, raw: &[u8]) -> (wgpu::Buffer, u64, std::num::NonZeroU64) {
        let align = u64::from(ctx.limits.min_uniform_buffer_offset_alignment.max(16));
        let size = (raw.len() as u64).div_ceil(16).max(1) * 16;
        let fits = |b: &Vec<u8>| (b.len() as u64).div_ceil(align) * align + size <= ARENA_BYTES;
        if !self.bufs.last().is_some_and(|(_, b)| fits(b)) {
            let buf = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: ARENA_BYTES.max(size),
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            self.bufs
                .push((buf, Vec::with_capacity(ARENA_BYTES as usize)));
        }
        let last = self.bufs.len() - 1;
        let (buf, bytes) = &mut self.bufs[last];
        let offset = (bytes.len() as u64).div_ceil(align) * align;
        bytes.resize(offset as usize, 0);
        bytes.extend_from_slice(raw);
        bytes.resize((offset + size) as usize, 0);
        let size = std::num::NonZeroU64::new(size).unwrap_or(std::num::NonZeroU64::MIN);
        (buf.clone(), offset, size)
    }

    /// Writes every buffer's parameters (before the submission that reads them).
    fn write(&mut self, ctx: &GpuContext) {
        for (buf, bytes) in self.bufs.drain(..) {
            ctx.queue.write_buffer(&buf, 0, &bytes);
        }
    }
}

/// Records dispatches into one command encoder; [`Recorder::submit`] sends them to the queue.
/// Nothing is read back here, so many dispatches can be queued without host round trips.
pub struct Recorder<'c> {
    ctx: &'c GpuContext,
    encoder: wgpu::CommandEncoder,
    dispatches: usize,
    /// Every dispatch's parameters, in a few shared uniform buffers.
    uniforms: UniformArena,
    /// Timestamp queries around every pass, with kernel timing on (`gpu::timing`).
    timing: Option<super::timing::RecorderTiming>,
    /// Open until submitted or dropped: buffers freed meanwhile are not reused before (see
    /// `gpu::buffer`'s pool).
    _open: super::buffer::RecorderGuard,
}

impl<'c> Recorder<'c> {
    pub fn ctx(&self) -> &'c GpuContext {
        self.ctx
    }

    /// Records one dispatch: `params` at binding 0 (uniform), `buffers` at bindings 1.. .
    pub fn dispatch<P: Pod>(
        &mut self,
        shader: &Shader,
        entry: &'static str,
        constants: &[(&'static str, f64)],
        params: &P,
        buffers: &[wgpu::BindingResource<'_>],
        workgroups: [u32; 3],
    ) -> Result<(), GpuError> {
        if workgroups.contains(&0) {
            return Ok(());
        }
        let _host = self.ctx.host_span("record");
        let pipeline = self.ctx.pipeline(shader, entry, constants)?;
        let (ubuf, offset, size) = self.uniforms.push(self.ctx, bytemuck::bytes_of(params));
        let mut entries = Vec::with_capacity(buffers.len() + 1);
        entries.push(wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &ubuf,
                offset,
                size: Some(size),
            }),
        });
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: b.clone(),
            });
        }
        let layout = pipeline.get_bind_group_layout(0);
        let bind_group = self
            .ctx
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(entry),
                layout: &layout,
                entries: &entries,
            });
        let timestamp_writes = match &mut self.timing {
            Some(t) => Some(t.next(self.ctx, shader.name, entry)),
            None => None,
        };
        let mut pass = self
            .encoder
            .begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(entry),
                timestamp_writes,
            });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        drop(pass);
        self.dispatches += 1;
        Ok(())
    }

    /// Copies between buffers inside the same batch (ordered with the dispatches).
    pub fn copy<T: Pod>(
        &mut self,
        src: &super::GpuBuffer<T>,
        src_off: usize,
        dst: &super::GpuBuffer<T>,
        dst_off: usize,
        len: usize,
    ) {
        let e = std::mem::size_of::<T>() as u64;
        if len == 0 {
            return;
        }
        super::timing::RecorderTiming::around(
            self.timing.as_mut(),
            self.ctx,
            &mut self.encoder,
            ("copy", "buffer to buffer"),
            |enc| {
                enc.copy_buffer_to_buffer(
                    src.raw(),
                    src_off as u64 * e,
                    dst.raw(),
                    dst_off as u64 * e,
                    len as u64 * e,
                )
            },
        );
    }

    /// Zeroes `len` elements of `buf` from element `off` inside the same batch. wgpu clears whole
    /// 4-byte words, so both ends must fall on one.
    pub fn clear<T: Pod>(
        &mut self,
        buf: &super::GpuBuffer<T>,
        off: usize,
        len: usize,
    ) -> Result<(), GpuError> {
        let e = std::mem::size_of::<T>() as u64;
        let (start, bytes) = (off as u64 * e, len as u64 * e);
        if len == 0 {
            return Ok(());
        }
        if off + len > buf.len() || start % 4 != 0 || bytes % 4 != 0 {
            return Err(GpuError::Validation(format!(
                "clear of {len} elements at {off} in a buffer of {}: out of range or not whole words",
                buf.len()
            )));
        }
        self.clear_raw(buf.raw(), start, Some(bytes));
        Ok(())
    }

    /// Zeroes `bytes` bytes of a raw buffer from `start` (whole words; all of it with `None`).
    pub(crate) fn clear_raw(&mut self, buf: &wgpu::Buffer, start: u64, bytes: Option<u64>) {
        super::timing::RecorderTiming::around(
            self.timing.as_mut(),
            self.ctx,
            &mut self.encoder,
            ("clear", "zero fill"),
            |enc| enc.clear_buffer(buf, start, bytes),
        );
    }

    pub fn dispatches(&self) -> usize {
        self.dispatches
    }

    /// Submits everything recorded so far (does not wait); the index lets a caller wait for
    /// exactly this submission.
    pub fn submit(mut self) -> wgpu::SubmissionIndex {
        // The parameters reach their buffers before this submission's commands run
        // (`Queue::write_buffer` is ordered before the next submit).
        let host = self.ctx.host_span("submit");
        self.uniforms.write(self.ctx);
        let timed = self
            .timing
            .take()
            .and_then(|t| t.resolve(self.ctx, &mut self.encoder));
        let index = self.ctx.queue.submit([self.encoder.finish()]);
        drop(host);
        if let Some((read, keys)) = timed {
            super::timing::after_submit(self.ctx, read, keys);
        }
        index
    }

    /// Records a copy of `bytes` bytes from the start of a raw (host-written) staging buffer into
    /// `dst` at byte `dst_off` ([`GpuContext::write`]'s kept upload staging, `gpu::upload`).
    pub(crate) fn copy_from_raw(
        &mut self,
        src: &wgpu::Buffer,
        dst: &wgpu::Buffer,
        dst_off: u64,
        bytes: u64,
    ) {
        super::timing::RecorderTiming::around(
            self.timing.as_mut(),
            self.ctx,
            &mut self.encoder,
            ("copy", "from upload staging"),
            |enc| enc.copy_buffer_to_buffer(src, 0, dst, dst_off, bytes),
        );
    }

    /// Records a copy of `bytes` bytes from `src` at `src_off` into a raw (host-mappable) buffer.
    pub(crate) fn copy_to_raw<T: Pod>(
        &mut self,
        src: &super::GpuBuffer<T>,
        src_off: u64,
        dst: &wgpu::Buffer,
        bytes: u64,
    ) {
        super::timing::RecorderTiming::around(
            self.timing.as_mut(),
            self.ctx,
            &mut self.encoder,
            ("copy", "to readback"),
            |enc| enc.copy_buffer_to_buffer(src.raw(), src_off, dst, 0, bytes),
        );
    }
}
