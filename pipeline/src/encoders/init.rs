//! `pipeline encoders init`: random-init DINOv2, CLIP and AutoencoderKL folders in the Hugging Face
//! layout (`config.json` + safetensors, the names `from_folder` reads), so the demo, the tests and the
//! benchmarks run without downloads: tiny networks for CPU, the published sizes for benchmarks.

use std::path::{Path, PathBuf};

use anyhow::Context;
use model::clip::{self, Clip};
use model::dinov2::{self, Dinov2};
use model::vae::{self, AttentionNaming, AutoencoderKl};
use tch::{nn, Device, Kind, Tensor};

#[derive(clap::Args)]
pub struct Args {
    /// Output folder. `tiny` and `base` write OUT/dinov2 and OUT/vae; the single presets write OUT itself
    #[arg(long)]
    out: PathBuf,
    /// tiny (both, CPU-sized), base (dinov2-base + sd-vae), tiny-dinov2, tiny-clip (a CLIP vision
    /// tower), tiny-vae, dinov2-base, sd-vae, inception (a random-init FID Inception,
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

/// The vision encoder a preset writes: either family `model::vision::VisionEncoder` reads.
enum Encoder {
    Dinov2(dinov2::Config),
    Clip(clip::Config),
}

impl Encoder {
    fn describe(&self) -> String {
        match self {
            Encoder::Dinov2(c) => c.describe(),
            Encoder::Clip(c) => c.describe(),
        }
    }

    fn write(&self, dir: &Path) -> anyhow::Result<()> {
        match self {
            Encoder::Dinov2(c) => write_dinov2(c, dir),
            Encoder::Clip(c) => write_clip(c, dir),
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dino = |c: dinov2::Config, dir: PathBuf| Some((Encoder::Dinov2(c), dir));
    let (enc, vae): (Folder<Encoder>, Folder<vae::Config>) = match args.preset.as_str() {
        "tiny" => (dino(tiny_dinov2(), args.out.join("dinov2")), Some((tiny_vae(), args.out.join("vae")))),
        "base" => (dino(dinov2::Config::vit_base(), args.out.join("dinov2")), Some((vae::Config::sd_vae(), args.out.join("vae")))),
        "tiny-dinov2" => (dino(tiny_dinov2(), args.out.clone()), None),
        "tiny-clip" => (Some((Encoder::Clip(tiny_clip()), args.out.clone())), None),
        "dinov2-base" => (dino(dinov2::Config::vit_base(), args.out.clone()), None),
        "tiny-vae" => (None, Some((tiny_vae(), args.out.clone()))),
        "sd-vae" => (None, Some((vae::Config::sd_vae(), args.out.clone()))),
        "inception" => {
            anyhow::ensure!(args.fit.fit_on.is_none(), "--fit-on fits a VAE, and preset `inception` writes none");
            return write_inception(&args.out, args.seed);
        }
        other => anyhow::bail!("unknown preset `{other}`: expected tiny, base, tiny-dinov2, tiny-clip, tiny-vae, dinov2-base, sd-vae or inception"),
    };
    if args.fit.fit_on.is_some() && vae.is_none() {
        anyhow::bail!(
            "--fit-on fits a VAE, and preset `{}` writes none",
            args.preset
        );
    }
    tch::manual_seed(args.seed);
    if let Some((config, dir)) = enc {
        config
            .write(&dir)
            .with_context(|| format!("writing {}", dir.display()))?;
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

/// ViT with width 32, 2 layers and patch 56 at 224 px: 4×4 = 16 tokens, as many as the tiny flows have,
/// and cheap enough for the demo on two CPU cores.
fn tiny_dinov2() -> dinov2::Config {
    dinov2::Config {
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        image_size: 224,
        patch_size: 56,
        ..dinov2::Config::vit_base()
    }
}

/// The CLIP counterpart of [`tiny_dinov2`]: width 32, 2 layers, MLP 128 and patch 56 at 224 px, so
/// 4×4 = 16 tokens at the default `precompute.encoder_input_size`.
fn tiny_clip() -> clip::Config {
    clip::Config {
        hidden_size: 32,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        image_size: 224,
        patch_size: 56,
        ..clip::Config::vit_base_patch16()
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

fn write_dinov2(c: &dinov2::Config, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = Dinov2::new(vs.root(), c);
    randomise(&vs);
    let config = serde_json::json!({
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "mlp_ratio": c.mlp_ratio,
        "hidden_act": c.hidden_act,
        "layer_norm_eps": c.layer_norm_eps,
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "num_channels": c.num_channels,
        "qkv_bias": c.qkv_bias,
        "use_swiglu_ffn": c.use_swiglu_ffn,
        "use_mask_token": c.use_mask_token,
        "layerscale_value": 1.0,
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
    });
    stages::atomic::write_bytes_atomic(
        &dir.join(dinov2::CONFIG_FILE),
        &serde_json::to_vec_pretty(&config)?,
    )?;
    model::weights::save_var_store(&vs, &dir.join(dinov2::WEIGHTS_FILE))?;
    Ok(())
}

/// A `CLIPVisionModel` folder as transformers 5 `save_pretrained` writes it: `config.json` of
/// `model_type` "clip_vision_model" and `model.safetensors` with its names (`embeddings.*`,
/// `pre_layrnorm.*`, `encoder.layers.N.*`, `post_layernorm.*`, no `vision_model.` prefix).
fn write_clip(c: &clip::Config, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = Clip::new(vs.root(), c);
    randomise(&vs);
    let config = serde_json::json!({
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_channels": c.num_channels,
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "hidden_act": c.hidden_act,
        "layer_norm_eps": c.layer_norm_eps,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "projection_dim": 512,
    });
    stages::atomic::write_bytes_atomic(
        &dir.join(clip::CONFIG_FILE),
        &serde_json::to_vec_pretty(&config)?,
    )?;
    model::weights::save_var_store(&vs, &dir.join(clip::WEIGHTS_FILE))?;
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
