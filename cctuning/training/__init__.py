"""Training: the config, the Trainer subclass and the end-to-end ``train`` entry point.

``TrainConfig`` (a plain dataclass) is imported at once; ``train`` and ``CCTrainer`` on first use,
since they import torch and transformers' Trainer (seconds), which ``cctuning train --help`` and the
configs of the other commands do not need.
"""

from cctuning.training.args import TrainConfig

__all__ = ["CCTrainer", "TrainConfig", "train"]


def __getattr__(name: str):
    if name == "train":
        from cctuning.training.run import train  # deferred: imports torch and the Trainer (seconds)

        return train
    if name == "CCTrainer":
        from cctuning.training.trainer import CCTrainer  # deferred: imports torch and the Trainer (seconds)

        return CCTrainer
    raise AttributeError(f"module 'cctuning.training' has no attribute {name!r}")
