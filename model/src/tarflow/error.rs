//! What can go wrong in a flow: a bad config, weights or input, and sampling that stays non-finite.

use crate::weights::WeightsError;

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("invalid flow config: {0}")]
    Config(String),
    #[error("{0}")]
    Weights(#[from] WeightsError),
    #[error("{path}: {message}")]
    Checkpoint { path: String, message: String },
    #[error("{0}")]
    Input(String),
    #[error("sampling produced non-finite values in {bad} samples after {attempts} redraws")]
    NonFinite { bad: i64, attempts: usize },
}
