//! Where this process sits in a data-parallel job, read the way torchrun and SLURM say it: torchrun's
//! RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, else srun's SLURM_PROCID / SLURM_NTASKS /
//! SLURM_LOCALID with the rendezvous host from MASTER_ADDR or the first node of SLURM_JOB_NODELIST.
//! `train.rank` / `train.world` override the environment (a single process stays rank 0 of 1); the
//! evaluation commands resolve the same way without overrides ([`Launch::from_env`]).

use std::time::Duration;

use anyhow::{bail, Context};
use torch_ext::dist::{Backend, Group, Rendezvous};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// The rank's index on its node: its GPU is cuda:LOCAL_RANK.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent serves the rendezvous store (`TORCHELASTIC_USE_AGENT_STORE=True`).
    pub agent_store: bool,
    /// The launcher restricted this process's GPUs (`CUDA_VISIBLE_DEVICES` set, as
    /// `srun --gpus-per-task` does): the devices it sees are its own, numbered from 0.
    pub gpus_bound: bool,
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
    pub fn resolve(tc: &crate::config::TrainConfig) -> anyhow::Result<Launch> {
        Self::resolve_with(tc, |name| std::env::var(name).ok())
    }

    pub fn resolve_with(
        tc: &crate::config::TrainConfig,
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
        let agent_store = env("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1"));
        let gpus_bound = env("CUDA_VISIBLE_DEVICES").is_some_and(|v| !v.trim().is_empty());
        Ok(Launch {
            rank,
            world,
            local_rank: local.unwrap_or(if world == 1 { 0 } else { rank }),
            master_addr,
            master_port,
            agent_store,
            gpus_bound,
        })
    }

    /// The device this rank works on, made the current CUDA device when it is one. With several
    /// ranks, `auto` and `cuda` mean the rank's own GPU: cuda:LOCAL_RANK when the process sees every
    /// GPU of its node (torchrun, plain srun), or one of its own when the launcher bound GPUs per
    /// process (`srun --gpus-per-task=1`: every rank sees one device, cuda:0).
    pub fn device(&self, configured: &str) -> anyhow::Result<tch::Device> {
        let count = tch::Cuda::device_count().max(0) as usize;
        let device = self.device_with(configured, count)?;
        if let tch::Device::Cuda(index) = device {
            torch_ext::cuda::set_device(index).with_context(|| {
                format!(
                    "rank {} of {}: selecting cuda:{index}",
                    self.rank, self.world
                )
            })?;
        }
        Ok(device)
    }

    /// [`Launch::device`] against `cuda_devices` visible devices, with no side effect.
    pub fn device_with(
        &self,
        configured: &str,
        cuda_devices: usize,
    ) -> anyhow::Result<tch::Device> {
        let spec = configured.trim();
        let n = cuda_devices;
        let wants_gpu = spec == "cuda" || (spec == "auto" && n > 0);
        if self.world > 1 && wants_gpu {
            if self.local_rank < n {
                return Ok(tch::Device::Cuda(self.local_rank));
            }
            if self.gpus_bound && n > 0 {
                // Each process has its own GPUs: any of them is this rank's alone.
                let index = self.local_rank % n;
                tracing::info!(
                    "rank {} (local rank {}) sees {n} CUDA device(s) of its own (CUDA_VISIBLE_DEVICES): cuda:{index}",
                    self.rank,
                    self.local_rank
                );
                return Ok(tch::Device::Cuda(index));
            }
            bail!(
                "rank {} (local rank {}) needs cuda:{}, but this process sees {n} CUDA device(s); \
                 start one rank per GPU (torchrun --nproc-per-node={n}), or bind one GPU per rank \
                 (srun --gpus-per-task=1, which sets CUDA_VISIBLE_DEVICES)",
                self.rank,
                self.local_rank,
                self.local_rank
            );
        }
        if self.world > 1 && spec == "auto" && n == 0 {
            tracing::warn!(
                "rank {} of {}: no CUDA device visible (or libtorch was built without CUDA): training on the CPU over Gloo",
                self.rank,
                self.world
            );
        }
        match model::device::parse_device_with(spec, n) {
            Ok(d) => Ok(d),
            Err(e) => Err(e.into()),
        }
    }
}

