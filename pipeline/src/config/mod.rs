//! Run configuration: a TOML preset parsed into typed sections, with `--set section.key=value`
//! overrides. Unknown keys are errors that name the key and the file, because a misspelt key that is
//! silently ignored costs a training run.

mod precompute;
pub mod solver;
mod train;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

pub use precompute::{FeatureDType, LatentDType, PrecomputeConfig};
pub use train::{Features, TrainConfig};

/// The preset used when no `--config` is given: tiny settings for demo data on a CPU.
pub const DEMO_PRESET: &str = include_str!("../../../configs/demo.toml");

/// Sections nest as the crates do: `[data]` belongs to `stages`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub data: stages::config::DataConfig,
    pub precompute: PrecomputeConfig,
    /// The flow (`model::tarflow::Config`); `pipeline train` builds it.
    pub model: model::tarflow::Config,
    /// Representation alignment (`mode = "none"` trains the plain NLL without a projector).
    pub align: model::tarflow::align::AlignConfig,
    /// The training loop.
    pub train: TrainConfig,
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

/// Downsampling of the Stable Diffusion VAE the latent presets name (`sd-vae-ft-ema`).
pub const SD_VAE_DOWNSAMPLE: usize = 8;

impl Config {
    /// What a preset must hold to train from source shards as shipped, given only the paths: the
    /// crop the flow's input is made from, what the cache must store for it (crops for a pixel flow,
    /// VAE moments for a latent one, encoder tokens for the alignment), a valid flow and alignment.
    /// Latent sizes assume the SD VAE's ×8 downsampling.
    pub fn check_runnable(&self) -> anyhow::Result<()> {
        let (m, d, p, a) = (&self.model, &self.data, &self.precompute, &self.align);
        // The checks each job makes on its sections, so that `config --check` refuses what the job would.
        m.validate()?;
        d.validate()?;
        p.validate()?;
        self.train.validate()?;
        let img = m.img_size as usize;
        if self.train.latent {
            if m.in_channels != 4 || d.image_size != img * SD_VAE_DOWNSAMPLE {
                bail!(
                    "a latent flow of {}×{img}×{img} needs 4 channels and data.image_size = {} (the VAE downsamples ×{SD_VAE_DOWNSAMPLE}), got data.image_size = {}",
                    m.in_channels,
                    img * SD_VAE_DOWNSAMPLE,
                    d.image_size
                );
            }
            if p.vae_dir().is_none() {
                bail!("a latent flow trains on VAE moments: set precompute.vae");
            }
        } else {
            if m.in_channels != 3 || d.image_size != img {
                bail!(
                    "a pixel flow of {}×{img}×{img} needs 3 channels and data.image_size = {img}, got data.image_size = {}",
                    m.in_channels,
                    d.image_size
                );
            }
            if !p.store_image {
                bail!("a pixel flow trains on cached crops: set precompute.store_image = true");
            }
        }
        if a.mode != model::tarflow::align::AlignMode::None {
            if !(a.lambda.is_finite() && a.lambda >= 0.0) {
                bail!("align.lambda = {}: must be a number ≥ 0", a.lambda);
            }
            if a.projector_hidden <= 0 || a.encoder_dim <= 0 {
                bail!(
                    "align.projector_hidden = {} and align.encoder_dim = {}: both must be at least 1",
                    a.projector_hidden,
                    a.encoder_dim
                );
            }
            if a.locations.is_empty() {
                bail!("align.locations is empty: give at least one [block, layer] (or align.mode = \"none\")");
            }
            if p.encoder_dir().is_none() {
                bail!("alignment needs encoder tokens: set precompute.encoder (or align.mode = \"none\")");
            }
            let tokens = a.target_tokens(m.num_tokens())?;
            a.locations0(m)?;
            // What the encoder gives at precompute.encoder_input_size must be what the flow aligns to
            // (checked when the encoder folder can be read: its config has the family, patch size and
            // width).
            // An unreadable folder is skipped: the config may name a path on another machine, and
            // precompute reports an unreadable folder itself.
            if let Some(enc) = p
                .encoder_dir()
                .and_then(|dir| model::vision::Shape::of_folder(dir).ok())
            {
                let (patch, label) = (enc.patch_size, enc.label());
                let grid = p.encoder_input_size / patch;
                if grid * patch != p.encoder_input_size || grid * grid != tokens {
                    let side = (tokens as f64).sqrt().round() as i64;
                    bail!(
                    "the flow aligns to {tokens} encoder tokens, but {label} at precompute.encoder_input_size = {} gives {}: {}",
                    p.encoder_input_size,
                    grid * grid,
                    {
                        // Pooling flow tokens needs the flow's grid to be a whole multiple of the
                        // encoder's; an input size giving the aligned grid always works.
                        let flow_side = (m.num_tokens() as f64).sqrt().round() as i64;
                        let pool = grid > 0 && grid <= flow_side && flow_side % grid == 0
                            && a.token_match != model::tarflow::align::TokenMatch::EncoderResize;
                        format!(
                            "set precompute.encoder_input_size = {}{}",
                            side * patch,
                            if pool {
                                format!(
                                    " (or align.encoder_tokens = {} with align.token_match = \"pool\")",
                                    grid * grid
                                )
                            } else {
                                String::new()
                            }
                        )
                    }
                );
                }
                if enc.hidden_size != a.encoder_dim {
                    bail!(
                        "align.encoder_dim = {}, but {label} gives {}-wide tokens: set align.encoder_dim = {}",
                        a.encoder_dim,
                        enc.hidden_size,
                        enc.hidden_size
                    );
                }
            }
        }
        Ok(())
    }
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

