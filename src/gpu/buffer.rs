//! Typed storage buffers with upload and readback helpers.
//!
//! Readback (`read`) blocks on the GPU and is meant for results, tests and the few scalars the UI
//! shows, never for values a hot loop needs on the next iteration.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytemuck::Pod;
use wgpu::util::DeviceExt;

use super::context::{GpuContext, GpuError};

/// Whether [`GpuContext::scratch`] fills reused buffers with NaN (see there): debug builds, unless
/// `GPTAQ_POISON_SCRATCH` says otherwise.
fn poison_scratch() -> bool {
    static POISON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *POISON.get_or_init(|| match std::env::var("GPTAQ_POISON_SCRATCH").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => cfg!(debug_assertions),
    })
}

/// Allocations from this size on first wait for the GPU and free what was dropped (see
/// `alloc_scoped`).
const RECLAIM_BEFORE_BYTES: u64 = 64 << 20;

/// The label wgpu-core gives its upload staging buffers (`queue.write_buffer`, buffers created
/// with data), as its allocator report names them.
const WGPU_STAGING_LABEL: &str = "(wgpu internal) Staging";

/// Chunk of a paced upload ([`GpuContext::upload_paced`]) and how many may be in flight.
const PACED_CHUNK_BYTES: usize = 32 << 20;
const PACED_IN_FLIGHT: usize = 2;

/// Writes from this size on are copied into their staging by several threads
/// ([`GpuContext::write`]): below it a thread's start costs more than its share of the copy.
pub const PARALLEL_WRITE_BYTES: usize = 4 << 20;

/// Threads that copy a write of `bytes` into its staging, or a readback of `bytes` out of its
/// staging ([`GpuContext::finish_read`]): up to 8, at least 1 MiB each; 1 below
/// [`PARALLEL_WRITE_BYTES`]. Eight even on a 2-core host: on `queue.write_buffer`'s fresh staging
/// the page faults of the new mapping, not the copy, bound a write, and they are taken in
/// parallel — the kernels bench's `host_write` put 16 MiB into a buffer in 11.9 ms with one
/// thread and 3.0 with eight on the 2-core development machine (lavapipe). The kept upload
/// staging (`gpu::upload`, the default) has no such faults after its first use: 3.4 ms with one
/// thread, 2.8 with eight there; on the 16-core H100 host 1.40 and 0.90 ms (BENCHMARKS.md
/// sessions 42–44).
/// `GPTAQ_WRITE_THREADS=N` sets the most (1: every write and read on the calling thread, for A/B
/// runs).
pub fn write_threads(bytes: usize) -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let max = *MAX.get_or_init(|| {
        std::env::var("GPTAQ_WRITE_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(8)
            .max(1)
    });
    if bytes < PARALLEL_WRITE_BYTES {
        1
    } else {
        max.min(bytes >> 20).max(1)
    }
}

/// Threads that copy a readback of `bytes` out of its staging ([`GpuContext::finish_read`]):
/// [`write_threads`], but no more than the host's cores. Unlike a write into fresh staging, whose
/// page faults are taken in parallel however few the cores, a read copies from kept staging into
/// a reused `Vec`: plain memory bandwidth, which threads beyond the cores only share (the
/// kernels bench's `host_read`, 16 MiB: 2.1 ms with two threads and 2.8 with eight on the 2-core
/// development machine; on the 16-core H100 host 1.87 ms with one, 1.01 with eight, and 2.87
/// with one into a zero-filled `Vec` as before; BENCHMARKS.md session 44).
pub fn read_threads(bytes: usize) -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    write_threads(bytes).min(cores).max(1)
}

/// Copies `src` into `dst` (equal lengths) in up to `threads` pieces of at least 1 MiB, each on
/// a thread of its own: a readback's copy out of its mapped staging ([`GpuContext::finish_read`]).
fn copy_bytes(dst: &mut [u8], src: &[u8], threads: usize) {
    let threads = threads.clamp(1, (src.len() >> 20).max(1));
    if threads == 1 {
        dst.copy_from_slice(src);
        return;
    }
    let chunk = src.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for (d, s) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
            scope.spawn(move || d.copy_from_slice(s));
        }
    });
}

/// Host writes (`queue.write_buffer`, [`GpuContext::write`]) in flight, at most `max`.
/// `write_buffer` stages each write in a host-visible buffer of its own, freed only once the GPU
/// has run the submission that copies it — device memory that nvidia-smi counts on resizable-BAR
/// machines (the H100 / H200 servers), outside the app's count and the memory plan. Without a
/// bound, writes queued ahead of the GPU keep all their staging alive at once. (Large writes now
/// go through the kept upload staging, which has a bound of its own, `gpu::upload`; the window
/// still keeps the host from running further ahead of the GPU than two loads per stream.)
pub struct WriteWindow {
    max: usize,
    pending: std::collections::VecDeque<wgpu::SubmissionIndex>,
}

impl WriteWindow {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            pending: std::collections::VecDeque::with_capacity(max + 1),
        }
    }

    /// Submits the writes queued so far (in an otherwise empty submission: they run before it),
    /// samples the allocator while their staging is alive ([`GpuContext::sample_allocator`]) and
    /// waits for the oldest beyond `max`, so that their staging is released.
    pub fn submit(&mut self, ctx: &GpuContext) -> Result<(), GpuError> {
        self.pending.push_back(ctx.recorder().submit());
        ctx.sample_allocator();
        while self.pending.len() > self.max {
            if let Some(index) = self.pending.pop_front() {
                ctx.wait_for(index)?;
            }
        }
        Ok(())
    }

    /// Submissions with writes that may still be in flight.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Freed buffers from this size on may be kept for reuse ([`GpuContext::set_pool_limit`]). Debug
/// builds (the tests) pool far smaller buffers, so that the test models, whose activations are
/// well under 1 MiB, go through reuse — and through [`GpuContext::scratch`]'s NaN fill — as the
/// large models do.
const POOL_MIN_BYTES: u64 = if cfg!(debug_assertions) {
    4 << 10
} else {
    1 << 20
};

