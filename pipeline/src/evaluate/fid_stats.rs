//! `pipeline fid-stats`: reference statistics (`mu`, `sigma` of Inception pool3 features, float64) of
//! the training crops, for `pipeline fid --ref`. The crops come from the same image stream as training
//! and precompute (ADM centre crop at `--size`, Pillow-exact), so the reference is the data the model
//! learns; labels are not needed and not read.

use std::path::PathBuf;

use anyhow::{bail, Context};
use model::feature_stats::FeatureStats;
use stages::config::DataConfig;
use tch::Tensor;

use crate::evaluate::fid::{describe_device, write_reference, InceptionArgs};
use crate::runtime::progress::Progress;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Shard spec, e.g. '/data/imagenet/imagenet-train-{000000..001281}.tar'
    #[arg(long)]
    shards: String,
    /// Output .npz with `mu` (2048) and `sigma` (2048, 2048), float64
    #[arg(long, value_name = "REF.npz")]
    out: PathBuf,
    /// Crop size (ADM center crop), as the model's training images
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Use only the first N images of the shuffled stream (default: every image of the shards once)
    #[arg(long)]
    limit: Option<usize>,
    /// Seed of the shard and sample shuffle (which images a --limit picks)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Decode/crop threads (0 = one per core)
    #[arg(long, default_value_t = 0)]
    workers: usize,
    #[command(flatten)]
    inception: InceptionArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.limit == Some(0) || args.limit == Some(1) {
        bail!("--limit must be at least 2 (a covariance needs two images)");
    }
    let cfg = DataConfig {
        shards: args.shards.clone(),
        seed: args.seed,
        image_size: args.size,
        label: stages::label::LabelSource::None,
        threads: args.workers,
        ..Default::default()
    };
    cfg.validate()
        .with_context(|| format!("--shards {} / --size {}", args.shards, args.size))?;
    let loaded = args.inception.load()?;
    let inception = &loaded.model;
    println!(
        "fid-stats: {} at {} px (ADM centre crop) → {} (Inception {}, fp32 on {})",
        args.shards,
        args.size,
        args.out.display(),
        args.inception.weights_path().display(),
        describe_device(inception.device())
    );
    let limit = args.limit.unwrap_or(usize::MAX);
    let batch = args.inception.batch;
    let size = args.size as i64;
    let mut stats = FeatureStats::new(inception.device());
    let progress = Progress::new("fid-stats", args.limit.unwrap_or(0) as u64);
    let mut pixels: Vec<u8> = Vec::new();
    let mut first_key = String::new();
    let mut flush = |pixels: &mut Vec<u8>, first_key: &str| -> anyhow::Result<()> {
        let n = (pixels.len() / (args.size * args.size * 3)) as i64;
        let what = format!("the batch starting at {first_key}");
        crate::runtime::torch_guard::guard(&what, || {
            let images = Tensor::f_from_slice(pixels)?.f_view([n, size, size, 3])?;
            stats.add_images(inception, &images).context(what.clone())
        })?;
        pixels.clear();
        progress.add(n as u64);
        Ok(())
    };
    let read = crate::formats::crops::for_each_crop(&cfg, limit, |id, crop| {
        if pixels.is_empty() {
            first_key = id.to_string();
        }
        pixels.extend_from_slice(crop);
        if pixels.len() == batch * args.size * args.size * 3 {
            flush(&mut pixels, &first_key)?;
        }
        Ok(())
    })?;
    if !pixels.is_empty() {
        flush(&mut pixels, &first_key)?;
    }
    progress.finish();
    let (seen, bad) = (read.images, read.bad);
    if seen < 2 {
        bail!(
            "{}: {seen} usable images; statistics need at least 2",
            args.shards
        );
    }
    let statistics = stats.statistics()?;
    write_reference(&args.out, &statistics)?;
    println!(
        "fid-stats: {seen} images ({} bad inputs skipped) → {} (mu [{d}], sigma [{d}, {d}], float64)",
        bad,
        args.out.display(),
        d = statistics.dim()
    );
    Ok(())
}
