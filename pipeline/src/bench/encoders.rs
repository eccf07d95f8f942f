//! `pipeline bench encoders`: images per second of the tch vision towers (each family's published base
//! size, 224 px; DINOv2-B by default) and of the SD-VAE encoder (256 px) with random weights, against
//! transformers / diffusers running the same sizes through bench/encoders_reference.py on the same libtorch
//! and thread count, in the same run.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;

use super::reference::{cpu_threads, median, Reference};
use model::frozen::Precision;
use model::vae::{self, AutoencoderKl};
use model::vision::{Family, TowerConfig};
use tch::{nn, Device, Kind, Tensor};

/// The side every vision tower is fed.
const TOWER_INPUT: i64 = 224;

#[derive(clap::Args)]
pub struct Args {
    /// Vision towers to time, comma-separated: dinov2, clip, siglip, mae, ijepa, dinov3, or `all`. Each is
    /// the family's published base size (I-JEPA: its smallest, ViT-H/14) at 224 px
    #[arg(long, default_value = "dinov2")]
    towers: String,
    /// Images per vision-tower batch (the name is from when DINOv2 was the only tower)
    #[arg(long = "dinov2-batch", default_value_t = 4)]
    tower_batch: i64,
    /// Skip the SD-VAE encoder
    #[arg(long)]
    no_vae: bool,
    /// Images per VAE-encoder batch
    #[arg(long, default_value_t = 2)]
    vae_batch: i64,
    /// Run our VAE encoder on NCHW activations (the default on CUDA; the reference is NCHW either way)
    #[arg(long, conflicts_with = "vae_channels_last")]
    vae_nchw: bool,
    /// Run our VAE encoder on channels-last activations (the default on the CPU)
    #[arg(long)]
    vae_channels_last: bool,
    /// Timed batches per model and side, interleaved (the median is reported)
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Untimed batches first
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Intra-op threads for both sides (default: libtorch's default, i.e. the number of cores)
    #[arg(long)]
    threads: Option<i32>,
    /// Python holding torch, transformers and diffusers
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// The reference script
    #[arg(long, default_value = "bench/encoders_reference.py")]
    reference: PathBuf,
}

struct Timing {
    seconds_per_batch: f64,
    images_per_s: f64,
}

impl Timing {
    fn from_median(seconds: Vec<f64>, batch: i64) -> Self {
        let median = median(seconds);
        Timing {
            seconds_per_batch: median,
            images_per_s: batch as f64 / median,
        }
    }
}

#[derive(serde::Deserialize)]
struct Info {
    torch: String,
    threads: i64,
}

/// The parameter count the reference reports for a tower.
#[derive(serde::Deserialize)]
struct Parameters {
    parameters: i64,
}

/// One timed vision tower.
struct TowerRow {
    family: Family,
    describe: String,
    /// "B", "H".
    size: &'static str,
    patch: i64,
    parameters: i64,
    reference_parameters: i64,
    ours: Timing,
    anchor: Timing,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.iters == 0 || args.tower_batch <= 0 || args.vae_batch <= 0 {
        bail!("--iters, --dinov2-batch and --vae-batch must be positive");
    }
    let towers = parse_towers(&args.towers)?;
    let threads = cpu_threads(args.threads);
    // CPU on purpose: the anchor runs on CPU too, and a CPU-vs-CPU ratio is what this machine can check.
    let device = Device::Cpu;
    tch::manual_seed(0);
    let mut reference_args = vec![
        "--threads".to_string(),
        threads.to_string(),
        "--tower-batch".into(),
        args.tower_batch.to_string(),
    ];
    if !args.no_vae {
        reference_args.extend(["--vae-batch".into(), args.vae_batch.to_string()]);
    }
    let mut reference = Reference::start(&args.python, &args.reference, &reference_args)?;
    let info: Info = reference.ask("info")?;

    let pixels = Tensor::randn(
        [args.tower_batch, 3, TOWER_INPUT, TOWER_INPUT],
        (Kind::Float, device),
    );
    let mut rows = Vec::new();
    for family in towers {
        let config = TowerConfig::base(family);
        // One tower at a time on each side: I-JEPA's ViT-H alone is 2.5 GB.
        let vs = nn::VarStore::new(device);
        let mut tower = config.build(vs.root());
        tower.set_precision(Precision::F32);
        randomize(&vs);
        let parameters = vs.variables().values().map(|t| t.numel() as i64).sum();
        let reference_parameters = reference
            .ask::<Parameters>(&format!("params {}", family.name()))?
            .parameters;
        let (ours, anchor) = interleaved(
            &args,
            &mut reference,
            family.name(),
            args.tower_batch,
            || {
                let _ = tower.forward(&pixels).expect("valid input shape");
            },
        )?;
        rows.push(TowerRow {
            family,
            describe: config.describe(),
            size: model::vit::size_name(tower.hidden_size()),
            patch: tower.patch_size(),
            parameters,
            reference_parameters,
            ours,
            anchor,
        });
    }

