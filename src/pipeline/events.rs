//! Typed progress events of a quantization run and the JSON run report built from them.
//!
//! The CLI and the GUI consume the same [`Event`] stream; the report's field names are a
//! public contract (`--report FILE`, scripts parse it): keep them stable.

use serde::{Deserialize, Serialize};

use crate::model::ModuleKind;
use crate::quant::QuantConfig;

fn one() -> usize {
    1
}

/// The memory plan decided before a run starts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MemoryPlan {
    /// Sequences per GPU batch.
    pub batch_sequences: usize,
    /// Hidden-state streams kept on the GPU (true) or spilled to host RAM (false).
    pub streams_on_gpu: bool,
    /// The MLP activations `act = silu(gate)·up` are kept per batch on the GPU from the stage that
    /// computes them to the one that feeds them to down_proj, instead of being recomputed there
    /// (two `tokens × hidden × intermediate` GEMMs per stream and batch). Only with the streams
    /// on the GPU and room for them.
    #[serde(default)]
    pub act_streams: bool,
    /// The kept activations are packed f16 on the GPU (half the bytes). Only with tensor cores,
    /// whose down_proj GEMM reads its input as f16 anyway, so nothing is lost to the packing.
    #[serde(default)]
    pub act_f16: bool,
    /// The next layer's weights are uploaded on a second thread during this layer's last stage
    /// (down_proj's outputs), so the GPU does not wait for the upload at the start of each layer.
    /// Only where one more layer of f32 weights fits there: usually within the plan's peak (the
    /// statistics and solve buffers of the earlier stages are gone by then), else on top of it.
    #[serde(default)]
    pub weights_ahead: bool,
    /// Sequences the tensor-core attention processes at once (`forward::AttnTc`); 1 without
    /// tensor cores.
    #[serde(default = "one")]
    pub attention_sequences: usize,
    /// GPTAQ's `A = α·triu₁(D·Uᵀ)` runs on the tensor cores from split-f16 copies of D and U
    /// (`quant::gpu::SolveFlags::split_f16`). Tensor-core GPTAQ runs only, where those four n × n
    /// f16 copies fit the budget; otherwise A takes the f32 GEMMs and the rest of the run keeps
    /// the tensor cores.
    #[serde(default)]
    pub split_f16: bool,
    /// gate/up's f32 weights are freed in both streams once they are solved: a tensor-core run
    /// whose forward reads their f16 copies only and whose metrics (if any) need no W
    /// (`plan::gate_up_f32_released`). Lowers the peak of down_proj's statistics and solve.
    #[serde(default)]
    pub gate_up_f32_released: bool,
    /// GPTAQ's FP stream runs its down_proj in stage D on the act at hand (no metrics, act not
    /// kept) instead of recomputing its gate/up in stage E, and its MLP weights are freed before
    /// down_proj's solve, which the estimate counts (`plan::fp_down_in_d`).
    #[serde(default)]
    pub fp_down_in_d: bool,
    /// With the streams spilled to the host, the first this many batches of the hidden-state and
    /// attention streams stay on the GPU (packed f16 beside f16 host batches, f32 beside f32
    /// ones: the values the host would hold) in the memory the plan has to spare, so only the
    /// other batches cross the host link (`pipeline::stream::Layout`). 0 with the streams on
    /// the GPU, with `--host-streams` and with `--lean-memory`.
    #[serde(default)]
    pub resident_batches: usize,
    /// Host stream element type when spilled ("f32" or "f16").
    pub stream_dtype: String,
    /// Estimated peak GPU bytes: layer weights (FP + quantized copies), statistics, activations.
    pub gpu_bytes_estimate: u64,
    /// Estimated host bytes for the streams.
    pub host_bytes_estimate: u64,
    /// The device limit the plan was made against.
    pub gpu_budget_bytes: u64,
    /// Human-readable breakdown, one line per item.
    pub breakdown: Vec<String>,
}

