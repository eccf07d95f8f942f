//! What the frozen encoders (DINOv2, SD-VAE) share: reading a Hugging Face folder, the weights
//! fingerprint that keys feature caches, the inference precision, and the few layers both use.

use std::io::Read;
use std::path::{Path, PathBuf};

use tch::{nn, Device, Kind, Tensor};

use crate::weights::WeightsError;

#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid config: {source}")]
    ConfigJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{model} input: {message}")]
    Input {
        model: &'static str,
        message: String,
    },
}

/// Numeric mode of a frozen encoder's forward pass.
///
/// `Bf16` does by hand what `torch.autocast(dtype=torch.bfloat16)` does: convolutions, linear layers
/// and attention run in bfloat16, layer norms and everything they feed stay in float32 (the VAE's
/// group norms are the exception: see [`GroupNorm`]), and the weights stay float32 in the var store. tch 0.24 can switch autocast on but cannot choose its dtype
/// (it would run float16), so the cast is explicit; it also makes the CUDA path testable on CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
}

impl Precision {
    /// bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and gain nothing).
    pub fn for_device(device: Device) -> Self {
        if device.is_cuda() {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }

    pub fn compute_kind(self) -> Kind {
        match self {
            Precision::F32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Reads and parses a JSON config, naming the file on any error.
pub fn read_json_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, EncoderError> {
    let text = std::fs::read_to_string(path).map_err(|source| EncoderError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| EncoderError::ConfigJson {
        path: path.to_path_buf(),
        source,
    })
}

/// blake3 over the given files' contents, each prefixed by its length so that moving bytes from one
/// file to the next changes the hash. Covers the config as well as the weights: an edited
/// `layer_norm_eps` changes the features as surely as edited weights do.
pub fn fingerprint_files(paths: &[&Path]) -> Result<String, EncoderError> {
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    for path in paths {
        let io_err = |source| EncoderError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        hasher.update(&len.to_le_bytes());
        loop {
            let n = file.read(&mut buffer).map_err(io_err)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Number of scalar parameters in a var store.
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

/// The weights of a frozen layer in the compute dtype, made on first use and kept: casting a frozen
/// network's weights on every call costs a copy of the whole network per batch in bf16.
#[derive(Debug, Default)]
struct Cast(std::cell::RefCell<Option<(Kind, Tensor, Option<Tensor>)>>);

impl Cast {
    fn get(&self, kind: Kind, weight: &Tensor, bias: Option<&Tensor>) -> (Tensor, Option<Tensor>) {
        if weight.kind() == kind {
            return (weight.shallow_clone(), bias.map(Tensor::shallow_clone));
        }
        let mut slot = self.0.borrow_mut();
        match slot.as_ref() {
            Some((k, w, b)) if *k == kind => {
                (w.shallow_clone(), b.as_ref().map(Tensor::shallow_clone))
            }
            _ => {
                let (w, b) = tch::no_grad(|| (weight.to_kind(kind), bias.map(|b| b.to_kind(kind))));
                *slot = Some((
                    kind,
                    w.shallow_clone(),
                    b.as_ref().map(Tensor::shallow_clone),
                ));
                (w, b)
            }
        }
    }
}

/// A linear layer whose weight and bias keep the checkpoint's names (`weight`, `bias`).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    cast: Cast,
}

impl Linear {
    pub fn new(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        let weight = p.var("weight", &[out_dim, in_dim], nn::Init::Const(0.));
        let bias = bias.then(|| p.var("bias", &[out_dim], nn::Init::Const(0.)));
        Linear {
            weight,
            bias,
            cast: Cast::default(),
        }
    }

    pub fn forward(&self, x: &Tensor, precision: Precision) -> Tensor {
        let kind = precision.compute_kind();
        let (weight, bias) = self.cast.get(kind, &self.weight, self.bias.as_ref());
        x.to_kind(kind).linear(&weight, bias.as_ref())
    }
}

/// A 2-D convolution with square kernel, stride and symmetric zero padding.
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Tensor,
    stride: i64,
    padding: i64,
    cast: Cast,
}

impl Conv2d {
    pub fn new(
        p: nn::Path,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Self {
        let weight = p.var(
            "weight",
            &[out_channels, in_channels, kernel, kernel],
            nn::Init::Const(0.),
        );
        let bias = p.var("bias", &[out_channels], nn::Init::Const(0.));
        Conv2d {
            weight,
            bias,
            stride,
            padding,
            cast: Cast::default(),
        }
    }

    pub fn forward(&self, x: &Tensor, precision: Precision) -> Tensor {
        let kind = precision.compute_kind();
        let (weight, bias) = self.cast.get(kind, &self.weight, Some(&self.bias));
        x.to_kind(kind).conv2d(
            &weight,
            bias.as_ref(),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }
}

/// LayerNorm over the last dimension, always computed and returned in float32 (as under autocast).
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        let weight = p.var("weight", &[dim], nn::Init::Const(1.));
        let bias = p.var("bias", &[dim], nn::Init::Const(0.));
        LayerNorm { weight, bias, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let dim = self.weight.size()[0];
        x.to_kind(Kind::Float).layer_norm(
            [dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// GroupNorm over (B, C, H, W). In fp32 as autocast runs it. In bf16 the input stays bf16 (weights
/// cast once) and so does the output, the statistics accumulated in fp32 by the kernel itself (ATen's
/// accumulate type): autocast's fp32 upcast would make two fp32 copies of every feature map, 8 GiB each
/// at the VAE's first level for 256 images of 256 px, which is most of the encoder's peak memory.
/// The output differs from autocast's by one bf16 rounding before the SiLU and the next convolution,
/// which rounds to bf16 anyway.
#[derive(Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    groups: i64,
    eps: f64,
    cast: Cast,
}

impl GroupNorm {
    pub fn new(p: nn::Path, groups: i64, channels: i64, eps: f64) -> Self {
        let weight = p.var("weight", &[channels], nn::Init::Const(1.));
        let bias = p.var("bias", &[channels], nn::Init::Const(0.));
        GroupNorm {
            weight,
            bias,
            groups,
            eps,
            cast: Cast::default(),
        }
    }

    pub fn forward(&self, x: &Tensor, precision: Precision) -> Tensor {
        let kind = precision.compute_kind();
        // CUDA's kernel reads weight and bias in the input's dtype.
        let (weight, bias) = self.cast.get(kind, &self.weight, Some(&self.bias));
        x.to_kind(kind)
            .group_norm(self.groups, Some(&weight), bias.as_ref(), self.eps, true)
    }
}

/// SiLU in place on a tensor the caller owns (a fresh norm output): at 256 px the VAE's feature maps are
/// tens of MB, and on CPU a fresh buffer of that size costs page faults on every call.
pub fn silu_(mut x: Tensor) -> Tensor {
    let _ = x.silu_();
    x
}

/// Creates a frozen var store on `device`, builds the model in it and loads `weights` strictly.
/// Returns the model, its var store and the parameter count.
pub fn build_and_load<M>(
    device: Device,
    weights: &Path,
    ignore_unused: &dyn Fn(&str) -> bool,
    build: impl FnOnce(nn::Path) -> M,
) -> Result<(M, nn::VarStore), EncoderError> {
    let mut vs = nn::VarStore::new(device);
    let model = build(vs.root());
    crate::weights::load_strict(&mut vs, weights, ignore_unused)?;
    vs.freeze();
    Ok((model, vs))
}

/// Fails unless `x` is a 4-D (B, C, H, W) tensor with `channels` channels and at least `min_side`
/// pixels per side.
pub fn check_image_batch(
    model: &'static str,
    x: &Tensor,
    channels: i64,
    min_side: i64,
) -> Result<(), EncoderError> {
    let size = x.size();
    let ok = size.len() == 4 && size[1] == channels && size[2] >= min_side && size[3] >= min_side;
    if ok {
        Ok(())
    } else {
        Err(EncoderError::Input {
            model,
            message: format!(
                "expected shape (B, {channels}, H, W) with H, W >= {min_side}, got {size:?}"
            ),
        })
    }
}

/// Per-channel constants as (1, 3, 1, 1) float tensors on `device`: an encoder's input mean and std.
pub fn channel_constants(mean: &[f64; 3], std: &[f64; 3], device: Device) -> (Tensor, Tensor) {
    let make = |v: &[f64; 3]| {
        Tensor::from_slice(v)
            .to_kind(Kind::Float)
            .to_device(device)
            .view([1, 3, 1, 1])
    };
    (make(mean), make(std))
}

/// uint8 RGB images (B, 3, H, W) as float32 in [0, 1], as torchvision's `ToTensor` gives them.
pub fn unit_float(images: &Tensor, model: &'static str) -> Result<Tensor, EncoderError> {
    check_image_batch(model, images, 3, 1)?;
    if images.kind() != Kind::Uint8 {
        return Err(EncoderError::Input {
            model,
            message: format!("expected uint8 images, got {:?}", images.kind()),
        });
    }
    Ok(images.to_kind(Kind::Float) / 255.0)
}

/// torch's bicubic `interpolate` to `size` × `size` (a = −0.75, no antialias, align_corners false);
/// to the same size it is the identity, as torch's is.
pub fn resize_bicubic(x: Tensor, size: i64) -> Tensor {
    let (h, w) = (x.size()[2], x.size()[3]);
    if h == size && w == size {
        return x;
    }
    x.upsample_bicubic2d([size, size], false, None, None)
}

/// Every Hugging Face encoder folder holds these two files.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// The fingerprint of an encoder folder (`config.json` and `model.safetensors`), without loading it.
pub fn fingerprint_folder(dir: &Path) -> Result<String, EncoderError> {
    fingerprint_files(&[&dir.join(CONFIG_FILE), &dir.join(WEIGHTS_FILE)])
}

/// A model read from a folder, with what cache keys and `encoders check` need.
#[derive(Debug)]
pub struct Loaded<M> {
    pub model: M,
    pub vs: nn::VarStore,
    pub parameters: i64,
    pub config_path: PathBuf,
    pub weights_path: PathBuf,
}

impl<M> Loaded<M> {
    /// blake3 of `config.json` and `model.safetensors` (see [`fingerprint_files`]).
    pub fn fingerprint(&self) -> Result<String, EncoderError> {
        fingerprint_folder(self.config_path.parent().unwrap_or(Path::new(".")))
    }
}

/// Loads the vision tower in `dir`'s `model.safetensors`, strictly within the tower. Published
/// checkpoints often wrap the tower in a larger model (CLIP's and SigLIP's `vision_model.*` next to a
/// text tower, MAE's `vit.*` next to its decoder): when any tensor name starts with one of `prefixes`,
/// the tower is built under that prefix and every tensor outside it is ignored. Within the tower a
/// tensor is ignored only when `extra` accepts its name (relative to the tower), e.g. pooling heads and
/// saved `position_ids` buffers.
pub fn load_tower<M>(
    dir: &Path,
    device: Device,
    prefixes: &[&str],
    extra: &dyn Fn(&str) -> bool,
    build: impl FnOnce(nn::Path) -> M,
) -> Result<Loaded<M>, EncoderError> {
    let config_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
    let tensors = crate::weights::read_safetensors(&weights_path)?;
    let prefix = prefixes
        .iter()
        .map(|p| format!("{p}."))
        .find(|dotted| tensors.keys().any(|k| k.starts_with(dotted.as_str())));
    let mut vs = nn::VarStore::new(device);
    let model = match &prefix {
        Some(dotted) => build(vs.root() / dotted.trim_end_matches('.')),
        None => build(vs.root()),
    };
    let ignore = |name: &str| {
        let inner = match &prefix {
            Some(dotted) => name.strip_prefix(dotted.as_str()),
            None => Some(name),
        };
        inner.is_none_or(extra)
    };
    crate::weights::load_into(&mut vs, &tensors, &weights_path, &ignore)?;
    vs.freeze();
    Ok(Loaded {
        parameters: parameter_count(&vs),
        model,
        vs,
        config_path,
        weights_path,
    })
}

/// How a family turns uint8 images into its input: /255, then its per-channel mean/std and a torch
/// bicubic resize, in the order REPA's `preprocess_raw_image` uses for it (CLIP resizes first, the
/// ImageNet-normalised encoders normalise first; both orders are kept so that each matches REPA to the
/// last bit). The constants stay on the images' device instead of being copied per batch.
#[derive(Debug)]
pub struct InputNorm {
    pub model: &'static str,
    pub mean: [f64; 3],
    pub std: [f64; 3],
    pub resize_first: bool,
    constants: std::cell::RefCell<Option<(Device, Tensor, Tensor)>>,
}

/// ImageNet mean and std (timm's `IMAGENET_DEFAULT_MEAN` / `_STD`).
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

impl InputNorm {
    pub fn new(model: &'static str, mean: [f64; 3], std: [f64; 3], resize_first: bool) -> Self {
        InputNorm {
            model,
            mean,
            std,
            resize_first,
            constants: Default::default(),
        }
    }

    /// ImageNet statistics, normalised before the resize (DINOv2, MAE, I-JEPA, DINOv3).
    pub fn imagenet(model: &'static str) -> Self {
        Self::new(model, IMAGENET_MEAN, IMAGENET_STD, false)
    }

    /// uint8 images (B, 3, H, W) → float32 input at `size` × `size`.
    pub fn prepare(&self, images: &Tensor, size: i64) -> Result<Tensor, EncoderError> {
        let x = unit_float(images, self.model)?;
        let device = images.device();
        let mut slot = self.constants.borrow_mut();
        if slot.as_ref().is_none_or(|(d, _, _)| *d != device) {
            let (mean, std) = channel_constants(&self.mean, &self.std, device);
            *slot = Some((device, mean, std));
        }
        let (_, mean, std) = slot.as_ref().expect("set above");
        Ok(if self.resize_first {
            (resize_bicubic(x, size) - mean) / std
        } else {
            resize_bicubic((x - mean) / std, size)
        })
    }
}
