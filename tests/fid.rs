//! FID and Inception Score against pytorch-fid 0.3.0: a random-init FID Inception written by
//! tests/python/make_inception_references.py, converted by tools/convert_inception.py and compared on
//! the same images (pool3 and logits); the Fréchet distance against `calculate_frechet_distance`; the
//! Inception Score against the standard formula; and `pipeline fid-stats` / `pipeline fid` end to end on
//! demo shards, PNG directories and `.npz` files.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use model::feature_stats::{FeatureStats, Statistics};
use model::inception::Inception;
use model::weights;
use tch::{Device, Kind, Tensor};

/// The reference script and the converter run once per test binary; every test reads their output.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("inception_references");
        let _ = std::fs::remove_dir_all(&dir);
        let script = common::repo_root().join("tests/python/make_inception_references.py");
        common::run_ok(common::python().arg(script).arg(&dir));
        let out = common::run_ok(
            common::python()
                .arg(common::repo_root().join("tools/convert_inception.py"))
                .arg(dir.join("inception.pth"))
                .arg("--out")
                .arg(dir.join("inception.safetensors")),
        );
        // Random weights are not the published file, and the converter says so.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("not comparable"), "{stderr}");
        dir
    })
}

fn weights_file() -> PathBuf {
    fixtures().join("inception.safetensors")
}

