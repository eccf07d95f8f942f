//! One cache shard file: the cached numbers of one source shard, as named fixed-shape columns.
//!
//! Layout (all integers little-endian; documented for outside readers in docs/cache-format.md):
//!
//! ```text
//! "FBCACHE1"                                   8-byte magic
//! chunk 0: field 0 frame, field 1 frame, …     one zstd frame per field, rows of up to `chunk_rows` samples
//! chunk 1: …
//! footer                                       UTF-8 JSON: fields, keys, chunk index, metadata
//! footer length (u64) | footer blake3 (32 bytes) | "FBCACHE1"
//! ```
//!
//! Why columns in chunks rather than a tar of `.npy` members: a training reader wants every field of a
//! run of samples at once, so one zstd frame per (chunk, field) decompresses in a single call into a
//! contiguous array ready to become a tensor, with no per-sample header parsing; the footer gives the
//! offsets, so a reader can also skip fields it does not need (e.g. the images of a latent run). Every
//! byte is covered by a checksum: each frame's blake3 is in the footer, the footer's in the trailer.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use serde::{Deserialize, Serialize};

use crate::atomic::temp_path;
use crate::{Error, Result};

pub const MAGIC: &[u8; 8] = b"FBCACHE1";
const TRAILER_LEN: u64 = 8 + 32 + 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    U8,
    I8,
    I64,
    F16,
    /// Stored as the upper 16 bits of an f32 (numpy has no bfloat16: read as uint16, shift left 16).
    Bf16,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::F16 | DType::Bf16 => 2,
            DType::F32 => 4,
            DType::I64 => 8,
        }
    }
}

/// A column: every sample has one value of this dtype and shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldSpec {
    pub name: String,
    pub dtype: DType,
    /// Per-sample shape, e.g. `[2, 4, 32, 32]` for the VAE mean of two views.
    pub shape: Vec<usize>,
}

impl FieldSpec {
    pub fn new(name: &str, dtype: DType, shape: &[usize]) -> Self {
        FieldSpec {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    /// Bytes of one sample's value.
    pub fn row_bytes(&self) -> usize {
        self.dtype.size() * self.shape.iter().product::<usize>()
    }
}

/// Where one chunk's frames are.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkIndex {
    pub rows: usize,
    /// (offset, compressed length) of each field's frame, in field order.
    pub frames: Vec<(u64, u64)>,
    /// blake3 of each compressed frame, hex: zstd ignores some header bits, this does not.
    pub frame_blake3: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Footer {
    pub format_version: u32,
    pub fields: Vec<FieldSpec>,
    pub keys: Vec<String>,
    pub chunks: Vec<ChunkIndex>,
    /// Free-form provenance (source shard name, size, content hash).
    pub meta: serde_json::Value,
}

pub const FORMAT_VERSION: u32 = 1;

/// What a finished shard is, for the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardSummary {
    pub samples: usize,
    pub bytes: u64,
    /// blake3 of the whole file, hex.
    pub blake3: String,
}

/// Writes a cache shard through a temporary file; the final name appears only in [`ShardWriter::finish`].
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    hasher: blake3::Hasher,
    offset: u64,
    fields: Vec<FieldSpec>,
    chunk_rows: usize,
    level: i32,
    pending: Vec<Vec<u8>>,
    pending_rows: usize,
    keys: Vec<String>,
    chunks: Vec<ChunkIndex>,
}

impl ShardWriter {
    pub fn create(
        path: &Path,
        fields: Vec<FieldSpec>,
        chunk_rows: usize,
        level: i32,
    ) -> Result<Self> {
        if fields.is_empty() || chunk_rows == 0 {
            return Err(Error::Invalid(format!(
                "{}: a cache shard needs fields and chunk_rows > 0",
                path.display()
            )));
        }
        let tmp = temp_path(path);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut writer = ShardWriter {
            path: path.to_path_buf(),
            tmp,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            hasher: blake3::Hasher::new(),
            offset: 0,
            pending: fields.iter().map(|_| Vec::new()).collect(),
            fields,
            chunk_rows,
            level,
            pending_rows: 0,
            keys: Vec::new(),
            chunks: Vec::new(),
        };
        writer.write_raw(MAGIC)?;
        Ok(writer)
    }

