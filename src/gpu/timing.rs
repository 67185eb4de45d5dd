//! GPU time per kernel from timestamp queries (`GPTAQ_KERNEL_TIMES=1`).
//!
//! Why beside `gpu::profile`: that one waits for the GPU at every phase boundary and charges
//! wall time, so it tells which phase dominates, not which of the hundreds of dispatches inside
//! it does (the factor alone records ~1,800 at n = 14336), and its waits take CPU/GPU overlap out
//! of what it measures. Here every compute pass a [`super::Recorder`] records writes a GPU
//! timestamp at its beginning and its end (`ComputePassTimestampWrites`, which needs only the
//! TIMESTAMP_QUERY feature); at submit the recorder resolves them into a buffer and copies them
//! to a mappable one, which is read once the GPU has finished it — the run never waits for the
//! timer. Copies and clears recorded through a recorder (stream loads and stores, readbacks, the
//! pool's zeroing of reused buffers) are timed too, as `copy:…` and `clear:zero fill`, where the
//! device can write timestamps inside encoders (TIMESTAMP_QUERY_INSIDE_ENCODERS). Spans are
//! summed per (scope, kernel): the kernel is `shader:entry`, the scope a label the code sets
//! around a region ([`GpuContext::time_scope`], per thread; e.g. `solve/factor/cholesky`).
//!
//! What a span is: wgpu's Vulkan backend writes both timestamps at BOTTOM_OF_PIPE, so a pass's
//! span runs from the completion of everything before it to its own completion — its launch
//! latency and barrier wait included. Within a submission the spans therefore tile the GPU's
//! time; what is left is the time between submissions, which the timer adds per scope as
//! `(idle):before submission` (the GPU idle, waiting for the host, or running work recorded
//! outside recorders: `Queue::write_buffer` uploads and the like). "All kernels" sums the timed
//! kernels, copies and clears only; the host's own time in GPU calls is reported beside them
//! ([`GpuContext::host_span`]).
//!
//! Off by default, and without TIMESTAMP_QUERY (a warning says so): the queries cost a little per
//! pass and a resolve per submission.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::{GpuContext, GpuError};

/// Passes per query set (two queries each): wgpu allows 4096 queries in one set.
const PASSES_PER_SET: usize = 512;
/// Bytes of one resolved timestamp.
const TS_BYTES: u64 = 8;

thread_local! {
    /// The current thread's scope ([`GpuContext::time_scope`]). Per thread, because threads
    /// record concurrently: the layer upload thread's dispatches (pipeline/driver.rs) must not
    /// take the main thread's label.
    static SCOPE: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// The scope of dispatches recorded outside any [`GpuContext::time_scope`].
pub const DEFAULT_SCOPE: &str = "other";
/// The pseudo-shader of idle GPU time (`(idle):before submission`), not a kernel.
pub const IDLE: &str = "(idle)";
/// The pseudo-shader of host time spent in GPU calls (`(host):submit`, `(host):allocate`,
/// `(host):wait`, …; [`GpuContext::host_span`]), not a kernel.
pub const HOST: &str = "(host)";

/// GPU seconds spent in one kernel within one scope.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KernelTime {
    pub scope: String,
    /// `shader:entry`.
    pub kernel: String,
    pub calls: u64,
    pub seconds: f64,
}

