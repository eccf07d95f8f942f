#!/usr/bin/env bash
# The demo, end to end on tiny CPU settings (configs/demo.toml): demo shards → tiny encoders (VAE fitted) →
# precompute cache → train --latent (R-REPA) → sample → training-free classification of held-out shards →
# FID / IS of the samples against the held-out crops.
set -euo pipefail
bin=$1
dir=$2
"$(dirname "$0")/demo-prepare.sh" "$bin" "$dir"
"$bin" train --latent --config "$dir/config.toml" --out "$dir/run"
# 10 per class, one class per grid column.
"$bin" sample --run "$dir/run" --num 100 --classes 0,1,2,3,4,5,6,7,8,9 --seed 0 --batch 50 --cfg 1.0 --grid-max 100 \
    --out "$dir/samples"
"$bin" classify --run "$dir/run" --data "$dir/heldout/heldout-000000.tar" --batch 50 --out "$dir/classify"
# The Bayes-rule baseline (K forward passes per image) on the same images, for comparison.
"$bin" classify --run "$dir/run" --data "$dir/heldout/heldout-000000.tar" --batch 50 --method bayes \
    --out "$dir/classify-bayes"
# FID and IS of the samples against the held-out crops' statistics. The demo has no published Inception
# weights (nothing is downloaded), so a random-init FID Inception stands in: its numbers rank the demo's
# runs but are not comparable with anyone's (docs/evaluation.md: `pipeline fid`).
mkdir -p "$dir/fid"
"$bin" encoders init --preset inception --out "$dir/encoders"
"$bin" fid-stats --shards "$dir/heldout/heldout-000000.tar" --size 64 --weights "$dir/encoders/inception.safetensors" \
    --batch 50 --out "$dir/fid/heldout-stats.npz"
"$bin" fid --samples "$dir/samples/samples.npz" --ref "$dir/fid/heldout-stats.npz" \
    --weights "$dir/encoders/inception.safetensors" --batch 50 --out "$dir/fid/samples.json"
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
echo "  FID / IS:          $dir/fid/samples.json (reference: $dir/fid/heldout-stats.npz)"
echo
echo "demo results:"
for method in classify classify-bayes; do
    grep -o '"top1": [0-9.e-]*' "$dir/$method/summary.json" | sed "s/^/  $method /"
done
grep -o '"fid": [0-9.e+-]*\|"inception_score": [0-9.e+-]*' "$dir/fid/samples.json" \
    | sed "s/^/  samples (random-init Inception) /"
