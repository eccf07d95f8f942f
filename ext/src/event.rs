//! A CUDA event on a device's current stream (c10's device-generic `Event`): the host waits for the
//! work enqueued before the event only, not for everything queued since, as a device-wide
//! `synchronize` would. What lets a stage read batch k back while batch k+1 already runs.

use std::ffi::{c_char, c_void};

use crate::{check, ExtError};

extern "C" {
    fn ext_event_record(device: i32, out: *mut *mut c_void) -> *mut c_char;
    fn ext_event_synchronize(event: *mut c_void) -> *mut c_char;
    fn ext_event_free(event: *mut c_void);
}

pub struct CudaEvent(*mut c_void);

// SAFETY: a c10::Event is a handle to a driver event; recording and waiting on it from another thread
// is what CUDA events are for, and the shim holds no thread-local state for it.
unsafe impl Send for CudaEvent {}

impl CudaEvent {
    /// Records an event on CUDA device `device`'s current stream.
    pub fn record(device: usize) -> Result<CudaEvent, ExtError> {
        let op = "cuda event record";
        let index = i32::try_from(device).map_err(|_| ExtError {
            op,
            message: format!("no CUDA device {device}"),
        })?;
        let mut event: *mut c_void = std::ptr::null_mut();
        // SAFETY: an out-pointer to a live local, written only on success; the shim catches every C++
        // exception.
        let err = unsafe { ext_event_record(index, &mut event) };
        check(op, err)?;
        Ok(CudaEvent(event))
    }

    /// Blocks until the work enqueued before [`CudaEvent::record`] has finished.
    pub fn synchronize(&self) -> Result<(), ExtError> {
        // SAFETY: self.0 came from ext_event_record and is freed only in Drop.
        check("cuda event synchronize", unsafe {
            ext_event_synchronize(self.0)
        })
    }
}

impl Drop for CudaEvent {
    fn drop(&mut self) {
        // SAFETY: self.0 came from ext_event_record and is freed exactly once, here.
        unsafe { ext_event_free(self.0) }
    }
}

#[cfg(test)]
mod tests {
    use super::CudaEvent;

    /// Devices that do not exist are refused by name, in sequence with (on a GPU) events that record
    /// and complete; nothing crashes.
    #[test]
    fn records_and_waits_or_refuses() {
        let count = tch::Cuda::device_count() as usize;
        for bad in [count, count + 1, 64, usize::MAX / 2] {
            let err = CudaEvent::record(bad).err().expect("refused");
            assert!(err.to_string().contains("cuda event record"), "{err}");
            if count > 0 {
                let t = tch::Tensor::ones([1 << 20], (tch::Kind::Float, tch::Device::Cuda(0)));
                let _ = t.sum(tch::Kind::Float);
                let event = CudaEvent::record(0).unwrap();
                event.synchronize().unwrap();
            }
        }
        if count == 0 {
            crate::skip::gpu_branch("event::records_and_waits_or_refuses", "no CUDA device");
        }
    }
}
