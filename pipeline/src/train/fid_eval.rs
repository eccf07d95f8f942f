//! FID and Inception Score of EMA samples during training (`train.fid_every`), with the network and
//! statistics `pipeline fid` uses, logged with the other metrics. Rank 0 evaluates; the EMA is the same
//! on every rank.

use std::path::{Path, PathBuf};

use anyhow::Context;
use model::feature_stats::Statistics;
use model::inception::{Inception, LoadedInception};
use model::tarflow::{self, Model};
use tch::{Device, Kind, Tensor};

use super::TrainConfig;
use crate::fid::Scores;

pub struct FidEval {
    inception: LoadedInception,
    reference: Statistics,
}

impl FidEval {
    /// Loads the Inception network onto the training device and the reference statistics, so that a
    /// wrong path fails at the start of the run rather than at the first evaluation.
    pub fn load(tc: &TrainConfig, device: Device) -> anyhow::Result<FidEval> {
        let weights = if tc.fid_weights.is_empty() {
            crate::fid::default_weights()
        } else {
            PathBuf::from(&tc.fid_weights)
        };
        let reference =
            crate::fid::read_reference(Path::new(&tc.fid_ref)).context("train.fid_ref")?;
        let inception = Inception::from_file(&weights, device)
            .with_context(|| format!("train.fid_weights: loading {}", weights.display()))?;
        Ok(FidEval {
            inception,
            reference,
        })
    }

    /// `tc.fid_samples` samples of the unguided EMA model, classes cycled (balanced), each batch's
    /// noise keyed by the seed and its first index so that evaluations at different steps compare the
    /// same noise.
    pub fn evaluate(
        &self,
        ema: &Model,
        vae: Option<&model::vae::LoadedVae>,
        tc: &TrainConfig,
    ) -> anyhow::Result<Scores> {
        let total = tc.fid_samples;
        let classes = ema.cfg.num_classes;
        let batches = (0..total).step_by(tc.fid_batch as usize).map(|start| {
            let n = tc.fid_batch.min(total - start);
            let y = (classes > 0).then(|| {
                Tensor::arange_start(start, start + n, (Kind::Int64, ema.device()))
                    .remainder(classes)
            });
            let seed = tc.seed.wrapping_add(start as u64);
            let samples = tch::no_grad(|| {
                tarflow::sample::sample(ema, n, y.as_ref(), &Default::default(), seed, 10)
            })
            .with_context(|| format!("sampling FID images {start}..{}", start + n))?;
            let pixels = super::decode_samples(samples.x, vae, tc, ema.cfg.in_channels)?
                .context("FID of a latent model needs the VAE named in [precompute] vae")?;
            // Quantised where they were made: the Inception network runs on the same device.
            Ok(crate::trained::to_uint8_on_device(&pixels))
        });
        crate::fid::score(
            &self.inception.model,
            &self.reference,
            total as usize,
            batches,
            None,
        )
    }
}