/// (scope, shader, entry) of one timed pass.
type Key = (&'static str, &'static str, &'static str);

struct Pending {
    buffer: wgpu::Buffer,
    keys: Vec<Key>,
    mapped: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
}

#[derive(Default)]
struct Inner {
    totals: HashMap<Key, (u64, f64)>,
    pending: Vec<Pending>,
    /// Passes whose timestamps could not be read (mapping failed) or were not ordered.
    lost: u64,
    /// The last pass's end timestamp, for the idle time before the next submission.
    last_end: Option<u64>,
}

/// The context's kernel timer (see the module docs).
pub struct KernelTimer {
    enabled: AtomicBool,
    /// Nanoseconds per timestamp tick.
    period_ns: f64,
    inner: Mutex<Inner>,
}

impl KernelTimer {
    /// A timer for a device with `features`, on when `GPTAQ_KERNEL_TIMES=1` and the device has
    /// TIMESTAMP_QUERY.
    pub(crate) fn new(features: wgpu::Features, queue: &wgpu::Queue) -> Self {
        let asked = std::env::var("GPTAQ_KERNEL_TIMES").is_ok_and(|v| v == "1");
        let able = features.contains(wgpu::Features::TIMESTAMP_QUERY);
        if asked && !able {
            log::warn!(
                "GPTAQ_KERNEL_TIMES=1, but this adapter has no TIMESTAMP_QUERY: no kernel times"
            );
        }
        Self {
            enabled: AtomicBool::new(asked && able),
            period_ns: f64::from(queue.get_timestamp_period()),
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    fn scope(&self) -> &'static str {
        SCOPE.with(|s| s.get()).unwrap_or(DEFAULT_SCOPE)
    }

    /// Adds the spans of every pending readback that the GPU has finished.
    fn harvest(&self) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let pending = std::mem::take(&mut inner.pending);
        for p in pending {
            if p.failed.load(Ordering::Acquire) {
                inner.lost += p.keys.len() as u64;
                continue;
            }
            if !p.mapped.load(Ordering::Acquire) {
                inner.pending.push(p);
                continue;
            }
            let stamps: Option<Vec<(u64, u64)>> = p.buffer.get_mapped_range(..).ok().map(|view| {
                view.chunks_exact(2 * TS_BYTES as usize)
                    .take(p.keys.len())
                    .map(|c| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&c[..8]);
                        let begin = u64::from_le_bytes(b);
                        b.copy_from_slice(&c[8..16]);
                        (begin, u64::from_le_bytes(b))
                    })
                    .collect()
            });
            p.buffer.unmap();
            let Some(stamps) = stamps else {
                inner.lost += p.keys.len() as u64;
                continue;
            };
            let secs = |ticks: u64| ticks as f64 * self.period_ns * 1e-9;
            // The GPU's idle time (or work outside recorders: queue writes and the like) between
            // the previous timed submission's last command and this one's first, charged to this
            // one's scope: where it is large, the GPU waited for the host.
            if let (Some(last), Some(&(first, _)), Some(key)) =
                (inner.last_end, stamps.first(), p.keys.first())
                && first > last
            {
                let e = inner
                    .totals
                    .entry((key.0, IDLE, "before submission"))
                    .or_insert((0, 0.0));
                e.0 += 1;
                e.1 += secs(first - last);
            }
            for (key, &(begin, end)) in p.keys.iter().zip(&stamps) {
                if end < begin {
                    inner.lost += 1;
                    continue;
                }
                let e = inner.totals.entry(*key).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += secs(end - begin);
                inner.last_end = Some(inner.last_end.map_or(end, |l| l.max(end)));
            }
        }
    }
}

impl GpuContext {
    /// Whether dispatches are being timed (`GPTAQ_KERNEL_TIMES=1`, or [`Self::set_kernel_timing`]).
    pub fn kernel_timing(&self) -> bool {
        self.timer.enabled()
    }

    /// Turns kernel timing on or off for recorders created from now on; on needs the device's
    /// TIMESTAMP_QUERY (returns whether timing is on).
    pub fn set_kernel_timing(&self, on: bool) -> bool {
        let on = on && self.features.contains(wgpu::Features::TIMESTAMP_QUERY);
        self.timer.enabled.store(on, Ordering::Relaxed);
        on
    }

    /// Charges the dispatches this thread records until the guard drops to `scope` (the previous
    /// scope comes back then). Scopes do not nest by name: the innermost one is the label.
    pub fn time_scope(&self, scope: &'static str) -> ScopeGuard<'_> {
        let prev = SCOPE.with(|s| s.replace(Some(scope)));
        ScopeGuard {
            prev,
            _ctx: std::marker::PhantomData,
        }
    }

    /// Waits for every timed submission and returns the sums so far, largest first; `reset`
    /// empties them. Also the number of passes whose times were lost (a failed readback).
    pub fn kernel_times(&self, reset: bool) -> Result<(Vec<KernelTime>, u64), GpuError> {
        let waiting = self
            .timer
            .inner
            .lock()
            .map(|i| !i.pending.is_empty())
            .unwrap_or(false);
        if waiting {
            // Not `sync`: its wait would be charged as host time (`host_span`).
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| GpuError::DeviceLost(e.to_string()))?;
        }
        self.timer.harvest();
        let Ok(mut inner) = self.timer.inner.lock() else {
            return Err(GpuError::Validation("kernel timer poisoned".into()));
        };
        let mut out: Vec<KernelTime> = inner
            .totals
            .iter()
            .map(|(&(scope, shader, entry), &(calls, seconds))| KernelTime {
                scope: scope.to_string(),
                kernel: format!("{shader}:{entry}"),
                calls,
                seconds,
            })
            .collect();
        out.sort_by(|a, b| {
            b.seconds
                .total_cmp(&a.seconds)
                .then_with(|| (&a.scope, &a.kernel).cmp(&(&b.scope, &b.kernel)))
        });
        let lost = inner.lost;
        if reset {
            inner.totals.clear();
            inner.lost = 0;
        }
        Ok((out, lost))
    }
}

