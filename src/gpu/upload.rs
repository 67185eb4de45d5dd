//! Large host writes through upload staging that is kept and reused ([`GpuContext::write`]).
//!
//! Why: `queue.write_buffer` stages every write in a buffer of its own, allocated for that write
//! and freed once the GPU has copied it. Its memory is host-visible, which on the GPU servers
//! (resizable BAR) is device memory reached over PCIe: wgpu-hal's Vulkan backend asks
//! gpu-allocator for `CpuToGpu`, which prefers `DEVICE_LOCAL | HOST_VISIBLE`, and our
//! `MemoryUsage` hints give host blocks of at most 32 MiB, so a 16 MiB host-stream batch gets a
//! fresh mapping every time and takes a page fault on every 4 KiB it touches. One thread filled
//! such staging at about 3 GB/s on the H100, and the 8B GPTAQ layer at `--gpu-memory 8` left the
//! GPU idle 6.3 ms before each of its 14 stream submissions per sequence (BENCHMARKS.md, session
//! 42). The slots here are allocated and mapped once: a write takes mapped slots, fills them
//! (several threads, one slot at a time each), records one copy per slot into the destination in
//! a submission of its own and asks for the slots to be mapped again, which wgpu completes once
//! that submission has run. Later writes then fill memory whose pages are already mapped.
//!
//! The order is `queue.write_buffer`'s: after everything submitted before, before everything
//! submitted after (the copy is submitted before the call returns; writes queued with
//! `write_buffer` earlier reach the GPU with that submission, ahead of it).
//!
//! `GPTAQ_UPLOAD_RING=0` (or [`GpuContext::set_upload_ring`]) sends every write through
//! `queue.write_buffer` again, for A/B runs.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use super::{GpuContext, GpuError};

/// Bytes of one slot. Small enough that a 16 MiB write is shared by eight threads, large enough
/// that the per-slot copy command and mapping request cost nothing next to its copy.
pub(crate) const SLOT_BYTES: usize = 2 << 20;
/// Slots filled and copied per submission (32 MiB): a longer write (an 8B layer's 235 MB weight)
/// goes out in several submissions, so that its first copies run while the rest is filled and it
/// never needs more slots than the ring keeps.
const GROUP_SLOTS: usize = 16;
/// Slots alive at most (ready, being filled or in flight): 256 MiB. A write that finds none ready
/// at the cap waits for the GPU to finish the oldest copy — the bound `queue.write_buffer` lacks
/// (its staging grows with every write queued ahead of the GPU; see `WriteWindow`).
const MAX_SLOTS: usize = 128;
/// The allocator report's name for the slots ([`GpuContext::allocator_now`] counts them as
/// staging: they hold device memory on resizable-BAR machines).
pub(crate) const UPLOAD_STAGING_LABEL: &str = "upload staging";

/// A slot's mapping: requested and not yet done, done, or refused (the slot is then dropped).
const PENDING: u8 = 0;
const MAPPED: u8 = 1;
const FAILED: u8 = 2;

struct Slot {
    buffer: wgpu::Buffer,
    /// Set by the mapping's callback.
    state: Arc<AtomicU8>,
    /// The submission that copies out of the slot (`None`: fresh, mapped at creation), and the
    /// ring's number for that submission (the index itself cannot be compared).
    submission: Option<(wgpu::SubmissionIndex, u64)>,
}

/// The kept slots of a context.
#[derive(Default)]
pub(crate) struct UploadRing {
    /// Slots not being filled, in the order they were submitted (oldest first).
    idle: VecDeque<Slot>,
    /// Slots alive: idle ones and those being filled.
    live: usize,
    /// Submissions made so far (numbers them for `Slot::submission`).
    submitted: u64,
    /// Slots alive at most ([`MAX_SLOTS`] unless a test lowers it).
    max: Option<usize>,
    /// Writes (groups) that fell back to `queue.write_buffer` after an error.
    fallbacks: usize,
}

impl UploadRing {
    /// Bytes held by kept slots (idle ones and those being filled).
    pub(crate) fn bytes(&self) -> u64 {
        (self.live * SLOT_BYTES) as u64
    }

