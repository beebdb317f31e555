"""What the command line shows: our log lines (INFO), and none of the third-party lines that say
nothing to the user; ``cctuning -v`` shows everything (DEBUG, and the lines hidden here).

Hidden by default, each where it comes from:

* DeepSpeed's ``Setting accelerator to CPU. If you have GPU ...`` (a WARNING of the ``DeepSpeed``
  logger, which writes to stdout itself; deepspeed/accelerator/real_accelerator.py, when
  transformers or accelerate import deepspeed on a machine without CUDA: every train and export);
* transformers' ``FutureWarning: `is_gradient_checkpointing` is deprecated`` (peft reads that
  property when it wraps a model in LoRA adapters: every LoRA train and LoRA load);
* the debug chatter of httpx, urllib3 and filelock.
"""

from __future__ import annotations

import logging
import warnings

# (logger, the start of a message it logs that the default output leaves out)
HIDDEN_LOG_LINES = (("DeepSpeed", "Setting accelerator to CPU"),)
# (warning category, a regular expression matching the start of its message)
HIDDEN_WARNINGS = ((FutureWarning, r"`is_gradient_checkpointing` is deprecated"),)
CHATTY_LOGGERS = ("httpx", "urllib3", "filelock")


class _DropLines(logging.Filter):
    """Drops the records whose message starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


# one filter per logger, kept so that a later `-v` run in the same process can take it off again
_FILTERS = {
    name: _DropLines(tuple(start for logger, start in HIDDEN_LOG_LINES if logger == name))
    for name in dict.fromkeys(logger for logger, _ in HIDDEN_LOG_LINES)
}


def setup(verbose: bool) -> None:
    """Logging for a command: INFO (DEBUG with ``verbose``) with time and logger, third-party noise
    hidden unless ``verbose``. Call it before the command imports the libraries that log."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name, drop in _FILTERS.items():
        if verbose:
            logging.getLogger(name).removeFilter(drop)
        else:
            logging.getLogger(name).addFilter(drop)  # a logger made later by the library is this one
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    for category, message in HIDDEN_WARNINGS:  # the newest filter wins: -v puts the default back
        warnings.filterwarnings("default" if verbose else "ignore", message=message, category=category)
