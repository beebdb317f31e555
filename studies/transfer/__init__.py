"""The synthetic transfer study (docs/transfer.md): ``python -m studies.transfer --output DIR``."""
