"""Which ratios moved between two benchmark runs: every ratio figure of an earlier results file
against the same figure now (``python -m bench.run --compare OLD.json``; by default the file the run
replaces, read before it is replaced).

A *figure* is ``{"median", "min", "max", "repeats"}``; a *ratio* is a figure whose path names one
(``ratio``, ``speedup``, ``share_of_peak``, ``mfu`` or a ``/``). A ratio *moved* when its range over
the rounds now and its range then do not overlap: a change larger than the spread between rounds.
"""

from __future__ import annotations

from typing import Any

RATIO_WORDS = ("ratio", "speedup", "share_of_peak", "mfu", "/")
# subtrees that repeat figures recorded elsewhere in the results (train_step_ratio, generate_ratio_b1, ...)
MIRRORS = ("train_step", "generate")
SEPARATOR = " · "


def is_figure(value: Any) -> bool:
    return isinstance(value, dict) and {"median", "min", "max"} <= set(value)


def figures(results: dict, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], dict]:
    """Every figure in ``results`` by its path of keys."""
    found: dict[tuple[str, ...], dict] = {}
    for key, value in results.items():
        here = (*path, str(key))
        if is_figure(value):
            found[here] = value
        elif isinstance(value, dict):
            found.update(figures(value, here))
    return found


def ratio_figures(results: dict) -> dict[tuple[str, ...], dict]:
    """The figures that are ratios, without the subtrees that mirror other keys."""
    return {
        path: fig
        for path, fig in figures(results).items()
        if path[0] not in MIRRORS and any(word in part for part in path for word in RATIO_WORDS)
    }


def moved(old: dict, new: dict) -> bool:
    """The two ranges (min to max over the rounds) do not overlap."""
    return new["min"] > old["max"] or new["max"] < old["min"]


def compare(old: dict, new: dict) -> dict[str, Any]:
    """Each ratio present in both runs, old → new (``change``: new median / old median − 1, and
    ``moved``); the paths only in the new run (``new_only``) or only in the old (``gone``)."""
    before, after = ratio_figures(old), ratio_figures(new)
    rows = []
    for path, fig in after.items():
        if path not in before:
            continue
        was = before[path]
        change = fig["median"] / was["median"] - 1 if was["median"] else None
        rows.append({"figure": SEPARATOR.join(path), "old": was, "new": fig,
                     "change": None if change is None else round(change, 4), "moved": moved(was, fig)})  # fmt: skip
    return {
        "date": old.get("date"),
        "rows": rows,
        "new_only": [SEPARATOR.join(p) for p in after if p not in before],
        "gone": [SEPARATOR.join(p) for p in before if p not in after],
    }
