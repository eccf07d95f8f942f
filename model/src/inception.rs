//! Inception-v3 as the FID literature uses it (Szegedy et al. 2016, "Rethinking the Inception
//! Architecture"; FID: Heusel et al. 2017; Inception Score: Salimans et al. 2016): the TensorFlow
//! `inception-2015-12-05` graph as ported by pytorch-fid, frozen, giving the 2048-d `pool3` features FID
//! is computed on, the 1008-way classifier logits the Inception Score is computed on, and the 2023-d
//! `mixed_6/conv` features sFID is computed on (see [`Features::spatial`]).
//!
//! Reference: pytorch-fid 0.3.0 `inception.py` (`fid_inception_v3`, `FIDInceptionA/C/E_1/E_2`) on top of
//! torchvision 0.26 `models/inception.py` (`Inception3`, `BasicConv2d`, `InceptionA`–`E`). The FID
//! network differs from torchvision's ImageNet Inception in three places, all reproduced here: 1008
//! classes; the 3×3 average pools inside the A, C and first E blocks leave padding out of the average
//! (TensorFlow's `SAME` pooling); the last E block pools with max instead of average.
//!
//! Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, converted once to safetensors by
//! `tools/convert_inception.py`; tensor names are that state dict's (`Conv2d_1a_3x3.conv.weight`,
//! `Mixed_7c.branch3x3dbl_3b.bn.running_var`, `fc.weight` ...), so loading is a strict name-for-name copy.
//! There is no config: the published weights fix every shape.
//!
//! Always float32, also on CUDA: FID compares against reference statistics computed in float32, and the
//! bf16 the other frozen encoders use moves features by far more than FID's usual decimals.

use std::cell::OnceCell;
use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

use crate::frozen::{self, EncoderError};

/// pytorch-fid bilinearly resizes every image to this side before the network.
pub const INPUT_SIZE: i64 = 299;
/// Width of the `pool3` features.
pub const FEATURES: i64 = 2048;
/// Width of the sFID `spatial` features at 299 × 299 input: 7 channels × 17 × 17.
pub const SPATIAL_FEATURES: i64 = 7 * 17 * 17;
/// Channels of `mixed_6/conv` that the ADM evaluator keeps (`spatial[..., :7]`), so that the spatial
/// features are about as wide as `pool3`.
const SPATIAL_CHANNELS: i64 = 7;
/// Classes of the TensorFlow graph's classifier: ImageNet's 1000 plus 8 unused (background and
/// padding classes of the original label map).
pub const CLASSES: i64 = 1008;
/// torchvision's `BasicConv2d` batch-norm epsilon (TensorFlow's 0.001).
const BN_EPS: f64 = 1e-3;

/// What one forward pass yields for a batch of B images.
#[derive(Debug)]
pub struct Features {
    /// (B, 2048) float32: the final average pool, what FID is computed on.
    pub pool3: Tensor,
    /// (B, 1008) float32: the classifier, `fc(pool3)` with its bias.
    pub logits: Tensor,
    /// (B, 1008) float32: `pool3 · fc.weightᵀ` without the bias. The Inception Score is defined on these:
    /// Salimans et al.'s code, the ADM evaluation suite and torch-fidelity all take the graph's
    /// `softmax/logits/MatMul` operand, i.e. the product before the bias is added.
    pub logits_unbiased: Tensor,
    /// (B, 2023) float32 at 299 × 299 input (7·h·w for other sizes): the sFID features (Nash et al.
    /// 2021) as the ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`) takes them, the
    /// graph tensor `mixed_6/conv:0` cut to `spatial[..., :7]` and reshaped to (B, −1).
    ///
    /// Which module that is: the TF graph names its mixed blocks mixed, mixed_1 … mixed_10, in the
    /// order torchvision calls Mixed_5b–5d, 6a–6e, 7a–7c, so mixed_6 is Mixed_6d (mixed_3 is the 6a
    /// reduction, whose ops `mixed_3/conv`, `mixed_3/tower/…`, `mixed_3/pool` are the B block's); the
    /// weight converters map `mixed_6/conv/{conv2d_params,batchnorm}` to `Mixed_6d.branch1x1.{conv,bn}`,
    /// and NVIDIA's TorchScript port of the graph, which clean-fid's sFID hooks, has
    /// `layers.mixed_6.conv` as the conv+BN+ReLU unit. `mixed_6/conv:0` is that unit's output (its ops
    /// are `mixed_6/conv/Conv2D` and `mixed_6/conv/batchnorm`, the ReLU carries the unit's name): the
    /// 1×1 branch of Mixed_6d after its ReLU, 192 channels at 17 × 17.
    ///
    /// TF tensors are NHWC, so `[..., :7]` then the reshape flattens (h, w, c); this one does too.
    /// The Fréchet distance would not notice another order (it is invariant under a common permutation
    /// of coordinates), but statistics compared with ADM's published `mu_s`/`sigma_s` must use this one.
    /// clean-fid's (c, h, w) flattening of the TorchScript port gives the same sFID, other statistics.
    pub spatial: Tensor,
}

