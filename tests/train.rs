//! `pipeline train` end to end on a small synthetic cache written in the documented field layout
//! (label, image, vae_mean/vae_std, features with a mirrored view 1), so the trainer is tested without
//! the encoders: the NLL falls, the alignment cosine rises, resume is bit-exact, and bad input is named.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    demo_data, demo_run, demo_train, metrics, pipeline, repo_root, run_ok, tiny_encoders,
};
use stages::cache::{DType, FieldSpec, Manifest, ManifestShard, ShardWriter, SourceShard};
use tch::Tensor;

const TOKENS: usize = 16;
const DIM: usize = 16;

/// Features that are a fixed function of each 4×4 patch's mean colour, so a projector can learn them.
fn features_of(img: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(TOKENS * DIM * 4);
    for t in 0..TOKENS {
        let (gy, gx) = (t / 4, t % 4);
        let mut mean = [0f32; 3];
        for y in 0..4 {
            for x in 0..4 {
                for c in 0..3 {
                    mean[c] +=
                        img[((gy * 4 + y) * 16 + gx * 4 + x) * 3 + c] as f32 / (16.0 * 255.0);
                }
            }
        }
        for d in 0..DIM {
            let w = [
                (d as f32 * 0.7).sin(),
                (d as f32 * 1.3).cos(),
                (d as f32 * 0.4 + 1.0).sin(),
            ];
            let v = w[0] * (mean[0] - 0.5)
                + w[1] * (mean[1] - 0.5)
                + w[2] * (mean[2] - 0.5)
                + 0.1 * ((t + d) as f32).sin();
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

fn mirror(img: &[u8]) -> Vec<u8> {
    let mut out = img.to_vec();
    for y in 0..16 {
        for x in 0..16 {
            let (s, d) = ((y * 16 + x) * 3, (y * 16 + 15 - x) * 3);
            out[d..d + 3].copy_from_slice(&img[s..s + 3]);
        }
    }
    out
}

/// Writes `shards` cache shards of `per` samples into `root/<fingerprint>/` with a manifest.
fn write_cache(root: &Path, shards: usize, per: usize) -> PathBuf {
    let settings = serde_json::json!({"test": "train", "image": 16});
    let dir = root.join(stages::cache::fingerprint(&settings));
    std::fs::create_dir_all(&dir).unwrap();
    let mut entries = vec![];
    let mut state = 12345u64;
    let mut rnd = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as f32 / (1u64 << 31) as f32
    };
    for s in 0..shards {
        let file = format!("demo-{s:06}.fbc");
        let fields = vec![
            FieldSpec::new("label", DType::I64, &[]),
            FieldSpec::new("image", DType::U8, &[16, 16, 3]),
            FieldSpec::new("vae_mean", DType::F32, &[2, 4, 8, 8]),
            FieldSpec::new("vae_std", DType::F32, &[2, 4, 8, 8]),
            FieldSpec::new("features", DType::F32, &[2, TOKENS, DIM]),
        ];
        let mut w = ShardWriter::create(&dir.join(&file), fields, 16, 1).unwrap();
        for i in 0..per {
            let label = ((s * per + i) % 10) as i64;
            // A class colour with a left-to-right ramp and a little pixel noise.
            let base = [
                (label * 25) as f32,
                (255 - label * 20) as f32,
                ((label * 71) % 255) as f32,
            ];
            let mut img = vec![0u8; 16 * 16 * 3];
            for y in 0..16 {
                for x in 0..16 {
                    for c in 0..3 {
                        let v = base[c] * (0.5 + x as f32 / 32.0) + 20.0 * rnd() + 4.0 * y as f32;
                        img[(y * 16 + x) * 3 + c] = v.clamp(0.0, 255.0) as u8;
                    }
                }
            }
            let mut feats = features_of(&img);
            feats.extend(features_of(&mirror(&img)));
            let mut mean = vec![];
            let mut std = vec![];
            for v in 0..2 {
                for c in 0..4 {
                    for p in 0..64 {
                        let m = (label as f32 - 4.5) * 2.0 * ((c + 1) as f32 * 0.3).sin()
                            + if v == 1 { -(p as f32) } else { p as f32 } / 32.0;
                        mean.extend_from_slice(&m.to_le_bytes());
                        std.extend_from_slice(&0.3f32.to_le_bytes());
                    }
                }
            }
            w.push(
                &format!("{s:06}-{i:04}"),
                &[&label.to_le_bytes(), &img, &mean, &std, &feats],
            )
            .unwrap();
        }
        let summary = w.finish(serde_json::json!({})).unwrap();
        let source = SourceShard {
            name: format!("demo-{s:06}.tar"),
            size: 1,
            content_hash: "h".into(),
            remote: None,
        };
        entries.push(ManifestShard {
            file,
            source,
            summary,
        });
    }
    Manifest::record(&dir, &settings, entries).unwrap();
    dir
}

const PIXEL: &str = r#"
[data]
shards = "/data/demo/demo-{000000..000001}.tar"
[model]
img_size = 16
in_channels = 3
patch_size = 4
channels = 64
num_blocks = 2
layers_per_block = 2
num_classes = 10
head_dim = 32
noise_std = 0.05
[align]
mode = "reverse"
locations = [[2, 2]]
projector_hidden = 64
encoder_dim = 16
lambda = 0.5
[train]
steps = 200
batch = 16
lr = 2e-3
warmup_steps = 10
shuffle_buffer = 64
metrics_every = 10
checkpoint_every = 100
sample_every = 100
sample_count = 4
device = "cpu"
threads = 1
"#;

/// Every scalar series of the event files in `dir`, as TensorBoard itself reads them:
/// `{tag: [[step, value], …]}`.
fn tensorboard_scalars(dir: &Path) -> serde_json::Value {
    let out = run_ok(
        common::python()
            .arg("-c")
            .arg(
                "import json, sys\n\
                 from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
                 ea = EventAccumulator(sys.argv[1]); ea.Reload()\n\
                 print(json.dumps({t: [[e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()['scalars']}))",
            )
            .arg(dir),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn setup(name: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::Builder::new().prefix(name).tempdir().unwrap();
    write_cache(&tmp.path().join("cache"), 2, 64);
    let cfg = tmp.path().join("train.toml");
    std::fs::write(&cfg, PIXEL).unwrap();
    let cache = tmp.path().join("cache");
    (tmp, cfg, cache)
}

fn train(cfg: &Path, cache: &Path, out: &Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = pipeline();
    cmd.args(["train", "--config"])
        .arg(cfg)
        .arg("--cache")
        .arg(cache)
        .arg("--out")
        .arg(out)
        .args(extra);
    cmd
}

#[test]
fn nll_falls_and_alignment_cosine_rises_with_checkpoints_and_samples() {
    let (tmp, cfg, cache) = setup("train-learn");
    let out = tmp.path().join("run");
    run_ok(&mut train(&cfg, &cache, &out, &[]));
    let m = metrics(&out);
    assert_eq!(m.len(), 20);
    let avg = |k: &str, r: &[serde_json::Value]| {
        r.iter().map(|v| v[k].as_f64().unwrap()).sum::<f64>() / r.len() as f64
    };
    let cos = |r: &[serde_json::Value]| {
        r.iter().map(|v| v["cos"][0].as_f64().unwrap()).sum::<f64>() / r.len() as f64
    };
    let (nll0, nll1) = (avg("nll_noised", &m[..2]), avg("nll_noised", &m[18..]));
    assert!(nll1 < nll0 - 0.5, "NLL {nll0} → {nll1}");
    let (c0, c1) = (cos(&m[..2]), cos(&m[18..]));
    assert!(c1 > c0 + 0.2, "alignment cosine {c0} → {c1}");
    // The training NLL is of noised inputs: no `bpd` (that is for dequantised data) and no bare `nll`.
    assert!(m[0].get("bpd").is_none() && m[0].get("nll").is_none());
    for k in [
        "lr",
        "grad_norm",
        "samples_per_s",
        "step_s",
        "data_wait_frac",
        "align_loss",
        "tokens_per_s",
        "forward_s",
        "backward_s",
        "optimizer_s",
    ] {
        assert!(m[19][k].is_number(), "metric {k} missing: {}", m[19]);
    }
    // TensorBoard itself reads the same scalars from RUN_DIR/tb.
    let tb = tensorboard_scalars(&out.join("tb"));
    let losses = tb["train/loss"].as_array().unwrap();
    assert_eq!(losses.len(), m.len());
    for (point, line) in losses.iter().zip(&m) {
        assert_eq!(point[0], line["step"]);
        let (a, b) = (point[1].as_f64().unwrap(), line["loss"].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
    }
    assert!(
        tb["train/cos/0"]
            .as_array()
            .is_some_and(|v| v.len() == m.len()),
        "{tb}"
    );
    // The phases are timed on metric steps and fit inside the step.
    let phases: f64 = ["forward_s", "backward_s", "optimizer_s"]
        .iter()
        .map(|k| m[19][k].as_f64().unwrap())
        .sum();
    assert!(
        phases > 0.0 && phases <= m[19]["step_s"].as_f64().unwrap(),
        "{}",
        m[19]
    );
    let ck = out.join("checkpoints");
    assert_eq!(
        std::fs::read_to_string(ck.join("latest")).unwrap().trim(),
        "step-00000200"
    );
    for f in [
        "model.safetensors",
        "model.model.toml",
        "ema.safetensors",
        "ema.model.toml",
        "projector.safetensors",
        "state.safetensors",
        "state.json",
    ] {
        assert!(ck.join("step-00000200").join(f).exists(), "{f} missing");
    }
    assert!(ck.join("step-00000100").exists());
    assert!(out.join("samples/step-00000200.png").exists());
    assert!(out.join("config.toml").exists());
    // The checkpoint is what `pipeline flow` reads: encode a batch through the EMA weights.
    let x = tmp.path().join("x.safetensors");
    let code = "import sys, torch; from safetensors.torch import save_file; save_file({'x': torch.rand(2,3,16,16)*2-1}, sys.argv[1])";
    run_ok(common::python().args(["-c", code]).arg(&x));
    run_ok(
        pipeline()
            .args(["flow", "encode", "--checkpoint"])
            .arg(ck.join("step-00000200/ema.safetensors"))
            .arg("--input")
            .arg(&x)
            .arg("--output")
            .arg(tmp.path().join("z.safetensors")),
    );
}

#[test]
fn fid_every_logs_fid_and_inception_score_of_ema_samples() {
    let (tmp, cfg, cache) = setup("train-fid");
    let root = tmp.path();
    let (weights, reference) = common::inception_and_reference(&root.join("inception"));
    let out = root.join("run");
    let fid_set = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "--set",
            "train.steps=20",
            "--set",
            "train.fid_every=10",
            "--set",
            "train.fid_samples=4",
            "--set",
            "train.fid_batch=3",
        ];
        args.extend_from_slice(extra);
        train(&cfg, &cache, out, &args)
    };
    let fid_ref = format!("train.fid_ref={}", reference.display());
    let fid_weights = format!("train.fid_weights={}", weights.display());
    run_ok(&mut fid_set(
        &out,
        &["--set", &fid_ref, "--set", &fid_weights],
    ));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let evals: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("fid").is_some()).collect();
    assert_eq!(evals.len(), 2, "{lines:?}");
    for (e, step) in evals.iter().zip([10, 20]) {
        assert_eq!(e["step"], step);
        assert_eq!(e["fid_samples"], 4);
        let (fid, is) = (
            e["fid"].as_f64().unwrap(),
            e["inception_score"].as_f64().unwrap(),
        );
        assert!(fid.is_finite() && fid > 0.0, "{e}");
        assert!(is.is_finite() && is >= 1.0, "{e}");
    }
    // The training lines are all still there, and TensorBoard has the scores under eval/.
    assert_eq!(lines.iter().filter(|l| l.get("loss").is_some()).count(), 2);
    let tb = tensorboard_scalars(&out.join("tb"))["eval/fid"].clone();
    assert_eq!(tb.as_array().unwrap().len(), 2, "{tb}");
    assert!(
        (tb[1][1].as_f64().unwrap() - evals[1]["fid"].as_f64().unwrap()).abs()
            < 1e-3 * evals[1]["fid"].as_f64().unwrap()
    );

    // A wrong path fails at the start, naming the key, not at the first evaluation.
    let bad = format!(
        "train.fid_weights={}",
        root.join("missing.safetensors").display()
    );
    let failed = fid_set(&root.join("run-bad"), &["--set", &fid_ref, "--set", &bad])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    assert!(
        stderr.contains("train.fid_weights") && stderr.contains("missing.safetensors"),
        "{stderr}"
    );
    let failed = fid_set(&root.join("run-noref"), &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    assert!(stderr.contains("fid_ref"), "{stderr}");
}

#[test]
fn align_none_has_no_projector() {
    let (tmp, cfg, cache) = setup("train-none");
    let out = tmp.path().join("run");
    run_ok(&mut train(
        &cfg,
        &cache,
        &out,
        &[
            "--set",
            "align.mode=none",
            "--set",
            "train.noise_sigma=0.3",
            "--set",
            "train.steps=10",
            "--set",
            "train.metrics_every=5",
            "--set",
            "train.sample_every=0",
        ],
    ));
    let ck = out.join("checkpoints/step-00000010");
    assert!(ck.join("model.safetensors").exists());
    assert!(!ck.join("projector.safetensors").exists());
    // The σ the run trained with (not the preset's model.noise_std 0.05) is the one sampling
    // denoises with: it is in the checkpoint's model config.
    for sidecar in ["model.model.toml", "ema.model.toml"] {
        let text = std::fs::read_to_string(ck.join(sidecar)).unwrap();
        assert!(text.contains("noise_std = 0.3"), "{sidecar}: {text}");
    }
    assert!(metrics(&out)
        .iter()
        .all(|v| v["align_loss"].is_null() && v["cos"].as_array().unwrap().is_empty()));
}

#[test]
fn resume_matches_an_uninterrupted_latent_run_bit_for_bit() {
    let (tmp, cfg, cache) = setup("train-resume");
    let latent = [
        "--latent",
        "--set",
        "model.img_size=8",
        "--set",
        "model.in_channels=4",
        "--set",
        "model.patch_size=2",
        "--set",
        "train.steps=24",
        "--set",
        "train.latent_scaling=0.18215",
        "--set",
        "train.metrics_every=1",
        "--set",
        "train.checkpoint_every=5",
        "--set",
        "train.sample_every=0",
        "--set",
        "train.shuffle_buffer=40",
        "--set",
        "train.batch=24",
    ];
    let full = tmp.path().join("full");
    run_ok(&mut train(&cfg, &cache, &full, &latent));
    let part = tmp.path().join("part");
    let mut first: Vec<&str> = latent.to_vec();
    first.extend(["--stop-at", "13"]);
    run_ok(&mut train(&cfg, &cache, &part, &first));
    assert_eq!(
        std::fs::read_to_string(part.join("checkpoints/latest"))
            .unwrap()
            .trim(),
        "step-00000013"
    );
    let mut again: Vec<&str> = latent.to_vec();
    again.push("--resume");
    run_ok(&mut train(&cfg, &cache, &part, &again));
    let (a, b) = (metrics(&full), metrics(&part));
    assert_eq!(a.len(), 24);
    assert_eq!(b.len(), 24);
    for (x, y) in a.iter().zip(&b) {
        for k in ["loss", "nll_noised", "align_loss", "grad_norm", "epoch"] {
            assert_eq!(x[k], y[k], "step {}: {k} differs", x["step"]);
        }
    }
    // Batches of 24 from 128 samples: the run crossed an epoch boundary.
    assert!(a[23]["epoch"].as_u64().unwrap() >= 1);
    let wa = std::fs::read(full.join("checkpoints/step-00000024/ema.safetensors")).unwrap();
    let wb = std::fs::read(part.join("checkpoints/step-00000024/ema.safetensors")).unwrap();
    assert!(wa == wb, "EMA weights differ after resume");
}

#[test]
fn corrupt_cache_shard_is_refused_by_name() {
    let (tmp, cfg, cache) = setup("train-corrupt");
    let dir = std::fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let shard = dir.join("demo-000001.fbc");
    let mut bytes = std::fs::read(&shard).unwrap();
    // Damage every frame region (the footer sits at the end and stays intact).
    let n = bytes.len();
    for k in 1..20 {
        let at = n * k / 40;
        bytes[at] ^= 0x5a;
    }
    std::fs::write(&shard, bytes).unwrap();
    let out = train(
        &cfg,
        &cache,
        &tmp.path().join("run"),
        &["--set", "train.steps=20"],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("demo-000001.fbc") && err.contains("corrupt"),
        "{err}"
    );
}

#[test]
fn missing_cache_says_how_to_create_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("train.toml");
    std::fs::write(&cfg, PIXEL).unwrap();
    let out = train(
        &cfg,
        &tmp.path().join("nocache"),
        &tmp.path().join("run"),
        &[],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no precompute cache") && err.contains("pipeline precompute"),
        "{err}"
    );
    // A cache that lacks a requested source shard is named too.
    write_cache(&tmp.path().join("cache"), 2, 16);
    let out = train(
        &cfg,
        &tmp.path().join("cache"),
        &tmp.path().join("run"),
        &["--shards", "/data/demo/demo-{000000..000002}.tar"],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("demo-000002.tar"),
        "{err}"
    );
}

#[test]
fn non_finite_losses_are_skipped_counted_and_abort_in_a_row() {
    let (tmp, cfg, cache) = setup("train-nan");
    let out = tmp.path().join("run");
    let base = [
        "--set",
        "train.steps=12",
        "--set",
        "train.metrics_every=1",
        "--set",
        "train.sample_every=0",
        "--set",
        "train.checkpoint_every=4",
    ];
    let mut args: Vec<&str> = base.to_vec();
    args.extend(["--inject-nan-at", "3,7"]);
    run_ok(&mut train(&cfg, &cache, &out, &args));
    let m = metrics(&out);
    assert_eq!(m[11]["skipped_nonfinite"], 2);
    assert!(m[3]["grad_norm"].is_null() && m[3]["loss"].is_null());
    assert!(m
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 7)
        .all(|(_, v)| v["loss"].as_f64().unwrap().is_finite()));

    // A streak: the checkpoint saved inside it (step 6) is not the last good one; pruning to one
    // checkpoint keeps step 4 anyway, and `latest` names it when the run stops.
    let out2 = tmp.path().join("run2");
    let mut args: Vec<&str> = base.to_vec();
    args.extend([
        "--set",
        "train.max_nonfinite_in_row=3",
        "--set",
        "train.checkpoint_every=2",
        "--set",
        "train.keep_last=1",
        "--inject-nan-at",
        "5,6,7",
    ]);
    let o = train(&cfg, &cache, &out2, &args).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("3 non-finite steps in a row") && err.contains("step-00000004"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out2.join("checkpoints/latest"))
            .unwrap()
            .trim(),
        "step-00000004"
    );
    assert!(out2.join("checkpoints/step-00000004/state.json").exists());
    assert!(out2.join("checkpoints/step-00000006/state.json").exists());
    assert!(!out2.join("checkpoints/step-00000002").exists());
}

/// A gradient that is not finite while the loss is: the optimizer skips the step on the device (no
/// read-back), so weights, EMA and moments are those of the step before; it is counted; the next
/// good step is applied.
#[test]
fn a_non_finite_gradient_with_a_finite_loss_is_skipped() {
    let (tmp, cfg, cache) = setup("train-infgrad");
    let out = tmp.path().join("run");
    run_ok(&mut train(
        &cfg,
        &cache,
        &out,
        &[
            "--set",
            "train.steps=5",
            "--set",
            "train.metrics_every=1",
            "--set",
            "train.sample_every=0",
            "--set",
            "train.checkpoint_every=1",
            "--set",
            "train.keep_last=10",
            "--inject-inf-grad-at",
            "3",
        ],
    ));
    let m = metrics(&out);
    assert!(m[3]["loss"].as_f64().unwrap().is_finite(), "{}", m[3]);
    assert!(m[3]["grad_norm"].is_null(), "{}", m[3]);
    assert_eq!(m[3]["skipped_nonfinite"], 1);
    assert_eq!(m[4]["skipped_nonfinite"], 1);
    let ck = |step: u32, file: &str| {
        std::fs::read(out.join(format!("checkpoints/step-{step:08}/{file}"))).unwrap()
    };
    for file in ["model.safetensors", "ema.safetensors", "state.safetensors"] {
        assert!(
            ck(3, file) == ck(4, file),
            "{file} changed on the skipped step"
        );
        assert!(
            ck(4, file) != ck(5, file),
            "{file} did not change on the next step"
        );
    }
    let state = |step: u32| -> serde_json::Value {
        serde_json::from_slice(&ck(step, "state.json")).unwrap()
    };
    assert_eq!(
        (state(4)["adam_t"].clone(), state(5)["adam_t"].clone()),
        (3.into(), 4.into())
    );
}

/// Without a cache, `train` computes it first (the directory `precompute` would write, found by the
/// config's fingerprint) and says so; a second run reuses it.
#[test]
fn train_precomputes_a_missing_cache_then_reuses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    demo_data(&root.join("data"), 2, 6, 2, 0, &[]);
    tiny_encoders(&root.join("encoders"));
    let train = |out: &str| {
        let sets = [
            "train.steps=2",
            "train.batch=4",
            "train.checkpoint_every=2",
            "train.sample_every=2",
            "train.sample_count=4",
            "train.metrics_every=1",
        ]
        .map(String::from);
        let mut cmd = demo_train(root, "demo-{000000..000001}.tar", &root.join(out), &sets);
        String::from_utf8_lossy(&run_ok(&mut cmd).stdout).into_owned()
    };
    let first = train("run1");
    assert!(
        first.contains("precomputed 2 shards (12 samples), reused 0"),
        "{first}"
    );
    let second = train("run2");
    assert!(
        second.contains("precomputed 0 shards (0 samples), reused 2"),
        "{second}"
    );
    let fingerprints = std::fs::read_dir(root.join("cache")).unwrap().count();
    assert_eq!(fingerprints, 1);
    // The latent sample grid is decoded by the cache's VAE: 2×2 cells of 64 px (8×8 latents × 8).
    let grid = image::open(root.join("run1/samples/step-00000002.png")).unwrap();
    // 2 px padding around and between cells (pipeline/src/grid.rs).
    assert_eq!(
        (grid.width(), grid.height()),
        (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)
    );
    // The resolved latent scaling (the tiny VAE's) is recorded in the run's config.
    let config = std::fs::read_to_string(root.join("run1/config.toml")).unwrap();
    assert!(config.contains("latent_scaling = 1.5"), "{config}");

    // The checkpoint's sidecar records the data space; a bare copy of it, away from the run, samples
    // with the VAE and factors it names, and refuses a VAE that did not make its latents.
    let ck = root.join("run1/checkpoints/step-00000002");
    let side = std::fs::read_to_string(ck.join("ema.model.toml")).unwrap();
    for want in [
        "[space]",
        "latent = true",
        "latent_scaling = 1.5",
        "latent_shift = 0.0",
        "image_size = 64",
        "crop = \"",
        "vae_fingerprint = \"",
        "cache_fingerprint = \"",
    ] {
        assert!(side.contains(want), "{want}: {side}");
    }
    let bare = root.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for f in ["ema.safetensors", "ema.model.toml"] {
        std::fs::copy(ck.join(f), bare.join(f)).unwrap();
    }
    let sample = |extra: &[&str]| {
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
            .arg(bare.join("ema.safetensors"))
            .arg("--out")
            .arg(root.join("bare-samples"))
            .args(extra)
            .output()
            .unwrap()
    };
    let o = sample(&[]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.starts_with("sampling: guidance w 0 (annealed), attn_temp 1, denoise on (σ 0.2)"),
        "{stdout}"
    );
    assert!(stdout.contains("2 images of 64x64"), "{stdout}");
    run_ok(
        pipeline()
            .args([
                "encoders", "init", "--preset", "tiny", "--seed", "5", "--out",
            ])
            .arg(root.join("other")),
    );
    let other = root.join("other/vae");
    let o = sample(&["--vae", other.to_str().unwrap(), "--overwrite"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("fingerprint") && stderr.contains("other/vae"),
        "{stderr}"
    );
}

#[test]
fn bench_train_reports_rates_and_data_wait_against_the_loader() {
    let (tmp, cfg, cache) = setup("bench-train");
    let out = tmp.path().join("run");
    let o = run_ok(
        pipeline()
            .args(["bench", "train", "--config"])
            .arg(&cfg)
            .arg("--cache")
            .arg(&cache)
            .args(["--steps", "6", "--warmup", "2", "--out"])
            .arg(&out),
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("loader alone") && stdout.contains("data wait:"),
        "{stdout}"
    );
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["steps"], 6, "{stdout}");
    let rate = |k: &str| report[k].as_f64().unwrap();
    assert!(rate("steps_per_s") > 0.0 && rate("loader_batches_per_s") > 0.0);
    assert!((rate("samples_per_s") / rate("steps_per_s") - 16.0).abs() < 1e-6);
    let wait = rate("data_wait_frac");
    assert!((0.0..=1.0).contains(&wait), "{wait}");
    // The measured run is a real one: a metrics line per step, warm-up included.
    assert_eq!(metrics(&out).len(), 8);
}

/// A patch-1 latent flow (8×8 tokens) meets the tiny DINOv2's 4×4 grid both ways (spec §4.2): pooled
/// 2×2 onto the grid of a 224-px cache, or aligned token for token with a cache of DINOv2 run at
/// 448 px, which has its own fingerprint.
#[test]
fn both_token_matchings_train_a_patch_1_latent_flow() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    demo_data(&root.join("data"), 2, 6, 1, 0, &[]);
    tiny_encoders(&root.join("encoders"));
    let base = [
        "model.patch_size=1",
        "train.steps=3",
        "train.batch=4",
        "train.checkpoint_every=3",
        "train.sample_every=0",
        "train.metrics_every=1",
    ];
    let train = |out: &str, sets: &[&str]| {
        demo_run(root, "demo-000000.tar", out, &[&base[..], sets].concat())
    };
    let pooled = train(
        "pool",
        &["align.token_match=\"pool\"", "align.encoder_tokens=16"],
    );
    let resized = train(
        "resize",
        &[
            "align.token_match=\"encoder_resize\"",
            "precompute.encoder_input_size=448",
        ],
    );
    for m in [&pooled, &resized] {
        assert_eq!(m.len(), 3);
        for line in m {
            let cos = line["cos"].as_array().unwrap();
            assert_eq!(cos.len(), 2, "{line}");
            assert!(
                cos.iter().all(|c| c.as_f64().unwrap().is_finite()),
                "{line}"
            );
        }
    }
    // Two caches: DINOv2 at 224 px (4×4 tokens) and at 448 px (8×8), told apart by the fingerprint.
    let mut sizes: Vec<(i64, Vec<u64>)> = std::fs::read_dir(root.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .map(|dir| {
            let m: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap())
                    .unwrap();
            let file = m["shards"].as_object().unwrap().values().next().unwrap()["file"]
                .as_str()
                .unwrap()
                .to_string();
            let reader = stages::cache::ShardReader::open(&dir.join(file)).unwrap();
            let features = reader
                .footer()
                .fields
                .iter()
                .find(|f| f.name == "features")
                .unwrap()
                .shape
                .iter()
                .map(|&v| v as u64)
                .collect();
            (
                m["settings"]["encoder"]["input_size"].as_i64().unwrap(),
                features,
            )
        })
        .collect();
    sizes.sort();
    assert_eq!(sizes, [(224, vec![2, 16, 32]), (448, vec![2, 64, 32])]);
}

