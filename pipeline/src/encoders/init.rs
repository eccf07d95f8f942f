//! `pipeline encoders init`: random-init vision towers of every family and AutoencoderKL folders in the Hugging Face
//! layout (`config.json` + safetensors, the names `from_folder` reads), so the demo, the tests and the
//! benchmarks run without downloads: tiny networks for CPU, the published sizes for benchmarks.

use std::path::{Path, PathBuf};

use anyhow::Context;
use model::vae::{self, AttentionNaming, AutoencoderKl};
use model::vision::{Family, TowerConfig};
use tch::{nn, Device, Kind, Tensor};

#[derive(clap::Args)]
pub struct Args {
    /// Output folder. `tiny` and `base` write OUT/dinov2 and OUT/vae; the single presets write OUT itself
    #[arg(long)]
    out: PathBuf,
    /// tiny (both, CPU-sized), base (dinov2-base + sd-vae), tiny-FAMILY (a CPU-sized vision encoder:
    /// tiny-dinov2, tiny-clip, tiny-siglip, tiny-mae, tiny-ijepa, tiny-dinov3), FAMILY-base (the
    /// published base size: dinov2-base, clip-base, siglip-base, mae-base, dinov3-base; I-JEPA's smallest
    /// published is ijepa-huge), tiny-vae, sd-vae, inception (a random-init FID Inception,
    /// OUT/inception.safetensors: a stand-in for the demo only)
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Seed of the random weights (same seed → same files, so the same cache fingerprint)
    #[arg(long, default_value_t = 0)]
    seed: i64,
    #[command(flatten)]
    fit: crate::encoders::vae_fit::FitArgs,
}

/// A network a preset writes, and the folder it goes to.
type Folder<C> = Option<(C, PathBuf)>;

pub fn run(args: Args) -> anyhow::Result<()> {
    let here = |c: TowerConfig| Some((c, args.out.clone()));
    let preset = args.preset.as_str();
    let family = |name: &str| Family::ALL.into_iter().find(|f| f.name() == name);
    let (enc, vae): (Folder<TowerConfig>, Folder<vae::Config>) = match preset {
        "tiny" => (Some((tiny(Family::Dinov2), args.out.join("dinov2"))), Some((tiny_vae(), args.out.join("vae")))),
        "base" => (Some((TowerConfig::base(Family::Dinov2), args.out.join("dinov2"))), Some((vae::Config::sd_vae(), args.out.join("vae")))),
        "tiny-vae" => (None, Some((tiny_vae(), args.out.clone()))),
        "sd-vae" => (None, Some((vae::Config::sd_vae(), args.out.clone()))),
        "ijepa-huge" => (here(TowerConfig::base(Family::Ijepa)), None),
        "inception" => {
            anyhow::ensure!(args.fit.fit_on.is_none(), "--fit-on fits a VAE, and preset `inception` writes none");
            return write_inception(&args.out, args.seed);
        }
        _ => match (
            preset.strip_prefix("tiny-").and_then(family),
            preset.strip_suffix("-base").and_then(family).filter(|f| *f != Family::Ijepa),
        ) {
            (Some(f), _) => (here(tiny(f)), None),
            (_, Some(f)) => (here(TowerConfig::base(f)), None),
            _ => anyhow::bail!(
                "unknown preset `{preset}`: expected tiny, base, tiny-{{dinov2,clip,siglip,mae,ijepa,dinov3}}, \
                 {{dinov2,clip,siglip,mae,dinov3}}-base, ijepa-huge, tiny-vae, sd-vae or inception"
            ),
        },
    };
    if args.fit.fit_on.is_some() && vae.is_none() {
        anyhow::bail!(
            "--fit-on fits a VAE, and preset `{}` writes none",
            args.preset
        );
    }
    tch::manual_seed(args.seed);
    if let Some((config, dir)) = enc {
        write_encoder(&config, &dir).with_context(|| format!("writing {}", dir.display()))?;
        println!("encoder: {} ({})", dir.display(), config.describe());
    }
    if let Some((config, dir)) = vae {
        write_vae(&config, &dir).with_context(|| format!("writing {}", dir.display()))?;
        println!(
            "vae: {} ({})",
            dir.display(),
            config.describe(AttentionNaming::Current)
        );
        if let Some(shards) = &args.fit.fit_on {
            let report = crate::encoders::vae_fit::fit(&dir, &args.fit, shards, args.seed)
                .with_context(|| format!("fitting {} on {shards}", dir.display()))?;
            println!(
                "vae fit: {} crops of {shards} at {} px, {} steps: held-out PSNR {:.1} dB → {:.1} dB, \
                 scaling_factor {:.4}",
                report.images,
                args.fit.fit_size,
                args.fit.fit_steps,
                report.psnr_before,
                report.psnr_after,
                report.scaling_factor
            );
        }
    }
    Ok(())
}

