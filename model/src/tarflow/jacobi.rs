//! Parallel inversion of a flow block. A block's inverse x_t = z_t·exp(a_t(x_<t)) + b_t(x_<t) is a
//! triangular system: iterating x ← z·exp(a(x)) + b(x) with one parallel causal pass per iteration
//! (Jacobi) fixes one more token per iteration at least, so N − 1 iterations give the sequential
//! answer exactly, and a block whose tokens depend weakly on each other settles in far fewer (Song et
//! al. 2021's Jacobi decoding; GS-Jacobi and Selective Jacobi Decoding for TARFlow, 2025). Chunks
//! (Gauss–Seidel over segments) iterate one segment at a time on its exact prefix, which bounds the
//! iterations per segment by its length. What bounds latency on an accelerator is the number of
//! dependent network passes, the *sequential depth*: N − 1 per block sequentially, the iterations
//! here.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::block::{invert_tokens, MetaBlock};
use super::guidance::{Branches, Guidance};
use super::{Model, Precision};

/// How the reverse pass inverts each block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "solver", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Solver {
    /// One token per step with a KV cache: N − 1 dependent passes per block.
    #[default]
    Sequential,
    /// Fixed-point iteration of the block's parallel pass over segments of `chunk` tokens (0 = the
    /// whole sequence at once), until no token moves by more than `tol` (0 = to the exact fixed
    /// point, at most the segment's length in iterations) or `max_iters` iterations per segment
    /// (0 = no cap beyond the segment's length).
    Jacobi {
        chunk: i64,
        tol: f64,
        max_iters: i64,
    },
}

impl Solver {
    /// The exact parallel solver: the sequential sampler's samples, computed by parallel passes.
    pub fn exact() -> Self {
        Solver::Jacobi {
            chunk: 0,
            tol: 0.0,
            max_iters: 0,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Solver::Sequential => "sequential (KV cache)".into(),
            Solver::Jacobi {
                chunk,
                tol,
                max_iters,
            } => {
                let segments = if *chunk > 0 {
                    format!("segments of {chunk}")
                } else {
                    "whole sequence".into()
                };
                let cap = if *max_iters > 0 {
                    format!(", at most {max_iters} passes per segment")
                } else {
                    String::new()
                };
                format!("jacobi ({segments}, tol {tol:e}{cap})")
            }
        }
    }
}

