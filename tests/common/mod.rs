//! Helpers shared by the end-to-end tests: the built binary, the repository root, the reference Python.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A TCP port free on 127.0.0.1 now, for a process group's rendezvous.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The `pipeline` binary cargo built for this test run.
pub fn pipeline() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipeline"));
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// The Python of the project's `.venv`, which holds the reference packages (`make test` creates it).
pub fn python() -> Command {
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make test`, which creates the reference environment",
        python.display()
    );
    Command::new(python)
}

/// Runs `cmd`, panicking with its output when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `pipeline demo-data` into `out`: `classes` × `per_class` images over `shards` shards from `seed`,
/// plus `extra` flags (e.g. `--odd`).
pub fn demo_data(
    out: &Path,
    classes: usize,
    per_class: usize,
    shards: usize,
    seed: u64,
    extra: &[&str],
) {
    run_ok(
        pipeline()
            .arg("demo-data")
            .args([
                "--classes",
                &classes.to_string(),
                "--per-class",
                &per_class.to_string(),
            ])
            .args(["--shards", &shards.to_string(), "--seed", &seed.to_string()])
            .args(extra)
            .arg("--out")
            .arg(out),
    );
}

/// Tiny random-init DINOv2 and VAE (`pipeline encoders init --preset tiny`): OUT/dinov2 and OUT/vae.
pub fn tiny_encoders(out: &Path) {
    run_ok(
        pipeline()
            .args(["encoders", "init", "--preset", "tiny", "--out"])
            .arg(out),
    );
}

/// The `--set` values that point `configs/demo.toml` at a test's own files under `root`: the demo shards
/// `data/<shards>` (`demo_data`), the tiny encoders `encoders/` (`tiny_encoders`) and the cache `cache/`.
pub fn demo_paths(root: &Path, shards: &str) -> Vec<String> {
    vec![
        format!("data.shards={}/data/{shards}", root.display()),
        format!("precompute.encoder={}/encoders/dinov2", root.display()),
        format!("precompute.vae={}/encoders/vae", root.display()),
        format!("train.cache={}/cache", root.display()),
    ]
}

/// `pipeline train --latent` on `configs/demo.toml` pointed at `root`'s demo files (`demo_paths`), with
/// `sets` as further `--set` values, writing to `out`.
pub fn demo_train(root: &Path, shards: &str, out: &Path, sets: &[String]) -> Command {
    let mut cmd = pipeline();
    cmd.args(["train", "--latent", "--config"])
        .arg(repo_root().join("configs/demo.toml"))
        .arg("--out")
        .arg(out);
    for set in demo_paths(root, shards).iter().chain(sets) {
        cmd.arg("--set").arg(set);
    }
    cmd
}

/// The lines of `RUN_DIR/metrics.jsonl`.
pub fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `demo_train` run to completion into `root/<out>`, returning its metrics lines.
pub fn demo_run(root: &Path, shards: &str, out: &str, sets: &[&str]) -> Vec<serde_json::Value> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    run_ok(&mut demo_train(root, shards, &root.join(out), &sets));
    metrics(&root.join(out))
}

/// `flow init --preset PRESET`, then every tensor perturbed so that the flow is not the identity
/// (TARFlow starts with zero output projections), under a new name with its sidecar.
pub fn perturbed_checkpoint(dir: &Path, preset: &str, scale: f64) -> PathBuf {
    let init = dir.join(format!("{preset}-init.safetensors"));
    run_ok(
        pipeline()
            .args([
                "flow", "init", "--preset", preset, "--seed", "2", "--output",
            ])
            .arg(&init),
    );
    tch::manual_seed(7);
    let named: Vec<(String, tch::Tensor)> = tch::Tensor::read_safetensors(&init)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            if t.is_floating_point() {
                (n, &t + tch::Tensor::randn_like(&t) * scale)
            } else {
                (n, t)
            }
        })
        .collect();
    let ckpt = dir.join(format!("{preset}.safetensors"));
    tch::Tensor::write_safetensors(&named, &ckpt).unwrap();
    std::fs::copy(
        init.with_extension("model.toml"),
        ckpt.with_extension("model.toml"),
    )
    .unwrap();
    ckpt
}

/// Reference tensors a Python script wrote as safetensors; tensors are not `Sync`, so each test reads
/// its own copy.
pub struct References(std::collections::HashMap<String, tch::Tensor>);

impl References {
    pub fn load(path: &Path) -> Self {
        References(
            model::weights::read_safetensors(path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        )
    }

    pub fn get(&self, name: &str) -> &tch::Tensor {
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("reference `{name}` missing"))
    }

    pub fn scalar(&self, name: &str) -> f64 {
        self.get(name).double_value(&[])
    }
}

/// A random-init FID Inception and random reference statistics under `root`: (weights, reference).
pub fn inception_and_reference(root: &Path) -> (PathBuf, PathBuf) {
    run_ok(
        pipeline()
            .args(["encoders", "init", "--preset", "inception", "--out"])
            .arg(root),
    );
    let reference = root.join("ref.npz");
    let code = "import sys, numpy as np; r = np.random.default_rng(1); \
                a = r.standard_normal((2048, 32)) * 0.1; \
                np.savez(sys.argv[1], mu=r.standard_normal(2048) * 0.1, sigma=a @ a.T)";
    run_ok(python().args(["-c", code]).arg(&reference));
    (root.join("inception.safetensors"), reference)
}

/// The options of a clap `--help` text, each long flag with its description (the text after the flag
/// and its value name, on the same line or on the indented lines below it, `[default: …]` and
/// `[possible values: …]` removed). Panics on an option line it cannot read, so a format change is
/// seen rather than passed.
pub fn help_flags(help: &str) -> Vec<(String, String)> {
    let mut flags: Vec<(String, String)> = Vec::new();
    let mut in_options = false;
    for line in help.lines() {
        if line.ends_with(':') && !line.starts_with(' ') {
            in_options = line.trim_end_matches(':').ends_with("Options");
            continue;
        }
        if !in_options || line.trim().is_empty() {
            continue;
        }
        let trimmed = line.trim_start();
        if trimmed.starts_with('-') {
            // `-h, --help  Print help` or `--out <OUT>  Output directory …` or `--bf16` (text below).
            let long = trimmed
                .split([' ', ','])
                .find(|w| w.starts_with("--"))
                .unwrap_or_else(|| panic!("no long flag in help line {line:?}"));
            let rest = trimmed[trimmed.find(long).unwrap() + long.len()..].trim_start();
            // Skip the value names (`<OUT>`, `[<N>...]`) that follow the flag.
            let mut text = rest;
            while text.starts_with('<') || text.starts_with("[<") {
                let end = text.find('>').unwrap() + 1;
                text = text[end..].trim_start_matches([']', '.']).trim_start();
            }
            flags.push((long.to_string(), text.to_string()));
        } else if let Some((_, text)) = flags.last_mut() {
            text.push(' ');
            text.push_str(trimmed);
        }
    }
    for (_, text) in &mut flags {
        for bracket in ["[default:", "[possible values:", "[aliases:"] {
            while let Some(start) = text.find(bracket) {
                let end = text[start..]
                    .find(']')
                    .map_or(text.len(), |e| start + e + 1);
                text.replace_range(start..end, "");
            }
        }
        *text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    }
    flags
}

/// Asserts that `help` lists every one of `expected` and that every flag it lists has a description of
/// its own: non-empty, and not merely the flag's name or its value name restated.
pub fn assert_flags_documented(what: &str, help: &str, expected: &[&str]) {
    let flags = help_flags(help);
    for flag in expected {
        assert!(
            flags.iter().any(|(f, _)| f == flag),
            "{what}: {flag} missing:\n{help}"
        );
    }
    let words = |s: &str| -> String {
        s.trim_start_matches('-')
            .chars()
            .map(|c| {
                if c.is_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    ' '
                }
            })
            .collect::<String>()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    for (flag, text) in &flags {
        let described = words(text);
        assert!(
            !described.is_empty() && described != words(flag),
            "{what}: {flag} has no description of its own ({text:?}):\n{help}"
        );
        // At least two words: a one-word label ("Seed", "Output") says no more than the name does.
        assert!(
            described.split(' ').count() >= 2,
            "{what}: {flag} is described only by {text:?}:\n{help}"
        );
    }
}
