"""Records → tokenised pair → padded batch."""

from cctuning.data.collator import CCCollator
from cctuning.data.encoding import EncodedExample, PromptEncoder, PromptFormat
from cctuning.data.records import Record, load_records

__all__ = ["CCCollator", "EncodedExample", "PromptEncoder", "PromptFormat", "Record", "load_records"]
