//! The desktop app driven through AccessKit with `egui_kittest`: start screen, validation, the
//! table filled from a synthetic event stream, module detail, the comparison overlay, and a real
//! demo run on the GPU (lavapipe in CI).

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use rand::{Rng, SeedableRng};

use gptaq_studio::app::StudioApp;
use gptaq_studio::app::state::{RunSlot, Session, Settings};
use gptaq_studio::app::worker::{Command, WorkerEvent, inspect_model};
use gptaq_studio::lab::step::Stage;
use gptaq_studio::model::ModuleKind;
use gptaq_studio::pipeline::{
    CapturedModule, Event, LayerReport, MemoryPlan, ModelInput, ModuleReport,
};

fn harness(app: StudioApp) -> Harness<'static, StudioApp> {
    Harness::builder()
        .with_size([1500.0, 1000.0])
        .build_ui_state(
            |ui, app: &mut StudioApp| {
                let ctx = ui.ctx().clone();
                app.logic(&ctx);
                app.ui(ui);
            },
            app,
        )
}

/// The app with a real worker (its own GPU device), stepping without a step limit: real runs
/// repaint for as long as the worker works.
fn live_harness(width: f32) -> Harness<'static, StudioApp> {
    Harness::builder()
        .with_size([width, 1000.0])
        .with_max_steps(u64::MAX)
        .build_ui_state(
            |ui, app: &mut StudioApp| {
                let ctx = ui.ctx().clone();
                app.logic(&ctx);
                app.ui(ui);
            },
            StudioApp::new(gptaq_studio::gpu::GpuOptions::from_env()),
        )
}

/// Presses Demo and answers the Inspect command with the real (CPU-only) model summary.
fn open_demo(h: &mut Harness<'static, StudioApp>) {
    h.get_by_label("Demo").click();
    // The model summary spinner repaints until the worker answers: step, don't settle.
    h.run_steps(2);
    let cmd = h.state_mut().outbox.pop();
    let Some(Command::Inspect(input)) = cmd else {
        panic!("Demo must ask the worker to inspect the model, got {cmd:?}");
    };
    let info = match inspect_model(&input) {
        Ok(i) => Box::new(i),
        Err(e) => panic!("demo summary: {e}"),
    };
    h.state_mut().state.apply(WorkerEvent::Model(Ok(info)));
    h.run();
}

fn module(layer: usize, kind: ModuleKind, scale: f64) -> ModuleReport {
    let e = scale * (1.0 + layer as f64) * (1.0 + kind as usize as f64 * 0.1);
    ModuleReport {
        layer,
        module: kind.short_name().into(),
        rows: 128,
        cols: 128,
        nsamples: 2,
        damp: 0.01,
        proxy_loss: e * 5.0,
        quant_error: Some(e),
        asym_error: Some(e * 0.3),
        output_error: Some(e * 1.2),
        fallback: None,
        secs: 0.01,
    }
}

fn feed_run(app: &mut StudioApp, slot: RunSlot, layers: usize, scale: f64) {
    let mut send = |event| app.state.apply(WorkerEvent::Pipeline { slot, event });
    send(Event::Started {
        model: "demo".into(),
        method: "gptq".into(),
        layers,
        modules_per_layer: 7,
        plan: MemoryPlan::default(),
    });
    for l in 0..layers {
        send(Event::LayerStarted { layer: l });
        for k in ModuleKind::ALL {
            send(Event::ModuleDone(module(l, k, scale)));
        }
        send(Event::LayerDone(LayerReport {
            layer: l,
            hidden_rel_error: Some(0.01 * (l + 1) as f64),
            secs: 0.05,
            phases: Vec::new(),
            kernel_times: Vec::new(),
        }));
    }
}

#[test]
fn demo_start_screen_renders() {
    let mut h = harness(StudioApp::headless());
    h.run();
    h.get_by_label("Quantize a Llama-family model with GPTQ or GPTAQ");
    open_demo(&mut h);
    h.get_by_label("Model summary");
    h.get_by_label("Memory plan");
    h.get_by_label_contains("the smallest GPU memory budget for these settings:");
    h.get_by_label_contains("SYNTHETIC");
    // Demo settings are valid: Start is enabled and sends a Start command.
    h.get_by_label("Start").click();
    h.run();
    assert!(
        matches!(
            h.state().outbox.last(),
            Some(Command::Start { compare: None, .. })
        ),
        "{:?}",
        h.state().outbox
    );
}

