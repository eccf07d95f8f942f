"""Writes small random-init SigLIP, MAE, I-JEPA and DINOv3 vision encoders as save_pretrained lays them
out, plus reference patch tokens on fixed inputs, for model/tests/encoder_parity.rs.

Usage: encoder_reference.py OUT_DIR

OUT_DIR/
  siglip/           SiglipVisionModel (transformers 5 saves it without the `vision_model.` prefix)
  siglip_full/      SiglipModel with the same vision weights (`vision_model.*`, a tiny text tower)
  mae/              ViTMAEModel, config mask_ratio 0.0
  mae_pretraining/  ViTMAEForPreTraining with the same encoder (`vit.*`, a tiny `decoder.*`), mask_ratio 0.75
  ijepa/            IJepaModel
  dinov3/           DINOv3ViTModel with 2 register tokens (RoPE, layer scale)
  references.safetensors
    pixels_default (2, 3, 32, 32), pixels_interp (2, 3, 44, 28): prepared float inputs
    {family}_default, {family}_interp: patch tokens (B, N, D) on them (class / register tokens dropped)
    images (2, 3, 20, 20) uint8
    {family}_images: patch tokens of `images` through the family's preprocessing at 32 px
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import (
    DINOv3ViTConfig,
    DINOv3ViTModel,
    IJepaConfig,
    IJepaModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTMAEModel,
)

SIGLIP_MEAN = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
SIGLIP_STD = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

SIZE = 32
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=8,
    image_size=SIZE,
)
REGISTERS = 2


def perturb(model, generator, scale):
    # Fresh inits leave biases at 0, norms and layer scales at 1, and position tables nearly flat (or
    # exactly sin-cos for MAE): a port that swapped or skipped any of them, or interpolated the table
    # differently, would still match.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def siglip_tokens(model, pixels):
    # No class token; last_hidden_state includes post_layernorm.
    with torch.no_grad():
        out = model(pixel_values=pixels, interpolate_pos_encoding=True)
    return out.last_hidden_state.contiguous()


def mae_tokens(model, pixels):
    # With ratio 0 and increasing noise, random_masking keeps every patch in order.
    b, _, h, w = pixels.shape
    n = (h // 8) * (w // 8)
    noise = torch.arange(n).float().expand(b, n)
    with torch.no_grad():
        out = model(pixel_values=pixels, noise=noise, interpolate_pos_encoding=True)
    assert torch.equal(out.ids_restore, torch.arange(n).expand(b, n)), out.ids_restore
    assert not out.mask.any(), out.mask
    assert out.last_hidden_state.shape[1] == n + 1
    return out.last_hidden_state[:, 1:].contiguous()


def ijepa_tokens(model, pixels):
    # No class token.
    with torch.no_grad():
        out = model(pixel_values=pixels, interpolate_pos_encoding=True)
    return out.last_hidden_state.contiguous()


def dinov3_tokens(model, pixels):
    # Drops the class and register tokens; RoPE in eval mode has no coordinate augmentation.
    assert not model.training
    with torch.no_grad():
        out = model(pixel_values=pixels)
    return out.last_hidden_state[:, 1 + REGISTERS :].contiguous()


def preprocess(images, mean, std):
    # Normalise, then bicubic resize, as the Rust preprocessing for these families does.
    x = (images.float() / 255.0 - mean) / std
    return F.interpolate(x, size=(SIZE, SIZE), mode="bicubic", align_corners=False)


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4321)
    refs = {}

    # SigLIP: bare vision tower and a full SiglipModel holding the same vision weights.
    vision = SiglipVisionConfig(**TINY)
    siglip = SiglipVisionModel(vision).eval()
    perturb(siglip, g, 0.1)
    siglip.save_pretrained(out / "siglip")
    siglip_full = SiglipModel(
        SiglipConfig(
            vision_config=vision.to_dict(),
            text_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                vocab_size=100,
                max_position_embeddings=16,
                pad_token_id=1,
                bos_token_id=2,
                eos_token_id=3,
            ),
        )
    ).eval()
    siglip_full.vision_model.load_state_dict(siglip.state_dict())
    siglip_full.save_pretrained(out / "siglip_full")

    # MAE: the encoder alone (ratio 0) and the pre-training model with the same encoder and a decoder.
    mae = ViTMAEModel(ViTMAEConfig(**TINY, mask_ratio=0.0)).eval()
    perturb(mae, g, 0.1)
    mae.save_pretrained(out / "mae")
    mae_pretraining = ViTMAEForPreTraining(
        ViTMAEConfig(
            **TINY,
            decoder_hidden_size=32,
            decoder_intermediate_size=64,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2,
        )
    ).eval()
    mae_pretraining.vit.load_state_dict(mae.state_dict())
    mae_pretraining.save_pretrained(out / "mae_pretraining")

    ijepa = IJepaModel(IJepaConfig(**TINY)).eval()
    perturb(ijepa, g, 0.1)
    ijepa.save_pretrained(out / "ijepa")

    dinov3 = DINOv3ViTModel(DINOv3ViTConfig(**TINY, num_register_tokens=REGISTERS)).eval()
    perturb(dinov3, g, 0.05)
    with torch.no_grad():
        # Layer scales start at exactly 1; move them well away so a port that skips them fails.
        for layer in dinov3.model.layer:
            for scale in (layer.layer_scale1, layer.layer_scale2):
                scale.lambda1.add_(torch.randn(scale.lambda1.shape, generator=g) * 0.3)
    dinov3.save_pretrained(out / "dinov3")

    families = {
        "siglip": (siglip, siglip_tokens, SIGLIP_MEAN, SIGLIP_STD),
        "mae": (mae, mae_tokens, IMAGENET_MEAN, IMAGENET_STD),
        "ijepa": (ijepa, ijepa_tokens, IMAGENET_MEAN, IMAGENET_STD),
        "dinov3": (dinov3, dinov3_tokens, IMAGENET_MEAN, IMAGENET_STD),
    }

    # Prepared input at the trained 32 px, and at 44 × 28 px (a 5 × 3 grid; 44 is not a multiple of 8).
    for name, (h, w) in {"default": (32, 32), "interp": (44, 28)}.items():
        pixels = torch.randn(2, 3, h, w, generator=g)
        refs[f"pixels_{name}"] = pixels
        for family, (model, tokens, _, _) in families.items():
            refs[f"{family}_{name}"] = tokens(model, pixels)
            assert refs[f"{family}_{name}"].shape == (2, (h // 8) * (w // 8), 64), (
                family,
                name,
                refs[f"{family}_{name}"].shape,
            )

    # The full models give the same vision tokens as the bare ones.
    with torch.no_grad():
        a = siglip_full.vision_model(pixel_values=refs["pixels_interp"], interpolate_pos_encoding=True)
    assert torch.allclose(a.last_hidden_state, refs["siglip_interp"], atol=1e-6)
    encoder = mae.state_dict()
    assert all(torch.equal(v, encoder[k]) for k, v in mae_pretraining.vit.state_dict().items())

    # uint8 images through each family's preprocessing at 32 px.
    images = torch.randint(0, 256, (2, 3, 20, 20), generator=g, dtype=torch.uint8)
    refs["images"] = images
    for family, (model, tokens, mean, std) in families.items():
        refs[f"{family}_images"] = tokens(model, preprocess(images, mean, std))

    save_file({k: v.contiguous() for k, v in refs.items()}, str(out / "references.safetensors"))


if __name__ == "__main__":
    main()
