#!/usr/bin/env bash
# Build bench/flashinfer/fi_bench.cu against the headers in .flashinfer/ (bench/flashinfer/prepare.sh):
#     bash bench/flashinfer/build.sh [OUTPUT]        # default build/flashinfer/fi_bench
# One nvcc call, CUDA runtime only (no torch, no ninja); flags as FlashInfer's JIT builds its
# sampling module (-O3 -use_fast_math --expt-relaxed-constexpr, C++17). MAX_JOBS > 1 adds
# --split-compile=MAX_JOBS (bench/gpu_check.sh: 16).
# Environment: FLASHINFER_DIR (default <repo>/.flashinfer), NVCC (default: nvcc on PATH, else
# $CUDA_HOME/bin/nvcc, else /usr/local/cuda/bin/nvcc), FI_ARCH (default: the visible GPU's
# compute capability, sm_90a on a Hopper or where no GPU is visible), NVCC_FLAGS (extra flags),
# PYTHON (finds the curand headers of the nvidia-curand wheel where the toolkit has none).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
FI=${FLASHINFER_DIR:-$ROOT/.flashinfer}
OUTPUT=${1:-$ROOT/build/flashinfer/fi_bench}
if [ ! -f "$FI/include/flashinfer/sampling.cuh" ]; then
    echo "build: $FI/include/flashinfer/sampling.cuh missing: run bench/flashinfer/prepare.sh (here) and carry .flashinfer" >&2
    exit 2
fi
NVCC=${NVCC:-$(command -v nvcc || true)}
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    [ -z "$NVCC" ] && [ -x "$candidate" ] && NVCC=$candidate
done
[ -n "$NVCC" ] || { echo "build: nvcc not found" >&2; exit 2; }

if [ -z "${FI_ARCH:-}" ]; then
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .' || true)
    case $cc in
        ''|90) FI_ARCH=90a ;;   # Hopper, or no GPU visible (compile checks)
        *) FI_ARCH=$cc ;;
    esac
fi

mkdir -p "$(dirname "$OUTPUT")"
# sampling.cuh includes curand's headers (its device API is header-only: nothing to link).
# A toolkit without them (a minimal install): take them from the nvidia-curand wheel that a
# CUDA build of torch depends on, through a folder of links to curand*.h alone, so that the
# wheel's copies of the runtime headers never shadow the toolkit's.
extra_inc=()
if ! echo '#include <curand_kernel.h>' | "$NVCC" -E -x cu - -o /dev/null >/dev/null 2>&1; then
    PY=${PYTHON:-$(command -v python3 || command -v python || true)}
    curand_dir=$("$PY" -c '
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
found = [f for r in roots for f in sorted(glob.glob(os.path.join(r, "*", "include", "curand_kernel.h")))]
print(os.path.dirname(found[0]) if found else "")
' 2>/dev/null || true)
    if [ -n "$curand_dir" ]; then
        links=$(dirname "$OUTPUT")/curand_include
        rm -rf "$links" && mkdir -p "$links"
        ln -s "$curand_dir"/curand*.h "$links"/
        extra_inc=(-I"$links")
        echo "build: curand headers from $curand_dir" >&2
    else
        echo "build: warning: nvcc finds no curand_kernel.h, nor is there an nvidia-curand wheel ($PY)" >&2
    fi
fi
cmd=("$NVCC" -std=c++17 -O3 -DNDEBUG -use_fast_math --expt-relaxed-constexpr
     -DFLASHINFER_ENABLE_F16 -DFLASHINFER_ENABLE_BF16 -DFLASHINFER_ENABLE_FP8_E4M3 -DFLASHINFER_ENABLE_FP8_E5M2
     "-gencode=arch=compute_${FI_ARCH},code=sm_${FI_ARCH}" -I"$FI/include" "${extra_inc[@]}"
     ${NVCC_FLAGS:-} "$ROOT/bench/flashinfer/fi_bench.cu" -o "$OUTPUT")
# One translation unit: MAX_JOBS threads for the device optimiser and ptxas (nvcc's
# --split-compile; 1 = off, the default here).
if (( ${MAX_JOBS:-1} > 1 )); then cmd+=("--split-compile=${MAX_JOBS}"); fi
echo "build: ${cmd[*]}" >&2
start=$SECONDS
"${cmd[@]}"
echo "build: $OUTPUT in $(( SECONDS - start ))s (FlashInfer $(cat "$FI/VERSION" 2>/dev/null || echo '?'), sm_${FI_ARCH})" >&2
