//! `pipeline bench flow`: one training step (the trainer's own: forward + backward through
//! `train::step`, gradient norm and finiteness on the device, fused AdamW) and guided KV-cache sampling,
//! timed for this crate's flow and for the PyTorch model of tests/python/tarflow_ref.py on the same
//! config, thread count and libtorch (its AdamW `fused=True`), in one run. Prints both and the ratios as one JSON line. Step
//! time is the minimum over the timed steps (the mean is reported too).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use model::tarflow::{self, sample::Guidance, Config};
use tch::{nn, Device, Kind, Tensor};

use crate::train::step::{sync, Phases};

#[derive(clap::Args)]
pub struct Args {
    /// Model preset: in64, latent256, latent256-p1, tiny, tiny-latent
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Training batch size
    #[arg(long, default_value_t = 8)]
    batch: i64,
    /// Override the preset's width (channels)
    #[arg(long)]
    channels: Option<i64>,
    /// Override the preset's number of flow blocks
    #[arg(long)]
    blocks: Option<i64>,
    /// Override the preset's layers per block
    #[arg(long)]
    layers: Option<i64>,
    /// Timed training steps (after one warm-up step)
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Samples drawn in the sampling measurement
    #[arg(long, default_value_t = 8)]
    sample_batch: i64,
    /// Timed sampling passes (after one warm-up pass); the fastest is reported
    #[arg(long, default_value_t = 3)]
    sample_repeats: usize,
    /// Guidance weight while sampling (non-zero runs both branches)
    #[arg(long, default_value_t = 2.0)]
    guidance: f64,
    /// Intra-op threads for both sides
    #[arg(long, default_value_t = 2)]
    threads: i32,
    /// Device of both sides: cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// bf16 compute with fp32 LayerNorm and exp (torch autocast on the reference side); CUDA only
    #[arg(long)]
    bf16: bool,
    /// Activation checkpointing per block on the Rust side (`train.checkpoint_blocks`); the JSON then
    /// shows what it costs in time and in peak memory against a run without it
    #[arg(long)]
    checkpoint_blocks: bool,
    /// Sample with the plain products instead of weights packed once per pass (an A/B of the packing)
    #[arg(long)]
    no_pack: bool,
    /// Run float32 CPU linear layers through libtorch's `linear` (MKL) instead of oneDNN, as the
    /// reference does (an A/B of the routing)
    #[arg(long)]
    no_onednn: bool,
    /// Also time N pairs of training steps and of sampling passes in this process, each pair one with
    /// the measured routing and one with every product on MKL and no packing (what `--no-onednn
    /// --no-pack` runs), interleaved so that load on the machine falls on both alike; reports the
    /// geometric mean of the per-pair ratios (0 = off; use an even N, which balances the order)
    #[arg(long, default_value_t = 0, value_name = "N")]
    ab_routing: usize,
    /// Skip the PyTorch reference (Rust numbers only)
    #[arg(long)]
    no_reference: bool,
    /// Python with torch (default: the repository's .venv, relative to the working directory)
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// The reference implementation (relative to the working directory: run from the repository root)
    #[arg(long, default_value = "tests/python/tarflow_ref.py")]
    reference: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = Config::preset(&args.preset).with_context(|| {
        format!(
            "unknown preset `{}`: expected one of {}",
            args.preset,
            tarflow::PRESETS.join(", ")
        )
    })?;
    cfg.channels = args.channels.unwrap_or(cfg.channels);
    cfg.num_blocks = args.blocks.unwrap_or(cfg.num_blocks);
    cfg.layers_per_block = args.layers.unwrap_or(cfg.layers_per_block);
    cfg.validate()?;
    if args.batch < 1 || args.sample_batch < 1 || args.steps < 1 || args.sample_repeats < 1 {
        bail!("--batch, --sample-batch, --steps and --sample-repeats must be at least 1");
    }
    let device = model::device::parse_device(&args.device)?;
    if args.ab_routing > 0 && device != Device::Cpu {
        bail!("--ab-routing compares CPU product routes; {device:?} has none");
    }
    if args.bf16 && !device.is_cuda() {
        bail!("--bf16 needs a CUDA device (autocast is CUDA-only here)");
    }
    tch::set_num_threads(args.threads);
    let rust = measure(&cfg, &args, device)?;
    let mut report = serde_json::json!({
        "preset": args.preset, "config": cfg, "batch": args.batch, "sample_batch": args.sample_batch,
        "guidance": args.guidance, "threads": args.threads, "device": args.device, "bf16": args.bf16, "rust": rust,
    });
    if !args.no_reference {
        let reference = reference(&cfg, &args)?;
        let ratio_step = rust["step_s"].as_f64().unwrap_or(f64::NAN)
            / reference["step_s"].as_f64().unwrap_or(f64::NAN);
        let ratio_tokens = rust["sample_tokens_per_s"].as_f64().unwrap_or(f64::NAN)
            / reference["sample_tokens_per_s"]
                .as_f64()
                .unwrap_or(f64::NAN);
        report["pytorch"] = reference;
        report["step_time_ratio"] = ratio_step.into();
        report["sample_speed_ratio"] = ratio_tokens.into();
    }
    println!("{report}");
    Ok(())
}

