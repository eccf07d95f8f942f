"""Writes small random-init CLIP vision towers and a DINOv2 (transformers) as save_pretrained lays them
out, plus reference patch tokens on fixed inputs, for model/tests/clip_parity.rs.

Usage: clip_reference.py OUT_DIR

OUT_DIR/
  clip/        CLIPVisionModel (transformers 5 saves it without the `vision_model.` prefix)
  clip_full/   CLIPModel with the same vision weights (`vision_model.*`, text tower, projections)
  dinov2/      Dinov2Model, to check that the family is chosen by model_type
  references.safetensors
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
)

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def perturb(model, generator, scale):
    # Fresh inits leave biases at 0 and norms at 1, and the position table is nearly flat: a port that
    # swapped or skipped any of them, or interpolated the table differently, would still match.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def tokens(model, pixels, **kwargs):
    # Drops the class token, as the Rust ports do.
    with torch.no_grad():
        out = model(pixel_values=pixels, **kwargs)
    return out.last_hidden_state[:, 1:].contiguous()


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    refs = {}

    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=8,
        image_size=32,
    )
    clip = CLIPVisionModel(vision).eval()
    perturb(clip, g, 0.1)
    clip.save_pretrained(out / "clip")

    full = CLIPModel(
        CLIPConfig(
            vision_config=vision.to_dict(),
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        )
    ).eval()
    full.vision_model.load_state_dict(clip.state_dict())
    full.save_pretrained(out / "clip_full")

    # Prepared input at the trained 32 px, and at 44 × 28 px (a 5 × 3 grid, sides not multiples of 8).
    for name, (h, w) in {"default": (32, 32), "interp": (44, 28)}.items():
        pixels = torch.randn(2, 3, h, w, generator=g)
        refs[f"pixels_{name}"] = pixels
        refs[f"clip_{name}"] = tokens(clip, pixels, interpolate_pos_encoding=True)

    # uint8 images through REPA's CLIP preprocessing: /255, bicubic resize, then normalise.
    images = torch.randint(0, 256, (2, 3, 20, 20), generator=g, dtype=torch.uint8)
    refs["images"] = images
    x = F.interpolate(images.float() / 255.0, size=(32, 32), mode="bicubic", align_corners=False)
    refs["clip_images"] = tokens(clip, (x - CLIP_MEAN) / CLIP_STD)

    dinov2 = Dinov2Model(
        Dinov2Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8, image_size=32
        )
    ).eval()
    perturb(dinov2, g, 0.05)
    dinov2.save_pretrained(out / "dinov2")
    x = (images.float() / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    x = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False)
    refs["dinov2_images"] = tokens(dinov2, x)

    save_file({k: v.contiguous() for k, v in refs.items()}, str(out / "references.safetensors"))


if __name__ == "__main__":
    main()
