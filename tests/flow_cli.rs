//! `pipeline flow init/encode/decode` end to end: invertibility through files, a reference-named
//! checkpoint loaded from shapes alone, seeded sampling, and errors that name file and key.

mod common;
use common::*;

use std::path::Path;
use tch::{Device, Kind, Tensor};

fn write(path: &Path, tensors: &[(&str, &Tensor)]) {
    let named: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.to_string(), t.shallow_clone()))
        .collect();
    Tensor::write_safetensors(&named, path).unwrap();
}

fn read(path: &Path, name: &str) -> Tensor {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .1
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn encode_then_decode_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("flow.safetensors");
    run_ok(
        pipeline()
            .args([
                "flow", "init", "--preset", "tiny", "--seed", "3", "--output",
            ])
            .arg(&ckpt),
    );
    assert!(dir.path().join("flow.model.toml").exists());
    tch::manual_seed(0);
    let x = Tensor::rand([5, 3, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let y = Tensor::from_slice(&[0i64, 3, -1, 9, 2]);
    let input = dir.path().join("x.safetensors");
    write(&input, &[("x", &x), ("y", &y)]);
    let encoded = dir.path().join("z.safetensors");
    run_ok(
        pipeline()
            .args([
                "flow",
                "encode",
                "--device",
                "cpu",
                "--batch",
                "2",
                "--checkpoint",
            ])
            .arg(&ckpt)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&encoded),
    );
    let z = read(&encoded, "z");
    assert_eq!(z.size(), [5, 16, 48]);
    assert_eq!(read(&encoded, "nll").size(), [5]);
    assert_eq!(read(&encoded, "logdet").size(), [5]);
    assert!(read(&encoded, "block1").equal(&z));
    // decode reads z and y from the encoder's output plus the labels
    let zin = dir.path().join("zin.safetensors");
    write(&zin, &[("z", &z), ("y", &y)]);
    let decoded = dir.path().join("back.safetensors");
    run_ok(
        pipeline()
            .args(["flow", "decode", "--device", "cpu", "--checkpoint"])
            .arg(&ckpt)
            .arg("--input")
            .arg(&zin)
            .arg("--output")
            .arg(&decoded),
    );
    let back = read(&decoded, "x");
    assert!(max_diff(&back, &x) < 1e-4, "{}", max_diff(&back, &x));
}

/// The config of tests/python/tarflow_ref.py's stand-in for a published TARFlow: 8-px images, patch 2,
/// learned positions, GELU, 4 classes.
fn reference_config(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("c.json");
    std::fs::write(
        &config,
        r#"{"img_size":8,"in_channels":3,"patch_size":2,"channels":64,"num_blocks":2,"layers_per_block":2,"num_classes":4,
            "head_dim":64,"pos_embed":true,"rope":false,"rope_base":10000.0,"mlp":"gelu","swiglu_gate":"silu","mlp_ratio":4.0,"noise_std":0.05}"#,
    )
    .unwrap();
    config
}

#[test]
fn reference_named_checkpoint_loads_from_shapes() {
    let dir = tempfile::tempdir().unwrap();
    // The PyTorch module's own state_dict stands in for a converted public checkpoint.
    let config = reference_config(dir.path());
    tch::manual_seed(1);
    let x = Tensor::rand([2, 3, 8, 8], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let y = Tensor::from_slice(&[1i64, -1]);
    let input = dir.path().join("x.safetensors");
    write(&input, &[("x", &x), ("y", &y)]);
    let (weights, reference) = (
        dir.path().join("ref.safetensors"),
        dir.path().join("ref_z.safetensors"),
    );
    run_ok(
        python()
            .arg(repo_root().join("tests/python/tarflow_ref.py"))
            .arg("export")
            .args([&config, &weights, &input, &reference]),
    );
    let encoded = dir.path().join("z.safetensors");
    run_ok(
        pipeline()
            .args([
                "flow",
                "encode",
                "--device",
                "cpu",
                "--image-size",
                "8",
                "--patch-size",
                "2",
                "--in-channels",
                "3",
                "--checkpoint",
            ])
            .arg(&weights)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&encoded),
    );
    assert!(max_diff(&read(&encoded, "z"), &read(&reference, "z")) < 1e-4);
    assert!(max_diff(&read(&encoded, "logdet"), &read(&reference, "logdet")) < 1e-5);
    // Wrong geometry is named, not a crash.
    let out = pipeline()
        .args([
            "flow",
            "encode",
            "--device",
            "cpu",
            "--image-size",
            "8",
            "--patch-size",
            "4",
            "--in-channels",
            "3",
            "--checkpoint",
        ])
        .arg(&weights)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&encoded)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("ref.safetensors") && stderr.contains("proj_in"),
        "{stderr}"
    );
}

