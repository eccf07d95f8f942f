//! Reference files for `pipeline fid`, `sample --fid-ref` and `train.fid_every`: an `.npz` holding
//!
//! - `mu` (2048), `sigma` (2048, 2048): pool3 statistics, float32 or float64 (FID; always required);
//! - `mu_s` (2023), `sigma_s` (2023, 2023): statistics of the spatial features (sFID; optional);
//! - `acts` (N, 2048) float32: the pool3 activations themselves (precision/recall and KID; optional),
//!   as `pipeline fid-stats` writes them; or
//! - `arr_0` uint8 (N, H, W, 3): the reference images, as in ADM's published reference batches
//!   (`VIRTUAL_imagenet256_labeled.npz`), whose pool3 activations are computed through the network
//!   when precision/recall or KID need them (what ADM's `evaluator.py` does).
//!
//! Statistics in the file are used as they are (ADM's were computed by TensorFlow); a file with only
//! `mu` and `sigma` (older `fid-stats` output, pytorch-fid's `--save-stats`) still gives FID and the
//! Inception Score, and the metrics it cannot give are reported as skipped, with the reason.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use model::feature_stats::Statistics;
use model::inception::Inception;
use tch::{Device, Kind, Tensor};

use crate::formats::image_set::ImageSet;
use crate::formats::npz::{Dtype, NpzWriter};
use crate::formats::npz_read::{Elem, NpzReader};

/// The most bytes a reference file's `acts` may take as float32 (16 GiB: ~2 million activations).
const MAX_ACTS_BYTES: usize = 1 << 34;

/// Where a reference's pool3 activations come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActsSource {
    /// `acts` (N, 2048), stored in the file.
    Stored { count: usize },
    /// `arr_0` (N, H, W, 3) uint8 images, run through the network when needed.
    Images { count: usize },
    /// Neither: precision, recall and KID cannot be computed.
    Absent,
}

/// A reference file, checked; its activations are read only when asked for ([`Reference::activations`]).
#[derive(Debug)]
pub struct Reference {
    pub path: PathBuf,
    /// `mu`, `sigma`.
    pub pool3: Statistics,
    /// `mu_s`, `sigma_s`, when the file has them.
    pub spatial: Option<Statistics>,
    pub acts: ActsSource,
}

/// Reads `mu`-like and `sigma`-like arrays of width `d`, checked to be a mean and a covariance.
fn read_statistics(
    npz: &mut NpzReader,
    file: &str,
    (mu, sigma): (&str, &str),
    d: usize,
    what: &str,
) -> anyhow::Result<Statistics> {
    let mu_shape = npz.member(mu)?.header.shape;
    let sigma_shape = npz.member(sigma)?.header.shape;
    if mu_shape != [d] || sigma_shape != [d, d] {
        bail!(
            "{file}: reference statistics have `{mu}` of shape {mu_shape:?} and `{sigma}` of shape \
             {sigma_shape:?}; {what} need ({d},) and ({d}, {d})"
        );
    }
    let mut array = |name: &str| -> anyhow::Result<Tensor> {
        let (values, shape) = npz.read_f64(name)?;
        let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        Ok(Tensor::f_from_slice(&values)?.f_view(shape.as_slice())?)
    };
    let (m, s) = (array(mu)?, array(sigma)?);
    Statistics::new(&m, &s)
        .and_then(|s| s.check_covariance().map(|()| s))
        .with_context(|| format!("{file}: reference statistics `{mu}`, `{sigma}`"))
}

