//! `pipeline precompute` end to end on demo shards with tiny random-init encoders (`encoders init`):
//! reuse, fingerprints, superset runs, SIGKILL and rerun, corruption found by verify, rank split.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Demo shards (4 × `per_shard` samples), tiny encoders and a config pointing at them.
fn setup(tmp: &Path, per_class: usize) -> PathBuf {
    demo_data(&tmp.join("data"), 4, per_class, 4, 0, &[]);
    tiny_encoders(&tmp.join("enc"));
    let config = tmp.join("c.toml");
    let text = format!(
        "[data]\nshards = \"{0}/data/demo-{{000000..000003}}.tar\"\nimage_size = 32\n\n[precompute]\nencoder = \"{0}/enc/dinov2\"\n\
         vae = \"{0}/enc/vae\"\nbatch_size = 2\nchunk_rows = 2\nstore_image = true\nworkers = 2\n",
        tmp.display()
    );
    std::fs::write(&config, text).unwrap();
    config
}

fn precompute_command(config: &Path, cache: &Path) -> std::process::Command {
    let mut cmd = pipeline();
    cmd.arg("precompute")
        .arg("--config")
        .arg(config)
        .arg("--cache")
        .arg(cache);
    cmd
}

fn precompute(config: &Path, cache: &Path, extra: &[&str]) -> String {
    let out = run_ok(precompute_command(config, cache).args(extra));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fingerprint_dirs(cache: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// Shard name → blake3 of its cache file, from the manifest.
fn shard_hashes(dir: &Path) -> BTreeMap<String, String> {
    let m = stages::cache::Manifest::load(dir).unwrap().unwrap();
    m.shards
        .values()
        .map(|s| (s.file.clone(), s.summary.blake3.clone()))
        .collect()
}

#[test]
fn reuse_superset_and_fingerprints() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path(), 2);
    let cache = tmp.path().join("cache");
    let first_two = format!("{}/data/demo-{{000000..000001}}.tar", tmp.path().display());
    let out = precompute(&config, &cache, &["--shards", &first_two]);
    assert!(
        out.contains("computed 2 shards (4 samples, 8 encodings), reused 0"),
        "{out}"
    );
    // A superset computes only the new shards. Off a terminal the progress is a log line every
    // PIPELINE_PROGRESS_SECS (here every batch) and one when done.
    let o = run_ok(
        precompute_command(&config, &cache)
            .env("RUST_LOG", "info")
            .env("PIPELINE_PROGRESS_SECS", "0"),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("computed 2 shards (4 samples, 8 encodings), reused 2"),
        "{out}"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("precompute (2 shards): images: 2 (")
            && err.contains("precompute (2 shards): images: 4 done in"),
        "{err}"
    );
    // Same numbers, other worker count and batch size: same fingerprint, nothing encoded.
    let out = precompute(
        &config,
        &cache,
        &[
            "--set",
            "precompute.workers=1",
            "--set",
            "precompute.batch_size=3",
        ],
    );
    assert!(
        out.contains("computed 0 shards (0 samples, 0 encodings), reused 4"),
        "{out}"
    );
    assert_eq!(fingerprint_dirs(&cache).len(), 1);
    // A crop size change is a new fingerprint directory, computed from scratch.
    let out = precompute(&config, &cache, &["--set", "data.image_size=16"]);
    assert!(
        out.contains("computed 4 shards (8 samples, 16 encodings), reused 0"),
        "{out}"
    );
    assert_eq!(fingerprint_dirs(&cache).len(), 2);
    run_ok(pipeline().args(["cache", "verify", "--cache"]).arg(&cache));

    // The fields and shapes of docs/cache-format.md.
    let dir = &fingerprint_dirs(&cache)[0];
    let mut reader = stages::cache::ShardReader::open(&dir.join("demo-000000.fbc")).unwrap();
    let shapes: Vec<(String, Vec<usize>)> = reader
        .footer()
        .fields
        .iter()
        .map(|f| (f.name.clone(), f.shape.clone()))
        .collect();
    let names: Vec<&str> = shapes.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["label", "image", "vae_mean", "vae_std", "features"]);
    assert!(
        shapes
            .iter()
            .any(|(n, s)| n == "vae_mean" && (s == &[2, 4, 4, 4] || s == &[2, 4, 2, 2])),
        "{shapes:?}"
    );
    assert!(
        shapes
            .iter()
            .any(|(n, s)| n == "features" && s == &[2, 16, 32]),
        "{shapes:?}"
    );
    let labels = reader.read_field("label").unwrap();
    assert_eq!(labels.len(), 8 * reader.n_samples());

    let out = run_ok(
        pipeline()
            .arg("precompute")
            .arg("--config")
            .arg(&config)
            .args(["--dry-run", "--dry-run-batches", "1"]),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cache bytes per sample") && text.contains("projected for 4 shards"),
        "{text}"
    );

    let out = run_ok(
        pipeline()
            .args([
                "bench",
                "precompute",
                "--limit",
                "2",
                "--repeats",
                "2",
                "--config",
            ])
            .arg(&config),
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "decode_images_per_s",
        "encode_images_per_s",
        "write_images_per_s",
        "end_to_end_images_per_s",
        "readback_vs_raw_zstd",
    ] {
        assert!(line[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {line}");
    }
    assert_eq!(line["samples"], 2);
    assert_eq!(line["repeats"], 2);
}

fn count_shards(cache: &Path) -> usize {
    fingerprint_dirs(cache)
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap())
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".fbc")
        })
        .filter(|e| {
            !e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .count()
}

#[test]
fn sigkill_rerun_verify_corruption_and_rank_split() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path(), 3);
    let reference = tmp.path().join("reference");
    precompute(&config, &reference, &[]);
    let ref_dir = fingerprint_dirs(&reference)[0].clone();
    let expected = shard_hashes(&ref_dir);
    assert_eq!(expected.len(), 4);

    // Killed with SIGKILL after 1 and then 3 finished shards (each time mid-way through the next one).
    // The writer pauses after each batch, and the test fails if the job was not running when killed:
    // a kill after the job ended would prove nothing.
    let killed = tmp.path().join("killed");
    for after in [1, 3] {
        let mut child = pipeline()
            .arg("precompute")
            .arg("--config")
            .arg(&config)
            .arg("--cache")
            .arg(&killed)
            .args(["--slow-write-ms", "200"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !killed.exists() || count_shards(&killed) < after {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no shard appeared"
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "precompute finished before {after} shards could be counted and the kill"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "precompute had already exited: the kill would prove nothing"
        );
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the job was not killed: {status:?}"
        );
    }
    let out = precompute(&config, &killed, &[]);
    assert!(out.contains("reused"), "{out}");
    run_ok(pipeline().args(["cache", "verify", "--cache"]).arg(&killed));
    let dir = fingerprint_dirs(&killed)[0].clone();
    assert_eq!(dir.file_name(), ref_dir.file_name());
    assert_eq!(
        shard_hashes(&dir),
        expected,
        "a killed and rerun cache differs from an uninterrupted one"
    );

    // Two ranks over the same shard list write, together, the same cache as one rank.
    let ranked = tmp.path().join("ranked");
    let out0 = precompute(&config, &ranked, &["--rank", "0", "--world-size", "2"]);
    assert!(out0.contains("computed 2 shards"), "{out0}");
    let out1 = run_ok(
        pipeline()
            .arg("precompute")
            .arg("--config")
            .arg(&config)
            .arg("--cache")
            .arg(&ranked)
            .env("RANK", "1")
            .env("WORLD_SIZE", "2"),
    );
    assert!(String::from_utf8_lossy(&out1.stdout).contains("rank 1 of 2: computed 2 shards"));
    assert_eq!(shard_hashes(&fingerprint_dirs(&ranked)[0]), expected);
    run_ok(pipeline().args(["cache", "verify", "--cache"]).arg(&ranked));

    // One flipped byte: verify names that shard and fails; a rerun recomputes it.
    let victim = dir.join("demo-000002.fbc");
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 3;
    bytes[mid] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();
    let out = pipeline()
        .args(["cache", "verify", "--cache"])
        .arg(&killed)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bad: Vec<&str> = stdout.lines().filter(|l| l.starts_with("BAD")).collect();
    assert!(
        bad.len() == 1 && bad[0].contains("demo-000002.fbc"),
        "{stdout}"
    );
}

