//! Device selection shared by every command: `auto` takes CUDA when libtorch sees a GPU.

use tch::Device;

#[derive(Debug, thiserror::Error)]
#[error("unknown device `{0}`: expected auto, cpu, cuda or cuda:N")]
pub struct DeviceError(String);

pub fn parse_device(name: &str) -> Result<Device, DeviceError> {
    match name {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|i| i.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| DeviceError(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device("cuda:1").unwrap(), Device::Cuda(1));
        assert!(parse_device("gpu").is_err());
    }
}
