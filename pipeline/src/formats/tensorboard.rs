//! TensorBoard scalars beside `metrics.jsonl`: an event file under `RUN_DIR/tb/` in TensorFlow's
//! record format (length, masked CRC-32C of the length, the `Event` protobuf, masked CRC-32C of it),
//! with the few protobuf fields a scalar needs written by hand. TensorBoard reads it as it grows.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// CRC-32C (Castagnoli), the checksum of TFRecord framing.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8)
    })
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 }`.
fn event(wall_time: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    varint(&mut e, (1 << 3) | 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    varint(&mut e, 2 << 3);
    varint(&mut e, step as u64);
    body(&mut e);
    e
}

pub struct EventWriter {
    out: BufWriter<File>,
    pub path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created), named as TensorFlow names them so TensorBoard finds it.
    pub fn create(dir: &Path) -> anyhow::Result<EventWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let path = dir.join(format!(
            "events.out.tfevents.{}.{}.{}.0",
            now.as_secs(),
            host.trim(),
            std::process::id()
        ));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = EventWriter {
            out: BufWriter::new(file),
            path,
        };
        let first = event(now.as_secs_f64(), 0, |e| {
            bytes_field(e, 3, b"brain.Event:2")
        });
        w.record(&first)?;
        Ok(w)
    }

    fn record(&mut self, data: &[u8]) -> anyhow::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut frame = Vec::with_capacity(data.len() + 16);
        frame.extend_from_slice(&len);
        frame.extend_from_slice(&masked_crc(&len).to_le_bytes());
        frame.extend_from_slice(data);
        frame.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.out
            .write_all(&frame)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// One event holding a scalar per `(tag, value)`, flushed so TensorBoard sees it at once.
    pub fn scalars(&mut self, step: i64, values: &[(String, f64)]) -> anyhow::Result<()> {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let e = event(wall, step, |e| {
            let mut summary = Vec::new();
            for (tag, v) in values {
                // Summary.Value { tag = 1, simple_value = 2 (float) }
                let mut value = Vec::new();
                bytes_field(&mut value, 1, tag.as_bytes());
                varint(&mut value, (2 << 3) | 5);
                value.extend_from_slice(&(*v as f32).to_le_bytes());
                bytes_field(&mut summary, 1, &value);
            }
            bytes_field(e, 5, &summary);
        });
        self.record(&e)?;
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// The numeric entries of a metrics line as TensorBoard scalars: `train/<key>`, arrays as
/// `train/<key>/<i>` (the alignment cosines per location).
pub fn scalars_of(line: &serde_json::Value) -> Vec<(String, f64)> {
    let mut out = vec![];
    if let Some(map) = line.as_object() {
        for (k, v) in map {
            if k == "step" {
                continue;
            }
            match v {
                serde_json::Value::Number(n) => {
                    out.extend(n.as_f64().map(|x| (format!("train/{k}"), x)))
                }
                serde_json::Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        out.extend(item.as_f64().map(|x| (format!("train/{k}/{i}"), x)));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_of_known_vectors() {
        // RFC 3720 B.4 test vectors.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