#[test]
fn bad_group_size_is_explained() {
    let mut h = harness(StudioApp::headless());
    open_demo(&mut h);
    h.get_by_role_and_label(Role::SpinButton, "Group size")
        .set_value_accesskit(100.0);
    h.run();
    assert_eq!(h.state().state.settings.group_size, 100);
    h.get_by_label_contains("group size 100 does not divide the 128 input features of q_proj");
    // The suggestion fixes it.
    h.get_by_label("Use group size 64").click();
    h.run();
    assert_eq!(h.state().state.settings.group_size, 64);
    assert!(h.query_by_label_contains("does not divide").is_none());
}

#[test]
fn events_fill_table_and_row_opens_detail() {
    let mut app = StudioApp::headless();
    app.state.session = Some(Session::live(false));
    feed_run(&mut app, RunSlot::Single, 4, 1e-3);
    let mut h = harness(app);
    h.run();
    for k in ModuleKind::ALL {
        let n = h.query_all_by_label(k.short_name()).count();
        assert_eq!(n, 4, "{} rows of {}", n, k.short_name());
    }
    // Sorting by a header keeps every row.
    h.get_by_label_contains("output err").click();
    h.run();
    assert_eq!(h.query_all_by_label("down_proj").count(), 4);

    h.get_all_by_label("up_proj").next().expect("row").click();
    h.run();
    h.get_by_label("Module detail");
    let sel = h.state().state.selected.clone().expect("selected");
    assert_eq!(sel.module, "up_proj");
    h.get_by_label(&format!("layer {} · up_proj", sel.layer));
    // Still running (no terminal event yet): no picture request.
    assert!(h.state().outbox.is_empty());
}

/// The detail panel's diag(H) spectrum and per-column proxy loss come from the solver's result;
/// when the GPU solver left the per-column loss out, the panel says why.
#[test]
fn detail_shows_spectrum_and_column_loss() {
    use gptaq_studio::app::detail::{SolveInfo, module_detail};
    use gptaq_studio::quant::{Method, QuantConfig, reference};
    let mut app = StudioApp::headless();
    app.state.session = Some(Session::live(false));
    feed_run(&mut app, RunSlot::Single, 2, 1e-3);
    app.state.apply(WorkerEvent::SessionEnded);
    let mut h = harness(app);
    h.run();
    h.get_all_by_label("o_proj").next().expect("row").click();
    // The panel shows a spinner until the pictures arrive: step, don't settle.
    h.run_steps(2);
    assert!(matches!(
        h.state().outbox.last(),
        Some(Command::ModuleDetail { layer: 0, .. })
    ));
    let cap = synthetic_capture(16, 40);
    let cfg = QuantConfig {
        method: Method::Gptq,
        bits: 3,
        act_order: true,
        ..QuantConfig::default()
    };
    let mut q = reference::quantize_reference(&cap.w, 16, 40, &cap.h, None, &cfg).expect("solve");
    assert_eq!((q.column_loss.len(), q.h_diag.len()), (40, 40));
    let info = |solver| SolveInfo {
        method: Method::Gptq,
        solver,
        maxq: 7,
        act_order: true,
        nsamples: 3,
    };
    let cpu = module_detail(
        RunSlot::Single,
        0,
        "o_proj",
        &cap.w,
        &q,
        &info(gptaq_studio::pipeline::Solver::CpuReference),
    )
    .expect("detail");
    assert!(cpu.h_spectrum.windows(2).all(|p| p[0] >= p[1]));
    h.state_mut()
        .state
        .apply(WorkerEvent::Detail(Ok(Box::new(cpu))));
    h.run();
    h.get_by_label_contains("act-order is on: the two lines coincide");
    h.get_by_label_contains("per sequence, largest");
    // A result without per-column losses: explained instead of plotted.
    q.column_loss.clear();
    let gpu = module_detail(
        RunSlot::Single,
        0,
        "o_proj",
        &cap.w,
        &q,
        &info(gptaq_studio::pipeline::Solver::Gpu),
    )
    .expect("detail");
    h.state_mut()
        .state
        .apply(WorkerEvent::Detail(Ok(Box::new(gpu))));
    h.run();
    h.get_by_label_contains("did not record a per-column proxy loss");
    assert!(h.query_by_label_contains("per sequence, largest").is_none());
}

