//! `pipeline sample`: images from a trained flow. Sample i's noise (and its class under
//! `--random-classes`) comes from a CPU generator keyed by (seed, i), so the images do not depend on
//! the device or on how samples are batched. Writes one PNG per sample, a grid, and `samples.npz` in the
//! ADM evaluation suite's format (`arr_0` uint8 N×H×W×3, `arr_1` int64 labels, −1 = unconditional).
//! Under torchrun/srun each rank draws a run of the batches and rank 0 joins them (`rank_parts`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use model::tarflow::{
    self,
    sample::{Guidance, Plan},
};
use tch::{Device, Kind, Tensor};

use crate::config::solver::{depth_line, graph_note, warn_graph_failures, SolverArgs};
use crate::evaluate::rank_parts::{self, PartWriter, RankArgs, Ranks};
use crate::evaluate::trained::{Trained, TrainedArgs};
use crate::formats::grid::{encode_png, Grid};
use crate::formats::npz::{Dtype, NpzWriter};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    trained: TrainedArgs,
    #[command(flatten)]
    solver: SolverArgs,
    /// Number of samples
    #[arg(long)]
    num: usize,
    /// Classes, comma-separated, cycled over the samples (e.g. `207,360,387,974,88,979,417,279`)
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["random_classes", "unconditional"])]
    classes: Vec<i64>,
    /// A class per sample drawn uniformly from the seed (the default for class-conditional models)
    #[arg(long, conflicts_with = "unconditional")]
    random_classes: bool,
    /// Sample without a class (the mean class embedding)
    #[arg(long)]
    unconditional: bool,
    /// Classifier-free guidance weight w (0 = off)
    #[arg(long, default_value_t = 0.0)]
    cfg: f64,
    /// Ramp the guidance along the sequence, g_i = w·(i+1)/(N−1), as ml-tarflow evaluates FID;
    /// `--annealed=false` holds it at w
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, value_name = "BOOL")]
    annealed: bool,
    /// Attention temperature of the unconditional branch
    #[arg(long, default_value_t = 1.0)]
    attn_temp: f64,
    /// One-step score denoising x + σ²∇log p with σ = the trained noise_std (the checkpoint's), as
    /// ml-tarflow evaluates; `--denoise=false` keeps the raw inverse
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, value_name = "BOOL")]
    denoise: bool,
    /// Seed: the same seed gives the same images on any device and for any --batch
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples per reverse pass
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Redraw rounds for samples with NaN/Inf before giving up
    #[arg(long, default_value_t = 10)]
    max_redraws: usize,
    /// Columns of the grid image (default: ⌈√num⌉); the grid holds at most --grid-max samples
    #[arg(long)]
    grid_cols: Option<usize>,
    /// Most samples shown in the grid
    #[arg(long, default_value_t = 64)]
    grid_max: usize,
    /// Skip the per-sample PNG files (the npz and the grid are still written)
    #[arg(long)]
    no_png: bool,
    /// Output directory: `images/000000.png`…, `grid.png`, `samples.npz`. It must be new, empty, or
    /// hold an earlier run of this same command (whose files are replaced)
    #[arg(long)]
    out: PathBuf,
    /// Replace the outputs of a different earlier `sample` run in --out (its files only; anything
    /// else there is still refused)
    #[arg(long)]
    overwrite: bool,
    /// Also score the samples as they are drawn: FID against these reference statistics (`pipeline
    /// fid-stats` output or an ADM reference batch), the Inception Score, and sFID and KID when the
    /// reference allows, into OUT/fid.json
    #[arg(long, value_name = "REF.npz")]
    fid_ref: Option<PathBuf>,
    /// Inception weights for --fid-ref (default: where `pipeline fid` looks)
    #[arg(long, value_name = "FILE", requires = "fid_ref")]
    fid_weights: Option<PathBuf>,
    #[command(flatten)]
    ranks: RankArgs,
}

/// `--fid-ref`: the network and reference, and where this rank's features go.
struct FidScoring {
    inception: model::inception::LoadedInception,
    reference: crate::evaluate::fid::Reference,
    weights: PathBuf,
    sink: FeatureSink,
}

/// One process accumulates the statistics itself; several ranks each write the features of their
/// contiguous run of batches to a part that rank 0 joins in rank order (the same batches in the same
/// order, so the same numbers).
enum FeatureSink {
    Stats(crate::evaluate::fid::Accumulator),
    Part(Option<PartWriter>),
}

