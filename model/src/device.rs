//! Device selection shared by every command: `auto` takes CUDA when libtorch sees a GPU; an explicit
//! CUDA device is checked against the devices present before any work starts.

use tch::Device;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}`: expected auto, cpu, cuda or cuda:N")]
    Unknown(String),
    #[error("device `{asked}`: {present}")]
    Absent { asked: String, present: String },
}

/// The devices libtorch sees, for the error message.
fn present(count: usize) -> String {
    match count {
        0 => "this machine has no CUDA device libtorch can use; devices: cpu".to_string(),
        n => format!(
            "this machine has {n} CUDA device{}: cpu, {}",
            if n == 1 { "" } else { "s" },
            (0..n)
                .map(|i| format!("cuda:{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub fn parse_device(name: &str) -> Result<Device, DeviceError> {
    let count = if name.trim() == "cpu" {
        0
    } else {
        tch::Cuda::device_count().max(0) as usize
    };
    parse_device_with(name, count)
}

/// `parse_device` against a given number of CUDA devices.
pub fn parse_device_with(name: &str, cuda_devices: usize) -> Result<Device, DeviceError> {
    let index = match name.trim() {
        "auto" if cuda_devices > 0 => return Ok(Device::Cuda(0)),
        "auto" => return Ok(Device::Cpu),
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => other
            .strip_prefix("cuda:")
            .and_then(|i| i.parse::<usize>().ok())
            .ok_or_else(|| DeviceError::Unknown(other.to_string()))?,
    };
    if index >= cuda_devices {
        return Err(DeviceError::Absent {
            asked: name.trim().to_string(),
            present: present(cuda_devices),
        });
    }
    Ok(Device::Cuda(index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_checks_them_against_the_devices_present() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device_with("cuda:1", 2).unwrap(), Device::Cuda(1));
        assert!(matches!(parse_device("gpu"), Err(DeviceError::Unknown(_))));
        let e = parse_device_with("cuda:7", 1).unwrap_err().to_string();
        assert!(
            e.contains("cuda:7") && e.contains("1 CUDA device: cpu, cuda:0"),
            "{e}"
        );
        assert_eq!(parse_device_with("auto", 0).unwrap(), Device::Cpu);
        assert_eq!(parse_device_with("auto", 2).unwrap(), Device::Cuda(0));
        let e = parse_device_with("cuda", 0).unwrap_err().to_string();
        assert!(e.contains("no CUDA device"), "{e}");
    }
}
