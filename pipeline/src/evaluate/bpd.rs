//! `pipeline bpd`: likelihood of labelled data under a trained flow. Pixel models report bits per
//! dimension with uniform dequantisation (spec §2.2: ((x_int + u) / 256)·2 − 1, u ~ U[0, 1) drawn on the
//! CPU from `--seed`); latent models report the NLL in nats per latent dimension of the scaled VAE
//! posterior mean (a latent has no quantisation to undo). Either way with a 95 % confidence interval
//! over images (normal approximation: mean ± 1.96 · sd / √n). Under torchrun/srun each rank scores a
//! run of the batches and rank 0 computes the statistics over every rank's per-image values.

use std::path::PathBuf;

use anyhow::{bail, Context};
use model::tarflow::{self, Cond};
use tch::{Device, Kind, Tensor};

use crate::evaluate::labelled;
use crate::evaluate::rank_parts::{RankArgs, Ranks};
use crate::evaluate::trained::TrainedArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    trained: TrainedArgs,
    /// Data: a webdataset shard spec (e.g. `/data/imagenet/imagenet-val-{000000..000049}.tar`) or a
    /// precompute cache directory (holding `manifest.json`)
    #[arg(long)]
    data: String,
    /// Images per forward pass
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Evaluate at most this many images
    #[arg(long)]
    limit: Option<usize>,
    /// Seed of the dequantisation noise
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Score each image with its label (log p(x | y)); the default is unconditional, log p(x) with the
    /// mean class embedding, as ml-tarflow's `evaluate_bpd.py` reports bits/dim
    #[arg(long)]
    conditional: bool,
    /// Also write the flow inputs (`x`, after dequantisation), labels `y` (−1 = none) and per-image
    /// values `value` to this safetensors file, so the number can be recomputed with `flow encode`
    #[arg(long, value_name = "FILE")]
    save_inputs: Option<PathBuf>,
    #[command(flatten)]
    ranks: RankArgs,
}

/// Advances the global CPU generator past `n` uniform floats, in chunks to bound the memory.
fn skip_noise(mut n: i64) {
    const CHUNK: i64 = 1 << 24;
    while n > 0 {
        let _ = Tensor::rand([n.min(CHUNK)], (Kind::Float, Device::Cpu));
        n -= CHUNK;
    }
}

/// Rank 0: every rank's `x` and `y` parts of `path` in rank order, with every rank's `values`, written
/// as the file one process writes; the parts are removed once it is in place.
fn join_input_parts(ranks: &Ranks, path: &std::path::Path, values: &Tensor) -> anyhow::Result<()> {
    let parts = ranks.part_paths(path);
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for part in &parts {
        for (name, t) in
            Tensor::read_safetensors(part).with_context(|| format!("reading {}", part.display()))?
        {
            match name.as_str() {
                "x" => xs.push(t),
                _ => ys.push(t),
            }
        }
    }
    if xs.is_empty() {
        bail!(
            "no rank scored any image: nothing to save in {}",
            path.display()
        );
    }
    let named = vec![
        ("x".to_string(), Tensor::cat(&xs, 0)),
        ("y".to_string(), Tensor::cat(&ys, 0)),
        ("value".to_string(), values.to_kind(Kind::Float)),
    ];
    model::weights::save_atomic(&named, path)?;
    crate::evaluate::rank_parts::remove_parts(&parts)
}

/// z = 1.96: the two-sided 95 % normal quantile.
const Z95: f64 = 1.959_963_984_540_054;

