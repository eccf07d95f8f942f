#!/usr/bin/env bash
# The demo, end to end on tiny CPU settings (configs/demo.toml): demo shards → tiny random-init encoders →
# precompute cache → train --latent (R-REPA) → sample → training-free classification of held-out shards.
set -euo pipefail
bin=$1
dir=$2
"$(dirname "$0")/demo-prepare.sh" "$bin" "$dir"
"$bin" train --latent --config "$dir/config.toml" --out "$dir/run"
"$bin" sample --run "$dir/run" --num 16 --seed 0 --batch 16 --cfg 1.0 --out "$dir/samples"
"$bin" classify --run "$dir/run" --data "$dir/heldout/heldout-000000.tar" --batch 50 --out "$dir/classify"
# The Bayes-rule baseline (K forward passes per image) on the same images, for comparison.
"$bin" classify --run "$dir/run" --data "$dir/heldout/heldout-000000.tar" --batch 50 --method bayes \
    --out "$dir/classify-bayes"
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
echo "  Bayes baseline:    $dir/classify-bayes/summary.json"
for method in classify classify-bayes; do
    grep -o '"top1": [0-9.e-]*' "$dir/$method/summary.json" | sed "s/^/  $method /"
done
