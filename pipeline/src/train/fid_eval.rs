//! FID, sFID, Inception Score and KID of EMA samples during training (`train.fid_every`), with the
//! network and statistics `pipeline fid` uses, logged with the other metrics. sFID needs the
//! reference's `mu_s`/`sigma_s`, KID its activations (`acts`, or `arr_0` run through the network once,
//! at the first evaluation); without them the line says they were skipped and why. Precision and recall
//! (N × N distances) are left to `pipeline fid`. With several ranks each samples and
//! scores a contiguous share of whole batches (the same noise and classes as one process would draw)
//! and the statistics are summed over the group, so evaluation takes 1/W of the time and no rank idles.

use std::cell::OnceCell;
use std::path::{Path, PathBuf};

use anyhow::Context;
use model::feature_stats::FeatureStats;
use model::inception::{Inception, LoadedInception};
use model::tarflow::{self, Model};
use stages::order::RankSplit;
use tch::{Device, Kind, Tensor};

use super::replicas::Replicas;
use crate::config::TrainConfig;
use crate::evaluate::fid::{Accumulator, Against, MetricArgs, Reference, Scores};

pub struct FidEval {
    inception: LoadedInception,
    reference: Reference,
    /// The reference's pool3 activations, read or computed at the first evaluation (rank 0 only).
    reference_acts: OnceCell<Option<Tensor>>,
}

impl FidEval {
    /// Loads the Inception network onto the training device and the reference statistics, so that a
    /// wrong path fails at the start of the run rather than at the first evaluation.
    pub fn load(tc: &TrainConfig, device: Device) -> anyhow::Result<FidEval> {
        let weights = if tc.fid_weights.is_empty() {
            crate::evaluate::fid::default_weights()
        } else {
            PathBuf::from(&tc.fid_weights)
        };
        let reference = crate::evaluate::fid::read_reference(Path::new(&tc.fid_ref))
            .context("train.fid_ref")?;
        let inception = Inception::from_file(&weights, device)
            .with_context(|| format!("train.fid_weights: loading {}", weights.display()))?;
        Ok(FidEval {
            inception,
            reference,
            reference_acts: OnceCell::new(),
        })
    }

    /// `tc.fid_samples` samples of the unguided EMA model (in fp32 unless `train.fid_bf16`), classes cycled (balanced), each batch's
    /// noise keyed by the seed and its first index, so that evaluations at different steps (and with
    /// any number of ranks) compare the same noise. This rank draws its share of the batches; with
    /// `replicas` the statistics are summed over the group. Rank 0 gets the scores, the others None.
    pub fn evaluate(
        &self,
        ema: &Model,
        vae: Option<&model::vae::LoadedVae>,
        tc: &TrainConfig,
        replicas: Option<(&Replicas, RankSplit)>,
    ) -> anyhow::Result<Option<Scores>> {
        let total = tc.fid_samples as usize;
        let batch = tc.fid_batch as usize;
        let split = replicas.map_or(RankSplit { rank: 0, world: 1 }, |(_, s)| s);
        let mine = crate::evaluate::rank_parts::batch_slice(total, batch, split);
        let device = self.inception.model.device();
        let keep_acts = crate::evaluate::fid::keeps_acts(&self.reference);
        let mut acc = Accumulator::new(
            FeatureStats::share_of(total, mine.start as u64, device),
            keep_acts,
        );
        let classes = ema.cfg.num_classes;
        let precision = fid_precision(tc);
        for start in mine.clone().step_by(batch) {
            let n = batch.min(mine.end - start) as i64;
            let start = start as i64;
            let y = (classes > 0).then(|| {
                Tensor::arange_start(start, start + n, (Kind::Int64, ema.device()))
                    .remainder(classes)
            });
            let seed = tc.seed.wrapping_add(start as u64);
            let samples = tch::no_grad(|| {
                tarflow::sample::sample_in(
                    ema,
                    precision,
                    n,
                    y.as_ref(),
                    &Default::default(),
                    seed,
                    10,
                )
            })
            .with_context(|| format!("sampling FID images {start}..{}", start + n))?;
            let pixels =
                super::samples::decode_samples(samples.x, vae, tc, ema.cfg.in_channels)?
                    .context("FID of a latent model needs the VAE named in [precompute] vae")?;
            // Quantised where they were made: the Inception network runs on the same device.
            let images = crate::evaluate::trained::to_uint8_on_device(&pixels);
            let what = || format!("Inception features of FID images {start}..{}", start + n);
            let f = self.inception.model.features(&images).with_context(what)?;
            acc.add(&f).with_context(what)?;
        }
        if let Some((replicas, _)) = replicas {
            acc.stats
                .reduce(
                    model::inception::FEATURES,
                    model::inception::CLASSES,
                    &mut |t| {
                        replicas.sum_f64_(t).map_err(|e| {
                            model::feature_stats::StatsError::Invalid(format!("{e:#}"))
                        })
                    },
                )
                .context("summing the FID statistics over the ranks")?;
            if keep_acts {
                // KID needs every rank's activations on rank 0: each fills its rows of a zero
                // tensor, and the sum over the ranks is all of them.
                let all = Tensor::zeros(
                    [total as i64, model::inception::FEATURES],
                    (Kind::Double, device),
                );
                if let Some(mine_acts) = acc.activations()? {
                    all.narrow(0, mine.start as i64, mine.len() as i64)
                        .copy_(&mine_acts);
                }
                replicas
                    .sum_f64_(&all)
                    .context("gathering the FID activations over the ranks")?;
                acc.set_activations(all.to_kind(Kind::Float));
            }
        }
        if split.rank != 0 {
            return Ok(None);
        }
        let ref_acts = match self.reference_acts.get() {
            Some(acts) => acts,
            None => {
                let acts = self
                    .reference
                    .activations(&self.inception.model, batch)
                    .context("train.fid_ref: the reference's pool3 activations (KID)")?;
                self.reference_acts.get_or_init(|| acts)
            }
        };
        let metrics = MetricArgs::default();
        let against = Against {
            reference: &self.reference,
            acts: ref_acts.as_ref(),
            metrics: &metrics,
            precision_recall: false,
        };
        let seen = acc.stats.count() as usize;
        crate::evaluate::fid::finish(&acc, &against, total, seen).map(Some)
    }
}

/// The precision FID images are sampled in: fp32, the precision of `pipeline sample` (TF32 products on
/// CUDA in both), whatever the EMA model trains in, unless `train.fid_bf16` asks for bf16.
pub fn fid_precision(tc: &TrainConfig) -> tarflow::Precision {
    if tc.fid_bf16 {
        tarflow::Precision::Bf16
    } else {
        tarflow::Precision::Fp32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default is `pipeline sample`'s precision, not the bf16 the EMA model trains in on CUDA.
    #[test]
    fn fid_samples_in_fp32_unless_asked() {
        let mut tc = TrainConfig::default();
        assert_eq!(fid_precision(&tc), tarflow::Precision::Fp32);
        tc.fid_bf16 = true;
        assert_eq!(fid_precision(&tc), tarflow::Precision::Bf16);
    }
}
