//! `pipeline config`: resolves a preset and its overrides and prints the effective TOML, so a
//! configuration can be checked before a run is launched on it.

use crate::config::ConfigArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let loaded = args.config.load()?;
    print!("{}", loaded.effective_toml);
    Ok(())
}
