//! What the CUDA caching allocator has handed out and what it holds from the driver: the numbers
//! `torch.cuda.memory_allocated`, `max_memory_allocated`, `memory_reserved` and `max_memory_reserved`
//! report, for sizing micro-batches (a process runs out of memory when its reserved bytes, fragmentation
//! included, do not fit).

use crate::{check, ExtError};

extern "C" {
    fn ext_cuda_memory(
        device: i32,
        reset: i32,
        current: *mut i64,
        peak: *mut i64,
        reserved: *mut i64,
        peak_reserved: *mut i64,
    ) -> *mut std::ffi::c_char;
}

/// Bytes allocated on a CUDA device, now and at the peak since the last reset, and bytes the
/// caching allocator reserved from the driver (allocated plus cached blocks), likewise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaMemory {
    pub current: i64,
    pub peak: i64,
    pub reserved: i64,
    pub peak_reserved: i64,
}

fn query(device: usize, reset: bool) -> Result<CudaMemory, ExtError> {
    let op = "cuda memory statistics";
    if !tch::Cuda::is_available() || device >= tch::Cuda::device_count() as usize {
        return Err(ExtError {
            op,
            message: format!("no CUDA device {device}"),
        });
    }
    let (mut current, mut peak, mut reserved, mut peak_reserved) = (0i64, 0i64, 0i64, 0i64);
    // SAFETY: four out-pointers to live locals, written only on success; the shim catches every C++
    // exception and keeps no state of its own between calls.
    let err = unsafe {
        ext_cuda_memory(
            device as i32,
            reset as i32,
            &mut current,
            &mut peak,
            &mut reserved,
            &mut peak_reserved,
        )
    };
    check(op, err)?;
    Ok(CudaMemory {
        current,
        peak,
        reserved,
        peak_reserved,
    })
}

/// Current and peak allocated bytes on CUDA device `device`.
pub fn cuda_memory(device: usize) -> Result<CudaMemory, ExtError> {
    query(device, false)
}

/// Restarts the peak from the current allocation (`torch.cuda.reset_peak_memory_stats`).
pub fn reset_cuda_peak(device: usize) -> Result<CudaMemory, ExtError> {
    query(device, true)
}

#[cfg(test)]
mod tests {
    /// Without a GPU the query is an error naming the device, not a crash; with one, allocating a
    /// tensor raises the peak by at least its size.
    #[test]
    fn reports_or_refuses() {
        // Devices that do not exist, in sequence with (on a GPU) good queries: each is refused by
        // itself and leaves the next call unaffected.
        let count = tch::Cuda::device_count() as usize;
        for bad in [count, count + 1, 64, usize::MAX / 2] {
            let err = super::cuda_memory(bad).unwrap_err();
            assert!(
                err.to_string().contains(&format!("no CUDA device {bad}")),
                "{err}"
            );
            assert!(super::reset_cuda_peak(bad).is_err());
            if count > 0 {
                assert!(super::cuda_memory(0).is_ok());
            }
        }
        if !tch::Cuda::is_available() {
            crate::skip::gpu_branch("memory::reports_or_refuses", "no CUDA device");
            return;
        }
        let before = super::reset_cuda_peak(0).unwrap();
        let t = tch::Tensor::zeros([1 << 20], (tch::Kind::Float, tch::Device::Cuda(0)));
        let after = super::cuda_memory(0).unwrap();
        assert!(after.peak >= before.current + (4 << 20));
        assert!(after.reserved >= after.current && after.peak_reserved >= after.peak);
        drop(t);
    }
}
