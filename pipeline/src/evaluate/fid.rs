//! `pipeline fid` (alias `evaluate`): Inception Score, FID, sFID, precision, recall and KID of a sample
//! set (a directory of PNGs or an ADM-style `.npz`) against a reference `.npz` (see
//! [`crate::evaluate::fid_reference`]: ADM's reference batches, pytorch-fid's `--save-stats` files, or
//! `pipeline fid-stats`), with pytorch-fid's Inception network (`model::inception`), as ADM's
//! `evaluator.py` reports them.
//!
//! [`score`] is the library entry point for other jobs (training's periodic FID, freshly sampled
//! batches): it takes uint8 (B, H, W, 3) batches from any iterator and keeps running sums
//! ([`FeatureStats`]) and, only when precision/recall or KID are asked for, the pool3 activations
//! (N × 2048 float32 on the network's device: 400 MB for 50 000 samples).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use model::feature_stats::FeatureStats;
use model::inception::{Features, Inception, LoadedInception};
use tch::{Device, Kind, Tensor};

pub use crate::evaluate::fid_reference::{read_reference, Reference};
use crate::evaluate::rank_parts::{self, PartWriter, RankArgs, Ranks};
use crate::formats::image_set::ImageSet;
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
    /// Reference: an .npz with `mu` (2048) and `sigma` (2048, 2048), and for sFID `mu_s`, `sigma_s`,
    /// for precision/recall and KID `acts` or `arr_0` (ADM's VIRTUAL_imagenet256_labeled.npz, or the
    /// output of `pipeline fid-stats`)
    #[arg(long = "ref", value_name = "REF.npz")]
    reference: PathBuf,
    #[command(flatten)]
    inception: InceptionArgs,
    #[command(flatten)]
    metrics: MetricArgs,
    /// Also write the scores as JSON here (required with several ranks: their features are joined
    /// beside it, on a filesystem every rank sees)
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    #[command(flatten)]
    ranks: RankArgs,
}

/// Settings of precision/recall and KID (the ADM suite's and torch-fidelity's defaults).
#[derive(clap::Args, Debug, Clone)]
pub struct MetricArgs {
    /// Precision/recall: a point's radius is the distance to its k-th nearest neighbour in its own set
    #[arg(long = "pr-k", default_value_t = 3, value_name = "K")]
    pub k: i64,
    /// Precision/recall: rows per block of pairwise distances (memory: about block × N floats)
    #[arg(long = "pr-block", default_value_t = 10000, value_name = "ROWS")]
    pub block: i64,
    /// KID: random subsets of each set
    #[arg(long, default_value_t = 100)]
    pub kid_subsets: usize,
    /// KID: features per subset (capped at the smaller set's size)
    #[arg(long, default_value_t = 1000)]
    pub kid_subset_size: usize,
    /// KID: seed of the subsets
    #[arg(long, default_value_t = 0)]
    pub kid_seed: u64,
}

impl Default for MetricArgs {
    fn default() -> Self {
        MetricArgs {
            k: 3,
            block: 10000,
            kid_subsets: 100,
            kid_subset_size: 1000,
            kid_seed: 0,
        }
    }
}

impl MetricArgs {
    fn check(&self) -> anyhow::Result<()> {
        if self.k < 1 || self.block < 1 || self.kid_subsets < 1 || self.kid_subset_size < 2 {
            bail!(
                "--pr-k, --pr-block and --kid-subsets must be at least 1, --kid-subset-size at least 2"
            );
        }
        Ok(())
    }
}

/// What is scored against a reference besides FID, sFID and the Inception Score.
pub struct Against<'a> {
    pub reference: &'a Reference,
    /// The reference's pool3 activations on the network's device ([`Reference::activations`]); None
    /// skips precision, recall and KID.
    pub acts: Option<&'a Tensor>,
    pub metrics: &'a MetricArgs,
    /// Precision and recall (N × N distances over the samples: `pipeline fid` only).
    pub precision_recall: bool,
}

