#!/usr/bin/env bash
# The demo, end to end on tiny CPU settings (configs/demo.toml): demo shards → tiny random-init encoders →
# precompute cache → train --latent (R-REPA) → sample → training-free classification of held-out shards.
set -euo pipefail
bin=$1
dir=$2
mkdir -p "$dir"
"$bin" demo-data --out "$dir/data" --classes 10 --per-class 200 --shards 4 --seed 0
"$bin" demo-data --out "$dir/heldout" --classes 10 --per-class 20 --shards 1 --seed 1 --prefix heldout
"$bin" encoders init --preset tiny --out "$dir/encoders"
# The demo preset with this demo's paths: the one config every step below reads.
"$bin" config --config configs/demo.toml \
    --set "data.shards=$dir/data/demo-{000000..000003}.tar" \
    --set "precompute.cache=$dir/cache" --set "precompute.encoder=$dir/encoders/dinov2" \
    --set "precompute.vae=$dir/encoders/vae" --set "train.cache=$dir/cache" > "$dir/config.toml"
"$bin" precompute --config "$dir/config.toml"
"$bin" train --latent --config "$dir/config.toml" --out "$dir/run"
"$bin" sample --run "$dir/run" --num 16 --seed 0 --batch 16 --cfg 1.0 --out "$dir/samples"
"$bin" classify --run "$dir/run" --data "$dir/heldout/heldout-000000.tar" --batch 50 --out "$dir/classify"
echo
echo "demo outputs:"
echo "  training shards:   $dir/data/demo-{000000..000003}.tar (index: $dir/data/demo-index.json)"
echo "  held-out shards:   $dir/heldout/heldout-000000.tar"
echo "  tiny encoders:     $dir/encoders/{dinov2,vae}"
echo "  effective config:  $dir/config.toml"
echo "  precompute cache:  $dir/cache (pipeline cache ls --cache $dir/cache)"
echo "  training run:      $dir/run (metrics.jsonl, checkpoints/latest, samples/)"
echo "  samples:           $dir/samples/grid.png, $dir/samples/samples.npz"
echo "  classification:    $dir/classify/summary.json, $dir/classify/predictions.csv"
