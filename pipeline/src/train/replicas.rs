//! Data parallelism the way PyTorch's DDP does it, on the same engine (c10d through `torch_ext::dist`):
//! every replica starts from rank 0's weights, gradients are averaged over ranks in buckets of about
//! 25 MiB after each step's backward, and the few values the host needs (logged scalars, loader
//! cursors, a checksum of the weights) are reduced on metric and checkpoint steps only.

use std::time::Duration;

use anyhow::bail;
use tch::{Kind, Tensor};
use torch_ext::dist::{Backend, Group};

use crate::runtime::launch::Launch;

/// Gradient bytes per all-reduce, as DDP's default `bucket_cap_mb`.
pub(super) const BUCKET_BYTES: i64 = 25 << 20;

pub struct Replicas {
    group: Group,
    /// Where the few host values travel for a reduction: CPU tensors for Gloo, the rank's GPU for
    /// NCCL (which reduces device memory only).
    wire: tch::Device,
}

impl Replicas {
    /// Joins the job's process group; `None` for a single process.
    pub fn join(
        launch: &Launch,
        backend: &str,
        device: tch::Device,
        timeout: Duration,
    ) -> anyhow::Result<Option<Replicas>> {
        if launch.world == 1 {
            return Ok(None);
        }
        let backend = match (backend, device.is_cuda()) {
            ("gloo", _) | ("auto", false) => Backend::Gloo,
            ("nccl", _) | ("auto", true) => Backend::Nccl,
            (other, _) => {
                bail!("train.backend = {other:?}: expected \"auto\", \"nccl\" or \"gloo\"")
            }
        };
        if backend == Backend::Gloo && device.is_cuda() {
            bail!("train.backend = \"gloo\" reduces CPU tensors; this rank trains on {device:?} (use \"nccl\")");
        }
        let group = launch.join_group(backend, device, timeout, "training")?;
        let wire = match backend {
            Backend::Gloo => tch::Device::Cpu,
            Backend::Nccl => device,
        };
        Ok(Some(Replicas { group, wire }))
    }

    pub fn world(&self) -> usize {
        self.group.world
    }

    /// Rank 0's values into every replica's tensors, in place.
    pub fn broadcast(&self, tensors: &[Tensor]) -> anyhow::Result<()> {
        tch::no_grad(|| {
            for t in tensors {
                self.group.broadcast(t, 0)?;
            }
            Ok(())
        })
    }

    /// Every gradient replaced by its mean over the ranks: flattened into buckets of about 25 MiB,
    /// each summed in one all-reduce, divided by the world size and copied back.
    pub fn average_grads(&self, grads: &[Tensor]) -> anyhow::Result<()> {
        let scale = 1.0 / self.world() as f64;
        tch::no_grad(|| {
            let mut start = 0;
            while start < grads.len() {
                let (mut end, mut bytes) = (start, 0i64);
                while end < grads.len() && (end == start || bytes < BUCKET_BYTES) {
                    bytes +=
                        grads[end].numel() as i64 * grads[end].kind().elt_size_in_bytes() as i64;
                    end += 1;
                }
                let bucket = &grads[start..end];
                let flat = Tensor::cat(
                    &bucket.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(),
                    0,
                );
                self.group.all_reduce_sum(&flat)?;
                let flat = flat * scale;
                let mut offset = 0;
                for g in bucket {
                    let n = g.numel() as i64;
                    g.shallow_clone()
                        .copy_(&flat.narrow(0, offset, n).view_as(g));
                    offset += n;
                }
                start = end;
            }
            Ok(())
        })
    }

    /// Replaces `t` (float64, any device) by its sum over the ranks, through the group's wire device.
    pub fn sum_f64_(&self, t: &Tensor) -> anyhow::Result<()> {
        tch::no_grad(|| {
            let wire = t.to_device(self.wire).contiguous();
            self.group.all_reduce_sum(&wire)?;
            t.shallow_clone().copy_(&wire);
            Ok(())
        })
    }

    /// The rank and world of this group.
    pub fn split(&self) -> stages::order::RankSplit {
        stages::order::RankSplit {
            rank: self.group.rank,
            world: self.world(),
        }
    }

