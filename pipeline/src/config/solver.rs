//! How a reverse pass inverts each flow block: the flags `sample` and `flow decode` share.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use model::tarflow::sample::{Calibration, Plan, Solver};
use model::tarflow::StepMode;
use tch::Device;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolverKind {
    Sequential,
    Jacobi,
    // The schedule `pipeline flow calibrate` wrote beside the checkpoint, or --schedule FILE; without
    // either, the first-sampled block sequential and the others by Jacobi to 1e-4. (A doc comment here
    // would make clap list every value with its own help.)
    Auto,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SolverArgs {
    /// How each flow block is inverted: `sequential` decodes one token per step (N − 1 dependent
    /// passes per block); `jacobi` iterates parallel passes, exact (the sequential sampler's samples)
    /// unless --jacobi-tol or --jacobi-max-iters stop it earlier; `auto` takes a solver per block from
    /// the calibrated schedule (docs/flow.md, Solvers)
    #[arg(long, value_enum, default_value = "sequential")]
    pub solver: SolverKind,
    /// Jacobi: tokens per segment, solved in turn on their exact prefix (0 = the whole sequence)
    #[arg(long, default_value_t = 0, value_name = "TOKENS")]
    pub jacobi_chunk: i64,
    /// Jacobi: stop a segment once no value moves by more than this (0 = to the exact fixed point)
    #[arg(long, default_value_t = 0.0, value_name = "TOL")]
    pub jacobi_tol: f64,
    /// Jacobi: at most this many passes per segment (0 = the segment's length, which is exact)
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub jacobi_max_iters: i64,
    /// With --solver auto: the schedule file (default: CHECKPOINT's `.solver.json` beside it)
    #[arg(long, value_name = "FILE")]
    pub schedule: Option<PathBuf>,
    /// Sequentially decoded blocks run their token step as a CUDA graph (captured once per block and
    /// batch, replayed N − 1 times): one launch per step instead of one per kernel, the same samples.
    /// CUDA devices only; a block whose capture fails is decoded eagerly, with a warning
    #[arg(long)]
    pub cuda_graphs: bool,
}

impl SolverArgs {
    pub fn solver(&self) -> anyhow::Result<Solver> {
        if self.jacobi_chunk < 0
            || self.jacobi_max_iters < 0
            || self.jacobi_tol.is_nan()
            || self.jacobi_tol < 0.0
        {
            bail!(
                "--jacobi-chunk, --jacobi-tol and --jacobi-max-iters must be ≥ 0 (0 = no limit), got {}, {}, {}",
                self.jacobi_chunk,
                self.jacobi_tol,
                self.jacobi_max_iters
            );
        }
        Ok(match self.solver {
            SolverKind::Sequential | SolverKind::Auto => Solver::Sequential,
            SolverKind::Jacobi => Solver::Jacobi {
                chunk: self.jacobi_chunk,
                tol: self.jacobi_tol,
                max_iters: self.jacobi_max_iters,
            },
        })
    }

    /// How sequential decode steps run on `device` ([`step_mode`]).
    pub fn step_mode(&self, device: Device) -> anyhow::Result<StepMode> {
        step_mode(self.cuda_graphs, device)
    }

    /// The solver of every block for `checkpoint`'s flow of `blocks` blocks, and where it came from.
    pub fn plan(&self, checkpoint: &Path, blocks: usize) -> anyhow::Result<(Plan, String)> {
        let solver = self.solver()?;
        if self.solver != SolverKind::Auto {
            if self.schedule.is_some() {
                bail!("--schedule is read with --solver auto");
            }
            return Ok((solver.into(), "flags".into()));
        }
        let (path, explicit) = match &self.schedule {
            Some(p) => (p.clone(), true),
            None => (schedule_path(checkpoint), false),
        };
        if !explicit && !path.exists() {
            return Ok((
                Plan::selective(blocks),
                format!("default ({} not found)", path.display()),
            ));
        }
        let schedule = Schedule::read(&path)?;
        schedule
            .plan
            .check(blocks)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok((schedule.plan, path.display().to_string()))
    }
}

/// Where `pipeline flow calibrate` writes a checkpoint's schedule: `ema.safetensors` → `ema.solver.json`.
pub fn schedule_path(checkpoint: &Path) -> PathBuf {
    checkpoint.with_extension("solver.json")
}

/// A calibrated solver schedule, as `pipeline flow calibrate` writes it.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Largest deviation from each block's true input allowed when choosing.
    pub target_max_abs_error: f64,
    /// Samples the choice was measured on.
    pub samples: i64,
    /// One solver per block, model order (block 0 is inverted last).
    pub plan: Plan,
    pub calibration: Vec<Calibration>,
}

impl Schedule {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        // A schedule is a line per block and candidate: kilobytes. The size is checked before reading.
        const MAX_BYTES: u64 = 16 << 20;
        let len = std::fs::metadata(path)
            .with_context(|| format!("reading the solver schedule {}", path.display()))?
            .len();
        if len > MAX_BYTES {
            bail!(
                "{}: {len} bytes is not a solver schedule (at most {MAX_BYTES})",
                path.display()
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the solver schedule {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a solver schedule", path.display()))
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        stages::atomic::write_bytes_atomic(path, &serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// How sequential decode steps run on `device` with or without `--cuda-graphs`, which is refused off
/// CUDA (there is nothing to capture) and in a build without the CUDA headers.
pub fn step_mode(cuda_graphs: bool, device: Device) -> anyhow::Result<StepMode> {
    match (cuda_graphs, device) {
        (false, _) => Ok(StepMode::Cached),
        (true, Device::Cuda(_)) if torch_ext::graph::available() => Ok(StepMode::CudaGraph),
        (true, Device::Cuda(_)) => {
            bail!("--cuda-graphs: this build has no CUDA headers (see the torch-ext build warning)")
        }
        (true, other) => bail!("--cuda-graphs needs a CUDA device; this run is on {other:?}"),
    }
}

/// What the solver line adds when sequential steps run as CUDA graphs.
pub fn graph_note(steps: StepMode) -> &'static str {
    match steps {
        StepMode::CudaGraph => ", sequential steps as CUDA graphs",
        _ => "",
    }
}

/// Warns once per failed CUDA-graph capture since the last call (those blocks were decoded eagerly).
pub fn warn_graph_failures() {
    for why in model::tarflow::graphed::take_failures() {
        tracing::warn!("CUDA graph not used for a block (decoded eagerly, same samples): {why}");
    }
}

/// One line on what a solver did: dependent passes per block and the sequential depth per sample.
pub fn depth_line(plan: &Plan, passes: &[i64]) -> String {
    format!(
        "solver {}: sequential depth {} dependent passes (per block, last first: {passes:?})",
        plan.describe(),
        passes.iter().sum::<i64>()
    )
}
