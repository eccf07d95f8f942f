"""The anchor for `pipeline bench encoders`: the transformers vision towers and the diffusers SD-VAE encoder
with random weights at the real sizes, on the torch (libtorch) and thread count the Rust side uses.

Usage: encoders_reference.py --threads N --tower-batch B [--vae-batch B]

Serves timing requests so that the Rust side can interleave its own batches with these and both see the
same machine load: reads one command per line on stdin, a family name from TOWERS (`dinov2`, `clip`, ...)
or `vae`, runs one batch of that model and answers one line `{"seconds": S}`; `params NAME` answers
`{"parameters": N}`; `info` answers the torch version and thread count; end of input ends it. Towers are
built on first use and only the last one is kept, so that the ViT-H of I-JEPA does not sit beside the rest.
"""

import argparse
import functools
import json
import sys
import time

import torch
from transformers import (CLIPVisionConfig, CLIPVisionModel, DINOv3ViTConfig, DINOv3ViTModel, Dinov2Config,
                          Dinov2Model, IJepaConfig, IJepaModel, SiglipVisionConfig, SiglipVisionModel,
                          ViTMAEConfig, ViTMAEModel)

VIT_B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)

# The published base tower of each family (I-JEPA: its smallest, ViT-H/14), as `TowerConfig::base` builds
# it on the Rust side; every one is fed 224 px.
TOWERS = {
    # facebook/dinov2-base: 518-px position table, fed 224 px (REPA).
    "dinov2": lambda: Dinov2Model(Dinov2Config(**VIT_B, patch_size=14, image_size=518)),
    # openai/clip-vit-base-patch16.
    "clip": lambda: CLIPVisionModel(CLIPVisionConfig(**VIT_B, intermediate_size=3072, patch_size=16,
                                                     image_size=224)),
    # google/siglip-base-patch16-224 without the attention-pooling head, which our port does not have.
    "siglip": lambda: SiglipVisionModel(SiglipVisionConfig(**VIT_B, intermediate_size=3072, patch_size=16,
                                                           image_size=224, vision_use_head=False)),
    # facebook/vit-mae-base as an encoder: no masking (ratio 0 still shuffles and gathers all patches).
    "mae": lambda: ViTMAEModel(ViTMAEConfig(**VIT_B, intermediate_size=3072, patch_size=16, image_size=224,
                                            mask_ratio=0.0)),
    # facebook/ijepa_vith14_1k.
    "ijepa": lambda: IJepaModel(IJepaConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                                            intermediate_size=5120, patch_size=14, image_size=224,
                                            layer_norm_eps=1e-6)),
    # facebook/dinov3-vitb16-pretrain-lvd1689m.
    "dinov3": lambda: DINOv3ViTModel(DINOv3ViTConfig(**VIT_B, intermediate_size=3072, patch_size=16,
                                                     image_size=224, num_register_tokens=4)),
}


@functools.lru_cache(maxsize=1)
def tower(name):
    return TOWERS[name]().eval()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--tower-batch", type=int, required=True)
    parser.add_argument("--vae-batch", type=int, help="omitted: no VAE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    pixels = torch.randn(args.tower_batch, 3, 224, 224)
    run = {name: (lambda name=name: tower(name)(pixel_values=pixels)) for name in TOWERS}
    if args.vae_batch:
        from diffusers import AutoencoderKL

        # stabilityai/sd-vae-ft-ema: the SD 1.x AutoencoderKL; encoder + quant_conv at 256 px.
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256).eval()
        images = torch.rand(args.vae_batch, 3, 256, 256) * 2 - 1
        run["vae"] = lambda: vae.encode(images).latent_dist

    for line in sys.stdin:
        command, _, name = line.strip().partition(" ")
        if command == "info":
            answer = {"torch": torch.__version__, "threads": torch.get_num_threads()}
        elif command == "params" and name in TOWERS:
            answer = {"parameters": sum(p.numel() for p in tower(name).parameters())}
        elif command in run and not name:
            if command in TOWERS:
                tower(command)  # built outside the timing
            with torch.no_grad():
                start = time.perf_counter()
                run[command]()
                answer = {"seconds": time.perf_counter() - start}
        else:
            answer = {"error": f"unknown command {line.strip()!r}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