/// What [`score`] returns. Metrics that could not be computed are None (null in JSON), with the reason
/// in `skipped`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Scores {
    pub fid: f64,
    pub sfid: Option<f64>,
    pub inception_score: f64,
    /// Standard deviation of the score over its splits.
    pub inception_score_std: f64,
    pub inception_score_splits: usize,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    /// The k of precision and recall.
    pub pr_k: Option<i64>,
    /// Mean and standard deviation of the unbiased MMD² estimate over the subsets.
    pub kid: Option<f64>,
    pub kid_std: Option<f64>,
    pub kid_subsets: Option<usize>,
    pub kid_subset_size: Option<usize>,
    pub samples: usize,
    pub reference_features: Option<usize>,
    pub skipped: Vec<String>,
}

/// The running sums of [`FeatureStats`] (pool3, spatial, Inception Score) and, when kept, the pool3
/// activations batch by batch (on the device they were made on: no read-back per batch).
pub struct Accumulator {
    pub stats: FeatureStats,
    acts: Option<Vec<Tensor>>,
}

impl Accumulator {
    pub fn new(stats: FeatureStats, keep_acts: bool) -> Self {
        Accumulator {
            stats,
            acts: keep_acts.then(Vec::new),
        }
    }

    pub fn add(&mut self, f: &Features) -> anyhow::Result<()> {
        self.stats.add(f)?;
        if let Some(acts) = &mut self.acts {
            acts.push(f.pool3.detach());
        }
        Ok(())
    }

    /// Pool3 features, logits and spatial features read back from a part.
    fn add_parts(
        &mut self,
        pool3: &Tensor,
        logits: &Tensor,
        spatial: &Tensor,
    ) -> anyhow::Result<()> {
        self.stats.add_raw(pool3, Some(logits))?;
        self.stats.add_spatial_raw(spatial)?;
        if let Some(acts) = &mut self.acts {
            acts.push(pool3.shallow_clone());
        }
        Ok(())
    }

    /// The kept pool3 activations (N, 2048), None unless kept.
    pub fn activations(&self) -> anyhow::Result<Option<Tensor>> {
        match &self.acts {
            Some(a) if !a.is_empty() => Ok(Some(Tensor::f_cat(a, 0)?)),
            _ => Ok(None),
        }
    }

    /// Replaces the kept activations (e.g. by those of every rank).
    pub fn set_activations(&mut self, acts: Tensor) {
        self.acts = Some(vec![acts]);
    }
}

/// Whether scoring against `reference` needs the samples' activations kept.
pub fn keeps_acts(reference: &Reference) -> bool {
    reference.acts != crate::evaluate::fid_reference::ActsSource::Absent
}

/// The scores of exactly `total` images arriving as uint8 (B, H, W, 3) batches on any device (any H,
/// W; each is resized to 299 as pytorch-fid does). A libtorch failure on a batch is an error naming its
/// images; `progress`, when given, advances per batch.
pub fn score(
    inception: &Inception,
    against: &Against,
    total: usize,
    batches: impl IntoIterator<Item = anyhow::Result<Tensor>>,
    progress: Option<&Progress>,
) -> anyhow::Result<Scores> {
    let stats = FeatureStats::with_inception_score(total, inception.device());
    let mut acc = Accumulator::new(stats, against.acts.is_some());
    let mut seen = 0;
    for batch in batches {
        let images = batch?;
        let n = batch_len(&images);
        let what = format!("Inception features of images {seen}..{}", seen + n);
        crate::runtime::torch_guard::guard(&what, || {
            let f = inception.features(&images).context(what.clone())?;
            acc.add(&f).context(what.clone())
        })?;
        seen += n;
        if let Some(p) = progress {
            p.add(n as u64);
        }
    }
    finish(&acc, against, total, seen)
}

fn batch_len(images: &Tensor) -> usize {
    images.size().first().copied().unwrap_or(0).max(0) as usize
}

