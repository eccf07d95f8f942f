//! The Stable Diffusion VAE (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
//! Models"), as diffusers' `AutoencoderKL`, frozen: encoder → posterior moments, decoder → image.
//!
//! Reference: diffusers 0.42 `models/autoencoders/autoencoder_kl.py` and `models/autoencoders/vae.py`
//! (Encoder, Decoder), `models/unets/unet_2d_blocks.py` (DownEncoderBlock2D, UpDecoderBlock2D,
//! UNetMidBlock2D), `models/resnet.py` (ResnetBlock2D, Downsample2D, Upsample2D). Checkpoints:
//! `stabilityai/sd-vae-ft-ema` and `stabilityai/sd-vae-ft-mse`, read from a folder holding `config.json`
//! and `diffusion_pytorch_model.safetensors`. Variable names are the checkpoint's
//! (`encoder.down_blocks.{i}.resnets.{j}.norm1`, ...), so loading is a strict name-for-name copy.

use std::path::{Path, PathBuf};

use tch::{nn, Device, Kind, Tensor};

use crate::frozen::{self, silu_, Conv2d, EncoderError, GroupNorm, Linear, Precision};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
/// Every norm in the diffusers VAE uses this epsilon (`resnet_eps=1e-6`, `conv_norm_out` eps 1e-6).
const NORM_EPS: f64 = 1e-6;
/// diffusers `DiagonalGaussianDistribution` clamps the log-variance to this range.
const LOGVAR_RANGE: (f64, f64) = (-30.0, 20.0);

/// The two namings of the mid-block attention found in published files. The current diffusers names
/// are what `save_pretrained` writes today; the sd-vae-ft-{ema,mse} files predate them. This table is
/// the only place the two namings differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionNaming {
    /// `to_q`, `to_k`, `to_v`, `to_out.0`
    Current,
    /// `query`, `key`, `value`, `proj_attn`
    Legacy,
}

impl AttentionNaming {
    /// Path segments of (q, k, v, out) under the attention block.
    fn names(self) -> [&'static [&'static str]; 4] {
        match self {
            AttentionNaming::Current => [&["to_q"], &["to_k"], &["to_v"], &["to_out", "0"]],
            AttentionNaming::Legacy => [&["query"], &["key"], &["value"], &["proj_attn"]],
        }
    }

    /// Detects the naming from the tensor names of a file: legacy when the encoder's mid-block
    /// attention has a `query` projection.
    pub fn detect<'a>(mut names: impl Iterator<Item = &'a String>) -> Self {
        if names.any(|n| n.ends_with(".attentions.0.query.weight")) {
            AttentionNaming::Legacy
        } else {
            AttentionNaming::Current
        }
    }
}

