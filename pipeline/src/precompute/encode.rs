//! The encode stage: a batch of uint8 crops → the cached fields of each sample, as raw little-endian
//! bytes in the dtypes of docs/cache-format.md. Runs on the thread that owns the libtorch models.

use model::vae::{self, AutoencoderKl};
use model::vision::VisionEncoder;
use stages::cache::{DType, FieldSpec};
use tch::{Device, Kind, Tensor};

use crate::config::{FeatureDType, LatentDType, PrecomputeConfig};

pub struct Encoders {
    /// The REPA target encoder (`precompute.encoder`), any family [`VisionEncoder`] reads; it owns its
    /// weights.
    pub encoder: Option<VisionEncoder>,
    pub vae: Option<AutoencoderKl>,
    pub device: Device,
    // The var stores own the weights the models point at.
    pub _stores: Vec<tch::nn::VarStore>,
}

/// The fields a cache shard holds, in order, for these settings and encoders.
pub fn field_specs(p: &PrecomputeConfig, image_size: usize, enc: &Encoders) -> Vec<FieldSpec> {
    let v = p.views();
    let mut fields = vec![FieldSpec::new("label", DType::I64, &[])];
    if p.store_image {
        fields.push(FieldSpec::new(
            "image",
            DType::U8,
            &[image_size, image_size, 3],
        ));
    }
    if let Some(vae) = &enc.vae {
        let f = vae.config.downsample_factor() as usize;
        let shape = [
            v,
            vae.config.latent_channels as usize,
            image_size / f,
            image_size / f,
        ];
        let dt = match p.vae_dtype {
            LatentDType::F16 => DType::F16,
            LatentDType::F32 => DType::F32,
        };
        fields.push(FieldSpec::new("vae_mean", dt, &shape));
        fields.push(FieldSpec::new("vae_std", dt, &shape));
    }
    if let Some(e) = &enc.encoder {
        let grid = e.grid(p.encoder_input_size) as usize;
        let shape = [v, grid * grid, e.hidden_size() as usize];
        let dt = match p.features_dtype {
            FeatureDType::F16 => DType::F16,
            FeatureDType::Bf16 => DType::Bf16,
            FeatureDType::I8 => DType::I8,
        };
        fields.push(FieldSpec::new("features", dt, &shape));
        if p.features_dtype == FeatureDType::I8 {
            fields.push(FieldSpec::new("features_scale", DType::F32, &shape[..2]));
        }
    }
    fields
}

/// One field of a launched batch: bytes made on the host, or a result on its way there.
enum Field {
    Bytes(Vec<u8>),
    /// On CUDA a pinned host tensor filled by a non-blocking copy; on the CPU the result itself.
    Host(Tensor),
}

/// A batch whose encoders have been launched. On CUDA its results are being copied to pinned host
/// memory behind `event`, so the next batch can be launched before these are read back.
pub struct Launched {
    fields: Vec<Field>,
    event: Option<torch_ext::event::CudaEvent>,
}

impl Launched {
    /// A batch without samples: `n` empty fields.
    pub fn empty(n: usize) -> Launched {
        Launched {
            fields: (0..n).map(|_| Field::Bytes(Vec::new())).collect(),
            event: None,
        }
    }

    /// Waits for this batch's copies only (not for batches launched since) and returns, per field,
    /// the whole batch's bytes.
    pub fn collect(self) -> anyhow::Result<Vec<Vec<u8>>> {
        if let Some(event) = &self.event {
            event.synchronize()?;
        }
        Ok(self
            .fields
            .into_iter()
            .map(|f| match f {
                Field::Bytes(b) => b,
                Field::Host(t) => {
                    let n = t.numel();
                    let mut out = vec![0u8; n * t.kind().elt_size_in_bytes()];
                    t.copy_data_u8(&mut out, n);
                    out
                }
            })
            .collect())
    }
}

