#!/usr/bin/env bash
# The flow benchmarks recorded in BENCHMARKS.md: Rust vs the PyTorch reference in the same run.
# Usage: bench/flow.sh [PIPELINE_BINARY] [THREADS]
set -euo pipefail
bin=${1:-target/release/pipeline}
threads=${2:-1}
echo "# $(date -u +%FT%TZ) $(uname -m) $(nproc) cores, threads=$threads"
"$bin" bench flow --preset tiny --batch 8 --steps 30 --threads "$threads"
"$bin" bench flow --preset in64 --channels 256 --blocks 2 --layers 2 --batch 4 --sample-batch 4 --steps 5 --threads "$threads"
"$bin" bench flow --preset latent256 --channels 256 --blocks 2 --layers 2 --batch 4 --sample-batch 4 --steps 5 --threads "$threads"
"$bin" bench flow --preset in64 --blocks 2 --layers 1 --batch 2 --sample-batch 2 --steps 3 --threads "$threads"
