#!/usr/bin/env bash
# The one check to run on a GPU machine (H100/H200), from the repository root:
#     bash bench/gpu_check.sh
# Steps, each logged and summarised as a PASS/FAIL/SKIP line in summary.txt; a failing
# step never stops the ones after it:
#   env         nvidia-smi, nvcc, python, torch                      -> build.log
#   build       pip install -e . (CUDA, sm_90a), timed; wheels in .whl/ first
#   cuda-kernel dspark::verify has a CUDA kernel and a GPU is visible
#   tests-cuda  pytest -m cuda                                       -> tests.log
#   tests-all   the whole suite but the slow tests
#   memcheck    compute-sanitizer on bench/sanitize_verify.py        -> sanitizer.log
#               (verify and markov_draft cases)
#   racecheck   (SKIP with the reason where the sanitizer is absent or refused)
#   bench       bench/bench_verify.py --device cuda --quick          -> bench.log,
#               verify_cuda.json, verify_cuda.png
#   flashinfer  FlashInfer's speculative-sampling pipeline (softmax, top-k/top-p renorm,
#               chain_speculative_sampling) on the same shapes, for comparison: builds
#               bench/flashinfer/fi_bench.cu against .flashinfer/ (the headers that
#               bench/flashinfer/prepare.sh extracts; carry ".flashinfer") -> bench.log,
#               flashinfer_cuda.json (SKIP where .flashinfer/ is absent)
#   bench-more  bench/bench_markov.py --quick --no-compile, bench/bench_confidence.py --quick,
#               bench/bench_scheduler.py                             -> bench.log
# Output folder: $OUT if set, else ./gpu_check_out (at most 8 files, none nested: the device
# machine returns no more).
# Every step has a time limit, shortened as needed so that the whole check ends within
# DSPARK_GPU_CHECK_BUDGET seconds (default 470), with time kept back for the bench.
#
# Environment:
#   OUT                          output folder
#   PYTHON                       interpreter (default: python3, else python)
#   DSPARK_GPU_CHECK_SKIP_BUILD  1: use the extension already built (local dry runs)
#   DSPARK_GPU_CHECK_BUDGET      seconds for the whole check (default 470)
#   DSPARK_GPU_CHECK_BENCH_ARGS  bench arguments (default: --quick; "" = the full grid)
#   DSPARK_GPU_CHECK_TESTS_ARGS  arguments of the whole-suite run (default: -m 'not slow';
#                                "" = every test)
#   MAX_JOBS, TORCH_CUDA_ARCH_LIST  build settings (default 16, 9.0a)
set -u
export PYTHONUNBUFFERED=1

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/summary.txt
BUILD_LOG=$OUT/build.log
TESTS_LOG=$OUT/tests.log
SAN_LOG=$OUT/sanitizer.log
BENCH_LOG=$OUT/bench.log
: >"$SUMMARY"; : >"$BUILD_LOG"; : >"$TESTS_LOG"; : >"$SAN_LOG"; : >"$BENCH_LOG"

BUDGET=${DSPARK_GPU_CHECK_BUDGET:-470}
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
START=$SECONDS

# ---------------------------------------------------------------- helpers
# record STATUS STEP SECONDS DETAIL: one summary line, echoed to stdout as well.
record() {
    local line
    line=$(printf '%-4s  %-11s  %4ss  %s' "$1" "$2" "$3" "$4")
    echo "$line" | tee -a "$SUMMARY"
}

# limit CAP RESERVE: seconds for a step, at most CAP, leaving RESERVE for later steps.
limit() {
    local left=$(( BUDGET - (SECONDS - START) - $2 ))
    (( left > $1 )) && left=$1
    (( left < 15 )) && left=15
    echo "$left"
}

# section LOG TITLE: a header in a log.
section() {
    printf '\n===== %s (%s, t=%ss)\n' "$2" "$(date -u +%H:%M:%S)" "$(( SECONDS - START ))" >>"$1"
}

# pytest_tail LOG: the last "N passed ..." line of a pytest run.
pytest_tail() {
    grep -E '(passed|failed|error|skipped|no tests ran|deselected)' "$1" | tail -n 1 | sed 's/=//g; s/^ *//'
}

echo "dspark_ext gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo "${DSPARK_COMMIT:-unknown}"), budget ${BUDGET}s" | tee -a "$SUMMARY"

