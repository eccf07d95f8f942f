//! AdamW written out in tensors (PyTorch's update order) rather than libtorch's optimiser object,
//! because a checkpoint must hold the moments and an exact resume must restore them.
//!
//! Nothing here reads a value back to the host: the gradient norm, the clipping factor and the
//! "this step is finite" flag stay on the device, and a non-finite step is skipped by the update
//! itself (every factor of the update becomes the identity), as `GradScaler.step` skips one with
//! `found_inf`. The trainer reads the counters only on metric and checkpoint steps.

use tch::{Kind, Tensor};

pub struct AdamW {
    /// (name, parameter, first moment, second moment), sorted by name.
    pub slots: Vec<(String, Tensor, Tensor, Tensor)>,
    /// Updates applied so far (bias correction uses it), a float scalar on the parameters' device:
    /// skipped steps do not count, and the host learns the value only when it checkpoints.
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
            t: Tensor::zeros([], (Kind::Double, device)),
        }
    }

    pub fn set_t(&mut self, t: u64) {
        self.t = Tensor::full([], t as f64, (Kind::Double, self.t.device()));
    }

    pub fn zero_grad(&mut self) {
        for (_, p, _, _) in &mut self.slots {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    fn grads(&self) -> impl Iterator<Item = Tensor> + '_ {
        self.slots
            .iter()
            .map(|s| s.1.grad())
            .filter(Tensor::defined)
    }

    /// The global L2 norm of the gradients, a device scalar (0 when there are none).
    pub fn grad_norm(&self) -> Tensor {
        let squares: Vec<Tensor> = self.grads().map(|g| g.square().sum(Kind::Float)).collect();
        match squares.is_empty() {
            true => Tensor::zeros([], (Kind::Float, self.t.device())),
            false => Tensor::stack(&squares, 0).sum(Kind::Float).sqrt(),
        }
    }

    /// Scales the gradients down so that their norm is at most `max_norm` (0 = no clipping), with the
    /// factor computed on the device from `norm`.
    pub fn clip(&mut self, norm: &Tensor, max_norm: f64) {
        if max_norm <= 0.0 {
            return;
        }
        let coef = (max_norm / (norm + 1e-6)).clamp_max(1.0);
        tch::no_grad(|| {
            for mut g in self.grads() {
                let _ = g.g_mul_(&coef);
            }
        });
    }

    /// One AdamW update, applied only where `ok` is 1: with `ok` = 0 the parameters, the moments and
    /// the step count stay as they were, even if the gradients are NaN.
    pub fn step(
        &mut self,
        ok: &Tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) {
        let ok_bool = ok.gt(0.5);
        let pick = |yes: f64, no: f64| Tensor::where_scalar(&ok_bool, yes, no);
        self.t = &self.t + ok.to_kind(Kind::Double);
        // Bias corrections from the device-side count; clamped so a count of 0 stays finite.
        let bc1 = ((&self.t * beta1.ln()).exp().neg() + 1.0).clamp_min(1e-30);
        let bc2 = ((&self.t * beta2.ln()).exp().neg() + 1.0).clamp_min(1e-30);
        let step_size = (ok.to_kind(Kind::Double) * (-lr) / bc1).to_kind(Kind::Float);
        let bc2_sqrt = bc2.sqrt().to_kind(Kind::Float);
        let decay = pick(1.0 - lr * weight_decay, 1.0);
        let m_weight = pick(1.0 - beta1, 0.0);
        let v_decay = pick(beta2, 1.0);
        let v_weight = pick(1.0 - beta2, 0.0);
        let zero = Tensor::zeros([], (Kind::Float, ok.device()));
        tch::no_grad(|| {
            for (_, p, m, v) in &mut self.slots {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                // A skipped step's gradient may be NaN, and 0 · NaN is NaN: select it away first.
                let g = g.where_self(&ok_bool, &zero);
                let _ = p.g_mul_(&decay);
                let _ = m.lerp_tensor_(&g, &m_weight);
                let _ = v.g_mul_(&v_decay);
                let _ = v.addcmul_(&g, &(&g * &v_weight));
                let denom = v.sqrt() / &bc2_sqrt + eps;
                let _ = p.addcdiv_(&(&*m * &step_size), &denom);
            }
        });
    }
}

/// Exponential moving average of the weights, kept in fp32 whatever the compute precision; a skipped
/// step (`ok` = 0) leaves it unchanged.
pub fn ema_update(ema: &[(Tensor, Tensor)], decay: f64, ok: &Tensor) {
    let weight = Tensor::where_scalar(&ok.gt(0.5), 1.0 - decay, 0.0);
    tch::no_grad(|| {
        for (e, p) in ema {
            let mut e = e.shallow_clone();
            let _ = e.lerp_tensor_(&p.to_kind(Kind::Float), &weight);
        }
    });
}
