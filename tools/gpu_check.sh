#!/usr/bin/env bash
# The one prepared check for a bare GPU machine (docs/gpu.md): Python 3.12 + a CUDA torch preinstalled,
# no network, the repo's working tree plus tools/gpu_wheels (from tools/fetch_gpu_wheels.sh) carried in.
#
#     bash tools/gpu_check.sh            # writes everything under $OUT (default ./gpu_out)
#     GPU_CHECK_DRY_RUN=1 GPU_WHEELS_DIR=/tmp/wheels311 PYTHON=.venv/bin/python bash tools/gpu_check.sh
#                                        # a rehearsal without a GPU (tests and bench on the CPU)
#
# Stages (each prints a header and its wall time; a failing stage does not stop the later ones; the
# exit status is non-zero when any stage failed; stage rc's in $OUT/summary.txt):
#   1 environment   python, torch, CUDA, the GPU, glibc (the wheels are manylinux_2_28)
#   2 install       a venv over the preinstalled packages (torch is never installed, upgraded or shadowed),
#                   the carried wheels installed offline into it, the working tree importable from it
#   3 imports       torch is the preinstalled one; megatron.core, pytest, megatron_rl (+ .patches) import
#   4 pytest        python -m pytest -m gpu tests/gpu tests/megatron/test_gpu.py (junit xml + log)
#   5 bench         tools/bench_gpu.py: markdown table (+ json) of ours vs megatron-core
# Sized for <= 8 minutes on one H200 (~3 expected): PYTEST_TIMEOUT (default 200 s) and BENCH_TIMEOUT
# (150 s) cap the two long stages, so the worst case is ~7 minutes.
set -uo pipefail          # no -e: every stage runs, its rc is collected
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ENV_DIR=${MRL_GPU_ENV:-${TMPDIR:-/tmp}/mrl_gpu_env}
WHEELS=${GPU_WHEELS_DIR:-$REPO/tools/gpu_wheels}
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-200}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
BENCH_ARGS=()
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    # a rehearsal on a machine without a GPU: the tests on the CPU (tests/gpu/conftest.py), a small CPU
    # bench; with GPU_WHEELS_DIR holding wheels for the local Python (tools/fetch_gpu_wheels.sh overrides)
    export MRL_GPU_TEST_DEVICE=cpu
    BENCH_ARGS=(--device cpu --tokens 256 --vocab 4096 --iters 2 --warmup 1)
else
    unset MRL_GPU_TEST_DEVICE        # the tests' CPU dry-run switch must not leak into a GPU run
fi
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
FAILED=0
T_ALL=$(date +%s)

stage() {   # stage NAME FUNCTION: run it with a header, time it, record its rc; never abort the script
    local name=$1 t0 rc
    shift
    echo
    echo "=================== $name ==================="
    t0=$(date +%s)
    "$@"
    rc=$?
    echo "------------------- $name: rc=$rc, $(( $(date +%s) - t0 )) s -------------------"
    echo "$name rc=$rc wall_s=$(( $(date +%s) - t0 ))" >> "$SUMMARY"
    [ "$rc" -eq 0 ] || FAILED=1
    return 0
}

# the interpreter with the preinstalled torch: the first candidate that imports it
PY=""
for cand in ${PYTHON:-} python3 python python3.12; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then
        PY=$(command -v "$cand")
        break
    fi
done
VPY=$ENV_DIR/bin/python