fn measure(cfg: &Config, args: &Args, device: Device) -> anyhow::Result<serde_json::Value> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let mut model = tarflow::Model::new(vs.root(), cfg)?;
    if args.bf16 {
        model.precision = tarflow::Precision::Bf16;
    }
    model.checkpoint_blocks = args.checkpoint_blocks;
    model.pack_weights = !args.no_pack;
    torch_ext::onednn::set_enabled(!args.no_onednn);
    tch::no_grad(|| {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut v) in vars {
            if name.ends_with("proj_out.weight") {
                v.copy_(&(v.randn_like() * 0.01));
            }
        }
    });
    // The trainer's own step: forward/backward through `train::step`, then the global gradient norm,
    // the device-side finiteness check and the fused AdamW of `train::optim` (no host read-back).
    let mut params: Vec<(String, Tensor)> = vs
        .trainable_variables()
        .into_iter()
        .enumerate()
        .map(|(i, t)| (format!("{i:05}"), t))
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let mut opt = crate::train::optim::AdamW::new(params);
    let mut skips = crate::train::optim::Skips::new(device, 0, 0);
    let x = Tensor::rand(
        [args.batch, cfg.in_channels, cfg.img_size, cfg.img_size],
        (Kind::Float, device),
    ) * 2.0
        - 1.0;
    let y = (cfg.num_classes > 0)
        .then(|| Tensor::randint(cfg.num_classes, [args.batch], (Kind::Int64, device)));
    let labels = y.as_ref().map_or_else(
        || Tensor::full([args.batch], -1, (Kind::Int64, device)),
        Tensor::shallow_clone,
    );
    let mut step = |phases: Option<&mut Phases>| -> anyhow::Result<()> {
        let mut phases = phases;
        opt.zero_grad()?;
        let totals = crate::train::step::accumulate(
            &model,
            None,
            &x,
            &labels,
            None,
            0,
            0.0,
            phases.as_deref_mut(),
        )?;
        let start = Instant::now();
        let norm = opt.grad_norm()?;
        skips.record(&totals.loss, &norm);
        opt.step(&skips.ok, 1e-4, 0.9, 0.95, 1e-8, 1e-4)?;
        if let Some(p) = phases {
            sync(device);
            p.optimizer_s += start.elapsed().as_secs_f64();
        }
        Ok(())
    };
    let rss_before = current_rss_bytes();
    let cuda_before = match device {
        Device::Cuda(i) => Some(torch_ext::memory::reset_cuda_peak(i)?),
        _ => None,
    };
    step(None)?; // warm-up
    sync(device);
    // What the first step added at its peak: activations, gradients and the AdamW moments.
    let step_peak_mib = match (device, cuda_before) {
        (Device::Cuda(i), Some(before)) => {
            (torch_ext::memory::cuda_memory(i)?.peak - before.current) as f64 / MIB
        }
        _ => (peak_rss_bytes() - rss_before) as f64 / MIB,
    };
    // The minimum is the estimate least disturbed by other load on a shared machine; the mean is kept.
    let mut times = Vec::with_capacity(args.steps);
    for _ in 0..args.steps {
        let start = Instant::now();
        step(None)?;
        sync(device);
        times.push(start.elapsed().as_secs_f64());
    }
    let step_s = min(&times);
    let step_s_mean = times.iter().sum::<f64>() / times.len() as f64;
    // Where a step's time goes, from separate steps: timing the phases synchronises the device between
    // them, which the timed steps above never do.
    let mut phases = Vec::with_capacity(args.steps);
    for _ in 0..args.steps {
        let mut p = Phases::default();
        step(Some(&mut p))?;
        phases.push(p);
    }

    let noise = tarflow::sample::cpu_noise(&model, args.sample_batch, 0).to_device(device);
    let ys = y
        .as_ref()
        .map(|y| y.narrow(0, 0, args.sample_batch.min(args.batch)));
    if ys
        .as_ref()
        .is_some_and(|y| y.size()[0] != args.sample_batch)
    {
        bail!("--sample-batch must not exceed --batch for a class-conditional preset");
    }
    let g = Guidance {
        weight: args.guidance,
        annealed: true,
        attn_temp: 1.0,
    };
    let mut sample_runs = Vec::with_capacity(args.sample_repeats);
    for i in 0..=args.sample_repeats {
        let start = Instant::now();
        let _ = model.reverse(&noise, ys.as_ref(), &g);
        sync(device);
        // The first pass allocates the caches and warms the kernels; it is not counted.
        if i > 0 {
            sample_runs.push(start.elapsed().as_secs_f64());
        }
    }
    let sample_s = min(&sample_runs);
    let tokens = (args.sample_batch * cfg.num_tokens() * cfg.num_blocks) as f64;
    let ab = if args.ab_routing > 0 {
        let timed = |mkl: bool, f: &mut dyn FnMut() -> anyhow::Result<()>| {
            let start = Instant::now();
            let out = if mkl {
                torch_ext::routing::forced(false, &mut *f)
            } else {
                f()
            };
            out.map(|()| start.elapsed().as_secs_f64())
        };
        // Steps and sampling passes in separate runs of pairs, so each timed call follows one of its
        // own kind; within a run the side that goes first alternates (AB, BA, …), so what the previous
        // call leaves in caches and allocator falls on both sides equally.
        let pairs = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<Vec<[f64; 2]>> {
            f()?;
            (0..args.ab_routing)
                .map(|i| {
                    let mut pair = [0.0; 2];
                    for mkl in [i % 2 == 1, i % 2 == 0] {
                        pair[mkl as usize] = timed(mkl, f)?;
                    }
                    Ok(pair)
                })
                .collect()
        };
        let steps = pairs(&mut || step(None))?;
        let samples = pairs(&mut || {
            let _ = model.reverse(&noise, ys.as_ref(), &g);
            Ok(())
        })?;
        Some(serde_json::json!({
            "pairs": args.ab_routing,
            "step": ab_summary(&steps),
            "sample": ab_summary(&samples),
        }))
    } else {
        None
    };
    Ok(serde_json::json!({
        "step_s": step_s,
        "step_s_mean": step_s_mean,
        "phases": {
            "forward_s": min(&phases.iter().map(|p| p.forward_s).collect::<Vec<_>>()),
            "backward_s": min(&phases.iter().map(|p| p.backward_s).collect::<Vec<_>>()),
            "optimizer_s": min(&phases.iter().map(|p| p.optimizer_s).collect::<Vec<_>>()),
        },
        "step_peak_mib": step_peak_mib,
        "checkpoint_blocks": args.checkpoint_blocks,
        "pack_weights": model.pack_weights,
        "onednn_linear": torch_ext::onednn::enabled(),
        "routing": routing_report(),
        "sample_s": sample_s,
        "sample_s_runs": sample_runs,
        "sample_tokens_per_s": tokens / sample_s,
        "routing_ab": ab,
    }))
}

