//! `pipeline bench ...`: speed measurements against a reference in the same run, reporting the ratio
//! (results in BENCHMARKS.md). One module per benchmark.

pub mod allreduce;
pub mod decode;
pub mod encoders;
pub mod fid;
pub mod flow;
pub mod precompute;
pub mod reference;
pub mod solvers;
pub mod train;
pub mod writer;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(clap::Subcommand)]
enum BenchCommand {
    /// All-reduce time and bandwidth of the data-parallel backend for gradient-sized buffers
    Allreduce(allreduce::Args),
    /// Decode and ADM-crop throughput against Pillow on the same shards
    Decode(decode::Args),
    /// DINOv2-B at 224 px and the SD-VAE encoder at 256 px against transformers / diffusers
    Encoders(encoders::Args),
    /// The FID Inception (pool3 + logits) and the Fréchet distance against pytorch-fid
    Fid(fid::Args),
    /// TARFlow training step and sampling speed against the PyTorch reference model
    Flow(flow::Args),
    /// Precompute stages standalone vs overlapped, encode wait fraction, cache readback vs raw zstd
    Precompute(precompute::Args),
    /// Reverse-pass solvers (sequential, Jacobi) on one flow: time, sequential depth, deviation
    Solvers(solvers::Args),
    /// Training steps/s and data-wait fraction against the cache loader alone
    Train(train::Args),
    /// The cache writer alone on ImageNet-size fields: images/s and bytes per image for each zstd level
    Writer(writer::Args),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Allreduce(a) => allreduce::run(a),
        BenchCommand::Decode(a) => decode::run(a),
        BenchCommand::Encoders(a) => encoders::run(a),
        BenchCommand::Fid(a) => fid::run(a),
        BenchCommand::Flow(a) => flow::run(a),
        BenchCommand::Precompute(a) => precompute::run(a),
        BenchCommand::Solvers(a) => solvers::run(a),
        BenchCommand::Train(a) => train::run(a),
        BenchCommand::Writer(a) => writer::run(a),
    }
}
