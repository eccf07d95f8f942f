//! libtorch operations that tch does not bind, reached through `csrc/ext.cpp`: PyTorch's fused AdamW
//! kernel and the `_foreach_*` multi-tensor ops that the optimizer step, the EMA and gradient clipping
//! are made of. Each call is one libtorch dispatch over a whole list of tensors instead of one or more
//! kernels per parameter, and none reads a value back to the host; and (`dist`) c10d's process groups
//! for data-parallel training; (`checkpoint`) activation checkpointing through a custom autograd node;
//! (`memory`) the CUDA caching allocator's statistics; (`event`) CUDA events; (`graph`) CUDA graphs. C++ exceptions come back as [`ExtError`] with the operation's name,
//! never as a panic.

pub mod checkpoint;
pub mod cuda;
pub mod dist;
pub mod event;
pub mod graph;
pub mod memory;
pub mod onednn;
pub mod routing;
pub mod skip;

use std::ffi::{c_char, CStr};

use tch::Tensor;
use torch_sys::C_tensor;

#[derive(Debug, thiserror::Error)]
#[error("libtorch {op}: {message}")]
pub struct ExtError {
    pub op: &'static str,
    pub message: String,
}

type Handle = *const C_tensor;

extern "C" {
    fn ext_free_error(e: *mut c_char);
    fn ext_fused_adamw(
        params: *const Handle,
        grads: *const Handle,
        exp_avgs: *const Handle,
        exp_avg_sqs: *const Handle,
        steps: *const Handle,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        found_inf: Handle,
    ) -> *mut c_char;
    fn ext_foreach_lerp_(
        this: *const Handle,
        end: *const Handle,
        n: usize,
        weight: Handle,
    ) -> *mut c_char;
    fn ext_foreach_norm(ts: *const Handle, n: usize, out: *mut *mut C_tensor) -> *mut c_char;
    fn ext_foreach_mul_(ts: *const Handle, n: usize, factor: Handle) -> *mut c_char;
    fn ext_clear_grads(ts: *const Handle, n: usize) -> *mut c_char;
    fn ext_zero_missing_grads(ts: *const Handle, n: usize) -> *mut c_char;
}

/// Turns the shim's returned message (or null) into a Result, freeing the message.
fn check(op: &'static str, err: *mut c_char) -> Result<(), ExtError> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string the shim malloc'd for us to free once.
    let message = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { ext_free_error(err) };
    Err(ExtError { op, message })
}

fn handles(ts: &[Tensor]) -> Vec<Handle> {
    ts.iter().map(Tensor::as_ptr).collect()
}

fn same_len(op: &'static str, lens: &[usize]) -> Result<(), ExtError> {
    if lens.windows(2).any(|w| w[0] != w[1]) {
        return Err(ExtError {
            op,
            message: format!("tensor lists of different lengths {lens:?}"),
        });
    }
    Ok(())
}

/// Hyper-parameters of one AdamW update (PyTorch's names and decoupled weight decay).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One fused AdamW update of every parameter (`at::_fused_adamw_`, CPU and CUDA). `steps` holds the
/// float32 step count of each parameter, already incremented for this update (the same 0-d tensor
/// may be given for all); where `found_inf` is 1 the kernel leaves everything as it was.
pub fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    steps: &[Tensor],
    h: AdamWStep,
    found_inf: Option<&Tensor>,
) -> Result<(), ExtError> {
    let op = "_fused_adamw_";
    same_len(
        op,
        &[
            params.len(),
            grads.len(),
            exp_avgs.len(),
            exp_avg_sqs.len(),
            steps.len(),
        ],
    )?;
    let (p, g, m, v, s) = (
        handles(params),
        handles(grads),
        handles(exp_avgs),
        handles(exp_avg_sqs),
        handles(steps),
    );
    let inf = found_inf.map_or(std::ptr::null(), Tensor::as_ptr);
    // SAFETY: five arrays of `n` live tensor handles (borrowed for the call) and an optional handle;
    // the shim only reads them, catches every C++ exception and keeps no state between calls, so a
    // failed earlier call (mismatched lists, wrong dtypes) changes nothing for this one.
    let err = unsafe {
        ext_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            p.len(),
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            inf,
        )
    };
    check(op, err)
}

