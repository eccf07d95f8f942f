#!/usr/bin/env bash
# Sample quality per reverse-pass solver on a trained flow, the sequential sampler as the anchor: the same
# seed and classes for every solver (so the same noise), FID / IS of NUM samples against the held-out
# crops, the sequential depth each solver printed, and its wall time. A calibrated schedule is made first
# (`flow calibrate` on the flow's own samples) so `--solver auto` is measured both with it and without it.
#
# Usage: bench/solvers_fid.sh PIPELINE_BINARY DEMO_DIR [NUM] [OUT_DIR]
#   DEMO_DIR is what `make demo` (or scripts/demo-prepare.sh + `pipeline train`) leaves: run/, heldout/,
#   encoders/. RUN names another run directory trained on the same data (e.g. a pixel flow with
#   N = 256 tokens, with CHUNK=16), whose samples are compared with DEMO_DIR's held-out crops at 64 px. The Inception is the demo's random-init one unless FLOWBACK_INCEPTION_WEIGHTS names the
#   converted pytorch-fid weights: its FIDs rank the solvers against each other, nothing more. `auto`
#   without --schedule uses the default plan unless a schedule already sits beside the checkpoint (its
#   log line says which). PYTHON (default python3) needs numpy.
set -euo pipefail
bin=$1
demo=$2
num=${3:-1000}
out=${4:-$demo/solvers-fid}
run=${RUN:-$demo/run}
# checkpoints/latest names the newest step folder.
latest=$(cat "$run/checkpoints/latest" 2>/dev/null || true)
ckpt=$run/checkpoints/$latest/ema.safetensors
[ -n "$latest" ] && [ -f "$ckpt" ] || { echo "no trained flow in $run/checkpoints (run make demo first)" >&2; exit 2; }
mkdir -p "$out"
weights=${FLOWBACK_INCEPTION_WEIGHTS:-$demo/encoders/inception.safetensors}
if [ ! -f "$weights" ]; then
    "$bin" encoders init --preset inception --out "$demo/encoders" >/dev/null
fi
ref=$out/heldout-stats.npz
if [ ! -f "$ref" ]; then
    "$bin" fid-stats --shards "$demo/heldout/heldout-000000.tar" --size 64 --weights "$weights" --batch 50 \
        --out "$ref" >/dev/null
fi
# The schedule: calibrated on 256 of the flow's own samples (another seed than the measured ones).
"$bin" flow decode --device cpu --checkpoint "$ckpt" --samples 256 --seed 1 \
    --output "$out/calibration-data.safetensors" >/dev/null
"$bin" flow calibrate --device cpu --checkpoint "$ckpt" --input "$out/calibration-data.safetensors" \
    --target 1e-3 --output "$out/schedule.solver.json" >/dev/null

classes=0,1,2,3,4,5,6,7,8,9
# The Gauss-Seidel row's segment length (N/4 for the demo's 16 tokens).
chunk=${CHUNK:-4}
echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
echo "# $bin, $ckpt, $num samples, seed 0, classes $classes cycled, cfg 1.0 annealed"
echo "| solver | flags | wall s | × sequential | sequential depth | FID | IS | max pixel Δ vs sequential |"
echo "|---|---|---|---|---|---|---|---|"
seq_time=
while IFS='|' read -r name flags; do
    dir=$out/$name
    rm -rf "$dir"
    start=$(date +%s.%N)
    # shellcheck disable=SC2086 # flags are words
    "$bin" sample --run "$run" --num "$num" --classes "$classes" --seed 0 --batch 100 --cfg 1.0 --grid-max 100 \
        $flags --out "$dir" >"$dir.log" 2>&1
    end=$(date +%s.%N)
    wall=$(echo "$end - $start" | bc -l)
    [ -n "$seq_time" ] || seq_time=$wall
    depth=$(grep -o 'sequential depth [0-9]*' "$dir.log" | head -1 | grep -o '[0-9]*$')
    "$bin" fid --samples "$dir/samples.npz" --ref "$ref" --weights "$weights" --batch 50 --kid-subset-size 100 \
        --out "$dir/fid.json" >/dev/null 2>&1
    fid=$(grep -o '"fid": [0-9.e+-]*' "$dir/fid.json" | grep -o '[0-9.e+-]*$')
    is=$(grep -o '"inception_score": [0-9.e+-]*' "$dir/fid.json" | grep -o '[0-9.e+-]*$')
    delta=$("${PYTHON:-python3}" - "$out/sequential/samples.npz" "$dir/samples.npz" <<'EOF'
import sys, numpy as np
a = np.load(sys.argv[1])["arr_0"].astype(np.int16)
b = np.load(sys.argv[2])["arr_0"].astype(np.int16)
print(int(np.abs(a - b).max()))
EOF
)
    printf '| %s | `%s` | %.1f | %.2f | %s | %.4f | %.4f | %s |\n' "$name" "$flags" "$wall" \
        "$(echo "$wall / $seq_time" | bc -l)" "$depth" "$fid" "$is" "$delta"
done <<EOF
sequential|--solver sequential
jacobi-exact|--solver jacobi
jacobi-1e-4|--solver jacobi --jacobi-tol 1e-4
jacobi-1e-3|--solver jacobi --jacobi-tol 1e-3
gs-jacobi-$chunk-1e-4|--solver jacobi --jacobi-chunk $chunk --jacobi-tol 1e-4
auto-default|--solver auto
auto-calibrated|--solver auto --schedule $out/schedule.solver.json
EOF
