"""Writes a tiny random-init AutoencoderKL folder (diffusers layout) for the latent sampling test:
two levels (downsample 2), 4 latent channels. Usage: make_tiny_vae.py OUT_DIR"""
import sys

import torch
from diffusers import AutoencoderKL

torch.manual_seed(0)
vae = AutoencoderKL(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 8),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
).eval()
vae.save_pretrained(sys.argv[1], safe_serialization=True)
