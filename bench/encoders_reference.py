"""The anchor for `pipeline bench encoders`: transformers DINOv2-B and diffusers SD-VAE encoder with
random weights at the real sizes, on the torch (libtorch) and thread count the Rust side uses.

Usage: encoders_reference.py --threads N --dinov2-batch B --vae-batch B --iters N --warmup N
Prints one JSON object: seconds per batch (median) and images per second for each model.
"""

import argparse
import json
import statistics
import time

import torch
from diffusers import AutoencoderKL
from transformers import Dinov2Config, Dinov2Model


def median_seconds(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--dinov2-batch", type=int, required=True)
    parser.add_argument("--vae-batch", type=int, required=True)
    parser.add_argument("--iters", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads()}

    # facebook/dinov2-base: ViT-B/14, 518-px position table, fed 224 px (REPA).
    dinov2 = Dinov2Model(Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                      patch_size=14, image_size=518)).eval()
    pixels = torch.randn(args.dinov2_batch, 3, 224, 224)
    with torch.no_grad():
        s = median_seconds(lambda: dinov2(pixel_values=pixels), args.iters, args.warmup)
    result["dinov2"] = {"seconds_per_batch": s, "images_per_s": args.dinov2_batch / s}
    del dinov2

    # stabilityai/sd-vae-ft-ema: the SD 1.x AutoencoderKL, encoder + quant_conv at 256 px.
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        norm_num_groups=32, sample_size=256).eval()
    images = torch.rand(args.vae_batch, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        s = median_seconds(lambda: vae.encode(images).latent_dist, args.iters, args.warmup)
    result["vae_encoder"] = {"seconds_per_batch": s, "images_per_s": args.vae_batch / s}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
