//! Reporting a test's GPU branch that did not run. libtest captures `println!`/`eprintln!` of passing
//! tests, so a skip said that way never reaches CI's log; this writes to the process's stderr
//! directly (which libtest does not capture) and, when `FLOWBACK_SKIP_LOG` names a file, appends a
//! line to it so `make test` can print the count in its summary.

use std::io::Write;

/// Records that `test` left out its GPU branch because of `why`.
pub fn gpu_branch(test: &str, why: &str) {
    report(format!("SKIPPED GPU branch of {test}: {why}\n"));
}

/// Records that `test` left out a branch that needs something other than a GPU (a libtorch feature,
/// a CPU kind) because of `why`; reported the same way as [`gpu_branch`].
pub fn branch(test: &str, why: &str) {
    report(format!("SKIPPED branch of {test}: {why}\n"));
}

fn report(line: String) {
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os("FLOWBACK_SKIP_LOG") {
        // Appends of one short line are atomic on local filesystems, so parallel tests do not tear.
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}
