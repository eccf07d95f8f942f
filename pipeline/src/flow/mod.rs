//! `pipeline flow {init,encode,decode,import,calibrate}`: the flow from outside. `encode` maps images to noise with
//! log-dets, per-block outputs and NLL; `decode` inverts noise (given, or drawn from a seed) with
//! guidance and optional score denoising. Tensors travel as safetensors.

pub mod calibrate;
pub mod import;
mod model_io;

use std::path::PathBuf;

use anyhow::{bail, Context};
use model::tarflow::{self, sample::Guidance, Cond, Config};
use tch::{Device, Kind, Tensor};

use crate::config::solver::{graph_note, warn_graph_failures, SolverArgs};
use model_io::{data_input, labels, load_model, read_inputs, refuse_inputs, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: FlowCommand,
}

#[derive(clap::Subcommand)]
enum FlowCommand {
    /// Write a randomly initialised checkpoint and its `.model.toml` config sidecar
    Init(InitArgs),
    /// Images → noise: reads `x` (B,C,H,W) and optional `y` (B,); writes `z`, `logdet`, `nll`, `block{i}`
    Encode(EncodeArgs),
    /// Noise → images: reads `z` (B,N,D) and optional `y`, or draws `--samples` from `--seed`; writes `x`
    Decode(DecodeArgs),
    /// A checkpoint of another code base (ml-tarflow's `.pth`) → safetensors + `.model.toml` sidecar
    Import(crate::flow::import::ImportArgs),
    /// Measure how each block's inverse converges on data `x` and write the per-block solver schedule
    /// (`--solver auto`) beside the checkpoint
    Calibrate(calibrate::CalibrateArgs),
}

#[derive(clap::Args)]
struct InitArgs {
    /// Preset: in64, latent256, latent256-p1, tiny, tiny-latent
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Output checkpoint; the config goes to the same path with `.model.toml`
    #[arg(long)]
    output: PathBuf,
    /// Seed of the random initialisation
    #[arg(long, default_value_t = 0)]
    seed: i64,
}

#[derive(clap::Args)]
struct EncodeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Input safetensors with `x` (B,C,H,W) in the flow's space and optional int64 labels `y` (−1 = none)
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors
    #[arg(long)]
    output: PathBuf,
}

#[derive(clap::Args)]
struct DecodeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Input safetensors with `z` (B,N,D) and optional `y`; without it noise is drawn (see --samples)
    #[arg(long, conflicts_with = "samples")]
    input: Option<PathBuf>,
    /// Number of samples to draw from --seed when there is no --input
    #[arg(long)]
    samples: Option<i64>,
    /// Seed of the CPU noise (the same seed gives the same samples on any device)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Class of every drawn sample (default: unconditional, i.e. the mean class embedding)
    #[arg(long)]
    class: Option<i64>,
    /// Output safetensors with `x` (B,C,H,W)
    #[arg(long)]
    output: PathBuf,
    /// Classifier-free guidance weight w (0 = off; a ← a_c + w·(a_c − a_u), same for b)
    #[arg(long, default_value_t = 0.0)]
    guidance: f64,
    /// Ramp the guidance along the sequence, g_i = w·(i+1)/(N−1)
    #[arg(long)]
    annealed: bool,
    /// Attention temperature of the unconditional branch
    #[arg(long, default_value_t = 1.0)]
    attn_temp: f64,
    /// Apply one-step score denoising x + σ²∇log p with σ = the config's noise_std
    #[arg(long)]
    denoise: bool,
    /// Multiplier of the denoising step
    #[arg(long, default_value_t = 1.0)]
    denoise_lr_scale: f64,
    /// Redraw rounds for samples with NaN/Inf before giving up
    #[arg(long, default_value_t = 10)]
    max_redraws: usize,
    #[command(flatten)]
    solver: SolverArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        FlowCommand::Init(a) => init(a),
        FlowCommand::Encode(a) => encode(a),
        FlowCommand::Decode(a) => decode(a),
        FlowCommand::Import(a) => import::import(a),
        FlowCommand::Calibrate(a) => calibrate::calibrate(a),
    }
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    let cfg = Config::preset(&args.preset).with_context(|| {
        format!(
            "unknown preset `{}`: expected one of {}",
            args.preset,
            tarflow::PRESETS.join(", ")
        )
    })?;
    tch::manual_seed(args.seed);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let model = tarflow::Model::new(vs.root(), &cfg)?;
    model::weights::save_atomic(&model.named_tensors(&vs), &args.output)?;
    let side = crate::formats::space::sidecar(&args.output);
    stages::atomic::write_bytes_atomic(
        &side,
        crate::formats::space::sidecar_text(&cfg, None)?.as_bytes(),
    )?;
    eprintln!("wrote {} and {}", args.output.display(), side.display());
    Ok(())
}