/// uint8 images (B, H, W, 3), rows top to bottom, → network input (B, 3, 299, 299) float32 in [−1, 1],
/// as pytorch-fid prepares them: x / 255 (torchvision `ToTensor`), bilinear resize to 299 × 299
/// (align_corners false, no antialias: `F.interpolate`'s defaults), then 2x − 1. Any H and W work.
pub fn prepare_input(images: &Tensor) -> Result<Tensor, EncoderError> {
    prepare_input_as(images, Kind::Float)
}

/// [`prepare_input`] computed in `kind` (float64 for the parity tests' float64 network).
pub fn prepare_input_as(images: &Tensor, kind: Kind) -> Result<Tensor, EncoderError> {
    let size = images.size();
    if size.len() != 4 || size[3] != 3 || size[1] < 1 || size[2] < 1 {
        return Err(EncoderError::Input {
            model: "Inception preprocessing",
            message: format!("expected images of shape (B, H, W, 3), got {size:?}"),
        });
    }
    if images.kind() != Kind::Uint8 {
        return Err(EncoderError::Input {
            model: "Inception preprocessing",
            message: format!("expected uint8 images, got {:?}", images.kind()),
        });
    }
    let x = (images.to_kind(kind) / 255.0).permute([0, 3, 1, 2]);
    let x = if size[1] == INPUT_SIZE && size[2] == INPUT_SIZE {
        // Interpolating to the same size is the identity, and the copy costs as much as a layer.
        x
    } else {
        x.upsample_bilinear2d([INPUT_SIZE, INPUT_SIZE], false, None, None)
    };
    Ok(x * 2.0 - 1.0)
}

/// The frozen FID Inception network.
#[derive(Debug)]
pub struct Inception {
    stem: Vec<BasicConv>,
    mixed_5: [BlockA; 3],
    mixed_6a: BlockB,
    mixed_6: [BlockC; 4],
    mixed_7a: BlockD,
    mixed_7: [BlockE; 2],
    fc_weight: Tensor,
    fc_bias: Tensor,
    device: Device,
}

