//! `pipeline fid`: FID and Inception Score of a sample set (a directory of PNGs or an ADM-style `.npz`)
//! against reference statistics (`mu`, `sigma`: ADM's reference batches, pytorch-fid's `--save-stats`
//! files, or `pipeline fid-stats`), with pytorch-fid's Inception network (`model::inception`).
//!
//! [`score`] is the library entry point for other jobs (training's periodic FID, freshly sampled
//! batches): it takes uint8 (B, H, W, 3) batches from any iterator and keeps only running sums
//! ([`FeatureStats`]), so the sample count is bounded by time, not memory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use model::feature_stats::{FeatureStats, Statistics};
use model::inception::{Inception, LoadedInception};
use tch::{Device, Kind, Tensor};

use crate::evaluate::rank_parts::{self, PartWriter, RankArgs, Ranks};
use crate::formats::image_set::ImageSet;
use crate::formats::npz::{Dtype, NpzWriter};
use crate::formats::npz_read::NpzReader;
use crate::runtime::progress::Progress;

/// The file name `tools/convert_inception.py` gives the converted pytorch-fid weights.
pub const WEIGHTS_FILE: &str = "pt_inception-2015-12-05-6726825d.safetensors";

/// The Inception flags `fid` and `fid-stats` share.
#[derive(clap::Args, Debug, Clone)]
pub struct InceptionArgs {
    /// Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth converted by
    /// tools/convert_inception.py (default: its default output,
    /// ~/.cache/flowback/pt_inception-2015-12-05-6726825d.safetensors)
    #[arg(long, env = "FLOWBACK_INCEPTION_WEIGHTS", value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Images per Inception forward pass
    #[arg(long, default_value_t = 50)]
    pub batch: usize,
    /// Device: auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl InceptionArgs {
    pub fn weights_path(&self) -> PathBuf {
        self.weights.clone().unwrap_or_else(default_weights)
    }

    /// Checks the flags and loads the network on the chosen device.
    pub fn load(&self) -> anyhow::Result<LoadedInception> {
        self.load_on(model::device::parse_device(&self.device)?)
    }

    /// [`Self::load`] on `device`.
    pub fn load_on(&self, device: Device) -> anyhow::Result<LoadedInception> {
        if self.batch == 0 {
            bail!("--batch must be at least 1");
        }
        let path = self.weights_path();
        Inception::from_file(&path, device).with_context(|| {
            format!(
                "loading the Inception network (download {WEIGHTS_URL} once and run \
                 `python tools/convert_inception.py` on it, or pass --weights)"
            )
        })
    }
}

/// pytorch-fid's release of the TensorFlow FID Inception weights.
pub const WEIGHTS_URL: &str = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth";

/// `${XDG_CACHE_HOME:-~/.cache}/flowback/` + [`WEIGHTS_FILE`], beside the Python environment.
pub fn default_weights() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."));
    cache.join("flowback").join(WEIGHTS_FILE)
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Samples: a directory of PNGs or an .npz whose `arr_0` is uint8 (N, H, W, 3)
    #[arg(long, value_name = "PATH")]
    samples: PathBuf,
    /// Reference statistics: an .npz with `mu` (D) and `sigma` (D, D), e.g. ADM's
    /// VIRTUAL_imagenet256_labeled.npz or the output of `pipeline fid-stats`
    #[arg(long = "ref", value_name = "REF.npz")]
    reference: PathBuf,
    #[command(flatten)]
    inception: InceptionArgs,
    /// Also write the scores as JSON here (required with several ranks: their features are joined
    /// beside it, on a filesystem every rank sees)
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    #[command(flatten)]
    ranks: RankArgs,
}

/// What [`score`] returns.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Scores {
    pub fid: f64,
    pub inception_score: f64,
    /// Standard deviation of the score over its splits.
    pub inception_score_std: f64,
    pub inception_score_splits: usize,
    pub samples: usize,
}