#[test]
fn bad_input_is_counted_by_kind_named_and_finished_shards_are_kept() {
    let tmp = tempfile::Builder::new()
        .prefix("precompute-odd")
        .tempdir()
        .unwrap();
    let root = tmp.path();
    demo_data(&root.join("data"), 4, 6, 2, 0, &["--odd"]);
    tiny_encoders(&root.join("enc"));
    let config = root.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[data]\nshards = \"{0}/data/demo-{{000000..000001}}.tar\"\nimage_size = 32\n\n[precompute]\n\
             encoder = \"{0}/enc/dinov2\"\nvae = \"{0}/enc/vae\"\nbatch_size = 4\n",
            root.display()
        ),
    )
    .unwrap();
    let cache = root.join("cache");
    // Default max_bad_fraction (0.01): 8 bad of 40 aborts, naming every bad member by shard and key,
    // after the shards are written.
    let out = precompute_command(&config, &cache).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("bad-input fraction 0.2000 exceeds the limit 0.01")
            && stderr.contains(
                "good 32, bad 8 (truncated_image 2, garbage_image 2, missing_label 2, bad_label 2)"
            ),
        "{stderr}"
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("data/demo-index.json")).unwrap()).unwrap();
    let mut bad = 0;
    for member in index["odd"].as_array().unwrap() {
        let key = member["key"].as_str().unwrap();
        let kind = member["kind"].as_str().unwrap();
        let named = stderr
            .lines()
            .any(|l| l.contains("data/demo-00000") && l.contains(&format!("key {key}:")));
        let broken = matches!(
            kind,
            "truncated" | "garbage" | "missing_label" | "bad_label"
        );
        assert_eq!(
            named, broken,
            "{key} ({kind}) named with its shard: {named}\n{stderr}"
        );
        bad += usize::from(broken);
    }
    assert_eq!(bad, 8);
    let verify = run_ok(pipeline().args(["cache", "verify", "--cache"]).arg(&cache));
    assert!(
        String::from_utf8_lossy(&verify.stdout).contains("2 shards checked, 0 bad"),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    // Nothing finished is lost: a rerun that tolerates the bad members reuses both shards.
    let again = precompute(&config, &cache, &["--set", "data.max_bad_fraction=0.5"]);
    assert!(
        again.contains("computed 0 shards") && again.contains("reused 2 shards"),
        "{again}"
    );
    let dir = fingerprint_dirs(&cache).remove(0);
    let manifest = stages::cache::Manifest::load(&dir).unwrap().unwrap();
    let samples: usize = manifest.shards.values().map(|s| s.summary.samples).sum();
    assert_eq!(samples, 32);
}

