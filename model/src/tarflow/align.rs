//! Representation alignment of flow hidden states with a frozen encoder (REPA loss, FlowBack's
//! F-/D-/R-REPA gradient modes; spec §4).

use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use super::block::Cond;
use super::linear::Linear;
use super::{FlowError, ForwardOutput, Model};

/// Which graph the aligned hidden states hang on (spec §4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlignMode {
    /// No alignment: the trainer builds no projector and the loss is the NLL alone.
    None,
    /// F-REPA: the NLL forward pass's own hidden states; the gradient reaches every earlier block.
    Forward,
    /// D-REPA: an extra pass of block t on its detached input; the gradient stays in block t.
    Detach,
    /// R-REPA, reading R3 (straight-through pseudo-reverse from detached z): block t runs on
    /// u = sg(b) + sg(exp a) ⊙ z^t, whose value is the block's input but whose graph goes through the
    /// chain z^t of the later blocks; so the loss at block t reaches block t and every later block.
    Reverse,
    /// Reading R2, the exact one-step unrolled reverse: z^{t−1} = μ_t(x̂) + σ_t(x̂) ⊙ z^t from a
    /// teacher-forced pass on the detached input, features from a second pass of block t on z^{t−1};
    /// reaches all of block t (through μ_t, σ_t) and every later block. About twice D-REPA's cost.
    ReverseUnrolled,
    /// Algorithm 2 taken literally (reading R1): features from the teacher-forced pass on the detached
    /// input, chain computed alongside but unused by the loss; gradient-identical to `detach`.
    ReverseLiteral,
}

/// Which flow token an encoder patch is paired with (spec §4.2, [UNKNOWN]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pairing {
    /// h[n] with v[n] (the spec's [INFER] default).
    Same,
    /// The hidden state that predicts token n, h[n−1] in the block's own order, with v[n]; the block's
    /// first token has no predictor and is left out.
    Shifted,
}

/// Projector initialisation: FlowBack's is [UNKNOWN] (spec §4.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectorInit {
    /// PyTorch's Linear default (kaiming-uniform a = √5, uniform bias).
    Default,
    /// REPA's: xavier-uniform weights, zero biases.
    Xavier,
}

/// How the flow's tokens meet the encoder's when the grids differ (spec §4.2): a patch-1 latent flow
/// at 256 px has 32×32 tokens, DINOv2-B/14 at 224 px 16×16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenMatch {
    /// The grids must be equal.
    None,
    /// The flow's hidden states are average-pooled k×k to the encoder's grid before the projector
    /// (k = flow grid / encoder grid, a whole number); the cache is the same as for an equal grid.
    Pool,
    /// The encoder runs on a larger input so that its grid is the flow's (DINOv2/14 at 448 px: 32×32
    /// tokens, its position table interpolated): `precompute.encoder_input_size` sets the input, and
    /// the cache (whose fingerprint records that size) holds as many tokens as the flow has.
    EncoderResize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlignConfig {
    /// λ_align in L = L_NF + λ·mean over locations of L_align.
    pub lambda: f64,
    /// Aligned (block, layer) pairs, both 1-based in forward (data → noise) order.
    pub locations: Vec<[usize; 2]>,
    pub mode: AlignMode,
    /// Hidden width of the 3-layer SiLU projector.
    pub projector_hidden: i64,
    /// One projector for all locations (the paper writes a single Proj_φ) or one per location.
    pub shared_projector: bool,
    /// Width of the encoder's tokens (768 for DINOv2-B).
    pub encoder_dim: i64,
    pub pairing: Pairing,
    pub projector_init: ProjectorInit,
    /// Tokens the encoder gives per image (256 for DINOv2-B/14 at 224 px); 0 = as many as the flow.
    pub encoder_tokens: i64,
    pub token_match: TokenMatch,
}

impl Default for AlignConfig {
    fn default() -> Self {
        Self {
            lambda: 0.1,
            locations: vec![[7, 6], [8, 6]],
            mode: AlignMode::Reverse,
            projector_hidden: 1024,
            shared_projector: true,
            encoder_dim: 768,
            pairing: Pairing::Same,
            projector_init: ProjectorInit::Default,
            encoder_tokens: 0,
            token_match: TokenMatch::None,
        }
    }
}

