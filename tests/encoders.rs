//! The frozen encoders against their references: small random-init DINOv2 (transformers) and
//! AutoencoderKL (diffusers) models written by tests/python/make_encoder_references.py, compared in fp32
//! on fixed inputs; strict loading errors; fingerprints; and `pipeline encoders check`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use model::dinov2::{self, Dinov2};
use model::frozen::Precision;
use model::vae::{self, AttentionNaming, AutoencoderKl};
use model::weights;
use tch::{Device, Kind, Tensor};

/// The Python script runs once per test binary; every test reads its folders.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("encoder_references");
        let _ = std::fs::remove_dir_all(&dir);
        let script = common::repo_root().join("tests/python/make_encoder_references.py");
        common::run_ok(common::python().arg(script).arg(&dir));
        dir
    })
}

fn references() -> common::References {
    common::References::load(&fixtures().join("references.safetensors"))
}

/// max |a − b| / max |b|: the error relative to the output's scale.
fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size(), "shapes differ");
    let diff = (actual.to_kind(Kind::Double) - expected.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[]);
    let scale = expected.to_kind(Kind::Double).abs().max().double_value(&[]);
    diff / scale.max(1e-12)
}

fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tolerance: f64) {
    let err = relative_error(actual, expected);
    assert!(
        err <= tolerance,
        "{what}: max|Δ| / max|ref| = {err:e} > {tolerance:e}"
    );
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a - b).abs().max().double_value(&[])
}

#[test]
fn preprocessing_matches_torch_for_256_and_64_px() {
    let refs = references();
    for size in ["256", "64"] {
        let prepared =
            dinov2::prepare_input(refs.get(&format!("images_{size}")), dinov2::INPUT_SIZE).unwrap();
        assert_eq!(prepared.size(), [2, 3, 224, 224]);
        let diff = max_abs_diff(&prepared, refs.get(&format!("prepared_{size}")));
        assert!(diff <= 1e-5, "{size} px: max|Δ| = {diff:e}");
    }
    let vae_input = vae::prepare_input(refs.get("vae_images")).unwrap();
    assert!(max_abs_diff(&vae_input, refs.get("vae_input")) <= 1e-6);

    let floats = Tensor::zeros([1, 3, 8, 8], (Kind::Float, Device::Cpu));
    let msg = dinov2::prepare_input(&floats, 224).unwrap_err().to_string();
    assert!(msg.contains("uint8"), "{msg}");
}

#[test]
fn dinov2_at_224_from_the_518_px_table_matches_transformers() {
    let refs = references();
    let loaded = Dinov2::from_folder(&fixtures().join("dinov2"), Device::Cpu).unwrap();
    assert_eq!(loaded.model.config.position_grid(), 37);
    let tokens = loaded.model.forward(refs.get("prepared_256")).unwrap();
    assert_eq!(tokens.size(), [2, 256, 48]);
    assert_close(
        "dinov2 256 px",
        &tokens,
        refs.get("dinov2_tokens_256"),
        1e-4,
    );

    // uint8 64-px images through the whole path: prepare (64 → 224) and forward.
    let tokens = loaded
        .model
        .patch_tokens(refs.get("images_64"), model::dinov2::INPUT_SIZE)
        .unwrap();
    assert_close("dinov2 64 px", &tokens, refs.get("dinov2_tokens_64"), 1e-4);
}

#[test]
fn dinov2_with_registers_matches_transformers() {
    let refs = references();
    let loaded = Dinov2::from_folder(&fixtures().join("dinov2_reg"), Device::Cpu).unwrap();
    assert_eq!(loaded.model.config.registers(), 4);
    let tokens = loaded.model.forward(refs.get("prepared_256")).unwrap();
    assert_eq!(
        tokens.size(),
        [2, 256, 48],
        "registers and CLS are excluded"
    );
    assert_close(
        "dinov2 registers",
        &tokens,
        refs.get("dinov2_reg_tokens_256"),
        1e-4,
    );
}

