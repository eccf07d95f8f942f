//! How a reverse pass inverts each flow block: the flags `sample` and `flow decode` share.

use anyhow::bail;
use model::tarflow::sample::Solver;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolverKind {
    Sequential,
    Jacobi,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SolverArgs {
    /// How each flow block is inverted: `sequential` decodes one token per step (N − 1 dependent
    /// passes per block); `jacobi` iterates parallel passes, exact (the sequential sampler's samples)
    /// unless --jacobi-tol or --jacobi-max-iters stop it earlier (docs/flow.md, Solvers)
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
            SolverKind::Sequential => Solver::Sequential,
            SolverKind::Jacobi => Solver::Jacobi {
                chunk: self.jacobi_chunk,
                tol: self.jacobi_tol,
                max_iters: self.jacobi_max_iters,
            },
        })
    }
}

/// One line on what a solver did: dependent passes per block and the sequential depth per sample.
pub fn depth_line(solver: &Solver, passes: &[i64]) -> String {
    format!(
        "solver {}: sequential depth {} dependent passes (per block, last first: {passes:?})",
        solver.describe(),
        passes.iter().sum::<i64>()
    )
}
