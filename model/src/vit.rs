//! The transformer pieces the frozen ViT encoders share (CLIP, SigLIP, MAE, I-JEPA, DINOv3): one
//! pre-norm block with optional layer scale and gated MLP, multi-head attention with optional RoPE on
//! the patch tokens, the patch-embedding convolution and position-table interpolation. Each family's
//! file only names the tensors (their names differ per checkpoint) and wires its embeddings.

use tch::{nn, Kind, Tensor};

use crate::frozen::{EncoderError, LayerNorm, Linear, Precision};

/// The MLP non-linearities the published towers use, by their transformers `hidden_act` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// x·σ(1.702x): OpenAI CLIP.
    QuickGelu,
    /// Exact (erf) GELU: MAE, I-JEPA, DINOv3, LAION CLIP.
    Gelu,
    /// GELU's tanh approximation (`gelu_pytorch_tanh`, `gelu_new`): SigLIP.
    GeluTanh,
    /// SiLU, with the gated MLP of DINOv3's 7B.
    Silu,
}

impl Activation {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Activation::QuickGelu),
            "gelu" => Some(Activation::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" => Some(Activation::GeluTanh),
            "silu" | "swish" => Some(Activation::Silu),
            _ => None,
        }
    }

    /// "unsupported hidden_act" message for a config's `validate`.
    pub fn check(name: &str) -> Result<Self, String> {
        Self::parse(name).ok_or_else(|| {
            format!(
                "hidden_act `{name}` is not supported (quick_gelu, gelu, gelu_pytorch_tanh, gelu_new, silu)"
            )
        })
    }

    /// Applies the activation, in place where it can: `x` is always a fresh projection output, and on
    /// CPU a new 4·D-wide buffer per layer costs page faults on every call.
    pub fn apply(self, mut x: Tensor) -> Tensor {
        match self {
            Activation::QuickGelu => (&x * 1.702).sigmoid() * x,
            Activation::Gelu => {
                let _ = x.gelu_("none");
                x
            }
            Activation::GeluTanh => {
                let _ = x.gelu_("tanh");
                x
            }
            Activation::Silu => {
                let _ = x.silu_();
                x
            }
        }
    }
}

/// Rotary position embedding of DINOv3: cos and sin (n_patches, head_dim), applied to the last
/// n_patches tokens of queries and keys (the class and register tokens before them are not rotated).
#[derive(Debug)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    fn rotate(&self, x: &Tensor) -> Tensor {
        let t = x.size()[2];
        let n = self.cos.size()[0];
        let prefix = x.narrow(2, 0, t - n);
        let patches = x.narrow(2, t - n, n).to_kind(Kind::Float);
        let half = patches.size()[3] / 2;
        // rotate_half: (x1, x2) -> (−x2, x1)
        let rotated = Tensor::cat(
            &[-patches.narrow(3, half, half), patches.narrow(3, 0, half)],
            3,
        );
        let patches = &patches * &self.cos + rotated * &self.sin;
        Tensor::cat(&[prefix, patches.to_kind(x.kind())], 2)
    }
}

/// Multi-head self-attention with separate query, key, value and output projections.
#[derive(Debug)]
pub struct SelfAttention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub heads: i64,
}

impl SelfAttention {
    /// Hugging Face ViT names (ViT, DINOv2, ViT-MAE and I-JEPA checkpoints):
    /// `attention.{query,key,value}` and `output.dense` under `p` (transformers 5 renames them to
    /// `q_proj`… in memory only, and back on save).
    pub fn vit_names(p: &nn::Path, d: i64, heads: i64, qkv_bias: bool) -> Self {
        let inner = p / "attention";
        SelfAttention {
            q: Linear::new(&inner / "query", d, d, qkv_bias),
            k: Linear::new(&inner / "key", d, d, qkv_bias),
            v: Linear::new(&inner / "value", d, d, qkv_bias),
            o: Linear::new(p / "output" / "dense", d, d, true),
            heads,
        }
    }