/// Pairs of (measured routing, MKL only) times: each side's median and the geometric mean of the
/// per-pair ratios measured / MKL (below 1: the measured routing is faster). With the order alternating
/// and an even number of pairs, an effect of going first or second cancels in that mean.
fn ab_summary(pairs: &[[f64; 2]]) -> serde_json::Value {
    use crate::bench::reference::median;
    serde_json::json!({
        "measured_s": median(pairs.iter().map(|p| p[0]).collect()),
        "mkl_only_s": median(pairs.iter().map(|p| p[1]).collect()),
        "ratio": (pairs.iter().map(|p| (p[0] / p[1]).ln()).sum::<f64>() / pairs.len() as f64).exp(),
    })
}

/// The backend each float32 CPU product class ran on and the timings behind the choice.
fn routing_report() -> Vec<serde_json::Value> {
    torch_ext::routing::choices()
        .into_iter()
        .map(|(class, choice)| {
            serde_json::json!({
                "class": class.to_string(),
                "backend": choice.backend(),
                "mkl_ms": choice.mkl_s * 1e3,
                "onednn_ms": choice.onednn_s * 1e3,
                "measured_here": choice.source == torch_ext::routing::Source::Measured,
            })
        })
        .collect()
}

/// The fastest of several timings: the estimate least disturbed by other load on a shared machine.
fn min(times: &[f64]) -> f64 {
    times.iter().cloned().fold(f64::INFINITY, f64::min)
}

