//! What the `flow` subcommands share: where the model comes from, reading it, reading their
//! safetensors inputs, and refusing an output that is one of the inputs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use model::tarflow::{self, Config};
use tch::{Kind, Tensor};

/// Where the model's configuration comes from.
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// Checkpoint (safetensors with the reference TARFlow parameter names)
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Model config TOML (bare keys or a `[model]` section); default: the checkpoint's `.model.toml` sidecar
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Converted reference checkpoints: image (or latent) size; the rest is read from tensor shapes
    #[arg(long, requires_all = ["patch_size", "in_channels"], conflicts_with = "config")]
    pub image_size: Option<i64>,
    /// Converted reference checkpoints: patch size
    #[arg(long)]
    pub patch_size: Option<i64>,
    /// Converted reference checkpoints: input channels (3 RGB, 4 SD-VAE latent)
    #[arg(long)]
    pub in_channels: Option<i64>,
    /// Device: auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Images per forward/reverse batch
    #[arg(long, default_value_t = 64)]
    pub batch: i64,
}

pub fn read_config(path: &Path) -> anyhow::Result<Config> {
    Ok(crate::formats::space::read_sidecar(path)?.0)
}

pub fn load_model(args: &ModelArgs) -> anyhow::Result<tarflow::Loaded> {
    let device = model::device::parse_device(&args.device)?;
    let tensors = model::weights::read_safetensors(&args.checkpoint)?;
    let cfg = match (&args.config, args.image_size) {
        (Some(path), _) => read_config(path)?,
        (None, Some(size)) => tarflow::infer_config(
            &tensors,
            size,
            args.patch_size.unwrap_or(0),
            args.in_channels.unwrap_or(0),
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.checkpoint.display()))?,
        (None, None) => {
            let side = crate::formats::space::sidecar(&args.checkpoint);
            if !side.exists() {
                bail!(
                    "{}: no config given and no sidecar {}; pass --config FILE or --image-size/--patch-size/--in-channels",
                    args.checkpoint.display(),
                    side.display()
                );
            }
            read_config(&side)?
        }
    };
    Ok(tarflow::from_tensors(
        &tensors,
        &args.checkpoint,
        &cfg,
        device,
    )?)
}

/// `x` (B, C, H, W) in the flow's space and its optional labels `y` from a safetensors file, checked.
pub fn data_input(model: &tarflow::Model, path: &Path) -> anyhow::Result<(Tensor, Option<Tensor>)> {
    let inputs = read_inputs(path)?;
    let x = inputs
        .get("x")
        .with_context(|| format!("{}: tensor `x` is missing", path.display()))?;
    model
        .check_input(x)
        .map_err(|e| anyhow::anyhow!("{}: tensor `x`: {e}", path.display()))?;
    let y = labels(&inputs, path, x.size()[0], model.cfg.num_classes)?;
    Ok((x.shallow_clone(), y))
}

pub fn read_inputs(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    Ok(model::weights::read_safetensors(path)?)
}

pub fn labels(
    inputs: &HashMap<String, Tensor>,
    path: &Path,
    batch: i64,
    classes: i64,
) -> anyhow::Result<Option<Tensor>> {
    let Some(y) = inputs.get("y") else {
        return Ok(None);
    };
    if y.size() != [batch] {
        bail!(
            "{}: tensor `y` has shape {:?}, expected [{batch}]",
            path.display(),
            y.size()
        );
    }
    let y = y.to_kind(Kind::Int64);
    let (lo, hi) = (y.min().int64_value(&[]), y.max().int64_value(&[]));
    if lo < -1 || hi >= classes {
        bail!("{}: labels in `y` range over [{lo}, {hi}], the model has {classes} classes (−1 = none)", path.display());
    }
    Ok(Some(y))
}

/// An output of `flow` is never its checkpoint, config or input (nor their sidecar).
pub fn refuse_inputs(output: &Path, model: &ModelArgs, input: Option<&Path>) -> anyhow::Result<()> {
    let side = crate::formats::space::sidecar(&model.checkpoint);
    let mut inputs: Vec<(&str, &Path)> =
        vec![("--checkpoint", &model.checkpoint), ("the sidecar", &side)];
    if let Some(c) = &model.config {
        inputs.push(("--config", c));
    }
    if let Some(i) = input {
        inputs.push(("--input", i));
    }
    crate::formats::outputs::refuse_input_as_output("--output", output, &inputs)
}