/// The fields of a diffusers `AutoencoderKL` config that change the computation; defaults are
/// diffusers'. Unknown keys (`_class_name`, `_diffusers_version`, `sample_size` ...) are accepted: this
/// is Hugging Face's file, not one of ours.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Config {
    #[serde(default = "default_channels")]
    pub in_channels: i64,
    #[serde(default = "default_channels")]
    pub out_channels: i64,
    #[serde(default = "default_down_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: i64,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: i64,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: i64,
    /// Latent scale applied after sampling the posterior (0.18215 for SD 1.x VAEs).
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn default_channels() -> i64 {
    3
}
fn default_down_blocks() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up_blocks() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn default_block_out_channels() -> Vec<i64> {
    vec![64]
}
fn default_layers_per_block() -> i64 {
    1
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_latent_channels() -> i64 {
    4
}
fn default_norm_num_groups() -> i64 {
    32
}
/// diffusers' `AutoencoderKL` default, which the sd-vae-ft-* configs rely on (they have no such key).
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

impl Config {
    /// `stabilityai/sd-vae-ft-ema` (and `-mse`) as published: 4 levels of 128/256/512/512 channels,
    /// 4 latent channels, downsample 8.
    pub fn sd_vae() -> Self {
        Config {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            act_fn: default_act_fn(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: default_scaling_factor(),
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, EncoderError> {
        let cfg: Config = frozen::read_json_config(path)?;
        cfg.validate().map_err(|message| EncoderError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "block_out_channels ({n}), down_block_types ({}) and up_block_types ({}) must have the same non-zero length",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(format!(
                "down block type `{t}` is not supported (only DownEncoderBlock2D)"
            ));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return Err(format!(
                "up block type `{t}` is not supported (only UpDecoderBlock2D)"
            ));
        }
        if self.act_fn != "silu" {
            return Err(format!(
                "act_fn `{}` is not supported (the SD VAE uses silu)",
                self.act_fn
            ));
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| **c <= 0 || **c % self.norm_num_groups != 0)
        {
            return Err(format!(
                "block channels {c} are not a positive multiple of norm_num_groups {}",
                self.norm_num_groups
            ));
        }
        if self.scaling_factor == 0.0 {
            return Err("scaling_factor is 0".into());
        }
        Ok(())
    }

    /// Pixels per latent pixel (8 for the SD VAE).
    pub fn downsample_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }

    pub fn describe(&self, naming: AttentionNaming) -> String {
        format!(
            "AutoencoderKL, blocks {:?}, {} resnets per encoder block, {} latent channels, downsample {}, \
             scaling factor {}{}, mid-block attention {} ({:?} names)",
            self.block_out_channels,
            self.layers_per_block,
            self.latent_channels,
            self.downsample_factor(),
            self.scaling_factor,
            self.shift_factor.map(|s| format!(", shift {s}")).unwrap_or_default(),
            if self.mid_block_add_attention { "on" } else { "off" },
            naming,
        )
    }
}

/// uint8 images (B, 3, H, W) → float32 in [−1, 1] as REPA's VAE preprocessing does (x / 127.5 − 1).
pub fn prepare_input(images: &Tensor) -> Result<Tensor, EncoderError> {
    frozen::check_image_batch("VAE preprocessing", images, 3, 1)?;
    if images.kind() != Kind::Uint8 {
        return Err(EncoderError::Input {
            model: "VAE preprocessing",
            message: format!("expected uint8 images, got {:?}", images.kind()),
        });
    }
    Ok(images.to_kind(Kind::Float) / 127.5 - 1.0)
}

/// A frozen AutoencoderKL.
#[derive(Debug)]
pub struct AutoencoderKl {
    pub config: Config,
    encoder: Encoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
    pub precision: Precision,
    /// Run the convolutions on channels-last (NHWC-strided) activations: the input is restrided once
    /// and every layer keeps the layout on the CPU (convolutions, group norms, SiLU, upsampling and the
    /// mid-block attention's token view all accept it). Same numbers up to summation order. See
    /// [`channels_last_default`].
    pub channels_last: bool,
}

/// The layout [`AutoencoderKl::new`] picks: channels-last on the CPU, 1.27× the NCHW rate of the
/// SD-VAE encoder on this CPU (BENCHMARKS, issue 18). NCHW on CUDA: ATen's CUDA group norm takes
/// contiguous (NCHW) input only, so every norm would copy its channels-last input to NCHW and hand NCHW
/// on, an extra copy of each feature map for a layout the next convolution no longer sees.
pub fn channels_last_default(device: Device) -> bool {
    !device.is_cuda()
}

/// The same (B, C, H, W) tensor with channels-last strides.
pub fn to_channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

impl AutoencoderKl {
    /// Builds the network with zero-initialised variables under `p`, with the given attention naming.
    pub fn new(p: nn::Path, config: &Config, naming: AttentionNaming) -> Self {
        let latent = config.latent_channels;
        AutoencoderKl {
            config: config.clone(),
            encoder: Encoder::new(&p / "encoder", config, naming),
            quant_conv: config
                .use_quant_conv
                .then(|| Conv2d::new(&p / "quant_conv", 2 * latent, 2 * latent, 1, 1, 0)),
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| Conv2d::new(&p / "post_quant_conv", latent, latent, 1, 1, 0)),
            decoder: Decoder::new(&p / "decoder", config, naming),
            precision: Precision::for_device(p.device()),
            channels_last: channels_last_default(p.device()),
        }
    }

    /// Loads `config.json` + `diffusion_pytorch_model.safetensors` from a diffusers folder, strictly,
    /// in whichever attention naming the file uses.
    pub fn from_folder(dir: &Path, device: Device) -> Result<LoadedVae, EncoderError> {
        let config_path = dir.join(CONFIG_FILE);
        let weights_path = dir.join(WEIGHTS_FILE);
        let config = Config::from_file(&config_path)?;
        let tensors = crate::weights::read_safetensors(&weights_path)?;
        let naming = AttentionNaming::detect(tensors.keys());
        let mut vs = nn::VarStore::new(device);
        let model = AutoencoderKl::new(vs.root(), &config, naming);
        crate::weights::load_into(&mut vs, &tensors, &weights_path, &|_| false)?;
        vs.freeze();
        Ok(LoadedVae {
            parameters: frozen::parameter_count(&vs),
            model,
            vs,
            naming,
            config_path,
            weights_path,
        })
    }

    /// Image in [−1, 1] (B, 3, H, W), H and W multiples of the downsample factor → posterior
    /// (mean, logvar), each (B, latent, H/8, W/8) float32. logvar is clamped to [−30, 20] as diffusers
    /// does. Runs under no_grad.
    pub fn encode_moments(&self, images: &Tensor) -> Result<(Tensor, Tensor), EncoderError> {
        frozen::check_image_batch("VAE encoder", images, self.config.in_channels, 1)?;
        let factor = self.config.downsample_factor();
        let (h, w) = (images.size()[2], images.size()[3]);
        if h % factor != 0 || w % factor != 0 {
            return Err(EncoderError::Input {
                model: "VAE encoder",
                message: format!(
                    "image size {h}x{w} is not a multiple of the downsample factor {factor}"
                ),
            });
        }
        Ok(tch::no_grad(|| self.moments(images)))
    }

    fn moments(&self, images: &Tensor) -> (Tensor, Tensor) {
        let images = if self.channels_last {
            to_channels_last(images)
        } else {
            images.shallow_clone()
        };
        let mut moments = self.encoder.forward(images, self.precision);
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments, self.precision);
        }
        let moments = moments.to_kind(Kind::Float);
        let halves = moments.chunk(2, 1);
        (
            halves[0].shallow_clone(),
            halves[1].clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1),
        )
    }

    fn decoded(&self, latents: &Tensor) -> Tensor {
        let latents = if self.channels_last {
            to_channels_last(latents)
        } else {
            latents.shallow_clone()
        };
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(&latents, self.precision),
            None => latents,
        };
        self.decoder.forward(z, self.precision).to_kind(Kind::Float)
    }

    /// One autoencoding pass with gradients, for fitting a small VAE (`encoders init --fit-on`):
    /// images in [−1, 1] → (reconstruction of a posterior sample z = mean + σ·`noise`, mean, logvar).
    /// `noise` has the posterior's shape (B, latent, H/8, W/8).
    pub fn autoencode(&self, images: &Tensor, noise: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (mean, logvar) = self.moments(images);
        let z = &mean + (&logvar * 0.5).exp() * noise;
        (self.decoded(&z), mean, logvar)
    }

    /// Posterior latents (unscaled, B, latent, h, w) → image (B, 3, 8h, 8w) float32, nominally in
    /// [−1, 1]. Not clamped, as diffusers' `decode` does not clamp either. Runs under no_grad.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, EncoderError> {
        frozen::check_image_batch("VAE decoder", latents, self.config.latent_channels, 1)?;
        Ok(tch::no_grad(|| self.decoded(latents)))
    }

    /// Posterior latents → the space diffusion/flow models see: (z − shift) · scaling_factor.
    pub fn scale_latents(&self, latents: &Tensor) -> Tensor {
        (latents - self.config.shift_factor.unwrap_or(0.0)) * self.config.scaling_factor
    }

    /// Inverse of [`Self::scale_latents`], before [`Self::decode`].
    pub fn unscale_latents(&self, scaled: &Tensor) -> Tensor {
        scaled / self.config.scaling_factor + self.config.shift_factor.unwrap_or(0.0)
    }
}