/// Live and peak bytes allocated through the context (an application-level count of our own
/// buffers; drivers add their own overhead on top), and the pool of freed buffers kept for reuse.
/// Pooled buffers still hold device memory, so they stay in the count.
#[derive(Default, Clone)]
pub(crate) struct MemCounter {
    inner: Arc<MemInner>,
}

#[derive(Default)]
struct MemInner {
    /// Live plus pooled bytes (what the device holds for us) and its peak.
    now: AtomicU64,
    peak: AtomicU64,
    /// Bytes of pooled buffers (changed only under `pool`'s lock), and the peak of live bytes
    /// (`now − pooled`): PyTorch's "allocated" beside `peak`'s "reserved".
    pooled: AtomicU64,
    peak_live: AtomicU64,
    /// The highest sampled bytes reserved by wgpu's own allocator (every buffer, wgpu's upload
    /// staging included; 0 until a sample came back) and of its upload staging alone
    /// (`GpuContext::sample_allocator`).
    peak_allocator: AtomicU64,
    peak_staging: AtomicU64,
    /// Recorders open (created, neither submitted nor dropped) on any thread.
    open: AtomicUsize,
    pool: Mutex<Pool>,
}

/// A caching allocator's free list, as PyTorch keeps one: allocating a buffer of several hundred
/// MiB costs the driver milliseconds to tens of milliseconds, and the pipeline allocates the same
/// sizes again for every stage and layer (its per-stage "setup" phase took 1.2 s of an 8B GPTQ
/// layer on the H100). Reuse is by exact size, because kernels bind whole buffers.
///
/// A buffer dropped while any recorder is open may still be used by commands recorded there and
/// not yet submitted; it waits in `quarantine` until no recorder is open, so that a reused buffer's
/// clear (its own submission) is queued after every earlier use. Commands already submitted are
/// ordered before it by the queue.
#[derive(Default)]
struct Pool {
    /// Live plus pooled bytes may not exceed this when a buffer is pooled; 0 keeps nothing.
    limit: u64,
    free: Vec<wgpu::Buffer>,
    quarantine: Vec<wgpu::Buffer>,
}

impl Pool {
    /// Drops the largest pooled buffers until `need` more bytes fit under `limit` with `now`
    /// live-plus-pooled bytes (everything when `limit` is 0); returns the bytes released.
    fn trim(&mut self, now: u64, need: u64) -> u64 {
        let mut freed = 0;
        let target = self.limit;
        for list in [&mut self.quarantine, &mut self.free] {
            list.sort_by_key(|b| b.size());
            while (target == 0 || now - freed + need > target)
                && let Some(b) = list.pop()
            {
                freed += b.size();
            }
        }
        freed
    }
}

impl MemCounter {
    fn add(&self, bytes: u64) {
        let now = self.inner.now.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.inner.peak.fetch_max(now, Ordering::Relaxed);
        self.note_live();
    }
    fn sub(&self, bytes: u64) {
        self.inner.now.fetch_sub(bytes, Ordering::Relaxed);
    }
    /// Live bytes now.
    fn live(&self) -> u64 {
        let inner = &self.inner;
        (inner.now.load(Ordering::Relaxed)).saturating_sub(inner.pooled.load(Ordering::Relaxed))
    }
    fn note_live(&self) {
        self.inner
            .peak_live
            .fetch_max(self.live(), Ordering::Relaxed);
    }
    /// Live plus pooled bytes now and their peak.
    pub(crate) fn get(&self) -> (u64, u64) {
        (
            self.inner.now.load(Ordering::Relaxed),
            self.inner.peak.load(Ordering::Relaxed),
        )
    }
    /// Live bytes (pooled buffers left out) now and their peak.
    pub(crate) fn get_live(&self) -> (u64, u64) {
        (self.live(), self.inner.peak_live.load(Ordering::Relaxed))
    }
    pub(crate) fn reset_peak(&self) {
        let now = self.inner.now.load(Ordering::Relaxed);
        self.inner.peak.store(now, Ordering::Relaxed);
        self.inner.peak_live.store(self.live(), Ordering::Relaxed);
        self.inner.peak_allocator.store(0, Ordering::Relaxed);
        self.inner.peak_staging.store(0, Ordering::Relaxed);
    }
    fn note_allocator(&self, reserved: u64, staging: u64) {
        self.inner
            .peak_allocator
            .fetch_max(reserved, Ordering::Relaxed);
        self.inner
            .peak_staging
            .fetch_max(staging, Ordering::Relaxed);
    }
    /// The sampled peaks of wgpu's allocator and of its upload staging, if any sample came back
    /// (a sample always reserves something: the context holds buffers of its own).
    pub(crate) fn allocator_peak(&self) -> Option<(u64, u64)> {
        let reserved = self.inner.peak_allocator.load(Ordering::Relaxed);
        (reserved > 0).then(|| (reserved, self.inner.peak_staging.load(Ordering::Relaxed)))
    }

    /// A recorder was opened; the guard closes it when dropped.
    pub(crate) fn open_recorder(&self) -> RecorderGuard {
        self.inner.open.fetch_add(1, Ordering::SeqCst);
        RecorderGuard { mem: self.clone() }
    }

    /// A dropped buffer: pooled when pooling is on, it is large enough and the pool stays within
    /// its limit; released otherwise.
    fn release(&self, buf: &wgpu::Buffer) {
        let size = buf.size();
        if size >= POOL_MIN_BYTES
            && buf.usage() == USAGE
            && let Ok(mut pool) = self.inner.pool.lock()
            && pool.limit > 0
            && self.inner.now.load(Ordering::Relaxed) <= pool.limit
        {
            if self.inner.open.load(Ordering::SeqCst) == 0 {
                pool.free.push(buf.clone());
            } else {
                pool.quarantine.push(buf.clone());
            }
            self.inner.pooled.fetch_add(size, Ordering::Relaxed);
            return;
        }
        self.sub(size);
    }