    /// Appends one sample: `values[i]` holds the raw little-endian bytes of field `i`.
    pub fn push(&mut self, key: &str, values: &[&[u8]]) -> Result<()> {
        if values.len() != self.fields.len() {
            return Err(self.invalid(
                key,
                format!("{} values for {} fields", values.len(), self.fields.len()),
            ));
        }
        for (field, value) in self.fields.iter().zip(values) {
            if value.len() != field.row_bytes() {
                return Err(self.invalid(
                    key,
                    format!(
                        "field {} has {} bytes, expected {}",
                        field.name,
                        value.len(),
                        field.row_bytes()
                    ),
                ));
            }
        }
        for (buffer, value) in self.pending.iter_mut().zip(values) {
            buffer.extend_from_slice(value);
        }
        self.keys.push(key.to_string());
        self.pending_rows += 1;
        if self.pending_rows == self.chunk_rows {
            self.flush_chunk()?;
        }
        Ok(())
    }

    pub fn n_samples(&self) -> usize {
        self.keys.len()
    }

    /// Writes the footer, fsyncs and renames to the final name.
    pub fn finish(mut self, meta: serde_json::Value) -> Result<ShardSummary> {
        self.flush_chunk()?;
        let footer = Footer {
            format_version: FORMAT_VERSION,
            fields: std::mem::take(&mut self.fields),
            keys: std::mem::take(&mut self.keys),
            chunks: std::mem::take(&mut self.chunks),
            meta,
        };
        let json = serde_json::to_vec(&footer).expect("footer serialises");
        let footer_hash = blake3::hash(&json);
        self.write_raw(&json)?;
        self.write_raw(&(json.len() as u64).to_le_bytes())?;
        self.write_raw(footer_hash.as_bytes())?;
        self.write_raw(MAGIC)?;
        let out = self.out.take().expect("writer open");
        let file = out
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = File::open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            }) {
                let _ = d.sync_all();
            }
        }
        Ok(ShardSummary {
            samples: footer.keys.len(),
            bytes: self.offset,
            blake3: self.hasher.finalize().to_hex().to_string(),
        })
    }

    fn flush_chunk(&mut self) -> Result<()> {
        if self.pending_rows == 0 {
            return Ok(());
        }
        let mut frames = Vec::with_capacity(self.fields.len());
        let mut frame_blake3 = Vec::with_capacity(self.fields.len());
        // A chunk's frames are independent: compressed and hashed on the rayon pool, each large one
        // split further by zstd's own workers, then written in field order.
        let level = self.level;
        let raws: Vec<Vec<u8>> = self.pending.iter_mut().map(std::mem::take).collect();
        let done: Vec<std::io::Result<(Vec<u8>, String)>> = raws
            .par_iter()
            .map(|raw| {
                let compressed = compress_frame(raw, level)?;
                let hash = blake3::hash(&compressed).to_hex().to_string();
                Ok((compressed, hash))
            })
            .collect();
        for result in done {
            let (compressed, hash) = result.map_err(|e| Error::io(&self.tmp, e))?;
            frames.push((self.offset, compressed.len() as u64));
            frame_blake3.push(hash);
            self.write_raw(&compressed)?;
        }
        self.chunks.push(ChunkIndex {
            rows: self.pending_rows,
            frames,
            frame_blake3,
        });
        self.pending_rows = 0;
        Ok(())
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        let out = self.out.as_mut().expect("writer open");
        out.write_all(bytes).map_err(|e| Error::io(&self.tmp, e))?;
        self.hasher.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn invalid(&self, key: &str, message: String) -> Error {
        Error::Sample {
            shard: self.path.display().to_string(),
            key: key.to_string(),
            message,
        }
    }
}

