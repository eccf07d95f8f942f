//! The binary as a user meets it: help without any environment, configs, overrides.

mod common;
use common::*;

#[test]
fn help_runs_in_a_plain_shell() {
    // No LD_LIBRARY_PATH: libtorch must be found through the binary's rpath.
    for args in [
        &["--help"][..],
        &["demo-data", "--help"],
        &["config", "--help"],
    ] {
        let out = run_ok(
            pipeline()
                .env_remove("LD_LIBRARY_PATH")
                .env_remove("LIBTORCH")
                .args(args),
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{args:?}"
        );
    }
}

/// Every option of `demo-data --help` has a description of its own (not empty, not its name again):
/// the old check passed any line longer than the flag, which a bare `--out <OUT>` already is.
#[test]
fn every_flag_is_documented() {
    let out = run_ok(pipeline().args(["demo-data", "--help"]));
    let help = String::from_utf8_lossy(&out.stdout);
    assert_flags_documented(
        "demo-data",
        &help,
        &[
            "--out",
            "--classes",
            "--per-class",
            "--shards",
            "--seed",
            "--odd",
        ],
    );
}

#[test]
fn unknown_config_key_names_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.toml");
    std::fs::write(&path, "[data]\nseed = 3\nshufle_buffer = 10\n").unwrap();
    let out = pipeline()
        .args(["config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("shufle_buffer") && stderr.contains("typo.toml"),
        "{stderr}"
    );
}

#[test]
fn set_overrides_a_preset() {
    let preset = repo_root().join("configs/demo.toml");
    let base = run_ok(pipeline().args(["config", "--config"]).arg(&preset));
    let base: toml::Table = toml::from_str(&String::from_utf8_lossy(&base.stdout)).unwrap();
    assert_eq!(base["data"]["seed"].as_integer(), Some(0));
    let out = run_ok(pipeline().args(["config", "--config"]).arg(&preset).args([
        "--set",
        "data.seed=41",
        "--set",
        "data.shards=/data/imagenet/imagenet-train-{000000..001281}.tar",
    ]));
    let effective: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(effective["data"]["seed"].as_integer(), Some(41));
    assert_eq!(
        effective["data"]["shards"].as_str(),
        Some("/data/imagenet/imagenet-train-{000000..001281}.tar")
    );
    let bad = pipeline()
        .args(["config", "--set", "data.nope=1"])
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("nope"));
}

/// A CUDA device that is not there is refused before any work, with the devices that are.
#[test]
fn an_absent_device_is_refused_with_the_list() {
    let dir = tempfile::tempdir().unwrap();
    let o = pipeline()
        .args([
            "sample",
            "--device",
            "cuda:99",
            "--num",
            "1",
            "--checkpoint",
        ])
        .arg(dir.path().join("none.safetensors"))
        .arg("--out")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("cuda:99") && err.contains("cpu"),
        "{err}"
    );
}