/// Reads reference statistics from an `.npz` holding `mu` and `sigma` (float32 or float64); other
/// arrays (ADM's `arr_0`, `mu_s`, `sigma_s`) are not read. Both headers are checked against each other
/// and against the Inception features' width before either array is inflated, and `sigma` must be a
/// covariance (symmetric, positive semi-definite up to rounding): anything else gives an FID that
/// means nothing, even a negative one.
pub fn read_reference(path: &Path) -> anyhow::Result<Statistics> {
    let file = path.display();
    let need = "reference statistics need `mu` and `sigma` (pipeline fid-stats, pytorch-fid \
                --save-stats or the ADM reference batches write them)";
    let mut npz = NpzReader::open(path)?;
    let mu_shape = npz.member("mu").context(need)?.header.shape;
    let sigma_shape = npz.member("sigma").context(need)?.header.shape;
    let d = model::inception::FEATURES as usize;
    if mu_shape != [d] || sigma_shape != [d, d] {
        bail!(
            "{file}: reference statistics have `mu` of shape {mu_shape:?} and `sigma` of shape \
             {sigma_shape:?}; FID's Inception features need ({d},) and ({d}, {d})"
        );
    }
    let mut array = |name: &str| -> anyhow::Result<Tensor> {
        let (values, shape) = npz.read_f64(name)?;
        let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        Ok(Tensor::f_from_slice(&values)?.f_view(shape.as_slice())?)
    };
    let (mu, sigma) = (array("mu")?, array("sigma")?);
    let stats = Statistics::new(&mu, &sigma)
        .and_then(|s| s.check_covariance().map(|()| s))
        .with_context(|| format!("{file}: reference statistics"))?;
    Ok(stats)
}

/// Writes `mu` (D) and `sigma` (D, D) as float64, the arrays ADM's reference batches and pytorch-fid's
/// statistics files hold under these names.
pub fn write_reference(path: &Path, stats: &Statistics) -> anyhow::Result<()> {
    let d = stats.dim() as usize;
    let mut npz = NpzWriter::create(path)?;
    for (name, tensor, shape) in [
        ("mu", &stats.mu, vec![d]),
        ("sigma", &stats.sigma, vec![d, d]),
    ] {
        let values = Vec::<f64>::try_from(tensor.f_contiguous()?.f_view(-1)?)?;
        npz.begin(name, Dtype::F64, &shape)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        npz.write(&bytes)?;
        npz.end()?;
    }
    npz.finish()
}

/// FID against `reference` and the Inception Score of exactly `total` images arriving as uint8
/// (B, H, W, 3) batches on any device (any H, W; each is resized to 299 as pytorch-fid does). A libtorch
/// failure on a batch is an error naming its images; `progress`, when given, advances per batch.
pub fn score(
    inception: &Inception,
    reference: &Statistics,
    total: usize,
    batches: impl IntoIterator<Item = anyhow::Result<Tensor>>,
    progress: Option<&Progress>,
) -> anyhow::Result<Scores> {
    let mut stats = FeatureStats::with_inception_score(total, inception.device());
    let mut seen = 0;
    for batch in batches {
        let images = batch?;
        let n = batch_len(&images);
        let what = format!("Inception features of images {seen}..{}", seen + n);
        crate::runtime::torch_guard::guard(&what, || {
            stats.add_images(inception, &images).context(what.clone())
        })?;
        seen += n;
        if let Some(p) = progress {
            p.add(n as u64);
        }
    }
    finish(&stats, reference, total, seen)
}

fn batch_len(images: &Tensor) -> usize {
    images.size().first().copied().unwrap_or(0).max(0) as usize
}

pub fn finish(
    stats: &FeatureStats,
    reference: &Statistics,
    total: usize,
    seen: usize,
) -> anyhow::Result<Scores> {
    if seen != total {
        bail!("expected {total} images, got {seen}");
    }
    let own = stats.statistics()?;
    let fid = own
        .frechet_distance(reference)
        .context("Fréchet distance to the reference statistics")?;
    let is = stats.inception_score()?;
    Ok(Scores {
        fid,
        inception_score: is.mean,
        inception_score_std: is.std,
        inception_score_splits: is.splits,
        samples: seen,
    })
}