const MIB: f64 = (1u64 << 20) as f64;

/// Resident bytes now (/proc/self/statm; 0 where there is none).
fn current_rss_bytes() -> i64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<i64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a system constant.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64
}

/// The process's peak resident bytes so far (getrusage's ru_maxrss, in KiB on Linux).
fn peak_rss_bytes() -> i64 {
    // SAFETY: rusage is plain integers and timevals, for which all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only the struct it is given, which lives on this frame; it keeps no
    // state between calls, so an earlier call leaves nothing this one depends on.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss * 1024
}

/// torch spells `auto` differently; everything else is the same string.
fn reference_device(name: &str) -> String {
    match name {
        "auto" => {
            if tch::Cuda::is_available() {
                "cuda".into()
            } else {
                "cpu".into()
            }
        }
        other => other.to_string(),
    }
}

fn reference(cfg: &Config, args: &Args) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.json");
    std::fs::write(&config, serde_json::to_string(cfg)?)?;
    let out = Command::new(&args.python)
        .arg(&args.reference)
        .arg("bench")
        .arg(&config)
        .args([
            "--batch",
            &args.batch.to_string(),
            "--steps",
            &args.steps.to_string(),
            "--sample-repeats",
            &args.sample_repeats.to_string(),
        ])
        .args([
            "--sample-batch",
            &args.sample_batch.to_string(),
            "--guidance",
            &args.guidance.to_string(),
        ])
        .args([
            "--threads",
            &args.threads.to_string(),
            "--device",
            &reference_device(&args.device),
        ])
        .args(args.bf16.then_some("--bf16"))
        .output()
        .with_context(|| {
            format!(
                "running {} {}",
                args.python.display(),
                args.reference.display()
            )
        })?;
    if !out.status.success() {
        bail!(
            "reference bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .last()
        .context("reference bench printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("reference bench output `{line}`"))
}
