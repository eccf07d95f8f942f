//! Continuing a run: a checkpoint restored into the flow, EMA and projector stores and the optimizer,
//! the parameter order checkpoints use, and the metrics log cut back to the restored step.

use std::path::Path;

use anyhow::{bail, Context};
use tch::{nn, Tensor};

use super::{checkpoint, optim};

pub(super) fn trainable(vs: &nn::VarStore, prefix: &str) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, t)| (format!("{prefix}{n}"), t))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

pub(super) fn sorted(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

pub(super) fn restore(
    dir: &Path,
    vs: &mut nn::VarStore,
    ema_vs: &mut nn::VarStore,
    proj_vs: &mut nn::VarStore,
    has_projector: bool,
    adam: &mut optim::AdamW,
) -> anyhow::Result<checkpoint::State> {
    let mask = |n: &str| n.starts_with("blocks.") && n.ends_with(".attn_mask");
    for (file, store) in [
        ("model.safetensors", &mut *vs),
        ("ema.safetensors", &mut *ema_vs),
    ] {
        let path = dir.join(file);
        let tensors = model::weights::read_safetensors(&path)?;
        model::weights::load_into(store, &tensors, &path, &mask)?;
    }
    let proj = dir.join("projector.safetensors");
    match (has_projector, proj.exists()) {
        (true, true) => model::weights::load_strict(proj_vs, &proj, &|_| false)?,
        (true, false) => bail!(
            "{}: the config aligns but the checkpoint has no projector.safetensors",
            dir.display()
        ),
        (false, true) => bail!(
            "{}: the checkpoint has a projector but align.mode = none",
            dir.display()
        ),
        (false, false) => {}
    }
    let path = dir.join("state.safetensors");
    let moments = model::weights::read_safetensors(&path)?;
    tch::no_grad(|| -> anyhow::Result<()> {
        for (name, _, m, v) in &mut adam.slots {
            for (key, dst) in [
                (format!("m.{name}"), &mut *m),
                (format!("v.{name}"), &mut *v),
            ] {
                let src = moments.get(&key).with_context(|| {
                    format!("{}: optimizer moment `{key}` is missing", path.display())
                })?;
                if src.size() != dst.size() {
                    bail!(
                        "{}: `{key}` has shape {:?}, expected {:?}",
                        path.display(),
                        src.size(),
                        dst.size()
                    );
                }
                dst.copy_(src);
            }
        }
        Ok(())
    })?;
    let state = checkpoint::read_state(dir)?;
    adam.set_t(state.adam_t);
    Ok(state)
}

/// Keeps the metric lines up to `step`, so a resumed run's log reads as one run.
pub(super) fn truncate_metrics(path: &Path, step: u64) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    stages::atomic::write_bytes_atomic(path, kept.as_bytes())?;
    Ok(())
}
