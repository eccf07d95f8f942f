#!/usr/bin/env bash
# FlowBack's Table 1 in miniature on the demo data: the same latent demo config trained with each
# alignment mode for the same steps, then side by side: held-out NLL (nats per latent dim, 95% CI),
# the training alignment cosine at the end, and training-free classification top-1 on held-out shards
# (FlowBack's gradient method and the Bayes-rule baseline). With ENCODERS, the same for each frozen
# encoder family: robustness across encoders, in miniature.
#
# Usage: bench/ablate_repa.sh PIPELINE_BIN [DIR] [STEPS] [MODES]
#   DIR    working directory (default runs/ablate-repa; demo data, encoders and caches are made once and reused)
#   STEPS  training steps per mode (default: the demo config's)
#   MODES  space-separated (default "none forward detach reverse"; reverse_literal is also accepted)
# ENCODERS="dinov2 clip siglip mae ijepa dinov3" (any of these, space-separated; default "dinov2", the
#   demo's) trains every mode against each family's tiny random-init encoder (`pipeline encoders init
#   --preset tiny-FAMILY` into DIR/encoders/FAMILY: width 32, 16 patch tokens at 224 px, so the demo
#   config's align.encoder_dim = 32 and 16 flow tokens fit them all), each with its own cache.
# JOBS=N trains N runs at a time (default 1; each training uses one thread).
# DEMO_VAE_FIT_STEPS (default 1000) is passed on to scripts/demo-prepare.sh.
set -euo pipefail
bin=$(realpath "$1")
dir=${2:-runs/ablate-repa}
steps=${3:-}
modes=${4:-none forward detach reverse}
encoders=${ENCODERS:-dinov2}
jobs=${JOBS:-1}
here=$(dirname "$0")

for enc in $encoders; do
    case $enc in
        dinov2 | clip | siglip | mae | ijepa | dinov3) ;;
        *) echo "ENCODERS: unknown family '$enc' (dinov2 clip siglip mae ijepa dinov3)" >&2; exit 2 ;;
    esac
done

if [[ ! -f "$dir/config.toml" ]]; then
    mkdir -p "$dir"
    "$here/../scripts/demo-prepare.sh" "$bin" "$dir" > "$dir/prepare.log" 2>&1
fi
heldout="$dir/heldout/heldout-000000.tar"

# One tiny encoder and one cache per family (the demo's DINOv2 folder is the tiny-dinov2 preset's, and
# its cache is the one demo-prepare.sh made). The cache directory is keyed by the encoder's fingerprint,
# so every family's cache sits under the same root and a rerun reuses it.
for enc in $encoders; do
    if [[ ! -f "$dir/encoders/$enc/config.json" ]]; then
        "$bin" encoders init --preset "tiny-$enc" --out "$dir/encoders/$enc" > "$dir/encoders-$enc.log" 2>&1
    fi
    "$bin" precompute --config "$dir/config.toml" --set "precompute.encoder=$dir/encoders/$enc" \
        > "$dir/precompute-$enc.log" 2>&1
done

one() {
    local enc=$1 mode=$2 run="$dir/run-$1-$2"
    local extra=(--set "align.mode=$mode" --set "precompute.encoder=$dir/encoders/$enc")
    [[ -n "$steps" ]] && extra+=(--set "train.steps=$steps")
    rm -rf "$run"
    "$bin" train --latent --config "$dir/config.toml" "${extra[@]}" --out "$run" > "$run.log" 2>&1
    "$bin" bpd --run "$run" --data "$heldout" | tail -n 1 > "$run.bpd.json"
    "$bin" classify --run "$run" --data "$heldout" --batch 50 --out "$run/classify" > /dev/null
    "$bin" classify --run "$run" --data "$heldout" --batch 50 --method bayes \
        --out "$run/classify-bayes" > /dev/null
}

pids=()
for enc in $encoders; do
    for mode in $modes; do
        one "$enc" "$mode" &
        pids+=($!)
        if (( ${#pids[@]} >= jobs )); then
            wait "${pids[0]}"
            pids=("${pids[@]:1}")
        fi
    done
done
for pid in "${pids[@]}"; do wait "$pid"; done

python3 - "$dir" "$encoders" $modes <<'PY'
import json, sys
root, encoders, modes = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
print(f"{'encoder':<9}{'mode':<16}{'steps':>7}{'held-out NLL':>22}{'align cos':>11}{'top-1 grad':>12}"
      f"{'top-1 Bayes':>13}{'Bayes vs none':>15}")
for enc in encoders:
    rows = {}
    for mode in modes:
        run = f"{root}/run-{enc}-{mode}"
        last = json.loads(open(f"{run}/metrics.jsonl").read().strip().splitlines()[-1])
        nll = json.load(open(f"{run}.bpd.json"))
        grad = json.load(open(f"{run}/classify/summary.json"))
        bayes = json.load(open(f"{run}/classify-bayes/summary.json"))
        rows[mode] = (last, nll, grad, bayes)
    for mode, (last, nll, grad, bayes) in rows.items():
        cos = last.get("cos")
        cos = f"{sum(cos) / len(cos):.3f}" if cos else "-"
        delta = "-"
        if "none" in rows and mode != "none":
            delta = f"{100 * (bayes['top1'] - rows['none'][3]['top1']):+.1f} pt"
        print(f"{enc:<9}{mode:<16}{last['step']:>7}{nll['mean']:>12.4f} ± {nll['ci95']:.4f}{cos:>11}"
              f"{100 * grad['top1']:>11.1f}%{100 * bayes['top1']:>12.1f}%{delta:>15}")
PY
