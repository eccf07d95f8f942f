//! `pipeline bench train`: training steps/s, samples/s and the fraction of step time spent waiting for
//! the cache loader, measured by a real `pipeline train` run of the config, against the loader alone
//! (batches/s with nothing consuming them) in the same invocation. The ratio loader/train is the
//! headroom: above 1 the loader keeps up. Goal: data-wait < 2 % of step time.

use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::config::ConfigArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Train on cached VAE latents (as `pipeline train --latent`)
    #[arg(long)]
    latent: bool,
    /// Cache root or fingerprint directory (overrides train.cache)
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Measured training steps (after the warm-up)
    #[arg(long, default_value_t = 50)]
    steps: u64,
    /// Steps (and loader batches) run before measuring
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// Run directory of the measured training (default: a temporary one, removed afterwards)
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let loaded = crate::train::load_config(&args.config, args.latent, &None, &args.cache)?;
    let cfg = &loaded.config;
    let loader = crate::train::loader_rate(cfg, args.warmup as usize, args.steps as usize)?;

    let tmp;
    let out = match &args.out {
        Some(dir) => dir.clone(),
        None => {
            tmp = tempfile::Builder::new().prefix("bench-train").tempdir()?;
            tmp.path().join("run")
        }
    };
    let total = args.warmup + args.steps;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("train");
    if let Some(path) = &args.config.config {
        cmd.arg("--config").arg(path);
    }
    for set in &args.config.overrides {
        cmd.arg("--set").arg(set);
    }
    if args.latent {
        cmd.arg("--latent");
    }
    if let Some(dir) = &args.cache {
        cmd.arg("--cache").arg(dir);
    }
    // Every step is a metrics window; sampling and intermediate checkpoints would be counted as steps.
    for set in [
        format!("train.steps={total}"),
        "train.metrics_every=1".into(),
        "train.sample_every=0".into(),
        "train.checkpoint_every=0".into(),
    ] {
        cmd.arg("--set").arg(set);
    }
    cmd.arg("--out").arg(&out);
    let status = cmd.status().context("running pipeline train")?;
    if !status.success() {
        bail!("pipeline train failed ({status})");
    }
    let metrics = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let (mut seconds, mut waited, mut steps) = (0.0, 0.0, 0u64);
    for line in text.lines() {
        let m: serde_json::Value = serde_json::from_str(line)?;
        if m["step"].as_u64().unwrap_or(0) <= args.warmup {
            continue;
        }
        let window = cfg.train.batch as f64 / m["samples_per_s"].as_f64().unwrap_or(f64::NAN);
        seconds += window;
        waited += window * m["data_wait_frac"].as_f64().unwrap_or(f64::NAN);
        steps += 1;
    }
    if steps == 0 || !seconds.is_finite() {
        bail!("{}: no measured steps", metrics.display());
    }
    let steps_per_s = steps as f64 / seconds;
    let wait_frac = waited / seconds;
    let m = &cfg.model;
    println!(
        "model: {}x{}x{} input, patch {}, {} channels, {} blocks x {} layers, batch {}, align {:?}, device {}",
        m.in_channels,
        m.img_size,
        m.img_size,
        m.patch_size,
        m.channels,
        m.num_blocks,
        m.layers_per_block,
        cfg.train.batch,
        cfg.align.mode,
        cfg.train.device
    );
    println!("{:<28}{:>12}{:>14}", "", "batches/s", "samples/s");
    println!(
        "{:<28}{:>12.2}{:>14.1}",
        "loader alone",
        loader,
        loader * cfg.train.batch as f64
    );
    println!(
        "{:<28}{:>12.2}{:>14.1}",
        "training (steps)",
        steps_per_s,
        steps_per_s * cfg.train.batch as f64
    );
    println!(
        "loader headroom (loader / training): {:.2}x",
        loader / steps_per_s
    );
    println!(
        "data wait: {:.3}% of step time over {steps} steps (goal < 2%: {})",
        100.0 * wait_frac,
        if wait_frac < 0.02 { "met" } else { "not met" }
    );
    println!(
        "{}",
        serde_json::json!({
            "steps": steps,
            "steps_per_s": steps_per_s,
            "samples_per_s": steps_per_s * cfg.train.batch as f64,
            "loader_batches_per_s": loader,
            "headroom": loader / steps_per_s,
            "data_wait_frac": wait_frac,
        })
    );
    Ok(())
}
