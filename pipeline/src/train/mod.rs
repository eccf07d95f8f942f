//! `pipeline train [--latent]`: TARFlow on a precompute cache with NLL + λ·alignment (spec §2, §4.7),
//! AdamW, EMA, checkpoints that resume exactly, metrics JSONL and EMA sample grids.

mod checkpoint;
mod data;
mod dry_run;
mod effective;
mod fid_eval;
mod loader;
pub(crate) mod optim;
mod replicas;
mod resume;
mod samples;
pub(crate) mod step;
mod trainer;

use std::path::PathBuf;

use trainer::Trainer;

pub use data::loader_rate;
pub use effective::load_config;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: crate::config::ConfigArgs,
    /// Train on cached VAE latents (sets train.latent); without it, pixel space on the cached crops
    #[arg(long)]
    latent: bool,
    /// Source shards to train on (overrides data.shards), e.g. /data/imagenet/imagenet-train-{000000..001281}.tar
    #[arg(long, value_name = "SPEC")]
    shards: Option<String>,
    /// Cache root or fingerprint directory (overrides train.cache)
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Run directory: config.toml, metrics.jsonl, checkpoints/, samples/
    #[arg(long, value_name = "RUN_DIR", default_value = "runs/train")]
    out: PathBuf,
    /// Continue from RUN_DIR/checkpoints/latest
    #[arg(long)]
    resume: bool,
    /// Build the model and print parameters, optimizer-state bytes and an activation estimate per
    /// micro-batch, then exit: no data is read and nothing is written
    #[arg(long)]
    dry_run: bool,
    /// Stop after this many steps (with a checkpoint), as an interrupted run would; continue with --resume
    #[arg(long, value_name = "STEP")]
    stop_at: Option<u64>,
    /// Test hook: make the loss of these steps non-finite (NaN in the batch)
    #[arg(long, hide = true, value_delimiter = ',')]
    inject_nan_at: Vec<u64>,
    /// Test hook: make one gradient element of these steps infinite while the loss stays finite
    #[arg(long, hide = true, value_delimiter = ',')]
    inject_inf_grad_at: Vec<u64>,
    /// Test hook: make libtorch raise an error inside these steps (a shape mismatch)
    #[arg(long, hide = true, value_delimiter = ',')]
    inject_torch_error_at: Vec<u64>,
    /// Test hook: sleep this long before writing each checkpoint
    #[arg(long, hide = true, value_name = "MS")]
    slow_checkpoint_ms: Option<u64>,
    /// Test hook: one process whose every batch is the concatenation of the batches ranks 0..N of an
    /// N-rank job would read (what a data-parallel run averages over)
    #[arg(long, hide = true, value_name = "N")]
    union_of_ranks: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.dry_run {
        let loaded = effective::load_config_with(
            &args.config,
            args.latent,
            &args.shards,
            &args.cache,
            false,
        )?;
        return dry_run::run(&loaded.config);
    }
    let loaded = load_config(&args.config, args.latent, &args.shards, &args.cache)?;
    loaded.announce();
    let tc = loaded.config.train.clone();
    let hooks = trainer::Hooks {
        nan_at: args.inject_nan_at.clone(),
        inf_grad_at: args.inject_inf_grad_at.clone(),
        union_of_ranks: args.union_of_ranks,
        slow_checkpoint: args
            .slow_checkpoint_ms
            .map(std::time::Duration::from_millis),
        torch_error_at: args.inject_torch_error_at.clone(),
    };
    // From here on SIGTERM, SIGINT and SIGUSR1 finish the step, checkpoint and exit 128 + signal.
    crate::runtime::signals::install();
    let mut trainer = Trainer::new(&loaded, &args.out, args.resume, hooks)?;
    let stop = args.stop_at.unwrap_or(tc.steps).min(tc.steps);
    let progress = crate::runtime::progress::Progress::new("train", tc.steps);
    while trainer.state.step < stop {
        let every = |n: u64| n > 0 && (trainer.state.step + 1).is_multiple_of(n);
        let (metric_step, sample_step, fid_step) = (
            every(tc.metrics_every),
            every(tc.sample_every),
            every(tc.fid_every),
        );
        let checkpoint_step = every(tc.checkpoint_every) || trainer.state.step + 1 == stop;
        let step = trainer.state.step;
        let what = format!("step {step}");
        let prepared = crate::runtime::torch_guard::guard(&what, || trainer.prepare(metric_step));
        // Every rank reaches this point once per step, whatever its local part did: the failure of
        // one rank becomes every rank's stop, before any collective of the step.
        let agreed = trainer.agree(prepared.is_err())?;
        let prepared = match prepared {
            Err(e) => return Err(stop_after_failed_step(&mut trainer, e)),
            Ok(_) if !agreed.failed_ranks.is_empty() => {
                let e = anyhow::anyhow!(
                    "step {step} failed on rank(s) {:?} (their logs say why); every rank stops with them",
                    agreed.failed_ranks
                );
                return Err(stop_after_failed_step(&mut trainer, e));
            }
            Ok(p) => p,
        };
        let report = match crate::runtime::torch_guard::guard(&what, || trainer.apply(prepared)) {
            Ok(report) => report,
            // With several ranks a failure here leaves the others inside this step's collectives:
            // they end at the group's timeout with an error naming the rank, and no checkpoint is
            // written over the last one.
            Err(e) if trainer.distributed() => {
                return Err(e.context(format!(
                    "step {step} failed while the ranks were exchanging gradients; the last checkpoint stays the one to resume from"
                )))
            }
            Err(e) => return Err(stop_after_failed_step(&mut trainer, e)),
        };
        // The host learns about skipped steps here only: on metric and checkpoint steps.
        if metric_step || checkpoint_step {
            trainer.check_skips()?;
        }
        if metric_step {
            trainer.log(&report)?;
        }
        if sample_step {
            trainer.sample()?;
        }
        if fid_step {
            trainer.fid()?;
        }
        if checkpoint_step {
            trainer.checkpoint()?;
        }
        progress.set(trainer.state.step);
        if let Some(sig) = trainer.stop_requested() {
            if !checkpoint_step {
                trainer.checkpoint()?;
            }
            progress.finish();
            return Err(crate::runtime::signals::Interrupted {
                signal: sig,
                what: format!(
                    "checkpoint of step {} written to {}; continue with --resume",
                    trainer.state.step,
                    args.out.join("checkpoints").display()
                ),
            }
            .into());
        }
    }
    progress.finish();
    eprintln!(
        "trained {} steps into {} ({} non-finite steps skipped, {:.1}s waiting for data)",
        trainer.state.step,
        args.out.display(),
        trainer.state.nonfinite_total,
        trainer.data_wait().as_secs_f64()
    );
    Ok(())
}

/// A step that failed inside libtorch, on this rank or (agreed) on another: the weights are still those
/// of the last completed step everywhere (no rank had averaged or applied anything), so every rank
/// takes part in saving them before the job stops; CUDA out of memory says which setting to lower.
fn stop_after_failed_step(trainer: &mut Trainer, err: anyhow::Error) -> anyhow::Error {
    let hint = if crate::runtime::torch_guard::is_out_of_memory(&err) {
        format!(
            "; lower train.micro_batch (now {}; `pipeline train --dry-run` estimates what fits)",
            trainer.micro_batch()
        )
    } else {
        String::new()
    };
    if trainer.state.step == 0 {
        return err.context(format!("no step completed, nothing saved{hint}"));
    }
    match trainer.checkpoint_after_failure() {
        Ok(true) => err.context(format!(
            "the checkpoint of step {} (the last completed) was written; continue with --resume{hint}",
            trainer.state.step
        )),
        Ok(false) => err.context(format!(
            "saving the last completed step failed on another rank (its log says why){hint}"
        )),
        Err(save) => err.context(format!(
            "and saving the last completed step failed too: {save:#}{hint}"
        )),
    }
}
