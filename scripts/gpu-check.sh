#!/usr/bin/env bash
# The acceptance run of every CUDA path (issue 29): one call on one GPU machine that prints one table,
# PASS/FAIL and a figure per check, and writes it as JSON. Nothing is built on the GPU machine: it runs
# binaries built and packed on a CPU machine against that machine's own torch 2.11.
#
#   scripts/gpu-check.sh --pack [DIR]    on the build machine: builds (if needed), copies and strips the
#                                        release `pipeline` and the torch-ext / model unit-test binaries
#                                        into DIR (default target/gpu-pack) and prints their sizes
#   scripts/gpu-check.sh OUT_DIR         on the GPU machine, from the repository root, DIR carried along
#   scripts/gpu-check.sh --cpu OUT_DIR   the same sequence on the CPU at tiny sizes, with the binaries of
#                                        the current build (tests/gpu_check.rs runs it, so it cannot rot)
#
# Writes OUT_DIR/gpu-check.json (rows: name, status, figure, seconds, log) and OUT_DIR/logs/<check>.log;
# exits non-zero when any check failed. Scratch data (shards, caches, runs) goes to a temporary directory
# that is removed at the end (GPU_CHECK_KEEP=1 keeps it and says where).
#
# Environment:
#   GPU_CHECK_PACK      the packed folder (default target/gpu-pack)
#   PIPELINE            the pipeline binary (default PACK/pipeline; --cpu: target/release/pipeline, else
#                       target/debug/pipeline)
#   EXT_TESTS, MODEL_TESTS
#                       the torch-ext / model unit-test binaries (default PACK/torch-ext-tests and
#                       PACK/model-tests; --cpu: those, else the newest in the build's deps folder)
#   TORCH_PYTHON        Python with torch 2.11 (default /opt/torch/.venv/bin/python3, else python3; --cpu:
#                       .venv/bin/python); its torch/lib goes on LD_LIBRARY_PATH in GPU mode
#   GPU_CHECK_BUDGET_S  the whole run's limit in seconds (default 470: the run stays inside 8 minutes
#                       even when checks hang; each check also has its own limit)
#   GPU_CHECK_ONLY      comma-separated checks to run; the others are SKIP (a rerun of what failed; a
#                       check that needs another's output says so)
#   GPU_CHECK_BREAK     the name of a check to break on purpose: its main command gets an unknown flag,
#                       so that row must FAIL and the script exit non-zero (tests/gpu_check.rs)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MiB=$((1 << 20))

usage() {
    sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------------------------------------------
# --pack: the release binary and the unit-test binaries, stripped, in one folder that travels.
# ---------------------------------------------------------------------------------------------------

# `name path` of each executable a cargo build reports (`cargo build|test ARGS --message-format=json`):
# the paths cargo knows, whatever CARGO_TARGET_DIR or profile, and a build first where they are stale.
cargo_executables() {
    (cd "$ROOT" && cargo "$@" --message-format=json) |
        python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
        print(msg["target"]["name"], msg["executable"])
'
}

pack() {
    local dir=${1:-$ROOT/target/gpu-pack}
    mkdir -p "$dir" || return 1
    echo "building the release binary and the unit-test binaries of torch-ext and model (a no-op when current)"
    local bins pipeline ext model
    bins=$(cargo_executables build --release -p pipeline --bin pipeline) || return 1
    pipeline=$(awk '$1 == "pipeline" {print $2}' <<<"$bins")
    # `--lib`: the unit tests. The model's integration test is left out: it needs this machine's .venv.
    bins=$(cargo_executables test --release -p torch-ext -p model --lib --no-run) || return 1
    ext=$(awk '$1 == "torch_ext" {print $2}' <<<"$bins")
    model=$(awk '$1 == "model" {print $2}' <<<"$bins")
    if [[ -z $pipeline || -z $ext || -z $model ]]; then
        echo "cargo did not name all three binaries (pipeline '$pipeline', torch-ext '$ext', model '$model')" >&2
        return 1
    fi
    # --strip-debug keeps the symbol table, so a panic's backtrace on the GPU machine still names
    # functions; it drops the line tables that make up most of the size.
    strip --strip-debug -o "$dir/pipeline" "$pipeline" || return 1
    strip --strip-debug -o "$dir/torch-ext-tests" "$ext" || return 1
    strip --strip-debug -o "$dir/model-tests" "$model" || return 1
    {
        echo "packed $(date -u +%FT%TZ) from $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
        echo "built against $("$ROOT/.venv/bin/python" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null || echo '?')"
    } >"$dir/PACKED"
    local total=0 size f
    for f in pipeline torch-ext-tests model-tests; do
        size=$(stat -c %s "$dir/$f")
        total=$((total + size))
        printf '  %-16s %6.1f MiB\n' "$f" "$(bc_div "$size" "$MiB")" | tee -a "$dir/PACKED"
    done
    printf '  %-16s %6.1f MiB (limit 64 MiB)\n' total "$(bc_div "$total" "$MiB")" | tee -a "$dir/PACKED"
    if ((total > 64 * MiB)); then
        echo "the packed binaries exceed 64 MiB" >&2
        return 1
    fi
    echo "pack: $dir; on the GPU machine (repository root, $dir carried): scripts/gpu-check.sh OUT_DIR"
}

# a / b with one decimal, in awk (no bc on minimal images).
bc_div() {
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a / b }'
}

