//! Per-process CUDA settings tch does not bind: the current device (`torch.cuda.set_device`) and
//! cuDNN's deterministic mode (`torch.backends.cudnn.deterministic`).

use std::ffi::c_char;

use crate::{check, ExtError};

extern "C" {
    fn ext_cuda_set_device(device: i32) -> *mut c_char;
    fn ext_cudnn_deterministic(on: i32);
}

/// Makes `device` the current CUDA device of the calling thread. A rank on cuda:N calls it before
/// anything touches CUDA, so streams, events and NCCL start on its own GPU and no context appears on
/// GPU 0.
pub fn set_device(device: usize) -> Result<(), ExtError> {
    let op = "cuda set device";
    let index = i32::try_from(device).map_err(|_| ExtError {
        op,
        message: format!("no CUDA device {device}"),
    })?;
    // SAFETY: plain integer argument; the shim catches every C++ exception.
    check(op, unsafe { ext_cuda_set_device(index) })
}

/// Deterministic cuDNN algorithms (and no benchmark-mode timing), so equal inputs give equal bytes in
/// every process and run.
pub fn cudnn_deterministic(on: bool) {
    // SAFETY: sets two flags of libtorch's global context; cannot throw.
    unsafe { ext_cudnn_deterministic(on as i32) }
}

#[cfg(test)]
mod tests {
    /// Devices that do not exist are refused by name, in sequence with (on a GPU) good calls that
    /// leave the current device where they put it.
    #[test]
    fn sets_or_refuses() {
        let count = tch::Cuda::device_count() as usize;
        for bad in [count, count + 1, 64, usize::MAX / 2] {
            let err = super::set_device(bad).unwrap_err().to_string();
            assert!(err.contains("cuda set device"), "{err}");
            if count > 0 {
                super::set_device(count - 1).unwrap();
                let t = tch::Tensor::ones([4], (tch::Kind::Float, tch::Device::Cuda(count - 1)));
                assert_eq!(t.sum(tch::Kind::Float).double_value(&[]), 4.0);
            }
        }
        if count == 0 {
            crate::skip::gpu_branch("cuda::sets_or_refuses", "no CUDA device");
        }
        super::cudnn_deterministic(true);
        super::cudnn_deterministic(false);
    }
}