impl FidScoring {
    fn load(args: &Args, ranks: &Ranks, device: Device) -> anyhow::Result<Option<FidScoring>> {
        let Some(reference) = &args.fid_ref else {
            return Ok(None);
        };
        let weights = args
            .fid_weights
            .clone()
            .unwrap_or_else(crate::evaluate::fid::default_weights);
        let reference = crate::evaluate::fid::read_reference(reference).context("--fid-ref")?;
        let inception = model::inception::Inception::from_file(&weights, device)
            .with_context(|| format!("--fid-weights: loading {}", weights.display()))?;
        let sink = if ranks.single() {
            FeatureSink::Stats(crate::evaluate::fid::Accumulator::new(
                model::feature_stats::FeatureStats::with_inception_score(args.num, device),
                crate::evaluate::fid::keeps_acts(&reference),
            ))
        } else {
            FeatureSink::Part(None)
        };
        Ok(Some(FidScoring {
            inception,
            reference,
            weights,
            sink,
        }))
    }

    fn add(
        &mut self,
        images: &Tensor,
        part: impl FnOnce() -> anyhow::Result<PartWriter>,
    ) -> anyhow::Result<()> {
        let net = &self.inception.model;
        match &mut self.sink {
            FeatureSink::Stats(acc) => acc.add(&net.features(images)?),
            FeatureSink::Part(writer) => {
                if writer.is_none() {
                    *writer = Some(part()?);
                }
                let f = net.features(images)?;
                crate::evaluate::fid::write_features(writer.as_mut().expect("created above"), &f)
            }
        }
    }

    fn finish_part(&mut self) -> anyhow::Result<()> {
        match &mut self.sink {
            FeatureSink::Part(writer) => Ok(writer.take().map_or(Ok(()), PartWriter::finish)?),
            FeatureSink::Stats(_) => Ok(()),
        }
    }
}

/// The generator seed of sample `index`'s noise at redraw `attempt`, and of its random class:
/// SplitMix64's mixing decorrelates consecutive (seed, index) keys into independent seeds.
fn sample_key(seed: u64, index: u64, purpose: u64) -> i64 {
    use stages::rng::splitmix64 as mix;
    (mix(mix(mix(seed) ^ index) ^ purpose) >> 1) as i64
}
const PURPOSE_CLASS: u64 = u64::MAX;

/// Standard normal noise (1, N, D) of one sample, drawn on the CPU.
fn sample_noise(model: &tarflow::Model, seed: u64, index: u64, attempt: u64) -> Tensor {
    tch::manual_seed(sample_key(seed, index, attempt));
    Tensor::randn(
        [1, model.cfg.num_tokens(), model.cfg.token_dim()],
        (Kind::Float, Device::Cpu),
    )
}

/// The class of each sample, or None when sampling unconditionally.
fn labels(args: &Args, num_classes: i64) -> anyhow::Result<Option<Vec<i64>>> {
    if args.unconditional || num_classes == 0 {
        if !args.classes.is_empty() || args.random_classes {
            bail!("the model is unconditional (num_classes = 0): --classes and --random-classes do not apply");
        }
        return Ok(None);
    }
    if !args.classes.is_empty() {
        if let Some(bad) = args.classes.iter().find(|&&k| k < 0 || k >= num_classes) {
            bail!("--classes: class {bad} is outside the model's {num_classes} classes");
        }
        return Ok(Some(
            (0..args.num)
                .map(|i| args.classes[i % args.classes.len()])
                .collect(),
        ));
    }
    Ok(Some(
        (0..args.num as u64)
            .map(|i| {
                tch::manual_seed(sample_key(args.seed, i, PURPOSE_CLASS));
                Tensor::randint(num_classes, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0])
            })
            .collect(),
    ))
}