impl Drop for ShardWriter {
    /// A writer dropped before `finish` (error, panic, cancellation) leaves no file behind.
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Frames above this size are compressed by zstd's worker threads (jobs of about 1 MiB each).
const MULTITHREAD_FRAME_BYTES: usize = 4 << 20;

fn compress_frame(raw: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    let mut encoder = zstd::stream::Encoder::new(Vec::with_capacity(raw.len() / 2 + 64), level)?;
    if raw.len() >= MULTITHREAD_FRAME_BYTES {
        // As many workers as the writer's pool has threads; the output does not depend on the count.
        encoder.multithread(rayon::current_num_threads().max(1) as u32)?;
    }
    encoder.include_checksum(true)?;
    encoder.include_contentsize(true)?;
    encoder.set_pledged_src_size(Some(raw.len() as u64))?;
    encoder.write_all(raw)?;
    encoder.finish()
}

/// Reads a cache shard. Opening checks the trailer and the footer's hash; each frame is checked by zstd
/// as it is decompressed, so a corrupt byte anywhere is an error naming the file, never wrong numbers.
pub struct ShardReader {
    path: PathBuf,
    file: File,
    footer: Footer,
    /// Compressed bytes of the frame being read, reused: a fresh multi-MB buffer per frame costs its
    /// zeroing and page faults, a sizeable part of readback next to decompression.
    scratch: Vec<u8>,
    /// One zstd decompression context for all frames of the shard.
    dctx: zstd::bulk::Decompressor<'static>,
}

impl ShardReader {
    pub fn open(path: &Path) -> Result<Self> {
        let corrupt =
            |what: &str| Error::Invalid(format!("{}: corrupt cache shard: {what}", path.display()));
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < MAGIC.len() as u64 + TRAILER_LEN {
            return Err(corrupt("too short"));
        }
        let mut head = [0u8; 8];
        file.read_exact(&mut head).map_err(|e| Error::io(path, e))?;
        let mut trailer = [0u8; TRAILER_LEN as usize];
        file.seek(SeekFrom::End(-(TRAILER_LEN as i64)))
            .map_err(|e| Error::io(path, e))?;
        file.read_exact(&mut trailer)
            .map_err(|e| Error::io(path, e))?;
        if &head != MAGIC || &trailer[40..] != MAGIC {
            return Err(corrupt("bad magic"));
        }
        let footer_len = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
        if footer_len > len - TRAILER_LEN - MAGIC.len() as u64 {
            return Err(corrupt("footer length out of range"));
        }
        let mut json = vec![0u8; footer_len as usize];
        file.seek(SeekFrom::Start(len - TRAILER_LEN - footer_len))
            .map_err(|e| Error::io(path, e))?;
        file.read_exact(&mut json).map_err(|e| Error::io(path, e))?;
        if blake3::hash(&json).as_bytes() != &trailer[8..40] {
            return Err(corrupt("footer checksum mismatch"));
        }
        let footer: Footer =
            serde_json::from_slice(&json).map_err(|e| corrupt(&format!("footer: {e}")))?;
        if footer.format_version != FORMAT_VERSION {
            return Err(corrupt(&format!(
                "format version {} (this build reads {FORMAT_VERSION})",
                footer.format_version
            )));
        }
        Ok(ShardReader {
            path: path.to_path_buf(),
            file,
            footer,
            scratch: Vec::new(),
            dctx: zstd::bulk::Decompressor::new().map_err(|e| Error::io(path, e))?,
        })
    }

    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    pub fn n_samples(&self) -> usize {
        self.footer.keys.len()
    }

