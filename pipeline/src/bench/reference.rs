//! A Python reference script kept running beside a benchmark and asked for one measurement at a time
//! (a line on its stdin, a JSON line back), so both sides are timed interleaved on the same machine
//! state.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{bail, Context};

pub struct Reference {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    script: String,
}

/// The answer to a timing request: seconds, an optional value, or an error.
#[derive(serde::Deserialize)]
struct Timing {
    seconds: Option<f64>,
    value: Option<f64>,
    error: Option<String>,
}

impl Reference {
    /// Starts `python script args…`.
    pub fn start(python: &Path, script: &Path, args: &[String]) -> anyhow::Result<Self> {
        let mut child = Command::new(python)
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} {}", python.display(), script.display()))?;
        let stdin = child.stdin.take().context("reference stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("reference stdout")?);
        Ok(Reference {
            child,
            stdin,
            stdout,
            script: script.display().to_string(),
        })
    }

    pub fn ask<T: serde::de::DeserializeOwned>(&mut self, command: &str) -> anyhow::Result<T> {
        let script = &self.script;
        writeln!(self.stdin, "{command}").with_context(|| format!("writing to {script}"))?;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .with_context(|| format!("reading from {script}"))?;
        if line.is_empty() {
            bail!("{script} exited before answering `{command}` (its stderr is above)");
        }
        serde_json::from_str(&line).with_context(|| {
            format!(
                "parsing the answer of {script} to `{command}`: `{}`",
                line.trim_end()
            )
        })
    }

    /// Asks for a timing: (seconds, the value the script computed, if any).
    pub fn measure(&mut self, command: &str) -> anyhow::Result<(f64, Option<f64>)> {
        let answer: Timing = self.ask(command)?;
        match (answer.seconds, answer.error) {
            (Some(seconds), _) => Ok((seconds, answer.value)),
            (None, error) => bail!("{}: {}", self.script, error.unwrap_or_default()),
        }
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        // The script only waits on stdin between measurements; kill and reap it, also when the
        // benchmark fails half-way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The median of interleaved timings (the upper one of an even count).
pub fn median(mut seconds: Vec<f64>) -> f64 {
    seconds.sort_by(f64::total_cmp);
    seconds[seconds.len() / 2]
}

/// Sets libtorch's intra-op threads when asked and returns the count both sides then run with.
pub fn cpu_threads(requested: Option<i32>) -> i32 {
    if let Some(threads) = requested {
        tch::set_num_threads(threads);
    }
    tch::get_num_threads()
}
