"""Reads `pipeline sample` outputs with numpy and Pillow and prints what the Rust test asserts on as JSON.
Usage: check_samples.py OUT_DIR [OTHER_OUT_DIR ...]"""
import json
import sys

import numpy as np
from PIL import Image

dirs = sys.argv[1:]
npz = np.load(f"{dirs[0]}/samples.npz")
arr, labels = npz["arr_0"], npz["arr_1"]
grid = np.asarray(Image.open(f"{dirs[0]}/grid.png").convert("RGB"))
h = arr.shape[1]
first_png = np.asarray(Image.open(f"{dirs[0]}/images/000000.png").convert("RGB"))
last_png = np.asarray(Image.open(f"{dirs[0]}/images/{len(arr) - 1:06d}.png").convert("RGB"))
print(json.dumps({
    "files": sorted(npz.files),
    "shape": list(arr.shape),
    "dtype": str(arr.dtype),
    "labels": labels.tolist(),
    "labels_dtype": str(labels.dtype),
    "grid": [grid.shape[1], grid.shape[0]],
    # The first grid cell sits after the 2-pixel padding.
    "grid_first_cell_is_sample_0": bool((grid[2:2 + h, 2:2 + h] == arr[0]).all()),
    "png_matches_npz": bool((first_png == arr[0]).all() and (last_png == arr[-1]).all()),
    "same_as": [bool(np.array_equal(arr, np.load(f"{d}/samples.npz")["arr_0"])) for d in dirs[1:]],
    # Values that differ, and by how many levels at most, from each other directory's samples.
    "differ": [[int((arr != o).sum()), int(np.abs(arr.astype(int) - o.astype(int)).max())]
               for o in (np.load(f"{d}/samples.npz")["arr_0"] for d in dirs[1:])],
    "distinct_samples": int(len({a.tobytes() for a in arr})),
    "std": float(arr.std()),
}))
