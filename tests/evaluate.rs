//! `pipeline sample`, `classify` and `bpd` end to end on tiny checkpoints the tests make: sampling is
//! the same for every batch size and run and its outputs load with numpy and Pillow; classification
//! recovers the classes of a hand-set model whose answer is known; bits/dim equals the value computed by
//! hand from `flow encode` on the same inputs.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn check_samples(dirs: &[&Path]) -> serde_json::Value {
    let out = run_ok(
        python()
            .arg(repo_root().join("tests/python/check_samples.py"))
            .args(dirs),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sample(ckpt: &Path, out: &Path, extra: &[&str]) -> String {
    let o = run_ok(
        pipeline()
            .args(["sample", "--device", "cpu", "--checkpoint"])
            .arg(ckpt)
            .arg("--out")
            .arg(out)
            .args(extra),
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn sampling_is_the_same_for_any_batch_size_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = perturbed_checkpoint(dir.path(), "tiny", 0.02);
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    // This perturbed random flow is unstable enough that a sample comes out non-finite: the redraw is
    // counted, and it takes the same fresh noise whatever the batching.
    let redraws = |stdout: String| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("redrawn for NaN/Inf: ").map(str::to_string))
            .expect("redraw line")
    };
    let redrawn = redraws(sample(
        &ckpt,
        &a,
        &["--num", "10", "--seed", "5", "--batch", "3"],
    ));
    assert_eq!(
        redraws(sample(
            &ckpt,
            &b,
            &["--num", "10", "--seed", "5", "--batch", "10"]
        )),
        redrawn
    );
    assert_eq!(
        redraws(sample(
            &ckpt,
            &c,
            &["--num", "10", "--seed", "5", "--batch", "3"]
        )),
        redrawn
    );
    let report = check_samples(&[&a, &b, &c]);
    assert_eq!(report["files"], serde_json::json!(["arr_0", "arr_1"]));
    assert_eq!(report["shape"], serde_json::json!([10, 16, 16, 3]));
    assert_eq!(report["dtype"], "uint8");
    assert_eq!(report["labels_dtype"], "int64");
    // Same batching twice: identical. Other batching: identical up to a value or two on a rounding
    // boundary (matrix kernels block a batch of 3 and of 10 differently; this flow saturates, which
    // magnifies the last bits).
    assert_eq!(report["differ"][1], serde_json::json!([0, 0]), "{report}");
    let (n_diff, max_diff) = (
        report["differ"][0][0].as_i64().unwrap(),
        report["differ"][0][1].as_i64().unwrap(),
    );
    assert!(n_diff <= 3 && max_diff <= 1, "{report}");
    // ⌈√10⌉ = 4 columns, 3 rows of 16 px with 2 px padding around every cell.
    assert_eq!(
        report["grid"],
        serde_json::json!([4 * 16 + 5 * 2, 3 * 16 + 4 * 2])
    );
    assert_eq!(report["grid_first_cell_is_sample_0"], true);
    assert_eq!(report["png_matches_npz"], true);
    assert_eq!(report["distinct_samples"], 10);
    assert!(report["std"].as_f64().unwrap() > 5.0, "{report}");
    let labels: Vec<i64> = serde_json::from_value(report["labels"].clone()).unwrap();
    assert!(labels.iter().all(|&l| (0..10).contains(&l)), "{labels:?}");

    // Another seed differs; guided, annealed sampling with explicit classes is batch-invariant too.
    let (d, e, f) = (
        dir.path().join("d"),
        dir.path().join("e"),
        dir.path().join("f"),
    );
    sample(&ckpt, &d, &["--num", "10", "--seed", "6", "--batch", "10"]);
    assert_eq!(
        check_samples(&[&a, &d])["same_as"],
        serde_json::json!([false])
    );
    // Guidance doubles the batch (conditional and unconditional rows), so matmul kernels block it
    // differently; at most a value or two may land on the other side of a rounding boundary.
    let ckpt = perturbed_checkpoint(dir.path(), "tiny", 0.005);
    let guided = [
        "--num",
        "5",
        "--seed",
        "1",
        "--cfg",
        "2",
        "--annealed",
        "--attn-temp",
        "1.5",
        "--classes",
        "3,7",
        "--grid-cols",
        "5",
    ];
    sample(&ckpt, &e, &[&guided[..], &["--batch", "2"]].concat());
    sample(&ckpt, &f, &[&guided[..], &["--batch", "5"]].concat());
    let report = check_samples(&[&e, &f]);
    let (n_diff, max_diff) = (
        report["differ"][0][0].as_i64().unwrap(),
        report["differ"][0][1].as_i64().unwrap(),
    );
    assert!(n_diff <= 3 && max_diff <= 1, "{report}");
    assert_eq!(report["labels"], serde_json::json!([3, 7, 3, 7, 3]));
    assert_eq!(
        report["grid"],
        serde_json::json!([5 * 16 + 6 * 2, 16 + 2 * 2])
    );
}