fn encode(args: EncodeArgs) -> anyhow::Result<()> {
    refuse_inputs(&args.output, &args.model, Some(&args.input))?;
    let loaded = load_model(&args.model)?;
    let model = &loaded.model;
    let device = model.device();
    let (x, y) = data_input(model, &args.input)?;
    let batch = x.size()[0];
    let (mut z, mut logdet, mut nll, mut blocks) = (
        vec![],
        vec![],
        vec![],
        (0..model.blocks.len())
            .map(|_| Vec::<Tensor>::new())
            .collect::<Vec<_>>(),
    );
    for start in (0..batch).step_by(args.model.batch.max(1) as usize) {
        let len = args.model.batch.min(batch - start);
        let xb = x.narrow(0, start, len).to_device(device);
        let yb = y
            .as_ref()
            .map(|y| y.narrow(0, start, len).to_device(device));
        let cond = yb.as_ref().map_or(Cond::Null, Cond::Labels);
        let out = tch::no_grad(|| model.forward(&xb, &cond, &[]));
        nll.push(tarflow::nll_per_sample(&out).to_device(Device::Cpu));
        z.push(out.z.to_device(Device::Cpu));
        logdet.push(out.logdet.to_device(Device::Cpu));
        for (i, o) in out.outputs.iter().enumerate() {
            blocks[i].push(o.to_device(Device::Cpu));
        }
    }
    let mut named = vec![
        ("z".to_string(), Tensor::cat(&z, 0)),
        ("logdet".into(), Tensor::cat(&logdet, 0)),
        ("nll".into(), Tensor::cat(&nll, 0)),
    ];
    for (i, b) in blocks.iter().enumerate() {
        named.push((format!("block{i}"), Tensor::cat(b, 0)));
    }
    model::weights::save_atomic(&named, &args.output)?;
    eprintln!("encoded {batch} images into {}", args.output.display());
    Ok(())
}

fn decode(args: DecodeArgs) -> anyhow::Result<()> {
    refuse_inputs(&args.output, &args.model, args.input.as_deref())?;
    let mut loaded = load_model(&args.model)?;
    let steps = args.solver.step_mode(loaded.model.device())?;
    loaded.model.decode_steps = steps;
    let model = &loaded.model;
    let device = model.device();
    let g = Guidance {
        weight: args.guidance,
        annealed: args.annealed,
        attn_temp: args.attn_temp,
    };
    if args.attn_temp <= 0.0 {
        bail!("--attn-temp must be positive, got {}", args.attn_temp);
    }
    let (plan, source) = args
        .solver
        .plan(&args.model.checkpoint, model.blocks.len())?;
    eprintln!(
        "solver: {} (from {source}){}",
        plan.describe(),
        graph_note(steps)
    );
    let (n, d) = (model.cfg.num_tokens(), model.cfg.token_dim());
    let mut xs = vec![];
    let mut redrawn = 0;
    let mut passes = vec![];
    let start_time = std::time::Instant::now();
    match (&args.input, args.samples) {
        (Some(path), _) => {
            let inputs = read_inputs(path)?;
            let z = inputs
                .get("z")
                .with_context(|| format!("{}: tensor `z` is missing", path.display()))?;
            let size = z.size();
            if size.len() != 3 || size[1..] != [n, d] {
                bail!(
                    "{}: tensor `z` has shape {size:?}, the flow expects (B, {n}, {d})",
                    path.display()
                );
            }
            let y = labels(&inputs, path, size[0], model.cfg.num_classes)?;
            for start in (0..size[0]).step_by(args.model.batch.max(1) as usize) {
                let len = args.model.batch.min(size[0] - start);
                let yb = y
                    .as_ref()
                    .map(|y| y.narrow(0, start, len).to_device(device));
                let (x, p) = tarflow::sample::reverse_solved(
                    model,
                    model.precision,
                    &z.narrow(0, start, len)
                        .to_kind(Kind::Float)
                        .to_device(device),
                    yb.as_ref(),
                    &g,
                    &plan,
                );
                warn_graph_failures();
                passes = p;
                xs.push(finish(model, &x, yb.as_ref(), &args));
            }
        }
        (None, Some(count)) => {
            if let Some(k) = args.class {
                if k < 0 || k >= model.cfg.num_classes {
                    bail!(
                        "--class {k} is outside the model's {} classes",
                        model.cfg.num_classes
                    );
                }
            }
            let mut seed = args.seed;
            for start in (0..count).step_by(args.model.batch.max(1) as usize) {
                let len = args.model.batch.min(count - start);
                let yb = args
                    .class
                    .map(|k| Tensor::full([len], k, (Kind::Int64, device)));
                let drawn = tarflow::sample::sample_solved(
                    model,
                    model.precision,
                    len,
                    yb.as_ref(),
                    &g,
                    seed,
                    args.max_redraws,
                    &plan,
                )?;
                warn_graph_failures();
                redrawn += drawn.redrawn;
                passes = drawn.passes;
                xs.push(finish(model, &drawn.x, yb.as_ref(), &args));
                seed = seed.wrapping_add(1);
            }
        }
        (None, None) => bail!("decode needs --input Z.safetensors or --samples N"),
    }
    let x = Tensor::cat(&xs, 0);
    model::weights::save_atomic(&[("x".to_string(), x.shallow_clone())], &args.output)?;
    eprintln!(
        "decoded {} samples into {} ({redrawn} redrawn for NaN/Inf) in {:.2} s; {} (last batch)",
        x.size()[0],
        args.output.display(),
        start_time.elapsed().as_secs_f64(),
        crate::config::solver::depth_line(&plan, &passes)
    );
    Ok(())
}

fn finish(model: &tarflow::Model, x: &Tensor, y: Option<&Tensor>, args: &DecodeArgs) -> Tensor {
    let x = if args.denoise {
        tarflow::sample::denoise(model, x, y, model.cfg.noise_std, args.denoise_lr_scale)
    } else {
        x.shallow_clone()
    };
    x.to_device(Device::Cpu)
}