case "${1:-}" in
--pack)
    shift
    pack "$@"
    exit
    ;;
-h | --help | "")
    usage
    [[ -n ${1:-} ]]
    exit
    ;;
esac

MODE=gpu
if [[ $1 == --cpu ]]; then
    MODE=cpu
    shift
fi
if [[ $# -ne 1 ]]; then
    usage >&2
    exit 2
fi
OUT_DIR=$1
mkdir -p "$OUT_DIR/logs" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOGS=$OUT_DIR/logs
JSON=$OUT_DIR/gpu-check.json
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
if [[ ${GPU_CHECK_KEEP:-0} == 1 ]]; then
    trap 'echo "scratch kept: $WORK" >&2' EXIT
else
    trap 'rm -rf "$WORK"' EXIT
fi
PACK=${GPU_CHECK_PACK:-$ROOT/target/gpu-pack}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
DEADLINE=$((SECONDS + BUDGET))

# ---------------------------------------------------------------------------------------------------
# What runs, where: the binaries, the Python, the device and the sizes of each mode.
# ---------------------------------------------------------------------------------------------------

# The newest executable `NAME-<hash>` in the deps folder next to the pipeline binary (a --cpu run of
# the current build, where nothing was packed).
newest_test_binary() {
    local deps
    deps=$(dirname "$PIPELINE")/deps
    find "$deps" -maxdepth 1 -type f -executable -regextype posix-extended \
        -regex ".*/$1-[0-9a-f]{16}" -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-
}

if [[ $MODE == gpu ]]; then
    PIPELINE=${PIPELINE:-$PACK/pipeline}
    EXT_TESTS=${EXT_TESTS:-$PACK/torch-ext-tests}
    MODEL_TESTS=${MODEL_TESTS:-$PACK/model-tests}
    if [[ -z ${TORCH_PYTHON:-} ]]; then
        TORCH_PYTHON=/opt/torch/.venv/bin/python3
        [[ -x $TORCH_PYTHON ]] || TORCH_PYTHON=$(command -v python3)
    fi
    DEV=cuda:0
else
    if [[ -z ${PIPELINE:-} ]]; then
        PIPELINE=$ROOT/target/release/pipeline
        [[ -x $PIPELINE ]] || PIPELINE=$ROOT/target/debug/pipeline
    fi
    TORCH_PYTHON=${TORCH_PYTHON:-$ROOT/.venv/bin/python}
    [[ -n ${EXT_TESTS:-} || ! -x $PACK/torch-ext-tests ]] || EXT_TESTS=$PACK/torch-ext-tests
    [[ -n ${MODEL_TESTS:-} || ! -x $PACK/model-tests ]] || MODEL_TESTS=$PACK/model-tests
    EXT_TESTS=${EXT_TESTS:-$(newest_test_binary torch_ext)}
    MODEL_TESTS=${MODEL_TESTS:-$(newest_test_binary model)}
    DEV=cpu
fi
PIPELINE=$(realpath -m "$PIPELINE")

# The binaries' rpath names the build machine's venv, which does not exist on the GPU machine: the
# loader finds libtorch through LD_LIBRARY_PATH instead (the GPU machine's own torch 2.11).
TORCH_LIB=
if [[ $MODE == gpu ]]; then
    TORCH_LIB=$("$TORCH_PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)
    [[ -n $TORCH_LIB ]] && export LD_LIBRARY_PATH=$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
export RUST_BACKTRACE=1 RUST_LOG=${RUST_LOG:-info} PIPELINE_PROGRESS_SECS=10

# Sizes. GPU: what the issue asks for (150 training steps, batch-128 real-size encode, two flow sizes).
# CPU: the same commands on tiny settings, so a debug build runs the whole sequence in about a minute.
if [[ $MODE == gpu ]]; then
    PER_CLASS=20 BASE_PER_CLASS=80
    STEPS=150 STOP_AT=75 INF_AT=40 BATCH=32 MICRO=8
    EVAL_N=32 THREADS=8
    BASE_CONFIG=$ROOT/configs/imagenet256-latent.toml BASE_BATCHES=6
    FLOW_SMALL=(--preset in64 --channels 256 --blocks 4 --layers 2 --batch 64 --sample-batch 16 --steps 10 --sample-repeats 2 --bf16)
    # The paper's latent model (1.08e9 parameters) at batch 16: compute-bound, and small enough that the
    # Rust side's cached allocations plus the reference process's fit one 80 GB card together.
    FLOW_LARGE=(--preset latent256 --batch 16 --sample-batch 16 --steps 5 --sample-repeats 1 --bf16)
    # Issue 34's setting: N = 256 tokens, batch 64, guided; eager KV-cache steps against CUDA graphs
    # and Jacobi (a random flow: the cost per pass is real, its convergence is not a trained flow's).
    # Width 768 and 4 layers per block keep the Jacobi rows inside the check's limit.
    SOLVERS=(--random latent256 --channels 768 --layers 4 --samples 64 --guidance 1.5 --repeats 1
        --tol 1e-3 --cuda-graphs)
else
    PER_CLASS=4 BASE_PER_CLASS=4
    STEPS=12 STOP_AT=6 INF_AT=3 BATCH=16 MICRO=8
    EVAL_N=8 THREADS=1
    BASE_CONFIG='' BASE_BATCHES=2
    FLOW_SMALL=(--preset tiny --batch 4 --sample-batch 2 --steps 1 --sample-repeats 1)
    FLOW_LARGE=(--preset tiny-latent --batch 4 --sample-batch 2 --steps 1 --sample-repeats 1)
    SOLVERS=(--random tiny-latent --samples 2 --guidance 1.5 --repeats 1 --tol 1e-4,1e-3)
fi

# ---------------------------------------------------------------------------------------------------
# The check runner: each check runs in a subshell (nothing leaks into the next), under its own time
# limit and the run's deadline, with its output in logs/<name>.log; a failing check does not stop the
# others. Exit 0 = PASS, 77 = SKIP (the figure says why), 124/137 = timed out, anything else = FAIL.
# ---------------------------------------------------------------------------------------------------

ROWS=() # name<TAB>status<TAB>figure<TAB>seconds<TAB>log
CHECK='' CHECK_END=0 BAD=()
SKIP_RC=77

# The figure of the running check (the last call wins).
figure() {
    printf '%s' "$*" >"$LOGS/$CHECK.figure"
}

# Runs a command under what is left of the running check's limit.
t() {
    local left=$((CHECK_END - SECONDS))
    ((left > 0)) || return 124
    timeout --kill-after=10 "$left" "$@"
}

# pipeline SUBCOMMAND...: the binary under test, limited like every command of a check.
pl() {
    t "$PIPELINE" "$@"
}

json_str() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\t'/ }
    s=${s//$'\n'/ }
    s=${s//$'\r'/ }
    printf '"%s"' "$s"
}

write_json() {
    local row name status fig secs log first=1 passed=0 failed=0 skipped=0
    {
        printf '{\n  "mode": "%s",\n  "pipeline": %s,\n  "torch_lib": %s,\n  "checks": [\n' \
            "$MODE" "$(json_str "$PIPELINE")" "$(json_str "$TORCH_LIB")"
        for row in "${ROWS[@]}"; do
            IFS=$'\t' read -r name status fig secs log <<<"$row"
            case $status in PASS) passed=$((passed + 1)) ;; FAIL) failed=$((failed + 1)) ;; *) skipped=$((skipped + 1)) ;; esac
            ((first)) || printf ',\n'
            first=0
            printf '    {"name": %s, "status": "%s", "figure": %s, "seconds": %s, "log": %s}' \
                "$(json_str "$name")" "$status" "$(json_str "$fig")" "$secs" "$(json_str "$log")"
        done
        printf '\n  ],\n  "passed": %d,\n  "failed": %d,\n  "skipped": %d\n}\n' "$passed" "$failed" "$skipped"
    } >"$JSON.tmp" && mv "$JSON.tmp" "$JSON"
}

selected() {
    [[ -z ${GPU_CHECK_ONLY:-} || ",$GPU_CHECK_ONLY," == *",$1,"* ]]
}

# The body of one check, in its own subshell: sets what the check's functions read.
run_check() {
    CHECK=$1
    CHECK_END=$((SECONDS + $2))
    # GPU_CHECK_BREAK: an unknown flag for this check's main command.
    BAD=()
    [[ ${GPU_CHECK_BREAK:-} == "$CHECK" ]] && BAD=(--gpu-check-broken-on-purpose)
    echo "## $CHECK (limit $2 s, mode $MODE, $(date -u +%FT%TZ))"
    "$3"
}

check() {
    local name=$1 limit=$2 fn=$3
    local log=$LOGS/$name.log fig=$LOGS/$name.figure status figure_text rc
    local start=$SECONDS left=$((DEADLINE - SECONDS))
    : >"$fig"
    if ! selected "$name"; then
        status=SKIP figure_text="not selected (GPU_CHECK_ONLY)"
        : >"$log"
    elif ((left < 5)); then
        status=FAIL figure_text="not started: the run's ${BUDGET} s budget is spent"
        : >"$log"
    else
        ((limit > left)) && limit=$left
        (run_check "$name" "$limit" "$fn") >"$log" 2>&1 </dev/null
        rc=$?
        figure_text=$(cat "$fig")
        case $rc in
        0) status=PASS ;;
        "$SKIP_RC") status=SKIP ;;
        124 | 137)
            status=FAIL
            figure_text="timed out after ${limit} s${figure_text:+; $figure_text}"
            ;;
        *)
            status=FAIL
            if [[ -z $figure_text ]]; then
                # The last error-looking line of the log says most about what went wrong.
                figure_text=$(grep -E -i 'error|fail|panick|not found|refus' "$log" | tail -1 | cut -c1-200)
                [[ -n $figure_text ]] || figure_text="exit $rc"
            fi
            ;;
        esac
    fi
    rm -f "$fig"
    local secs=$((SECONDS - start))
    ROWS+=("$name"$'\t'"$status"$'\t'"$figure_text"$'\t'"$secs"$'\t'"logs/$name.log")
    printf '%-18s %-4s %5s s  %s\n' "$name" "$status" "$secs" "$figure_text" >&2
    write_json
}

