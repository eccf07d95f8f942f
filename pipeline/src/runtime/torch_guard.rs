//! libtorch reports errors as C++ exceptions, which tch turns into panics on every call without an
//! `f_` prefix. A long job runs each unit of work (a training step, a batch) through [`guard`], which
//! turns such a panic into an error with what was running, so the job can save what it has and exit
//! with a message instead of a backtrace.

/// Runs `f`; a panic inside it (a libtorch exception) becomes an error saying `what`.
pub fn guard<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("a panic without a message");
            // libtorch appends a C++ backtrace after the first line; the first line is the error.
            let first = message.lines().next().unwrap_or(message).trim();
            Err(anyhow::anyhow!("{what}: libtorch: {first}"))
        }
    }
}

/// Whether an error is the CUDA caching allocator running out of memory.
pub fn is_out_of_memory(err: &anyhow::Error) -> bool {
    let text = format!("{err:#}");
    text.contains("CUDA out of memory") || text.contains("OutOfMemoryError")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_libtorch_exception_becomes_an_error_with_context() {
        let e = guard("step 7", || {
            let a = tch::Tensor::zeros([2, 3], (tch::Kind::Float, tch::Device::Cpu));
            let b = tch::Tensor::zeros([4, 5], (tch::Kind::Float, tch::Device::Cpu));
            Ok(a.matmul(&b))
        })
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("step 7: libtorch: "), "{e}");
        assert!(!e.contains('\n'), "{e}");
        assert!(guard("ok", || Ok(3)).unwrap() == 3);
        let oom =
            anyhow::anyhow!("step 3: libtorch: CUDA out of memory. Tried to allocate 2.00 GiB");
        assert!(is_out_of_memory(&oom));
    }
}
