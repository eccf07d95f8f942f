//! Data-parallel training as torchrun launches it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
//! MASTER_PORT), two ranks on the CPU over Gloo on 127.0.0.1: the replicas stay identical and equal a
//! single process that sees both ranks' batches; only rank 0 writes; a dead rank fails the job; a
//! checkpoint of two ranks resumes in one.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, metrics, pipeline, run_ok};
use tch::Tensor;

/// A tiny pixel flow with R-REPA over the demo data's precompute cache (tiny encoders).
fn setup(root: &Path) -> (PathBuf, Vec<String>) {
    common::demo_data(&root.join("data"), 4, 8, 2, 0, &[]);
    common::tiny_encoders(&root.join("encoders"));
    let mut sets = common::demo_paths(root, "demo-{000000..000001}.tar");
    sets.extend([
        "train.batch=4".into(),
        "train.metrics_every=1".into(),
        "train.sample_every=0".into(),
        "train.shuffle_buffer=0".into(),
        "train.dist_timeout_s=30".into(),
    ]);
    // One single-process precompute first, as docs/training.md says to do before a multi-rank run.
    let mut cmd = pipeline();
    cmd.args(["precompute", "--config"])
        .arg(common::repo_root().join("configs/demo.toml"));
    for s in &sets[..3] {
        cmd.arg("--set").arg(s);
    }
    cmd.arg("--cache").arg(root.join("cache"));
    run_ok(&mut cmd);
    (common::repo_root().join("configs/demo.toml"), sets)
}

fn train(config: &Path, sets: &[String], extra: &[&str], out: &Path) -> Command {
    let mut cmd = pipeline();
    cmd.args(["train", "--latent", "--config"]).arg(config);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    cmd.args(extra).arg("--out").arg(out);
    cmd
}

fn rank(mut cmd: Command, r: usize, port: u16) -> Child {
    cmd.env("RANK", r.to_string())
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", r.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Trains as ranks 0 and 1 of one group (outputs `out0`, `out1`) and returns rank 0's log.
fn train_two_ranks(
    config: &Path,
    sets: &[String],
    extra: &[&str],
    out0: &Path,
    out1: &Path,
) -> String {
    let port = free_port();
    let r0 = rank(train(config, sets, extra, out0), 0, port);
    let r1 = rank(train(config, sets, extra, out1), 1, port);
    let log0 = finish(r0, "rank 0");
    finish(r1, "rank 1");
    log0
}

fn finish(child: Child, what: &str) -> String {
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{what} failed:\n{err}");
    err
}

fn weights(out: &Path, step: &str) -> Vec<(String, Tensor)> {
    let mut v =
        Tensor::read_safetensors(out.join("checkpoints").join(step).join("model.safetensors"))
            .unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    a.iter()
        .zip(b)
        .map(|((n, x), (m, y))| {
            assert_eq!(n, m);
            (x.to_kind(tch::Kind::Double) - y.to_kind(tch::Kind::Double))
                .abs()
                .max()
                .double_value(&[])
        })
        .fold(0.0, f64::max)
}

#[test]
fn two_ranks_equal_one_process_over_both_ranks_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (config, sets) = setup(root);
    // lr 1e-6 bounds any AdamW sign flip from summation order to 2e-6 per step, so the weights must
    // agree to 1e-5; the gradient norms and losses, which a wrong average would change, are compared
    // relatively.
    let steps = [
        "--set",
        "train.steps=4",
        "--set",
        "train.lr=1e-6",
        "--set",
        "train.min_lr=1e-6",
        "--set",
        "train.checkpoint_every=2",
    ];
    let (out0, out1) = (root.join("rank0"), root.join("rank1"));
    let log0 = train_two_ranks(&config, &sets, &steps, &out0, &out1);
    assert!(log0.contains("2 replicas in sync"), "{log0}");
    // Only rank 0 writes: rank 1's --out was never created.
    assert!(out0
        .join("checkpoints/step-00000004/model.safetensors")
        .exists());
    assert!(!out1.exists(), "rank 1 wrote into {}", out1.display());
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out0.join("checkpoints/step-00000004/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["positions"].as_array().unwrap().len(), 2, "{state}");

    let union = root.join("union");
    let mut union_args = steps.to_vec();
    union_args.extend(["--union-of-ranks", "2"]);
    run_ok(&mut train(&config, &sets, &union_args, &union));
    let d = max_diff(
        &weights(&out0, "step-00000004"),
        &weights(&union, "step-00000004"),
    );
    assert!(
        d <= 1e-5,
        "2 ranks vs one process over both ranks' batches: max |Δ| = {d}"
    );
    let (m2, mu) = (metrics(&out0), metrics(&union));
    assert_eq!(m2.len(), 4);
    for (a, b) in m2.iter().zip(&mu) {
        for k in ["loss", "grad_norm"] {
            let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-4 * y.abs(),
                "step {}: {k} {x} vs {y}",
                a["step"]
            );
        }
    }
    // One process with the same per-step batch of 4 sees other batches and other gradients: the
    // comparison above can fail.
    let alone = root.join("alone");
    run_ok(&mut train(&config, &sets, &steps, &alone));
    let (x, y) = (
        metrics(&alone)[0]["grad_norm"].as_f64().unwrap(),
        mu[0]["grad_norm"].as_f64().unwrap(),
    );
    assert!((x - y).abs() > 1e-3 * y, "{x} vs {y}");

    // The two-rank checkpoint resumes in one process (the data order of the new split is documented).
    let mut more = sets.clone();
    more.push("train.steps=6".into());
    let o = run_ok(
        train(
            &config,
            &more,
            &[
                "--set",
                "train.lr=1e-6",
                "--set",
                "train.checkpoint_every=2",
                "--resume",
            ],
            &out0,
        )
        .env("RUST_LOG", "warn"),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("resuming 1 ranks from a checkpoint of 2"),
        "{err}"
    );
    assert_eq!(metrics(&out0).len(), 6);
}

