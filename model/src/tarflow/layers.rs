//! The transformer inside a flow block: pre-LN causal attention layers (spec §1.4), optional 2-D axial
//! RoPE and SwiGLU (spec §1.6), and the per-layer KV cache used by sampling.

use std::sync::Arc;

use tch::{nn, Kind, Tensor};

use torch_ext::onednn::Activation;

use super::config::{Config, GateActivation, MlpKind};
use super::linear::{CastSlot, Linear, Precision};
use super::packed::Packs;

/// LayerNorm computed in fp32 whatever the input precision (reference: cast to float and back).
#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    dim: i64,
}

impl LayerNorm {
    pub fn new(p: nn::Path, dim: i64) -> Self {
        let ln = nn::layer_norm(p, vec![dim], Default::default());
        Self {
            weight: ln.ws.expect("affine"),
            bias: ln.bs.expect("affine"),
            dim,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        x.to_kind(Kind::Float)
            .layer_norm([self.dim], Some(&self.weight), Some(&self.bias), 1e-5, true)
            .to_kind(kind)
    }
}

/// Cos/sin tables of the 2-D axial rotary embedding, in raster token order (N, head_dim).
/// The first half of the rotation pairs turns with the token's row, the second half with its column;
/// pairs are adjacent channels (2k, 2k+1). STARFlow applies the raster-order table to the *permuted*
/// sequence, which mirrors the geometry in flip blocks consistently; so do we.
#[derive(Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(cfg: &Config, device: tch::Device) -> Self {
        let grid = cfg.grid();
        let half = cfg.head_dim / 2; // channels rotated by rows; the other half by columns
        let pairs = half / 2;
        let freqs: Vec<f64> = (0..pairs)
            .map(|k| 1.0 / cfg.rope_base.powf(2.0 * k as f64 / half as f64))
            .collect();
        let mut angles = Vec::with_capacity((cfg.num_tokens() * cfg.head_dim) as usize);
        for n in 0..cfg.num_tokens() {
            let (row, col) = ((n / grid) as f64, (n % grid) as f64);
            for pos in [row, col] {
                for f in &freqs {
                    // repeat-interleave: both channels of a pair share the angle
                    angles.push(pos * f);
                    angles.push(pos * f);
                }
            }
        }
        let angles = Tensor::from_slice(&angles)
            .view([cfg.num_tokens(), cfg.head_dim])
            .to_kind(Kind::Float)
            .to_device(device);
        Self {
            cos: angles.cos(),
            sin: angles.sin(),
        }
    }

    /// Rotates (B, H, T, d) whose tokens sit at sequence positions start..start+T, or (T = 1) at the
    /// position held by the device tensor `at`.
    fn apply(&self, t: &Tensor, start: i64, at: Option<&Tensor>) -> Tensor {
        let len = t.size()[2];
        let (cos, sin) = match at {
            Some(at) => (self.cos.index_select(0, at), self.sin.index_select(0, at)),
            None => (
                self.cos.narrow(0, start, len),
                self.sin.narrow(0, start, len),
            ),
        };
        let (cos, sin) = (cos.to_kind(t.kind()), sin.to_kind(t.kind()));
        let s = t.size();
        // (x0, x1) -> (-x1, x0) within each adjacent pair
        let pairs = t.view([s[0], s[1], s[2], s[3] / 2, 2]);
        let rotated =
            Tensor::stack(&[-pairs.select(-1, 1), pairs.select(-1, 0)], -1).view(s.as_slice());
        t * cos + rotated * sin
    }
}

/// Keys and values of the tokens seen so far, preallocated for the whole sequence.
#[derive(Debug)]
pub struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: i64,
}

/// What a decode step hands one layer: its KV cache (preallocated for `capacity` tokens) and the
/// block's packed weights, if any. The new keys and values are written after the cached ones and
/// attended to, but only the first `commit` of them stay cached: a Jacobi segment rewrites its own
/// tokens' on every pass. With `at` (a one-element int64 tensor on the device, and the (1, 1, 1,
/// capacity) mask of the positions up to it) the single new token's position is read on the device
/// instead: it is written at that index and attends to the whole buffer under the mask, so the step
/// has one shape at every position and can be captured as a graph.
pub struct Slot<'a> {
    pub kv: &'a mut Option<LayerCache>,
    pub capacity: i64,
    pub packs: Option<&'a Packs>,
    pub commit: i64,
    pub at: Option<(&'a Tensor, &'a Tensor)>,
}

