//! Activation streams: per-batch `[tokens, width]` f32 tensors that live on the GPU when the memory
//! plan allows (as f32, or packed as f16 when f16 streams were asked for and only that size fits:
//! [`Placement::GpuF16`]) and spill to host RAM (f32 or f16) otherwise.
//!
//! The driver always computes on a working GPU buffer: [`Stream::load`] fills it from the batch's
//! storage and [`Stream::store`] writes it back. For GPU-resident batches both are device-side
//! copies recorded in the same command stream; for host batches they are an upload and a
//! readback, the price of not holding 128×2048 hidden states of an 8B model (4 GiB f32 per stream)
//! on the device.
//!
//! Host stores do not wait: the readback is submitted with the batch's work and completed later —
//! when the batch is loaded again, or once more than [`MAX_PENDING_STORES`] are in flight. Stores
//! complete in the order they were issued, so a batch stored twice keeps the newer data. The GPU
//! then runs the next batch while the previous one's data crosses the link and is copied out,
//! instead of idling through every store (an 8B layer stores six 16 MiB batches per calibration
//! sequence).
//!
//! f16 host batches are kept packed, two halves per `u32` word (element `2w` in the low 16 bits of
//! word `w`), and converted on the GPU (`f16_pack.wgsl`) through one staging buffer per stream: the
//! host link then carries 2 bytes per element instead of 4, and no CPU loop converts them (every
//! batch of every stream crosses the link twice per stage, so for a large model this traffic can
//! dominate a layer). Values beyond f16's range are clamped and flagged on the GPU;
//! [`Stream::overflowed`] reports them.

use std::collections::VecDeque;

use half::f16;

use crate::gpu::{GpuBuffer, GpuContext, GpuError, PendingRead, Recorder, WriteWindow, ops};

/// Host stores in flight per stream before the oldest is waited for: two keep the GPU one batch
/// ahead of the copies, at two staging buffers of host memory (32 MiB for an 8B model's f16
/// hidden state of one sequence).
pub const MAX_PENDING_STORES: usize = 2;

/// Host loads in flight per stream before the oldest is waited for ([`WriteWindow`]: each load's
/// staging is device memory on resizable-BAR machines). A pass with loads and no stores (the
/// statistics) would otherwise queue every calibration sequence's upload ahead of the GPU: with
/// `--gpu-memory 8` an 8B GPTAQ run peaked at 9,653 MiB in nvidia-smi with f32 host streams and
/// 7,960 MiB with f16 ones, against 5,010–5,080 MiB of buffers (H200, BENCHMARKS.md session 26).
/// Two keep the upload of the next batch overlapped with the current one's work.
pub const MAX_PENDING_LOADS: usize = 2;

/// A host batch's store in flight: the batch and its readback.
enum PendingStore {
    F32(usize, PendingRead<f32>),
    /// Packed f16 words.
    F16(usize, PendingRead<u32>),
}

impl PendingStore {
    fn batch(&self) -> usize {
        match self {
            PendingStore::F32(b, _) | PendingStore::F16(b, _) => *b,
        }
    }
}

/// Element type of host-spilled streams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StreamDType {
    #[default]
    F32,
    F16,
}

impl StreamDType {
    pub fn bytes(self) -> usize {
        match self {
            StreamDType::F32 => 4,
            StreamDType::F16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            StreamDType::F32 => "f32",
            StreamDType::F16 => "f16",
        }
    }
}

enum Chunk {
    Gpu(GpuBuffer<f32>),
    /// Packed halves on the GPU, [`ops::f16_words`]`(len)` words (the layout of [`ops::pack_f16`]).
    GpuF16(GpuBuffer<u32>),
    HostF32(Vec<f32>),
    /// Packed halves, [`ops::f16_words`]`(len)` words (the layout of [`ops::pack_f16`]).
    HostF16(Vec<u32>),
}

/// The GPU side of an f16 stream: the overflow flag, and for host batches the packed words in
/// transit.
struct F16Staging {
    /// Words of the largest batch (host batches only; GPU batches are packed in place).
    words: Option<GpuBuffer<u32>>,
    /// `flag[0] != 0` once a stored value was beyond f16's range (see `f16_pack.wgsl`).
    flag: GpuBuffer<u32>,
}

