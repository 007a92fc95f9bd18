#!/usr/bin/env bash
# Download, on a machine WITH network, the wheels the bare GPU machine needs beyond its preinstalled
# Python 3.12 + CUDA torch: megatron-core and what the GPU tests and tools/bench_gpu.py import.
# They land in tools/gpu_wheels/ (gitignored), which the device run carries (carry=["tools/gpu_wheels"])
# and tools/gpu_check.sh installs offline. docs/gpu.md explains the whole check.
#
#     bash tools/fetch_gpu_wheels.sh              # MCORE_VERSION=0.19.2 bash ... for the newer release
#
# Every package is pinned and fetched on its own with --no-deps: the GPU machine has no index to resolve
# against, so the list below IS the resolution (torch and its own dependencies are never fetched: the
# preinstalled CUDA build must stay the one in use). The versions are those this repo's CPU venv tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# overrides for a dry run of tools/gpu_check.sh on another Python (e.g. GPU_WHEELS_PY=3.11
# GPU_WHEELS_DIR=/tmp/wheels311); the device run uses the defaults
DEST=${GPU_WHEELS_DIR:-tools/gpu_wheels}
PYV=${GPU_WHEELS_PY:-3.12}
ABI=cp${PYV/./}
LIMIT_MIB=60          # the device run carries at most 64 MiB in all; leave room for the rest
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
MCORE_VERSION=${MCORE_VERSION:-0.16.1}   # setup.py allows >=0.16.1,<0.20; 0.16.1 is what CI pins

# name==version; why each is here:
PKGS=(
    "megatron-core==${MCORE_VERSION}"   # the baseline in bench_gpu.py; tests/megatron/test_gpu.py imports it
    "numpy==2.3.5"                      # megatron.core imports it at import time
    "packaging==26.4"                   # megatron.core (version checks) and pytest
    "psutil==7.2.2"                     # declared by setup.py (megatron-core's dist-checkpoint save)
    "pyyaml==6.0.4"                     # megatron_rl.utils.config
    "safetensors==0.8.0"                # megatron_rl.convert (HF checkpoints)
    "setuptools==78.1.1"                # torch.utils.cpp_extension imports it (megatron.core does); torch
    #                                     on 3.12 normally brings it, carried in case the image lacks it
    "pytest==9.2.0"
    "pluggy==1.7.0"                     # pytest
    "iniconfig==2.3.1"                  # pytest
    "pygments==2.21.0"                  # pytest >= 9 (its terminal output)
)

# cp312 (or $ABI) wheels for x86_64 Linux: several manylinux tags, because pip matches --platform literally and
# megatron-core's wheel is tagged manylinux_2_24 / _2_28 only (manylinux2014 alone finds none of 0.16.x)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux_2_5_x86_64 manylinux1_x86_64)
PLAT_ARGS=()
for p in "${PLATFORMS[@]}"; do PLAT_ARGS+=(--platform "$p"); done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl            # a stale wheel of another version would be installed too
for spec in "${PKGS[@]}"; do
    echo "== $spec"
    "$PY" -m pip download --disable-pip-version-check -q --only-binary=:all: --no-deps \
        --python-version "$PYV" --implementation cp --abi "$ABI" --abi abi3 --abi none "${PLAT_ARGS[@]}" \
        -d "$DEST" "$spec"
done

echo
echo "wheels in $DEST:"
total=0
for f in "$DEST"/*.whl; do
    size=$(stat -c %s "$f")
    total=$((total + size))
    awk -v s="$size" -v n="$(basename "$f")" 'BEGIN { printf "%8.2f MiB  %s\n", s / 1048576, n }'
done
awk -v s="$total" -v l="$LIMIT_MIB" 'BEGIN { printf "%8.2f MiB  total (limit %d MiB)\n", s / 1048576, l }'
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "ERROR: the wheels exceed ${LIMIT_MIB} MiB; the device run cannot carry them" >&2
    exit 1
fi
