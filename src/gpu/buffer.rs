//! Typed storage buffers with upload and readback helpers.
//!
//! Readback (`read`) blocks on the GPU and is meant for results, tests and the few scalars the UI
//! shows, never for values a hot loop needs on the next iteration.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytemuck::Pod;
use wgpu::util::DeviceExt;

use super::context::{GpuContext, GpuError};

/// Allocations from this size on first wait for the GPU and free what was dropped (see
/// `alloc_scoped`).
const RECLAIM_BEFORE_BYTES: u64 = 64 << 20;

/// Live and peak bytes allocated through the context (an application-level count of our own
/// buffers; drivers add their own overhead on top).
#[derive(Default, Clone)]
pub(crate) struct MemCounter {
    inner: Arc<(AtomicU64, AtomicU64)>,
}

impl MemCounter {
    fn add(&self, bytes: u64) {
        let now = self.inner.0.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.inner.1.fetch_max(now, Ordering::Relaxed);
    }
    fn sub(&self, bytes: u64) {
        self.inner.0.fetch_sub(bytes, Ordering::Relaxed);
    }
    pub(crate) fn get(&self) -> (u64, u64) {
        (
            self.inner.0.load(Ordering::Relaxed),
            self.inner.1.load(Ordering::Relaxed),
        )
    }
    pub(crate) fn reset_peak(&self) {
        let now = self.inner.0.load(Ordering::Relaxed);
        self.inner.1.store(now, Ordering::Relaxed);
    }
}

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
        self.mem.sub(self.buffer.size());
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

/// wgpu rejects zero-sized bindings; every buffer has at least one 16-byte slot.
fn padded_size(bytes: u64) -> u64 {
    bytes.max(16).div_ceil(4) * 4
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

    fn alloc_scoped<F: FnOnce() -> wgpu::Buffer>(
        &self,
        what: &str,
        bytes: u64,
        f: F,
    ) -> Result<wgpu::Buffer, GpuError> {
        self.check_size(what, bytes)?;
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
        let buffer = f();
        if let Some(err) = pollster::block_on(scope.pop()) {
            log::error!("allocating {what}: {err}");
            return Err(GpuError::OutOfMemory {
                what: what.to_string(),
                bytes,
            });
        }
        self.mem.add(buffer.size());
        Ok(buffer)
    }

    /// A zero-initialised buffer of `len` elements.
    pub fn zeros<T: Pod>(&self, what: &str, len: usize) -> Result<GpuBuffer<T>, GpuError> {
        let bytes = padded_size((len * std::mem::size_of::<T>()) as u64);
        let buffer = self.alloc_scoped(what, bytes, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(what),
                size: bytes,
                usage: USAGE,
                mapped_at_creation: false,
            })
        })?;
        Ok(GpuBuffer {
            buffer,
            len,
            mem: self.mem.clone(),
            _t: PhantomData,
        })
    }

    /// A buffer initialised with `data`.
    pub fn upload<T: Pod>(&self, what: &str, data: &[T]) -> Result<GpuBuffer<T>, GpuError> {
        let raw: &[u8] = bytemuck::cast_slice(data);
        let bytes = padded_size(raw.len() as u64);
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

    /// Overwrites the start of `dst` with `data` (queued; ordered before later submissions).
    pub fn write<T: Pod>(&self, dst: &GpuBuffer<T>, offset_elems: usize, data: &[T]) {
        let raw: &[u8] = bytemuck::cast_slice(data);
        if raw.is_empty() {
            return;
        }
        let off = (offset_elems * std::mem::size_of::<T>()) as u64;
        if raw.len().is_multiple_of(4) {
            self.queue.write_buffer(&dst.buffer, off, raw);
        } else {
            let mut padded = raw.to_vec();
            padded.resize(raw.len().div_ceil(4) * 4, 0);
            self.queue.write_buffer(&dst.buffer, off, &padded);
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
        mut rec: super::Recorder<'_>,
        src: &GpuBuffer<T>,
        start: usize,
        len: usize,
    ) -> Result<PendingRead<T>, GpuError> {
        let elem = std::mem::size_of::<T>() as u64;
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
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if len > 0 {
            rec.copy_to_raw(src, aligned_off, &staging, aligned_end - aligned_off);
        }
        let submission = rec.submit();
        let (tx, mapped) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        Ok(PendingRead {
            staging,
            submission,
            mapped,
            skip: (off - aligned_off) as usize,
            len,
            _t: PhantomData,
        })
    }

    /// Waits for the submission of `pending` (not for later ones) and copies its data into `out`
    /// (resized to the read's length, reusing its allocation).
    pub fn finish_read<T: Pod>(
        &self,
        pending: PendingRead<T>,
        out: &mut Vec<T>,
    ) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(pending.submission.clone()),
                timeout: None,
            })
            .map_err(|e| GpuError::DeviceLost(e.to_string()))?;
        self.check()?;
        match pending.mapped.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(GpuError::Readback(e.to_string())),
            Err(e) => return Err(GpuError::Readback(e.to_string())),
        }
        let bytes = pending.len * std::mem::size_of::<T>();
        {
            let view = pending
                .staging
                .get_mapped_range(..)
                .map_err(|e| GpuError::Readback(e.to_string()))?;
            let slice = &view[pending.skip..pending.skip + bytes];
            // The mapped range is only 4-byte aligned in general; copy through an aligned Vec.
            out.clear();
            out.resize(pending.len, T::zeroed());
            bytemuck::cast_slice_mut::<T, u8>(out).copy_from_slice(slice);
        }
        pending.staging.unmap();
        Ok(())
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
