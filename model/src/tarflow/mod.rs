//! TARFlow: a stack of transformer autoregressive affine flow blocks on patch tokens.
//!
//! Paper: Zhai et al., "Normalizing Flows are Capable Generative Models" (arXiv 2412.06329); reference
//! code apple/ml-tarflow `transformer_flow.py` at 313120e; latent options from apple/ml-starflow
//! (spec §1.6); alignment and classification from FlowBack (arXiv 2511.22345). The spec this follows is
//! `shared/docs/flowback-spec.md` §1–§5. Parameter names are the reference `state_dict`'s, so converted
//! public checkpoints load strictly.

// `a += b` on a tch Tensor is the in-place `add_`, which would overwrite values autograd still needs;
// the out-of-place `a = a + b` is deliberate throughout the flow.
#![allow(clippy::assign_op_pattern)]

pub mod align;
mod block;
pub mod classify;
mod config;
mod decode;
mod error;
pub mod graphed;
mod guidance;
mod jacobi;
mod layers;
mod linear;
mod packed;
pub mod sample;

use std::collections::HashMap;
use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

pub use block::{BlockPass, Cond, MetaBlock, Permutation};
pub use config::{Config, GateActivation, MlpKind, PRESETS};
pub use error::FlowError;
pub use graphed::StepMode;
pub use layers::{Cache, CastScope};
pub use linear::Precision;

use crate::weights;

/// Everything a forward pass yields.
#[derive(Debug)]
pub struct ForwardOutput {
    /// Noise in token space (B, N, D).
    pub z: Tensor,
    /// Σ over blocks of the per-dimension log-det, per sample (B,).
    pub logdet: Tensor,
    /// Each block's output in raster token order; the last is z.
    pub outputs: Vec<Tensor>,
    /// Each block's input x̂_{t−1} (raster order), kept for the alignment passes.
    pub inputs: Vec<Tensor>,
    /// Each block's pass: shifted (a, b) in permuted order and captured hidden states.
    pub passes: Vec<BlockPass>,
    /// Captured hidden states keyed by 0-based (block, layer), un-flipped to raster order.
    pub hidden: HashMap<(usize, usize), Tensor>,
}

pub struct Model {
    pub cfg: Config,
    pub blocks: Vec<MetaBlock>,
    /// Prior variance (N, D); ones for the affine model (sampling multiplies by its square root).
    pub var: Tensor,
    pub precision: Precision,
    /// Recompute each block's activations in backward instead of keeping them (`train.checkpoint_blocks`).
    /// Blocks whose hidden states a pass captures run normally.
    pub checkpoint_blocks: bool,
    /// Pack each block's weights once per reverse pass for the CPU decode steps (oneDNN); off runs the
    /// plain products (an A/B switch for tests and `bench flow --no-pack`).
    pub pack_weights: bool,
    /// How sequential decode steps run: the growing KV cache (default), or the fixed-shape step that a
    /// CUDA graph captures (`graphed`).
    pub decode_steps: StepMode,
}

impl Model {
    pub fn new(p: nn::Path, cfg: &Config) -> Result<Self, FlowError> {
        cfg.validate()?;
        let blocks = (0..cfg.num_blocks)
            .map(|i| {
                let perm = if i % 2 == 0 {
                    Permutation::Identity
                } else {
                    Permutation::Flip
                };
                MetaBlock::new(&p / "blocks" / i, cfg, perm)
            })
            .collect();
        let var = p.ones_no_train("var", &[cfg.num_tokens(), cfg.token_dim()]);
        Ok(Self {
            cfg: cfg.clone(),
            blocks,
            var,
            precision: Precision::Fp32,
            checkpoint_blocks: false,
            pack_weights: true,
            decode_steps: StepMode::Cached,
        })
    }

    /// Every linear layer's weights in the model's compute precision, cast once and used until the
    /// scope is dropped ([`CastScope`]); an empty scope in fp32.
    pub fn cast_weights(&self) -> CastScope {
        self.cast_weights_in(self.precision)
    }

    /// [`Model::cast_weights`] for precision `prec` instead of the model's.
    pub fn cast_weights_in(&self, prec: Precision) -> CastScope {
        CastScope::new(self.blocks.iter().flat_map(MetaBlock::linears), prec)
    }

    pub fn device(&self) -> Device {
        self.var.device()
    }

