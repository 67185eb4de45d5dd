//! The whole quantization pipeline on real and synthetic checkpoints (lavapipe-sized): GPTQ and GPTAQ
//! with act-order and groups on stories260K (172-wide MLP), the layer-lab capture's exact metrics
//! against the pipeline's own, cancellation and input validation.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use gptaq_studio::calib::CalibSet;
use gptaq_studio::eval::{self, EvalOptions, Overlay};
use gptaq_studio::gpu::test_context;
use gptaq_studio::model::synthetic::SyntheticModel;
use gptaq_studio::model::{ModuleKind, WeightSource};
use gptaq_studio::pipeline::{
    self, CalibInput, Event, Job, ModelInput, PipelineConfig, PipelineError, Solver,
};
use gptaq_studio::quant::{Method, QuantConfig};

/// Prepares and runs `j` without events or cancellation.
fn run_job(ctx: &gptaq_studio::gpu::GpuContext, j: &Job) -> pipeline::QuantizedModel {
    let inputs = pipeline::prepare(j).unwrap();
    pipeline::run_prepared(
        ctx,
        &inputs,
        &j.config,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap()
}

fn job(
    model: ModelInput,
    calib: CalibInput,
    quant: QuantConfig,
    nsamples: usize,
    seqlen: usize,
) -> Job {
    Job {
        model,
        calib,
        config: PipelineConfig {
            quant,
            nsamples,
            seqlen,
            solver: Solver::CpuReference,
            ..PipelineConfig::default()
        },
    }
}

#[test]
fn stories260k_gptq_and_gptaq_with_act_order_and_groups() {
    let Some(dir) = common::test_data_dir() else {
        return;
    };
    let Some(ctx) = test_context() else { return };
    let model_dir = dir.join("stories260K");
    let calib = dir.join("corpora/tinystories/train_head_197k.txt");
    let mut ppl = Vec::new();
    for method in [Method::Gptq, Method::Gptaq { alpha: 0.25 }] {
        // Group 4 divides both in-feature widths (64 and 172).
        let quant = QuantConfig {
            method,
            bits: 3,
            group_size: Some(4),
            act_order: true,
            ..QuantConfig::default()
        };
        let j = job(
            ModelInput::Dir(model_dir.clone()),
            CalibInput::File(calib.clone()),
            quant,
            4,
            64,
        );
        let inputs = pipeline::prepare(&j).unwrap();
        let mut events = Vec::new();
        let q = pipeline::run_prepared(
            &ctx,
            &inputs,
            &j.config,
            &mut |e| events.push(e),
            &AtomicBool::new(false),
        )
        .unwrap();
        let r = &q.report;
        assert_eq!(
            q.modules.len(),
            5 * 7,
            "{}: every module quantized",
            r.method
        );
        assert_eq!(r.modules.len(), 35);
        for m in &r.modules {
            for (name, v) in [
                ("quant", m.quant_error),
                ("asym", m.asym_error),
                ("output", m.output_error),
            ] {
                let v = v.unwrap_or_else(|| {
                    panic!(
                        "{} layer {} {}: {name} error missing",
                        r.method, m.layer, m.module
                    )
                });
                assert!(
                    v.is_finite() && v >= 0.0,
                    "{} layer {} {}: {name} error {v}",
                    r.method,
                    m.layer,
                    m.module
                );
            }
            assert!(
                m.proxy_loss.is_finite(),
                "{} layer {} {}: proxy loss {}",
                r.method,
                m.layer,
                m.module,
                m.proxy_loss
            );
            if m.layer == 0 && ["q_proj", "k_proj", "v_proj"].contains(&m.module.as_str()) {
                assert_eq!(m.asym_error, Some(0.0), "layer 0 q/k/v see the FP input");
            }
        }
        assert!(
            r.layers
                .iter()
                .all(|l| l.hidden_rel_error.is_some_and(f64::is_finite))
        );
        let ups = events
            .iter()
            .filter(|e| matches!(e, Event::ModuleDone(_)))
            .count();
        assert_eq!(ups, 35, "one ModuleDone per module");
        // Codes and g_idx are consistent with act-order groups of 4.
        let down = &q.modules[&(2, ModuleKind::Down)];
        assert_eq!(down.g_idx.len(), 172);
        assert!(down.g_idx.iter().all(|&g| g < 43));
        let windows: Vec<Vec<u32>> = inputs.calib.windows.clone();
        let ov = Overlay {
            base: inputs.source.as_ref(),
            modules: &q.modules,
        };
        let p = eval::perplexity(
            &ctx,
            &ov,
            &windows,
            &EvalOptions::default(),
            &mut |_, _| {},
            &AtomicBool::new(false),
        )
        .unwrap();
        assert!(p.ppl.is_finite());
        ppl.push(p.ppl);
    }
    eprintln!(
        "stories260K W3 g4 act-order calibration-set ppl: GPTQ {:.3} GPTAQ {:.3}",
        ppl[0], ppl[1]
    );
}

#[test]
fn lab_capture_metrics_equal_pipeline_metrics() {
    let Some(ctx) = test_context() else { return };
    for (layer, m, method) in [
        (1, ModuleKind::Down, Method::Gptaq { alpha: 0.25 }),
        (2, ModuleKind::O, Method::Gptq),
        (1, ModuleKind::K, Method::Gptaq { alpha: 1.0 }),
    ] {
        let quant = QuantConfig {
            method,
            bits: 3,
            ..QuantConfig::default()
        };
        let j = job(
            ModelInput::Demo { seed: 3 },
            CalibInput::Synthetic,
            quant.clone(),
            4,
            32,
        );
        let inputs = pipeline::prepare(&j).unwrap();
        let c = AtomicBool::new(false);
        let full = pipeline::run_prepared(&ctx, &inputs, &j.config, &mut |_| {}, &c).unwrap();
        let cap = pipeline::capture(&ctx, &inputs, &j.config, layer, m, &mut |_| {}, &c).unwrap();
        assert_eq!((cap.layer, cap.module, cap.nsamples), (layer, m, 4));
        let rep = full
            .report
            .modules
            .iter()
            .find(|r| r.layer == layer && r.module == m.short_name())
            .unwrap();
        // Re-solving the capture with the run's settings gives the run's Q, and the trace formulas
        // give the errors the pipeline measured from the activations.
        let lab = gptaq_studio::lab::solve(&cap, &quant).unwrap();
        let q_run = full.modules[&(layer, m)].weights();
        let maxdiff = lab
            .result
            .q
            .iter()
            .zip(q_run.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            maxdiff < 1e-5,
            "layer {layer} {}: lab Q differs from the run's by {maxdiff}",
            m.short_name()
        );
        for (name, got, want) in [
            ("quant", lab.metrics.quant_error, rep.quant_error.unwrap()),
            ("asym", lab.metrics.asym_error, rep.asym_error.unwrap()),
            (
                "output",
                lab.metrics.output_error,
                rep.output_error.unwrap(),
            ),
        ] {
            assert!(
                (got - want).abs() <= 2e-3 * want.abs() + 1e-7,
                "layer {layer} {} {name} error: lab {got} vs pipeline {want}",
                m.short_name()
            );
        }
        // Save / load round trip.
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("cap.safetensors");
        gptaq_studio::lab::save(&cap, &path).unwrap();
        let back = gptaq_studio::lab::load(&path).unwrap();
        assert_eq!(
            (back.rows, back.cols, back.layer, back.module),
            (cap.rows, cap.cols, cap.layer, cap.module)
        );
        assert_eq!(back.h, cap.h);
        assert_eq!(back.e, cap.e);
    }
}

#[test]
fn alpha_zero_is_gptq_and_alpha_lowers_output_error() {
    let Some(ctx) = test_context() else { return };
    let quant = QuantConfig {
        method: Method::Gptq,
        bits: 3,
        ..QuantConfig::default()
    };
    let j = job(
        ModelInput::Demo { seed: 5 },
        CalibInput::Synthetic,
        quant.clone(),
        8,
        32,
    );
    let inputs = pipeline::prepare(&j).unwrap();
    let cap = pipeline::capture(
        &ctx,
        &inputs,
        &j.config,
        2,
        ModuleKind::O,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap();
    let sweep = gptaq_studio::lab::alpha_sweep(&cap, &quant, &[0.0, 1.0]).unwrap();
    let gptq = gptaq_studio::lab::solve(&cap, &quant).unwrap();
    assert!(
        (sweep[0].1.output_error - gptq.metrics.output_error).abs() < 1e-12,
        "α = 0 must equal GPTQ"
    );
    assert!(
        sweep[1].1.output_error < gptq.metrics.output_error,
        "GPTAQ α=1 output error {} not below GPTQ {}",
        sweep[1].1.output_error,
        gptq.metrics.output_error
    );
}

#[test]
fn cancel_and_bad_settings() {
    let Some(ctx) = test_context() else { return };
    let j = job(
        ModelInput::Demo { seed: 1 },
        CalibInput::Synthetic,
        QuantConfig::default(),
        2,
        16,
    );
    let cancel = AtomicBool::new(false);
    let mut seen = Vec::new();
    let r = pipeline::run(
        &ctx,
        &j,
        &mut |e| {
            if matches!(e, Event::LayerDone(_)) {
                cancel.store(true, Ordering::Relaxed);
            }
            seen.push(format!("{e:?}").chars().take(20).collect::<String>());
        },
        &cancel,
    );
    assert!(
        matches!(r, Err(PipelineError::Cancelled)),
        "expected Cancelled"
    );
    assert!(
        seen.last().is_some_and(|s| s.starts_with("Cancelled")),
        "last event {:?}",
        seen.last()
    );

    let bad = job(
        ModelInput::Demo { seed: 1 },
        CalibInput::Synthetic,
        QuantConfig {
            group_size: Some(100),
            ..QuantConfig::default()
        },
        2,
        16,
    );
    let e = pipeline::run(&ctx, &bad, &mut |_| {}, &AtomicBool::new(false))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("group size 100") && e.contains("128"), "{e}");
}

#[test]
fn gpu_solver_matches_cpu_reference_solver_end_to_end() {
    let Some(ctx) = test_context() else { return };
    for method in [Method::Gptq, Method::Gptaq { alpha: 0.25 }] {
        let quant = QuantConfig {
            method,
            bits: 4,
            act_order: true,
            ..QuantConfig::default()
        };
        let mut j = job(
            ModelInput::Demo { seed: 9 },
            CalibInput::Synthetic,
            quant,
            4,
            32,
        );
        let inputs = pipeline::prepare(&j).unwrap();
        let c = AtomicBool::new(false);
        let cpu = pipeline::run_prepared(&ctx, &inputs, &j.config, &mut |_| {}, &c).unwrap();
        j.config.solver = Solver::Gpu;
        let gpu = pipeline::run_prepared(&ctx, &inputs, &j.config, &mut |_| {}, &c).unwrap();
        // Every module's codes came back (the GPU solve's are finished after the next stage is
        // queued, the last group's at the end of the run).
        for (key, r) in cpu.modules.iter().chain(&gpu.modules) {
            assert_eq!(r.codes.len(), r.rows * r.cols, "{method:?} {key:?}: codes");
        }
        // A module's codes are comparable only while its input is identical in both runs: its
        // statistics are then identical and the two solvers may differ only by rare f32/f64
        // round-off ties. Inputs stay identical until some earlier true-sequential group
        // ([q,k,v] → [o] → [gate,up] → [down], layer by layer) has a differing code; after that
        // the inputs differ, and with 128 calibration tokens against 384-wide modules (rank-
        // deficient H) the solutions drift apart chaotically, so those modules are compared by
        // their errors only. (GPTAQ's f32 P and sweep flip a few ties in most runs.)
        let groups: [&[ModuleKind]; 4] = [
            &[ModuleKind::Q, ModuleKind::K, ModuleKind::V],
            &[ModuleKind::O],
            &[ModuleKind::Gate, ModuleKind::Up],
            &[ModuleKind::Down],
        ];
        let layers = cpu.report.layers.len();
        let mut identical_inputs = true;
        let mut same_input: std::collections::HashSet<(usize, ModuleKind)> = Default::default();
        let mut compared = 0usize;
        'layers: for layer in 0..layers {
            for group in groups {
                if !identical_inputs {
                    break 'layers;
                }
                let mut group_differs = false;
                for &kind in group {
                    let (rc, rg) = (&cpu.modules[&(layer, kind)], &gpu.modules[&(layer, kind)]);
                    let differing = rc
                        .codes
                        .iter()
                        .zip(&rg.codes)
                        .filter(|(a, b)| a != b)
                        .count();
                    // 0.5 %: lavapipe agrees to ≤ 0.1 %, the H200 (whose compiler contracts the
                    // f32 factor and sweep into FMAs differently) flipped 98 of 49,152 codes
                    // (0.2 %) of layer 0's down_proj — 1,024 columns against 128 tokens, the most
                    // ill-conditioned problem here — with bit-identical inputs. A wrong solver
                    // moves tens of percent of the codes, and the errors are checked below.
                    assert!(
                        differing * 200 <= rc.codes.len(),
                        "{method:?} layer {layer} {kind:?}: {differing} of {} codes differ between \
                         the GPU and CPU solvers on identical inputs",
                        rc.codes.len()
                    );
                    // Identical codes are not enough for the next group's input to be
                    // identical: Q = scale·(code − zero) with the scale from the f32 GPU sweep or
                    // the f64 CPU one can differ in its last bit, and that perturbs the next
                    // group's statistics (on the H200, layer 0's down_proj then flipped 98 of
                    // 49,152 near-tie codes of its rank-deficient problem). So only bit-identical
                    // Q keeps the next group comparable code by code.
                    group_differs |= differing > 0 || rc.weights() != rg.weights();
                    same_input.insert((layer, kind));
                    compared += 1;
                }
                identical_inputs = !group_differs;
            }
        }
        // At least layer 0's q/k/v (the embeddings' input) is always comparable.
        assert!(
            compared >= 3,
            "{method:?}: only {compared} modules compared"
        );
        for (a, b) in cpu.report.modules.iter().zip(&gpu.report.modules) {
            let (x, y) = (a.output_error.unwrap(), b.output_error.unwrap());
            let kind = ModuleKind::from_short_name(&a.module).unwrap();
            // Same input: 3e-4 seen (2026-12-04). Diverged: up to 0.23 seen (GPTAQ, layer 1
            // down_proj), the spread of equally good solutions of a rank-deficient problem.
            let tol = if same_input.contains(&(a.layer, kind)) {
                0.01
            } else {
                0.5
            };
            assert!(
                (x - y).abs() <= tol * x.max(1e-9),
                "{method:?} layer {} {}: output error cpu {x} gpu {y}",
                a.layer,
                a.module
            );
        }
    }
}