#[test]
fn side_by_side_overlay_toggles() {
    let mut app = StudioApp::headless();
    app.state.session = Some(Session::live(true));
    feed_run(&mut app, RunSlot::Gptq, 3, 2e-3);
    feed_run(&mut app, RunSlot::Gptaq, 3, 1e-3);
    app.state.apply(WorkerEvent::SessionEnded);
    let mut h = harness(app);
    h.run();
    // The table follows the chosen run.
    h.get_by_label("GPTQ run").click();
    h.run();
    assert_eq!(h.state().state.table_slot, RunSlot::Gptq);
    h.get_by_label("Plots").click();
    h.run();
    h.get_by_label("GPTQ curves").click();
    h.run();
    assert!(!h.state().state.show_gptq);
    assert!(h.state().state.show_gptaq);
    h.get_by_label("GPTQ curves").click();
    h.get_by_label("GPTAQ curves").click();
    h.run();
    assert!(h.state().state.show_gptq && !h.state().state.show_gptaq);
}

#[test]
fn worker_errors_are_visible() {
    let mut app = StudioApp::headless();
    app.state
        .apply(WorkerEvent::Error("reading x.json: no such file".into()));
    let mut h = harness(app);
    h.run();
    h.get_by_label_contains("reading x.json: no such file");
}

/// The GPU panel (and the settings' checkbox) say whether `--tensor-cores` can use the opened
/// GPU, and why not: here a Metal-like adapter whose cooperative matrices are 8×8 only (the
/// kernels need 16×16×16 f16->f32), then one that offers the kernels' shape and grants it, then
/// one without cooperative matrices.
#[test]
fn gpu_panel_explains_the_tensor_cores() {
    let summary = |configs: &[&str], coop: bool| gptaq_studio::gpu::AdapterSummary {
        name: "Apple M3".into(),
        backend: "Metal".into(),
        features: ["SHADER_F16", "SUBGROUP"]
            .into_iter()
            .chain(coop.then_some("EXPERIMENTAL_COOPERATIVE_MATRIX"))
            .map(String::from)
            .collect(),
        coop_configs: configs.iter().map(|c| c.to_string()).collect(),
        ..Default::default()
    };
    let mut app = StudioApp::headless();
    app.state
        .apply(WorkerEvent::Device(Ok(summary(&["8x8x8 f16->f32"], false))));
    assert!(!app.state.tensor_cores_granted());
    let mut h = harness(app);
    h.run();
    h.get_by_label_contains(
        "tensor cores: not here (cooperative matrices 8x8x8 f16->f32 offered, not the kernels' \
         16x16x16 f16->f32)",
    );
    // The settings' checkbox says so too (the option is ignored on this GPU).
    h.get_by_label("Tensor cores (f16): not on this GPU");
    h.state_mut().state.apply(WorkerEvent::Device(Ok(summary(
        &["16x16x16 f16->f16", "16x16x16 f16->f32"],
        true,
    ))));
    h.run();
    h.get_by_label_contains("tensor cores: available (16x16x16 f16->f32 cooperative matrices)");
    h.get_by_label("Tensor cores (f16)");
    h.state_mut()
        .state
        .apply(WorkerEvent::Device(Ok(summary(&[], false))));
    h.run();
    h.get_by_label_contains(
        "tensor cores: not here (no cooperative matrices); the f32 kernels run",
    );
}

/// The real thing: the worker thread opens the GPU, quantizes the demo model with tiny shapes and
/// the table fills with every module of every layer.
/// A live harness on the demo model, its summary answered by the worker.
fn live_demo() -> Harness<'static, StudioApp> {
    let mut h = live_harness(1500.0);
    h.step();
    h.get_by_label("Demo").click();
    h.step();
    step_until(&mut h, "the model summary", &|a| {
        a.state.model_info().is_some()
    });
    h
}

/// Applies `settings`, presses Start and steps until the run (or comparison) has ended, for at
/// most `secs` seconds.
fn run_to_end(
    h: &mut Harness<'static, StudioApp>,
    secs: u64,
    settings: impl FnOnce(&mut Settings),
) {
    settings(&mut h.state_mut().state.settings);
    h.step();
    h.get_by_label("Start").click();
    h.step();
    step_within(h, "the end of the run", secs, &|a| {
        a.state.session.as_ref().is_some_and(|s| !s.is_active())
    });
}