/// `train.fid_every` with two ranks: each samples and scores a share of the batches and the
/// statistics are summed over the group; the scores equal one process's over both ranks' batches
/// (whose weights agree to 1e-5), and only rank 0 writes them.
#[test]
fn two_ranks_share_the_fid_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (config, mut sets) = setup(root);
    let (weights, reference) = common::inception_and_reference(&root.join("inception"));
    sets.extend([
        "train.fid_every=2".to_string(),
        "train.fid_samples=5".to_string(),
        "train.fid_batch=2".to_string(),
        format!("train.fid_ref={}", reference.display()),
        format!("train.fid_weights={}", weights.display()),
    ]);
    let steps = [
        "--set",
        "train.steps=4",
        "--set",
        "train.lr=1e-6",
        "--set",
        "train.min_lr=1e-6",
    ];
    let (out0, out1) = (root.join("rank0"), root.join("rank1"));
    train_two_ranks(&config, &sets, &steps, &out0, &out1);
    assert!(!out1.exists(), "rank 1 wrote into {}", out1.display());
    let union = root.join("union");
    let mut union_args = steps.to_vec();
    union_args.extend(["--union-of-ranks", "2"]);
    run_ok(&mut train(&config, &sets, &union_args, &union));
    let fids = |out: &Path| -> Vec<serde_json::Value> {
        metrics(out)
            .into_iter()
            .filter(|l| l.get("fid").is_some())
            .collect()
    };
    let (two, one) = (fids(&out0), fids(&union));
    assert_eq!(two.len(), 2, "{two:?}");
    assert_eq!(one.len(), 2, "{one:?}");
    for (a, b) in two.iter().zip(&one) {
        assert_eq!(a["step"], b["step"]);
        assert_eq!(a["fid_samples"], 5);
        for k in ["fid", "inception_score"] {
            let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-3 * y.abs(),
                "step {}: {k} {x} (2 ranks) vs {y} (one process)",
                a["step"]
            );
        }
    }
}

#[test]
fn a_dead_rank_fails_the_job_instead_of_hanging_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (config, sets) = setup(root);
    let long = [
        "--set",
        "train.steps=100000",
        "--set",
        "train.checkpoint_every=0",
    ];
    let port = free_port();
    let out0 = root.join("run");
    let mut r0 = rank(train(&config, &sets, &long, &out0), 0, port);
    let mut r1 = rank(train(&config, &sets, &long, &root.join("run1")), 1, port);
    let start = Instant::now();
    while !out0.join("metrics.jsonl").exists()
        || std::fs::read_to_string(out0.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count()
            < 2
    {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "training never started"
        );
        assert!(r0.try_wait().unwrap().is_none(), "rank 0 stopped early");
        std::thread::sleep(Duration::from_millis(100));
    }
    r1.kill().unwrap();
    r1.wait().unwrap();
    let killed = Instant::now();
    let status = loop {
        if let Some(s) = r0.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "rank 0 still running 60 s after rank 1 died"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(r0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("error"), "{err}");
}

