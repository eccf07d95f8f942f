"""References for model/tests/fid_metrics.rs: the sFID tensor from pytorch-fid's network, and improved
precision/recall and KID written out from their definitions in numpy (float64, whole matrices: the
test sets are small), independently of the Rust code.

  spatial WEIGHTS INPUTS OUT
      WEIGHTS: safetensors state dict of the FID Inception (pytorch-fid names); INPUTS: `images`, uint8
      (B, H, W, 3). Writes `mixed_6d_branch1x1` and `mixed_6d_branch1x1_f64`: the output (B, 192, 17, 17)
      of `Mixed_6d.branch1x1` (after its ReLU) of pytorch-fid's `fid_inception_v3()` on pytorch-fid's
      input path (x / 255, bilinear resize to 299, 2x - 1), in float32 and in float64.

  metrics INPUTS OUT
      INPUTS: for each case C (a name prefix, possibly empty), `Creference`, `Csamples` (N, D)
      features and optional `Csubset_{i}_a` / `Csubset_{i}_b` row indices. Writes `Cprecision`,
      `Crecall`, `Cmargin` (the smallest |distance - radius| over all comparisons: how far the data is
      from a tie that rounding could flip), `Ckid_full_mean` (each set whole, one subset), and with
      subsets `Ckid_mean`, `Ckid_std`.
"""
import sys
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

K = 3  # the neighbourhood size of Kynkäänniemi et al. and the ADM evaluator


def fid_inception(state):
    """pytorch-fid's `fid_inception_v3()` with `state` (strictly, by name) instead of the published
    weights it would download."""
    import pytorch_fid.inception as pfi

    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda *a, **k: None):
        net = pfi.fid_inception_v3()
    # The converted file has no num_batches_tracked counters; they play no part in eval mode.
    full = net.state_dict()
    full.update(state)
    net.load_state_dict(full)
    return net.eval()


class Captured(Exception):
    pass


def spatial(weights, inputs, out):
    state = load_file(weights)
    images = load_file(inputs)["images"]
    results = {}
    for kind, suffix in [(torch.float32, ""), (torch.float64, "_f64")]:
        net = fid_inception(state).to(kind)
        captured = []

        def hook(module, inputs, output):
            captured.append(output)
            raise Captured  # the layers after it do not matter here

        net.Mixed_6d.branch1x1.register_forward_hook(hook)
        x = images.permute(0, 3, 1, 2).to(kind) / 255
        x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        with torch.no_grad():
            try:
                net(x)
            except Captured:
                pass
        (t,) = captured
        results[f"mixed_6d_branch1x1{suffix}"] = t.contiguous()
    save_file(results, out)


def squared_distances(u, v):
    return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)


def radii(x):
    d = squared_distances(x, x)
    # Row-sorted distances include the point itself (0) first: the k-th after it is index K.
    return np.sort(d, axis=1)[:, K]


def precision_recall(reference, samples):
    r_ref, r_smp = radii(reference), radii(samples)
    d = squared_distances(samples, reference)  # (samples, reference)
    inside_ref = d <= r_ref[None, :]
    inside_smp = d <= r_smp[:, None]
    precision = inside_ref.any(axis=1).mean()
    recall = inside_smp.any(axis=0).mean()
    margin = min(np.abs(d - r_ref[None, :]).min(), np.abs(d - r_smp[:, None]).min())
    return precision, recall, margin


def mmd2_unbiased(x, y):
    dim = x.shape[1]

    def kernel(u, v):
        return (u @ v.T / dim + 1.0) ** 3

    m, n = len(x), len(y)
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    term_xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    term_yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return term_xx + term_yy - 2.0 * kxy.sum() / (m * n)


def metrics(inputs, out):
    t = load_file(inputs)
    results = {}
    # One run for every case the test has: `{case}reference` with `{case}samples`, and subsets
    # `{case}subset_{i}_a` / `_b` (python starts slowly; the Rust tests share one run).
    for key in [k for k in t if k.endswith("reference")]:
        case = key[: -len("reference")]
        reference = t[key].double().numpy()
        samples = t[f"{case}samples"].double().numpy()
        precision, recall, margin = precision_recall(reference, samples)
        results[f"{case}precision"] = precision
        results[f"{case}recall"] = recall
        results[f"{case}margin"] = margin
        results[f"{case}kid_full_mean"] = mmd2_unbiased(reference, samples)
        values = []
        i = 0
        while f"{case}subset_{i}_a" in t:
            ia, ib = t[f"{case}subset_{i}_a"].numpy(), t[f"{case}subset_{i}_b"].numpy()
            values.append(mmd2_unbiased(reference[ia], samples[ib]))
            i += 1
        if values:
            results[f"{case}kid_mean"] = np.mean(values)
            results[f"{case}kid_std"] = np.std(values)  # population std, as torch-fidelity
    save_file({k: torch.tensor(float(v), dtype=torch.float64) for k, v in results.items()}, out)


def main():
    torch.set_num_threads(2)
    if sys.argv[1] == "spatial":
        spatial(*sys.argv[2:5])
    elif sys.argv[1] == "metrics":
        metrics(*sys.argv[2:4])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")


if __name__ == "__main__":
    main()
