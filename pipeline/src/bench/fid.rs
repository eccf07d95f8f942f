//! `pipeline bench fid`: images per second of the tch FID Inception (uint8 images → resize to 299 →
//! pool3 and logits) against pytorch-fid's `InceptionV3` on the same image size, libtorch and thread
//! count through bench/fid_reference.py, interleaved batch by batch in the same run; then one Fréchet
//! distance at the feature width (two symmetric eigendecompositions) against pytorch-fid's
//! `calculate_frechet_distance` (scipy `sqrtm`); then improved precision and recall
//! (`model::manifold::precision_recall`) against a numpy transcription of the ADM evaluator's
//! `ManifoldEstimator` (bench/precision_recall_reference.py) on the same features, read from one
//! file. Random weights and features: speed does not depend on them.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;

use super::reference::{cpu_threads, median, Reference};
use model::feature_stats::Statistics;
use model::inception::Inception;
use tch::{nn, Device, Kind, Tensor};

#[derive(clap::Args)]
pub struct Args {
    /// Images per batch
    #[arg(long, default_value_t = 10)]
    batch: i64,
    /// Side of the (square, uint8) input images; both sides resize them to 299
    #[arg(long, default_value_t = 256)]
    size: i64,
    /// Timed batches per side, interleaved (the median is reported)
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Untimed batches first
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Intra-op threads for both sides (default: libtorch's default, i.e. the number of cores)
    #[arg(long)]
    threads: Option<i32>,
    /// Width of the covariances for the Fréchet-distance timing (0 skips it)
    #[arg(long, default_value_t = 2048)]
    frechet_dim: i64,
    /// Python holding torch and pytorch-fid
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// The reference script
    #[arg(long, default_value = "bench/fid_reference.py")]
    reference: PathBuf,
    /// Precision/recall: reference features (0 skips the precision/recall timing; ADM's ImageNet
    /// reference batch has 10 000)
    #[arg(long, default_value_t = 2000)]
    pr_reference: i64,
    /// Precision/recall: sample features (the paper table uses 50 000)
    #[arg(long, default_value_t = 2000)]
    pr_samples: i64,
    /// Precision/recall: feature width
    #[arg(long, default_value_t = 2048)]
    pr_dim: i64,
    /// Precision/recall: neighbourhood size k
    #[arg(long, default_value_t = 3)]
    pr_k: i64,
    /// Precision/recall: rows per block of distances, both sides
    #[arg(long, default_value_t = 10000)]
    pr_block: i64,
    /// Precision/recall: timed runs per side, interleaved (the median is reported)
    #[arg(long, default_value_t = 1)]
    pr_iters: usize,
    /// The precision/recall reference script
    #[arg(long, default_value = "bench/precision_recall_reference.py")]
    pr_script: PathBuf,
}

#[derive(serde::Deserialize)]
struct PrTiming {
    seconds: Option<f64>,
    value: Option<f64>,
    recall: Option<f64>,
    error: Option<String>,
}

/// Random pool3-like features (non-negative, a shared mean plus spread), float32 (n, d).
fn random_features(n: i64, d: i64, shift: f64) -> Tensor {
    (Tensor::randn([n, d], (Kind::Float, Device::Cpu)) + shift).relu()
}

/// Times `model::manifold::precision_recall` against the numpy reference on the same features.
fn precision_recall_timing(args: &Args, threads: i32) -> anyhow::Result<()> {
    let (nr, ns, d) = (args.pr_reference, args.pr_samples, args.pr_dim);
    let reference = random_features(nr, d, 0.5);
    let samples = random_features(ns, d, 0.55);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("features.npz");
    {
        let mut npz = crate::formats::npz::NpzWriter::create(&file)?;
        for (name, t) in [("reference", &reference), ("samples", &samples)] {
            let size = t.size();
            npz.begin(
                name,
                crate::formats::npz::Dtype::F32,
                &[size[0] as usize, size[1] as usize],
            )?;
            npz.write(&Vec::<u8>::try_from(
                t.contiguous().view_dtype(Kind::Uint8).flatten(0, -1),
            )?)?;
            npz.end()?;
        }
        npz.finish()?;
    }
    let mut numpy = Reference::start(
        &args.python,
        &args.pr_script,
        &[
            "serve".into(),
            file.display().to_string(),
            "--k".into(),
            args.pr_k.to_string(),
            "--block".into(),
            args.pr_block.to_string(),
            "--threads".into(),
            threads.to_string(),
        ],
    )?;
    let (mut ours_s, mut numpy_s) = (Vec::new(), Vec::new());
    let (mut ours_v, mut numpy_v) = ((f64::NAN, f64::NAN), (f64::NAN, f64::NAN));
    for _ in 0..args.pr_iters {
        let start = Instant::now();
        ours_v = model::manifold::precision_recall(&reference, &samples, args.pr_k, args.pr_block)?;
        ours_s.push(start.elapsed().as_secs_f64());
        let answer: PrTiming = numpy.ask("pr")?;
        let Some(seconds) = answer.seconds else {
            bail!(
                "{}: {}",
                args.pr_script.display(),
                answer.error.unwrap_or_default()
            );
        };
        numpy_s.push(seconds);
        numpy_v = (
            answer.value.unwrap_or(f64::NAN),
            answer.recall.unwrap_or(f64::NAN),
        );
    }
    let (ours_s, numpy_s) = (median(ours_s), median(numpy_s));
    println!(
        "precision/recall, {nr} reference × {ns} sample features of {d}, k {}, blocks of {}: tch \
         {ours_s:.2} s (precision {:.4}, recall {:.4}), numpy (ADM ManifoldEstimator, float32) \
         {numpy_s:.2} s (precision {:.4}, recall {:.4}), ratio {:.1}x",
        args.pr_k,
        args.pr_block,
        ours_v.0,
        ours_v.1,
        numpy_v.0,
        numpy_v.1,
        numpy_s / ours_s
    );
    Ok(())
}

#[derive(serde::Deserialize)]
struct Info {
    torch: String,
    pytorch_fid: String,
    threads: i64,
}

fn random_inception(device: Device) -> Inception {
    let vs = nn::VarStore::new(device);
    let model = Inception::new(vs.root());
    model::inception::randomise(&vs);
    model
}

/// A random covariance A·Aᵀ/D + 0.01·I and mean, float64.
fn random_statistics(d: i64) -> anyhow::Result<Statistics> {
    let a = Tensor::randn([d, d], (Kind::Double, Device::Cpu)) / (d as f64).sqrt();
    let sigma = a.matmul(&a.tr()) + Tensor::eye(d, (Kind::Double, Device::Cpu)) * 0.01;
    let mu = Tensor::randn([d], (Kind::Double, Device::Cpu));
    Ok(Statistics::new(&mu, &sigma)?)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.iters == 0 || args.batch <= 0 || args.size < 75 || args.frechet_dim < 0 {
        bail!(
            "--iters and --batch must be positive, --size at least 75, --frechet-dim not negative"
        );
    }
    if args.pr_reference > 0
        && (args.pr_samples <= args.pr_k
            || args.pr_reference <= args.pr_k
            || args.pr_dim <= 0
            || args.pr_k < 1
            || args.pr_block < 1
            || args.pr_iters == 0)
    {
        bail!(
            "precision/recall: --pr-reference and --pr-samples must exceed --pr-k (at least 1), \
             --pr-dim, --pr-block and --pr-iters must be positive"
        );
    }
    let threads = cpu_threads(args.threads);
    // CPU on purpose: the anchor runs on CPU too, and a CPU-vs-CPU ratio is what any machine can check.
    let device = Device::Cpu;
    tch::manual_seed(0);
    let mut reference = Reference::start(
        &args.python,
        &args.reference,
        &[
            "--threads".into(),
            threads.to_string(),
            "--batch".into(),
            args.batch.to_string(),
            "--size".into(),
            args.size.to_string(),
            "--frechet-dim".into(),
            args.frechet_dim.to_string(),
        ],
    )?;
    let info: Info = reference.ask("info")?;

    let inception = random_inception(device);
    let images = Tensor::randint(
        256,
        [args.batch, args.size, args.size, 3],
        (Kind::Uint8, device),
    );
    let ours = || -> anyhow::Result<f64> {
        let start = Instant::now();
        let features = inception.features(&images)?;
        // Reading a value waits for the whole forward, also were it asynchronous.
        let _ = features.pool3.double_value(&[0, 0]);
        Ok(start.elapsed().as_secs_f64())
    };
    for _ in 0..args.warmup {
        ours()?;
        reference.measure("forward")?;
    }
    let (mut tch_s, mut anchor_s) = (Vec::new(), Vec::new());
    for _ in 0..args.iters {
        tch_s.push(ours()?);
        anchor_s.push(reference.measure("forward")?.0);
    }
    let (tch_s, anchor_s) = (median(tch_s), median(anchor_s));
    let rate = |s: f64| args.batch as f64 / s;
    println!(
        "fid benchmark: CPU, {threads} threads (reference torch {}, pytorch-fid {}, {} threads), fp32, \
         random weights, median of {} interleaved batches per side",
        info.torch, info.pytorch_fid, info.threads, args.iters
    );
    println!(
        "Inception pool3 + logits, {s}x{s} uint8 → 299, batch {}: tch {:.2} img/s ({:.3} s/batch), \
         pytorch-fid {:.2} img/s ({:.3} s/batch), ratio {:.2}x",
        args.batch,
        rate(tch_s),
        tch_s,
        rate(anchor_s),
        anchor_s,
        anchor_s / tch_s,
        s = args.size,
    );

    if args.frechet_dim > 0 {
        let d = args.frechet_dim;
        let (a, b) = (random_statistics(d)?, random_statistics(d)?);
        let start = Instant::now();
        let value = a.frechet_distance(&b)?;
        let ours = start.elapsed().as_secs_f64();
        let (anchor, anchor_value) = reference.measure("frechet")?;
        println!(
            "Fréchet distance, {d}-d covariances: eigh {ours:.2} s (FID {value:.1}), pytorch-fid \
             (scipy sqrtm) {anchor:.2} s (FID {:.1}, other random matrices), ratio {:.1}x",
            anchor_value.unwrap_or(f64::NAN),
            anchor / ours
        );
    }
    drop(reference);
    if args.pr_reference > 0 {
        precision_recall_timing(&args, threads)?;
    }
    Ok(())
}
