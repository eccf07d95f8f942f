//! `pipeline config`: resolves a preset and its overrides and prints the effective TOML, so a
//! configuration can be checked before a run is launched on it.

use crate::config::ConfigArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Also check that it can train from source shards as it stands (crop size, cached fields,
    /// encoder and VAE given, token grids, locations; latent sizes for the SD VAE's ×8)
    #[arg(long)]
    check: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let loaded = args.config.load()?;
    if args.check {
        loaded.config.check_runnable().map_err(|e| {
            e.context(format!(
                "config {} cannot train as it stands",
                loaded.source
            ))
        })?;
    }
    print!("{}", loaded.effective_toml);
    Ok(())
}
