//! Every WGSL file in `shaders/` must parse, validate, and translate to SPIR-V (Vulkan), MSL
//! (Metal) and HLSL (DX12). This keeps the Metal and DX12 paths honest on a machine that has
//! neither GPU: a shader that only Vulkan accepts fails here, even if no test executes it.

use std::path::PathBuf;

use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};

fn shader_files() -> Vec<PathBuf> {
    wgsl_files("shaders")
}

/// The `.wgsl` files of the crate's directory `sub`, sorted.
fn wgsl_files(sub: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(sub);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wgsl"))
        .collect();
    files.sort();
    files
}

/// Capabilities a shader may use. Files named `*_coop.wgsl` (cooperative matrices) and `*_f16.wgsl`
/// are optional fast paths: they need only SPIR-V and MSL 2.3, not HLSL.
fn capabilities_for(name: &str) -> Capabilities {
    let mut caps = Capabilities::SUBGROUP | Capabilities::SHADER_FLOAT16;
    if name.ends_with("_coop.wgsl") {
        caps |= Capabilities::COOPERATIVE_MATRIX;
    }
    caps
}

#[test]
fn every_shader_translates_to_spirv_msl_hlsl() {
    let files = shader_files();
    assert!(!files.is_empty(), "no shaders found");
    let mut failures = Vec::new();
    for path in &files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let source =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let module = match naga::front::wgsl::parse_str(&source) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{name}: parse: {}", e.emit_to_string(&source)));
                continue;
            }
        };
        let mut validator = Validator::new(ValidationFlags::all(), capabilities_for(&name));
        let info = match validator.validate(&module) {
            Ok(i) => i,
            Err(e) => {
                failures.push(format!("{name}: validate: {}", e.emit_to_string(&source)));
                continue;
            }
        };
        // Backends need concrete override values: each override's default, and for the staged
        // tensor-core kernel every operand layout ops::CoopOp specialises it to (A_T, B_T), in
        // the grid's own order and grouped as ops::coop_raster sets it by default (RASTER).
        let sets: Vec<(String, naga::back::PipelineConstants)> = if name == "gemm_staged_coop.wgsl"
        {
            [(0.0, 1.0), (1.0, 0.0), (0.0, 0.0)]
                .into_iter()
                .flat_map(|(ta, tb)| [(ta, tb, 0.0), (ta, tb, 8.0)])
                .map(|(ta, tb, raster)| {
                    (
                        format!("{name} (A_T {ta}, B_T {tb}, RASTER {raster})"),
                        [
                            ("A_T".to_string(), ta),
                            ("B_T".to_string(), tb),
                            ("RASTER".to_string(), raster),
                        ]
                        .into_iter()
                        .collect(),
                    )
                })
                .collect()
        } else {
            vec![(name.clone(), Default::default())]
        };
        for (label, constants) in &sets {
            translate(label, &name, &module, &info, constants, &mut failures);
        }
    }
    assert!(
        failures.is_empty(),
        "shader translation failures:\n{}",
        failures.join("\n")
    );
    eprintln!("{} shaders translated to SPIR-V, MSL and HLSL", files.len());
}

/// Specialises `module` with `constants` and translates it to SPIR-V, MSL (2.3 for the
/// cooperative-matrix files, 2.1 otherwise) and, except for those, HLSL; failures go to `failures`
/// under `label`.
fn translate(
    label: &str,
    name: &str,
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    constants: &naga::back::PipelineConstants,
    failures: &mut Vec<String>,
) {
    let (module, info) =
        match naga::back::pipeline_constants::process_overrides(module, info, None, constants) {
            Ok(x) => x,
            Err(e) => {
                failures.push(format!("{label}: overrides: {e}"));
                return;
            }
        };
    if let Err(e) = spv::write_vec(&module, &info, &spv::Options::default(), None) {
        failures.push(format!("{label}: SPIR-V: {e}"));
    }
    let is_coop = name.ends_with("_coop.wgsl");
    let msl_opts = msl::Options {
        lang_version: if is_coop { (2, 3) } else { (2, 1) },
        ..Default::default()
    };
    if let Err(e) = msl::write_string(&module, &info, &msl_opts, &msl::PipelineOptions::default()) {
        failures.push(format!("{label}: MSL: {e}"));
    }
    if !is_coop {
        let hlsl_opts = hlsl::Options {
            shader_model: hlsl::ShaderModel::V6_2,
            ..Default::default()
        };
        let pipeline = hlsl::PipelineOptions::default();
        let mut out = String::new();
        let mut w = hlsl::Writer::new(&mut out, &hlsl_opts, &pipeline);
        if let Err(e) = w.write(&module, &info, None) {
            failures.push(format!("{label}: HLSL: {e}"));
        }
        hlsl_per_entry_point(label, &module, &info, constants, &hlsl_opts, failures);
    }
}

/// HLSL as wgpu's DX12 backend writes it: one entry point at a time, the module first reduced to
/// what that entry point reaches (naga's `process_overrides` with the entry point). A file may
/// declare two views of one binding (`gemm.wgsl`'s `a` and `a4`) as long as no entry point uses
/// both (naga's validator rejects an entry point that does); the HLSL DX12 compiles must then
/// hold one resource per register, which this checks on the text.
fn hlsl_per_entry_point(
    label: &str,
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    constants: &naga::back::PipelineConstants,
    opts: &hlsl::Options,
    failures: &mut Vec<String>,
) {
    for ep in &module.entry_points {
        let reduced = naga::back::pipeline_constants::process_overrides(
            module,
            info,
            Some((ep.stage, ep.name.as_str())),
            constants,
        );
        let (m, i) = match reduced {
            Ok(x) => x,
            Err(e) => {
                failures.push(format!("{label} {}: overrides: {e}", ep.name));
                continue;
            }
        };
        let pipeline = hlsl::PipelineOptions {
            entry_point: Some((ep.stage, ep.name.clone())),
        };
        let mut out = String::new();
        let mut w = hlsl::Writer::new(&mut out, opts, &pipeline);
        if let Err(e) = w.write(&m, &i, None) {
            failures.push(format!("{label} {}: HLSL: {e}", ep.name));
            continue;
        }
        let mut seen = std::collections::HashSet::new();
        for reg in out
            .split("register(")
            .skip(1)
            .filter_map(|r| r.split(')').next())
        {
            if !seen.insert(reg.to_string()) {
                failures.push(format!(
                    "{label} {}: two resources at HLSL register({reg})",
                    ep.name
                ));
            }
        }
    }
}