/// [`score`] over several ranks: batch k is rank (k mod W)'s; each rank writes the features of its
/// batches to a part beside `base`, and rank 0 adds them in batch order to the statistics, exactly
/// as one process would (same batches, same order), so the scores are the single-process ones. Rank 0
/// returns the scores, the others None.
fn score_ranks(
    ranks: &Ranks,
    inception: &Inception,
    reference: &Statistics,
    total: usize,
    batches: impl IntoIterator<Item = anyhow::Result<Tensor>>,
    progress: &Progress,
    base: &Path,
) -> anyhow::Result<Option<Scores>> {
    let (rank, world) = (ranks.rank(), ranks.world());
    let mine = (|| -> anyhow::Result<()> {
        let mut part = PartWriter::create(ranks.part_path(base))?;
        let mut seen = 0;
        for (k, batch) in batches.into_iter().enumerate() {
            let images = batch?;
            let n = batch_len(&images);
            if k % world == rank {
                let what = format!("Inception features of images {seen}..{}", seen + n);
                crate::runtime::torch_guard::guard(&what, || {
                    let f = inception.features(&images).context(what.clone())?;
                    write_features(&mut part, &f)
                })?;
                progress.add(n as u64);
            }
            seen += n;
        }
        Ok(part.finish()?)
    })();
    ranks.agree("computing Inception features", mine)?;
    let joined = if ranks.leader() {
        join_features(
            &ranks.part_paths(base),
            PartOrder::RoundRobin,
            inception.device(),
            total,
        )
        .and_then(|(stats, seen)| finish(&stats, reference, total, seen))
        .map(Some)
    } else {
        Ok(None)
    };
    ranks.agree("joining the feature parts", joined)
}

/// One batch's network outputs as a record of a features part: n (u64 LE), pool3 (n × 2048 f32 LE),
/// logits_unbiased (n × 1008 f32 LE): what [`FeatureStats::add`] reads, bit for bit.
pub fn write_features(part: &mut PartWriter, f: &model::inception::Features) -> anyhow::Result<()> {
    let n = f.pool3.size()[0];
    part.write(&(n as u64).to_le_bytes())?;
    for t in [&f.pool3, &f.logits_unbiased] {
        let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        part.write(&Vec::<u8>::try_from(
            t.view_dtype(Kind::Uint8).flatten(0, -1),
        )?)?;
    }
    Ok(())
}

/// How the batches of one job were dealt to the ranks' parts.
#[derive(Clone, Copy)]
pub enum PartOrder {
    /// Batch k is in part k mod W (`fid`).
    RoundRobin,
    /// Each part holds one contiguous run of batches, in rank order (`sample --fid-ref`).
    Sequential,
}