impl Launch {
    /// Joins this job's process group (rendezvous at MASTER_ADDR:MASTER_PORT, or torchrun's agent
    /// store there), an NCCL communicator bound to `device`, logging it as `what`; a failure names the
    /// rank and the address.
    pub fn join_group(
        &self,
        backend: Backend,
        device: tch::Device,
        timeout: Duration,
        what: &str,
    ) -> anyhow::Result<Group> {
        let rendezvous = Rendezvous {
            host: &self.master_addr,
            port: self.master_port,
            rank: self.rank,
            world: self.world,
            timeout,
            agent_store: self.agent_store,
            device: match device {
                tch::Device::Cuda(i) => Some(i),
                _ => None,
            },
        };
        let group = Group::join(backend, &rendezvous).with_context(|| {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(vars: &[(&str, &str)], tc: &crate::config::TrainConfig) -> anyhow::Result<Launch> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::resolve_with(tc, |k| map.get(k).cloned())
    }

    #[test]
    fn torchrun_slurm_and_single_process() {
        let tc = crate::config::TrainConfig::default();
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
                master_port: 29611,
                agent_store: false,
                gpus_bound: false,
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

    /// Device selection for the launchers a GPU user meets, with the visible device count injected.
    #[test]
    fn each_rank_gets_its_own_gpu_under_every_launcher() {
        let tc = crate::config::TrainConfig::default();
        let at = |vars: &[(&str, &str)], spec: &str, n: usize| {
            resolve(vars, &tc).unwrap().device_with(spec, n)
        };
        let cuda = |i| tch::Device::Cuda(i);
        // torchrun on one node of 8 GPUs: every process sees all 8.
        let torchrun = |r: &'static str| {
            vec![
                ("RANK", r),
                ("WORLD_SIZE", "8"),
                ("LOCAL_RANK", r),
                ("MASTER_ADDR", "n0"),
            ]
        };
        for r in 0..8 {
            let name: &'static str = ["0", "1", "2", "3", "4", "5", "6", "7"][r];
            assert_eq!(at(&torchrun(name), "auto", 8).unwrap(), cuda(r));
            assert_eq!(at(&torchrun(name), "cuda", 8).unwrap(), cuda(r));
        }
        // torchrun on the second of two nodes: global rank 13 is local rank 5.
        let second = [("RANK", "13"), ("WORLD_SIZE", "16"), ("LOCAL_RANK", "5")];
        assert_eq!(at(&second, "auto", 8).unwrap(), cuda(5));
        // srun without per-task binding: SLURM_LOCALID picks the GPU, on any node.
        let srun = [
            ("SLURM_PROCID", "11"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "3"),
        ];
        assert_eq!(at(&srun, "auto", 8).unwrap(), cuda(3));
        // srun --gpus-per-task=1: each task sees one device of its own.
        let bound = [
            ("SLURM_PROCID", "11"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "3"),
            ("CUDA_VISIBLE_DEVICES", "3"),
        ];
        assert_eq!(at(&bound, "auto", 1).unwrap(), cuda(0));
        assert_eq!(at(&bound, "cuda", 1).unwrap(), cuda(0));
        // --gpus-per-task=2 with local rank 3: one of its own two.
        assert_eq!(at(&bound, "auto", 2).unwrap(), cuda(1));
        // Too few GPUs and no binding: refused, naming the rank and the remedy.
        let e = at(&srun, "cuda", 2).unwrap_err().to_string();
        assert!(
            e.contains("local rank 3") && e.contains("--gpus-per-task"),
            "{e}"
        );
        // No GPU: auto is the CPU, cuda is refused, cpu stays cpu.
        assert_eq!(at(&srun, "auto", 0).unwrap(), tch::Device::Cpu);
        assert!(at(&srun, "cuda", 0).is_err());
        assert_eq!(at(&srun, "cpu", 8).unwrap(), tch::Device::Cpu);
        // One process: auto is cuda:0, an explicit device is checked against those present.
        assert_eq!(at(&[], "auto", 4).unwrap(), cuda(0));
        assert_eq!(at(&[], "cuda:2", 4).unwrap(), cuda(2));
        assert!(at(&[], "cuda:4", 4).is_err());
    }

    #[test]
    fn torchrun_agent_store_is_honoured() {
        let tc = crate::config::TrainConfig::default();
        let base = [("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")];
        assert!(!resolve(&base, &tc).unwrap().agent_store);
        let mut agent = base.to_vec();
        agent.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
        assert!(resolve(&agent, &tc).unwrap().agent_store);
        agent.pop();
        agent.push(("TORCHELASTIC_USE_AGENT_STORE", "False"));
        assert!(!resolve(&agent, &tc).unwrap().agent_store);
    }

    #[test]
    fn first_host_of_slurm_node_lists() {
        assert_eq!(first_host("a,b").as_deref(), Some("a"));
        assert_eq!(first_host("gpu[03-06,09],cpu1").as_deref(), Some("gpu03"));
        assert_eq!(first_host("n[7]").as_deref(), Some("n7"));
        assert_eq!(first_host("").as_deref(), None);
    }
}