    fn max_slots(&self) -> usize {
        self.max.unwrap_or(MAX_SLOTS)
    }

    /// Drops every idle slot (the context's teardown).
    pub(crate) fn clear(&mut self) {
        self.live -= self.idle.len();
        self.idle.clear();
    }
}

/// Whether large writes go through the kept slots by default (`GPTAQ_UPLOAD_RING=0`: no).
pub(crate) fn ring_default() -> bool {
    !matches!(std::env::var("GPTAQ_UPLOAD_RING").as_deref(), Ok("0"))
}

impl GpuContext {
    /// Sends large writes through the kept upload slots (`true`, the default unless
    /// `GPTAQ_UPLOAD_RING=0`) or through `queue.write_buffer`'s per-write staging (`false`): for
    /// A/B runs and the kernels bench's `host_write`. Both give the same bytes in the same order.
    pub fn set_upload_ring(&self, on: bool) {
        self.upload_ring.store(on, Ordering::Relaxed);
    }

    /// Whether large writes go through the kept upload slots ([`GpuContext::set_upload_ring`]).
    pub fn upload_ring(&self) -> bool {
        self.upload_ring.load(Ordering::Relaxed)
    }

    /// Bytes of upload slots the context holds (device memory on resizable-BAR machines, next to
    /// the buffers that [`GpuContext::memory`] counts; at most 256 MiB).
    pub fn upload_staging_bytes(&self) -> u64 {
        self.uploads.lock().map(|r| r.bytes()).unwrap_or(0)
    }

    /// Frees the kept upload slots not in use (a pipeline run's end: a context kept between runs,
    /// as the GUI's is, then holds none of this device memory while idle). Later writes map new
    /// ones.
    pub fn release_upload_staging(&self) {
        if let Ok(mut ring) = self.uploads.lock() {
            ring.clear();
        }
    }

    /// Slots alive at most (tests: a small cap makes writes wait for and reuse slots).
    #[cfg(test)]
    pub(crate) fn set_upload_slots_max(&self, max: usize) {
        if let Ok(mut ring) = self.uploads.lock() {
            ring.max = Some(max);
        }
    }

    /// Slots alive, slots ever submitted and writes that fell back to `queue.write_buffer` (tests).
    #[cfg(test)]
    pub(crate) fn upload_ring_counts(&self) -> (usize, u64, usize) {
        self.uploads
            .lock()
            .map(|r| (r.live, r.submitted, r.fallbacks))
            .unwrap_or_default()
    }

    /// Writes `raw` (a multiple of 4 bytes) into `dst` at byte `off` through the kept slots, with
    /// up to `threads` threads filling them. On an error (a lost device while waiting for a slot,
    /// a refused mapping) the part not yet written goes through `queue.write_buffer`, which
    /// reports what it must; the write itself is never lost.
    pub(crate) fn write_through_ring(
        &self,
        dst: &wgpu::Buffer,
        off: u64,
        raw: &[u8],
        threads: usize,
    ) {
        let group_bytes = SLOT_BYTES * GROUP_SLOTS;
        for (g, part) in raw.chunks(group_bytes).enumerate() {
            let at = off + (g * group_bytes) as u64;
            if let Err(e) = self.write_group(dst, at, part, threads) {
                log::warn!("upload staging: {e}; writing the rest through queue.write_buffer");
                if let Ok(mut ring) = self.uploads.lock() {
                    ring.fallbacks += 1;
                }
                let done = g * group_bytes;
                self.queue
                    .write_buffer(dst, off + done as u64, &raw[done..]);
                return;
            }
        }
    }

