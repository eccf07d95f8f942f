#!/usr/bin/env bash
# The decode mutation suite (stages/tests/decode_mutations.rs) at length.
#
#   bench/fuzz_decode.sh [ROUNDS]             ROUNDS × ~3,000 variants (default 30: ~90,000), release build
#   bench/fuzz_decode.sh --valgrind [ROUNDS]  the same sequences under valgrind (default 1 round);
#                                             fails on any invalid read or write
#   bench/fuzz_decode.sh --shards DIR [ROUNDS] the variants, each followed by a good image, written as
#                                             webdataset shards in DIR, then `pipeline bench decode` and
#                                             `pipeline precompute` (tiny random-init encoders) over them:
#                                             both must finish with the counts the test predicted
#
# Deterministic: the same ROUNDS give the same variants.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=plain
case "${1:-}" in
  --valgrind) mode=valgrind; shift ;;
  --shards) mode=shards; dir=$(realpath -m "$2"); shift 2 ;;
esac
rounds=${1:-}

test_binary() {
  cargo test --release -p stages --test decode_mutations --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "decode_mutations":
        print(m["executable"])'
}

case $mode in
  plain)
    FUZZ_DECODE_ROUNDS=${rounds:-30} cargo test --release -p stages --test decode_mutations -- --nocapture
    ;;
  valgrind)
    if ! command -v valgrind >/dev/null; then
      sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
      $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends valgrind >/dev/null
    fi
    bin=$(test_binary)
    log=$(mktemp -d)
    echo "fuzz_decode: valgrind $(valgrind --version) on $bin"
    # Leaks are not the question here; invalid reads and writes, uses of uninitialised values and bad
    # frees are. With libjpeg-turbo's scalar code every one of them fails the run.
    FUZZ_DECODE_ROUNDS=${rounds:-1} JSIMD_FORCENONE=1 valgrind --error-exitcode=99 --leak-check=no \
      "$bin" --nocapture --test-threads=1 2>&1 | tee "$log/scalar.log" | grep -E "variants|decodes in|test result|ERROR SUMMARY"
    # With its SIMD code (what runs in production) memcheck's lane tracking marks some decoded pixels
    # as coming from uninitialised bytes (the vector loops read the padding past a row's end); any
    # invalid read, write or free still fails the run, and the rest is reported.
    FUZZ_DECODE_ROUNDS=${rounds:-1} valgrind --leak-check=no \
      "$bin" --nocapture --test-threads=1 >"$log/simd.log" 2>&1 || { tail -30 "$log/simd.log"; exit 1; }
    grep -E "ERROR SUMMARY" "$log/simd.log"
    invalid=$(grep -cE "== (Invalid (read|write|free)|Mismatched free|Source and destination overlap)" "$log/simd.log" || true)
    echo "fuzz_decode: SIMD run: $invalid invalid reads/writes/frees; uninitialised-value contexts: $(grep -c "depends on uninitialised" "$log/simd.log" || true) (logs in $log)"
    [ "$invalid" -eq 0 ]
    ;;
  shards)
    export LIBTORCH_USE_PYTORCH=1 PATH="$PWD/.venv/bin:$PATH"
    cargo build --release -p pipeline
    pipeline=target/release/pipeline
    rm -rf "$dir"; mkdir -p "$dir"
    FUZZ_DECODE_SHARDS=$dir FUZZ_DECODE_ROUNDS=${rounds:-1} \
      cargo test --release -p stages --test decode_mutations -- --nocapture mutated_images
    read -r spec samples bench_good precompute_good < <(python3 -c 'import json,sys
e = json.load(open(sys.argv[1]))
print(e["shards"], e["samples"], e["bench_decode_good"], e["precompute_good"])' "$dir/expected.json")
    echo "fuzz_decode: $samples samples; expected good: bench decode $bench_good, precompute $precompute_good"
    bench=$($pipeline bench decode --shards "$dir/$spec" --size 64 --limit "$samples" --repeats 1 --python none)
    echo "$bench"
    grep -q "bench decode: read good $bench_good, bad $((samples - bench_good))" <<<"$bench" ||
      { echo "fuzz_decode: bench decode counts differ from the expected good $bench_good" >&2; exit 1; }
    $pipeline encoders init --preset tiny --out "$dir/enc" >/dev/null
    cat >"$dir/c.toml" <<EOF
[data]
shards = "$dir/$spec"
image_size = 32
max_bad_fraction = 1.0

[precompute]
encoder = "$dir/enc/dinov2"
vae = "$dir/enc/vae"
batch_size = 64
EOF
    start=$(date +%s)
    RUST_LOG=info $pipeline precompute --config "$dir/c.toml" --cache "$dir/cache" >"$dir/precompute.log" 2>&1
    grep -E "good [0-9]+, bad [0-9]+|computed [0-9]+ shards" "$dir/precompute.log" | tail -3
    echo "fuzz_decode: precompute took $(( $(date +%s) - start )) s"
    written=$(python3 -c 'import json,sys,glob
m = json.load(open(glob.glob(sys.argv[1] + "/*/manifest.json")[0]))
print(sum(s["samples"] for s in m["shards"].values()))' "$dir/cache")
    echo "fuzz_decode: precompute wrote $written samples (expected $precompute_good)"
    [ "$written" -eq "$precompute_good" ]
    ;;
esac
