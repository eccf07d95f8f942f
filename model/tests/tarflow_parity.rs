//! Parity of the Rust flow with an independent PyTorch implementation (tests/python/tarflow_ref.py)
//! on random weights: forward z, per-block outputs, log-det, and guided/unguided KV-cache sampling.

use std::path::PathBuf;
use std::process::Command;

use model::tarflow::{self, sample::Guidance, Cond, Config, MlpKind};
use tch::{nn, Device, Kind, Tensor};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn python() -> Command {
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make test`, which creates the reference environment",
        python.display()
    );
    Command::new(python)
}

fn check(cfg: &Config, tag: &str) {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = tarflow::Model::new(vs.root(), cfg).unwrap();
    tch::no_grad(|| {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut v) in vars {
            if name.ends_with("proj_out.weight") {
                v.copy_(&(v.randn_like() * 0.01));
            } else if name.ends_with("_embed") {
                v.copy_(&(v.randn_like() * 0.3));
            }
        }
    });
    let weights = dir.path().join("w.safetensors");
    model::weights::save_atomic(&model.named_tensors(&vs), &weights).unwrap();
    let config = dir.path().join("c.json");
    std::fs::write(&config, serde_json::to_string(cfg).unwrap()).unwrap();
    let x = Tensor::rand(
        [3, cfg.in_channels, cfg.img_size, cfg.img_size],
        (Kind::Float, Device::Cpu),
    ) * 2.0
        - 1.0;
    let y = Tensor::from_slice(&[1i64, -1, 2]);
    let noise = Tensor::randn(
        [3, cfg.num_tokens(), cfg.token_dim()],
        (Kind::Float, Device::Cpu),
    );
    let g = Guidance {
        weight: 1.5,
        annealed: true,
        attn_temp: 0.7,
    };
    let gt = Tensor::from_slice(&[g.weight as f32, 1.0, g.attn_temp as f32]);
    let inputs = dir.path().join("in.safetensors");
    let named = [("x", &x), ("y", &y), ("noise", &noise), ("guidance", &gt)]
        .map(|(n, t)| (n.to_string(), t.shallow_clone()));
    model::weights::save_atomic(&named, &inputs).unwrap();
    let out_path = dir.path().join("out.safetensors");
    let script = repo_root().join("tests/python/tarflow_ref.py");
    let out = python()
        .arg(&script)
        .arg("parity")
        .args([&config, &weights, &inputs, &out_path])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{tag}: reference failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference = model::weights::read_safetensors(&out_path).unwrap();

    let fwd = tch::no_grad(|| model.forward(&x, &Cond::Labels(&y), &[]));
    let diff = |a: &Tensor, name: &str| (a - &reference[name]).abs().max().double_value(&[]);
    assert!(
        diff(&fwd.z, "z") < 1e-4,
        "{tag}: z differs by {}",
        diff(&fwd.z, "z")
    );
    assert!(
        diff(&fwd.logdet, "logdet") < 1e-5,
        "{tag}: logdet differs by {}",
        diff(&fwd.logdet, "logdet")
    );
    for (i, o) in fwd.outputs.iter().enumerate() {
        assert!(
            diff(o, &format!("block{i}")) < 1e-4,
            "{tag}: block {i} output"
        );
    }
    let plain = model.reverse(&noise, Some(&y), &Guidance::default());
    assert!(
        diff(&plain, "sample_plain") < 1e-4,
        "{tag}: unguided sample differs by {}",
        diff(&plain, "sample_plain")
    );
    let guided = model.reverse(&noise, Some(&y), &g);
    assert!(
        diff(&guided, "sample") < 1e-4,
        "{tag}: guided sample differs by {}",
        diff(&guided, "sample")
    );
    // The benchmark's reference (batched branches, preallocated caches) computes the same samples.
    assert!(
        diff(&guided, "sample_fast") < 1e-4,
        "{tag}: the fast reference differs by {}",
        diff(&guided, "sample_fast")
    );
}

#[test]
fn pixel_flow_matches_pytorch() {
    let cfg = Config {
        img_size: 8,
        patch_size: 2,
        channels: 64,
        num_blocks: 3,
        layers_per_block: 2,
        num_classes: 4,
        head_dim: 32,
        ..Config::preset("in64").unwrap()
    };
    check(&cfg, "pixel");
}

#[test]
fn latent_flow_matches_pytorch() {
    let base = Config {
        img_size: 8,
        patch_size: 2,
        channels: 64,
        num_blocks: 3,
        layers_per_block: 2,
        num_classes: 4,
        head_dim: 32,
        ..Config::preset("latent256").unwrap()
    };
    assert!(base.rope && base.mlp == MlpKind::Swiglu && !base.pos_embed);
    check(&base, "latent");
    check(
        &Config {
            swiglu_gate: tarflow::GateActivation::GeluTanh,
            mlp_ratio: 8.0 / 3.0,
            ..base
        },
        "latent-gelu-tanh",
    );
}

/// Every Linear of a fresh flow and projector starts as `torch.nn.Linear` does for the same shape
/// (weight and bias std ≈ 1/√(3·fan_in)); the output projections' weights start at zero.
#[test]
fn fresh_linear_layers_have_pytorch_init_statistics() {
    let cfg = Config {
        img_size: 16,
        patch_size: 2,
        channels: 128,
        num_blocks: 2,
        layers_per_block: 2,
        num_classes: 4,
        ..Config::preset("tiny").unwrap()
    };
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = tarflow::Model::new(vs.root(), &cfg).unwrap();
    let pvs = nn::VarStore::new(Device::Cpu);
    let align = tarflow::align::AlignConfig {
        locations: vec![[1, 1]],
        projector_hidden: 256,
        encoder_dim: 64,
        ..Default::default()
    };
    let _head = tarflow::align::AlignHead::new(pvs.root(), &align, &model).unwrap();
    let mut layers: Vec<(String, Vec<i64>, f64, f64)> = vec![];
    for store in [&vs, &pvs] {
        let vars = store.variables();
        let mut names: Vec<&String> = vars.keys().filter(|n| n.ends_with(".weight")).collect();
        names.sort();
        for name in names {
            let w = &vars[name];
            let Some(b) = vars.get(&name.replace(".weight", ".bias")) else {
                continue; // LayerNorm weights have no fan-in
            };
            if w.dim() != 2 {
                continue;
            }
            layers.push((
                name.clone(),
                w.size(),
                w.std(true).double_value(&[]),
                b.std(true).double_value(&[]),
            ));
        }
    }
    assert!(layers.len() > 10, "{layers:?}");
    let shapes: Vec<Vec<i64>> = layers.iter().map(|l| l.1.clone()).collect();
    let out = python()
        .arg("-c")
        .arg(
            "import json, sys, torch\n\
             torch.manual_seed(0)\n\
             shapes = json.loads(sys.argv[1])\n\
             print(json.dumps([[torch.nn.Linear(i, o).weight.std().item(), torch.nn.Linear(i, o).bias.std().item()] for o, i in shapes]))",
        )
        .arg(serde_json::to_string(&shapes).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: Vec<[f64; 2]> = serde_json::from_slice(&out.stdout).unwrap();
    for ((name, shape, w, b), [rw, rb]) in layers.iter().zip(&reference) {
        if name.ends_with("proj_out.weight") {
            assert_eq!(*w, 0.0, "{name}");
        } else {
            // Uniform(±1/√fan_in) has std 1/√(3·fan_in); tch's default is √6 times that.
            let exact = 1.0 / (3.0 * shape[1] as f64).sqrt();
            assert!(
                (w / rw - 1.0).abs() < 0.12,
                "{name} {shape:?}: weight std {w} vs torch {rw}"
            );
            assert!(
                (w / exact - 1.0).abs() < 0.08,
                "{name} {shape:?}: weight std {w} vs {exact}"
            );
        }
        // A bias has only `out` samples: compared where there are enough of them.
        if shape[0] >= 64 {
            assert!(
                (b / rb - 1.0).abs() < 0.35,
                "{name} {shape:?}: bias std {b} vs torch {rb}"
            );
        }
    }
}
