//! `sample`, `classify` and `bpd` under torchrun or srun: each rank evaluates one contiguous run of
//! batches, writes its share of an output as `OUT.part-RANK-of-WORLD`, and rank 0 joins the parts in
//! rank order into `OUT`, so the result is the single-process one. Slices are whole batches of the
//! single-process batching, not whole samples: the same rows then meet in the same batch shapes, which
//! is what makes the joined outputs equal a one-process run byte for byte at the same `--batch`.
//!
//! The process group is always Gloo on CPU tensors, whatever device the flow runs on: the ranks only
//! exchange a few counters, per-image values and success flags, and Gloo does that on any node.

use std::fs::File;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use stages::order::RankSplit;
use tch::{Device, Kind, Tensor};
use torch_ext::dist::{Backend, Group};

use crate::runtime::launch::Launch;

#[derive(clap::Args, Clone, Debug)]
pub struct RankArgs {
    /// Under torchrun/srun (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS set): seconds a rank waits
    /// for the others to join or to finish their slice before failing
    #[arg(long, default_value_t = 1800, value_name = "SECONDS")]
    pub dist_timeout_s: u64,
}

/// This process's place among the evaluating processes, and the group when there are several.
pub struct Ranks {
    pub launch: Launch,
    group: Option<Group>,
}

impl Ranks {
    /// Joins the job torchrun or srun launched; a plain single process joins nothing.
    pub fn join(args: &RankArgs) -> anyhow::Result<Ranks> {
        let launch = Launch::from_env()?;
        if launch.world == 1 {
            return Ok(Ranks {
                launch,
                group: None,
            });
        }
        if args.dist_timeout_s == 0 {
            bail!("--dist-timeout-s must be positive");
        }
        let group = launch.join_group(
            Backend::Gloo,
            tch::Device::Cpu,
            Duration::from_secs(args.dist_timeout_s),
            "evaluating",
        )?;
        Ok(Ranks {
            launch,
            group: Some(group),
        })
    }

    pub fn rank(&self) -> usize {
        self.launch.rank
    }

    pub fn world(&self) -> usize {
        self.launch.world
    }

    pub fn single(&self) -> bool {
        self.group.is_none()
    }

    /// Rank 0 reports and merges; the others stay quiet on stdout.
    pub fn leader(&self) -> bool {
        self.launch.rank == 0
    }

    pub fn split(&self) -> RankSplit {
        RankSplit {
            rank: self.rank(),
            world: self.world(),
        }
    }

    /// "rank R of W: " in front of an error, empty for a single process.
    pub fn tag(&self) -> String {
        if self.single() {
            String::new()
        } else {
            format!("rank {} of {}: ", self.rank(), self.world())
        }
    }

    /// Waits for every rank and fails on all of them when any failed, so that no rank waits out the
    /// timeout for a peer that already gave up. A rank's own error keeps its message and gains its rank.
    pub fn agree<T>(&self, what: &str, result: anyhow::Result<T>) -> anyhow::Result<T> {
        let Some(group) = &self.group else {
            return result;
        };
        let failed = Tensor::zeros([self.world() as i64], (Kind::Int64, Device::Cpu));
        if result.is_err() {
            let _ = failed.get(self.rank() as i64).fill_(1);
        }
        let exchanged = group
            .all_reduce_sum(&failed)
            .with_context(|| format!("{}waiting for the other ranks after {what}", self.tag()));
        let result = result.with_context(|| format!("{}{what}", self.tag()));
        let failed = Vec::<i64>::try_from(&failed)?;
        let value = result?;
        exchanged?;
        let others: Vec<usize> = (0..self.world()).filter(|&r| failed[r] != 0).collect();
        if !others.is_empty() {
            bail!("{}{what} failed on rank(s) {others:?}", self.tag());
        }
        Ok(value)
    }

    /// Sums integer counters over the ranks (every rank gets the totals).
    pub fn sum_i64(&self, values: &[i64]) -> anyhow::Result<Vec<i64>> {
        let Some(group) = &self.group else {
            return Ok(values.to_vec());
        };
        let t = Tensor::from_slice(values);
        group
            .all_reduce_sum(&t)
            .with_context(|| format!("{}summing counters over the ranks", self.tag()))?;
        Ok(Vec::<i64>::try_from(&t)?)
    }