    /// CLIP and SigLIP names: `{q,k,v,out}_proj` under `p`, all with bias.
    pub fn clip_names(p: &nn::Path, d: i64, heads: i64) -> Self {
        SelfAttention {
            q: Linear::new(p / "q_proj", d, d, true),
            k: Linear::new(p / "k_proj", d, d, true),
            v: Linear::new(p / "v_proj", d, d, true),
            o: Linear::new(p / "out_proj", d, d, true),
            heads,
        }
    }

    pub fn forward(&self, x: &Tensor, rope: Option<&Rope>, precision: Precision) -> Tensor {
        let (b, t, _) = x.size3().expect("3-D hidden states");
        let inner = self.q.weight.size()[0];
        let head_dim = inner / self.heads;
        // (b, t, h·d) -> (b, h, t, d)
        let split = |y: Tensor| y.view([b, t, self.heads, head_dim]).transpose(1, 2);
        let mut q = split(self.q.forward(x, precision));
        let mut k = split(self.k.forward(x, precision));
        let v = split(self.v.forward(x, precision));
        if let Some(rope) = rope {
            q = rope.rotate(&q);
            k = rope.rotate(&k);
        }
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            (head_dim as f64).powf(-0.5),
            false,
        );
        let y = y.transpose(1, 2).reshape([b, t, inner]);
        self.o.forward(&y, precision)
    }
}

/// The feed-forward half of a block.
#[derive(Debug)]
pub enum Mlp {
    /// down(act(up(x))).
    Plain { up: Linear, down: Linear },
    /// down(act(gate(x)) · up(x)).
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    /// The same with gate and up in one matrix, gate first (DINOv2-g's `weights_in`).
    FusedGated { gate_up: Linear, down: Linear },
}

impl Mlp {
    fn forward(&self, x: &Tensor, activation: Activation, precision: Precision) -> Tensor {
        match self {
            Mlp::Plain { up, down } => {
                down.forward(&activation.apply(up.forward(x, precision)), precision)
            }
            Mlp::Gated { gate, up, down } => {
                let h = activation.apply(gate.forward(x, precision)) * up.forward(x, precision);
                down.forward(&h, precision)
            }
            Mlp::FusedGated { gate_up, down } => {
                let halves = gate_up.forward(x, precision).chunk(2, -1);
                let h = activation.apply(halves[0].shallow_clone()) * &halves[1];
                down.forward(&h, precision)
            }
        }
    }
}

/// A pre-norm transformer block: x + s₁·attn(norm₁(x)), then x + s₂·mlp(norm₂(x)); the layer scales
/// s are DINOv3's (absent elsewhere).
#[derive(Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attention: SelfAttention,
    pub scale1: Option<Tensor>,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub scale2: Option<Tensor>,
    pub activation: Activation,
}

impl Block {
    pub fn forward(&self, x: &Tensor, rope: Option<&Rope>, precision: Precision) -> Tensor {
        let scaled = |h: Tensor, s: &Option<Tensor>| match s {
            Some(s) => h * s,
            None => h,
        };
        let h = self
            .attention
            .forward(&self.norm1.forward(x), rope, precision);
        let x = x + scaled(h, &self.scale1);
        let h = self
            .mlp
            .forward(&self.norm2.forward(&x), self.activation, precision);
        &x + scaled(h, &self.scale2)
    }
}

/// Patch embedding: the (D, C, p, p) convolution with stride p, as (B, N, D) row-major over the grid.
/// A per-call cast of the kernel is cheap (under 1 M values even for ViT-L/14).
pub fn embed_patches(
    pixels: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    patch: i64,
    precision: Precision,
) -> Tensor {
    let kind = precision.compute_kind();
    pixels
        .to_kind(kind)
        .conv2d(
            &weight.to_kind(kind),
            bias.map(|b| b.to_kind(kind)),
            [patch, patch],
            [0, 0],
            [1, 1],
            1,
        )
        .flatten(2, 3)
        .transpose(1, 2)
}

