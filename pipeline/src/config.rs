//! Run configuration: a TOML preset parsed into typed sections, with `--set section.key=value`
//! overrides. Unknown keys are errors that name the key and the file, because a misspelt key that is
//! silently ignored costs a training run.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// The preset used when no `--config` is given: tiny settings for demo data on a CPU.
pub const DEMO_PRESET: &str = include_str!("../../configs/demo.toml");

/// Sections nest as the crates do: `[data]` belongs to `stages`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub data: stages::config::DataConfig,
    pub precompute: crate::precompute::PrecomputeConfig,
    /// The flow (`model::tarflow::Config`); `pipeline train` builds it.
    pub model: model::tarflow::Config,
    /// Representation alignment (`mode = "none"` trains the plain NLL without a projector).
    pub align: model::tarflow::align::AlignConfig,
    /// The training loop.
    pub train: crate::train::TrainConfig,
}

/// The configuration flags every job subcommand takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// TOML config file (default: the embedded demo preset, configs/demo.toml)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. `--set data.seed=3` or `--set data.shards='/data/x-{0..9}.tar'`; repeatable
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
}

/// A parsed configuration with the text of its effective form, which is printed at start and written
/// next to every output.
pub struct Loaded {
    pub config: Config,
    pub effective_toml: String,
    pub source: String,
}

impl ConfigArgs {
    pub fn load(&self) -> anyhow::Result<Loaded> {
        let (text, source) = match &self.config {
            Some(path) => (
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading config {}", path.display()))?,
                path.display().to_string(),
            ),
            None => (
                DEMO_PRESET.to_string(),
                "embedded configs/demo.toml".to_string(),
            ),
        };
        load_str(&text, &source, &self.overrides)
    }
}

pub fn load_str(text: &str, source: &str, overrides: &[String]) -> anyhow::Result<Loaded> {
    let mut table: toml::Table =
        toml::from_str(text).with_context(|| format!("config {source}"))?;
    // Checked before the overrides so that an unknown key is blamed on the file that holds it.
    Config::deserialize(toml::Value::Table(table.clone()))
        .map_err(|e| anyhow::anyhow!("config {source}: {e}"))?;
    for item in overrides {
        apply_override(&mut table, item)?;
    }
    let config = Config::deserialize(toml::Value::Table(table))
        .map_err(|e| anyhow::anyhow!("config {source} with --set {}: {e}", overrides.join(" ")))?;
    let effective_toml =
        toml::to_string_pretty(&config).context("serialising the effective config")?;
    Ok(Loaded {
        config,
        effective_toml,
        source: source.to_string(),
    })
}

/// Applies `section.key=value`. The value is read as a TOML value (`3`, `true`, `[1, 2]`, `"x"`) and
/// falls back to a plain string, so shard specs need no quoting.
fn apply_override(table: &mut toml::Table, item: &str) -> anyhow::Result<()> {
    let Some((key, raw)) = item.split_once('=') else {
        bail!("--set {item}: expected SECTION.KEY=VALUE");
    };
    let path: Vec<&str> = key.trim().split('.').collect();
    if path.iter().any(|p| p.is_empty()) {
        bail!("--set {item}: empty key segment");
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let (last, parents) = path.split_last().expect("non-empty");
    let mut node = table;
    for segment in parents {
        let entry = node
            .entry(segment.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry
            .as_table_mut()
            .with_context(|| format!("--set {item}: `{segment}` is not a section"))?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

impl Loaded {
    /// Logs the effective configuration; every job calls this first.
    pub fn announce(&self) {
        tracing::info!("config from {}:\n{}", self.source, self.effective_toml);
    }

    /// Writes `config.toml` into an output directory (atomically).
    pub fn write_next_to(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("config.toml");
        stages::atomic::write_bytes_atomic(&path, self.effective_toml.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_preset_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                load_str(&text, &path.display().to_string(), &[])
                    .unwrap_or_else(|e| panic!("{e:#}"));
                n += 1;
            }
        }
        assert!(n >= 1);
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let err = load_str("[data]\nseed = 1\nshardz = 'x'\n", "my.toml", &[])
            .err()
            .unwrap();
        let msg = format!("{err:#}");
        assert!(msg.contains("shardz") && msg.contains("my.toml"), "{msg}");
        let err = load_str("[dta]\n", "my.toml", &[]).err().unwrap();
        assert!(format!("{err:#}").contains("dta"), "{err:#}");
    }

    #[test]
    fn set_overrides_typed_values_and_strings() {
        let sets = [
            "data.seed=7".to_string(),
            "data.shards=/d/x-{0..3}.tar".to_string(),
        ];
        let loaded = load_str("[data]\nseed = 1\n", "p.toml", &sets).unwrap();
        assert_eq!(loaded.config.data.seed, 7);
        assert_eq!(loaded.config.data.shards, "/d/x-{0..3}.tar");
        let err = load_str("", "p.toml", &["data.sed=3".into()])
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("sed"), "{err:#}");
        assert!(load_str("", "p.toml", &["data.seed=notanumber".into()]).is_err());
    }
}