/// One activation tensor per batch.
pub struct Stream {
    chunks: Vec<Chunk>,
    /// Elements per batch (the last batch may hold fewer valid elements; see `lens`).
    lens: Vec<usize>,
    /// Only for `Placement::Host(StreamDType::F16)` and `Placement::GpuF16`.
    staging: Option<F16Staging>,
    /// Host stores whose readback is still in flight, oldest first.
    pending: VecDeque<PendingStore>,
    /// Host loads (and `set_host` writes to GPU batches) in flight ([`MAX_PENDING_LOADS`]).
    loads: WriteWindow,
}

/// Where a stream's batches are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Gpu,
    /// On the GPU as packed f16 (half of `Gpu`'s memory), converted by `f16_pack.wgsl` on every
    /// load and store: the values `Host(F16)` gives, without crossing the host link.
    GpuF16,
    Host(StreamDType),
}

impl Placement {
    /// Whether batches are kept as f16 (rounded on every store).
    pub fn is_f16(self) -> bool {
        matches!(self, Placement::GpuF16 | Placement::Host(StreamDType::F16))
    }
}

/// Where each batch of a stream is kept: the first `resident` batches as `first`, the rest as
/// `rest`. A plan whose streams spill to the host keeps as many leading batches on the GPU as its
/// spare memory holds (`MemoryPlan::resident_batches`: `first` is `Placement::GpuF16` beside f16
/// host batches, `Placement::Gpu` beside f32 ones, so every batch holds the values it would on
/// the host), and only the rest cross the host link twice per stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub first: Placement,
    pub resident: usize,
    pub rest: Placement,
}

impl Layout {
    /// Streams spilled to the host in `dtype` but for their first `resident` batches, which stay
    /// on the GPU holding the values the host would: packed f16 beside f16 host batches, f32
    /// beside f32 ones.
    pub fn spilled(dtype: StreamDType, resident: usize) -> Self {
        Layout {
            first: match dtype {
                StreamDType::F16 => Placement::GpuF16,
                StreamDType::F32 => Placement::Gpu,
            },
            resident,
            rest: Placement::Host(dtype),
        }
    }

    /// Batch `b`'s placement.
    pub fn of(&self, b: usize) -> Placement {
        if b < self.resident {
            self.first
        } else {
            self.rest
        }
    }

    /// Whether any of `batches` batches is other than an f32 GPU buffer, i.e. the kernels work on
    /// copies of some batches (`Stream::load`) rather than on all of them in place.
    pub fn staged(&self, batches: usize) -> bool {
        (0..batches).any(|b| self.of(b) != Placement::Gpu)
    }
}

impl From<Placement> for Layout {
    fn from(p: Placement) -> Self {
        Layout {
            first: p,
            resident: 0,
            rest: p,
        }
    }
}

impl Stream {
    /// A stream of zeros with `lens[b]` elements in batch `b`.
    pub fn new(
        ctx: &GpuContext,
        what: &str,
        lens: &[usize],
        placement: impl Into<Layout>,
    ) -> Result<Self, GpuError> {
        Self::with_contents(ctx, what, lens, placement.into(), true)
    }

    /// [`Stream::new`] for a stream whose every batch is stored before it is loaded (a layer's
    /// attention outputs, its MLP activations): on the GPU its batches are
    /// [`GpuContext::scratch`], so reused buffers are not cleared first (on an H100, 9–12 ms of
    /// an 8B layer; BENCHMARKS.md session 31). On the host they are zeros as in `new`.
    pub fn written_before_read(
        ctx: &GpuContext,
        what: &str,
        lens: &[usize],
        placement: impl Into<Layout>,
    ) -> Result<Self, GpuError> {
        Self::with_contents(ctx, what, lens, placement.into(), false)
    }