/// `--dry-run` builds a shipped preset's model on the CPU without data and prints what it costs; the
/// micro-batch each preset sets fits the H200 estimate it prints.
#[test]
fn dry_run_prints_what_the_latent_presets_cost() {
    for preset in ["imagenet256-latent.toml", "imagenet256-latent-p1.toml"] {
        let path = repo_root().join("configs").join(preset);
        let o = run_ok(
            pipeline()
                .args(["train", "--dry-run", "--latent", "--config"])
                .arg(&path)
                .args(["--set", "train.device=cpu"]),
        );
        let out = String::from_utf8_lossy(&o.stdout);
        let number_after = |prefix: &str| -> f64 {
            let line = out
                .lines()
                .find(|l| l.contains(prefix))
                .unwrap_or_else(|| panic!("{out}"));
            line[line.find(prefix).unwrap() + prefix.len()..]
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .find(|w| !w.is_empty())
                .unwrap()
                .parse()
                .unwrap()
        };
        let params = number_after("flow: ");
        assert!((1.0e9..1.2e9).contains(&params), "{preset}: {out}");
        assert!(number_after("EMA: ") > 15.0, "{preset}: {out}");
        let text = std::fs::read_to_string(&path).unwrap();
        let micro: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("micro_batch = "))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            micro <= number_after("H200 (141 GB): about "),
            "{preset}: {out}"
        );
    }
}