/// Every metric of `acc` against `against`: FID and the Inception Score always; sFID when the reference
/// has spatial statistics; KID (and precision/recall when asked for) when both activation sets are there.
pub fn finish(
    acc: &Accumulator,
    against: &Against,
    total: usize,
    seen: usize,
) -> anyhow::Result<Scores> {
    if seen != total {
        bail!("expected {total} images, got {seen}");
    }
    let stats = &acc.stats;
    let reference = against.reference;
    let own = stats.statistics()?;
    let fid = own
        .frechet_distance(&reference.pool3)
        .context("Fréchet distance to the reference statistics")?;
    let is = stats.inception_score()?;
    let mut skipped = Vec::new();
    let sfid = match &reference.spatial {
        Some(spatial) => Some(
            stats
                .spatial_statistics()?
                .frechet_distance(spatial)
                .context("Fréchet distance to the reference's spatial statistics")?,
        ),
        None => {
            skipped.extend(reference.sfid_unavailable());
            None
        }
    };
    let mut scores = Scores {
        fid,
        sfid,
        inception_score: is.mean,
        inception_score_std: is.std,
        inception_score_splits: is.splits,
        precision: None,
        recall: None,
        pr_k: None,
        kid: None,
        kid_std: None,
        kid_subsets: None,
        kid_subset_size: None,
        samples: seen,
        reference_features: None,
        skipped,
    };
    let acts = acc.activations()?;
    let (ref_acts, acts) = match (against.acts, acts) {
        (Some(r), Some(a)) => (r, a),
        _ => {
            scores.skipped.extend(reference.acts_unavailable());
            return Ok(scores);
        }
    };
    let m = against.metrics;
    let acts = acts.f_to_device(ref_acts.device())?;
    let (n_ref, n) = (ref_acts.size()[0], acts.size()[0]);
    scores.reference_features = Some(n_ref as usize);
    if against.precision_recall {
        if n_ref > m.k && n > m.k {
            let (precision, recall) =
                model::manifold::precision_recall(ref_acts, &acts, m.k, m.block)
                    .context("precision and recall")?;
            scores.precision = Some(precision);
            scores.recall = Some(recall);
            scores.pr_k = Some(m.k);
        } else {
            scores.skipped.push(format!(
                "precision and recall skipped: k = {} needs more than k features in each set \
                 ({n_ref} reference, {n} samples)",
                m.k
            ));
        }
    }
    let size = m.kid_subset_size.min(n_ref as usize).min(n as usize);
    if size >= 2 {
        let (kid, kid_std) = model::manifold::kid(ref_acts, &acts, m.kid_subsets, size, m.kid_seed)
            .context("KID")?;
        scores.kid = Some(kid);
        scores.kid_std = Some(kid_std);
        scores.kid_subsets = Some(m.kid_subsets);
        scores.kid_subset_size = Some(size);
    } else {
        scores.skipped.push(format!(
            "KID skipped: subsets need 2 features ({n_ref} reference, {n} samples)"
        ));
    }
    Ok(scores)
}

/// [`score`] over several ranks: batch k is rank (k mod W)'s; each rank writes the features of its
/// batches to a part beside `base`, and rank 0 adds them in batch order to the statistics, exactly
/// as one process would (same batches, same order), so the scores are the single-process ones. Rank 0
/// returns the accumulator, the others None.
fn score_ranks(
    ranks: &Ranks,
    inception: &Inception,
    keep_acts: bool,
    total: usize,
    batches: impl IntoIterator<Item = anyhow::Result<Tensor>>,
    progress: &Progress,
    base: &Path,
) -> anyhow::Result<Option<(Accumulator, usize)>> {
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
            keep_acts,
        )
        .map(Some)
    } else {
        Ok(None)
    };
    ranks.agree("joining the feature parts", joined)
}