#[test]
fn latent_samples_are_decoded_by_the_vae() {
    let dir = tempfile::tempdir().unwrap();
    let vae = dir.path().join("vae");
    run_ok(
        python()
            .arg(repo_root().join("tests/python/make_tiny_vae.py"))
            .arg(&vae),
    );
    let ckpt = perturbed_checkpoint(dir.path(), "tiny-latent", 0.02);
    let out = dir.path().join("latent");
    sample(
        &ckpt,
        &out,
        &["--num", "4", "--batch", "3", "--vae", vae.to_str().unwrap()],
    );
    // 8×8 latents, downsample factor 2 → 16×16 images.
    let report = check_samples(&[&out]);
    assert_eq!(report["shape"], serde_json::json!([4, 16, 16, 3]));
    // Without a VAE a latent checkpoint is refused with a message naming the flag.
    let o = pipeline()
        .args(["sample", "--device", "cpu", "--num", "1", "--checkpoint"])
        .arg(&ckpt)
        .arg("--out")
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--vae"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A tiny flow whose class-conditional density is Gaussian with a mean shift set by the class (the
/// construction of the model crate's classification test): attention and MLP outputs, proj_in and
/// pos_embed are zero, so every hidden state is the class embedding E_k = the unit block of features
/// 6k..6k+6; proj_out maps it to a shift of token feature k only. An image whose every token has feature
/// k raised is then most likely under class k.
fn hand_set_classifier(dir: &Path) -> PathBuf {
    let init = dir.join("cls-init.safetensors");
    run_ok(
        pipeline()
            .args([
                "flow", "init", "--preset", "tiny", "--seed", "4", "--output",
            ])
            .arg(&init),
    );
    let token_dim = 48;
    let named: Vec<(String, Tensor)> = Tensor::read_safetensors(&init)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let zeroed = [
                "attention.proj.weight",
                "attention.proj.bias",
                "mlp.main.2.weight",
                "mlp.main.2.bias",
                "proj_in.weight",
                "proj_in.bias",
                "pos_embed",
                "proj_out.bias",
            ];
            let t = if zeroed.iter().any(|z| name.ends_with(z)) {
                t.zeros_like()
            } else if name.ends_with("class_embed") {
                let v = t.zeros_like();
                for k in 0..10 {
                    let _ = v.get(k).narrow(1, 6 * k, 6).fill_(1.0);
                }
                v
            } else if name.ends_with("proj_out.weight") {
                let v = t.zeros_like();
                for k in 0..10 {
                    let _ = v.get(token_dim + k).narrow(0, 6 * k, 6).fill_(1.0 / 6.0);
                }
                v
            } else {
                t
            };
            (name, t)
        })
        .collect();
    let ckpt = dir.join("cls.safetensors");
    Tensor::write_safetensors(&named, &ckpt).unwrap();
    std::fs::copy(
        init.with_extension("model.toml"),
        ckpt.with_extension("model.toml"),
    )
    .unwrap();
    ckpt
}