/// `train.features = "online"`: the trainer runs the frozen DINOv2 on each batch's cached crop (in the
/// sample's view) instead of reading precomputed tokens. Its targets equal the cache's (f16) for the
/// same crops and views, and a latent demo run trains the same way with either.
#[test]
fn online_features_equal_the_cached_ones_and_train_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    demo_data(&root.join("data"), 2, 8, 2, 0, &[]);
    tiny_encoders(&root.join("encoders"));
    // The cache is compared with the encoder run here on the CPU in fp32: precompute must not take a
    // GPU (bf16 there) on a machine that has one.
    let base = [
        "train.steps=24",
        "train.batch=8",
        "train.checkpoint_every=0",
        "train.sample_every=0",
        "train.metrics_every=1",
        "precompute.device=\"cpu\"",
    ];
    let train = |out: &str, extra: &[&str]| {
        demo_run(
            root,
            "demo-{000000..000001}.tar",
            out,
            &[&base[..], extra].concat(),
        )
    };
    let cached = train("cached", &[]);
    let online = train("online", &["train.features=\"online\""]);
    // Two caches: the one with tokens, and crops + VAE moments only for the online run.
    let dirs: Vec<PathBuf> = std::fs::read_dir(root.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 2);
    let with_features = dirs
        .iter()
        .find(|d| {
            let m = std::fs::read_to_string(d.join("manifest.json")).unwrap();
            !m.contains("\"encoder\": null") && !m.contains("\"encoder\":null")
        })
        .unwrap();

    // The cached tokens of a shard's first chunk against the encoder run here on its crops and mirrors.
    let shard = std::fs::read_dir(with_features)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "fbc"))
        .unwrap();
    let mut reader = stages::cache::ShardReader::open(&shard).unwrap();
    let fields = reader.footer().fields.clone();
    let field = |name: &str| fields.iter().find(|f| f.name == name).unwrap().clone();
    let (fi, ff) = (field("image"), field("features"));
    let n = reader.footer().chunks[0].rows as i64;
    let images = Tensor::from_slice(
        &reader
            .read_frame(0, fields.iter().position(|f| f.name == "image").unwrap())
            .unwrap(),
    )
    .view([n, fi.shape[0] as i64, fi.shape[1] as i64, 3])
    .permute([0, 3, 1, 2])
    .contiguous();
    let raw = reader
        .read_frame(0, fields.iter().position(|f| f.name == "features").unwrap())
        .unwrap();
    let halves: Vec<f32> = raw
        .chunks_exact(2)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    let cached_tokens = Tensor::from_slice(&halves).view([
        n,
        ff.shape[0] as i64,
        ff.shape[1] as i64,
        ff.shape[2] as i64,
    ]);
    let enc = model::dinov2::Dinov2::from_folder(&root.join("encoders/dinov2"), tch::Device::Cpu)
        .unwrap();
    for (view, crops) in [(0, images.shallow_clone()), (1, images.flip([3]))] {
        let online = tch::no_grad(|| enc.model.patch_tokens(&crops, 224)).unwrap();
        let cached = cached_tokens.select(1, view);
        // f16 keeps 11 significant bits: half an ulp of the largest value bounds the rounding.
        let bound = cached.abs().max().double_value(&[]) * 2f64.powi(-11) + 1e-4;
        let diff = (&online - &cached).abs().max().double_value(&[]);
        assert!(
            diff <= bound,
            "view {view}: online vs cached tokens differ by {diff} (bound {bound})"
        );
    }

    // Same initial weights and batches: the first step's alignment cosines agree to the f16 rounding,
    // and the runs move alike.
    assert_eq!(cached.len(), 24);
    assert_eq!(online.len(), 24);
    let cos = |m: &[serde_json::Value], k: usize| m[k]["cos"][0].as_f64().unwrap();
    assert!(
        (cos(&cached, 0) - cos(&online, 0)).abs() < 1e-3,
        "{} vs {}",
        cached[0],
        online[0]
    );
    let rise = |m: &[serde_json::Value]| {
        (19..24).map(|k| cos(m, k)).sum::<f64>() / 5.0
            - (0..5).map(|k| cos(m, k)).sum::<f64>() / 5.0
    };
    let (rc, ro) = (rise(&cached), rise(&online));
    eprintln!("cosine rise over 24 steps: cached {rc:.4}, online {ro:.4}");
    assert!(rc > 0.0 && ro > 0.0, "cached {rc}, online {ro}");
    assert!(
        (rc - ro).abs() < 0.25 * rc.abs().max(0.01),
        "cached {rc}, online {ro}"
    );
}

