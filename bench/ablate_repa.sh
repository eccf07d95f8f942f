#!/usr/bin/env bash
# FlowBack's Table 1 in miniature on the demo data: the same latent demo config trained with each
# alignment mode for the same steps, then side by side: held-out NLL (nats per latent dim, 95% CI),
# the training alignment cosine at the end, and training-free classification top-1 on held-out shards
# (FlowBack's gradient method and the Bayes-rule baseline).
#
# Usage: bench/ablate_repa.sh PIPELINE_BIN [DIR] [STEPS] [MODES]
#   DIR    working directory (default runs/ablate-repa; demo data and cache are made once and reused)
#   STEPS  training steps per mode (default: the demo config's)
#   MODES  space-separated (default "none forward detach reverse"; reverse_literal is also accepted)
# JOBS=N trains N modes at a time (default 1; each training uses one thread).
set -euo pipefail
bin=$(realpath "$1")
dir=${2:-runs/ablate-repa}
steps=${3:-}
modes=${4:-none forward detach reverse}
jobs=${JOBS:-1}
here=$(dirname "$0")

if [[ ! -f "$dir/config.toml" ]]; then
    mkdir -p "$dir"
    "$here/../scripts/demo-prepare.sh" "$bin" "$dir" > "$dir/prepare.log" 2>&1
fi
heldout="$dir/heldout/heldout-000000.tar"

one() {
    local mode=$1 run="$dir/run-$1"
    local extra=(--set "align.mode=$mode")
    [[ -n "$steps" ]] && extra+=(--set "train.steps=$steps")
    rm -rf "$run"
    "$bin" train --latent --config "$dir/config.toml" "${extra[@]}" --out "$run" > "$run.log" 2>&1
    "$bin" bpd --run "$run" --data "$heldout" | tail -n 1 > "$run.bpd.json"
    "$bin" classify --run "$run" --data "$heldout" --batch 50 --out "$run/classify" > /dev/null
    "$bin" classify --run "$run" --data "$heldout" --batch 50 --method bayes \
        --out "$run/classify-bayes" > /dev/null
}

pids=()
for mode in $modes; do
    one "$mode" &
    pids+=($!)
    if (( ${#pids[@]} >= jobs )); then
        wait "${pids[0]}"
        pids=("${pids[@]:1}")
    fi
done
for pid in "${pids[@]}"; do wait "$pid"; done

python3 - "$dir" $modes <<'PY'
import json, sys
root, modes = sys.argv[1], sys.argv[2:]
print(f"{'mode':<16}{'steps':>7}{'held-out NLL':>22}{'align cos':>11}{'top-1 grad':>12}{'top-1 Bayes':>13}")
for mode in modes:
    run = f"{root}/run-{mode}"
    last = json.loads(open(f"{run}/metrics.jsonl").read().strip().splitlines()[-1])
    nll = json.load(open(f"{run}.bpd.json"))
    grad = json.load(open(f"{run}/classify/summary.json"))
    bayes = json.load(open(f"{run}/classify-bayes/summary.json"))
    cos = last.get("cos")
    cos = f"{sum(cos) / len(cos):.3f}" if cos else "-"
    print(f"{mode:<16}{last['step']:>7}{nll['mean']:>12.4f} ± {nll['ci95']:.4f}{cos:>11}"
          f"{100 * grad['top1']:>11.1f}%{100 * bayes['top1']:>12.1f}%")
PY
