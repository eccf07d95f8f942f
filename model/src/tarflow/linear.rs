//! The linear layer every flow block is made of: fp32 parameters, products in the compute precision
//! (a [`CastScope`](super::CastScope) keeps the cast weights for a pass), oneDNN on the CPU where it
//! pays off.

use std::sync::{Arc, Mutex};

use tch::{nn, Kind, Tensor};

use torch_ext::onednn;

/// Mixed precision the way torch autocast does it for this model: matmuls in bf16, LayerNorm and the
/// exp of the log-scale in fp32. Only enabled on CUDA by callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
}

impl Precision {
    pub(super) fn kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        }
    }
}

/// Weight and bias in a compute precision, held while a [`CastScope`] lives.
pub(super) type CastSlot = Arc<Mutex<Option<(Kind, Tensor, Tensor)>>>;

/// Linear layer whose parameters stay fp32 while the product runs in the compute precision.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
    /// Shared with the layer's [`Share`] copies, so a checkpointed block's recomputation finds it.
    pub(super) cast: CastSlot,
}

impl Linear {
    /// Initialised as `torch.nn.Linear` is: weight and bias uniform in ±1/√fan_in (kaiming-uniform with
    /// a = √5). tch's default draws the weight with the ReLU gain, bound √(6/fan_in): 6× the variance.
    pub fn new(p: nn::Path, in_dim: i64, out_dim: i64) -> Self {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let init = nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let config = nn::LinearConfig {
            ws_init: init,
            bs_init: Some(init),
            bias: true,
        };
        let l = nn::linear(p, in_dim, out_dim, config);
        Self {
            weight: l.ws,
            bias: l.bs.expect("linear has a bias"),
            cast: CastSlot::default(),
        }
    }

    /// Weight and bias in `kind`: the scope's copy when one holds it, else a fresh cast.
    fn weights_in(&self, kind: Kind) -> (Tensor, Tensor) {
        if self.weight.kind() == kind {
            return (self.weight.shallow_clone(), self.bias.shallow_clone());
        }
        let slot = self.cast.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some((k, w, b)) if *k == kind => (w.shallow_clone(), b.shallow_clone()),
            _ => (self.weight.to_kind(kind), self.bias.to_kind(kind)),
        }
    }

    pub fn forward(&self, x: &Tensor, prec: Precision) -> Tensor {
        // float32 on the CPU: oneDNN's kernels, backward included (torch_ext::onednn says why), for
        // products large enough to gain from them.
        if prec == Precision::Fp32
            && x.kind() == Kind::Float
            && x.device() == tch::Device::Cpu
            && onednn::enabled()
            && self.onednn_pays_off(x)
        {
            // A failure is a shape error the plain product would raise too: tch panics on those.
            return onednn::linear(x, &self.weight, Some(&self.bias))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let k = prec.kind();
        let (weight, bias) = self.weights_in(k);
        x.to_kind(k).linear(&weight, Some(bias))
    }

    fn onednn_pays_off(&self, x: &Tensor) -> bool {
        let size = self.weight.size();
        let (out, fan_in) = (size[0], size[1]);
        let rows = x.numel() as i64 / fan_in.max(1);
        let backward = torch_ext::checkpoint::grad_enabled()
            && (self.weight.requires_grad() || x.requires_grad());
        let product = if backward {
            torch_ext::routing::Product::Training
        } else {
            torch_ext::routing::Product::Forward
        };
        torch_ext::routing::uses_onednn(product, rows, fan_in, out)
    }
}