impl AlignConfig {
    /// The encoder's token count for a flow of `flow_tokens` tokens, after checking that the two
    /// grids meet: equal, or (with `token_match = "pool"`) square with the flow's a whole multiple.
    pub fn target_tokens(&self, flow_tokens: i64) -> Result<i64, FlowError> {
        let m = if self.encoder_tokens == 0 {
            flow_tokens
        } else {
            self.encoder_tokens
        };
        if m == flow_tokens {
            return Ok(m);
        }
        let side = |n: i64| (1..=n).find(|s| s * s >= n).filter(|s| s * s == n);
        match (self.token_match, side(flow_tokens), side(m)) {
            (TokenMatch::None, ..) => Err(FlowError::Config(format!(
                "the flow has {flow_tokens} tokens and the encoder {m}: set align.token_match = \"pool\" \
                 or \"encoder_resize\""
            ))),
            (TokenMatch::EncoderResize, Some(f), _) => Err(FlowError::Config(format!(
                "align.token_match = \"encoder_resize\" runs the encoder at the flow's {f}×{f} grid: \
                 align.encoder_tokens must be {flow_tokens} (or 0), got {m}"
            ))),
            (TokenMatch::EncoderResize, None, _) => Err(FlowError::Config(format!(
                "align.token_match = \"encoder_resize\" needs a square grid, the flow has {flow_tokens} tokens"
            ))),
            (TokenMatch::Pool, Some(f), Some(e)) if f % e == 0 && self.pairing == Pairing::Same => {
                Ok(m)
            }
            (TokenMatch::Pool, ..) => Err(FlowError::Config(format!(
                "align.token_match = \"pool\" needs square grids, the flow's a whole multiple of the \
                 encoder's and pairing = \"same\"; got {flow_tokens} and {m} tokens, pairing {:?}",
                self.pairing
            ))),
        }
    }

    /// 0-based (block, layer) pairs after checking them against the flow.
    pub fn locations0(&self, flow: &super::Config) -> Result<Vec<(usize, usize)>, FlowError> {
        let (t, l) = (flow.num_blocks as usize, flow.layers_per_block as usize);
        if self.locations.is_empty() {
            return Err(FlowError::Config("align.locations is empty".into()));
        }
        self.locations
            .iter()
            .map(|&[b, layer]| {
                if b == 0 || b > t || layer == 0 || layer > l {
                    Err(FlowError::Config(format!(
                        "align location ({b}, {layer}) is outside blocks 1..={t} × layers 1..={l}"
                    )))
                } else {
                    Ok((b - 1, layer - 1))
                }
            })
            .collect()
    }
}

/// REPA's projector: Linear → SiLU → Linear → SiLU → Linear, per token (names `0`, `2`, `4`).
#[derive(Debug)]
pub struct Projector {
    l0: Linear,
    l2: Linear,
    l4: Linear,
}

impl Projector {
    pub fn new(p: nn::Path, input: i64, hidden: i64, output: i64, init: ProjectorInit) -> Self {
        let this = Self {
            l0: Linear::new(&p / "0", input, hidden),
            l2: Linear::new(&p / "2", hidden, hidden),
            l4: Linear::new(&p / "4", hidden, output),
        };
        if init == ProjectorInit::Xavier {
            tch::no_grad(|| {
                for l in [&this.l0, &this.l2, &this.l4] {
                    let (fan_out, fan_in) = (l.weight.size()[0], l.weight.size()[1]);
                    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
                    let _ = l.weight.shallow_clone().uniform_(-bound, bound);
                    let _ = l.bias.shallow_clone().zero_();
                }
            });
        }
        this
    }

    pub fn forward(&self, h: &Tensor, prec: super::Precision) -> Tensor {
        let h = self.l0.forward(h, prec).silu();
        let h = self.l2.forward(&h, prec).silu();
        self.l4.forward(&h, prec).to_kind(Kind::Float)
    }
}

/// Projectors plus the loss; kept out of the flow's variable store so reference checkpoints load as is.
pub struct AlignHead {
    pub cfg: AlignConfig,
    pub projectors: Vec<Projector>,
    locations: Vec<(usize, usize)>,
}

impl AlignHead {
    pub fn new(p: nn::Path, cfg: &AlignConfig, model: &Model) -> Result<Self, FlowError> {
        let locations = cfg.locations0(&model.cfg)?;
        let count = if cfg.shared_projector {
            1
        } else {
            locations.len()
        };
        let projectors = (0..count)
            .map(|k| {
                Projector::new(
                    &p / "projectors" / k,
                    model.cfg.channels,
                    cfg.projector_hidden,
                    cfg.encoder_dim,
                    cfg.projector_init,
                )
            })
            .collect();
        Ok(Self {
            cfg: cfg.clone(),
            projectors,
            locations,
        })
    }

