//! `.npz` writing (numpy's `savez` layout: an uncompressed zip of `.npy` members) for the ADM evaluation
//! suite, which reads `arr_0` (uint8 N×H×W×3) from `np.load`. Members stream to disk: the ImageNet
//! reference batches are ~10 GB, so every member carries zip64 sizes and its CRC and sizes are patched in
//! after the data. The file appears under its final name only when [`NpzWriter::finish`] succeeds.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// numpy dtype strings of the arrays we write.
pub enum Dtype {
    U8,
    I64,
    F32,
    F64,
}

impl Dtype {
    fn descr(&self) -> &'static str {
        match self {
            Dtype::U8 => "|u1",
            Dtype::I64 => "<i8",
            Dtype::F32 => "<f4",
            Dtype::F64 => "<f8",
        }
    }
}

/// The `.npy` v1.0 header: magic, version, header length, then a Python dict literal padded with spaces
/// so that the data starts at a multiple of 64 bytes.
pub fn npy_header(dtype: &Dtype, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
        dtype.descr()
    );
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.div_ceil(64) * 64 - unpadded));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

struct Entry {
    name: String,
    offset: u64,
    size: u64,
    crc: u32,
}

pub struct NpzWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    entries: Vec<Entry>,
    open: Option<(Entry, flate2::Crc)>,
}

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const ZIP64_END_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const END_SIG: u32 = 0x0605_4b50;
/// zip64 needs "version needed to extract" 4.5.
const VERSION: u16 = 45;
/// 1980-01-01 00:00 in DOS format: the archive does not depend on when it was written.
const DOS_DATE: u16 = 0x21;