    /// (B, C, H, W) → (B, N, D): raster patches, channel-major inside a token (torch unfold layout).
    pub fn patchify(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("(B, C, H, W)");
        let p = self.cfg.patch_size;
        x.view([b, c, h / p, p, w / p, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, (h / p) * (w / p), c * p * p])
    }

    /// Inverse of [`Model::patchify`] (fold).
    pub fn unpatchify(&self, x: &Tensor) -> Tensor {
        let b = x.size()[0];
        let (p, g, c) = (self.cfg.patch_size, self.cfg.grid(), self.cfg.in_channels);
        x.reshape([b, g, g, c, p, p])
            .permute([0, 3, 1, 4, 2, 5])
            .reshape([b, c, g * p, g * p])
    }

    pub fn check_input(&self, x: &Tensor) -> Result<(), FlowError> {
        let want = [self.cfg.in_channels, self.cfg.img_size, self.cfg.img_size];
        let size = x.size();
        if size.len() != 4 || size[1..] != want {
            return Err(FlowError::Input(format!(
                "input has shape {size:?}, the flow expects (B, {}, {}, {})",
                want[0], want[1], want[2]
            )));
        }
        Ok(())
    }

    /// Forward (data → noise) on images (B, C, H, W). `capture` lists 0-based (block, layer) hidden
    /// states to return, un-flipped to raster order.
    pub fn forward(&self, x: &Tensor, cond: &Cond, capture: &[(usize, usize)]) -> ForwardOutput {
        let mut h = self.patchify(&x.to_kind(Kind::Float));
        let batch = h.size()[0];
        let mut logdet = Tensor::zeros([batch], (Kind::Float, h.device()));
        let (mut outputs, mut inputs, mut passes) = (vec![], vec![], vec![]);
        let mut hidden = HashMap::new();
        for (i, block) in self.blocks.iter().enumerate() {
            let keep: Vec<usize> = capture
                .iter()
                .filter(|(b, _)| *b == i)
                .map(|(_, l)| *l)
                .collect();
            let class = block.class_embedding(cond, batch);
            inputs.push(h.shallow_clone());
            let (z, ld, pass) = if self.checkpoint_blocks && keep.is_empty() {
                block.forward_checkpointed(&h, class.as_ref(), self.precision)
            } else {
                block.forward(&h, class.as_ref(), &keep, self.precision)
            };
            let mut kept: Vec<usize> = keep.clone();
            kept.sort_unstable();
            kept.dedup();
            for (l, state) in kept.iter().zip(&pass.hidden) {
                hidden.insert((i, *l), block.permutation.apply(state));
            }
            logdet = logdet + ld;
            outputs.push(z.shallow_clone());
            passes.push(pass);
            h = z;
        }
        ForwardOutput {
            z: h,
            logdet,
            outputs,
            inputs,
            passes,
            hidden,
        }
    }

    /// The project's own checkpoint: the model's tensors plus the reference's `attn_mask` buffers.
    pub fn named_tensors(&self, vs: &nn::VarStore) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        let n = self.cfg.num_tokens();
        for i in 0..self.blocks.len() {
            named.push((
                format!("blocks.{i}.attn_mask"),
                Tensor::ones([n, n], (Kind::Bool, Device::Cpu)).tril(0),
            ));
        }
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }
}

/// Loss and diagnostics of one batch (spec §2.1).
pub struct Nll {
    /// 0.5·mean(z²) − mean(Σ logdet): nats per dimension without 0.5·ln 2π. Scalar.
    pub loss: Tensor,
    /// 0.5·mean(z²), scalar.
    pub prior: Tensor,
    /// mean over batch of Σ logdet, scalar.
    pub logdet: Tensor,
}

/// The training objective the alignment weight is balanced against; per-dimension, never summed.
pub fn nll(out: &ForwardOutput) -> Nll {
    let prior = 0.5 * out.z.to_kind(Kind::Float).square().mean(Kind::Float);
    let logdet = out.logdet.mean(Kind::Float);
    Nll {
        loss: &prior - &logdet,
        prior,
        logdet,
    }
}

/// Per-sample NLL in nats per dimension, including 0.5·ln 2π (B,).
pub fn nll_per_sample(out: &ForwardOutput) -> Tensor {
    let half_log_2pi = 0.5 * (2.0 * std::f64::consts::PI).ln();
    0.5 * out
        .z
        .to_kind(Kind::Float)
        .square()
        .mean_dim(&[1i64, 2][..], false, Kind::Float)
        + half_log_2pi
        - &out.logdet
}