/// An ml-tarflow `.pth` (`torch.save(model.state_dict())`, the published parameter names) imports into
/// the project's checkpoint, and `flow encode` on it agrees with the PyTorch module's own forward.
#[test]
fn an_ml_tarflow_pth_imports_and_encodes_like_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let config = reference_config(dir.path());
    tch::manual_seed(3);
    let x = Tensor::rand([3, 3, 8, 8], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let y = Tensor::from_slice(&[1i64, -1, 3]);
    let input = dir.path().join("x.safetensors");
    write(&input, &[("x", &x), ("y", &y)]);
    // ml-tarflow's own naming: {dataset}_model_{patch}_{channels}_{blocks}_{layers}_{σ}.pth
    let pth = dir.path().join("tiny_model_2_64_2_2_0.07.pth");
    let reference = dir.path().join("ref_z.safetensors");
    run_ok(
        python()
            .arg(repo_root().join("tests/python/tarflow_ref.py"))
            .arg("export")
            .args([&config, &pth, &input, &reference]),
    );
    let out = dir.path().join("imported");
    let import = |extra: &[&str]| {
        pipeline()
            .args(["flow", "import", "--from", "ml-tarflow"])
            .arg(&pth)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = import(&["--image-size", "8"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("2 blocks × 2 layers, width 64, patch 2, 4 classes, σ 0.07"),
        "{stdout}"
    );
    // The sidecar carries σ from the file name and ml-tarflow's crop.
    let side = std::fs::read_to_string(out.join("model.model.toml")).unwrap();
    assert!(
        side.contains("noise_std = 0.07") && side.contains("crop = \"resize_center_crop\""),
        "{side}"
    );
    let encoded = dir.path().join("z.safetensors");
    run_ok(
        pipeline()
            .args(["flow", "encode", "--device", "cpu", "--checkpoint"])
            .arg(out.join("model.safetensors"))
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&encoded),
    );
    assert!(max_diff(&read(&encoded, "z"), &read(&reference, "z")) < 1e-4);
    assert!(max_diff(&read(&encoded, "logdet"), &read(&reference, "logdet")) < 1e-5);
    // The wrong image size is named; a damaged file is an error naming it, never a crash.
    let o = import(&["--image-size", "16"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("attn_mask") && stderr.contains("[64, 64]"),
        "{stderr}"
    );
    // The reader on damaged archives, in sequence in one process: never a panic, every error names
    // the file; protocol 2 and 4 pickles of the same state_dict give the same tensors.
    let original = model::pth::read_state_dict(&pth).unwrap();
    let mutants = dir.path().join("mutants");
    std::fs::create_dir_all(&mutants).unwrap();
    let made = run_ok(
        python()
            .arg(repo_root().join("tests/python/mutate_pth.py"))
            .arg(&pth)
            .arg(&mutants)
            .args(["400", "11"]),
    );
    let made: Vec<serde_json::Value> = serde_json::from_slice(&made.stdout).unwrap();
    let (mut ok, mut refused) = (0, 0);
    for m in &made {
        let file = std::path::PathBuf::from(m["file"].as_str().unwrap());
        match model::pth::read_state_dict(&file) {
            Ok(tensors) => {
                ok += 1;
                if m["intact"] == true {
                    assert_eq!(tensors.len(), original.len(), "{m}");
                    for ((n, a), (n0, b)) in tensors.iter().zip(&original) {
                        assert!(n == n0 && a.equal(b), "{m}: {n}");
                    }
                }
            }
            Err(e) => {
                refused += 1;
                assert!(m["intact"] != true, "{m}: {e}");
                assert!(e.to_string().contains(m["file"].as_str().unwrap()), "{e}");
            }
        }
    }
    eprintln!("pth mutations: {ok} read, {refused} refused");
    assert!(refused > 200 && ok > 2, "{ok} read, {refused} refused");
    let bytes = std::fs::read(&pth).unwrap();
    for cut in [0, 100, bytes.len() / 2, bytes.len() - 10] {
        std::fs::write(&pth, &bytes[..cut]).unwrap();
        let o = import(&["--image-size", "8"]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "cut {cut}: {stderr}");
        assert!(
            stderr.contains("tiny_model_2_64_2_2_0.07.pth"),
            "cut {cut}: {stderr}"
        );
    }
}

#[test]
fn seeded_sampling_and_input_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("flow.safetensors");
    run_ok(
        pipeline()
            .args(["flow", "init", "--preset", "tiny-latent", "--output"])
            .arg(&ckpt),
    );
    let mut outs = vec![];
    for name in ["a", "b"] {
        let out = dir.path().join(format!("{name}.safetensors"));
        run_ok(
            pipeline()
                .args([
                    "flow",
                    "decode",
                    "--device",
                    "cpu",
                    "--samples",
                    "3",
                    "--seed",
                    "7",
                    "--class",
                    "2",
                    "--guidance",
                    "1.5",
                    "--annealed",
                    "--denoise",
                    "--checkpoint",
                ])
                .arg(&ckpt)
                .arg("--output")
                .arg(&out),
        );
        outs.push(read(&out, "x"));
    }
    assert_eq!(outs[0].size(), [3, 4, 8, 8]);
    assert!(outs[0].equal(&outs[1]));
    // A file without `x` is named with the key.
    let bad = dir.path().join("bad.safetensors");
    write(
        &bad,
        &[(
            "images",
            &Tensor::zeros([1, 4, 8, 8], (Kind::Float, Device::Cpu)),
        )],
    );
    let out = pipeline()
        .args(["flow", "encode", "--device", "cpu", "--checkpoint"])
        .arg(&ckpt)
        .arg("--input")
        .arg(&bad)
        .arg("--output")
        .arg(dir.path().join("o.safetensors"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("bad.safetensors")
            && stderr.contains("`x` is missing"),
        "{stderr}"
    );
    // A mis-shaped x is named too.
    write(
        &bad,
        &[(
            "x",
            &Tensor::zeros([1, 3, 8, 8], (Kind::Float, Device::Cpu)),
        )],
    );
    let out = pipeline()
        .args(["flow", "encode", "--device", "cpu", "--checkpoint"])
        .arg(&ckpt)
        .arg("--input")
        .arg(&bad)
        .arg("--output")
        .arg(dir.path().join("o.safetensors"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("bad.safetensors")
            && stderr.contains("(B, 4, 8, 8)"),
        "{stderr}"
    );
}

#[test]
fn flow_and_bench_flags_are_documented() {
    for (args, flags) in [
        (
            &["flow", "encode", "--help"][..],
            &[
                "--checkpoint",
                "--config",
                "--image-size",
                "--patch-size",
                "--in-channels",
                "--input",
                "--output",
                "--device",
                "--batch",
            ][..],
        ),
        (
            &["flow", "decode", "--help"],
            &[
                "--input",
                "--samples",
                "--seed",
                "--class",
                "--guidance",
                "--annealed",
                "--attn-temp",
                "--denoise",
                "--denoise-lr-scale",
                "--max-redraws",
            ],
        ),
        (
            &["bench", "flow", "--help"],
            &[
                "--preset",
                "--batch",
                "--steps",
                "--sample-batch",
                "--guidance",
                "--threads",
                "--device",
                "--bf16",
            ],
        ),
    ] {
        let out = run_ok(pipeline().args(args));
        let help = String::from_utf8_lossy(&out.stdout);
        // Each listed flag present, and every option described by more than its own name (the old
        // check accepted any line longer than the flag, which `--input <INPUT>` alone is).
        assert_flags_documented(&args.join(" "), &help, flags);
    }
}

#[test]
fn bench_flow_reports_both_sides() {
    let out = run_ok(pipeline().current_dir(repo_root()).args([
        "bench",
        "flow",
        "--preset",
        "tiny",
        "--batch",
        "2",
        "--sample-batch",
        "2",
        "--steps",
        "1",
        "--threads",
        "1",
        "--ab-routing",
        "3",
    ]));
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    // The in-process A/B of the routing: three interleaved pairs of steps and of sampling passes.
    let ab = &report["rust"]["routing_ab"];
    assert_eq!(ab["pairs"].as_u64(), Some(3), "{report}");
    for part in ["step", "sample"] {
        for key in ["measured_s", "mkl_only_s", "ratio"] {
            let v = ab[part][key].as_f64().unwrap();
            assert!(v.is_finite() && v > 0.0, "{part}.{key}: {report}");
        }
    }
    for side in ["rust", "pytorch"] {
        assert!(report[side]["step_s"].as_f64().unwrap() > 0.0, "{report}");
        assert!(
            report[side]["sample_tokens_per_s"].as_f64().unwrap() > 0.0,
            "{report}"
        );
        // One warm-up pass, then the default three timed ones; the phases of separately timed steps.
        assert_eq!(
            report[side]["sample_s_runs"].as_array().unwrap().len(),
            3,
            "{report}"
        );
        for phase in ["forward_s", "backward_s", "optimizer_s"] {
            assert!(
                report[side]["phases"][phase].as_f64().unwrap() > 0.0,
                "{report}"
            );
        }
    }
    assert!(report["step_time_ratio"].as_f64().unwrap() > 0.0);
    let out = pipeline()
        .args(["bench", "flow", "--preset", "nope"])
        .output()
        .unwrap();
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("unknown preset `nope`")
    );
}

/// `flow init --preset tiny-latent` as DIR/flow.safetensors, made to depend on its tokens: a fresh
/// flow starts as the identity (zero output projections), which any solver inverts in one pass.
fn dependent_flow(dir: &Path) -> std::path::PathBuf {
    let ckpt = dir.join("flow.safetensors");
    run_ok(
        pipeline()
            .args(["flow", "init", "--preset", "tiny-latent", "--output"])
            .arg(&ckpt),
    );
    tch::manual_seed(3);
    let tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(&ckpt)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let t = if n.ends_with("proj_out.weight") {
                t.randn_like() * 0.05
            } else {
                t
            };
            (n, t)
        })
        .collect();
    Tensor::write_safetensors(&tensors, &ckpt).unwrap();
    ckpt
}

