//! c10d process groups from Rust: the TCPStore rendezvous and the Gloo backend that PyTorch's own
//! DistributedDataParallel runs on, behind a handle that frees them on drop. Every collective waits
//! for its result (on CPU the data is reduced when the call returns) and fails with an error, not a
//! hang, when a peer is gone or the group's timeout passes.

use std::ffi::{c_char, c_int, CString};
use std::time::Duration;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::{check, ExtError};

#[repr(C)]
struct RawGroup {
    _private: [u8; 0],
}

extern "C" {
    fn ext_group_new(
        backend: *const c_char,
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        agent_store: c_int,
        device: c_int,
        out: *mut *mut RawGroup,
    ) -> *mut c_char;
    fn ext_group_free(g: *mut RawGroup);
    fn ext_group_allreduce(
        g: *mut RawGroup,
        t: *const C_tensor,
        op: c_int,
        control: c_int,
    ) -> *mut c_char;
    fn ext_group_broadcast(g: *mut RawGroup, t: *const C_tensor, root: c_int) -> *mut c_char;
    fn ext_group_barrier(g: *mut RawGroup) -> *mut c_char;
}

/// `gloo` (CPU tensors) or `nccl` (CUDA tensors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// Where and how a rank meets the others.
#[derive(Clone, Debug)]
pub struct Rendezvous<'a> {
    pub host: &'a str,
    pub port: u16,
    pub rank: usize,
    pub world: usize,
    /// Rendezvous and collectives give up after this long with an error.
    pub timeout: Duration,
    /// torchrun's agent already serves the store at `host:port` (`TORCHELASTIC_USE_AGENT_STORE`):
    /// rank 0 joins it as a client instead of binding the port a second time.
    pub agent_store: bool,
    /// The CUDA device an NCCL communicator is bound to.
    pub device: Option<usize>,
}

impl<'a> Rendezvous<'a> {
    /// A rendezvous served by rank 0, no device bound.
    pub fn new(host: &'a str, port: u16, rank: usize, world: usize, timeout: Duration) -> Self {
        Rendezvous {
            host,
            port,
            rank,
            world,
            timeout,
            agent_store: false,
            device: None,
        }
    }
}

/// One rank's membership of a process group.
pub struct Group {
    raw: *mut RawGroup,
    pub rank: usize,
    pub world: usize,
}

// SAFETY: the c10d objects are thread-safe to hand over; the group is used from one thread at a time
// (every method takes &self but the trainer calls them from its own thread only).
unsafe impl Send for Group {}

impl Group {
    /// Joins the group through the TCPStore at `r.host:r.port` (served by rank 0, or by torchrun's
    /// agent when `r.agent_store`).
    pub fn join(backend: Backend, r: &Rendezvous<'_>) -> Result<Group, ExtError> {
        let op = "process group";
        let bad = |message: String| ExtError { op, message };
        let (rank, world) = (r.rank, r.world);
        if world == 0 || rank >= world {
            return Err(bad(format!("rank {rank} of a world of {world}")));
        }
        let host_c = CString::new(r.host).map_err(|_| bad(format!("host {:?}", r.host)))?;
        let backend_c = CString::new(backend.name()).expect("static name");
        let device = match r.device {
            None => -1,
            Some(d) => c_int::try_from(d).map_err(|_| bad(format!("CUDA device {d}")))?,
        };
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid C strings for the call; `raw` is written only on success.
        let err = unsafe {
            ext_group_new(
                backend_c.as_ptr(),
                host_c.as_ptr(),
                r.port as c_int,
                rank as c_int,
                world as c_int,
                r.timeout.as_millis() as i64,
                r.agent_store as c_int,
                device,
                &mut raw,
            )
        };
        check(op, err)?;
        Ok(Group { raw, rank, world })
    }

    fn all_reduce(
        &self,
        what: &'static str,
        t: &Tensor,
        op: c_int,
        control: bool,
    ) -> Result<(), ExtError> {
        // SAFETY: a live group and a live tensor handle for the call.
        check(what, unsafe {
            ext_group_allreduce(self.raw, t.as_ptr(), op, control as c_int)
        })
        .map_err(|e| ExtError {
            op: e.op,
            message: format!("rank {} of {}: {}", self.rank, self.world, e.message),
        })
    }