pub fn run(args: Args) -> anyhow::Result<()> {
    let ranks = Ranks::join(&args.ranks)?;
    let trained = ranks.agree("loading the model", args.trained.load(true, &ranks.launch))?;
    let model = trained.model();
    let k = model.cfg.num_classes;
    if args.conditional && k == 0 {
        bail!("--conditional: the model is unconditional (num_classes = 0)");
    }
    let conditional = args.conditional;
    if ranks.leader() {
        println!(
            "scoring: {}, {}, seed {}",
            if conditional {
                "class-conditional (each image's label)"
            } else {
                "unconditional (default; --conditional uses the labels)"
            },
            if trained.latent {
                "nats per latent dim of the scaled VAE posterior mean"
            } else {
                "bits/dim with uniform dequantisation"
            },
            args.seed
        );
    }
    tch::manual_seed(args.seed as i64);
    // How many samples' noise the generator has given out: a rank whose slice starts at sample s draws
    // (and drops) the noise of the s samples before it, so that every image gets the noise it gets in
    // one process (the CPU generator gives one number per element, whatever the tensor's shape).
    let mut drawn = 0;
    let (mut values, mut saved_x, mut saved_y) = (
        Vec::<Tensor>::new(),
        Vec::<Tensor>::new(),
        Vec::<i64>::new(),
    );
    let scored = labelled::for_each_batch(
        "bpd",
        &args.data,
        &trained,
        args.batch,
        args.limit,
        ranks.split(),
        &mut |batch| {
            let x = if trained.latent {
                batch.x
            } else {
                let per_sample: i64 = batch.x.size()[1..].iter().product();
                skip_noise((batch.first - drawn) as i64 * per_sample);
                drawn = batch.first + batch.labels.len();
                // The global CPU generator, seeded once, so the noise depends on the image order only.
                let u = Tensor::rand(batch.x.size(), (Kind::Float, Device::Cpu))
                    .to_device(batch.x.device());
                tarflow::dequantize(&batch.x, &u)
            };
            let labels: Vec<i64> = if conditional {
                batch.labels.clone()
            } else {
                vec![-1; batch.labels.len()]
            };
            if let Some((id, label)) = batch.ids.iter().zip(&labels).find(|(_, &l)| l >= k) {
                bail!(
                    "{}: sample {id} has label {label}, the model has {k} classes",
                    args.data
                );
            }
            let y = Tensor::from_slice(&labels).to_device(x.device());
            let out = tch::no_grad(|| model.forward(&x, &Cond::Labels(&y), &[]));
            let value = if trained.latent {
                tarflow::nll_per_sample(&out)
            } else {
                tarflow::bits_per_dim(&out)
            };
            values.push(value.to_device(Device::Cpu));
            if args.save_inputs.is_some() {
                saved_x.push(x.to_device(Device::Cpu));
                saved_y.extend(&labels);
            }
            Ok(())
        },
    );
    let scored = scored.and_then(|_| match &args.save_inputs {
        Some(path) if !ranks.single() => {
            let mut named = vec![("y".to_string(), Tensor::from_slice(&saved_y))];
            // A rank with an empty slice has no inputs to stack; its part holds an empty `y` only.
            if !saved_x.is_empty() {
                named.push(("x".to_string(), Tensor::cat(&saved_x, 0)));
            }
            Ok(model::weights::save_atomic(&named, &ranks.part_path(path))?)
        }
        _ => Ok(()),
    });
    ranks.agree("scoring", scored)?;
    let mine: Vec<f64> = if values.is_empty() {
        vec![]
    } else {
        Vec::<f64>::try_from(Tensor::cat(&values, 0).to_kind(Kind::Double))?
    };
    // The per-image values themselves, not partial sums: rank 0 then computes the statistics over the
    // same numbers in the same order as one process, and prints the same digits.
    let all = ranks.gather_f64(&mine)?;
    let values = Tensor::from_slice(&all);
    if let (Some(path), false) = (&args.save_inputs, ranks.single()) {
        let joined = if ranks.leader() {
            join_input_parts(&ranks, path, &values)
        } else {
            Ok(())
        };
        ranks.agree("joining the input parts", joined)?;
    }
    if !ranks.leader() {
        return Ok(());
    }
    if all.is_empty() {
        bail!("{}: no samples", args.data);
    }
    let n = values.size()[0];
    let mean = values.mean(Kind::Double).double_value(&[]);
    let sd = if n > 1 {
        values.std(true).double_value(&[])
    } else {
        f64::NAN
    };
    let half_width = Z95 * sd / (n as f64).sqrt();
    if let Some(path) = &args.save_inputs {
        if ranks.single() {
            let named = vec![
                ("x".to_string(), Tensor::cat(&saved_x, 0)),
                ("y".to_string(), Tensor::from_slice(&saved_y)),
                ("value".to_string(), values.to_kind(Kind::Float)),
            ];
            model::weights::save_atomic(&named, path)?;
        }
        println!("inputs: {}", path.display());
    }
    let metric = if trained.latent {
        "nll_nats_per_latent_dim"
    } else {
        "bits_per_dim"
    };
    println!(
        "{}: {mean:.5} ± {half_width:.5} (95% CI, n = {n}, {})",
        if trained.latent {
            "NLL (nats per latent dim)"
        } else {
            "bits/dim"
        },
        if conditional {
            "class-conditional"
        } else {
            "unconditional"
        }
    );
    println!(
        "{}",
        serde_json::json!({"metric": metric, "mean": mean, "ci95": half_width, "sd": sd, "n": n, "conditional": conditional})
    );
    Ok(())
}
