"""References for tests/fid.rs, from pytorch-fid 0.3.0 itself.

Writes into OUT_DIR:
  inception.pth              a random-init state dict of pytorch-fid's FID Inception (`fid_inception_v3`),
                             batch norms calibrated on the test images so that activations stay O(1)
                             through the 94 layers (plain random init shrinks or grows them layer by layer,
                             and features near zero would make any port look right); what
                             tools/convert_inception.py converts
  references.safetensors     inputs and pytorch-fid's outputs:
    images_64, images_299, images_odd   uint8 (B, H, W, 3) images
    {name}_pool3             pytorch-fid `InceptionV3([3])` pool3 features of x / 255 (ToTensor), (B, 2048)
    {name}_pool3_f64         the same network and input in float64: what the port must equal up to
                             rounding, where float32 itself drifts by ~1e-4 over 94 random layers
    {name}_logits            torchvision Inception3 (the same patched network) classifier, eval mode, (B, 1008)
    {name}_logits_unbiased   pool3 · fc.weightᵀ, (B, 1008)
    fd_{case}_a, fd_{case}_b feature sets (N, 256), float64; cases `full` (N = 300 > D) and `singular` (N = 100)
    fd_{case}_mu_a ... _sigma_b   np.mean / np.cov (rowvar=False) of them
    fd_{case}_value          pytorch_fid.fid_score.calculate_frechet_distance of those statistics
    is_logits                (23, 1008) float32 logits; is_mean, is_std: the standard Inception Score
                             (softmax, 10 consecutive splits i·N//10, exp of mean KL, mean and std)

Usage: make_inception_references.py OUT_DIR
"""
import os
import sys
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import pytorch_fid.inception as pfi
from pytorch_fid.fid_score import calculate_frechet_distance


def build_structure():
    """`fid_inception_v3()` without its download: the weights it would load are skipped, the network
    keeps torch's default init."""
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda *a, **k: None):
        return pfi.fid_inception_v3()


def prepare(imgs):
    """pytorch-fid's input path: ToTensor (x / 255), bilinear resize to 299, 2x − 1."""
    x = imgs.permute(0, 3, 1, 2).float().div(255)
    return 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1


def random_weights(generator, calibration):
    net = build_structure()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0.0, 0.2, generator=generator)
                # The next forward's batch statistics become the running statistics.
                m.momentum = 1.0
        net.fc.weight.normal_(0.0, 0.05, generator=generator)
        net.fc.bias.normal_(0.0, 0.5, generator=generator)
        net.train()
        net(calibration)
        net.eval()
    return net.state_dict()


def pytorch_fid_model(state):
    """pytorch-fid's own `InceptionV3([3])`, loading `state` where it would load the published file."""
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
        return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()


def torchvision_model(state):
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
        return pfi.fid_inception_v3().eval()


def inception_score(logits, splits=10):
    preds = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    n = preds.shape[0]
    scores = []
    for i in range(splits):
        part = preds[(i * n // splits):((i + 1) * n // splits), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return np.mean(scores), np.std(scores)


def main():
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    generator = torch.Generator().manual_seed(0)
    images = {
        "images_64": torch.randint(0, 256, (3, 64, 64, 3), generator=generator, dtype=torch.uint8),
        "images_299": torch.randint(0, 256, (1, 299, 299, 3), generator=generator, dtype=torch.uint8),
        "images_odd": torch.randint(0, 256, (1, 40, 90, 3), generator=generator, dtype=torch.uint8),
    }
    state = random_weights(generator, torch.cat([prepare(i) for i in images.values()]))
    torch.save(state, os.path.join(out_dir, "inception.pth"))

    fid_net = pytorch_fid_model(state)
    fid_net_f64 = pytorch_fid_model(state).double()
    tv_net = torchvision_model(state)
    refs = {}
    with torch.no_grad():
        for name, imgs in images.items():
            pool3 = fid_net(imgs.permute(0, 3, 1, 2).float().div(255))[0].squeeze(3).squeeze(2)
            refs[name] = imgs
            refs[f"{name}_pool3"] = pool3
            x64 = imgs.permute(0, 3, 1, 2).double().div(255)
            refs[f"{name}_pool3_f64"] = fid_net_f64(x64)[0].squeeze(3).squeeze(2)
            refs[f"{name}_logits"] = tv_net(prepare(imgs))
            refs[f"{name}_logits_unbiased"] = pool3 @ state["fc.weight"].T

    rng = np.random.default_rng(0)
    for case, n in [("full", 300), ("singular", 100)]:
        d = 256
        sets = []
        for shift in (0.0, 0.1):
            z = rng.standard_normal((n, 16)) @ rng.standard_normal((16, d)) * 0.3
            sets.append(z + rng.standard_normal((n, d)) * 0.5 + shift + 3.0)
        (a, b) = sets
        mu_a, sigma_a = a.mean(0), np.cov(a, rowvar=False)
        mu_b, sigma_b = b.mean(0), np.cov(b, rowvar=False)
        value = calculate_frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
        for key, arr in [("a", a), ("b", b), ("mu_a", mu_a), ("sigma_a", sigma_a), ("mu_b", mu_b),
                         ("sigma_b", sigma_b), ("value", np.array(value))]:
            refs[f"fd_{case}_{key}"] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))

    is_logits = (torch.randn(23, 1008, generator=generator) * 3).numpy()
    is_logits[:, :5] += 6 * np.eye(5)[np.arange(23) % 5]
    mean, std = inception_score(is_logits)
    refs["is_logits"] = torch.from_numpy(is_logits)
    refs["is_mean"] = torch.tensor(mean, dtype=torch.float64)
    refs["is_std"] = torch.tensor(std, dtype=torch.float64)

    save_file({k: v.contiguous() for k, v in refs.items()}, os.path.join(out_dir, "references.safetensors"))


if __name__ == "__main__":
    main()