    fn with_contents(
        ctx: &GpuContext,
        what: &str,
        lens: &[usize],
        layout: Layout,
        zeroed: bool,
    ) -> Result<Self, GpuError> {
        fn gpu<T: bytemuck::Pod>(
            ctx: &GpuContext,
            what: &str,
            len: usize,
            zeroed: bool,
        ) -> Result<GpuBuffer<T>, GpuError> {
            if zeroed {
                ctx.zeros(what, len)
            } else {
                ctx.scratch(what, len)
            }
        }
        let mut chunks = Vec::with_capacity(lens.len());
        for (b, &len) in lens.iter().enumerate() {
            chunks.push(match layout.of(b) {
                Placement::Gpu => Chunk::Gpu(gpu(ctx, what, len, zeroed)?),
                // f16 zero is all-zero bits.
                Placement::GpuF16 => Chunk::GpuF16(gpu(ctx, what, ops::f16_words(len), zeroed)?),
                Placement::Host(StreamDType::F32) => Chunk::HostF32(vec![0.0; len]),
                // f16 zero is all-zero bits.
                Placement::Host(StreamDType::F16) => Chunk::HostF16(vec![0; ops::f16_words(len)]),
            });
        }
        let f16 = (0..lens.len()).any(|b| layout.of(b).is_f16());
        // The packed words of the largest f16 host batch, if any.
        let host_f16_len = lens
            .iter()
            .enumerate()
            .filter(|&(b, _)| layout.of(b) == Placement::Host(StreamDType::F16))
            .map(|(_, &len)| len)
            .max();
        let staging = if f16 {
            Some(F16Staging {
                words: host_f16_len
                    .map(|len| ctx.zeros(&format!("{what} f16 staging"), ops::f16_words(len)))
                    .transpose()?,
                flag: ctx.zeros(&format!("{what} f16 overflow flag"), 1)?,
            })
        } else {
            None
        };
        Ok(Self {
            chunks,
            lens: lens.to_vec(),
            staging,
            pending: VecDeque::new(),
            loads: WriteWindow::new(MAX_PENDING_LOADS),
        })
    }

    /// Waits for one store's readback and puts the data into its batch.
    fn complete(&mut self, ctx: &GpuContext, p: PendingStore) -> Result<(), GpuError> {
        match p {
            PendingStore::F32(b, r) => match self.chunks.get_mut(b) {
                Some(Chunk::HostF32(v)) => ctx.finish_read(r, v),
                _ => Err(GpuError::Validation(format!(
                    "f32 store pending for batch {b}, which is not an f32 host batch"
                ))),
            },
            PendingStore::F16(b, r) => match self.chunks.get_mut(b) {
                Some(Chunk::HostF16(v)) => ctx.finish_read(r, v),
                _ => Err(GpuError::Validation(format!(
                    "f16 store pending for batch {b}, which is not an f16 host batch"
                ))),
            },
        }
    }

    /// Completes the newest pending store of batch `b`, if any, and everything older: stores
    /// complete in the order they were issued, so a batch stored twice ends with the newer data.
    fn complete_batch(&mut self, ctx: &GpuContext, b: usize) -> Result<(), GpuError> {
        if let Some(pos) = self.pending.iter().rposition(|p| p.batch() == b) {
            for p in self.pending.drain(..=pos).collect::<Vec<_>>() {
                self.complete(ctx, p)?;
            }
        }
        Ok(())
    }

    /// Host loads in flight (tests).
    pub fn pending_loads(&self) -> usize {
        self.loads.len()
    }

    /// Completes every pending store (the host copies are then current).
    pub fn flush(&mut self, ctx: &GpuContext) -> Result<(), GpuError> {
        while let Some(p) = self.pending.pop_front() {
            self.complete(ctx, p)?;
        }
        Ok(())
    }

    /// Stores in flight (tests).
    pub fn pending_stores(&self) -> usize {
        self.pending.len()
    }

    pub fn batches(&self) -> usize {
        self.chunks.len()
    }

    pub fn len(&self, b: usize) -> usize {
        self.lens.get(b).copied().unwrap_or(0)
    }

    /// Sets batch `b` from host data (used once, for the embeddings). A store of `b` still in
    /// flight is abandoned: this data replaces it. Writes to GPU batches count as loads in flight
    /// ([`MAX_PENDING_LOADS`]): filling a GPU-resident stream of 128 × 2048 tokens of an 8B model
    /// would otherwise stage all its 4 GiB at once before the first submission.
    pub fn set_host(&mut self, ctx: &GpuContext, b: usize, data: &[f32]) -> Result<(), GpuError> {
        self.pending.retain(|p| p.batch() != b);
        match self.chunks.get_mut(b) {
            Some(Chunk::Gpu(buf)) => {
                ctx.write(buf, 0, data);
                self.loads.submit(ctx)?;
            }
            Some(Chunk::HostF32(v)) => v.copy_from_slice(data),
            // The CPU's f32 → f16 (`half`, round to nearest even) into the layout pack_f16 writes,
            // with the GPU's out-of-range rule, so both report alike.
            Some(Chunk::HostF16(v)) => {
                if pack_host(data, v)
                    && let Some(st) = &self.staging
                {
                    ctx.write(&st.flag, 0, &[1u32]);
                }
            }
            Some(Chunk::GpuF16(buf)) => {
                let mut words = vec![0u32; ops::f16_words(data.len())];
                if pack_host(data, &mut words)
                    && let Some(st) = &self.staging
                {
                    ctx.write(&st.flag, 0, &[1u32]);
                }
                ctx.write(buf, 0, &words);
                self.loads.submit(ctx)?;
            }
            None => {}
        }
        Ok(())
    }

