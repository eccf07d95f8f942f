//! Checkpoint directories `RUN_DIR/checkpoints/step-XXXXXXXX/`: flow and EMA weights under the
//! reference names with the sidecar `pipeline flow` reads, the projector heads, and the training state
//! (AdamW moments in `state.safetensors`, counters and loader position in `state.json`). The directory
//! is filled under a temporary name and renamed when complete, then `latest` is rewritten, so a crash
//! never leaves a half checkpoint that `--resume` or `sample` could pick up.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::loader::Position;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Batches consumed (steps taken plus steps skipped as non-finite).
    pub step: u64,
    /// AdamW updates applied.
    pub adam_t: u64,
    pub position: Position,
    pub nonfinite_total: u64,
    pub nonfinite_in_row: u64,
    /// Every rank's loader position, by rank (`position` is rank 0's); a resume with the same world
    /// size continues each rank where it was.
    #[serde(default)]
    pub positions: Vec<Position>,
    /// Every random draw of training comes from generators keyed by (seed, epoch, rank, batch), so
    /// the seed and the loader position are the whole RNG state.
    pub seed: u64,
}

pub fn dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

pub struct Contents<'a> {
    pub model: Vec<(String, Tensor)>,
    pub ema: Vec<(String, Tensor)>,
    pub projector: Option<Vec<(String, Tensor)>>,
    pub moments: Vec<(String, Tensor)>,
    pub model_toml: &'a str,
    pub state: &'a State,
}

/// Writes the checkpoint, then prunes to the newest `keep_last`, never removing `keep` (the last one
/// saved before a non-finite streak began).
pub fn write(
    root: &Path,
    c: &Contents,
    keep_last: usize,
    keep: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let name = dir_name(c.state.step);
    let final_dir = root.join(&name);
    let tmp = root.join(format!(".{name}.partial"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    model::weights::save_atomic(&c.model, &tmp.join("model.safetensors"))?;
    stages::atomic::write_bytes_atomic(&tmp.join("model.model.toml"), c.model_toml.as_bytes())?;
    model::weights::save_atomic(&c.ema, &tmp.join("ema.safetensors"))?;
    stages::atomic::write_bytes_atomic(&tmp.join("ema.model.toml"), c.model_toml.as_bytes())?;
    if let Some(p) = &c.projector {
        model::weights::save_atomic(p, &tmp.join("projector.safetensors"))?;
    }
    model::weights::save_atomic(&c.moments, &tmp.join("state.safetensors"))?;
    stages::atomic::write_bytes_atomic(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(c.state)?.as_bytes(),
    )?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)
            .with_context(|| format!("replacing {}", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
    stages::atomic::write_bytes_atomic(&root.join("latest"), format!("{name}\n").as_bytes())?;
    prune(root, keep_last.max(1), keep)?;
    Ok(final_dir)
}

fn prune(root: &Path, keep: usize, protect: Option<&Path>) -> anyhow::Result<()> {
    let mut dirs: Vec<String> = std::fs::read_dir(root)
        .with_context(|| format!("listing {}", root.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(keep);
    for name in &dirs[..excess] {
        if protect.is_some_and(|p| p.file_name() == Some(std::ffi::OsStr::new(name))) {
            continue;
        }
        std::fs::remove_dir_all(root.join(name))
            .with_context(|| format!("removing old checkpoint {name}"))?;
    }
    Ok(())
}

/// The newest complete checkpoint named by `latest`.
pub fn latest(root: &Path) -> anyhow::Result<PathBuf> {
    let file = root.join("latest");
    let name = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "--resume: reading {} (no checkpoint written yet?)",
            file.display()
        )
    })?;
    let dir = root.join(name.trim());
    if !dir.join("state.json").exists() {
        bail!(
            "--resume: {} names {}, which has no state.json",
            file.display(),
            dir.display()
        );
    }
    Ok(dir)
}

pub fn read_state(dir: &Path) -> anyhow::Result<State> {
    let path = dir.join("state.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}", path.display()))
}