/// Inverts the noise of samples `start..start+len`; samples that come out non-finite get the noise of
/// their next redraw key and are redone, so a redraw does not shift any other sample's noise.
/// Also returns the dependent passes of each block in the first inversion.
fn draw(
    trained: &Trained,
    args: &Args,
    g: &Guidance,
    (start, len): (u64, usize),
    y: Option<&Tensor>,
    plan: &Plan,
) -> anyhow::Result<(Tensor, i64, Vec<i64>)> {
    let model = trained.model();
    let reverse = |z: &Tensor, y: Option<&Tensor>| {
        let out = tarflow::sample::reverse_solved(model, model.precision, z, y, g, plan);
        warn_graph_failures();
        out
    };
    let noise: Vec<Tensor> = (0..len as u64)
        .map(|i| sample_noise(model, args.seed, start + i, 0))
        .collect();
    let (mut x, passes) = reverse(&Tensor::cat(&noise, 0).to_device(trained.device), y);
    let mut redrawn = 0;
    for attempt in 1..=args.max_redraws as u64 + 1 {
        let bad = x
            .isfinite()
            .logical_not()
            .flatten(1, -1)
            .any_dim(1, false)
            .to_device(Device::Cpu);
        let bad: Vec<i64> = Vec::<bool>::try_from(&bad)?
            .iter()
            .enumerate()
            .filter(|(_, b)| **b)
            .map(|(i, _)| i as i64)
            .collect();
        if bad.is_empty() {
            return Ok((x, redrawn, passes));
        }
        if attempt > args.max_redraws as u64 {
            bail!(
                "{} samples still non-finite after {} redraws (samples {start}..{})",
                bad.len(),
                args.max_redraws,
                start + len as u64
            );
        }
        redrawn += bad.len() as i64;
        let fresh: Vec<Tensor> = bad
            .iter()
            .map(|&i| sample_noise(model, args.seed, start + i as u64, attempt))
            .collect();
        let idx = Tensor::from_slice(&bad).to_device(trained.device);
        let y_bad = y.map(|y| y.index_select(0, &idx));
        let (redo, _) = reverse(
            &Tensor::cat(&fresh, 0).to_device(trained.device),
            y_bad.as_ref(),
        );
        x = x.index_copy(0, &idx, &redo);
    }
    unreachable!("the loop returns or fails on its last attempt")
}

/// Where a rank's images go: straight into `samples.npz` for a single process, else into this rank's
/// part of it.
enum Sink {
    Npz(NpzWriter),
    Part(PartWriter),
}

impl Sink {
    fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        match self {
            Sink::Npz(npz) => npz.write(bytes),
            Sink::Part(part) => Ok(part.write(bytes)?),
        }
    }
}

/// Writes the labels array and closes the archive.
fn finish_npz(mut npz: NpzWriter, labels: &Option<Vec<i64>>, num: usize) -> anyhow::Result<()> {
    npz.end()?;
    npz.begin("arr_1", Dtype::I64, &[num])?;
    let label_values = labels.clone().unwrap_or_else(|| vec![-1; num]);
    npz.write(
        &label_values
            .iter()
            .flat_map(|l| l.to_le_bytes())
            .collect::<Vec<u8>>(),
    )?;
    npz.end()?;
    npz.finish()
}

/// What `sample` writes directly inside --out.
const OUTPUTS: [&str; 5] = [
    "images",
    "grid.png",
    "samples.npz",
    "fid.json",
    "fid-features",
];