    /// Whether a value beyond f16's range (or NaN) was stored since the last call, and clears the
    /// flag: such values were clamped to ±65504 (NaN kept as NaN) in the f16 host copy, so the
    /// caller should tell the user (`--stream-dtype f32` keeps them). Always `false` for other
    /// placements. A 4-byte blocking read: call it once per layer, not per batch.
    pub fn overflowed(&self, ctx: &GpuContext) -> Result<bool, GpuError> {
        let Some(st) = &self.staging else {
            return Ok(false);
        };
        let flag = ctx.read(&st.flag)?;
        let hit = flag.first().is_some_and(|&f| f != 0);
        if hit {
            ctx.write(&st.flag, 0, &[0u32]);
        }
        Ok(hit)
    }

    /// Batch `b` itself where it is an f32 buffer on the GPU (`Placement::Gpu`): the kernels then
    /// read it, and update it in place, without [`Self::load`]'s copy into a work buffer and
    /// [`Self::store`]'s copy back. Those copies (eleven per batch: the hidden state seven times,
    /// the attention output and the MLP activations twice each) moved 8.6 GB per batch of 16
    /// sequences of a Llama-3-8B layer and took 0.16 s of its 1.9 s GPTQ layer on an H100
    /// (BENCHMARKS.md session 29). `None` for every other placement: load into a work buffer and
    /// store it back.
    pub fn gpu_batch(&self, b: usize) -> Option<&GpuBuffer<f32>> {
        match self.chunks.get(b) {
            Some(Chunk::Gpu(buf)) => Some(buf),
            _ => None,
        }
    }

    /// The buffer holding batch `b` for the kernels: the stream's own ([`Self::gpu_batch`]) or
    /// `work`, which [`Self::load_unless_in_place`] filled.
    pub fn batch_or<'a>(&'a self, b: usize, work: &'a GpuBuffer<f32>) -> &'a GpuBuffer<f32> {
        self.gpu_batch(b).unwrap_or(work)
    }

