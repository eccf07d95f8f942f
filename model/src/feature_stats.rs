//! FID and Inception Score from Inception features, accumulated batch by batch so that 50 000 samples
//! never sit in memory: FID needs only the feature sum and the sum of outer products (kept in float64 on
//! the features' device, 32 MB for 2048-d features), the Inception Score only per-split sums of class
//! probabilities.
//!
//! Definitions follow pytorch-fid 0.3.0 (`calculate_frechet_distance`, `np.cov` with N − 1) and
//! Salimans et al.'s `inception_score.py` (10 equal consecutive splits, mean and population std of
//! exp(E KL(p(y|x) ‖ p(y))) over the splits), which the ADM evaluation suite repeats.

use tch::{Device, Kind, Tensor};

use crate::frozen::EncoderError;
use crate::inception::{Features, Inception};

/// Splits of the Inception Score, as Salimans et al. and the ADM suite (5 000 of 50 000 samples each).
pub const IS_SPLITS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("{0}")]
    Invalid(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Encoder(#[from] EncoderError),
}

/// Mean (D) and covariance (D, D) of a feature set: what FID compares. Float64 on the CPU.
#[derive(Debug)]
pub struct Statistics {
    pub mu: Tensor,
    pub sigma: Tensor,
}

impl Statistics {
    /// Checks shapes and finiteness (a reference file may hold anything) and converts to float64 CPU.
    pub fn new(mu: &Tensor, sigma: &Tensor) -> Result<Self, StatsError> {
        let (m, s) = (mu.size(), sigma.size());
        if m.len() != 1 || s.len() != 2 || s[0] != m[0] || s[1] != m[0] || m[0] == 0 {
            return Err(StatsError::Invalid(format!(
                "mu must have shape (D) and sigma (D, D), got {m:?} and {s:?}"
            )));
        }
        let mu = mu.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?;
        let sigma = sigma.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?;
        for (name, t) in [("mu", &mu), ("sigma", &sigma)] {
            if t.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
                return Err(StatsError::Invalid(format!(
                    "{name} has NaN or infinite values"
                )));
            }
        }
        Ok(Statistics { mu, sigma })
    }

    pub fn dim(&self) -> i64 {
        self.mu.size()[0]
    }

    /// Refuses a `sigma` that no feature set has as its covariance: not symmetric, or with an
    /// eigenvalue below zero by more than rounding. The Fréchet distance assumes both, and a file
    /// that breaks them gives a number, even a negative one, that means nothing.
    ///
    /// The tolerance is 1e−6·‖Σ‖_F. Storing Σ in float32 moves each eigenvalue by at most its rounding
    /// error's norm, 2⁻²⁴·‖Σ‖_F, and a float64 covariance of fewer samples than dimensions has
    /// eigenvalues of −D·ε·λmax at worst; both sit well inside it. The test is a Cholesky
    /// factorisation of Σ + 2·tol·I, which succeeds for every λmin ≥ −tol; an eigendecomposition is
    /// run only to name λmin when it fails.
    pub fn check_covariance(&self) -> Result<(), StatsError> {
        let sigma = &self.sigma;
        let scale = sigma.f_abs()?.f_max()?.f_double_value(&[])?;
        let asymmetry = sigma
            .f_sub(&sigma.f_tr()?)?
            .f_abs()?
            .f_max()?
            .f_double_value(&[])?;
        if asymmetry > 1e-6 * scale {
            return Err(StatsError::Invalid(format!(
                "sigma is not symmetric: entries differ from their transposes by up to {asymmetry:.3e} \
                 (largest entry {scale:.3e}); it is not a covariance"
            )));
        }
        let norm = sigma
            .f_square()?
            .f_sum(Kind::Double)?
            .f_double_value(&[])?
            .sqrt();
        if norm == 0.0 {
            return Ok(()); // one image repeated: a covariance, and nothing for a tolerance to scale
        }
        let tol = 1e-6 * norm;
        let d = self.dim();
        let shifted = sigma
            .f_add(&Tensor::f_eye(d, (Kind::Double, Device::Cpu))?.f_mul_scalar(2.0 * tol)?)?;
        let (_, info) = shifted.f_linalg_cholesky_ex(false, false)?;
        if info.f_int64_value(&[])? != 0 {
            let lowest = sigma.f_linalg_eigvalsh("L")?.f_min()?.f_double_value(&[])?;
            return Err(StatsError::Invalid(format!(
                "sigma is not positive semi-definite: its smallest eigenvalue is {lowest:.6e}, below \
                 -{tol:.3e} (1e-6 of its Frobenius norm {norm:.6e}); it is not a covariance"
            )));
        }
        Ok(())
    }

    /// The Fréchet distance to `other` (see [`frechet_distance`]).
    pub fn frechet_distance(&self, other: &Statistics) -> Result<f64, StatsError> {
        frechet_distance(self, other)
    }
}

/// ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½, in float64.
///
/// pytorch-fid takes scipy's `sqrtm` of the non-symmetric Σ₁Σ₂ and drops the imaginary part rounding
/// leaves; with fewer samples than dimensions (a singular Σ) that needs an ε·I retry. Only the trace is
/// needed, and it is a sum over eigenvalues: with S = Σ₁^½, S Σ₂ S is similar to Σ₁Σ₂ (Σ₁Σ₂ =
/// S (S Σ₂ S) S⁻¹ when S is invertible, and by continuity otherwise), symmetric and positive
/// semi-definite, so tr (Σ₁Σ₂)^½ = Σᵢ √λᵢ(S Σ₂ S) with real λᵢ ≥ 0. Two symmetric eigendecompositions do
/// it; see [`psd_sqrt`] for the eigenvalues that are zero up to rounding.
pub fn frechet_distance(a: &Statistics, b: &Statistics) -> Result<f64, StatsError> {
    if a.dim() != b.dim() {
        return Err(StatsError::Invalid(format!(
            "the two statistics have different dimensions ({} and {})",
            a.dim(),
            b.dim()
        )));
    }
    let diff = a.mu.f_sub(&b.mu)?;
    let mean_term = diff.f_dot(&diff)?.f_double_value(&[])?;
    let (values, vectors) = a.sigma.f_linalg_eigh("L")?;
    // S = V diag(√λ) Vᵀ.
    let root = vectors
        .f_mul(&psd_sqrt(&values)?.f_unsqueeze(0)?)?
        .f_matmul(&vectors.f_tr()?)?;
    let inner = root.f_matmul(&b.sigma)?.f_matmul(&root)?;
    let inner = inner.f_add(&inner.f_tr()?)?.f_mul_scalar(0.5)?;
    let trace_root = psd_sqrt(&inner.f_linalg_eigvalsh("L")?)?
        .f_sum(Kind::Double)?
        .f_double_value(&[])?;
    let trace = |s: &Tensor| -> Result<f64, StatsError> {
        Ok(s.f_diagonal(0, 0, 1)?
            .f_sum(Kind::Double)?
            .f_double_value(&[])?)
    };
    Ok(mean_term + trace(&a.sigma)? + trace(&b.sigma)? - 2.0 * trace_root)
}

/// √λ of the eigenvalues of a symmetric PSD matrix, with those within rounding of zero (|λ| ≤ D·ε·λmax,
/// the accuracy of a symmetric eigensolver) set to zero first. With fewer samples than dimensions most
/// eigenvalues are zero, and the square root would turn their ±1e−16 rounding into ±1e−8 each: a
/// distribution would sit ~1e−6 from itself. Dropping them misses at most √(D·ε·λmax) per true eigenvalue
/// that small, the size of the rounding it removes.
fn psd_sqrt(values: &Tensor) -> Result<Tensor, StatsError> {
    let d = values.size()[0] as f64;
    let largest = values.f_max()?.f_double_value(&[])?.max(0.0);
    let keep = values.f_gt(largest * d * f64::EPSILON)?;
    Ok(values.f_clamp_min(0.0)?.f_mul(&keep)?.f_sqrt()?)
}

/// Inception Score over `splits` splits: the mean and the (population) standard deviation.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct InceptionScore {
    pub mean: f64,
    pub std: f64,
    pub splits: usize,
}

/// Streaming accumulator of FID and sFID statistics and, when set up with the number of images to
/// come, the Inception Score. Feed it batches with [`FeatureStats::add_images`] (uint8 NHWC images
/// through the network) or [`FeatureStats::add`] (features already computed), then read
/// [`FeatureStats::statistics`], [`FeatureStats::spatial_statistics`] and
/// [`FeatureStats::inception_score`].
#[derive(Debug)]
pub struct FeatureStats {
    device: Device,
    /// Global index of this accumulator's first image (its place in the Inception Score's splits).
    first: u64,
    pool3: Moments,
    /// Only batches that came with their spatial features count here ([`FeatureStats::add_raw`]
    /// brings none).
    spatial: Moments,
    score: Option<SplitSums>,
}

