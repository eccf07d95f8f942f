#!/usr/bin/env bash
# The CPU product routing A/B of issue 35: each of bench/flow.sh's configs with the default routing
# (measured per shape class on this machine), with oneDNN and packing off (MKL only), and optionally with
# another binary (e.g. a build from before the routing was measured), interleaved per config so that
# machine load falls on all alike. Prints one row per run: step and sampling ratios against PyTorch and
# the Rust side's own times.
# Usage: bench/routing_ab.sh [PIPELINE_BINARY] [THREADS] [OTHER_BINARY]
set -euo pipefail
bin=${1:-target/release/pipeline}
threads=${2:-1}
other=${3:-}
echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, threads=$threads"
configs=(
    "--preset tiny --batch 8 --steps 30"
    "--preset in64 --channels 256 --blocks 2 --layers 2 --batch 4 --sample-batch 4 --steps 5"
    "--preset latent256 --channels 256 --blocks 2 --layers 2 --batch 4 --sample-batch 4 --steps 5"
    "--preset in64 --blocks 2 --layers 1 --batch 2 --sample-batch 2 --steps 3"
)
row() {
    local label=$1 config=$2 binary=$3
    shift 3
    # shellcheck disable=SC2086
    "$binary" bench flow $config --threads "$threads" "$@" 2>/dev/null | python3 -c '
import json, sys
r = json.loads(sys.stdin.readline())
rust = r["rust"]
step, sample = r["step_time_ratio"], r["sample_speed_ratio"]
ms, tps = rust["step_s"] * 1e3, rust["sample_tokens_per_s"]
print(f"{sys.argv[1]:<20} {sys.argv[2]:<78} step {step:.3f} ({ms:8.1f} ms)  sampling {sample:.3f} ({tps:9.0f} tok/s)")
' "$label" "${config%% --steps*}"
}
for config in "${configs[@]}"; do
    row "measured (default)" "$config" "$bin"
    row "MKL only" "$config" "$bin" --no-onednn --no-pack
    if [[ -n "$other" ]]; then
        row "other binary" "$config" "$other"
    fi
done