#[test]
fn demo_run_to_completion_on_gpu() {
    let Some(_probe) = gptaq_studio::gpu::test_context() else {
        return;
    };
    drop(_probe);
    let mut h = live_demo();
    assert!(matches!(
        h.state().state.model,
        Some(ModelInput::Demo { .. })
    ));
    run_to_end(&mut h, 300, |s| {
        s.nsamples = 2;
        s.seqlen = 16;
    });
    let session = h.state().state.session.clone().expect("session");
    let run = session.run(RunSlot::Single).expect("run");
    assert_eq!(
        session.phase,
        gptaq_studio::app::state::Phase::Finished,
        "messages: {:?}",
        h.state().state.messages
    );
    assert_eq!(run.modules.len(), run.layers * 7);
    h.step();
    for k in ModuleKind::ALL {
        assert_eq!(h.query_all_by_label(k.short_name()).count(), run.layers);
    }
    // A finished live run: the detail pictures come from the worker.
    h.get_all_by_label("down_proj").next().expect("row").click();
    step_until(&mut h, "the module pictures", &|a| a.state.detail.is_some());
    assert!(
        matches!(&h.state().state.detail, Some(Ok(_))),
        "{:?}",
        h.state().state.detail.as_ref().map(|d| d.as_ref().err())
    );
    h.step();
    h.get_by_label_contains("|W-Q|");

    // The GPU solver reads the per-column proxy loss back (one reduction per block): it is plotted.
    h.get_by_label_contains("proxy loss per column");
    h.get_by_label_contains("per sequence, largest");
    h.get_by_label_contains("diag(H): sorted descending");

    // Layer lab on the finished session: capture layer 1 o_proj; the settings re-solve GPTQ beside
    // GPTAQ by themselves, with the α sweep.
    h.get_by_label("Layer lab").click();
    h.step();
    {
        let lab = &mut h.state_mut().state.lab;
        lab.layer = 1;
        lab.module = ModuleKind::O;
    }
    h.step();
    h.get_by_label("Capture").click();
    h.step();
    step_until(&mut h, "the lab study", &|a| {
        a.state.lab.study.is_some() && a.state.lab.solving.is_none()
    });
    let s = h
        .state()
        .state
        .lab
        .study
        .clone()
        .unwrap_or_else(|| panic!("lab failed: {:?}", h.state().state.messages));
    let cap = h.state().state.lab.capture.clone().expect("capture info");
    assert_eq!(
        (cap.layer, cap.module, s.sweep.len()),
        (1, ModuleKind::O, 11)
    );
    assert!(
        (s.sweep[0].1.output_error - s.gptq.metrics.output_error).abs() < 1e-12,
        "α = 0 must be GPTQ"
    );
    assert!(
        s.gptq.metrics.asym_error > 0.0,
        "layer 1 inherits error from layer 0"
    );
    h.step();
    h.get_by_label_contains("GPTAQ changes the output error");
}

/// Steps a live harness until `f` holds (the worker answers asynchronously).
fn step_until(h: &mut Harness<'static, StudioApp>, what: &str, f: &dyn Fn(&StudioApp) -> bool) {
    step_within(h, what, 300, f);
}

