//! `pipeline cache ls|verify|gc`: inspect and maintain precompute caches.

use std::path::PathBuf;

use anyhow::{bail, Context};
use stages::cache::maintenance::{fingerprint_dirs, remove_partial, verify};
use stages::cache::Manifest;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// List fingerprints with their settings, samples, bytes, bytes per sample and completeness
    Ls(Root),
    /// Recompute every checksum; name each corrupt or missing shard and exit non-zero if any
    Verify(Root),
    /// Remove partial files of dead processes and unrecorded shards; optionally whole fingerprints
    Gc(GcArgs),
}

#[derive(clap::Args)]
struct Root {
    /// Cache root (the directory holding one sub-directory per fingerprint)
    #[arg(long, default_value = "cache")]
    cache: PathBuf,
}

#[derive(clap::Args)]
struct GcArgs {
    #[command(flatten)]
    root: Root,
    /// Remove this fingerprint directory entirely; repeatable
    #[arg(long = "drop", value_name = "FINGERPRINT")]
    drop: Vec<String>,
    /// Remove every fingerprint directory except these; repeatable
    #[arg(long = "keep", value_name = "FINGERPRINT")]
    keep: Vec<String>,
    /// Print what would be removed and remove nothing (the default on a terminal without --yes)
    #[arg(long)]
    dry_run: bool,
    /// Remove without asking, also on a terminal
    #[arg(long)]
    yes: bool,
    /// Minutes a temporary or unrecorded shard must have been left untouched before it counts as
    /// abandoned (writers on any node keep theirs fresh)
    #[arg(long, default_value_t = 60, value_name = "MINUTES")]
    stale_after: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.action {
        Action::Ls(root) => ls(&root),
        Action::Verify(root) => verify_all(&root),
        Action::Gc(gc_args) => gc(&gc_args),
    }
}

fn ls(root: &Root) -> anyhow::Result<()> {
    let dirs = fingerprint_dirs(&root.cache)?;
    if dirs.is_empty() {
        println!("no caches under {}", root.cache.display());
    }
    for dir in dirs {
        let manifest = Manifest::load(&dir)?.context("manifest vanished")?;
        let (samples, bytes) = (manifest.total_samples(), manifest.total_bytes());
        let missing = manifest.missing();
        let completeness = if missing.is_empty() {
            "complete".to_string()
        } else {
            format!(
                "incomplete: {} of {} requested shards missing",
                missing.len(),
                manifest.requested.len()
            )
        };
        println!(
            "{}  shards {}  samples {}  bytes {}  bytes/sample {}  {}",
            manifest.fingerprint,
            manifest.shards.len(),
            samples,
            bytes,
            if samples > 0 {
                bytes / samples as u64
            } else {
                0
            },
            completeness
        );
        println!("  settings {}", serde_json::to_string(&manifest.settings)?);
    }
    Ok(())
}

fn verify_all(root: &Root) -> anyhow::Result<()> {
    let dirs = fingerprint_dirs(&root.cache)?;
    if dirs.is_empty() {
        bail!("no caches under {}", root.cache.display());
    }
    let mut bad = 0;
    for dir in dirs {
        let report = verify(&dir)?;
        for (file, problem) in &report.problems {
            println!("BAD {}: {problem}", dir.join(file).display());
        }
        // A cache shard from a URL or command can only be recomputed while that source still works.
        for (source, origin) in &report.remote {
            println!("remote source {source}: {origin}");
        }
        println!(
            "{}: {} shards checked, {} bad, {} from remote sources",
            dir.display(),
            report.checked,
            report.problems.len(),
            report.remote.len()
        );
        bad += report.problems.len();
    }
    if bad > 0 {
        bail!("{bad} bad cache shard(s)");
    }
    Ok(())
}

fn gc(args: &GcArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let dirs = fingerprint_dirs(&args.root.cache)?;
    let name = |dir: &std::path::Path| {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let names: Vec<String> = dirs.iter().map(|d| name(d)).collect();
    // A typo in --keep would otherwise delete every other fingerprint.
    for asked in args.keep.iter().chain(&args.drop) {
        if !names.contains(asked) {
            anyhow::bail!(
                "no fingerprint {asked} under {}: the fingerprints there are {}",
                args.root.cache.display(),
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            );
        }
    }
    let dry = args.dry_run || (!args.yes && std::io::stdin().is_terminal());
    let lease = std::time::Duration::from_secs(args.stale_after * 60);
    let verb = if dry { "would remove" } else { "removed" };
    for dir in dirs {
        let fp = name(&dir);
        let unwanted =
            args.drop.contains(&fp) || (!args.keep.is_empty() && !args.keep.contains(&fp));
        // Under the directory's lock: no precompute is recording a shard meanwhile, and one that is
        // waiting for the lock finds its directory gone or intact, never half removed.
        let lock = stages::cache::CacheLock::acquire(
            &dir,
            std::time::Duration::from_secs(600),
            &|owner| tracing::info!("{} is locked by {owner}; waiting", dir.display()),
        )?;
        if unwanted {
            if !dry {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            }
            println!("{verb} fingerprint {}", dir.display());
            continue;
        }
        for path in remove_partial(&dir, lease, dry)? {
            println!("{verb} {}", path.display());
        }
        drop(lock);
    }
    if dry && !args.dry_run {
        println!("dry run (on a terminal): pass --yes to remove");
    }
    Ok(())
}