/// One KV cache per attention layer of a block; a fresh one per block and per reverse pass.
#[derive(Debug, Default)]
pub struct Cache {
    pub layers: Vec<Option<LayerCache>>,
    /// Sequence length the buffers are allocated for.
    pub capacity: i64,
    /// The block's weights packed for this pass's decode steps, where that applies.
    pub packs: Option<Packs>,
}

impl Cache {
    pub fn new(num_layers: usize, capacity: i64, packs: Option<Packs>) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            capacity,
            packs,
        }
    }
}

#[derive(Debug)]
pub struct Attention {
    norm: LayerNorm,
    qkv: Linear,
    proj: Linear,
    heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(p: nn::Path, cfg: &Config) -> Self {
        Self {
            norm: LayerNorm::new(&p / "norm", cfg.channels),
            qkv: Linear::new(&p / "qkv", cfg.channels, 3 * cfg.channels),
            proj: Linear::new(&p / "proj", cfg.channels, cfg.channels),
            heads: cfg.num_heads(),
            head_dim: cfg.head_dim,
        }
    }

    /// x: (B, T, C) at positions start..start+T. With a cache the new keys are appended and every
    /// cached token is visible (no mask needed: nothing later than the query exists yet); without one
    /// the attention is causal. `q_scale` (B,1,1,1) multiplies the logits per sample: it carries the
    /// attention temperature of the unconditional half of a batched guidance pass.
    fn forward(
        &self,
        x: &Tensor,
        start: i64,
        rope: Option<&Rope>,
        cache: Option<Slot<'_>>,
        q_scale: Option<&Tensor>,
        prec: Precision,
    ) -> Tensor {
        let packs = cache.as_ref().and_then(|slot| slot.packs);
        let at = cache.as_ref().and_then(|slot| slot.at);
        let pos = at.map(|(pos, _)| pos);
        let (b, t, c) = x.size3().expect("(B, T, C)");
        // (B, T, 3C) -> 3 × (B, H, T, d): the layout is [q heads | k heads | v heads]
        let qkv = self
            .qkv
            .forward_packed(&self.norm.forward(x), prec, packs, Activation::None)
            .view([b, t, 3, self.heads, self.head_dim])
            .permute([2, 0, 3, 1, 4]);
        let (mut q, mut k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        if let Some(rope) = rope {
            q = rope.apply(&q, start, pos);
            k = rope.apply(&k, start, pos);
        }
        if let Some(scale) = q_scale {
            q = &q * scale.to_kind(q.kind());
        }
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = match cache {
            None => Tensor::scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, true, scale, false,
            ),
            Some(Slot {
                kv,
                capacity,
                commit,
                ..
            }) => {
                let entry = kv.get_or_insert_with(|| LayerCache {
                    k: k.new_zeros(
                        [b, self.heads, capacity, self.head_dim],
                        (k.kind(), k.device()),
                    ),
                    v: v.new_zeros(
                        [b, self.heads, capacity, self.head_dim],
                        (v.kind(), v.device()),
                    ),
                    len: 0,
                });
                if let Some((at, mask)) = at {
                    let _ = entry.k.index_copy_(2, at, &k);
                    let _ = entry.v.index_copy_(2, at, &v);
                    Tensor::scaled_dot_product_attention::<&Tensor>(
                        &q,
                        &entry.k,
                        &entry.v,
                        Some(mask),
                        0.0,
                        false,
                        scale,
                        false,
                    )
                } else {
                    assert_eq!(
                        entry.len, start,
                        "KV cache positions must be filled in order"
                    );
                    entry.k.narrow(2, start, t).copy_(&k);
                    entry.v.narrow(2, start, t).copy_(&v);
                    let visible = start + t;
                    entry.len = start + commit.clamp(0, t);
                    let (ks, vs) = (entry.k.narrow(2, 0, visible), entry.v.narrow(2, 0, visible));
                    // Several new tokens after a cached prefix (a Jacobi segment) see the whole prefix and
                    // the new tokens up to their own: sdpa's `is_causal` aligns the mask top-left, which is
                    // only right from an empty cache.
                    let mask = (t > 1 && start > 0).then(|| {
                        let queries =
                            Tensor::arange(t, (Kind::Int64, q.device())).view([t, 1]) + start;
                        Tensor::arange(visible, (Kind::Int64, q.device()))
                            .view([1, visible])
                            .le_tensor(&queries)
                    });
                    Tensor::scaled_dot_product_attention::<Tensor>(
                        &q,
                        &ks,
                        &vs,
                        mask,
                        0.0,
                        t > 1 && start == 0,
                        scale,
                        false,
                    )
                }
            }
        };
        // (B, H, T, d) -> (B, T, C)
        self.proj.forward_packed(
            &out.transpose(1, 2).reshape([b, t, c]),
            prec,
            packs,
            Activation::None,
        )
    }