# A JSON field (dotted path) of a JSON file, or of the last line of a log that parses as JSON (the
# benches print one such line).
json_field() {
    "$TORCH_PYTHON" - "$1" "$2" <<'EOF'
import json, sys
text = open(sys.argv[1], errors="replace").read()
try:
    doc = json.loads(text)
except ValueError:
    doc = None
for line in text.splitlines() if doc is None else []:
    line = line.strip()
    if line.startswith("{"):
        try:
            doc = json.loads(line)
        except ValueError:
            pass
value = doc
for key in sys.argv[2].split("."):
    value = value.get(key) if isinstance(value, dict) else None
print("" if value is None else value)
EOF
}

# `pipeline ARGS` while sampling memory: GPU memory in use (nvidia-smi, less what was in use before,
# so reserved and context memory count, which is what runs out) or, on the CPU, the peak RSS from GNU
# time. Sets PEAK_MIB ("" when nothing could measure it).
pl_with_peak() {
    local samples=$WORK/$CHECK.mem rc
    PEAK_MIB=
    if [[ $MODE == gpu ]]; then
        local base sampler
        base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 2>/dev/null | head -1)
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 200 >"$samples" 2>/dev/null &
        sampler=$!
        pl "$@"
        rc=$?
        kill "$sampler" 2>/dev/null
        wait "$sampler" 2>/dev/null
        PEAK_MIB=$(awk -v base="${base:-0}" '$1 + 0 > max { max = $1 + 0 } END { if (NR) print max - base }' "$samples")
    elif [[ -x /usr/bin/time ]]; then
        t /usr/bin/time -f '%M' -o "$samples" "$PIPELINE" "$@"
        rc=$?
        PEAK_MIB=$(awk 'END { if (NR) printf "%.0f", $1 / 1024 }' "$samples")
    else
        pl "$@"
        rc=$?
    fi
    return "$rc"
}