/// Host time in one GPU call, charged to the current scope on drop ([`GpuContext::host_span`]).
pub struct HostSpan<'c> {
    ctx: &'c GpuContext,
    what: &'static str,
    t0: Option<std::time::Instant>,
}

impl Drop for HostSpan<'_> {
    fn drop(&mut self) {
        let Some(t0) = self.t0 else {
            return;
        };
        let dt = t0.elapsed().as_secs_f64();
        let scope = self.ctx.timer.scope();
        if let Ok(mut i) = self.ctx.timer.inner.lock() {
            let e = i.totals.entry((scope, HOST, self.what)).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += dt;
        }
    }
}

impl GpuContext {
    /// Times the host's call until the guard drops as `(host):what` in the current scope, with
    /// kernel timing on (nothing otherwise). Why: the GPU's idle time between submissions says
    /// *that* it waited for the host, these say on what — submitting, allocating, waiting for a
    /// readback, writing buffers.
    pub fn host_span(&self, what: &'static str) -> HostSpan<'_> {
        HostSpan {
            ctx: self,
            what,
            t0: self.kernel_timing().then(std::time::Instant::now),
        }
    }
}

/// Restores the previous scope when dropped ([`GpuContext::time_scope`]).
pub struct ScopeGuard<'c> {
    prev: Option<&'static str>,
    /// Tied to the context (and, through the thread-local, to this thread: not `Send`).
    _ctx: std::marker::PhantomData<(&'c GpuContext, *const ())>,
}

impl ScopeGuard<'_> {
    /// Relabels the guarded region from now on (the scope before the guard still comes back on
    /// drop; replacing the guard instead would restore this one's label).
    pub fn set(&self, scope: &'static str) {
        SCOPE.with(|s| s.set(Some(scope)));
    }
}

impl Drop for ScopeGuard<'_> {
    fn drop(&mut self) {
        SCOPE.with(|s| s.set(self.prev));
    }
}

/// A recorder's timestamp queries: one pair per pass, in sets of [`PASSES_PER_SET`].
#[derive(Default)]
pub(crate) struct RecorderTiming {
    sets: Vec<wgpu::QuerySet>,
    keys: Vec<Key>,
}

impl RecorderTiming {
    /// A query pair for the next timed command, which runs `shader:entry` in the current scope:
    /// its set and first index (begin; end is the next one).
    fn slot(
        &mut self,
        ctx: &GpuContext,
        shader: &'static str,
        entry: &'static str,
    ) -> (usize, u32) {
        let i = self.keys.len();
        if i / PASSES_PER_SET == self.sets.len() {
            self.sets
                .push(ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("kernel times"),
                    ty: wgpu::QueryType::Timestamp,
                    count: (2 * PASSES_PER_SET) as u32,
                }));
        }
        self.keys.push((ctx.timer.scope(), shader, entry));
        (i / PASSES_PER_SET, (2 * (i % PASSES_PER_SET)) as u32)
    }

    /// The timestamp writes for the next pass, which runs `shader:entry` in the current scope.
    pub(crate) fn next(
        &mut self,
        ctx: &GpuContext,
        shader: &'static str,
        entry: &'static str,
    ) -> wgpu::ComputePassTimestampWrites<'_> {
        let (set, slot) = self.slot(ctx, shader, entry);
        wgpu::ComputePassTimestampWrites {
            query_set: &self.sets[set],
            beginning_of_pass_write_index: Some(slot),
            end_of_pass_write_index: Some(slot + 1),
        }
    }

    /// Records `op` (a copy or a clear: not a compute pass) between two timestamps as
    /// `shader:entry`, where the device can write timestamps inside encoders
    /// (TIMESTAMP_QUERY_INSIDE_ENCODERS); untimed otherwise.
    pub(crate) fn around(
        timing: Option<&mut Self>,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        (shader, entry): (&'static str, &'static str),
        op: impl FnOnce(&mut wgpu::CommandEncoder),
    ) {
        let Some(t) = timing.filter(|_| {
            ctx.features
                .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS)
        }) else {
            op(encoder);
            return;
        };
        let (set, slot) = t.slot(ctx, shader, entry);
        encoder.write_timestamp(&t.sets[set], slot);
        op(encoder);
        encoder.write_timestamp(&t.sets[set], slot + 1);
    }

    /// Records the resolve of this recorder's queries and their copy to a mappable buffer at the
    /// end of `encoder`; [`Self::after_submit`] then maps it. `None` when nothing was timed.
    pub(crate) fn resolve(
        self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Option<(wgpu::Buffer, Vec<Key>)> {
        if self.keys.is_empty() {
            return None;
        }
        let bytes = 2 * TS_BYTES * self.keys.len() as u64;
        let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kernel times resolve"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let read = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kernel times readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        for (s, set) in self.sets.iter().enumerate() {
            let first = s * PASSES_PER_SET;
            let passes = (self.keys.len() - first).min(PASSES_PER_SET);
            // Offsets are multiples of 2·512·8 bytes: the 256-byte alignment resolves need.
            encoder.resolve_query_set(
                set,
                0..(2 * passes) as u32,
                &resolve,
                2 * TS_BYTES * first as u64,
            );
        }
        encoder.copy_buffer_to_buffer(&resolve, 0, &read, 0, bytes);
        Some((read, self.keys))
    }
}