/// --out is never an input, and holds nothing but this command's earlier outputs.
fn prepare_out(args: &Args) -> anyhow::Result<()> {
    let mut inputs: Vec<(&str, &Path)> = vec![];
    if let Some(run) = &args.trained.run {
        inputs.push(("--run", run));
    }
    if let Some(c) = &args.trained.checkpoint {
        inputs.push(("--checkpoint", c));
    }
    if let Some(r) = &args.fid_ref {
        inputs.push(("--fid-ref", r));
    }
    crate::formats::outputs::refuse_input_as_output("--out", &args.out, &inputs)?;
    // The command as given identifies the run (--overwrite itself aside).
    let command: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--overwrite")
        .collect();
    crate::formats::outputs::prepare_dir("--out", &args.out, &command, &OUTPUTS, args.overwrite)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.num == 0 {
        bail!("--num must be at least 1");
    }
    if args.attn_temp <= 0.0 {
        bail!("--attn-temp must be positive, got {}", args.attn_temp);
    }
    let ranks = Ranks::join(&args.ranks)?;
    // The leader readies --out before any rank writes into it; the others wait for its verdict.
    let prepared = if ranks.leader() {
        prepare_out(&args)
    } else {
        Ok(())
    };
    ranks.agree("preparing --out", prepared)?;
    let mut trained = ranks.agree("loading the model", args.trained.load(true, &ranks.launch))?;
    let steps = args.solver.step_mode(trained.model().device())?;
    trained.model_mut().decode_steps = steps;
    let model = trained.model();
    let labels = ranks.agree("choosing the classes", labels(&args, model.cfg.num_classes))?;
    let g = Guidance {
        weight: args.cfg,
        annealed: args.annealed,
        attn_temp: args.attn_temp,
    };
    let mut fid = ranks.agree(
        "loading the FID network and reference",
        FidScoring::load(&args, &ranks, trained.device),
    )?;
    let size = trained.pixel_size() as usize;
    let image_bytes = size * size * 3;
    // Every evaluation default in one line first, so a sample set says how it was made.
    if ranks.leader() {
        println!(
            "sampling: guidance w {} ({}), attn_temp {}, denoise {}, seed {}, {}",
            args.cfg,
            if args.annealed {
                "annealed"
            } else {
                "constant"
            },
            args.attn_temp,
            if args.denoise {
                format!("on (σ {})", model.cfg.noise_std)
            } else {
                "off".to_string()
            },
            args.seed,
            match (&labels, args.classes.is_empty()) {
                (None, _) => "unconditional",
                (Some(_), true) => "random classes",
                (Some(_), false) => "given classes",
            }
        );
    }
    let images_dir = args.out.join("images");
    let npz_path = args.out.join("samples.npz");
    let fid_features = args.out.join("fid-features");
    let n_grid = args.num.min(args.grid_max.max(1));
    let mut grid = Grid::new(n_grid, args.grid_cols, size);
    let batch = args.batch.max(1);
    let mine = rank_parts::batch_slice(args.num, batch, ranks.split());
    let (plan, source) = args.solver.plan(&trained.checkpoint, model.blocks.len())?;
    eprintln!(
        "solver: {} (from {source}){}",
        plan.describe(),
        graph_note(steps)
    );
    let mut passes = vec![];
    let mut draw_mine = || -> anyhow::Result<i64> {
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?;
        if !args.no_png {
            std::fs::create_dir_all(&images_dir)
                .with_context(|| format!("creating {}", images_dir.display()))?;
        }
        let mut sink = if ranks.single() {
            let mut npz = NpzWriter::create(&npz_path)?;
            npz.begin("arr_0", Dtype::U8, &[args.num, size, size, 3])?;
            Sink::Npz(npz)
        } else {
            Sink::Part(PartWriter::create(ranks.part_path(&npz_path))?)
        };
        let mut redrawn = 0;
        let progress = crate::runtime::progress::Progress::new("sample", mine.len() as u64);
        for start in mine.clone().step_by(batch) {
            let len = batch.min(mine.end - start);
            let y = labels
                .as_ref()
                .map(|l| Tensor::from_slice(&l[start..start + len]).to_device(trained.device));
            // A libtorch exception (CUDA out of memory at a large --batch) is an error naming the samples.
            let what = format!("samples {start}..{}", start + len);
            let (images, r) = crate::runtime::torch_guard::guard(&what, || {
                let (x, r, p) = draw(&trained, &args, &g, (start as u64, len), y.as_ref(), &plan)?;
                passes = p;
                let x = if args.denoise {
                    tarflow::sample::denoise(model, &x, y.as_ref(), model.cfg.noise_std, 1.0)
                } else {
                    x
                };
                Ok((trained.flow_to_images(&x)?, r))
            })?;
            redrawn += r;
            if let Some(fid) = fid.as_mut() {
                let what = format!("Inception features of samples {start}..{}", start + len);
                crate::runtime::torch_guard::guard(&what, || {
                    fid.add(&images, || {
                        Ok(PartWriter::create(ranks.part_path(&fid_features))?)
                    })
                    .context(what.clone())
                })?;
            }
            let bytes = Vec::<u8>::try_from(images.flatten(0, -1))?;
            sink.write(&bytes)?;
            for (i, image) in bytes.chunks_exact(image_bytes).enumerate() {
                let index = start + i;
                if !args.no_png {
                    let path = images_dir.join(format!("{index:06}.png"));
                    stages::atomic::write_bytes_atomic(&path, &encode_png(image, size, size)?)?;
                }
                grid.put(index, image);
            }
            progress.add(len as u64);
        }
        progress.finish();
        match sink {
            Sink::Npz(npz) => finish_npz(npz, &labels, args.num)?,
            Sink::Part(part) => part.finish()?,
        }
        if let Some(fid) = fid.as_mut() {
            fid.finish_part()?;
        }
        Ok(redrawn)
    };
    let redrawn = draw_mine();
    let redrawn = ranks.agree(
        &format!("sampling samples {}..{}", mine.start, mine.end),
        redrawn,
    )?;
    let redrawn = ranks.sum_i64(&[redrawn])?[0];
    if !ranks.single() {
        // Rank 0 joins the parts (and draws the grid from them); the others wait for it, so that the
        // job ends only when samples.npz is complete.
        let joined = if ranks.leader() {
            join_parts(&ranks, &npz_path, &labels, args.num, size, &mut grid)
        } else {
            Ok(())
        };
        ranks.agree("joining the sample parts", joined)?;
        if let Some(fid) = fid.as_mut().filter(|_| ranks.leader()) {
            // A rank whose slice is empty wrote no part; an empty file stands for it.
            let paths = ranks.part_paths(&fid_features);
            for p in &paths {
                if !p.exists() {
                    PartWriter::create(p.clone())?.finish()?;
                }
            }
            let (acc, _) = crate::evaluate::fid::join_features(
                &paths,
                crate::evaluate::fid::PartOrder::Sequential,
                trained.device,
                args.num,
                crate::evaluate::fid::keeps_acts(&fid.reference),
            )?;
            fid.sink = FeatureSink::Stats(acc);
        }
        if !ranks.leader() {
            return Ok(());
        }
    }
    let grid_path = args.out.join("grid.png");
    stages::atomic::write_bytes_atomic(&grid_path, &grid.png()?)?;
    println!(
        "samples: {} images of {size}x{size} from {}",
        args.num,
        trained.checkpoint.display()
    );
    if !ranks.single() {
        println!("ranks: {}", ranks.world());
    }
    println!(
        "npz: {} (arr_0 uint8 [{}, {size}, {size}, 3], arr_1 int64 labels)",
        npz_path.display(),
        args.num
    );
    println!(
        "grid: {} ({}x{}, {n_grid} samples)",
        grid_path.display(),
        grid.width,
        grid.height
    );
    if !args.no_png {
        println!("images: {}/000000.png …", images_dir.display());
    }
    println!("redrawn for NaN/Inf: {redrawn}");
    println!("{}", depth_line(&plan, &passes));
    if let Some(fid) = &fid {
        let FeatureSink::Stats(acc) = &fid.sink else {
            bail!("the FID features were not joined");
        };
        let ref_acts = crate::evaluate::fid::reference_activations(
            &fid.reference,
            &fid.inception.model,
            batch,
        )?;
        let metrics = crate::evaluate::fid::MetricArgs::default();
        let against = crate::evaluate::fid::Against {
            reference: &fid.reference,
            acts: ref_acts.as_ref(),
            metrics: &metrics,
            precision_recall: false,
        };
        let seen = acc.stats.count() as usize;
        let scores = crate::evaluate::fid::finish(acc, &against, args.num, seen)
            .context("scoring the samples")?;
        crate::evaluate::fid::report(
            &scores,
            &args.out.join("fid.json"),
            &npz_path,
            args.fid_ref.as_deref().unwrap_or(Path::new("")),
            &fid.weights,
        )?;
    }
    Ok(())
}