/// Streaming mean and covariance of feature vectors.
#[derive(Debug, Default)]
struct Moments {
    count: u64,
    /// The first batch's mean: sums are taken of x − shift, so that the covariance is a difference of
    /// numbers of the size of the spread, not of the (much larger) squared mean.
    shift: Option<Tensor>,
    sum: Option<Tensor>,
    sum_outer: Option<Tensor>,
}

impl Moments {
    fn dim(&self) -> Option<i64> {
        self.sum.as_ref().map(|s| s.size()[0])
    }

    /// Refuses a batch before anything is accumulated from it, so that a refused batch leaves every
    /// sum of the accumulator as it was.
    fn check(&self, features: &Tensor, what: &str) -> Result<(), StatsError> {
        let size = features.size();
        if size.len() != 2 || size[0] == 0 {
            return Err(StatsError::Invalid(format!(
                "{what} must have shape (B, D) with B > 0, got {size:?}"
            )));
        }
        if let Some(d) = self.dim() {
            if d != size[1] {
                return Err(StatsError::Invalid(format!(
                    "{what} have {} dimensions, earlier batches had {d}",
                    size[1]
                )));
            }
        }
        Ok(())
    }

    fn add(&mut self, features: &Tensor, device: Device) -> Result<(), StatsError> {
        let (b, d) = (features.size()[0], features.size()[1]);
        let x = features.f_to_device(device)?.f_to_kind(Kind::Double)?;
        let shift = match &self.shift {
            Some(s) => s.shallow_clone(),
            None => {
                let s = x.f_mean_dim(0, false, Kind::Double)?;
                self.shift = Some(s.shallow_clone());
                self.sum = Some(Tensor::zeros([d], (Kind::Double, device)));
                self.sum_outer = Some(Tensor::zeros([d, d], (Kind::Double, device)));
                s
            }
        };
        let x = x.f_sub(&shift)?;
        let (sum, sum_outer) = match (&mut self.sum, &mut self.sum_outer) {
            (Some(s), Some(o)) => (s, o),
            _ => unreachable!("allocated with the shift"),
        };
        let _ = sum.f_add_(&x.f_sum_dim_intlist(0, false, Kind::Double)?)?;
        let _ = sum_outer.f_addmm_(&x.f_tr()?, &x)?;
        self.count += b as u64;
        Ok(())
    }

    /// See [`FeatureStats::reduce`]. With `skip_if_empty`, sets that no rank has any vector of end
    /// after the first all-reduce (every rank sees the same total, so all of them skip together).
    fn reduce(
        &mut self,
        dim: i64,
        device: Device,
        skip_if_empty: bool,
        sum_all: &mut dyn FnMut(&Tensor) -> Result<(), StatsError>,
    ) -> Result<(), StatsError> {
        let opts = (Kind::Double, device);
        let zeros_like_dim = || Tensor::zeros([dim], opts);
        let shift = self
            .shift
            .as_ref()
            .map_or_else(zeros_like_dim, Tensor::shallow_clone);
        let sum = self
            .sum
            .as_ref()
            .map_or_else(zeros_like_dim, Tensor::shallow_clone);
        let n = self.count as f64;
        // Phase 1: Σx and N over the ranks → the global mean.
        let totals = Tensor::cat(
            &[
                sum.f_add(&shift.f_mul_scalar(n)?)?,
                Tensor::from_slice(&[n]).f_to_device(device)?,
            ],
            0,
        );
        sum_all(&totals)?;
        let total = totals.f_get(dim)?.f_double_value(&[])?;
        if skip_if_empty && total == 0.0 {
            return Ok(());
        }
        let sum_outer = self
            .sum_outer
            .as_ref()
            .map_or_else(|| Tensor::zeros([dim, dim], opts), Tensor::shallow_clone);
        let mean = totals.f_narrow(0, 0, dim)?.f_div_scalar(total.max(1.0))?;
        // Phase 2: own sums about the global mean, d = shift − mean:
        // Σ(x−m) = S + n·d,  Σ(x−m)(x−m)ᵀ = O + d Sᵀ + S dᵀ + n d dᵀ.
        let d = shift.f_sub(&mean)?;
        let centred = sum.f_add(&d.f_mul_scalar(n)?)?;
        let outer = sum_outer
            .f_add(&d.f_outer(&sum)?)?
            .f_add(&sum.f_outer(&d)?)?
            .f_add(&d.f_outer(&d)?.f_mul_scalar(n)?)?;
        sum_all(&centred)?;
        sum_all(&outer)?;
        self.shift = Some(mean);
        self.sum = Some(centred);
        self.sum_outer = Some(outer);
        self.count = total.round() as u64;
        Ok(())
    }