/// [`step_until`] with a time limit of `secs` (real-model runs on lavapipe take minutes).
fn step_within(
    h: &mut Harness<'static, StudioApp>,
    what: &str,
    secs: u64,
    f: &dyn Fn(&StudioApp) -> bool,
) {
    let t0 = std::time::Instant::now();
    while !f(h.state()) {
        assert!(
            t0.elapsed().as_secs() < secs,
            "timed out waiting for {what}; messages: {:?}",
            h.state().state.messages
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        h.step();
    }
}

/// A small capture from random activations (`H = 2/N X_q^T X_q`, `D = 2/N dX^T X_q`,
/// `E = 2/N dX^T dX`, dX = X_fp - X_q), the way the pipeline accumulates them.
fn synthetic_capture(rows: usize, cols: usize) -> CapturedModule {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let t = 3 * cols;
    let xq: Vec<f64> = (0..t * cols)
        .map(|i| rng.random_range(-1.0..1.0) * (1.0 + (i % cols % 5) as f64))
        .collect();
    let xf: Vec<f64> = xq
        .iter()
        .map(|x| x + 0.2 * rng.random_range(-1.0..1.0))
        .collect();
    let dx: Vec<f64> = xf.iter().zip(&xq).map(|(a, b)| a - b).collect();
    let gram = |a: &[f64], b: &[f64]| -> Vec<f32> {
        let mut g = vec![0.0f32; cols * cols];
        for i in 0..cols {
            for j in 0..cols {
                let s: f64 = (0..t).map(|k| a[k * cols + i] * b[k * cols + j]).sum();
                g[i * cols + j] = (2.0 / 3.0 * s) as f32;
            }
        }
        g
    };
    CapturedModule {
        layer: 5,
        module: ModuleKind::Down,
        rows,
        cols,
        nsamples: 3,
        w: (0..rows * cols)
            .map(|_| rng.random_range(-0.3f32..0.3))
            .collect(),
        h: gram(&xq, &xq),
        d: gram(&dx, &xq),
        e: gram(&dx, &dx),
    }
}

/// A study from the lab's GPU path: the view names the solver and explains the pictures only the
/// f64 reference records (compensation heatmaps, P's row norms) instead of claiming an RTN fallback.
#[test]
fn lab_gpu_study_names_its_solver() {
    use gptaq_studio::app::worker::LabCaptureInfo;
    use gptaq_studio::lab::{Backend, Lab, LabSolver};
    use gptaq_studio::quant::QuantConfig;
    let Some(ctx) = gptaq_studio::gpu::test_context() else {
        return;
    };
    let cap = synthetic_capture(24, 80);
    let study = Lab::new(cap.clone())
        .study_on(Backend::Gpu(&ctx), &QuantConfig::default(), 0.25)
        .expect("GPU study");
    assert_eq!(study.solver, LabSolver::Gpu);
    assert!(study.p_row_norms.is_empty() && study.gptaq.heat_comp.is_empty());
    let mut app = StudioApp::headless();
    app.state.apply(WorkerEvent::LabCaptured(Ok(LabCaptureInfo {
        id: 1,
        layer: cap.layer,
        module: cap.module,
        rows: cap.rows,
        cols: cap.cols,
        nsamples: cap.nsamples,
        source: "test".into(),
    })));
    app.state.apply(WorkerEvent::LabSolved {
        capture: 1,
        result: Ok(Box::new(study)),
    });
    let mut h = Harness::builder()
        .with_size([1500.0, 4000.0])
        .build_ui_state(
            |ui, app: &mut StudioApp| {
                let ctx = ui.ctx().clone();
                app.logic(&ctx);
                app.ui(ui);
            },
            app,
        );
    // The lab asks the (absent) worker for a solve of its own settings and shows a spinner: step.
    h.run_steps(3);
    h.get_by_label_contains("on the worker: GPU (f32)");
    h.get_by_label_contains("(P stays on the GPU: only with the f64 CPU reference");
    assert_eq!(
        h.query_all_by_label_contains("only with the f64 CPU reference")
            .count(),
        3,
        "P's row norms and both compensation heatmaps are explained"
    );
}

/// The lab without a run: open a capture file from the start screen, drag α (re-solve on the
/// worker), step a column and a block, run to the end (same errors as the one-shot solve), then
/// save the capture and load it back (same results: lessons reproduce).
#[test]
fn lab_capture_file_alpha_steps_save_load() {
    let Some(probe) = gptaq_studio::gpu::test_context() else {
        return;
    };
    drop(probe);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lesson.safetensors");
    gptaq_studio::lab::save(&synthetic_capture(24, 80), &path).expect("save capture");
    let mut h = live_harness(1500.0);
    h.step();
    h.get_by_role_and_label(Role::TextInput, "or path:")
        .set_text_value_accesskit(&path.display().to_string());
    h.step();
    h.get_by_label("Load capture").click();
    h.step();
    step_until(&mut h, "the first study", &|a| {
        a.state.lab.study.is_some() && a.state.lab.solving.is_none()
    });
    assert!(h.state().state.lab.standalone, "a capture opens the lab");
    let first = h.state().state.lab.study.clone().expect("study");
    assert_eq!(first.alpha, 0.25);
    assert_eq!(
        (first.gptq.column_loss.len(), first.p_row_norms.len()),
        (80, 80)
    );
    h.step();
    h.get_by_label_contains("[24 x 80], 3 calibration sequences");
    h.get_by_label_contains("GPTAQ changes the output error");

    // Drag alpha: the worker re-solves GPTAQ at the new alpha (the alpha sweep is unchanged).
    h.get_by_role_and_label(Role::Slider, "alpha")
        .set_value_accesskit(0.9);
    h.step();
    assert_eq!(h.state().state.lab.settings.alpha, 0.9);
    step_until(&mut h, "the re-solve at alpha 0.9", &|a| {
        a.state.lab.study.as_ref().is_some_and(|s| s.alpha == 0.9) && a.state.lab.solving.is_none()
    });
    let moved = h.state().state.lab.study.clone().expect("study");
    assert_eq!(
        moved.gptq.metrics, first.gptq.metrics,
        "GPTQ does not depend on alpha"
    );
    assert_ne!(moved.gptaq.metrics, first.gptaq.metrics);
    let at_09 = moved.sweep[9].1;
    assert!(
        (at_09.output_error - moved.gptaq.metrics.output_error).abs() < 1e-12,
        "the sweep point at 0.9 is the GPTAQ solve"
    );

    // Step mode: a column, a block (its cross-block update), the rest.
    h.get_by_label("Step mode").click();
    h.step();
    h.get_by_label_contains("modules up to 4096 input columns");
    h.get_by_label("Start stepping").click();
    h.step();
    step_until(&mut h, "the step start", &|a| {
        !a.state.lab.stepping && a.state.lab.step.is_some()
    });
    let stage = |h: &Harness<'static, StudioApp>| {
        let s = h.state().state.lab.step.clone().expect("step snapshot");
        (s.stage, s.done_columns, s.block)
    };
    assert_eq!(stage(&h), (Stage::Start, 0, (0, 80)));
    // Block size 128 covers the whole 80-column module: use 32 to see blocks.
    h.get_by_role_and_label(Role::SpinButton, "block size")
        .set_value_accesskit(32.0);
    h.step();
    h.get_by_label("Reset").click();
    h.step();
    step_until(&mut h, "the reset", &|a| !a.state.lab.stepping);
    assert_eq!(stage(&h), (Stage::Start, 0, (0, 32)));
    h.get_by_label("Next column").click();
    h.step();
    step_until(&mut h, "a column step", &|a| !a.state.lab.stepping);
    assert_eq!(stage(&h), (Stage::Column, 1, (0, 32)));
    h.step();
    h.get_by_label_contains("stage: in-block OBS update");
    h.get_by_label("Next block").click();
    h.step();
    step_until(&mut h, "a block step", &|a| !a.state.lab.stepping);
    assert_eq!(stage(&h), (Stage::BlockUpdate, 32, (32, 64)));
    h.step();
    h.get_by_label_contains("stage: cross-block lazy batch update");
    h.get_by_label("Run to end").click();
    h.step();
    step_until(&mut h, "the end of the sweep", &|a| !a.state.lab.stepping);
    let done = h.state().state.lab.step.clone().expect("snapshot");
    assert_eq!((done.stage, done.done_columns), (Stage::Done, 80));
    // The stepped GPTAQ solve (alpha 0.9, block 32) equals the compare page's one-shot solve.
    step_until(&mut h, "the re-solve at block size 32", &|a| {
        a.state.lab.solving.is_none() && !a.state.lab.outdated()
    });
    let oneshot = h.state().state.lab.study.clone().expect("study");
    assert_eq!(oneshot.config.block_size, 32);
    assert_eq!(done.final_metrics, Some(oneshot.gptaq.metrics));
    h.step();
    h.get_by_label_contains("stage: done");

    // Save the capture elsewhere and load it back: the same settings give the same study.
    let copy = dir.path().join("shared-lesson.safetensors");
    h.get_by_role_and_label(Role::TextInput, "or path:")
        .set_text_value_accesskit(&copy.display().to_string());
    h.step();
    h.get_by_label("Save capture").click();
    h.step();
    step_until(&mut h, "the saved capture", &|a| {
        a.state
            .messages
            .iter()
            .any(|m| m.text.contains("capture saved"))
    });
    assert!(copy.is_file());
    let id = h.state().state.lab.capture.as_ref().map(|c| c.id);
    h.get_by_label("Load capture").click();
    h.step();
    step_until(&mut h, "the reloaded study", &|a| {
        a.state.lab.capture.as_ref().map(|c| c.id) != id
            && a.state.lab.study.is_some()
            && a.state.lab.solving.is_none()
    });
    let back = h.state().state.lab.study.clone().expect("study");
    assert_eq!(back.gptaq.metrics, oneshot.gptaq.metrics);
    assert_eq!(back.gptq.metrics, oneshot.gptq.metrics);
    assert!(
        h.state().state.lab.step.is_none(),
        "a new capture resets the step mode"
    );
}