#[test]
fn bench_allreduce_reports_the_backends_bandwidth() {
    let port = free_port().to_string();
    let o = run_ok(pipeline().args([
        "bench",
        "allreduce",
        "--world",
        "2",
        "--mib",
        "4",
        "--repeats",
        "3",
        "--port",
        &port,
    ]));
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(line["world"], 2);
    assert_eq!(line["bytes"], 4.0 * (1 << 20) as f64);
    assert!(line["algo_gb_per_s"].as_f64().unwrap() > 0.0, "{line}");
    assert!(
        line["gradient_allreduce_s"].as_f64().unwrap() > 0.0,
        "{line}"
    );
}

/// A libtorch error in one rank's step (rank 1 only) stops both ranks at the same point of that step:
/// no mismatched collectives, no hang until the group's timeout, and rank 0 writes the checkpoint of the
/// last completed step, which both ranks' errors name.
#[test]
fn a_torch_error_on_one_rank_stops_both_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (config, sets) = setup(root);
    let steps = [
        "--set",
        "train.steps=50",
        "--set",
        "train.checkpoint_every=0",
        // Long enough that a hang would show: the ranks must not wait for it.
        "--set",
        "train.dist_timeout_s=120",
    ];
    let mut failing = steps.to_vec();
    failing.extend(["--inject-torch-error-at", "3"]);
    let port = free_port();
    let (out0, out1) = (root.join("run"), root.join("run1"));
    let start = Instant::now();
    let r0 = rank(train(&config, &sets, &steps, &out0), 0, port);
    let r1 = rank(train(&config, &sets, &failing, &out1), 1, port);
    let (o0, o1) = (
        r0.wait_with_output().unwrap(),
        r1.wait_with_output().unwrap(),
    );
    let (err0, err1) = (
        String::from_utf8_lossy(&o0.stderr),
        String::from_utf8_lossy(&o1.stderr),
    );
    assert!(
        start.elapsed() < Duration::from_secs(100),
        "the ranks took {:?} to stop",
        start.elapsed()
    );
    assert_eq!(o0.status.code(), Some(1), "rank 0:\n{err0}");
    assert_eq!(o1.status.code(), Some(1), "rank 1:\n{err1}");
    assert!(
        err1.contains("step 3: libtorch: ")
            && err1.contains("the checkpoint of step 3 (the last completed) was written"),
        "rank 1:\n{err1}"
    );
    assert!(
        err0.contains("step 3 failed on rank(s) [1]")
            && err0.contains("the checkpoint of step 3 (the last completed) was written"),
        "rank 0:\n{err0}"
    );
    assert!(
        !err0.contains("panicked") && !err1.contains("panicked"),
        "rank 0:\n{err0}\nrank 1:\n{err1}"
    );
    assert_eq!(
        std::fs::read_to_string(out0.join("checkpoints/latest"))
            .unwrap()
            .trim(),
        "step-00000003"
    );
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out0.join("checkpoints/step-00000003/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["positions"].as_array().unwrap().len(), 2, "{state}");
    assert!(!out1.exists(), "rank 1 wrote into {}", out1.display());
}

/// torchrun itself (the venv's) launches two CPU ranks: its agent already serves the rendezvous store
/// on MASTER_PORT and says so (`TORCHELASTIC_USE_AGENT_STORE=True`), so rank 0 joins that store instead
/// of binding the port a second time, and nothing in the log reports a failed bind.
#[test]
fn torchrun_launches_ranks_on_its_agent_store() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (config, sets) = setup(root);
    let out = root.join("run");
    let torchrun = common::repo_root().join(".venv/bin/torchrun");
    let port = free_port();
    let mut cmd = Command::new(&torchrun);
    cmd.args(["--no-python", "--nnodes", "1", "--nproc-per-node", "2"])
        .args(["--master-addr", "127.0.0.1", "--master-port"])
        .arg(port.to_string())
        .arg(env!("CARGO_BIN_EXE_pipeline"))
        .args(["train", "--latent", "--config"])
        .arg(&config);
    for s in &sets {
        cmd.arg("--set").arg(s);
    }
    cmd.args([
        "--set",
        "train.steps=2",
        "--set",
        "train.checkpoint_every=2",
    ])
    .arg("--out")
    .arg(&out)
    .env("RUST_LOG", "info")
    .env("OMP_NUM_THREADS", "1");
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", torchrun.display()));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{log}");
    assert!(log.contains("2 replicas in sync"), "{log}");
    assert!(
        !log.contains("failed to bind") && !log.contains("Address already in use"),
        "{log}"
    );
    assert!(out
        .join("checkpoints/step-00000002/model.safetensors")
        .exists());
}