    /// One submission's worth ([`GROUP_SLOTS`] slots at most) of [`Self::write_through_ring`].
    fn write_group(
        &self,
        dst: &wgpu::Buffer,
        off: u64,
        raw: &[u8],
        threads: usize,
    ) -> Result<(), GpuError> {
        let pieces: Vec<&[u8]> = raw.chunks(SLOT_BYTES).collect();
        let mut slots = self.take_slots(pieces.len())?;
        let filled = {
            let _host = self.host_span("write");
            self.fill_slots(&slots, &pieces, threads)
        };
        if let Err(e) = filled {
            // The slots are unusable half-filled: give them back unmapped, to be dropped.
            self.forget_slots(slots);
            return Err(e);
        }
        let mut rec = self.recorder();
        for (i, (slot, piece)) in slots.iter().zip(&pieces).enumerate() {
            slot.buffer.unmap();
            rec.copy_from_raw(
                &slot.buffer,
                dst,
                off + (i * SLOT_BYTES) as u64,
                piece.len() as u64,
            );
        }
        let index = rec.submit();
        let mut ring = self
            .uploads
            .lock()
            .map_err(|_| GpuError::Validation("upload staging lock poisoned".into()))?;
        ring.submitted += 1;
        let number = ring.submitted;
        for slot in &mut slots {
            slot.state.store(PENDING, Ordering::Release);
            let state = slot.state.clone();
            slot.buffer.map_async(wgpu::MapMode::Write, .., move |r| {
                state.store(if r.is_ok() { MAPPED } else { FAILED }, Ordering::Release);
            });
            slot.submission = Some((index.clone(), number));
        }
        ring.idle.extend(slots);
        Ok(())
    }