impl Inception {
    /// Builds the network with placeholder variables under `p`, named as in the checkpoint. Batch-norm
    /// running variances start at 1 so that an unloaded network computes finite numbers.
    pub fn new(p: nn::Path) -> Self {
        let conv = |name: &str, cin, cout, kernel, stride, padding| {
            BasicConv::new(&p / name, cin, cout, kernel, stride, padding)
        };
        let stem = vec![
            conv("Conv2d_1a_3x3", 3, 32, (3, 3), 2, (0, 0)),
            conv("Conv2d_2a_3x3", 32, 32, (3, 3), 1, (0, 0)),
            conv("Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1)),
            conv("Conv2d_3b_1x1", 64, 80, (1, 1), 1, (0, 0)),
            conv("Conv2d_4a_3x3", 80, 192, (3, 3), 1, (0, 0)),
        ];
        let mixed_5 = [
            BlockA::new(&p / "Mixed_5b", 192, 32),
            BlockA::new(&p / "Mixed_5c", 256, 64),
            BlockA::new(&p / "Mixed_5d", 288, 64),
        ];
        let mixed_6 = [
            BlockC::new(&p / "Mixed_6b", 128),
            BlockC::new(&p / "Mixed_6c", 160),
            BlockC::new(&p / "Mixed_6d", 160),
            BlockC::new(&p / "Mixed_6e", 192),
        ];
        let mixed_7 = [
            BlockE::new(&p / "Mixed_7b", 1280, EPool::AverageWithoutPadding),
            BlockE::new(&p / "Mixed_7c", 2048, EPool::Max),
        ];
        let fc = &p / "fc";
        Inception {
            stem,
            mixed_5,
            mixed_6a: BlockB::new(&p / "Mixed_6a", 288),
            mixed_6,
            mixed_7a: BlockD::new(&p / "Mixed_7a", 768),
            mixed_7,
            fc_weight: fc.var("weight", &[CLASSES, FEATURES], nn::Init::Const(0.)),
            fc_bias: fc.var("bias", &[CLASSES], nn::Init::Const(0.)),
            device: p.device(),
        }
    }

    /// Loads a safetensors file converted from pytorch-fid's state dict, strictly: every tensor of the
    /// network must be there with its shape, and nothing else may be, except batch-norm
    /// `num_batches_tracked` counters (training bookkeeping that newer PyTorch versions save).
    pub fn from_file(path: &Path, device: Device) -> Result<LoadedInception, EncoderError> {
        if !path.is_file() {
            return Err(EncoderError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "Inception weights not found (convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth \
                     with tools/convert_inception.py)",
                ),
            });
        }
        let (model, vs) = frozen::build_and_load(
            device,
            path,
            &|name| name.ends_with(".num_batches_tracked"),
            Inception::new,
        )?;
        Ok(LoadedInception {
            parameters: frozen::parameter_count(&vs),
            model,
            vs,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Prepared input (B, 3, H, W) float32 in [−1, 1] (see [`prepare_input`]; pytorch-fid always feeds
    /// 299 × 299) → `pool3` features, logits and spatial features. Runs under no_grad.
    pub fn forward(&self, x: &Tensor) -> Result<Features, EncoderError> {
        // The stem shrinks 75 px to the 1 × 1 map the last blocks still accept; less fails inside a pool.
        frozen::check_image_batch("Inception", x, 3, 75)?;
        Ok(tch::no_grad(|| {
            // The weights' kind: float32 as loaded, float64 after `VarStore::double` (parity tests).
            let x = x.to_kind(self.fc_weight.kind()).to_device(self.device);
            let [c1a, c2a, c2b, c3b, c4a] = [0, 1, 2, 3, 4].map(|i| &self.stem[i]);
            let x = c2b.forward(&c2a.forward(&c1a.forward(&x)));
            let x = max_pool_3x3_stride_2(&x);
            let x = c4a.forward(&c3b.forward(&x));
            let mut x = max_pool_3x3_stride_2(&x);
            for block in &self.mixed_5 {
                x = block.forward(&x);
            }
            x = self.mixed_6a.forward(&x);
            let mut spatial = None;
            for (i, block) in self.mixed_6.iter().enumerate() {
                let (y, branch1x1) = block.forward_with_1x1(&x);
                if i == MIXED_6D {
                    spatial = Some(branch1x1);
                }
                x = y;
            }
            let spatial = spatial.expect("Mixed_6d is one of the C blocks");
            let b = spatial.size()[0];
            let spatial = spatial
                .narrow(1, 0, SPATIAL_CHANNELS)
                .permute([0, 2, 3, 1])
                .reshape([b, -1]);
            x = self.mixed_7a.forward(&x);
            for block in &self.mixed_7 {
                x = block.forward(&x);
            }
            let pool3 = x.adaptive_avg_pool2d([1, 1]).flatten(1, -1);
            let logits_unbiased = pool3.matmul(&self.fc_weight.tr());
            let logits = &logits_unbiased + &self.fc_bias;
            Features {
                pool3,
                logits,
                logits_unbiased,
                spatial,
            }
        }))
    }

    /// uint8 images (B, H, W, 3) of any size → features: [`prepare_input`] then [`Self::forward`], on
    /// the network's device.
    pub fn features(&self, images: &Tensor) -> Result<Features, EncoderError> {
        let x = prepare_input_as(&images.to_device(self.device), self.fc_weight.kind())?;
        self.forward(&x)
    }
}

/// Random weights for a network built on `vs`: He-normal convolutions and identity batch norms, so
/// activations keep their scale through the 94 layers as with trained weights (vanishing ones would
/// make features constant, and time denormal arithmetic in benchmarks). For benchmarks and the demo's
/// stand-in FID network; such features are not comparable with anyone's FID.
pub fn randomise(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let fill = if name.ends_with("conv.weight") {
                let fan_in = var.numel() as f64 / var.size()[0] as f64;
                Tensor::randn_like(&var) * (2.0 / fan_in).sqrt()
            } else if name.ends_with("bn.weight") || name.ends_with("running_var") {
                Tensor::ones_like(&var)
            } else if name == "fc.weight" {
                Tensor::randn_like(&var) * 0.01
            } else {
                Tensor::zeros_like(&var)
            };
            var.copy_(&fill);
        }
    });
}