#[test]
fn dinov2_swiglu_at_its_native_grid_matches_transformers() {
    let refs = references();
    let loaded = Dinov2::from_folder(&fixtures().join("dinov2_swiglu"), Device::Cpu).unwrap();
    let tokens = loaded.model.forward(refs.get("swiglu_pixels")).unwrap();
    assert_eq!(tokens.size(), [2, 16, 48]);
    assert_close(
        "dinov2 swiglu",
        &tokens,
        refs.get("dinov2_swiglu_tokens"),
        1e-4,
    );
}

#[test]
fn vae_with_current_and_legacy_attention_names_matches_diffusers() {
    let refs = references();
    for (folder, naming) in [
        ("vae", AttentionNaming::Current),
        ("vae_legacy", AttentionNaming::Legacy),
    ] {
        let loaded = AutoencoderKl::from_folder(&fixtures().join(folder), Device::Cpu).unwrap();
        assert_eq!(loaded.naming, naming, "{folder}");
        assert_eq!(loaded.model.config.scaling_factor, 0.18215);
        let (mean, logvar) = loaded.model.encode_moments(refs.get("vae_input")).unwrap();
        assert_eq!(mean.size(), [2, 4, 8, 8]);
        assert_close(&format!("{folder} mean"), &mean, refs.get("vae_mean"), 1e-4);
        assert_close(
            &format!("{folder} logvar"),
            &logvar,
            refs.get("vae_logvar"),
            1e-4,
        );
        let decoded = loaded.model.decode(refs.get("vae_latents")).unwrap();
        assert_eq!(decoded.size(), [2, 3, 32, 32]);
        assert_close(
            &format!("{folder} decoded"),
            &decoded,
            refs.get("vae_decoded"),
            1e-4,
        );
    }
}

#[test]
fn bf16_path_stays_close_to_fp32() {
    let refs = references();
    // The CUDA default, run on CPU: same code, bf16 matmuls and convolutions, fp32 norms.
    let mut loaded = Dinov2::from_folder(&fixtures().join("dinov2"), Device::Cpu).unwrap();
    loaded.model.precision = Precision::Bf16;
    let tokens = loaded.model.forward(refs.get("prepared_256")).unwrap();
    assert_eq!(tokens.kind(), Kind::Float);
    let err = relative_error(&tokens, refs.get("dinov2_tokens_256"));
    assert!(err > 0.0 && err < 5e-2, "dinov2 bf16 error {err:e}");

    let mut loaded = AutoencoderKl::from_folder(&fixtures().join("vae"), Device::Cpu).unwrap();
    loaded.model.precision = Precision::Bf16;
    let (mean, _) = loaded.model.encode_moments(refs.get("vae_input")).unwrap();
    let err = relative_error(&mean, refs.get("vae_mean"));
    assert!(err > 0.0 && err < 5e-2, "vae bf16 error {err:e}");
}

fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn strict_loading_names_missing_unused_and_misshaped_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dinov2");
    copy_folder(&fixtures().join("dinov2"), &dir);
    let weights_path = dir.join(dinov2::WEIGHTS_FILE);
    let original = weights::read_safetensors(&weights_path).unwrap();
    let save = |tensors: &HashMap<String, Tensor>| {
        let named: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        weights::save_atomic(&named, &weights_path).unwrap();
    };

    let mut tensors: HashMap<String, Tensor> = original
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    tensors.remove("encoder.layer.1.mlp.fc2.bias");
    tensors.insert(
        "encoder.layer.1.mlp.fc3.bias".into(),
        Tensor::zeros([48], (Kind::Float, Device::Cpu)),
    );
    save(&tensors);
    let msg = Dinov2::from_folder(&dir, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains(&weights_path.display().to_string()), "{msg}");
    assert!(
        msg.contains("missing tensors [encoder.layer.1.mlp.fc2.bias]"),
        "{msg}"
    );
    assert!(
        msg.contains("unused tensors [encoder.layer.1.mlp.fc3.bias]"),
        "{msg}"
    );

    // A config that disagrees with the weights: the 224-px table has 257 positions, the file 1370.
    save(&original);
    let config_path = dir.join(dinov2::CONFIG_FILE);
    let config = std::fs::read_to_string(&config_path)
        .unwrap()
        .replace("\"image_size\": 518", "\"image_size\": 224");
    std::fs::write(&config_path, config).unwrap();
    let msg = Dinov2::from_folder(&dir, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("embeddings.position_embeddings")
            && msg.contains("[1, 1370, 48]")
            && msg.contains("[1, 257, 48]"),
        "{msg}"
    );

    std::fs::write(&config_path, "{ not json").unwrap();
    let msg = Dinov2::from_folder(&dir, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains(&config_path.display().to_string()), "{msg}");

    let vae_dir = tmp.path().join("vae");
    copy_folder(&fixtures().join("vae_legacy"), &vae_dir);
    std::fs::remove_file(vae_dir.join(vae::WEIGHTS_FILE)).unwrap();
    let msg = AutoencoderKl::from_folder(&vae_dir, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
}