/// One quantized module's result. The three relative errors are defined on the calibration tokens
/// (Frobenius norms squared, X rows are tokens):
/// - `quant_error`  = ‖(W−Q)X_qᵀ‖² / ‖WX_fpᵀ‖²: what quantizing this module alone costs;
/// - `asym_error`   = ‖W(X_fp−X_q)ᵀ‖² / ‖WX_fpᵀ‖²: the deviation inherited from earlier quantized
///   modules (zero for the first layer's q/k/v);
/// - `output_error` = ‖QX_qᵀ−WX_fpᵀ‖² / ‖WX_fpᵀ‖²: what the module actually outputs versus the FP model.
///
/// GPTQ minimises the first (its objective uses X_q on both sides); GPTAQ minimises the third.
/// They are `None` when the FP stream was not run (`--no-metrics` with GPTQ/RTN).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModuleReport {
    pub layer: usize,
    pub module: String,
    pub rows: usize,
    pub cols: usize,
    pub nsamples: usize,
    /// Relative damping used (`percdamp`, after any automatic increase).
    pub damp: f64,
    /// GPTQ proxy loss Σ(w−q)²/(2U_jj²) divided by the number of sequences (AutoGPTQ's log).
    pub proxy_loss: f64,
    pub quant_error: Option<f64>,
    pub asym_error: Option<f64>,
    pub output_error: Option<f64>,
    /// `None`, or why the normal solve was not used ("damping 0.03", "diagonal floor", "rtn: …").
    pub fallback: Option<String>,
    pub secs: f64,
}

impl ModuleReport {
    pub fn kind(&self) -> Option<ModuleKind> {
        ModuleKind::from_short_name(&self.module)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerReport {
    pub layer: usize,
    /// ‖h_q − h_fp‖ / ‖h_fp‖ of the layer's output hidden state on the calibration tokens.
    pub hidden_rel_error: Option<f64>,
    pub secs: f64,
    /// Seconds per driver phase (load, forward, attention, metrics, stats, store, solve, …), only
    /// with `GPTAQ_PROFILE=1` (see `pipeline::profile`); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<(String, f64)>,
    /// GPU seconds per (scope, kernel) of this layer, only with `GPTAQ_KERNEL_TIMES=1` (see
    /// `gpu::timing`); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_times: Vec<crate::gpu::KernelTime>,
}

/// The run report written by `--report` and saved / loaded by the GUI.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    pub model: String,
    pub method: String,
    pub config: QuantConfig,
    pub device: String,
    pub calibration: String,
    pub nsamples: usize,
    pub seqlen: usize,
    pub seed: u64,
    pub plan: MemoryPlan,
    pub modules: Vec<ModuleReport>,
    pub layers: Vec<LayerReport>,
    /// Peak bytes of our live GPU buffers (what the plan's estimate bounds).
    pub peak_gpu_bytes: u64,
    /// Peak bytes with the freed buffers the pool keeps for reuse (what the device held for us;
    /// bounded by the budget less the driver's reserve, `plan::usable_budget`). nvidia-smi shows
    /// this plus the driver's own overhead.
    #[serde(default)]
    pub peak_reserved_bytes: u64,
    /// The highest sampled bytes reserved by wgpu's own allocator (our buffers, wgpu's internal
    /// ones and its upload staging; `GpuContext::sample_allocator`), where the backend reports
    /// it: closer to nvidia-smi than `peak_reserved_bytes`, which misses the staging.
    #[serde(default)]
    pub peak_allocator_bytes: Option<u64>,
    /// The highest sampled bytes of wgpu's upload staging alone.
    #[serde(default)]
    pub peak_staging_bytes: Option<u64>,
    /// GPU seconds per (scope, kernel) over all layers, only with `GPTAQ_KERNEL_TIMES=1`
    /// (`gpu::timing`; per layer in `layers`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_times: Vec<crate::gpu::KernelTime>,
    pub secs: f64,
    pub warnings: Vec<String>,
}

/// Progress of a run, in order: `Started`, then per layer `LayerStarted`, `ModuleDone`×7,
/// `LayerDone`, and finally exactly one of `Finished`, `Failed`, `Cancelled`.
#[derive(Clone, Debug)]
pub enum Event {
    Started {
        model: String,
        method: String,
        layers: usize,
        modules_per_layer: usize,
        plan: MemoryPlan,
    },
    /// Free-form status line ("capturing layer-0 inputs", "solving layer 3 \[q,k,v\]").
    Status(String),
    LayerStarted {
        layer: usize,
    },
    ModuleDone(ModuleReport),
    LayerDone(LayerReport),
    Warning(String),
    Finished(Box<RunReport>),
    Failed(String),
    Cancelled,
}
