#!/usr/bin/env bash
# The CPU product routing A/B of issue 35 on each of bench/flow.sh's configs: the default routing (measured
# per shape class on this machine) against every product on MKL with no packing (`--no-onednn --no-pack`),
# as PAIRS interleaved pairs inside one process (`bench flow --ab-routing`), so that the load of a shared
# machine falls on both alike; and the step and sampling ratios against PyTorch from the same run.
# Prints one row per config: A/B ratios (measured / MKL-only, below 1 = the routing is faster) and the
# PyTorch ratios (step time Rust / PyTorch, sampling speed Rust / PyTorch).
# Usage: bench/routing_ab.sh [PIPELINE_BINARY] [THREADS] [PAIRS]
set -euo pipefail
bin=${1:-target/release/pipeline}
threads=${2:-1}
pairs=${3:-16}
echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, threads=$threads, $pairs pairs"
configs=(
    "--preset tiny --batch 8 --steps 30"
    "--preset in64 --channels 256 --blocks 2 --layers 2 --batch 4 --sample-batch 4 --steps 5"
    "--preset latent256 --channels 256 --blocks 2 --layers 2 --batch 4 --sample-batch 4 --steps 5"
    "--preset in64 --blocks 2 --layers 1 --batch 2 --sample-batch 2 --steps 3"
)
echo "| config | step measured/MKL | sampling time measured/MKL | step ms (measured, MKL) | step Rust/PyTorch | sampling speed Rust/PyTorch |"
echo "|---|---|---|---|---|---|"
for config in "${configs[@]}"; do
    # shellcheck disable=SC2086 # the config is words
    "$bin" bench flow $config --threads "$threads" --ab-routing "$pairs" 2>/dev/null | "${PYTHON:-python3}" -c '
import json, sys
r = json.loads(sys.stdin.readline())
ab = r["rust"]["routing_ab"]
s, p = ab["step"], ab["sample"]
cells = [
    "`" + sys.argv[1] + "`",
    "%.3f" % s["ratio"],
    "%.3f" % p["ratio"],
    "%.1f, %.1f" % (1e3 * s["measured_s"], 1e3 * s["mkl_only_s"]),
    "%.3f" % r["step_time_ratio"],
    "%.3f" % r["sample_speed_ratio"],
]
print("| " + " | ".join(cells) + " |")
' "${config%% --steps*}"
done