/// Rank 0: the parts' records in global batch order into fresh statistics on `device` (with the
/// Inception Score's logits for `total` images); the parts are removed. Returns them and the image
/// count.
pub fn join_features(
    paths: &[PathBuf],
    order: PartOrder,
    device: Device,
    total: usize,
) -> anyhow::Result<(FeatureStats, usize)> {
    use std::io::Read;
    let mut parts = paths
        .iter()
        .map(|p| {
            std::fs::File::open(p)
                .map(|f| std::io::BufReader::with_capacity(1 << 20, f))
                .with_context(|| format!("opening {}", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut stats = FeatureStats::with_inception_score(total, device);
    let (mut seen, mut current) = (0, 0);
    for k in 0.. {
        let i = match order {
            PartOrder::RoundRobin => k % paths.len(),
            PartOrder::Sequential => current,
        };
        let (path, part) = (&paths[i], &mut parts[i]);
        let mut count = [0u8; 8];
        match part.read_exact(&mut count) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => match order {
                PartOrder::Sequential if current + 1 < paths.len() => {
                    current += 1;
                    continue;
                }
                _ => break,
            },
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        let n = u64::from_le_bytes(count) as i64;
        let mut read = |width: i64| -> anyhow::Result<Tensor> {
            let bytes = crate::formats::npz_read::read_exactly(part, (n * width * 4) as usize)
                .with_context(|| format!("reading {}: a batch is cut short", path.display()))?;
            Ok(Tensor::f_from_slice(&bytes)?
                .f_view_dtype(Kind::Float)?
                .f_view([n, width])?
                .f_to_device(device)?)
        };
        let pool3 = read(model::inception::FEATURES)?;
        let logits = read(model::inception::CLASSES)?;
        stats.add_raw(&pool3, Some(&logits))?;
        seen += n as usize;
    }
    drop(parts);
    rank_parts::remove_parts(paths)?;
    Ok((stats, seen))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Both inputs are checked before the network loads, so a wrong path fails in a second.
    let reference = read_reference(&args.reference)?;
    let set = ImageSet::open(&args.samples)?;
    if set.len() < 2 {
        bail!(
            "{}: FID needs at least 2 images, found {}",
            args.samples.display(),
            set.len()
        );
    }
    let ranks = Ranks::join(&args.ranks)?;
    if let Some(out) = &args.out {
        crate::formats::outputs::refuse_input_as_output(
            "--out",
            out,
            &[("--ref", &args.reference), ("--samples", &args.samples)],
        )?;
    }
    if !ranks.single() && args.out.is_none() {
        bail!(
            "{}--out is required with several ranks (the features are joined beside it)",
            ranks.tag()
        );
    }
    let device = ranks.launch.device(&args.inception.device)?;
    let loaded = ranks.agree(
        "loading the Inception network",
        args.inception.load_on(device),
    )?;
    let inception = &loaded.model;
    let weights = args.inception.weights_path();
    if ranks.leader() {
        println!(
            "fid: {} against {} (Inception {}, fp32 on {})",
            set.describe(),
            args.reference.display(),
            weights.display(),
            describe_device(inception.device()),
        );
    }
    // With several ranks each scores about 1/W of the images (whole batches, round robin).
    let batches_total = set.len().div_ceil(args.inception.batch.max(1));
    let my_batches = (batches_total + ranks.world() - 1 - ranks.rank()) / ranks.world();
    let progress = Progress::new(
        "fid",
        (my_batches * args.inception.batch).min(set.len()) as u64,
    );
    let batches = set.batches(args.inception.batch);
    let scores = if ranks.single() {
        score(inception, &reference, set.len(), batches, Some(&progress))
    } else {
        let out = args.out.as_deref().unwrap_or(Path::new("fid.json"));
        let base = out.with_file_name(format!(
            "{}.features",
            out.file_name().unwrap_or_default().to_string_lossy()
        ));
        match score_ranks(
            &ranks,
            inception,
            &reference,
            set.len(),
            batches,
            &progress,
            &base,
        )? {
            Some(scores) => Ok(scores),
            None => {
                progress.finish();
                return Ok(());
            }
        }
    }
    .with_context(|| format!("scoring {}", args.samples.display()))?;
    progress.finish();
    if !ranks.single() {
        println!("ranks: {}", ranks.world());
    }
    if let Some(out) = &args.out {
        report(&scores, out, &args.samples, &args.reference, &weights)?;
    } else {
        print_scores(&scores);
    }
    Ok(())
}

fn print_scores(scores: &Scores) {
    println!("FID: {:.4}", scores.fid);
    println!(
        "Inception Score: {:.4} ± {:.4} ({} splits of {} samples)",
        scores.inception_score,
        scores.inception_score_std,
        scores.inception_score_splits,
        scores.samples
    );
}

/// Prints the scores and writes them with their inputs' paths as JSON to `out`, atomically.
pub fn report(
    scores: &Scores,
    out: &Path,
    samples: &Path,
    reference: &Path,
    weights: &Path,
) -> anyhow::Result<()> {
    print_scores(scores);
    let mut json = serde_json::to_value(scores)?;
    json["samples_path"] = samples.display().to_string().into();
    json["reference"] = reference.display().to_string().into();
    json["weights"] = weights.display().to_string().into();
    let text = serde_json::to_string_pretty(&json)? + "\n";
    stages::atomic::write_bytes_atomic(out, text.as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    println!("scores: {}", out.display());
    Ok(())
}

pub fn describe_device(device: Device) -> String {
    match device {
        Device::Cpu => format!("cpu, {} threads", tch::get_num_threads()),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}