#[test]
fn fingerprint_follows_file_contents() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vae");
    copy_folder(&fixtures().join("vae"), &dir);
    let original = vae::fingerprint(&fixtures().join("vae")).unwrap();
    assert_eq!(original.len(), 64);
    assert_eq!(
        vae::fingerprint(&dir).unwrap(),
        original,
        "same bytes elsewhere, same fingerprint"
    );
    let loaded = AutoencoderKl::from_folder(&dir, Device::Cpu).unwrap();
    assert_eq!(loaded.fingerprint().unwrap(), original);

    let weights_path = dir.join(vae::WEIGHTS_FILE);
    let mut bytes = std::fs::read(&weights_path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights_path, bytes).unwrap();
    assert_ne!(vae::fingerprint(&dir).unwrap(), original);
    assert_ne!(
        vae::fingerprint(&fixtures().join("vae_legacy")).unwrap(),
        original
    );
}

fn parameter_count(path: &Path) -> i64 {
    weights::read_safetensors(path)
        .unwrap()
        .values()
        .map(|t| t.numel() as i64)
        .sum()
}

#[test]
fn encoders_check_prints_architecture_parameters_fingerprint_and_forward() {
    let (encoder, vae_dir) = (fixtures().join("dinov2_reg"), fixtures().join("vae_legacy"));
    let out = common::run_ok(
        common::pipeline()
            .args(["encoders", "check", "--device", "cpu", "--image-size", "64"])
            .arg("--encoder")
            .arg(&encoder)
            .arg("--vae")
            .arg(&vae_dir),
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let expect = [
        "DINOv2 ViT-custom/14 (dinov2_with_registers)".to_string(),
        "4 registers".to_string(),
        format!(
            "parameters: {}",
            parameter_count(&encoder.join(dinov2::WEIGHTS_FILE))
        ),
        format!("fingerprint: {}", dinov2::fingerprint(&encoder).unwrap()),
        "patch tokens [1, 256, 48]".to_string(),
        "AutoencoderKL, blocks [16, 32, 32]".to_string(),
        "Legacy names".to_string(),
        format!(
            "parameters: {}",
            parameter_count(&vae_dir.join(vae::WEIGHTS_FILE))
        ),
        format!("fingerprint: {}", vae::fingerprint(&vae_dir).unwrap()),
        "posterior mean [1, 4, 16, 16]".to_string(),
        "decoded [1, 3, 64, 64]".to_string(),
    ];
    for line in expect {
        assert!(stdout.contains(&line), "missing `{line}` in:\n{stdout}");
    }

    let out = common::pipeline()
        .args(["encoders", "check", "--encoder"])
        .arg(fixtures().join("nope"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nope/config.json"), "{stderr}");
}

/// Every `encoders init --preset tiny-FAMILY` writes what transformers' `AutoModel` reads as that
/// family's model with no missing or unexpected tensor, and `VisionEncoder` gives its patch tokens on
/// the same input, at the native 224 px and at 112 px (interpolated position table, or RoPE's own grid).
#[test]
fn tiny_presets_load_in_transformers_and_match_it() {
    let tmp = tempfile::tempdir().unwrap();
    let families = ["dinov2", "clip", "siglip", "mae", "ijepa", "dinov3"];
    for family in families {
        common::run_ok(
            common::pipeline()
                .args(["encoders", "init", "--preset", &format!("tiny-{family}")])
                .args(["--seed", "7", "--out"])
                .arg(tmp.path().join(family)),
        );
    }
    let refs = tmp.path().join("refs.safetensors");
    // The tokens each family's Rust port returns: class and register tokens dropped; MAE given identity
    // noise, so that its (ratio-0) shuffle keeps the grid order.
    let code = r#"
import sys, json, torch
from pathlib import Path
from safetensors.torch import save_file
from transformers import AutoModel
root = Path(sys.argv[1])
g = torch.Generator().manual_seed(0)
out = {}
for family in sys.argv[3:]:
    model, info = AutoModel.from_pretrained(root / family, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, (family, bad)
    model.eval()
    model_type = json.loads((root / family / "config.json").read_text())["model_type"]
    for size in (224, 112):
        x = torch.randn(2, 3, size, size, generator=g)
        kwargs = {}
        if model_type not in ("dinov2", "dinov3_vit"):
            kwargs["interpolate_pos_encoding"] = True
        if model_type == "vit_mae":
            n = (size // model.config.patch_size) ** 2
            kwargs["noise"] = torch.arange(n, dtype=torch.float32).expand(2, n)
        with torch.no_grad():
            y = model(pixel_values=x, **kwargs).last_hidden_state
        drop = {"siglip_vision_model": 0, "ijepa": 0,
                "dinov3_vit": 1 + getattr(model.config, "num_register_tokens", 0)}.get(model_type, 1)
        out[f"{family}_pixels_{size}"] = x.contiguous()
        out[f"{family}_tokens_{size}"] = y[:, drop:].contiguous()
save_file(out, sys.argv[2])
"#;
    common::run_ok(
        common::python()
            .args(["-c", code])
            .arg(tmp.path())
            .arg(&refs)
            .args(families),
    );
    let refs = common::References::load(&refs);
    for family in families {
        let encoder =
            model::vision::VisionEncoder::from_folder(&tmp.path().join(family), Device::Cpu)
                .unwrap();
        assert_eq!(encoder.family().name(), family);
        for size in [224, 112] {
            let tokens = encoder
                .forward(refs.get(&format!("{family}_pixels_{size}")))
                .unwrap();
            assert_close(
                &format!("tiny-{family} at {size} px"),
                &tokens,
                refs.get(&format!("{family}_tokens_{size}")),
                1e-4,
            );
        }
    }
}

/// `config --check` reads the grid and width of any family's folder and says what to set when they do
/// not match the flow: an input size always, pooling only where the flow's grid is a whole multiple of
/// the encoder's, the width when it differs.
#[test]
fn config_check_reads_every_family_and_names_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let check = |dir: &Path, sets: &[&str]| {
        let mut cmd = common::pipeline();
        cmd.args(["config", "--check", "--set"]).arg(format!(
            "precompute.encoder={:?}",
            dir.display().to_string()
        ));
        for s in sets {
            cmd.args(["--set", s]);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for family in ["clip", "siglip", "mae", "ijepa", "dinov3"] {
        let dir = tmp.path().join(family);
        common::run_ok(
            common::pipeline()
                .args(["encoders", "init", "--preset", &format!("tiny-{family}")])
                .arg("--out")
                .arg(&dir),
        );
        // The demo flow aligns 16 tokens of width 32: the tiny towers give 4×4 at 224 px.
        let (ok, said) = check(&dir, &[]);
        assert!(ok, "{family}: {said}");
        let (ok, said) = check(&dir, &["precompute.encoder_input_size=112"]);
        assert!(!ok, "{family}: {said}");
        assert!(
            said.contains("gives 4: set precompute.encoder_input_size = 224 (or align.encoder_tokens = 4 with align.token_match = \"pool\")"),
            "{family}: {said}"
        );
        let (ok, said) = check(&dir, &["precompute.encoder_input_size=168"]);
        // A 3×3 grid cannot pool the 4×4 flow: only the input size is offered.
        assert!(
            !ok && said.contains("gives 9: set precompute.encoder_input_size = 224")
                && !said.contains("pool"),
            "{family}: {said}"
        );
        let (ok, said) = check(&dir, &["align.encoder_dim=64"]);
        assert!(
            !ok && said.contains("gives 32-wide tokens: set align.encoder_dim = 32"),
            "{family}: {said}"
        );
    }
}
