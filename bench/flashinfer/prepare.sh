#!/usr/bin/env bash
# Extract the FlashInfer headers that bench/flashinfer/fi_bench.cu needs into .flashinfer/
# (gitignored), so that they can be carried to a GPU machine that has no package index:
# the flashinfer-python wheel (~100 MB) is too large to carry, its sampling kernels are
# header-only, and this subset is about half a megabyte.
#
#     bash bench/flashinfer/prepare.sh                 # pip download --no-deps flashinfer-python
#     bash bench/flashinfer/prepare.sh WHEEL.whl       # a downloaded wheel
#     bash bench/flashinfer/prepare.sh DIR             # a source checkout (DIR/include/flashinfer),
#                                                      # an installed package (DIR/data/include/flashinfer)
#                                                      # or a site-packages folder
# Then carry ".flashinfer" (with ".whl") in the device call; bench/gpu_check.sh builds and
# runs the harness when .flashinfer/ is present.
#
# What is taken: the closure of the quoted #include "..." lines of sampling.cuh (softmax,
# top-k renorm through topk.cuh, chain speculative sampling) and air_top_p.cuh (the top-p
# renorm for vocabularies >= 2048), unmodified, plus FlashInfer's LICENSE (Apache-2.0) and
# a VERSION file. Nothing of it is committed to this repository.
#
# Environment: FLASHINFER_DIR (default: <repo>/.flashinfer), PIP (default: .venv/bin/pip,
# else python3 -m pip), FLASHINFER_SPEC (default: flashinfer-python).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEST=${FLASHINFER_DIR:-$ROOT/.flashinfer}
ROOTS=(sampling.cuh air_top_p.cuh)
SRC=${1:-}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ -z "$SRC" ]; then
    if [ -n "${PIP:-}" ]; then pip_cmd=($PIP)
    elif [ -x "$ROOT/.venv/bin/pip" ]; then pip_cmd=("$ROOT/.venv/bin/pip")
    else pip_cmd=(python3 -m pip); fi
    echo "prepare: ${pip_cmd[*]} download --no-deps ${FLASHINFER_SPEC:-flashinfer-python}" >&2
    "${pip_cmd[@]}" download --no-deps --only-binary=:all: "${FLASHINFER_SPEC:-flashinfer-python}" -d "$WORK/dl" >&2
    SRC=$(ls "$WORK"/dl/flashinfer_python-*.whl | head -n 1)
fi

VERSION=unknown
LICENSE_FILE=""
if [ -f "$SRC" ]; then
    case $SRC in *.whl) ;; *) echo "prepare: $SRC is not a wheel" >&2; exit 2 ;; esac
    unzip -q "$SRC" 'flashinfer/data/include/flashinfer/*' '*.dist-info/*' -d "$WORK/wheel"
    INC=$WORK/wheel/flashinfer/data/include/flashinfer
    meta=$(ls "$WORK"/wheel/*.dist-info/METADATA | head -n 1)
    VERSION=$(sed -n 's/^Version: *//p' "$meta" | head -n 1)
    LICENSE_FILE=$(ls "$WORK"/wheel/*.dist-info/licenses/LICENSE "$WORK"/wheel/*.dist-info/LICENSE 2>/dev/null | head -n 1 || true)
elif [ -d "$SRC" ]; then
    INC=""
    for candidate in "$SRC/include/flashinfer" "$SRC/data/include/flashinfer" "$SRC/flashinfer/data/include/flashinfer"; do
        [ -z "$INC" ] && [ -f "$candidate/sampling.cuh" ] && INC=$candidate
    done
    [ -n "$INC" ] || { echo "prepare: no include/flashinfer/sampling.cuh under $SRC" >&2; exit 2; }
    for candidate in "$SRC/LICENSE" "$SRC/../LICENSE" "$SRC"/flashinfer_python-*.dist-info/licenses/LICENSE \
                     "$SRC"/../flashinfer_python-*.dist-info/licenses/LICENSE; do
        [ -z "$LICENSE_FILE" ] && [ -f "$candidate" ] && LICENSE_FILE=$candidate
    done
    for candidate in "$SRC/version.txt" "$SRC/flashinfer/version.txt"; do
        [ "$VERSION" = unknown ] && [ -f "$candidate" ] && VERSION=$(head -n 1 "$candidate")
    done
    if [ "$VERSION" = unknown ]; then
        meta=$(ls "$SRC"/flashinfer_python-*.dist-info/METADATA "$SRC"/../flashinfer_python-*.dist-info/METADATA 2>/dev/null | head -n 1 || true)
        [ -n "$meta" ] && VERSION=$(sed -n 's/^Version: *//p' "$meta" | head -n 1)
    fi
else
    echo "prepare: $SRC: no such wheel or folder" >&2; exit 2
fi

# The closure of quoted includes, relative to include/flashinfer/.
declare -A seen=()
queue=("${ROOTS[@]}")
while (( ${#queue[@]} )); do
    name=${queue[0]}; queue=("${queue[@]:1}")
    [ -n "${seen[$name]:-}" ] && continue
    [ -f "$INC/$name" ] || { echo "prepare: $INC/$name is missing (needed by the harness)" >&2; exit 3; }
    seen[$name]=1
    dir=$(dirname "$name")
    while read -r inc; do
        # "x.h" is relative to the including file's folder, then to include/flashinfer/.
        if [ -f "$INC/$dir/$inc" ]; then queue+=("$(realpath -m --relative-to="$INC" "$INC/$dir/$inc")")
        elif [ -f "$INC/$inc" ]; then queue+=("$inc")
        elif [[ $inc == flashinfer/* ]] && [ -f "$INC/${inc#flashinfer/}" ]; then queue+=("${inc#flashinfer/}")
        else echo "prepare: note: #include \"$inc\" of $name not found in the package (system header?)" >&2; fi
    done < <(sed -n 's/^[[:space:]]*#[[:space:]]*include[[:space:]]*"\([^"]*\)".*/\1/p' "$INC/$name")
done

rm -rf "$DEST"
mkdir -p "$DEST/include/flashinfer"
for name in "${!seen[@]}"; do
    mkdir -p "$DEST/include/flashinfer/$(dirname "$name")"
    cp "$INC/$name" "$DEST/include/flashinfer/$name"
done
if [ -n "$LICENSE_FILE" ]; then cp "$LICENSE_FILE" "$DEST/LICENSE"
else echo "prepare: warning: FlashInfer's LICENSE not found; add it to $DEST/LICENSE (Apache-2.0)" >&2; fi
echo "$VERSION" >"$DEST/VERSION"
{
    echo "FlashInfer $VERSION headers, unmodified, extracted by bench/flashinfer/prepare.sh from"
    echo "$(basename "$SRC") for bench/flashinfer/fi_bench.cu. Not part of dspark_ext; see LICENSE."
} >"$DEST/README"

echo "prepare: FlashInfer $VERSION -> $DEST (${#seen[@]} headers: $(printf '%s ' "${!seen[@]}" | tr ' ' '\n' | sort | tr '\n' ' '))"
echo "prepare: size $(du -sh "$DEST" | cut -f1) ($(du -sb "$DEST" | cut -f1) bytes); carry \".flashinfer\""