/// Rank 0: the ranks' image parts in rank order as `arr_0` of `samples.npz`, then the labels; the
/// grid's samples are taken from the parts on the way.
fn join_parts(
    ranks: &Ranks,
    npz_path: &std::path::Path,
    labels: &Option<Vec<i64>>,
    num: usize,
    size: usize,
    grid: &mut Grid,
) -> anyhow::Result<()> {
    let image_bytes = size * size * 3;
    let mut npz = NpzWriter::create(npz_path)?;
    npz.begin("arr_0", Dtype::U8, &[num, size, size, 3])?;
    let parts = ranks.part_paths(npz_path);
    let mut index = 0;
    for part in &parts {
        // Whole images per chunk, so that each chunk's images can go to the grid.
        rank_parts::for_each_chunk(part, image_bytes * 64, &mut |bytes| {
            if bytes.len() % image_bytes != 0 {
                bail!("{}: not a whole number of images", part.display());
            }
            npz.write(bytes)?;
            for image in bytes.chunks_exact(image_bytes) {
                grid.put(index, image);
                index += 1;
            }
            Ok(())
        })?;
    }
    if index != num {
        bail!(
            "the parts of {} hold {index} samples, expected {num}",
            npz_path.display()
        );
    }
    finish_npz(npz, labels, num)?;
    rank_parts::remove_parts(&parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_keys_differ_by_index_and_attempt() {
        assert_ne!(sample_key(0, 0, 0), sample_key(0, 1, 0));
        assert_ne!(sample_key(0, 0, 0), sample_key(0, 0, 1));
        assert_ne!(sample_key(0, 0, 0), sample_key(1, 0, 0));
        assert!(sample_key(7, 3, 2) >= 0);
    }
}