/// One block inverted by Jacobi iteration: (x in raster order, the dependent passes it took).
#[allow(clippy::too_many_arguments)]
pub(super) fn jacobi_block(
    prec: Precision,
    block: &MetaBlock,
    z: &Tensor,
    y: Option<&Tensor>,
    g: &Guidance,
    guided: bool,
    chunk: i64,
    tol: f64,
    max_iters: i64,
) -> (Tensor, i64) {
    let (batch, n, _) = z.size3().expect("(B, N, D)");
    let Branches { class, q_scale } = Branches::new(block, y, g, batch, guided, z.device());
    let zp = block.permutation.apply(z).to_kind(Kind::Float);
    // Token 0 has a = b = 0: starting from z, it is exact before the first iteration.
    let x = zp.copy();
    // The guidance weight of each permuted position (token 0's is never used).
    let weights = guided.then(|| {
        let w: Vec<f32> = (0..n).map(|t| g.weight_at(t.max(1), n) as f32).collect();
        Tensor::from_slice(&w).view([1, n, 1]).to_device(z.device())
    });
    let chunk = if chunk > 0 { chunk } else { n };
    let rows = if guided { 2 * batch } else { batch };
    let both = |t: Tensor| if guided { Tensor::cat(&[&t, &t], 0) } else { t };
    // Keys and values of permuted positions 0..committed are final. A segment's first pass computes
    // those of the tokens before it (final by then) and commits them; its later passes run only the
    // segment's own tokens against the cache.
    let mut cache = block.new_cache(n, rows, prec, false);
    let mut committed = 0;
    let mut passes = 0;
    let mut start = 1;
    while start < n {
        let end = (start + chunk).min(n);
        let len = end - start;
        // Each iteration fixes at least the segment's next token, so `len` iterations are exact.
        let cap = if max_iters > 0 {
            max_iters.min(len)
        } else {
            len
        };
        let z_seg = zp.narrow(1, start, len);
        // Token t's parameters come from the pass over token t − 1: (rows, len, 2D) for start..end.
        let mut params: Option<Tensor> = None;
        for _ in 0..cap {
            let from = committed;
            let tokens = both(x.narrow(1, from, end - 1 - from));
            let o = block.segment_output(
                &tokens,
                from,
                class.as_ref(),
                &mut cache,
                q_scale.as_ref(),
                prec,
                start - from,
            );
            committed = start;
            let o = match &mut params {
                None => o.narrow(1, o.size()[1] - len, len),
                Some(p) => {
                    // Token `start`'s parameters depend on final tokens only: kept from the first pass.
                    p.narrow(1, 1, len - 1).copy_(&o);
                    p.shallow_clone()
                }
            };
            params = Some(o.shallow_clone());
            let o = match &weights {
                // cond + w·(cond − uncond), as the sequential step combines them.
                Some(w) => o
                    .narrow(0, 0, batch)
                    .lerp_tensor(&o.narrow(0, batch, batch), &-w.narrow(1, start, len)),
                None => o,
            };
            let next = invert_tokens(&o, &z_seg);
            let mut seg = x.narrow(1, start, len);
            passes += 1;
            // The stopping rule needs the change on the host: one read-back per parallel pass, which
            // costs far less than the pass.
            let change = if tol > 0.0 || passes % 8 == 0 {
                (&next - &seg).abs().max().double_value(&[])
            } else {
                f64::INFINITY
            };
            seg.copy_(&next);
            if change <= tol {
                break;
            }
        }
        start = end;
    }
    (block.permutation.apply(&x), passes)
}

/// Which solver inverts each block: one for all, or a schedule with one per block in model order
/// (block 0 is inverted last), as `pipeline flow calibrate` writes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Plan {
    Uniform(Solver),
    PerBlock(Vec<Solver>),
}

impl From<Solver> for Plan {
    fn from(solver: Solver) -> Self {
        Plan::Uniform(solver)
    }
}

impl Plan {
    /// The default when no calibrated schedule exists, after Selective Jacobi Decoding (2025): the
    /// first block sampled (the model's last), whose tokens depend on each other most, sequentially;
    /// every other block by whole-sequence Jacobi stopped at a max-norm change of 1e-4.
    pub fn selective(blocks: usize) -> Self {
        let mut solvers = vec![
            Solver::Jacobi {
                chunk: 0,
                tol: 1e-4,
                max_iters: 0,
            };
            blocks
        ];
        if let Some(last) = solvers.last_mut() {
            *last = Solver::Sequential;
        }
        Plan::PerBlock(solvers)
    }

    /// The solver of block `i` (model order). A schedule shorter than the model is rejected by
    /// [`Plan::check`]; here a missing entry falls back to the sequential solver.
    pub fn for_block(&self, i: usize) -> Solver {
        match self {
            Plan::Uniform(s) => *s,
            Plan::PerBlock(v) => v.get(i).copied().unwrap_or_default(),
        }
    }

