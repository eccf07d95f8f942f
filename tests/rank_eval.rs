//! `sample`, `classify`, `bpd` and `fid` as torchrun launches them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
//! MASTER_PORT), two ranks on the CPU over Gloo on 127.0.0.1: rank 0's joined outputs are the bytes one
//! process writes at the same --batch, the slice boundaries falling inside a batch list that crosses
//! shards (a stream) or restarts at each shard (a cache), and no part file is left behind.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tch::{Device, Kind, Tensor};

/// Runs `make(rank)` as every rank of a `world`-rank job and returns the outputs in rank order.
fn launch(world: usize, make: impl Fn(usize) -> Command) -> Vec<Output> {
    let port = free_port();
    let children: Vec<_> = (0..world)
        .map(|r| {
            make(r)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .args(["--dist-timeout-s", "60"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

/// As [`launch`], every rank succeeding.
fn ranks(world: usize, make: impl Fn(usize) -> Command) -> Vec<Output> {
    launch(world, make)
        .into_iter()
        .enumerate()
        .map(|(r, o)| {
            assert!(
                o.status.success(),
                "rank {r} failed:\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            o
        })
        .collect()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every file under `dir` (relative path, bytes), sorted: equal listings mean equal trees.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "output-of.json") {
                // The marker records the command line, whose --out differs between the runs compared.
                continue;
            } else {
                files.push((
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    files.sort();
    files
}

fn names(files: &[(PathBuf, Vec<u8>)]) -> Vec<String> {
    files.iter().map(|(p, _)| p.display().to_string()).collect()
}

#[test]
fn two_ranks_sample_what_one_process_samples() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = perturbed_checkpoint(dir.path(), "tiny", 0.02);
    // 7 samples in batches of 2: rank 0 draws batches 0-1 (samples 0..4), rank 1 batches 2-3 (4..7).
    let sample = |out: &Path| {
        let mut cmd = pipeline();
        cmd.args(["sample", "--device", "cpu", "--checkpoint"])
            .arg(&ckpt)
            .args([
                "--num",
                "7",
                "--batch",
                "2",
                "--seed",
                "5",
                "--grid-max",
                "6",
            ])
            .arg("--out")
            .arg(out);
        cmd
    };
    let one = dir.path().join("one");
    let single = stdout(&run_ok(&mut sample(&one)));
    let two = dir.path().join("two");
    let outs = ranks(2, |_| sample(&two));
    let (a, b) = (tree(&one), tree(&two));
    assert_eq!(names(&a), names(&b));
    assert!(names(&b).contains(&"images/000006.png".to_string()));
    assert!(
        a == b,
        "samples.npz, grid.png or an image differs between 1 and 2 ranks"
    );
    // Rank 0 reports what one process reports (the redraws summed over the ranks); rank 1 is quiet.
    let joined = stdout(&outs[0]);
    assert_eq!(
        joined
            .replace(two.to_str().unwrap(), "OUT")
            .replace("ranks: 2\n", ""),
        single.replace(one.to_str().unwrap(), "OUT")
    );
    assert!(single.contains("redrawn for NaN/Inf: "), "{single}");
    assert_eq!(stdout(&outs[1]), "");

    // One rank failing fails both, promptly (not at the timeout): rank 1's error is its own, rank 0's
    // names rank 1.
    let missing = dir.path().join("missing.safetensors");
    let started = std::time::Instant::now();
    let outs = launch(2, |r| {
        let mut cmd = pipeline();
        cmd.args(["sample", "--device", "cpu", "--num", "2", "--checkpoint"])
            .arg(if r == 1 { &missing } else { &ckpt })
            .arg("--out")
            .arg(dir.path().join("failed"));
        cmd
    });
    let errs: Vec<String> = outs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert!(outs.iter().all(|o| !o.status.success()), "{errs:?}");
    assert!(
        errs[0].contains("rank 0 of 2: loading the model failed on rank(s) [1]"),
        "{}",
        errs[0]
    );
    assert!(
        errs[1].contains("rank 1 of 2: loading the model") && errs[1].contains("missing"),
        "{}",
        errs[1]
    );
    assert!(started.elapsed().as_secs() < 30, "{:?}", started.elapsed());
}

/// A precompute-style cache of 16×16 images in two shards of 5 and 9 samples, labels i % 10.
fn two_shard_cache(dir: &Path) -> PathBuf {
    use stages::cache::{DType, FieldSpec, Manifest, ManifestShard, ShardWriter, SourceShard};
    let cache = dir.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    tch::manual_seed(3);
    let mut entries = Vec::new();
    let mut i = 0;
    for (s, n) in [5, 9].into_iter().enumerate() {
        let fields = vec![
            FieldSpec::new("label", DType::I64, &[]),
            FieldSpec::new("image", DType::U8, &[16, 16, 3]),
        ];
        let file = format!("eval-{s:06}.fbc");
        let mut writer = ShardWriter::create(&cache.join(&file), fields, 8, 3).unwrap();
        for _ in 0..n {
            let image = Tensor::randint(256, [16, 16, 3], (Kind::Uint8, Device::Cpu));
            let bytes = Vec::<u8>::try_from(image.flatten(0, -1)).unwrap();
            let label = (i % 10) as i64;
            writer
                .push(&format!("{i:06}"), &[&label.to_le_bytes(), &bytes])
                .unwrap();
            i += 1;
        }
        entries.push(ManifestShard {
            file,
            source: SourceShard {
                name: format!("eval-{s:06}.tar"),
                size: 0,
                content_hash: String::new(),
                remote: None,
            },
            summary: writer.finish(serde_json::json!({})).unwrap(),
        });
    }
    Manifest::record(&cache, &serde_json::json!({"test": true}), entries).unwrap();
    cache
}

#[test]
fn two_ranks_classify_and_score_what_one_process_does() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ckpt = perturbed_checkpoint(root, "tiny", 0.02);
    demo_data(&root.join("data"), 10, 2, 2, 3, &[]);
    let shards = root.join("data/demo-{000000..000001}.tar");
    let cache = two_shard_cache(root);
    // Batches of 3 over the 20-image stream: 7 batches, rank 0 takes 3 (0..9), rank 1 4 (9..20), and a
    // batch crosses the shard boundary. Batches of 2 over the cache restart at its second shard: 3 + 5
    // batches, rank 0 takes shard 0 and the first batch of shard 1.
    for (data, batch) in [
        (shards.to_str().unwrap(), "3"),
        (cache.to_str().unwrap(), "2"),
    ] {
        let classify = |out: &Path| {
            let mut cmd = pipeline();
            cmd.args(["classify", "--device", "cpu", "--checkpoint"])
                .arg(&ckpt)
                .args(["--data", data, "--batch", batch, "--limit", "20", "--out"])
                .arg(out);
            cmd
        };
        let tag = if data.ends_with(".tar") {
            "shards"
        } else {
            "cache"
        };
        let one = root.join(format!("classify-one-{tag}"));
        let single = stdout(&run_ok(&mut classify(&one)));
        let two = root.join(format!("classify-two-{tag}"));
        let outs = ranks(2, |_| classify(&two));
        let (a, b) = (tree(&one), tree(&two));
        assert_eq!(
            names(&b),
            ["confusion.csv", "predictions.csv", "summary.json"],
            "{tag}"
        );
        assert!(
            a == b,
            "{tag}: classify outputs differ between 1 and 2 ranks"
        );
        let rows = std::fs::read_to_string(two.join("predictions.csv")).unwrap();
        assert_eq!(
            rows.lines().count(),
            if tag == "shards" { 21 } else { 15 },
            "{tag}"
        );
        assert_eq!(
            stdout(&outs[0]).replace(two.to_str().unwrap(), "OUT"),
            single.replace(one.to_str().unwrap(), "OUT"),
            "{tag}"
        );

        let bpd = |inputs: &Path| {
            let mut cmd = pipeline();
            cmd.args(["bpd", "--device", "cpu", "--seed", "9", "--checkpoint"])
                .arg(&ckpt)
                .args(["--data", data, "--batch", batch, "--limit", "20"])
                .arg("--save-inputs")
                .arg(inputs);
            cmd
        };
        let (one, two) = (
            root.join(format!("inputs-one-{tag}.safetensors")),
            root.join(format!("inputs-two-{tag}.safetensors")),
        );
        let single = stdout(&run_ok(&mut bpd(&one)));
        let outs = ranks(2, |_| bpd(&two));
        // The same dequantisation noise per image and the same per-image values: the same digits, and
        // the same saved inputs.
        assert_eq!(
            stdout(&outs[0]).replace(two.to_str().unwrap(), "FILE"),
            single.replace(one.to_str().unwrap(), "FILE"),
            "{tag}"
        );
        assert_eq!(stdout(&outs[1]), "", "{tag}");
        assert!(
            std::fs::read(&one).unwrap() == std::fs::read(&two).unwrap(),
            "{tag}: --save-inputs differs between 1 and 2 ranks"
        );
    }
    let left: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".part-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Without a known length a stream cannot be split: every rank fails, naming itself and the flag.
    let outs = launch(2, |_| {
        let mut cmd = pipeline();
        cmd.args(["bpd", "--device", "cpu", "--checkpoint"])
            .arg(&ckpt)
            .args(["--data", shards.to_str().unwrap()]);
        cmd
    });
    for (r, o) in outs.iter().enumerate() {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "rank {r}: {err}");
        assert!(
            err.contains(&format!("rank {r} of 2")) && err.contains("--limit"),
            "rank {r}: {err}"
        );
    }
}

fn fid_cmd(samples: &Path, reference: &Path, weights: &Path, out: &Path) -> Command {
    let mut cmd = pipeline();
    cmd.args(["fid", "--batch", "2", "--device", "cpu", "--samples"])
        .arg(samples)
        .arg("--ref")
        .arg(reference)
        .arg("--weights")
        .arg(weights)
        .arg("--out")
        .arg(out);
    cmd
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn assert_same_scores(a: &serde_json::Value, b: &serde_json::Value) {
    for key in ["fid", "inception_score", "inception_score_std", "samples"] {
        assert_eq!(a[key], b[key], "{key}: {a} vs {b}");
    }
}

#[test]
fn two_ranks_score_fid_as_one_process_does() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (weights, reference) = inception_and_reference(root);
    // 7 images in batches of 2: 4 batches, rank 0 takes batches 0 and 2, rank 1 batches 1 and 3 (the
    // short one).
    let samples = root.join("samples.npz");
    let code = "import sys, numpy as np; r = np.random.default_rng(0); \
                np.savez(sys.argv[1], arr_0=r.integers(0, 256, (7, 80, 80, 3), dtype=np.uint8))";
    run_ok(python().args(["-c", code]).arg(&samples));
    let one = root.join("one/fid.json");
    std::fs::create_dir_all(one.parent().unwrap()).unwrap();
    run_ok(&mut fid_cmd(&samples, &reference, &weights, &one));
    let two = root.join("two/fid.json");
    std::fs::create_dir_all(two.parent().unwrap()).unwrap();
    let outs = ranks(2, |_| fid_cmd(&samples, &reference, &weights, &two));
    assert_same_scores(&read_json(&one), &read_json(&two));
    assert!(
        stdout(&outs[0]).contains("ranks: 2"),
        "{}",
        stdout(&outs[0])
    );
    assert!(stdout(&outs[1]).is_empty(), "{}", stdout(&outs[1]));
    assert_eq!(
        names(&tree(&root.join("two"))),
        ["fid.json"],
        "feature parts are removed after the join"
    );
}

#[test]
fn sample_with_fid_ref_scores_what_fid_scores_on_one_or_two_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (weights, reference) = inception_and_reference(root);
    let ckpt = perturbed_checkpoint(root, "tiny", 0.02);
    let sample = |out: &Path| {
        let mut cmd = pipeline();
        cmd.args(["sample", "--device", "cpu", "--no-png", "--checkpoint"])
            .arg(&ckpt)
            .args(["--num", "7", "--batch", "2", "--seed", "3", "--fid-ref"])
            .arg(&reference)
            .arg("--fid-weights")
            .arg(&weights)
            .arg("--out")
            .arg(out);
        cmd
    };
    let one = root.join("one");
    let printed = stdout(&run_ok(&mut sample(&one)));
    assert!(
        printed.contains("FID: ") && printed.contains("Inception Score: "),
        "{printed}"
    );
    // The same numbers as `pipeline fid` on the written samples at the same batch size.
    let after = root.join("after.json");
    run_ok(&mut fid_cmd(
        &one.join("samples.npz"),
        &reference,
        &weights,
        &after,
    ));
    assert_same_scores(&read_json(&one.join("fid.json")), &read_json(&after));
    // Two ranks: rank 0 joins the features of both slices in order.
    let two = root.join("two");
    ranks(2, |_| sample(&two));
    assert_same_scores(
        &read_json(&one.join("fid.json")),
        &read_json(&two.join("fid.json")),
    );
    assert_eq!(
        names(&tree(&two)),
        ["fid.json", "grid.png", "samples.npz"],
        "feature parts are removed after the join"
    );
}
