//! AdamW written out in tensors (PyTorch's update order) rather than libtorch's optimiser object,
//! because a checkpoint must hold the moments and an exact resume must restore them.

use tch::{Kind, Tensor};

pub struct AdamW {
    /// (name, parameter, first moment, second moment), sorted by name.
    pub slots: Vec<(String, Tensor, Tensor, Tensor)>,
    /// Updates applied so far (bias correction uses it).
    pub t: u64,
}

impl AdamW {
    pub fn new(mut params: Vec<(String, Tensor)>) -> Self {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = params
            .into_iter()
            .map(|(n, p)| {
                let (m, v) = (p.zeros_like().detach(), p.zeros_like().detach());
                (n, p, m, v)
            })
            .collect();
        Self { slots, t: 0 }
    }

    pub fn zero_grad(&mut self) {
        for (_, p, _, _) in &mut self.slots {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// The global L2 norm of the gradients; scales them down to `max_norm` when that is positive.
    pub fn clip(&mut self, max_norm: f64) -> f64 {
        let norms: Vec<Tensor> = self
            .slots
            .iter()
            .filter(|s| s.1.grad().defined())
            .map(|s| s.1.grad().square().sum(Kind::Float))
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        let total = Tensor::stack(&norms, 0)
            .sum(Kind::Float)
            .sqrt()
            .double_value(&[]);
        if max_norm > 0.0 && total > max_norm {
            let coef = max_norm / (total + 1e-6);
            tch::no_grad(|| {
                for (_, p, _, _) in &self.slots {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.g_mul_scalar_(coef);
                    }
                }
            });
        }
        total
    }

    pub fn step(&mut self, lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) {
        self.t += 1;
        let bc1 = 1.0 - beta1.powi(self.t as i32);
        let bc2 = 1.0 - beta2.powi(self.t as i32);
        tch::no_grad(|| {
            for (_, p, m, v) in &mut self.slots {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let _ = p.g_mul_scalar_(1.0 - lr * weight_decay);
                let _ = m.lerp_(&g, 1.0 - beta1);
                let _ = v.g_mul_scalar_(beta2);
                let _ = v.addcmul_(&g, &(&g * (1.0 - beta2)));
                let denom = v.sqrt() / bc2.sqrt() + eps;
                let _ = p.addcdiv_(&(&*m * (-lr / bc1)), &denom);
            }
        });
    }
}

/// Exponential moving average of the weights, kept in fp32 whatever the compute precision.
pub fn ema_update(ema: &[(Tensor, Tensor)], decay: f64) {
    tch::no_grad(|| {
        for (e, p) in ema {
            let mut e = e.shallow_clone();
            let _ = e.lerp_(&p.to_kind(Kind::Float), 1.0 - decay);
        }
    });
}
