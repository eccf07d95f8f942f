#!/usr/bin/env bash
# Everything the demo trains on, in DIR: demo shards, held-out shards, tiny encoders (random DINOv2, a VAE
# fitted to the demo crops), the
# effective config (configs/demo.toml with DIR's paths) and the precompute cache. Used by demo.sh and
# bench/ablate_repa.sh. Usage: scripts/demo-prepare.sh PIPELINE_BIN DIR
set -euo pipefail
bin=$1
dir=$2
mkdir -p "$dir"
"$bin" demo-data --out "$dir/data" --classes 10 --per-class 200 --shards 4 --seed 0
"$bin" demo-data --out "$dir/heldout" --classes 10 --per-class 20 --shards 1 --seed 1 --prefix heldout
# The tiny VAE is fitted to the demo crops (about a minute on two cores), so the flow's latents decode
# to the classes' shapes and colours instead of texture.
"$bin" encoders init --preset tiny --out "$dir/encoders" \
    --fit-on "$dir/data/demo-{000000..000003}.tar" --fit-size 64 --fit-steps "${DEMO_VAE_FIT_STEPS:-1000}"
# The demo preset with this demo's paths: the one config every later step reads.
"$bin" config --config "$(dirname "$0")/../configs/demo.toml" \
    --set "data.shards=$dir/data/demo-{000000..000003}.tar" \
    --set "precompute.cache=$dir/cache" --set "precompute.encoder=$dir/encoders/dinov2" \
    --set "precompute.vae=$dir/encoders/vae" --set "train.cache=$dir/cache" > "$dir/config.toml"
"$bin" precompute --config "$dir/config.toml"