/// The kernel lab's variant files (`benches/lab/`, loaded at run time by `benches/kernels.rs`)
/// must still parse and validate, and name at least one entry to try, so that a device call does
/// not spend its minutes on a file that rotted — also after a change to the shipped shader a
/// `// lab-extends: NAME` file is appended to (`shaders/NAME.wgsl`, as the lab prepends it). They
/// are not translated: only the lab runs them.
#[test]
fn lab_variants_parse_and_validate() {
    let files = wgsl_files("benches/lab");
    assert!(!files.is_empty(), "no lab variants in benches/lab");
    for path in &files {
        let name = path.display();
        let mut source = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Some(base) = source
            .lines()
            .find_map(|l| l.strip_prefix("// lab-extends:"))
            .map(|b| b.trim().to_string())
        {
            let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("shaders")
                .join(format!("{base}.wgsl"));
            let base_src = std::fs::read_to_string(&shipped)
                .unwrap_or_else(|e| panic!("{name}: lab-extends {}: {e}", shipped.display()));
            source = format!("{base_src}\n{source}");
        }
        assert!(
            source
                .lines()
                .any(|l| l.starts_with("// lab:") || l.starts_with("// lab32:")),
            "{name}: no `// lab:` or `// lab32:` line"
        );
        let module = naga::front::wgsl::parse_str(&source)
            .unwrap_or_else(|e| panic!("{name}: parse: {}", e.emit_to_string(&source)));
        Validator::new(ValidationFlags::all(), Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}: validate: {}", e.emit_to_string(&source)));
        // Every lab line names an entry point of the module and only overrides it declares.
        for line in source.lines() {
            let Some(spec) = line
                .strip_prefix("// lab32:")
                .or_else(|| line.strip_prefix("// lab:"))
            else {
                continue;
            };
            let mut fields = spec.split_whitespace();
            let entry = fields.next().unwrap_or_default();
            assert!(
                module.entry_points.iter().any(|e| e.name == entry),
                "{name}: `{line}`: no entry point {entry}"
            );
            for kv in fields.filter(|f| f.contains('=')) {
                let key = kv.split('=').next().unwrap_or_default();
                assert!(
                    module
                        .overrides
                        .iter()
                        .any(|(_, o)| o.name.as_deref() == Some(key)),
                    "{name}: `{line}`: no override {key}"
                );
            }
        }
    }
}

/// The workgroup memory that `entry` of `file` (under `shaders/`) declares, in bytes: every
/// workgroup variable its call tree uses, each named with its size.
fn workgroup_bytes(file: &str, entry: &str) -> (u32, Vec<String>) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("shaders")
        .join(file);
    let source =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let module = naga::front::wgsl::parse_str(&source)
        .unwrap_or_else(|e| panic!("{file}: parse: {}", e.emit_to_string(&source)));
    let info = Validator::new(ValidationFlags::all(), capabilities_for(file))
        .validate(&module)
        .unwrap_or_else(|e| panic!("{file}: validate: {}", e.emit_to_string(&source)));
    let index = module
        .entry_points
        .iter()
        .position(|e| e.name == entry)
        .unwrap_or_else(|| panic!("{file}: no entry point {entry}"));
    let mut layouter = naga::proc::Layouter::default();
    layouter
        .update(module.to_ctx())
        .unwrap_or_else(|e| panic!("{file}: layout: {e}"));
    let uses = info.get_entry_point(index);
    let mut total = 0;
    let mut names = Vec::new();
    for (handle, var) in module.global_variables.iter() {
        if var.space == naga::AddressSpace::WorkGroup && !uses[handle].is_empty() {
            let size = layouter[var.ty].size;
            total += size;
            names.push(format!("{} ({size} B)", var.name.as_deref().unwrap_or("?")));
        }
    }
    (total, names)
}

/// `sweep_lanes` runs 32 invocations per workgroup, eight workgroups per multiprocessor at 4096
/// rows on an H100, and its steps are bound by latency: what its workgroups declare is reserved
/// whether or not a launch uses it. With a 10 KiB staging array for its fused steps (then
/// opt-in), its unfused launches (GPTQ's, always) slowed from 125 to 182 µs per 4096-row block
/// (BENCHMARKS.md session 36); without it, 114–115 µs (session 37). This keeps the entry point's
/// workgroup memory within 4 KiB (it declares 3,104 B: the step's broadcast, the group min / max
/// and the fused steps' row broadcast).
#[test]
fn sweep_lanes_workgroup_memory_stays_small() {
    let (bytes, vars) = workgroup_bytes("quant_sweep.wgsl", "sweep_lanes");
    assert!(
        bytes <= 4096,
        "quant_sweep.wgsl sweep_lanes declares {bytes} bytes of workgroup memory (limit 4096): {}",
        vars.join(", ")
    );
    assert!(
        bytes > 0,
        "quant_sweep.wgsl sweep_lanes: no workgroup memory found (the usage query is broken)"
    );
}