/// `this[i] += weight · (end[i] − this[i])` for all i, `weight` a 0-d tensor on the same device. As
/// in libtorch, a call that fails part-way (tensors of other shapes) may have updated the tensors
/// before the failing one.
pub fn foreach_lerp_(this: &[Tensor], end: &[Tensor], weight: &Tensor) -> Result<(), ExtError> {
    let op = "_foreach_lerp_";
    same_len(op, &[this.len(), end.len()])?;
    let (a, b) = (handles(this), handles(end));
    // SAFETY: two arrays of `n` live handles and one handle, read during the call.
    let err = unsafe { ext_foreach_lerp_(a.as_ptr(), b.as_ptr(), a.len(), weight.as_ptr()) };
    check(op, err)
}

/// The L2 norm of each tensor, as 0-d tensors on their devices.
pub fn foreach_norm(ts: &[Tensor]) -> Result<Vec<Tensor>, ExtError> {
    let h = handles(ts);
    let mut out: Vec<*mut C_tensor> = vec![std::ptr::null_mut(); ts.len()];
    // SAFETY: `out` has room for `n` handles, which the shim fills with tensors it allocated with
    // `new` only when it succeeds; the shim keeps no state between calls, so an earlier failed call
    // leaves nothing behind that this one could read.
    let err = unsafe { ext_foreach_norm(h.as_ptr(), h.len(), out.as_mut_ptr()) };
    check("_foreach_norm", err)?;
    Ok(out
        .into_iter()
        // SAFETY: on success every slot holds a fresh, non-null handle that nothing else owns; each
        // becomes exactly one `Tensor`, which frees it on drop.
        .map(|p| unsafe { Tensor::from_ptr(p) })
        .collect())
}

/// Drops every tensor's `.grad` (`zero_grad(set_to_none=True)`): no kernel per parameter, and the
/// next backward stores its gradient instead of adding it into zeros.
pub fn clear_grads(ts: &[Tensor]) -> Result<(), ExtError> {
    let h = handles(ts);
    // SAFETY: `n` handles that live through the call; the shim refuses undefined ones (before touching
    // any grad field) and keeps nothing between calls.
    let err = unsafe { ext_clear_grads(h.as_ptr(), h.len()) };
    check("clear grads", err)
}

/// Gives every tensor that has no `.grad` a zero one, so that a list of gradients has the same
/// members on every rank of a data-parallel group whatever a step reached.
pub fn zero_missing_grads(ts: &[Tensor]) -> Result<(), ExtError> {
    let h = handles(ts);
    // SAFETY: `n` handles that live through the call; the shim refuses a list with an undefined one
    // before changing anything and keeps nothing between calls.
    let err = unsafe { ext_zero_missing_grads(h.as_ptr(), h.len()) };
    check("zero missing grads", err)
}