/// A VAE read from a folder, with what cache keys and `encoders check` need.
#[derive(Debug)]
pub struct LoadedVae {
    pub model: AutoencoderKl,
    pub vs: nn::VarStore,
    pub parameters: i64,
    pub naming: AttentionNaming,
    pub config_path: PathBuf,
    pub weights_path: PathBuf,
}

impl LoadedVae {
    /// blake3 of `config.json` and the weights file (see [`frozen::fingerprint_files`]).
    pub fn fingerprint(&self) -> Result<String, EncoderError> {
        frozen::fingerprint_files(&[&self.config_path, &self.weights_path])
    }
}

/// The fingerprint of a VAE folder, without loading it.
pub fn fingerprint(dir: &Path) -> Result<String, EncoderError> {
    frozen::fingerprint_files(&[&dir.join(CONFIG_FILE), &dir.join(WEIGHTS_FILE)])
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(p: nn::Path, cfg: &Config, naming: AttentionNaming) -> Self {
        let channels = &cfg.block_out_channels;
        let last = *channels.last().expect("validated non-empty");
        let g = cfg.norm_num_groups;
        let mut in_ch = channels[0];
        let down_blocks = channels
            .iter()
            .enumerate()
            .map(|(i, &out_ch)| {
                let block = DownBlock::new(
                    &p / "down_blocks" / i,
                    in_ch,
                    out_ch,
                    cfg.layers_per_block,
                    g,
                    i + 1 < channels.len(),
                );
                in_ch = out_ch;
                block
            })
            .collect();
        Encoder {
            conv_in: Conv2d::new(&p / "conv_in", cfg.in_channels, channels[0], 3, 1, 1),
            down_blocks,
            mid_block: MidBlock::new(
                &p / "mid_block",
                last,
                g,
                cfg.mid_block_add_attention,
                naming,
            ),
            conv_norm_out: GroupNorm::new(&p / "conv_norm_out", g, last, NORM_EPS),
            // double_z: mean and logvar.
            conv_out: Conv2d::new(&p / "conv_out", last, 2 * cfg.latent_channels, 3, 1, 1),
        }
    }

    /// Takes the input by value, as every block below does: a block's input is dropped as soon as
    /// the block no longer needs it, so at most three feature maps of a level are alive at once.
    fn forward(&self, x: Tensor, precision: Precision) -> Tensor {
        let mut h = self.conv_in.forward(&x, precision);
        drop(x);
        for block in &self.down_blocks {
            h = block.forward(h, precision);
        }
        let h = self.mid_block.forward(h, precision);
        let n = silu_(self.conv_norm_out.forward(&h, precision));
        drop(h);
        self.conv_out.forward(&n, precision)
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(p: nn::Path, cfg: &Config, naming: AttentionNaming) -> Self {
        let reversed: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let mut in_ch = reversed[0];
        let up_blocks = reversed
            .iter()
            .enumerate()
            .map(|(i, &out_ch)| {
                // The decoder's blocks have one resnet more than the encoder's.
                let block = UpBlock::new(
                    &p / "up_blocks" / i,
                    in_ch,
                    out_ch,
                    cfg.layers_per_block + 1,
                    g,
                    i + 1 < reversed.len(),
                );
                in_ch = out_ch;
                block
            })
            .collect();
        let first = cfg.block_out_channels[0];
        Decoder {
            conv_in: Conv2d::new(&p / "conv_in", cfg.latent_channels, reversed[0], 3, 1, 1),
            mid_block: MidBlock::new(
                &p / "mid_block",
                reversed[0],
                g,
                cfg.mid_block_add_attention,
                naming,
            ),
            up_blocks,
            conv_norm_out: GroupNorm::new(&p / "conv_norm_out", g, first, NORM_EPS),
            conv_out: Conv2d::new(&p / "conv_out", first, cfg.out_channels, 3, 1, 1),
        }
    }

    fn forward(&self, z: Tensor, precision: Precision) -> Tensor {
        let h = self.conv_in.forward(&z, precision);
        drop(z);
        let mut h = self.mid_block.forward(h, precision);
        for block in &self.up_blocks {
            h = block.forward(h, precision);
        }
        let n = silu_(self.conv_norm_out.forward(&h, precision));
        drop(h);
        self.conv_out.forward(&n, precision)
    }
}

/// diffusers `ResnetBlock2D` without time embedding: norm → SiLU → conv, twice, plus a 1×1 shortcut
/// when the channel count changes.
#[derive(Debug)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(p: nn::Path, in_ch: i64, out_ch: i64, groups: i64) -> Self {
        ResnetBlock {
            norm1: GroupNorm::new(&p / "norm1", groups, in_ch, NORM_EPS),
            conv1: Conv2d::new(&p / "conv1", in_ch, out_ch, 3, 1, 1),
            norm2: GroupNorm::new(&p / "norm2", groups, out_ch, NORM_EPS),
            conv2: Conv2d::new(&p / "conv2", out_ch, out_ch, 3, 1, 1),
            conv_shortcut: (in_ch != out_ch)
                .then(|| Conv2d::new(&p / "conv_shortcut", in_ch, out_ch, 1, 1, 0)),
        }
    }

    /// Each intermediate is dropped once the next one exists: with the input, at most three maps of
    /// the block's size are alive (input, normalised, convolved).
    fn forward(&self, x: Tensor, precision: Precision) -> Tensor {
        let h = {
            let n = silu_(self.norm1.forward(&x, precision));
            self.conv1.forward(&n, precision)
        };
        let mut h = {
            let n = silu_(self.norm2.forward(&h, precision));
            drop(h);
            self.conv2.forward(&n, precision)
        };
        let shortcut = match &self.conv_shortcut {
            Some(conv) => {
                let s = conv.forward(&x, precision);
                drop(x);
                s
            }
            None => x,
        };
        // In place on the fresh convolution output (its backward does not need it): no fourth map.
        if h.kind() == shortcut.kind() {
            let _ = h.g_add_(&shortcut);
            h
        } else {
            shortcut + h
        }
    }
}