    fn linears(&self) -> [&Linear; 2] {
        [&self.qkv, &self.proj]
    }
}

#[derive(Debug)]
enum MlpBody {
    Gelu {
        fc1: Linear,
        fc2: Linear,
    },
    Swiglu {
        gate: Linear,
        up: Linear,
        down: Linear,
        act: GateActivation,
    },
}

#[derive(Debug)]
pub struct Mlp {
    norm: LayerNorm,
    body: MlpBody,
}

impl Mlp {
    fn new(p: nn::Path, cfg: &Config) -> Self {
        let (c, h) = (cfg.channels, cfg.mlp_hidden());
        let body = match cfg.mlp {
            MlpKind::Gelu => MlpBody::Gelu {
                fc1: Linear::new(&p / "main" / "0", c, h),
                fc2: Linear::new(&p / "main" / "2", h, c),
            },
            MlpKind::Swiglu => MlpBody::Swiglu {
                gate: Linear::new(&p / "gate", c, h),
                up: Linear::new(&p / "up", c, h),
                down: Linear::new(&p / "down", h, c),
                act: cfg.swiglu_gate,
            },
        };
        Self {
            norm: LayerNorm::new(&p / "norm", c),
            body,
        }
    }

    fn forward(&self, x: &Tensor, prec: Precision, packs: Option<&Packs>) -> Tensor {
        let x = self.norm.forward(x);
        match &self.body {
            MlpBody::Gelu { fc1, fc2 } => fc2.forward_packed(
                &fc1.forward_packed(&x, prec, packs, Activation::Gelu),
                prec,
                packs,
                Activation::None,
            ),
            MlpBody::Swiglu {
                gate,
                up,
                down,
                act,
            } => {
                let g = match act {
                    GateActivation::Silu => gate
                        .forward_packed(&x, prec, packs, Activation::None)
                        .silu(),
                    GateActivation::GeluTanh => {
                        gate.forward_packed(&x, prec, packs, Activation::GeluTanh)
                    }
                };
                let up = up.forward_packed(&x, prec, packs, Activation::None);
                down.forward_packed(&(g * up), prec, packs, Activation::None)
            }
        }
    }

    fn linears(&self) -> Vec<&Linear> {
        match &self.body {
            MlpBody::Gelu { fc1, fc2 } => vec![fc1, fc2],
            MlpBody::Swiglu { gate, up, down, .. } => vec![gate, up, down],
        }
    }
}

/// Pre-LayerNorm residual layer: x + Attn(LN x), then x + MLP(LN x) (the norms live in the sub-modules,
/// as in the reference's parameter names).
#[derive(Debug)]
pub struct AttentionBlock {
    attention: Attention,
    mlp: Mlp,
}

impl AttentionBlock {
    pub fn new(p: nn::Path, cfg: &Config) -> Self {
        Self {
            attention: Attention::new(&p / "attention", cfg),
            mlp: Mlp::new(&p / "mlp", cfg),
        }
    }