    /// Every rank's `values` concatenated in rank order (every rank gets them). Each rank places its
    /// values at its offset in a zero vector and the sum is the gather: adding zeros is exact, so the
    /// values arrive bit for bit.
    pub fn gather_f64(&self, values: &[f64]) -> anyhow::Result<Vec<f64>> {
        let Some(group) = &self.group else {
            return Ok(values.to_vec());
        };
        let mut counts = vec![0i64; self.world()];
        counts[self.rank()] = values.len() as i64;
        let counts = self.sum_i64(&counts)?;
        let offset: i64 = counts[..self.rank()].iter().sum();
        let total: i64 = counts.iter().sum();
        if total == 0 {
            return Ok(vec![]);
        }
        let all = Tensor::zeros([total], (Kind::Double, Device::Cpu));
        if !values.is_empty() {
            all.narrow(0, offset, values.len() as i64)
                .copy_(&Tensor::from_slice(values));
        }
        group
            .all_reduce_sum(&all)
            .with_context(|| format!("{}gathering values over the ranks", self.tag()))?;
        Ok(Vec::<f64>::try_from(&all)?)
    }

    /// `OUT.part-RANK-of-WORLD`: this rank's share of `out`.
    pub fn part_path(&self, out: &Path) -> PathBuf {
        part_path(out, self.rank(), self.world())
    }

    /// Every rank's part of `out`, in rank order.
    pub fn part_paths(&self, out: &Path) -> Vec<PathBuf> {
        (0..self.world())
            .map(|r| part_path(out, r, self.world()))
            .collect()
    }

    /// Rank 0: `head`, then the parts of `out` in rank order, written atomically as `out`; the parts are
    /// removed once `out` is in place.
    pub fn concat_parts(&self, out: &Path, head: &[u8]) -> anyhow::Result<()> {
        let parts = self.part_paths(out);
        stages::atomic::write_atomic(out, |w| {
            w.write_all(head)?;
            for part in &parts {
                std::io::copy(&mut File::open(part)?, w)?;
            }
            Ok(())
        })
        .with_context(|| format!("joining {} parts into {}", parts.len(), out.display()))?;
        remove_parts(&parts)
    }
}

pub fn part_path(out: &Path, rank: usize, world: usize) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!("{name}.part-{rank}-of-{world}"))
}

pub fn remove_parts(parts: &[PathBuf]) -> anyhow::Result<()> {
    for part in parts {
        std::fs::remove_file(part).with_context(|| format!("removing {}", part.display()))?;
    }
    Ok(())
}

/// Rank `split.rank`'s contiguous share of `n` units: [r·n/W, (r+1)·n/W).
pub fn slice(n: usize, split: RankSplit) -> Range<usize> {
    (split.rank * n / split.world)..((split.rank + 1) * n / split.world)
}

/// The samples of rank `split.rank` when `n` samples go in batches of `batch`: its slice of the batches,
/// in samples.
pub fn batch_slice(n: usize, batch: usize, split: RankSplit) -> Range<usize> {
    let batches = slice(n.div_ceil(batch), split);
    (batches.start * batch).min(n)..(batches.end * batch).min(n)
}

/// A part streamed to disk under a temporary name and renamed into place when complete (after an
/// fsync), so rank 0 never joins a part that a crashed rank left half-written.
pub type PartWriter = stages::atomic::AtomicFile;

/// Reads a part in chunks of `chunk` bytes (the last may be shorter), for joins that are not plain
/// concatenations.
pub fn for_each_chunk(
    path: &Path,
    chunk: usize,
    f: &mut dyn FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; chunk.max(1)];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = file
                .read(&mut buf[filled..])
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            return Ok(());
        }
        f(&buf[..filled])?;
        if filled < buf.len() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_every_index_once_in_rank_order() {
        for n in [0, 1, 7, 10, 33] {
            for world in 1..6 {
                let mut next = 0;
                for rank in 0..world {
                    let s = slice(n, RankSplit { rank, world });
                    assert_eq!(s.start, next);
                    next = s.end;
                }
                assert_eq!(next, n);
                for batch in [1, 3, 8] {
                    let mut next = 0;
                    for rank in 0..world {
                        let s = batch_slice(n, batch, RankSplit { rank, world });
                        assert_eq!(s.start, next, "n {n} batch {batch} world {world}");
                        assert!(s.start.is_multiple_of(batch) || s.start == n);
                        next = s.end;
                    }
                    assert_eq!(next, n);
                }
            }
        }
    }

    #[test]
    fn part_names_carry_rank_and_world() {
        assert_eq!(
            part_path(Path::new("/o/samples.npz"), 1, 4),
            Path::new("/o/samples.npz.part-1-of-4")
        );
    }
}
