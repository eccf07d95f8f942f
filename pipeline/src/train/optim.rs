//! AdamW written out in tensors (PyTorch's update order) rather than libtorch's optimiser object,
//! because a checkpoint must hold the moments and an exact resume must restore them.
//!
//! Nothing here reads a value back to the host: the gradient norm, the clipping factor and the
//! "this step is finite" flag stay on the device, and a non-finite step is skipped by the fused AdamW
//! kernel itself through its `found_inf` argument, as `GradScaler.step` skips one. The update, the
//! norm, the clipping and the EMA are each one multi-tensor libtorch call (`torch_ext`), not a few
//! kernels per parameter. The trainer reads the counters only on metric and checkpoint steps.

use tch::{Kind, Tensor};

/// (name, parameter, first moment, second moment).
pub type Slot = (String, Tensor, Tensor, Tensor);

pub struct AdamW {
    /// Sorted by name.
    pub slots: Vec<Slot>,
    /// Updates applied so far (bias correction uses it), a float32 scalar on the parameters' device
    /// (the fused kernel's step type): skipped steps do not count, and the host learns the value only
    /// when it checkpoints.
    pub t: Tensor,
}

/// Device-side bookkeeping of non-finite steps.
pub struct Skips {
    /// 1.0 when the step's loss and gradients are finite, else 0.0 (f32 scalar).
    pub ok: Tensor,
    pub total: Tensor,
    pub in_row: Tensor,
}

impl Skips {
    pub fn new(device: tch::Device, total: u64, in_row: u64) -> Self {
        let opts = (Kind::Int64, device);
        Skips {
            ok: Tensor::ones([], (Kind::Float, device)),
            total: Tensor::full([], total as i64, opts),
            in_row: Tensor::full([], in_row as i64, opts),
        }
    }

    /// Records whether this step is finite: its loss and the global gradient norm both are.
    pub fn record(&mut self, loss: &Tensor, grad_norm: &Tensor) {
        let ok = loss.isfinite().logical_and(&grad_norm.isfinite());
        let bad = ok.logical_not().to_kind(Kind::Int64);
        self.total = &self.total + &bad;
        self.in_row = (&self.in_row + 1) * &bad;
        self.ok = ok.to_kind(Kind::Float);
    }
}

impl AdamW {
    pub fn new(mut params: Vec<(String, Tensor)>) -> Self {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let device = params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
        let slots = params
            .into_iter()
            .map(|(n, p)| {
                let (m, v) = (p.zeros_like().detach(), p.zeros_like().detach());
                (n, p, m, v)
            })
            .collect();
        Self {
            slots,
            t: Tensor::zeros([], (Kind::Float, device)),
        }
    }

    pub fn set_t(&mut self, t: u64) {
        self.t = Tensor::full([], t as f64, (Kind::Float, self.t.device()));
    }

    /// Drops the gradients (set to none, as PyTorch's default zero_grad): the next backward stores
    /// its own, micro-batches after the first add to them, and a parameter no pass reaches has none
    /// (skipped by the norm and the update, as in PyTorch).
    pub fn zero_grad(&mut self) -> Result<(), torch_ext::ExtError> {
        let params: Vec<Tensor> = self.slots.iter().map(|s| s.1.shallow_clone()).collect();
        torch_ext::clear_grads(&params)
    }

    /// The slots whose parameter has a gradient, with that gradient.
    fn with_grads(&self) -> Vec<(&Slot, Tensor)> {
        self.slots
            .iter()
            .map(|s| (s, s.1.grad()))
            .filter(|(_, g)| g.defined())
            .collect()
    }

    /// The global L2 norm of the gradients, a device scalar (0 when there are none).
    pub fn grad_norm(&self) -> Result<Tensor, torch_ext::ExtError> {
        let grads: Vec<Tensor> = self.with_grads().into_iter().map(|(_, g)| g).collect();
        if grads.is_empty() {
            return Ok(Tensor::zeros([], (Kind::Float, self.t.device())));
        }
        let norms = torch_ext::foreach_norm(&grads)?;
        Ok(Tensor::stack(&norms, 0).to_kind(Kind::Float).norm())
    }

    /// Scales the gradients down so that their norm is at most `max_norm` (0 = no clipping), with the
    /// factor computed on the device from `norm`.
    pub fn clip(&mut self, norm: &Tensor, max_norm: f64) -> Result<(), torch_ext::ExtError> {
        if max_norm <= 0.0 {
            return Ok(());
        }
        let coef = (max_norm / (norm + 1e-6)).clamp_max(1.0);
        let grads: Vec<Tensor> = self.with_grads().into_iter().map(|(_, g)| g).collect();
        tch::no_grad(|| torch_ext::foreach_mul_(&grads, &coef))
    }

    /// One AdamW update in PyTorch's fused kernel, applied only where `ok` is 1: with `ok` = 0 the
    /// parameters, the moments and the step count stay as they were, even if the gradients are NaN.
    pub fn step(
        &mut self,
        ok: &Tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<(), torch_ext::ExtError> {
        let _ = self.t.g_add_(ok);
        let found_inf = ok.neg() + 1.0;
        let live = self.with_grads();
        let mut lists: [Vec<Tensor>; 5] = Default::default();
        for ((_, p, m, v), g) in live {
            for (list, t) in lists.iter_mut().zip([p, &g, m, v, &self.t]) {
                list.push(t.shallow_clone());
            }
        }
        let [params, grads, m, v, steps] = lists;
        let h = torch_ext::AdamWStep {
            lr,
            beta1,
            beta2,
            weight_decay,
            eps,
        };
        tch::no_grad(|| {
            torch_ext::fused_adamw(&params, &grads, &m, &v, &steps, h, Some(&found_inf))
        })
    }
}

/// Exponential moving average of the weights, kept in fp32 whatever the compute precision; a skipped
/// step (`ok` = 0) leaves it unchanged. One multi-tensor lerp over (EMA, parameter) lists.
pub fn ema_update(
    ema: &[Tensor],
    params: &[Tensor],
    decay: f64,
    ok: &Tensor,
) -> Result<(), torch_ext::ExtError> {
    let weight = ok * (1.0 - decay);
    tch::no_grad(|| torch_ext::foreach_lerp_(ema, params, &weight))
}