    /// The mean over ranks of each value (device scalars, read back here).
    pub fn mean(&self, values: &[&Tensor]) -> anyhow::Result<Vec<f64>> {
        if values.is_empty() {
            return Ok(vec![]);
        }
        let t = Tensor::stack(
            &values
                .iter()
                .map(|v| v.to_kind(Kind::Double).reshape([]))
                .collect::<Vec<_>>(),
            0,
        )
        .to_device(self.wire);
        self.group.all_reduce_sum(&t)?;
        let sum = Vec::<f64>::try_from(t.to_device(tch::Device::Cpu))?;
        Ok(sum.iter().map(|v| v / self.world() as f64).collect())
    }

    /// The maximum of a host value over the ranks (control channel).
    pub fn max(&self, value: f64) -> anyhow::Result<f64> {
        let t = Tensor::from_slice(&[value]);
        self.group.control_max(&t)?;
        Ok(t.double_value(&[0]))
    }

    /// Which ranks failed the local part of this step and whether any rank got a stop signal, agreed
    /// by every rank from one all-reduce (max) of `world + 1` integers on the control channel.
    pub fn agree(&self, failed: bool, signal: Option<i32>) -> anyhow::Result<Agreement> {
        let w = self.world();
        let mut flags = vec![0i64; w + 1];
        flags[self.group.rank] = failed as i64;
        flags[w] = signal.map_or(0, i64::from);
        let t = Tensor::from_slice(&flags);
        self.group.control_max(&t)?;
        let flags = Vec::<i64>::try_from(&t)?;
        Ok(Agreement {
            failed_ranks: (0..w).filter(|&r| flags[r] != 0).collect(),
            signal: (flags[w] > 0).then_some(flags[w] as i32),
        })
    }

    /// Every rank's `values` (the same count on each), indexed by rank: each rank fills its row of a
    /// zero matrix and the sum over the control channel is the gather (host values only).
    pub fn gather(&self, values: &[f64]) -> anyhow::Result<Vec<Vec<f64>>> {
        let (w, k) = (self.world(), values.len());
        let mut rows = vec![0.0f64; w * k];
        rows[self.group.rank * k..(self.group.rank + 1) * k].copy_from_slice(values);
        let t = Tensor::from_slice(&rows);
        self.group.control_sum(&t)?;
        let flat = Vec::<f64>::try_from(&t)?;
        Ok(flat.chunks(k.max(1)).map(<[f64]>::to_vec).collect())
    }

    /// Stops with an error naming the ranks whose weights differ from rank 0's: a checksum (sum and
    /// sum of squares in f64) over all tensors, compared exactly — replicas are bitwise copies. The
    /// checksum is reduced on the device and read back once.
    pub fn check_in_sync(&self, tensors: &[Tensor]) -> anyhow::Result<()> {
        let checksum = tch::no_grad(|| -> anyhow::Result<Vec<f64>> {
            let parts: Vec<Tensor> = tensors
                .iter()
                .map(|t| {
                    let d = t.to_kind(Kind::Double);
                    Tensor::stack(&[d.sum(Kind::Double), d.square().sum(Kind::Double)], 0)
                })
                .collect();
            if parts.is_empty() {
                return Ok(vec![0.0, 0.0]);
            }
            let total = Tensor::stack(&parts, 0).sum_dim_intlist(0, false, Kind::Double);
            Ok(Vec::<f64>::try_from(total.to_device(tch::Device::Cpu))?)
        })?;
        let all = self.gather(&checksum)?;
        let off: Vec<usize> = (1..all.len()).filter(|&r| all[r] != all[0]).collect();
        if !off.is_empty() {
            bail!(
                "replicas diverged: the weights of rank(s) {off:?} differ from rank 0's (checksums {all:?})"
            );
        }
        tracing::info!(
            "{} replicas in sync (weight checksum {:.6e})",
            all.len(),
            all[0][0]
        );
        Ok(())
    }
}

/// What every rank learns at a step's agreement point.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Agreement {
    /// The ranks whose local part of the step failed.
    pub failed_ranks: Vec<usize>,
    /// A stop signal some rank received.
    pub signal: Option<i32>,
}
