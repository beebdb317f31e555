#!/usr/bin/env bash
# One command for a GPU (issue 17): the CUDA-marked tests, a few bf16 training steps (tiny model,
# SmolLM2-135M) and the bf16/fp32 benchmark ratios on the device; a table on stdout, JSON in --out
# (default runs/gpu_check). Needs no internet. See scripts/gpu_check.py and docs/scaling.md.
#
#   scripts/gpu_check.sh                  # on a machine with CUDA
#   scripts/gpu_check.sh --quick          # fewer steps and repeats
#   scripts/gpu_check.sh --cpu --quick    # plumbing check on a machine without a GPU (not a GPU result)
#
# PYTHON defaults to .venv/bin/python when it exists, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
