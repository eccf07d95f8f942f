//! One autoregressive affine flow block (reference `MetaBlock`, spec §1.3).

use tch::{nn, Kind, Tensor};
use torch_ext::onednn::Activation;

use super::config::Config;
use super::layers::{AttentionBlock, Cache, Rope, Share, Slot};
use super::linear::{Linear, Precision};
use super::packed::Packs;

/// Token order a block works in. Block i uses identity when i is even and flip when i is odd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permutation {
    Identity,
    Flip,
}

impl Permutation {
    /// Applies the permutation along dim 1 (it is its own inverse).
    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Permutation::Identity => x.shallow_clone(),
            Permutation::Flip => x.flip([1]),
        }
    }
}

/// What the class embedding of a pass is.
#[derive(Debug)]
pub enum Cond<'a> {
    /// The mean of the class embeddings for every sample (the reference's `y = None`).
    Null,
    /// Labels (B,) int64; −1 marks a dropped label, which gets the mean embedding.
    Labels(&'a Tensor),
    /// Class probabilities (B, K): the embedding is pᵀE (training-free classification, spec §5).
    Mix(&'a Tensor),
}

/// Everything a teacher-forced pass of one block yields, in the block's permuted order.
#[derive(Debug)]
pub struct BlockPass {
    /// Log-scale a (B, N, D), already shifted by one token (token 0 is 0).
    pub a: Tensor,
    /// Shift b (B, N, D), shifted likewise.
    pub b: Tensor,
    /// Hidden states after the requested layers (0-based), permuted order.
    pub hidden: Vec<Tensor>,
}

#[derive(Debug)]
pub struct MetaBlock {
    pub permutation: Permutation,
    proj_in: Linear,
    pos_embed: Option<Tensor>,
    pub(crate) class_embed: Option<Tensor>,
    layers: Vec<AttentionBlock>,
    proj_out: Linear,
    rope: Option<Rope>,
    token_dim: i64,
}

impl Share for MetaBlock {
    fn share(&self) -> Self {
        Self {
            permutation: self.permutation,
            proj_in: self.proj_in.share(),
            pos_embed: self.pos_embed.share(),
            class_embed: self.class_embed.share(),
            layers: self.layers.share(),
            proj_out: self.proj_out.share(),
            rope: self.rope.share(),
            token_dim: self.token_dim,
        }
    }
}

/// The inverse affine step of the tokens whose parameters `params` (…, 2D) [a | b] are, from their
/// noise `z`: x = z·exp(a) + b, computed in fp32 and returned in z's precision. Every solver ends a
/// step with it.
pub(super) fn invert_tokens(params: &Tensor, z: &Tensor) -> Tensor {
    let d = params.size()[params.dim() - 1] / 2;
    let (a, b) = (params.narrow(-1, 0, d), params.narrow(-1, d, d));
    if z.kind() == Kind::Float {
        b.addcmul(z, &a.exp())
    } else {
        b.addcmul(&z.to_kind(Kind::Float), &a.exp())
            .to_kind(z.kind())
    }
}

impl MetaBlock {
    pub fn new(p: nn::Path, cfg: &Config, permutation: Permutation) -> Self {
        let (n, d, c) = (cfg.num_tokens(), cfg.token_dim(), cfg.channels);
        let proj_in = Linear::new(&p / "proj_in", d, c);
        let pos_embed = cfg
            .pos_embed
            .then(|| p.randn("pos_embed", &[n, c], 0.0, 0.01));
        let class_embed = (cfg.num_classes > 0)
            .then(|| p.randn("class_embed", &[cfg.num_classes, 1, c], 0.0, 0.01));
        let layers = (0..cfg.layers_per_block)
            .map(|j| AttentionBlock::new(&p / "attn_blocks" / j, cfg))
            .collect();
        let proj_out = Linear::new(&p / "proj_out", c, 2 * d);
        // Only the weight starts at zero; the bias keeps PyTorch's default init (spec §1.3, §8.4).
        tch::no_grad(|| {
            let _ = proj_out.weight.shallow_clone().zero_();
        });
        let rope = cfg.rope.then(|| Rope::new(cfg, p.device()));
        Self {
            permutation,
            proj_in,
            pos_embed,
            class_embed,
            layers,
            proj_out,
            rope,
            token_dim: d,
        }
    }

    /// The class table as (K, C), if the model is conditional.
    pub fn class_table(&self) -> Option<Tensor> {
        self.class_embed.as_ref().map(|e| e.squeeze_dim(1))
    }

    /// Class embedding to add to every token, (B, 1, C), or None for an unconditional model.
    pub fn class_embedding(&self, cond: &Cond, batch: i64) -> Option<Tensor> {
        let table = self.class_table()?;
        let mean = table.mean_dim(0, true, Kind::Float); // (1, C)
        let emb = match cond {
            Cond::Null => mean.expand([batch, -1], false),
            Cond::Labels(y) => {
                let dropped = y.lt(0).unsqueeze(1);
                let picked = table.index_select(0, &y.clamp_min(0));
                picked.where_self(&dropped.logical_not(), &mean)
            }
            Cond::Mix(p) => p.to_kind(table.kind()).matmul(&table),
        };
        Some(emb.unsqueeze(1))
    }

    /// Input embedding (B, T, C) of tokens at permuted positions start..start+T, or (T = 1) at the
    /// position the device tensor `at` holds.
    fn embed(
        &self,
        x_perm: &Tensor,
        (start, at): (i64, Option<&Tensor>),
        class: Option<&Tensor>,
        prec: Precision,
        packs: Option<&Packs>,
    ) -> Tensor {
        let t = x_perm.size()[1];
        let mut h = self
            .proj_in
            .forward_packed(x_perm, prec, packs, Activation::None)
            .to_kind(Kind::Float);
        if let Some(pos) = &self.pos_embed {
            let table = self.permutation.apply(&pos.unsqueeze(0));
            h = h + match at {
                Some(at) => table.index_select(1, at),
                None => table.narrow(1, start, t),
            };
        }
        if let Some(class) = class {
            h = h + class;
        }
        h
    }

    /// Splits proj_out's (…, 2D) into (a, b) in fp32.
    fn split(&self, o: &Tensor) -> (Tensor, Tensor) {
        let o = o.to_kind(Kind::Float);
        (
            o.narrow(-1, 0, self.token_dim),
            o.narrow(-1, self.token_dim, self.token_dim),
        )
    }

    /// Teacher-forced pass over a whole permuted sequence with the causal mask. `keep` lists the
    /// 0-based layers whose output is returned; `upto` stops after that many layers (no a/b then).
    pub fn pass(
        &self,
        x_perm: &Tensor,
        class: Option<&Tensor>,
        keep: &[usize],
        upto: Option<usize>,
        prec: Precision,
    ) -> BlockPass {
        let mut h = self.embed(x_perm, (0, None), class, prec, None);
        let mut hidden = Vec::with_capacity(keep.len());
        let run = upto.unwrap_or(self.layers.len()).min(self.layers.len());
        for (j, layer) in self.layers.iter().take(run).enumerate() {
            h = layer.forward(&h, 0, self.rope.as_ref(), None, None, prec);
            if keep.contains(&j) {
                hidden.push(h.shallow_clone());
            }
        }
        if upto.is_some_and(|u| u < self.layers.len()) {
            let empty = Tensor::zeros([0], (Kind::Float, x_perm.device()));
            return BlockPass {
                a: empty.shallow_clone(),
                b: empty,
                hidden,
            };
        }
        let o = self.proj_out.forward(&h, prec);
        // The one-token shift: token n's parameters come from the hidden state at n−1; token 0 gets
        // a = b = 0 exactly.
        let o = Tensor::cat(
            &[
                o.narrow(1, 0, 1).zeros_like(),
                o.narrow(1, 0, o.size()[1] - 1),
            ],
            1,
        );
        let (a, b) = self.split(&o);
        BlockPass { a, b, hidden }
    }

    /// Forward (data → noise): returns z in raster order, the per-sample log-det −mean(a), and the pass.
    pub fn forward(
        &self,
        x: &Tensor,
        class: Option<&Tensor>,
        keep: &[usize],
        prec: Precision,
    ) -> (Tensor, Tensor, BlockPass) {
        let x_perm = self.permutation.apply(x);
        let pass = self.pass(&x_perm, class, keep, None, prec);
        // exp in fp32, cast back to the data's precision.
        let z = (x_perm.to_kind(Kind::Float) - &pass.b) * (-&pass.a).exp();
        let logdet = -pass.a.mean_dim(&[1i64, 2][..], false, Kind::Float);
        (self.permutation.apply(&z.to_kind(x.kind())), logdet, pass)
    }

    /// [`MetaBlock::forward`] without a captured layer, its activations recomputed in backward instead
    /// of kept (activation checkpointing): only the block's input and class embedding stay in memory.
    /// Same values and gradients as `forward`, one more forward of the block in backward.
    pub fn forward_checkpointed(
        &self,
        x: &Tensor,
        class: Option<&Tensor>,
        prec: Precision,
    ) -> (Tensor, Tensor, BlockPass) {
        let block = self.share();
        let mut inputs = vec![x.shallow_clone()];
        inputs.extend(class.map(Tensor::shallow_clone));
        let outs = torch_ext::checkpoint::checkpoint(&inputs, move |i| {
            let (z, logdet, pass) = block.forward(&i[0], i.get(1), &[], prec);
            vec![z, logdet, pass.a, pass.b]
        })
        .unwrap_or_else(|e| panic!("checkpointed flow block: {e}"));
        let [z, logdet, a, b]: [Tensor; 4] = outs.try_into().unwrap_or_else(|o: Vec<Tensor>| {
            panic!("checkpointed flow block gave {} outputs", o.len())
        });
        (
            z,
            logdet,
            BlockPass {
                a,
                b,
                hidden: vec![],
            },
        )
    }

    /// The parameters for permuted token `pos + 1` from token `pos` (B, 1, D), appending to `cache`:
    /// (B, 1, 2D) float, a then b along the last axis, so a sampler can combine guided branches with
    /// one op for both.
    pub fn step_output(
        &self,
        token: &Tensor,
        pos: i64,
        class: Option<&Tensor>,
        cache: &mut Cache,
        q_scale: Option<&Tensor>,
        prec: Precision,
    ) -> Tensor {
        self.step_output_at(token, (pos, None), class, cache, q_scale, prec)
    }

    /// [`MetaBlock::step_output`] with the position given as `(pos, None)`, or on the device as
    /// `(_, Some(at))` (a one-element int64 tensor): then every step has the same shapes and reads no
    /// host value, which is what a CUDA graph replays.
    pub fn step_output_at(
        &self,
        token: &Tensor,
        (pos, at): (i64, Option<&Tensor>),
        class: Option<&Tensor>,
        cache: &mut Cache,
        q_scale: Option<&Tensor>,
        prec: Precision,
    ) -> Tensor {
        let packs = cache.packs.as_ref();
        let mut h = self.embed(token, (pos, at), class, prec, packs);
        let capacity = cache.capacity;
        // Which cached positions the token attends to: one mask for every layer of the step.
        let mask = at.map(|at| {
            Tensor::arange(capacity, (Kind::Int64, at.device()))
                .le_tensor(at)
                .view([1, 1, 1, capacity])
        });
        let at = at.zip(mask.as_ref());
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let slot = Slot {
                kv,
                capacity,
                packs,
                commit: 1,
                at,
            };
            h = layer.forward(&h, pos, self.rope.as_ref(), Some(slot), q_scale, prec);
        }
        self.proj_out
            .forward_packed(&h, prec, packs, Activation::None)
            .to_kind(Kind::Float)
    }

    /// The parameters for permuted tokens `pos + 1 ..= pos + T` from tokens `pos .. pos + T` (B, T, D)
    /// in one pass over the cached prefix `0..pos`: (B, T, 2D) float, as [`MetaBlock::step_output`]
    /// gives them one at a time. Only the first `commit` tokens' keys and values stay in `cache`: a
    /// Jacobi segment commits its final prefix once and then iterates on its own tokens, so a pass
    /// costs the segment, not the sequence before it.
    #[allow(clippy::too_many_arguments)]
    pub fn segment_output(
        &self,
        tokens: &Tensor,
        pos: i64,
        class: Option<&Tensor>,
        cache: &mut Cache,
        q_scale: Option<&Tensor>,
        prec: Precision,
        commit: i64,
    ) -> Tensor {
        let mut h = self.embed(tokens, (pos, None), class, prec, None);
        let capacity = cache.capacity;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let slot = Slot {
                kv,
                capacity,
                packs: None,
                commit,
                at: None,
            };
            h = layer.forward(&h, pos, self.rope.as_ref(), Some(slot), q_scale, prec);
        }
        self.proj_out.forward(&h, prec).to_kind(Kind::Float)
    }

    /// The parameters of every token of a permuted prefix (B, T, D) from one parallel causal pass:
    /// (B, T, 2D) float, a then b as [`MetaBlock::step_output`] gives them, shifted one token as
    /// [`MetaBlock::pass`] shifts them (token 0 gets zeros). What a Jacobi solver iterates: the same
    /// numbers the sequential decode computes token by token, with `q_scale` for a guided branch.
    pub fn parallel_output(
        &self,
        x_perm: &Tensor,
        class: Option<&Tensor>,
        q_scale: Option<&Tensor>,
        prec: Precision,
    ) -> Tensor {
        let mut h = self.embed(x_perm, (0, None), class, prec, None);
        for layer in &self.layers {
            h = layer.forward(&h, 0, self.rope.as_ref(), None, q_scale, prec);
        }
        let o = self.proj_out.forward(&h, prec).to_kind(Kind::Float);
        let t = o.size()[1];
        Tensor::cat(&[o.narrow(1, 0, 1).zeros_like(), o.narrow(1, 0, t - 1)], 1)
    }

    /// Every linear layer of the block.
    pub(crate) fn linears(&self) -> impl Iterator<Item = &Linear> {
        std::iter::once(&self.proj_in)
            .chain(self.layers.iter().flat_map(AttentionBlock::linears))
            .chain(std::iter::once(&self.proj_out))
    }

    /// A KV cache for a reverse pass over `capacity` tokens, with the block's weights packed for decode
    /// steps of `rows` rows when `pack` is set and packing applies (see [`Packs::new`]).
    pub fn new_cache(&self, capacity: i64, rows: i64, prec: Precision, pack: bool) -> Cache {
        let packs = pack
            .then(|| Packs::new(self.linears(), rows, prec))
            .flatten();
        Cache::new(self.layers.len(), capacity, packs)
    }
}