/// A precompute-style cache (manifest + one `.fbc` shard with `label` and `image`) of 16×16 images:
/// sample i has class i % 10 and its token feature (i % 10) raised in every 4×4 patch.
fn class_cache(dir: &Path, n: usize) -> PathBuf {
    use stages::cache::{DType, FieldSpec, Manifest, ManifestShard, ShardWriter, SourceShard};
    let cache = dir.join("cache").join("0123456789abcdef");
    std::fs::create_dir_all(&cache).unwrap();
    let fields = vec![
        FieldSpec::new("label", DType::I64, &[]),
        FieldSpec::new("image", DType::U8, &[16, 16, 3]),
    ];
    let mut writer = ShardWriter::create(&cache.join("eval-000000.fbc"), fields, 8, 3).unwrap();
    tch::manual_seed(11);
    for i in 0..n {
        let k = (i % 10) as i64;
        // Mid-grey with noise, then feature k of each patch (channel k / 16, row (k % 16) / 4, column k % 4).
        let image = (Tensor::randn([3, 16, 16], (Kind::Float, Device::Cpu)) * 10.0 + 128.0)
            .clamp(0.0, 255.0);
        let (ch, row, col) = (k / 16, (k % 16) / 4, k % 4);
        let plane = image.get(ch);
        for py in 0..4 {
            for px in 0..4 {
                let _ = plane.get(py * 4 + row).get(px * 4 + col).fill_(250.0);
            }
        }
        let hwc = image.permute([1, 2, 0]).contiguous().to_kind(Kind::Uint8);
        let bytes = Vec::<u8>::try_from(hwc.flatten(0, -1)).unwrap();
        writer
            .push(&format!("{i:06}"), &[&k.to_le_bytes(), &bytes])
            .unwrap();
    }
    let summary = writer.finish(serde_json::json!({})).unwrap();
    let source = SourceShard {
        name: "eval-000000.tar".into(),
        size: 0,
        content_hash: String::new(),
        remote: None,
    };
    let entry = ManifestShard {
        file: "eval-000000.fbc".into(),
        source,
        summary,
    };
    Manifest::record(&cache, &serde_json::json!({"test": true}), vec![entry]).unwrap();
    cache
}

