//! Sample order: which shards a rank reads in an epoch, and the sample shuffle buffer.
//!
//! Divergence from webdataset, on purpose: webdataset shuffles shards *after* splitting by node, so
//! rank r reads shards r, r+W, … in every epoch (pipeline-notes §1.5). Here the whole list is shuffled
//! per (seed, epoch) first and then split, so shards move between ranks from epoch to epoch while every
//! rank still sees a disjoint set. All randomness is ChaCha8 keyed by (seed, epoch, rank, purpose):
//! same inputs, same order, whatever the thread count.

use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

use crate::rng::{self, splitmix64};
use crate::{Error, Result};

/// This process's place among the data-parallel processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankSplit {
    pub rank: usize,
    pub world: usize,
}

impl Default for RankSplit {
    fn default() -> Self {
        RankSplit { rank: 0, world: 1 }
    }
}

impl RankSplit {
    /// Flags win; then torchrun's `RANK`/`WORLD_SIZE`; then SLURM's `SLURM_PROCID`/`SLURM_NTASKS`;
    /// otherwise a single process.
    pub fn resolve(rank: Option<usize>, world: Option<usize>) -> Result<Self> {
        Self::resolve_with(rank, world, |name| std::env::var(name).ok())
    }

    pub fn resolve_with(
        rank: Option<usize>,
        world: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let parse = |name: &str| -> Result<Option<usize>> {
            env(name)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        Error::Invalid(format!("environment variable {name}={v:?} is not a number"))
                    })
                })
                .transpose()
        };
        let (env_rank, env_world) = match (parse("RANK")?, parse("WORLD_SIZE")?) {
            (Some(r), Some(w)) => (Some(r), Some(w)),
            _ => (parse("SLURM_PROCID")?, parse("SLURM_NTASKS")?),
        };
        let split = RankSplit {
            rank: rank.or(env_rank).unwrap_or(0),
            world: world.or(env_world).unwrap_or(1),
        };
        if split.world == 0 || split.rank >= split.world {
            return Err(Error::Invalid(format!(
                "rank {} is not below world size {}",
                split.rank, split.world
            )));
        }
        Ok(split)
    }
}

/// A generator for one purpose. The key is hashed into the 32-byte ChaCha seed by hand (SplitMix64,
/// [`splitmix64`]), so orders depend only on this code and the pinned rand_chacha.
pub fn keyed_rng(seed: u64, epoch: u64, rank: u64, purpose: u64) -> ChaCha8Rng {
    let mut state = seed ^ 0x243F_6A88_85A3_08D3;
    let mut bytes = [0u8; 32];
    for (i, word) in [epoch, rank, purpose, 0x1319_8A2E_0370_7344]
        .into_iter()
        .enumerate()
    {
        state = splitmix64(state ^ word.rotate_left(17 * i as u32 + 7));
        bytes[i * 8..i * 8 + 8].copy_from_slice(&state.to_le_bytes());
    }
    ChaCha8Rng::from_seed(bytes)
}

/// Uniform in [0, n) without modulo bias.
pub fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    rng::below(rng, n as u64) as usize
}

pub const PURPOSE_SHARDS: u64 = 1;
pub const PURPOSE_SAMPLES: u64 = 2;

/// The shards `split.rank` reads in `epoch`: the full list shuffled by (seed, epoch) when `shuffle`,
/// then every world-th shard starting at rank.
pub fn epoch_shards(
    shards: &[String],
    seed: u64,
    epoch: u64,
    shuffle: bool,
    split: RankSplit,
) -> Vec<String> {
    let mut order: Vec<&String> = shards.iter().collect();
    if shuffle {
        rng::shuffle(&mut keyed_rng(seed, epoch, 0, PURPOSE_SHARDS), &mut order);
    }
    order
        .into_iter()
        .skip(split.rank)
        .step_by(split.world)
        .cloned()
        .collect()
}

/// webdataset's `_shuffle(bufsize, initial)`: every incoming item is appended and, while the buffer is
/// below `bufsize`, one more is pulled; once it holds `initial` items a random one is swap-removed and
/// yielded; at the end the rest drains in random order. `bufsize` 0 or 1 passes items through.
pub struct ShuffleBuffer<T> {
    buffer: Vec<T>,
    bufsize: usize,
    initial: usize,
    rng: ChaCha8Rng,
}

impl<T> ShuffleBuffer<T> {
    pub fn new(bufsize: usize, initial: usize, rng: ChaCha8Rng) -> Self {
        ShuffleBuffer {
            buffer: Vec::with_capacity(bufsize),
            bufsize,
            initial: initial.min(bufsize),
            rng,
        }
    }

    /// Whether the caller should pull one extra item before asking for output (the double-rate fill).
    pub fn wants_extra(&self) -> bool {
        self.buffer.len() < self.bufsize
    }