    /// A pooled buffer of exactly `size` bytes, if one is free (it stays in the count).
    fn take(&self, size: u64) -> Option<wgpu::Buffer> {
        let mut pool = self.inner.pool.lock().ok()?;
        let i = pool.free.iter().position(|b| b.size() == size)?;
        let b = pool.free.swap_remove(i);
        self.inner.pooled.fetch_sub(size, Ordering::Relaxed);
        self.note_live();
        Some(b)
    }

    /// Makes room for `need` new bytes under the pool's limit by dropping pooled buffers (all of
    /// them with `need == u64::MAX`, e.g. after an out-of-memory error).
    fn trim(&self, need: u64) {
        let Ok(mut pool) = self.inner.pool.lock() else {
            return;
        };
        let freed = if need == u64::MAX {
            let limit = std::mem::replace(&mut pool.limit, 0);
            let freed = pool.trim(0, 0);
            pool.limit = limit;
            freed
        } else if pool.limit == 0 {
            pool.trim(0, 0)
        } else {
            pool.trim(self.inner.now.load(Ordering::Relaxed), need)
        };
        self.inner.pooled.fetch_sub(freed, Ordering::Relaxed);
        self.sub(freed);
    }

    fn set_pool_limit(&self, bytes: u64) {
        if let Ok(mut pool) = self.inner.pool.lock() {
            pool.limit = bytes;
        }
        self.trim(0);
    }

    /// Bytes held by pooled buffers.
    pub(crate) fn pooled(&self) -> u64 {
        self.inner.pool.lock().map_or(0, |p| {
            p.free.iter().chain(&p.quarantine).map(|b| b.size()).sum()
        })
    }
}

/// Held by an open [`super::Recorder`]: when the last one closes, buffers dropped meanwhile become
/// reusable (see [`Pool`]).
pub(crate) struct RecorderGuard {
    mem: MemCounter,
}

impl Drop for RecorderGuard {
    fn drop(&mut self) {
        let inner = &self.mem.inner;
        if inner.open.fetch_sub(1, Ordering::SeqCst) == 1
            && let Ok(mut pool) = inner.pool.lock()
            && inner.open.load(Ordering::SeqCst) == 0
        {
            let q = std::mem::take(&mut pool.quarantine);
            pool.free.extend(q);
        }
    }
}

/// Readback staging sizes above this are rounded up to a multiple of it, and buffers of at
/// least this size are kept for reuse ([`GpuContext::read_async`]).
const READBACK_ROUND: u64 = 1 << 20;
/// Host-readable staging bytes kept for reuse at most.
const READBACK_KEEP: u64 = 512 << 20;

/// A readback in flight ([`GpuContext::read_async`]): the host-readable copy, the submission that
/// fills it, and the mapping's completion.
pub struct PendingRead<T: Pod> {
    staging: wgpu::Buffer,
    submission: wgpu::SubmissionIndex,
    mapped: std::sync::mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>,
    /// Bytes between the 4-byte aligned copy's start and the first element.
    skip: usize,
    len: usize,
    _t: PhantomData<T>,
}

/// A storage buffer holding `len` elements of `T`.
pub struct GpuBuffer<T: Pod> {
    pub(crate) buffer: wgpu::Buffer,
    len: usize,
    mem: MemCounter,
    _t: PhantomData<T>,
}

impl<T: Pod> Drop for GpuBuffer<T> {
    fn drop(&mut self) {
        self.mem.release(&self.buffer);
    }
}

impl<T: Pod> GpuBuffer<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn bytes(&self) -> u64 {
        (self.len * std::mem::size_of::<T>()) as u64
    }
    pub fn raw(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    /// Whole-buffer binding.
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        self.buffer.as_entire_binding()
    }
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Whole 16-byte slots, at least one: wgpu rejects zero-sized bindings, and shaders that view an
/// f32 buffer as `array<vec4<f32>>` (`gemm.wgsl`'s `a4` / `b4`) then find every element inside
/// some vec4 of the binding (the binding limit is rounded down to match,
/// `GpuContext::max_binding_bytes`).
fn padded_size(bytes: u64) -> u64 {
    bytes.max(16).div_ceil(16) * 16
}

impl GpuContext {
    fn check_size(&self, what: &str, bytes: u64) -> Result<(), GpuError> {
        let limit = self.max_binding_bytes();
        if bytes > limit {
            return Err(GpuError::TooLarge {
                what: what.to_string(),
                bytes,
                limit,
            });
        }
        Ok(())
    }

