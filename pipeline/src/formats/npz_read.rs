//! `.npz` reading: numpy's `savez` (stored) and `savez_compressed` (deflate) archives of `.npy` members,
//! zip64 included. Members are read as streams, so a 10 GB `arr_0` of samples passes through in batches.
//! Only C-order arrays of the dtypes the evaluation files use are accepted; anything else is an error
//! naming the file and the member.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Element types we read, with their byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    U8,
    F32 { big_endian: bool },
    F64 { big_endian: bool },
}

impl Elem {
    fn parse(descr: &str) -> Option<Self> {
        let (order, code) = match descr.chars().next()? {
            c @ ('<' | '>' | '|' | '=') => (c, &descr[1..]),
            _ => ('=', descr),
        };
        // numpy writes '<' on the little-endian machines these files come from; '=' means native.
        let big_endian = order == '>' || (order == '=' && cfg!(target_endian = "big"));
        match code {
            "u1" => Some(Elem::U8),
            "f4" => Some(Elem::F32 { big_endian }),
            "f8" => Some(Elem::F64 { big_endian }),
            _ => None,
        }
    }

    fn bytes(self) -> usize {
        match self {
            Elem::U8 => 1,
            Elem::F32 { .. } => 4,
            Elem::F64 { .. } => 8,
        }
    }
}

/// The parsed header of a `.npy` member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    pub descr: String,
    pub elem: Option<Elem>,
    pub fortran_order: bool,
    pub shape: Vec<usize>,
    /// Bytes before the first data byte (magic, version, length and dict); 0 when parsed from text.
    pub data_offset: usize,
}

impl NpyHeader {
    /// Elements the shape claims; None when the product overflows.
    pub fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }
}

/// Reads what is left of a member, so the zip reader compares the bytes with the archive's CRC-32: a
/// flipped byte in the data is an error, not a different image or statistic. Called at the end of
/// the data its header describes; a deflate stream can inflate past the size the archive records,
/// and is cut off after a bound instead of being drained for as long as it goes on.
pub fn check_member_crc(r: &mut impl Read) -> std::io::Result<()> {
    const SLACK: u64 = 1 << 16;
    let extra = std::io::copy(&mut r.take(SLACK), &mut std::io::sink())?;
    if extra == SLACK {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the member's data goes on past the end its header and the archive record",
        ));
    }
    Ok(())
}

/// Exactly `len` bytes from `r`, the buffer growing only as bytes arrive: a header that claims more
/// data than the file holds is an error, never an allocation of the claimed size.
pub fn read_exactly(r: &mut impl Read, len: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len.min(1 << 24));
    r.take(len as u64).read_to_end(&mut out)?;
    if out.len() != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("{} of {len} bytes", out.len()),
        ));
    }
    Ok(out)
}

/// Reads the magic, version and header dict of a `.npy` stream, leaving `r` at the first data byte.
pub fn read_npy_header(r: &mut impl Read) -> anyhow::Result<NpyHeader> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).context("reading the .npy magic")?;
    if &magic[..6] != b"\x93NUMPY" {
        bail!("not a .npy array (bad magic)");
    }
    let (len, prefix) = match magic[6] {
        1 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            (u16::from_le_bytes(b) as usize, 10)
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b)?;
            (u32::from_le_bytes(b) as usize, 12)
        }
        v => bail!(".npy format version {v} is not supported"),
    };
    if len > 1 << 20 {
        bail!(".npy header of {len} bytes is implausibly long");
    }
    let mut text = vec![0u8; len];
    r.read_exact(&mut text).context("reading the .npy header")?;
    let mut header = parse_header_dict(&String::from_utf8_lossy(&text))?;
    header.data_offset = prefix + len;
    Ok(header)
}

/// The value text after `'key':` in numpy's header dict literal.
fn dict_value<'a>(dict: &'a str, key: &str) -> anyhow::Result<&'a str> {
    let pattern = format!("'{key}':");
    let at = dict
        .find(&pattern)
        .with_context(|| format!("the .npy header has no `{key}`: {dict}"))?;
    Ok(dict[at + pattern.len()..].trim_start())
}

