"""The anchor for `pipeline bench encoders`: transformers DINOv2-B and the diffusers SD-VAE encoder with
random weights at the real sizes, on the torch (libtorch) and thread count the Rust side uses.

Usage: encoders_reference.py --threads N --dinov2-batch B --vae-batch B

Serves timing requests so that the Rust side can interleave its own batches with these and both see the
same machine load: reads one command per line on stdin, `dinov2` or `vae`, runs one batch of that model
and answers one line `{"seconds": S}`; `info` answers the torch version and thread count; end of input
ends it.
"""

import argparse
import json
import sys
import time

import torch
from diffusers import AutoencoderKL
from transformers import Dinov2Config, Dinov2Model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--dinov2-batch", type=int, required=True)
    parser.add_argument("--vae-batch", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # facebook/dinov2-base: ViT-B/14, 518-px position table, fed 224 px (REPA).
    dinov2 = Dinov2Model(Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                      patch_size=14, image_size=518)).eval()
    pixels = torch.randn(args.dinov2_batch, 3, 224, 224)
    # stabilityai/sd-vae-ft-ema: the SD 1.x AutoencoderKL; encoder + quant_conv at 256 px.
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        norm_num_groups=32, sample_size=256).eval()
    images = torch.rand(args.vae_batch, 3, 256, 256) * 2 - 1
    run = {
        "dinov2": lambda: dinov2(pixel_values=pixels),
        "vae": lambda: vae.encode(images).latent_dist,
    }

    for line in sys.stdin:
        command = line.strip()
        if command == "info":
            answer = {"torch": torch.__version__, "threads": torch.get_num_threads()}
        elif command in run:
            with torch.no_grad():
                start = time.perf_counter()
                run[command]()
                answer = {"seconds": time.perf_counter() - start}
        else:
            answer = {"error": f"unknown command {command!r}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