    let vae = if args.no_vae {
        None
    } else {
        let mut vae_model = vae_random(device);
        if args.vae_nchw || args.vae_channels_last {
            vae_model.channels_last = args.vae_channels_last;
        }
        let images = Tensor::rand([args.vae_batch, 3, 256, 256], (Kind::Float, device)) * 2.0 - 1.0;
        Some(interleaved(
            &args,
            &mut reference,
            "vae",
            args.vae_batch,
            || {
                let _ = vae_model
                    .encode_moments(&images)
                    .expect("valid input shape");
            },
        )?)
    };

    println!(
        "encoders benchmark: CPU, {threads} threads (reference torch {}, {} threads), fp32, random weights, \
         median of {} interleaved batches per side",
        info.torch, info.threads, args.iters
    );
    for row in &rows {
        report(
            &format!(
                "{}-{}/{} {TOWER_INPUT} px",
                row.family.label(),
                row.size,
                row.patch
            ),
            args.tower_batch,
            &row.ours,
            &row.anchor,
            "transformers",
        );
    }
    if let Some((vae, vae_anchor)) = &vae {
        report(
            "SD-VAE encoder 256 px",
            args.vae_batch,
            vae,
            vae_anchor,
            "diffusers",
        );
    }
    print_tower_table(&rows, args.tower_batch);
    Ok(())
}

/// `dinov2,clip` → those families in that order; `all` → every family.
fn parse_towers(list: &str) -> anyhow::Result<Vec<Family>> {
    if list.trim() == "all" {
        return Ok(Family::ALL.to_vec());
    }
    let mut towers = Vec::new();
    for name in list.split(',').map(str::trim) {
        let Some(family) = Family::ALL.into_iter().find(|f| f.name() == name) else {
            let names: Vec<_> = Family::ALL.iter().map(|f| f.name()).collect();
            bail!(
                "--towers: unknown family `{name}` (expected {} or all)",
                names.join(", ")
            );
        };
        if !towers.contains(&family) {
            towers.push(family);
        }
    }
    Ok(towers)
}

/// A Markdown table, one row per tower; our images/s relative to our DINOv2-B when it was timed.
fn print_tower_table(rows: &[TowerRow], batch: i64) {
    let dinov2 = rows
        .iter()
        .find(|r| r.family == Family::Dinov2)
        .map(|r| r.ours.images_per_s);
    println!(
        "\n| family | architecture | parameters (M) | batch | tch img/s | transformers img/s | ratio | vs DINOv2-B |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        let millions = |n: i64| format!("{:.1}", n as f64 / 1e6);
        let mut parameters = millions(r.parameters);
        if parameters != millions(r.reference_parameters) {
            parameters += &format!(" (transformers {})", millions(r.reference_parameters));
        }
        let relative = dinov2.map_or("—".to_string(), |d| {
            format!("{:.2}×", r.ours.images_per_s / d)
        });
        println!(
            "| {} | ViT-{}/{} | {parameters} | {batch} | {:.3} | {:.3} | {:.2}× | {relative} |",
            r.family.label(),
            r.size,
            r.patch,
            r.ours.images_per_s,
            r.anchor.images_per_s,
            r.ours.images_per_s / r.anchor.images_per_s,
        );
    }
    for r in rows {
        println!("{}: {}", r.family.label(), r.describe);
    }
}

/// Warms both sides up, then alternates one tch batch and one reference batch, so that load from
/// other processes falls on both alike.
fn interleaved(
    args: &Args,
    reference: &mut Reference,
    model: &str,
    batch: i64,
    mut ours: impl FnMut(),
) -> anyhow::Result<(Timing, Timing)> {
    for _ in 0..args.warmup {
        ours();
        reference.measure(model)?;
    }
    let (mut tch_seconds, mut anchor_seconds) = (Vec::new(), Vec::new());
    for _ in 0..args.iters {
        let start = Instant::now();
        ours();
        tch_seconds.push(start.elapsed().as_secs_f64());
        anchor_seconds.push(reference.measure(model)?.0);
    }
    Ok((
        Timing::from_median(tch_seconds, batch),
        Timing::from_median(anchor_seconds, batch),
    ))
}

fn report(name: &str, batch: i64, ours: &Timing, anchor: &Timing, anchor_name: &str) {
    println!(
        "{name}, batch {batch}: tch {:.3} img/s ({:.3} s/batch), {anchor_name} {:.3} img/s ({:.3} s/batch), ratio {:.2}x",
        ours.images_per_s,
        ours.seconds_per_batch,
        anchor.images_per_s,
        anchor.seconds_per_batch,
        ours.images_per_s / anchor.images_per_s
    );
}

/// Random weights: speed does not depend on the values, and there is nothing to download. Norm scales 1,
/// biases 0 and the rest N(0, 0.02²), as transformers initialises, so activations stay far from denormals.
fn randomize(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            if name.ends_with("bias") {
                let _ = var.zero_();
            } else if var.dim() == 1 && name.ends_with("weight") {
                let _ = var.fill_(1.0);
            } else {
                var.copy_(&(Tensor::randn_like(&var) * 0.02));
            }
        }
    });
}

fn vae_random(device: Device) -> AutoencoderKl {
    let vs = nn::VarStore::new(device);
    let mut model = AutoencoderKl::new(
        vs.root(),
        &vae::Config::sd_vae(),
        vae::AttentionNaming::Current,
    );
    model.precision = Precision::F32;
    randomize(&vs);
    model
}