/// Uniform dequantisation of [-1, 1] images for bits/dim (spec §2.2): x_int = (x+1)·127.5, then
/// ((x_int + U[0,1)) / 256)·2 − 1. `u` is the uniform draw, same shape as x.
pub fn dequantize(x: &Tensor, u: &Tensor) -> Tensor {
    let x_int = ((x + 1.0) * 127.5).round();
    (x_int + u) / 256.0 * 2.0 - 1.0
}

/// Bits per dimension from a forward pass over dequantised data, per sample (B,): the NLL per dim plus
/// ln 128 (the Jacobian of [0, 256) → [−1, 1)), divided by ln 2.
pub fn bits_per_dim(out: &ForwardOutput) -> Tensor {
    (nll_per_sample(out) + 128f64.ln()) / 2f64.ln()
}

/// Reads the config of a converted reference checkpoint from its tensor shapes, given what shapes
/// cannot tell: image size, patch size and input channels. RoPE leaves no tensor, so it is assumed
/// exactly when `pos_embed` is absent (STARFlow's convention).
pub fn infer_config(
    tensors: &HashMap<String, Tensor>,
    img_size: i64,
    patch_size: i64,
    in_channels: i64,
) -> Result<Config, String> {
    let get = |name: &str| {
        tensors
            .get(name)
            .map(|t| t.size())
            .ok_or_else(|| format!("tensor `{name}` is missing"))
    };
    let proj_in = get("blocks.0.proj_in.weight")?;
    let channels = proj_in[0];
    let num_blocks = (0..)
        .take_while(|i| tensors.contains_key(&format!("blocks.{i}.proj_in.weight")))
        .count() as i64;
    let layers_per_block = (0..)
        .take_while(|j| {
            tensors.contains_key(&format!("blocks.0.attn_blocks.{j}.attention.qkv.weight"))
        })
        .count() as i64;
    let num_classes = tensors
        .get("blocks.0.class_embed")
        .map(|t| t.size()[0])
        .unwrap_or(0);
    let pos_embed = tensors.contains_key("blocks.0.pos_embed");
    let (mlp, hidden) = if let Some(t) = tensors.get("blocks.0.attn_blocks.0.mlp.main.0.weight") {
        (MlpKind::Gelu, t.size()[0])
    } else {
        (
            MlpKind::Swiglu,
            get("blocks.0.attn_blocks.0.mlp.gate.weight")?[0],
        )
    };
    let base = Config::default();
    let cfg = Config {
        img_size,
        in_channels,
        patch_size,
        channels,
        num_blocks,
        layers_per_block,
        num_classes,
        pos_embed,
        rope: !pos_embed,
        mlp,
        mlp_ratio: hidden as f64 / channels as f64,
        // TARFlow fixes the head width at 64; it leaves no trace in the shapes.
        head_dim: 64,
        ..base
    };
    if proj_in[1] != cfg.token_dim() {
        return Err(format!(
            "proj_in takes {} features per token but image size {img_size}, patch {patch_size} and {in_channels} channels give {}",
            proj_in[1],
            cfg.token_dim()
        ));
    }
    Ok(cfg)
}

/// A flow with its own variable store.
pub struct Loaded {
    pub vs: nn::VarStore,
    pub model: Model,
}

/// Builds the model for `cfg` and loads `path` strictly; `attn_mask` buffers are checked for shape
/// only, since this model recomputes its masks.
pub fn load(path: &Path, cfg: &Config, device: Device) -> Result<Loaded, FlowError> {
    let tensors = weights::read_safetensors(path)?;
    from_tensors(&tensors, path, cfg, device)
}

pub fn from_tensors(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    cfg: &Config,
    device: Device,
) -> Result<Loaded, FlowError> {
    let mut vs = nn::VarStore::new(device);
    let model = Model::new(vs.root(), cfg)?;
    let n = cfg.num_tokens();
    for (name, t) in tensors {
        if name.ends_with(".attn_mask") && t.size() != [n, n] {
            return Err(FlowError::Checkpoint {
                path: path.display().to_string(),
                message: format!("`{name}` has shape {:?}, expected [{n}, {n}]", t.size()),
            });
        }
    }
    weights::load_into(&mut vs, tensors, path, &|name| {
        name.starts_with("blocks.") && name.ends_with(".attn_mask")
    })?;
    Ok(Loaded { vs, model })
}

#[cfg(test)]
mod tests;
