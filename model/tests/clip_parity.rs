//! Parity of the CLIP vision tower with transformers' `CLIPVisionModel` on small random-init models
//! written by tests/python/clip_reference.py (fp32, CPU), and family dispatch of `VisionEncoder`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use model::clip::{self, Clip};
use model::frozen::Precision;
use model::vision::{Family, VisionEncoder};
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs the reference script into a fresh temporary folder.
fn references() -> (tempfile::TempDir, HashMap<String, Tensor>) {
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make test`, which creates the reference environment",
        python.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(python)
        .arg(repo_root().join("tests/python/clip_reference.py"))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "reference failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refs =
        model::weights::read_safetensors(&dir.path().join("references.safetensors")).unwrap();
    (dir, refs)
}

fn assert_close(tag: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.size(), want.size(), "{tag}: shape");
    let err = (got - want).abs().max().double_value(&[]);
    assert!(
        err < TOLERANCE,
        "{tag}: max |diff| {err:e} >= {TOLERANCE:e}"
    );
}

fn check_clip_folder(dir: &Path, refs: &HashMap<String, Tensor>) {
    let tag = dir.file_name().unwrap().to_string_lossy().to_string();
    let loaded = Clip::from_folder(dir, Device::Cpu).unwrap();
    let clip = &loaded.model;
    assert_eq!(clip.input_size(), 32);
    for name in ["default", "interp"] {
        let got = clip.forward(&refs[&format!("pixels_{name}")]).unwrap();
        assert_close(
            &format!("{tag} {name}"),
            &got,
            &refs[&format!("clip_{name}")],
        );
    }
    let got = clip.patch_tokens(&refs["images"], 32).unwrap();
    assert_close(&format!("{tag} uint8 images"), &got, &refs["clip_images"]);
}

#[test]
fn clip_matches_transformers_and_vision_encoder_dispatches_by_model_type() {
    let (dir, refs) = references();
    let root = dir.path();

    // Both layouts: transformers 5's bare CLIPVisionModel and a full CLIPModel with its text tower.
    check_clip_folder(&root.join("clip"), &refs);
    check_clip_folder(&root.join("clip_full"), &refs);

    let mut encoder = VisionEncoder::from_folder(&root.join("clip_full"), Device::Cpu).unwrap();
    assert_eq!(encoder.family(), Family::Clip);
    assert_eq!(encoder.default_input_size(), 32);
    assert_eq!((encoder.hidden_size(), encoder.grid(32)), (64, 4));
    let got = encoder.patch_tokens(&refs["images"], 32).unwrap();
    assert_close("VisionEncoder clip", &got, &refs["clip_images"]);
    assert_eq!(
        encoder.fingerprint().unwrap(),
        clip::fingerprint(&root.join("clip_full")).unwrap()
    );
    // The CUDA default, run on CPU: bf16 matmuls and convolutions, fp32 norms and residual stream.
    encoder.set_precision(Precision::Bf16);
    let got = encoder.patch_tokens(&refs["images"], 32).unwrap();
    assert_eq!(got.kind(), Kind::Float);
    let want = &refs["clip_images"];
    let err = (&got - want).norm().double_value(&[]) / want.norm().double_value(&[]);
    assert!(err > 0.0 && err < 5e-2, "bf16 relative error {err:e}");

    let encoder = VisionEncoder::from_folder(&root.join("dinov2"), Device::Cpu).unwrap();
    assert_eq!(encoder.family(), Family::Dinov2);
    let got = encoder.patch_tokens(&refs["images"], 32).unwrap();
    assert_close("VisionEncoder dinov2", &got, &refs["dinov2_images"]);
}