fn parse_header_dict(dict: &str) -> anyhow::Result<NpyHeader> {
    let descr_text = dict_value(dict, "descr")?;
    let descr = descr_text
        .strip_prefix('\'')
        .and_then(|s| s.split('\'').next())
        .with_context(|| format!("the .npy header's descr is not a simple dtype: {dict}"))?
        .to_string();
    let fortran_order = dict_value(dict, "fortran_order")?.starts_with("True");
    let shape_text = dict_value(dict, "shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .with_context(|| format!("the .npy header's shape is not a tuple: {dict}"))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            // Python 2 era files write long integers as `10L`.
            s.trim_end_matches('L')
                .parse::<usize>()
                .with_context(|| format!("bad dimension `{s}` in the .npy shape: {dict}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(NpyHeader {
        elem: Elem::parse(&descr),
        descr,
        fortran_order,
        shape,
        data_offset: 0,
    })
}

/// An open `.npz` archive.
pub struct NpzReader {
    path: PathBuf,
    archive: zip::ZipArchive<BufReader<File>>,
}

/// One member being read: its header, then its data from [`NpzMember::reader`].
pub struct NpzMember<'a> {
    pub header: NpyHeader,
    pub reader: zip::read::ZipFile<'a>,
}

impl NpzReader {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let archive = zip::ZipArchive::new(BufReader::with_capacity(1 << 20, file))
            .with_context(|| format!("{}: not an .npz (zip) archive", path.display()))?;
        Ok(NpzReader {
            path: path.to_path_buf(),
            archive,
        })
    }

    /// Array names (member names without `.npy`).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .archive
            .file_names()
            .map(|n| n.strip_suffix(".npy").unwrap_or(n).to_string())
            .collect();
        names.sort();
        names
    }

    /// Opens array `name` and reads its header.
    pub fn member(&mut self, name: &str) -> anyhow::Result<NpzMember<'_>> {
        let names = self.names();
        let path = self.path.display().to_string();
        let mut reader = self.archive.by_name(&format!("{name}.npy")).map_err(|e| {
            anyhow::anyhow!(
                "{path}: no array `{name}` ({e}); it has [{}]",
                names.join(", ")
            )
        })?;
        let header =
            read_npy_header(&mut reader).with_context(|| format!("{path}: array `{name}`"))?;
        if header.fortran_order {
            bail!("{path}: array `{name}` is in Fortran order; only C order is supported");
        }
        // The shape must account for the member exactly, as numpy writes it: what a reader allocates
        // or inflates is then bounded by the archive's size record, never by a number in the header
        // alone, and no trailing bytes (a deflate stream may inflate to any length) are read to
        // reach the CRC. Dtypes we do not read have no element size; their callers refuse them.
        if let Some(elem) = header.elem {
            let total = header
                .numel()
                .and_then(|n| n.checked_mul(elem.bytes()))
                .and_then(|n| n.checked_add(header.data_offset));
            match total {
                Some(bytes) if bytes as u64 == reader.size() => {}
                Some(bytes) if (bytes as u64) < reader.size() => bail!(
                    "{path}: array `{name}` of shape {:?} ends after {bytes} bytes, but its member holds {}",
                    header.shape,
                    reader.size()
                ),
                _ => bail!(
                    "{path}: array `{name}` claims shape {:?} of `{}`, more than its {} bytes",
                    header.shape,
                    header.descr,
                    reader.size()
                ),
            }
        }
        Ok(NpzMember { header, reader })
    }

    /// Reads a whole float array (float32 or float64) as f64, with its shape. Arrays read whole are
    /// statistics, not data sets: one larger than [`MAX_WHOLE_ARRAY_BYTES`] as f64 is refused from
    /// its header, before a byte of it is inflated.
    pub fn read_f64(&mut self, name: &str) -> anyhow::Result<(Vec<f64>, Vec<usize>)> {
        self.read_floats(name, MAX_WHOLE_ARRAY_BYTES)
    }

    /// Reads a whole float array (float32 or float64) as f32 values, with its shape: feature sets
    /// such as a reference file's `acts` (N × 2048), which are too large for [`Self::read_f64`]'s
    /// bound. The member's size record bounds what is read (checked by [`Self::member`]); `max_bytes`
    /// bounds the f32 result, refused from the header before a byte is inflated.
    pub fn read_f32(
        &mut self,
        name: &str,
        max_bytes: usize,
    ) -> anyhow::Result<(Vec<f32>, Vec<usize>)> {
        self.read_floats(name, max_bytes)
    }

    /// A float member decoded chunk by chunk into `T`: the only buffer the size of the array is the
    /// result, refused from the header when it would pass `max_bytes`, and it grows as values arrive,
    /// so a member cut short never costs what its header promised.
    fn read_floats<T: FloatValue>(
        &mut self,
        name: &str,
        max_bytes: usize,
    ) -> anyhow::Result<(Vec<T>, Vec<usize>)> {
        let path = self.path.display().to_string();
        let NpzMember { header, mut reader } = self.member(name)?;
        let elem = match header.elem {
            Some(e @ (Elem::F32 { .. } | Elem::F64 { .. })) => e,
            _ => bail!(
                "{path}: array `{name}` has dtype `{}`, expected float32 or float64",
                header.descr
            ),
        };
        let numel = header.numel().unwrap_or(usize::MAX); // checked by `member`
        if numel > max_bytes / std::mem::size_of::<T>() {
            bail!(
                "{path}: array `{name}` has shape {:?}: more than the {} MiB it may take",
                header.shape,
                max_bytes >> 20
            );
        }
        let width = elem.bytes();
        let mut values: Vec<T> = Vec::with_capacity(numel.min(1 << 20));
        let mut chunk = vec![0u8; (1 << 16) * width];
        while values.len() < numel {
            let n = (numel - values.len()).min(1 << 16) * width;
            reader.read_exact(&mut chunk[..n]).with_context(|| {
                format!(
                    "{path}: array `{name}` is truncated ({} of {numel} values)",
                    values.len()
                )
            })?;
            let bytes = &chunk[..n];
            match elem {
                Elem::F64 { big_endian } => values.extend(bytes.chunks_exact(8).map(|c| {
                    let c: [u8; 8] = c.try_into().expect("chunks of 8");
                    T::from_f64(if big_endian {
                        f64::from_be_bytes(c)
                    } else {
                        f64::from_le_bytes(c)
                    })
                })),
                Elem::F32 { big_endian } => values.extend(bytes.chunks_exact(4).map(|c| {
                    let c: [u8; 4] = c.try_into().expect("chunks of 4");
                    T::from_f32(if big_endian {
                        f32::from_be_bytes(c)
                    } else {
                        f32::from_le_bytes(c)
                    })
                })),
                Elem::U8 => unreachable!("matched above"),
            }
        }
        check_member_crc(&mut reader)
            .with_context(|| format!("{path}: array `{name}` is corrupt"))?;
        Ok((values, header.shape))
    }
}