/// GPTQ and GPTAQ on the same prepared windows: both runs finish and both tables fill.
#[test]
fn side_by_side_demo_run_on_gpu() {
    let Some(probe) = gptaq_studio::gpu::test_context() else {
        return;
    };
    drop(probe);
    let mut h = live_demo();
    run_to_end(&mut h, 300, |s| {
        s.nsamples = 2;
        s.seqlen = 16;
        s.method = gptaq_studio::app::state::MethodChoice::SideBySide;
        s.kernel_times = true;
    });
    let session = h.state().state.session.clone().expect("session");
    assert_eq!(
        session.phase,
        gptaq_studio::app::state::Phase::Finished,
        "messages: {:?}",
        h.state().state.messages
    );
    let gptq = session.run(RunSlot::Gptq).expect("gptq run");
    let gptaq = session.run(RunSlot::Gptaq).expect("gptaq run");
    assert_eq!(gptq.modules.len(), gptq.layers * 7);
    assert_eq!(gptaq.modules.len(), gptaq.layers * 7);
    assert_eq!(gptq.method, "gptq");
    assert_eq!(gptaq.method, "gptaq");
    assert!(session.saved_report().is_some());
    // "Time GPU kernels": both reports carry the GPU times (lavapipe has timestamp queries), and
    // Results shows them per run.
    for run in [gptq, gptaq] {
        let rep = run.report.as_ref().expect("report");
        assert!(
            rep.kernel_times
                .iter()
                .any(|t| t.scope == "solve/blocks" && t.calls > 0),
            "{}: {:?}",
            run.method,
            rep.kernel_times
        );
    }
    h.get_by_label("Results").click();
    h.step();
    h.get_by_label("GPU time");
    h.get_by_label_contains("Slowest kernels (GPTQ");
    h.get_by_label_contains("Slowest kernels (GPTAQ");
}