    fn alloc_scoped<F: Fn() -> wgpu::Buffer>(
        &self,
        what: &str,
        bytes: u64,
        f: F,
    ) -> Result<wgpu::Buffer, GpuError> {
        self.check_size(what, bytes)?;
        // Pooled buffers give way to new ones beyond the pool's limit.
        self.mem.trim(bytes);
        if bytes >= RECLAIM_BEFORE_BYTES {
            // A dropped wgpu buffer is only freed once the submissions that use it have finished
            // and the device has been maintained; until then its memory stays allocated although
            // the counter below already subtracted it. Without this wait the solve of a 14336-wide
            // module allocated its n×n matrices while the factor's three dropped ones were still
            // held: 12,393 MiB in nvidia-smi against 7,393 MiB counted (H200, 2026-12-05). With it
            // the same run peaked at 9,458 MiB against 7,425 MiB (the rest is not explained yet).
            // The wait is cheap: large buffers are allocated per stage or per solve, never per
            // batch.
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| GpuError::DeviceLost(e.to_string()))?;
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let mut buffer = f();
        if let Some(err) = pollster::block_on(scope.pop()) {
            // Pooled buffers are the first thing to give back; one more try without them.
            if self.mem.pooled() == 0 {
                log::error!("allocating {what}: {err}");
                return Err(GpuError::OutOfMemory {
                    what: what.to_string(),
                    bytes,
                });
            }
            self.mem.trim(u64::MAX);
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| GpuError::DeviceLost(e.to_string()))?;
            let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
            buffer = f();
            if let Some(err) = pollster::block_on(scope.pop()) {
                log::error!("allocating {what} after emptying the buffer pool: {err}");
                return Err(GpuError::OutOfMemory {
                    what: what.to_string(),
                    bytes,
                });
            }
        }
        self.mem.add(buffer.size());
        if bytes >= RECLAIM_BEFORE_BYTES {
            // A large upload's staging copy is alive until the next submission: sample now.
            self.sample_allocator();
        }
        Ok(buffer)
    }

    /// Samples wgpu's own allocator (where the backend reports it: Vulkan, DX12): the bytes its
    /// memory blocks reserve — every buffer, pooled ones, wgpu's internal ones and the host-visible
    /// staging of `queue.write_buffer` and of buffers created with data — and the staging alone,
    /// into the peaks of [`GpuContext::allocator_peak`]. Staging is what the application's count
    /// misses: where host-visible memory is device memory (resizable BAR, as on the H100 / H200
    /// servers) nvidia-smi counts it. Sampled after large allocations and on every host stream
    /// load, so the peak is a lower bound of the true one. Costs one walk over the allocator's
    /// allocations.
    pub fn sample_allocator(&self) {
        if let Some((reserved, staging)) = self.allocator_now() {
            self.mem.note_allocator(reserved, staging);
        }
    }

    /// Bytes reserved by wgpu's allocator now and those of its upload staging
    /// ([`GpuContext::sample_allocator`]); `None` where the backend gives no report.
    pub fn allocator_now(&self) -> Option<(u64, u64)> {
        let report = self.device.generate_allocator_report()?;
        let staging = report
            .allocations
            .iter()
            .filter(|a| {
                a.name == WGPU_STAGING_LABEL || a.name == super::upload::UPLOAD_STAGING_LABEL
            })
            .map(|a| a.size)
            .sum();
        Some((report.total_reserved_bytes, staging))
    }

    /// The highest sampled bytes reserved by wgpu's allocator and of its upload staging since the
    /// context was created or [`GpuContext::reset_peak`] ([`GpuContext::sample_allocator`]);
    /// `None` where the backend gives no allocator report (Metal, GL) or nothing was sampled.
    pub fn allocator_peak(&self) -> Option<(u64, u64)> {
        self.mem.allocator_peak()
    }

    /// Keeps freed buffers of 1 MiB and more for reuse while live plus pooled bytes stay within
    /// `bytes` (0, the default, keeps none and frees what is pooled). The pipeline sets its memory
    /// plan's estimate here, so reuse never takes the run beyond what the plan promised; pooled
    /// buffers count as allocated in [`GpuContext::memory`], as they hold device memory.
    pub fn set_pool_limit(&self, bytes: u64) {
        self.mem.set_pool_limit(bytes);
    }

    /// Bytes held by pooled buffers ([`GpuContext::set_pool_limit`]).
    pub fn pooled_bytes(&self) -> u64 {
        self.mem.pooled()
    }

    /// A pooled buffer of exactly `bytes` bytes, if any.
    fn reuse(&self, what: &str, bytes: u64) -> Result<Option<wgpu::Buffer>, GpuError> {
        self.check_size(what, bytes)?;
        Ok(self.mem.take(bytes))
    }

    /// A zero-initialised buffer of `len` elements.
    pub fn zeros<T: Pod>(&self, what: &str, len: usize) -> Result<GpuBuffer<T>, GpuError> {
        let _host = self.host_span("allocate");
        let (buf, reused) = self.alloc(what, len)?;
        if reused {
            // Its own submission: queued after every use by its previous owner (see `Pool`).
            // Through a recorder, so that GPTAQ_KERNEL_TIMES times the clear (`clear:zero fill`).
            let mut rec = self.recorder();
            rec.clear_raw(&buf.buffer, 0, None);
            rec.submit();
        }
        Ok(buf)
    }

    /// A buffer of `len` elements that the caller overwrites before anything reads it (a copy, a
    /// gather, chunked uploads, a layer's activations): a pooled buffer keeps its earlier contents
    /// instead of being cleared first — that clear would be one more pass over, e.g., a 235 MB
    /// weight. (A new buffer reads as zeros, as wgpu initialises it.)
    ///
    /// So that a caller that reads before it writes is caught, debug builds (the tests) fill a
    /// reused buffer with all-ones bytes — NaN as f32 and as f16 — instead of leaving the earlier
    /// contents, which could be plausible numbers; `GPTAQ_POISON_SCRATCH=1` / `0` turns this on
    /// or off in any build.
    pub fn scratch<T: Pod>(&self, what: &str, len: usize) -> Result<GpuBuffer<T>, GpuError> {
        let _host = self.host_span("allocate");
        let (buf, reused) = self.alloc::<T>(what, len)?;
        if reused && poison_scratch() {
            // Ordered like `upload`'s writes: before the next submission, after every use by the
            // previous owner (`Pool`).
            let bytes = buf.buffer.size() as usize;
            self.queue.write_buffer(&buf.buffer, 0, &vec![0xFF; bytes]);
        }
        Ok(buf)
    }

    /// A pooled buffer for `len` elements (`true`) or a new one.
    fn alloc<T: Pod>(&self, what: &str, len: usize) -> Result<(GpuBuffer<T>, bool), GpuError> {
        let bytes = padded_size((len * std::mem::size_of::<T>()) as u64);
        let (buffer, reused) = match self.reuse(what, bytes)? {
            Some(buffer) => (buffer, true),
            None => (
                self.alloc_scoped(what, bytes, || {
                    self.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some(what),
                        size: bytes,
                        usage: USAGE,
                        mapped_at_creation: false,
                    })
                })?,
                false,
            ),
        };
        Ok((
            GpuBuffer {
                buffer,
                len,
                mem: self.mem.clone(),
                _t: PhantomData,
            },
            reused,
        ))
    }

    /// A buffer initialised with `data`.
    pub fn upload<T: Pod>(&self, what: &str, data: &[T]) -> Result<GpuBuffer<T>, GpuError> {
        let host = self.host_span("upload");
        let raw: &[u8] = bytemuck::cast_slice(data);
        let bytes = padded_size(raw.len() as u64);
        // Large data goes through the kept upload staging (`gpu::upload`) into a plain new
        // buffer, instead of `create_buffer_init`'s staging of its full size made for this call.
        let staged = raw.len() >= PARALLEL_WRITE_BYTES && self.upload_ring();
        let target = match self.reuse(what, bytes)? {
            Some(buffer) => Some(buffer),
            None if staged => Some(self.alloc_scoped(what, bytes, || {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(what),
                    size: bytes,
                    usage: USAGE,
                    mapped_at_creation: false,
                })
            })?),
            None => None,
        };
        if let Some(buffer) = target {
            drop(host);
            // Written before the next submission, after every use by a pooled buffer's previous
            // owner. Writes take whole 4-byte words: the data's last partial word and the padding
            // (zeros, as a new buffer has) go separately, so the bulk is not copied once more.
            let aligned = raw.len() / 4 * 4;
            if aligned > 0 {
                self.write_bytes(&buffer, 0, &raw[..aligned], write_threads(aligned));
            }
            if (aligned as u64) < bytes {
                let mut last = raw[aligned..].to_vec();
                last.resize(bytes as usize - aligned, 0);
                self.queue.write_buffer(&buffer, aligned as u64, &last);
            }
            return Ok(GpuBuffer {
                buffer,
                len: data.len(),
                mem: self.mem.clone(),
                _t: PhantomData,
            });
        }
        let buffer = self.alloc_scoped(what, bytes, || {
            if raw.len() as u64 == bytes {
                self.device
                    .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some(what),
                        contents: raw,
                        usage: USAGE,
                    })
            } else {
                let mut padded = raw.to_vec();
                padded.resize(bytes as usize, 0);
                self.device
                    .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some(what),
                        contents: &padded,
                        usage: USAGE,
                    })
            }
        })?;
        Ok(GpuBuffer {
            buffer,
            len: data.len(),
            mem: self.mem.clone(),
            _t: PhantomData,
        })
    }

    /// [`GpuContext::upload`] for large data with little staging at once. Host-visible staging is
    /// device memory that nvidia-smi counts on resizable-BAR machines, outside the memory plan
    /// (an 8B layer's next weights: ≈ 0.9 GB). `upload` bounds it by the kept upload staging's
    /// cap (256 MiB, `gpu::upload`; with `GPTAQ_UPLOAD_RING=0` it stages all of `data`, as
    /// `create_buffer_init` does). This writes 32 MiB chunks, each in a submission of its own,
    /// and waits for the oldest beyond two in flight, so at most ≈ 96 MiB is staged at once (and
    /// the kept staging does not grow beyond that for it). The waits follow the GPU through the
    /// work queued before, so call it where blocking is harmless (the pipeline's upload thread,
    /// when the budget is tight); small data goes through `upload`.
    pub fn upload_paced<T: Pod>(&self, what: &str, data: &[T]) -> Result<GpuBuffer<T>, GpuError> {
        self.upload_paced_with(what, data, PACED_CHUNK_BYTES)
    }

    pub(crate) fn upload_paced_with<T: Pod>(
        &self,
        what: &str,
        data: &[T],
        chunk_bytes: usize,
    ) -> Result<GpuBuffer<T>, GpuError> {
        // Elements per chunk, a multiple of 4 so that every chunk starts on a 4-byte word.
        let per = (chunk_bytes / std::mem::size_of::<T>().max(1)).max(4) / 4 * 4;
        if data.len() <= per {
            return self.upload(what, data);
        }
        let buf = self.scratch::<T>(what, data.len())?;
        let mut window = WriteWindow::new(PACED_IN_FLIGHT);
        for (i, chunk) in data.chunks(per).enumerate() {
            self.write(&buf, i * per, chunk);
            window.submit(self)?;
        }
        Ok(buf)
    }

    /// Overwrites `dst` from element `offset_elems` with `data` (queued; ordered before later
    /// submissions). Writes from [`PARALLEL_WRITE_BYTES`] on go through kept upload staging
    /// (`gpu::upload`), filled by several threads ([`write_threads`]).
    pub fn write<T: Pod>(&self, dst: &GpuBuffer<T>, offset_elems: usize, data: &[T]) {
        let threads = write_threads(std::mem::size_of_val(data));
        self.write_with_threads(dst, offset_elems, data, threads);
    }

    /// [`GpuContext::write`] with its staging filled by `threads` threads (the kernels bench's
    /// `host_write` compares counts).
    pub fn write_with_threads<T: Pod>(
        &self,
        dst: &GpuBuffer<T>,
        offset_elems: usize,
        data: &[T],
        threads: usize,
    ) {
        let off = (offset_elems * std::mem::size_of::<T>()) as u64;
        self.write_bytes(&dst.buffer, off, bytemuck::cast_slice(data), threads);
    }

    /// Writes `raw` into `dst` at byte `off` (queued like `queue.write_buffer`: ordered before
    /// later submissions). Writes from [`PARALLEL_WRITE_BYTES`] on go through the kept upload
    /// staging (`gpu::upload`) unless it is off ([`GpuContext::set_upload_ring`]), else through
    /// `queue.write_buffer`'s staging, filled by up to `threads` threads either way.
    fn write_bytes(&self, dst: &wgpu::Buffer, off: u64, raw: &[u8], threads: usize) {
        if raw.is_empty() {
            return;
        }
        let large = raw.len() >= PARALLEL_WRITE_BYTES && raw.len().is_multiple_of(4);
        // Out of bounds: the plain write reports it as it always has.
        let fits = off
            .checked_add(raw.len() as u64)
            .is_some_and(|end| end <= dst.size());
        if large && fits && self.upload_ring() {
            // Its filling, submission and any wait are timed as host spans of their own.
            self.write_through_ring(dst, off, raw, threads);
            return;
        }
        let _host = self.host_span("write");
        if large && threads > 1 {
            // Without the kept staging: `queue.write_buffer`'s, one view per thread. wgpu's views
            // are Send, the write-only slices inside them are not. Each view is queued when its
            // thread drops it, before the scope ends and so before the next submission; the
            // chunks are disjoint.
            let chunk = raw.len().div_ceil(threads).next_multiple_of(4096);
            let views: Option<Vec<_>> = raw
                .chunks(chunk)
                .enumerate()
                .map(|(i, src)| {
                    let at = off + (i * chunk) as u64;
                    let size = wgpu::BufferSize::new(src.len() as u64)?;
                    Some((self.queue.write_buffer_with(dst, at, size)?, src))
                })
                .collect();
            match views {
                Some(views) => std::thread::scope(|scope| {
                    for (mut view, src) in views {
                        scope.spawn(move || view.copy_from_slice(src));
                    }
                }),
                None => self.queue.write_buffer(dst, off, raw),
            }
        } else if raw.len().is_multiple_of(4) {
            self.queue.write_buffer(dst, off, raw);
        } else {
            let mut padded = raw.to_vec();
            padded.resize(raw.len().div_ceil(4) * 4, 0);
            self.queue.write_buffer(dst, off, &padded);
        }
    }

    /// Reads `src[range]` back to the host. Blocks until the GPU is done.
    pub fn read_range<T: Pod>(
        &self,
        src: &GpuBuffer<T>,
        start: usize,
        len: usize,
    ) -> Result<Vec<T>, GpuError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let pending = self.read_async(self.recorder(), src, start, len)?;
        let mut out = Vec::new();
        self.finish_read(pending, &mut out)?;
        Ok(out)
    }

    /// Starts a readback of `src[start .. start + len]` without waiting: the copy into a
    /// host-readable buffer is recorded at the end of `rec`, `rec` is submitted and the mapping
    /// requested. [`GpuContext::finish_read`] later waits for exactly that submission — work
    /// submitted after it keeps the GPU busy meanwhile, which is the point (pipeline/stream.rs).
    pub fn read_async<T: Pod>(
        &self,
        rec: super::Recorder<'_>,
        src: &GpuBuffer<T>,
        start: usize,
        len: usize,
    ) -> Result<PendingRead<T>, GpuError> {
        let mut reads = self.read_async_many(rec, &[(src, start, len)])?;
        reads
            .pop()
            .ok_or_else(|| GpuError::Readback("no readback was started".into()))
    }

    /// [`Self::read_async`] of several ranges `(src, start, len)` in one submission: one wait
    /// for all of them instead of one round trip each (the solve's losses, U's diagonal and its
    /// scale / zero table).
    pub fn read_async_many<T: Pod>(
        &self,
        mut rec: super::Recorder<'_>,
        srcs: &[(&GpuBuffer<T>, usize, usize)],
    ) -> Result<Vec<PendingRead<T>>, GpuError> {
        let elem = std::mem::size_of::<T>() as u64;
        let mut staged = Vec::with_capacity(srcs.len());
        for &(src, start, len) in srcs {
            let off = start as u64 * elem;
            let bytes = len as u64 * elem;
            if start.checked_add(len).is_none_or(|end| end > src.len()) {
                return Err(GpuError::Validation(format!(
                    "readback of elements {start}..{} from a buffer of {}",
                    start.saturating_add(len),
                    src.len()
                )));
            }
            // copy_buffer_to_buffer needs 4-byte aligned offsets and sizes.
            let aligned_off = off / 4 * 4;
            let aligned_end = (off + bytes).div_ceil(4) * 4;
            let size = (aligned_end - aligned_off).max(4);
            let staging = self.readback_staging(size);
            if len > 0 {
                rec.copy_to_raw(src, aligned_off, &staging, aligned_end - aligned_off);
            }
            staged.push((staging, (off - aligned_off) as usize, len));
        }
        let submission = rec.submit();
        Ok(staged
            .into_iter()
            .map(|(staging, skip, len)| {
                let (tx, mapped) = std::sync::mpsc::channel();
                staging.map_async(wgpu::MapMode::Read, .., move |r| {
                    let _ = tx.send(r);
                });
                PendingRead {
                    staging,
                    submission: submission.clone(),
                    mapped,
                    skip,
                    len,
                    _t: PhantomData,
                }
            })
            .collect())
    }

    /// Waits for the submission of `pending` (not for later ones) and copies its data into `out`
    /// (resized to the read's length, reusing its allocation).
    pub fn finish_read<T: Pod>(
        &self,
        pending: PendingRead<T>,
        out: &mut Vec<T>,
    ) -> Result<(), GpuError> {
        let threads = read_threads(pending.len * std::mem::size_of::<T>());
        self.finish_read_with_threads(pending, out, threads)
    }

    /// [`GpuContext::finish_read`] with the copy out of the staging spread over `threads`
    /// threads (the kernels bench's `host_read` compares counts). A host stream's batch is read
    /// into the same `Vec` at every store, so an `out` of the read's length is overwritten as it
    /// is, without first filling it with zeros (a second pass over 16 MiB per f16 batch of an 8B
    /// model, six such stores per sequence and layer).
    pub fn finish_read_with_threads<T: Pod>(
        &self,
        pending: PendingRead<T>,
        out: &mut Vec<T>,
        threads: usize,
    ) -> Result<(), GpuError> {
        let len = pending.len;
        self.finish_read_bytes(pending, |slice| {
            // The mapped range is only 4-byte aligned in general; copy through an aligned Vec.
            if out.len() != len {
                out.clear();
                out.resize(len, T::zeroed());
            }
            copy_bytes(bytemuck::cast_slice_mut::<T, u8>(out), slice, threads);
        })
    }

    /// Waits for the submission of `pending` and hands the read's bytes, as the GPU stored them
    /// (little-endian), to `f` straight from the mapped staging buffer — for callers that
    /// transform the data anyway and need no copy of it (the solve's codes).
    pub fn finish_read_bytes<T: Pod, R>(
        &self,
        pending: PendingRead<T>,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, GpuError> {
        let host = self.host_span("wait for a readback");
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(pending.submission.clone()),
                timeout: None,
            })
            .map_err(|e| GpuError::DeviceLost(e.to_string()))?;
        drop(host);
        let _host = self.host_span("read back");
        self.check()?;
        match pending.mapped.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(GpuError::Readback(e.to_string())),
            Err(e) => return Err(GpuError::Readback(e.to_string())),
        }
        let bytes = pending.len * std::mem::size_of::<T>();
        let out = {
            let view = pending
                .staging
                .get_mapped_range(..)
                .map_err(|e| GpuError::Readback(e.to_string()))?;
            f(&view[pending.skip..pending.skip + bytes])
        };
        pending.staging.unmap();
        self.keep_readback_staging(pending.staging);
        Ok(out)
    }

    /// A host-readable staging buffer of at least `size` bytes: a kept one of the same rounded
    /// size, or a new one. Why keep them: each large readback (a solve's 58 MB of codes at an 8B
    /// down_proj, a host stream's per-batch stores) otherwise allocated and mapped fresh
    /// host-visible memory. On the H100 the GPU idled 165.9 ms between two 4096 × 14336 solves
    /// of the bench, mostly while the host fetched and unpacked the first one's codes; with the
    /// staging kept and the codes unpacked from the mapped copy ([`Self::finish_read_bytes`]),
    /// 141.7 ms (`GPTAQ_KERNEL_TIMES`, BENCHMARKS.md session 27).
    fn readback_staging(&self, size: u64) -> wgpu::Buffer {
        // Sizes above 1 MiB rounded up to whole MiB, so that repeated reads of similar size
        // share buffers.
        let size = if size > READBACK_ROUND {
            size.div_ceil(READBACK_ROUND) * READBACK_ROUND
        } else {
            size
        };
        if size >= READBACK_ROUND
            && let Ok(mut kept) = self.readbacks.lock()
            && let Some(i) = kept.iter().position(|b| b.size() == size)
        {
            return kept.swap_remove(i);
        }
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Keeps an unmapped staging buffer of at least 1 MiB for reuse, the most recent first, up
    /// to [`READBACK_KEEP`] bytes in all.
    fn keep_readback_staging(&self, buf: wgpu::Buffer) {
        if buf.size() < READBACK_ROUND {
            return;
        }
        if let Ok(mut kept) = self.readbacks.lock() {
            kept.insert(0, buf);
            let mut total = 0;
            kept.retain(|b| {
                total += b.size();
                total <= READBACK_KEEP
            });
        }
    }

    /// Reads the whole buffer back. Blocks until the GPU is done.
    pub fn read<T: Pod>(&self, src: &GpuBuffer<T>) -> Result<Vec<T>, GpuError> {
        self.read_range(src, 0, src.len())
    }

    /// Copies `len` elements between buffers (queued on a fresh encoder and submitted).
    pub fn copy<T: Pod>(
        &self,
        src: &GpuBuffer<T>,
        src_off: usize,
        dst: &GpuBuffer<T>,
        dst_off: usize,
        len: usize,
    ) {
        let e = std::mem::size_of::<T>() as u64;
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(
            &src.buffer,
            src_off as u64 * e,
            &dst.buffer,
            dst_off as u64 * e,
            len as u64 * e,
        );
        self.queue.submit([enc.finish()]);
    }
}

