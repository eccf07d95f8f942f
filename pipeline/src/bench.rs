//! `pipeline bench ...`: speed measurements against a reference in the same run.

pub mod flow;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(clap::Subcommand)]
enum BenchCommand {
    /// TARFlow training step and sampling speed against the PyTorch reference model
    Flow(flow::Args),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Flow(a) => flow::run(a),
    }
}
