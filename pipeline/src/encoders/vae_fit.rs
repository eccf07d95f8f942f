//! `pipeline encoders init --fit-on SHARDS`: fits a small random-init AutoencoderKL to reconstruct the
//! shards' crops, so that what a latent flow learns decodes to pictures instead of texture (the demo's
//! VAE is tiny and random otherwise). The folder keeps its diffusers layout and tensor names; only the
//! weights and `scaling_factor` (1 / std of the posterior means on the crops, the rule that gave SD its
//! 0.18215) change, so every reader loads it unchanged.

use std::path::Path;

use anyhow::{bail, Context};
use model::vae::{self, AutoencoderKl};
use stages::config::DataConfig;
use tch::nn::OptimizerConfig;
use tch::{nn, Device, Kind, Tensor};

use crate::runtime::progress::Progress;

#[derive(clap::Args, Debug, Clone)]
pub struct FitArgs {
    /// Fit the new VAE to these shards' crops (a shard spec) before writing it
    #[arg(long, value_name = "SHARDS")]
    pub fit_on: Option<String>,
    /// Crop size of the fit (ADM centre crop; a multiple of 8)
    #[arg(long, default_value_t = 64)]
    pub fit_size: usize,
    /// Optimizer steps
    #[arg(long, default_value_t = 1500)]
    pub fit_steps: usize,
    /// Crops per step
    #[arg(long, default_value_t = 32)]
    pub fit_batch: usize,
    /// Adam learning rate
    #[arg(long, default_value_t = 2e-3)]
    pub fit_lr: f64,
    /// At most this many crops are read (held in memory); the last tenth is held out for the report
    #[arg(long, default_value_t = 4096)]
    pub fit_images: usize,
}

/// Weight of the KL term against the per-pixel squared error: small, as in SD's autoencoder, so the
/// posterior stays sharp (the flow models its means) while its scale stays bounded.
const KL_WEIGHT: f64 = 1e-4;

/// Reconstruction quality before and after the fit, on the held-out crops.
#[derive(Debug, Clone, Copy)]
pub struct FitReport {
    pub images: usize,
    pub psnr_before: f64,
    pub psnr_after: f64,
    pub scaling_factor: f64,
}

/// Fits the VAE folder `dir` (written by `encoders init`) in place on CPU, atomically replacing its
/// weights and config.
pub fn fit(dir: &Path, args: &FitArgs, shards: &str, seed: i64) -> anyhow::Result<FitReport> {
    if args.fit_size == 0 || !args.fit_size.is_multiple_of(8) {
        bail!(
            "--fit-size {} must be a positive multiple of 8",
            args.fit_size
        );
    }
    if args.fit_batch == 0 || args.fit_steps == 0 {
        bail!("--fit-batch and --fit-steps must be positive");
    }
    let crops = read_crops(shards, args)?;
    let n = crops.size()[0];
    if n < 10 {
        bail!("{shards}: {n} usable crops; fitting a VAE needs at least 10");
    }
    let held_out = (n / 10).max(1);
    let train = crops.narrow(0, 0, n - held_out);
    let test = crops.narrow(0, n - held_out, held_out);

    let mut loaded = AutoencoderKl::from_folder(dir, Device::Cpu)
        .with_context(|| format!("loading {}", dir.display()))?;
    loaded.vs.unfreeze();
    let net = &loaded.model;
    let psnr_before = psnr(net, &test)?;
    tch::manual_seed(seed);
    let mut opt = nn::Adam::default().build(&loaded.vs, args.fit_lr)?;
    let progress = Progress::new("fit vae", args.fit_steps as u64);
    let batch = (args.fit_batch as i64).min(train.size()[0]);
    for step in 0..args.fit_steps {
        let what = format!("VAE fit step {step}");
        let loss = crate::runtime::torch_guard::guard(&what, || {
            let idx = Tensor::f_randint(train.size()[0], [batch], (Kind::Int64, Device::Cpu))?;
            let x = train.f_index_select(0, &idx)?;
            let (recon, mean, logvar) = autoencode(net, &x)?;
            let mse = (&recon - &x).f_square()?.f_mean(Kind::Float)?;
            let kl =
                ((mean.f_square()? + logvar.f_exp()? - 1.0 - &logvar) * 0.5).f_mean(Kind::Float)?;
            let loss = mse.f_add(&(kl * KL_WEIGHT))?;
            opt.backward_step(&loss);
            Ok(loss)
        })?;
        if step % 100 == 0 || step + 1 == args.fit_steps {
            // Reading the loss back every 100 steps of a CPU-only fit costs nothing measurable.
            let loss = loss.double_value(&[]);
            if !loss.is_finite() {
                bail!("{what}: the loss is {loss}; try a smaller --fit-lr");
            }
            tracing::info!(step, loss, "fit vae");
        }
        progress.add(1);
    }
    progress.finish();
    loaded.vs.freeze();
    let psnr_after = psnr(net, &test)?;
    let scaling_factor = tch::no_grad(|| -> anyhow::Result<f64> {
        let (mean, _) = net.encode_moments(&train.narrow(0, 0, train.size()[0].min(1024)))?;
        Ok(1.0 / mean.f_std(true)?.double_value(&[]))
    })?;
    if !scaling_factor.is_finite() {
        bail!("the fitted VAE's posterior means are constant");
    }
    write(dir, &loaded.vs, scaling_factor)?;
    Ok(FitReport {
        images: n as usize,
        psnr_before,
        psnr_after,
        scaling_factor,
    })
}