/// The screenshots' run: tiny-llama-15m from `$GPTAQ_TEST_DATA`, calibrated on 8 × 128 C4
/// windows, W3 g128 with `method`, driven through the UI to the end of the run.
fn tiny_llama_run(method: gptaq_studio::app::state::MethodChoice) -> Harness<'static, StudioApp> {
    let Some(dir) = std::env::var_os("GPTAQ_TEST_DATA").map(std::path::PathBuf::from) else {
        panic!("set GPTAQ_TEST_DATA");
    };
    let mut h = live_harness(1600.0);
    h.step();
    let cmd = h
        .state_mut()
        .state
        .choose_model_dir(dir.join("tiny-llama-15m"));
    h.state_mut().send(cmd);
    h.state_mut()
        .state
        .choose_calib(dir.join("corpora/c4/c4_validation_2k.jsonl"));
    step_until(&mut h, "the model summary", &|a| {
        a.state.model_info().is_some()
    });
    run_to_end(&mut h, 3000, |s| {
        s.nsamples = 8;
        s.seqlen = 128;
        s.bits = 3;
        s.group_size = 128;
        s.method = method;
    });
    h
}

/// Renders the app after a real side-by-side GPTQ vs GPTAQ W3 g128 run on tiny-llama-15m and saves
/// it as `assets/screenshot.png` (README). Slow on lavapipe, so run on demand:
/// `GPTAQ_TEST_DATA=../shared/data cargo test --release --test app -- --ignored screenshot`.
#[test]
#[ignore = "regenerates the committed assets/screenshot.png (about 3 min on lavapipe); the same UI paths run in the other tests"]
fn screenshot_tiny_llama_side_by_side() {
    let mut h = tiny_llama_run(gptaq_studio::app::state::MethodChoice::SideBySide);
    h.get_by_label("Plots").click();
    h.run_steps(5);
    let img = h.render().expect("render");
    img.save(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/screenshot.png"
    ))
    .expect("save png");
}