# A number that is neither NaN nor infinite (mawk and gawk read "nan" differently: both refused).
is_finite() {
    awk -v x="$1" 'BEGIN { exit !(x ~ /^[-+]?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$/) }'
}

# ---------------------------------------------------------------------------------------------------
# The checks.
# ---------------------------------------------------------------------------------------------------

# The binary and its libraries: every NEEDED library resolves (on the GPU machine: in its torch/lib),
# libtorch_cuda.so is NEEDED (without it `auto` silently trains on the CPU), and the Python's torch is
# the 2.11 that tch 0.24 was built for.
check_libraries() {
    [[ -x $PIPELINE ]] || {
        figure "no pipeline binary at $PIPELINE (build it, or scripts/gpu-check.sh --pack)"
        return 1
    }
    ldd "${BAD[@]}" "$PIPELINE" || return 1
    local missing torch cuda_needed=no
    # A library not found, or one too old for a symbol version (`version GLIBCXX_… not found`).
    missing=$(ldd "$PIPELINE" 2>&1 | grep 'not found' | sed 's/^[[:space:]]*//' | tr '\n' ';')
    if [[ -n $missing ]]; then
        figure "unresolved: $missing LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
        return 1
    fi
    # What the build machine's toolchain asks of this machine's C and C++ runtimes.
    objdump -T "$PIPELINE" 2>/dev/null | grep -oE 'GLIBC_[0-9.]+|GLIBCXX_[0-9.]+' | sort -uV |
        awk -F_ '{ newest[$1] = $0 } END { for (k in newest) print "needs " newest[k] }'
    if command -v readelf >/dev/null; then
        readelf -d "$PIPELINE" | grep -E 'NEEDED|RPATH|RUNPATH'
        readelf -d "$PIPELINE" | grep -q 'NEEDED.*libtorch_cuda\.so' && cuda_needed=yes
    else
        cuda_needed="unknown (no readelf)"
    fi
    torch=$(t "$TORCH_PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda or "cpu")') || {
        figure "no torch in $TORCH_PYTHON"
        return 1
    }
    echo "python torch: $torch"
    figure "torch ${torch% *} (CUDA ${torch#* }); libtorch_cuda.so NEEDED: $cuda_needed; all libraries resolved"
    [[ $torch == 2.11.* ]] || {
        figure "torch $torch at $TORCH_PYTHON: tch 0.24 needs torch 2.11"
        return 1
    }
    [[ $MODE == cpu || $cuda_needed == yes ]]
}

# The driver and the CUDA version it supports: cu13 wheels (torch 2.11) need a driver ≥ 580.
check_driver() {
    if [[ $MODE == cpu ]]; then
        figure "no GPU in --cpu mode (nvidia-smi)"
        return $SKIP_RC
    fi
    t nvidia-smi "${BAD[@]}" || return 1
    local q driver cuda
    q=$(t nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i 0) || return 1
    driver=$(cut -d, -f2 <<<"$q" | tr -d ' ')
    cuda=$(t nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)
    figure "$q; CUDA ${cuda:-?} supported"
    if ((${driver%%.*} < 580)); then
        figure "$q: driver $driver is older than 580, which CUDA 13 (the torch 2.11 wheels) needs"
        return 1
    fi
}

