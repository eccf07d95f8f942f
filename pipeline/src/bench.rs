//! `pipeline bench ...`: speed measurements against the reference implementation, run side by side on
//! the same machine, libtorch and thread count, reporting the ratio (see BENCHMARKS.md).

use crate::bench_encoders;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// DINOv2-B at 224 px and the SD-VAE encoder at 256 px against transformers / diffusers
    Encoders(bench_encoders::Args),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Encoders(args) => bench_encoders::run(args),
    }
}