    pub fn field_index(&self, name: &str) -> Result<usize> {
        self.footer
            .fields
            .iter()
            .position(|f| f.name == name)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: cache shard has no field `{name}`",
                    self.path.display()
                ))
            })
    }

    /// Decompresses field `field` of chunk `chunk`: `rows × row_bytes` bytes.
    pub fn read_frame(&mut self, chunk: usize, field: usize) -> Result<Vec<u8>> {
        let (length, expected) = self.load_frame(chunk, field)?;
        // One-shot decompression into a buffer of the known size (a frame that would overflow it is an
        // error): twice as fast as the streaming decoder on these frames.
        let raw = self
            .dctx
            .decompress(&self.scratch[..length], expected)
            .map_err(|e| self.frame_error(chunk, field, e))?;
        if raw.len() != expected {
            return Err(self.frame_error(
                chunk,
                field,
                format!("{} bytes, expected {expected}", raw.len()),
            ));
        }
        Ok(raw)
    }

    /// Like [`read_frame`](Self::read_frame), into `out` (exactly `rows × row_bytes` long), e.g. a slice
    /// of a batch buffer the caller reuses: no allocation, and no copy after decompression.
    pub fn read_frame_into(&mut self, chunk: usize, field: usize, out: &mut [u8]) -> Result<()> {
        let (length, expected) = self.load_frame(chunk, field)?;
        if out.len() != expected {
            return Err(Error::Invalid(format!(
                "{}: chunk {chunk} field {field} has {expected} bytes, the buffer {}",
                self.path.display(),
                out.len()
            )));
        }
        let n = self
            .dctx
            .decompress_to_buffer(&self.scratch[..length], out)
            .map_err(|e| self.frame_error(chunk, field, e))?;
        if n != expected {
            return Err(self.frame_error(chunk, field, format!("{n} bytes, expected {expected}")));
        }
        Ok(())
    }

    /// Reads the compressed frame into `scratch` and checks its blake3; returns (compressed length,
    /// decompressed length).
    fn load_frame(&mut self, chunk: usize, field: usize) -> Result<(usize, usize)> {
        let index = &self.footer.chunks[chunk];
        let (offset, length) = index.frames[field];
        let (length, expected) = (
            length as usize,
            index.rows * self.footer.fields[field].row_bytes(),
        );
        if self.scratch.len() < length {
            self.scratch.resize(length, 0);
        }
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(|e| Error::io(&self.path, e))?;
        self.file
            .read_exact(&mut self.scratch[..length])
            .map_err(|e| Error::io(&self.path, e))?;
        if self.footer.chunks[chunk]
            .frame_blake3
            .get(field)
            .map(String::as_str)
            != Some(blake3::hash(&self.scratch[..length]).to_hex().as_str())
        {
            return Err(self.frame_error(chunk, field, "checksum mismatch"));
        }
        Ok((length, expected))
    }

    fn frame_error(&self, chunk: usize, field: usize, what: impl std::fmt::Display) -> Error {
        Error::Invalid(format!(
            "{}: corrupt cache shard: chunk {chunk} field {}: {what}",
            self.path.display(),
            self.footer.fields[field].name
        ))
    }

    /// The whole column of one field, all chunks concatenated.
    pub fn read_field(&mut self, name: &str) -> Result<Vec<u8>> {
        let field = self.field_index(name)?;
        let mut out = Vec::with_capacity(self.n_samples() * self.footer.fields[field].row_bytes());
        for chunk in 0..self.footer.chunks.len() {
            out.extend_from_slice(&self.read_frame(chunk, field)?);
        }
        Ok(out)
    }
}