/// `flow decode --solver jacobi` gives the sequential sampler's samples (exact mode) in fewer dependent
/// passes here, says so, and honours a cap.
#[test]
fn jacobi_decoding_matches_the_sequential_sampler() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dependent_flow(dir.path());
    let decode = |name: &str, solver: &[&str]| {
        let out = dir.path().join(format!("{name}.safetensors"));
        let run = pipeline()
            .args(["flow", "decode", "--device", "cpu", "--samples", "3"])
            .args([
                "--seed",
                "7",
                "--class",
                "2",
                "--guidance",
                "1.5",
                "--annealed",
            ])
            .args(solver)
            .arg("--checkpoint")
            .arg(&ckpt)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
        assert!(run.status.success(), "{stderr}");
        let depth: i64 = stderr
            .split("sequential depth ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("no depth in: {stderr}"));
        (read(&out, "x"), depth, stderr)
    };
    let (seq, seq_depth, _) = decode("seq", &[]);
    let (exact, exact_depth, said) = decode("jacobi", &["--solver", "jacobi"]);
    assert!(said.contains("solver jacobi"), "{said}");
    let err = max_diff(&seq, &exact);
    let scale = seq.abs().max().double_value(&[]);
    assert!(
        err < 1e-5 * scale.max(1.0),
        "exact Jacobi off by {err} (values up to {scale})"
    );
    assert!(exact_depth <= seq_depth, "{exact_depth} > {seq_depth}");
    let (capped, capped_depth, said) =
        decode("capped", &["--solver", "jacobi", "--jacobi-max-iters", "1"]);
    let per_block = said
        .split("last first: [")
        .nth(1)
        .and_then(|r| r.split(']').next())
        .unwrap_or_else(|| panic!("no per-block passes in: {said}"));
    let blocks = per_block.split(", ").filter(|p| *p == "1").count() as i64;
    assert!(
        blocks > 0 && capped_depth == blocks,
        "one pass per block: {said}"
    );
    assert!(
        max_diff(&seq, &capped) > 1e-4,
        "one pass cannot solve every token"
    );
}

