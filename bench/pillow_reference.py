"""Pillow reference for `pipeline bench decode`: Python webdataset reads the same shards, then Pillow
decodes and applies ADM center_crop_arr, single-threaded. Prints one JSON line of images per second
(best of --repeats passes over the images held in memory).

Rows: decode = Image.open + convert("RGB"); decode_adm = that + center_crop_arr(size);
draft_adm = Image.draft("RGB", (size, size)) first (DCT-domain downscale, as the Rust `dct` mode).
"""
import argparse
import io
import json
import os
import sys
import time

import webdataset as wds
from PIL import Image

# The same ADM crop the parity test checks the Rust crop against.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))
from pillow_crops import adm_center_crop as center_crop_arr  # noqa: E402


def load(spec, limit):
    images = []
    for sample in wds.WebDataset(spec, shardshuffle=False, empty_check=False):
        data = next((sample[k] for k in ("jpg", "jpeg", "png") if k in sample), None)
        if data is None:
            continue
        try:
            Image.open(io.BytesIO(data)).convert("RGB")
        except Exception:  # noqa: BLE001 - the Rust side skips undecodable members too
            continue
        images.append(data)
        if len(images) >= limit:
            break
    return images


def best_rate(images, work, repeats):
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        for data in images:
            work(data)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    images = load(a.shards, a.limit)

    def decode(data):
        return Image.open(io.BytesIO(data)).convert("RGB")

    def decode_adm(data):
        return center_crop_arr(decode(data), a.size)

    def draft_adm(data):
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (a.size, a.size))
        return center_crop_arr(im.convert("RGB"), a.size)

    result = {"images": len(images), "size": a.size}
    for name, work in (("decode", decode), ("decode_adm", decode_adm), ("draft_adm", draft_adm)):
        result[name] = best_rate(images, work, a.repeats)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
