//! The data space a flow was trained in, recorded in every checkpoint's sidecar (`[space]` of
//! `*.model.toml`): what `sample`, `classify`, `bpd` and `flow decode --denoise` need to turn the flow's
//! numbers back into pixels, or pixels into its input, without the run's config at hand. A bare
//! checkpoint copied away from its run directory keeps its meaning.

use std::path::Path;

use anyhow::{bail, Context};
use model::tarflow::Config;
use serde::{Deserialize, Serialize};
use stages::config::{DataConfig, DecodeScale};
use stages::crop::{CropMode, ResizeImpl};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Space {
    /// The flow models scaled VAE latents (else [-1, 1] pixels). The trained noise σ is not repeated
    /// here: it is the model config's `noise_std` in the same sidecar.
    pub latent: bool,
    /// Pixel side of the training crops.
    pub image_size: usize,
    pub crop: CropMode,
    pub resize_impl: ResizeImpl,
    pub decode_scale: DecodeScale,
    /// Latent models: flow input = (posterior sample − shift) · scaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latent_scaling: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latent_shift: Option<f64>,
    /// The VAE folder the run named (a default for `--vae`) and the fingerprint of the VAE that made
    /// the latents (blake3 of its config and weights; another VAE is refused).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vae: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vae_fingerprint: String,
    /// The precompute cache the flow was trained on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cache_fingerprint: String,
}

/// The crop part of a cache's settings (`precompute::cache_settings`).
#[derive(Deserialize)]
struct CacheCrop {
    image_size: usize,
    mode: CropMode,
    resize_impl: ResizeImpl,
    decode_scale: DecodeScale,
}

impl Space {
    /// The space of a training run over the cache whose manifest settings are `settings`: the crop and
    /// VAE are the cache's (what the numbers were made with), the rest the run config's.
    pub fn of_run(
        cfg: &crate::config::Config,
        cache_fingerprint: &str,
        settings: &serde_json::Value,
    ) -> Space {
        let d = &cfg.data;
        let crop =
            serde_json::from_value::<CacheCrop>(settings["crop"].clone()).unwrap_or(CacheCrop {
                image_size: d.image_size,
                mode: d.crop,
                resize_impl: d.resize_impl,
                decode_scale: d.decode_scale,
            });
        let latent = cfg.train.latent;
        Space {
            latent,
            image_size: crop.image_size,
            crop: crop.mode,
            resize_impl: crop.resize_impl,
            decode_scale: crop.decode_scale,
            latent_scaling: latent.then(|| cfg.train.latent_scaling.unwrap_or(1.0)),
            latent_shift: latent.then(|| cfg.train.latent_shift.unwrap_or(0.0)),
            vae: if latent {
                cfg.precompute.vae.clone()
            } else {
                String::new()
            },
            vae_fingerprint: settings["vae"]["fingerprint"]
                .as_str()
                .filter(|_| latent)
                .unwrap_or_default()
                .to_string(),
            cache_fingerprint: cache_fingerprint.to_string(),
        }
    }

    /// Refuses numbers that would turn every sample into NaN or a crop into an absurd allocation.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=1 << 16).contains(&self.image_size) {
            bail!(
                "space.image_size = {}: must be in 1..=65536",
                self.image_size
            );
        }
        if let Some(s) = self.latent_scaling {
            if !(s.is_finite() && s > 0.0) {
                bail!("space.latent_scaling = {s}: must be a positive number");
            }
        }
        if let Some(s) = self.latent_shift {
            if !s.is_finite() {
                bail!("space.latent_shift = {s}: must be a number");
            }
        }
        Ok(())
    }

    /// `[data]` with this space's crop, for reading evaluation images the way training read them.
    pub fn apply_crop(&self, data: &mut DataConfig) {
        data.crop = self.crop;
        data.resize_impl = self.resize_impl;
        data.decode_scale = self.decode_scale;
    }
}