    /// [`Self::load`] unless the kernels use batch `b` in place ([`Self::gpu_batch`]).
    pub fn load_unless_in_place<'c>(
        &mut self,
        rec: Recorder<'c>,
        b: usize,
        work: &GpuBuffer<f32>,
    ) -> Result<Recorder<'c>, GpuError> {
        if self.gpu_batch(b).is_some() {
            return Ok(rec);
        }
        self.load(rec, b, work)
    }

    /// [`Self::store`] unless the kernels updated batch `b` in place ([`Self::gpu_batch`]).
    pub fn store_unless_in_place<'c>(
        &mut self,
        rec: Recorder<'c>,
        b: usize,
        work: &GpuBuffer<f32>,
    ) -> Result<Recorder<'c>, GpuError> {
        if self.gpu_batch(b).is_some() {
            return Ok(rec);
        }
        self.store(rec, b, work)
    }

    /// Copies batch `b` into `work`. GPU batches are copied inside `rec`; host batches go through
    /// `queue.write_buffer`, which executes before the *next* submission, so anything already
    /// recorded is submitted first (it may still read `work`) and a fresh recorder is returned.
    /// f16 host batches are unpacked on the GPU (`work` is written by a dispatch in the returned
    /// recorder). A store of `b` still in flight is completed first.
    pub fn load<'c>(
        &mut self,
        mut rec: Recorder<'c>,
        b: usize,
        work: &GpuBuffer<f32>,
    ) -> Result<Recorder<'c>, GpuError> {
        let ctx = rec.ctx();
        let _scope = ctx.time_scope("streams");
        self.complete_batch(ctx, b)?;
        match self.chunks.get(b) {
            Some(Chunk::Gpu(buf)) => {
                rec.copy(buf, 0, work, 0, self.lens[b]);
                Ok(rec)
            }
            Some(Chunk::GpuF16(buf)) => {
                ops::unpack_f16(&mut rec, buf, self.lens[b], work)?;
                Ok(rec)
            }
            Some(Chunk::HostF32(v)) => {
                rec.submit();
                ctx.write(work, 0, v);
                self.loads.submit(ctx)?;
                Ok(ctx.recorder())
            }
            // The packed words go to the staging buffer the same way (the write is ordered before
            // the next submission, after anything recorded so far); the unpack into `work` is
            // recorded in the fresh recorder, so it runs after the write.
            Some(Chunk::HostF16(v)) => {
                rec.submit();
                let Some(words) = self.staging.as_ref().and_then(|st| st.words.as_ref()) else {
                    return Err(GpuError::Validation(
                        "f16 host stream without its staging buffer".into(),
                    ));
                };
                ctx.write(words, 0, v);
                self.loads.submit(ctx)?;
                let mut rec = ctx.recorder();
                ops::unpack_f16(&mut rec, words, self.lens[b], work)?;
                Ok(rec)
            }
            None => Ok(rec),
        }
    }

    /// Stores `work` as batch `b`. For host batches this submits `rec`'s pending work with the
    /// readback and returns a fresh recorder; the readback completes later (module docs).
    pub fn store<'c>(
        &mut self,
        mut rec: Recorder<'c>,
        b: usize,
        work: &GpuBuffer<f32>,
    ) -> Result<Recorder<'c>, GpuError> {
        let ctx = rec.ctx();
        let _scope = ctx.time_scope("streams");
        let len = self.lens.get(b).copied().unwrap_or(0);
        let pending = match self.chunks.get_mut(b) {
            Some(Chunk::Gpu(buf)) => {
                rec.copy(work, 0, buf, 0, len);
                return Ok(rec);
            }
            Some(Chunk::GpuF16(buf)) => {
                let Some(st) = &self.staging else {
                    return Err(GpuError::Validation(
                        "f16 GPU stream without its overflow flag".into(),
                    ));
                };
                ops::pack_f16(&mut rec, work, len, buf, &st.flag)?;
                return Ok(rec);
            }
            Some(Chunk::HostF32(_)) => PendingStore::F32(b, ctx.read_async(rec, work, 0, len)?),
            // Packed on the GPU after everything recorded in `rec`; only the words come back.
            Some(Chunk::HostF16(_)) => {
                let Some((words, flag)) = self
                    .staging
                    .as_ref()
                    .and_then(|st| Some((st.words.as_ref()?, &st.flag)))
                else {
                    return Err(GpuError::Validation(
                        "f16 host stream without its staging buffer".into(),
                    ));
                };
                ops::pack_f16(&mut rec, work, len, words, flag)?;
                PendingStore::F16(b, ctx.read_async(rec, words, 0, ops::f16_words(len))?)
            }
            None => return Ok(rec),
        };
        self.pending.push_back(pending);
        while self.pending.len() > MAX_PENDING_STORES {
            if let Some(p) = self.pending.pop_front() {
                self.complete(ctx, p)?;
            }
        }
        Ok(ctx.recorder())
    }
}