#[test]
fn classify_recovers_the_classes_of_a_hand_set_model() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = hand_set_classifier(dir.path());
    let cache = class_cache(dir.path(), 30);
    let out = dir.path().join("cls");
    let o = run_ok(
        pipeline()
            .args([
                "classify",
                "--device",
                "cpu",
                "--batch",
                "7",
                "--checkpoint",
            ])
            .arg(&ckpt)
            .arg("--data")
            .arg(&cache)
            .arg("--out")
            .arg(&out),
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("top-1 accuracy: 100.00%"), "{stdout}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["samples"], 30);
    assert_eq!(summary["top1"], 1.0);
    assert_eq!(summary["top5"], 1.0);
    let csv = std::fs::read_to_string(out.join("predictions.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 30);
    for row in &rows {
        let cols: Vec<&str> = row.split(',').collect();
        assert_eq!(cols[1], cols[2], "{row}");
        assert_eq!(cols[4].split(';').next(), Some(cols[2]), "{row}");
    }
    assert!(
        rows[3].starts_with("eval-000000.tar/000003,3,3,1,"),
        "{}",
        rows[3]
    );
    let confusion = std::fs::read_to_string(out.join("confusion.csv")).unwrap();
    assert_eq!(confusion.lines().nth(3), Some("2,0,0,3,0,0,0,0,0,0,0"));

    // A run directory as `pipeline train` lays it out: EMA weights by default, `--weights model` for the
    // raw ones (here the random init, which does not classify these images).
    let run = dir.path().join("run");
    let step = run.join("checkpoints/step-00000002");
    std::fs::create_dir_all(&step).unwrap();
    std::fs::write(
        run.join("config.toml"),
        "[data]\nshards = \"unused\"\n\n[train]\nlatent = false\n",
    )
    .unwrap();
    std::fs::write(run.join("checkpoints/latest"), "step-00000002\n").unwrap();
    for (from, to) in [
        (ckpt.clone(), "ema"),
        (dir.path().join("cls-init.safetensors"), "model"),
    ] {
        std::fs::copy(&from, step.join(format!("{to}.safetensors"))).unwrap();
        std::fs::copy(
            from.with_extension("model.toml"),
            step.join(format!("{to}.model.toml")),
        )
        .unwrap();
    }
    let classify_run = |extra: &[&str]| {
        let o = run_ok(
            pipeline()
                .args(["classify", "--device", "cpu", "--run"])
                .arg(&run)
                .arg("--data")
                .arg(&cache)
                .arg("--out")
                .arg(dir.path().join("run-cls"))
                .args(extra),
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let ema = classify_run(&[]);
    assert!(
        ema.contains("top-1 accuracy: 100.00%") && ema.contains("step-00000002/ema.safetensors"),
        "{ema}"
    );
    let raw = classify_run(&["--weights", "model"]);
    assert!(
        !raw.contains("top-1 accuracy: 100.00%") && raw.contains("step-00000002/model.safetensors"),
        "{raw}"
    );
    let o = pipeline()
        .args(["classify", "--device", "cpu", "--run"])
        .arg(dir.path())
        .arg("--data")
        .arg(&cache)
        .arg("--out")
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("config.toml"), "{err}");

    // --limit stops early.
    let o = run_ok(
        pipeline()
            .args([
                "classify",
                "--device",
                "cpu",
                "--limit",
                "4",
                "--checkpoint",
            ])
            .arg(&ckpt)
            .arg("--data")
            .arg(&cache)
            .arg("--out")
            .arg(dir.path().join("few")),
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("classified 4 images"));
}

#[test]
fn bpd_equals_the_value_by_hand_from_flow_encode() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = perturbed_checkpoint(dir.path(), "tiny", 0.02);
    demo_data(&dir.path().join("data"), 10, 2, 1, 3, &[]);
    let shards = dir.path().join("data/demo-000000.tar");
    let inputs = dir.path().join("inputs.safetensors");
    let o = run_ok(
        pipeline()
            .args([
                "bpd",
                "--device",
                "cpu",
                "--batch",
                "6",
                "--seed",
                "9",
                "--checkpoint",
            ])
            .arg(&ckpt)
            .arg("--data")
            .arg(&shards)
            .arg("--save-inputs")
            .arg(&inputs),
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["metric"], "bits_per_dim");
    assert_eq!(report["n"], 20);
    // Unconditional by default, as ml-tarflow reports bits/dim, and the header says so.
    assert_eq!(report["conditional"], false);
    assert!(
        stdout.starts_with("scoring: unconditional (default"),
        "{stdout}"
    );
    let saved: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&inputs)
        .unwrap()
        .into_iter()
        .collect();
    let x = &saved["x"];
    // Uniformly dequantised: (x + 1)·128 = integer level + u with u ∈ [0, 1) spread over the interval.
    let scaled = (x.to_kind(Kind::Double) + 1.0) * 128.0;
    let frac = &scaled - scaled.floor();
    assert!(scaled.min().double_value(&[]) >= 0.0 && scaled.max().double_value(&[]) < 256.0);
    let frac_sd = frac.std(true).double_value(&[]);
    assert!((frac_sd - (1.0f64 / 12.0).sqrt()).abs() < 0.02, "{frac_sd}");
    // By hand: flow encode on the same inputs gives the NLL per dimension; bits/dim = (nll + ln 128) / ln 2.
    let encoded = dir.path().join("encoded.safetensors");
    run_ok(
        pipeline()
            .args(["flow", "encode", "--device", "cpu", "--checkpoint"])
            .arg(&ckpt)
            .arg("--input")
            .arg(&inputs)
            .arg("--output")
            .arg(&encoded),
    );
    let enc: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&encoded)
        .unwrap()
        .into_iter()
        .collect();
    let half_log_2pi = 0.5 * (2.0 * std::f64::consts::PI).ln();
    let z = enc["z"].to_kind(Kind::Double);
    let nll = z.square().mean_dim(&[1i64, 2][..], false, Kind::Double) * 0.5 + half_log_2pi
        - enc["logdet"].to_kind(Kind::Double);
    let bpd = (nll + 128f64.ln()) / 2f64.ln();
    let mean = bpd.mean(Kind::Double).double_value(&[]);
    let half_width = 1.959_963_984_540_054 * bpd.std(true).double_value(&[]) / 20f64.sqrt();
    let (got, got_ci) = (
        report["mean"].as_f64().unwrap(),
        report["ci95"].as_f64().unwrap(),
    );
    assert!((got - mean).abs() < 1e-4, "bpd {got} vs by hand {mean}");
    assert!(
        (got_ci - half_width).abs() < 1e-4,
        "ci {got_ci} vs by hand {half_width}"
    );
    assert!(got > 0.5 && got < 30.0, "{got}");
    // Another dequantisation seed changes the inputs but hardly the number.
    let o = run_ok(
        pipeline()
            .args(["bpd", "--device", "cpu", "--seed", "10", "--checkpoint"])
            .arg(&ckpt)
            .arg("--data")
            .arg(&shards),
    );
    let other: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    let other = other["mean"].as_f64().unwrap();
    assert!(
        other != got && (other - got).abs() < 0.1,
        "{other} vs {got}"
    );
    // Off a terminal the progress is a log line every PIPELINE_PROGRESS_SECS (here every batch).
    let o = run_ok(
        pipeline()
            .args(["bpd", "--device", "cpu", "--batch", "8", "--checkpoint"])
            .arg(&ckpt)
            .arg("--data")
            .arg(&shards)
            .env("RUST_LOG", "info")
            .env("PIPELINE_PROGRESS_SECS", "0"),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bpd: 8 (") && err.contains("bpd: 20 done in"),
        "{err}"
    );
    // With the labels: another number, reported as class-conditional.
    let o = run_ok(
        pipeline()
            .args([
                "bpd",
                "--device",
                "cpu",
                "--seed",
                "9",
                "--conditional",
                "--checkpoint",
            ])
            .arg(&ckpt)
            .arg("--data")
            .arg(&shards),
    );
    let cond: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(cond["conditional"], true);
    assert_ne!(cond["mean"].as_f64().unwrap(), got);
}

/// Latent models read shards through the VAE encoder (crop at latent size × downsample factor, scaled
/// posterior mean); the same images from a precompute cache (vae_dtype f32) must give the same bpd and
/// the same predictions, so both paths feed the flow identical inputs.
#[test]
fn latent_bpd_and_classify_from_shards_match_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let vae = root.join("vae");
    run_ok(
        python()
            .arg(repo_root().join("tests/python/make_tiny_vae.py"))
            .arg(&vae),
    );
    let ckpt = perturbed_checkpoint(root, "tiny-latent", 0.02);
    demo_data(&root.join("data"), 10, 2, 1, 3, &[]);
    let shards = root.join("data/demo-000000.tar");
    let config = root.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[data]\nshards = \"{}\"\nimage_size = 16\n\n[precompute]\nvae = \"{}\"\nvae_dtype = \"f32\"\nbatch_size = 4\n",
            shards.display(),
            vae.display()
        ),
    )
    .unwrap();
    let cache = root.join("cache");
    run_ok(
        pipeline()
            .args(["precompute", "--config"])
            .arg(&config)
            .arg("--cache")
            .arg(&cache),
    );
    let fingerprint = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    let evaluate = |data: &Path, tag: &str| {
        let o = run_ok(
            pipeline()
                .args(["bpd", "--device", "cpu", "--batch", "7", "--checkpoint"])
                .arg(&ckpt)
                .arg("--vae")
                .arg(&vae)
                .arg("--data")
                .arg(data),
        );
        let stdout = String::from_utf8_lossy(&o.stdout);
        let report: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(report["metric"], "nll_nats_per_latent_dim");
        assert_eq!(report["n"], 20);
        let out = root.join(format!("classify-{tag}"));
        run_ok(
            pipeline()
                .args([
                    "classify",
                    "--device",
                    "cpu",
                    "--batch",
                    "7",
                    "--checkpoint",
                ])
                .arg(&ckpt)
                .arg("--vae")
                .arg(&vae)
                .arg("--data")
                .arg(data)
                .arg("--out")
                .arg(&out),
        );
        let csv = std::fs::read_to_string(out.join("predictions.csv")).unwrap();
        // id,label,predicted,... in reading order: keep all but the score column.
        let mut rows: Vec<String> = csv
            .lines()
            .skip(1)
            .map(|l| l.rsplit_once(',').unwrap().0.to_string())
            .collect();
        rows.sort();
        (report["mean"].as_f64().unwrap(), rows)
    };
    let (from_shards, rows_shards) = evaluate(&shards, "shards");
    let (from_cache, rows_cache) = evaluate(&fingerprint, "cache");
    assert!(
        (from_shards - from_cache).abs() < 1e-4 * from_shards.abs().max(1.0),
        "nll from shards {from_shards} vs cache {from_cache}"
    );
    assert_eq!(rows_shards.len(), 20);
    assert_eq!(rows_shards, rows_cache);
}

