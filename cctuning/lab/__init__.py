"""Orchestration over the library: the experiment runner (:mod:`.experiment`), the demo
(:mod:`.demo`), ``cctuning report`` (:mod:`.report`, :mod:`.plots`) and the connection's diagnostics
(:mod:`.diagnostics`). Nothing below this package imports it; only the command line does."""