    /// The projectors' weights in `prec`, cast once for as long as the scope lives ([`super::CastScope`]).
    pub fn cast_weights(&self, prec: super::Precision) -> super::CastScope {
        super::CastScope::new(
            self.projectors.iter().flat_map(|p| [&p.l0, &p.l2, &p.l4]),
            prec,
        )
    }

    /// Locations the NLL forward pass must capture (only F-REPA reads them from that pass).
    pub fn forward_capture(&self) -> Vec<(usize, usize)> {
        if self.cfg.mode == AlignMode::Forward {
            self.locations.clone()
        } else {
            vec![]
        }
    }

    /// Unweighted alignment loss: mean over locations of −mean over batch and tokens of
    /// cos(v, Proj(h)). `target` is the encoder's patch tokens (B, N, E) in raster order.
    pub fn loss(
        &self,
        model: &Model,
        out: &ForwardOutput,
        cond: &Cond,
        target: &Tensor,
    ) -> Result<Tensor, FlowError> {
        let cos = self.cosines(model, out, cond, target)?;
        let n = cos.len() as f64;
        Ok(cos.into_iter().fold(
            Tensor::zeros([], (Kind::Float, target.device())),
            |acc, c| acc - c,
        ) / n)
    }

    /// The mean cosine similarity at each aligned location, in `locations` order; the loss is minus
    /// their mean (spec §4.5), and the trainer logs each one.
    pub fn cosines(
        &self,
        model: &Model,
        out: &ForwardOutput,
        cond: &Cond,
        target: &Tensor,
    ) -> Result<Vec<Tensor>, FlowError> {
        if self.cfg.mode == AlignMode::None {
            return Err(FlowError::Config(
                "align.mode = none has no alignment loss".into(),
            ));
        }
        let n = model.cfg.num_tokens();
        let m = self.cfg.target_tokens(n)?;
        let ts = target.size();
        if ts.len() != 3 || ts[1] != m || ts[2] != self.cfg.encoder_dim {
            return Err(FlowError::Input(format!(
                "alignment target has shape {ts:?}, expected (B, {m}, {})",
                self.cfg.encoder_dim
            )));
        }
        let mut feats = features(model, out, cond, &self.locations, self.cfg.mode);
        if m != n {
            feats = feats.iter().map(|h| pool_tokens(h, m)).collect();
        }
        let v = normalize(&target.to_kind(Kind::Float));
        let mut cosines = Vec::with_capacity(feats.len());
        for (k, h) in feats.iter().enumerate() {
            let proj = &self.projectors[if self.cfg.shared_projector { 0 } else { k }];
            let (h, v) = match self.cfg.pairing {
                Pairing::Same => (h.shallow_clone(), v.shallow_clone()),
                Pairing::Shifted => {
                    // In the block's own order: h[n−1] predicts token n.
                    let perm = model.blocks[self.locations[k].0].permutation;
                    let (hp, vp) = (perm.apply(h), perm.apply(&v));
                    (hp.narrow(1, 0, n - 1), vp.narrow(1, 1, n - 1))
                }
            };
            let cos = (normalize(&proj.forward(&h, model.precision)) * &v).sum_dim_intlist(
                -1,
                false,
                Kind::Float,
            );
            cosines.push(cos.mean(Kind::Float));
        }
        Ok(cosines)
    }
}

/// Raster-order tokens (B, g², C) average-pooled to (B, m, C) over k×k squares, g = k·√m.
pub fn pool_tokens(h: &Tensor, m: i64) -> Tensor {
    let [b, n, c] = h.size()[..] else {
        unreachable!("hidden states are (B, N, C)")
    };
    let (g, e) = (
        (n as f64).sqrt().round() as i64,
        (m as f64).sqrt().round() as i64,
    );
    h.reshape([b, g, g, c])
        .permute([0, 3, 1, 2])
        .avg_pool2d(
            [g / e, g / e],
            [g / e, g / e],
            [0, 0],
            false,
            true,
            None::<i64>,
        )
        .permute([0, 2, 3, 1])
        .reshape([b, m, c])
}

