//! `pipeline`: the command line of the FlowBack training system. Each subcommand lives in its own
//! module with a clap `Args` struct and a `run` function; this file only dispatches.

// Layers (ARCHITECTURE.md): each module imports only from the groups above it in this list.
// Foundation: no command.
mod config;
mod formats;
mod runtime;
// Jobs: one module per command, with its `Args` and `run`.
mod cache_cmd;
mod config_cmd;
mod demo_data;
mod encoders;
mod evaluate;
mod flow;
mod precompute;
mod train;
// Top: measurements that drive the jobs.
mod bench;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pipeline",
    version,
    about = "Train and use TARFlow normalizing flows on ImageNet webdataset shards"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a small procedurally drawn, labelled dataset as webdataset shards
    DemoData(demo_data::Args),
    /// Inspect and maintain precompute caches: ls, verify, gc
    Cache(cache_cmd::Args),
    /// Print the effective configuration (preset + --set overrides) as TOML, or fail on a bad key
    Config(config_cmd::Args),
    /// TARFlow from outside: init a checkpoint, encode images to noise, decode noise to images
    Flow(flow::Args),
    /// Frozen DINOv2 and SD-VAE: `encoders check` verifies downloaded weight folders
    Encoders(encoders::Args),
    /// Shards → frozen DINOv2 features and VAE latents in a zstd cache, reused by later runs
    Precompute(precompute::Args),
    /// Train TARFlow (pixel or `--latent`) from a precompute cache, with NLL + representation alignment
    Train(train::Args),
    /// Speed measurements against a reference run in the same invocation
    Bench(bench::Args),
    /// Images from a trained flow: PNGs, a grid and samples.npz for the ADM evaluation suite
    Sample(evaluate::sample::Args),
    /// Training-free classification of labelled shards or a cache: top-1/top-5, confusion, per-sample CSV
    Classify(evaluate::classify::Args),
    /// Bits per dimension (pixel models) or NLL per latent dimension, with a 95% confidence interval
    Bpd(evaluate::bpd::Args),
    /// IS, FID, sFID, precision, recall and KID of samples (PNG directory or .npz) against a reference
    /// .npz
    #[command(visible_alias = "evaluate")]
    Fid(evaluate::fid::Args),
    /// A reference .npz (pool3 and spatial statistics, pool3 activations) of the training crops
    FidStats(evaluate::fid_stats::Args),
}

/// libtorch reads this once, when its global context is first made (after `main` starts: nothing
/// touches it before the first tensor operation). Set, fp32 matrix products on CUDA run on TF32 tensor
/// cores (`torch.set_float32_matmul_precision("high")`); convolutions already do by default.
const TF32_MATMUL_ENV: &str = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE";

/// Whether a subcommand turns TF32 products on: those that run a flow or Inception in fp32 (`sample`,
/// `classify`, `bpd`, `fid`, and `train`, whose FID and sample grids sample in fp32), so that the two
/// FIDs of one checkpoint come from the same arithmetic. The benchmarks compare against PyTorch's
/// defaults and keep them. No effect on the CPU.
fn wants_tf32(command: &Command) -> bool {
    matches!(
        command,
        Command::Sample(_)
            | Command::Classify(_)
            | Command::Bpd(_)
            | Command::Fid(_)
            | Command::Train(_)
    )
}

/// Turns TF32 products on unless the variable is already set (`TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=0`
/// keeps exact fp32 products).
fn enable_tf32_matmul() {
    if std::env::var_os(TF32_MATMUL_ENV).is_none() {
        // Before any thread or tensor exists: nothing else reads the environment concurrently.
        std::env::set_var(TF32_MATMUL_ENV, "1");
    }
}

fn main() {
    runtime::logging::init();
    runtime::routing::install();
    let cli = Cli::parse();
    if wants_tf32(&cli.command) {
        enable_tf32_matmul();
    }
    let result = match cli.command {
        Command::DemoData(args) => demo_data::run(args),
        Command::Config(args) => config_cmd::run(args),
        Command::Cache(args) => cache_cmd::run(args),
        Command::Flow(args) => flow::run(args),
        Command::Encoders(args) => encoders::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Precompute(args) => precompute::run(args),
        Command::Train(args) => train::run(args),
        Command::Sample(args) => evaluate::sample::run(args),
        Command::Classify(args) => evaluate::classify::run(args),
        Command::Bpd(args) => evaluate::bpd::run(args),
        Command::Fid(args) => evaluate::fid::run(args),
        Command::FidStats(args) => evaluate::fid_stats::run(args),
    };
    if let Err(err) = result {
        if let Some(stop) = err.downcast_ref::<runtime::signals::Interrupted>() {
            eprintln!("stopped on {stop}");
            std::process::exit(runtime::signals::exit_status(stop.signal));
        }
        // `{:#}` prints the whole context chain on one line: which file, which shard, which key.
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The commands that run a flow or Inception in fp32 turn TF32 products on; the ones that time
    /// against PyTorch's defaults or encode in bf16 do not.
    #[test]
    fn tf32_for_the_fp32_inference_commands_only() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.command).unwrap();
        for args in [
            &[
                "pipeline", "sample", "--num", "1", "--out", "x", "--run", "x",
            ][..],
            &[
                "pipeline", "classify", "--data", "x", "--out", "x", "--run", "x",
            ],
            &["pipeline", "bpd", "--data", "x", "--run", "x"],
            &["pipeline", "fid", "--samples", "x", "--ref", "x"],
            &["pipeline", "train"],
        ] {
            assert!(wants_tf32(&parse(args)), "{args:?}");
        }
        for args in [
            &["pipeline", "precompute"][..],
            &["pipeline", "bench", "flow"],
        ] {
            assert!(!wants_tf32(&parse(args)), "{args:?}");
        }
    }
}
