#!/usr/bin/env bash
# The Megatron tests again on megatron-core 0.19.x (what GPU users run on Python 3.12). 0.19 declares
# Python >= 3.12, yet its cp311 wheel works: install it with --ignore-requires-python into its own venv
# (.venv019), beside torch's CPU wheel, plus triton (an undeclared import of 0.19.x).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv019/bin/python ] || "$PY" -m venv .venv019
PIP=".venv019/bin/pip --disable-pip-version-check -q"
$PIP install "torch==2.13.0"
$PIP install -c tools/constraints-cpu.txt numpy packaging psutil pyyaml pytest hypothesis triton safetensors \
    "transformers>=5.16.1,<5.20"
$PIP install --no-deps --ignore-requires-python "megatron-core==0.19.2"
$PIP install --no-deps -e .
.venv019/bin/python -c "import megatron.core as m; print('megatron-core', m.__version__)"
.venv019/bin/python -m pytest -q tests/megatron tests/parallel/test_context_parallel.py "$@"
