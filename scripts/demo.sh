#!/usr/bin/env bash
# The demo: every job that exists, end to end on the embedded tiny settings. Grows as jobs land.
set -euo pipefail
bin=$1
dir=$2
mkdir -p "$dir"
"$bin" demo-data --out "$dir/data" --classes 10 --per-class 200 --shards 4 --seed 0
"$bin" demo-data --out "$dir/heldout" --classes 10 --per-class 20 --shards 1 --seed 1 --prefix heldout
"$bin" config --set "data.shards=$dir/data/demo-{000000..000003}.tar" \
    --set "precompute.cache=$dir/cache" --set "precompute.encoder=$dir/encoders/dinov2" \
    --set "precompute.vae=$dir/encoders/vae" > "$dir/config.toml"
"$bin" encoders init --preset tiny --out "$dir/encoders"
"$bin" precompute --config "$dir/config.toml"
echo
echo "demo outputs:"
echo "  training shards: $dir/data/demo-{000000..000003}.tar (index: $dir/data/demo-index.json)"
echo "  held-out shards: $dir/heldout/heldout-000000.tar"
echo "  effective config: $dir/config.toml"
echo "  tiny random-init encoders: $dir/encoders/{dinov2,vae}"
echo "  precompute cache: $dir/cache (pipeline cache ls --cache $dir/cache)"

# Sample and classify with the demo's trained run (`$dir/run`, written by the train step); until a run
# exists, a random-init tiny checkpoint stands in and says so.
run_dir=$dir/run
if [[ -f $run_dir/checkpoints/latest ]]; then
    model=(--run "$run_dir")
else
    echo "no trained run at $run_dir: sampling and classifying a random-init tiny flow instead"
    "$bin" flow init --preset tiny --seed 0 --output "$dir/flow-init.safetensors"
    model=(--checkpoint "$dir/flow-init.safetensors")
fi
"$bin" sample "${model[@]}" --num 16 --seed 0 --batch 16 --cfg 1.0 --out "$dir/samples"
"$bin" classify "${model[@]}" --data "$dir/heldout/heldout-000000.tar" --batch 50 --out "$dir/classify"
echo "  samples: $dir/samples/grid.png, $dir/samples/samples.npz"
echo "  classification of the held-out shards: $dir/classify/summary.json, $dir/classify/predictions.csv"
