//! The sequential inverse of a block as one fixed-shape decode step, replayed N − 1 times. The step reads
//! its position from a device tensor and advances it itself, writes its key and value at that index of
//! a full-length cache and attends to the whole cache under a mask, so every step enqueues the same
//! kernels on the same buffers. On a GPU the step is captured once per block as a CUDA graph: an eager
//! step is launch-bound (about a hundred small kernels per token), a replay is one launch. The same step
//! runs eagerly anywhere, which is how the tests check it against the KV-cache decoder on a CPU.

use std::sync::Mutex;

use tch::{Device, Kind, Tensor};
use torch_ext::event::CudaEvent;
use torch_ext::graph::CudaGraph;

use super::block::{invert_tokens, MetaBlock};
use super::guidance::{Branches, Guidance};
use super::linear::Precision;

/// How a sequential block inverse runs its steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StepMode {
    /// A KV cache that grows one token per step; the position is a host integer.
    #[default]
    Cached,
    /// The fixed-shape step with a device position, run eagerly (what a graph captures).
    Fixed,
    /// The fixed-shape step captured as a CUDA graph per block and replayed; CUDA devices only.
    CudaGraph,
}

static FAILURES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Why graph captures failed since the last call (each such block was decoded by the KV-cache steps
/// instead, so the samples are the same); the caller logs them.
pub fn take_failures() -> Vec<String> {
    std::mem::take(&mut *FAILURES.lock().unwrap_or_else(|e| e.into_inner()))
}

pub(super) fn record_failure(message: String) {
    FAILURES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(message);
}

/// One block's inverse (z in raster order → x in raster order) by the fixed-shape step; with `graph`,
/// captured and replayed (an error when the capture fails, so the caller can fall back).
#[allow(clippy::too_many_arguments)]
pub(super) fn reverse_block_fixed(
    prec: Precision,
    block: &MetaBlock,
    z: &Tensor,
    y: Option<&Tensor>,
    g: &Guidance,
    guided: bool,
    graph: bool,
    pack: bool,
) -> Result<Tensor, String> {
    let (batch, n, _) = z.size3().map_err(|e| e.to_string())?;
    let device = z.device();
    let cuda = match (graph, device) {
        (false, _) => None,
        (true, Device::Cuda(index)) => Some(index),
        (true, other) => return Err(format!("CUDA graphs need a CUDA device, not {other:?}")),
    };
    let Branches { class, q_scale } = Branches::new(block, y, g, batch, guided, device);
    // Read-only noise tokens and the tokens being solved (token 0 is final from the start), both
    // permuted; every buffer the step touches exists before the first step runs.
    let zp = block.permutation.apply(z).contiguous();
    let x = zp.copy();
    let at = Tensor::zeros([1], (Kind::Int64, device));
    // The guidance weight of the token each step makes (step i makes token i + 1).
    let weights = guided.then(|| {
        let w: Vec<f32> = (0..n).map(|i| g.weight_at(i + 1, n) as f32).collect();
        Tensor::from_slice(&w).to_device(device)
    });
    let rows = if guided { 2 * batch } else { batch };
    let mut cache = block.new_cache(n, rows, prec, pack && cuda.is_none());
    let mut step = || -> Result<(), String> {
        let token = x.f_index_select(1, &at).map_err(|e| e.to_string())?;
        let token = if guided {
            Tensor::f_cat(&[&token, &token], 0).map_err(|e| e.to_string())?
        } else {
            token
        };
        let mut o = block.step_output_at(
            &token,
            (0, Some(&at)),
            class.as_ref(),
            &mut cache,
            q_scale.as_ref(),
            prec,
        );
        if let Some(w) = &weights {
            let w = w.index_select(0, &at).neg();
            o = o
                .narrow(0, 0, batch)
                .lerp_tensor(&o.narrow(0, batch, batch), &w);
        }
        let next_at = &at + 1;
        let updated = invert_tokens(&o, &zp.index_select(1, &next_at));
        let _ = x
            .shallow_clone()
            .f_index_copy_(1, &next_at, &updated)
            .map_err(|e| e.to_string())?;
        let _ = at
            .shallow_clone()
            .f_add_scalar_(1)
            .map_err(|e| e.to_string())?;
        Ok(())
    };
    match cuda {
        None => {
            for _ in 0..n - 1 {
                step()?;
            }
        }
        Some(index) => {
            // One eager step on the current stream first: it allocates the KV cache there, so the
            // buffers the replays write are never blocks of the capture's side stream that the
            // allocator could hand to another stream's work while the replays still run.
            step()?;
            let graph = CudaGraph::capture(index, 1, &mut step).map_err(|e| e.to_string())?;
            // The eager steps ran: start again (a step rewrites everything it wrote).
            let _ = at.shallow_clone().f_zero_().map_err(|e| e.to_string())?;
            for _ in 0..n - 1 {
                graph.replay().map_err(|e| e.to_string())?;
            }
            // The graph's private pool goes back to the allocator when it is dropped: wait for the
            // replays first (once per block, not per step).
            CudaEvent::record(index)
                .and_then(|done| done.synchronize())
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(block.permutation.apply(&x))
}