#[cfg(test)]
mod tests {
    /// Large readbacks reuse their staging buffer (one kept buffer after two reads of a similar
    /// size) and return the right data each time, including a range read through
    /// `finish_read_bytes`; small ones keep nothing.
    #[test]
    fn readback_staging_is_reused_and_reads_stay_exact() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let n = (3 << 20) / 4 + 5; // 3 MiB and a bit: rounded up to 4 MiB of staging
        let a: Vec<u32> = (0..n as u32)
            .map(|i| i.wrapping_mul(2_654_435_761))
            .collect();
        let b: Vec<u32> = a.iter().map(|v| v ^ 0xdead_beef).collect();
        let (ga, gb) = (ctx.upload("a", &a)?, ctx.upload("b", &b)?);
        assert_eq!(ctx.read(&ga)?, a, "first read");
        let kept = |ctx: &crate::gpu::GpuContext| {
            ctx.readbacks
                .lock()
                .map(|k| k.iter().map(|b| b.size()).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        assert_eq!(kept(&ctx), vec![4 << 20], "after one read");
        assert_eq!(ctx.read(&gb)?, b, "second read, reused staging");
        assert_eq!(kept(&ctx), vec![4 << 20], "one buffer, reused");
        // A range read of a similar size (same rounded size) through the byte view.
        let p = ctx.read_async(ctx.recorder(), &ga, 1, n - 2)?;
        let got: Vec<u32> = ctx.finish_read_bytes(p, |bytes| {
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })?;
        assert_eq!(got, a[1..n - 1], "range read through the byte view");
        assert_eq!(kept(&ctx), vec![4 << 20], "still one buffer");
        let small = ctx.upload("small", &[1u32, 2, 3])?;
        assert_eq!(ctx.read(&small)?, vec![1, 2, 3]);
        assert_eq!(kept(&ctx), vec![4 << 20], "small reads keep nothing");
        Ok(())
    }

    /// A reused `scratch` buffer comes back with every bit set where [`super::poison_scratch`]
    /// holds (debug builds: the tests), its earlier contents otherwise; a reused `zeros` buffer
    /// comes back zeroed either way. A new scratch buffer reads as zeros (wgpu initialises it).
    #[test]
    fn reused_scratch_is_poisoned_in_debug_builds() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        ctx.set_pool_limit(1 << 30);
        let n = 3 << 20; // 12 MiB: pooled in every build
        let fresh = ctx.scratch::<u32>("fresh", n)?;
        assert!(ctx.read(&fresh)?.iter().all(|&v| v == 0), "a new buffer");
        drop(fresh);
        drop(ctx.upload("old contents", &vec![7u32; n])?);
        let reused = ctx.scratch::<u32>("reused", n)?;
        let want = if super::poison_scratch() { u32::MAX } else { 7 };
        let got = ctx.read(&reused)?;
        if let Some(i) = got.iter().position(|&v| v != want) {
            panic!(
                "reused scratch: element {i} of {n} is {:#x}, expected {want:#x}",
                got[i]
            );
        }
        drop(reused);
        let zeroed = ctx.zeros::<u32>("zeros", n)?;
        assert!(
            ctx.read(&zeroed)?.iter().all(|&v| v == 0),
            "a reused zeros buffer"
        );
        assert_eq!(
            super::poison_scratch(),
            cfg!(debug_assertions)
                && !std::env::var("GPTAQ_POISON_SCRATCH").is_ok_and(|v| v == "0")
                || std::env::var("GPTAQ_POISON_SCRATCH").is_ok_and(|v| v == "1"),
            "debug builds poison unless GPTAQ_POISON_SCRATCH=0; GPTAQ_POISON_SCRATCH=1 always"
        );
        Ok(())
    }