# Demo shards (training and held-out), a larger single shard for the real-size encode, the tiny
# encoders, and the effective demo config pointed at them.
check_demo_data() {
    pl demo-data "${BAD[@]}" --out "$WORK/data" --classes 10 --per-class "$PER_CLASS" --shards 2 --seed 0 || return 1
    pl demo-data --out "$WORK/heldout" --classes 10 --per-class 4 --shards 1 --seed 1 --prefix heldout || return 1
    pl demo-data --out "$WORK/base-data" --classes 10 --per-class "$BASE_PER_CLASS" --shards 1 --seed 2 --prefix base || return 1
    pl encoders init --preset tiny --out "$WORK/encoders" || return 1
    pl config --config "$ROOT/configs/demo.toml" \
        --set "data.shards=$WORK/data/demo-{000000..000001}.tar" \
        --set "precompute.encoder=$WORK/encoders/dinov2" --set "precompute.vae=$WORK/encoders/vae" \
        --set "precompute.device=$DEV" --set "precompute.cache=$WORK/cache-a" \
        --set "train.cache=$WORK/cache-a" --set "train.device=$DEV" --set "train.threads=$THREADS" \
        >"$WORK/config.toml" || return 1
    figure "$((20 * PER_CLASS)) training + 40 held-out + $((10 * BASE_PER_CLASS)) real-size images; tiny encoders"
}

needs() {
    local f
    for f in "$@"; do
        if [[ ! -e $f ]]; then
            figure "needs ${f#"$WORK"/} (from an earlier check)"
            return 1
        fi
    done
}

# libtorch sees the device and runs the frozen encoders on it (bf16 on CUDA).
check_cuda_seen() {
    needs "$WORK/encoders/vae" || return 1
    local out
    out=$(pl encoders check "${BAD[@]}" --encoder "$WORK/encoders/dinov2" --vae "$WORK/encoders/vae" --device "$DEV") || {
        echo "$out"
        return 1
    }
    echo "$out"
    # `encoders check` fails on a non-finite output; the device line says where and in which precision.
    figure "$(grep -m1 'device:' <<<"$out" | sed 's/^ *//'): DINOv2 forward, VAE encode + decode finite"
}

# A unit-test binary: its tests (or those matching FILTER...), every line shown; the figure is
# libtest's count.
run_tests() {
    local bin=$1 what=$2
    shift 2
    if [[ -z $bin || ! -x $bin ]]; then
        if [[ $MODE == cpu && -z $bin ]]; then
            # A narrow `cargo test -p pipeline` builds no unit-test binaries; a workspace run does.
            figure "$what unit tests not built here (cargo test -p $what --lib --no-run builds them)"
            return $SKIP_RC
        fi
        figure "no $what test binary (${bin:-none found}): scripts/gpu-check.sh --pack, or set the variable"
        return 1
    fi
    local rc
    t "$bin" "${BAD[@]}" --test-threads 4 --nocapture "$@" >"$WORK/$CHECK.out" 2>&1
    rc=$?
    cat "$WORK/$CHECK.out"
    local result skips
    result=$(grep -E '^test result:' "$WORK/$CHECK.out" | tail -1 | sed 's/^test result: //; s/; finished in.*//')
    # Tests with a GPU branch print `SKIPPED GPU branch of <test>: <why>` when they leave it out
    # (torch_ext::skip): on a GPU machine every such branch must have run.
    skips=$(grep -o 'SKIPPED GPU branch' "$WORK/$CHECK.out" | wc -l)
    figure "${result:-no result line}; GPU branches skipped: $skips"
    ((rc == 0)) || return "$rc"
    [[ $MODE == cpu || $skips == 0 ]]
}

check_ext_tests() {
    run_tests "${EXT_TESTS:-}" torch-ext
}

check_model_tests() {
    if [[ $MODE == cpu ]]; then
        # The CPU runs all of them in `cargo test --workspace` already; here the invocation is what is
        # checked, on the fastest module (the whole binary takes half a minute in a debug build).
        run_tests "${MODEL_TESTS:-}" model device::
    else
        run_tests "${MODEL_TESTS:-}" model
    fi
}

# A one-rank NCCL group (the trainer's process group and all-reduce) reducing a 64 MiB buffer; the
# command checks the result. On the CPU the same call over Gloo keeps the flags honest.
check_nccl() {
    local backend=nccl
    [[ $MODE == cpu ]] && backend=gloo
    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((20000 + RANDOM % 20000)) \
        pl bench allreduce "${BAD[@]}" --backend "$backend" --world 1 --mib 64 --repeats 5 >"$WORK/$CHECK.out" || {
        cat "$WORK/$CHECK.out"
        return 1
    }
    cat "$WORK/$CHECK.out"
    local s
    s=$(json_field "$WORK/$CHECK.out" seconds_min)
    is_finite "$s" || return 1
    if [[ $MODE == cpu ]]; then
        figure "NCCL needs a GPU; the same world-1 all-reduce over gloo passed ($(awk -v s="$s" 'BEGIN { printf "%.2f ms", 1e3 * s }'))"
        return $SKIP_RC
    fi
    figure "world 1, 64 MiB all-reduce $(awk -v s="$s" 'BEGIN { printf "%.2f ms", 1e3 * s }'), result checked"
}