/// The patch part of a learned position table, (1, s², D) for an s × s training grid, resized to
/// `grid_h` × `grid_w` as transformers' `interpolate_pos_encoding` does for CLIP, SigLIP, ViT-MAE and
/// I-JEPA: bicubic without antialiasing, and the table returned as is when the patch count is unchanged
/// and the input square.
pub fn interpolate_positions(table: &Tensor, grid_h: i64, grid_w: i64, square: bool) -> Tensor {
    let (_, n, d) = table.size3().expect("(1, n, d) position table");
    if n == grid_h * grid_w && square {
        return table.shallow_clone();
    }
    let side = (n as f64).sqrt() as i64;
    // (1, s·s, d) -> (1, d, s, s) -> (1, d, h, w) -> (1, h·w, d)
    table
        .reshape([1, side, side, d])
        .permute([0, 3, 1, 2])
        .upsample_bicubic2d([grid_h, grid_w], false, None, None)
        .permute([0, 2, 3, 1])
        .reshape([1, grid_h * grid_w, d])
}

/// The checks every ViT config needs before a network is built from it: whole heads and a patch grid.
pub fn check_grid(hidden: i64, heads: i64, patch: i64, image: i64) -> Result<(), String> {
    if heads <= 0 || hidden % heads != 0 {
        return Err(format!(
            "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        ));
    }
    if patch <= 0 || image < patch {
        return Err(format!(
            "image_size {image} / patch_size {patch} make no patch grid"
        ));
    }
    Ok(())
}

/// The size letter of a ViT by width, for `encoders check`: "B" for 768, "So400m" for 1152.
pub fn size_name(hidden: i64) -> &'static str {
    match hidden {
        384 => "S",
        768 => "B",
        1024 => "L",
        1152 => "So400m",
        1280 => "H",
        1408 | 1536 => "g",
        4096 => "7B",
        _ => "custom",
    }
}

/// The fields of a Hugging Face `ViTConfig`-shaped config (`ViTMAEConfig`, `IJepaConfig`) that change
/// the encoder's forward pass; defaults are transformers'. Unknown keys are accepted: the file is
/// Hugging Face's (MAE's carries its decoder and mask ratio, which a frozen encoder does not use).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct HfVitConfig {
    #[serde(default)]
    pub model_type: String,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: i64,
    #[serde(default = "default_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "default_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: i64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_image_size")]
    pub image_size: i64,
    #[serde(default = "default_patch_size")]
    pub patch_size: i64,
    #[serde(default = "default_channels")]
    pub num_channels: i64,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
}

fn default_hidden_size() -> i64 {
    768
}
fn default_layers() -> i64 {
    12
}
fn default_heads() -> i64 {
    12
}
fn default_intermediate_size() -> i64 {
    3072
}
fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_image_size() -> i64 {
    224
}
fn default_patch_size() -> i64 {
    16
}
fn default_channels() -> i64 {
    3
}
fn default_true() -> bool {
    true
}

impl HfVitConfig {
    /// ViT-B/16 at 224 px with `model_type`.
    pub fn base(model_type: &str) -> Self {
        HfVitConfig {
            model_type: model_type.into(),
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: default_hidden_act(),
            layer_norm_eps: 1e-12,
            image_size: 224,
            patch_size: 16,
            num_channels: 3,
            qkv_bias: true,
        }
    }

    /// Reads `path`, requiring `model_type` to be `expected`.
    pub fn from_file(path: &std::path::Path, expected: &str) -> Result<Self, EncoderError> {
        let cfg: Self = crate::frozen::read_json_config(path)?;
        cfg.validate(expected)
            .map_err(|message| EncoderError::Config {
                path: path.to_path_buf(),
                message,
            })?;
        Ok(cfg)
    }

    pub fn validate(&self, expected: &str) -> Result<(), String> {
        if self.model_type != expected {
            return Err(format!(
                "model_type `{}` is not {expected}",
                self.model_type
            ));
        }
        Activation::check(&self.hidden_act)?;
        crate::vit::check_grid(
            self.hidden_size,
            self.num_attention_heads,
            self.patch_size,
            self.image_size,
        )?;
        Ok(())
    }

    /// Side of the square grid the position table was trained for.
    pub fn position_grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    /// "MAE ViT-B/16, 12 layers, ...": what `encoders check` prints.
    pub fn describe(&self, family: &str) -> String {
        format!(
            "{family} ViT-{}/{}, {} layers, hidden {}, {} heads, {} MLP hidden {}, position grid {g}x{g} ({} px)",
            size_name(self.hidden_size),
            self.patch_size,
            self.num_hidden_layers,
            self.hidden_size,
            self.num_attention_heads,
            self.hidden_act,
            self.intermediate_size,
            self.image_size,
            g = self.position_grid(),
        )
    }
}