#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    /// `downsamplers.0.conv`: 3×3 stride 2 after padding right and bottom by one (diffusers
    /// `Downsample2D` with padding 0), not the symmetric padding of a plain strided conv.
    downsample: Option<Conv2d>,
}

impl DownBlock {
    fn new(
        p: nn::Path,
        in_ch: i64,
        out_ch: i64,
        n_resnets: i64,
        groups: i64,
        downsample: bool,
    ) -> Self {
        let resnets = (0..n_resnets)
            .map(|j| {
                ResnetBlock::new(
                    &p / "resnets" / j,
                    if j == 0 { in_ch } else { out_ch },
                    out_ch,
                    groups,
                )
            })
            .collect();
        let downsample = downsample
            .then(|| Conv2d::new(&p / "downsamplers" / 0 / "conv", out_ch, out_ch, 3, 2, 0));
        DownBlock {
            resnets,
            downsample,
        }
    }

    fn forward(&self, x: Tensor, precision: Precision) -> Tensor {
        let mut h = x;
        for resnet in &self.resnets {
            h = resnet.forward(h, precision);
        }
        match &self.downsample {
            Some(conv) => conv.forward(&h.constant_pad_nd([0, 1, 0, 1]), precision),
            None => h,
        }
    }
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    /// `upsamplers.0.conv`: nearest ×2 then a 3×3 conv (diffusers `Upsample2D`).
    upsample: Option<Conv2d>,
}