    fn statistics(&self, what: &str) -> Result<Statistics, StatsError> {
        let (Some(shift), Some(sum), Some(sum_outer)) = (&self.shift, &self.sum, &self.sum_outer)
        else {
            return Err(StatsError::Invalid(format!("no {what} were added")));
        };
        if self.count < 2 {
            return Err(StatsError::Invalid(format!(
                "a covariance needs at least 2 images, got {}",
                self.count
            )));
        }
        let n = self.count as f64;
        let mean_offset = sum.f_div_scalar(n)?;
        let mu = shift.f_add(&mean_offset)?;
        // Σ (x−s)(x−s)ᵀ − n (m−s)(m−s)ᵀ = Σ (x−m)(x−m)ᵀ.
        let outer = mean_offset.f_outer(sum)?;
        let sigma = sum_outer.f_sub(&outer)?.f_div_scalar(n - 1.0)?;
        Statistics::new(&mu, &sigma)
    }
}

/// Per-split sums for the Inception Score: Σ p(y|x) (splits, C) and Σ Σ_y p log p (splits).
#[derive(Debug)]
struct SplitSums {
    /// Split k holds images bounds[k]..bounds[k + 1].
    bounds: Vec<u64>,
    probabilities: Option<Tensor>,
    neg_entropy: Tensor,
}

impl FeatureStats {
    /// FID statistics only; sums live on `device` (where the features are made).
    pub fn new(device: Device) -> Self {
        FeatureStats {
            device,
            first: 0,
            pool3: Moments::default(),
            spatial: Moments::default(),
            score: None,
        }
    }

    /// FID statistics and the Inception Score of exactly `total` images. The standard splits are equal
    /// consecutive runs of the whole set (`i·N/10 .. (i+1)·N/10`), so N must be known before the first
    /// image; with fewer than 10 images each image is its own split.
    pub fn with_inception_score(total: usize, device: Device) -> Self {
        let splits = IS_SPLITS.min(total.max(1)) as u64;
        let total = total as u64;
        let bounds = (0..=splits).map(|k| k * total / splits).collect();
        FeatureStats {
            score: Some(SplitSums {
                bounds,
                probabilities: None,
                neg_entropy: Tensor::zeros([splits as i64], (Kind::Double, device)),
            }),
            ..FeatureStats::new(device)
        }
    }

    /// [`Self::with_inception_score`] for one share of the `total` images, the one starting at global
    /// index `first`: what one rank accumulates before [`Self::reduce`].
    pub fn share_of(total: usize, first: u64, device: Device) -> Self {
        FeatureStats {
            first,
            ..FeatureStats::with_inception_score(total, device)
        }
    }

    /// Combines the shares of every rank, in place on each: `sum_all` must replace a float64 tensor by
    /// its sum over the ranks (an all-reduce). Features are `dim` wide and logits `classes` wide (a
    /// share may be empty). Sums are re-centred on the global mean first, so the covariance keeps its
    /// digits as one accumulator's does.
    ///
    /// The spatial features are reduced too: every rank makes the same all-reduce calls, so a rank
    /// with none takes their width to be [`crate::inception::SPATIAL_FEATURES`] (299-px input), and
    /// when no rank has any, their sums stay empty after one small all-reduce.
    pub fn reduce(
        &mut self,
        dim: i64,
        classes: i64,
        sum_all: &mut dyn FnMut(&Tensor) -> Result<(), StatsError>,
    ) -> Result<(), StatsError> {
        self.pool3.reduce(dim, self.device, false, sum_all)?;
        let spatial_dim = self
            .spatial
            .dim()
            .unwrap_or(crate::inception::SPATIAL_FEATURES);
        self.spatial
            .reduce(spatial_dim, self.device, true, sum_all)?;
        self.first = 0;
        if let Some(score) = &mut self.score {
            let splits = score.bounds.len() as i64 - 1;
            let probabilities = score
                .probabilities
                .take()
                .unwrap_or_else(|| Tensor::zeros([splits, classes], (Kind::Double, self.device)));
            sum_all(&probabilities)?;
            sum_all(&score.neg_entropy)?;
            score.probabilities = Some(probabilities);
        }
        Ok(())
    }

    /// Images added so far.
    pub fn count(&self) -> u64 {
        self.pool3.count
    }

    /// uint8 images (B, H, W, 3), any size, on any device → Inception features → accumulated.
    pub fn add_images(&mut self, inception: &Inception, images: &Tensor) -> Result<(), StatsError> {
        let features = inception.features(images)?;
        self.add(&features)
    }

