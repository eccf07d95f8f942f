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
        out: *mut *mut RawGroup,
    ) -> *mut c_char;
    fn ext_group_free(g: *mut RawGroup);
    fn ext_group_allreduce(g: *mut RawGroup, t: *const C_tensor, op: c_int) -> *mut c_char;
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
    /// Joins the group through rank 0's TCPStore at `host:port` (rank 0 serves it).
    pub fn join(
        backend: Backend,
        host: &str,
        port: u16,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Group, ExtError> {
        let op = "process group";
        let bad = |message: String| ExtError { op, message };
        if world == 0 || rank >= world {
            return Err(bad(format!("rank {rank} of a world of {world}")));
        }
        let host_c = CString::new(host).map_err(|_| bad(format!("host {host:?}")))?;
        let backend_c = CString::new(backend.name()).expect("static name");
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid C strings for the call; `raw` is written only on success.
        let err = unsafe {
            ext_group_new(
                backend_c.as_ptr(),
                host_c.as_ptr(),
                port as c_int,
                rank as c_int,
                world as c_int,
                timeout.as_millis() as i64,
                &mut raw,
            )
        };
        check(op, err)?;
        Ok(Group { raw, rank, world })
    }

    /// Sums `t` over the ranks, in place.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<(), ExtError> {
        // SAFETY: a live group and a live tensor handle for the call.
        check("all_reduce", unsafe {
            ext_group_allreduce(self.raw, t.as_ptr(), 0)
        })
    }

    /// The element-wise maximum of `t` over the ranks, in place.
    pub fn all_reduce_max(&self, t: &Tensor) -> Result<(), ExtError> {
        // SAFETY: as above.
        check("all_reduce", unsafe {
            ext_group_allreduce(self.raw, t.as_ptr(), 1)
        })
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
    /// broadcast and a barrier.
    #[test]
    fn two_gloo_ranks_reduce_and_broadcast() {
        let port = free_port();
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || {
                    let g = Group::join(
                        Backend::Gloo,
                        "127.0.0.1",
                        port,
                        rank,
                        2,
                        Duration::from_secs(30),
                    )
                    .unwrap();
                    let t = Tensor::full([3], (rank + 1) as f64, (Kind::Float, Device::Cpu));
                    g.all_reduce_sum(&t).unwrap();
                    let m = Tensor::full([1], rank as f64, (Kind::Float, Device::Cpu));
                    g.all_reduce_max(&m).unwrap();
                    assert_eq!(m.double_value(&[0]), 1.0);
                    let b = Tensor::full([2], rank as f64 * 10.0 + 5.0, (Kind::Float, Device::Cpu));
                    g.broadcast(&b, 1).unwrap();
                    g.barrier().unwrap();
                    (
                        Vec::<f32>::try_from(&t).unwrap(),
                        Vec::<f32>::try_from(&b).unwrap(),
                    )
                })
            })
            .collect();
        for r in ranks {
            let (sum, b) = r.join().unwrap();
            assert_eq!(sum, [3.0; 3]);
            assert_eq!(b, [15.0; 2]);
        }
    }

    #[test]
    fn nccl_without_a_gpu_and_bad_ranks_are_errors() {
        let e = Group::join(Backend::Gloo, "127.0.0.1", 1, 2, 2, Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(e.message.contains("rank 2 of a world of 2"), "{e}");
        let port = free_port();
        let e = Group::join(
            Backend::Nccl,
            "127.0.0.1",
            port,
            0,
            1,
            Duration::from_secs(5),
        )
        .err()
        .unwrap();
        assert!(e.message.contains("NCCL"), "{e}");
    }
}