/// RTN reads no activations: without metrics the driver skips the calibration forward, and the
/// result is the same quantization as with metrics (codes, scales, zeros, Q) — only the error
/// columns and the hidden deviation are absent.
/// The fraction of codes two runs of the same model agree on, over all modules, and the number of
/// codes (every module's code count must match).
fn code_agreement(a: &pipeline::QuantizedModel, b: &pipeline::QuantizedModel) -> (f64, usize) {
    let (mut same, mut total) = (0usize, 0usize);
    for (key, x) in &a.modules {
        let y = &b.modules[key];
        assert_eq!(x.codes.len(), y.codes.len(), "{key:?}: code count");
        same += x.codes.iter().zip(&y.codes).filter(|(p, q)| p == q).count();
        total += x.codes.len();
    }
    (same as f64 / total.max(1) as f64, total)
}

/// W3 with groups of 4 (4 divides both of stories260K's in-feature widths, 64 and 172).
fn w3_g4(method: Method) -> QuantConfig {
    QuantConfig {
        method,
        bits: 3,
        group_size: Some(4),
        ..QuantConfig::default()
    }
}

/// stories260K on 4 × 64 tokens with `quant` and `solver`, with metrics and without (in that
/// order), each emitting one ModuleDone per module, and every module reported before the next
/// group is solved (with metrics once the next stage has measured them, without right away).
fn with_and_without_metrics(
    ctx: &gptaq_studio::gpu::GpuContext,
    dir: &std::path::Path,
    quant: &QuantConfig,
    solver: Solver,
) -> Vec<pipeline::QuantizedModel> {
    [true, false]
        .into_iter()
        .map(|metrics| {
            let mut j = job(
                ModelInput::Dir(dir.join("stories260K")),
                CalibInput::File(dir.join("corpora/tinystories/train_head_197k.txt")),
                quant.clone(),
                4,
                64,
            );
            j.config.metrics = metrics;
            j.config.solver = solver;
            let inputs = pipeline::prepare(&j).unwrap();
            let (mut done, mut solved) = (0, 0);
            let q = pipeline::run_prepared(
                ctx,
                &inputs,
                &j.config,
                &mut |e| match e {
                    Event::ModuleDone(_) => done += 1,
                    // "layer L: solving q, k, v": every earlier group is reported by now.
                    Event::Status(s) if s.contains(": solving ") => {
                        assert_eq!(done, solved, "metrics={metrics}: reported before {s:?}");
                        solved += s.split(", ").count();
                    }
                    _ => {}
                },
                &AtomicBool::new(false),
            )
            .unwrap();
            assert_eq!(done, 35, "metrics={metrics}: one ModuleDone per module");
            q
        })
        .collect()
}

