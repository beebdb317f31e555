"""Evaluation: the vendored benchmark prompts (:mod:`.benchmarks`) and pure scoring rules (:mod:`.scoring`)."""
