"""Improved precision and recall (Kynkäänniemi et al. 2019) in numpy, written from the definition the ADM
evaluator's `ManifoldEstimator` implements (openai/guided-diffusion `evaluations/evaluator.py`), as the
reference `pipeline bench fid` times `model::manifold::precision_recall` against and tests/fid.rs checks
`pipeline fid`'s numbers with.

Definition: the radius of a point is the k-th smallest squared euclidean distance from it to the points
of its own set, counting the point itself as the 0-th (distance 0). A vector lies in a set's manifold
when its squared distance to some point of the set is at most that point's radius. Precision is the
fraction of samples in the reference manifold, recall the fraction of reference points in the sample
manifold. Squared distances are ‖u‖² − 2u·v + ‖v‖², clamped at 0, in float32, `block` rows at a time.

Usage:
  precision_recall_reference.py check REF.npz SAMPLES.npz [--k K] [--block ROWS]
      precision and recall of SAMPLES' `acts` against REF's `acts` as one JSON line
  precision_recall_reference.py serve FEATURES.npz [--k K] [--block ROWS] [--threads N]
      timing server for `pipeline bench fid`: FEATURES.npz holds `reference` and `samples` (float32
      N × D); each `pr` line on stdin is answered with {"seconds": s, "value": precision, "recall": r},
      `info` with versions and threads
"""

import argparse
import json
import os
import sys
import time

# BLAS reads its thread count when numpy loads: set it from --threads first.
if "--threads" in sys.argv[:-1]:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = sys.argv[sys.argv.index("--threads") + 1]

import numpy as np  # noqa: E402


def squared_distances(u, v):
    """(len(u), len(v)) squared euclidean distances, float32, clamped at 0."""
    nu = np.sum(u * u, axis=1, dtype=np.float32)[:, None]
    nv = np.sum(v * v, axis=1, dtype=np.float32)[None, :]
    return np.maximum(nu - 2.0 * (u @ v.T) + nv, 0.0)


def radii(features, k, block):
    """The k-th smallest squared distance of every row to its own set (itself the 0-th)."""
    out = np.empty(len(features), dtype=np.float32)
    for start in range(0, len(features), block):
        d = squared_distances(features[start:start + block], features)
        out[start:start + block] = np.partition(d, k, axis=1)[:, k]
    return out


def inside(points, manifold, manifold_radii, block):
    """For each of `points`: whether some point of `manifold` has it within its radius."""
    found = np.zeros(len(points), dtype=bool)
    for start in range(0, len(points), block):
        d = squared_distances(points[start:start + block], manifold)
        found[start:start + block] = np.any(d <= manifold_radii[None, :], axis=1)
    return found


def precision_recall(reference, samples, k=3, block=10000):
    reference = np.ascontiguousarray(reference, dtype=np.float32)
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    ref_radii, sample_radii = radii(reference, k, block), radii(samples, k, block)
    precision = float(np.mean(inside(samples, reference, ref_radii, block)))
    recall = float(np.mean(inside(reference, samples, sample_radii, block)))
    return precision, recall


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["check", "serve"])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--block", type=int, default=10000)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.mode == "check":
        ref, samples = (np.load(f)["acts"] for f in args.files)
        p, r = precision_recall(ref, samples, args.k, args.block)
        print(json.dumps({"precision": p, "recall": r}))
        return
    data = np.load(args.files[0])
    reference, samples = data["reference"], data["samples"]
    for line in sys.stdin:
        command = line.strip()
        if command == "info":
            answer = {"numpy": np.__version__, "threads": args.threads or os.cpu_count()}
        elif command == "pr":
            start = time.perf_counter()
            p, r = precision_recall(reference, samples, args.k, args.block)
            answer = {"seconds": time.perf_counter() - start, "value": p, "recall": r}
        else:
            answer = {"error": f"unknown command {command!r}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
