//! `pipeline train --dry-run`: what a config costs before any data is read. Builds the flow and the
//! projector on the chosen device and prints their parameter counts, the bytes of weights, gradients,
//! AdamW moments and EMA, and an estimate of the activations one sample keeps for backward, with the
//! largest `train.micro_batch` that fits common GPUs. On CUDA it also runs one step with everything a
//! run keeps on the device and reports the caching allocator's peak, allocated and reserved.

use std::path::{Path, PathBuf};

use anyhow::Context;
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
    // On a GPU the step also holds one bf16 copy of the weights (model::tarflow::CastScope).
    let gpu_state_bytes = state_bytes + params * 2.0;
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
        "  weights + gradients + AdamW moments + EMA: {:.2} GiB (+ {:.2} GiB of bf16 weights during a step on CUDA)",
        state_bytes / GIB,
        (gpu_state_bytes - state_bytes) / GIB
    );
    println!(
        "  activations (estimate, bf16): {:.3} GiB per sample; micro-batch {micro} of batch {}: {:.2} GiB",
        act / GIB,
        tc.batch,
        act * micro as f64 / GIB
    );
    for (gpu, gib) in [("H200 (141 GB)", 131.0), ("H100/A100 80 GB", 74.0)] {
        let fit = ((gib * GIB - gpu_state_bytes) * 0.85 / act)
            .floor()
            .max(0.0) as usize;
        println!("  largest micro_batch that fits a {gpu}: about {fit}");
    }
    match device {
        tch::Device::Cuda(_) => {
            flow.precision = model::tarflow::Precision::Bf16;
            flow.checkpoint_blocks = tc.checkpoint_blocks;
            let world = crate::runtime::launch::Launch::resolve(tc).map_or(1, |l| l.world);
            let step = || measured_step(cfg, &vs, &pvs, &flow, head.as_ref(), device, world);
            let m = crate::runtime::torch_guard::guard("the dry run's measured step", step)
                .with_context(|| {
                    format!(
                        "measuring one step of batch {} in micro-batches of {micro} on {device:?}{}",
                        tc.batch,
                        " (an out-of-memory error means it does not fit: lower train.micro_batch)"
                    )
                })?;
            println!(
                "  measured on {device:?}: one step of batch {} (micro-batches of {micro}, bf16, forward + backward) peaks at {:.2} GiB allocated, {:.2} GiB reserved by the caching allocator (what must fit the card)",
                tc.batch,
                m.peak.unwrap_or(0) as f64 / GIB,
                m.peak_reserved.unwrap_or(0) as f64 / GIB
            );
            for line in &m.counted {
                println!("    on the device during that step: {line}");
            }
            for line in &m.left_out {
                println!("    left out of that figure: {line}");
            }
        }
        _ => println!(
            "  (activation figures are estimates, not a measured peak; on CUDA the dry run also measures one step)"
        ),
    }
    Ok(())
}

/// What the measured step found: peaks (CUDA only), and what was resident or could not be loaded.
struct Measured {
    peak: Option<i64>,
    peak_reserved: Option<i64>,
    counted: Vec<String>,
    left_out: Vec<String>,
}