/// Maps a submitted recorder's readback and hands it to the timer (harvested when ready).
pub(crate) fn after_submit(ctx: &GpuContext, read: wgpu::Buffer, keys: Vec<Key>) {
    let mapped = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicBool::new(false));
    {
        let (mapped, failed) = (mapped.clone(), failed.clone());
        read.slice(..)
            .map_async(wgpu::MapMode::Read, move |r| match r {
                Ok(()) => mapped.store(true, Ordering::Release),
                Err(_) => failed.store(true, Ordering::Release),
            });
    }
    if let Ok(mut inner) = ctx.timer.inner.lock() {
        inner.pending.push(Pending {
            buffer: read,
            keys,
            mapped,
            failed,
        });
    }
    // Run finished callbacks without waiting, and fold what is ready, so the pending list stays
    // short on long runs.
    let _ = ctx.device.poll(wgpu::PollType::Poll);
    ctx.timer.harvest();
}

/// The sums of several lists of kernel times (per layer → per run), largest first.
pub fn merge<'a>(lists: impl IntoIterator<Item = &'a [KernelTime]>) -> Vec<KernelTime> {
    let mut out: Vec<KernelTime> = Vec::new();
    for t in lists.into_iter().flatten() {
        match out
            .iter_mut()
            .find(|o| o.scope == t.scope && o.kernel == t.kernel)
        {
            Some(o) => {
                o.calls += t.calls;
                o.seconds += t.seconds;
            }
            None => out.push(t.clone()),
        }
    }
    out.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    out
}

/// Whether an entry is a pseudo-kernel (GPU idle time or host time), not a GPU kernel.
pub fn is_pseudo(t: &KernelTime) -> bool {
    t.kernel.starts_with('(')
}

/// Per scope, the kernels' calls and seconds summed (pseudo-kernels left out), largest first:
/// where each phase's GPU time goes.
pub fn scope_totals(times: &[KernelTime]) -> Vec<(&str, u64, f64)> {
    let mut scopes: Vec<(&str, u64, f64)> = Vec::new();
    for t in times.iter().filter(|t| !is_pseudo(t)) {
        match scopes.iter_mut().find(|(sc, _, _)| *sc == t.scope) {
            Some(e) => {
                e.1 += t.calls;
                e.2 += t.seconds;
            }
            None => scopes.push((&t.scope, t.calls, t.seconds)),
        }
    }
    scopes.sort_by(|a, b| b.2.total_cmp(&a.2));
    scopes
}

/// The seconds of every pseudo-kernel of one kind ([`IDLE`] or [`HOST`]).
pub fn pseudo_total(times: &[KernelTime], kind: &str) -> f64 {
    times
        .iter()
        .filter(|t| t.kernel.starts_with(kind))
        .map(|t| t.seconds)
        .sum()
}