/// The sidecar text: the model config's keys, then `[space]` when known.
pub fn sidecar_text(model: &Config, space: Option<&Space>) -> anyhow::Result<String> {
    let mut text = toml::to_string_pretty(model)?;
    if let Some(space) = space {
        let mut table = toml::Table::new();
        table.insert("space".into(), toml::Value::try_from(space)?);
        text.push('\n');
        text.push_str(&toml::to_string_pretty(&table)?);
    }
    Ok(text)
}

/// The sidecar config next to a project checkpoint.
pub fn sidecar(checkpoint: &Path) -> std::path::PathBuf {
    checkpoint.with_extension("model.toml")
}

/// Reads a sidecar (or any model config TOML: bare keys or a `[model]` section) and its `[space]`.
pub fn read_sidecar(path: &Path) -> anyhow::Result<(Config, Option<Space>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading model config {}", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("model config {}", path.display()))?;
    let space = match table.remove("space") {
        Some(v) => {
            let space = Space::deserialize(v)
                .map_err(|e| anyhow::anyhow!("[space] of {}: {e}", path.display()))?;
            space
                .validate()
                .map_err(|e| anyhow::anyhow!("[space] of {}: {e}", path.display()))?;
            Some(space)
        }
        None => None,
    };
    let value = match table.remove("model") {
        Some(section) if table.is_empty() => section,
        Some(_) => bail!(
            "model config {}: mixes a [model] section with other keys",
            path.display()
        ),
        None => toml::Value::Table(table),
    };
    let cfg = Config::deserialize(value)
        .map_err(|e| anyhow::anyhow!("model config {}: {e}", path.display()))?;
    // Checked here, before any weights are read or a tensor is allocated for the config.
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("model config {}: {e}", path.display()))?;
    Ok((cfg, space))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sidecar_round_trips_with_and_without_its_space() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::preset("tiny-latent").unwrap();
        let space = Space {
            latent: true,
            image_size: 16,
            crop: CropMode::ResizeCenterCrop,
            resize_impl: ResizeImpl::Pillow,
            decode_scale: DecodeScale::Exact,
            latent_scaling: Some(0.5),
            latent_shift: Some(0.1),
            vae: "/vae".into(),
            vae_fingerprint: "abc".into(),
            cache_fingerprint: "0123".into(),
        };
        let path = dir.path().join("m.model.toml");
        std::fs::write(&path, sidecar_text(&cfg, Some(&space)).unwrap()).unwrap();
        assert_eq!(
            read_sidecar(&path).unwrap(),
            (cfg.clone(), Some(space.clone()))
        );
        std::fs::write(&path, sidecar_text(&cfg, None).unwrap()).unwrap();
        assert_eq!(read_sidecar(&path).unwrap(), (cfg.clone(), None));
        // A misspelt key in [space] is named, not ignored.
        let text = sidecar_text(&cfg, None).unwrap() + "\n[space]\nlatnet = true\n";
        std::fs::write(&path, text).unwrap();
        let err = read_sidecar(&path).unwrap_err().to_string();
        assert!(err.contains("[space]") && err.contains("latnet"), "{err}");
        // Numbers that cannot be right are refused with the key and the file, before any weights.
        for (bad, key) in [
            ("noise_std = nan", "model.noise_std = NaN"),
            ("channels = 0", "model.channels = 0"),
            ("num_blocks = 1000000", "model.num_blocks = 1000000"),
        ] {
            let text = sidecar_text(&cfg, None).unwrap();
            let field = bad.split(' ').next().unwrap();
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{field} =")))
                .unwrap();
            std::fs::write(&path, text.replace(line, bad)).unwrap();
            let err = read_sidecar(&path).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("m.model.toml"), "{err}");
        }
        let mut nan_scale = space.clone();
        nan_scale.latent_scaling = Some(f64::NAN);
        std::fs::write(&path, sidecar_text(&cfg, Some(&nan_scale)).unwrap()).unwrap();
        let err = read_sidecar(&path).unwrap_err().to_string();
        assert!(err.contains("space.latent_scaling = NaN"), "{err}");
    }
}
