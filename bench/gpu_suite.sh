#!/usr/bin/env bash
# flashlite on a GPU machine, in one command and under 10 minutes:
#   1. build and install flashlite (pip install --no-build-isolation --no-deps -e .; no package
#      registry needed: torch, triton, pybind11, ninja, pytest are preinstalled),
#   2. flashlite info,
#   3. what the CPU machine cannot show, first: the Triton kernels compiled ahead of time for
#      sm_90 with their resource budgets (pytest -k "sm90 or budget"), then compute-sanitizer
#      racecheck and synccheck over bench/gpu_smoke.py (every pattern, forward and backward, small
#      shapes; memcheck too with FLASHLITE_SANITIZER=1),
#   4. the test suite with CUDA present (pytest tests -x -q),
#   5. flashlite bench at full size (--profile gpu --peak): validation, table, JSON, plots.
# Each step is time-boxed with `timeout`; a step that fails or runs out of time is recorded and
# the suite goes on. Logs, JSON and plots go to $OUT (default bench/results/<date>-gpu).
#
# Usage: bench/gpu_suite.sh [--dry-run] [extra `flashlite bench` options...]
#   --dry-run   print the steps (with their time limits) and run nothing
# Environment: OUT, PYTHON (default python, else python3), SUITE_SECONDS (total, default 570),
#   INSTALL_SECONDS (210), CHECKS_SECONDS (45 per sanitizer tool), TESTS_SECONDS (120); the benchmark gets
#   the time left (at least 90 s). FLASHLITE_SANITIZER=1 adds a memcheck pass.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY_RUN=0
BENCH_ARGS=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) BENCH_ARGS+=("$arg") ;;
    esac
done

PYTHON="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
OUT="${OUT:-bench/results/$(date +%Y%m%d-%H%M%S)-gpu}"
SUITE_SECONDS="${SUITE_SECONDS:-570}"
INSTALL_SECONDS="${INSTALL_SECONDS:-210}"
TESTS_SECONDS="${TESTS_SECONDS:-120}"
CHECKS_SECONDS="${CHECKS_SECONDS:-45}"
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
MIN_BENCH_SECONDS=90
STATUS=()
PLANNED=0  # dry run: the time the steps before would have taken at most

# seconds left of the suite's total
left() { echo $((SUITE_SECONDS - SECONDS - PLANNED)); }

# smaller of the step's limit and what the suite has left (never below 10 s)
limit() {
    local want="$1" remaining
    remaining="$(left)"
    if [ "$remaining" -lt "$want" ]; then want="$remaining"; fi
    if [ "$want" -lt 10 ]; then want=10; fi
    echo "$want"
}

# step NAME SECONDS LOG COMMAND...: run COMMAND under `timeout`, output to LOG, record the outcome
step() {
    local name="$1" seconds="$2" log="$3"
    shift 3
    if [ "$DRY_RUN" = 1 ]; then
        printf '+ [%s, at most %ss] timeout -k 20 %s %s > %s 2>&1\n' "$name" "$seconds" "$seconds" "$*" "$log"
        STATUS+=("$name: not run (dry run)")
        PLANNED=$((PLANNED + seconds))
        return 0
    fi
    echo "== $name (at most ${seconds}s) -> $log"
    local start=$SECONDS rc=0
    timeout -k 20 "$seconds" "$@" > "$log" 2>&1 || rc=$?
    local took=$((SECONDS - start)) outcome="ok"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        outcome="TIMED OUT"
    elif [ "$rc" != 0 ]; then
        outcome="FAILED (exit $rc)"
    fi
    STATUS+=("$name: $outcome, ${took}s")
    echo "   $outcome (${took}s)"
    tail -n 5 "$log" | sed 's/^/   | /'
}

if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_suite dry run: OUT=$OUT, total ${SUITE_SECONDS}s"
else
    mkdir -p "$OUT"
    echo "gpu_suite: OUT=$OUT, total ${SUITE_SECONDS}s"
    {
        date -u +%Y-%m-%dT%H:%M:%SZ
        git rev-parse HEAD 2>/dev/null || true
        nvidia-smi 2>&1 || true
        nvcc --version 2>&1 || true
        "$PYTHON" -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)' 2>&1 || true
    } > "$OUT/environment.log"
fi

step "install" "$(limit "$INSTALL_SECONDS")" "$OUT/install.log" \
    "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
step "info" "$(limit 30)" "$OUT/info.log" \
    "$PYTHON" -m flashlite.cli info
step "aot" "$(limit 60)" "$OUT/aot.log" \
    "$PYTHON" -m pytest tests -q -p no:cacheprovider -k "sm90 or budget"
SANITIZER_TOOLS=(racecheck synccheck)
if [ "${FLASHLITE_SANITIZER:-0}" = 1 ]; then SANITIZER_TOOLS+=(memcheck); fi
for tool in "${SANITIZER_TOOLS[@]}"; do
    step "sanitizer-$tool" "$(limit "$CHECKS_SECONDS")" "$OUT/sanitizer-$tool.log" \
        "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PYTHON" bench/gpu_smoke.py
done
step "tests" "$(limit "$TESTS_SECONDS")" "$OUT/tests.log" \
    "$PYTHON" -m pytest tests -x -q -p no:cacheprovider --junitxml="$OUT/tests.xml"

# The benchmark gets what is left; its own budget stops timing early enough to print the table
# and write the JSON and plots (SIGTERM from `timeout` also makes it report what it measured).
BENCH_SECONDS="$(left)"
if [ "$BENCH_SECONDS" -lt "$MIN_BENCH_SECONDS" ]; then BENCH_SECONDS="$MIN_BENCH_SECONDS"; fi
BUDGET=$((BENCH_SECONDS - 60))
step "bench" "$BENCH_SECONDS" "$OUT/bench.log" \
    "$PYTHON" -m flashlite.bench --profile gpu --peak --budget "$BUDGET" \
    --out "$OUT" --json "$OUT/bench.json" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}

echo "== summary (${SECONDS}s in all)"
printf '   %s\n' "${STATUS[@]}"
if [ "$DRY_RUN" = 0 ]; then
    printf '%s\n' "${STATUS[@]}" > "$OUT/summary.txt"
    echo "   files in $OUT:"
    find "$OUT" -maxdepth 1 -type f -printf '     %f\n' | sort
fi