/// Reads a reference file (see the module documentation). Every header is checked against the
/// network's widths before an array is inflated, and each `sigma` must be a covariance (symmetric,
/// positive semi-definite up to rounding): anything else gives a distance that means nothing, even a
/// negative one.
pub fn read_reference(path: &Path) -> anyhow::Result<Reference> {
    let file = path.display().to_string();
    let need = "reference statistics need `mu` and `sigma` (pipeline fid-stats, pytorch-fid \
                --save-stats or the ADM reference batches write them)";
    let mut npz = NpzReader::open(path)?;
    npz.member("mu").context(need)?;
    npz.member("sigma").context(need)?;
    let d = model::inception::FEATURES as usize;
    let pool3 = read_statistics(
        &mut npz,
        &file,
        ("mu", "sigma"),
        d,
        "FID's Inception features",
    )?;
    let names = npz.names();
    let has = |n: &str| names.iter().any(|m| m == n);
    let spatial = match (has("mu_s"), has("sigma_s")) {
        (true, true) => Some(read_statistics(
            &mut npz,
            &file,
            ("mu_s", "sigma_s"),
            model::inception::SPATIAL_FEATURES as usize,
            "sFID's spatial features",
        )?),
        (false, false) => None,
        _ => bail!("{file}: has only one of `mu_s` and `sigma_s`; sFID needs both"),
    };
    let acts = if has("acts") {
        let header = npz.member("acts")?.header;
        let float = matches!(header.elem, Some(Elem::F32 { .. } | Elem::F64 { .. }));
        if !float || header.shape.len() != 2 || header.shape[1] != d || header.shape[0] < 2 {
            bail!(
                "{file}: `acts` has dtype `{}` and shape {:?}; pool3 activations are float32 (N, {d}) \
                 with N ≥ 2",
                header.descr,
                header.shape
            );
        }
        ActsSource::Stored {
            count: header.shape[0],
        }
    } else if has("arr_0") {
        let images = ImageSet::open(path).with_context(|| {
            format!("{file}: the reference images (`arr_0`) for precision, recall and KID")
        })?;
        ActsSource::Images {
            count: images.len(),
        }
    } else {
        ActsSource::Absent
    };
    Ok(Reference {
        path: path.to_path_buf(),
        pool3,
        spatial,
        acts,
    })
}

impl Reference {
    /// Why sFID cannot be computed against this reference, if it cannot.
    pub fn sfid_unavailable(&self) -> Option<String> {
        self.spatial.is_none().then(|| {
            format!(
                "sFID skipped: {} has no `mu_s`/`sigma_s` (spatial statistics; `pipeline fid-stats` \
                 writes them, and ADM's reference batches hold them)",
                self.path.display()
            )
        })
    }

    /// Why precision, recall and KID cannot be computed against this reference, if they cannot.
    pub fn acts_unavailable(&self) -> Option<String> {
        (self.acts == ActsSource::Absent).then(|| {
            format!(
                "precision, recall and KID skipped: {} has neither `acts` (pool3 activations, which \
                 `pipeline fid-stats` writes) nor `arr_0` (reference images, as in ADM's reference \
                 batches)",
                self.path.display()
            )
        })
    }

    /// The reference's pool3 activations (N, 2048) float32 on the network's device: read from `acts`,
    /// or computed from `arr_0` through `inception` in batches of `batch`. None when the file has
    /// neither.
    pub fn activations(
        &self,
        inception: &Inception,
        batch: usize,
    ) -> anyhow::Result<Option<Tensor>> {
        let device = inception.device();
        let file = self.path.display();
        match self.acts {
            ActsSource::Absent => Ok(None),
            ActsSource::Stored { .. } => self.stored_activations(device).map(Some),
            ActsSource::Images { count } => {
                let images = ImageSet::open(&self.path)?;
                let mut parts = Vec::new();
                let mut seen = 0;
                for b in images.batches(batch) {
                    let b = b?;
                    let n = b.size()[0] as usize;
                    let what = format!(
                        "{file}: Inception features of reference images {seen}..{}",
                        seen + n
                    );
                    let f = crate::runtime::torch_guard::guard(&what, || {
                        inception
                            .features(&b.to_device(device))
                            .context(what.clone())
                    })?;
                    parts.push(f.pool3);
                    seen += n;
                }
                if seen != count {
                    bail!("{file}: `arr_0` gave {seen} images, expected {count}");
                }
                Ok(Some(Tensor::f_cat(&parts, 0)?))
            }
        }
    }
}

impl Reference {
    /// The file's `acts` as float32 (N, 2048) on `device`.
    pub fn stored_activations(&self, device: Device) -> anyhow::Result<Tensor> {
        let file = self.path.display();
        let mut npz = NpzReader::open(&self.path)?;
        let (values, shape) = npz.read_f32("acts", MAX_ACTS_BYTES)?;
        let acts = Tensor::f_from_slice(&values)?
            .f_view([shape[0] as i64, shape[1] as i64])?
            .f_to_device(device)?;
        check_finite(&acts, &format!("{file}: `acts`"))?;
        Ok(acts)
    }
}

fn check_finite(t: &Tensor, what: &str) -> anyhow::Result<()> {
    if t.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
        bail!("{what} has NaN or infinite values");
    }
    Ok(())
}

/// What [`write_reference`] writes besides `mu` and `sigma`.
pub struct Extras<'a> {
    /// `mu_s`, `sigma_s`.
    pub spatial: Option<&'a Statistics>,
    /// `acts`: float32 (N, 2048) little-endian bytes, N rows.
    pub acts: Option<(&'a [u8], usize)>,
}

