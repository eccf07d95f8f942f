//! Parity of the SigLIP, MAE, I-JEPA and DINOv3 vision encoders with transformers on small random-init
//! models written by tests/python/encoder_reference.py (fp32, CPU), through `VisionEncoder`.
//!
//! The reference script runs once per test binary; each family is its own test, and each reports every
//! comparison that fails rather than stopping at the first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use model::frozen::{EncoderError, Precision};
use model::vision::{self, Family, VisionEncoder};
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;
const SIZE: i64 = 32;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The folder the reference script wrote, shared by the tests of this binary. `Tensor` is not `Sync`,
/// so each test reads `references.safetensors` itself. A fixed folder under cargo's per-target
/// temporary directory, rewritten by each run: statics are never dropped, so a temporary directory
/// would be left behind by every run.
fn reference_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let python = repo_root().join(".venv/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run `make test`, which creates the reference environment",
            python.display()
        );
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("encoder_parity");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new(python)
            .arg(repo_root().join("tests/python/encoder_reference.py"))
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "reference failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

fn references() -> HashMap<String, Tensor> {
    model::weights::read_safetensors(&reference_dir().join("references.safetensors")).unwrap()
}

/// Collects the failed comparisons of one test.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn close(&mut self, tag: &str, got: Result<Tensor, EncoderError>, want: &Tensor) {
        let got = match got {
            Ok(got) => got,
            Err(e) => return self.0.push(format!("{tag}: error {e}")),
        };
        if got.size() != want.size() {
            return self.0.push(format!(
                "{tag}: shape {:?}, want {:?}",
                got.size(),
                want.size()
            ));
        }
        if got.kind() != Kind::Float {
            return self
                .0
                .push(format!("{tag}: kind {:?}, want Float", got.kind()));
        }
        let err = (&got - want).abs().max().double_value(&[]);
        // NaN fails too.
        if err.is_nan() || err >= TOLERANCE {
            self.0
                .push(format!("{tag}: max |diff| {err:e} >= {TOLERANCE:e}"));
        }
    }

    fn check(&mut self, ok: bool, message: String) {
        if !ok {
            self.0.push(message);
        }
    }

    fn finish(self) {
        assert!(self.0.is_empty(), "\n{}", self.0.join("\n"));
    }
}

/// Loads `folder`, checks its family and sizes, its tokens on the prepared float inputs (the trained
/// 32 px and a 44 × 28 interpolated one) and on uint8 images through its preprocessing, and its
/// fingerprint. `prefix` names the family's references.
fn check_folder(
    folder: &str,
    family: Family,
    prefix: &str,
    refs: &HashMap<String, Tensor>,
    failures: &mut Failures,
) -> VisionEncoder {
    let dir = reference_dir().join(folder);
    let encoder = VisionEncoder::from_folder(&dir, Device::Cpu)
        .unwrap_or_else(|e| panic!("{folder}: from_folder: {e}"));
    failures.check(
        encoder.family() == family,
        format!("{folder}: family {:?}, want {family:?}", encoder.family()),
    );
    failures.check(
        encoder.default_input_size() == SIZE,
        format!(
            "{folder}: default_input_size {}, want {SIZE}",
            encoder.default_input_size()
        ),
    );
    failures.check(
        encoder.hidden_size() == 64,
        format!("{folder}: hidden_size {}, want 64", encoder.hidden_size()),
    );
    failures.check(
        encoder.grid(SIZE) == 4,
        format!("{folder}: grid({SIZE}) {}, want 4", encoder.grid(SIZE)),
    );
    for case in ["default", "interp"] {
        failures.close(
            &format!(
                "{folder} {case} {:?}",
                refs[&format!("pixels_{case}")].size()
            ),
            encoder.forward(&refs[&format!("pixels_{case}")]),
            &refs[&format!("{prefix}_{case}")],
        );
    }
    failures.close(
        &format!("{folder} uint8 images"),
        encoder.patch_tokens(&refs["images"], SIZE),
        &refs[&format!("{prefix}_images")],
    );
    let got = encoder.fingerprint().unwrap();
    let want = vision::fingerprint(&dir).unwrap();
    failures.check(
        got == want,
        format!("{folder}: fingerprint {got}, vision::fingerprint {want}"),
    );
    encoder
}

#[test]
fn siglip_matches_transformers() {
    let refs = references();
    let mut failures = Failures::default();
    // transformers 5's bare SiglipVisionModel, and a full SiglipModel (`vision_model.*`, text tower).
    check_folder("siglip", Family::Siglip, "siglip", &refs, &mut failures);
    check_folder(
        "siglip_full",
        Family::Siglip,
        "siglip",
        &refs,
        &mut failures,
    );
    failures.finish();
}

#[test]
fn mae_matches_transformers() {
    let refs = references();
    let mut failures = Failures::default();
    // ViTMAEModel saved with mask_ratio 0, and ViTMAEForPreTraining (`vit.*`, `decoder.*`, ratio 0.75).
    check_folder("mae", Family::Mae, "mae", &refs, &mut failures);
    check_folder("mae_pretraining", Family::Mae, "mae", &refs, &mut failures);
    failures.finish();
}

#[test]
fn ijepa_matches_transformers() {
    let refs = references();
    let mut failures = Failures::default();
    check_folder("ijepa", Family::Ijepa, "ijepa", &refs, &mut failures);
    failures.finish();
}

#[test]
fn dinov3_matches_transformers() {
    let refs = references();
    let mut failures = Failures::default();
    // RoPE, 2 register tokens, layer scale.
    let mut encoder = check_folder("dinov3", Family::Dinov3, "dinov3", &refs, &mut failures);

    // The CUDA default, run on CPU: bf16 matmuls and convolutions, fp32 norms and residual stream.
    encoder.set_precision(Precision::Bf16);
    match encoder.patch_tokens(&refs["images"], SIZE) {
        Err(e) => failures.0.push(format!("dinov3 bf16: error {e}")),
        Ok(got) => {
            failures.check(
                got.kind() == Kind::Float,
                format!("dinov3 bf16: kind {:?}, want Float", got.kind()),
            );
            let want = &refs["dinov3_images"];
            if got.size() != want.size() {
                failures.0.push(format!(
                    "dinov3 bf16: shape {:?}, want {:?}",
                    got.size(),
                    want.size()
                ));
            } else {
                let got = got.to_kind(Kind::Float);
                let err = (&got - want).norm().double_value(&[]) / want.norm().double_value(&[]);
                failures.check(
                    err > 0.0 && err < 5e-2,
                    format!("dinov3 bf16: relative error {err:e}, want in (0, 5e-2)"),
                );
            }
        }
    }
    failures.finish();
}