/// The Hugging Face ViT encoder under its checkpoint names (`embeddings.patch_embeddings.projection`,
/// `embeddings.position_embeddings`, optional `embeddings.cls_token`, `encoder.layer.{i}.*`, final
/// `layernorm`): what ViT-MAE and I-JEPA share. A learned (or, for MAE, fixed sin-cos) position table
/// covers the class token when there is one.
#[derive(Debug)]
pub struct HfVit {
    pub config: HfVitConfig,
    patch_weight: Tensor,
    patch_bias: Tensor,
    cls_token: Option<Tensor>,
    /// (1, [1 +] grid², D)
    position_embeddings: Tensor,
    layers: Vec<Block>,
    layernorm: LayerNorm,
}

impl HfVit {
    pub fn new(p: nn::Path, cfg: &HfVitConfig, class_token: bool) -> Self {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let zeros = nn::Init::Const(0.);
        let emb = &p / "embeddings";
        let proj = &emb / "patch_embeddings" / "projection";
        let grid = cfg.position_grid();
        let activation = Activation::parse(&cfg.hidden_act).unwrap_or(Activation::Gelu);
        HfVit {
            config: cfg.clone(),
            patch_weight: proj.var(
                "weight",
                &[d, cfg.num_channels, cfg.patch_size, cfg.patch_size],
                zeros,
            ),
            patch_bias: proj.var("bias", &[d], zeros),
            cls_token: class_token.then(|| emb.var("cls_token", &[1, 1, d], zeros)),
            position_embeddings: emb.var(
                "position_embeddings",
                &[1, grid * grid + i64::from(class_token), d],
                zeros,
            ),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| {
                    let l = &p / "encoder" / "layer" / i;
                    let mlp_in = &l / "intermediate" / "dense";
                    Block {
                        norm1: LayerNorm::new(&l / "layernorm_before", d, eps),
                        attention: SelfAttention::vit_names(
                            &(&l / "attention"),
                            d,
                            cfg.num_attention_heads,
                            cfg.qkv_bias,
                        ),
                        scale1: None,
                        norm2: LayerNorm::new(&l / "layernorm_after", d, eps),
                        mlp: Mlp::Plain {
                            up: Linear::new(mlp_in, d, cfg.intermediate_size, true),
                            down: Linear::new(
                                &l / "output" / "dense",
                                cfg.intermediate_size,
                                d,
                                true,
                            ),
                        },
                        scale2: None,
                        activation,
                    }
                })
                .collect(),
            layernorm: LayerNorm::new(&p / "layernorm", d, eps),
        }
    }

    /// Patch tokens (B, N, D) after the final `layernorm`, class token dropped, float32; the position
    /// table interpolated as transformers' `interpolate_pos_encoding=True` does. Under no_grad.
    pub fn forward(&self, pixels: &Tensor, precision: Precision) -> Tensor {
        let cfg = &self.config;
        tch::no_grad(|| {
            let (b, h, w) = (pixels.size()[0], pixels.size()[2], pixels.size()[3]);
            let patches = embed_patches(
                pixels,
                &self.patch_weight,
                Some(&self.patch_bias),
                cfg.patch_size,
                precision,
            )
            .to_kind(Kind::Float);
            let table = &self.position_embeddings;
            let prefix = i64::from(self.cls_token.is_some());
            let positions = interpolate_positions(
                &table.narrow(1, prefix, table.size()[1] - prefix),
                h / cfg.patch_size,
                w / cfg.patch_size,
                h == w,
            );
            let mut x = patches + positions;
            if let Some(cls) = &self.cls_token {
                let cls = (cls + table.narrow(1, 0, 1)).expand([b, 1, cfg.hidden_size], true);
                x = Tensor::cat(&[cls, x], 1);
            }
            for layer in &self.layers {
                x = layer.forward(&x, None, precision);
            }
            let x = self.layernorm.forward(&x);
            x.narrow(1, prefix, x.size()[1] - prefix)
        })
    }
}