    pub fn forward(
        &self,
        x: &Tensor,
        start: i64,
        rope: Option<&Rope>,
        cache: Option<Slot<'_>>,
        q_scale: Option<&Tensor>,
        prec: Precision,
    ) -> Tensor {
        let packs = cache.as_ref().and_then(|slot| slot.packs);
        let x = x + self
            .attention
            .forward(x, start, rope, cache, q_scale, prec)
            .to_kind(x.kind());
        &x + self.mlp.forward(&x, prec, packs).to_kind(x.kind())
    }

    /// Every linear layer, for packing.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.attention
            .linears()
            .into_iter()
            .chain(self.mlp.linears())
    }
}

/// Another handle to the same parameters: shallow clones share storage and `.grad`. A checkpointed
/// block is recomputed in backward, possibly on another thread, by a closure that must own its layers.
pub(crate) trait Share {
    fn share(&self) -> Self;
}

impl Share for Tensor {
    fn share(&self) -> Self {
        self.shallow_clone()
    }
}

impl<T: Share> Share for Option<T> {
    fn share(&self) -> Self {
        self.as_ref().map(Share::share)
    }
}

impl<T: Share> Share for Vec<T> {
    fn share(&self) -> Self {
        self.iter().map(Share::share).collect()
    }
}

impl Share for Linear {
    fn share(&self) -> Self {
        Self {
            weight: self.weight.share(),
            bias: self.bias.share(),
            cast: Arc::clone(&self.cast),
        }
    }
}

/// Linear layers' weights cast to a compute precision once, used by every call until the scope is
/// dropped. Without it each call casts afresh: every micro-batch, every alignment pass and every
/// sampling step made its own bf16 copy of the weights, and in training each copy was kept for
/// backward. Made under grad mode the copies carry the graph back to the fp32 weights (the cast's
/// backward keeps no tensors, so several backward passes may go through it). The weights must not
/// change while a scope holds them (the optimizer steps after the scope is dropped).
#[must_use = "the casts are dropped with the scope"]
pub struct CastScope {
    slots: Vec<CastSlot>,
}

impl CastScope {
    /// Casts the given layers' weights to `prec` (nothing for fp32).
    pub fn new<'a>(linears: impl IntoIterator<Item = &'a Linear>, prec: Precision) -> Self {
        let kind = prec.kind();
        let mut slots = vec![];
        for l in linears {
            if l.weight.kind() == kind {
                continue;
            }
            let cast = (kind, l.weight.to_kind(kind), l.bias.to_kind(kind));
            *l.cast.lock().unwrap_or_else(|e| e.into_inner()) = Some(cast);
            slots.push(Arc::clone(&l.cast));
        }
        CastScope { slots }
    }

    /// Layers whose weights the scope holds in another precision.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

impl Drop for CastScope {
    fn drop(&mut self) {
        for slot in &self.slots {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}

impl Share for LayerNorm {
    fn share(&self) -> Self {
        Self {
            weight: self.weight.share(),
            bias: self.bias.share(),
            dim: self.dim,
        }
    }
}

impl Share for Rope {
    fn share(&self) -> Self {
        Self {
            cos: self.cos.share(),
            sin: self.sin.share(),
        }
    }
}

impl Share for Attention {
    fn share(&self) -> Self {
        Self {
            norm: self.norm.share(),
            qkv: self.qkv.share(),
            proj: self.proj.share(),
            heads: self.heads,
            head_dim: self.head_dim,
        }
    }
}

impl Share for Mlp {
    fn share(&self) -> Self {
        let body = match &self.body {
            MlpBody::Gelu { fc1, fc2 } => MlpBody::Gelu {
                fc1: fc1.share(),
                fc2: fc2.share(),
            },
            MlpBody::Swiglu {
                gate,
                up,
                down,
                act,
            } => MlpBody::Swiglu {
                gate: gate.share(),
                up: up.share(),
                down: down.share(),
                act: *act,
            },
        };
        Self {
            norm: self.norm.share(),
            body,
        }
    }
}

impl Share for AttentionBlock {
    fn share(&self) -> Self {
        Self {
            attention: self.attention.share(),
            mlp: self.mlp.share(),
        }
    }
}
