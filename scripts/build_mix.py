#!/usr/bin/env python
"""Rebuild the bundled CC-Tuning mix (cctuning/resources/mix/) from the parallel sources.

    .venv/bin/python scripts/build_mix.py                 # rebuild the shipped files
    .venv/bin/python scripts/build_mix.py --check         # rebuild in memory, compare, write nothing

Only this script reads the sources (the builder is scripts/mixbuild.py, beside it); the package
itself only reads the shipped files. The build fails (exit 2) when benchmark text is found in the
mix, and --check exits 1 when the shipped files differ from a fresh build.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # so that the script runs from a clone without `pip install -e .`

# the builder, beside this script (a script's own folder is first on sys.path)
from mixbuild import MixConfig, build_mix, composition_markdown, write_mix  # noqa: E402

from cctuning.data.mix import MIX_DIR, mix_files  # noqa: E402
from cctuning.errors import CCError  # noqa: E402

DEFAULT_SOURCES = REPO / "data" / "parallel"  # the parallel sources, gzipped (see data/parallel/README.md)
DEFAULT_BENCHMARKS = REPO / "cctuning" / "resources" / "benchmarks"
# Licence and readme files shipped with the mix, as named under <sources>/licenses/.
LICENSE_FILES = (
    "mgsm-LICENSE",
    "mgsm-README.md",
    "ntrex-LICENSE.md",
    "tatoeba-README.md",
    "udhr-license",
    "xcopa-LICENSE.md",
    "xcopa-README.md",
)
BEGIN, END = "<!-- composition:begin -->", "<!-- composition:end -->"


def _update_readme(readme: Path, table: str) -> bool:
    """Replace the generated block of the mix README; False when there is no README or no block."""
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{table}{END}", text), encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sources", type=Path, default=DEFAULT_SOURCES, help="folder of *_parallel.jsonl[.gz]"
    )
    parser.add_argument(
        "--benchmarks",
        type=Path,
        action="append",
        help=f"benchmark folder to check leaks against (repeatable; default: {DEFAULT_BENCHMARKS})",
    )
    parser.add_argument("--out", type=Path, default=MIX_DIR, help="where train.jsonl / heldout.jsonl go")
    parser.add_argument("--per-language", type=int, default=MixConfig.per_language)
    parser.add_argument("--seed", default=MixConfig.seed)
    parser.add_argument(
        "--check", action="store_true", help="compare a fresh build with --out; write nothing"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    benchmarks = args.benchmarks or [DEFAULT_BENCHMARKS]
    config = MixConfig(per_language=args.per_language, seed=args.seed)
    try:
        records = build_mix(args.sources, benchmarks, config)
    except CCError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = composition_markdown(records)

    if args.check:
        stale = []
        for split, path in mix_files(args.out).items():
            fresh = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records if r["split"] == split)
            if not path.is_file() or path.read_text(encoding="utf-8") != fresh:
                stale.append(str(path))
        readme = args.out / "README.md"
        if readme.is_file() and f"{BEGIN}\n{table}{END}" not in readme.read_text(encoding="utf-8"):
            stale.append(f"{readme} (composition table)")
        print("up to date" if not stale else "stale: " + ", ".join(stale))
        return 1 if stale else 0

    paths = write_mix(records, args.out)
    licenses = args.out / "licenses"
    licenses.mkdir(parents=True, exist_ok=True)
    for name in LICENSE_FILES:
        shutil.copyfile(args.sources / "licenses" / name, licenses / name)
    readme_done = _update_readme(args.out / "README.md", table)
    for split, path in paths.items():
        n = sum(1 for r in records if r["split"] == split)
        print(f"{path}: {n} records, {path.stat().st_size:,} bytes")
    print(f"licences copied to {licenses}")
    print(
        "README composition table updated"
        if readme_done
        else "no README block to update; the table:\n" + table
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
