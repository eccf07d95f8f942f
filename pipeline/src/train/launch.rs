//! Where this process sits in a data-parallel job, read the way torchrun and SLURM say it: torchrun's
//! RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, else srun's SLURM_PROCID / SLURM_NTASKS /
//! SLURM_LOCALID with the rendezvous host from MASTER_ADDR or the first node of SLURM_JOB_NODELIST.
//! `train.rank` / `train.world` override the environment (a single process stays rank 0 of 1); the
//! evaluation commands resolve the same way without overrides ([`Launch::from_env`]).

use std::time::Duration;

use anyhow::{bail, Context};
use torch_ext::dist::{Backend, Group};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// The rank's index on its node: its GPU is cuda:LOCAL_RANK.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

pub const DEFAULT_PORT: u16 = 29500;

/// The first host of a SLURM node list: `gpu[03-06,09],cpu1` → `gpu03`, `a,b` → `a`.
pub fn first_host(nodelist: &str) -> Option<String> {
    let mut depth = 0;
    let end = nodelist
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                ',' if depth == 0 => return true,
                _ => {}
            }
            false
        })
        .map_or(nodelist.len(), |(i, _)| i);
    let first = nodelist[..end].trim();
    if first.is_empty() {
        return None;
    }
    match first.split_once('[') {
        None => Some(first.to_string()),
        Some((prefix, range)) => {
            let head = range.trim_end_matches(']').split([',', '-']).next()?;
            Some(format!("{prefix}{head}"))
        }
    }
}

impl Launch {
    pub fn resolve(tc: &super::TrainConfig) -> anyhow::Result<Launch> {
        Self::resolve_with(tc, |name| std::env::var(name).ok())
    }

