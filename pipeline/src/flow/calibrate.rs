//! `pipeline flow calibrate`: which solver inverts each block, measured on data. The flow's forward
//! pass gives every block's true input and output for the samples; each block is then inverted from its
//! output by Jacobi candidates, and the cheapest one (fewest dependent passes) that stays within the
//! error target is written to the schedule `--solver auto` reads (`model::tarflow::sample::calibrate`).

use std::path::PathBuf;

use anyhow::bail;
use tch::Kind;

use super::model_io::{data_input, load_model, refuse_inputs, ModelArgs};
use crate::config::solver::{schedule_path, Schedule};

#[derive(clap::Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Training data in the flow's space: safetensors with `x` (B,C,H,W) and optional int64 labels `y`
    /// (as `flow encode` reads), e.g. a few hundred cached latents
    #[arg(long)]
    input: PathBuf,
    /// Use at most this many rows of `x`
    #[arg(long, default_value_t = 256)]
    samples: i64,
    /// Largest deviation from a block's true input a Jacobi candidate may leave
    #[arg(long, default_value_t = 1e-3)]
    target: f64,
    /// Where to write the schedule (default: beside the checkpoint, `NAME.solver.json`)
    #[arg(long)]
    output: Option<PathBuf>,
}

pub fn calibrate(args: CalibrateArgs) -> anyhow::Result<()> {
    if args.samples < 1 || args.target.is_nan() || args.target <= 0.0 {
        bail!(
            "--samples must be at least 1 and --target positive, got {} and {}",
            args.samples,
            args.target
        );
    }
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| schedule_path(&args.model.checkpoint));
    refuse_inputs(&output, &args.model, Some(&args.input))?;
    let loaded = load_model(&args.model)?;
    let model = &loaded.model;
    let (x, y) = data_input(model, &args.input)?;
    let rows = x.size()[0].min(args.samples);
    let device = model.device();
    let x = x.narrow(0, 0, rows).to_kind(Kind::Float).to_device(device);
    let y = y.map(|y| y.narrow(0, 0, rows).to_device(device));
    let what = format!("calibrating on {rows} samples of {}", args.input.display());
    let calibration = crate::runtime::torch_guard::guard(&what, || {
        Ok(model::tarflow::sample::calibrate(
            model,
            &x,
            y.as_ref(),
            args.target,
        ))
    })?;
    let n = model.cfg.num_tokens();
    for c in &calibration {
        eprintln!(
            "block {}: {} — {} dependent passes (sequential: {}), max |Δ| {:.2e}",
            c.block,
            c.chosen.describe(),
            c.passes,
            n - 1,
            c.max_abs_error
        );
    }
    let depth: i64 = calibration.iter().map(|c| c.passes).sum();
    let schedule = Schedule {
        target_max_abs_error: args.target,
        samples: rows,
        plan: model::tarflow::sample::Plan::PerBlock(
            calibration.iter().map(|c| c.chosen).collect(),
        ),
        calibration,
    };
    schedule.write(&output)?;
    eprintln!(
        "wrote {}: sequential depth {depth} dependent passes per sample (sequential solver: {})",
        output.display(),
        (n - 1) * model.blocks.len() as i64
    );
    Ok(())
}