#[test]
fn rtn_without_metrics_skips_the_forward_and_quantizes_the_same() {
    let Some(dir) = common::test_data_dir() else {
        return;
    };
    let Some(ctx) = test_context() else { return };
    let quant = w3_g4(Method::Rtn);
    let runs = with_and_without_metrics(&ctx, &dir, &quant, Solver::CpuReference);
    let (with, without) = (&runs[0], &runs[1]);
    assert_eq!(with.modules.len(), without.modules.len());
    for (key, a) in &with.modules {
        let b = &without.modules[key];
        assert_eq!(
            (&a.codes, &a.scales, &a.zeros, a.weights()),
            (&b.codes, &b.scales, &b.zeros, b.weights()),
            "{key:?}: RTN differs without metrics"
        );
    }
    assert!(with.report.modules.iter().all(|m| m.output_error.is_some()));
    assert!(
        without
            .report
            .modules
            .iter()
            .all(|m| m.output_error.is_none())
    );
    assert!(
        without
            .report
            .layers
            .iter()
            .all(|l| l.hidden_rel_error.is_none())
    );
    assert_eq!(without.report.layers.len(), 5);
    // The direct path: no forward, so nothing planned on the GPU (with metrics: weights, streams).
    assert_eq!(without.report.plan.gpu_bytes_estimate, 0);
    assert!(with.report.plan.gpu_bytes_estimate > 0);
}

/// GPTAQ without metrics (`--no-metrics`): the FP stream still runs (the solve needs D), only the
/// measurements are skipped. The solve sees the same H and D up to the order of one addition (o's
/// and down's outputs are added to the residual by the fused GEMM instead of through the metric
/// scratch), so the codes agree almost everywhere and the hidden-state deviation matches.
#[test]
fn gptaq_without_metrics_skips_only_the_measurements() {
    let Some(dir) = common::test_data_dir() else {
        return;
    };
    let Some(ctx) = test_context() else { return };
    let quant = w3_g4(Method::Gptaq { alpha: 0.25 });
    let runs = with_and_without_metrics(&ctx, &dir, &quant, Solver::Gpu);
    let (with, without) = (&runs[0], &runs[1]);
    assert!(
        with.report
            .modules
            .iter()
            .all(|m| m.output_error.is_some() && m.quant_error.is_some() && m.asym_error.is_some())
    );
    assert!(
        without
            .report
            .modules
            .iter()
            .all(|m| m.output_error.is_none() && m.quant_error.is_none() && m.asym_error.is_none())
    );
    let (agree, total) = code_agreement(with, without);
    assert!(
        agree > 0.99,
        "codes agree on only {agree:.4} of {total} without metrics"
    );
    for (a, b) in with.report.layers.iter().zip(&without.report.layers) {
        let (x, y) = (a.hidden_rel_error.unwrap(), b.hidden_rel_error.unwrap());
        assert!(
            (x - y).abs() <= 1e-3 * x.abs().max(1e-6),
            "layer {}: ‖h_q−h_fp‖/‖h_fp‖ {y} without metrics, {x} with",
            a.layer
        );
    }
}

/// Host-spilled streams against GPU-resident ones (GPTAQ on stories260K with metrics, so four
/// streams: h_q, h_fp, a_q, a_fp): host f32 is the same computation (exact copies), so the
/// quantization is identical; host f16 (packed and converted on the GPU, pipeline/stream.rs)
/// rounds every stored activation to f16, which moves the result only slightly, and raises no
/// overflow warning on a real model's activations.
#[test]
fn host_f16_streams_track_gpu_streams() {
    use gptaq_studio::pipeline::StreamDType;
    let Some(dir) = common::test_data_dir() else {
        return;
    };
    let Some(ctx) = test_context() else { return };
    let quant = w3_g4(Method::Gptaq { alpha: 0.25 });
    let mut runs = Vec::new();
    for (host, dtype) in [
        (false, StreamDType::F32),
        (true, StreamDType::F32),
        (true, StreamDType::F16),
    ] {
        let mut j = job(
            ModelInput::Dir(dir.join("stories260K")),
            CalibInput::File(dir.join("corpora/tinystories/train_head_197k.txt")),
            quant.clone(),
            6,
            64,
        );
        j.config.metrics = true;
        j.config.solver = Solver::Gpu;
        j.config.force_host_streams = host;
        j.config.stream_dtype = dtype;
        let q = run_job(&ctx, &j);
        assert_eq!(q.report.plan.streams_on_gpu, !host, "{dtype:?}: placement");
        assert_eq!(q.report.plan.stream_dtype, dtype.name(), "plan dtype");
        assert!(
            !q.report.warnings.iter().any(|w| w.contains("f16")),
            "host={host} {dtype:?}: {:?}",
            q.report.warnings
        );
        runs.push(q);
    }
    let (gpu, host32, host16) = (&runs[0], &runs[1], &runs[2]);
    for (key, a) in &gpu.modules {
        let b = &host32.modules[key];
        assert_eq!(
            (&a.codes, a.weights()),
            (&b.codes, b.weights()),
            "{key:?}: host f32 streams changed the quantization"
        );
    }
    // f16 storage perturbs each activation by ≤ 2⁻¹¹ relative. GPTQ's error feedback spreads any
    // flipped code along its row, so codes differ more than that suggests (88% equal on lavapipe
    // when this was written), but the hidden deviation from the FP model stays within a few
    // percent of the f32 run's (within 1% when written).
    let (frac, total) = code_agreement(gpu, host16);
    assert!(
        frac > 0.8,
        "host f16 streams: only {frac:.4} of {total} codes equal the f32 run's"
    );
    for (l32, l16) in gpu.report.layers.iter().zip(&host16.report.layers) {
        let (e32, e16) = (l32.hidden_rel_error.unwrap(), l16.hidden_rel_error.unwrap());
        assert!(
            (e16 - e32).abs() <= 0.05 * e32 + 1e-3,
            "layer {}: hidden deviation {e16:.5} with f16 streams vs {e32:.5} with f32",
            l32.layer
        );
    }
    eprintln!(
        "host f16 streams: {frac:.4} of {total} codes equal; last layer hidden deviation {:?} vs {:?}",
        host16.report.layers.last().and_then(|l| l.hidden_rel_error),
        gpu.report.layers.last().and_then(|l| l.hidden_rel_error)
    );
}

/// A model whose layer-0 `v_proj` is scaled up so that attention outputs (and, through the
/// residual, the hidden states) leave f16's range.
struct LoudV(Box<dyn gptaq_studio::model::WeightSource>);

