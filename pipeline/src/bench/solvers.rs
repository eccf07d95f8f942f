//! `pipeline bench solvers`: the reverse-pass solvers on one checkpoint and the same noise: wall time,
//! sequential depth (dependent network passes per sample) and the largest deviation from the
//! sequential sampler's images, which is the anchor every other row is compared with.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use model::tarflow::sample::{self, Guidance, Plan, Solver};
use model::tarflow::{self, Config, StepMode};
use tch::{Device, Kind, Tensor};

use crate::config::solver::{step_mode, Schedule};
use crate::train::step::sync;

#[derive(clap::Args)]
pub struct Args {
    /// Flow checkpoint with its `.model.toml` sidecar (e.g. RUN_DIR/checkpoints/latest/ema.safetensors)
    #[arg(long, required_unless_present = "random", conflicts_with = "random")]
    checkpoint: Option<PathBuf>,
    /// Instead of a checkpoint: a random flow of this preset (tiny, tiny-latent, in64, latent256 …) whose
    /// output projections get weights of scale 0.05, so tokens depend on each other; convergence of a
    /// random flow says little about a trained one, the cost per pass does
    #[arg(long, value_name = "PRESET")]
    random: Option<String>,
    /// With --random: override the preset's width (channels)
    #[arg(long, requires = "random")]
    channels: Option<i64>,
    /// With --random: override the preset's number of flow blocks
    #[arg(long, requires = "random")]
    blocks: Option<i64>,
    /// With --random: override the preset's layers per block
    #[arg(long, requires = "random")]
    layers: Option<i64>,
    /// Samples per pass
    #[arg(long, default_value_t = 8)]
    samples: i64,
    /// Guidance weight (annealed); non-zero runs both branches
    #[arg(long, default_value_t = 0.0)]
    guidance: f64,
    /// Jacobi tolerances to compare (0 = exact)
    #[arg(long, value_delimiter = ',', default_value = "0,1e-4,1e-3")]
    tol: Vec<f64>,
    /// Jacobi segment length (0 = the whole sequence)
    #[arg(long, default_value_t = 0)]
    chunk: i64,
    /// Also run the sequential solver with its token steps as CUDA graphs (`--cuda-graphs`), against
    /// the eager KV-cache steps; CUDA devices only
    #[arg(long)]
    cuda_graphs: bool,
    /// Also run the per-block plan of this calibrated schedule (`pipeline flow calibrate`)
    #[arg(long, value_name = "FILE")]
    schedule: Option<PathBuf>,
    /// Timed passes per solver after one warm-up; the fastest is reported
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    /// Intra-op threads
    #[arg(long, default_value_t = 2)]
    threads: i32,
    /// Device: cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn random_flow(preset: &str, args: &Args, device: Device) -> anyhow::Result<tarflow::Loaded> {
    let mut cfg = Config::preset(preset).with_context(|| format!("unknown preset `{preset}`"))?;
    cfg.channels = args.channels.unwrap_or(cfg.channels);
    cfg.num_blocks = args.blocks.unwrap_or(cfg.num_blocks);
    cfg.layers_per_block = args.layers.unwrap_or(cfg.layers_per_block);
    cfg.validate()?;
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(device);
    let model = tarflow::Model::new(vs.root(), &cfg)?;
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            if name.ends_with("proj_out.weight") {
                v.copy_(&(v.randn_like() * 0.05));
            }
        }
    });
    Ok(tarflow::Loaded { vs, model })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.samples < 1 || args.repeats < 1 || args.tol.iter().any(|t| t.is_nan() || *t < 0.0) {
        bail!("--samples and --repeats must be at least 1 and every --tol ≥ 0");
    }
    tch::set_num_threads(args.threads);
    let device = model::device::parse_device(&args.device)?;
    let (mut loaded, weights) = match (&args.checkpoint, &args.random) {
        (Some(path), _) => {
            let (cfg, _) =
                crate::formats::space::read_sidecar(&crate::formats::space::sidecar(path))?;
            let tensors = model::weights::read_safetensors(path)?;
            (
                tarflow::from_tensors(&tensors, path, &cfg, device)?,
                path.display().to_string(),
            )
        }
        (None, Some(preset)) => (
            random_flow(preset, &args, device)?,
            format!("random {preset}"),
        ),
        (None, None) => bail!("give --checkpoint or --random PRESET"),
    };
    let graphs = step_mode(args.cuda_graphs, device)?;
    loaded.model.decode_steps = StepMode::Cached;
    let model = &mut loaded.model;
    let noise = sample::cpu_noise(model, args.samples, 0).to_device(device);
    let y = (model.cfg.num_classes > 0).then(|| {
        Tensor::arange(args.samples, (Kind::Int64, device)).remainder(model.cfg.num_classes)
    });
    let g = Guidance {
        weight: args.guidance,
        annealed: true,
        attn_temp: 1.0,
    };
    let cached = StepMode::Cached;
    let mut plans: Vec<(String, Plan, StepMode)> = vec![(
        Solver::Sequential.describe(),
        Solver::Sequential.into(),
        cached,
    )];
    if graphs == StepMode::CudaGraph {
        plans.push((
            "sequential, CUDA-graph steps".into(),
            Solver::Sequential.into(),
            graphs,
        ));
    }
    plans.extend(args.tol.iter().map(|&tol| {
        let solver = Solver::Jacobi {
            chunk: args.chunk,
            tol,
            max_iters: 0,
        };
        (solver.describe(), solver.into(), cached)
    }));
    let blocks = model.blocks.len();
    plans.push((
        "selective default (`--solver auto` without a schedule)".into(),
        Plan::selective(blocks),
        cached,
    ));
    if let Some(path) = &args.schedule {
        let schedule = Schedule::read(path)?;
        schedule
            .plan
            .check(blocks)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        plans.push((
            format!("schedule {}", path.display()),
            schedule.plan,
            cached,
        ));
    }
    let mut anchor: Option<(Tensor, f64)> = None;
    let mut rows = vec![];
    for (label, plan, steps) in plans {
        model.decode_steps = steps;
        let model = &*model;
        let mut best = f64::INFINITY;
        let mut out = None;
        for i in 0..=args.repeats {
            let start = Instant::now();
            let (x, passes) =
                sample::reverse_solved(model, model.precision, &noise, y.as_ref(), &g, &plan);
            sync(device);
            let failed = model::tarflow::graphed::take_failures();
            if !failed.is_empty() {
                bail!("{label}: {}", failed.join("; "));
            }
            if i > 0 {
                best = best.min(start.elapsed().as_secs_f64());
            }
            out = Some((x, passes));
        }
        let (x, passes) = out.expect("at least one pass");
        let (err, time_ratio) = match &anchor {
            Some((x0, t0)) => ((&x - x0).abs().max().double_value(&[]), best / t0),
            None => (0.0, 1.0),
        };
        if anchor.is_none() {
            anchor = Some((x.shallow_clone(), best));
        }
        let (x0, _) = anchor.as_ref().expect("set above");
        let (recon_mse, recon_max) = reconstruction(model, x0, y.as_ref(), &plan);
        let depth: i64 = passes.iter().sum();
        eprintln!(
            "{label:<55} {best:>8.3} s  ×{time_ratio:<6.2} depth {depth:>6}  max |Δ| {err:.2e}  recon mse {recon_mse:.2e}"
        );
        rows.push(serde_json::json!({
            "solver": label, "plan": plan, "seconds": best, "time_vs_sequential": time_ratio,
            "depth": depth, "passes_per_block": passes, "max_abs_diff_vs_sequential": err,
            "reconstruction_mse": recon_mse, "reconstruction_max_abs": recon_max,
        }));
    }
    println!(
        "{}",
        serde_json::json!({
            "weights": weights, "config": model.cfg, "samples": args.samples,
            "guidance": args.guidance, "threads": args.threads, "device": format!("{device:?}"),
            "solvers": rows,
        })
    );
    Ok(())
}

/// ‖x − decode(encode(x))‖ of the images `x` (the sequential sampler's): the flow's forward pass gives
/// the noise, which `plan` inverts unguided (the forward pass has no guidance). Mean squared and largest
/// absolute error, in the flow's input space.
fn reconstruction(
    model: &tarflow::Model,
    x: &Tensor,
    y: Option<&Tensor>,
    plan: &Plan,
) -> (f64, f64) {
    let cond = y.map_or(tarflow::Cond::Null, tarflow::Cond::Labels);
    let z = tch::no_grad(|| {
        let _cast = model.cast_weights();
        model.forward(x, &cond, &[]).z / model.var.sqrt()
    });
    let (xr, _) = sample::reverse_solved(model, model.precision, &z, y, &Guidance::default(), plan);
    let d = (xr - x).to_kind(Kind::Double);
    (
        d.square().mean(Kind::Double).double_value(&[]),
        d.abs().max().double_value(&[]),
    )
}
