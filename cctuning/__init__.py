"""cctuning: CC-Tuning (Ye et al., ACL 2025) for Hugging Face decoder-only LLMs.

Records → tokenised pair (:mod:`cctuning.data`) → two passes with the connection
(:mod:`cctuning.model`) → plain SFT loss on the Hugging Face ``Trainer`` (:mod:`cctuning.training`).

``CCConfig`` and ``CCModel`` are loaded on first use: they import torch, which ``cctuning --help``
and every module that does not need it (the CLI's parsers, the configs) must not wait for.
"""

from cctuning.errors import CCError, DataError

__version__ = "0.1.0"
__all__ = ["CCConfig", "CCError", "CCModel", "DataError", "__version__"]
_LAZY = {"CCConfig", "CCModel"}


def __getattr__(name: str):
    if name in _LAZY:
        from cctuning.model import ccmodel  # deferred: importing torch costs seconds (bench startup)

        return getattr(ccmodel, name)
    raise AttributeError(f"module 'cctuning' has no attribute {name!r}")