    /// Sums `t` over the ranks, in place.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<(), ExtError> {
        self.all_reduce("all_reduce", t, 0, false)
    }

    /// The element-wise maximum of `t` over the ranks, in place.
    pub fn all_reduce_max(&self, t: &Tensor) -> Result<(), ExtError> {
        self.all_reduce("all_reduce", t, 1, false)
    }

    /// The element-wise maximum of a CPU tensor over the ranks, on the control channel: a Gloo group
    /// of its own, so it never queues behind (or mismatches) the data collectives and costs no device
    /// synchronisation.
    pub fn control_max(&self, t: &Tensor) -> Result<(), ExtError> {
        self.all_reduce("control all_reduce", t, 1, true)
    }

    /// The sum of a CPU tensor over the ranks, on the control channel.
    pub fn control_sum(&self, t: &Tensor) -> Result<(), ExtError> {
        self.all_reduce("control all_reduce", t, 0, true)
    }

    /// Overwrites `t` with rank `root`'s, in place.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<(), ExtError> {
        // SAFETY: as above.
        check("broadcast", unsafe {
            ext_group_broadcast(self.raw, t.as_ptr(), root as c_int)
        })
    }

    pub fn barrier(&self) -> Result<(), ExtError> {
        // SAFETY: a live group.
        check("barrier", unsafe { ext_group_barrier(self.raw) })
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: created by ext_group_new, freed once.
        unsafe { ext_group_free(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Two ranks (threads here; processes in the trainer's test) over Gloo on 127.0.0.1: a sum, a
    /// broadcast and a barrier on the data channel, interleaved with flags on the control channel.
    #[test]
    fn two_gloo_ranks_reduce_and_broadcast() {
        let port = free_port();
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || {
                    let r = Rendezvous::new("127.0.0.1", port, rank, 2, Duration::from_secs(30));
                    let g = Group::join(Backend::Gloo, &r).unwrap();
                    let t = Tensor::full([3], (rank + 1) as f64, (Kind::Float, Device::Cpu));
                    g.all_reduce_sum(&t).unwrap();
                    let flags = Tensor::from_slice(&[rank as i64, 7 * rank as i64]);
                    g.control_max(&flags).unwrap();
                    let m = Tensor::full([1], rank as f64, (Kind::Float, Device::Cpu));
                    g.all_reduce_max(&m).unwrap();
                    assert_eq!(m.double_value(&[0]), 1.0);
                    let c = Tensor::from_slice(&[1.0f64 + rank as f64]);
                    g.control_sum(&c).unwrap();
                    let b = Tensor::full([2], rank as f64 * 10.0 + 5.0, (Kind::Float, Device::Cpu));
                    g.broadcast(&b, 1).unwrap();
                    g.barrier().unwrap();
                    (
                        Vec::<f32>::try_from(&t).unwrap(),
                        Vec::<f32>::try_from(&b).unwrap(),
                        Vec::<i64>::try_from(&flags).unwrap(),
                        c.double_value(&[0]),
                    )
                })
            })
            .collect();
        for r in ranks {
            let (sum, b, flags, c) = r.join().unwrap();
            assert_eq!(sum, [3.0; 3]);
            assert_eq!(b, [15.0; 2]);
            assert_eq!(flags, [1, 7]);
            assert_eq!(c, 3.0);
        }
    }

    /// A collective whose peer never comes is an error naming the rank once the timeout passes.
    #[test]
    fn a_missing_peer_is_an_error_naming_the_rank() {
        let port = free_port();
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || {
                    let r = Rendezvous::new("127.0.0.1", port, rank, 2, Duration::from_secs(3));
                    let g = Group::join(Backend::Gloo, &r).unwrap();
                    if rank == 0 {
                        let flags = Tensor::from_slice(&[1i64]);
                        Some(g.control_max(&flags).unwrap_err())
                    } else {
                        // Rank 1 stays in the group (its sockets open) but never joins the call.
                        std::thread::sleep(Duration::from_secs(5));
                        None
                    }
                })
            })
            .collect();
        let errors: Vec<_> = ranks
            .into_iter()
            .filter_map(|r| r.join().unwrap())
            .collect();
        let e = errors[0].to_string();
        assert!(
            e.contains("rank 0 of 2") && e.contains("control all_reduce"),
            "{e}"
        );
    }

    /// NCCL on a world of one: with a GPU, a bound communicator sums a CUDA tensor; without one, the
    /// join is an error that names NCCL (and the skipped GPU branch is reported).
    #[test]
    fn nccl_world_of_one_and_bad_ranks() {
        let e = Group::join(
            Backend::Gloo,
            &Rendezvous::new("127.0.0.1", 1, 2, 2, Duration::from_secs(1)),
        )
        .err()
        .unwrap();
        assert!(e.message.contains("rank 2 of a world of 2"), "{e}");
        let mut r = Rendezvous::new("127.0.0.1", free_port(), 0, 1, Duration::from_secs(20));
        if tch::Cuda::is_available() {
            r.device = Some(0);
            let g = Group::join(Backend::Nccl, &r).unwrap();
            let t = Tensor::full([4], 2.5, (Kind::Float, Device::Cuda(0)));
            g.all_reduce_sum(&t).unwrap();
            let flags = Tensor::from_slice(&[3i64]);
            g.control_max(&flags).unwrap();
            assert_eq!(
                Vec::<f32>::try_from(t.to_device(Device::Cpu)).unwrap(),
                [2.5; 4]
            );
            assert_eq!(flags.int64_value(&[0]), 3);
        } else {
            let e = Group::join(Backend::Nccl, &r).err().unwrap();
            assert!(e.message.contains("NCCL"), "{e}");
            crate::skip::gpu_branch("dist::nccl_world_of_one_and_bad_ranks", "no CUDA device");
        }
    }
}