/// Outputs never replace inputs: `sample --out` may not be the checkpoint or a directory holding other
/// files; the same command may rerun into its own directory (its old images go, so a smaller run leaves
/// none of a larger one's behind); another command needs `--overwrite`; `flow encode --output` may not
/// be its `--input`, also through a symlink. Refusals leave every file as it was.
#[test]
fn outputs_never_replace_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ckpt = perturbed_checkpoint(root, "tiny", 0.02);
    let weights = std::fs::read(&ckpt).unwrap();
    let try_sample = |out: &Path, extra: &[&str]| {
        pipeline()
            .args([
                "sample",
                "--device",
                "cpu",
                "--num",
                "2",
                "--no-png",
                "--checkpoint",
            ])
            .arg(&ckpt)
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = |o: std::process::Output, says: &str| {
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(says), "{err}");
    };
    refused(try_sample(&ckpt, &[]), "is the input --checkpoint");
    assert_eq!(std::fs::read(&ckpt).unwrap(), weights);
    // The directory the checkpoint lives in holds files `sample` did not write.
    refused(
        try_sample(root, &["--overwrite"]),
        "holds files no earlier run",
    );
    let out = root.join("samples");
    sample(&ckpt, &out, &["--num", "4", "--seed", "1"]);
    sample(&ckpt, &out, &["--num", "4", "--seed", "1"]);
    refused(try_sample(&out, &["--seed", "2"]), "--overwrite");
    assert!(
        out.join("images/000003.png").exists(),
        "a refusal removes nothing"
    );
    let o = try_sample(&out, &["--seed", "2", "--overwrite"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !out.join("images").exists(),
        "the earlier run's images were removed"
    );
    assert!(out.join("samples.npz").exists());

    // flow encode: --output is --input, by name and through a link.
    let x = Tensor::zeros([1, 3, 64, 64], (Kind::Float, Device::Cpu));
    let input = root.join("x.safetensors");
    Tensor::write_safetensors(&[("x", &x)], &input).unwrap();
    let link = root.join("x-link.safetensors");
    std::os::unix::fs::symlink(&input, &link).unwrap();
    let before = std::fs::read(&input).unwrap();
    for output in [&input, &link] {
        let o = pipeline()
            .args(["flow", "encode", "--device", "cpu", "--checkpoint"])
            .arg(&ckpt)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(output)
            .output()
            .unwrap();
        refused(o, "is the input --input");
    }
    assert_eq!(std::fs::read(&input).unwrap(), before);
}
