//! Activation streams: per-batch `[tokens, width]` f32 tensors that live on the GPU when the memory
//! plan allows and spill to host RAM (f32 or f16) otherwise.
//!
//! The driver always computes on a working GPU buffer: [`Stream::load`] fills it from the batch's
//! storage and [`Stream::store`] writes it back. For GPU-resident batches both are device-side
//! copies recorded in the same command stream; for host batches they are an upload and a blocking
//! readback, the price of not holding 128×2048 hidden states of an 8B model (4 GiB f32 per stream)
//! on the device.

use half::f16;

use crate::gpu::{GpuBuffer, GpuContext, GpuError, Recorder};

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
    HostF32(Vec<f32>),
    HostF16(Vec<f16>),
}

/// One activation tensor per batch.
pub struct Stream {
    chunks: Vec<Chunk>,
    /// Elements per batch (the last batch may hold fewer valid elements; see `lens`).
    lens: Vec<usize>,
}

/// Where a stream's batches are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Gpu,
    Host(StreamDType),
}

impl Stream {
    /// A stream of zeros with `lens[b]` elements in batch `b`.
    pub fn new(
        ctx: &GpuContext,
        what: &str,
        lens: &[usize],
        placement: Placement,
    ) -> Result<Self, GpuError> {
        let mut chunks = Vec::with_capacity(lens.len());
        for &len in lens {
            chunks.push(match placement {
                Placement::Gpu => Chunk::Gpu(ctx.zeros::<f32>(what, len)?),
                Placement::Host(StreamDType::F32) => Chunk::HostF32(vec![0.0; len]),
                Placement::Host(StreamDType::F16) => Chunk::HostF16(vec![f16::ZERO; len]),
            });
        }
        Ok(Self {
            chunks,
            lens: lens.to_vec(),
        })
    }

    pub fn batches(&self) -> usize {
        self.chunks.len()
    }

    pub fn len(&self, b: usize) -> usize {
        self.lens.get(b).copied().unwrap_or(0)
    }

    /// Sets batch `b` from host data (used once, for the embeddings).
    pub fn set_host(&mut self, ctx: &GpuContext, b: usize, data: &[f32]) {
        match self.chunks.get_mut(b) {
            Some(Chunk::Gpu(buf)) => ctx.write(buf, 0, data),
            Some(Chunk::HostF32(v)) => v.copy_from_slice(data),
            Some(Chunk::HostF16(v)) => {
                for (d, s) in v.iter_mut().zip(data) {
                    *d = f16::from_f32(*s);
                }
            }
            None => {}
        }
    }

    /// Copies batch `b` into `work`. GPU batches are copied inside `rec`; host batches go through
    /// `queue.write_buffer`, which executes before the *next* submission, so anything already
    /// recorded is submitted first (it may still read `work`) and a fresh recorder is returned.
    pub fn load<'c>(&self, mut rec: Recorder<'c>, b: usize, work: &GpuBuffer<f32>) -> Recorder<'c> {
        let ctx = rec.ctx();
        match self.chunks.get(b) {
            Some(Chunk::Gpu(buf)) => {
                rec.copy(buf, 0, work, 0, self.lens[b]);
                rec
            }
            Some(Chunk::HostF32(v)) => {
                rec.submit();
                ctx.write(work, 0, v);
                ctx.recorder()
            }
            Some(Chunk::HostF16(v)) => {
                rec.submit();
                let wide: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
                ctx.write(work, 0, &wide);
                ctx.recorder()
            }
            None => rec,
        }
    }

    /// Stores `work` as batch `b`. For host batches this submits `rec`'s pending work and blocks on
    /// the readback, so the caller gets a fresh recorder back.
    pub fn store<'c>(
        &mut self,
        mut rec: Recorder<'c>,
        b: usize,
        work: &GpuBuffer<f32>,
    ) -> Result<Recorder<'c>, GpuError> {
        let ctx = rec.ctx();
        let len = self.lens[b];
        match self.chunks.get_mut(b) {
            Some(Chunk::Gpu(buf)) => {
                rec.copy(work, 0, buf, 0, len);
                Ok(rec)
            }
            Some(Chunk::HostF32(v)) => {
                rec.submit();
                *v = ctx.read_range(work, 0, len)?;
                Ok(ctx.recorder())
            }
            Some(Chunk::HostF16(v)) => {
                rec.submit();
                let data = ctx.read_range(work, 0, len)?;
                for (d, s) in v.iter_mut().zip(&data) {
                    *d = f16::from_f32(*s);
                }
                Ok(ctx.recorder())
            }
            None => Ok(rec),
        }
    }
}
