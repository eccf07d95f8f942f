//! A trained flow as `sample`, `classify` and `bpd` find it: a run directory (`--run`, the layout
//! `pipeline train` writes) or a bare checkpoint (`--checkpoint`), EMA weights by default, the VAE of a
//! latent model, and the conversions between the flow's space and uint8 pixels.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use model::tarflow;
use model::vae::{AutoencoderKl, LoadedVae};
use stages::config::DataConfig;
use tch::{Device, Kind, Tensor};

#[derive(clap::Args, Clone, Debug)]
pub struct TrainedArgs {
    /// Run directory written by `pipeline train --out RUN_DIR` (its `checkpoints/latest`)
    #[arg(
        long,
        conflicts_with = "checkpoint",
        required_unless_present = "checkpoint"
    )]
    pub run: Option<PathBuf>,
    /// Bare checkpoint (safetensors + `.model.toml` sidecar, as `pipeline flow init` writes)
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// With --run: which weights of the checkpoint, `ema` or `model` (the raw training weights)
    #[arg(long, default_value = "ema", value_parser = ["ema", "model"])]
    pub weights: String,
    /// With --run: checkpoint directory name under `checkpoints/` (default: the one `latest` names)
    #[arg(long, value_name = "NAME")]
    pub step: Option<String>,
    /// VAE folder (diffusers layout) of a latent model; default: the one the checkpoint's sidecar
    /// records (`[space] vae`), else `[precompute] vae` of the run config
    #[arg(long, value_name = "DIR")]
    pub vae: Option<PathBuf>,
    /// Device: auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub struct Trained {
    pub flow: tarflow::Loaded,
    /// Present for latent models when a VAE is known.
    pub vae: Option<LoadedVae>,
    pub latent: bool,
    /// The data space the checkpoint's sidecar records (absent in checkpoints from `flow init/import`).
    pub space: Option<crate::formats::space::Space>,
    pub checkpoint: PathBuf,
    /// The run's effective config (raw TOML: sections of other jobs are read by key, not by type).
    pub run_config: Option<toml::Table>,
    pub device: Device,
}

fn lookup<'a>(table: &'a toml::Table, section: &str, key: &str) -> Option<&'a toml::Value> {
    table.get(section)?.as_table()?.get(key)
}

/// The checkpoint file a run directory points at.
fn run_checkpoint(run: &Path, step: Option<&str>, weights: &str) -> anyhow::Result<PathBuf> {
    let dir = run.join("checkpoints");
    let name = match step {
        Some(s) => s.to_string(),
        None => {
            let latest = dir.join("latest");
            std::fs::read_to_string(&latest)
                .with_context(|| {
                    format!(
                        "reading {} (is {} a run directory of `pipeline train`?)",
                        latest.display(),
                        run.display()
                    )
                })?
                .trim()
                .to_string()
        }
    };
    let file = dir.join(&name).join(format!("{weights}.safetensors"));
    if !file.exists() {
        bail!(
            "{}: no such checkpoint file (weights `{weights}` of checkpoint `{name}`)",
            file.display()
        );
    }
    Ok(file)
}

impl TrainedArgs {
    /// Loads the flow and, for a latent model, the VAE if `need_vae` (sampling and encoding images), on
    /// `--device`; for one rank of several, `auto` and `cuda` mean cuda:LOCAL_RANK.
    pub fn load(
        &self,
        need_vae: bool,
        launch: &crate::runtime::launch::Launch,
    ) -> anyhow::Result<Trained> {
        let device = launch.device(&self.device)?;
        let (checkpoint, run_config) = match (&self.run, &self.checkpoint) {
            (Some(run), _) => {
                let path = run.join("config.toml");
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let table: toml::Table = toml::from_str(&text)
                    .with_context(|| format!("run config {}", path.display()))?;
                (
                    run_checkpoint(run, self.step.as_deref(), &self.weights)?,
                    Some(table),
                )
            }
            (None, Some(ckpt)) => (ckpt.clone(), None),
            (None, None) => bail!("give --run RUN_DIR or --checkpoint FILE"),
        };
        let side = crate::formats::space::sidecar(&checkpoint);
        if !side.exists() {
            bail!(
                "{}: no model config sidecar {}",
                checkpoint.display(),
                side.display()
            );
        }
        let (cfg, space) = crate::formats::space::read_sidecar(&side)?;
        let flow = tarflow::load(&checkpoint, &cfg, device)?;
        let run_value = |section: &str, key: &str| {
            run_config
                .as_ref()
                .and_then(|t| lookup(t, section, key))
                .cloned()
        };
        let latent = match &space {
            Some(s) => s.latent,
            None => run_value("train", "latent")
                .and_then(|v| v.as_bool())
                .unwrap_or(cfg.in_channels != 3),
        };
        let vae_dir = self.vae.clone().or_else(|| {
            space
                .as_ref()
                .map(|s| s.vae.clone())
                .filter(|v| !v.is_empty())
                .or_else(|| {
                    run_value("precompute", "vae").and_then(|v| v.as_str().map(String::from))
                })
                .map(PathBuf::from)
        });
        let vae = match (latent && need_vae, vae_dir) {
            (false, _) => None,
            (true, Some(dir)) => {
                let mut vae = AutoencoderKl::from_folder(&dir, device)
                    .with_context(|| format!("loading the VAE from {}", dir.display()))?;
                // The factors the flow was trained with win over the VAE folder's.
                let recorded = |key: &str, from_space: Option<f64>| {
                    from_space.or_else(|| run_value("train", key).and_then(|v| v.as_float()))
                };
                if let Some(scale) = recorded(
                    "latent_scaling",
                    space.as_ref().and_then(|s| s.latent_scaling),
                ) {
                    vae.model.config.scaling_factor = scale;
                }
                if let Some(shift) =
                    recorded("latent_shift", space.as_ref().and_then(|s| s.latent_shift))
                {
                    vae.model.config.shift_factor = Some(shift);
                }
                if let Some(expected) = space
                    .as_ref()
                    .map(|s| s.vae_fingerprint.as_str())
                    .filter(|f| !f.is_empty())
                {
                    let got = vae.fingerprint()?;
                    if got != expected {
                        bail!(
                            "VAE {} (fingerprint {got}) is not the VAE whose latents {} was trained on \
                             (fingerprint {expected}, recorded in {}): give the VAE that made the cache",
                            dir.display(),
                            checkpoint.display(),
                            side.display()
                        );
                    }
                }
                if vae.model.config.latent_channels != cfg.in_channels {
                    bail!(
                        "VAE {} has {} latent channels, the flow {} takes {}",
                        dir.display(),
                        vae.model.config.latent_channels,
                        checkpoint.display(),
                        cfg.in_channels
                    );
                }
                Some(vae)
            }
            (true, None) => bail!(
                "{} is a latent model ({} channels): give --vae DIR",
                checkpoint.display(),
                cfg.in_channels
            ),
        };
        if !latent && cfg.in_channels != 3 {
            bail!(
                "{}: a pixel model needs 3 input channels, the config has {}",
                checkpoint.display(),
                cfg.in_channels
            );
        }
        Ok(Trained {
            flow,
            vae,
            latent,
            space,
            checkpoint,
            run_config,
            device,
        })
    }
}

