"""``python -m cctuning.presets [NAME ...]``: convert presets ahead of time (e.g. from make)."""

from __future__ import annotations

import argparse
import logging

from cctuning.errors import CCError
from cctuning.presets.conversion import resolve_model
from cctuning.presets.registry import CACHE_ENV, PRESETS, is_installed

logger = logging.getLogger("cctuning.presets")  # not __name__, which is "__main__" here


def main(argv: list[str] | None = None) -> int:
    """``python -m cctuning.presets [NAME ...]``: convert presets ahead of time (e.g. from make)."""
    parser = argparse.ArgumentParser(prog="python -m cctuning.presets", description=main.__doc__)
    parser.add_argument("names", nargs="*", help="presets to convert (default: every installed one)")
    parser.add_argument(
        "--cache-dir", default=None, help=f"cache root (default ${CACHE_ENV} or ~/.cache/cctuning)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = args.names or [name for name in sorted(PRESETS) if is_installed(name)]
    try:
        for name in names:
            logger.info("%s: %s", name, resolve_model(name, args.cache_dir))
    except CCError as err:
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
