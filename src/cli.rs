//! Command-line front end (`gptaq-studio <command>`); with no command the desktop app opens.
//! This is the binary edge: errors become `anyhow` with context here and nowhere deeper.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::gpu::{BackendChoice, GpuContext, GpuOptions};

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
}

pub fn main() -> ExitCode {
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
        None => {
            anyhow::bail!("the desktop application is not built yet; see `gptaq-studio --help`")
        }
        Some(Command::Devices { json }) => devices(&cli.gpu, json),
    }
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
