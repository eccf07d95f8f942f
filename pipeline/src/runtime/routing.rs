//! Where the oneDNN-or-MKL choices of float32 CPU products persist (`torch_ext::routing`): one
//! file per CPU model in the user's cache directory, so that each shape class is timed once per machine
//! and every process on it routes the class the same way (a resumed run computes what the first did).
//! `FLOWBACK_ONEDNN_ROUTING=FILE` names another file, `=off` keeps the choices per process.

use std::io::Read;
use std::path::PathBuf;

/// Sets the store for this process; call before the first product.
pub fn install() {
    let path = match std::env::var_os("FLOWBACK_ONEDNN_ROUTING") {
        Some(v) if v == "off" => None,
        Some(v) => Some(PathBuf::from(v)),
        None => default_path(),
    };
    torch_ext::routing::set_store(path);
}

/// `$XDG_CACHE_HOME` (or `~/.cache`) `/flowback/onednn-routing/<cpu model>.txt`.
fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(
        base.join("flowback")
            .join("onednn-routing")
            .join(format!("{}.txt", cpu_slug())),
    )
}

/// The CPU's model name as a file name: "AMD EPYC 9B14" → "amd-epyc-9b14".
pub fn cpu_slug() -> String {
    let mut text = String::new();
    // The first processor's fields come first; 64 KiB is far more than they take.
    let _ = std::fs::File::open("/proc/cpuinfo")
        .and_then(|f| f.take(64 << 10).read_to_string(&mut text));
    slug(cpu_model(&text).unwrap_or("unknown-cpu"))
}

fn cpu_model(cpuinfo: &str) -> Option<&str> {
    cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim())
        })
        .filter(|m| !m.is_empty())
}

fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_model_names_the_file() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14 96-Core Processor\n";
        assert_eq!(
            slug(cpu_model(info).unwrap()),
            "amd-epyc-9b14-96-core-processor"
        );
        assert_eq!(cpu_model("processor : 0\n"), None);
        assert_eq!(
            slug("Intel(R) Xeon(R) CPU @ 2.20GHz"),
            "intel-r-xeon-r-cpu-2-20ghz"
        );
        assert!(!cpu_slug().is_empty());
    }
}
