//! The rest of the evaluation table after FID, sFID and IS: improved precision and recall
//! (Kynkäänniemi et al. 2019) and the Kernel Inception Distance (Bińkowski et al. 2018), on feature
//! sets that fit in memory (50 000 × 2048 float32 is 400 MB) but whose pairwise distances do not.
//!
//! Precision and recall follow the ADM evaluator's `ManifoldEstimator` (openai/guided-diffusion
//! `evaluations/evaluator.py`, itself adapted from the paper's code) with its defaults: one
//! neighbourhood size k = 3, no radius clamping. KID follows torch-fidelity and clean-fid: the
//! unbiased MMD² under the cubic polynomial kernel, averaged over random subsets.

use tch::{Device, Kind, Tensor};

use crate::feature_stats::StatsError;

/// The ADM evaluator's (and the paper's) neighbourhood size.
pub const NHOOD: i64 = 3;

/// (precision, recall) of `samples` against `reference`, both (N, D) float32 on one device.
///
/// The radius of a point is its squared euclidean distance to the k-th nearest point of its own set,
/// counting the point itself as the 0-th (the evaluator's `_numpy_partition(…)[:, k]` over a row
/// that includes the point). A vector lies in a set's manifold when its squared distance to some
/// point of the set is at most that point's radius. Precision is the fraction of samples in the
/// reference manifold, recall the fraction of reference points in the sample manifold.
///
/// Squared distances are ‖u‖² − 2u·v + ‖v‖² clamped at 0, as the evaluator's
/// `_batch_pairwise_distances`, in float32 on the features' device. (The evaluator first tries
/// float16 and keeps it when finite; its comparisons then differ from exact ones wherever float16
/// rounding crosses a radius, so float32 is the closer of the two to the definition.) Work is done in
/// blocks of `batch` rows against a whole set: one `batch` × N float32 block of distances exists at a
/// time (besides a boolean mask of it and the k-th-value selection's workspace), never N × N; nothing
/// is read back to the host before the two final fractions.
pub fn precision_recall(
    reference: &Tensor,
    samples: &Tensor,
    k: i64,
    batch: i64,
) -> Result<(f64, f64), StatsError> {
    let (nr, ns, _) = check_pair(reference, samples)?;
    if k < 1 || batch < 1 {
        return Err(StatsError::Invalid(format!(
            "the neighbourhood size and the batch must be at least 1, got k = {k}, batch = {batch}"
        )));
    }
    if nr <= k || ns <= k {
        return Err(StatsError::Invalid(format!(
            "a neighbourhood of {k} needs more than {k} points in each set, got {nr} reference \
             points and {ns} samples"
        )));
    }
    if samples.device() != reference.device() {
        return Err(StatsError::Invalid(format!(
            "reference on {:?}, samples on {:?}: put both on one device",
            reference.device(),
            samples.device()
        )));
    }
    let reference = reference.f_to_kind(Kind::Float)?;
    let samples = samples.f_to_kind(Kind::Float)?;
    tch::no_grad(|| {
        let ref_norms = squared_norms(&reference)?;
        let sample_norms = squared_norms(&samples)?;
        let ref_radii = radii(&reference, &ref_norms, k, batch)?;
        let sample_radii = radii(&samples, &sample_norms, k, batch)?;
        let device = reference.device();
        let samples_in = Tensor::f_zeros([ns], (Kind::Bool, device))?;
        let mut reference_in = Tensor::f_zeros([nr], (Kind::Bool, device))?;
        for start in (0..ns).step_by(batch as usize) {
            let len = batch.min(ns - start);
            let rows = samples.f_narrow(0, start, len)?;
            let d = squared_distances(
                &rows,
                &sample_norms.f_narrow(0, start, len)?,
                &reference,
                &ref_norms,
            )?;
            let in_reference = d
                .f_le_tensor(&ref_radii.f_unsqueeze(0)?)?
                .f_any_dim(1, false)?;
            samples_in.f_narrow(0, start, len)?.f_copy_(&in_reference)?;
            let radii_rows = sample_radii.f_narrow(0, start, len)?.f_unsqueeze(1)?;
            let covered = d.f_le_tensor(&radii_rows)?.f_any_dim(0, false)?;
            reference_in = reference_in.f_logical_or(&covered)?;
        }
        let fraction = |t: &Tensor| -> Result<f64, StatsError> {
            Ok(t.f_to_kind(Kind::Double)?
                .f_mean(Kind::Double)?
                .f_double_value(&[])?)
        };
        Ok((fraction(&samples_in)?, fraction(&reference_in)?))
    })
}

