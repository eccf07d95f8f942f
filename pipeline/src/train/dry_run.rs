//! `pipeline train --dry-run`: what a config costs before any data is read. Builds the flow and the
//! projector on the chosen device and prints their parameter counts, the bytes of weights, gradients,
//! AdamW moments and EMA, and an estimate of the activations one sample keeps for backward, with the
//! largest `train.micro_batch` that fits common GPUs.

use model::tarflow::align::{AlignHead, AlignMode};
use model::tarflow::Model;
use tch::nn;

/// Transformer layers whose activations one sample keeps for backward at once: the NLL pass's (with
/// `train.checkpoint_blocks`, one block being recomputed plus the blocks F-REPA captures, which are not
/// checkpointed) and the alignment passes' (never checkpointed).
pub fn kept_layers(cfg: &crate::config::Config) -> f64 {
    let m = &cfg.model;
    let (blocks, per_block) = (m.num_blocks as usize, m.layers_per_block as usize);
    let locations = cfg.align.locations0(m).unwrap_or_default();
    let deepest = |t: usize| {
        locations
            .iter()
            .filter(|(b, _)| *b == t)
            .map(|(_, l)| l + 1)
            .max()
    };
    let mut aligned: Vec<usize> = locations.iter().map(|(b, _)| *b).collect();
    aligned.sort_unstable();
    aligned.dedup();
    let t_min = aligned.first().copied().unwrap_or(blocks);
    let nll = if cfg.train.checkpoint_blocks {
        let captured = if cfg.align.mode == AlignMode::Forward {
            aligned.len()
        } else {
            0
        };
        (captured + 1).min(blocks) * per_block
    } else {
        blocks * per_block
    };
    let align = match cfg.align.mode {
        AlignMode::None | AlignMode::Forward => 0,
        AlignMode::Detach => aligned.iter().filter_map(|&t| deepest(t)).sum(),
        AlignMode::Reverse | AlignMode::ReverseLiteral => (t_min..blocks)
            .map(|t| {
                if t == t_min {
                    deepest(t).unwrap_or(per_block)
                } else {
                    per_block
                }
            })
            .sum(),
        AlignMode::ReverseUnrolled => (t_min..blocks)
            .map(|t| per_block + deepest(t).unwrap_or(0))
            .sum(),
    };
    (nll + align) as f64
}

/// Bytes of activations one sample keeps for backward, estimated the way Korthikanti et al. (2022)
/// count a transformer layer in 16-bit, 34·d per token and layer, without their 5·heads·n attention
/// term: `scaled_dot_product_attention` (flash / memory-efficient kernels) keeps no n×n probabilities;
/// plus, per block, the fp32 tokens a block hands on (input, output, a, b).
pub fn activation_bytes_per_sample(cfg: &crate::config::Config) -> f64 {
    let m = &cfg.model;
    let (n, d) = (m.num_tokens() as f64, m.channels as f64);
    let handoff = 4.0 * 4.0 * n * m.token_dim() as f64 * m.num_blocks as f64;
    n * 34.0 * d * kept_layers(cfg) + handoff
}

const GIB: f64 = (1u64 << 30) as f64;

