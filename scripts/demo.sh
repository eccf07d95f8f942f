#!/usr/bin/env bash
# The demo: every job that exists, end to end on the embedded tiny settings. Grows as jobs land.
set -euo pipefail
bin=$1
dir=$2
mkdir -p "$dir"
"$bin" demo-data --out "$dir/data" --classes 10 --per-class 200 --shards 4 --seed 0
"$bin" demo-data --out "$dir/heldout" --classes 10 --per-class 20 --shards 1 --seed 1 --prefix heldout
"$bin" config --set "data.shards=$dir/data/demo-{000000..000003}.tar" > "$dir/config.toml"
echo
echo "demo outputs:"
echo "  training shards: $dir/data/demo-{000000..000003}.tar (index: $dir/data/demo-index.json)"
echo "  held-out shards: $dir/heldout/heldout-000000.tar"
echo "  effective config: $dir/config.toml"
# Training (issue 7): tiny latent TARFlow with R-REPA on the precompute cache of the demo shards.
if [ -f "$dir/cache/manifest.json" ] || compgen -G "$dir/cache/*/manifest.json" > /dev/null; then
  "$bin" train --latent --config configs/demo.toml --shards "$dir/data/demo-{000000..000003}.tar" \
    --cache "$dir/cache" --out "$dir/run"
  echo "  training run: $dir/run (metrics.jsonl, checkpoints/latest, samples/)"
else
  echo "  train: skipped, no precompute cache at $dir/cache (pipeline precompute writes it)"
fi
