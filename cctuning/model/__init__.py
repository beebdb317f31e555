"""The model side: architecture discovery, hooks, Decision Maker and the CCModel wrapper."""

from cctuning.model.arch import Architecture, locate
from cctuning.model.ccmodel import CCConfig, CCModel
from cctuning.model.decision import DecisionMaker, hard_gumbel_softmax
from cctuning.model.hooks import ConnectionHooks

__all__ = [
    "Architecture",
    "CCConfig",
    "CCModel",
    "ConnectionHooks",
    "DecisionMaker",
    "hard_gumbel_softmax",
    "locate",
]