    /// Copies `pieces[i]` into the start of `slots[i]`, spread over up to `threads` threads.
    fn fill_slots(&self, slots: &[Slot], pieces: &[&[u8]], threads: usize) -> Result<(), GpuError> {
        let mut views = Vec::with_capacity(slots.len());
        for (slot, piece) in slots.iter().zip(pieces) {
            let view = slot
                .buffer
                .get_mapped_range_mut(..piece.len() as u64)
                .map_err(|e| GpuError::Validation(format!("upload staging not mapped: {e}")))?;
            views.push((view, *piece));
        }
        let threads = threads.clamp(1, views.len().max(1));
        if threads == 1 {
            for (mut view, piece) in views {
                view.copy_from_slice(piece);
            }
            return Ok(());
        }
        // Each thread fills every `threads`-th slot; the views are dropped (and so released)
        // before the scope ends.
        let mut lanes: Vec<Vec<_>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, v) in views.into_iter().enumerate() {
            lanes[i % threads].push(v);
        }
        std::thread::scope(|scope| {
            for lane in lanes {
                scope.spawn(move || {
                    for (mut view, piece) in lane {
                        view.copy_from_slice(piece);
                    }
                });
            }
        });
        Ok(())
    }

    /// `n` mapped slots: ready ones first, then new ones below the cap, else waits for the oldest
    /// copy in flight. Slots whose mapping failed are dropped on the way.
    fn take_slots(&self, n: usize) -> Result<Vec<Slot>, GpuError> {
        let poisoned = || GpuError::Validation("upload staging lock poisoned".into());
        let mut got = Vec::with_capacity(n);
        // Whether a non-blocking poll has run since the last scan: callbacks of finished
        // mappings fire only while the device is polled.
        let mut polled = false;
        // The submission last waited for: a slot still pending after its submission was waited
        // for will not be mapped (dropped instead of waited for again).
        let mut waited: Option<u64> = None;
        while got.len() < n {
            let wait_on = {
                let mut ring = self.uploads.lock().map_err(|_| poisoned())?;
                let mut i = 0;
                while i < ring.idle.len() && got.len() < n {
                    match ring.idle[i].state.load(Ordering::Acquire) {
                        MAPPED => got.extend(ring.idle.remove(i)),
                        FAILED => {
                            ring.idle.remove(i);
                            ring.live -= 1;
                        }
                        _ => i += 1,
                    }
                }
                if got.len() == n {
                    break;
                }
                if !polled {
                    None
                } else if ring.live < ring.max_slots() || ring.idle.is_empty() {
                    // Below the cap, or nothing to wait for (every slot is being filled by other
                    // writers): a new slot.
                    ring.live += 1;
                    drop(ring);
                    match self.new_slot() {
                        Ok(slot) => got.push(slot),
                        Err(e) => {
                            if let Ok(mut ring) = self.uploads.lock() {
                                ring.live -= 1;
                            }
                            self.forget_slots(got);
                            return Err(e);
                        }
                    }
                    continue;
                } else {
                    let front = ring.idle.front().and_then(|s| s.submission.clone());
                    if front.as_ref().is_some_and(|f| Some(f.1) == waited) {
                        // Waited for and still not mapped: drop it.
                        ring.idle.pop_front();
                        ring.live -= 1;
                        continue;
                    }
                    front
                }
            };
            match wait_on {
                None if !polled => {
                    self.device
                        .poll(wgpu::PollType::Poll)
                        .map_err(|e| GpuError::DeviceLost(e.to_string()))?;
                    polled = true;
                }
                None => {}
                Some((index, number)) => {
                    let _host = self.host_span("wait for upload staging");
                    self.device
                        .poll(wgpu::PollType::Wait {
                            submission_index: Some(index),
                            timeout: None,
                        })
                        .map_err(|e| GpuError::DeviceLost(e.to_string()))?;
                    waited = Some(number);
                }
            }
        }
        Ok(got)
    }

    /// A new slot, mapped at creation.
    fn new_slot(&self) -> Result<Slot, GpuError> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(UPLOAD_STAGING_LABEL),
            size: SLOT_BYTES as u64,
            usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: true,
        });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(GpuError::OutOfMemory {
                what: format!("upload staging ({err})"),
                bytes: SLOT_BYTES as u64,
            });
        }
        Ok(Slot {
            buffer,
            state: Arc::new(AtomicU8::new(MAPPED)),
            submission: None,
        })
    }

    /// Slots taken and not submitted, given up: dropped, and no longer counted.
    fn forget_slots(&self, slots: Vec<Slot>) {
        if let Ok(mut ring) = self.uploads.lock() {
            ring.live -= slots.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SLOT_BYTES;

    /// Writes through a ring capped at four slots, each write three slots long, so every write
    /// after the first must wait for (or poll) earlier copies and reuse their slots. First back
    /// to back, straight into their places (the previous write's slots are then still being
    /// mapped again when the next one looks for slots), then each into one target followed by a
    /// GPU copy of it elsewhere: every place must hold its own write, whole — a slot refilled
    /// before its copy ran, or a copy ordered after the next write, would show. No write may fall
    /// back to `queue.write_buffer`, and the ring never holds more than its cap.
    #[test]
    fn upload_slots_are_reused_in_order() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        ctx.set_upload_ring(true);
        ctx.set_upload_slots_max(4);
        let n = 2 * SLOT_BYTES / 4 + 1001;
        let writes = 9;
        let target = ctx.zeros::<f32>("target", n)?;
        let seen = ctx.zeros::<f32>("seen", 2 * writes * n)?;
        let data = |k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (k * 1_000_003 + i) as f32 * 0.25 + (i as f32 * 0.01).sin())
                .collect()
        };
        let all: Vec<Vec<f32>> = (0..2 * writes).map(data).collect();
        for (k, d) in all.iter().enumerate().take(writes) {
            ctx.write(&seen, k * n, d);
        }
        for (k, d) in all.iter().enumerate().skip(writes) {
            ctx.write(&target, 0, d);
            ctx.copy(&target, 0, &seen, k * n, n);
        }
        let got = ctx.read(&seen)?;
        for (k, want) in all.iter().enumerate() {
            for (i, (g, w)) in got[k * n..(k + 1) * n].iter().zip(want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "write {k} of {} ({n} floats), index {i}: got {g}, expected {w}",
                    2 * writes
                );
            }
        }
        let (live, submitted, fallbacks) = ctx.upload_ring_counts();
        assert_eq!(fallbacks, 0, "writes fell back to queue.write_buffer");
        assert_eq!(submitted, 2 * writes as u64, "one submission per write");
        assert!(
            (3..=4).contains(&live),
            "{live} slots alive, expected 3 or 4 (cap 4)"
        );
        assert!(ctx.upload_staging_bytes() <= (4 * SLOT_BYTES) as u64);
        ctx.release_upload_staging();
        assert_eq!(ctx.upload_staging_bytes(), 0);
        // Writes after the release map new slots.
        ctx.write(&target, 0, &all[0]);
        assert_eq!(ctx.read(&target)?, all[0]);
        assert_eq!(ctx.upload_ring_counts().2, 0);
        Ok(())
    }
}