# The trainer's step and KV-cache sampling against the PyTorch reference on the same device and
# libtorch: step-time ratio (Rust / PyTorch, lower is better), sampling-speed ratio (Rust / PyTorch,
# higher is better), the Rust step's peak memory.
bench_flow() {
    local out=$WORK/$CHECK.out
    pl bench flow "${BAD[@]}" "$@" --device "$DEV" --threads "$THREADS" --python "$TORCH_PYTHON" \
        --reference "$ROOT/tests/python/tarflow_ref.py" >"$out" || {
        cat "$out"
        return 1
    }
    cat "$out"
    local step sample peak rs ps ref_peak
    step=$(json_field "$out" step_time_ratio)
    sample=$(json_field "$out" sample_speed_ratio)
    peak=$(json_field "$out" rust.step_peak_mib)
    rs=$(json_field "$out" rust.step_s)
    ps=$(json_field "$out" pytorch.step_s)
    # The reference reports no peak yet; shown once it does.
    ref_peak=$(json_field "$out" pytorch.step_peak_mib)
    figure "$(awk -v a="$step" -v b="$sample" -v p="$peak" -v rs="$rs" -v ps="$ps" -v rp="$ref_peak" 'BEGIN {
        printf "step Rust/PyTorch %.2fx (%.1f vs %.1f ms), sampling speed Rust/PyTorch %.2fx, step peak %.0f MiB", a, 1e3 * rs, 1e3 * ps, b, p
        if (rp != "") printf " (PyTorch %.0f MiB)", rp }')"
    is_finite "$step" && is_finite "$sample"
}

check_bench_flow_small() {
    bench_flow "${FLOW_SMALL[@]}"
}

check_bench_flow_large() {
    bench_flow "${FLOW_LARGE[@]}"
}

# The reverse-pass solvers on one random flow and the same noise (`bench solvers`): each row's speed
# against the eager sequential sampler, its sequential depth; the CUDA-graph row must match the eager
# one within 1e-4 and every row must be finite. The speeds are figures, not pass/fail.
check_solvers() {
    local out=$WORK/$CHECK.out summary
    pl bench solvers "${BAD[@]}" "${SOLVERS[@]}" --device "$DEV" --threads "$THREADS" >"$out" || {
        cat "$out"
        return 1
    }
    cat "$out"
    summary=$("$TORCH_PYTHON" "$ROOT/scripts/solvers_summary.py" "$out") || return 1
    figure "${summary#* }"
    [[ $summary == ok* ]]
}

# sha256 of every cache file by its path under the cache root, leaving out the manifest (it records
# times) and the lock files.
cache_hashes() {
    (cd "$1" && find . -type f ! -name 'manifest*' ! -name '.*' -print0 | sort -z | xargs -0 -r sha256sum)
}

# Precompute of the demo shards on the device, twice into two caches: the shards must be
# byte-identical (a rerun, another rank, a killed-and-resumed run write the same bytes). The encode
# stage's wait-in fraction comes from the end-of-run stage table.
check_precompute() {
    needs "$WORK/config.toml" || return 1
    pl precompute "${BAD[@]}" --config "$WORK/config.toml" --cache "$WORK/cache-a" 2>&1 | tee "$WORK/pre-a.log"
    [[ ${PIPESTATUS[0]} == 0 ]] || return 1
    pl precompute --config "$WORK/config.toml" --cache "$WORK/cache-b" 2>&1 | tee "$WORK/pre-b.log"
    [[ ${PIPESTATUS[0]} == 0 ]] || return 1
    local a b n wait rate
    a=$(cache_hashes "$WORK/cache-a")
    b=$(cache_hashes "$WORK/cache-b")
    echo "$a"
    n=$(grep -c . <<<"$a")
    # The stage table: `encode  items MB items/s busy% wait-in% blocked% cpu-s` (stages::metrics).
    wait=$(awk '$1 == "encode" && NF >= 8 { w = $6 } END { print w }' "$WORK/pre-a.log")
    rate=$(awk '$1 == "encode" && NF >= 8 { r = $4 } END { print r }' "$WORK/pre-a.log")
    if [[ $n -eq 0 ]]; then
        figure "no cache files written"
        return 1
    fi
    if [[ $a != "$b" ]]; then
        figure "$(diff <(echo "$a") <(echo "$b") | grep -c '^<') of $n cache files differ between two runs; encode wait-in ${wait:-?} %"
        return 1
    fi
    figure "$n cache files byte-identical across two runs; encode wait-in ${wait:-?} %, ${rate:-?} encodes/s"
}

