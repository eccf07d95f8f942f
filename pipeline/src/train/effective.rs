//! The effective config of a training job: the preset, the command line's overrides, and what the
//! config leaves to be resolved (the latent factors of the VAE, the trained σ).

use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::config::{ConfigArgs, Loaded};

/// The effective config of a training job: the file, `--latent`/`--shards`/`--cache` as overrides, the
/// latent scaling resolved from the VAE when the config leaves it unset and `model.noise_std` set to
/// the trained σ (written into the run's config.toml and the checkpoints' sidecars, so sampling and
/// classification decode and denoise with what the flow was trained with).
pub fn load_config(
    config: &ConfigArgs,
    latent: bool,
    shards: &Option<String>,
    cache: &Option<PathBuf>,
) -> anyhow::Result<Loaded> {
    load_config_with(config, latent, shards, cache, true)
}

/// `load_config`, optionally without reading the VAE folder (a dry run needs no latent factors).
pub(super) fn load_config_with(
    config: &ConfigArgs,
    latent: bool,
    shards: &Option<String>,
    cache: &Option<PathBuf>,
    resolve_latent: bool,
) -> anyhow::Result<Loaded> {
    let mut overrides = config.overrides.clone();
    if latent {
        overrides.push("train.latent=true".into());
    }
    if let Some(spec) = shards {
        overrides.push(format!("data.shards={spec:?}"));
    }
    if let Some(dir) = cache {
        overrides.push(format!("train.cache={:?}", dir.display().to_string()));
    }
    let mut loaded = ConfigArgs {
        config: config.config.clone(),
        overrides,
    }
    .load()?;
    let c = &mut loaded.config;
    c.train.validate()?;
    if resolve_latent
        && c.train.latent
        && (c.train.latent_scaling.is_none() || c.train.latent_shift.is_none())
    {
        if c.train.latent_scaling.is_some() && c.precompute.vae.is_empty() {
            // A scale given by hand without a VAE to read: the common VAEs (sd-vae) have no shift.
            c.train.latent_shift.get_or_insert(0.0);
        } else {
            let vae = vae_latent_space(c)?;
            c.train.latent_scaling.get_or_insert(vae.scaling_factor);
            c.train
                .latent_shift
                .get_or_insert(vae.shift_factor.unwrap_or(0.0));
        }
    }
    // The σ the run trains with becomes the model's noise_std, which the checkpoint's sidecar carries
    // and sampling's one-step denoising uses.
    if c.train.noise_sigma >= 0.0 {
        c.model.noise_std = c.train.noise_sigma;
    }
    loaded.effective_toml = toml::to_string_pretty(&loaded.config)?;
    Ok(loaded)
}

/// The config (scaling and shift factors) of the VAE that produced the cache (`[precompute] vae`).
fn vae_latent_space(cfg: &crate::config::Config) -> anyhow::Result<model::vae::Config> {
    if cfg.precompute.vae.is_empty() {
        bail!("latent training needs train.latent_scaling (and train.latent_shift when not 0), or [precompute] vae (whose config.json has both factors)");
    }
    let path = PathBuf::from(&cfg.precompute.vae).join(model::vae::CONFIG_FILE);
    model::vae::Config::from_file(&path).with_context(|| {
        format!(
            "reading the VAE scaling and shift factors from {}",
            path.display()
        )
    })
}