#[test]
fn a_header_without_a_scan_is_counted_and_the_image_after_it_is_encoded() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir(root.join("data")).unwrap();
    std::fs::write(
        root.join("data/two-000000.tar"),
        stages::demo::no_scan_then_good_shard(),
    )
    .unwrap();
    tiny_encoders(&root.join("enc"));
    let config = root.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[data]\nshards = \"{0}/data/two-000000.tar\"\nimage_size = 32\nthreads = 1\n\
             max_bad_fraction = 0.5\n\n[precompute]\nencoder = \"{0}/enc/dinov2\"\nvae = \"{0}/enc/vae\"\n\
             batch_size = 2\n",
            root.display()
        ),
    )
    .unwrap();
    let cache = root.join("cache");
    let out = precompute_command(&config, &cache).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("key noscan:") && stderr.contains("missing SOS marker"),
        "{stderr}"
    );
    let dir = fingerprint_dirs(&cache).remove(0);
    let manifest = stages::cache::Manifest::load(&dir).unwrap().unwrap();
    let samples: usize = manifest.shards.values().map(|s| s.summary.samples).sum();
    assert_eq!(samples, 1, "{stdout}");
}

/// SIGTERM in precompute: finished shards stay recorded, the shard in progress is dropped (no file, no
/// entry), the cache verifies, the exit status is 128 + 15, and a rerun completes it to the same bytes.
#[test]
fn a_signal_keeps_finished_shards_and_drops_the_one_in_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path(), 3);
    let reference = tmp.path().join("reference");
    precompute(&config, &reference, &[]);
    let expected = shard_hashes(&fingerprint_dirs(&reference)[0]);
    let cache = tmp.path().join("cache");
    let mut child = precompute_command(&config, &cache)
        .args(["--slow-write-ms", "200"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !cache.exists() || count_shards(&cache) < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no shard appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "precompute finished before the signal"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    run_ok(std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(128 + 15), "{err}");
    assert!(
        err.contains("stopped on SIGTERM") && err.contains("dropped"),
        "{err}"
    );
    let dir = fingerprint_dirs(&cache)[0].clone();
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".tmp-")), "{names:?}");
    // Verify finds nothing corrupt: only the requested shards not computed yet.
    let v = pipeline()
        .args(["cache", "verify", "--cache"])
        .arg(&cache)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&v.stdout);
    let bad: Vec<&str> = report.lines().filter(|l| l.starts_with("BAD")).collect();
    assert!(
        !bad.is_empty() && bad.iter().all(|l| l.ends_with("has no cache shard")),
        "{report}"
    );
    let done = shard_hashes(&dir);
    assert!(!done.is_empty() && done.len() < expected.len(), "{done:?}");
    precompute(&config, &cache, &[]);
    run_ok(pipeline().args(["cache", "verify", "--cache"]).arg(&cache));
    assert_eq!(shard_hashes(&dir), expected);
}