impl Trained {
    pub fn model(&self) -> &tarflow::Model {
        &self.flow.model
    }

    /// The flow, for run-time switches (how decode steps run).
    pub fn model_mut(&mut self) -> &mut tarflow::Model {
        &mut self.flow.model
    }

    /// Side length of the images the model makes or reads, in pixels.
    pub fn pixel_size(&self) -> i64 {
        if let Some(space) = &self.space {
            return space.image_size as i64;
        }
        let factor = self
            .vae
            .as_ref()
            .map_or(1, |v| v.model.config.downsample_factor());
        self.model().cfg.img_size * if self.latent { factor } else { 1 }
    }

    /// The `[data]` settings used to read labelled shards: the run's (crop mode, resampler, labels) when
    /// there is a run, in reading order (no shuffles), at the model's pixel size.
    pub fn data_config(&self, shards: &str) -> anyhow::Result<DataConfig> {
        use serde::Deserialize;
        let base = match self.run_config.as_ref().and_then(|t| t.get("data")) {
            Some(v) => DataConfig::deserialize(v.clone())
                .map_err(|e| anyhow::anyhow!("[data] of the run config: {e}"))?,
            None => DataConfig::default(),
        };
        let mut base = base;
        if let Some(space) = &self.space {
            space.apply_crop(&mut base);
        }
        Ok(DataConfig {
            shards: shards.to_string(),
            image_size: self.pixel_size() as usize,
            flip: false,
            shard_shuffle: false,
            shuffle_buffer: 0,
            shuffle_initial: 0,
            samples_per_rank: 0,
            ..base
        })
    }

    /// uint8 images (B, 3, H, W) → the flow's input: [−1, 1] pixels, or scaled VAE posterior means.
    pub fn images_to_flow(&self, images: &Tensor) -> anyhow::Result<Tensor> {
        let x = model::vae::prepare_input(&images.to_device(self.device))?;
        if !self.latent {
            return Ok(x);
        }
        let vae = &self
            .vae
            .as_ref()
            .context("encoding images for a latent model needs --vae")?
            .model;
        let (mean, _) = vae.encode_moments(&x)?;
        Ok(vae.scale_latents(&mean))
    }

    /// The flow's output (B, C, h, w) → uint8 images (B, H, W, 3) on the CPU.
    pub fn flow_to_images(&self, x: &Tensor) -> anyhow::Result<Tensor> {
        let pixels = match (&self.vae, self.latent) {
            (Some(vae), true) => vae
                .model
                .decode(&vae.model.unscale_latents(&x.to_kind(Kind::Float)))?,
            (None, true) => bail!("decoding latents needs --vae"),
            (_, false) => x.to_kind(Kind::Float),
        };
        Ok(to_uint8(&pixels))
    }
}

/// [−1, 1] float (B, 3, H, W) → uint8 (B, H, W, 3) on the CPU as REPA's sampler does:
/// clamp(127.5·x + 128, 0, 255) truncated, i.e. 127.5·(x + 1) rounded half up.
pub fn to_uint8(pixels: &Tensor) -> Tensor {
    to_uint8_on_device(&pixels.to_device(Device::Cpu))
}

/// [`to_uint8`] where the pixels are (a GPU's samples stay there for the Inception network).
pub fn to_uint8_on_device(pixels: &Tensor) -> Tensor {
    (pixels * 127.5 + 128.0)
        .floor()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous()
}
