//! The sequential inverse of one flow block: one token per step with a KV cache, what `--solver
//! sequential` runs for every block and a per-block plan for the blocks it keeps sequential; with
//! [`Model::decode_steps`] set, the fixed-shape step of `graphed` (a CUDA graph on a GPU) instead.

use tch::Tensor;

use super::block::{invert_tokens, MetaBlock};
use super::graphed::{record_failure, reverse_block_fixed, StepMode};
use super::guidance::{Branches, Guidance};
use super::{Model, Precision};

/// One block's inverse with a KV cache. With guidance the conditional and unconditional branches are
/// one batch of 2B rows (cond first), so each step is a single pass.
pub(super) fn reverse_block(
    model: &Model,
    prec: Precision,
    block: &MetaBlock,
    z: &Tensor,
    y: Option<&Tensor>,
    g: &Guidance,
    guided: bool,
) -> Tensor {
    if model.decode_steps != StepMode::Cached {
        let graph = model.decode_steps == StepMode::CudaGraph;
        match reverse_block_fixed(prec, block, z, y, g, guided, graph, model.pack_weights) {
            Ok(x) => return x,
            // The KV-cache steps give the same samples; the caller reports why.
            Err(e) => record_failure(e),
        }
    }
    let (batch, n, _) = z.size3().expect("(B, N, D)");
    let Branches { class, q_scale } = Branches::new(block, y, g, batch, guided, z.device());
    let x = block.permutation.apply(z);
    let mut tokens: Vec<Tensor> = (0..n).map(|i| x.narrow(1, i, 1)).collect();
    let rows = if guided { 2 * batch } else { batch };
    let mut cache = block.new_cache(n, rows, prec, model.pack_weights);
    for i in 0..n - 1 {
        let token = if guided {
            Tensor::cat(&[&tokens[i as usize], &tokens[i as usize]], 0)
        } else {
            tokens[i as usize].shallow_clone()
        };
        let mut o = block.step_output(
            &token,
            i,
            class.as_ref(),
            &mut cache,
            q_scale.as_ref(),
            prec,
        );
        if guided {
            let w = g.weight_at(i + 1, n);
            // cond + w·(cond − uncond) for a and b at once: lerp from cond towards uncond by −w.
            o = o.narrow(0, 0, batch).lerp(&o.narrow(0, batch, batch), -w);
        }
        tokens[i as usize + 1] = invert_tokens(&o, &tokens[i as usize + 1]);
    }
    block.permutation.apply(&Tensor::cat(&tokens, 1))
}