    pub fn resolve_with(
        tc: &super::TrainConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Launch> {
        Self::resolve_overrides(tc.rank, tc.world, env)
    }

    /// Where torchrun or srun put this process, with no overrides (`sample`, `classify`, `bpd`).
    pub fn from_env() -> anyhow::Result<Launch> {
        Self::resolve_overrides(None, None, |name| std::env::var(name).ok())
    }

    /// `rank` / `world`, when given, win over the environment.
    pub fn resolve_overrides(
        rank: Option<usize>,
        world: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Launch> {
        let num = |name: &str| -> anyhow::Result<Option<usize>> {
            env(name)
                .map(|v| {
                    v.trim().parse::<usize>().with_context(|| {
                        format!("environment variable {name}={v:?} is not a number")
                    })
                })
                .transpose()
        };
        let torchrun = num("RANK")?.zip(num("WORLD_SIZE")?);
        let slurm = num("SLURM_PROCID")?.zip(num("SLURM_NTASKS")?);
        let (env_rank, env_world, local) = match (torchrun, slurm) {
            (Some((r, w)), _) => (Some(r), Some(w), num("LOCAL_RANK")?),
            (None, Some((r, w))) => (Some(r), Some(w), num("SLURM_LOCALID")?),
            (None, None) => (None, None, None),
        };
        let rank = rank.or(env_rank).unwrap_or(0);
        let world = world.or(env_world).unwrap_or(1);
        if world == 0 || rank >= world {
            bail!("rank {rank} of a world of {world}: the rank must be below the world size");
        }
        let master_addr = env("MASTER_ADDR")
            .filter(|a| !a.trim().is_empty())
            .or_else(|| env("SLURM_JOB_NODELIST").and_then(|l| first_host(&l)))
            .unwrap_or_else(|| "127.0.0.1".to_string());
        let master_port = match env("MASTER_PORT") {
            Some(p) => p
                .trim()
                .parse()
                .with_context(|| format!("MASTER_PORT={p:?} is not a port"))?,
            None => DEFAULT_PORT,
        };
        Ok(Launch {
            rank,
            world,
            local_rank: local.unwrap_or(if world == 1 { 0 } else { rank }),
            master_addr,
            master_port,
        })
    }

    /// The device this rank trains on: with several ranks, `auto` and `cuda` mean cuda:LOCAL_RANK.
    pub fn device(&self, configured: &str) -> anyhow::Result<tch::Device> {
        let spec = configured.trim();
        if self.world > 1 && (spec == "cuda" || (spec == "auto" && tch::Cuda::is_available())) {
            let n = tch::Cuda::device_count() as usize;
            if self.local_rank >= n {
                bail!(
                    "rank {} (local rank {}) needs cuda:{}, but this node has {n} CUDA devices",
                    self.rank,
                    self.local_rank,
                    self.local_rank
                );
            }
            return Ok(tch::Device::Cuda(self.local_rank));
        }
        Ok(model::device::parse_device(spec)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(vars: &[(&str, &str)], tc: &super::super::TrainConfig) -> anyhow::Result<Launch> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::resolve_with(tc, |k| map.get(k).cloned())
    }

    #[test]
    fn torchrun_slurm_and_single_process() {
        let tc = super::super::TrainConfig::default();
        let single = resolve(&[], &tc).unwrap();
        assert_eq!((single.rank, single.world, single.local_rank), (0, 1, 0));
        let torchrun = resolve(
            &[
                ("RANK", "5"),
                ("WORLD_SIZE", "8"),
                ("LOCAL_RANK", "1"),
                ("MASTER_ADDR", "node7"),
                ("MASTER_PORT", "29611"),
            ],
            &tc,
        )
        .unwrap();
        assert_eq!(
            torchrun,
            Launch {
                rank: 5,
                world: 8,
                local_rank: 1,
                master_addr: "node7".into(),
                master_port: 29611
            }
        );
        let slurm = resolve(
            &[
                ("SLURM_PROCID", "9"),
                ("SLURM_NTASKS", "16"),
                ("SLURM_LOCALID", "1"),
                ("SLURM_JOB_NODELIST", "gpu[03-06,09],cpu1"),
            ],
            &tc,
        )
        .unwrap();
        assert_eq!(
            (
                slurm.rank,
                slurm.world,
                slurm.local_rank,
                slurm.master_addr.as_str()
            ),
            (9, 16, 1, "gpu03")
        );
        assert_eq!(slurm.master_port, DEFAULT_PORT);
        let e = resolve(&[("RANK", "2"), ("WORLD_SIZE", "2")], &tc).unwrap_err();
        assert!(e.to_string().contains("rank 2 of a world of 2"), "{e}");
        let e = resolve(&[("RANK", "x"), ("WORLD_SIZE", "2")], &tc).unwrap_err();
        assert!(e.to_string().contains("RANK"), "{e}");
    }

    #[test]
    fn first_host_of_slurm_node_lists() {
        assert_eq!(first_host("a,b").as_deref(), Some("a"));
        assert_eq!(first_host("gpu[03-06,09],cpu1").as_deref(), Some("gpu03"));
        assert_eq!(first_host("n[7]").as_deref(), Some("n7"));
        assert_eq!(first_host("").as_deref(), None);
    }
}

impl Launch {
    /// Joins this job's process group (rendezvous at MASTER_ADDR:MASTER_PORT), logging it as `what`;
    /// a failure names the rank and the address.
    pub fn join_group(
        &self,
        backend: Backend,
        timeout: Duration,
        what: &str,
    ) -> anyhow::Result<Group> {
        let group = Group::join(
            backend,
            &self.master_addr,
            self.master_port,
            self.rank,
            self.world,
            timeout,
        )
        .with_context(|| {
            format!(
                "rank {} of {}: joining the process group at {}:{}",
                self.rank, self.world, self.master_addr, self.master_port
            )
        })?;
        tracing::info!(
            "rank {} of {}: {what} ({backend:?} process group at {}:{})",
            self.rank,
            self.world,
            self.master_addr,
            self.master_port
        );
        Ok(group)
    }
}