    /// Fails unless a per-block schedule has one entry per block.
    pub fn check(&self, blocks: usize) -> Result<(), String> {
        match self {
            Plan::PerBlock(v) if v.len() != blocks => Err(format!(
                "the schedule has {} blocks, the flow {blocks}",
                v.len()
            )),
            _ => Ok(()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Plan::Uniform(s) => s.describe(),
            Plan::PerBlock(v) => {
                let each: Vec<String> = v
                    .iter()
                    .enumerate()
                    .map(|(i, s)| format!("block {i}: {}", s.describe()))
                    .collect();
                format!("per-block schedule [{}]", each.join("; "))
            }
        }
    }
}

/// The inverse of every block, last to first, each with its solver in `plan`: images (B, C, H, W)
/// and the dependent network passes each block took (in the order they ran).
pub(super) fn reverse_planned(
    model: &Model,
    prec: Precision,
    z: &Tensor,
    y: Option<&Tensor>,
    g: &Guidance,
    plan: &Plan,
) -> (Tensor, Vec<i64>) {
    tch::no_grad(|| {
        let _cast = model.cast_weights_in(prec);
        let mut x = z.to_kind(Kind::Float) * model.var.sqrt();
        let guided = g.weight != 0.0;
        let mut passes = Vec::with_capacity(model.blocks.len());
        for (i, block) in model.blocks.iter().enumerate().rev() {
            let (next, p) = match plan.for_block(i) {
                Solver::Sequential => (
                    super::decode::reverse_block(model, prec, block, &x, y, g, guided),
                    model.cfg.num_tokens() - 1,
                ),
                Solver::Jacobi {
                    chunk,
                    tol,
                    max_iters,
                } => jacobi_block(prec, block, &x, y, g, guided, chunk, tol, max_iters),
            };
            x = next;
            passes.push(p);
        }
        (model.unpatchify(&x), passes)
    })
}

/// What calibration measured for one block: each candidate's dependent passes and largest deviation
/// from the block's true input, and the one chosen.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Calibration {
    pub block: usize,
    pub chosen: Solver,
    pub passes: i64,
    pub max_abs_error: f64,
    pub tried: Vec<(Solver, i64, f64)>,
}

/// The candidate with the fewest passes among those within `target` and cheaper than the sequential
/// solver's N − 1, or the sequential solver (its error is float rounding, reported as 0).
pub fn choose(tried: &[(Solver, i64, f64)], target: f64, n: i64) -> (Solver, i64, f64) {
    tried
        .iter()
        .filter(|(_, p, e)| *e <= target && *p < n - 1)
        .min_by_key(|(_, p, _)| *p)
        .copied()
        .unwrap_or((Solver::Sequential, n - 1, 0.0))
}

/// Chooses a solver per block on data: `x` (B, C, H, W) in the flow's input space (training latents
/// or images) is pushed through the flow, and each block is inverted from its own output by Jacobi
/// candidates (whole sequence and segments of N/4 and N/16, stopped at `target` and at `target`/10).
/// The candidate with the fewest dependent passes whose largest deviation from the block's true input
/// stays within `target` is chosen; a block where none does, or where none takes fewer than the
/// sequential solver's N − 1 passes, stays sequential. This ranks blocks by how strongly their tokens
/// depend on each other, as GS-Jacobi's convergence ranking does, and turns the ranking into a
/// schedule. Unguided: guidance changes the branches' mix, not which blocks are hard.
pub fn calibrate(model: &Model, x: &Tensor, y: Option<&Tensor>, target: f64) -> Vec<Calibration> {
    let prec = model.precision;
    let n = model.cfg.num_tokens();
    let g = Guidance {
        weight: 0.0,
        annealed: false,
        attn_temp: 1.0,
    };
    let cond = y.map_or(super::Cond::Null, super::Cond::Labels);
    tch::no_grad(|| {
        let _cast = model.cast_weights_in(prec);
        let out = model.forward(x, &cond, &[]);
        let mut chunks = vec![0, n / 4, n / 16];
        chunks.retain(|&c| c == 0 || (c > 1 && c < n));
        chunks.dedup();
        model
            .blocks
            .iter()
            .enumerate()
            .map(|(i, block)| {
                let (z, truth) = (&out.outputs[i], &out.inputs[i]);
                let mut tried = vec![];
                for &chunk in &chunks {
                    for tol in [target, target / 10.0] {
                        let solver = Solver::Jacobi {
                            chunk,
                            tol,
                            max_iters: 0,
                        };
                        let (xh, passes) =
                            jacobi_block(prec, block, z, y, &g, false, chunk, tol, 0);
                        let err = (&xh - truth).abs().max().double_value(&[]);
                        tried.push((solver, passes, err));
                    }
                }
                let (chosen, passes, max_abs_error) = choose(&tried, target, n);
                Calibration {
                    block: i,
                    chosen,
                    passes,
                    max_abs_error,
                    tried,
                }
            })
            .collect()
    })
}
