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

use super::block::MetaBlock;
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
        for _ in 0..cap {
            let prefix = x.narrow(1, 0, end);
            let rows = if guided {
                Tensor::cat(&[&prefix, &prefix], 0)
            } else {
                prefix
            };
            let mut o = block.parallel_output(&rows, class.as_ref(), q_scale.as_ref(), prec);
            if let Some(w) = &weights {
                // cond + w·(cond − uncond), as the sequential step combines them.
                o = o
                    .narrow(0, 0, batch)
                    .lerp_tensor(&o.narrow(0, batch, batch), &-w.narrow(1, 0, end));
            }
            let d = o.size()[2] / 2;
            let (a, b) = (
                o.narrow(2, 0, d).narrow(1, start, len),
                o.narrow(2, d, d).narrow(1, start, len),
            );
            let next = b.addcmul(&z_seg, &a.exp());
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

/// The inverse of every block, last to first, with `solver`: images (B, C, H, W) and the dependent
/// network passes each block took (in the order they ran).
pub(super) fn reverse_jacobi(
    model: &Model,
    prec: Precision,
    z: &Tensor,
    y: Option<&Tensor>,
    g: &Guidance,
    (chunk, tol, max_iters): (i64, f64, i64),
) -> (Tensor, Vec<i64>) {
    tch::no_grad(|| {
        let _cast = model.cast_weights_in(prec);
        let mut x = z.to_kind(Kind::Float) * model.var.sqrt();
        let mut passes = Vec::with_capacity(model.blocks.len());
        for block in model.blocks.iter().rev() {
            let (next, p) = jacobi_block(
                prec,
                block,
                &x,
                y,
                g,
                g.weight != 0.0,
                chunk,
                tol,
                max_iters,
            );
            x = next;
            passes.push(p);
        }
        (model.unpatchify(&x), passes)
    })
}
