"""Inputs and references for the `pipeline fid` / `fid-stats` CLI test in tests/fid.rs.

Reads every image of the webdataset shards, ADM-centre-crops it with Pillow at SIZE (the crop the data
pipeline reproduces bit for bit) and writes into OUT_DIR:
  pngs/KEY.png           the crops
  samples.npz            arr_0 uint8 (N, SIZE, SIZE, 3), keys in sorted order (as the PNG directory
                         lists), written with np.savez_compressed (deflate members)
  pytorch_fid_stats.npz  mu, sigma of pytorch-fid's pool3 features of the crops with the state dict in
                         PTH, as `python -m pytorch_fid --save-stats` writes them (savez_compressed):
                         an old-style reference without sFID statistics or activations
  adm_ref.npz            the layout of ADM's reference batches (VIRTUAL_imagenet256_labeled.npz):
                         arr_0 (the crops, uint8 N×SIZE×SIZE×3), mu, sigma, mu_s, sigma_s (float64), with
                         the statistics of pytorch-fid's network; written with np.savez
  pytorch_fid_acts.npz   acts (float32 N×2048 pool3), spatial (float32 N×2023), mu_s, sigma_s

The spatial (sFID) features are taken as ADM's evaluator takes them from the TF graph: `mixed_6/conv`,
i.e. the ReLU output of Mixed_6d's 1×1 branch (the third of pytorch-fid's FIDInceptionC blocks), its
first 7 channels, flattened in NHWC order (17·17·7 = 2023 values per image).

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
import pytorch_fid.inception as pfi  # noqa: E402
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
    mixed_6d = [m for m in model.modules() if isinstance(m, pfi.FIDInceptionC)][2]
    captured = []
    mixed_6d.branch1x1.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255)
        act32 = model(x)[0].squeeze(3).squeeze(2).numpy()
    act = act32.astype(np.float64)
    spatial32 = captured[0][:, :7].permute(0, 2, 3, 1).reshape(len(arr), -1).numpy()
    assert spatial32.shape[1] == 2023, spatial32.shape
    spatial = spatial32.astype(np.float64)
    mu, sigma = np.mean(act, axis=0), np.cov(act, rowvar=False)
    mu_s, sigma_s = np.mean(spatial, axis=0), np.cov(spatial, rowvar=False)
    np.savez_compressed(os.path.join(out_dir, "pytorch_fid_stats.npz"), mu=mu, sigma=sigma)
    np.savez(os.path.join(out_dir, "adm_ref.npz"), arr_0=arr, mu=mu, sigma=sigma, mu_s=mu_s,
             sigma_s=sigma_s)
    np.savez(os.path.join(out_dir, "pytorch_fid_acts.npz"), acts=act32, spatial=spatial32, mu_s=mu_s,
             sigma_s=sigma_s)


if __name__ == "__main__":
    main()
