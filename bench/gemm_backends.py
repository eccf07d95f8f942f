"""MKL's sgemm (what PyTorch's fp32 `linear` calls on the CPU) against oneDNN's linear kernels at a
training step's and a decode step's shapes: why `torch_ext::onednn` routes the flow's linear layers
through oneDNN. Prints one line per shape with GFLOP/s of each; run with the project's venv:

  .venv/bin/python bench/gemm_backends.py [--threads 1] [--rows 1024] [--width 256]
"""
import argparse
import time

import torch


def timed(fn, reps):
    for _ in range(max(2, reps // 5)):
        fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=1024, help="rows of a training step's product (batch × tokens)")
    ap.add_argument("--decode-rows", type=int, default=8, help="rows of a decode step (2 × sample batch)")
    ap.add_argument("--width", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    linear = torch.ops.mkldnn._linear_pointwise
    c = args.width
    print(f"# torch {torch.__version__}, {args.threads} thread(s), width {c}")
    for rows, label in [(args.rows, "step"), (args.decode_rows, "decode")]:
        reps = 20 if label == "step" else 500
        for fan_in, fan_out in [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)]:
            w, b, x = torch.randn(fan_out, fan_in), torch.randn(fan_out), torch.randn(rows, fan_in)
            packed = torch.ops.mkldnn._reorder_linear_weight(w)
            flops = 2 * rows * fan_in * fan_out
            mkl = timed(lambda: torch.addmm(b, x, w.t()), reps)
            onednn = timed(lambda: linear(x, w, b, "none", [], ""), reps)
            onednn_packed = timed(lambda: linear(x, packed, b, "none", [], ""), reps)
            err = (linear(x, packed, b, "none", [], "") - torch.addmm(b, x, w.t())).abs().max().item()
            print(f"{label:6} {rows:5}×{fan_in}→{fan_out}: MKL {flops / mkl / 1e9:6.1f} GFLOP/s, "
                  f"oneDNN {flops / onednn / 1e9:6.1f}, oneDNN packed {flops / onednn_packed / 1e9:6.1f} "
                  f"({mkl / onednn_packed:.2f}× MKL), max |Δ| {err:.1e}")


if __name__ == "__main__":
    main()