/// Renders the layer lab on tiny-llama-15m layer 5 `mlp.down_proj` after a real GPTAQ W3 g128 run
/// (8 × 128 C4 windows) with α = 1, and saves it as `assets/lab.png` (README). Also checks the
/// issue's lesson on real data: the output error at α = 1 is below GPTQ's (α = 0). Slow on
/// lavapipe, so run on demand:
/// `GPTAQ_TEST_DATA=../shared/data cargo test --release --test app -- --ignored screenshot_lab`.
#[test]
#[ignore = "regenerates the committed assets/lab.png (several minutes on lavapipe)"]
fn screenshot_lab_tiny_llama_down_proj() {
    let mut h = tiny_llama_run(gptaq_studio::app::state::MethodChoice::Gptaq);
    h.get_by_label("Layer lab").click();
    h.step();
    {
        let lab = &mut h.state_mut().state.lab;
        lab.layer = 5;
        lab.module = ModuleKind::Down;
    }
    h.step();
    h.get_by_label("Capture").click();
    h.step();
    step_until(&mut h, "the lab study", &|a| {
        a.state.lab.study.is_some() && a.state.lab.solving.is_none()
    });
    // Drag α to 1: the worker re-solves GPTAQ (the sweep is cached per settings).
    h.state_mut().state.lab.settings.alpha = 1.0;
    h.step();
    step_until(&mut h, "the α = 1 study", &|a| {
        a.state.lab.solving.is_none() && a.state.lab.study.as_ref().is_some_and(|s| s.alpha == 1.0)
    });
    let s = h.state().state.lab.study.clone().expect("study");
    let (first, last) = (s.sweep[0].1.output_error, s.sweep[10].1.output_error);
    eprintln!(
        "layer 5 down_proj: output error α=0 {first:.6e}, α=1 {last:.6e}; GPTQ quant {:.6e} asym {:.6e}",
        s.gptq.metrics.quant_error, s.gptq.metrics.asym_error
    );
    assert!(
        last < first,
        "output error did not fall from α = 0 ({first}) to α = 1 ({last})"
    );
    h.run_steps(5);
    let img = h.render().expect("render");
    img.save(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/lab.png"))
        .expect("save png");
}

/// Results tab after a real demo run on the GPU: "Evaluate perplexity" on a pre-tokenized text
/// (the demo model has no tokenizer) fills the FP vs quantized table, and "Export checkpoint"
/// writes a GPTQ directory the export reader opens — no terminal involved (issue 8's "evaluate
/// and export"). The file dialogs are bypassed by setting the chosen paths in the state.
#[test]
fn demo_eval_and_export_from_the_results_tab() {
    let Some(_probe) = gptaq_studio::gpu::test_context() else {
        return;
    };
    drop(_probe);
    let dir = tempfile::tempdir().expect("tempdir");
    // 3 windows of the run's sequence length (16), ids inside the demo vocabulary (512).
    let ids: Vec<u8> = (0..48i64)
        .flat_map(|i| ((i * 37 + 11) % 512).to_le_bytes())
        .collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![3, 16], &ids)
        .expect("tensor");
    let text = dir.path().join("eval_ids.safetensors");
    safetensors::serialize_to_file([("input_ids", view)], None, &text).expect("write ids");
    let out = dir.path().join("export");

    let mut h = live_demo();
    run_to_end(&mut h, 300, |s| {
        s.nsamples = 2;
        s.seqlen = 16;
    });
    h.get_by_label("Results").click();
    h.step();
    {
        let st = &mut h.state_mut().state;
        st.eval_text = Some(text.clone());
        st.export_dir = Some(out.clone());
    }
    h.step();
    h.get_by_label("Evaluate perplexity").click();
    h.step();
    step_until(&mut h, "the perplexities", &|a| {
        !a.state.eval_rows.is_empty()
    });
    let rows = h.state().state.eval_rows.clone();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows[0].label.starts_with("FP (3 × 16)"), "{rows:?}");
    for r in &rows {
        assert!(r.perplexity.is_finite() && r.perplexity > 1.0, "{rows:?}");
    }
    h.step();
    h.get_by_label_contains("FP (3 × 16)");

    h.get_by_label("Export checkpoint").click();
    h.step();
    step_until(&mut h, "the export", &|a| {
        a.state
            .messages
            .iter()
            .any(|m| m.text.contains("checkpoint written to"))
    });
    assert!(out.join("quantize_config.json").is_file());
    assert!(out.join("model.safetensors").is_file());
    let model = gptaq_studio::export::GptqModel::open(&out).expect("the export reads back");
    assert_eq!(
        gptaq_studio::model::WeightSource::config(&model).num_layers,
        4
    );
}
