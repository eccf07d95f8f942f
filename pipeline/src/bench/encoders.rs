//! `pipeline bench encoders`: images per second of the tch DINOv2-B (224 px) and SD-VAE encoder (256 px)
//! with random weights at the published sizes, against transformers / diffusers running the same sizes
//! through bench/encoders_reference.py on the same libtorch and thread count, in the same run.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;

use super::reference::{cpu_threads, median, Reference};
use model::dinov2::{self, Dinov2};
use model::frozen::Precision;
use model::vae::{self, AutoencoderKl};
use tch::{nn, Device, Kind, Tensor};

#[derive(clap::Args)]
pub struct Args {
    /// Images per DINOv2 batch
    #[arg(long, default_value_t = 4)]
    dinov2_batch: i64,
    /// Images per VAE-encoder batch
    #[arg(long, default_value_t = 2)]
    vae_batch: i64,
    /// Run our VAE encoder on NCHW activations (the default on CUDA; the reference is NCHW either way)
    #[arg(long, conflicts_with = "vae_channels_last")]
    vae_nchw: bool,
    /// Run our VAE encoder on channels-last activations (the default on the CPU)
    #[arg(long)]
    vae_channels_last: bool,
    /// Timed batches per model and side, interleaved (the median is reported)
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Untimed batches first
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Intra-op threads for both sides (default: libtorch's default, i.e. the number of cores)
    #[arg(long)]
    threads: Option<i32>,
    /// Python holding torch, transformers and diffusers
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// The reference script
    #[arg(long, default_value = "bench/encoders_reference.py")]
    reference: PathBuf,
}

struct Timing {
    seconds_per_batch: f64,
    images_per_s: f64,
}

impl Timing {
    fn from_median(seconds: Vec<f64>, batch: i64) -> Self {
        let median = median(seconds);
        Timing {
            seconds_per_batch: median,
            images_per_s: batch as f64 / median,
        }
    }
}

#[derive(serde::Deserialize)]
struct Info {
    torch: String,
    threads: i64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.iters == 0 || args.dinov2_batch <= 0 || args.vae_batch <= 0 {
        bail!("--iters, --dinov2-batch and --vae-batch must be positive");
    }
    let threads = cpu_threads(args.threads);
    // CPU on purpose: the anchor runs on CPU too, and a CPU-vs-CPU ratio is what this machine can check.
    let device = Device::Cpu;
    tch::manual_seed(0);
    let mut reference = Reference::start(
        &args.python,
        &args.reference,
        &[
            "--threads".into(),
            threads.to_string(),
            "--dinov2-batch".into(),
            args.dinov2_batch.to_string(),
            "--vae-batch".into(),
            args.vae_batch.to_string(),
        ],
    )?;
    let info: Info = reference.ask("info")?;

    let dinov2_model = dinov2_random(device);
    let pixels = Tensor::randn(
        [args.dinov2_batch, 3, dinov2::INPUT_SIZE, dinov2::INPUT_SIZE],
        (Kind::Float, device),
    );
    let (dinov2, dinov2_anchor) =
        interleaved(&args, &mut reference, "dinov2", args.dinov2_batch, || {
            let _ = dinov2_model.forward(&pixels).expect("valid input shape");
        })?;
    drop(dinov2_model);

    let mut vae_model = vae_random(device);
    if args.vae_nchw || args.vae_channels_last {
        vae_model.channels_last = args.vae_channels_last;
    }
    let images = Tensor::rand([args.vae_batch, 3, 256, 256], (Kind::Float, device)) * 2.0 - 1.0;
    let (vae, vae_anchor) = interleaved(&args, &mut reference, "vae", args.vae_batch, || {
        let _ = vae_model
            .encode_moments(&images)
            .expect("valid input shape");
    })?;

    println!(
        "encoders benchmark: CPU, {threads} threads (reference torch {}, {} threads), fp32, random weights, \
         median of {} interleaved batches per side",
        info.torch, info.threads, args.iters
    );
    report(
        "DINOv2-B/14 224 px",
        args.dinov2_batch,
        &dinov2,
        &dinov2_anchor,
        "transformers",
    );
    report(
        "SD-VAE encoder 256 px",
        args.vae_batch,
        &vae,
        &vae_anchor,
        "diffusers",
    );
    Ok(())
}

/// Warms both sides up, then alternates one tch batch and one reference batch, so that load from
/// other processes falls on both alike.
fn interleaved(
    args: &Args,
    reference: &mut Reference,
    model: &str,
    batch: i64,
    mut ours: impl FnMut(),
) -> anyhow::Result<(Timing, Timing)> {
    for _ in 0..args.warmup {
        ours();
        reference.measure(model)?;
    }
    let (mut tch_seconds, mut anchor_seconds) = (Vec::new(), Vec::new());
    for _ in 0..args.iters {
        let start = Instant::now();
        ours();
        tch_seconds.push(start.elapsed().as_secs_f64());
        anchor_seconds.push(reference.measure(model)?.0);
    }
    Ok((
        Timing::from_median(tch_seconds, batch),
        Timing::from_median(anchor_seconds, batch),
    ))
}

fn report(name: &str, batch: i64, ours: &Timing, anchor: &Timing, anchor_name: &str) {
    println!(
        "{name}, batch {batch}: tch {:.3} img/s ({:.3} s/batch), {anchor_name} {:.3} img/s ({:.3} s/batch), ratio {:.2}x",
        ours.images_per_s,
        ours.seconds_per_batch,
        anchor.images_per_s,
        anchor.seconds_per_batch,
        ours.images_per_s / anchor.images_per_s
    );
}

/// Random weights: speed does not depend on the values, and there is nothing to download.
fn randomize(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (_, mut var) in vs.variables() {
            var.copy_(&(Tensor::randn_like(&var) * 0.02));
        }
    });
}

fn dinov2_random(device: Device) -> Dinov2 {
    let vs = nn::VarStore::new(device);
    let mut model = Dinov2::new(vs.root(), &dinov2::Config::vit_base());
    model.precision = Precision::F32;
    randomize(&vs);
    model
}

fn vae_random(device: Device) -> AutoencoderKl {
    let vs = nn::VarStore::new(device);
    let mut model = AutoencoderKl::new(
        vs.root(),
        &vae::Config::sd_vae(),
        vae::AttentionNaming::Current,
    );
    model.precision = Precision::F32;
    randomize(&vs);
    model
}
