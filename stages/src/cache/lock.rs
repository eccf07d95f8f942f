//! An exclusive lock on a cache directory, so two processes never update one manifest at once. The
//! holder's pid and host are written next to the lock so a waiting process can say who holds it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Error, Result};

pub struct CacheLock {
    file: File,
    path: PathBuf,
}

const LOCK_NAME: &str = ".lock";
const OWNER_NAME: &str = ".lock.owner";

impl CacheLock {
    /// Takes the lock, waiting up to `timeout` (logging who holds it through `on_wait`, once).
    pub fn acquire(dir: &Path, timeout: Duration, on_wait: &dyn Fn(&str)) -> Result<CacheLock> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(LOCK_NAME);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let started = Instant::now();
        let mut told = false;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => {
                    let owner = std::fs::read_to_string(dir.join(OWNER_NAME))
                        .unwrap_or_else(|_| "unknown".into());
                    if !told {
                        on_wait(owner.trim());
                        told = true;
                    }
                    if started.elapsed() >= timeout {
                        return Err(Error::Invalid(format!(
                            "{}: locked by {} for more than {:?}",
                            dir.display(),
                            owner.trim(),
                            timeout
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
        }
        let owner_path = dir.join(OWNER_NAME);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let _ = File::create(&owner_path)
            .and_then(|mut f| write!(f, "pid {} on {}", std::process::id(), host.trim()));
        Ok(CacheLock { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_taker_waits_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = CacheLock::acquire(dir.path(), Duration::ZERO, &|_| {}).unwrap();
        let seen = std::sync::Mutex::new(String::new());
        let err = CacheLock::acquire(dir.path(), Duration::from_millis(200), &|o| {
            *seen.lock().unwrap() = o.to_string()
        })
        .err()
        .unwrap();
        let pid = format!("pid {}", std::process::id());
        assert!(seen.lock().unwrap().contains(&pid));
        assert!(err.to_string().contains(&pid), "{err}");
        drop(held);
        CacheLock::acquire(dir.path(), Duration::ZERO, &|_| {}).unwrap();
    }
}
