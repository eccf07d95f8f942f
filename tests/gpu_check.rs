//! `scripts/gpu-check.sh --cpu`: the GPU acceptance script's whole sequence on the CPU at tiny sizes, with
//! this build's debug binary, so that the script cannot rot between the rare runs on a GPU machine. Every
//! row must be PASS or SKIP (only what needs a GPU skips), and a step broken on purpose
//! (`GPU_CHECK_BREAK=<check>`) must make its row FAIL and the script exit non-zero.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use common::repo_root;

/// Every check of the script, in its order.
const CHECKS: &[&str] = &[
    "libraries",
    "driver",
    "demo-data",
    "cuda-seen",
    "ext-tests",
    "model-tests",
    "nccl",
    "bench-flow-small",
    "bench-flow-large",
    "solvers",
    "precompute",
    "encode-base",
    "train",
    "sample",
    "classify",
    "bpd",
    "dry-run-latent",
];

/// What may SKIP on the CPU, and why: no GPU (nvidia-smi, NCCL), or unit-test binaries that this
/// `cargo test` invocation did not build (a workspace run builds them, and then they run).
fn may_skip(name: &str, figure: &str) -> bool {
    match name {
        "driver" => figure.contains("no GPU"),
        "nccl" => figure.contains("NCCL needs a GPU") && figure.contains("gloo passed"),
        "ext-tests" | "model-tests" => figure.contains("not built"),
        _ => false,
    }
}

fn gpu_check(out: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("scripts/gpu-check.sh"))
        .arg("--cpu")
        .arg(out)
        .current_dir(repo_root())
        .env("PIPELINE", env!("CARGO_BIN_EXE_pipeline"))
        .env_remove("GPU_CHECK_ONLY")
        .env_remove("GPU_CHECK_PACK")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running scripts/gpu-check.sh")
}

/// The rows of OUT/gpu-check.json as (name, status, figure), checking each row's fields.
fn rows(out: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(out.join("gpu-check.json")).expect("gpu-check.json");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(doc["mode"], "cpu", "{text}");
    doc["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|row| {
            assert!(row["seconds"].is_u64(), "{row}");
            let log = row["log"].as_str().expect("log");
            assert!(out.join(log).exists(), "{log} missing");
            (
                row["name"].as_str().unwrap().to_string(),
                row["status"].as_str().unwrap().to_string(),
                row["figure"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn show(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn cpu_mode_runs_every_check_and_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let output = gpu_check(tmp.path(), &[]);
    // The table, in the log of `cargo test -- --nocapture` (and of any failure).
    println!(
        "{}\n(gpu-check --cpu took {:.0} s)",
        String::from_utf8_lossy(&output.stdout),
        start.elapsed().as_secs_f64()
    );
    let rows = rows(tmp.path());
    let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(names, CHECKS, "{}", show(&output));
    for (name, status, figure) in &rows {
        assert!(
            status == "PASS" || (status == "SKIP" && may_skip(name, figure)),
            "{name}: {status} ({figure})\n{}",
            show(&output)
        );
    }
    assert!(output.status.success(), "{}", show(&output));
    let skipped: Vec<&str> = rows
        .iter()
        .filter(|r| r.1 == "SKIP")
        .map(|r| r.0.as_str())
        .collect();
    println!("gpu-check --cpu skipped (no GPU here): {skipped:?}");
}

#[test]
fn a_step_broken_on_purpose_fails_its_row_and_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    // Two checks: the demo data, then a precompute whose command gets an unknown flag.
    let output = gpu_check(
        tmp.path(),
        &[
            ("GPU_CHECK_ONLY", "demo-data,precompute"),
            ("GPU_CHECK_BREAK", "precompute"),
        ],
    );
    assert!(!output.status.success(), "{}", show(&output));
    let rows = rows(tmp.path());
    assert_eq!(rows.len(), CHECKS.len(), "{}", show(&output));
    for (name, status, figure) in &rows {
        let expected = match name.as_str() {
            "demo-data" => "PASS",
            "precompute" => "FAIL",
            _ => "SKIP",
        };
        assert_eq!(status, expected, "{name}: {figure}\n{}", show(&output));
    }
    let log = std::fs::read_to_string(tmp.path().join("logs/precompute.log")).unwrap();
    assert!(log.contains("--gpu-check-broken-on-purpose"), "{log}");
}