/// A plain-text table of `times`: the kernels (scope, kernel, calls, total and mean time, share
/// of the kernels' sum), the sums per scope, then the GPU's idle time between submissions and
/// the host's time in GPU calls per scope; `per` divides the totals (e.g. the number of solves a
/// bench ran; 1 for a run); `limit` bounds the kernel rows.
pub fn format_kernel_times(times: &[KernelTime], per: f64, limit: usize) -> String {
    use std::fmt::Write as _;
    let per = if per > 0.0 { per } else { 1.0 };
    let kernels: Vec<&KernelTime> = times.iter().filter(|t| !is_pseudo(t)).collect();
    let pseudo: Vec<&KernelTime> = times.iter().filter(|t| is_pseudo(t)).collect();
    let sum: f64 = kernels.iter().map(|t| t.seconds).sum();
    let share = |secs: f64| if sum > 0.0 { 100.0 * secs / sum } else { 0.0 };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<28} {:<34} {:>9} {:>11} {:>10} {:>6}",
        "scope", "kernel", "calls", "total ms", "mean µs", "share"
    );
    let row = |s: &mut String, scope: &str, kernel: &str, calls: u64, secs: f64, mean: bool| {
        let mean = if mean {
            format!("{:.1}", secs / calls.max(1) as f64 * 1e6)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "{:<28} {:<34} {:>9.1} {:>11.3} {:>10} {:>5.1}%",
            scope,
            kernel,
            calls as f64 / per,
            secs / per * 1e3,
            mean,
            share(secs)
        );
    };
    for t in kernels.iter().take(limit) {
        row(&mut s, &t.scope, &t.kernel, t.calls, t.seconds, true);
    }
    if kernels.len() > limit {
        let rest: f64 = kernels.iter().skip(limit).map(|t| t.seconds).sum();
        let _ = writeln!(
            s,
            "{:<63} {:>9} {:>11.3}",
            format!("… {} more", kernels.len() - limit),
            "",
            rest / per * 1e3
        );
    }
    for (scope, calls, secs) in scope_totals(times) {
        row(
            &mut s,
            scope,
            "(all kernels of the scope)",
            calls,
            secs,
            false,
        );
    }
    let _ = writeln!(
        s,
        "{:<63} {:>9} {:>11.3}",
        "all kernels",
        "",
        sum / per * 1e3
    );
    // GPU idle between submissions and host time in GPU calls (shares relative to the kernels).
    for t in &pseudo {
        row(&mut s, &t.scope, &t.kernel, t.calls, t.seconds, true);
    }
    for (label, prefix) in [
        ("GPU idle between timed submissions", IDLE),
        ("host time in GPU calls", HOST),
    ] {
        let total = pseudo_total(times, prefix);
        let _ = writeln!(s, "{:<63} {:>9} {:>11.3}", label, "", total / per * 1e3);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::{DEFAULT_SCOPE, HOST, IDLE};
    use crate::gpu::ops::{self, MatView};

    /// Every pass is counted once under the scope it was recorded in, across query sets (more
    /// than 512 passes in one recorder) and recorders; spans are positive, a 256³ GEMM's longer
    /// than a 4³ one's; reset empties the sums and turning timing off stops it.
    #[test]
    fn kernel_times_count_every_pass_in_its_scope() -> Result<(), Box<dyn std::error::Error>> {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        if !crate::gpu::test_kernel_timing(&ctx) {
            return Ok(());
        }
        let n_many = 700usize;
        let x = ctx.upload("x", &[1f32; 64])?;
        let y = ctx.upload("y", &[2f32; 64])?;
        let out = ctx.zeros::<f32>("out", 64)?;
        let big = ctx.upload("big", &vec![0.5f32; 256 * 256])?;
        let cbig = ctx.zeros::<f32>("cbig", 256 * 256)?;
        let small = ctx.upload("small", &[0.5f32; 16])?;
        let csmall = ctx.zeros::<f32>("csmall", 16)?;
        let (gemm_key, ew_key) = ("gemm:gemm_small", "elementwise:axpby");
        {
            let scope = ctx.time_scope("test/many");
            let mut rec = ctx.recorder();
            for _ in 0..n_many {
                ops::axpby(&mut rec, 64, 1.0, &x, 1.0, &y, &out)?;
            }
            scope.set("test/small");
            for _ in 0..3 {
                ops::gemm(
                    &mut rec,
                    4,
                    4,
                    4,
                    1.0,
                    MatView::new(&small, 4),
                    MatView::new(&small, 4),
                    0.0,
                    MatView::new(&csmall, 4),
                )?;
            }
            rec.submit();
            let scope2 = ctx.time_scope("test/big");
            let mut rec = ctx.recorder();
            for _ in 0..3 {
                ops::gemm_tiled(
                    &mut rec,
                    ops::GemmTile::Small,
                    false,
                    256,
                    256,
                    256,
                    1.0,
                    MatView::new(&big, 256),
                    MatView::new(&big, 256),
                    0.0,
                    MatView::new(&cbig, 256),
                )?;
            }
            // A copy and a clear: timed where timestamps may be written inside encoders.
            rec.copy(&x, 0, &out, 0, 64);
            rec.clear(&out, 0, 64)?;
            drop(scope2);
            // Back in the outer guard's (relabelled) scope, then in none.
            ops::axpby(&mut rec, 64, 1.0, &x, 1.0, &y, &out)?;
            drop(scope);
            ops::axpby(&mut rec, 64, 1.0, &x, 1.0, &y, &out)?;
            rec.submit();
        }
        let (times, lost) = ctx.kernel_times(true)?;
        assert_eq!(lost, 0, "passes lost: {times:?}");
        let find = |scope: &str, kernel: &str| {
            times
                .iter()
                .find(|t| t.scope == scope && t.kernel == kernel)
                .cloned()
        };
        let calls = |scope: &str, kernel: &str| find(scope, kernel).map_or(0, |t| t.calls);
        assert_eq!(calls("test/many", ew_key), n_many as u64, "{times:?}");
        assert_eq!(calls("test/small", ew_key), 1, "{times:?}");
        assert_eq!(calls(DEFAULT_SCOPE, ew_key), 1, "{times:?}");
        assert_eq!(calls("test/small", gemm_key), 3, "{times:?}");
        assert_eq!(calls("test/big", gemm_key), 3, "{times:?}");
        // The second submission's wait for the first (if the GPU idled in between) is the only
        // other entry.
        let idle: Vec<_> = times
            .iter()
            .filter(|t| t.kernel.starts_with(IDLE))
            .collect();
        assert!(
            idle.len() <= 1 && idle.iter().all(|t| t.scope == "test/big" && t.calls == 1),
            "idle entries: {idle:?}"
        );
        let kernels: Vec<_> = times.iter().filter(|t| !super::is_pseudo(t)).collect();
        let inside = ctx
            .features
            .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);
        let want = if inside { 1 } else { 0 };
        assert_eq!(
            calls("test/big", "copy:buffer to buffer"),
            want,
            "{times:?}"
        );
        assert_eq!(calls("test/big", "clear:zero fill"), want, "{times:?}");
        assert_eq!(
            kernels.len(),
            5 + 2 * want as usize,
            "unexpected entries: {times:?}"
        );
        // Host time: every dispatch's recording, in the scope it was recorded in.
        let host = |scope: &str, what: &str| {
            times
                .iter()
                .find(|t| t.scope == scope && t.kernel == format!("{HOST}:{what}"))
                .map_or(0, |t| t.calls)
        };
        assert_eq!(host("test/many", "record"), n_many as u64, "{times:?}");
        assert_eq!(host("test/big", "record"), 3, "{times:?}");
        assert!(host("test/small", "submit") >= 1, "{times:?}");
        for t in &kernels {
            assert!(
                t.seconds.is_finite() && t.seconds > 0.0,
                "{} {}: {} s over {} calls",
                t.scope,
                t.kernel,
                t.seconds,
                t.calls
            );
        }
        let (sb, ss) = (
            find("test/big", gemm_key).map_or(0.0, |t| t.seconds),
            find("test/small", gemm_key).map_or(0.0, |t| t.seconds),
        );
        assert!(
            sb > ss,
            "three 256³ GEMMs took {sb} s, three 4³ ones {ss} s: the spans measure nothing"
        );
        let table = super::format_kernel_times(&times, 1.0, 10);
        assert!(
            table.contains("test/many") && table.contains(ew_key),
            "{table}"
        );
        assert!(ctx.kernel_times(false)?.0.is_empty(), "reset left sums");
        ctx.set_kernel_timing(false);
        let mut rec = ctx.recorder();
        ops::axpby(&mut rec, 64, 1.0, &x, 1.0, &y, &out)?;
        rec.submit();
        ctx.sync()?;
        assert!(ctx.kernel_times(false)?.0.is_empty(), "timed while off");
        Ok(())
    }
}
