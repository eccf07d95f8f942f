//! Sampling (spec §3): the KV-cache reverse pass with TARFlow-style classifier-free guidance, noise
//! drawn on the CPU, NaN redraws, and one-step score denoising.

use tch::{Device, Kind, Tensor};

use super::block::Cond;
use super::decode::reverse_block;
pub use super::guidance::Guidance;
pub use super::jacobi::{calibrate, choose, Calibration, Plan, Solver};
use super::{nll, FlowError, Model, Precision};

impl Model {
    /// Reverse (noise → data) of token-space z (B, N, D) to images, with a KV cache per block.
    pub fn reverse(&self, z: &Tensor, y: Option<&Tensor>, opts: &Guidance) -> Tensor {
        reverse(self, z, y, opts)
    }
}

/// Inverts every block, last to first: z (B, N, D) → images (B, C, H, W).
pub fn reverse(model: &Model, z: &Tensor, y: Option<&Tensor>, g: &Guidance) -> Tensor {
    reverse_with(model, z, y, g, g.weight != 0.0)
}

/// [`reverse`] with the choice of running the two-branch batched pass made explicitly, so that a test
/// can check the batched pass at w = 0 against the single-branch one.
pub fn reverse_with(
    model: &Model,
    z: &Tensor,
    y: Option<&Tensor>,
    g: &Guidance,
    batched: bool,
) -> Tensor {
    reverse_in(model, model.precision, z, y, g, batched)
}

/// [`reverse_with`] in precision `prec` instead of the model's.
fn reverse_in(
    model: &Model,
    prec: Precision,
    z: &Tensor,
    y: Option<&Tensor>,
    g: &Guidance,
    batched: bool,
) -> Tensor {
    tch::no_grad(|| {
        // Every decode step runs every layer: cast the weights once, not per step.
        let _cast = model.cast_weights_in(prec);
        let mut x = z.to_kind(Kind::Float) * model.var.sqrt();
        for block in model.blocks.iter().rev() {
            x = reverse_block(model, prec, block, &x, y, g, batched);
        }
        model.unpatchify(&x)
    })
}

/// [`reverse_in`] with `solver`: images and the dependent network passes of each block, in the order
/// the blocks ran (N − 1 each for the sequential solver).
pub fn reverse_solved(
    model: &Model,
    prec: Precision,
    z: &Tensor,
    y: Option<&Tensor>,
    g: &Guidance,
    plan: &Plan,
) -> (Tensor, Vec<i64>) {
    match plan {
        Plan::Uniform(Solver::Sequential) => {
            let steps = model.cfg.num_tokens() - 1;
            let x = reverse_in(model, prec, z, y, g, g.weight != 0.0);
            (x, vec![steps; model.blocks.len()])
        }
        _ => super::jacobi::reverse_planned(model, prec, z, y, g, plan),
    }
}

/// Reverse without a cache: every step reruns the whole causal pass on the partially inverted
/// sequence. Quadratically slower; it exists to check the cached path against.
pub fn reverse_uncached(model: &Model, z: &Tensor, y: Option<&Tensor>) -> Tensor {
    tch::no_grad(|| {
        let mut x = z.to_kind(Kind::Float) * model.var.sqrt();
        let batch = x.size()[0];
        let cond = match y {
            Some(y) => Cond::Labels(y),
            None => Cond::Null,
        };
        for block in model.blocks.iter().rev() {
            let class = block.class_embedding(&cond, batch);
            let mut xp = block.permutation.apply(&x);
            let n = xp.size()[1];
            for i in 1..n {
                let pass = block.pass(&xp, class.as_ref(), &[], None, model.precision);
                let row =
                    xp.narrow(1, i, 1) * pass.a.narrow(1, i, 1).exp() + pass.b.narrow(1, i, 1);
                xp = Tensor::cat(
                    &[xp.narrow(1, 0, i), row, xp.narrow(1, i + 1, n - i - 1)],
                    1,
                );
            }
            x = block.permutation.apply(&xp);
        }
        model.unpatchify(&x)
    })
}

/// Standard normal noise (B, N, D) drawn on the CPU from `seed`, so samples do not depend on the device.
pub fn cpu_noise(model: &Model, batch: i64, seed: u64) -> Tensor {
    tch::manual_seed(seed as i64);
    Tensor::randn(
        [batch, model.cfg.num_tokens(), model.cfg.token_dim()],
        (Kind::Float, Device::Cpu),
    )
}