/// KID of feature sets `a` (N_a, D) and `b` (N_b, D): (mean, population std) over `subsets` subsets of
/// the unbiased MMD² with kernel k(x, y) = (x·y / D + 1)³, as torch-fidelity's `kid_features_to_metric`
/// (and clean-fid's `kernel_distance`, whose mean is the same estimator).
///
/// Each subset draws min(`subset_size`, N) rows without replacement from each set (see
/// [`kid_subset_indices`]); with unequal sizes m, n the estimator is Σ_{i≠j} k(xᵢ,xⱼ)/(m(m−1)) +
/// Σ_{i≠j} k(yᵢ,yⱼ)/(n(n−1)) − 2 Σ k(xᵢ,yⱼ)/(mn), which is torch-fidelity's when m = n. The draws come
/// from SplitMix64 seeded with `seed`, not numpy's `RandomState`, so the subsets (and with several
/// subsets, the numbers) differ from torch-fidelity's for the same seed; a subset as large as both
/// sets takes each whole and agrees with it exactly.
///
/// Kernel products are float32 matrix products on the features' device; the cube and the sums are
/// float64, since MMD² is a small difference of sums of large kernel values.
pub fn kid(
    a: &Tensor,
    b: &Tensor,
    subsets: usize,
    subset_size: usize,
    seed: u64,
) -> Result<(f64, f64), StatsError> {
    let (na, nb, _) = check_pair(a, b)?;
    let subset_list = kid_subset_indices(na, nb, subsets, subset_size, seed)?;
    kid_of_subsets(a, b, &subset_list)
}

/// The row indices [`kid`] draws: for each subset, min(`subset_size`, N_a) distinct rows of `a` and
/// min(`subset_size`, N_b) of `b`, each a partial Fisher–Yates shuffle of 0..N driven by one
/// SplitMix64 stream (a's draw, then b's, subset after subset).
pub fn kid_subset_indices(
    na: i64,
    nb: i64,
    subsets: usize,
    subset_size: usize,
    seed: u64,
) -> Result<Vec<[Vec<i64>; 2]>, StatsError> {
    if subsets == 0 {
        return Err(StatsError::Invalid("KID needs at least one subset".into()));
    }
    let ma = (subset_size as i64).min(na);
    let mb = (subset_size as i64).min(nb);
    if ma < 2 || mb < 2 {
        return Err(StatsError::Invalid(format!(
            "the unbiased MMD needs at least 2 rows from each set, got subsets of {ma} and {mb} \
             (sets of {na} and {nb}, subset size {subset_size})"
        )));
    }
    let mut rng = SplitMix64(seed);
    Ok((0..subsets)
        .map(|_| [rng.choose(na, ma), rng.choose(nb, mb)])
        .collect())
}

/// [`kid`] over given subsets (row indices of `a` and of `b`, as [`kid_subset_indices`] makes them).
pub fn kid_of_subsets(
    a: &Tensor,
    b: &Tensor,
    subsets: &[[Vec<i64>; 2]],
) -> Result<(f64, f64), StatsError> {
    let (_, _, d) = check_pair(a, b)?;
    if subsets.is_empty() {
        return Err(StatsError::Invalid("KID needs at least one subset".into()));
    }
    let a = a.f_to_kind(Kind::Float)?;
    let b = b.f_to_kind(Kind::Float)?;
    let mut values = Vec::with_capacity(subsets.len());
    tch::no_grad(|| -> Result<(), StatsError> {
        for [ia, ib] in subsets {
            let (m, n) = (ia.len() as f64, ib.len() as f64);
            if m < 2.0 || n < 2.0 {
                return Err(StatsError::Invalid(
                    "the unbiased MMD needs at least 2 rows from each set".into(),
                ));
            }
            let x = a.f_index_select(0, &Tensor::from_slice(ia).f_to_device(a.device())?)?;
            let y = b.f_index_select(0, &Tensor::from_slice(ib).f_to_device(b.device())?)?;
            let kernel = |u: &Tensor, v: &Tensor| -> Result<Tensor, StatsError> {
                let dot = u.f_matmul(&v.f_tr()?)?.f_to_kind(Kind::Double)?;
                Ok(dot
                    .f_div_scalar(d as f64)?
                    .f_add_scalar(1.0)?
                    .f_pow_tensor_scalar(3)?)
            };
            let off_diagonal_sum = |k: &Tensor| -> Result<Tensor, StatsError> {
                Ok(k.f_sum(Kind::Double)?
                    .f_sub(&k.f_diagonal(0, 0, 1)?.f_sum(Kind::Double)?)?)
            };
            let xx = off_diagonal_sum(&kernel(&x, &x)?)?.f_div_scalar(m * (m - 1.0))?;
            let yy = off_diagonal_sum(&kernel(&y, &y)?)?.f_div_scalar(n * (n - 1.0))?;
            let xy = kernel(&x, &y)?
                .f_sum(Kind::Double)?
                .f_mul_scalar(2.0 / (m * n))?;
            values.push(xx.f_add(&yy)?.f_sub(&xy)?);
        }
        Ok(())
    })?;
    // One read-back for all subsets.
    let values = Vec::<f64>::try_from(Tensor::f_stack(&values, 0)?.f_to_device(Device::Cpu)?)?;
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
    Ok((mean, var.sqrt()))
}

