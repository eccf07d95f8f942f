//! `pipeline train --dry-run`: what a config costs before any data is read. Builds the flow and the
//! projector on the chosen device and prints their parameter counts, the bytes of weights, gradients,
//! AdamW moments and EMA, and an estimate of the activations one sample keeps for backward, with the
//! largest `train.micro_batch` that fits common GPUs.

use model::tarflow::align::{AlignHead, AlignMode};
use model::tarflow::Model;
use tch::nn;

/// Bytes of activations one sample keeps for backward, estimated the way Korthikanti et al. (2022)
/// count a transformer layer in 16-bit, 34·d per token and layer, without their 5·heads·n attention
/// term: `scaled_dot_product_attention` (flash / memory-efficient kernels) keeps no n×n probabilities.
/// Times 1.3 for R-REPA's extra passes through the aligned blocks when alignment is on.
pub fn activation_bytes_per_sample(cfg: &crate::config::Config) -> f64 {
    let m = &cfg.model;
    let (n, d) = (m.num_tokens() as f64, m.channels as f64);
    let layers = (m.num_blocks * m.layers_per_block) as f64;
    let align = if cfg.align.mode == AlignMode::None {
        1.0
    } else {
        1.3
    };
    n * 34.0 * d * layers * align
}

const GIB: f64 = (1u64 << 30) as f64;

pub fn run(cfg: &crate::config::Config) -> anyhow::Result<()> {
    let device = model::device::parse_device(&cfg.train.device)?;
    let vs = nn::VarStore::new(device);
    let flow = Model::new(vs.root(), &cfg.model)?;
    let pvs = nn::VarStore::new(device);
    if cfg.align.mode != AlignMode::None {
        AlignHead::new(pvs.root(), &cfg.align, &flow)?;
    }
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
    println!(
        "  (activation figures are estimates, not a measured peak: confirm with a short run, e.g. --stop-at 20)"
    );
    Ok(())
}