/// Samples with their redraw count.
pub struct Samples {
    /// Images (B, C, H, W) in the flow's space, before denoising.
    pub x: Tensor,
    /// Number of samples whose output held NaN/Inf and were drawn again.
    pub redrawn: i64,
    /// Dependent network passes of each block in the first draw (the sequential depth is their sum).
    pub passes: Vec<i64>,
}

/// Draws noise from `seed` and inverts it; samples that come out non-finite get fresh noise (from the
/// same CPU generator stream) and are redone, up to `max_redraws` rounds.
pub fn sample(
    model: &Model,
    batch: i64,
    y: Option<&Tensor>,
    g: &Guidance,
    seed: u64,
    max_redraws: usize,
) -> Result<Samples, FlowError> {
    sample_in(model, model.precision, batch, y, g, seed, max_redraws)
}

/// [`sample`] in precision `prec` instead of the model's: the EMA of a bf16 training run sampled in
/// fp32, as `pipeline sample` samples a checkpoint.
pub fn sample_in(
    model: &Model,
    prec: Precision,
    batch: i64,
    y: Option<&Tensor>,
    g: &Guidance,
    seed: u64,
    max_redraws: usize,
) -> Result<Samples, FlowError> {
    sample_solved(
        model,
        prec,
        batch,
        y,
        g,
        seed,
        max_redraws,
        &Plan::Uniform(Solver::Sequential),
    )
}

/// [`sample_in`] with the reverse pass solved by `plan`.
#[allow(clippy::too_many_arguments)]
pub fn sample_solved(
    model: &Model,
    prec: Precision,
    batch: i64,
    y: Option<&Tensor>,
    g: &Guidance,
    seed: u64,
    max_redraws: usize,
    plan: &Plan,
) -> Result<Samples, FlowError> {
    let device = model.device();
    let z = cpu_noise(model, batch, seed);
    let reverse = |z: &Tensor, y: Option<&Tensor>| reverse_solved(model, prec, z, y, g, plan).0;
    let (mut x, passes) = reverse_solved(model, prec, &z.to_device(device), y, g, plan);
    let mut redrawn = 0;
    for attempt in 0..=max_redraws {
        let bad = x.isfinite().logical_not().flatten(1, -1).any_dim(1, false);
        let n_bad = bad.sum(Kind::Int64).int64_value(&[]);
        if n_bad == 0 {
            return Ok(Samples { x, redrawn, passes });
        }
        if attempt == max_redraws {
            return Err(FlowError::NonFinite {
                bad: n_bad,
                attempts: max_redraws,
            });
        }
        redrawn += n_bad;
        let idx = bad.nonzero().squeeze_dim(1);
        let fresh = Tensor::randn(
            [n_bad, model.cfg.num_tokens(), model.cfg.token_dim()],
            (Kind::Float, Device::Cpu),
        )
        .to_device(device);
        let y_bad = y.map(|y| y.index_select(0, &idx));
        let redo = reverse(&fresh, y_bad.as_ref());
        x = x.index_copy(0, &idx, &redo);
    }
    unreachable!("the loop returns on its last attempt")
}

/// One-step score denoising x + σ²·∇ log p(x) (spec §3.4): a gradient step on the per-dimension mean
/// NLL with lr = B·D·σ²·lr_scale, which is exactly σ²∇ log p for lr_scale = 1.
pub fn denoise(model: &Model, x: &Tensor, y: Option<&Tensor>, sigma: f64, lr_scale: f64) -> Tensor {
    let x_in = x.to_kind(Kind::Float).detach().set_requires_grad(true);
    let cond = match y {
        Some(y) => Cond::Labels(y),
        None => Cond::Null,
    };
    let out = model.forward(&x_in, &cond, &[]);
    let loss = nll(&out).loss;
    let grad = Tensor::run_backward(&[&loss], &[&x_in], false, false).remove(0);
    let lr = x.size()[0] as f64 * model.cfg.sample_dim() as f64 * sigma * sigma * lr_scale;
    (x_in.detach() - grad * lr).to_kind(x.kind())
}
