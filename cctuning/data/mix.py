"""The bundled CC-Tuning training mix (``cctuning/resources/mix/``), as shipped.

:func:`load_mix` reads the shipped files and never touches the parallel sources, so it works on a
fresh clone; :func:`sample_mix` draws a stratified per-language sample of it. The mix is built from
the sources by ``scripts/build_mix.py`` (builder code in ``scripts/mixbuild.py``), which this
package never imports.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from cctuning.errors import CCError

MIX_DIR = Path(__file__).resolve().parent.parent / "resources" / "mix"
SPLITS = ("train", "heldout")


def mix_files(out_dir: str | Path = MIX_DIR) -> dict[str, Path]:
    """One file per split, so that ``train.jsonl`` can be handed to the trainer as it is."""
    return {split: Path(out_dir) / f"{split}.jsonl" for split in SPLITS}


def load_mix(split: str = "train", mix_dir: str | Path = MIX_DIR) -> list[dict]:
    """The shipped mix as dicts: ``split`` is 'train', 'heldout' or 'all'. Reads only the package."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of train, heldout, all; got {split!r}")
    records: list[dict] = []
    for name, path in mix_files(mix_dir).items():
        if split in (name, "all"):
            with open(path, encoding="utf-8") as fh:
                records += [json.loads(line) for line in fh if line.strip()]
    return records


def sample_mix(split: str, per_lang: int, langs: list[str] | None, seed: int) -> list[dict]:
    """``per_lang`` records per language of the bundled mix, drawn with ``seed`` (stratified)."""
    by_lang: dict[str, list[dict]] = {}
    for rec in load_mix(split):
        if langs is None or rec["lang"] in langs:
            by_lang.setdefault(rec["lang"], []).append(rec)
    if not by_lang:
        raise CCError(f"the mix has no {split} records for languages {langs}")
    rng = random.Random(seed)
    out = []
    for lang in sorted(by_lang):
        rows = sorted(by_lang[lang], key=lambda r: r["id"])
        out += rng.sample(rows, min(per_lang, len(rows)))
    return out
