//! gptaq-studio: GPTQ / GPTAQ quantization of Llama-family checkpoints on any GPU through wgpu.
//!
//! Module map (data flows top to bottom; compute modules never import `app`):
//! - [`model`]: config.json, memory-mapped safetensors, tokenizer, the [`model::WeightSource`] trait.
//! - [`calib`]: calibration text / jsonl / parquet / pre-tokenized input, window sampling.
//! - [`gpu`]: wgpu context, typed buffers, the pipeline cache and every WGSL kernel launcher.
//! - [`quant`]: the quantizer, the f64 CPU reference of GPTQ/GPTAQ and the GPU solve.
//! - [`pipeline`]: the layer-by-layer driver that turns a model + calibration set into a quantized model
//!   and a stream of typed events.
//! - [`export`]: GPTQ checkpoint packing, writing and reading.
//! - [`eval`]: perplexity on the GPU (GPTQ-paper protocol).
//! - [`lab`]: the layer lab: re-solving one captured module with exact error metrics.
//! - [`app`]: the egui desktop application (a view over the pipeline's events).
//! - [`cli`]: the command-line front end.

pub mod app;
pub mod calib;
pub mod cli;
pub mod eval;
pub mod export;
pub mod forward;
pub mod gpu;
pub mod lab;
pub mod model;
pub mod pipeline;
pub mod quant;