impl UpBlock {
    fn new(
        p: nn::Path,
        in_ch: i64,
        out_ch: i64,
        n_resnets: i64,
        groups: i64,
        upsample: bool,
    ) -> Self {
        let resnets = (0..n_resnets)
            .map(|j| {
                ResnetBlock::new(
                    &p / "resnets" / j,
                    if j == 0 { in_ch } else { out_ch },
                    out_ch,
                    groups,
                )
            })
            .collect();
        let upsample =
            upsample.then(|| Conv2d::new(&p / "upsamplers" / 0 / "conv", out_ch, out_ch, 3, 1, 1));
        UpBlock { resnets, upsample }
    }

    fn forward(&self, x: Tensor, precision: Precision) -> Tensor {
        let mut h = x;
        for resnet in &self.resnets {
            h = resnet.forward(h, precision);
        }
        match &self.upsample {
            Some(conv) => {
                let (height, width) = (h.size()[2], h.size()[3]);
                // diffusers upcasts bf16 to float32 for nearest upsampling on large batches only; nearest
                // copying is exact in any dtype, so the kind is left as it is.
                let up = h.upsample_nearest2d([2 * height, 2 * width], 2.0, 2.0);
                conv.forward(&up, precision)
            }
            None => h,
        }
    }
}

/// diffusers `UNetMidBlock2D` for the VAE: resnet, then (attention, resnet).
#[derive(Debug)]
struct MidBlock {
    first: ResnetBlock,
    attention: Option<SpatialAttention>,
    second: ResnetBlock,
}

