"""Performance benchmarks: CC-Tuning next to plain SFT and plain generation, as machine-independent ratios.

Run ``python -m bench.run`` (``--quick`` for a short pass); see ``bench/README.md``.
"""