/// `data` rounded to f16 (round to nearest even) and packed as [`ops::pack_f16`] packs: element
/// `2w` in the low 16 bits of `out[w]`, the odd tail's high half 0; values beyond ±65504 clamped
/// and NaN as `0x7e00`, as the shader does. Returns whether any value was out of range or NaN.
fn pack_host(data: &[f32], out: &mut [u32]) -> bool {
    let mut over = false;
    let mut half_bits = |x: f32| -> u32 {
        if x.is_nan() {
            over = true;
            0x7e00
        } else if x.abs() > 65504.0 {
            over = true;
            u32::from(if x > 0.0 { f16::MAX } else { f16::MIN }.to_bits())
        } else {
            u32::from(f16::from_f32(x).to_bits())
        }
    };
    for (w, pair) in out.iter_mut().zip(data.chunks(2)) {
        let lo = half_bits(pair[0]);
        let hi = pair.get(1).map_or(0, |&x| half_bits(x));
        *w = lo | (hi << 16);
    }
    over
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// Deterministic values in ±`scale` (no RNG needed): a sawtooth with irrational-ish steps, so
    /// neighbouring elements differ and most values are not f16-exact.
    fn values(len: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let t = ((i + 31 * seed) as f32 * 0.618_034).fract();
                (2.0 * t - 1.0) * scale
            })
            .collect()
    }

    fn rounded(x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
    }

    /// `load` of batch `b` into `work` (after filling `work` with a sentinel), read back whole.
    fn load_all(
        ctx: &GpuContext,
        s: &mut Stream,
        b: usize,
        work: &GpuBuffer<f32>,
    ) -> Result<Vec<f32>, GpuError> {
        ctx.write(work, 0, &vec![7.0f32; work.len()]);
        let rec = s.load(ctx.recorder(), b, work)?;
        rec.submit();
        ctx.read(work)
    }

    fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{what}: index {i} of {}: got {g:e}, expected {w:e}",
                got.len()
            );
        }
    }

    /// A host-f16 stream: `set_host` + `load` gives the f16-rounded (nearest-even) input, `store`
    /// of a GPU buffer + `load` round-trips it, only the batch's `len` elements of `work` are
    /// written (odd lengths: the packed tail), the host words have the layout `pack_host` writes,
    /// and batches do not disturb each other. GPU and host-f32 placements round-trip exactly.
    #[test]
    fn f16_host_stream_loads_and_stores_f16_rounded_values() -> TestResult {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let lens = [1001usize, 6, 7];
        let max = 1001;
        let work = ctx.zeros::<f32>("work", max)?;
        // Whole streams in each placement, and streams whose leading batches are on the GPU
        // beside host ones (MemoryPlan::resident_batches).
        let mixed = [
            Layout::spilled(StreamDType::F16, 1),
            Layout::spilled(StreamDType::F32, 2),
        ];
        for placement in [
            Placement::Host(StreamDType::F16),
            Placement::GpuF16,
            Placement::Host(StreamDType::F32),
            Placement::Gpu,
        ]
        .map(Layout::from)
        .into_iter()
        .chain(mixed)
        {
            let f16 = placement.first.is_f16();
            assert_eq!(f16, placement.rest.is_f16());
            let expect = |x: &[f32]| if f16 { rounded(x) } else { x.to_vec() };
            let mut s = Stream::new(&ctx, "test", &lens, placement)?;
            // set_host → load
            let embs: Vec<Vec<f32>> = lens
                .iter()
                .enumerate()
                .map(|(b, &l)| values(l, b, 3.0))
                .collect();
            for (b, e) in embs.iter().enumerate() {
                s.set_host(&ctx, b, e)?;
            }
            for (b, e) in embs.iter().enumerate() {
                let got = load_all(&ctx, &mut s, b, &work)?;
                let what = format!("{placement:?} set_host→load batch {b} (len {})", e.len());
                assert_bits(&what, &got[..e.len()], &expect(e));
                assert!(
                    got[e.len()..].iter().all(|&v| v == 7.0),
                    "{what}: wrote past the batch's {} elements",
                    e.len()
                );
            }
            // store (from a GPU buffer) → load, batch 1 and 2 only
            for b in [1usize, 2] {
                let l = lens[b];
                let v = values(l, 10 + b, 1e4);
                ctx.write(&work, 0, &v);
                let rec = s.store(ctx.recorder(), b, &work)?;
                rec.submit();
                s.flush(&ctx)?;
                let words = match s.chunks.get(b) {
                    Some(Chunk::HostF16(words)) => Some(words.clone()),
                    Some(Chunk::GpuF16(buf)) => Some(ctx.read(buf)?),
                    _ => None,
                };
                if let Some(words) = words {
                    let mut want = vec![0u32; ops::f16_words(l)];
                    pack_host(&v, &mut want);
                    assert_eq!(
                        words, want,
                        "{placement:?} batch {b}: GPU-packed words ≠ host packing"
                    );
                }
                let got = load_all(&ctx, &mut s, b, &work)?;
                assert_bits(
                    &format!("{placement:?} store→load batch {b} (len {l})"),
                    &got[..l],
                    &expect(&v),
                );
            }
            // Batch 0 is untouched by the other batches' stores (the staging buffer is shared).
            let got = load_all(&ctx, &mut s, 0, &work)?;
            assert_bits(
                &format!("{placement:?} batch 0 after storing 1 and 2"),
                &got[..lens[0]],
                &expect(&embs[0]),
            );
            assert!(
                !s.overflowed(&ctx)?,
                "{placement:?}: in-range values flagged"
            );
        }
        Ok(())
    }

    /// Host stores stay in flight (at most `MAX_PENDING_STORES`) while `work` is overwritten for
    /// the next batch, and every batch still loads what was stored for it; a second store of a
    /// batch whose first store is still in flight wins; `flush` completes the rest. GPU placement
    /// stores nothing in flight.
    #[test]
    fn host_stores_in_flight_land_in_their_batches() -> TestResult {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let lens = [257usize, 257, 257, 257, 100];
        let work = ctx.zeros::<f32>("work", 257)?;
        for placement in [
            Placement::Host(StreamDType::F16),
            Placement::Host(StreamDType::F32),
            Placement::Gpu,
            Placement::GpuF16,
        ] {
            let f16 = placement.is_f16();
            let expect = |x: &[f32]| if f16 { rounded(x) } else { x.to_vec() };
            let mut s = Stream::new(&ctx, "test", &lens, placement)?;
            let data: Vec<Vec<f32>> = lens
                .iter()
                .enumerate()
                .map(|(b, &l)| values(l, 40 + b, 2.0))
                .collect();
            for (b, v) in data.iter().enumerate() {
                // The next batch's data replaces `work` right after the store is submitted.
                ctx.write(&work, 0, v);
                s.store(ctx.recorder(), b, &work)?.submit();
                assert!(
                    s.pending_stores() <= MAX_PENDING_STORES,
                    "{placement:?}: {} stores in flight",
                    s.pending_stores()
                );
            }
            let in_flight = s.pending_stores();
            assert_eq!(
                in_flight,
                if matches!(placement, Placement::Gpu | Placement::GpuF16) {
                    0
                } else {
                    MAX_PENDING_STORES
                },
                "{placement:?}: stores in flight after five"
            );
            // The last batch is stored again with other data while its first store is in flight.
            let last = lens.len() - 1;
            let again = values(lens[last], 99, 2.0);
            ctx.write(&work, 0, &again);
            s.store(ctx.recorder(), last, &work)?.submit();
            for (b, v) in data.iter().enumerate() {
                let want = if b == last { expect(&again) } else { expect(v) };
                let got = load_all(&ctx, &mut s, b, &work)?;
                assert_bits(
                    &format!("{placement:?} batch {b} after stores in flight"),
                    &got[..lens[b]],
                    &want,
                );
            }
            // Five host loads, of which at most MAX_PENDING_LOADS are left unwaited for.
            assert_eq!(
                s.pending_loads(),
                if matches!(placement, Placement::Gpu | Placement::GpuF16) {
                    0
                } else {
                    MAX_PENDING_LOADS
                },
                "{placement:?}: loads in flight after five"
            );
            s.flush(&ctx)?;
            assert_eq!(s.pending_stores(), 0, "{placement:?}: flush left stores");
        }
        Ok(())
    }

    /// Host loads queued back to back (a statistics pass: no stores, no reads to wait for) leave
    /// at most `MAX_PENDING_LOADS` in flight and at most that many uploads' staging alive in
    /// wgpu's allocator, where the backend reports it (Vulkan, DX12); the sampled allocator peak
    /// covers our own buffers.
    #[test]
    fn host_loads_keep_little_upload_staging() -> TestResult {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let len = 1usize << 18;
        let batch_bytes = (len * 4) as u64;
        let lens = vec![len; 8];
        let work = ctx.zeros::<f32>("work", len)?;
        let k = 384;
        let busy = ctx.upload("busy", &values(k * k, 7, 1.0))?;
        let busy_out = ctx.zeros::<f32>("busy out", k * k)?;
        // Keeps the GPU busy, so that the uploads recorded next queue behind this work: on a GPU
        // that runs submissions asynchronously, all eight uploads' staging would then be alive at
        // once without the bound. (Lavapipe had freed each one by the next upload even without
        // it, so there only the count of uploads in flight tells.)
        let busy_gpu = || -> Result<Recorder<'_>, GpuError> {
            let mut rec = ctx.recorder();
            ops::gemm(
                &mut rec,
                k,
                k,
                k,
                1.0,
                ops::MatView::new(&busy, k),
                ops::MatView::new(&busy, k),
                0.0,
                ops::MatView::new(&busy_out, k),
            )?;
            Ok(rec)
        };
        let check = |s: &Stream, what: String| {
            assert!(s.pending_loads() <= MAX_PENDING_LOADS, "{what}");
            if let Some((_, staging)) = ctx.allocator_now() {
                assert!(
                    staging <= MAX_PENDING_LOADS as u64 * batch_bytes,
                    "{what}: {staging} bytes of upload staging alive, more than \
                     {MAX_PENDING_LOADS} uploads of {batch_bytes}"
                );
            }
        };
        for dtype in [StreamDType::F32, StreamDType::F16] {
            let mut s = Stream::new(&ctx, "test", &lens, Placement::Host(dtype))?;
            for b in 0..lens.len() {
                s.set_host(&ctx, b, &values(len, b, 2.0))?;
            }
            let mut rec = busy_gpu()?;
            for b in 0..lens.len() {
                rec = s.load(rec, b, &work)?;
                check(&s, format!("{dtype:?} host stream after loading batch {b}"));
            }
            rec.submit();
            ctx.sync()?;
        }
        // Filling a GPU-resident stream from the host (the embeddings) is bounded the same way.
        for placement in [Placement::Gpu, Placement::GpuF16] {
            let mut s = Stream::new(&ctx, "test", &lens, placement)?;
            busy_gpu()?.submit();
            for b in 0..lens.len() {
                s.set_host(&ctx, b, &values(len, b, 2.0))?;
                check(&s, format!("{placement:?} stream after setting batch {b}"));
            }
            ctx.sync()?;
            let got = load_all(&ctx, &mut s, 3, &work)?;
            let want = values(len, 3, 2.0);
            let want = if placement.is_f16() {
                rounded(&want)
            } else {
                want
            };
            assert_bits(
                &format!("{placement:?} batch 3 after set_host"),
                &got,
                &want,
            );
        }
        if let Some((reserved, _)) = ctx.allocator_peak() {
            let (_, ours) = ctx.memory();
            assert!(
                reserved >= ours,
                "allocator peak {reserved} below our own buffers' peak {ours}"
            );
        }
        Ok(())
    }

    /// Storing a value beyond f16's range sets the flag once (it is cleared by the read), the f16
    /// copy (host or packed on the GPU) holds ±65504; `set_host` follows the same rule; f32
    /// placements never overflow.
    #[test]
    fn f16_host_stream_reports_overflow_and_resets() -> TestResult {
        let Some(ctx) = crate::gpu::test_context() else {
            return Ok(());
        };
        let len = 513;
        let work = ctx.zeros::<f32>("work", len)?;
        for placement in [Placement::Host(StreamDType::F16), Placement::GpuF16] {
            let mut s = Stream::new(&ctx, "test", &[len, len], placement)?;
            assert!(
                !s.overflowed(&ctx)?,
                "{placement:?}: a fresh stream reports overflow"
            );
            let mut v = values(len, 3, 100.0);
            v[300] = 1e5;
            v[301] = -1e5;
            ctx.write(&work, 0, &v);
            let rec = s.store(ctx.recorder(), 1, &work)?;
            rec.submit();
            assert!(
                s.overflowed(&ctx)?,
                "{placement:?}: storing 1e5 was not reported"
            );
            assert!(
                !s.overflowed(&ctx)?,
                "{placement:?}: the flag was not reset by the read"
            );
            let got = load_all(&ctx, &mut s, 1, &work)?;
            let mut want = rounded(&v);
            want[300] = 65504.0;
            want[301] = -65504.0;
            assert_bits(
                &format!("{placement:?} clamped store→load"),
                &got[..len],
                &want,
            );
            // In-range stores after the reset stay quiet.
            ctx.write(&work, 0, &values(len, 4, 100.0));
            let rec = s.store(ctx.recorder(), 0, &work)?;
            rec.submit();
            assert!(
                !s.overflowed(&ctx)?,
                "{placement:?}: in-range store reported overflow"
            );
            // The host path (embeddings) follows the same rule.
            s.set_host(&ctx, 0, &v)?;
            assert!(
                s.overflowed(&ctx)?,
                "{placement:?}: set_host of 1e5 was not reported"
            );
            assert!(
                !s.overflowed(&ctx)?,
                "{placement:?}: the flag was not reset after set_host"
            );
            let got = load_all(&ctx, &mut s, 0, &work)?;
            assert_bits(
                &format!("{placement:?} clamped set_host→load"),
                &got[..len],
                &want,
            );
        }
        let mut v = values(len, 3, 100.0);
        v[300] = 1e5;
        for placement in [Placement::Gpu, Placement::Host(StreamDType::F32)] {
            let mut s = Stream::new(&ctx, "test", &[len], placement)?;
            s.set_host(&ctx, 0, &v)?;
            let rec = s.store(ctx.recorder(), 0, &work)?;
            rec.submit();
            assert!(!s.overflowed(&ctx)?, "{placement:?} reported f16 overflow");
        }
        Ok(())
    }
}
