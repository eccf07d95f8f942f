//! `pipeline demo-data`: the small labelled dataset that `make demo` and the end-to-end tests run on.

use std::path::PathBuf;

use anyhow::Context;
use stages::demo::{write_demo_dataset, DemoConfig};

use crate::runtime::progress::Progress;

#[derive(clap::Args)]
pub struct Args {
    /// Output directory for the shards (`demo-000000.tar`, ...) and `demo-index.json`
    #[arg(long)]
    out: PathBuf,
    /// Number of classes
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Images per class
    #[arg(long, default_value_t = 200)]
    per_class: usize,
    /// Number of shards the samples are spread over
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// Random seed: the same seed gives byte-identical shards
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Add CMYK, grayscale, progressive, PNG-named-.jpg and broken members (robustness tests)
    #[arg(long)]
    odd: bool,
    /// Shard name prefix (e.g. `heldout` for a separate evaluation set)
    #[arg(long, default_value = "demo")]
    prefix: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = DemoConfig {
        classes: args.classes,
        per_class: args.per_class,
        shards: args.shards,
        seed: args.seed,
        odd: args.odd,
        prefix: args.prefix,
    };
    eprintln!("demo-data settings:\n{}", toml::to_string_pretty(&config)?);
    let total = config.n_samples();
    let progress = Progress::new("demo-data", total as u64);
    let index = write_demo_dataset(&args.out, &config, &|n| progress.set(n as u64))
        .with_context(|| format!("writing demo data to {}", args.out.display()))?;
    progress.finish();
    let samples: usize = index.shards.iter().map(|s| s.samples).sum();
    let bytes: u64 = index.shards.iter().map(|s| s.bytes).sum();
    println!(
        "wrote {samples} samples in {} shards ({:.1} MB) to {}",
        index.shards.len(),
        bytes as f64 / 1e6,
        args.out.display()
    );
    println!(
        "shards: {}/{}-{{000000..{:06}}}.tar",
        args.out.display(),
        config.prefix,
        config.shards - 1
    );
    Ok(())
}
