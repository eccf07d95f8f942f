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
    let k = classes(model, x)?;
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

/// Bayes-rule baseline (TARFlow's notebook, spec §5.3): log p(x | k) for every class k, K forward
/// passes, prediction = argmax. Scores are the per-image log-likelihoods (B, K), constant dropped.
pub fn classify_bayes(model: &Model, x: &Tensor) -> Result<Classification, FlowError> {
    let k = classes(model, x)?;
    let batch = x.size()[0];
    let x = x.to_kind(Kind::Float).detach();
    let dims = model.cfg.sample_dim() as f64;
    let _guard = tch::no_grad_guard();
    let columns: Vec<Tensor> = (0..k)
        .map(|class| {
            let y = Tensor::full([batch], class, (Kind::Int64, x.device()));
            let out = model.forward(&x, &Cond::Labels(&y), &[]);
            let per_image = out
                .z
                .square()
                .flatten(1, -1)
                .sum_dim_intlist(1, false, Kind::Float);
            -0.5 * per_image + out.logdet.to_kind(Kind::Float) * dims
        })
        .collect();
    let scores = Tensor::stack(&columns, 1);
    Ok(Classification {
        predicted: scores.argmax(-1, false),
        scores,
    })
}

/// The class count of a conditional flow, after checking the input batch.
fn classes(model: &Model, x: &Tensor) -> Result<i64, FlowError> {
    if model.cfg.num_classes == 0 {
        return Err(FlowError::Config(
            "classification needs a class-conditional flow (num_classes > 0)".into(),
        ));
    }
    model.check_input(x)?;
    Ok(model.cfg.num_classes)
}