/// A network read from a file, with its var store (which owns the weights) and parameter count.
#[derive(Debug)]
pub struct LoadedInception {
    pub model: Inception,
    pub vs: nn::VarStore,
    pub parameters: i64,
}

/// Index of Mixed_6d (the TF graph's `mixed_6`) among the C blocks 6b–6e.
const MIXED_6D: usize = 2;

fn max_pool_3x3_stride_2(x: &Tensor) -> Tensor {
    x.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false)
}

/// The 3×3, stride-1 average pool of the FID blocks: padding is not counted in the average
/// (`count_include_pad=False`), unlike torchvision's ImageNet Inception.
fn avg_pool_3x3_same(x: &Tensor) -> Tensor {
    x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None)
}

/// Convolution without bias → batch norm (running statistics) → ReLU: torchvision's `BasicConv2d`,
/// under the names `{conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var}`.
#[derive(Debug)]
struct BasicConv {
    weight: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
    stride: i64,
    padding: (i64, i64),
    /// The batch norm folded into the convolution, made from the loaded weights on first use: one
    /// pass over the activations instead of three. Frozen weights make computing it once correct.
    folded: OnceCell<(Tensor, Tensor)>,
}

impl BasicConv {
    fn new(
        p: nn::Path,
        cin: i64,
        cout: i64,
        kernel: (i64, i64),
        stride: i64,
        padding: (i64, i64),
    ) -> Self {
        let zeros = nn::Init::Const(0.);
        let conv = &p / "conv";
        let bn = &p / "bn";
        BasicConv {
            weight: conv.var("weight", &[cout, cin, kernel.0, kernel.1], zeros),
            gamma: bn.var("weight", &[cout], nn::Init::Const(1.)),
            beta: bn.var("bias", &[cout], zeros),
            mean: bn.var("running_mean", &[cout], zeros),
            var: bn.var("running_var", &[cout], nn::Init::Const(1.)),
            stride,
            padding,
            folded: OnceCell::new(),
        }
    }

    /// w' = w·γ/√(σ²+ε) per output channel, b' = β − μ·γ/√(σ²+ε); computed in float64 so that folding
    /// adds no rounding of its own beyond the final cast.
    fn fold(&self) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            let scale =
                self.gamma.to_kind(Kind::Double) / (self.var.to_kind(Kind::Double) + BN_EPS).sqrt();
            let weight = self.weight.to_kind(Kind::Double) * scale.view([-1, 1, 1, 1]);
            let bias = self.beta.to_kind(Kind::Double) - self.mean.to_kind(Kind::Double) * &scale;
            let kind = self.weight.kind();
            (weight.to_kind(kind), bias.to_kind(kind))
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (weight, bias) = self.folded.get_or_init(|| self.fold());
        let mut y = x.conv2d(
            weight,
            Some(bias),
            [self.stride, self.stride],
            [self.padding.0, self.padding.1],
            [1, 1],
            1,
        );
        let _ = y.relu_();
        y
    }
}

