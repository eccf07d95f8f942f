//! `pipeline encoders check`: loads the frozen vision encoder (any family `model::vision` reads) and SD-VAE folders the
//! configs point at, prints what was found (family, architecture, token width and grid, parameter
//! count, fingerprint) and runs one forward on a generated image, so a download can be verified before
//! a long precompute is started on it.

pub mod init;
pub mod vae_fit;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use model::vae::{self, AutoencoderKl};
use model::vision::VisionEncoder;
use tch::{Device, Kind, Tensor};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Load the encoder and/or VAE folders, print architecture, parameters and fingerprint, run one forward
    Check(CheckArgs),
    /// Write random-init vision towers (any family) and AutoencoderKL folders (Hugging Face layout) for demos, tests, benchmarks
    Init(crate::encoders::init::Args),
}

#[derive(clap::Args)]
struct CheckArgs {
    /// Vision encoder folder from Hugging Face (`config.json` + `model.safetensors`), its family told by
    /// `model_type`: DINOv2 (facebook/dinov2-base), CLIP (openai/clip-vit-base-patch16), SigLIP / SigLIP 2
    /// (google/siglip-base-patch16-224), MAE (facebook/vit-mae-base), I-JEPA (facebook/ijepa_vith14_1k)
    /// or DINOv3 (facebook/dinov3-vitb16-pretrain-lvd1689m)
    #[arg(long)]
    encoder: Option<PathBuf>,
    /// Side the encoder sees, in pixels (precompute.encoder_input_size); default 224 for DINOv2, the
    /// config's image_size for the other families
    #[arg(long)]
    encoder_input_size: Option<i64>,
    /// AutoencoderKL folder (`config.json` + `diffusion_pytorch_model.safetensors`), e.g. stabilityai/sd-vae-ft-ema
    #[arg(long)]
    vae: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// Side of the generated test image in pixels (the encoder resizes it to its input size; the VAE
    /// takes it as is)
    #[arg(long, default_value_t = 256)]
    image_size: i64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Check(args) => check(args),
        Command::Init(args) => crate::encoders::init::run(args),
    }
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    if args.encoder.is_none() && args.vae.is_none() {
        bail!("nothing to check: pass --encoder DIR and/or --vae DIR");
    }
    if args.image_size < 8 {
        bail!("--image-size {} is too small (at least 8)", args.image_size);
    }
    let device = model::device::parse_device(&args.device)?;
    let image = generated_image(args.image_size, device);
    if let Some(dir) = &args.encoder {
        check_encoder(dir, device, &image, args.encoder_input_size)
            .with_context(|| format!("checking encoder {}", dir.display()))?;
    }
    if let Some(dir) = &args.vae {
        check_vae(dir, device, &image)
            .with_context(|| format!("checking VAE {}", dir.display()))?;
    }
    Ok(())
}

fn check_encoder(
    dir: &Path,
    device: Device,
    image: &Tensor,
    input_size: Option<i64>,
) -> anyhow::Result<()> {
    let encoder = VisionEncoder::from_folder(dir, device)?;
    let size = input_size.unwrap_or_else(|| encoder.default_input_size());
    if size < encoder.patch_size() {
        bail!(
            "--encoder-input-size {size} is smaller than the patch size {}",
            encoder.patch_size()
        );
    }
    let grid = encoder.grid(size);
    println!("encoder: {}", dir.display());
    println!("  family: {}", encoder.family().name());
    println!("  architecture: {}", encoder.describe());
    println!(
        "  tokens: width {}, grid {grid}x{grid} ({} tokens) at {size} px",
        encoder.hidden_size(),
        grid * grid
    );
    println!("  parameters: {}", encoder.parameters());
    println!("  fingerprint: {}", encoder.fingerprint()?);
    println!(
        "  device: {device:?}, precision {}",
        encoder.precision().name()
    );
    let start = Instant::now();
    let tokens = encoder.patch_tokens(image, size)?;
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "  forward: generated {0}x{0} image -> {1}x{1} input -> patch tokens {2:?} ({3}) in {seconds:.3} s",
        image.size()[2],
        size,
        tokens.size(),
        summary(&tokens)?,
    );
    Ok(())
}

fn check_vae(dir: &Path, device: Device, image: &Tensor) -> anyhow::Result<()> {
    let loaded = AutoencoderKl::from_folder(dir, device)?;
    println!("vae: {}", dir.display());
    println!(
        "  architecture: {}",
        loaded.model.config.describe(loaded.naming)
    );
    println!("  parameters: {}", loaded.parameters);
    println!("  fingerprint: {}", loaded.fingerprint()?);
    println!(
        "  device: {device:?}, precision {}",
        loaded.model.precision.name()
    );
    let input = vae::prepare_input(image)?;
    let start = Instant::now();
    let (mean, logvar) = loaded.model.encode_moments(&input)?;
    let encode_s = start.elapsed().as_secs_f64();
    println!(
        "  encode: image {:?} -> posterior mean {:?} ({}), logvar ({}) in {encode_s:.3} s",
        input.size(),
        mean.size(),
        summary(&mean)?,
        summary(&logvar)?,
    );
    let start = Instant::now();
    let decoded = loaded.model.decode(&mean)?;
    let decode_s = start.elapsed().as_secs_f64();
    let rmse = (&decoded - &input)
        .square()
        .mean(Kind::Float)
        .sqrt()
        .double_value(&[]);
    println!(
        "  decode: posterior mean -> decoded {:?} ({}), RMSE to the input {rmse:.4} in {decode_s:.3} s",
        decoded.size(),
        summary(&decoded)?,
    );
    Ok(())
}

/// "mean 0.012, std 0.981"; fails on NaN or infinity, which a broken download or dtype produces.
fn summary(t: &Tensor) -> anyhow::Result<String> {
    let t = t.to_kind(Kind::Double);
    if !bool::try_from(t.isfinite().all())? {
        bail!("output has NaN or infinite values");
    }
    Ok(format!(
        "mean {:.4}, std {:.4}",
        t.mean(Kind::Double).double_value(&[]),
        t.std(true).double_value(&[])
    ))
}

/// A smooth, deterministic uint8 test image (1, 3, S, S): horizontal and vertical ramps and rings, so
/// the encoders see structure at every scale rather than noise.
fn generated_image(size: i64, device: Device) -> Tensor {
    let ramp = Tensor::arange(size, (Kind::Float, Device::Cpu)) / (size - 1) as f64;
    let x = ramp.view([1, size]).expand([size, size], true);
    let y = ramp.view([size, 1]).expand([size, size], true);
    let radius = ((&x - 0.5).square() + (&y - 0.5).square()).sqrt();
    let rings = (radius * 40.0).sin() * 0.5 + 0.5;
    let rgb = Tensor::stack(&[x, y, rings], 0) * 255.0;
    rgb.round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .unsqueeze(0)
        .to_device(device)
}