/// F.normalize along the last dim (eps 1e-12).
fn normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12)
}

/// Hidden states at `locations` (0-based) in raster order, on the graph `mode` prescribes.
pub fn features(
    model: &Model,
    out: &ForwardOutput,
    cond: &Cond,
    locations: &[(usize, usize)],
    mode: AlignMode,
) -> Vec<Tensor> {
    use std::collections::HashMap;
    let batch = out.z.size()[0];
    let layers_at = |t: usize| -> Vec<usize> {
        let mut v: Vec<usize> = locations
            .iter()
            .filter(|(b, _)| *b == t)
            .map(|(_, l)| *l)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let mut got: HashMap<(usize, usize), Tensor> = HashMap::new();
    let record =
        |t: usize, keep: &[usize], hidden: &[Tensor], got: &mut HashMap<(usize, usize), Tensor>| {
            for (l, h) in keep.iter().zip(hidden) {
                got.insert((t, *l), model.blocks[t].permutation.apply(h));
            }
        };
    match mode {
        AlignMode::None => return vec![],
        AlignMode::Forward => {
            return locations
                .iter()
                .map(|loc| {
                    out.hidden
                        .get(loc)
                        .expect("forward pass captured the aligned locations")
                        .shallow_clone()
                })
                .collect();
        }
        AlignMode::Detach => {
            let mut blocks: Vec<usize> = locations.iter().map(|(b, _)| *b).collect();
            blocks.sort_unstable();
            blocks.dedup();
            for t in blocks {
                let block = &model.blocks[t];
                let keep = layers_at(t);
                let class = block.class_embedding(cond, batch);
                let x_perm = block.permutation.apply(&out.inputs[t].detach());
                let pass = block.pass(
                    &x_perm,
                    class.as_ref(),
                    &keep,
                    Some(keep[keep.len() - 1] + 1),
                    model.precision,
                );
                record(t, &keep, &pass.hidden, &mut got);
            }
        }
        AlignMode::ReverseUnrolled => {
            let t_min = locations
                .iter()
                .map(|(b, _)| *b)
                .min()
                .expect("at least one location");
            let mut zt = out.z.detach();
            for t in (t_min..model.blocks.len()).rev() {
                let block = &model.blocks[t];
                let keep = layers_at(t);
                let class = block.class_embedding(cond, batch);
                let teacher = block.pass(
                    &block.permutation.apply(&out.inputs[t].detach()),
                    class.as_ref(),
                    &[],
                    None,
                    model.precision,
                );
                let prev_perm = &teacher.b + teacher.a.exp() * block.permutation.apply(&zt);
                if !keep.is_empty() {
                    let pass = block.pass(
                        &prev_perm,
                        class.as_ref(),
                        &keep,
                        Some(keep[keep.len() - 1] + 1),
                        model.precision,
                    );
                    record(t, &keep, &pass.hidden, &mut got);
                }
                zt = block.permutation.apply(&prev_perm);
            }
        }
        AlignMode::Reverse | AlignMode::ReverseLiteral => {
            let t_min = locations
                .iter()
                .map(|(b, _)| *b)
                .min()
                .expect("at least one location");
            let mut zt = out.z.detach();
            for t in (t_min..model.blocks.len()).rev() {
                let block = &model.blocks[t];
                let keep = layers_at(t);
                let class = block.class_embedding(cond, batch);
                let z_perm = block.permutation.apply(&zt);
                let input = if mode == AlignMode::Reverse {
                    // Value = the block's input x̂_{t−1}; graph only through z^t.
                    let fwd = &out.passes[t];
                    fwd.b.detach() + fwd.a.detach().exp() * &z_perm
                } else {
                    block.permutation.apply(&out.inputs[t].detach())
                };
                let upto = (t == t_min).then(|| keep[keep.len() - 1] + 1);
                let pass = block.pass(&input, class.as_ref(), &keep, upto, model.precision);
                record(t, &keep, &pass.hidden, &mut got);
                if t > t_min {
                    zt = block.permutation.apply(&(&pass.b + pass.a.exp() * &z_perm));
                }
            }
        }
    }
    locations
        .iter()
        .map(|loc| {
            got.get(loc)
                .map(|t| t.shallow_clone())
                .unwrap_or_else(|| got_missing(loc))
        })
        .collect()
}

fn got_missing(loc: &(usize, usize)) -> Tensor {
    unreachable!("alignment location {loc:?} was not computed")
}