/// A family's tower at width 32, 2 layers (2 heads, MLP 128) and patch 56 at 224 px: 4×4 = 16 tokens
/// at the default `precompute.encoder_input_size`, as many as the tiny flows have, and cheap enough for
/// the demo on two CPU cores. DINOv3 keeps its 4 registers.
fn tiny(family: Family) -> TowerConfig {
    match TowerConfig::base(family) {
        TowerConfig::Dinov2(c) => TowerConfig::Dinov2(model::dinov2::Config {
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            image_size: 224,
            patch_size: 56,
            ..c
        }),
        TowerConfig::Clip(c) => TowerConfig::Clip(model::clip::Config {
            hidden_size: 32,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            image_size: 224,
            patch_size: 56,
            ..c
        }),
        TowerConfig::Siglip(c) => TowerConfig::Siglip(model::siglip::Config {
            hidden_size: 32,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            image_size: 224,
            patch_size: 56,
            ..c
        }),
        TowerConfig::Mae(c) => TowerConfig::Mae(tiny_hf_vit(c)),
        TowerConfig::Ijepa(c) => TowerConfig::Ijepa(tiny_hf_vit(c)),
        TowerConfig::Dinov3(c) => TowerConfig::Dinov3(model::dinov3::Config {
            hidden_size: 32,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            image_size: 224,
            patch_size: 56,
            ..c
        }),
    }
}

fn tiny_hf_vit(c: model::vit::HfVitConfig) -> model::vit::HfVitConfig {
    model::vit::HfVitConfig {
        hidden_size: 32,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        image_size: 224,
        patch_size: 56,
        ..c
    }
}

/// Four levels (downsample 8, like SD) of 8–16 channels, one resnet each. The scaling factor follows
/// the rule that gave SD its 0.18215 (1 / std of the posterior means): this random VAE's means have
/// std ≈ 0.66 on the demo images.
fn tiny_vae() -> vae::Config {
    vae::Config {
        block_out_channels: vec![8, 8, 16, 16],
        layers_per_block: 1,
        norm_num_groups: 4,
        scaling_factor: 1.5,
        ..vae::Config::sd_vae()
    }
}

/// Norm scales and layer scales 1, biases 0, matrices and kernels N(0, 1/fan_in), embeddings N(0, 0.02²):
/// activations stay O(1) through the depth, so random features are neither constant nor infinite.
fn randomise(vs: &nn::VarStore) {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (name, mut t) in vars {
            let size = t.size();
            if name.ends_with("lambda1")
                || name.ends_with("lambda2")
                || (size.len() == 1 && name.ends_with("weight"))
            {
                let _ = t.fill_(1.0);
            } else if name.ends_with("bias") {
                let _ = t.zero_();
            } else if size.len() >= 2 && name.ends_with("weight") {
                let fan_in = (t.numel() as i64 / size[0]).max(1) as f64;
                t.copy_(
                    &(Tensor::randn(size.as_slice(), (Kind::Float, Device::Cpu)) / fan_in.sqrt()),
                );
            } else {
                t.copy_(&(Tensor::randn(size.as_slice(), (Kind::Float, Device::Cpu)) * 0.02));
            }
        }
    });
}

/// A trained KL-VAE has a narrow posterior (σ far below the spread of the means); random init gives
/// logvar ≈ 0, σ ≈ 1, and latents drawn from it would be mostly noise. The log-variance half of
/// `quant_conv` is therefore made constant: σ = e^(POSTERIOR_LOGVAR/2).
fn narrow_posterior(vs: &nn::VarStore, latent: i64) {
    const POSTERIOR_LOGVAR: f64 = -6.0;
    let vars = vs.variables();
    tch::no_grad(|| {
        if let Some(w) = vars.get("quant_conv.weight") {
            let _ = w.narrow(0, latent, latent).zero_();
        }
        if let Some(b) = vars.get("quant_conv.bias") {
            let _ = b.narrow(0, latent, latent).fill_(POSTERIOR_LOGVAR);
        }
    });
}

/// A random-init vision tower in the layout transformers' `save_pretrained` writes for a single-tower
/// model of the family (`config.json` + `model.safetensors`, no `vision_model.` prefix).
fn write_encoder(c: &TowerConfig, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = c.build(vs.root());
    randomise(&vs);
    stages::atomic::write_bytes_atomic(
        &dir.join(model::frozen::CONFIG_FILE),
        &serde_json::to_vec_pretty(&c.config_json())?,
    )?;
    model::weights::save_var_store(&vs, &dir.join(model::frozen::WEIGHTS_FILE))?;
    Ok(())
}

fn write_vae(c: &vae::Config, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = AutoencoderKl::new(vs.root(), c, AttentionNaming::Current);
    randomise(&vs);
    narrow_posterior(&vs, c.latent_channels);
    let config = serde_json::json!({
        "_class_name": "AutoencoderKL",
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "down_block_types": c.down_block_types,
        "up_block_types": c.up_block_types,
        "block_out_channels": c.block_out_channels,
        "layers_per_block": c.layers_per_block,
        "act_fn": c.act_fn,
        "latent_channels": c.latent_channels,
        "norm_num_groups": c.norm_num_groups,
        "sample_size": 256,
        "scaling_factor": c.scaling_factor,
    });
    stages::atomic::write_bytes_atomic(
        &dir.join(vae::CONFIG_FILE),
        &serde_json::to_vec_pretty(&config)?,
    )?;
    model::weights::save_var_store(&vs, &dir.join(vae::WEIGHTS_FILE))?;
    Ok(())
}

/// A random FID Inception with pytorch-fid's tensor names, so `pipeline fid --weights` reads it as it
/// reads converted published weights. Its FID ranks sample sets but is not comparable with anyone's.
fn write_inception(out: &Path, seed: i64) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = model::inception::Inception::new(vs.root());
    model::inception::randomise(&vs);
    let path = out.join("inception.safetensors");
    model::weights::save_var_store(&vs, &path)?;
    println!(
        "inception: {} (random-init FID Inception-v3: a stand-in; real FID needs the converted \
         published weights, see tools/convert_inception.py)",
        path.display()
    );
    Ok(())
}