impl gptaq_studio::model::WeightSource for LoudV {
    fn config(&self) -> &gptaq_studio::model::ModelConfig {
        self.0.config()
    }
    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, gptaq_studio::model::weights::WeightError> {
        self.0.embed(ids)
    }
    fn layer(
        &self,
        index: usize,
    ) -> Result<gptaq_studio::model::LayerWeights, gptaq_studio::model::weights::WeightError> {
        let mut l = self.0.layer(index)?;
        if index == 0 {
            l.v.weight.iter_mut().for_each(|w| *w *= 1e7);
        }
        Ok(l)
    }
    fn final_norm(&self) -> Result<Vec<f32>, gptaq_studio::model::weights::WeightError> {
        self.0.final_norm()
    }
    fn lm_head_rows(
        &self,
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<f32>, gptaq_studio::model::weights::WeightError> {
        self.0.lm_head_rows(rows)
    }
    fn describe(&self) -> String {
        format!("{} with a loud layer-0 v_proj", self.0.describe())
    }
}

/// Activations beyond ±65504 in f16 host streams are reported once per layer and stream kind (as
/// run warnings and `Event::Warning`), never silently; the same run with f32 host streams reports
/// nothing.
#[test]
fn f16_stream_overflow_is_reported_per_layer() {
    use gptaq_studio::pipeline::StreamDType;
    let Some(ctx) = test_context() else { return };
    for dtype in [StreamDType::F16, StreamDType::F32] {
        let mut j = job(
            ModelInput::Demo { seed: 7 },
            CalibInput::Synthetic,
            QuantConfig {
                method: Method::Gptaq { alpha: 0.25 },
                ..QuantConfig::default()
            },
            2,
            16,
        );
        j.config.solver = Solver::Gpu;
        j.config.force_host_streams = true;
        j.config.stream_dtype = dtype;
        let mut inputs = pipeline::prepare(&j).unwrap();
        let inner = std::mem::replace(
            &mut inputs.source,
            Box::new(gptaq_studio::model::synthetic::SyntheticModel::new(0)),
        );
        inputs.source = Box::new(LoudV(inner));
        let mut events = Vec::new();
        let q = pipeline::run_prepared(
            &ctx,
            &inputs,
            &j.config,
            &mut |e| {
                if let Event::Warning(w) = e {
                    events.push(w.clone());
                }
            },
            &AtomicBool::new(false),
        )
        .unwrap();
        // wgpu's allocator, sampled on every host load where the backend reports it: the upload
        // staging alive at once stays within MAX_PENDING_LOADS (+ the one just queued) f32 batches
        // per stream (both streams of GPTAQ), plus the recorders' packed dispatch parameters.
        if let (Some(alloc), Some(staging)) =
            (q.report.peak_allocator_bytes, q.report.peak_staging_bytes)
        {
            let hidden = inputs.source.config().hidden_size as u64;
            let batch = (q.report.plan.batch_sequences * j.config.seqlen) as u64 * hidden * 4;
            let bound = 2 * (gptaq_studio::pipeline::stream::MAX_PENDING_LOADS as u64 + 1) * batch;
            assert!(
                staging <= bound + (1 << 20) && staging <= alloc,
                "{dtype:?}: {staging} B of upload staging (bound {bound} B), allocator {alloc} B"
            );
        }
        let f16_warnings: Vec<&String> = q
            .report
            .warnings
            .iter()
            .filter(|w| w.contains("beyond f16's range"))
            .collect();
        if dtype == StreamDType::F32 {
            assert!(f16_warnings.is_empty(), "f32 streams: {f16_warnings:?}");
            continue;
        }
        for what in ["attention outputs", "hidden states"] {
            let w = format!(
                "layer 0: {what} beyond f16's range (±65504) were clamped in the f16 host streams"
            );
            assert!(
                f16_warnings.iter().any(|x| x.starts_with(&w)),
                "missing {w:?} in {f16_warnings:?}"
            );
            assert!(events.iter().any(|x| x.starts_with(&w)), "no event {w:?}");
        }
        // Only layer 0's v_proj is loud: later layers' attention outputs are in range (their input
        // is RMS-normalised), while the hidden states carry layer 0's excess through the residual.
        assert!(
            f16_warnings
                .iter()
                .all(|w| w.starts_with("layer 0:") || w.contains("hidden states")),
            "{f16_warnings:?}"
        );
        // Each flag is cleared when read: one warning per layer and kind at most.
        let layer0 = f16_warnings
            .iter()
            .filter(|w| w.starts_with("layer 0:"))
            .count();
        assert_eq!(layer0, 2, "{f16_warnings:?}");
    }
}

/// Every module's (quant, asym, output) metrics computed independently of the driver's stages and
/// of `pipeline::metrics`: both models (original, and every module replaced by the run's `Q`) run
/// the fused forward blocks on all windows as one batch, each module's inputs `X_q`, `X_fp` are
/// read back and `Y_q = X_q·Qᵀ`, `Y_fp = X_fp·Wᵀ`, `Y_w = X_q·Wᵀ` (no bias) formed on the host in
/// f64. The quantized stream is the fully quantized model: each module's `Q` is final before any
/// stage uses it.
fn reference_metrics(
    ctx: &gptaq_studio::gpu::GpuContext,
    source: &dyn WeightSource,
    modules: &std::collections::BTreeMap<(usize, ModuleKind), gptaq_studio::quant::QuantResult>,
    windows: &[Vec<u32>],
) -> Vec<((usize, ModuleKind), [f64; 3])> {
    use gptaq_studio::forward::{self, GpuLayer, LayerScratch, Rope};
    let cfg = source.config().clone();
    let (nseq, seqlen) = (windows.len(), windows[0].len());
    let t = nseq * seqlen;
    let ids: Vec<u32> = windows.iter().flatten().copied().collect();
    let emb = source.embed(&ids).unwrap();
    let quantized = Overlay {
        base: source,
        modules,
    };
    let rope = Rope::new(ctx, &cfg, seqlen).unwrap();
    let streams = [
        (
            &quantized as &dyn WeightSource,
            ctx.upload("h_q", &emb).unwrap(),
        ),
        (source, ctx.upload("h_fp", &emb).unwrap()),
    ];
    let scratch = [
        LayerScratch::new(ctx, &cfg, t).unwrap(),
        LayerScratch::new(ctx, &cfg, t).unwrap(),
    ];
    let mut out = Vec::new();
    for layer in 0..cfg.num_layers {
        // inputs[stream][k]: x1 (q/k/v), attn (o), x2 (gate/up), act (down).
        let mut inputs: Vec<Vec<Vec<f32>>> = Vec::new();
        let mut weights = Vec::new();
        for ((src, h), s) in streams.iter().zip(&scratch) {
            let lw = src.layer(layer).unwrap();
            let l = GpuLayer::upload(ctx, &cfg, &lw).unwrap();
            let read = |buf| ctx.read(buf).unwrap();
            let mut x = Vec::new();
            let mut rec = ctx.recorder();
            forward::input_norm(&mut rec, &l, h, s, t).unwrap();
            rec.submit();
            x.push(read(s.x1()));
            let mut rec = ctx.recorder();
            forward::attention(&mut rec, &l, &rope, s, nseq, seqlen, s.attn()).unwrap();
            rec.submit();
            x.push(read(s.attn()));
            let mut rec = ctx.recorder();
            forward::o_residual(&mut rec, &l, s.attn(), h, s, t).unwrap();
            forward::post_norm(&mut rec, &l, h, s, t).unwrap();
            rec.submit();
            x.push(read(s.x2()));
            let mut rec = ctx.recorder();
            forward::mlp_act(&mut rec, &l, s, t, s.act()).unwrap();
            rec.submit();
            x.push(read(s.act()));
            let mut rec = ctx.recorder();
            forward::down_residual(&mut rec, &l, s.act(), h, s, t).unwrap();
            rec.submit();
            inputs.push(x);
            weights.push(lw);
        }
        for m in ModuleKind::ALL {
            let k = match m {
                ModuleKind::Q | ModuleKind::K | ModuleKind::V => 0,
                ModuleKind::O => 1,
                ModuleKind::Gate | ModuleKind::Up => 2,
                ModuleKind::Down => 3,
            };
            let (rows, cols) = cfg.linear_shape(m);
            let (xq, xfp) = (&inputs[0][k], &inputs[1][k]);
            let (q, w) = (&weights[0].linear(m).weight, &weights[1].linear(m).weight);
            let dot = |x: &[f32], a: &[f32]| -> f64 {
                x.iter()
                    .zip(a)
                    .map(|(&u, &v)| f64::from(u) * f64::from(v))
                    .sum()
            };
            let mut sums = [0.0f64; 4];
            for tok in 0..t {
                let (rq, rfp) = (
                    &xq[tok * cols..(tok + 1) * cols],
                    &xfp[tok * cols..(tok + 1) * cols],
                );
                for r in 0..rows {
                    let (qr, wr) = (&q[r * cols..(r + 1) * cols], &w[r * cols..(r + 1) * cols]);
                    let (yq, yfp, yw) = (dot(rq, qr), dot(rfp, wr), dot(rq, wr));
                    sums[0] += (yw - yq).powi(2);
                    sums[1] += (yfp - yw).powi(2);
                    sums[2] += (yq - yfp).powi(2);
                    sums[3] += yfp * yfp;
                }
            }
            assert!(sums[3] > 0.0, "layer {layer} {m:?}: zero output");
            out.push((
                (layer, m),
                [sums[0] / sums[3], sums[1] / sums[3], sums[2] / sums[3]],
            ));
        }
    }
    out
}

/// The driver takes `Y_q` and `Y_fp` from the streams' forward passes (q/k/v before RoPE, gate
/// before SwiGLU, o and down before the residual add) and forms only `Y_w` itself; modules with a
/// bias form all three. Every module's three errors must equal the host reference above, on the
/// bias-free demo shape with Qwen3's q/k norms (every module reuses; the norms make the metrics
/// of q and k after RoPE differ from those before, plain RoPE being a rotation would not) and on a
/// Qwen2-like variant with q/k/v and MLP biases (q/k/v, gate, up, down on the three-GEMM path, o
/// reusing). 18 windows make two batches (16 + 2), so batch slots and a short last batch are
/// covered too. Run three times: GPTAQ, whose bias-free modules form no `Y_w` at all and take the
/// quantization and cross terms from H and D (the first layer's q/k/v, whose inputs are equal in
/// both streams, must still show an asymmetry of exactly 0 — the stories260K test checks that
/// bit for bit); GPTAQ with `metric_products`, every module forming its products; GPTQ, which
/// accumulates a D for its metrics where that is cheaper than the products.
#[test]
fn metrics_from_forward_outputs_match_host_reference() {
    let Some(ctx) = test_context() else { return };
    // Both ways of measuring: by default the bias-free modules take the quantization and cross
    // terms from H and D (pipeline::metrics, "From the statistics": all of them with GPTAQ;
    // with GPTQ q/k/v and gate/up, whose extra D is cheaper than their products, while o and
    // down form Y_w); with `metric_products` every module forms Y_w.
    for (method, products) in [
        (Method::Gptaq { alpha: 0.25 }, false),
        (Method::Gptaq { alpha: 0.25 }, true),
        (Method::Gptq, false),
    ] {
        let qk_norm = {
            let mut c = SyntheticModel::demo_config();
            c.qk_norm = true;
            SyntheticModel::with_config(c, 3)
        };
        let biased = {
            let mut c = SyntheticModel::demo_config();
            c.num_layers = 2;
            c.attention_bias = true;
            c.mlp_bias = true;
            SyntheticModel::with_config(c, 7)
        };
        let (nsamples, seqlen) = (18, 16);
        let models: [(&str, Box<dyn WeightSource>); 2] =
            [("qk-norm", Box::new(qk_norm)), ("biased", Box::new(biased))];
        for (name, source) in models {
            let vocab = source.config().vocab_size;
            let inputs = pipeline::Inputs {
                source,
                model_name: name.into(),
                calib: CalibSet::synthetic(vocab, nsamples, seqlen, 0),
            };
            let quant = QuantConfig {
                method,
                bits: 3,
                ..QuantConfig::default()
            };
            let config = PipelineConfig {
                quant,
                nsamples,
                seqlen,
                solver: Solver::CpuReference,
                metric_products: products,
                ..PipelineConfig::default()
            };
            let c = AtomicBool::new(false);
            let mut batches = 0;
            let run = pipeline::run_prepared(
                &ctx,
                &inputs,
                &config,
                &mut |e| {
                    if let Event::Started { plan, .. } = e {
                        batches = nsamples.div_ceil(plan.batch_sequences);
                    }
                },
                &c,
            )
            .unwrap();
            assert!(batches >= 2, "{name}: {batches} batch(es), want several");
            let want = reference_metrics(
                &ctx,
                inputs.source.as_ref(),
                &run.modules,
                &inputs.calib.windows,
            );
            assert_eq!(want.len(), run.report.modules.len(), "{name}");
            let mut worst = 0.0f64;
            for ((layer, m), expected) in want {
                let rep = run
                    .report
                    .modules
                    .iter()
                    .find(|r| r.layer == layer && r.module == m.short_name())
                    .unwrap();
                let got = [rep.quant_error, rep.asym_error, rep.output_error].map(|v| v.unwrap());
                for (what, g, e) in [
                    ("quant", got[0], expected[0]),
                    ("asym", got[1], expected[1]),
                    ("output", got[2], expected[2]),
                ] {
                    eprintln!(
                        "{name} layer {layer} {:>4} {what:>6}: got {g:.9e} expected {e:.9e}",
                        m.short_name()
                    );
                    let rel = (g - e).abs() / e.max(1e-12);
                    // f32 GEMMs and partial sums against f64 ones: at most 4.6e-7 relative seen with
                    // the products, 2.5e-6 from the statistics (lavapipe, 2026-12). Deliberate driver
                    // bugs were off by far more: Y_q and Y_fp swapped (quant 0 vs 1.5e-2), q/k
                    // measured after RoPE (×97), gate after SwiGLU (×210), biased q/k/v reusing their
                    // forward outputs (7.7e-3 relative), the moments' cross term counted once instead
                    // of twice (lab and this test fail).
                    assert!(
                        (g - e).abs() <= 2e-5 * e + 1e-9,
                        "{name} layer {layer} {} {what} error: got {g:e}, expected {e:e} (rel {rel:e})",
                        m.short_name()
                    );
                    if e > 1e-9 {
                        worst = worst.max(rel);
                    }
                }
            }
            eprintln!(
                "{name} ({method:?}, products: {products}): worst relative deviation {worst:e}"
            );
        }
    }
}

/// The measured GPU peak of a run stays within the memory plan, on a model whose widest input
/// (768) makes the solve's n×n matrices the peak: the plan counts the statistics plus two n×n
/// factor matrices (K and M, then U and P in the permuted D) and the released activations as two
/// separate stages. The factor, GPTAQ's P and the activations each used to hold one more n×n-sized
/// buffer at that moment; any of those coming back pushes the peak above the plan. GPTAQ without
/// metrics and with `--lean-memory` (act not kept) is planned with the FP stream's MLP freed
/// before down_proj's solve; a driver that kept it measured 13,474,592 B against the plan's
/// 13,448,922 B.
#[test]
fn measured_peak_stays_within_the_memory_plan() {
    use gptaq_studio::calib::CalibSet;
    use gptaq_studio::pipeline::Inputs;
    let Some(ctx) = test_context() else { return };
    let mut c = SyntheticModel::demo_config();
    c.hidden_size = 32;
    c.intermediate_size = 768;
    // Two layers: the second one's weights are uploaded during the first one's last stage
    // (MemoryPlan::weights_ahead), inside the same peak.
    c.num_layers = 2;
    c.num_heads = 2;
    c.num_kv_heads = 1;
    c.head_dim = 16;
    c.vocab_size = 64;
    let (nsamples, seqlen) = (2, 16);
    // GPTAQ without metrics: with act kept the plan counts gate/up freed before down_proj's
    // solve, and with --lean-memory (act not kept) the FP stream's whole MLP.
    for (method, metrics, lean) in [
        (Method::Gptaq { alpha: 0.25 }, true, false),
        (Method::Gptq, false, false),
        (Method::Gptaq { alpha: 0.25 }, false, false),
        (Method::Gptaq { alpha: 0.25 }, false, true),
    ] {
        let inputs = Inputs {
            source: Box::new(SyntheticModel::with_config(c.clone(), 11)),
            model_name: "wide synthetic".into(),
            calib: CalibSet::synthetic(c.vocab_size, nsamples, seqlen, 3),
        };
        let config = PipelineConfig {
            quant: QuantConfig {
                method,
                bits: 4,
                group_size: Some(32),
                ..QuantConfig::default()
            },
            nsamples,
            seqlen,
            solver: Solver::Gpu,
            metrics,
            lean_memory: lean,
            ..PipelineConfig::default()
        };
        let q =
            pipeline::run_prepared(&ctx, &inputs, &config, &mut |_| {}, &AtomicBool::new(false))
                .unwrap();
        let (peak, plan) = (q.report.peak_gpu_bytes, &q.report.plan);
        assert_eq!(plan.act_streams, !lean, "{method:?}: {:?}", plan.breakdown);
        // With the pool: what the device held for us stays within the budget's usable part.
        let reserved = q.report.peak_reserved_bytes;
        let usable = pipeline::plan::usable_budget(plan.gpu_budget_bytes);
        assert!(
            peak <= reserved && reserved <= usable.max(plan.gpu_bytes_estimate),
            "{method:?}: live peak {peak} B, with the pool {reserved} B, usable budget {usable} B"
        );
        assert_eq!(
            plan.weights_ahead, !lean,
            "{method:?}: {:?}",
            plan.breakdown
        );
        let n2 = 768 * 768 * 4;
        let mats = if metrics { 4 } else { 3 };
        eprintln!(
            "{method:?} (metrics {metrics}, lean {lean}): peak {peak} B, plan {} B, {mats} n×n = {} B",
            plan.gpu_bytes_estimate,
            mats * n2
        );
        assert!(
            peak <= plan.gpu_bytes_estimate,
            "{method:?}: measured peak {peak} B above the plan's {} B: {:?}",
            plan.gpu_bytes_estimate,
            plan.breakdown
        );
        // The solve really held the statistics and both factor matrices at once: the plan is
        // not met by a run that skipped the solve.
        assert!(
            peak >= mats * n2,
            "{method:?}: peak {peak} B below {mats} n×n matrices"
        );
    }
}

/// Asserts that two runs of the same job quantized bit for bit alike: per module the codes and Q
/// (first difference named), the scales, zeros, damping and fallback, and per reported module and
/// layer the errors, the proxy loss and the hidden deviation. `what` names the comparison.
fn assert_same_runs(what: &str, a: &pipeline::QuantizedModel, b: &pipeline::QuantizedModel) {
    assert_eq!(a.modules.len(), b.modules.len(), "{what}: module count");
    for (key, x) in &a.modules {
        let y = &b.modules[key];
        let first = x.codes.iter().zip(&y.codes).position(|(p, q)| p != q);
        assert!(
            first.is_none() && x.codes.len() == y.codes.len(),
            "{what} {key:?}: code {first:?} of {} differs",
            x.codes.len()
        );
        let (qx, qy) = (x.weights(), y.weights());
        let first = qx
            .iter()
            .zip(qy.iter())
            .position(|(p, q)| p.to_bits() != q.to_bits());
        assert!(first.is_none(), "{what} {key:?}: Q differs at {first:?}");
        assert!(
            x.scales == y.scales && x.zeros == y.zeros,
            "{what} {key:?}: scales or zeros differ"
        );
        assert_eq!(
            (x.damp_percent, &x.fallback),
            (y.damp_percent, &y.fallback),
            "{what} {key:?}: damping"
        );
    }
    for (x, y) in a.report.modules.iter().zip(&b.report.modules) {
        assert_eq!(
            (x.quant_error, x.asym_error, x.output_error, x.proxy_loss),
            (y.quant_error, y.asym_error, y.output_error, y.proxy_loss),
            "{what} layer {} {}: metrics",
            x.layer,
            x.module
        );
    }
    for (x, y) in a.report.layers.iter().zip(&b.report.layers) {
        assert_eq!(
            x.hidden_rel_error, y.hidden_rel_error,
            "{what} layer {}: hidden deviation",
            x.layer
        );
    }
}

/// The same quantization of a small two-layer synthetic model (hidden 64, intermediate 96, metrics
/// on, GPU solver) with the streams on the GPU and on the host, in that order.
fn gpu_and_host_stream_runs(
    ctx: &gptaq_studio::gpu::GpuContext,
    quant: QuantConfig,
    nsamples: usize,
    seqlen: usize,
) -> Vec<pipeline::QuantizedModel> {
    use gptaq_studio::calib::CalibSet;
    use gptaq_studio::pipeline::Inputs;
    let mut c = SyntheticModel::demo_config();
    c.num_layers = 2;
    c.hidden_size = 64;
    c.intermediate_size = 96;
    c.vocab_size = 64;
    [false, true]
        .into_iter()
        .map(|host| {
            let inputs = Inputs {
                source: Box::new(SyntheticModel::with_config(c.clone(), 5)),
                model_name: "synthetic".into(),
                calib: CalibSet::synthetic(c.vocab_size, nsamples, seqlen, 9),
            };
            let config = PipelineConfig {
                quant: quant.clone(),
                nsamples,
                seqlen,
                solver: Solver::Gpu,
                metrics: true,
                force_host_streams: host,
                ..PipelineConfig::default()
            };
            let q =
                pipeline::run_prepared(ctx, &inputs, &config, &mut |_| {}, &AtomicBool::new(false))
                    .unwrap();
            assert_eq!(q.report.plan.streams_on_gpu, !host, "placement");
            assert_eq!(q.modules.len(), 14);
            q
        })
        .collect()
}

/// Host streams with several batches (20 sequences: batches of 16 and 4), whose stores stay in
/// flight while the next batch computes and complete when a later stage loads them: the run
/// quantizes exactly as with the streams on the GPU, f32 host storage being lossless.
#[test]
fn host_stream_stores_in_flight_across_batches_change_nothing() {
    let Some(ctx) = test_context() else { return };
    let quant = QuantConfig {
        method: Method::Gptaq { alpha: 0.25 },
        bits: 3,
        group_size: Some(32),
        ..QuantConfig::default()
    };
    let runs = gpu_and_host_stream_runs(&ctx, quant, 20, 8);
    for q in &runs {
        assert_eq!(q.report.plan.batch_sequences, 16, "two batches expected");
    }
    assert_same_runs("host streams with stores in flight", &runs[0], &runs[1]);
}

/// Solves whose first damping fails: without damping and with 16 calibration tokens against
/// 64- and 96-wide modules every Hessian is singular, so the first Cholesky attempt fails in f32.
/// With the streams on the GPU the solves take that attempt speculatively, find it failed when
/// they finish, solve again and replace the Q installed at submission
/// (quant::gpu::submit_gpu_resident); with host streams they wait for each attempt. Both give the
/// same codes, Q, damping and metrics, and every module reports the raised damping.
#[test]
fn failed_speculative_factors_change_no_result() {
    let Some(ctx) = test_context() else { return };
    for method in [Method::Gptq, Method::Gptaq { alpha: 0.25 }] {
        let quant = QuantConfig {
            method,
            bits: 3,
            group_size: Some(32),
            damp_percent: 0.0,
            damp_auto_increment: 0.01,
            ..QuantConfig::default()
        };
        let runs = gpu_and_host_stream_runs(&ctx, quant, 2, 8);
        for (key, a) in &runs[0].modules {
            assert_eq!(
                a.fallback,
                Some(gptaq_studio::quant::Fallback::IncreasedDamping),
                "{method:?} {key:?}: the first damping must fail here"
            );
        }
        // The metrics are measured on the quantized stream, which runs through the installed Q:
        // equal only if each solve's replacement Q was installed.
        assert_same_runs(
            &format!("{method:?}, a failed speculative factor"),
            &runs[0],
            &runs[1],
        );
    }
}

/// Spare GPU memory spent on speed changes nothing: keeping the MLP activations from stage D to
/// stage E (MemoryPlan::act_streams, streams on the GPU) instead of recomputing gate/up there, and
/// uploading each layer's weights on a second thread during the previous layer's last stage
/// (MemoryPlan::weights_ahead), against `lean_memory`. The same bits flow everywhere, so codes,
/// scales, every metric and the hidden-state deviation are identical, for GPTAQ (two streams) and
/// for GPTQ without metrics (one stream). GPTAQ without metrics and without act runs the FP
/// stream's down_proj in stage D instead of recomputing its gate/up in stage E: the same bits
/// too. Two batches (20 windows) cover the per-batch slots; f32 host streams (no room planned
/// for act) keep recomputing and give the same bits again (the FP stream's stage-D output is
/// stored to the host; leaving that store out fails here).
#[test]
fn spare_memory_for_speed_changes_no_result() {
    let Some(ctx) = test_context() else { return };
    for (method, metrics) in [
        (Method::Gptaq { alpha: 0.25 }, true),
        (Method::Gptaq { alpha: 0.25 }, false),
        (Method::Gptq, false),
    ] {
        let quant = QuantConfig {
            method,
            bits: 3,
            ..QuantConfig::default()
        };
        let mut runs = Vec::new();
        for lean in [false, true] {
            let mut j = job(
                ModelInput::Demo { seed: 9 },
                CalibInput::Synthetic,
                quant.clone(),
                20,
                16,
            );
            j.config.solver = Solver::Gpu;
            j.config.metrics = metrics;
            j.config.lean_memory = lean;
            let q = run_job(&ctx, &j);
            let plan = &q.report.plan;
            assert!(plan.streams_on_gpu, "{method:?}: {:?}", plan.breakdown);
            assert!(plan.batch_sequences < 20, "{method:?}: one batch only");
            assert_eq!(plan.act_streams, !lean, "{method:?}: {:?}", plan.breakdown);
            // Weights ahead only where they fit within the peak (GPTQ's here is a batch of
            // activations, which the last stage also holds): asserted for GPTAQ.
            assert!(
                !(lean && plan.weights_ahead),
                "{method:?}: {:?}",
                plan.breakdown
            );
            if matches!(method, Method::Gptaq { .. }) {
                assert_eq!(
                    plan.weights_ahead, !lean,
                    "{method:?}: {:?}",
                    plan.breakdown
                );
            }
            runs.push(q);
        }
        assert_same_runs(
            &format!("{method:?}, spare memory spent"),
            &runs[0],
            &runs[1],
        );
        // Without room on the GPU for the streams there is no act stream either, and f32 host
        // streams carry the same bits (GPTAQ without metrics: the FP stream's down_proj in stage
        // D, stored to the host there, against the kept act's stage E).
        let mut j = job(
            ModelInput::Demo { seed: 9 },
            CalibInput::Synthetic,
            quant.clone(),
            20,
            16,
        );
        j.config.solver = Solver::Gpu;
        j.config.force_host_streams = true;
        j.config.metrics = metrics;
        let q = run_job(&ctx, &j);
        assert!(!q.report.plan.act_streams && !q.report.plan.streams_on_gpu);
        assert_eq!(
            q.report.plan.batch_sequences, runs[0].report.plan.batch_sequences,
            "{method:?}"
        );
        assert_same_runs(&format!("{method:?}, host streams"), &runs[0], &q);
    }
}

/// The memory plan of a GPTAQ run with metrics on `mc` (sequences of 16 tokens, f32 kernels) at
/// `budget` bytes, with `dtype` host streams, forced to the host or not; `None` where it does not
/// fit.
fn gptaq_plan(
    ctx: &gptaq_studio::gpu::GpuContext,
    mc: &gptaq_studio::model::ModelConfig,
    nsamples: usize,
    dtype: gptaq_studio::pipeline::StreamDType,
    budget: u64,
    force_host: bool,
) -> Option<pipeline::MemoryPlan> {
    pipeline::plan::plan(&pipeline::plan::PlanInput {
        config: mc,
        nsamples,
        seqlen: 16,
        fp_stream: true,
        metrics: true,
        statistics: 2,
        metric_moments: true,
        gpu_budget_bytes: budget,
        max_buffer_bytes: ctx.max_binding_bytes(),
        host_dtype: dtype,
        force_host,
        lean_memory: false,
        tensor_cores: false,
    })
    .ok()
}

/// The demo GPTAQ W3 job of the stream-placement tests (`nsamples` sequences of 16 tokens, GPU
/// solve, `dtype` streams) and the first budget, in 4 KiB steps, at which `pick(plan, all-host
/// plan)` holds; `None` where no budget up to 64 MiB does.
fn stream_job_where(
    ctx: &gptaq_studio::gpu::GpuContext,
    nsamples: usize,
    dtype: gptaq_studio::pipeline::StreamDType,
    pick: impl Fn(&pipeline::MemoryPlan, &pipeline::MemoryPlan) -> bool,
) -> (Job, Option<u64>) {
    let mut base = job(
        ModelInput::Demo { seed: 4 },
        CalibInput::Synthetic,
        QuantConfig {
            method: Method::Gptaq { alpha: 0.25 },
            bits: 3,
            ..QuantConfig::default()
        },
        nsamples,
        16,
    );
    base.config.solver = Solver::Gpu;
    base.config.stream_dtype = dtype;
    let inputs = pipeline::prepare(&base).unwrap();
    let mc = inputs.source.config().clone();
    let plan_at = |b: u64, force_host: bool| gptaq_plan(ctx, &mc, nsamples, dtype, b, force_host);
    let budget = (1u64..16384).map(|kib4| kib4 << 12).find(|&b| {
        match (plan_at(b, false), plan_at(b, true)) {
            (Some(placed), Some(host)) => pick(&placed, &host),
            _ => false,
        }
    });
    (base, budget)
}

/// `base` at `budget` run twice: with the plan's stream placement and with every batch on the
/// host (`--host-streams`).
fn placed_and_host_runs(
    ctx: &gptaq_studio::gpu::GpuContext,
    base: &Job,
    budget: u64,
) -> [pipeline::QuantizedModel; 2] {
    [false, true].map(|host| {
        let mut j = base.clone();
        j.config.gpu_budget_bytes = budget;
        j.config.force_host_streams = host;
        run_job(ctx, &j)
    })
}

/// Packed f16 streams on the GPU (`Placement::GpuF16`, planned when f16 streams are requested
/// and only their f16 size fits) hold exactly what f16 host streams hold: the same packing and
/// unpacking kernels run on every store and load, only the words stay on the GPU. So a GPTAQ run
/// with metrics quantizes bit for bit like the host-f16 run. The budget is the smallest (in 4 KiB
/// steps) at which the plan chooses the packed GPU streams for this job.
#[test]
fn packed_f16_gpu_streams_equal_f16_host_streams() {
    use gptaq_studio::pipeline::StreamDType;
    let Some(ctx) = test_context() else { return };
    // The window between the f32 and the f16 streams' sizes is a few hundred KiB here. The
    // host-f16 run at that budget must batch the sequences alike (the statistics' summation
    // order follows the batches), so the budget is one where both plans agree on the batch; how
    // the window falls against the batch steps depends on the calibration size and on the
    // solve's buffers, so a few sizes are tried (the first with such a budget is used).
    let (base, budget) = [20usize, 16, 24, 12, 8]
        .into_iter()
        .find_map(|nsamples| {
            let (base, budget) = stream_job_where(&ctx, nsamples, StreamDType::F16, |g, h| {
                g.streams_on_gpu
                    && g.stream_dtype == "f16"
                    && g.batch_sequences == h.batch_sequences
            });
            Some((base, budget?))
        })
        .expect("a calibration size and budget that place packed f16 streams on the GPU");
    let runs = placed_and_host_runs(&ctx, &base, budget);
    for (q, host) in runs.iter().zip([false, true]) {
        let plan = &q.report.plan;
        assert_eq!(
            (plan.streams_on_gpu, plan.stream_dtype.as_str()),
            (!host, "f16"),
            "host {host}: {:?}",
            plan.breakdown
        );
    }
    assert_same_runs(
        "packed GPU f16 streams against host f16 streams",
        &runs[0],
        &runs[1],
    );
}

/// Host streams whose leading batches stay on the GPU in the memory the plan has left
/// (`MemoryPlan::resident_batches`: packed f16 beside f16 host batches, f32 beside f32 ones) hold
/// exactly what all-host streams hold, so a GPTAQ run with metrics quantizes bit for bit like the
/// `--host-streams` run, for both element types. The budget is the first (in 4 KiB steps) at
/// which the plan keeps some but not all batches on the GPU with the batch size of the all-host
/// plan (the statistics' summation order follows the batches).
#[test]
fn resident_host_batches_equal_host_streams() {
    use gptaq_studio::pipeline::StreamDType;
    let Some(ctx) = test_context() else { return };
    let nsamples = 20;
    for dtype in [StreamDType::F16, StreamDType::F32] {
        let (base, budget) = stream_job_where(&ctx, nsamples, dtype, |g, h| {
            let nb = nsamples.div_ceil(g.batch_sequences);
            !g.streams_on_gpu
                && (1..nb).contains(&g.resident_batches)
                && g.batch_sequences == h.batch_sequences
        });
        let budget = budget.expect("a budget that keeps some host batches on the GPU");
        let runs = placed_and_host_runs(&ctx, &base, budget);
        for (q, host) in runs.iter().zip([false, true]) {
            let plan = &q.report.plan;
            assert!(!plan.streams_on_gpu, "{dtype:?}: {:?}", plan.breakdown);
            assert_eq!(
                plan.resident_batches > 0,
                !host,
                "{dtype:?} host {host}: {:?}",
                plan.breakdown
            );
            // Within the plan, resident batches included.
            assert!(
                q.report.peak_gpu_bytes <= plan.gpu_bytes_estimate,
                "{dtype:?} host {host}: peak {} B above the plan's {} B: {:?}",
                q.report.peak_gpu_bytes,
                plan.gpu_bytes_estimate,
                plan.breakdown
            );
        }
        assert_same_runs(
            &format!("{dtype:?}: resident host batches against all-host streams"),
            &runs[0],
            &runs[1],
        );
    }
}

/// `PipelineConfig::tensor_cores` on tiny-llama-15m (every module and the attention tile at 128
/// tokens per sequence; tests/forward.rs covers the f32 tail of untiled rows). Where the adapter
/// grants cooperative matrices (the GPU machine)
/// the f16 forward and statistics must quantize like the f32 run: every module's errors and
/// each layer's hidden deviation within 10 % (f16 rounds each operand by ≤ 2⁻¹¹; a chunk left
/// out or a stale f16 weight after Q is installed changes them by far more). Elsewhere (lavapipe)
/// the request is ignored with a warning and the run is bit for bit the f32 one.
#[test]
fn tensor_cores_quantize_like_f32() {
    let Some(dir) = common::test_data_dir() else {
        return;
    };
    let Some(ctx) = test_context() else { return };
    let granted = gptaq_studio::gpu::ops::coop_available(&ctx);
    let run = |tc: bool| {
        let mut j = job(
            ModelInput::Dir(dir.join("tiny-llama-15m")),
            CalibInput::File(dir.join("corpora/tinystories/train_head_197k.txt")),
            QuantConfig {
                method: Method::Gptaq { alpha: 0.25 },
                bits: 4,
                group_size: Some(128),
                ..QuantConfig::default()
            },
            2,
            128,
        );
        j.config.solver = Solver::Gpu;
        j.config.tensor_cores = tc;
        run_job(&ctx, &j)
    };
    let (f32_run, tc_run) = (run(false), run(true));
    let note = tc_run
        .report
        .warnings
        .iter()
        .find(|w| w.starts_with("tensor cores"))
        .cloned()
        .unwrap_or_default();
    if !granted {
        assert!(note.contains("ignored"), "warning: {note:?}");
        for (key, a) in &f32_run.modules {
            let b = &tc_run.modules[key];
            assert_eq!(
                (&a.codes, a.weights()),
                (&b.codes, b.weights()),
                "{key:?}: an ignored tensor-core request changed the quantization"
            );
        }
        assert_eq!(f32_run.report.modules, {
            let mut m = tc_run.report.modules.clone();
            for (x, y) in m.iter_mut().zip(&f32_run.report.modules) {
                x.secs = y.secs;
            }
            m
        });
        eprintln!("note: adapter without cooperative matrices; tensor-core pipeline not exercised");
        return;
    }
    assert!(note.contains("f16 operands"), "warning: {note:?}");
    // 128-token sequences tile the tensor-core blocks and GPTAQ's metrics come from H and D, so
    // gate/up's f32 weights are freed once solved (plan::gate_up_f32_released): the errors below
    // then also check that nothing read them afterwards.
    assert!(
        tc_run.report.plan.gate_up_f32_released && !f32_run.report.plan.gate_up_f32_released,
        "{:?}",
        tc_run.report.plan.breakdown
    );
    let close = |what: String, a: Option<f64>, b: Option<f64>| {
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(
            (a - b).abs() <= 0.1 * a.abs().max(1e-6),
            "{what}: f32 {a}, tensor cores {b}"
        );
    };
    for (a, b) in f32_run.report.modules.iter().zip(&tc_run.report.modules) {
        let at = format!("layer {} {}", a.layer, a.module);
        close(format!("{at} quant error"), a.quant_error, b.quant_error);
        close(format!("{at} output error"), a.output_error, b.output_error);
        close(
            format!("{at} proxy loss"),
            Some(a.proxy_loss),
            Some(b.proxy_loss),
        );
    }
    for (a, b) in f32_run.report.layers.iter().zip(&tc_run.report.layers) {
        close(
            format!("layer {} hidden deviation", a.layer),
            a.hidden_rel_error,
            b.hidden_rel_error,
        );
    }
}

/// With kernel timing on, every layer's report carries GPU times for each stage of a GPTAQ
/// layer — the forward, the statistics, the factor's Cholesky and inverse, P and the blocked
/// sweep — and the run's table is their sum.
#[test]
fn kernel_times_cover_every_stage_of_a_gptaq_layer() {
    let Some(ctx) = test_context() else { return };
    if !gptaq_studio::gpu::test_kernel_timing(&ctx) {
        return;
    }
    let mut j = job(
        ModelInput::Demo { seed: 7 },
        CalibInput::Synthetic,
        QuantConfig {
            method: Method::Gptaq { alpha: 0.25 },
            ..QuantConfig::default()
        },
        2,
        16,
    );
    j.config.solver = Solver::Gpu;
    let inputs = pipeline::prepare(&j).unwrap();
    let q = pipeline::run_prepared(
        &ctx,
        &inputs,
        &j.config,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap();
    assert!(!q.report.layers.is_empty());
    for l in &q.report.layers {
        let kernels: Vec<_> = l
            .kernel_times
            .iter()
            .filter(|t| !gptaq_studio::gpu::timing::is_pseudo(t))
            .collect();
        for scope in [
            "forward",
            "stats",
            "solve/factor/cholesky",
            "solve/factor/inverse",
            "solve/p",
            "solve/blocks",
        ] {
            assert!(
                kernels.iter().any(|t| t.scope == scope && t.calls > 0),
                "layer {}: no kernel time in scope {scope}: {:?}",
                l.layer,
                l.kernel_times
            );
        }
        for t in &kernels {
            assert!(
                t.seconds.is_finite() && t.seconds > 0.0,
                "layer {} {} {}: {} s",
                l.layer,
                t.scope,
                t.kernel,
                t.seconds
            );
        }
    }
    let calls = |ts: &[gptaq_studio::gpu::KernelTime]| -> u64 { ts.iter().map(|t| t.calls).sum() };
    let per_layer: u64 = q.report.layers.iter().map(|l| calls(&l.kernel_times)).sum();
    assert_eq!(
        calls(&q.report.kernel_times),
        per_layer,
        "run table ≠ sum of the layers'"
    );
}