fn references() -> common::References {
    common::References::load(&fixtures().join("references.safetensors"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn converted_weights_load_strictly() {
    let loaded = Inception::from_file(&weights_file(), Device::Cpu).unwrap();
    // Every tensor of pytorch-fid's state dict but the num_batches_tracked counters.
    assert_eq!(loaded.parameters, 23_885_392);

    let missing = fixtures().join("absent.safetensors");
    let msg = Inception::from_file(&missing, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("absent.safetensors") && msg.contains("convert_inception.py"),
        "{msg}"
    );

    // A file with one tensor renamed: both names in the error.
    let mut tensors = weights::read_safetensors(&weights_file()).unwrap();
    let t = tensors.remove("Mixed_6c.branch7x7_2.conv.weight").unwrap();
    tensors.insert("Mixed_6c.branch7x7_2.weight".into(), t);
    let renamed = fixtures().join("renamed.safetensors");
    let named: Vec<(String, Tensor)> = tensors.into_iter().collect();
    weights::save_atomic(&named, &renamed).unwrap();
    let msg = Inception::from_file(&renamed, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("missing tensors [Mixed_6c.branch7x7_2.conv.weight]")
            && msg.contains("unused tensors [Mixed_6c.branch7x7_2.weight]"),
        "{msg}"
    );
}

#[test]
fn converter_rejects_other_inception_weights() {
    let dir = tempfile::tempdir().unwrap();
    let pth = dir.path().join("imagenet.pth");
    // torchvision's ImageNet Inception has a 1000-way classifier.
    common::run_ok(common::python().arg("-c").arg(format!(
        "import torch; torch.save({{'fc.weight': torch.zeros(1000, 2048)}}, {:?})",
        pth.display().to_string()
    )));
    let out = common::python()
        .arg(common::repo_root().join("tools/convert_inception.py"))
        .arg(&pth)
        .arg("--out")
        .arg(dir.path().join("x.safetensors"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("(1008, 2048)"), "{stderr}");
    assert!(!dir.path().join("x.safetensors").exists());
}

#[test]
fn features_and_logits_match_pytorch_fid() {
    let refs = references();
    let inception = Inception::from_file(&weights_file(), Device::Cpu)
        .unwrap()
        .model;
    // The same port in float64: BN folding and kernel order change nothing but rounding.
    let mut loaded_f64 = Inception::from_file(&weights_file(), Device::Cpu).unwrap();
    loaded_f64.vs.double();
    let inception_f64 = loaded_f64.model;
    // 64 px (upsampled), 299 px (no resize) and a non-square 40×90 image.
    for name in ["images_64", "images_299", "images_odd"] {
        let images = refs.get(name);
        let f64_ours = inception_f64.features(images).unwrap().pool3;
        assert_eq!(f64_ours.kind(), Kind::Double);
        let f64_ref = refs.get(&format!("{name}_pool3_f64"));
        let port_diff = max_abs_diff(&f64_ours, f64_ref);
        assert!(
            port_diff <= 1e-9,
            "{name} pool3 in float64: max|Δ| = {port_diff:e}"
        );

        // Float32: within 1e-4 of pytorch-fid's float32 output, unless pytorch-fid's own float32
        // drift from float64 is larger on this random network (deep random layers amplify rounding
        // to ~1e-4 even in the reference); then no further from it than twice that drift.
        let own_drift = max_abs_diff(refs.get(&format!("{name}_pool3")), f64_ref);
        let bound = 1e-4_f64.max(2.0 * own_drift);
        let f = inception.features(images).unwrap();
        for (what, ours) in [
            ("pool3", &f.pool3),
            ("logits", &f.logits),
            ("logits_unbiased", &f.logits_unbiased),
        ] {
            let reference = refs.get(&format!("{name}_{what}"));
            let diff = max_abs_diff(ours, reference);
            let scale = reference.abs().max().double_value(&[]);
            let bound = if what == "pool3" {
                bound
            } else {
                bound * scale.max(1.0)
            };
            assert!(
                diff <= bound,
                "{name} {what}: max|Δ| = {diff:e} > {bound:e} (values up to {scale}, pytorch-fid's \
                 own float32 drift {own_drift:e})"
            );
            // The features are O(1), so the agreement is not a comparison of near-zeros.
            assert!(scale > 0.5, "{name} {what}: values up to {scale}");
        }
    }
}

#[test]
fn frechet_distance_matches_pytorch_fid() {
    let refs = references();
    for case in ["full", "singular"] {
        let key = |k: &str| format!("fd_{case}_{k}");
        let mut own = Vec::new();
        for set in ["a", "b"] {
            let features = refs.get(&key(set));
            let mut stats = FeatureStats::new(Device::Cpu);
            // Uneven batches: the sums must not depend on how the set is cut.
            let n = features.size()[0];
            let mut start = 0;
            for len in [1, 63, 64].iter().cycle() {
                if start >= n {
                    break;
                }
                let len = (*len).min(n - start);
                stats
                    .add_raw(&features.narrow(0, start, len), None)
                    .unwrap();
                start += len;
            }
            let s = stats.statistics().unwrap();
            let mu_err = max_abs_diff(&s.mu, refs.get(&key(&format!("mu_{set}"))));
            let sigma_err = max_abs_diff(&s.sigma, refs.get(&key(&format!("sigma_{set}"))));
            assert!(
                mu_err < 1e-10 && sigma_err < 1e-10,
                "{case} {set}: mean error {mu_err:e}, covariance error {sigma_err:e} against numpy"
            );
            own.push(s);
        }
        let expected = refs.scalar(&key("value"));
        let ours = own[0].frechet_distance(&own[1]).unwrap();
        let relative = (ours - expected).abs() / expected.abs();
        assert!(
            relative < 1e-6,
            "{case}: FID {ours} vs pytorch-fid {expected} (relative {relative:e})"
        );
        // From numpy's statistics directly.
        let from_numpy = |s: &str| {
            Statistics::new(
                refs.get(&key(&format!("mu_{s}"))),
                refs.get(&key(&format!("sigma_{s}"))),
            )
            .unwrap()
        };
        let direct = from_numpy("a").frechet_distance(&from_numpy("b")).unwrap();
        assert!(
            (direct - expected).abs() / expected.abs() < 1e-6,
            "{case}: {direct} vs {expected}"
        );
        let zero = from_numpy("a").frechet_distance(&from_numpy("a")).unwrap();
        assert!(zero.abs() < 1e-8 * expected, "{case}: FID to itself {zero}");
    }
}

#[test]
fn inception_score_matches_the_standard_formula() {
    let refs = references();
    let logits = refs.get("is_logits");
    let n = logits.size()[0];
    let mut stats = FeatureStats::with_inception_score(n as usize, Device::Cpu);
    let features = Tensor::zeros([n, 4], (Kind::Float, Device::Cpu));
    // Batches of 5 against splits of 2–3 images: batches straddle split boundaries.
    for start in (0..n).step_by(5) {
        let len = 5.min(n - start);
        stats
            .add_raw(
                &features.narrow(0, start, len),
                Some(&logits.narrow(0, start, len)),
            )
            .unwrap();
    }
    let score = stats.inception_score().unwrap();
    assert_eq!(score.splits, 10);
    let (mean, std) = (refs.scalar("is_mean"), refs.scalar("is_std"));
    assert!(
        (score.mean - mean).abs() < 1e-9 * mean && (score.std - std).abs() < 1e-9 * mean,
        "IS {} ± {} vs {mean} ± {std}",
        score.mean,
        score.std
    );
    assert!(
        score.mean > 1.5,
        "the test logits are meant to be informative"
    );
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn fid_cmd(samples: &Path, reference: &Path, out: &Path) -> std::process::Command {
    fid_cmd_with(samples, reference, out, &weights_file())
}

fn fid_cmd_with(
    samples: &Path,
    reference: &Path,
    out: &Path,
    weights: &Path,
) -> std::process::Command {
    fid_cmd_as("fid", samples, reference, out, weights)
}

fn fid_cmd_as(
    command: &str,
    samples: &Path,
    reference: &Path,
    out: &Path,
    weights: &Path,
) -> std::process::Command {
    let mut cmd = common::pipeline();
    cmd.arg(command)
        .arg("--samples")
        .arg(samples)
        .arg("--ref")
        .arg(reference)
        .arg("--weights")
        .arg(weights)
        .args(["--device", "cpu", "--batch", "5", "--out"])
        .arg(out);
    cmd
}

fn fid_stats_cmd(shards: &Path, out: &Path) -> std::process::Command {
    let mut cmd = common::pipeline();
    cmd.arg("fid-stats")
        .arg("--shards")
        .arg(shards)
        .arg("--out")
        .arg(out)
        .arg("--weights")
        .arg(weights_file())
        .args(["--size", "64", "--device", "cpu", "--batch", "4"]);
    cmd
}

fn fails_with(cmd: &mut std::process::Command, needles: &[&str]) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "`{needle}` not in: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn fid_stats_and_fid_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    common::demo_data(&root.join("data"), 3, 4, 1, 0, &[]);
    common::demo_data(&root.join("other"), 3, 4, 1, 1, &[]);
    let shard = root.join("data/demo-000000.tar");
    let inputs = root.join("inputs");
    common::run_ok(
        common::python()
            .arg(common::repo_root().join("tests/python/fid_cli_inputs.py"))
            .arg(&inputs)
            .arg(&shard)
            .arg("64")
            .arg(fixtures().join("inception.pth")),
    );

    // Reference statistics of the shard's crops, against pytorch-fid's of the same crops.
    let reference = root.join("ref.npz");
    // Off a terminal, progress is a log line every PIPELINE_PROGRESS_SECS (here every batch).
    let progress = |cmd: &mut std::process::Command| {
        cmd.env("RUST_LOG", "info")
            .env("PIPELINE_PROGRESS_SECS", "0");
    };
    let mut cmd = fid_stats_cmd(&shard, &reference);
    progress(&mut cmd);
    let out = common::run_ok(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("12 images"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("fid-stats: 12 done in"), "{stderr}");
    let check = common::run_ok(common::python().arg("-c").arg(format!(
        "import json, numpy as np\n\
         a, b, c = np.load({:?}), np.load({:?}), np.load({:?})\n\
         d = lambda x, y: float(np.abs(x - y).max())\n\
         print(json.dumps({{'files': sorted(a.files),\n\
           'shapes': {{k: [list(a[k].shape), str(a[k].dtype)] for k in a.files}},\n\
           'mu_diff': d(a['mu'], b['mu']), 'sigma_diff': d(a['sigma'], b['sigma']),\n\
           'sigma_scale': float(np.abs(b['sigma']).max()),\n\
           'acts_diff': float(np.abs(a['acts'][:, None] - c['acts'][None]).max(2).min(1).max()),\n\
           'acts_scale': float(np.abs(c['acts']).max()),\n\
           'mu_s_diff': d(a['mu_s'], c['mu_s']), 'sigma_s_diff': d(a['sigma_s'], c['sigma_s']),\n\
           'sigma_s_scale': float(np.abs(c['sigma_s']).max())}}))",
        reference.display().to_string(),
        inputs.join("pytorch_fid_stats.npz").display().to_string(),
        inputs.join("pytorch_fid_acts.npz").display().to_string(),
    )));
    let check: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(
        check["files"],
        serde_json::json!(["acts", "mu", "mu_s", "sigma", "sigma_s"])
    );
    assert_eq!(
        check["shapes"],
        serde_json::json!({
            "mu": [[2048], "float64"],
            "sigma": [[2048, 2048], "float64"],
            "mu_s": [[2023], "float64"],
            "sigma_s": [[2023, 2023], "float64"],
            "acts": [[12, 2048], "float32"],
        })
    );
    let value = |k: &str| check[k].as_f64().unwrap();
    assert!(value("mu_diff") < 1e-4, "{check}");
    // σ holds products of features (entries up to ~1e2 here): float32 features agree to ~1e-5
    // relative, so the bound scales with the largest entry.
    let sigma_scale = value("sigma_scale");
    assert!(
        value("sigma_diff") < 1e-4 * sigma_scale.max(1.0) * 0.1,
        "{check}"
    );
    assert!(sigma_scale > 1e-3, "{check}");
    // `acts` holds the stream's order (fid-stats reads shuffled shards); each row is one of
    // pytorch-fid's.
    assert!(
        value("acts_diff") < 1e-4 * value("acts_scale").max(1.0),
        "{check}"
    );
    // The spatial statistics against pytorch-fid's Mixed_6d 1×1 branch (its first 7 channels,
    // NHWC-flattened), hooked in tests/python/fid_cli_inputs.py: the sFID tensor is the one ADM's
    // evaluator takes from the TF graph, in its order.
    let sigma_s_scale = value("sigma_s_scale");
    assert!(sigma_s_scale > 1e-3, "{check}");
    assert!(
        value("mu_s_diff") < 1e-4 * sigma_s_scale.sqrt().max(1.0),
        "{check}"
    );
    assert!(
        value("sigma_s_diff") < 1e-5 * sigma_s_scale.max(1.0),
        "{check}"
    );

    // The same crops as PNGs against our statistics, and as a compressed .npz against pytorch-fid's
    // compressed statistics file: both ≈ 0, with the same Inception Score (same images, same order).
    let png_json = root.join("png.json");
    let mut cmd = fid_cmd(&inputs.join("pngs"), &reference, &png_json);
    progress(&mut cmd);
    let out = common::run_ok(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fid: 5/12") && stderr.contains("fid: 12 done in"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in [
        "FID: ",
        "sFID: ",
        "Inception Score: ",
        "Precision: ",
        "KID: ",
    ] {
        assert!(stdout.contains(line), "`{line}` not in: {stdout}");
    }
    assert!(!stdout.contains("skipped"), "{stdout}");
    // pytorch-fid's statistics file (mu and sigma only) still gives FID and IS, through the
    // `evaluate` alias; the metrics it cannot give are null, each with the reason.
    let npz_json = root.join("npz.json");
    let out = common::run_ok(&mut fid_cmd_as(
        "evaluate",
        &inputs.join("samples.npz"),
        &inputs.join("pytorch_fid_stats.npz"),
        &npz_json,
        &weights_file(),
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("sFID: skipped")
            && stdout.contains("note: precision, recall and KID skipped"),
        "{stdout}"
    );
    // ADM's reference batch layout: arr_0 images with mu, sigma, mu_s, sigma_s as published (here
    // pytorch-fid's statistics of the same crops); the activations come from arr_0.
    let adm_json = root.join("adm.json");
    let out = common::run_ok(&mut fid_cmd(
        &inputs.join("pngs"),
        &inputs.join("adm_ref.npz"),
        &adm_json,
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("reference activations: 12 images of `arr_0`"),
        "{stdout}"
    );
    let (png, npz, adm) = (
        read_json(&png_json),
        read_json(&npz_json),
        read_json(&adm_json),
    );
    let num = |s: &serde_json::Value, key: &str| -> f64 {
        s[key]
            .as_f64()
            .unwrap_or_else(|| panic!("`{key}` is not a number: {s}"))
    };
    for scores in [&png, &npz, &adm] {
        for key in ["fid", "inception_score", "inception_score_std"] {
            assert!(num(scores, key).is_finite(), "{scores}");
        }
        assert_eq!(scores["samples"], 12);
        assert_eq!(scores["inception_score_splits"], 10);
        assert!(num(scores, "fid").abs() < 1e-3, "{scores}");
        assert!(num(scores, "inception_score") >= 1.0, "{scores}");
    }
    // The same images as the reference: sFID ≈ 0 (also against pytorch-fid's spatial statistics),
    // and every sample is in the reference manifold and the other way round.
    for scores in [&png, &adm] {
        for key in ["sfid", "precision", "recall", "kid", "kid_std"] {
            assert!(num(scores, key).is_finite(), "{key}: {scores}");
        }
        assert!(num(scores, "sfid").abs() < 1e-3, "{scores}");
        assert_eq!(num(scores, "precision"), 1.0, "{scores}");
        assert_eq!(num(scores, "recall"), 1.0, "{scores}");
        assert_eq!(scores["pr_k"], 3);
        assert_eq!(scores["kid_subset_size"], 12);
        assert_eq!(scores["reference_features"], 12);
        assert_eq!(scores["skipped"], serde_json::json!([]));
    }
    for key in ["sfid", "precision", "recall", "kid", "kid_std"] {
        assert!(npz[key].is_null(), "{key}: {npz}");
    }
    let skipped = npz["skipped"].to_string();
    assert!(
        skipped.contains("sFID skipped") && skipped.contains("no `mu_s`/`sigma_s`"),
        "{skipped}"
    );
    assert!(
        skipped.contains("precision, recall and KID skipped") && skipped.contains("`acts`"),
        "{skipped}"
    );
    let is = |s: &serde_json::Value| num(s, "inception_score");
    assert!((is(&png) - is(&npz)).abs() < 1e-9, "{png} vs {npz}");

    // Other images: a clearly positive distance, and precision and recall as the numpy transcription
    // of ADM's ManifoldEstimator computes them from the two activation sets.
    let other_ref = root.join("other.npz");
    common::run_ok(&mut fid_stats_cmd(
        &root.join("other/demo-000000.tar"),
        &other_ref,
    ));
    let other_json = root.join("other.json");
    // k = 2: on these sets precision and recall usually differ (the random weights change with each
    // run), so the two would not trade places unseen.
    common::run_ok(fid_cmd(&inputs.join("pngs"), &other_ref, &other_json).args(["--pr-k", "2"]));
    let other = read_json(&other_json);
    assert_eq!(other["pr_k"], 2);
    let same = num(&png, "fid").abs();
    assert!(
        num(&other, "fid") > 1e-2 && num(&other, "fid") > 1e3 * same,
        "FID to other images {other}, to itself {same}"
    );
    assert!(num(&other, "sfid") > 1e-2, "{other}");
    let numpy = common::run_ok(
        common::python()
            .arg(common::repo_root().join("bench/precision_recall_reference.py"))
            .arg("check")
            .arg(&other_ref)
            .arg(inputs.join("pytorch_fid_acts.npz"))
            .args(["--k", "2"]),
    );
    let numpy: serde_json::Value = serde_json::from_slice(&numpy.stdout).unwrap();
    for key in ["precision", "recall"] {
        assert_eq!(
            num(&other, key),
            num(&numpy, key),
            "{key}: {other} vs numpy {numpy}"
        );
    }

    // Bad inputs: each error names the file.
    let bad_dir = root.join("bad_pngs");
    std::fs::create_dir_all(&bad_dir).unwrap();
    for entry in std::fs::read_dir(inputs.join("pngs")).unwrap().take(3) {
        let p = entry.unwrap().path();
        std::fs::copy(&p, bad_dir.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(bad_dir.join("zz-broken.png"), b"not a png").unwrap();
    fails_with(
        &mut fid_cmd(&bad_dir, &reference, &root.join("x.json")),
        &["zz-broken.png", "not a readable PNG"],
    );
    // Samples in NCHW float: not what the ADM suite writes.
    let wrong = root.join("wrong.npz");
    common::run_ok(common::python().arg("-c").arg(format!(
        "import numpy as np; np.savez({:?}, arr_0=np.zeros((4, 3, 8, 8), np.float32))",
        wrong.display().to_string()
    )));
    fails_with(
        &mut fid_cmd(&wrong, &reference, &root.join("x.json")),
        &["wrong.npz", "`arr_0`", "(N, H, W, 3)"],
    );
    // A sample file passed as the reference.
    fails_with(
        &mut fid_cmd(
            &inputs.join("pngs"),
            &inputs.join("samples.npz"),
            &root.join("x.json"),
        ),
        &["samples.npz", "no array `mu`", "arr_0"],
    );
    fails_with(
        &mut fid_cmd_with(
            &inputs.join("pngs"),
            &reference,
            &root.join("x.json"),
            &root.join("nowhere.safetensors"),
        ),
        &["nowhere.safetensors", "convert_inception.py"],
    );
    assert!(!root.join("x.json").exists());
}
