//! Activation checkpointing: a function of tensors whose intermediate activations are not kept for
//! backward but recomputed there. The forward pass keeps only the function's inputs; backward runs the
//! function again with grad enabled and back-propagates through that fresh graph, so parameters the
//! function closes over get their gradients as usual. Memory for the function's internals is traded
//! for one more forward of it.

use std::ffi::{c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use crate::{check, handles, ExtError, Handle};

/// The recomputed function: the same inputs must give outputs of the same number and shapes each time
/// (no dropout drawn afresh, say).
pub type Recompute = dyn Fn(&[Tensor]) -> Vec<Tensor> + Send;

type CallFn = extern "C" fn(*mut c_void, *const *mut C_tensor, usize, *mut c_void) -> c_int;
type DropFn = extern "C" fn(*mut c_void);

extern "C" {
    fn ext_checkpoint(
        inputs: *const Handle,
        n: usize,
        ctx: *mut c_void,
        call: CallFn,
        drop: DropFn,
        out: *mut *mut C_tensor,
        max_out: usize,
        n_out: *mut usize,
    ) -> *mut std::ffi::c_char;
    fn ext_ckpt_push(out: *mut c_void, t: *mut C_tensor);
    fn ext_ckpt_fail(out: *mut c_void, msg: *const u8, len: usize);
    fn ext_grad_enabled() -> c_int;
}

/// The most outputs one checkpointed function may return.
const MAX_OUTPUTS: usize = 16;

struct Closure {
    f: Box<Recompute>,
    /// Inputs the caller gave; a trailing placeholder beyond them is not passed to `f`.
    inputs: usize,
}

/// Whether autograd is recording on this thread.
pub fn grad_enabled() -> bool {
    // SAFETY: reads a thread-local flag; no arguments, no state.
    unsafe { ext_grad_enabled() != 0 }
}

/// `f(inputs)` with its activations recomputed in backward instead of stored. Without grad mode it is
/// simply `f(inputs)`. `f` may run again later on another thread (CUDA's autograd threads), so it owns
/// what it uses (shallow clones of parameters share their storage and `.grad`).
pub fn checkpoint<F>(inputs: &[Tensor], f: F) -> Result<Vec<Tensor>, ExtError>
where
    F: Fn(&[Tensor]) -> Vec<Tensor> + Send + 'static,
{
    if !grad_enabled() {
        return Ok(f(inputs));
    }
    let device = inputs.first().map_or(Device::Cpu, Tensor::device);
    // When no input requires grad the outputs would carry no graph and the parameters inside `f` no
    // gradient; an empty leaf that does makes the node part of the graph.
    let placeholder = Tensor::empty([0], (Kind::Float, device)).set_requires_grad(true);
    let mut all: Vec<Tensor> = inputs.iter().map(Tensor::shallow_clone).collect();
    all.push(placeholder);
    let closure = Box::new(Closure {
        f: Box::new(f),
        inputs: inputs.len(),
    });
    let ctx = Box::into_raw(closure).cast::<c_void>();
    let h = handles(&all);
    let mut out: Vec<*mut C_tensor> = vec![std::ptr::null_mut(); MAX_OUTPUTS];
    let mut n_out = 0usize;
    // SAFETY: `h` holds live handles read during the call; `ctx` is a leaked Box<Closure> whose
    // ownership passes to the shim, which frees it exactly once through `drop_closure` (at once if the
    // call fails); `out` has room for MAX_OUTPUTS handles and only the first `n_out` are written, on
    // success. The shim keeps no other state, so a failed call leaves nothing for the next one.
    let err = unsafe {
        ext_checkpoint(
            h.as_ptr(),
            h.len(),
            ctx,
            call_closure,
            drop_closure,
            out.as_mut_ptr(),
            MAX_OUTPUTS,
            &mut n_out,
        )
    };
    check("checkpoint", err)?;
    Ok(out
        .into_iter()
        .take(n_out)
        // SAFETY: fresh non-null handles the shim allocated for us; each becomes one owning Tensor.
        .map(|p| unsafe { Tensor::from_ptr(p) })
        .collect())
}

extern "C" fn call_closure(
    ctx: *mut c_void,
    inputs: *const *mut C_tensor,
    n: usize,
    out: *mut c_void,
) -> c_int {
    // SAFETY: `ctx` is the Box<Closure> leaked in `checkpoint`, alive until `drop_closure`, and only
    // read here. `inputs` are `n` handles the shim allocated and gives up: each becomes one Tensor.
    let closure = unsafe { &*ctx.cast::<Closure>() };
    let tensors: Vec<Tensor> = (0..n)
        .map(|i| unsafe { Tensor::from_ptr(*inputs.add(i)) })
        .collect();
    let used = closure.inputs.min(tensors.len());
    match catch_unwind(AssertUnwindSafe(|| (closure.f)(&tensors[..used]))) {
        Ok(outputs) => {
            for mut t in outputs {
                let p = t.as_mut_ptr();
                std::mem::forget(t);
                // SAFETY: `p` is a handle nothing else owns any more (its Tensor was forgotten); the
                // shim moves it into the output list and frees the handle.
                unsafe { ext_ckpt_push(out, p) };
            }
            0
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("panic without a message");
            // SAFETY: `out` is the shim's output record for this call; the message is copied.
            unsafe { ext_ckpt_fail(out, msg.as_ptr(), msg.len()) };
            1
        }
    }
}

extern "C" fn drop_closure(ctx: *mut c_void) {
    // SAFETY: called exactly once per `checkpoint` call, with the pointer Box::into_raw gave.
    drop(unsafe { Box::from_raw(ctx.cast::<Closure>()) });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn mlp(w1: &Tensor, w2: &Tensor, x: &Tensor) -> Vec<Tensor> {
        let h = x.matmul(w1).tanh();
        vec![h.matmul(w2), h.sum(Kind::Float)]
    }

    /// Same outputs and the same gradients of parameters and input as without checkpointing; the
    /// closure is freed once the graph is gone; the input need not require grad.
    #[test]
    fn gradients_equal_the_plain_graph() {
        tch::manual_seed(0);
        let w1 = Tensor::randn([4, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let w2 = Tensor::randn([8, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        for input_grad in [true, false] {
            let x = Tensor::randn([5, 4], (Kind::Float, Device::Cpu)).set_requires_grad(input_grad);
            let plain = mlp(&w1, &w2, &x);
            (plain[0].square().sum(Kind::Float) + &plain[1]).backward();
            let g = [w1.grad().copy(), w2.grad().copy()];
            let gx = input_grad.then(|| x.grad().copy());
            for w in [&w1, &w2] {
                let _ = w.grad().zero_();
            }
            if input_grad {
                let _ = x.grad().zero_();
            }
            let calls = Arc::new(AtomicUsize::new(0));
            let (c, a, b) = (calls.clone(), w1.shallow_clone(), w2.shallow_clone());
            let outs = checkpoint(&[x.shallow_clone()], move |i| {
                c.fetch_add(1, Ordering::SeqCst);
                mlp(&a, &b, &i[0])
            })
            .unwrap();
            assert_eq!(outs.len(), 2);
            assert!((&outs[0] - &plain[0]).abs().max().double_value(&[]) < 1e-6);
            (outs[0].square().sum(Kind::Float) + &outs[1]).backward();
            assert_eq!(
                calls.load(Ordering::SeqCst),
                2,
                "one forward, one recomputation"
            );
            for (w, g) in [&w1, &w2].iter().zip(&g) {
                assert!((w.grad() - g).abs().max().double_value(&[]) < 1e-5);
                let _ = w.grad().zero_();
            }
            if let Some(gx) = gx {
                assert!((x.grad() - gx).abs().max().double_value(&[]) < 1e-5);
            }
            drop(outs);
            assert_eq!(
                Arc::strong_count(&calls),
                1,
                "the closure was freed with the graph"
            );
        }
    }

    /// Chained checkpoints (one block's output is the next one's input), an output left out of the
    /// loss, and a graph dropped without backward.
    #[test]
    fn chains_unused_outputs_and_dropped_graphs() {
        tch::manual_seed(1);
        let w = Tensor::randn([4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let block = |w: &Tensor| {
            let w = w.shallow_clone();
            move |i: &[Tensor]| vec![i[0].matmul(&w).sin(), i[0].sum(Kind::Float)]
        };
        let plain = x.matmul(&w).sin().matmul(&w).sin().sum(Kind::Float);
        plain.backward();
        let g = w.grad().copy();
        let _ = w.grad().zero_();
        let h = checkpoint(&[x.shallow_clone()], block(&w)).unwrap();
        let z = checkpoint(&[h[0].shallow_clone()], block(&w)).unwrap();
        z[0].sum(Kind::Float).backward();
        assert!((w.grad() - &g).abs().max().double_value(&[]) < 1e-5);
        let dropped = checkpoint(&[x.shallow_clone()], block(&w)).unwrap();
        drop(dropped);
    }

    /// A function that fails gives an error (first call) or a failing backward (recomputation), and
    /// good calls before and after still work.
    #[test]
    fn failures_are_errors_and_later_calls_work() {
        let w = Tensor::ones([2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::ones([1, 2], (Kind::Float, Device::Cpu));
        for round in 0..3 {
            let ww = w.shallow_clone();
            let ok = checkpoint(&[x.shallow_clone()], move |i| vec![i[0].matmul(&ww)]).unwrap();
            ok[0].sum(Kind::Float).backward();
            let err = checkpoint(&[x.shallow_clone()], |i| {
                vec![i[0].matmul(&Tensor::ones([3, 3], (Kind::Float, Device::Cpu)))]
            })
            .unwrap_err();
            assert!(
                err.to_string().contains("checkpointed function failed"),
                "round {round}: {err}"
            );
            // Fails only when recomputed: the second call panics.
            let calls = Arc::new(AtomicUsize::new(0));
            let (c, ww) = (calls.clone(), w.shallow_clone());
            let late = checkpoint(&[x.shallow_clone()], move |i| {
                if c.fetch_add(1, Ordering::SeqCst) == 1 {
                    panic!("recomputation went wrong");
                }
                vec![i[0].matmul(&ww)]
            })
            .unwrap();
            let res = late[0].sum(Kind::Float).f_backward();
            let msg = format!("{:?}", res.unwrap_err());
            assert!(
                msg.contains("recomputation went wrong"),
                "round {round}: {msg}"
            );
        }
        assert!(w.grad().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