    /// Accumulates one batch of network outputs: `pool3` for FID, `spatial` for sFID,
    /// `logits_unbiased` for the score.
    pub fn add(&mut self, features: &Features) -> Result<(), StatsError> {
        self.spatial.check(&features.spatial, "spatial features")?;
        if features.spatial.size()[0] != features.pool3.size()[0] {
            return Err(StatsError::Invalid(format!(
                "spatial features have {} rows, pool3 features {}",
                features.spatial.size()[0],
                features.pool3.size()[0]
            )));
        }
        self.add_raw(&features.pool3, Some(&features.logits_unbiased))?;
        self.spatial.add(&features.spatial, self.device)
    }

    /// Accumulates feature vectors (B, D) and, when the Inception Score is kept, their class logits
    /// (B, C) (softmax over all C; see [`crate::inception::Features::logits_unbiased`]). No spatial
    /// features: add those with [`Self::add_spatial_raw`].
    pub fn add_raw(
        &mut self,
        features: &Tensor,
        logits: Option<&Tensor>,
    ) -> Result<(), StatsError> {
        self.pool3.check(features, "features")?;
        let b = features.size()[0];
        if let Some(score) = &mut self.score {
            let logits = logits.ok_or_else(|| {
                StatsError::Invalid("the Inception Score needs the logits of every batch".into())
            })?;
            score.add(logits, self.first + self.pool3.count, b as u64, self.device)?;
        }
        self.pool3.add(features, self.device)
    }

    /// Accumulates spatial features (B, D) for [`Self::spatial_statistics`] alone: for callers that
    /// read features from elsewhere than [`Self::add`] (a cache), next to [`Self::add_raw`].
    pub fn add_spatial_raw(&mut self, spatial: &Tensor) -> Result<(), StatsError> {
        self.spatial.check(spatial, "spatial features")?;
        self.spatial.add(spatial, self.device)
    }

    /// Mean and covariance (N − 1 normalisation, as `np.cov`) of everything added.
    pub fn statistics(&self) -> Result<Statistics, StatsError> {
        self.pool3.statistics("images")
    }

    /// Mean and covariance of the spatial features added, what sFID compares (the ADM evaluator's
    /// `compute_statistics` of its spatial activations: `np.mean`, `np.cov(rowvar=False)`).
    pub fn spatial_statistics(&self) -> Result<Statistics, StatsError> {
        self.spatial.statistics("spatial features")
    }

    /// The Inception Score; fails unless set up with [`FeatureStats::with_inception_score`] and fed
    /// exactly the announced number of images.
    pub fn inception_score(&self) -> Result<InceptionScore, StatsError> {
        let score = self.score.as_ref().ok_or_else(|| {
            StatsError::Invalid("this accumulator was not set up for the Inception Score".into())
        })?;
        score.finish(self.pool3.count)
    }
}

impl SplitSums {
    fn total(&self) -> u64 {
        *self.bounds.last().expect("at least one bound")
    }

    fn add(
        &mut self,
        logits: &Tensor,
        start: u64,
        b: u64,
        device: Device,
    ) -> Result<(), StatsError> {
        let size = logits.size();
        if size.len() != 2 || size[0] as u64 != b {
            return Err(StatsError::Invalid(format!(
                "logits must have shape ({b}, C) like the features, got {size:?}"
            )));
        }
        if start + b > self.total() {
            return Err(StatsError::Invalid(format!(
                "the Inception Score was set up for {} images; this batch brings the count to {}",
                self.total(),
                start + b
            )));
        }
        // Each image's split, so one index_add per batch handles batches that straddle a boundary.
        let split_of: Vec<i64> = (start..start + b)
            .map(|i| (self.bounds.partition_point(|&bound| bound <= i) - 1) as i64)
            .collect();
        let index = Tensor::from_slice(&split_of).f_to_device(device)?;
        let log_p = logits
            .f_to_device(device)?
            .f_to_kind(Kind::Double)?
            .f_log_softmax(1, Kind::Double)?;
        let p = log_p.f_exp()?;
        let neg_entropy = p.f_mul(&log_p)?.f_sum_dim_intlist(1, false, Kind::Double)?;
        let splits = self.bounds.len() as i64 - 1;
        let probabilities = match &mut self.probabilities {
            Some(t) => t,
            None => self
                .probabilities
                .insert(Tensor::zeros([splits, size[1]], (Kind::Double, device))),
        };
        if probabilities.size()[1] != size[1] {
            return Err(StatsError::Invalid(format!(
                "logits have {} classes, earlier batches had {}",
                size[1],
                probabilities.size()[1]
            )));
        }
        let _ = probabilities.f_index_add_(0, &index, &p)?;
        let _ = self.neg_entropy.f_index_add_(0, &index, &neg_entropy)?;
        Ok(())
    }