/// `ts[i] *= factor` for all i, `factor` a 0-d tensor (never read on the host).
pub fn foreach_mul_(ts: &[Tensor], factor: &Tensor) -> Result<(), ExtError> {
    let h = handles(ts);
    // SAFETY: `n` live handles and one, read during the call.
    let err = unsafe { ext_foreach_mul_(h.as_ptr(), h.len(), factor.as_ptr()) };
    check("_foreach_mul_", err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn close(a: &Tensor, b: &Tensor) -> bool {
        (a - b).abs().max().double_value(&[]) < 1e-6
    }

    /// Cleared gradients are undefined and the next backward stores its own; a missing one becomes
    /// zeros of the parameter's shape, and a present one is left alone.
    #[test]
    fn clear_grads_then_backward_stores_and_missing_ones_become_zeros() {
        let a = Tensor::ones([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&a * 3.0).sum(Kind::Float).backward();
        (&b * 2.0).sum(Kind::Float).backward();
        clear_grads(&[a.shallow_clone(), b.shallow_clone()]).unwrap();
        assert!(!a.grad().defined() && !b.grad().defined());
        (&a * 5.0).sum(Kind::Float).backward();
        assert!(close(&a.grad(), &a.full_like(5.0)));
        zero_missing_grads(&[a.shallow_clone(), b.shallow_clone()]).unwrap();
        assert!(close(&a.grad(), &a.full_like(5.0)));
        assert_eq!(b.grad().size(), vec![4]);
        assert!(close(&b.grad(), &b.zeros_like()));
        // An undefined tensor in the list is an error, and the calls after it work as before.
        for _ in 0..2 {
            assert!(clear_grads(&[a.shallow_clone(), Tensor::new()]).is_err());
            assert!(a.grad().defined(), "a refused list changes nothing");
            assert!(zero_missing_grads(&[Tensor::new()]).is_err());
            clear_grads(&[b.shallow_clone()]).unwrap();
            zero_missing_grads(&[b.shallow_clone()]).unwrap();
            assert!(close(&b.grad(), &b.zeros_like()));
        }
    }

    /// The fused kernel against AdamW written out (PyTorch's update order), two steps; then a step
    /// with found_inf = 1 changes nothing, even with a NaN gradient.
    /// On the CPU and, when there is one, on the GPU (the fused CUDA kernel is a different kernel).
    #[test]
    fn fused_adamw_is_adamw_and_skips_on_found_inf() {
        fused_adamw_on(Device::Cpu);
        if tch::Cuda::is_available() {
            fused_adamw_on(Device::Cuda(0));
        } else {
            crate::skip::gpu_branch(
                "fused_adamw_is_adamw_and_skips_on_found_inf",
                "no CUDA device",
            );
        }
    }

    fn fused_adamw_on(device: Device) {
        tch::manual_seed(0);
        let shapes: [&[i64]; 3] = [&[5, 3], &[7], &[2, 2, 2]];
        let params: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(*s, (Kind::Float, device)))
            .collect();
        let reference: Vec<Tensor> = params.iter().map(Tensor::copy).collect();
        let m: Vec<Tensor> = params.iter().map(Tensor::zeros_like).collect();
        let v: Vec<Tensor> = params.iter().map(Tensor::zeros_like).collect();
        let (rm, rv): (Vec<Tensor>, Vec<Tensor>) = (
            params.iter().map(Tensor::zeros_like).collect(),
            params.iter().map(Tensor::zeros_like).collect(),
        );
        let step = Tensor::zeros([], (Kind::Float, device));
        let steps: Vec<Tensor> = params.iter().map(|_| step.shallow_clone()).collect();
        let h = AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.1,
            eps: 1e-8,
        };
        let no_inf = Tensor::zeros([], (Kind::Float, device));
        for t in 1..=2 {
            let grads: Vec<Tensor> = params.iter().map(Tensor::randn_like).collect();
            let _ = step.shallow_clone().fill_(t as f64);
            fused_adamw(&params, &grads, &m, &v, &steps, h, Some(&no_inf)).unwrap();
            let (bc1, bc2) = (1.0 - h.beta1.powi(t), 1.0 - h.beta2.powi(t));
            for i in 0..params.len() {
                let (mut p, mut mm, mut vv) = (
                    reference[i].shallow_clone(),
                    rm[i].shallow_clone(),
                    rv[i].shallow_clone(),
                );
                let g = &grads[i];
                let _ = p.g_mul_scalar_(1.0 - h.lr * h.weight_decay);
                let _ = mm.lerp_(g, 1.0 - h.beta1);
                let _ = vv.g_mul_scalar_(h.beta2);
                let _ = vv.addcmul_(g, &(g * (1.0 - h.beta2)));
                let denom = vv.sqrt() / bc2.sqrt() + h.eps;
                let _ = p.addcdiv_(&(&mm * (-h.lr / bc1)), &denom);
                assert!(close(&params[i], &p), "step {t}, parameter {i}");
                assert!(
                    close(&m[i], &mm) && close(&v[i], &vv),
                    "step {t}, moments {i}"
                );
            }
        }
        let before: Vec<Tensor> = params
            .iter()
            .chain(&m)
            .chain(&v)
            .map(Tensor::copy)
            .collect();
        let nan: Vec<Tensor> = params.iter().map(|p| p.full_like(f64::NAN)).collect();
        let inf = Tensor::ones([], (Kind::Float, device));
        fused_adamw(&params, &nan, &m, &v, &steps, h, Some(&inf)).unwrap();
        for (a, b) in params.iter().chain(&m).chain(&v).zip(&before) {
            assert!(a.equal(b), "changed on a found_inf step");
        }
    }

    #[test]
    fn foreach_ops_match_their_per_tensor_forms() {
        tch::manual_seed(1);
        let a: Vec<Tensor> = (1..4)
            .map(|k| Tensor::randn([k, 3], (Kind::Float, Device::Cpu)))
            .collect();
        let b: Vec<Tensor> = a.iter().map(Tensor::randn_like).collect();
        let norms = foreach_norm(&a).unwrap();
        for (n, t) in norms.iter().zip(&a) {
            assert!(close(n, &t.norm()));
        }
        let expect: Vec<Tensor> = a.iter().zip(&b).map(|(x, y)| x.lerp(y, 0.25)).collect();
        let w = Tensor::full([], 0.25, (Kind::Float, Device::Cpu));
        foreach_lerp_(&a, &b, &w).unwrap();
        for (x, e) in a.iter().zip(&expect) {
            assert!(close(x, e));
        }
        let expect: Vec<Tensor> = a.iter().map(|x| x * 3.0).collect();
        foreach_mul_(&a, &Tensor::full([], 3.0, (Kind::Float, Device::Cpu))).unwrap();
        for (x, e) in a.iter().zip(&expect) {
            assert!(close(x, e));
        }
    }

    /// Good and bad calls in sequence (mismatched lists, shapes and dtypes, empty lists, NaNs): every
    /// bad one is an error, and every good one after it still computes the right thing.
    #[test]
    fn mutated_calls_in_sequence_never_disturb_the_next() {
        let f = |v: &[f32]| Tensor::from_slice(v);
        let w = Tensor::full([], 0.5, (Kind::Float, Device::Cpu));
        let h = AdamWStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.0,
            eps: 1e-8,
        };
        for round in 0..20 {
            // The bad calls get tensors of their own: a multi-tensor op that fails part-way may have
            // updated the tensors before the one it failed on (libtorch's own behaviour).
            let a = vec![f(&[0.0, 2.0]), f(&[4.0])];
            let b = vec![f(&[2.0, 2.0]), f(&[0.0])];
            match round % 5 {
                0 => assert!(foreach_lerp_(&b, &a[..1], &w).is_err()),
                1 => {
                    let bad = vec![f(&[0.0, 2.0]), f(&[4.0])];
                    assert!(foreach_lerp_(&bad, &[f(&[1.0]), f(&[1.0, 2.0])], &w).is_err());
                }
                2 => {
                    let ints = vec![Tensor::from_slice(&[1i64, 2])];
                    let step = vec![Tensor::zeros([], (Kind::Float, Device::Cpu))];
                    let e = fused_adamw(&ints, &ints, &ints, &ints, &step, h, None);
                    assert!(e.is_err(), "round {round}");
                }
                3 => assert!(foreach_norm(&[]).map(|v| v.is_empty()).unwrap_or(true)),
                _ => {
                    let nan = vec![f(&[f32::NAN])];
                    let p = vec![f(&[1.0])];
                    let (m, v) = (vec![f(&[0.0])], vec![f(&[0.0])]);
                    let step = vec![Tensor::ones([], (Kind::Float, Device::Cpu))];
                    let inf = Tensor::ones([], (Kind::Float, Device::Cpu));
                    fused_adamw(&p, &nan, &m, &v, &step, h, Some(&inf)).unwrap();
                    assert_eq!(p[0].double_value(&[0]), 1.0, "round {round}");
                }
            }
            foreach_lerp_(&a, &b, &w).unwrap();
            assert!(
                close(&a[0], &f(&[1.0, 2.0])) && close(&a[1], &f(&[2.0])),
                "round {round}"
            );
            let n = foreach_norm(&a).unwrap();
            assert!(
                close(&n[0], &f(&[5f32.sqrt()]).reshape([])),
                "round {round}"
            );
        }
    }

    /// A libtorch exception comes back as an error naming the operation.
    #[test]
    fn a_libtorch_error_is_an_error_not_a_panic() {
        let a = vec![Tensor::zeros([2], (Kind::Float, Device::Cpu))];
        let b = vec![Tensor::zeros([3], (Kind::Float, Device::Cpu))];
        let w = Tensor::full([], 0.5, (Kind::Float, Device::Cpu));
        let e = foreach_lerp_(&a, &b, &w).unwrap_err();
        assert_eq!(e.op, "_foreach_lerp_");
        assert!(!e.message.is_empty());
        let e = foreach_lerp_(&a, &[], &w).unwrap_err();
        assert!(e.message.contains("different lengths"), "{e}");
    }
}
