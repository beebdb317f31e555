"""Training: the config, the Trainer subclass and the end-to-end ``train`` entry point."""

from cctuning.training.args import TrainConfig
from cctuning.training.run import train
from cctuning.training.trainer import CCTrainer

__all__ = ["CCTrainer", "TrainConfig", "train"]