/// Runs a chain of convolutions.
fn chain(convs: &[BasicConv], x: &Tensor) -> Tensor {
    let (first, rest) = convs.split_first().expect("a branch has a convolution");
    rest.iter().fold(first.forward(x), |y, c| c.forward(&y))
}

/// `InceptionA` (Mixed_5b–5d): 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg pool→1×1.
#[derive(Debug)]
struct BlockA {
    branch1x1: BasicConv,
    branch5x5: [BasicConv; 2],
    branch3x3dbl: [BasicConv; 3],
    branch_pool: BasicConv,
}

impl BlockA {
    fn new(p: nn::Path, cin: i64, pool_features: i64) -> Self {
        let c = |name: &str, i, o, k, pad| BasicConv::new(&p / name, i, o, (k, k), 1, (pad, pad));
        BlockA {
            branch1x1: c("branch1x1", cin, 64, 1, 0),
            branch5x5: [
                c("branch5x5_1", cin, 48, 1, 0),
                c("branch5x5_2", 48, 64, 5, 2),
            ],
            branch3x3dbl: [
                c("branch3x3dbl_1", cin, 64, 1, 0),
                c("branch3x3dbl_2", 64, 96, 3, 1),
                c("branch3x3dbl_3", 96, 96, 3, 1),
            ],
            branch_pool: c("branch_pool", cin, pool_features, 1, 0),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        Tensor::cat(
            &[
                self.branch1x1.forward(x),
                chain(&self.branch5x5, x),
                chain(&self.branch3x3dbl, x),
                self.branch_pool.forward(&avg_pool_3x3_same(x)),
            ],
            1,
        )
    }
}

/// `InceptionB` (Mixed_6a), the 35 → 17 reduction: 3×3/2 | 1×1→3×3→3×3/2 | max pool/2.
#[derive(Debug)]
struct BlockB {
    branch3x3: BasicConv,
    branch3x3dbl: [BasicConv; 3],
}

impl BlockB {
    fn new(p: nn::Path, cin: i64) -> Self {
        BlockB {
            branch3x3: BasicConv::new(&p / "branch3x3", cin, 384, (3, 3), 2, (0, 0)),
            branch3x3dbl: [
                BasicConv::new(&p / "branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
                BasicConv::new(&p / "branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
                BasicConv::new(&p / "branch3x3dbl_3", 96, 96, (3, 3), 2, (0, 0)),
            ],
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        Tensor::cat(
            &[
                self.branch3x3.forward(x),
                chain(&self.branch3x3dbl, x),
                max_pool_3x3_stride_2(x),
            ],
            1,
        )
    }
}

/// `InceptionC` (Mixed_6b–6e) on 768 channels: 1×1 | factorised 7×7 | twice-factorised 7×7 | avg
/// pool→1×1, every branch 192 wide.
#[derive(Debug)]
struct BlockC {
    branch1x1: BasicConv,
    branch7x7: [BasicConv; 3],
    branch7x7dbl: [BasicConv; 5],
    branch_pool: BasicConv,
}

impl BlockC {
    fn new(p: nn::Path, c7: i64) -> Self {
        let cin = 768;
        let c = |name: &str, i, o, k, pad| BasicConv::new(&p / name, i, o, k, 1, pad);
        let (k1, k1x7, k7x1) = ((1, 1), (1, 7), (7, 1));
        let (p0, p1x7, p7x1) = ((0, 0), (0, 3), (3, 0));
        BlockC {
            branch1x1: c("branch1x1", cin, 192, k1, p0),
            branch7x7: [
                c("branch7x7_1", cin, c7, k1, p0),
                c("branch7x7_2", c7, c7, k1x7, p1x7),
                c("branch7x7_3", c7, 192, k7x1, p7x1),
            ],
            branch7x7dbl: [
                c("branch7x7dbl_1", cin, c7, k1, p0),
                c("branch7x7dbl_2", c7, c7, k7x1, p7x1),
                c("branch7x7dbl_3", c7, c7, k1x7, p1x7),
                c("branch7x7dbl_4", c7, c7, k7x1, p7x1),
                c("branch7x7dbl_5", c7, 192, k1x7, p1x7),
            ],
            branch_pool: c("branch_pool", cin, 192, k1, p0),
        }
    }

    /// The block's output and its 1×1 branch (Mixed_6d's is the sFID tensor).
    fn forward_with_1x1(&self, x: &Tensor) -> (Tensor, Tensor) {
        let branch1x1 = self.branch1x1.forward(x);
        let out = Tensor::cat(
            &[
                branch1x1.shallow_clone(),
                chain(&self.branch7x7, x),
                chain(&self.branch7x7dbl, x),
                self.branch_pool.forward(&avg_pool_3x3_same(x)),
            ],
            1,
        );
        (out, branch1x1)
    }
}

/// `InceptionD` (Mixed_7a), the 17 → 8 reduction: 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max pool/2.
#[derive(Debug)]
struct BlockD {
    branch3x3: [BasicConv; 2],
    branch7x7x3: [BasicConv; 4],
}

impl BlockD {
    fn new(p: nn::Path, cin: i64) -> Self {
        let c = |name: &str, i, o, k, s, pad| BasicConv::new(&p / name, i, o, k, s, pad);
        BlockD {
            branch3x3: [
                c("branch3x3_1", cin, 192, (1, 1), 1, (0, 0)),
                c("branch3x3_2", 192, 320, (3, 3), 2, (0, 0)),
            ],
            branch7x7x3: [
                c("branch7x7x3_1", cin, 192, (1, 1), 1, (0, 0)),
                c("branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
                c("branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)),
                c("branch7x7x3_4", 192, 192, (3, 3), 2, (0, 0)),
            ],
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        Tensor::cat(
            &[
                chain(&self.branch3x3, x),
                chain(&self.branch7x7x3, x),
                max_pool_3x3_stride_2(x),
            ],
            1,
        )
    }
}

/// The pool of an E block's last branch: Mixed_7b averages without padding, Mixed_7c takes the max
/// (a quirk of the TensorFlow graph that pytorch-fid keeps).
#[derive(Debug, Clone, Copy)]
enum EPool {
    AverageWithoutPadding,
    Max,
}

/// `InceptionE` (Mixed_7b, 7c) at 8×8: 1×1 (320) | 1×1→{1×3, 3×1} (768) | 1×1→3×3→{1×3, 3×1} (768) |
/// pool→1×1 (192): 2048 channels out.
#[derive(Debug)]
struct BlockE {
    branch1x1: BasicConv,
    branch3x3_1: BasicConv,
    branch3x3_2: [BasicConv; 2],
    branch3x3dbl: [BasicConv; 2],
    branch3x3dbl_3: [BasicConv; 2],
    branch_pool: BasicConv,
    pool: EPool,
}

impl BlockE {
    fn new(p: nn::Path, cin: i64, pool: EPool) -> Self {
        let c = |name: &str, i, o, k, pad| BasicConv::new(&p / name, i, o, k, 1, pad);
        let (k1, k1x3, k3x1, k3) = ((1, 1), (1, 3), (3, 1), (3, 3));
        let (p0, p1x3, p3x1, p1) = ((0, 0), (0, 1), (1, 0), (1, 1));
        BlockE {
            branch1x1: c("branch1x1", cin, 320, k1, p0),
            branch3x3_1: c("branch3x3_1", cin, 384, k1, p0),
            branch3x3_2: [
                c("branch3x3_2a", 384, 384, k1x3, p1x3),
                c("branch3x3_2b", 384, 384, k3x1, p3x1),
            ],
            branch3x3dbl: [
                c("branch3x3dbl_1", cin, 448, k1, p0),
                c("branch3x3dbl_2", 448, 384, k3, p1),
            ],
            branch3x3dbl_3: [
                c("branch3x3dbl_3a", 384, 384, k1x3, p1x3),
                c("branch3x3dbl_3b", 384, 384, k3x1, p3x1),
            ],
            branch_pool: c("branch_pool", cin, 192, k1, p0),
            pool,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let split = |convs: &[BasicConv; 2], y: &Tensor| [convs[0].forward(y), convs[1].forward(y)];
        let b3 = self.branch3x3_1.forward(x);
        let [b3a, b3b] = split(&self.branch3x3_2, &b3);
        let dbl = chain(&self.branch3x3dbl, x);
        let [dbla, dblb] = split(&self.branch3x3dbl_3, &dbl);
        let pooled = match self.pool {
            EPool::AverageWithoutPadding => avg_pool_3x3_same(x),
            EPool::Max => x.max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false),
        };
        Tensor::cat(
            &[
                self.branch1x1.forward(x),
                b3a,
                b3b,
                dbla,
                dblb,
                self.branch_pool.forward(&pooled),
            ],
            1,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn has_the_published_parameter_count_and_names() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = Inception::new(vs.root());
        let vars = vs.variables();
        // pytorch-fid's fid_inception_v3() state dict without num_batches_tracked: 94 conv + batch-norm
        // units (5 tensors each) and fc.
        assert_eq!(vars.len(), 94 * 5 + 2);
        for name in [
            "Conv2d_1a_3x3.conv.weight",
            "Mixed_5b.branch_pool.bn.running_var",
            "Mixed_6e.branch7x7dbl_5.conv.weight",
            "Mixed_7c.branch3x3dbl_3b.bn.running_mean",
            "fc.bias",
        ] {
            assert!(vars.contains_key(name), "{name}");
        }
        assert_eq!(
            vars["Mixed_6b.branch7x7_2.conv.weight"].size(),
            [128, 128, 1, 7]
        );
        assert_eq!(frozen::parameter_count(&vs), PUBLISHED_PARAMETERS);
    }

    /// Parameters (23,850,960) plus batch-norm running statistics of `fid_inception_v3()`'s state dict:
    /// `sum(t.numel() for k, t in sd.items() if not k.endswith("num_batches_tracked"))`.
    const PUBLISHED_PARAMETERS: i64 = 23_885_392;

    #[test]
    fn shapes_through_the_network_and_input_checks() {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Inception::new(vs.root());
        let images = Tensor::zeros([2, 64, 48, 3], (Kind::Uint8, Device::Cpu));
        let prepared = prepare_input(&images).unwrap();
        assert_eq!(prepared.size(), [2, 3, 299, 299]);
        // Black images are −1 everywhere after preparation.
        assert_eq!(prepared.max().double_value(&[]), -1.0);
        let f = net.forward(&prepared).unwrap();
        assert_eq!(f.pool3.size(), [2, 2048]);
        assert_eq!(f.logits.size(), [2, 1008]);
        assert_eq!(f.spatial.size(), [2, SPATIAL_FEATURES]);
        let nchw = Tensor::zeros([1, 3, 64, 64], (Kind::Uint8, Device::Cpu));
        let msg = prepare_input(&nchw).unwrap_err().to_string();
        assert!(msg.contains("(B, H, W, 3)"), "{msg}");
        let floats = Tensor::zeros([1, 8, 8, 3], (Kind::Float, Device::Cpu));
        assert!(prepare_input(&floats)
            .unwrap_err()
            .to_string()
            .contains("uint8"));
        let tiny = Tensor::zeros([1, 3, 40, 40], (Kind::Float, Device::Cpu));
        assert!(net.forward(&tiny).is_err());
    }
}