/// Writes `mu` (D) and `sigma` (D, D) as float64, the arrays ADM's reference batches and pytorch-fid's
/// statistics files hold under these names, then `mu_s`, `sigma_s` (float64) and `acts` (float32
/// N × 2048) when given.
pub fn write_reference(path: &Path, stats: &Statistics, extras: Extras) -> anyhow::Result<()> {
    let mut npz = NpzWriter::create(path)?;
    let mut write_stats = |s: &Statistics, (mu, sigma): (&str, &str)| -> anyhow::Result<()> {
        let d = s.dim() as usize;
        for (name, tensor, shape) in [(mu, &s.mu, vec![d]), (sigma, &s.sigma, vec![d, d])] {
            let values = Vec::<f64>::try_from(
                tensor
                    .f_to_kind(Kind::Double)?
                    .f_to_device(Device::Cpu)?
                    .f_contiguous()?
                    .f_view(-1)?,
            )?;
            npz.begin(name, Dtype::F64, &shape)?;
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            npz.write(&bytes)?;
            npz.end()?;
        }
        Ok(())
    };
    write_stats(stats, ("mu", "sigma"))?;
    if let Some(s) = extras.spatial {
        write_stats(s, ("mu_s", "sigma_s"))?;
    }
    if let Some((bytes, n)) = extras.acts {
        let d = model::inception::FEATURES as usize;
        if bytes.len() != n * d * 4 {
            bail!("acts: {} bytes for {n} rows of {d} float32", bytes.len());
        }
        npz.begin("acts", Dtype::F32, &[n, d])?;
        npz.write(bytes)?;
        npz.end()?;
    }
    npz.finish()
}

/// A float32 tensor's values as little-endian bytes (read back to the CPU).
pub fn f32_bytes(t: &Tensor) -> anyhow::Result<Vec<u8>> {
    let t = t
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?;
    Ok(Vec::<u8>::try_from(
        t.f_view_dtype(Kind::Uint8)?.f_flatten(0, -1)?,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statistics(d: i64, seed: i64) -> Statistics {
        tch::manual_seed(seed);
        let x = Tensor::randn([d + 3, d], (Kind::Double, Device::Cpu));
        let mu = x.mean_dim(0, false, Kind::Double);
        let c = &x - &mu;
        let sigma = c.tr().matmul(&c) / (d + 2) as f64;
        Statistics::new(&mu, &sigma).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[])
    }

    /// What `fid-stats` writes reads back whole; a file with `mu` and `sigma` alone reads with the
    /// other metrics marked unavailable, each with its reason.
    #[test]
    fn reference_files_round_trip_and_old_ones_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let pool3 = statistics(model::inception::FEATURES, 1);
        let spatial = statistics(model::inception::SPATIAL_FEATURES, 2);
        let acts = Tensor::randn([5, model::inception::FEATURES], (Kind::Float, Device::Cpu));
        let bytes = f32_bytes(&acts).unwrap();
        let full = dir.path().join("full.npz");
        let extras = Extras {
            spatial: Some(&spatial),
            acts: Some((&bytes, 5)),
        };
        write_reference(&full, &pool3, extras).unwrap();
        let r = read_reference(&full).unwrap();
        assert_eq!(r.acts, ActsSource::Stored { count: 5 });
        assert!(max_diff(&r.pool3.sigma, &pool3.sigma) == 0.0);
        let s = r.spatial.as_ref().unwrap();
        assert!(max_diff(&s.mu, &spatial.mu) == 0.0 && max_diff(&s.sigma, &spatial.sigma) == 0.0);
        assert!(r.sfid_unavailable().is_none() && r.acts_unavailable().is_none());
        let back = r.stored_activations(Device::Cpu).unwrap();
        assert_eq!(max_diff(&back, &acts), 0.0);

        let old = dir.path().join("old.npz");
        let extras = Extras {
            spatial: None,
            acts: None,
        };
        write_reference(&old, &pool3, extras).unwrap();
        let r = read_reference(&old).unwrap();
        assert!(r.spatial.is_none());
        assert_eq!(r.acts, ActsSource::Absent);
        let note = r.sfid_unavailable().unwrap();
        assert!(
            note.contains("old.npz") && note.contains("`mu_s`"),
            "{note}"
        );
        let note = r.acts_unavailable().unwrap();
        assert!(
            note.contains("`acts`") && note.contains("`arr_0`"),
            "{note}"
        );
    }
}