# The real-size encode: random DINOv2-B and SD-VAE (`encoders init --preset base`), the latent
# preset's precompute settings (256 px, batch 128, flips), a few batches of a dry run; images/s as the
# dry run measures it (first batch's warm-up included) and the peak memory. --cpu runs the tiny
# encoders at 64 px, but still writes the base folders.
check_encode_base() {
    needs "$WORK/base-data/base-000000.tar" "$WORK/config.toml" || return 1
    local config=$WORK/config.toml encoder=$WORK/encoders/dinov2 vae=$WORK/encoders/vae batch=8
    pl encoders init "${BAD[@]}" --preset base --out "$WORK/base" || return 1
    ls -l "$WORK/base"
    if [[ $MODE == gpu ]]; then
        config=$BASE_CONFIG encoder=$WORK/base/dinov2 vae=$WORK/base/vae batch=128
    fi
    pl_with_peak precompute --dry-run --dry-run-batches "$BASE_BATCHES" --config "$config" \
        --set "data.shards=$WORK/base-data/base-000000.tar" --set "precompute.encoder=$encoder" \
        --set "precompute.vae=$vae" --set "precompute.device=$DEV" --set "precompute.batch_size=$batch" \
        >"$WORK/$CHECK.out" 2>&1
    local rc=$?
    cat "$WORK/$CHECK.out"
    ((rc == 0)) || return 1
    # `dry run: N samples from SHARD in S s (R images/s)`
    local line n secs rate
    line=$(grep -m1 '^dry run:' "$WORK/$CHECK.out")
    n=$(sed -n 's/^dry run: \([0-9]*\) samples.*/\1/p' <<<"$line")
    secs=$(sed -n 's/.* in \([0-9.]*\) s (.*/\1/p' <<<"$line")
    rate=$(sed -n 's/.*(\([0-9.]*\) images\/s).*/\1/p' <<<"$line")
    figure "${rate:-?} images/s ($n crops of $([[ $MODE == gpu ]] && echo '256 px, DINOv2-B + SD-VAE' || echo '64 px, tiny encoders'), batch $batch, in ${secs:-?} s); peak ${PEAK_MIB:-?} MiB $([[ $MODE == gpu ]] && echo 'GPU (nvidia-smi, over idle)' || echo 'RSS')"
    is_finite "$rate"
}

# The trainer on the device: R-REPA (the demo config), activation checkpointing, micro-batches, one
# injected infinite gradient (skipped on the device); an uninterrupted run against a run stopped
# halfway and resumed: every step's metrics and the final weights must be equal.
train_cmd() {
    local out=$1
    shift
    pl train --latent --config "$WORK/config.toml" --cache "$WORK/cache-a" --out "$out" \
        --set "train.steps=$STEPS" --set "train.batch=$BATCH" --set "train.micro_batch=$MICRO" \
        --set train.checkpoint_blocks=true --set train.metrics_every=1 \
        --set "train.checkpoint_every=$STOP_AT" --set train.keep_last=4 --set train.sample_every=0 \
        --set train.warmup_steps=10 --inject-inf-grad-at "$INF_AT" "$@"
}

check_train() {
    needs "$WORK/cache-a" || return 1
    local t0=$SECONDS
    train_cmd "$WORK/run" "${BAD[@]}" || return 1
    local full_s=$((SECONDS - t0))
    train_cmd "$WORK/run-part" --stop-at "$STOP_AT" || return 1
    train_cmd "$WORK/run-part" --resume || return 1
    local last
    last=$(printf 'step-%08d' "$STEPS")
    "$TORCH_PYTHON" - "$WORK/run" "$WORK/run-part" "$last" "$LOGS/$CHECK.figure" "$full_s" "$STEPS" <<'EOF'
import json, math, sys
from pathlib import Path
full, part, last, figure, secs, steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5]), int(sys.argv[6])
def metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
a, b = metrics(full), metrics(part)
problems = []
if len(a) != steps or len(b) != steps:
    problems.append(f"{len(a)} and {len(b)} metric lines, expected {steps}")
keys = ["loss", "nll_noised", "align_loss", "grad_norm", "epoch"]
differ = [x["step"] for x, y in zip(a, b) if any(x.get(k) != y.get(k) for k in keys)]
if differ:
    problems.append(f"metrics differ from step {differ[0]} ({len(differ)} steps)")
skipped = a[-1].get("skipped_nonfinite") if a else None
if skipped != 1:
    problems.append(f"skipped_nonfinite {skipped}, expected 1")
if not (a and math.isfinite(a[-1].get("loss", math.nan))):
    problems.append("final loss not finite")
same = []
for f in ("model.safetensors", "ema.safetensors"):
    x, y = (r / "checkpoints" / last / f for r in (full, part))
    if not (x.exists() and y.exists()):
        problems.append(f"{last}/{f} missing")
    elif x.read_bytes() != y.read_bytes():
        import torch
        from safetensors.torch import load_file
        tx, ty = load_file(str(x)), load_file(str(y))
        d = max((tx[k].float() - ty[k].float()).abs().max().item() for k in tx)
        problems.append(f"{f} differs after resume (max |diff| {d:.3g})")
    else:
        same.append(f.split(".")[0])
loss = a[-1]["loss"] if a else math.nan
text = (f"{steps} steps in {secs:.0f} s ({steps / max(secs, 1):.1f} steps/s incl. start-up), final loss {loss:.4f}, "
        f"{skipped} step skipped (inf grad); stop+resume: ")
text += "; ".join(problems) if problems else f"metrics and {' + '.join(same)} weights identical"
Path(figure).write_text(text)
print(text)
sys.exit(1 if problems else 0)
EOF
}

