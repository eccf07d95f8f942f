//! Linear layers through oneDNN on the CPU (float32), reached by the dispatcher since tch binds neither
//! op. Two uses:
//! - [`linear`], with autograd: forward, input and weight gradients all in oneDNN's JIT kernels.
//!   PyTorch's fp32 `linear` always calls MKL's sgemm, which on AMD CPUs takes a generic path at a
//!   third to a half of oneDNN's rate at a training step's shapes (BENCHMARKS.md).
//! - [`PackedLinear`], no autograd: a weight packed once into oneDNN's blocked layout, for the product
//!   a KV-cache sampler repeats for every token with the same weights and a few rows, where a plain
//!   product spends as long repacking the weight as multiplying.

use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use crate::{check, ExtError, Handle};

extern "C" {
    fn ext_packed_linear_available() -> i32;
    fn ext_pack_linear_weight(w: Handle, out: *mut *mut C_tensor) -> *mut c_char;
    fn ext_packed_linear(
        x: Handle,
        packed: Handle,
        bias: Handle,
        attr: *const c_char,
        algorithm: *const c_char,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn ext_onednn_linear(
        x: Handle,
        w: Handle,
        bias: Handle,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
}

/// What the packed product applies to its output, fused into the same kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    /// The exact (erf) GELU, `torch.nn.GELU()`.
    Gelu,
    /// GELU's tanh approximation, `GELU(approximate="tanh")`.
    GeluTanh,
}

/// Whether oneDNN must be there: PyTorch's x86-64 Linux wheels (the venv's and the CUDA ones) always
/// build it in, so there its absence is a broken install, not a platform to skip. Tests fail on it.
pub const EXPECTED: bool = cfg!(all(target_arch = "x86_64", target_os = "linux"));

/// For tests: whether to run a oneDNN comparison. Where oneDNN is [`EXPECTED`] and absent this panics
/// (a skip there would let every oneDNN test pass while nothing is compared); elsewhere the skip is
/// reported through [`crate::skip::branch`], which libtest does not capture.
pub fn available_for_test(test: &str) -> bool {
    if available() {
        return true;
    }
    if EXPECTED {
        panic!(
        "{test}: this libtorch registers no oneDNN linear ops, yet x86-64 Linux builds of PyTorch always \
         have them (torch.backends.mkldnn.is_available()): a broken libtorch or a broken lookup"
        );
    }
    crate::skip::branch(test, "this libtorch has no oneDNN linear ops");
    false
}

/// Whether this libtorch has oneDNN and registers its linear ops (looked up once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    // SAFETY: takes nothing and reads the dispatcher's registry only; no earlier call changes that.
    *AVAILABLE.get_or_init(|| unsafe { ext_packed_linear_available() == 1 })
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the routing of float32 CPU linear layers through [`linear`] on (the default) or off, for the
/// whole process: an A/B switch (`pipeline bench flow --no-onednn`), as `torch.backends` flags are.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether callers should route float32 CPU linear layers through [`linear`].
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed) && available()
}

/// `x·wᵀ + b` for float32 CPU tensors, x (…, in), w (out, in), recorded by autograd when grad mode
/// is on: backward computes the input gradient, the weight gradient (and the bias's) in oneDNN too.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, ExtError> {
    let op = "onednn linear";
    defined(op, &[x, w])?;
    // oneDNN does not check an empty input's width; PyTorch's linear does, and so do we.
    let (xs, ws) = (x.size(), w.size());
    let bs = bias.map(Tensor::size);
    if ws.len() != 2 || xs.last() != ws.get(1) || bs.as_ref().is_some_and(|b| b[..] != ws[..1]) {
        return Err(ExtError {
            op,
            message: format!("input {xs:?}, weight {ws:?} and bias {bs:?} do not fit"),
        });
    }
    let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
    // SAFETY: defined handles that live through the call (or null for no bias).
    new_tensor(op, |out| unsafe {
        ext_onednn_linear(x.as_ptr(), w.as_ptr(), bias, out)
    })
}

/// An error naming `op` when any of `ts` is an undefined tensor (tch's `Tensor::new()`), which the
/// shim would otherwise dereference.
fn defined(op: &'static str, ts: &[&Tensor]) -> Result<(), ExtError> {
    if ts.iter().all(|t| t.defined()) {
        return Ok(());
    }
    Err(ExtError {
        op,
        message: "an undefined tensor".into(),
    })
}

