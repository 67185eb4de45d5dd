//! GPU forward pass of a Llama-family decoder layer, as stage building blocks the pipeline and
//! `eval` share. (API contract; kernels being written in this session.)

use crate::gpu::{GpuBuffer, GpuContext, GpuError, Recorder};
use crate::model::{LayerWeights, ModelConfig, ModuleKind};

fn pending() -> GpuError {
    GpuError::Validation("forward pass kernels are not built yet".into())
}

/// Precomputed RoPE cos/sin tables `[max_pos, head_dim/2]`.
pub struct Rope {
    pub cos: GpuBuffer<f32>,
    pub sin: GpuBuffer<f32>,
}

impl Rope {
    pub fn new(_ctx: &GpuContext, _cfg: &ModelConfig, _max_pos: usize) -> Result<Self, GpuError> {
        Err(pending())
    }
}

/// One decoder layer's weights on the GPU.
pub struct GpuLayer {
    linears: Vec<GpuBuffer<f32>>,
}

impl GpuLayer {
    pub fn upload(
        _ctx: &GpuContext,
        _cfg: &ModelConfig,
        _lw: &LayerWeights,
    ) -> Result<Self, GpuError> {
        Err(pending())
    }
    pub fn set_linear(
        &mut self,
        _ctx: &GpuContext,
        _m: ModuleKind,
        _w: &[f32],
    ) -> Result<(), GpuError> {
        Err(pending())
    }
    pub fn linear(&self, m: ModuleKind) -> &GpuBuffer<f32> {
        &self.linears[m as usize]
    }
}

/// Per-batch intermediate buffers of one stream.
pub struct LayerScratch {
    x1: GpuBuffer<f32>,
    attn: GpuBuffer<f32>,
    x2: GpuBuffer<f32>,
    act: GpuBuffer<f32>,
}

impl LayerScratch {
    pub fn new(
        _ctx: &GpuContext,
        _cfg: &ModelConfig,
        _max_tokens: usize,
    ) -> Result<Self, GpuError> {
        Err(pending())
    }
    pub fn x1(&self) -> &GpuBuffer<f32> {
        &self.x1
    }
    pub fn attn(&self) -> &GpuBuffer<f32> {
        &self.attn
    }
    pub fn x2(&self) -> &GpuBuffer<f32> {
        &self.x2
    }
    pub fn act(&self) -> &GpuBuffer<f32> {
        &self.act
    }
}

pub fn input_norm(
    _rec: &mut Recorder<'_>,
    _l: &GpuLayer,
    _h: &GpuBuffer<f32>,
    _s: &LayerScratch,
    _t: usize,
) -> Result<(), GpuError> {
    Err(pending())
}
pub fn attention(
    _rec: &mut Recorder<'_>,
    _l: &GpuLayer,
    _rope: &Rope,
    _s: &LayerScratch,
    _nseq: usize,
    _seqlen: usize,
) -> Result<(), GpuError> {
    Err(pending())
}
pub fn o_residual(
    _rec: &mut Recorder<'_>,
    _l: &GpuLayer,
    _a: &GpuBuffer<f32>,
    _h: &GpuBuffer<f32>,
    _s: &LayerScratch,
    _t: usize,
) -> Result<(), GpuError> {
    Err(pending())
}
pub fn post_norm(
    _rec: &mut Recorder<'_>,
    _l: &GpuLayer,
    _h: &GpuBuffer<f32>,
    _s: &LayerScratch,
    _t: usize,
) -> Result<(), GpuError> {
    Err(pending())
}
pub fn mlp_act(
    _rec: &mut Recorder<'_>,
    _l: &GpuLayer,
    _s: &LayerScratch,
    _t: usize,
) -> Result<(), GpuError> {
    Err(pending())
}
pub fn down_residual(
    _rec: &mut Recorder<'_>,
    _l: &GpuLayer,
    _h: &GpuBuffer<f32>,
    _s: &LayerScratch,
    _t: usize,
) -> Result<(), GpuError> {
    Err(pending())
}
