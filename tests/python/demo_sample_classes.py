"""Do the demo's samples show their classes? A colour statistic, no learning beyond class means.

The demo classes differ in the object's hue (class k: hue frac(0.618·k), saturation ≥ 0.65) on a grey-ish
background (saturation ≤ 0.25). Each image becomes a hue histogram of its saturated pixels; the class
means come from the held-out shard's crops; every sample of `samples.npz` is assigned to the nearest
mean. Prints JSON: accuracy on the held-out crops themselves (the statistic's ceiling), on the samples
(`arr_1` labels), and chance.

Usage: demo_sample_classes.py HELDOUT.tar SAMPLES.npz SIZE
"""
import io
import json
import sys
import tarfile

import numpy as np
from PIL import Image

BINS = 36


def crop(img, size):
    """ADM centre crop: box-halve while the short side ≥ 2·size, bicubic to size, centre crop."""
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


def feature(rgb):
    hsv = np.array(Image.fromarray(rgb).convert("HSV")).reshape(-1, 3).astype(np.float64) / 255.0
    keep = (hsv[:, 1] > 0.45) & (hsv[:, 2] > 0.25)
    hist = np.histogram(hsv[keep, 0], bins=BINS, range=(0.0, 1.0))[0].astype(np.float64)
    return hist / max(hist.sum(), 1.0)


def main():
    tar_path, npz_path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    members = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            if m.isfile():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    feats, labels = [], []
    for key in sorted(members):
        entry = members[key]
        img = Image.open(io.BytesIO(entry["jpg"])).convert("RGB")
        feats.append(feature(crop(img, size)))
        labels.append(int(entry["cls"].decode().strip()))
    feats, labels = np.stack(feats), np.array(labels)
    classes = np.unique(labels)
    means = np.stack([feats[labels == k].mean(0) for k in classes])

    def assign(f):
        return classes[np.argmin(((f[:, None, :] - means[None]) ** 2).sum(-1), axis=1)]

    data = np.load(npz_path)
    samples, sample_labels = data["arr_0"], data["arr_1"]
    sample_feats = np.stack([feature(s) for s in samples])
    print(json.dumps({
        "heldout_accuracy": float((assign(feats) == labels).mean()),
        "sample_accuracy": float((assign(sample_feats) == sample_labels).mean()),
        "chance": 1.0 / len(classes),
        "samples": int(len(samples)),
    }))


if __name__ == "__main__":
    main()
