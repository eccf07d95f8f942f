//! Atomic file writes: a reader (or a rerun after kill -9) sees either the old file or the complete
//! new one, never a prefix.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The temporary name used while `path` is being written. It starts with a dot and carries the pid, so
/// listings skip it, concurrent writers do not collide, and garbage collection can recognise it.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// A file written as a stream under its temporary name and renamed into place by
/// [`AtomicFile::finish`] (after an fsync of the file, and of the directory after the rename); dropped
/// unfinished (an error, a panic), it removes the temporary and `path` is untouched.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
}

impl AtomicFile {
    pub fn create(path: impl Into<PathBuf>) -> Result<AtomicFile> {
        let path = path.into();
        let tmp = temp_path(&path);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(AtomicFile {
            path,
            tmp,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out_mut()
            .write_all(bytes)
            .map_err(|e| Error::io(&self.tmp, e))
    }

    fn out_mut(&mut self) -> &mut BufWriter<File> {
        self.out.as_mut().expect("open until finish")
    }

    pub fn finish(mut self) -> Result<()> {
        let out = self.out.take().expect("open until finish");
        let result = (|| -> io::Result<()> {
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            drop(file);
            fs::rename(&self.tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        result.map_err(|source| {
            let _ = fs::remove_file(&self.tmp);
            Error::io(&self.path, source)
        })
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `path` through a temporary file in the same directory: write, fsync, rename, fsync the
/// directory. On error the temporary file is removed and `path` is untouched.
pub fn write_atomic<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> io::Result<()>,
{
    let mut file = AtomicFile::create(path)?;
    write(file.out_mut()).map_err(|source| Error::io(path, source))?;
    file.finish()
}

/// Convenience for small files written in one piece (manifests, effective configs).
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |out| out.write_all(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_file_appears_only_when_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("part");
        let mut f = AtomicFile::create(&path).unwrap();
        f.write(b"abc").unwrap();
        f.write(b"def").unwrap();
        assert!(!path.exists());
        f.finish().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"abcdef");
        // Dropped unfinished: no file, no temporary, the finished one untouched.
        let other = dir.path().join("other");
        let mut g = AtomicFile::create(&other).unwrap();
        g.write(b"half").unwrap();
        drop(g);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("part")]);
    }

    #[test]
    fn failed_write_leaves_old_file_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        write_bytes_atomic(&path, b"old").unwrap();
        let err = write_atomic(&path, |out| {
            out.write_all(b"partial")?;
            Err(io::Error::other("boom"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("a.txt"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
