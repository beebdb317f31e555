"""Dependency checks of the package (not of a run): the lock file and the compatibility with TRL.

    python scripts/deps.py compat [--with trl] [--extras data,tensorboard]   # make compat
    python scripts/deps.py lock                                               # make lock

``compat`` makes a fresh virtual environment and asks its pip, with ``--dry-run --report`` (nothing is
downloaded beyond package metadata, nothing installed), what it would install for ``trl`` alone and
for ``trl`` together with this package; it fails, listing them, if the second resolution has any
package at a lower version than the first: installing cctuning beside TRL would downgrade it. It
needs the package index (PyPI) and takes one to three minutes.

``lock`` rewrites requirements/constraints.txt with the exact versions that the Makefile's install
(the package and its extras dev, eval, data, tensorboard, deepspeed, serve) resolves to, given the versions installed in
the .venv that runs it (so: after `make install`, and after upgrading something there on purpose).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
PRESETS = ROOT / "requirements" / "presets.txt"
LOCK_EXTRAS = "dev,eval,data,tensorboard,deepspeed,serve"
TORCH = "torch==2.13.0"  # what the Makefile installs first (the CPU wheel)

LOCK_HEADER = """\
# Exact versions of everything `make` installs for cctuning (pyproject.toml's dependencies and the
# extras dev, eval, data, tensorboard, deepspeed, serve), used as `pip install -c requirements/constraints.txt` by the
# Makefile so that CI and every developer's .venv get the same packages. pyproject.toml declares
# ranges instead; this file is what those ranges were tested with.
#
# Regenerate after changing a range or upgrading on purpose: `make lock` (resolves the extras
# against the versions installed in .venv and rewrites this file), then run `make test`.
# The model presets are not here: requirements/presets.txt pins them with hashes.
"""


def resolve(pip: list[str], requirements: list[str], extra_args: list[str] = ()) -> dict[str, str]:
    """What ``pip install`` would install for ``requirements`` (ignoring what is installed): name → version."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [*pip, "install", "--dry-run", "--quiet", "--ignore-installed", "--report", str(report)]
        proc = subprocess.run([*cmd, *extra_args, *requirements], capture_output=True, text=True)
        if proc.returncode != 0:
            errors = [line for line in proc.stderr.splitlines() if "is ignored" not in line]
            sys.exit(f"pip could not resolve {' '.join(requirements)}:\n" + "\n".join(errors[-20:]))
        data = json.loads(report.read_text(encoding="utf-8"))
    return {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"] for item in data["install"]
    }


def downgrades(alone: dict[str, str], together: dict[str, str]) -> list[tuple[str, str, str]]:
    """The packages that ``together`` resolves to a lower version than ``alone``: (name, alone, together)."""
    return [
        (name, alone[name], together[name])
        for name in sorted(alone)
        if name in together and Version(together[name]) < Version(alone[name])
    ]


def compat(beside: str, extras: str) -> int:
    target = f"{ROOT}[{extras}]" if extras else str(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        venv.create(tmp, with_pip=True)
        pip = [str(Path(tmp) / "bin" / "python"), "-m", "pip"]
        print(f"resolving {beside} alone in a fresh venv ...", flush=True)
        alone = resolve(pip, [beside])
        print(f"resolving {beside} + cctuning[{extras}] ...", flush=True)
        together = resolve(pip, [beside, target])
    key = [n for n in ("torch", "transformers", "accelerate", "peft", "datasets", canonicalize_name(beside))]
    print(f"{'package':14} {beside + ' alone':>16} {'with cctuning':>16}")
    for name in key:
        print(f"{name:14} {alone.get(name, '-'):>16} {together.get(name, '-'):>16}")
    found = downgrades(alone, together)
    if "cctuning" not in together:
        print("cctuning was not resolved")
        return 1
    if found:
        print(f"installing cctuning beside {beside} downgrades:")
        for name, a, b in found:
            print(f"  {name}: {a} -> {b}")
        return 1
    print(f"compat: cctuning installs beside {beside} without downgrading any of its {len(alone)} packages")
    return 0


def lock() -> int:
    python = Path(sys.executable)
    pip = [str(python), "-m", "pip"]
    presets = {
        canonicalize_name(line.split("==")[0]) for line in PRESETS.read_text().splitlines() if "==" in line
    }
    freeze = subprocess.run(
        [*pip, "freeze", "--exclude-editable"], capture_output=True, text=True, check=True
    )
    installed = []
    for line in freeze.stdout.splitlines():
        name, sep, version = line.partition("==")
        if sep and canonicalize_name(name) not in presets:
            installed.append(f"{name}=={version.split('+')[0]}")  # torch's +cpu is a local label
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as current:
        current.write("\n".join(installed) + "\n")
        current.flush()
        pins = resolve(pip, [TORCH, "-e", f"{ROOT}[{LOCK_EXTRAS}]"], ["-c", current.name])
    pins.pop("cctuning", None)
    lines = [f"{name}=={version.split('+')[0]}" for name, version in sorted(pins.items())]
    CONSTRAINTS.write_text(LOCK_HEADER + "\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} pins to {CONSTRAINTS.relative_to(ROOT)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compat", help="cctuning beside trl: no downgrade")
    p.add_argument(
        "--with", dest="beside", default="trl", help="the package to install beside (default: trl)"
    )
    p.add_argument("--extras", default="data,tensorboard", help="cctuning's extras to include")
    sub.add_parser("lock", help="rewrite requirements/constraints.txt")
    args = parser.parse_args(argv)
    return compat(args.beside, args.extras) if args.command == "compat" else lock()


if __name__ == "__main__":
    sys.exit(main())
