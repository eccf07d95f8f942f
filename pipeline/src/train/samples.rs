//! The sample grids a run writes as it trains, and the decoding of flow samples into images.

use std::path::Path;

use anyhow::Context;
use model::tarflow::{self, Model};
use tch::{Device, Kind, Tensor};

use crate::config::TrainConfig;

/// The EMA sample grid of a step: `step-N.png`; latent runs decode with the VAE of `[precompute] vae`
/// (and, without one, save `step-N.safetensors` with the latents).
pub(super) fn write_samples(
    ema: &Model,
    vae: Option<&model::vae::LoadedVae>,
    dir: &Path,
    step: u64,
    tc: &TrainConfig,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let n = tc.sample_count.max(1);
    let classes = ema.cfg.num_classes.max(1);
    let y = Tensor::arange(n, (Kind::Int64, ema.device())).remainder(classes);
    let y = (ema.cfg.num_classes > 0).then_some(y);
    let out = tch::no_grad(|| {
        tarflow::sample::sample(ema, n, y.as_ref(), &Default::default(), tc.seed, 10)
    });
    let x = match out {
        Ok(s) => s.x.to_kind(Kind::Float),
        Err(e) => {
            tracing::warn!("step {step}: sample grid skipped: {e}");
            return Ok(());
        }
    };
    let name = format!("step-{step:08}");
    let Some(pixels) = decode_samples(x.shallow_clone(), vae, tc, ema.cfg.in_channels)? else {
        model::weights::save_atomic(
            &[("latents".to_string(), x.to_device(Device::Cpu))],
            &dir.join(format!("{name}.safetensors")),
        )?;
        return Ok(());
    };
    let images = crate::evaluate::trained::to_uint8(&pixels);
    let size = images.size()[1] as usize;
    let bytes = Vec::<u8>::try_from(images.flatten(0, -1))?;
    let mut grid = crate::formats::grid::Grid::new(n as usize, None, size);
    for (i, image) in bytes.chunks_exact(size * size * 3).enumerate() {
        grid.put(i, image);
    }
    stages::atomic::write_bytes_atomic(&dir.join(format!("{name}.png")), &grid.png()?)?;
    Ok(())
}

/// Flow samples → images in [−1, 1]: pixel models as they are, latent models through the VAE (the run's
/// scaling and shift); None for a latent model without a VAE.
pub(super) fn decode_samples(
    x: Tensor,
    vae: Option<&model::vae::LoadedVae>,
    tc: &TrainConfig,
    in_channels: i64,
) -> anyhow::Result<Option<Tensor>> {
    let x = x.to_kind(Kind::Float);
    if !tc.latent && in_channels == 3 {
        return Ok(Some(x));
    }
    let Some(vae) = vae else {
        return Ok(None);
    };
    let scale = tc.latent_scaling.unwrap_or(vae.model.config.scaling_factor);
    let shift = tc.latent_shift.unwrap_or(0.0);
    Ok(Some(vae.model.decode(&(x / scale + shift))?))
}