impl MidBlock {
    fn new(
        p: nn::Path,
        channels: i64,
        groups: i64,
        add_attention: bool,
        naming: AttentionNaming,
    ) -> Self {
        MidBlock {
            first: ResnetBlock::new(&p / "resnets" / 0, channels, channels, groups),
            attention: add_attention
                .then(|| SpatialAttention::new(&p / "attentions" / 0, channels, groups, naming)),
            second: ResnetBlock::new(&p / "resnets" / 1, channels, channels, groups),
        }
    }

    fn forward(&self, x: Tensor, precision: Precision) -> Tensor {
        let mut h = self.first.forward(x, precision);
        if let Some(attention) = &self.attention {
            h = attention.forward(&h, precision);
        }
        self.second.forward(h, precision)
    }
}

/// Single-head self-attention over the H·W positions with a residual connection (diffusers `Attention`
/// with `heads = channels / attention_head_dim = 1`, group norm in front, scale channels^−½).
#[derive(Debug)]
struct SpatialAttention {
    group_norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl SpatialAttention {
    fn new(p: nn::Path, channels: i64, groups: i64, naming: AttentionNaming) -> Self {
        let linear = |segments: &[&str]| {
            let sub = segments.iter().fold(p.clone(), |path, s| &path / *s);
            Linear::new(sub, channels, channels, true)
        };
        let [q, k, v, out] = naming.names();
        SpatialAttention {
            group_norm: GroupNorm::new(&p / "group_norm", groups, channels, NORM_EPS),
            q: linear(q),
            k: linear(k),
            v: linear(v),
            out: linear(out),
        }
    }

    fn forward(&self, x: &Tensor, precision: Precision) -> Tensor {
        let (b, c, h, w) = x.size4().expect("4-D feature map");
        // (b, c, h, w) -> (b, 1, h·w, c)
        let tokens = self
            .group_norm
            .forward(x, precision)
            .view([b, c, h * w])
            .transpose(1, 2)
            .unsqueeze(1);
        let q = self.q.forward(&tokens, precision);
        let k = self.k.forward(&tokens, precision);
        let v = self.v.forward(&tokens, precision);
        let scale = (c as f64).powf(-0.5);
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            scale,
            false,
        );
        // (b, 1, h·w, c) -> (b, c, h, w)
        let y = self
            .out
            .forward(&y.squeeze_dim(1), precision)
            .transpose(1, 2)
            .reshape([b, c, h, w]);
        y + x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// stabilityai/sd-vae-ft-ema's config.json as published: no scaling_factor key.
    const SD_VAE_FT_EMA: &str = r#"{"_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2",
        "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "out_channels": 3, "sample_size": 256,
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#;

    #[test]
    fn reads_published_config_with_default_scaling_factor() {
        let cfg: Config = serde_json::from_str(SD_VAE_FT_EMA).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.scaling_factor, 0.18215);
        assert_eq!(cfg.downsample_factor(), 8);
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = AutoencoderKl::new(vs.root(), &cfg, AttentionNaming::Legacy);
        // sd-vae-ft-ema: 83,653,863 parameters.
        assert_eq!(frozen::parameter_count(&vs), 83_653_863);
        assert!(vs
            .variables()
            .contains_key("decoder.mid_block.attentions.0.proj_attn.weight"));
    }