/// `bench solvers` times each solver against the sequential sampler on the same noise and reports the
/// depth, the deviation and the reconstruction error: exact Jacobi within float noise, sequential at
/// N − 1 passes per block, the default `auto` plan as a row, encode-then-decode back to the images;
/// `--cuda-graphs` on the CPU is refused by name.
#[test]
fn bench_solvers_reports_depth_and_deviation() {
    let out = run_ok(pipeline().args([
        "bench",
        "solvers",
        "--random",
        "tiny-latent",
        "--samples",
        "2",
        "--repeats",
        "1",
        "--tol",
        "0,1e-3",
        "--guidance",
        "1.0",
    ]));
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON line on stdout");
    let rows = report["solvers"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert!(rows[3]["solver"]
        .as_str()
        .unwrap()
        .contains("selective default"));
    let n = 16; // tiny-latent: 8×8 latent, patch 2
    let blocks = report["config"]["num_blocks"].as_i64().unwrap();
    assert_eq!(rows[0]["depth"].as_i64(), Some(blocks * (n - 1)));
    assert!(rows[1]["max_abs_diff_vs_sequential"].as_f64().unwrap() < 1e-4);
    for row in &rows[1..] {
        let depth = row["depth"].as_i64().unwrap();
        assert!(depth >= blocks && depth <= blocks * (n - 1), "{row}");
        assert!(row["time_vs_sequential"].as_f64().unwrap() > 0.0, "{row}");
    }
    // Exact solvers give the images back from their own noise; a tolerance leaves a bounded error.
    for row in &rows[..2] {
        assert!(row["reconstruction_mse"].as_f64().unwrap() < 1e-10, "{row}");
    }
    for row in &rows[2..] {
        let mse = row["reconstruction_mse"].as_f64().unwrap();
        assert!(mse.is_finite() && mse < 1e-3, "{row}");
    }
    let refused = pipeline()
        .args([
            "bench",
            "solvers",
            "--random",
            "tiny-latent",
            "--cuda-graphs",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("--cuda-graphs needs a CUDA device"), "{said}");
}

/// `flow calibrate` measures each block on data and writes a schedule beside the checkpoint whose every
/// choice stayed within the target; `flow decode --solver auto` then uses it (and says so), with fewer
/// dependent passes than the sequential solver, and inverts the data's own noise back to the data. Without
/// a schedule `auto` falls back to the default and names the file it looked for.
#[test]
fn calibrated_schedule_is_written_beside_the_checkpoint_and_used_by_auto() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dependent_flow(dir.path());
    let path = |name: &str| dir.path().join(name);
    let flow = |args: &[&str], files: &[(&str, &Path)]| {
        let mut cmd = pipeline();
        cmd.arg("flow")
            .args(args)
            .args(["--device", "cpu", "--checkpoint"])
            .arg(&ckpt);
        for (flag, file) in files {
            cmd.arg(flag).arg(file);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "flow {args:?}: {stderr}");
        stderr
    };
    // "Training data": the flow's own samples, and their noise.
    flow(
        &["decode", "--samples", "12", "--seed", "1"],
        &[("--output", &path("data.safetensors"))],
    );
    flow(
        &["encode"],
        &[
            ("--input", &path("data.safetensors")),
            ("--output", &path("z.safetensors")),
        ],
    );
    let said = flow(
        &["decode", "--solver", "auto"],
        &[
            ("--input", &path("z.safetensors")),
            ("--output", &path("default.safetensors")),
        ],
    );
    assert!(
        said.contains("default (") && said.contains("flow.solver.json not found"),
        "{said}"
    );

    let said = flow(
        &["calibrate", "--target", "1e-3"],
        &[("--input", &path("data.safetensors"))],
    );
    assert!(said.contains("flow.solver.json"), "{said}");
    let schedule: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path("flow.solver.json")).unwrap()).unwrap();
    let blocks = schedule["plan"].as_array().unwrap().len() as i64;
    let n = 16; // tiny-latent: 8×8 latent, patch 2
    let mut depth = 0;
    for c in schedule["calibration"].as_array().unwrap() {
        assert!(c["max_abs_error"].as_f64().unwrap() <= 1e-3, "{c}");
        depth += c["passes"].as_i64().unwrap();
    }
    assert!(blocks > 0 && depth < blocks * (n - 1), "{schedule}");

    let said = flow(
        &["decode", "--solver", "auto"],
        &[
            ("--input", &path("z.safetensors")),
            ("--output", &path("auto.safetensors")),
        ],
    );
    assert!(
        said.contains("per-block schedule") && said.contains("flow.solver.json)"),
        "{said}"
    );
    assert!(
        said.contains(&format!("sequential depth {depth} ")),
        "{said}"
    );
    let (data, back) = (
        read(&path("data.safetensors"), "x"),
        read(&path("auto.safetensors"), "x"),
    );
    let scale = data.abs().max().double_value(&[]);
    let err = max_diff(&data, &back);
    assert!(
        err < 1e-2 * scale.max(1.0),
        "auto schedule off by {err} (values up to {scale})"
    );
}

/// `--solver auto --schedule FILE` refuses a file that is no schedule, naming it, and one too large to
/// be one before reading it.
#[test]
fn a_bad_schedule_file_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dependent_flow(dir.path());
    let decode = |schedule: &Path| {
        let out = pipeline()
            .args([
                "flow",
                "decode",
                "--device",
                "cpu",
                "--samples",
                "1",
                "--solver",
                "auto",
            ])
            .arg("--schedule")
            .arg(schedule)
            .arg("--checkpoint")
            .arg(&ckpt)
            .arg("--output")
            .arg(dir.path().join("x.safetensors"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let garbage = dir.path().join("garbage.solver.json");
    std::fs::write(&garbage, b"{\"plan\": 3").unwrap();
    let said = decode(&garbage);
    assert!(
        said.contains("garbage.solver.json: not a solver schedule"),
        "{said}"
    );
    let huge = dir.path().join("huge.solver.json");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(17 << 20)
        .unwrap();
    let said = decode(&huge);
    assert!(said.contains("is not a solver schedule (at most"), "{said}");
}