/// blake3 of a file's bytes, hex (what the manifest records and `cache verify` recomputes).
pub fn file_blake3(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Vec<FieldSpec> {
        vec![
            FieldSpec::new("label", DType::I64, &[]),
            FieldSpec::new("latent", DType::F32, &[2, 3]),
        ]
    }

    fn write(path: &Path, n: usize) -> ShardSummary {
        let mut w = ShardWriter::create(path, fields(), 4, 3).unwrap();
        for i in 0..n {
            let label = (i as i64).to_le_bytes();
            let latent: Vec<u8> = (0..6)
                .flat_map(|j| (i as f32 * 10.0 + j as f32).to_le_bytes())
                .collect();
            w.push(&format!("{i:06}"), &[&label, &latent]).unwrap();
        }
        w.finish(serde_json::json!({"source": "x.tar"})).unwrap()
    }

    /// Frames large enough for zstd's worker threads read back as written, and the file's bytes do not
    /// depend on the machine's core count (zstd's multithreaded output depends on its job size only).
    #[test]
    fn large_frames_round_trip_through_zstds_workers() {
        let dir = tempfile::tempdir().unwrap();
        let fields = vec![FieldSpec::new("features", DType::U8, &[3 << 20])];
        let rows: Vec<Vec<u8>> = (0..2u32)
            .map(|r| {
                (0..3u32 << 20)
                    .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(r) >> 13) as u8)
                    .collect()
            })
            .collect();
        let write = |name: &str| {
            let path = dir.path().join(name);
            let mut w = ShardWriter::create(&path, fields.clone(), 2, 1).unwrap();
            for (i, row) in rows.iter().enumerate() {
                w.push(&i.to_string(), &[row]).unwrap();
            }
            w.finish(serde_json::json!({})).unwrap();
            path
        };
        let a = write("a.fbc");
        let mut r = ShardReader::open(&a).unwrap();
        assert_eq!(r.read_field("features").unwrap(), rows.concat());
        let b = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| write("b.fbc"));
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    }

    #[test]
    fn round_trips_columns_across_partial_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.fbc");
        let summary = write(&path, 10);
        assert_eq!(summary.samples, 10);
        assert_eq!(summary.bytes, std::fs::metadata(&path).unwrap().len());
        assert_eq!(summary.blake3, file_blake3(&path).unwrap());
        let mut r = ShardReader::open(&path).unwrap();
        assert_eq!(
            r.footer().chunks.iter().map(|c| c.rows).collect::<Vec<_>>(),
            [4, 4, 2]
        );
        let latent = r.read_field("latent").unwrap();
        let value = |i: usize, j: usize| {
            f32::from_le_bytes(latent[(i * 6 + j) * 4..][..4].try_into().unwrap())
        };
        assert_eq!(value(9, 5), 95.0);
        assert_eq!(r.footer().keys[7], "000007");
        assert!(r.read_field("nope").is_err());
        // Into a caller's buffer: the same bytes, and a buffer of the wrong size is refused.
        let field = r.field_index("latent").unwrap();
        let mut into = vec![0u8; 2 * 6 * 4];
        r.read_frame_into(2, field, &mut into).unwrap();
        assert_eq!(into, r.read_frame(2, field).unwrap());
        assert_eq!(&into[..], &latent[8 * 24..]);
        assert!(r.read_frame_into(2, field, &mut [0u8; 47]).is_err());
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.fbc");
        write(&path, 5);
        let good = std::fs::read(&path).unwrap();
        for pos in 0..good.len() {
            let mut bad = good.clone();
            bad[pos] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            let outcome = ShardReader::open(&path).and_then(|mut r| {
                r.read_field("label")?;
                r.read_field("latent")?;
                // The buffer path checks the same way.
                for c in 0..r.footer().chunks.len() {
                    let len = r.footer().chunks[c].rows * 24;
                    r.read_frame_into(c, 1, &mut vec![0u8; len])?;
                }
                Ok(())
            });
            // A flip anywhere, even in header bits zstd ignores, must surface as an error.
            assert!(
                outcome.is_err(),
                "flip at byte {pos} of {} went unnoticed",
                good.len()
            );
        }
    }

    #[test]
    fn dropped_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.fbc");
        let mut w = ShardWriter::create(&path, fields(), 4, 3).unwrap();
        w.push("k", &[&0i64.to_le_bytes(), &[0u8; 24]]).unwrap();
        assert!(w
            .push("bad", &[&[0u8; 3], &[0u8; 24]])
            .unwrap_err()
            .to_string()
            .contains("key bad"));
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
