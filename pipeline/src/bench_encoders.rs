//! `pipeline bench encoders`: images per second of the tch DINOv2-B (224 px) and SD-VAE encoder (256 px)
//! with random weights at the published sizes, against transformers / diffusers running the same sizes
//! through bench/encoders_reference.py on the same libtorch and thread count, in the same run.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
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
    /// Timed batches per model (the median is reported)
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

#[derive(serde::Deserialize)]
struct Timing {
    seconds_per_batch: f64,
    images_per_s: f64,
}

#[derive(serde::Deserialize)]
struct Reference {
    torch: String,
    threads: i64,
    dinov2: Timing,
    vae_encoder: Timing,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.iters == 0 || args.dinov2_batch <= 0 || args.vae_batch <= 0 {
        bail!("--iters, --dinov2-batch and --vae-batch must be positive");
    }
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads);
    }
    let threads = tch::get_num_threads();
    // CPU on purpose: the anchor runs on CPU too, and a CPU-vs-CPU ratio is what this machine can check.
    let device = Device::Cpu;
    tch::manual_seed(0);

    let dinov2 = time_dinov2(&args, device);
    let vae = time_vae_encoder(&args, device);

    let output = Command::new(&args.python)
        .arg(&args.reference)
        .args(["--threads", &threads.to_string()])
        .args(["--dinov2-batch", &args.dinov2_batch.to_string(), "--vae-batch", &args.vae_batch.to_string()])
        .args(["--iters", &args.iters.to_string(), "--warmup", &args.warmup.to_string()])
        .output()
        .with_context(|| format!("running {} {}", args.python.display(), args.reference.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed with {}: {}",
            args.reference.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let reference: Reference =
        serde_json::from_str(line).with_context(|| format!("parsing the output of {}: `{line}`", args.reference.display()))?;

    println!(
        "encoders benchmark: CPU, {threads} threads (reference torch {}, {} threads), fp32, median of {} batches",
        reference.torch, reference.threads, args.iters
    );
    report("DINOv2-B/14 224 px", args.dinov2_batch, &dinov2, &reference.dinov2, "transformers");
    report("SD-VAE encoder 256 px", args.vae_batch, &vae, &reference.vae_encoder, "diffusers");
    Ok(())
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

fn median_seconds(iters: usize, warmup: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    let mut times: Vec<f64> = (0..iters)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn time_dinov2(args: &Args, device: Device) -> Timing {
    let vs = nn::VarStore::new(device);
    let mut model = Dinov2::new(vs.root(), &dinov2::Config::vit_base());
    model.precision = Precision::F32;
    randomize(&vs);
    let pixels = Tensor::randn([args.dinov2_batch, 3, dinov2::INPUT_SIZE, dinov2::INPUT_SIZE], (Kind::Float, device));
    let seconds = median_seconds(args.iters, args.warmup, || {
        let _ = model.forward(&pixels).expect("valid input shape");
    });
    Timing { seconds_per_batch: seconds, images_per_s: args.dinov2_batch as f64 / seconds }
}

fn time_vae_encoder(args: &Args, device: Device) -> Timing {
    let vs = nn::VarStore::new(device);
    let mut model = AutoencoderKl::new(vs.root(), &vae::Config::sd_vae(), vae::AttentionNaming::Current);
    model.precision = Precision::F32;
    randomize(&vs);
    let images = Tensor::rand([args.vae_batch, 3, 256, 256], (Kind::Float, device)) * 2.0 - 1.0;
    let seconds = median_seconds(args.iters, args.warmup, || {
        let _ = model.encode_moments(&images).expect("valid input shape");
    });
    Timing { seconds_per_batch: seconds, images_per_s: args.vae_batch as f64 / seconds }
}
