//! A set of images on disk to evaluate, read as batches of uint8 (B, H, W, 3) tensors: a directory of
//! PNGs (in file-name order, what `pipeline sample` writes and pytorch-fid reads) or an ADM-style `.npz`
//! whose `arr_0` is uint8 (N, H, W, 3) (what `pipeline sample` and the ADM suite write). Reading runs on
//! its own thread, one batch ahead of the caller, so decoding overlaps the network.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use anyhow::{bail, Context};
use rayon::prelude::*;
use tch::Tensor;

use crate::formats::npz_read::{check_member_crc, read_exactly, Elem, NpzReader};

pub enum ImageSet {
    Pngs(Vec<PathBuf>),
    Npz {
        path: PathBuf,
        count: usize,
        height: usize,
        width: usize,
    },
}

impl ImageSet {
    /// A directory is read as PNGs, a file as an `.npz`; both are checked here, before any work.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if path.is_dir() {
            let mut files = Vec::new();
            for entry in
                std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))?
            {
                let entry = entry.with_context(|| format!("reading {}", path.display()))?;
                let p = entry.path();
                let png = p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
                if png && p.is_file() {
                    files.push(p);
                }
            }
            if files.is_empty() {
                bail!("{}: no .png files in this directory", path.display());
            }
            files.sort();
            return Ok(ImageSet::Pngs(files));
        }
        let mut npz = NpzReader::open(path)?;
        let header = npz.member("arr_0")?.header;
        let shape = &header.shape;
        if header.elem != Some(Elem::U8) || shape.len() != 4 || shape[3] != 3 {
            bail!(
                "{}: `arr_0` has dtype `{}` and shape {shape:?}; expected uint8 images (N, H, W, 3) as \
                 `pipeline sample` and the ADM suite write",
                path.display(),
                header.descr
            );
        }
        if shape[0] == 0 || shape[1] == 0 || shape[2] == 0 {
            bail!(
                "{}: `arr_0` holds no images (shape {shape:?})",
                path.display()
            );
        }
        Ok(ImageSet::Npz {
            path: path.to_path_buf(),
            count: shape[0],
            height: shape[1],
            width: shape[2],
        })
    }

    pub fn len(&self) -> usize {
        match self {
            ImageSet::Pngs(files) => files.len(),
            ImageSet::Npz { count, .. } => *count,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            ImageSet::Pngs(files) => format!("{} PNG files", files.len()),
            ImageSet::Npz {
                path,
                count,
                height,
                width,
            } => format!(
                "{}: arr_0 uint8 [{count}, {height}, {width}, 3]",
                path.display()
            ),
        }
    }

    /// Batches of at most `batch` images in order; PNGs of different sizes end a batch early (a batch is
    /// one tensor). A read or decode error ends the iteration with that error, naming the file.
    pub fn batches(&self, batch: usize) -> Batches {
        let batch = batch.max(1);
        let (tx, rx) = mpsc::sync_channel(1);
        let thread = match self {
            ImageSet::Pngs(files) => {
                let files = files.clone();
                std::thread::spawn(move || png_batches(&files, batch, &tx))
            }
            ImageSet::Npz {
                path,
                count,
                height,
                width,
            } => {
                let (path, count, h, w) = (path.clone(), *count, *height, *width);
                std::thread::spawn(move || {
                    if let Err(e) = npz_batches(&path, count, h, w, batch, &tx) {
                        let _ = tx.send(Err(e));
                    }
                })
            }
        };
        Batches {
            rx: Some(rx),
            thread: Some(thread),
        }
    }
}

/// Raw batches from the reading thread; tensors are made on the caller's side.
type RawBatch = anyhow::Result<(Vec<u8>, [i64; 4])>;