/// `t` on its way to the host, row-major in its own dtype: a non-blocking copy into pinned memory on
/// CUDA (complete once the batch's event is), the tensor itself on the CPU.
fn to_host(t: &Tensor) -> Field {
    let t = t.contiguous();
    Field::Host(if t.device().is_cuda() {
        t.to_device_(Device::Cpu, t.kind(), true, false)
    } else {
        t
    })
}

/// (B·V, …) in view-major order (all crops, then all flips) → (B, V, …).
fn per_sample(t: Tensor, b: i64, v: i64) -> Tensor {
    let mut shape = vec![v, b];
    shape.extend_from_slice(&t.size()[1..]);
    t.view(shape.as_slice()).transpose(0, 1).contiguous()
}

/// Encodes `images` (B crops of side `size`, HWC RGB) and returns, per field, the whole batch's bytes
/// (B rows of `row_bytes`), in `field_specs` order. `labels` are −1 where the source had none.
pub fn encode_batch(
    p: &PrecomputeConfig,
    enc: &Encoders,
    images: &[&[u8]],
    labels: &[i64],
    size: usize,
) -> anyhow::Result<Vec<Vec<u8>>> {
    launch_batch(p, enc, images, labels, size)?.collect()
}

/// [`encode_batch`] without waiting for the results: on CUDA the work and the copies back are queued
/// and an event marks their end.
pub fn launch_batch(
    p: &PrecomputeConfig,
    enc: &Encoders,
    images: &[&[u8]],
    labels: &[i64],
    size: usize,
) -> anyhow::Result<Launched> {
    let b = images.len() as i64;
    let v = p.views() as i64;
    let s = size as i64;
    let flat: Vec<u8> = images.concat();
    let hwc = Tensor::from_slice(&flat).view([b, s, s, 3]);
    let mut out = vec![Field::Bytes(
        labels.iter().flat_map(|l| l.to_le_bytes()).collect(),
    )];
    if p.store_image {
        out.push(Field::Bytes(flat.clone()));
    }
    // On CUDA the upload comes from pinned memory and does not block this thread.
    let nchw = if enc.device.is_cuda() {
        hwc.pin_memory(enc.device)
            .to_device_(enc.device, Kind::Uint8, true, false)
            .permute([0, 3, 1, 2])
    } else {
        hwc.permute([0, 3, 1, 2])
    };
    // View 1 is the mirror of the crop: the same flip as stages::crop::hflip, done on the device.
    let views = if p.flip {
        Tensor::cat(&[&nchw, &nchw.flip([3])], 0)
    } else {
        nchw
    };
    if let Some(model) = &enc.vae {
        let (mean, logvar) = model.encode_moments(&vae::prepare_input(&views)?)?;
        let std = (logvar * 0.5).exp();
        let kind = match p.vae_dtype {
            LatentDType::F16 => Kind::Half,
            LatentDType::F32 => Kind::Float,
        };
        out.push(to_host(&per_sample(mean, b, v).to_kind(kind)));
        out.push(to_host(&per_sample(std, b, v).to_kind(kind)));
    }
    if let Some(model) = &enc.encoder {
        let tokens = per_sample(model.patch_tokens(&views, p.encoder_input_size)?, b, v);
        match p.features_dtype {
            FeatureDType::F16 => out.push(to_host(&tokens.to_kind(Kind::Half))),
            FeatureDType::Bf16 => out.push(to_host(&tokens.to_kind(Kind::BFloat16))),
            FeatureDType::I8 => {
                // Per-token symmetric scale: the largest |value| of each token maps to 127.
                let scale = (tokens.abs().amax([-1i64].as_slice(), true) / 127.0).clamp_min(1e-12);
                let q = (&tokens / &scale)
                    .round()
                    .clamp(-127.0, 127.0)
                    .to_kind(Kind::Int8);
                out.push(to_host(&q));
                out.push(to_host(&scale.squeeze_dim(-1).to_kind(Kind::Float)));
            }
        }
    }
    let event = match enc.device {
        Device::Cuda(index) => Some(torch_ext::event::CudaEvent::record(index)?),
        _ => None,
    };
    Ok(Launched { fields: out, event })
}
