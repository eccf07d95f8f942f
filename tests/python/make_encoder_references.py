"""Writes small random-init DINOv2 (transformers) and AutoencoderKL (diffusers) folders plus reference
outputs on fixed inputs, for tests/encoders.rs to compare the tch ports against.

Usage: make_encoder_references.py OUT_DIR

OUT_DIR/
  dinov2/            Dinov2Model, 518-px position table (as published), GELU MLP
  dinov2_reg/        Dinov2WithRegistersModel, 4 registers, 518-px position table
  dinov2_swiglu/     Dinov2Model with SwiGLU MLP (the ViT-g layout), 56-px table fed at 56 px
  vae/               AutoencoderKL as save_pretrained writes it (to_q, to_k, to_v, to_out.0)
  vae_legacy/        the same weights under the pre-0.14 names (query, key, value, proj_attn)
  references.safetensors
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from diffusers import AutoencoderKL
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def perturb(model, generator):
    # Fresh inits leave biases at 0, norms at 1 and layer scales at 1: a port that swapped or skipped
    # any of them would still match. Noise on every tensor makes each one matter.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def repa_preprocess(images_uint8, size):
    # REPA train.py preprocess_raw_image for dinov2: /255, ImageNet normalise, then bicubic resize.
    x = images_uint8.float() / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


def dinov2_tokens(model, pixels, registers):
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    return hidden[:, 1 + registers :].contiguous()


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    refs = {}

    # Preprocessing: 256-px crops (latent model) and 64-px images (pixel model), both to 224.
    images_256 = torch.randint(0, 256, (2, 3, 256, 256), generator=g, dtype=torch.uint8)
    images_64 = torch.randint(0, 256, (2, 3, 64, 64), generator=g, dtype=torch.uint8)
    refs["images_256"] = images_256
    refs["images_64"] = images_64
    refs["prepared_256"] = repa_preprocess(images_256, 224)
    refs["prepared_64"] = repa_preprocess(images_64, 224)

    small = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, patch_size=14, image_size=518)

    model = Dinov2Model(Dinov2Config(**small)).eval()
    perturb(model, g)
    model.save_pretrained(out / "dinov2")
    refs["dinov2_tokens_256"] = dinov2_tokens(model, refs["prepared_256"], 0)
    refs["dinov2_tokens_64"] = dinov2_tokens(model, refs["prepared_64"], 0)

    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**small, num_register_tokens=4)).eval()
    perturb(model, g)
    model.save_pretrained(out / "dinov2_reg")
    refs["dinov2_reg_tokens_256"] = dinov2_tokens(model, refs["prepared_256"], 4)

    swiglu = dict(small, image_size=56, use_swiglu_ffn=True)
    model = Dinov2Model(Dinov2Config(**swiglu)).eval()
    perturb(model, g)
    model.save_pretrained(out / "dinov2_swiglu")
    refs["swiglu_pixels"] = torch.randn((2, 3, 56, 56), generator=g)
    refs["dinov2_swiglu_tokens"] = dinov2_tokens(model, refs["swiglu_pixels"], 0)

    # VAE: three levels (downsample 4), a channel change (16 → 32, so a conv_shortcut) and none (32 → 32).
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()
    perturb(vae, g)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    vae_images = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    refs["vae_images"] = vae_images
    refs["vae_input"] = vae_images.float() / 127.5 - 1.0
    refs["vae_latents"] = torch.randn((2, 4, 8, 8), generator=g)
    with torch.no_grad():
        posterior = vae.encode(refs["vae_input"]).latent_dist
        refs["vae_mean"] = posterior.mean.contiguous()
        refs["vae_logvar"] = posterior.logvar.contiguous()
        refs["vae_decoded"] = vae.decode(refs["vae_latents"]).sample

    # The legacy file: same tensors, attention projections under their pre-0.14 names.
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert any(".attentions.0.to_q." in k for k in state), "diffusers no longer writes to_q names"
    legacy = {}
    for name, tensor in state.items():
        for new, old in legacy_names.items():
            name = name.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[name] = tensor
    (out / "vae_legacy").mkdir(exist_ok=True)
    save_file(legacy, out / "vae_legacy" / "diffusion_pytorch_model.safetensors")
    shutil.copy(out / "vae" / "config.json", out / "vae_legacy" / "config.json")
    # diffusers itself must read the legacy file back to the same model, or it is not a real legacy file.
    reloaded = AutoencoderKL.from_pretrained(out / "vae_legacy").eval()
    with torch.no_grad():
        again = reloaded.encode(refs["vae_input"]).latent_dist.mean
    assert torch.equal(again, refs["vae_mean"]), "diffusers reads the legacy file differently"

    save_file({k: v.contiguous() for k, v in refs.items()}, out / "references.safetensors")
    print(json.dumps({"written": sorted(refs)}))


if __name__ == "__main__":
    main()