pub fn run(cfg: &crate::config::Config) -> anyhow::Result<()> {
    let device = model::device::parse_device(&cfg.train.device)?;
    let vs = nn::VarStore::new(device);
    let mut flow = Model::new(vs.root(), &cfg.model)?;
    let pvs = nn::VarStore::new(device);
    let head = match cfg.align.mode {
        AlignMode::None => None,
        _ => Some(AlignHead::new(pvs.root(), &cfg.align, &flow)?),
    };
    let count = |vs: &nn::VarStore| -> i64 {
        vs.trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    };
    let (flow_params, proj_params) = (count(&vs), count(&pvs));
    let params = (flow_params + proj_params) as f64;
    // fp32 weights, gradients and two AdamW moments for everything trained; an fp32 EMA of the flow.
    let state_bytes = params * (4.0 + 4.0 + 8.0) + flow_params as f64 * 4.0;
    let act = activation_bytes_per_sample(cfg);
    let tc = &cfg.train;
    let micro = if tc.micro_batch == 0 {
        tc.batch
    } else {
        tc.micro_batch.min(tc.batch)
    };
    println!("dry run on {device:?} (nothing read, nothing trained)");
    println!(
        "  flow: {flow_params} parameters ({} blocks × {} layers, width {}, {} tokens of {})",
        cfg.model.num_blocks,
        cfg.model.layers_per_block,
        cfg.model.channels,
        cfg.model.num_tokens(),
        cfg.model.token_dim()
    );
    println!("  projector: {proj_params} parameters");
    println!(
        "  weights + gradients + AdamW moments + EMA: {:.2} GiB",
        state_bytes / GIB
    );
    println!(
        "  activations (estimate, bf16): {:.3} GiB per sample; micro-batch {micro} of batch {}: {:.2} GiB",
        act / GIB,
        tc.batch,
        act * micro as f64 / GIB
    );
    for (gpu, gib) in [("H200 (141 GB)", 131.0), ("H100/A100 80 GB", 74.0)] {
        let fit = ((gib * GIB - state_bytes) * 0.85 / act).floor().max(0.0) as usize;
        println!("  largest micro_batch that fits a {gpu}: about {fit}");
    }
    match device {
        tch::Device::Cuda(index) => {
            flow.precision = model::tarflow::Precision::Bf16;
            flow.checkpoint_blocks = tc.checkpoint_blocks;
            let peak = measured_peak(cfg, &vs, &pvs, &flow, head.as_ref(), index, micro)?;
            println!(
                "  measured on {device:?}: one micro-batch of {micro} (bf16, forward + backward with the optimizer state allocated) peaks at {:.2} GiB",
                peak as f64 / GIB
            );
        }
        _ => println!(
            "  (activation figures are estimates, not a measured peak; on CUDA the dry run also measures one micro-batch step)"
        ),
    }
    Ok(())
}

/// Peak bytes the CUDA caching allocator hands out for one micro-batch's forward and backward on
/// random data, with the AdamW moments and the EMA allocated as training would have them.
fn measured_peak(
    cfg: &crate::config::Config,
    vs: &nn::VarStore,
    pvs: &nn::VarStore,
    flow: &Model,
    head: Option<&AlignHead>,
    index: usize,
    micro: usize,
) -> anyhow::Result<i64> {
    let device = tch::Device::Cuda(index);
    let params: Vec<tch::Tensor> = vs
        .trainable_variables()
        .into_iter()
        .chain(pvs.trainable_variables())
        .collect();
    let _state: Vec<tch::Tensor> = params
        .iter()
        .flat_map(|p| [p.zeros_like(), p.zeros_like(), p.zeros_like()])
        .collect();
    let m = &cfg.model;
    let b = micro as i64;
    let x = tch::Tensor::randn(
        [b, m.in_channels, m.img_size, m.img_size],
        (tch::Kind::Float, device),
    );
    let y = tch::Tensor::randint(m.num_classes.max(1), [b], (tch::Kind::Int64, device));
    let features = match head {
        Some(_) => Some(tch::Tensor::randn(
            [
                b,
                cfg.align.target_tokens(m.num_tokens())?,
                cfg.align.encoder_dim,
            ],
            (tch::Kind::Float, device),
        )),
        None => None,
    };
    super::step::sync(device);
    torch_ext::memory::reset_cuda_peak(index)?;
    super::step::accumulate(
        flow,
        head,
        &x,
        &y,
        features.as_ref(),
        0,
        cfg.align.lambda,
        None,
    )?;
    super::step::sync(device);
    Ok(torch_ext::memory::cuda_memory(index)?.peak)
}
