//! Command-line front end (`gptaq-studio <command>`); with no command the desktop app opens.
//! This is the binary edge: errors become `anyhow` with context here and nowhere deeper.

use std::process::ExitCode;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::gpu::{BackendChoice, GpuContext, GpuOptions};
use crate::model::inspect::ModelSummary;
use crate::pipeline::{
    self, CalibInput, Event, Job, ModelInput, PipelineConfig, Solver, StreamDType,
};
use crate::quant::{Method, QuantConfig};

#[derive(Parser, Debug)]
#[command(
    name = "gptaq-studio",
    version,
    about = "GPTQ / GPTAQ quantization on any GPU (Vulkan, Metal, DX12)"
)]
pub struct Cli {
    #[command(flatten)]
    pub gpu: GpuArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Adapter selection, shared by every command that touches the GPU.
#[derive(Args, Debug, Clone)]
pub struct GpuArgs {
    /// Graphics API: auto, vulkan, metal or dx12.
    #[arg(long, global = true, env = "GPTAQ_BACKEND", default_value = "auto", value_parser = parse_backend)]
    pub backend: BackendChoice,
    /// Use the first adapter whose name contains this (case-insensitive).
    #[arg(long, global = true, env = "GPTAQ_ADAPTER")]
    pub adapter: Option<String>,
}

fn parse_backend(s: &str) -> Result<BackendChoice, String> {
    BackendChoice::parse(s)
        .ok_or_else(|| format!("unknown backend `{s}` (expected auto, vulkan, metal or dx12)"))
}

impl GpuArgs {
    pub fn options(&self) -> GpuOptions {
        GpuOptions {
            backend: self.backend,
            adapter: self.adapter.clone(),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List GPU adapters, their backend, granted features and key limits.
    Devices {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Describe a model directory: architecture, dtype, shapes, parameters, memory to quantize it.
    Inspect {
        model: PathBuf,
        /// Calibration size used for the memory estimate.
        #[arg(long, default_value_t = 128)]
        nsamples: usize,
        #[arg(long, default_value_t = 2048)]
        seqlen: usize,
        #[arg(long)]
        json: bool,
    },
    /// Quantize a model layer by layer with GPTQ, GPTAQ or RTN.
    Quantize(Box<QuantizeArgs>),
    /// Perplexity of a model directory (FP safetensors or a GPTQ checkpoint) on a text, GPTQ-paper
    /// protocol: the text tokenized once without BOS, non-overlapping windows, exp(mean NLL).
    Eval(EvalArgs),
    /// Layer lab: capture one module's statistics from a real run (or load a saved capture) and
    /// compare GPTQ with GPTAQ on it, including an α sweep. Modules wider than 512 columns or
    /// with more than 262144 weights are re-solved on the GPU, smaller ones on the f64 reference.
    Lab(Box<LabArgs>),
    /// Time both GEMM kernels over a grid of shapes on this adapter and cache the faster choice
    /// per shape (later runs on this adapter read it; see `src/gpu/tune.rs`).
    Tune {
        /// Timed runs per kernel and shape (best of).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Write the table here instead of the cache directory (then it is not used by runs).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Open the desktop application (the default when no command is given).
    Gui,
}

#[derive(Args, Debug, Clone)]
pub struct LabArgs {
    /// Model directory to capture from.
    pub model: Option<PathBuf>,
    /// Capture from the built-in synthetic demo model.
    #[arg(long, conflicts_with = "model")]
    pub demo: bool,
    /// Calibration data (as for `quantize`).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Load a capture saved with --save instead of running the model.
    #[arg(long, conflicts_with_all = ["model", "demo"])]
    pub load: Option<PathBuf>,
    /// Save the capture (W, H, D, E as safetensors) for later or for sharing.
    #[arg(long)]
    pub save: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub layer: usize,
    /// q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj.
    #[arg(long, default_value = "down_proj")]
    pub module: String,
    /// How the layers before the captured module are quantized.
    #[arg(long, value_enum, default_value = "gptaq")]
    pub method: MethodArg,
    #[command(flatten)]
    pub quant: QuantArgs,
    #[arg(long)]
    pub nsamples: Option<usize>,
    #[arg(long)]
    pub seqlen: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub run: RunArgs,
    /// α values of the sweep (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![0.0, 0.1, 0.25, 0.5, 0.75, 1.0])]
    pub alphas: Vec<f64>,
    /// Where the re-solves run: auto = the GPU for modules wider than 512 columns or with more
    /// than 262144 weights, else the exact f64 CPU reference.
    #[arg(long, value_enum, default_value = "auto")]
    pub solver: LabSolverArg,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LabSolverArg {
    Auto,
    Gpu,
    Cpu,
}

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Model directory (FP checkpoint, or a GPTQ checkpoint with quantize_config.json).
    #[arg(required_unless_present = "model_flag", conflicts_with = "model_flag")]
    pub model: Option<PathBuf>,
    /// The same as the positional MODEL (kept because earlier scripts pass `--model DIR`).
    #[arg(long = "model", id = "model_flag", hide = true)]
    pub model_flag: Option<PathBuf>,
    /// Text to evaluate on: .txt, .jsonl, .parquet (documents joined with "\n\n") or
    /// pre-tokenized .safetensors.
    #[arg(long)]
    pub text: PathBuf,
    #[arg(long, default_value_t = 2048)]
    pub seqlen: usize,
    /// Evaluate only the first N windows (quick checks).
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Run the linears and attention on tensor cores (f16 operands, f32 accumulation) where the
    /// adapter grants them: the perplexity of the half-precision forward, as transformers runs an
    /// f16 checkpoint, faster. Ignored elsewhere.
    #[arg(long)]
    pub tensor_cores: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MethodArg {
    Gptaq,
    Gptq,
    Rtn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SolverArg {
    Gpu,
    Cpu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StreamArg {
    F32,
    F16,
}

/// How a run that executes the model uses the GPU: the memory plan's budget, where the activation
/// streams live and whether the forward runs on tensor cores. Shared by `quantize` and `lab` (the
/// lab's capture is a quantization run up to the captured module, with the same plan).
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// GPU memory budget in GiB for the memory plan.
    #[arg(long, default_value_t = 8.0)]
    pub gpu_memory: f64,
    /// Element type of the activation streams: f16 keeps streams that do not fit the GPU in f32
    /// but do in f16 on the GPU (packed), and halves what spills to host RAM otherwise.
    #[arg(long, value_enum, default_value = "f32")]
    pub stream_dtype: StreamArg,
    /// Keep the activation streams in host RAM even if they fit on the GPU.
    #[arg(long)]
    pub host_streams: bool,
    /// Spend no spare GPU memory on speed: recompute gate/up for down_proj's outputs instead of
    /// keeping the MLP activations between the two stages that need them, and upload each layer's
    /// weights when it starts instead of during the previous layer's last stage (both are done by
    /// default when the memory plan has room for them).
    #[arg(long)]
    pub lean_memory: bool,
    /// Run the calibration forward's linears and attention and the Hessian statistics on tensor
    /// cores (f16 operands, f32 accumulation, like the reference's half-precision forward) where
    /// the adapter grants f16 cooperative matrices; ignored with a warning elsewhere, and the f32
    /// kernels run where the f16 copies do not fit --gpu-memory. On an H100 an 8B GPTQ layer took
    /// 3.8 s with it and 7.9 s without (BENCHMARKS.md, session 20), 2.16 s with it after the
    /// kernel work of sessions 21–22. GPTAQ's solve then computes its A = α·triu₁(D·Uᵀ) from
    /// split-f16 operands (two halves per f32 value, three products: within a few times f32's
    /// round-off) where the width is a multiple of 128; GPTAQ_SPLIT_F16=0 keeps the f32 GEMMs.
    /// Same as GPTAQ_TENSOR_CORES=1.
    #[arg(long)]
    pub tensor_cores: bool,
}

impl RunArgs {
    /// The job on `inputs` ([`run_inputs`]) with `config` and these settings.
    fn job(&self, (model, calib): (ModelInput, CalibInput), mut config: PipelineConfig) -> Job {
        self.apply(&mut config);
        Job {
            model,
            calib,
            config,
        }
    }

    /// These settings in `cfg`.
    fn apply(&self, cfg: &mut PipelineConfig) {
        cfg.stream_dtype = match self.stream_dtype {
            StreamArg::F32 => StreamDType::F32,
            StreamArg::F16 => StreamDType::F16,
        };
        cfg.gpu_budget_bytes = (self.gpu_memory * (1u64 << 30) as f64) as u64;
        cfg.force_host_streams = self.host_streams;
        cfg.lean_memory = self.lean_memory;
        cfg.tensor_cores = self.tensor_cores;
    }
}

/// Quantizer settings shared by `quantize` and `lab`.
#[derive(Args, Debug, Clone)]
pub struct QuantArgs {
    #[arg(long, default_value_t = 4)]
    pub bits: u32,
    /// Columns per group; -1 = one group per row.
    #[arg(long, default_value_t = 128, allow_hyphen_values = true)]
    pub group_size: i64,
    /// Process columns by decreasing Hessian diagonal (desc_act).
    #[arg(long)]
    pub act_order: bool,
    /// Group parameters from the original column groups (act-order without a g_idx permutation).
    #[arg(long)]
    pub static_groups: bool,
    /// Asymmetric quantization (per-group zero points).
    #[arg(long)]
    pub asym: bool,
    /// Relative damping added to the Hessian diagonal.
    #[arg(long, default_value_t = 0.01)]
    pub damp: f64,
    /// GPTAQ's shrinkage of the asymmetry correction (0 = GPTQ).
    #[arg(long, default_value_t = 0.25)]
    pub alpha: f64,
    #[arg(long, default_value_t = 128)]
    pub block_size: usize,
    /// MSE clipping grid search for the quantizer range.
    #[arg(long)]
    pub mse: bool,
}

impl QuantArgs {
    pub fn config(&self, method: MethodArg) -> anyhow::Result<QuantConfig> {
        Ok(QuantConfig {
            method: match method {
                MethodArg::Gptaq => Method::Gptaq { alpha: self.alpha },
                MethodArg::Gptq => Method::Gptq,
                MethodArg::Rtn => Method::Rtn,
            },
            bits: self.bits,
            group_size: match self.group_size {
                -1 => None,
                g if g > 0 => Some(g as usize),
                g => anyhow::bail!("--group-size must be positive or -1 (got {g})"),
            },
            sym: !self.asym,
            act_order: self.act_order,
            static_groups: self.static_groups,
            damp_percent: self.damp,
            block_size: self.block_size,
            mse: self.mse,
            ..QuantConfig::default()
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct QuantizeArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(required_unless_present = "demo")]
    pub model: Option<PathBuf>,
    /// Quantize the built-in synthetic demo model on synthetic calibration tokens (no download).
    #[arg(long, conflicts_with = "model")]
    pub demo: bool,
    /// Calibration data: .txt, .jsonl (`text` field), .parquet (`text` column) or pre-tokenized
    /// .safetensors (`input_ids` [N, L]).
    #[arg(long, required_unless_present = "demo")]
    pub calib: Option<PathBuf>,
    /// Output directory for the GPTQ checkpoint.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Overwrite a non-empty --out.
    #[arg(long)]
    pub force: bool,
    #[arg(long, value_enum, default_value = "gptaq")]
    pub method: MethodArg,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// Calibration sequences (default 128; 32 with --demo).
    #[arg(long)]
    pub nsamples: Option<usize>,
    /// Tokens per calibration sequence (default 2048; 128 with --demo).
    #[arg(long)]
    pub seqlen: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Skip the error metrics (quant/asym/output errors): GPTQ and RTN then run no FP stream at
    /// all; GPTAQ still runs it (its solve needs D) but skips the metrics' products and moments,
    /// and without --act-order accumulates only D's upper half, the only part its solve reads
    /// (an 8B GPTAQ layer took 4.15 s without metrics and 4.77 s with them on an H100, session
    /// 22, before the upper half).
    #[arg(long)]
    pub no_metrics: bool,
    /// Measure the metrics from X·Wᵀ products on every calibration token (one more GEMM per
    /// module and batch) instead of taking the quantization and cross terms from the group's H
    /// and D (GPTAQ's own, or one GPTQ accumulates where that is cheaper than the products).
    #[arg(long, conflicts_with = "no_metrics")]
    pub metric_products: bool,
    /// Time every GPU dispatch with timestamp queries and print the GPU time per scope and
    /// kernel, the GPU's idle time between submissions and the host's time in GPU calls at the
    /// end (also per layer in --report). Costs about 1 % of an 8B layer on an H100 (0–11 % of a
    /// lone 4096 × 14336 solve, thousands of tiny passes). Same as GPTAQ_KERNEL_TIMES=1;
    /// needs the adapter's TIMESTAMP_QUERY.
    #[arg(long)]
    pub kernel_times: bool,
    /// Write the run report (JSON) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Which solver implementation to use.
    #[arg(long, value_enum, default_value = "gpu")]
    pub solver: SolverArg,
    #[command(flatten)]
    pub run: RunArgs,
    /// After quantizing, measure perplexity of the FP and the quantized model on this text
    /// (GPTQ protocol; see `eval`). Not available with --demo.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Window length for --eval.
    #[arg(long, default_value_t = 2048)]
    pub eval_seqlen: usize,
    /// Evaluate only the first N windows.
    #[arg(long)]
    pub eval_windows: Option<usize>,
    /// With --eval: skip the FP model's perplexity (it does not depend on the quantization
    /// settings, so batch runs measure it once).
    #[arg(long, requires = "eval")]
    pub no_fp_eval: bool,
}

/// The calibration size a run reads: `nsamples` × `seqlen` where given, else 32 × 128 tokens for
/// the demo and 128 × `seqlen_default` for a model.
fn calib_size(
    demo: bool,
    nsamples: Option<usize>,
    seqlen: Option<usize>,
    seqlen_default: usize,
) -> (usize, usize) {
    (
        nsamples.unwrap_or(if demo { 32 } else { 128 }),
        seqlen.unwrap_or(if demo { 128 } else { seqlen_default }),
    )
}

/// The model and calibration a run reads: the demo model on synthetic tokens, or a model
/// directory with `--calib` (`no_model`: the error when neither is given).
fn run_inputs(
    demo: bool,
    seed: u64,
    model: &Option<PathBuf>,
    calib: &Option<PathBuf>,
    no_model: &str,
) -> anyhow::Result<(ModelInput, CalibInput)> {
    if demo {
        return Ok((ModelInput::Demo { seed }, CalibInput::Synthetic));
    }
    let model = model.clone().context(no_model.to_string())?;
    let calib = calib
        .clone()
        .context("--calib is required for a model directory")?;
    Ok((ModelInput::Dir(model), CalibInput::File(calib)))
}

impl QuantizeArgs {
    pub fn job(&self) -> anyhow::Result<Job> {
        let inputs = run_inputs(
            self.demo,
            self.seed,
            &self.model,
            &self.calib,
            "a MODEL_DIR (or --demo) is required",
        )?;
        let (nsamples, seqlen) = calib_size(self.demo, self.nsamples, self.seqlen, 2048);
        let config = PipelineConfig {
            quant: self.quant.config(self.method)?,
            nsamples,
            seqlen,
            seed: self.seed,
            metrics: !self.no_metrics,
            solver: match self.solver {
                SolverArg::Gpu => Solver::Gpu,
                SolverArg::Cpu => Solver::CpuReference,
            },
            metric_products: self.metric_products,
            kernel_times: self.kernel_times,
            capture: None,
            ..PipelineConfig::default()
        };
        Ok(self.run.job(inputs, config))
    }
}

pub fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`gptaq-studio devices | head`) would
    // panic in `println!`; with the default action the process ends quietly like other tools.
    #[cfg(unix)]
    // SAFETY: called once at start-up before any thread exists; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .try_init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None | Some(Command::Gui) => crate::app::run_app(cli.gpu.options())
            .map_err(|e| anyhow::anyhow!("the desktop application failed: {e}")),
        Some(Command::Devices { json }) => devices(&cli.gpu, json),
        Some(Command::Inspect {
            model,
            nsamples,
            seqlen,
            json,
        }) => inspect(&model, nsamples, seqlen, json),
        Some(Command::Quantize(args)) => quantize(&cli.gpu, &args),
        Some(Command::Eval(args)) => eval_cmd(&cli.gpu, &args),
        Some(Command::Lab(args)) => lab_cmd(&cli.gpu, &args),
        Some(Command::Tune { reps, out }) => tune_cmd(&cli.gpu, reps, out.as_deref()),
    }
}

fn tune_cmd(gpu: &GpuArgs, reps: usize, out: Option<&Path>) -> anyhow::Result<()> {
    use crate::gpu::tune;
    let ctx = GpuContext::new(&gpu.options()).context("opening the GPU")?;
    eprintln!("device: {} ({})", ctx.summary.name, ctx.summary.backend);
    let path = match out {
        Some(p) => p.to_path_buf(),
        None => tune::table_path(
            &tune::cache_dir().context("no cache directory: set GPTAQ_CACHE_DIR or HOME")?,
            &ctx.summary,
        ),
    };
    let shapes = tune::default_shapes(ctx.summary.device_type == "Cpu");
    println!(
        "{:>6} {:>6} {:>6} {:>11} {:>11} {:>11} {:>11} {:>9}  choice",
        "M", "N", "K", "large ms", "small ms", "large-db ms", "narrow ms", "GFLOP/s"
    );
    let table = tune::measure(&ctx, &shapes, reps, &mut |e| {
        let gflops = 2.0 * (e.m * e.n * e.k) as f64 / (e.best_ms() * 1e-3) / 1e9;
        println!(
            "{:>6} {:>6} {:>6} {:>11.3} {:>11.3} {:>11.3} {:>11.3} {:>9.1}  {}",
            e.m,
            e.n,
            e.k,
            e.large_ms,
            e.small_ms,
            e.large_db_ms.unwrap_or(f64::NAN),
            e.narrow_ms.unwrap_or(f64::NAN),
            gflops,
            e.best().name()
        );
    })
    .context("timing the GEMM kernels")?;
    let rule_agrees = table
        .entries
        .iter()
        .filter(|e| crate::gpu::ops::size_rule_for(&ctx, e.m, e.n, e.k) == e.best())
        .count();
    table
        .save(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "{} shapes; the size rule picks the faster kernel for {rule_agrees} of them; table: {}",
        table.entries.len(),
        path.display()
    );
    Ok(())
}

fn inspect(dir: &Path, nsamples: usize, seqlen: usize, json: bool) -> anyhow::Result<()> {
    let summary =
        ModelSummary::from_dir(dir).with_context(|| format!("inspecting {}", dir.display()))?;
    let config = crate::model::ModelConfig::from_file(dir.join("config.json"))?;
    let plans = inspect_plans(&config, nsamples, seqlen);
    let budgets = smallest_budgets(&config, nsamples, seqlen);
    if json {
        let plan_json = |plan: &Result<pipeline::MemoryPlan, pipeline::plan::PlanError>| match plan
        {
            Ok(p) => serde_json::to_value(p),
            Err(e) => Ok(serde_json::json!({ "error": e.to_string() })),
        };
        let v = serde_json::json!({
            "model": summary,
            "quantization_plan": plan_json(&plans[0].1)?,
            "quantization_plan_tensor_cores": plan_json(&plans[1].1)?,
            "smallest_gpu_memory": budgets,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{summary}");
        println!(
            "\nSmallest --gpu-memory for {nsamples} × {seqlen} calibration tokens (f16 host \
             streams where the GPU's are too small):"
        );
        println!(
            "  {:<7} {:<14} {:>12} {:>14}",
            "method", "kernels", "metrics on", "--no-metrics"
        );
        for pair in budgets.chunks(2) {
            let cell = |b: &SmallestBudget| {
                b.mib.map_or_else(
                    || "-".into(),
                    |mib| format!("{:.2} GiB", mib as f64 / 1024.0),
                )
            };
            if let [on, off] = pair {
                println!(
                    "  {:<7} {:<14} {:>12} {:>14}",
                    on.method,
                    on.kernels,
                    cell(on),
                    cell(off)
                );
            }
        }
        if let Some(e) = budgets.iter().find_map(|b| b.error.as_ref()) {
            println!("  -: {e}");
        }
        println!(
            "  (tensor cores only where the GPU offers them; where their plan does not fit, \
             quantize runs the f32 kernels)"
        );
        for (what, plan) in &plans {
            println!(
                "\nGPTAQ memory plan for {nsamples} × {seqlen} calibration tokens on an 8 GiB GPU, \
                 {what}:"
            );
            match plan {
                Ok(p) => {
                    for line in &p.breakdown {
                        println!("  {line}");
                    }
                    println!(
                        "  total ≈ {:.1} MiB GPU, {:.1} MiB host",
                        p.gpu_bytes_estimate as f64 / (1u64 << 20) as f64,
                        p.host_bytes_estimate as f64 / (1u64 << 20) as f64
                    );
                }
                Err(e) => println!("  {e}"),
            }
        }
    }
    Ok(())
}

/// `inspect`'s estimates: the quantization pipeline's own memory plan for GPTAQ (FP + quantized
/// streams, metrics on) on an 8 GiB card with f16 host streams, with the f32 kernels and with
/// tensor cores (where the GPU offers them; `quantize --tensor-cores` falls back to the first
/// where the second does not fit).
fn inspect_plans(
    config: &crate::model::ModelConfig,
    nsamples: usize,
    seqlen: usize,
) -> [(
    &'static str,
    Result<pipeline::MemoryPlan, pipeline::plan::PlanError>,
); 2] {
    let plan = |tensor_cores| {
        pipeline::plan::plan(&inspect_input(
            config,
            (nsamples, seqlen),
            true,
            true,
            tensor_cores,
            8 << 30,
        ))
    };
    [
        ("f32 kernels", plan(false)),
        (
            "tensor cores (--tensor-cores, where the GPU offers them)",
            plan(true),
        ),
    ]
}

/// The plan input of an `inspect` estimate: GPTQ or GPTAQ at `(nsamples, seqlen)` with the run's
/// defaults otherwise (f16 host streams where needed, metrics from the statistics, a 2 GiB
/// binding limit). GPTQ with metrics runs an FP stream beside the quantized one, without them only
/// the latter.
fn inspect_input(
    config: &crate::model::ModelConfig,
    (nsamples, seqlen): (usize, usize),
    gptaq: bool,
    metrics: bool,
    tensor_cores: bool,
    gpu_budget_bytes: u64,
) -> pipeline::plan::PlanInput<'_> {
    pipeline::plan::PlanInput {
        config,
        nsamples,
        seqlen,
        fp_stream: gptaq || metrics,
        metrics,
        statistics: if gptaq { 2 } else { 1 },
        metric_moments: metrics,
        gpu_budget_bytes,
        max_buffer_bytes: 2 << 30,
        host_dtype: StreamDType::F16,
        force_host: false,
        lean_memory: false,
        tensor_cores,
    }
}

/// One cell of `inspect`'s table of the smallest budgets.
#[derive(Debug, serde::Serialize)]
struct SmallestBudget {
    method: &'static str,
    kernels: &'static str,
    metrics: bool,
    /// The smallest `--gpu-memory` in MiB (`None` with `error`: no budget fits).
    mib: Option<u64>,
    error: Option<String>,
}

/// `inspect`'s smallest budgets (`pipeline::plan::smallest_budget_mib`) for GPTQ and GPTAQ, with
/// the f32 kernels and with tensor cores, metrics on and off (in that order, pairs by metrics;
/// [`inspect_input`]).
fn smallest_budgets(
    config: &crate::model::ModelConfig,
    nsamples: usize,
    seqlen: usize,
) -> Vec<SmallestBudget> {
    let mut out = Vec::new();
    for (method, gptaq) in [("GPTQ", false), ("GPTAQ", true)] {
        for (kernels, tensor_cores) in [("f32", false), ("tensor cores", true)] {
            for metrics in [true, false] {
                let input =
                    inspect_input(config, (nsamples, seqlen), gptaq, metrics, tensor_cores, 0);
                let (mib, error) = match pipeline::plan::smallest_budget_mib(&input) {
                    Ok(mib) => (Some(mib), None),
                    Err(e) => (None, Some(e.to_string())),
                };
                out.push(SmallestBudget {
                    method,
                    kernels,
                    metrics,
                    mib,
                    error,
                });
            }
        }
    }
    out
}

/// A line above the progress bar, or on stderr when the bar is hidden (stderr is not a terminal:
/// logs, scripts, CI), where indicatif's own `println` prints nothing.
fn say(bar: &ProgressBar, line: impl AsRef<str>) {
    if bar.is_hidden() {
        eprintln!("{}", line.as_ref());
    } else {
        bar.println(line);
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.3e}"))
}

fn quantize(gpu: &GpuArgs, args: &QuantizeArgs) -> anyhow::Result<()> {
    let job = args.job()?;
    if let Some(out) = &args.out
        && out.exists()
        && !args.force
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    {
        anyhow::bail!(
            "{} exists and is not empty; pass --force to replace it",
            out.display()
        );
    }
    let ctx = GpuContext::new(&gpu.options()).context("opening the GPU")?;
    eprintln!("device: {} ({})", ctx.summary.name, ctx.summary.backend);
    let inputs = pipeline::prepare(&job).context("preparing the run")?;
    eprintln!("model: {}", inputs.model_name);
    eprintln!("calibration: {}", inputs.calib.description);
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} modules (ETA {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let header = format!(
        "{:>5} {:<10} {:>11} {:>10} {:>10} {:>10} {:>10} {:>7} {:>7}  fallback",
        "layer", "module", "shape", "proxy", "quant", "asym", "output", "damp", "secs"
    );
    let mut emit = |e: Event| match e {
        Event::Started {
            layers,
            modules_per_layer,
            plan,
            ..
        } => {
            bar.set_length((layers * modules_per_layer) as u64);
            for line in &plan.breakdown {
                say(&bar, format!("plan: {line}"));
            }
            say(&bar, header.clone());
        }
        Event::Status(s) => bar.set_message(s),
        Event::LayerStarted { layer } => bar.set_message(format!("layer {layer}")),
        Event::ModuleDone(m) => {
            bar.inc(1);
            say(
                &bar,
                format!(
                    "{:>5} {:<10} {:>11} {:>10.3e} {:>10} {:>10} {:>10} {:>7.4} {:>7.2}  {}",
                    m.layer,
                    m.module,
                    format!("{}x{}", m.rows, m.cols),
                    m.proxy_loss,
                    fmt_opt(m.quant_error),
                    fmt_opt(m.asym_error),
                    fmt_opt(m.output_error),
                    m.damp,
                    m.secs,
                    m.fallback.as_deref().unwrap_or("")
                ),
            );
        }
        Event::LayerDone(l) => {
            // The layer time always (benchmarks read it), the hidden deviation where measured.
            let deviation = l
                .hidden_rel_error
                .map(|e| format!(": ‖h_q−h_fp‖/‖h_fp‖ = {e:.4}"))
                .unwrap_or_default();
            say(
                &bar,
                format!("layer {} done in {:.2}s{deviation}", l.layer, l.secs),
            );
            if !l.phases.is_empty() {
                let parts: Vec<String> = l
                    .phases
                    .iter()
                    .map(|(p, s)| format!("{p} {s:.2}s"))
                    .collect();
                say(
                    &bar,
                    format!("layer {} phases: {}", l.layer, parts.join(", ")),
                );
            }
        }
        Event::Warning(w) => say(&bar, format!("warning: {w}")),
        Event::Finished(_) | Event::Failed(_) | Event::Cancelled => {}
    };
    let cancel = AtomicBool::new(false);
    let result = pipeline::run_prepared(&ctx, &inputs, &job.config, &mut emit, &cancel);
    bar.finish_and_clear();
    let q = result.context("quantization failed")?;
    let r = &q.report;
    eprintln!(
        "finished: {} modules in {:.1}s, peak GPU memory {:.1} MiB ({:.1} MiB with the buffers \
         kept for reuse)",
        r.modules.len(),
        r.secs,
        r.peak_gpu_bytes as f64 / (1u64 << 20) as f64,
        r.peak_reserved_bytes as f64 / (1u64 << 20) as f64
    );
    if let (Some(alloc), Some(staging)) = (r.peak_allocator_bytes, r.peak_staging_bytes) {
        eprintln!(
            "wgpu's allocator held up to {:.1} MiB where sampled, {:.1} MiB of it upload staging",
            alloc as f64 / (1u64 << 20) as f64,
            staging as f64 / (1u64 << 20) as f64
        );
    }
    if !r.kernel_times.is_empty() {
        eprintln!(
            "GPU time per kernel (--kernel-times), all layers:\n{}",
            crate::gpu::format_kernel_times(&r.kernel_times, 1.0, 30)
        );
    }
    if let Some(path) = &args.report {
        let json = serde_json::to_string_pretty(r)?;
        std::fs::write(path, json)
            .with_context(|| format!("writing the report to {}", path.display()))?;
        eprintln!("report: {}", path.display());
    }
    if let Some(out) = &args.out {
        let opts = crate::export::ExportOptions {
            force: args.force,
            ..Default::default()
        };
        let summary = crate::export::write_checkpoint(
            out,
            inputs.source.as_ref(),
            args.model.as_deref(),
            &q,
            &opts,
        )
        .with_context(|| format!("exporting to {}", out.display()))?;
        eprintln!(
            "exported GPTQ checkpoint: {} ({} quantized modules, {} tensors in {} shard(s), desc_act {})",
            summary.dir.display(),
            summary.quantized_modules,
            summary.tensors,
            summary.shards.len(),
            summary.desc_act
        );
        for w in &summary.warnings {
            eprintln!("  note: {w}");
        }
    }
    if let Some(text) = &args.eval {
        let dir = args
            .model
            .as_deref()
            .context("--eval needs a model directory (not --demo)")?;
        let windows = eval_windows_for(dir, text, args.eval_seqlen, args.eval_windows)?;
        let fp = if args.no_fp_eval {
            None
        } else {
            Some(run_eval(
                &ctx,
                inputs.source.as_ref(),
                &windows,
                "FP",
                &Default::default(),
            )?)
        };
        let overlay = crate::eval::Overlay {
            base: inputs.source.as_ref(),
            modules: &q.modules,
        };
        let qp = run_eval(
            &ctx,
            &overlay,
            &windows,
            r.method.as_str(),
            &Default::default(),
        )?;
        let fp_text = fp.map_or_else(String::new, |fp| format!("FP {:.4}  ", fp.ppl));
        println!(
            "perplexity ({} windows × {}): {fp_text}{} {:.4}",
            qp.windows, qp.seqlen, r.method, qp.ppl
        );
    }
    Ok(())
}

/// Tokenizes `text` with the tokenizer of `model_dir` (none needed for pre-tokenized input) and
/// cuts the GPTQ-protocol evaluation windows.
fn eval_windows_for(
    model_dir: &Path,
    text: &Path,
    seqlen: usize,
    max: Option<usize>,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let w = crate::eval::windows_from_file(Some(model_dir), text, seqlen, max)?;
    eprintln!(
        "eval: {} windows of {seqlen} (using {}), {} tail tokens dropped",
        w.total_windows,
        w.windows.len(),
        w.dropped_tokens
    );
    Ok(w.windows)
}

fn run_eval(
    ctx: &GpuContext,
    source: &dyn crate::model::WeightSource,
    windows: &[Vec<u32>],
    label: &str,
    opts: &crate::eval::EvalOptions,
) -> anyhow::Result<crate::eval::PerplexityStats> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("perplexity {label}"));
    let mut progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let cancel = AtomicBool::new(false);
    let r = crate::eval::perplexity(ctx, source, windows, opts, &mut progress, &cancel);
    bar.finish_and_clear();
    let r = r.with_context(|| format!("perplexity of {label}"))?;
    eprintln!(
        "{label}: ppl {:.4} (mean NLL {:.5}, {} predictions, {:.1}s)",
        r.ppl, r.mean_nll, r.predictions, r.secs
    );
    Ok(r)
}

fn eval_cmd(gpu: &GpuArgs, args: &EvalArgs) -> anyhow::Result<()> {
    let model = args
        .model
        .as_ref()
        .or(args.model_flag.as_ref())
        .context("a model directory is required")?;
    let source = open_any_model(model)?;
    let windows = eval_windows_for(model, &args.text, args.seqlen, args.max_windows)?;
    let ctx = GpuContext::new(&gpu.options()).context("opening the GPU")?;
    eprintln!("device: {} ({})", ctx.summary.name, ctx.summary.backend);
    eprintln!("model: {} [{}]", model.display(), source.describe());
    if args.tensor_cores && !crate::gpu::ops::coop_available(&ctx) {
        eprintln!(
            "warning: --tensor-cores ignored: {}",
            ctx.summary
                .tensor_cores_unavailable()
                .unwrap_or_else(|| "this adapter cannot run the tensor-core kernels".into())
        );
    }
    let opts = crate::eval::EvalOptions {
        tensor_cores: args.tensor_cores,
        ..Default::default()
    };
    let r = run_eval(&ctx, source.as_ref(), &windows, "model", &opts)?;
    if args.json {
        let v = serde_json::json!({
            "model": model, "text": args.text, "weights": source.describe(), "device": ctx.summary.name, "result": r,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "perplexity {:.4} ({} windows × {}{})",
            r.ppl,
            r.windows,
            r.seqlen,
            if r.spilled_windows > 0 {
                format!(
                    "; {} of them with their hidden states on the host",
                    r.spilled_windows
                )
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// An FP safetensors directory or a GPTQ checkpoint (recognised by quantize_config.json).
fn open_any_model(dir: &Path) -> anyhow::Result<Box<dyn crate::model::WeightSource>> {
    if dir.join("quantize_config.json").is_file() || config_has_quantization(dir) {
        return Ok(Box::new(crate::export::GptqModel::open(dir).with_context(
            || format!("opening GPTQ checkpoint {}", dir.display()),
        )?));
    }
    Ok(Box::new(
        crate::model::weights::SafetensorsModel::open(dir)
            .with_context(|| format!("opening {}", dir.display()))?,
    ))
}

fn config_has_quantization(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .is_some_and(|v| v.get("quantization_config").is_some())
}

fn devices(gpu: &GpuArgs, json: bool) -> anyhow::Result<()> {
    let opts = gpu.options();
    let all = crate::gpu::list_adapters(&opts);
    let ctx = GpuContext::new(&opts).context("opening the GPU")?;
    if json {
        let v = serde_json::json!({ "adapters": all, "selected": ctx.summary });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{} adapter(s) for backend {:?}:", all.len(), opts.backend);
    for (i, a) in all.iter().enumerate() {
        println!("[{i}] {a}");
    }
    println!("\nselected (device granted):\n{}", ctx.summary);
    Ok(())
}

impl LabArgs {
    /// The capture run of a model directory or the demo: the layers before the captured module
    /// quantized with `--method`, with the error metrics on (the lab needs E and D). Not for
    /// `--load`, which runs nothing.
    pub fn job(&self) -> anyhow::Result<Job> {
        let inputs = run_inputs(
            self.demo,
            self.seed,
            &self.model,
            &self.calib,
            "a MODEL_DIR, --demo or --load is required",
        )?;
        let (nsamples, seqlen) = calib_size(self.demo, self.nsamples, self.seqlen, 512);
        let config = PipelineConfig {
            quant: self.quant.config(self.method)?,
            nsamples,
            seqlen,
            seed: self.seed,
            metrics: true,
            ..PipelineConfig::default()
        };
        Ok(self.run.job(inputs, config))
    }
}

fn lab_cmd(gpu: &GpuArgs, a: &LabArgs) -> anyhow::Result<()> {
    let module = crate::model::ModuleKind::from_short_name(&a.module)
        .with_context(|| format!("unknown module `{}` (q_proj … down_proj)", a.module))?;
    let base = a.quant.config(MethodArg::Gptq)?;
    // The capture run's context, kept for the GPU re-solves of a large module.
    let mut ctx: Option<GpuContext> = None;
    let captured = if let Some(path) = &a.load {
        crate::lab::load(path)?
    } else {
        let job = a.job()?;
        let gpu_ctx = ctx.insert(GpuContext::new(&gpu.options()).context("opening the GPU")?);
        let inputs = pipeline::prepare(&job).context("preparing the capture")?;
        eprintln!(
            "capturing layer {} {} ({})",
            a.layer,
            module.short_name(),
            inputs.calib.description
        );
        let cancel = AtomicBool::new(false);
        let mut emit = |e: Event| {
            if let Event::LayerDone(l) = e {
                eprintln!("  layer {} quantized ({:.2}s)", l.layer, l.secs);
            }
        };
        pipeline::capture(
            gpu_ctx,
            &inputs,
            &job.config,
            a.layer,
            module,
            &mut emit,
            &cancel,
        )
        .context("capturing")?
    };
    if let Some(path) = &a.save {
        crate::lab::save(&captured, path)?;
        eprintln!("capture saved to {}", path.display());
    }
    // Large modules are re-solved on the GPU (lab module docs, "GPU path"); a loaded capture
    // opens a device only then, and falls back to the f64 reference without one.
    let wants_gpu = match a.solver {
        LabSolverArg::Auto => crate::lab::prefers_gpu(captured.rows, captured.cols),
        LabSolverArg::Gpu => true,
        LabSolverArg::Cpu => false,
    };
    if ctx.is_none() && wants_gpu {
        match GpuContext::new(&gpu.options()) {
            Ok(c) => ctx = Some(c),
            Err(e) if a.solver == LabSolverArg::Auto => eprintln!(
                "note: no GPU for the re-solves ({e}); using the f64 CPU reference (slow at this size)"
            ),
            Err(e) => return Err(e).context("opening the GPU for --solver gpu"),
        }
    }
    // One Lab for all solves: the reference factors H once and each α only re-runs the sweep;
    // the GPU path uploads the capture once.
    let mut lab = crate::lab::Lab::new(captured);
    let backend = match (a.solver, ctx.as_ref()) {
        (LabSolverArg::Auto, c) => lab.backend(c),
        (LabSolverArg::Gpu, Some(c)) => crate::lab::Backend::Gpu(c),
        _ => crate::lab::Backend::Reference,
    };
    let t_solves = std::time::Instant::now();
    let gptq = lab.solve_on(backend, &base)?;
    let gptaq = lab.solve_on(
        backend,
        &QuantConfig {
            method: Method::Gptaq {
                alpha: a.quant.alpha,
            },
            ..base.clone()
        },
    )?;
    let sweep = lab.alpha_sweep_on(backend, &base, &a.alphas)?;
    let solves_secs = t_solves.elapsed().as_secs_f64();
    let solver = backend.solver();
    let captured = lab.capture();
    if a.json {
        let v = serde_json::json!({
            "layer": captured.layer, "module": captured.module.short_name(), "rows": captured.rows, "cols": captured.cols,
            "nsamples": captured.nsamples, "solver": solver, "solves_secs": solves_secs, "gptq": gptq.metrics, "gptaq": gptaq.metrics, "alpha": a.quant.alpha,
            "alpha_sweep": sweep.iter().map(|(al, m)| serde_json::json!({"alpha": al, "metrics": m})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "layer {} {} [{}×{}], {} calibration sequences, W{} g{}",
        captured.layer,
        captured.module.short_name(),
        captured.rows,
        captured.cols,
        captured.nsamples,
        a.quant.bits,
        a.quant.group_size
    );
    println!(
        "solver: {} ({} solves in {solves_secs:.2} s)",
        solver.describe(),
        2 + sweep.len()
    );
    println!(
        "{:<16} {:>12} {:>12} {:>12} {:>12} {:>8}",
        "method", "quant err", "asym err", "output err", "proxy loss", "secs"
    );
    for (name, s) in [
        ("GPTQ".to_string(), &gptq),
        (format!("GPTAQ α={}", a.quant.alpha), &gptaq),
    ] {
        let m = s.metrics;
        println!(
            "{name:<16} {:>12.4e} {:>12.4e} {:>12.4e} {:>12.4e} {:>8.2}",
            m.quant_error, m.asym_error, m.output_error, m.proxy_loss, s.secs
        );
    }
    println!("\noutput error vs α (α = 0 is GPTQ):");
    for (al, m) in &sweep {
        println!(
            "  α = {al:<5} output {:.4e}  quant {:.4e}",
            m.output_error, m.quant_error
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Command {
        match Cli::try_parse_from(std::iter::once("gptaq-studio").chain(args.iter().copied())) {
            Ok(Cli {
                command: Some(c), ..
            }) => c,
            Ok(_) => panic!("{args:?}: parsed without a command"),
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    /// The plan's settings as a job carries them: (budget, stream dtype, host streams, lean,
    /// tensor cores).
    fn plan_of(job: &Job) -> (u64, StreamDType, bool, bool, bool) {
        let c = &job.config;
        (
            c.gpu_budget_bytes,
            c.stream_dtype,
            c.force_host_streams,
            c.lean_memory,
            c.tensor_cores,
        )
    }

    /// `inspect` prints the 8 GiB GPTAQ plan with the f32 kernels and with tensor cores.
    #[test]
    fn inspect_shows_the_8_gib_plan_with_and_without_tensor_cores() -> anyhow::Result<()> {
        let config = crate::pipeline::plan::llama3_8b_config()?;
        let [(f32_what, f32_plan), (tc_what, tc_plan)] = inspect_plans(&config, 128, 2048);
        let (f32_plan, tc_plan) = (f32_plan?, tc_plan?);
        assert!(f32_what.contains("f32") && tc_what.contains("tensor cores"));
        // Llama-3-8B GPTAQ on 8 GiB: the tensor-core plan fits, with A in f32 and gate/up's f32
        // weights freed once solved (pipeline::plan's tests check the numbers).
        assert!(!f32_plan.gate_up_f32_released && !f32_plan.split_f16);
        assert!(tc_plan.gate_up_f32_released && !tc_plan.split_f16);
        assert!(tc_plan.breakdown.iter().any(|l| l.contains("f16 copy")));
        Ok(())
    }

    /// `inspect`'s smallest budgets for Llama-3-8B at 128 × 2048 tokens: each is the smallest
    /// budget the plan accepts (one MiB less is refused), GPTAQ needs more than GPTQ, and without
    /// metrics GPTQ needs less (one stream) and GPTAQ with tensor cores too (the FP stream's MLP
    /// freed before down_proj's solve).
    #[test]
    fn inspect_names_the_smallest_budgets() -> anyhow::Result<()> {
        let config = crate::pipeline::plan::llama3_8b_config()?;
        let b = smallest_budgets(&config, 128, 2048);
        assert_eq!(b.len(), 8);
        let mib = |method: &str, kernels: &str, metrics: bool| -> anyhow::Result<u64> {
            b.iter()
                .find(|x| x.method == method && x.kernels == kernels && x.metrics == metrics)
                .and_then(|x| x.mib)
                .ok_or_else(|| anyhow::anyhow!("{method} {kernels} {metrics}: {b:?}"))
        };
        for x in &b {
            eprintln!(
                "{} {} metrics {}: {:?} MiB",
                x.method, x.kernels, x.metrics, x.mib
            );
        }
        for k in ["f32", "tensor cores"] {
            assert!(mib("GPTQ", k, false)? < mib("GPTQ", k, true)?, "{k}");
            assert!(mib("GPTQ", k, true)? <= mib("GPTAQ", k, true)?, "{k}");
        }
        if pipeline::plan::fp_down_early() {
            assert!(mib("GPTAQ", "tensor cores", false)? < mib("GPTAQ", "tensor cores", true)?);
        }
        // Issue 10's card: GPTAQ fits 8 GiB either way.
        assert!(mib("GPTAQ", "tensor cores", true)? <= 8 << 10);
        assert!(mib("GPTAQ", "f32", true)? <= 8 << 10);
        // Exact to the MiB.
        let input = |mib: u64| pipeline::plan::PlanInput {
            config: &config,
            nsamples: 128,
            seqlen: 2048,
            fp_stream: true,
            metrics: false,
            statistics: 2,
            metric_moments: false,
            gpu_budget_bytes: mib << 20,
            max_buffer_bytes: 2 << 30,
            host_dtype: StreamDType::F16,
            force_host: false,
            lean_memory: false,
            tensor_cores: true,
        };
        let least = mib("GPTAQ", "tensor cores", false)?;
        assert!(pipeline::plan::plan(&input(least)).is_ok());
        assert!(pipeline::plan::plan(&input(least - 1)).is_err());
        Ok(())
    }

    /// `lab` captures through the same memory plan as `quantize`, so it takes the same flags: an
    /// 8B model's capture at 128 × 2048 tokens needs more than the default 8 GiB in f32 streams
    /// (8,724 MiB on the GPU machine, session 33), and the plan's error tells the user to raise
    /// --gpu-memory.
    #[test]
    fn lab_and_quantize_take_the_same_plan_flags() -> anyhow::Result<()> {
        let flags = [
            "--gpu-memory",
            "12.5",
            "--stream-dtype",
            "f16",
            "--host-streams",
            "--lean-memory",
            "--tensor-cores",
        ];
        let want = (
            (12.5 * (1u64 << 30) as f64) as u64,
            StreamDType::F16,
            true,
            true,
            true,
        );
        let mut q = vec!["quantize", "model-dir", "--calib", "c.txt"];
        q.extend(flags);
        let Command::Quantize(qa) = parse(&q) else {
            panic!("quantize parsed as another command");
        };
        assert_eq!(plan_of(&qa.job()?), want, "quantize");
        let mut l = vec!["lab", "model-dir", "--calib", "c.txt", "--layer", "1"];
        l.extend(flags);
        let Command::Lab(la) = parse(&l) else {
            panic!("lab parsed as another command");
        };
        let job = la.job()?;
        assert_eq!(plan_of(&job), want, "lab");
        assert!(job.config.metrics, "the lab's capture measures the metrics");
        assert_eq!((job.config.nsamples, job.config.seqlen), (128, 512));

        // Without the flags both take the pipeline's defaults.
        let d = PipelineConfig::default();
        let want_default = (
            d.gpu_budget_bytes,
            d.stream_dtype,
            d.force_host_streams,
            d.lean_memory,
            d.tensor_cores,
        );
        let Command::Lab(la) = parse(&["lab", "--demo"]) else {
            panic!("lab parsed as another command");
        };
        assert_eq!(plan_of(&la.job()?), want_default, "lab defaults");
        let Command::Quantize(qa) = parse(&["quantize", "--demo"]) else {
            panic!("quantize parsed as another command");
        };
        assert_eq!(plan_of(&qa.job()?), want_default, "quantize defaults");
        Ok(())
    }
}