/// Preemption: SIGTERM lets the step finish, writes a checkpoint of it and exits 128 + 15, which
/// `--resume` continues; a second signal (here SIGUSR1 twice, during a slow checkpoint) ends the process
/// at once with 128 + 10 and no half checkpoint.
#[test]
fn a_signal_finishes_the_step_checkpoints_and_exits_for_requeue() {
    let (tmp, cfg, cache) = setup("train-signal");
    let long = [
        "--set",
        "train.steps=100000",
        "--set",
        "train.metrics_every=1",
        "--set",
        "train.checkpoint_every=0",
        "--set",
        "train.sample_every=0",
    ];
    let wait_for_steps = |child: &mut std::process::Child, out: &Path, n: usize| {
        let start = std::time::Instant::now();
        loop {
            let lines = std::fs::read_to_string(out.join("metrics.jsonl"))
                .map(|t| t.lines().count())
                .unwrap_or(0);
            if lines >= n {
                break;
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "training stopped early"
            );
            assert!(start.elapsed().as_secs() < 120, "training never started");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let signal = |child: &std::process::Child, sig: &str| {
        run_ok(Command::new("kill").args([sig, &child.id().to_string()]));
    };
    let finish = |child: std::process::Child| {
        let start = std::time::Instant::now();
        let o = child.wait_with_output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
            start.elapsed(),
        )
    };

    let out = tmp.path().join("run");
    let mut child = train(&cfg, &cache, &out, &long)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_steps(&mut child, &out, 3);
    signal(&child, "-TERM");
    let (code, err, _) = finish(child);
    assert_eq!(code, Some(128 + 15), "{err}");
    let latest = std::fs::read_to_string(out.join("checkpoints/latest")).unwrap();
    let step: usize = latest.trim().trim_start_matches("step-").parse().unwrap();
    assert_eq!(
        metrics(&out).len(),
        step,
        "every finished step is in the checkpoint"
    );
    assert!(
        err.contains(&format!(
            "stopped on SIGTERM: checkpoint of step {step} written"
        )),
        "{err}"
    );
    // The requeued job continues from it.
    let more = (step + 3).to_string();
    let steps = format!("train.steps={more}");
    run_ok(&mut train(
        &cfg,
        &cache,
        &out,
        &[
            "--set",
            &steps,
            "--set",
            "train.metrics_every=1",
            "--set",
            "train.sample_every=0",
            "--resume",
        ],
    ));
    assert_eq!(metrics(&out).len(), step + 3);

    let out = tmp.path().join("twice");
    let mut args = long.to_vec();
    args.extend(["--slow-checkpoint-ms", "20000"]);
    let mut child = train(&cfg, &cache, &out, &args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_steps(&mut child, &out, 2);
    signal(&child, "-USR1");
    std::thread::sleep(std::time::Duration::from_millis(500));
    signal(&child, "-USR1");
    let (code, err, waited) = finish(child);
    assert_eq!(code, Some(128 + 10), "{err}");
    assert!(
        waited.as_secs() < 10,
        "the second signal did not stop the job at once"
    );
    assert!(!out.join("checkpoints/latest").exists());
}

/// A cached label the model has no class for is an error naming the cache shard, the row and its key,
/// not an index panic inside libtorch.
#[test]
fn a_label_outside_the_models_classes_is_named() {
    let (tmp, cfg, cache) = setup("train-labels");
    let out = tmp.path().join("run");
    let o = train(
        &cfg,
        &cache,
        &out,
        &["--set", "model.num_classes=5", "--set", "train.steps=3"],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cache shard")
            && err.contains(".fbc, row")
            && err.contains("(key 0000")
            && err.contains("outside the model's 5 classes"),
        "{err}"
    );
}

/// A libtorch exception inside a step (here a forced shape mismatch) stops the run with an error that
/// names the step, after saving the last completed step; never a panic exit.
#[test]
fn a_libtorch_error_in_a_step_saves_the_last_completed_step() {
    let (tmp, cfg, cache) = setup("train-torch-error");
    let out = tmp.path().join("run");
    let o = train(
        &cfg,
        &cache,
        &out,
        &[
            "--set",
            "train.steps=20",
            "--set",
            "train.metrics_every=1",
            "--set",
            "train.checkpoint_every=0",
            "--set",
            "train.sample_every=0",
            "--inject-torch-error-at",
            "5",
        ],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error: ")
            && err.contains("step 5: libtorch: ")
            && err.contains("the checkpoint of step 5 (the last completed) was written")
            && !err.contains("panicked"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("checkpoints/latest"))
            .unwrap()
            .trim(),
        "step-00000005"
    );
    assert_eq!(metrics(&out).len(), 5);
}

/// Every vision-encoder family beyond DINOv2 (`encoders init --preset tiny-FAMILY`) fills a cache of
/// its own (the manifest's encoder kind is the family) and trains the latent demo with cached and with
/// online features: the first step's alignment cosine is the same either way (the targets differ by the
/// cache's f16 rounding only), so the online path runs the same encoder with the same preparation.
#[test]
fn every_encoder_family_trains_with_cached_and_online_features() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    demo_data(&root.join("data"), 2, 4, 1, 0, &[]);
    tiny_encoders(&root.join("encoders"));
    for family in ["clip", "siglip", "mae", "ijepa", "dinov3"] {
        let dir = root.join("encoders").join(family);
        run_ok(
            pipeline()
                .args(["encoders", "init", "--preset", &format!("tiny-{family}")])
                .arg("--out")
                .arg(&dir),
        );
        let encoder = format!("precompute.encoder={:?}", dir.display().to_string());
        let sets = [
            "train.steps=2",
            "train.batch=4",
            "train.checkpoint_every=0",
            "train.sample_every=0",
            "train.metrics_every=1",
            "precompute.device=\"cpu\"",
            encoder.as_str(),
        ];
        let cached = demo_run(root, "demo-000000.tar", &format!("{family}-cached"), &sets);
        let online = demo_run(
            root,
            "demo-000000.tar",
            &format!("{family}-online"),
            &[&sets[..], &["train.features=\"online\""]].concat(),
        );
        assert_eq!((cached.len(), online.len()), (2, 2), "{family}");
        // Every alignment location's cosine; the cosines are O(0.01–0.1) with random towers, and f16
        // targets move them by about 1e-5.
        let cos = |m: &[serde_json::Value]| -> Vec<f64> {
            let values = m[0]["cos"].as_array().unwrap();
            values.iter().map(|c| c.as_f64().unwrap()).collect()
        };
        let (c, o) = (cos(&cached), cos(&online));
        assert!(
            c.len() == o.len() && c.iter().zip(&o).all(|(c, o)| (c - o).abs() < 1e-4),
            "{family}: first-step cosines cached {c:?} vs online {o:?}"
        );
        let kinds: Vec<String> = std::fs::read_dir(root.join("cache"))
            .unwrap()
            .map(|e| e.unwrap().path().join("manifest.json"))
            .filter(|m| m.exists())
            .map(|m| {
                let m: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(m).unwrap()).unwrap();
                m["settings"]["encoder"]["kind"]
                    .as_str()
                    .unwrap_or("none")
                    .to_string()
            })
            .collect();
        assert!(
            kinds.iter().any(|k| k == family),
            "{family}: caches {kinds:?}"
        );
    }
}
