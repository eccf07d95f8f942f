//! `pipeline flow import --from ml-tarflow`: an ml-tarflow `.pth` (the `model.state_dict()` its
//! `train.py` saves with `torch.save`) → the project's checkpoint (safetensors + `.model.toml`
//! sidecar). The pickle is read by `model::pth`, which executes nothing in it, so no Python is needed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use model::tarflow;
use tch::{Device, Tensor};

use crate::formats::space::Space;

#[derive(clap::Args)]
pub struct ImportArgs {
    /// Where the checkpoint comes from (the layout of its parameter names)
    #[arg(long, value_parser = ["ml-tarflow"])]
    from: String,
    /// The `.pth` file, e.g. `imagenet64_model_4_1024_8_8_0.05.pth`
    checkpoint: PathBuf,
    /// Image (or latent) side the model was trained at: a state_dict does not record it
    #[arg(long)]
    image_size: i64,
    /// Input channels (3 for ml-tarflow's pixel models)
    #[arg(long, default_value_t = 3)]
    in_channels: i64,
    /// Patch size; default: the one ml-tarflow's file name states (`…_model_{patch}_{channels}_…`)
    #[arg(long)]
    patch_size: Option<i64>,
    /// Noise σ the model was trained with (the denoising step's σ); default: the one the file name states
    #[arg(long)]
    noise_std: Option<f64>,
    /// Output directory: `model.safetensors` and `model.model.toml`
    #[arg(long)]
    out: PathBuf,
}

/// Patch size and σ from ml-tarflow's checkpoint name `{dataset}_model_{p}_{ch}_{blocks}_{layers}_{σ}.pth`.
fn name_hints(path: &Path) -> (Option<i64>, Option<f64>) {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let Some((_, tail)) = stem.split_once("_model_") else {
        return (None, None);
    };
    let parts: Vec<&str> = tail.split('_').collect();
    if parts.len() != 5 {
        return (None, None);
    }
    (parts[0].parse().ok(), parts[4].parse().ok())
}

/// Parameter names as ml-tarflow's `Model` has them: a DDP (`module.`) or `torch.compile`
/// (`_orig_mod.`) wrapper's prefix is dropped.
fn unwrap_names(named: Vec<(String, Tensor)>) -> HashMap<String, Tensor> {
    named
        .into_iter()
        .map(|(name, t)| {
            let mut n = name.as_str();
            while let Some(rest) = n
                .strip_prefix("module.")
                .or_else(|| n.strip_prefix("_orig_mod."))
            {
                n = rest;
            }
            (n.to_string(), t)
        })
        .collect()
}

pub fn import(args: ImportArgs) -> anyhow::Result<()> {
    let (name_patch, name_sigma) = name_hints(&args.checkpoint);
    let patch = args.patch_size.or(name_patch).with_context(|| {
        format!(
            "{}: give --patch-size (the file name does not state it)",
            args.checkpoint.display()
        )
    })?;
    let sigma = args.noise_std.or(name_sigma).with_context(|| {
        format!(
            "{}: give --noise-std, the σ it was trained with (the file name does not state it)",
            args.checkpoint.display()
        )
    })?;
    if !(sigma >= 0.0 && sigma.is_finite()) {
        bail!("--noise-std must be a finite σ ≥ 0, got {sigma}");
    }
    let named = model::pth::read_state_dict(&args.checkpoint)?;
    let tensors = unwrap_names(named);
    let mut cfg = tarflow::infer_config(&tensors, args.image_size, patch, args.in_channels)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.checkpoint.display()))?;
    cfg.noise_std = sigma;
    // Building the model from the tensors checks every name and shape before anything is written.
    let loaded = tarflow::from_tensors(&tensors, &args.checkpoint, &cfg, Device::Cpu)?;
    let space = (args.in_channels == 3).then(|| Space {
        latent: false,
        image_size: args.image_size as usize,
        // ml-tarflow's training transform: Resize(size) + CenterCrop(size), then flips.
        crop: stages::crop::CropMode::ResizeCenterCrop,
        resize_impl: stages::crop::ResizeImpl::Pillow,
        decode_scale: stages::config::DecodeScale::Exact,
        latent_scaling: None,
        latent_shift: None,
        vae: String::new(),
        vae_fingerprint: String::new(),
        cache_fingerprint: String::new(),
    });
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let weights = args.out.join("model.safetensors");
    model::weights::save_atomic(&loaded.model.named_tensors(&loaded.vs), &weights)?;
    let side = crate::formats::space::sidecar(&weights);
    stages::atomic::write_bytes_atomic(
        &side,
        crate::formats::space::sidecar_text(&cfg, space.as_ref())?.as_bytes(),
    )?;
    println!(
        "imported {} ({} tensors): {} blocks × {} layers, width {}, patch {patch}, {} classes, σ {sigma}",
        args.checkpoint.display(),
        tensors.len(),
        cfg.num_blocks,
        cfg.layers_per_block,
        cfg.channels,
        cfg.num_classes
    );
    println!("wrote {} and {}", weights.display(), side.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_file_name_gives_patch_and_sigma() {
        assert_eq!(
            name_hints(Path::new("runs/imagenet64_model_4_1024_8_8_0.05.pth")),
            (Some(4), Some(0.05))
        );
        assert_eq!(name_hints(Path::new("best.pth")), (None, None));
        assert_eq!(
            name_hints(Path::new("afhq_model_8_768_8_8_uniform.pth")),
            (Some(8), None)
        );
    }
}
