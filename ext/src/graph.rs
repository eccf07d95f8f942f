//! CUDA graphs (`at::cuda::CUDAGraph`, what `torch.cuda.graph` wraps): fixed-shape work captured once and
//! replayed with one launch. The work reads and writes only tensors that outlive the graph (static
//! buffers); anything it allocates lives in the graph's private memory pool and is reused by each replay.

use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::{check, ExtError};

type BodyFn = extern "C" fn(*mut c_void) -> c_int;

extern "C" {
    fn ext_graph_available() -> c_int;
    fn ext_graph_capture(
        device: i32,
        warmups: i32,
        ctx: *mut c_void,
        body: BodyFn,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn ext_graph_replay(graph: *mut c_void) -> *mut c_char;
    fn ext_graph_free(graph: *mut c_void);
}

/// Whether this build can capture CUDA graphs at all (it was compiled against the CUDA headers).
pub fn available() -> bool {
    // SAFETY: returns a constant compiled into the shim; no state, so nothing an earlier call did can
    // change it.
    unsafe { ext_graph_available() != 0 }
}

/// A captured graph; freed (with its memory pool) on drop.
pub struct CudaGraph(*mut c_void);

struct Body<'a> {
    f: &'a mut dyn FnMut() -> Result<(), String>,
    error: Option<String>,
}

extern "C" fn call_body(ctx: *mut c_void) -> c_int {
    // SAFETY: `ctx` is the `Body` that this call's `capture` borrows mutably for the whole shim call; the
    // shim calls back only from inside that call, on this thread, one call at a time, so no other
    // reference to it is live. A body that failed or panicked in an earlier callback left only its
    // message in `error`, which is still a valid `Body`.
    let body = unsafe { &mut *ctx.cast::<Body>() };
    let result = match catch_unwind(AssertUnwindSafe(|| (body.f)())) {
        Ok(r) => r,
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic without a message".into())),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            body.error.get_or_insert(e);
            1
        }
    }
}

impl CudaGraph {
    /// Runs `body` `warmups` times eagerly, then captures one more run of it, all on a side stream of
    /// CUDA device `device`; the current stream is ordered before and after. `body` must enqueue the
    /// same kernels on the same tensors every time and must not read anything back to the host.
    pub fn capture(
        device: usize,
        warmups: u32,
        mut body: impl FnMut() -> Result<(), String>,
    ) -> Result<CudaGraph, ExtError> {
        let op = "cuda graph capture";
        let index = i32::try_from(device).map_err(|_| ExtError {
            op,
            message: format!("no CUDA device {device}"),
        })?;
        let warmups = i32::try_from(warmups).map_err(|_| ExtError {
            op,
            message: format!("{warmups} warm-up runs"),
        })?;
        let mut ctx = Body {
            f: &mut body,
            error: None,
        };
        let mut graph: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ctx` outlives the call and is only touched through `call_body` during it; `graph` is
        // an out-pointer to a live local, written only on success; the shim catches every C++ exception.
        // A capture the shim began is always ended before it returns, also when the body failed, so an
        // earlier failed call leaves no stream in capture mode and no half-made graph behind.
        let err = unsafe {
            ext_graph_capture(
                index,
                warmups,
                (&mut ctx as *mut Body).cast(),
                call_body,
                &mut graph,
            )
        };
        let result = check(op, err);
        match (result, ctx.error) {
            (Ok(()), _) => Ok(CudaGraph(graph)),
            (Err(e), Some(inner)) => Err(ExtError {
                op,
                message: format!("{}: {inner}", e.message),
            }),
            (Err(e), None) => Err(e),
        }
    }

    /// Launches the captured work on its device's current stream.
    pub fn replay(&self) -> Result<(), ExtError> {
        // SAFETY: self.0 came from a successful ext_graph_capture (a failed one returns no graph) and is
        // freed only in Drop; a replay leaves the graph as it was, so any number may follow.
        check("cuda graph replay", unsafe { ext_graph_replay(self.0) })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: self.0 came from a successful ext_graph_capture; Drop runs once, so this is its only
        // free, and no replay can follow it.
        unsafe { ext_graph_free(self.0) }
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::CudaGraph;

    /// Mutated calls in sequence: devices that do not exist, a warm-up count beyond the shim's range,
    /// failing and panicking bodies. Each is refused by name without running the body where there is
    /// nothing to run it on, and leaves nothing behind: on a GPU, a good capture after them replays a
    /// counter advanced by the graph on its own buffers, and a failing capture after that still fails
    /// cleanly while the good graph keeps replaying.
    #[test]
    fn captures_replays_or_refuses() {
        let count = tch::Cuda::device_count() as usize;
        for round in 0..2 {
            for bad in [count, count + 3, usize::MAX / 2] {
                let mut ran = false;
                let err = CudaGraph::capture(bad, 1, || {
                    ran = true;
                    Ok(())
                })
                .err()
                .expect("no such device");
                assert!(err.to_string().contains("cuda graph capture"), "{err}");
                assert!(!ran, "round {round}: the body ran for device {bad}");
            }
            let err = CudaGraph::capture(0, u32::MAX, || Ok(()))
                .err()
                .expect("too many warm-ups");
            assert!(err.to_string().contains("warm-up"), "{err}");
            if count == 0 {
                let err = CudaGraph::capture(0, 0, || Err("planted failure".into()))
                    .err()
                    .expect("no device");
                assert!(err.to_string().contains("cuda graph capture"), "{err}");
            }
        }
        if count == 0 || !super::available() {
            crate::skip::gpu_branch(
                "graph::captures_replays_or_refuses",
                "no CUDA device or no CUDA headers in this build",
            );
            return;
        }
        for warmups in [0, 1] {
            let err = CudaGraph::capture(0, warmups, || Err("planted failure".into()))
                .err()
                .expect("the body failed");
            assert!(err.to_string().contains("planted failure"), "{err}");
        }
        let err = CudaGraph::capture(0, 0, || panic!("planted panic"))
            .err()
            .expect("the body panicked");
        assert!(err.to_string().contains("planted panic"), "{err}");
        let pos = Tensor::zeros([1], (Kind::Int64, Device::Cuda(0)));
        let out = Tensor::zeros([8], (Kind::Float, Device::Cuda(0)));
        let graph = CudaGraph::capture(0, 1, || {
            let v = pos.f_to_kind(Kind::Float).map_err(|e| e.to_string())? + 1.0;
            let _ = out
                .shallow_clone()
                .f_index_copy_(0, &pos, &v)
                .map_err(|e| e.to_string())?;
            let _ = pos
                .shallow_clone()
                .f_add_scalar_(1)
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .unwrap();
        // The warm-up ran once: start again from 0.
        let _ = pos.shallow_clone().zero_();
        let _ = out.shallow_clone().zero_();
        for _ in 0..4 {
            graph.replay().unwrap();
        }
        assert!(CudaGraph::capture(0, 0, || Err("planted failure".into())).is_err());
        for _ in 0..4 {
            graph.replay().unwrap();
        }
        let got = Vec::<f32>::try_from(out.to_device(Device::Cpu)).unwrap();
        assert_eq!(got, (1..=8).map(|i| i as f32).collect::<Vec<_>>());
    }
}
