"""The anchor for `pipeline bench fid`: pytorch-fid's `InceptionV3` (pool3, the FID network) with random
weights, on the torch (libtorch) and thread count the Rust side uses; and pytorch-fid's
`calculate_frechet_distance` (scipy sqrtm) on random covariances of the feature width.

Usage: fid_reference.py --threads N --batch B --size S --frechet-dim D

Serves timing requests so that the Rust side can interleave its own batches with these and both see the
same machine load: reads one command per line on stdin and answers one JSON line. `forward` times one
batch of uint8 (B, S, S, 3) images through what pytorch-fid does per batch (ToTensor's x / 255 in NCHW,
then the model, which resizes to 299 and normalises) and answers `{"seconds": s}`; `frechet` times one
Fréchet distance and answers `{"seconds": s, "value": fid}`; `info` answers versions and threads; end of
input ends it.
"""

import argparse
import json
import sys
import time
from importlib.metadata import version
from unittest import mock

import numpy as np
import torch

import pytorch_fid.inception as pfi
from pytorch_fid.fid_score import calculate_frechet_distance


def random_model():
    """pytorch-fid's InceptionV3([3]) without its download, with He-normal convolutions and identity batch
    norms so that activations keep their scale through the network, as with trained weights."""
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda *a, **k: None):
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.reset_parameters()
    return model.eval()


def random_statistics(rng, d):
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal(d), a @ a.T + 0.01 * np.eye(d)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--frechet-dim", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = random_model()
    images = torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8)
    rng = np.random.default_rng(0)

    def forward():
        x = images.permute(0, 3, 1, 2).float().div(255)
        model(x)[0].squeeze(3).squeeze(2)

    for line in sys.stdin:
        command = line.strip()
        if command == "info":
            answer = {"torch": torch.__version__, "pytorch_fid": version("pytorch-fid"),
                      "threads": torch.get_num_threads()}
        elif command == "forward":
            with torch.no_grad():
                start = time.perf_counter()
                forward()
                answer = {"seconds": time.perf_counter() - start}
        elif command == "frechet" and args.frechet_dim > 0:
            (mu1, s1), (mu2, s2) = (random_statistics(rng, args.frechet_dim) for _ in range(2))
            start = time.perf_counter()
            value = calculate_frechet_distance(mu1, s1, mu2, s2)
            answer = {"seconds": time.perf_counter() - start, "value": float(value)}
        else:
            answer = {"error": f"unknown command {command!r}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