    #[test]
    fn detects_attention_naming_and_rejects_other_blocks() {
        let legacy = ["encoder.mid_block.attentions.0.query.weight".to_string()];
        assert_eq!(
            AttentionNaming::detect(legacy.iter()),
            AttentionNaming::Legacy
        );
        let current = ["encoder.mid_block.attentions.0.to_q.weight".to_string()];
        assert_eq!(
            AttentionNaming::detect(current.iter()),
            AttentionNaming::Current
        );
        let mut cfg: Config = serde_json::from_str(SD_VAE_FT_EMA).unwrap();
        cfg.down_block_types[1] = "AttnDownEncoderBlock2D".into();
        assert!(cfg
            .validate()
            .unwrap_err()
            .contains("AttnDownEncoderBlock2D"));
    }

    /// CUDA's group norm takes NCHW only, so the VAE is NCHW there and channels-last on the CPU.
    #[test]
    fn layout_is_nchw_on_cuda_only() {
        assert!(channels_last_default(Device::Cpu));
        assert!(!channels_last_default(Device::Cuda(0)));
        let vs = nn::VarStore::new(Device::Cpu);
        let model = AutoencoderKl::new(vs.root(), &Config::sd_vae(), AttentionNaming::Current);
        assert!(model.channels_last);
    }

    /// In bf16 a group norm neither upcasts nor returns fp32 (at 256 px an fp32 map of the first level
    /// is 8 GiB), and it stays within bf16 rounding of the fp32 norm; the ResNet block built on it
    /// returns bf16 too, equal with either layout.
    #[test]
    fn bf16_group_norm_stays_bf16_and_close_to_fp32() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let norm = GroupNorm::new(vs.root() / "norm", 4, 16, NORM_EPS);
        tch::no_grad(|| {
            norm.weight
                .shallow_clone()
                .copy_(&(Tensor::randn([16], (Kind::Float, Device::Cpu)) + 1.0));
            norm.bias
                .shallow_clone()
                .copy_(&Tensor::randn([16], (Kind::Float, Device::Cpu)));
        });
        let x = Tensor::randn([2, 16, 8, 8], (Kind::Float, Device::Cpu)) * 3.0 + 1.0;
        let fp32 = norm.forward(&x, Precision::F32);
        assert_eq!(fp32.kind(), Kind::Float);
        let bf16 = norm.forward(&x.to_kind(Kind::BFloat16), Precision::Bf16);
        assert_eq!(bf16.kind(), Kind::BFloat16);
        let err = (bf16.to_kind(Kind::Float) - &fp32)
            .abs()
            .max()
            .double_value(&[]);
        let scale = fp32.abs().max().double_value(&[]);
        assert!(
            err / scale < 2e-2,
            "bf16 group norm off by {err} of {scale}"
        );

        let block = ResnetBlock::new(vs.root() / "block", 16, 32, 4);
        let nchw = block.forward(x.to_kind(Kind::BFloat16), Precision::Bf16);
        assert_eq!(nchw.kind(), Kind::BFloat16);
        let nhwc = block.forward(
            to_channels_last(&x).to_kind(Kind::BFloat16),
            Precision::Bf16,
        );
        let diff = (nchw.to_kind(Kind::Float) - nhwc.to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-2, "layouts differ by {diff}");
    }

    #[test]
    fn latent_scaling_round_trips() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = AutoencoderKl::new(vs.root(), &Config::sd_vae(), AttentionNaming::Current);
        let z = Tensor::randn([1, 4, 2, 2], (Kind::Float, Device::Cpu));
        let scaled = model.scale_latents(&z);
        assert!(scaled.allclose(&(&z * 0.18215), 1e-6, 1e-6, false));
        assert!(model
            .unscale_latents(&scaled)
            .allclose(&z, 1e-5, 1e-6, false));
    }
}