/// What a float member can be read as.
trait FloatValue: Copy {
    fn from_f32(x: f32) -> Self;
    fn from_f64(x: f64) -> Self;
}

impl FloatValue for f64 {
    fn from_f32(x: f32) -> Self {
        f64::from(x)
    }
    fn from_f64(x: f64) -> Self {
        x
    }
}

impl FloatValue for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

/// The largest array [`NpzReader::read_f64`] reads whole (as f64): a 8192 × 8192 covariance.
pub const MAX_WHOLE_ARRAY_BYTES: usize = 1 << 29;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::npz::{npy_header, Dtype, NpzWriter};

    #[test]
    fn parses_the_headers_numpy_writes() {
        let h = parse_header_dict(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (2048, 2048), }          \n",
        )
        .unwrap();
        assert_eq!(h.elem, Some(Elem::F64 { big_endian: false }));
        assert_eq!(h.shape, vec![2048, 2048]);
        let h =
            parse_header_dict("{'descr': '|u1', 'fortran_order': True, 'shape': (7,), }").unwrap();
        assert!(h.fortran_order);
        assert_eq!((h.elem, h.shape), (Some(Elem::U8), vec![7]));
        let h =
            parse_header_dict("{'descr': '<i8', 'fortran_order': False, 'shape': (), }").unwrap();
        assert_eq!((h.elem, h.numel()), (None, Some(1)));
        assert!(parse_header_dict("{'descr': '<f4', 'shape': (1,)}").is_err());
        // A shape whose size overflows is reported as such, not wrapped or panicked on.
        let h = parse_header_dict(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296, 2), }",
        )
        .unwrap();
        assert_eq!(h.numel(), None);
        let mut bytes = std::io::Cursor::new(npy_header(&Dtype::U8, &[3, 4, 5, 3]));
        assert_eq!(read_npy_header(&mut bytes).unwrap().shape, vec![3, 4, 5, 3]);
    }

    #[test]
    fn reads_back_what_the_writer_wrote_and_names_missing_arrays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.npz");
        let mut w = NpzWriter::create(&path).unwrap();
        w.begin("mu", Dtype::F64, &[3]).unwrap();
        for v in [1.5f64, -2.0, 3.25] {
            w.write(&v.to_le_bytes()).unwrap();
        }
        w.end().unwrap();
        w.finish().unwrap();
        let mut r = NpzReader::open(&path).unwrap();
        assert_eq!(r.names(), vec!["mu"]);
        assert_eq!(r.read_f64("mu").unwrap(), (vec![1.5, -2.0, 3.25], vec![3]));
        let msg = r.read_f64("sigma").err().unwrap().to_string();
        assert!(
            msg.contains("no array `sigma`") && msg.contains("[mu]"),
            "{msg}"
        );
        std::fs::write(dir.path().join("bad.npz"), b"not a zip").unwrap();
        let msg = NpzReader::open(&dir.path().join("bad.npz"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("bad.npz") && msg.contains("not an .npz"),
            "{msg}"
        );
    }
}
