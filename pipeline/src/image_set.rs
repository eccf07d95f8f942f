//! A set of images on disk to evaluate, read as batches of uint8 (B, H, W, 3) tensors: a directory of
//! PNGs (in file-name order, what `pipeline sample` writes and pytorch-fid reads) or an ADM-style `.npz`
//! whose `arr_0` is uint8 (N, H, W, 3) (what `pipeline sample` and the ADM suite write). Reading runs on
//! its own thread, one batch ahead of the caller, so decoding overlaps the network.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use anyhow::{bail, Context};
use rayon::prelude::*;
use tch::Tensor;

use crate::npz_read::{Elem, NpzReader};

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

fn decode_png(path: &Path) -> anyhow::Result<(usize, usize, Vec<u8>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let image = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .with_context(|| format!("{}: not a readable PNG", path.display()))?;
    // PIL's convert("RGB"), what pytorch-fid applies: alpha dropped, gray replicated.
    let rgb = image.to_rgb8();
    Ok((rgb.width() as usize, rgb.height() as usize, rgb.into_raw()))
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
        let mut pixels = vec![0u8; n * per_image];
        member.reader.read_exact(&mut pixels).with_context(|| {
            format!(
                "{}: `arr_0` ends before image {} of {count}",
                path.display(),
                start + n
            )
        })?;
        if tx
            .send(Ok((pixels, [n as i64, h as i64, w as i64, 3])))
            .is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}