/// The first `fit_images` crops as (N, 3, S, S) float in [−1, 1].
fn read_crops(shards: &str, args: &FitArgs) -> anyhow::Result<Tensor> {
    let cfg = DataConfig {
        shards: shards.to_string(),
        image_size: args.fit_size,
        label: stages::label::LabelSource::None,
        ..Default::default()
    };
    cfg.validate()
        .with_context(|| format!("--fit-on {shards} / --fit-size {}", args.fit_size))?;
    let mut pixels = Vec::new();
    let read = crate::formats::crops::for_each_crop(&cfg, args.fit_images, |_, crop| {
        pixels.extend_from_slice(crop);
        Ok(())
    })?;
    let s = args.fit_size as i64;
    let images = Tensor::f_from_slice(&pixels)?.f_view([read.images as i64, s, s, 3])?;
    Ok(vae::prepare_input(
        &images.f_permute([0, 3, 1, 2])?.f_contiguous()?,
    )?)
}

fn autoencode(net: &AutoencoderKl, x: &Tensor) -> anyhow::Result<(Tensor, Tensor, Tensor)> {
    let f = net.config.downsample_factor();
    let (b, s) = (x.size()[0], x.size()[2]);
    let noise = Tensor::f_randn(
        [b, net.config.latent_channels, s / f, s / f],
        (Kind::Float, Device::Cpu),
    )?;
    Ok(net.autoencode(x, &noise))
}

/// PSNR (dB, images in [−1, 1] so the peak-to-peak is 2) of decoding the posterior means.
fn psnr(net: &AutoencoderKl, x: &Tensor) -> anyhow::Result<f64> {
    let (mean, _) = net.encode_moments(x)?;
    let recon = net.decode(&mean)?;
    let mse = (recon.f_clamp(-1.0, 1.0)? - x)
        .f_square()?
        .f_mean(Kind::Double)?
        .double_value(&[]);
    Ok(10.0 * (4.0 / mse.max(1e-12)).log10())
}

fn write(dir: &Path, vs: &nn::VarStore, scaling_factor: f64) -> anyhow::Result<()> {
    let config_path = dir.join(vae::CONFIG_FILE);
    let mut config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?,
    )
    .with_context(|| format!("parsing {}", config_path.display()))?;
    config["scaling_factor"] = scaling_factor.into();
    model::weights::save_var_store(vs, &dir.join(vae::WEIGHTS_FILE))?;
    stages::atomic::write_bytes_atomic(&config_path, &serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}
