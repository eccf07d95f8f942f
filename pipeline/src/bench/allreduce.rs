//! `pipeline bench allreduce`: what gradient averaging costs on this machine's backend. Starts `--world`
//! ranks (itself, re-executed with torchrun's environment) unless it is already one of them, and times
//! the all-reduce of a gradient-sized f32 buffer as the trainer does it. Reports the time per
//! all-reduce, the algorithm bandwidth (bytes / time) and the bus bandwidth (× 2(n−1)/n, the figure NCCL's
//! tests report), and what one step's gradients of a model of `--params` parameters would take.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tch::{Device, Kind, Tensor};
use torch_ext::dist::Backend;

#[derive(clap::Args)]
pub struct Args {
    /// Ranks to start when not launched by torchrun/srun (each a copy of this process)
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// `gloo` (CPU tensors) or `nccl` (one GPU per rank, cuda:LOCAL_RANK)
    #[arg(long, default_value = "gloo", value_parser = ["gloo", "nccl"])]
    backend: String,
    /// Size of the buffer reduced, MiB of f32 (the trainer's buckets are 25 MiB)
    #[arg(long, default_value_t = 25.0)]
    mib: f64,
    /// Timed all-reduces after two warm-up ones
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// Parameters whose gradients to price (default: 1.08e9, the latent presets)
    #[arg(long, default_value_t = 1.08e9)]
    params: f64,
    /// Rendezvous port when this command starts the ranks
    #[arg(long, default_value_t = 29555)]
    port: u16,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let env = |k: &str| std::env::var(k).ok();
    match (env("RANK"), env("WORLD_SIZE")) {
        (Some(rank), Some(world)) => rank_main(
            &args,
            rank.parse().context("RANK")?,
            world.parse().context("WORLD_SIZE")?,
        ),
        _ => launch(&args),
    }
}

/// Starts the ranks as child processes with torchrun's variables and relays rank 0's report.
fn launch(args: &Args) -> anyhow::Result<()> {
    if args.world < 2 {
        bail!("--world must be at least 2");
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let children: Vec<_> = (0..args.world)
        .map(|r| {
            Command::new(&exe)
                .args(std::env::args_os().skip(1))
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", args.world.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", args.port.to_string())
                .stdout(if r == 0 {
                    Stdio::inherit()
                } else {
                    Stdio::null()
                })
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting rank {r}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut failed = vec![];
    for (r, mut c) in children.into_iter().enumerate() {
        if !c.wait()?.success() {
            failed.push(r);
        }
    }
    if !failed.is_empty() {
        bail!("ranks {failed:?} failed");
    }
    Ok(())
}

fn rank_main(args: &Args, rank: usize, world: usize) -> anyhow::Result<()> {
    // Where torchrun or srun put this rank (the GPU it owns among those its process sees), with this
    // command's own spawn as the fallback.
    let launch =
        crate::runtime::launch::Launch::resolve_overrides(Some(rank), Some(world), |name| {
            std::env::var(name)
                .ok()
                .or_else(|| (name == "MASTER_PORT").then(|| args.port.to_string()))
        })?;
    let (backend, device) = match args.backend.as_str() {
        "nccl" => (Backend::Nccl, launch.device("cuda")?),
        _ => (Backend::Gloo, Device::Cpu),
    };
    let group = launch.join_group(
        backend,
        device,
        Duration::from_secs(120),
        "all-reduce benchmark",
    )?;
    let n = ((args.mib * (1 << 20) as f64) / 4.0).max(1.0) as i64;
    let buf = Tensor::ones([n], (Kind::Float, device));
    let sync = || crate::train::step::sync(device);
    for _ in 0..2 {
        group.all_reduce_sum(&buf)?;
    }
    sync();
    let mut times = Vec::with_capacity(args.repeats);
    for _ in 0..args.repeats.max(1) {
        let start = Instant::now();
        group.all_reduce_sum(&buf)?;
        sync();
        times.push(start.elapsed().as_secs_f64());
    }
    // Every rank added ones; after 2 + repeats sums the value is world^(2 + repeats).
    let expect = (world as f64).powi(2 + times.len() as i32);
    let got = buf.double_value(&[0]);
    if (got - expect).abs() > 1e-3 * expect {
        bail!("all-reduce result {got}, expected {expect}");
    }
    if rank == 0 {
        let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
        let bytes = n as f64 * 4.0;
        let algo = bytes / best;
        let bus = algo * 2.0 * (world as f64 - 1.0) / world as f64;
        let gradients = args.params * 4.0 / algo;
        println!(
            "{}",
            serde_json::json!({
                "backend": args.backend, "world": world, "bytes": bytes, "seconds_min": best,
                "seconds_mean": times.iter().sum::<f64>() / times.len() as f64,
                "algo_gb_per_s": algo / 1e9, "bus_gb_per_s": bus / 1e9,
                "params": args.params, "gradient_allreduce_s": gradients,
            })
        );
    }
    group.barrier()?;
    Ok(())
}