/// `precompute.encoder` may name a CLIP folder (`encoders init --preset tiny-clip`): `encoders check`
/// names the family, the cache's `features` field has CLIP's grid and width at the input size asked
/// for, its values are the encoder's own patch tokens of the stored crop (CLIP preprocessing), and
/// its fingerprint directory is not the DINOv2 one.
#[test]
fn a_clip_encoder_fills_the_features_field() {
    use model::vision::VisionEncoder;
    use tch::{Device, Kind, Tensor};

    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path(), 1);
    let clip = tmp.path().join("clip");
    let init = |out: &Path| {
        run_ok(
            pipeline()
                .args(["encoders", "init", "--preset", "tiny-clip", "--seed", "3"])
                .arg("--out")
                .arg(out),
        )
    };
    let o = init(&clip);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("CLIP ViT-custom/56, 2 layers"), "{stdout}");
    // The published CLIPVisionModel layout, and the same files for the same seed.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(clip.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "clip_vision_model");
    let again = tmp.path().join("clip-again");
    init(&again);
    for file in ["config.json", "model.safetensors"] {
        assert_eq!(
            std::fs::read(clip.join(file)).unwrap(),
            std::fs::read(again.join(file)).unwrap(),
            "{file}"
        );
    }
    let names = model::weights::read_safetensors(&clip.join("model.safetensors")).unwrap();
    for name in [
        "embeddings.class_embedding",
        "embeddings.patch_embedding.weight",
        "embeddings.position_embedding.weight",
        "pre_layrnorm.weight",
        "encoder.layers.1.self_attn.q_proj.bias",
        "encoder.layers.1.mlp.fc2.weight",
        "post_layernorm.bias",
    ] {
        assert!(names.contains_key(name), "{name} missing");
    }

    let o = run_ok(
        pipeline()
            .args(["encoders", "check", "--device", "cpu", "--image-size", "64"])
            .arg("--encoder")
            .arg(&clip),
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let fingerprint = model::clip::fingerprint(&clip).unwrap();
    for line in [
        "family: clip".to_string(),
        "tokens: width 32, grid 4x4 (16 tokens) at 224 px".to_string(),
        format!("fingerprint: {fingerprint}"),
        "patch tokens [1, 16, 32]".to_string(),
    ] {
        assert!(stdout.contains(&line), "missing `{line}` in:\n{stdout}");
    }
    let o = run_ok(
        pipeline()
            .args(["encoders", "check", "--device", "cpu", "--image-size", "64"])
            .args(["--encoder-input-size", "112", "--encoder"])
            .arg(tmp.path().join("enc/dinov2")),
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("family: dinov2") && stdout.contains("grid 2x2 (4 tokens) at 112 px"),
        "{stdout}"
    );

    // One shard with DINOv2, then with CLIP at 224 px and at 112 px: three fingerprint directories.
    let cache = tmp.path().join("cache");
    let first = format!("{}/data/demo-000000.tar", tmp.path().display());
    let use_clip = format!("precompute.encoder={:?}", clip.display().to_string());
    precompute(&config, &cache, &["--shards", &first]);
    precompute(&config, &cache, &["--shards", &first, "--set", &use_clip]);
    let small = [
        "--shards",
        &first,
        "--set",
        &use_clip,
        "--set",
        "precompute.encoder_input_size=112",
    ];
    precompute(&config, &cache, &small);
    let dirs = fingerprint_dirs(&cache);
    assert_eq!(dirs.len(), 3, "{dirs:?}");
    let mut kinds = Vec::new();
    for dir in &dirs {
        let m = stages::cache::Manifest::load(dir).unwrap().unwrap();
        let encoder = &m.settings["encoder"];
        kinds.push(encoder["kind"].as_str().unwrap().to_string());
        let mut reader = stages::cache::ShardReader::open(&dir.join("demo-000000.fbc")).unwrap();
        let features = reader
            .footer()
            .fields
            .iter()
            .find(|f| f.name == "features")
            .unwrap()
            .shape
            .clone();
        if encoder["kind"] != "clip" {
            assert_eq!(features, [2, 16, 32]);
            continue;
        }
        assert_eq!(encoder["fingerprint"], fingerprint.as_str());
        let size = encoder["input_size"].as_i64().unwrap();
        let grid = (size / 56) as usize;
        assert_eq!(features, [2, grid * grid, 32], "at {size} px");
        // View 0 of each sample is CLIP's tokens of the stored crop, to f16 rounding.
        let n = reader.n_samples() as i64;
        let images = Tensor::from_slice(&reader.read_field("image").unwrap())
            .view([n, 32, 32, 3])
            .permute([0, 3, 1, 2]);
        let bytes = reader.read_field("features").unwrap();
        let cached = Tensor::from_data_size(&bytes, &[n, 2, (grid * grid) as i64, 32], Kind::Half)
            .to_kind(Kind::Float)
            .select(1, 0);
        let encoder = VisionEncoder::from_folder(&clip, Device::Cpu).unwrap();
        let expected = encoder.patch_tokens(&images, size).unwrap();
        let err = (&cached - &expected).abs().max().double_value(&[]);
        let scale = expected.abs().max().double_value(&[]);
        assert!(
            err <= 2e-3 * scale,
            "at {size} px: max|Δ| {err} vs scale {scale}"
        );
    }
    kinds.sort();
    assert_eq!(kinds, ["clip", "clip", "dinov2"]);
}
