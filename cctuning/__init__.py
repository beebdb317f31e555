"""cctuning: CC-Tuning (Ye et al., ACL 2025) for Hugging Face decoder-only LLMs.

Records → tokenised pair (:mod:`cctuning.data`) → two passes with the connection
(:mod:`cctuning.model`) → plain SFT loss on the Hugging Face ``Trainer`` (:mod:`cctuning.training`).
"""

from cctuning.errors import CCError, DataError
from cctuning.model import CCConfig, CCModel

__version__ = "0.1.0"
__all__ = ["CCConfig", "CCError", "CCModel", "DataError", "__version__"]
