"""Reference crops with Pillow, for stages/tests/pillow_parity.rs.

Reads every sample of the given webdataset shards with the `webdataset` package, and for each image
member writes what Pillow makes of the same bytes:
  KEY.decode.rgb   Image.open(...).convert("RGB")
  KEY.adm256.rgb   ADM center_crop_arr at 256 (guided-diffusion image_datasets.py, as DiT/REPA use it)
  KEY.adm64.rgb    the same at 64
  KEY.tv64.rgb     torchvision Resize(64) + CenterCrop(64) on the PIL image (bilinear, antialiased)
plus index.json: {key: {"width", "height"} or {"error"}}.

Usage: pillow_crops.py OUT_DIR SHARD_SPEC
"""
import io
import json
import os
import sys

import numpy as np
import webdataset as wds
from PIL import Image


def adm_center_crop(pil_image, image_size):
    # Box-halve while the short side allows it, one bicubic resize to the target short side, then a
    # floor-centred crop: the steps of ADM's center_crop_arr.
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def torchvision_resize_center_crop(pil_image, size):
    # torchvision.transforms.Resize(size) on a PIL image: short side to `size`, long side truncated,
    # PIL bilinear; CenterCrop(size): offsets round((extent - size) / 2).
    w, h = pil_image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    pil_image = pil_image.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return np.array(pil_image.crop((left, top, left + size, top + size)))


def main():
    out_dir, spec = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    index = {}
    dataset = wds.WebDataset(spec, shardshuffle=False, empty_check=False)
    for sample in dataset:
        key = sample["__key__"]
        data = next((sample[k] for k in ("jpg", "jpeg", "png") if k in sample), None)
        if data is None:
            continue
        try:
            with Image.open(io.BytesIO(data)) as im:
                rgb = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - broken members are part of the test set
            index[key] = {"error": f"{type(e).__name__}: {e}"}
            continue
        index[key] = {"width": rgb.width, "height": rgb.height}
        outputs = {
            "decode": np.array(rgb),
            "adm256": adm_center_crop(rgb, 256),
            "adm64": adm_center_crop(rgb, 64),
            "tv64": torchvision_resize_center_crop(rgb, 64),
        }
        for name, arr in outputs.items():
            with open(os.path.join(out_dir, f"{key}.{name}.rgb"), "wb") as f:
                f.write(np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f)


if __name__ == "__main__":
    main()
