//! Classifier-free guidance as TARFlow samples with it: the settings, and the two branches (conditional
//! and unconditional) run as one batch of 2B rows, which every solver of the reverse pass shares.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::block::{Cond, MetaBlock};

/// Guidance settings of a reverse pass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Guidance {
    /// w in a ← a_c + w·(a_c − a_u) (same for b). 0 turns guidance off (one branch only).
    pub weight: f64,
    /// Ramp the weight along the sequence: g_i = w·(i+1)/(N−1) at step i (`evaluate_fid.py`).
    pub annealed: bool,
    /// Attention temperature of the unconditional branch (logit scale 64^−0.5 / temp).
    pub attn_temp: f64,
}

impl Default for Guidance {
    fn default() -> Self {
        Self {
            weight: 0.0,
            annealed: false,
            attn_temp: 1.0,
        }
    }
}

impl Guidance {
    /// The weight applied to the parameters of permuted token `t` (1 ≤ t < n): made by decode step
    /// t − 1, which the annealed schedule ramps as w·t/(N−1).
    pub fn weight_at(&self, t: i64, n: i64) -> f64 {
        if self.annealed {
            self.weight * t as f64 / (n - 1) as f64
        } else {
            self.weight
        }
    }
}

/// The class embedding and attention scale of a block's rows: B rows, or with guidance 2B (the
/// conditional rows first, then the unconditional ones with the attention temperature).
pub(super) struct Branches {
    pub class: Option<Tensor>,
    pub q_scale: Option<Tensor>,
}

impl Branches {
    pub fn new(
        block: &MetaBlock,
        y: Option<&Tensor>,
        g: &Guidance,
        batch: i64,
        guided: bool,
        device: Device,
    ) -> Self {
        let cond = match y {
            Some(y) => Cond::Labels(y),
            None => Cond::Null,
        };
        let class = block.class_embedding(&cond, batch);
        if !guided {
            return Branches {
                class,
                q_scale: None,
            };
        }
        let uncond = block.class_embedding(&Cond::Null, batch);
        let class = class.map(|c| Tensor::cat(&[&c, &uncond.expect("same table")], 0));
        // An unconditional model still gets a second branch: it differs by the attention temperature.
        let scale = Tensor::cat(
            &[
                Tensor::ones([batch, 1, 1, 1], (Kind::Float, device)),
                Tensor::full([batch, 1, 1, 1], 1.0 / g.attn_temp, (Kind::Float, device)),
            ],
            0,
        );
        Branches {
            class,
            q_scale: Some(scale),
        }
    }
}
