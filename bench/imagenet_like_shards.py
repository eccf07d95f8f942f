"""Writes webdataset shards of JPEGs with ImageNet's typical sizes (500x375, 500x333, 375x500, ...)
and its bytes per pixel (smooth shapes plus fine noise, quality 90: ~100 KiB each), for
`pipeline bench decode` where no ImageNet is at hand. The demo data's smooth drawings have a third of
ImageNet's bytes per pixel, which makes entropy decoding (most of a decode) unusually cheap.

    .venv/bin/python bench/imagenet_like_shards.py OUT_DIR [--images 400] [--shards 4] [--seed 0]
"""
import argparse
import io
import os
import tarfile

import numpy as np
from PIL import Image

SIZES = [(500, 375), (500, 333), (375, 500), (500, 400), (333, 500), (640, 480), (500, 500)]


def image(rng, width, height):
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.3)]
        out[..., c] = 128 + 80 * np.sin(fx * x + fy * y + phase)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 150)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        out[mask] = rng.uniform(0, 255, 3)
    out += rng.normal(0, 12, out.shape)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    per_shard = -(-a.images // a.shards)
    for s in range(a.shards):
        path = os.path.join(a.out, f"like-{s:06d}.tar")
        with tarfile.open(path + ".tmp", "w") as tar:
            for i in range(s * per_shard, min(a.images, (s + 1) * per_shard)):
                w, h = SIZES[rng.integers(len(SIZES))]
                buf = io.BytesIO()
                image(rng, w, h).save(buf, "JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