/// Both sets (N, D) with N > 0 and the same D → (N_a, N_b, D).
fn check_pair(a: &Tensor, b: &Tensor) -> Result<(i64, i64, i64), StatsError> {
    let (sa, sb) = (a.size(), b.size());
    if sa.len() != 2 || sb.len() != 2 || sa[0] == 0 || sb[0] == 0 || sa[1] == 0 || sa[1] != sb[1] {
        return Err(StatsError::Invalid(format!(
            "feature sets must have shapes (N, D) and (M, D) with N, M, D > 0, got {sa:?} and {sb:?}"
        )));
    }
    Ok((sa[0], sb[0], sa[1]))
}

fn squared_norms(x: &Tensor) -> Result<Tensor, StatsError> {
    Ok(x.f_square()?.f_sum_dim_intlist(1, false, Kind::Float)?)
}

/// (rows, N) squared distances from `rows` to every point of `set`, built in place in the product's
/// buffer so that one block is the only (rows, N) float32 allocation.
fn squared_distances(
    rows: &Tensor,
    row_norms: &Tensor,
    set: &Tensor,
    set_norms: &Tensor,
) -> Result<Tensor, StatsError> {
    let mut d = rows.f_matmul(&set.f_tr()?)?;
    let _ = d.f_mul_scalar_(-2.0)?;
    let _ = d.f_add_(&row_norms.f_unsqueeze(1)?)?;
    let _ = d.f_add_(&set_norms.f_unsqueeze(0)?)?;
    let _ = d.f_clamp_min_(0.0)?;
    Ok(d)
}

/// Each point's k-th smallest squared distance within its own set, itself included as the 0-th.
fn radii(set: &Tensor, norms: &Tensor, k: i64, batch: i64) -> Result<Tensor, StatsError> {
    let n = set.size()[0];
    let mut parts = Vec::with_capacity((n / batch + 1) as usize);
    for start in (0..n).step_by(batch as usize) {
        let len = batch.min(n - start);
        let d = squared_distances(
            &set.f_narrow(0, start, len)?,
            &norms.f_narrow(0, start, len)?,
            set,
            norms,
        )?;
        // kthvalue counts from 1: the (k+1)-th smallest is the k-th neighbour after the point itself.
        let (values, _) = d.f_kthvalue(k + 1, 1, false)?;
        parts.push(values);
    }
    Ok(Tensor::f_cat(&parts, 0)?)
}

/// SplitMix64 (Steele, Lea & Flood 2014), as `stages::rng` has it; this crate does not depend on
/// `stages`, and the subsets only need to be reproducible, not to match anyone else's.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, n) by rejection (no modulo bias).
    fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let r = self.next_u64();
            if r < zone {
                return r % n;
            }
        }
    }

    /// `m` distinct values of 0..n in random order: the first m steps of a Fisher–Yates shuffle.
    fn choose(&mut self, n: i64, m: i64) -> Vec<i64> {
        let mut all: Vec<i64> = (0..n).collect();
        for i in 0..m as usize {
            let j = i + self.below((n as usize - i) as u64) as usize;
            all.swap(i, j);
        }
        all.truncate(m as usize);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsets_are_distinct_reproducible_and_clipped() {
        let s = kid_subset_indices(10, 4, 3, 6, 7).unwrap();
        assert_eq!(s, kid_subset_indices(10, 4, 3, 6, 7).unwrap());
        assert_ne!(s, kid_subset_indices(10, 4, 3, 6, 8).unwrap());
        for [a, b] in &s {
            assert_eq!((a.len(), b.len()), (6, 4));
            let mut a = a.clone();
            a.sort();
            a.dedup();
            assert_eq!(a.len(), 6);
            assert!(a.iter().all(|&i| (0..10).contains(&i)));
        }
        assert!(kid_subset_indices(10, 1, 1, 6, 0).is_err());
    }

    #[test]
    fn identical_sets_and_bad_inputs() {
        tch::manual_seed(0);
        let x = Tensor::randn([40, 8], (Kind::Float, Device::Cpu));
        let (p, r) = precision_recall(&x, &x, NHOOD, 7).unwrap();
        assert_eq!((p, r), (1.0, 1.0));
        let far = &x + 100.0;
        let (p, r) = precision_recall(&x, &far, NHOOD, 64).unwrap();
        assert_eq!((p, r), (0.0, 0.0));
        assert!(precision_recall(&x.narrow(0, 0, 3), &x, NHOOD, 8).is_err());
        assert!(precision_recall(&x, &x.narrow(1, 0, 4), NHOOD, 8).is_err());
        assert!(kid(&x, &x.narrow(1, 0, 4), 1, 10, 0).is_err());
    }
}