pub struct Batches {
    rx: Option<mpsc::Receiver<RawBatch>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Iterator for Batches {
    type Item = anyhow::Result<Tensor>;

    fn next(&mut self) -> Option<Self::Item> {
        let raw = self.rx.as_ref()?.recv().ok()?;
        Some(raw.and_then(|(bytes, shape)| Ok(Tensor::f_from_slice(&bytes)?.f_view(shape)?)))
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        // Closing the channel makes the reader's next send fail, so it stops; then it can be joined.
        drop(self.rx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The data stages' decoder: Pillow's `convert("RGB")` (what pytorch-fid applies), and the
/// decompression-bomb limit checked from the header before any allocation.
fn decode_png(path: &Path) -> anyhow::Result<(usize, usize, Vec<u8>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let max_pixels = stages::config::DataConfig::default().max_pixels;
    let image = stages::decode::decode_rgb(&bytes, max_pixels).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a readable PNG ({:?}: {})",
            path.display(),
            e.kind,
            e.detail
        )
    })?;
    Ok((image.width, image.height, image.pixels))
}

fn png_batches(files: &[PathBuf], batch: usize, tx: &mpsc::SyncSender<RawBatch>) {
    for chunk in files.chunks(batch) {
        let decoded: anyhow::Result<Vec<_>> = chunk.par_iter().map(|p| decode_png(p)).collect();
        let decoded = match decoded {
            Ok(d) => d,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let mut start = 0;
        while start < decoded.len() {
            let (w, h) = (decoded[start].0, decoded[start].1);
            let end = decoded[start..]
                .iter()
                .position(|d| (d.0, d.1) != (w, h))
                .map_or(decoded.len(), |p| start + p);
            let mut pixels = Vec::with_capacity((end - start) * w * h * 3);
            for d in &decoded[start..end] {
                pixels.extend_from_slice(&d.2);
            }
            let shape = [(end - start) as i64, h as i64, w as i64, 3];
            if tx.send(Ok((pixels, shape))).is_err() {
                return;
            }
            start = end;
        }
    }
}

fn npz_batches(
    path: &Path,
    count: usize,
    h: usize,
    w: usize,
    batch: usize,
    tx: &mpsc::SyncSender<RawBatch>,
) -> anyhow::Result<()> {
    let mut npz = NpzReader::open(path)?;
    let mut member = npz.member("arr_0")?;
    let per_image = h * w * 3;
    for start in (0..count).step_by(batch) {
        let n = batch.min(count - start);
        let pixels = read_exactly(&mut member.reader, n * per_image).with_context(|| {
            format!(
                "{}: `arr_0` ends before image {} of {count}",
                path.display(),
                start + n
            )
        })?;
        if start + n == count {
            // The last batch goes out only once the member's CRC-32 has been checked.
            check_member_crc(&mut member.reader)
                .with_context(|| format!("{}: `arr_0` is corrupt", path.display()))?;
        }
        if tx
            .send(Ok((pixels, [n as i64, h as i64, w as i64, 3])))
            .is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::npz::{Dtype, NpzWriter};

    /// Everything a reader does with a file: open it as a sample set and read every batch, and read
    /// `mu` as reference statistics. Errors are fine; a panic or an abort is not.
    fn read_all(path: &Path) -> anyhow::Result<usize> {
        let mut seen = 0;
        if let Ok(mut npz) = NpzReader::open(path) {
            let _ = npz.read_f64("mu");
        }
        let set = ImageSet::open(path)?;
        for batch in set.batches(2) {
            seen += batch?.size()[0] as usize;
        }
        Ok(seen)
    }

    /// A good archive mutated in sequence (flipped bytes everywhere, truncations, shapes that claim
    /// more than the file holds or overflow): each read is an answer or an error naming the file,
    /// and the good file still reads in full after every one of them.
    #[test]
    fn mutated_npz_files_in_sequence_are_errors_not_crashes() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.npz");
        let mut w = NpzWriter::create(&good).unwrap();
        w.begin("arr_0", Dtype::U8, &[5, 4, 6, 3]).unwrap();
        w.write(
            &(0..5 * 4 * 6 * 3)
                .map(|i| (i * 7 % 251) as u8)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        w.end().unwrap();
        w.begin("mu", Dtype::F64, &[3]).unwrap();
        w.write(&[0u8; 24]).unwrap();
        w.end().unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&good).unwrap();
        let shape_at = bytes
            .windows(12)
            .position(|w| w == b"(5, 4, 6, 3)")
            .expect("arr_0's header");
        let mut mutants: Vec<Vec<u8>> = vec![];
        for i in (0..bytes.len()).step_by(3) {
            let mut m = bytes.clone();
            m[i] ^= 0x5A;
            mutants.push(m);
        }
        for len in [0, 1, 30, bytes.len() / 2, bytes.len() - 1] {
            mutants.push(bytes[..len].to_vec());
        }
        // Same-length shape edits, so the zip records stay consistent and only the header lies.
        for shape in [
            "(9, 9, 9, 3)",
            "(5, 4, 7, 3)",
            "(9999999, 3)",
            "(9999999999)",
        ] {
            let mut m = bytes.clone();
            let padded = format!("{shape:<12}");
            m[shape_at..shape_at + 12].copy_from_slice(padded.as_bytes());
            mutants.push(m);
        }
        let bad = dir.path().join("bad.npz");
        let mut errors = 0;
        for m in &mutants {
            std::fs::write(&bad, m).unwrap();
            match read_all(&bad) {
                Ok(n) => assert!(n <= 5, "{n} images from a 5-image file"),
                Err(e) => {
                    errors += 1;
                    assert!(format!("{e:#}").contains("bad.npz"), "{e:#}");
                }
            }
            assert_eq!(read_all(&good).unwrap(), 5);
        }
        // Every flip inside arr_0's pixel data is caught by the archive's CRC-32.
        let data_at = bytes
            .windows(3)
            .position(|w| w == [0u8, 7, 14])
            .expect("arr_0's first pixels");
        for i in (data_at..data_at + 5 * 4 * 6 * 3).step_by(11) {
            let mut m = bytes.clone();
            m[i] ^= 0x01;
            std::fs::write(&bad, &m).unwrap();
            let msg = format!(
                "{:#}",
                read_all(&bad).expect_err("a flipped pixel is an error")
            );
            assert!(msg.contains("bad.npz") && msg.contains("corrupt"), "{msg}");
        }
        assert!(errors > 0);
        // A shape larger than the member is refused from the header, before any allocation.
        let mut m = bytes.clone();
        m[shape_at..shape_at + 12].copy_from_slice(b"(9, 9, 9, 3)");
        std::fs::write(&bad, &m).unwrap();
        let msg = format!("{:#}", ImageSet::open(&bad).err().unwrap());
        assert!(msg.contains("`arr_0` claims shape [9, 9, 9, 3]"), "{msg}");
    }
}