environment() {
    if [ -z "$PY" ]; then
        echo "no python with torch found (tried: ${PYTHON:-} python3 python python3.12)"
        return 1
    fi
    echo "python: $PY"
    "$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import os, platform, sys
import torch
print("python", sys.version.split()[0], sys.executable, "| prefix", sys.prefix, "| base", sys.base_prefix)
print("torch", torch.__version__, "at", torch.__file__)
print("torch CUDA", torch.version.cuda, "| cudnn", torch.backends.cudnn.version(), "| NCCL",
      ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-")
print("cuda available", torch.cuda.is_available(), "| devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
print("glibc", "-".join(platform.libc_ver()))
for mod in ("numpy", "pytest", "yaml", "psutil", "safetensors", "setuptools", "pip", "megatron.core"):
    try:
        m = __import__(mod, fromlist=["_"])
        print(f"preinstalled {mod} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"preinstalled {mod}: none ({type(e).__name__})")
sys.exit(0 if torch.cuda.is_available() or os.environ.get("MRL_GPU_TEST_DEVICE") == "cpu" else 1)
EOF
    local rc=${PIPESTATUS[0]}
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used \
        --format=csv 2>&1 | tee -a "$OUT/env.txt"
    return "$rc"
}

install() {
    [ -n "$PY" ] || return 1
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS (run tools/fetch_gpu_wheels.sh, carry it)"; return 1; }
    if [ -e "$ENV_DIR" ]; then    # a fresh venv each run; refuse to delete anything that is not one
        [ -f "$ENV_DIR/pyvenv.cfg" ] || { echo "$ENV_DIR exists and is not a venv: set MRL_GPU_ENV"; return 1; }
        rm -rf "$ENV_DIR"
    fi
    # --system-site-packages: torch and the rest of the image stay visible; --without-pip: no ensurepip
    # (often stripped from distribution pythons), pip is used from the image if it has one
    "$PY" -m venv --system-site-packages --without-pip "$ENV_DIR" || return 1
    local site
    site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    # If $PY is itself a venv, --system-site-packages exposes its BASE interpreter's packages, not its own
    # (where torch is): add $PY's site dirs as site dirs (their .pth files processed too), after ours.
    # (a module, not code in the .pth line: site exec()s such lines in a scope comprehensions cannot see)
    "$PY" - "$site" <<'EOF' || return 1
import site, sys
dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
with open(sys.argv[1] + "/_mrl_base_site.py", "w") as f:
    f.write('"""Written by tools/gpu_check.sh: the site dirs of the interpreter with the preinstalled torch."""\n'
            "import site\nimport sys\n\nfor d in %r:\n    if d not in sys.path:\n        site.addsitedir(d)\n" % dirs)
with open(sys.argv[1] + "/zz_mrl_base_site.pth", "w") as f:    # zz: processed after the venv's own .pth
    f.write("import _mrl_base_site\n")
EOF
    # megatron_rl.patches lives in patches/ (setup.py's package_dir), so PYTHONPATH=. alone cannot find
    # it: a meta-path finder, consulted after the normal ones, maps that one package name to patches/.
    cat > "$site/_mrl_patches_finder.py" <<EOF
"""Written by tools/gpu_check.sh: import megatron_rl.patches from $REPO/patches (setup.py's package_dir)."""
import importlib.abc
import importlib.util
import sys

_DIR = "$REPO/patches"


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "megatron_rl.patches":
            return None
        return importlib.util.spec_from_file_location(name, _DIR + "/__init__.py", submodule_search_locations=[_DIR])


sys.meta_path.append(_Finder())
EOF
    echo "import _mrl_patches_finder" > "$site/_mrl_patches.pth"
    # the carried wheels, offline, no dependency resolution (the wheel list IS the resolution), into the
    # venv only (--ignore-installed: never uninstalls the image's copies; torch is not among them)
    if "$VPY" -m pip --version >/dev/null 2>&1; then
        PIP_CONFIG_FILE=/dev/null "$VPY" -m pip install --no-index --no-deps --ignore-installed --no-cache-dir --disable-pip-version-check \
            --no-warn-script-location -q "$WHEELS"/*.whl || return 1
    else   # no pip in the image: a wheel is a zip laid out for site-packages
        echo "no pip: unpacking the wheels into $site"
        for w in "$WHEELS"/*.whl; do
            "$VPY" -m zipfile -e "$w" "$site" || return 1
        done
    fi
    ls "$site" | sed 's/^/  /'
}

imports() {
    [ -x "$VPY" ] || return 1
    local base_torch
    base_torch=$("$PY" -c "import torch; print(torch.__file__)") || return 1
    BASE_TORCH=$base_torch "$VPY" - <<'EOF'
import os, sys, warnings
warnings.filterwarnings("ignore")      # megatron-core's "no transformer-engine / apex" notices
import torch
assert os.path.realpath(torch.__file__) == os.path.realpath(os.environ["BASE_TORCH"]), f"torch shadowed: {torch.__file__}"
import numpy, pytest, yaml
import megatron.core
from megatron.core import parallel_state, tensor_parallel
import megatron_rl, megatron_rl.patches, megatron_rl.losses, megatron_rl.parallel
from megatron_rl.parallel import vocab_parallel as vp
print("torch", torch.__version__, "| numpy", numpy.__version__, "| pytest", pytest.__version__,
      "| megatron-core", megatron.core.__version__)
print("megatron_rl from", os.path.dirname(megatron_rl.__file__), "| patches from", megatron_rl.patches.__path__[0])
print("chunk budgets", getattr(vp, "CHUNK_BYTES", "CHUNK_BYTES missing"))
EOF
}

run_pytest() {
    [ -x "$VPY" ] || return 1
    timeout -k 15 "$PYTEST_TIMEOUT" "$VPY" -m pytest -m gpu -q -rs --durations=15 -p no:cacheprovider \
        --junitxml="$OUT/pytest.xml" tests/gpu tests/megatron/test_gpu.py 2>&1 | tee "$OUT/pytest.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "pytest: timed out after ${PYTEST_TIMEOUT} s"
    return "$rc"
}

run_bench() {
    [ -x "$VPY" ] || return 1
    timeout -k 15 "$BENCH_TIMEOUT" "$VPY" tools/bench_gpu.py --out "$OUT/bench_gpu.md" --json "$OUT/bench_gpu.json" \
        ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} 2>&1 | tee "$OUT/bench.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "bench: timed out after ${BENCH_TIMEOUT} s"
    return "$rc"
}

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"    # the working tree, ahead of any installed copy
stage "1 environment" environment
stage "2 install" install
stage "3 imports" imports
stage "4 pytest" run_pytest
stage "5 bench" run_bench

echo
echo "=================== summary ($(( $(date +%s) - T_ALL )) s; files in $OUT) ==================="
cat "$SUMMARY"
exit "$FAILED"