    pub fn push(&mut self, item: T) {
        self.buffer.push(item);
    }

    /// An item to yield now, if the buffer is full enough.
    pub fn pop_ready(&mut self) -> Option<T> {
        (self.buffer.len() >= self.initial.max(1) && !self.buffer.is_empty()).then(|| self.pick())
    }

    /// The next item of the end-of-stream drain.
    pub fn drain_one(&mut self) -> Option<T> {
        (!self.buffer.is_empty()).then(|| self.pick())
    }

    fn pick(&mut self) -> T {
        let k = below(&mut self.rng, self.buffer.len());
        self.buffer.swap_remove(k)
    }

    /// Runs the buffer over an iterator (the sync form of the shuffle stage).
    pub fn shuffle_iter(mut self, mut source: impl Iterator<Item = T>) -> Vec<T> {
        let mut out = Vec::new();
        while let Some(item) = source.next() {
            self.push(item);
            if self.wants_extra() {
                if let Some(extra) = source.next() {
                    self.push(extra);
                }
            }
            if let Some(ready) = self.pop_ready() {
                out.push(ready);
            }
        }
        while let Some(item) = self.drain_one() {
            out.push(item);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("s{i:03}")).collect()
    }

    #[test]
    fn ranks_get_disjoint_covering_sets_that_change_per_epoch() {
        let shards = names(10);
        for epoch in 0..3 {
            let mut all: Vec<String> = (0..3)
                .flat_map(|r| {
                    epoch_shards(&shards, 7, epoch, true, RankSplit { rank: r, world: 3 })
                })
                .collect();
            all.sort();
            assert_eq!(all, shards);
        }
        let r0e0 = epoch_shards(&shards, 7, 0, true, RankSplit { rank: 0, world: 3 });
        let r0e1 = epoch_shards(&shards, 7, 1, true, RankSplit { rank: 0, world: 3 });
        assert_ne!(r0e0, r0e1, "rank 0 must see other shards in another epoch");
        assert_eq!(
            r0e0,
            epoch_shards(&shards, 7, 0, true, RankSplit { rank: 0, world: 3 })
        );
        assert_ne!(
            r0e0,
            epoch_shards(&shards, 8, 0, true, RankSplit { rank: 0, world: 3 })
        );
        let unshuffled = epoch_shards(&shards, 7, 0, false, RankSplit { rank: 1, world: 3 });
        assert_eq!(unshuffled, ["s001", "s004", "s007"]);
    }

    #[test]
    fn rank_comes_from_flags_then_torchrun_then_slurm() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let torchrun: &[(&str, &str)] = &[
            ("RANK", "2"),
            ("WORLD_SIZE", "4"),
            ("SLURM_PROCID", "9"),
            ("SLURM_NTASKS", "16"),
        ];
        assert_eq!(
            RankSplit::resolve_with(None, None, env(torchrun)).unwrap(),
            RankSplit { rank: 2, world: 4 }
        );
        assert_eq!(
            RankSplit::resolve_with(Some(1), Some(2), env(torchrun)).unwrap(),
            RankSplit { rank: 1, world: 2 }
        );
        let slurm: &[(&str, &str)] = &[("SLURM_PROCID", "9"), ("SLURM_NTASKS", "16")];
        assert_eq!(
            RankSplit::resolve_with(None, None, env(slurm)).unwrap(),
            RankSplit { rank: 9, world: 16 }
        );
        assert_eq!(
            RankSplit::resolve_with(None, None, env(&[])).unwrap(),
            RankSplit { rank: 0, world: 1 }
        );
        assert!(RankSplit::resolve_with(Some(4), Some(4), env(&[])).is_err());
        assert!(
            RankSplit::resolve_with(None, None, env(&[("RANK", "x"), ("WORLD_SIZE", "2")]))
                .is_err()
        );
    }

    #[test]
    fn shuffle_buffer_permutes_deterministically() {
        let run = |seed| {
            ShuffleBuffer::new(10, 4, keyed_rng(seed, 0, 0, PURPOSE_SAMPLES)).shuffle_iter(0..100)
        };
        let a = run(1);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(a, (0..100).collect::<Vec<_>>());
        assert_eq!(a, run(1));
        assert_ne!(a, run(2));
        // A bounded buffer only moves items locally: item i cannot come out before about i/2 outputs.
        for (pos, item) in a.iter().enumerate() {
            assert!(*item <= 2 * pos + 10, "{item} at {pos}");
        }
        let passthrough =
            ShuffleBuffer::new(0, 0, keyed_rng(1, 0, 0, PURPOSE_SAMPLES)).shuffle_iter(0..5);
        assert_eq!(passthrough, [0, 1, 2, 3, 4]);
    }
}
