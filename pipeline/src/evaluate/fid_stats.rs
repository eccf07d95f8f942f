//! `pipeline fid-stats`: a reference file of the training crops for `pipeline fid --ref`: `mu`,
//! `sigma` of the Inception pool3 features and `mu_s`, `sigma_s` of the sFID spatial features
//! (float64), and the pool3 activations of the first `--max-acts` images as `acts` (float32 N × 2048)
//! for precision/recall and KID (see [`crate::evaluate::fid_reference`]). The crops come from the
//! same image stream as training and precompute (ADM centre crop at `--size`, Pillow-exact), so the
//! reference is the data the model learns; labels are not needed and not read.

use std::path::PathBuf;

use anyhow::{bail, Context};
use model::feature_stats::FeatureStats;
use stages::config::DataConfig;
use tch::Tensor;

use crate::evaluate::fid::{describe_device, InceptionArgs};
use crate::evaluate::fid_reference::{f32_bytes, write_reference, Extras};
use crate::runtime::progress::Progress;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Shard spec, e.g. '/data/imagenet/imagenet-train-{000000..001281}.tar'
    #[arg(long)]
    shards: String,
    /// Output .npz: `mu` (2048), `sigma` (2048, 2048), `mu_s` (2023), `sigma_s` (2023, 2023), float64,
    /// and `acts` (N, 2048) float32
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
    /// Keep the pool3 activations of at most this many images as `acts` (precision/recall and KID
    /// against this reference; 50 000 take 400 MB; 0 writes none)
    #[arg(long, default_value_t = 50_000, value_name = "N")]
    max_acts: usize,
    #[command(flatten)]
    inception: InceptionArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.limit == Some(0) || args.limit == Some(1) {
        bail!("--limit must be at least 2 (a covariance needs two images)");
    }
    if args.max_acts == 1 {
        bail!("--max-acts must be 0 (none) or at least 2 (precision/recall and KID need two)");
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
    // float32 little-endian rows, read back per batch (the network is the slow part here).
    let mut acts: Vec<u8> = Vec::new();
    let row_bytes = model::inception::FEATURES as usize * 4;
    let progress = Progress::new("fid-stats", args.limit.unwrap_or(0) as u64);
    let mut pixels: Vec<u8> = Vec::new();
    let mut first_key = String::new();
    let mut flush = |pixels: &mut Vec<u8>, first_key: &str| -> anyhow::Result<()> {
        let n = (pixels.len() / (args.size * args.size * 3)) as i64;
        let what = format!("the batch starting at {first_key}");
        crate::runtime::torch_guard::guard(&what, || {
            let images = Tensor::f_from_slice(pixels)?.f_view([n, size, size, 3])?;
            let f = inception.features(&images).context(what.clone())?;
            stats.add(&f).context(what.clone())?;
            let room = (args.max_acts - acts.len() / row_bytes).min(n as usize) as i64;
            if room > 0 {
                acts.extend_from_slice(&f32_bytes(&f.pool3.narrow(0, 0, room))?);
            }
            anyhow::Ok(())
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
    let spatial = stats.spatial_statistics()?;
    let kept = acts.len() / row_bytes;
    write_reference(
        &args.out,
        &statistics,
        Extras {
            spatial: Some(&spatial),
            acts: (kept > 0).then_some((acts.as_slice(), kept)),
        },
    )?;
    println!(
        "fid-stats: {seen} images ({} bad inputs skipped) → {} (mu [{d}], sigma [{d}, {d}], mu_s [{s}], \
         sigma_s [{s}, {s}] float64; acts [{kept}, {d}] float32)",
        bad,
        args.out.display(),
        d = statistics.dim(),
        s = spatial.dim(),
    );
    Ok(())
}