    fn shipped_presets() -> Vec<(String, Config)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut presets: Vec<(String, Config)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .map(|path| {
                let text = std::fs::read_to_string(&path).unwrap();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                let config = load_str(&text, &path.display().to_string(), &[]);
                (name, config.unwrap().config)
            })
            .collect();
        presets.sort_by(|a, b| a.0.cmp(&b.0));
        presets
    }

    #[test]
    fn every_shipped_preset_is_runnable_as_shipped() {
        let presets = shipped_presets();
        let names: Vec<&str> = presets.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "demo.toml",
                "imagenet256-latent-p1.toml",
                "imagenet256-latent.toml",
                "imagenet64.toml"
            ]
        );
        for (name, cfg) in &presets {
            cfg.check_runnable()
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            // The no-alignment baselines are the same presets with one override.
            let mut plain = cfg.clone();
            plain.align.mode = model::tarflow::align::AlignMode::None;
            plain.precompute.encoder.clear();
            plain
                .check_runnable()
                .unwrap_or_else(|e| panic!("{name} with align.mode = none: {e:#}"));
        }
        // The paper's crop for the ImageNet runs (TARFlow's), where the demo keeps ADM's.
        for (name, cfg) in presets.iter().filter(|p| p.0.starts_with("imagenet")) {
            assert_eq!(
                cfg.data.crop,
                stages::crop::CropMode::ResizeCenterCrop,
                "{name}"
            );
        }
    }

    #[test]
    fn a_preset_that_cannot_run_is_refused_with_the_key_to_set() {
        let base = load_str(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/imagenet64.toml"),
            )
            .unwrap(),
            "imagenet64.toml",
            &[],
        )
        .unwrap()
        .config;
        let refused = |edit: &dyn Fn(&mut Config), needle: &str| {
            let mut c = base.clone();
            edit(&mut c);
            let e = format!("{:#}", c.check_runnable().unwrap_err());
            assert!(e.contains(needle), "{needle}: {e}");
        };
        // The first shipped imagenet64 preset: 256-px crops for a 64-px flow, no cached crops.
        refused(&|c| c.data.image_size = 256, "data.image_size = 64");
        refused(&|c| c.precompute.store_image = false, "store_image");
        refused(&|c| c.precompute.encoder.clear(), "precompute.encoder");
        refused(&|c| c.align.locations = vec![[9, 1]], "(9, 1)");
        refused(&|c| c.align.lambda = -1.0, "align.lambda");
        refused(&|c| c.align.locations.clear(), "align.locations");
        refused(&|c| c.train.ema_decay = 2.0, "train.ema_decay");
        // A latent flow without a VAE, and a patch-1 flow aligned without token matching.
        refused(
            &|c| {
                c.train.latent = true;
                c.model.in_channels = 4;
                c.model.img_size = 32;
                c.data.image_size = 256;
            },
            "precompute.vae",
        );
        refused(
            &|c| {
                c.model.patch_size = 1;
                c.align.encoder_tokens = 256;
            },
            "token_match",
        );
    }

    /// A patch-1 latent flow (32×32 tokens) meets DINOv2-B/14 either by pooling onto its 16×16 grid at
    /// 224 px or by running DINOv2 at 448 px; a size that gives another grid is refused with the fix.
    #[test]
    fn encoder_resize_needs_the_input_size_that_gives_the_flows_grid() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "dinov2", "hidden_size": 768, "patch_size": 14, "image_size": 518}"#,
        )
        .unwrap();
        let preset =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/imagenet256-latent-p1.toml");
        let text = std::fs::read_to_string(&preset).unwrap();
        let with = |sets: &[&str]| {
            let mut all = vec![format!(
                "precompute.encoder={:?}",
                dir.path().display().to_string()
            )];
            all.extend(sets.iter().map(|s| s.to_string()));
            load_str(&text, "p1", &all).unwrap().config.check_runnable()
        };
        with(&[]).unwrap();
        let resize = [
            "align.token_match=\"encoder_resize\"",
            "align.encoder_tokens=0",
        ];
        let e = format!("{:#}", with(&resize).unwrap_err());
        assert!(e.contains("precompute.encoder_input_size = 448"), "{e}");
        with(&[&resize[..], &["precompute.encoder_input_size=448"]].concat()).unwrap();
        // Pooling with a cache made at 448 px is refused too: the encoder would give 1024 tokens.
        let e = format!(
            "{:#}",
            with(&["precompute.encoder_input_size=448"]).unwrap_err()
        );
        assert!(e.contains("align.encoder_tokens = 1024"), "{e}");
    }

    /// A CLIP folder is read for its own patch size and width: ViT-L/14 at 224 px gives the 16×16
    /// grid of a patch-2 latent flow but 1024-wide tokens; ViT-B/16 (a full `CLIPConfig`) gives 14×14 at 224 px
    /// and 16×16 at 256.
    #[test]
    fn a_clip_encoder_is_checked_with_its_own_grid_and_width() {
        let preset =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/imagenet256-latent.toml");
        let text = std::fs::read_to_string(&preset).unwrap();
        let check = |config_json: &str, sets: &[&str]| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("config.json"), config_json).unwrap();
            let mut all = vec![format!(
                "precompute.encoder={:?}",
                dir.path().display().to_string()
            )];
            all.extend(sets.iter().map(|s| s.to_string()));
            load_str(&text, "latent", &all)
                .unwrap()
                .config
                .check_runnable()
                .map_err(|e| format!("{e:#}"))
        };
        let large = r#"{"model_type": "clip_vision_model", "hidden_size": 1024,
            "num_attention_heads": 16, "patch_size": 14, "image_size": 224}"#;
        let e = check(large, &[]).unwrap_err();
        assert!(
            e.contains("CLIP/14") && e.contains("set align.encoder_dim = 1024"),
            "{e}"
        );
        check(large, &["align.encoder_dim=1024"]).unwrap();
        let base = r#"{"model_type": "clip", "vision_config": {"model_type": "clip_vision_model",
            "hidden_size": 768, "patch_size": 16, "image_size": 224}}"#;
        // 14×14 cannot pool the flow's 16×16: only the input size is offered.
        let e = check(base, &[]).unwrap_err();
        assert!(
            e.contains("CLIP/16")
                && e.contains("set precompute.encoder_input_size = 256")
                && !e.contains("pool"),
            "{e}"
        );
        // At 256 px CLIP/16 gives the flow's 16×16 grid.
        check(base, &["precompute.encoder_input_size=256"]).unwrap();
    }

    /// Each preset's flow and alignment built and run once on the shapes its cache holds, with the
    /// width shrunk (`model.channels = 64`, `head_dim = 32`, `align.projector_hidden = 32`) so that
    /// the test fits a CPU; blocks, layers, patches, tokens and locations are the preset's.
    #[test]
    fn every_shipped_preset_builds_its_flow_and_alignment() {
        use model::tarflow::align::AlignHead;
        use model::tarflow::Model;
        use tch::{nn, Device, Kind, Tensor};
        for (name, cfg) in shipped_presets() {
            let mut m = cfg.model.clone();
            (m.channels, m.head_dim) = (64, 32);
            let mut a = cfg.align.clone();
            a.projector_hidden = 32;
            let vs = nn::VarStore::new(Device::Cpu);
            let flow = Model::new(vs.root(), &m).unwrap_or_else(|e| panic!("{name}: {e}"));
            let head_vs = nn::VarStore::new(Device::Cpu);
            let head = AlignHead::new(head_vs.root(), &a, &flow).unwrap();
            let x = Tensor::randn(
                [2, m.in_channels, m.img_size, m.img_size],
                (Kind::Float, Device::Cpu),
            );
            let y = Tensor::from_slice(&[0i64, m.num_classes.max(1) - 1]);
            let cond = model::tarflow::Cond::Labels(&y);
            let out = flow.forward(&x, &cond, &head.forward_capture());
            let tokens = a.target_tokens(m.num_tokens()).unwrap();
            let target = Tensor::randn([2, tokens, a.encoder_dim], (Kind::Float, Device::Cpu));
            let loss = head
                .loss(&flow, &out, &cond, &target)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .double_value(&[]);
            assert!(loss.is_finite() && loss.abs() <= 1.0, "{name}: {loss}");
        }
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
