//! Training-free classification (FlowBack Algorithm 1, spec §5): one forward and one backward pass per
//! image on class-mixing logits λ = 0; the prediction is argmax ∂ log p(x | pᵀE) / ∂λ.

use tch::{Kind, Tensor};

use super::block::Cond;
use super::{FlowError, Model};

pub struct Classification {
    /// Predicted class per image (B,).
    pub predicted: Tensor,
    /// ∂ log p / ∂λ_k per image (B, K), log p summed over dimensions.
    pub scores: Tensor,
}

/// Classifies images x (B, C, H, W). Each image has its own λ; every block mixes its own class table
/// with the same softmax(λ), which at λ = 0 is the mean (unconditional) embedding.
pub fn classify(model: &Model, x: &Tensor) -> Result<Classification, FlowError> {
    let k = model.cfg.num_classes;
    if k == 0 {
        return Err(FlowError::Config(
            "classification needs a class-conditional flow (num_classes > 0)".into(),
        ));
    }
    model.check_input(x)?;
    let batch = x.size()[0];
    let logits = Tensor::zeros([batch, k], (Kind::Float, x.device())).set_requires_grad(true);
    let probs = logits.softmax(-1, Kind::Float);
    let out = model.forward(&x.to_kind(Kind::Float).detach(), &Cond::Mix(&probs), &[]);
    // Sum over samples of the per-sample log-likelihood (constant dropped): images do not interact,
    // so each row of the gradient is that image's own.
    let dims = model.cfg.sample_dim() as f64;
    let log_p = (-0.5 * out.z.square().sum(Kind::Float)) + out.logdet.sum(Kind::Float) * dims;
    let scores = Tensor::run_backward(&[&log_p], &[&logits], false, false).remove(0);
    Ok(Classification {
        predicted: scores.argmax(-1, false),
        scores,
    })
}
