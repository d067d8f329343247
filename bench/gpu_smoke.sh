#!/usr/bin/env bash
# The first GPU run in one go (issue 24): one GPU, offline, under 10 minutes. Prints a table, one
# row per check (bench/gpu_smoke.py says what each checks); exit status 1 if any failed.
#   bash bench/gpu_smoke.sh            # add --only step_7b ... to run some checks
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# the tests' tiny-model builders (tests/tiny.py, tests/test_train.py) are importable too
PYTHONPATH=tests exec timeout 600 "${PYTHON:-python}" -m bench.gpu_smoke "$@"
