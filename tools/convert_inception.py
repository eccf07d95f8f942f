"""Converts pytorch-fid's Inception weights (a pickled PyTorch state dict) to the safetensors file that
`pipeline fid` and `pipeline fid-stats` read, keeping every tensor name.

Download the published file once (nothing is fetched at run time):

    curl -LO https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    python tools/convert_inception.py pt_inception-2015-12-05-6726825d.pth
    # -> ~/.cache/flowback/pt_inception-2015-12-05-6726825d.safetensors, where the pipeline looks by default

The state dict must be the FID Inception's (1008 classes, no auxiliary classifier); torchvision's
ImageNet Inception weights are rejected. Batch-norm `num_batches_tracked` counters are dropped (they play
no part at inference), everything else is stored as contiguous float32. A file whose SHA-256 does not
start with the published 6726825d is converted with a warning: tests convert random-init weights this
way, but FID numbers from such a file are not comparable with anyone's.

Usage: convert_inception.py SRC.pth [--out DST.safetensors]
"""

import argparse
import hashlib
import os
import sys

import torch
from safetensors.torch import save_file

PUBLISHED_SHA256_PREFIX = "6726825d"
DEFAULT_NAME = "pt_inception-2015-12-05-6726825d.safetensors"
# 94 convolution + batch-norm units of 5 tensors each, and the classifier's weight and bias.
EXPECTED_TENSORS = 94 * 5 + 2


def default_out():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "flowback", DEFAULT_NAME)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(src, dst):
    """Writes `dst` from the state dict in `src`; returns the number of tensors written."""
    state = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise SystemExit(f"{src}: expected a state dict, found a {type(state).__name__}")
    tensors = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    fc = tensors.get("fc.weight")
    if fc is None or tuple(fc.shape) != (1008, 2048):
        shape = None if fc is None else tuple(fc.shape)
        raise SystemExit(f"{src}: fc.weight has shape {shape}, the FID Inception's is (1008, 2048); "
                         "is this pytorch-fid's pt_inception-2015-12-05 file?")
    aux = [k for k in tensors if k.startswith("AuxLogits.")]
    if aux or len(tensors) != EXPECTED_TENSORS:
        raise SystemExit(f"{src}: {len(tensors)} tensors ({len(aux)} of an auxiliary classifier); the FID "
                         f"Inception has {EXPECTED_TENSORS} and no auxiliary classifier")
    out = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = f"{dst}.tmp-{os.getpid()}"
    save_file(out, tmp, metadata={"source": os.path.basename(src)})
    os.replace(tmp, dst)
    return len(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--out", default=default_out(), help="output safetensors file (default: %(default)s)")
    args = parser.parse_args()
    digest = sha256(args.src)
    if not digest.startswith(PUBLISHED_SHA256_PREFIX):
        print(f"warning: {args.src} has SHA-256 {digest[:16]}…, not the published {PUBLISHED_SHA256_PREFIX}…: "
              "FID and IS computed with it are not comparable with published numbers", file=sys.stderr)
    n = convert(args.src, args.out)
    print(f"{args.out}: {n} tensors")


if __name__ == "__main__":
    main()
