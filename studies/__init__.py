"""Research studies built on the cctuning package; not part of the library (nothing in ``cctuning``
imports them). Each study is a package run as ``python -m studies.NAME``:

* ``studies.transfer``: a synthetic task where CC-Tuning's connection must help by construction
  (docs/transfer.md).
"""