    fn finish(&self, count: u64) -> Result<InceptionScore, StatsError> {
        if count != self.total() || count == 0 {
            return Err(StatsError::Invalid(format!(
                "the Inception Score was set up for {} images, {count} were added",
                self.total()
            )));
        }
        let probabilities = self
            .probabilities
            .as_ref()
            .expect("count > 0 means a batch was added")
            .f_to_device(Device::Cpu)?;
        let neg_entropy = Vec::<f64>::try_from(self.neg_entropy.f_to_device(Device::Cpu)?)?;
        let mut scores = Vec::with_capacity(neg_entropy.len());
        for (k, window) in self.bounds.windows(2).enumerate() {
            let n = (window[1] - window[0]) as f64;
            // E_x KL(p(y|x) ‖ p(y)) = E_x Σ p log p − Σ p̄ log p̄ over the split, p̄ its mean.
            let marginal = probabilities.f_get(k as i64)?.f_div_scalar(n)?;
            let marginal_term = marginal
                .f_xlogy(&marginal)?
                .f_sum(Kind::Double)?
                .f_double_value(&[])?;
            scores.push((neg_entropy[k] / n - marginal_term).exp());
        }
        let mean = scores.iter().sum::<f64>() / scores.len() as f64;
        let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / scores.len() as f64;
        Ok(InceptionScore {
            mean,
            std: var.sqrt(),
            splits: scores.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Features and logits of n images added in batches of `batch` rows.
    fn in_batches(features: &Tensor, logits: &Tensor, batch: i64) -> FeatureStats {
        let n = features.size()[0];
        let mut stats = FeatureStats::with_inception_score(n as usize, Device::Cpu);
        for start in (0..n).step_by(batch as usize) {
            let len = batch.min(n - start);
            stats
                .add_raw(
                    &features.narrow(0, start, len),
                    Some(&logits.narrow(0, start, len)),
                )
                .unwrap();
        }
        stats
    }

    fn cov_reference(x: &Tensor) -> Tensor {
        let n = x.size()[0] as f64;
        let centred = x - x.mean_dim(0, true, Kind::Double);
        centred.tr().matmul(&centred) / (n - 1.0)
    }

    /// An all-reduce among threads, for testing [`FeatureStats::reduce`] without a process group.
    struct ThreadGroup {
        barrier: std::sync::Barrier,
        acc: std::sync::Mutex<Option<Tensor>>,
    }

    impl ThreadGroup {
        fn sum_all(&self, t: &Tensor) {
            {
                let mut acc = self.acc.lock().unwrap();
                match acc.as_mut() {
                    None => *acc = Some(t.copy()),
                    Some(sum) => {
                        let _ = sum.f_add_(t).unwrap();
                    }
                }
            }
            self.barrier.wait();
            t.shallow_clone()
                .copy_(self.acc.lock().unwrap().as_ref().unwrap());
            if self.barrier.wait().is_leader() {
                *self.acc.lock().unwrap() = None;
            }
            self.barrier.wait();
        }
    }

    /// Shares accumulated apart (each with its own shift, one of them empty) and reduced equal one
    /// accumulator of everything, on every rank.
    #[test]
    fn shares_reduced_over_ranks_equal_one_accumulator() {
        tch::manual_seed(3);
        let n = 23;
        let x = Tensor::randn([n, 6], (Kind::Double, Device::Cpu)) * 0.2 + 5.0;
        let logits = Tensor::randn([n, 4], (Kind::Double, Device::Cpu)) * 2.0;
        // Spatial features as wide as the network's, since the empty share assumes that width.
        let spatial_dim = crate::inception::SPATIAL_FEATURES;
        let sx = Tensor::randn([n, spatial_dim], (Kind::Double, Device::Cpu)) * 0.3 + 2.0;
        let mut whole = in_batches(&x, &logits, 4);
        whole.add_spatial_raw(&sx).unwrap();
        let expected = whole.statistics().unwrap();
        let expected_spatial = whole.spatial_statistics().unwrap();
        let expected_is = whole.inception_score().unwrap();
        let ranges = [(0i64, 9i64), (9, 23), (23, 23)];
        let group = std::sync::Arc::new(ThreadGroup {
            barrier: std::sync::Barrier::new(ranges.len()),
            acc: std::sync::Mutex::new(None),
        });
        let handles: Vec<_> = ranges
            .iter()
            .map(|&(a, b)| {
                let (x, sx, logits, group) = (x.copy(), sx.copy(), logits.copy(), group.clone());
                std::thread::spawn(move || {
                    let mut s = FeatureStats::share_of(n as usize, a as u64, Device::Cpu);
                    for start in (a..b).step_by(4) {
                        let len = 4.min(b - start);
                        s.add_raw(
                            &x.narrow(0, start, len),
                            Some(&logits.narrow(0, start, len)),
                        )
                        .unwrap();
                        s.add_spatial_raw(&sx.narrow(0, start, len)).unwrap();
                    }
                    s.reduce(6, 4, &mut |t| {
                        group.sum_all(t);
                        Ok(())
                    })
                    .unwrap();
                    let st = s.statistics().unwrap();
                    let is = s.inception_score().unwrap();
                    (
                        Vec::<f64>::try_from(st.mu.reshape([-1])).unwrap(),
                        Vec::<f64>::try_from(st.sigma.reshape([-1])).unwrap(),
                        is.mean,
                        is.std,
                        s.spatial_statistics().unwrap(),
                    )
                })
            })
            .collect();
        let mu = Vec::<f64>::try_from(expected.mu.reshape([-1])).unwrap();
        let sigma = Vec::<f64>::try_from(expected.sigma.reshape([-1])).unwrap();
        for h in handles {
            let (m, sg, is_mean, is_std, spatial) = h.join().unwrap();
            for (a, b) in m.iter().zip(&mu).chain(sg.iter().zip(&sigma)) {
                assert!((a - b).abs() < 1e-12, "{a} vs {b}");
            }
            assert!((is_mean - expected_is.mean).abs() < 1e-12 * expected_is.mean);
            assert!((is_std - expected_is.std).abs() < 1e-9);
            for (ours, theirs) in [
                (&spatial.mu, &expected_spatial.mu),
                (&spatial.sigma, &expected_spatial.sigma),
            ] {
                let diff = (ours - theirs).abs().max().double_value(&[]);
                assert!(diff < 1e-12, "spatial statistics differ by {diff:e}");
            }
        }
    }

    /// Without spatial features anywhere, the reduction leaves them empty, and says so when asked.
    #[test]
    fn reduce_without_spatial_features_keeps_them_empty() {
        let x = Tensor::randn([5, 3], (Kind::Double, Device::Cpu));
        let mut s = FeatureStats::new(Device::Cpu);
        s.add_raw(&x, None).unwrap();
        s.reduce(3, 2, &mut |_| Ok(())).unwrap();
        assert_eq!(s.count(), 5);
        s.statistics().unwrap();
        let msg = s.spatial_statistics().unwrap_err().to_string();
        assert!(msg.contains("no spatial features"), "{msg}");
        // Spatial rows must match the pool3 rows of the same batch.
        let mut net = FeatureStats::new(Device::Cpu);
        let features = Features {
            pool3: x.shallow_clone(),
            logits: Tensor::zeros([5, 2], (Kind::Float, Device::Cpu)),
            logits_unbiased: Tensor::zeros([5, 2], (Kind::Float, Device::Cpu)),
            spatial: Tensor::zeros([4, 7], (Kind::Float, Device::Cpu)),
        };
        assert!(net.add(&features).is_err());
        assert_eq!(net.count(), 0);
    }

    #[test]
    fn streaming_mean_and_covariance_match_the_direct_formulas() {
        tch::manual_seed(0);
        // A large common offset: the naive Σxxᵀ − n μμᵀ would lose digits to it.
        let x = Tensor::randn([37, 5], (Kind::Double, Device::Cpu)) * 0.1 + 1000.0;
        let mut stats = FeatureStats::new(Device::Cpu);
        for chunk in x.split_with_sizes([10, 1, 26], 0) {
            stats.add_raw(&chunk.to_kind(Kind::Float), None).unwrap();
        }
        assert_eq!(stats.count(), 37);
        let s = stats.statistics().unwrap();
        let x32 = x.to_kind(Kind::Float).to_kind(Kind::Double);
        let mu_err = (&s.mu - x32.mean_dim(0, false, Kind::Double))
            .abs()
            .max()
            .double_value(&[]);
        let cov_err = (&s.sigma - cov_reference(&x32))
            .abs()
            .max()
            .double_value(&[]);
        assert!(mu_err < 1e-9 && cov_err < 1e-9, "{mu_err:e} {cov_err:e}");
    }

    #[test]
    fn frechet_distance_of_known_gaussians() {
        // Diagonal covariances: FID = ‖Δμ‖² + Σ (√a − √b)².
        let a = Statistics::new(
            &Tensor::from_slice(&[0.0, 1.0, 2.0]),
            &Tensor::from_slice(&[1.0, 4.0, 9.0]).diag(0),
        )
        .unwrap();
        let b = Statistics::new(
            &Tensor::from_slice(&[1.0, 1.0, 0.0]),
            &Tensor::from_slice(&[4.0, 4.0, 1.0]).diag(0),
        )
        .unwrap();
        let expected = (1.0 + 0.0 + 4.0) + (1.0 + 0.0 + 4.0);
        assert!((frechet_distance(&a, &b).unwrap() - expected).abs() < 1e-12);
        // A distribution against itself, also with a singular covariance.
        tch::manual_seed(1);
        let x = Tensor::randn([4, 16], (Kind::Double, Device::Cpu));
        let own = Statistics::new(&x.mean_dim(0, false, Kind::Double), &cov_reference(&x)).unwrap();
        assert!(frechet_distance(&own, &own).unwrap().abs() < 1e-12);
    }

    #[test]
    fn bad_statistics_are_rejected() {
        let mu = Tensor::zeros([3], (Kind::Double, Device::Cpu));
        let msg = Statistics::new(&mu, &Tensor::eye(4, (Kind::Double, Device::Cpu)))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("(D, D)"), "{msg}");
        let nan = Tensor::from_slice(&[f64::NAN, 0.0, 0.0]);
        let msg = Statistics::new(&nan, &Tensor::eye(3, (Kind::Double, Device::Cpu)))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("NaN"), "{msg}");
        let stats = FeatureStats::new(Device::Cpu);
        assert!(stats.statistics().is_err());
    }

    #[test]
    fn only_covariances_pass_the_covariance_check() {
        let cpu = (Kind::Double, Device::Cpu);
        let check = |sigma: &Tensor| {
            let mu = Tensor::zeros([sigma.size()[0]], cpu);
            Statistics::new(&mu, sigma).unwrap().check_covariance()
        };
        // Covariances of fewer samples than dimensions (singular), also rounded through float32.
        tch::manual_seed(3);
        let x = Tensor::randn([5, 64], cpu);
        let sigma = cov_reference(&x);
        check(&sigma).unwrap();
        check(&sigma.to_kind(Kind::Float).to_kind(Kind::Double)).unwrap();
        check(&Tensor::zeros([4, 4], cpu)).unwrap();
        // An eigenvalue of −1e−3 of the largest is not rounding.
        let bent = Tensor::from_slice(&[1.0, 1.0, -1e-3]).diag(0);
        let msg = check(&bent).unwrap_err().to_string();
        assert!(
            msg.contains("not positive semi-definite") && msg.contains("-1.0"),
            "{msg}"
        );
        let msg = check(&(sigma.shallow_clone() * -1.0))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not positive semi-definite"), "{msg}");
        let skew = Tensor::from_slice(&[2.0, 0.5, 0.0, 2.0]).view([2, 2]);
        let msg = check(&skew).unwrap_err().to_string();
        assert!(msg.contains("not symmetric"), "{msg}");
    }

    #[test]
    fn inception_score_extremes_and_split_bookkeeping() {
        // Confident and uniform over 4 classes in every split: IS = 4.
        let classes = 4;
        let n = 40;
        let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(classes);
        let logits = labels.one_hot(classes).to_kind(Kind::Float) * 100.0;
        let features = Tensor::randn([n, 3], (Kind::Float, Device::Cpu));
        // Batches of 7 straddle the split boundaries (every 4 images).
        let stats = in_batches(&features, &logits, 7);
        let score = stats.inception_score().unwrap();
        assert_eq!(score.splits, 10);
        assert!(
            (score.mean - 4.0).abs() < 1e-6 && score.std < 1e-6,
            "{score:?}"
        );

        // Identical predictions everywhere: IS = 1.
        let mut flat = FeatureStats::with_inception_score(3, Device::Cpu);
        flat.add_raw(
            &features.narrow(0, 0, 3),
            Some(&Tensor::ones([3, 5], (Kind::Float, Device::Cpu))),
        )
        .unwrap();
        let score = flat.inception_score().unwrap();
        assert_eq!(score.splits, 3);
        assert!((score.mean - 1.0).abs() < 1e-12);

        // More images than announced, and fewer.
        let err = flat
            .add_raw(&features.narrow(0, 0, 1), Some(&logits.narrow(0, 0, 1)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("set up for 3 images"), "{err}");
        let short = FeatureStats::with_inception_score(5, Device::Cpu);
        assert!(short.inception_score().is_err());
    }
}