/// One batch's network outputs as a record of a features part: n (u64 LE), pool3 (n × 2048 f32 LE),
/// logits_unbiased (n × 1008 f32 LE), spatial (n × 2023 f32 LE): what [`FeatureStats::add`] reads,
/// bit for bit.
pub fn write_features(part: &mut PartWriter, f: &Features) -> anyhow::Result<()> {
    let n = f.pool3.size()[0];
    part.write(&(n as u64).to_le_bytes())?;
    for t in [&f.pool3, &f.logits_unbiased, &f.spatial] {
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
/// Inception Score's logits for `total` images, and the pool3 activations when `keep_acts`); the parts
/// are removed. Returns them and the image count.
pub fn join_features(
    paths: &[PathBuf],
    order: PartOrder,
    device: Device,
    total: usize,
    keep_acts: bool,
) -> anyhow::Result<(Accumulator, usize)> {
    use std::io::Read;
    let mut parts = paths
        .iter()
        .map(|p| {
            std::fs::File::open(p)
                .map(|f| std::io::BufReader::with_capacity(1 << 20, f))
                .with_context(|| format!("opening {}", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut acc = Accumulator::new(FeatureStats::with_inception_score(total, device), keep_acts);
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
        let spatial = read(model::inception::SPATIAL_FEATURES)?;
        acc.add_parts(&pool3, &logits, &spatial)?;
        seen += n as usize;
    }
    drop(parts);
    rank_parts::remove_parts(paths)?;
    Ok((acc, seen))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    args.metrics.check()?;
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
    // Rank 0 scores against the reference: only it needs the reference's activations.
    let ref_acts = if ranks.leader() {
        reference_activations(&reference, inception, args.inception.batch)
    } else {
        Ok(None)
    };
    let ref_acts = ranks.agree("reading the reference's activations", ref_acts)?;
    let against = Against {
        reference: &reference,
        acts: ref_acts.as_ref(),
        metrics: &args.metrics,
        precision_recall: true,
    };
    // With several ranks each scores about 1/W of the images (whole batches, round robin).
    let batches_total = set.len().div_ceil(args.inception.batch.max(1));
    let my_batches = (batches_total + ranks.world() - 1 - ranks.rank()) / ranks.world();
    let progress = Progress::new(
        "fid",
        (my_batches * args.inception.batch).min(set.len()) as u64,
    );
    let batches = set.batches(args.inception.batch);
    let scores = if ranks.single() {
        score(inception, &against, set.len(), batches, Some(&progress))
    } else {
        let out = args.out.as_deref().unwrap_or(Path::new("fid.json"));
        let base = out.with_file_name(format!(
            "{}.features",
            out.file_name().unwrap_or_default().to_string_lossy()
        ));
        match score_ranks(
            &ranks,
            inception,
            keeps_acts(&reference),
            set.len(),
            batches,
            &progress,
            &base,
        )? {
            Some((acc, seen)) => finish(&acc, &against, set.len(), seen),
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

/// The reference's pool3 activations on the network's device, saying where they came from.
pub fn reference_activations(
    reference: &Reference,
    inception: &Inception,
    batch: usize,
) -> anyhow::Result<Option<Tensor>> {
    use crate::evaluate::fid_reference::ActsSource;
    let acts = reference
        .activations(inception, batch)
        .context("the reference's pool3 activations (precision, recall, KID)")?;
    match reference.acts {
        ActsSource::Stored { count } => println!("reference activations: `acts` [{count}, 2048]"),
        ActsSource::Images { count } => println!(
            "reference activations: {count} images of `arr_0` through the Inception network"
        ),
        ActsSource::Absent => {}
    }
    Ok(acts)
}

fn print_scores(scores: &Scores) {
    println!("FID: {:.4}", scores.fid);
    match scores.sfid {
        Some(s) => println!("sFID: {s:.4}"),
        None => println!("sFID: skipped"),
    }
    println!(
        "Inception Score: {:.4} ± {:.4} ({} splits of {} samples)",
        scores.inception_score,
        scores.inception_score_std,
        scores.inception_score_splits,
        scores.samples
    );
    if let (Some(p), Some(r), Some(k)) = (scores.precision, scores.recall, scores.pr_k) {
        println!(
            "Precision: {p:.4}, Recall: {r:.4} (k = {k}; {} reference and {} sample features)",
            scores.reference_features.unwrap_or(0),
            scores.samples
        );
    }
    if let (Some(kid), Some(std), Some(subsets), Some(size)) = (
        scores.kid,
        scores.kid_std,
        scores.kid_subsets,
        scores.kid_subset_size,
    ) {
        println!("KID: {kid:.6} ± {std:.6} ({subsets} subsets of {size})");
    }
    for note in &scores.skipped {
        println!("note: {note}");
    }
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