# ---------------------------------------------------------------- (a) environment
section "$BUILD_LOG" "environment"
step_start=$SECONDS
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  cwd: $ROOT"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo "${DSPARK_COMMIT:-unknown}")"
    echo "python: $PY ($("$PY" --version 2>&1))"
    echo "--- nvidia-smi"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi 2>&1
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm --format=csv 2>&1
    else
        echo "nvidia-smi: not on PATH"
    fi
    echo "--- nvcc --version"
    nvcc --version 2>&1 || echo "nvcc: not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
    echo "--- packages"
    "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|nvidia-cutlass|ninja|setuptools|wheel|pytest|numpy|scipy|matplotlib|triton) ' || true
    echo "--- cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2)"
} >>"$BUILD_LOG" 2>&1
TORCH_INFO=$("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "", sep="|")' 2>>"$BUILD_LOG")
echo "--- torch|cuda|gpu: $TORCH_INFO" >>"$BUILD_LOG"
TORCH_VERSION=$(echo "$TORCH_INFO" | cut -d'|' -f1)
GPU_NAME=$(echo "$TORCH_INFO" | cut -d'|' -f3)
NVCC_VERSION=$(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo "nvcc absent")
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
ENV_DETAIL="gpu: ${GPU_NAME:-none}, driver ${DRIVER:-?}, torch ${TORCH_VERSION:-?}, $NVCC_VERSION, $("$PY" --version 2>&1)"
if [ -n "$GPU_NAME" ]; then HAVE_GPU=1; record PASS env $(( SECONDS - step_start )) "$ENV_DETAIL"
else HAVE_GPU=0; record FAIL env $(( SECONDS - step_start )) "no GPU visible to torch; $ENV_DETAIL"; fi

# ---------------------------------------------------------------- (b) build
section "$BUILD_LOG" "build"
step_start=$SECONDS
if [ "${DSPARK_GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
    record SKIP build 0 "DSPARK_GPU_CHECK_SKIP_BUILD=1: using the extension already built"
else
    shopt -s nullglob
    wheels=(.whl/*.whl)
    shopt -u nullglob
    if (( ${#wheels[@]} )); then
        echo "--- carried wheels: ${wheels[*]}" >>"$BUILD_LOG"
        "$PY" -m pip install --no-index --no-deps "${wheels[@]}" >>"$BUILD_LOG" 2>&1 \
            || echo "(wheel install failed; going on without)" >>"$BUILD_LOG"
    fi
    "$PY" -c 'import cutlass_library' >/dev/null 2>&1 \
        || echo "--- nvidia-cutlass not installed: the CUDA build needs its CuTe headers (carry the wheel in .whl/, or set DSPARK_CUTLASS_DIR)" >>"$BUILD_LOG"
    export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
    # ptxas -v: registers, shared memory and spills of every kernel, in the log.
    export NVCC_APPEND_FLAGS=${NVCC_APPEND_FLAGS:--Xptxas=-v}
    t=$(limit 300 200)
    echo "--- pip install -e . (MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, limit ${t}s)" >>"$BUILD_LOG"
    timeout "$t" "$PY" -m pip install --no-build-isolation --no-deps -v -e . >>"$BUILD_LOG" 2>&1
    rc=$?
    how="pip install -e ."
    if (( rc != 0 && rc != 124 )) && ! grep -q -E 'ninja: build stopped|error: command .*(nvcc|c\+\+|g\+\+).* failed' "$BUILD_LOG"; then
        # pip itself failed (not the compiler): build in place instead.
        t=$(limit 300 200)
        echo "--- pip failed (rc $rc) before compiling; python setup.py build_ext --inplace (limit ${t}s)" >>"$BUILD_LOG"
        timeout "$t" "$PY" setup.py build_ext --inplace >>"$BUILD_LOG" 2>&1
        rc=$?
        how="setup.py build_ext --inplace (pip failed)"
    fi
    spills=$(grep -E 'bytes spill (stores|loads)' "$BUILD_LOG" | grep -c -v -E ' 0 bytes spill stores, 0 bytes spill loads' || true)
    detail="$how in $(( SECONDS - step_start ))s; CUDA: $(grep -o -m1 'building the CUDA extension\|building the CPU-only extension ([^)]*)' "$BUILD_LOG" || echo '?'); ptxas reports with spills: $spills"
    if (( rc == 0 )); then record PASS build $(( SECONDS - step_start )) "$detail"
    elif (( rc == 124 )); then record FAIL build $(( SECONDS - step_start )) "timed out after ${t}s; $detail"
    else record FAIL build $(( SECONDS - step_start )) "rc $rc; $detail; see build.log: $(grep -m1 -E 'error' "$BUILD_LOG" | cut -c1-160)"; fi
fi

# ---------------------------------------------------------------- CUDA kernel registered?
step_start=$SECONDS
kernel_report=$("$PY" - 2>&1 <<'EOF'
import torch, dspark_ext
has = torch._C._dispatch_has_kernel_for_dispatch_key("dspark::verify", "CUDA")
print(f"library {dspark_ext._C.__file__}; verify CUDA kernel: {has}; GPU: {torch.cuda.is_available()}")
EOF
)
import_rc=$?
kernel_report=$(echo "$kernel_report" | tail -n 1)
echo "--- $kernel_report" >>"$BUILD_LOG"
HAVE_KERNEL=0
if (( import_rc != 0 )); then record FAIL cuda-kernel $(( SECONDS - step_start )) "import dspark_ext failed: $kernel_report"
elif [[ $kernel_report == *"CUDA kernel: True"* ]] && (( HAVE_GPU )); then
    HAVE_KERNEL=1; record PASS cuda-kernel $(( SECONDS - step_start )) "$kernel_report"
elif (( HAVE_GPU )); then record FAIL cuda-kernel $(( SECONDS - step_start )) "$kernel_report"
else record SKIP cuda-kernel $(( SECONDS - step_start )) "no GPU; $kernel_report"; fi

# ---------------------------------------------------------------- (c) tests
section "$TESTS_LOG" "pytest python_tests -m cuda"
step_start=$SECONDS
t=$(limit 120 170)
timeout "$t" "$PY" -m pytest python_tests -m cuda -q -x --durations=10 -p no:cacheprovider >>"$TESTS_LOG" 2>&1
rc=$?
tail_line=$(pytest_tail "$TESTS_LOG")
if (( rc == 124 )); then record FAIL tests-cuda $(( SECONDS - step_start )) "timed out after ${t}s; $tail_line"
elif (( rc == 5 )); then record SKIP tests-cuda $(( SECONDS - step_start )) "no CUDA tests collected"
elif (( ! HAVE_GPU )); then record SKIP tests-cuda $(( SECONDS - step_start )) "no GPU (rc $rc): $tail_line"
elif (( rc == 0 )); then record PASS tests-cuda $(( SECONDS - step_start )) "$tail_line"
else record FAIL tests-cuda $(( SECONDS - step_start )) "rc $rc: $tail_line"; fi

TESTS_ARGS=${DSPARK_GPU_CHECK_TESTS_ARGS-"-m 'not slow'"}
eval "tests_args=($TESTS_ARGS)"
section "$TESTS_LOG" "pytest python_tests ${tests_args[*]}"
step_start=$SECONDS
t=$(limit 120 140)
timeout "$t" "$PY" -m pytest python_tests -q --durations=10 -p no:cacheprovider "${tests_args[@]}" >>"$TESTS_LOG" 2>&1
rc=$?
tail_line=$(pytest_tail "$TESTS_LOG")
if (( rc == 124 )); then record FAIL tests-all $(( SECONDS - step_start )) "timed out after ${t}s; $tail_line"
elif (( rc == 5 )); then record SKIP tests-all $(( SECONDS - step_start )) "no tests collected"
elif (( rc == 0 )); then record PASS tests-all $(( SECONDS - step_start )) "$tail_line"
else record FAIL tests-all $(( SECONDS - step_start )) "rc $rc: $tail_line"; fi

# ---------------------------------------------------------------- (d) compute-sanitizer
SANITIZER=$(command -v compute-sanitizer || true)
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
                 /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -z "$SANITIZER" ] && [ -x "$candidate" ] && SANITIZER=$candidate
done
SAN_SKIP=""
if [ -z "$SANITIZER" ]; then SAN_SKIP="compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
elif (( ! HAVE_GPU )); then SAN_SKIP="no GPU"
elif (( ! HAVE_KERNEL )); then SAN_SKIP="no CUDA kernel for dspark::verify (see cuda-kernel)"; fi

# sanitize TOOL CAP RESERVE
sanitize() {
    local tool=$1 step_start=$SECONDS t rc body
    if [ -n "$SAN_SKIP" ]; then record SKIP "$tool" 0 "$SAN_SKIP"; return; fi
    t=$(limit "$2" "$3")
    section "$SAN_LOG" "compute-sanitizer --tool $tool (limit ${t}s)"
    local before
    before=$(wc -l <"$SAN_LOG")
    timeout "$t" "$SANITIZER" --tool "$tool" --error-exitcode 86 --print-limit 30 --report-api-errors no \
        "$PY" bench/sanitize_verify.py >>"$SAN_LOG" 2>&1
    rc=$?
    body=$(tail -n +"$((before + 1))" "$SAN_LOG")
    local verdict summary_line
    summary_line=$(echo "$body" | grep -E '(ERROR|RACECHECK) SUMMARY' | tail -n 1 | sed 's/^=* *//')
    verdict=$(echo "$body" | grep -E '^SANITIZE (DONE|ABORTED)' | tail -n 1)
    if (( rc == 124 )); then record FAIL "$tool" $(( SECONDS - step_start )) "timed out after ${t}s"
    elif [ -z "$verdict" ] && ! echo "$body" | grep -q -E 'Invalid __|Race reported|hazard' \
         && echo "$body" | grep -q -i -E 'not supported|permission|ERR_NVGPUCTRPERM|unable to (initialize|attach)|debugger.*fail|error 999|Target application terminated before first instrumented API call'; then
        SAN_SKIP="compute-sanitizer refused: $(echo "$body" | grep -i -m1 -E 'not supported|permission|ERR_NVGPUCTRPERM|unable to|debugger|error 999|before first instrumented' | sed 's/^=* *//' | cut -c1-160)"
        record SKIP "$tool" $(( SECONDS - step_start )) "$SAN_SKIP"
    elif (( rc == 0 )) && [ -n "$verdict" ]; then
        record PASS "$tool" $(( SECONDS - step_start )) "${summary_line:-no summary line}; $verdict"
    else
        record FAIL "$tool" $(( SECONDS - step_start )) "rc $rc; ${summary_line:-no summary line}; ${verdict:-script did not finish}"
    fi
}
sanitize memcheck 120 110
sanitize racecheck 120 90

# ---------------------------------------------------------------- (e) bench
step_start=$SECONDS
BENCH_ARGS=${DSPARK_GPU_CHECK_BENCH_ARGS-"--quick"}
eval "bench_args=($BENCH_ARGS)"
if (( ! HAVE_GPU )); then record SKIP bench 0 "no GPU"
elif (( ! HAVE_KERNEL )); then record SKIP bench 0 "no CUDA kernel for dspark::verify (see cuda-kernel)"
else
    t=$(limit 150 0)
    echo "python bench/bench_verify.py --device cuda ${bench_args[*]} --out $OUT (limit ${t}s)" >>"$BENCH_LOG"
    timeout "$t" "$PY" bench/bench_verify.py --device cuda "${bench_args[@]}" --out "$OUT" >>"$BENCH_LOG" 2>&1
    rc=$?
    if (( rc == 0 )); then record PASS bench $(( SECONDS - step_start )) "$(grep -m1 '^summary:' "$BENCH_LOG" | cut -c1-400)"
    elif (( rc == 124 )); then record FAIL bench $(( SECONDS - step_start )) "timed out after ${t}s"
    else record FAIL bench $(( SECONDS - step_start )) "rc $rc: $(tail -n 1 "$BENCH_LOG" | cut -c1-200)"; fi
fi

# ---------------------------------------------------------------- (f) FlashInfer comparison
# FlashInfer's pipeline on bench_verify's quick grid (bench/flashinfer/fi_bench.cu: one nvcc
# call against the carried headers, no torch; MAX_JOBS sets its --split-compile threads).
step_start=$SECONDS
FI_JSON=$OUT/flashinfer_cuda.json
rm -f "$FI_JSON"
if [ ! -f .flashinfer/include/flashinfer/sampling.cuh ]; then
    record SKIP flashinfer 0 "no .flashinfer/: run bench/flashinfer/prepare.sh here and carry .flashinfer"
elif (( ! HAVE_GPU )); then record SKIP flashinfer 0 "no GPU (.flashinfer/ $(cat .flashinfer/VERSION 2>/dev/null) present)"
else
    t=$(limit 90 0)
    fi_version=$(cat .flashinfer/VERSION 2>/dev/null || echo unknown)
    if (( t < 45 )); then record SKIP flashinfer 0 "only ${t}s of the budget left (build and run need ~45-90s)"
    else
        deadline=$(( SECONDS + t ))
        section "$BENCH_LOG" "FlashInfer $fi_version pipeline: bench/flashinfer/build.sh + fi_bench (limit ${t}s)"
        before=$(wc -l <"$BENCH_LOG")
        MAX_JOBS=${MAX_JOBS:-16} PYTHON=$PY timeout "$t" bash bench/flashinfer/build.sh build/flashinfer/fi_bench >>"$BENCH_LOG" 2>&1
        rc=$?
        if (( rc == 124 )); then record FAIL flashinfer $(( SECONDS - step_start )) "build timed out after ${t}s"
        elif (( rc != 0 )); then
            record FAIL flashinfer $(( SECONDS - step_start )) "build rc $rc: $(tail -n +"$((before + 1))" "$BENCH_LOG" | grep -m1 -E 'error' | cut -c1-160)"
        else
            left=$(( deadline - SECONDS )); (( left < 15 )) && left=15
            timeout "$left" build/flashinfer/fi_bench --reps 10 --warmup 3 --flashinfer-version "$fi_version" \
                --out "$FI_JSON" >>"$BENCH_LOG" 2>&1
            rc=$?
            fi_line=$("$PY" bench/flashinfer/summarize.py "$FI_JSON" "$OUT/verify_cuda.json" 2>&1 | head -n 1 | cut -c1-400)
            "$PY" bench/flashinfer/summarize.py "$FI_JSON" "$OUT/verify_cuda.json" --table >>"$BENCH_LOG" 2>&1
            if (( rc == 0 )); then record PASS flashinfer $(( SECONDS - step_start )) "$fi_line"
            elif (( rc == 124 )); then record FAIL flashinfer $(( SECONDS - step_start )) "fi_bench timed out after ${left}s"
            else record FAIL flashinfer $(( SECONDS - step_start )) "rc $rc: $(tail -n +"$((before + 1))" "$BENCH_LOG" | grep '^fi_bench:' | tail -n 1 | cut -c1-160); $fi_line"; fi
        fi
    fi
fi

# ---------------------------------------------------------------- (g) other benches
# markov_draft, confidence and scheduler: their tables go to bench.log (JSON/PNG stay in a scratch
# folder: the device returns at most 8 files, and $OUT holds 8 already).
step_start=$SECONDS
if (( ! HAVE_GPU )); then record SKIP bench-more 0 "no GPU"
else
    t=$(limit 150 0)
    scratch=$(mktemp -d)
    rc=0
    for script in bench_markov.py bench_confidence.py bench_scheduler.py; do
        section "$BENCH_LOG" "$script"
        extra=""
        [[ $script == bench_confidence.py ]] && extra="--quick"
        [[ $script == bench_markov.py ]] && extra="--quick --no-compile"
        timeout "$t" "$PY" "bench/$script" --device cuda $extra --out "$scratch" >>"$BENCH_LOG" 2>&1 || rc=$?
    done
    if (( rc == 0 )); then record PASS bench-more $(( SECONDS - step_start )) "markov_draft + confidence + scheduler tables in bench.log"
    else record FAIL bench-more $(( SECONDS - step_start )) "rc $rc: $(tail -n 1 "$BENCH_LOG" | cut -c1-200)"; fi
fi

# ---------------------------------------------------------------- summary
{
    echo
    echo "total $(( SECONDS - START ))s; $(grep -c '^PASS' "$SUMMARY") PASS, $(grep -c '^FAIL' "$SUMMARY") FAIL, $(grep -c '^SKIP' "$SUMMARY") SKIP; logs in $OUT"
    if grep -q '^| B ' "$BENCH_LOG"; then
        echo
        sed -n '/^### verify/,/^summary:/p' "$BENCH_LOG"
    fi
    if grep -q '^### FlashInfer .* vs dspark verify' "$BENCH_LOG"; then
        echo
        awk '/^### FlashInfer .* vs dspark verify/ { p = 1 }
             p { if (rows && $0 !~ /^\|/) exit; if ($0 ~ /^\|/) rows = 1; print }' "$BENCH_LOG"
    fi
} | tee -a "$SUMMARY"
grep -q '^FAIL' "$SUMMARY" && exit 1
exit 0