impl NpzWriter {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let tmp = stages::atomic::temp_path(path);
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            out: BufWriter::with_capacity(1 << 20, file),
            entries: vec![],
            open: None,
        })
    }

    /// Starts member `{name}.npy` with its header; the data follows through [`NpzWriter::write`].
    pub fn begin(&mut self, name: &str, dtype: Dtype, shape: &[usize]) -> anyhow::Result<()> {
        anyhow::ensure!(self.open.is_none(), "npz member still open");
        let name = format!("{name}.npy");
        let offset = self.out.stream_position()?;
        let mut h = Vec::new();
        h.extend_from_slice(&LOCAL_SIG.to_le_bytes());
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes()); // flags
        h.extend_from_slice(&0u16.to_le_bytes()); // stored
        h.extend_from_slice(&0u16.to_le_bytes()); // time
        h.extend_from_slice(&DOS_DATE.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes()); // crc, patched
        h.extend_from_slice(&u32::MAX.to_le_bytes()); // sizes live in the zip64 extra field
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        h.extend_from_slice(&(name.len() as u16).to_le_bytes());
        h.extend_from_slice(&20u16.to_le_bytes());
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(&1u16.to_le_bytes());
        h.extend_from_slice(&16u16.to_le_bytes());
        h.extend_from_slice(&[0u8; 16]); // uncompressed, compressed: patched
        self.out
            .write_all(&h)
            .with_context(|| format!("writing {}", self.tmp.display()))?;
        self.open = Some((
            Entry {
                name,
                offset,
                size: 0,
                crc: 0,
            },
            flate2::Crc::new(),
        ));
        self.write(&npy_header(&dtype, shape))
    }

    pub fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let (entry, crc) = self.open.as_mut().context("no npz member open")?;
        crc.update(bytes);
        entry.size += bytes.len() as u64;
        self.out
            .write_all(bytes)
            .with_context(|| format!("writing {}", self.tmp.display()))
    }

    /// Ends the open member: patches its CRC and sizes into the local header.
    pub fn end(&mut self) -> anyhow::Result<()> {
        let (mut entry, crc) = self.open.take().context("no npz member open")?;
        entry.crc = crc.sum();
        let end = self.out.stream_position()?;
        self.out.seek(SeekFrom::Start(entry.offset + 14))?;
        self.out.write_all(&entry.crc.to_le_bytes())?;
        self.out.seek(SeekFrom::Start(
            entry.offset + 30 + entry.name.len() as u64 + 4,
        ))?;
        self.out.write_all(&entry.size.to_le_bytes())?;
        self.out.write_all(&entry.size.to_le_bytes())?;
        self.out.seek(SeekFrom::Start(end))?;
        self.entries.push(entry);
        Ok(())
    }

    /// Writes the central directory and moves the file to its final name.
    pub fn finish(mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.open.is_none(), "npz member still open");
        let result = (|| -> anyhow::Result<()> {
            let cd_start = self.out.stream_position()?;
            for e in &self.entries {
                let mut c = Vec::new();
                c.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
                c.extend_from_slice(&VERSION.to_le_bytes());
                c.extend_from_slice(&VERSION.to_le_bytes());
                c.extend_from_slice(&0u16.to_le_bytes());
                c.extend_from_slice(&0u16.to_le_bytes());
                c.extend_from_slice(&0u16.to_le_bytes());
                c.extend_from_slice(&DOS_DATE.to_le_bytes());
                c.extend_from_slice(&e.crc.to_le_bytes());
                c.extend_from_slice(&u32::MAX.to_le_bytes());
                c.extend_from_slice(&u32::MAX.to_le_bytes());
                c.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
                c.extend_from_slice(&28u16.to_le_bytes());
                c.extend_from_slice(&0u16.to_le_bytes()); // comment
                c.extend_from_slice(&0u16.to_le_bytes()); // disk
                c.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
                c.extend_from_slice(&0u32.to_le_bytes()); // external attributes
                c.extend_from_slice(&u32::MAX.to_le_bytes()); // offset in zip64 extra
                c.extend_from_slice(e.name.as_bytes());
                c.extend_from_slice(&1u16.to_le_bytes());
                c.extend_from_slice(&24u16.to_le_bytes());
                c.extend_from_slice(&e.size.to_le_bytes());
                c.extend_from_slice(&e.size.to_le_bytes());
                c.extend_from_slice(&e.offset.to_le_bytes());
                self.out.write_all(&c)?;
            }
            let cd_end = self.out.stream_position()?;
            let (count, cd_size) = (self.entries.len() as u64, cd_end - cd_start);
            let mut t = Vec::new();
            t.extend_from_slice(&ZIP64_END_SIG.to_le_bytes());
            t.extend_from_slice(&44u64.to_le_bytes());
            t.extend_from_slice(&VERSION.to_le_bytes());
            t.extend_from_slice(&VERSION.to_le_bytes());
            t.extend_from_slice(&0u32.to_le_bytes());
            t.extend_from_slice(&0u32.to_le_bytes());
            t.extend_from_slice(&count.to_le_bytes());
            t.extend_from_slice(&count.to_le_bytes());
            t.extend_from_slice(&cd_size.to_le_bytes());
            t.extend_from_slice(&cd_start.to_le_bytes());
            t.extend_from_slice(&ZIP64_LOCATOR_SIG.to_le_bytes());
            t.extend_from_slice(&0u32.to_le_bytes());
            t.extend_from_slice(&cd_end.to_le_bytes());
            t.extend_from_slice(&1u32.to_le_bytes());
            t.extend_from_slice(&END_SIG.to_le_bytes());
            t.extend_from_slice(&0u16.to_le_bytes());
            t.extend_from_slice(&0u16.to_le_bytes());
            t.extend_from_slice(&(count.min(0xFFFF) as u16).to_le_bytes());
            t.extend_from_slice(&(count.min(0xFFFF) as u16).to_le_bytes());
            t.extend_from_slice(&u32::MAX.to_le_bytes());
            t.extend_from_slice(&u32::MAX.to_le_bytes());
            t.extend_from_slice(&0u16.to_le_bytes());
            self.out.write_all(&t)?;
            let file = self.out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            std::fs::rename(&self.tmp, &self.path)?;
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result.with_context(|| format!("writing {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_64_byte_aligned() {
        let h = npy_header(&Dtype::U8, &[5, 16, 16, 3]);
        assert_eq!(h.len() % 64, 0);
        assert!(String::from_utf8_lossy(&h).contains("'shape': (5, 16, 16, 3)"));
        assert!(String::from_utf8_lossy(&npy_header(&Dtype::I64, &[7])).contains("'shape': (7,)"));
    }
}