# One batch of each evaluation command on the trained run, timed; outputs must be finite.
check_sample() {
    needs "$WORK/run/checkpoints/latest" || return 1
    pl sample "${BAD[@]}" --run "$WORK/run" --num "$EVAL_N" --batch "$EVAL_N" --cfg 1.0 --no-png \
        --device "$DEV" --out "$WORK/samples" | tee "$WORK/$CHECK.out"
    [[ ${PIPESTATUS[0]} == 0 ]] || return 1
    local redrawn
    redrawn=$(sed -n 's/^redrawn for NaN\/Inf: //p' "$WORK/$CHECK.out")
    figure "$EVAL_N samples in one batch, redrawn for NaN/Inf: ${redrawn:-?}"
    [[ -s $WORK/samples/samples.npz && ${redrawn:-x} == 0 ]]
}

check_classify() {
    needs "$WORK/run/checkpoints/latest" || return 1
    pl classify "${BAD[@]}" --run "$WORK/run" --data "$WORK/heldout/heldout-000000.tar" --batch "$EVAL_N" \
        --limit "$EVAL_N" --device "$DEV" --out "$WORK/classify" || return 1
    local top1
    top1=$(json_field "$WORK/classify/summary.json" top1)
    figure "$EVAL_N held-out images in one batch, top-1 $(awk -v x="$top1" 'BEGIN { printf "%.1f %%", 100 * x }') (random init encoders; finite is the check)"
    is_finite "$top1"
}

check_bpd() {
    needs "$WORK/run/checkpoints/latest" || return 1
    pl bpd "${BAD[@]}" --run "$WORK/run" --data "$WORK/heldout/heldout-000000.tar" --batch "$EVAL_N" \
        --limit "$EVAL_N" --device "$DEV" | tee "$WORK/$CHECK.out"
    [[ ${PIPESTATUS[0]} == 0 ]] || return 1
    local mean metric
    mean=$(json_field "$WORK/$CHECK.out" mean)
    metric=$(json_field "$WORK/$CHECK.out" metric)
    figure "$EVAL_N held-out images in one batch, $metric $mean"
    is_finite "$mean"
}

# The latent preset's dry run: parameters, estimates and, on CUDA, one micro-batch measured. The preset's
# micro-batch is sized for an H200 (141 GB); on a smaller card the measurement takes half of it.
check_dry_run_latent() {
    local micro=() total
    if [[ $MODE == gpu ]]; then
        total=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0 2>/dev/null | head -1)
        ((${total:-0} < 100000)) && micro=(--set train.micro_batch=64)
    fi
    pl train "${BAD[@]}" --dry-run --latent --config "$ROOT/configs/imagenet256-latent.toml" \
        --set "train.device=$DEV" "${micro[@]}" | tee "$WORK/$CHECK.out"
    [[ ${PIPESTATUS[0]} == 0 ]] || return 1
    local measured params
    params=$(sed -n 's/.*flow: *\([0-9][0-9]*\).*/\1/p' "$WORK/$CHECK.out" | head -1)
    measured=$(grep -i -m1 'peaks at' "$WORK/$CHECK.out" || grep -i -m1 'measured' "$WORK/$CHECK.out")
    measured=${measured#"${measured%%[! ]*}"}
    if [[ $MODE == cpu ]]; then
        figure "flow ${params:-?} parameters; no measurement on the CPU (estimates only)"
        return 0
    fi
    figure "flow ${params:-?} parameters; ${measured:-no measured peak printed}${micro[*]:+ (${micro[1]}: the card has ${total} MiB)}"
    grep -q -i 'peaks at' <<<"$measured"
}

# ---------------------------------------------------------------------------------------------------
# The sequence. Limits are generous for an H100; the run's budget caps their sum.
# ---------------------------------------------------------------------------------------------------

echo "gpu-check ($MODE): $PIPELINE; logs in $LOGS" >&2
check libraries 30 check_libraries
check driver 15 check_driver
check demo-data 60 check_demo_data
check cuda-seen 30 check_cuda_seen
check ext-tests 60 check_ext_tests
check model-tests 90 check_model_tests
check nccl 30 check_nccl
check bench-flow-small 90 check_bench_flow_small
check bench-flow-large 150 check_bench_flow_large
check solvers 120 check_solvers
check precompute 60 check_precompute
check encode-base 90 check_encode_base
check train 150 check_train
check sample 30 check_sample
check classify 30 check_classify
check bpd 30 check_bpd
check dry-run-latent 90 check_dry_run_latent

# The table, once more in one piece on stdout.
failed=0 passed=0 skipped=0
printf '\n%-18s %-4s %7s  %s\n' check status seconds figure
for row in "${ROWS[@]}"; do
    IFS=$'\t' read -r name status fig secs _ <<<"$row"
    printf '%-18s %-4s %7s  %s\n' "$name" "$status" "$secs" "$fig"
    case $status in PASS) passed=$((passed + 1)) ;; FAIL) failed=$((failed + 1)) ;; *) skipped=$((skipped + 1)) ;; esac
done
echo
echo "gpu-check ($MODE): $passed PASS, $failed FAIL, $skipped SKIP in $SECONDS s; $JSON"
((failed == 0))