/// Runs a shim call that writes one new tensor handle through its out-pointer on success.
fn new_tensor(
    op: &'static str,
    call: impl FnOnce(*mut *mut C_tensor) -> *mut c_char,
) -> Result<Tensor, ExtError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // The shim writes `out` only when it succeeds, and keeps nothing from earlier calls.
    check(op, call(&mut out))?;
    // SAFETY: on success `out` is a fresh, non-null handle that nothing else owns; it becomes exactly
    // one `Tensor`, which frees it on drop.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// A linear layer's weight (out, in), packed, with its bias.
pub struct PackedLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    out_features: i64,
    in_features: i64,
}

impl PackedLinear {
    /// Packs a float32 CPU weight (out, in).
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self, ExtError> {
        let op = "pack linear weight";
        defined(op, &[weight])?;
        let size = weight.size();
        if size.len() != 2 || weight.kind() != Kind::Float || weight.device() != Device::Cpu {
            return Err(ExtError {
                op,
                message: format!(
                    "needs a 2-d float32 CPU weight, got {size:?} {:?} on {:?}",
                    weight.kind(),
                    weight.device()
                ),
            });
        }
        if let Some(b) = bias {
            defined(op, &[b])?;
            if b.size() != size[..1] {
                return Err(ExtError {
                    op,
                    message: format!("bias {:?} for weight {size:?}", b.size()),
                });
            }
        }
        let weight = weight.contiguous();
        // SAFETY: a defined handle that lives through the call.
        let packed = new_tensor(op, |out| unsafe {
            ext_pack_linear_weight(weight.as_ptr(), out)
        })?;
        Ok(Self {
            weight: packed,
            bias: bias.map(|b| b.detach().contiguous()),
            out_features: size[0],
            in_features: size[1],
        })
    }

    pub fn out_features(&self) -> i64 {
        self.out_features
    }

    /// `act(x·wᵀ + b)` for float32 CPU `x` (…, in).
    pub fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor, ExtError> {
        let op = "packed linear";
        defined(op, &[x])?;
        if x.size().last() != Some(&self.in_features) {
            return Err(ExtError {
                op,
                message: format!("input {:?} for {} features", x.size(), self.in_features),
            });
        }
        let (attr, algorithm): (&CStr, &CStr) = match act {
            Activation::None => (c"none", c""),
            Activation::Gelu => (c"gelu", c"none"),
            Activation::GeluTanh => (c"gelu", c"tanh"),
        };
        let bias = self.bias.as_ref().map_or(std::ptr::null(), |b| b.as_ptr());
        // SAFETY: defined handles that live through the call (or null for no bias) and static
        // NUL-terminated strings.
        new_tensor(op, |out| unsafe {
            ext_packed_linear(
                x.as_ptr(),
                self.weight.as_ptr(),
                bias,
                attr.as_ptr(),
                algorithm.as_ptr(),
                out,
            )
        })
    }
}

