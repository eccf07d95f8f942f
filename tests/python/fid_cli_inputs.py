"""Inputs and references for the `pipeline fid` / `fid-stats` CLI test in tests/fid.rs.

Reads every image of the webdataset shards, ADM-centre-crops it with Pillow at SIZE (the crop the data
pipeline reproduces bit for bit) and writes into OUT_DIR:
  pngs/KEY.png           the crops
  samples.npz            arr_0 uint8 (N, SIZE, SIZE, 3), keys in sorted order (as the PNG directory
                         lists), written with np.savez_compressed (deflate members)
  pytorch_fid_stats.npz  mu, sigma of pytorch-fid's pool3 features of the crops with the state dict in
                         PTH, as `python -m pytorch_fid --save-stats` writes them (savez_compressed)

Usage: fid_cli_inputs.py OUT_DIR SHARD_SPEC SIZE PTH
"""
import io
import os
import sys

import numpy as np
import torch
import webdataset as wds
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_inception_references import pytorch_fid_model  # noqa: E402
from pillow_crops import adm_center_crop  # noqa: E402


def main():
    out_dir, spec, size, pth = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    os.makedirs(os.path.join(out_dir, "pngs"), exist_ok=True)
    crops = {}
    for sample in wds.WebDataset(spec, shardshuffle=False, empty_check=False):
        data = next((sample[k] for k in ("jpg", "jpeg", "png") if k in sample), None)
        with Image.open(io.BytesIO(data)) as im:
            crops[sample["__key__"]] = adm_center_crop(im.convert("RGB"), size)
    keys = sorted(crops)
    for key in keys:
        Image.fromarray(crops[key]).save(os.path.join(out_dir, "pngs", f"{key}.png"))
    arr = np.stack([crops[k] for k in keys]).astype(np.uint8)
    np.savez_compressed(os.path.join(out_dir, "samples.npz"), arr_0=arr)

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model = pytorch_fid_model(torch.load(pth, weights_only=True))
    with torch.no_grad():
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255)
        act = model(x)[0].squeeze(3).squeeze(2).double().numpy()
    np.savez_compressed(os.path.join(out_dir, "pytorch_fid_stats.npz"), mu=np.mean(act, axis=0),
                        sigma=np.cov(act, rowvar=False))


if __name__ == "__main__":
    main()