/// Peak bytes of one training step on random data with everything a run keeps on the device
/// resident: AdamW moments and the EMA, the loader's prefetched batches, the online encoder (run on
/// the crops as the trainer runs it), the VAE that decodes samples, Inception, and with several ranks
/// the gradient buckets, all held as if the all-reduces were still in flight.
/// The same step runs on the CPU (for its test), without peaks.
fn measured_step(
    cfg: &crate::config::Config,
    vs: &nn::VarStore,
    pvs: &nn::VarStore,
    flow: &Model,
    head: Option<&AlignHead>,
    device: tch::Device,
    world: usize,
) -> anyhow::Result<Measured> {
    use tch::{Kind, Tensor};
    let tc = &cfg.train;
    let m = &cfg.model;
    let mut counted = vec![];
    let mut left_out = vec![];
    let flow_params = vs.trainable_variables();
    let params: Vec<Tensor> = flow_params
        .iter()
        .map(Tensor::shallow_clone)
        .chain(pvs.trainable_variables())
        .collect();
    let mut resident: Vec<Tensor> = params
        .iter()
        .flat_map(|p| [p.f_zeros_like(), p.f_zeros_like()])
        .chain(flow_params.iter().map(Tensor::f_zeros_like))
        .collect::<Result<_, _>>()?;
    counted.push("AdamW moments and the fp32 EMA".into());

    let online = match (tc.features, head) {
        (crate::config::Features::Online, Some(_)) => match cfg.precompute.encoder_dir() {
            Some(dir) => match model::vision::VisionEncoder::from_folder(dir, device) {
                Ok(enc) => {
                    counted.push(format!("the online encoder {}", dir.display()));
                    Some(enc)
                }
                Err(e) => {
                    left_out.push(format!("the online encoder ({e})"));
                    None
                }
            },
            None => {
                left_out.push("the online encoder (precompute.encoder is not set)".into());
                None
            }
        },
        _ => None,
    };
    let b = tc.batch as i64;
    let side = cfg.data.image_size as i64;
    let tokens = cfg.align.target_tokens(m.num_tokens())?;
    // The batch in use, the one being assembled and uploaded, and `prefetch` queued: all on the device.
    let mut batches = vec![];
    for _ in 0..tc.prefetch.max(1) + 2 {
        let x = Tensor::f_randn(
            [b, m.in_channels, m.img_size, m.img_size],
            (Kind::Float, device),
        )?;
        let y = Tensor::f_randint(m.num_classes.max(1), [b], (Kind::Int64, device))?;
        let features = match (head, online.is_some(), tc.features) {
            (Some(_), false, crate::config::Features::Cache) => Some(Tensor::f_randn(
                [b, tokens, cfg.align.encoder_dim],
                (Kind::Float, device),
            )?),
            _ => None,
        };
        let images = match online {
            Some(_) => Some(Tensor::f_randint(
                256,
                [b, 3, side, side],
                (Kind::Uint8, device),
            )?),
            None => None,
        };
        batches.push((x, y, features, images));
    }
    counted.push(format!(
        "{} device batches of {b} (train.prefetch {} queued, one assembling, one in use)",
        batches.len(),
        tc.prefetch
    ));

    let fid = tc.fid_every > 0;
    if tc.latent && (tc.sample_every > 0 || fid) && !cfg.precompute.vae.is_empty() {
        match model::vae::AutoencoderKl::from_folder(Path::new(&cfg.precompute.vae), device) {
            Ok(vae) => {
                counted.push(format!("the sampling VAE {}", cfg.precompute.vae));
                resident.extend(vae.vs.variables().into_values());
            }
            Err(e) => left_out.push(format!("the sampling VAE ({e})")),
        }
    }
    if fid {
        let weights = if tc.fid_weights.is_empty() {
            crate::evaluate::fid::default_weights()
        } else {
            PathBuf::from(&tc.fid_weights)
        };
        match model::inception::Inception::from_file(&weights, device) {
            Ok(inception) => {
                counted.push(format!("Inception {}", weights.display()));
                resident.extend(inception.vs.variables().into_values());
            }
            Err(e) => left_out.push(format!("Inception ({e})")),
        }
    }

    super::step::sync(device);
    if let tch::Device::Cuda(index) = device {
        torch_ext::memory::reset_cuda_peak(index)?;
    }
    let (x, y, features, images) = &batches[0];
    let features = match (&online, images) {
        (Some(enc), Some(images)) => Some(
            tch::no_grad(|| enc.patch_tokens(images, cfg.precompute.encoder_input_size))?
                .f_to_kind(Kind::Float)?,
        ),
        _ => features.as_ref().map(Tensor::shallow_clone),
    };
    super::step::accumulate(
        flow,
        head,
        x,
        y,
        features.as_ref(),
        tc.micro_batch,
        cfg.align.lambda,
        None,
    )?;
    if world > 1 {
        // Every bucket's flat copy held, as if no all-reduce had finished yet, and one scaled copy.
        let grads: Vec<Tensor> = params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        let mut start = 0;
        while start < grads.len() {
            let (mut end, mut bytes) = (start, 0i64);
            while end < grads.len() && (end == start || bytes < super::replicas::BUCKET_BYTES) {
                bytes += grads[end].numel() as i64 * grads[end].kind().elt_size_in_bytes() as i64;
                end += 1;
            }
            let flat: Vec<Tensor> = grads[start..end]
                .iter()
                .map(|g| g.f_reshape([-1]))
                .collect::<Result<_, _>>()?;
            let flat = Tensor::f_cat(&flat, 0)?;
            let _scaled = flat.f_mul_scalar(1.0 / world as f64)?;
            resident.push(flat);
            start = end;
        }
        counted.push(format!("the gradient buckets of {world} ranks"));
    }
    super::step::sync(device);
    let after = match device {
        tch::Device::Cuda(index) => Some(torch_ext::memory::cuda_memory(index)?),
        _ => None,
    };
    drop(resident);
    Ok(Measured {
        peak: after.map(|a| a.peak),
        peak_reserved: after.map(|a| a.peak_reserved),
        counted,
        left_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The measured step on the CPU with a tiny latent model, R-REPA on cached features, micro-batches
    /// and two ranks' buckets: it runs the whole batch, keeps the prefetched batches and names what it
    /// cannot load (no sampling VAE, no Inception here) instead of failing.
    #[test]
    fn measured_step_runs_the_whole_batch_with_its_residents() {
        let text = r#"
[data]
image_size = 32
[precompute]
vae = "/nonexistent/vae"
[model]
img_size = 4
in_channels = 4
patch_size = 1
channels = 32
num_blocks = 2
layers_per_block = 2
num_classes = 5
head_dim = 16
[align]
mode = "reverse"
locations = [[2, 1]]
projector_hidden = 16
encoder_dim = 8
[train]
latent = true
batch = 6
micro_batch = 4
prefetch = 2
sample_every = 10
fid_every = 10
fid_ref = "/nonexistent/ref.npz"
fid_weights = "/nonexistent/inception.pth"
"#;
        let cfg = crate::config::load_str(text, "test", &[]).unwrap().config;
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let flow = Model::new(vs.root(), &cfg.model).unwrap();
        let pvs = nn::VarStore::new(tch::Device::Cpu);
        let head = AlignHead::new(pvs.root(), &cfg.align, &flow).unwrap();
        let m = measured_step(&cfg, &vs, &pvs, &flow, Some(&head), tch::Device::Cpu, 2).unwrap();
        assert_eq!(m.peak, None);
        let counted = m.counted.join("; ");
        assert!(counted.contains("4 device batches of 6"), "{counted}");
        assert!(counted.contains("gradient buckets of 2 ranks"), "{counted}");
        let left_out = m.left_out.join("; ");
        assert!(
            left_out.contains("sampling VAE") && left_out.contains("Inception"),
            "{left_out}"
        );
        assert!(vs.trainable_variables().iter().all(|p| p.grad().defined()));
    }
}
