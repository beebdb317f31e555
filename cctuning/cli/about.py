"""``cctuning --version``: cctuning's version and those of the packages it runs on, read from the
installed packages' metadata (nothing is imported), for bug reports."""

from __future__ import annotations

import argparse
import platform
from importlib import metadata

import cctuning

# the packages every run uses, then the optional ones (extras eval and deepspeed)
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets")
OPTIONAL = ("lm-eval", "deepspeed", "fastapi", "uvicorn")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_report() -> dict[str, str]:
    """``{what: version}``: cctuning (the code that runs), Python, the platform, then every package of
    :data:`PACKAGES` and :data:`OPTIONAL` ("not installed" when it is not)."""
    report = {
        "cctuning": cctuning.__version__,
        "Python": platform.python_version(),
        "Platform": platform.platform(),
    }
    for name in PACKAGES + OPTIONAL:
        report[name] = package_version(name) or "not installed"
    return report


def version_text() -> str:
    report = version_report()
    lines = [f"cctuning {report.pop('cctuning')}"]
    lines += [f"- {name}: {version}" for name, version in report.items()]
    return "\n".join(lines)


class VersionAction(argparse.Action):
    """``--version``: print :func:`version_text` and exit (read when asked, not when the parser is built)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()