    /// A paced upload equals the plain one bit for bit, with chunks that do not divide the data
    /// (and data no larger than a chunk taking the plain path), also into a pooled buffer that
    /// held other data (`scratch`: not cleared first), and leaves at most `PACED_IN_FLIGHT`
    /// chunks of staging alive where the backend reports it — also when the uploads queue
    /// behind GPU work.
    #[test]
    fn paced_upload_equals_upload_with_bounded_staging() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let k = 256;
        let busy = ctx.upload("busy", &vec![0.5f32; k * k])?;
        let busy_out = ctx.zeros::<f32>("busy out", k * k)?;
        // Freed buffers of 1 MiB and more are pooled: the 300,001-float case reuses the junk one.
        ctx.set_pool_limit(1 << 30);
        for (len, chunk_bytes) in [
            (40_001usize, 4096usize),
            (1000, 4096),
            (12_288, 4096),
            (7, 8),
            (300_001, 256 << 10),
        ] {
            drop(ctx.upload("junk", &vec![f32::NAN; len])?);
            let data: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let mut rec = ctx.recorder();
            crate::gpu::ops::gemm(
                &mut rec,
                k,
                k,
                k,
                1.0,
                crate::gpu::ops::MatView::new(&busy, k),
                crate::gpu::ops::MatView::new(&busy, k),
                0.0,
                crate::gpu::ops::MatView::new(&busy_out, k),
            )?;
            rec.submit();
            let paced = ctx.upload_paced_with("paced", &data, chunk_bytes)?;
            if let Some((_, staging)) = ctx.allocator_now() {
                // The busy GEMM's packed parameters are staged too (one small write).
                let bound = (super::PACED_IN_FLIGHT * chunk_bytes + 4096) as u64;
                assert!(
                    len * 4 <= chunk_bytes || staging <= bound,
                    "len {len}, chunks of {chunk_bytes} B: {staging} B staged, bound {bound} B"
                );
            }
            let got = ctx.read(&paced)?;
            assert_eq!(got.len(), len, "len {len}");
            for (i, (g, w)) in got.iter().zip(&data).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "len {len}, chunks of {chunk_bytes} B, index {i}: got {g}, expected {w}"
                );
            }
        }
        ctx.set_pool_limit(0);
        Ok(())
    }

    /// Writes from `PARALLEL_WRITE_BYTES` on are split over several threads and slots of the
    /// kept upload staging, or (ring off) over several threads' views of `queue.write_buffer`'s
    /// staging: the buffer gets exactly the data at its offset, the elements before it stay, for
    /// sizes at and just over the threshold, chunks and slots that do not divide the data, and
    /// offsets that are not a multiple of either. (The large NaN uploads take the same two
    /// paths.)
    #[test]
    fn large_writes_land_exactly() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        use super::{PARALLEL_WRITE_BYTES, write_threads};
        let floats = PARALLEL_WRITE_BYTES / 4;
        assert_eq!(write_threads(PARALLEL_WRITE_BYTES - 4), 1);
        if std::env::var("GPTAQ_WRITE_THREADS").is_err() {
            assert_eq!(
                write_threads(PARALLEL_WRITE_BYTES),
                4,
                "1 MiB per thread at least"
            );
            assert_eq!(write_threads(64 << 20), 8);
        }
        for (ring, len, offset) in [true, false].into_iter().flat_map(|ring| {
            [
                (floats, 0),
                (floats + 1, 0),
                (2 * floats + 3, 1001),
                (floats, 7),
            ]
            .map(|(len, offset)| (ring, len, offset))
        }) {
            ctx.set_upload_ring(ring);
            let buf = ctx.upload("target", &vec![f32::NAN; offset + len])?;
            let data: Vec<f32> = (0..len)
                .map(|i| (i as f32 * 0.013).cos() + i as f32)
                .collect();
            ctx.write(&buf, offset, &data);
            let got = ctx.read(&buf)?;
            assert!(
                got[..offset].iter().all(|v| v.is_nan()),
                "ring {ring}, len {len}, offset {offset}"
            );
            for (i, (g, w)) in got[offset..].iter().zip(&data).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "ring {ring}, len {len}, offset {offset}, index {i}: got {g}, expected {w}"
                );
            }
        }
        Ok(())
    }

    /// Large readbacks copied out by several threads land exactly: into a fresh `Vec`, into one
    /// of the read's length holding other values (overwritten in place, no zero fill first), and
    /// into a longer one (shortened), from offsets that are not 4-byte aligned, for 1, 3 and 8
    /// threads over lengths whose pieces do not divide them.
    #[test]
    fn large_reads_land_exactly() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let n = (super::PARALLEL_WRITE_BYTES / 2) * 3 + 7;
        let data: Vec<u16> = (0..n)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u16)
            .collect();
        let buf = ctx.upload("source", &data)?;
        for (threads, start, len) in [(1, 0, n), (3, 1, n - 1), (8, 3, n - 5), (8, 0, n)] {
            for prior in [0, len, len + 11] {
                let mut out = vec![0xdead_u16; prior];
                let read = ctx.read_async(ctx.recorder(), &buf, start, len)?;
                ctx.finish_read_with_threads(read, &mut out, threads)?;
                assert_eq!(
                    out.len(),
                    len,
                    "threads {threads}, start {start}, prior {prior}"
                );
                for (i, (g, w)) in out.iter().zip(&data[start..start + len]).enumerate() {
                    assert_eq!(
                        g, w,
                        "threads {threads}, start {start}, len {len}, prior length {prior}, \
                         index {i}: got {g:#x}, expected {w:#x}"
                    );
                }
            }
        }
        Ok(())
    }
}