impl std::fmt::Debug for PackedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedLinear")
            .field("out_features", &self.out_features)
            .field("bias", &self.bias.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forward and all three gradients equal `linear`'s (MKL) to float32 rounding, for 2-d and 3-d
    /// inputs; an input that needs no gradient gets none; under no_grad nothing is recorded; bad
    /// shapes in sequence are errors, each followed by a good call.
    #[test]
    fn onednn_linear_matches_linear_and_its_gradients() {
        let Some(opts) = seeded("onednn::onednn_linear_matches_linear_and_its_gradients", 1) else {
            return;
        };
        for shape in [&[33i64, 40][..], &[3, 17, 40]] {
            let w = (Tensor::randn([24, 40], opts) * 0.2).set_requires_grad(true);
            let b = Tensor::randn([24], opts).set_requires_grad(true);
            let x = Tensor::randn(shape, opts).set_requires_grad(true);
            let gy = Tensor::randn([&shape[..shape.len() - 1], &[24]].concat().as_slice(), opts);
            let y = linear(&x, &w, Some(&b)).unwrap();
            (&y * &gy).sum(Kind::Float).backward();
            let got: Vec<Tensor> = [&x, &w, &b].iter().map(|t| t.grad().copy()).collect();
            for t in [&x, &w, &b] {
                let _ = t.grad().zero_();
            }
            let plain = x.linear(&w, Some(&b));
            assert!(max_diff(&y, &plain) < 1e-5, "{shape:?} forward");
            (&plain * &gy).sum(Kind::Float).backward();
            for (name, (g, t)) in ["x", "w", "b"].iter().zip(got.iter().zip([&x, &w, &b])) {
                let err = max_diff(g, &t.grad());
                assert!(err < 1e-4, "{shape:?} d{name} off by {err}");
            }
        }
        // Data that needs no gradient (a flow's input): only the parameters get one.
        let w = Tensor::randn([8, 5], opts).set_requires_grad(true);
        let x = Tensor::randn([4, 5], opts);
        linear(&x, &w, None).unwrap().sum(Kind::Float).backward();
        assert!(w.grad().defined() && !x.grad().defined());
        let y = tch::no_grad(|| linear(&x, &w, None).unwrap());
        assert!(!y.requires_grad());
        let bad_inputs = [&[4i64, 6][..], &[0, 4], &[2, 3, 7]]
            .map(|shape| Tensor::randn(shape, opts))
            .into_iter()
            .chain([Tensor::new()]);
        for bad in bad_inputs {
            let err = linear(&bad, &w, None).unwrap_err();
            assert!(err.to_string().contains("onednn linear"), "{err}");
            assert!(max_diff(&linear(&x, &w, None).unwrap(), &x.matmul(&w.tr())) < 1e-5);
        }
        assert!(linear(&x, &Tensor::new(), None).is_err());
    }

    /// Float CPU options after seeding, or None (with a note) where this libtorch lacks the ops.
    /// `None` only where oneDNN may be absent (not x86-64 Linux), reported as a skip libtest does not
    /// capture; the old `eprintln!` skip was swallowed and the tests went green comparing nothing.
    fn seeded(test: &str, seed: i64) -> Option<(Kind, Device)> {
        if !available_for_test(test) {
            return None;
        }
        tch::manual_seed(seed);
        Some((Kind::Float, Device::Cpu))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// The packed product equals `linear` (and its fused GELUs `gelu(linear)`) to float32 rounding at
    /// any number of rows and leading dimensions; a second call gives the same bytes.
    #[test]
    fn packed_linear_is_linear() {
        let Some(opts) = seeded("onednn::packed_linear_is_linear", 0) else {
            return;
        };
        let w = Tensor::randn([96, 64], opts) * 0.125;
        let b = Tensor::randn([96], opts);
        let packed = PackedLinear::new(&w, Some(&b)).unwrap();
        assert_eq!(packed.out_features(), 96);
        for shape in [&[8i64, 64][..], &[8, 1, 64], &[3, 64], &[2, 5, 64]] {
            let x = Tensor::randn(shape, opts);
            let plain = x.linear(&w, Some(&b));
            let got = packed.forward(&x, Activation::None).unwrap();
            assert_eq!(got.size(), plain.size());
            assert!(max_diff(&got, &plain) < 1e-5, "{shape:?}");
            assert!(got.equal(&packed.forward(&x, Activation::None).unwrap()));
            let gelu = packed.forward(&x, Activation::Gelu).unwrap();
            assert!(max_diff(&gelu, &plain.gelu("none")) < 1e-5);
            let tanh = packed.forward(&x, Activation::GeluTanh).unwrap();
            assert!(max_diff(&tanh, &plain.gelu("tanh")) < 1e-5);
        }
        let unbiased = PackedLinear::new(&w, None).unwrap();
        let x = Tensor::randn([1, 64], opts);
        assert!(
            max_diff(
                &unbiased.forward(&x, Activation::None).unwrap(),
                &x.matmul(&w.tr())
            ) < 1e-5
        );
        // Bad inputs in sequence are errors naming the operation, never a crash, and each leaves the
        // packed layer as it was: a wrong width (also with no rows), a wrong dtype, an undefined tensor.
        let good = Tensor::randn([8, 64], opts);
        let expected = good.linear(&w, Some(&b));
        for bad in [
            Tensor::randn([4, 63], opts),
            Tensor::randn([0, 65], opts),
            Tensor::randn([4, 64], (Kind::Double, Device::Cpu)),
            Tensor::new(),
        ] {
            let err = packed.forward(&bad, Activation::None).unwrap_err();
            assert!(err.to_string().contains("packed linear"), "{err}");
            let again = packed.forward(&good, Activation::None).unwrap();
            assert!(max_diff(&again, &expected) < 1e-5);
        }
        assert!(PackedLinear::new(&Tensor::new(), None).is_err());
        assert!(PackedLinear::new(&w, Some(&Tensor::randn([95], opts))).is_err());
        let err = PackedLinear::new(&w.to_kind(Kind::Double), None).unwrap_err();
        assert!(err.to_string().contains("float32"), "{err}");
        let err = PackedLinear::new(&b, None).unwrap_err();
        assert!(err.to_string().contains("2-d"), "{err}");
    }
}
