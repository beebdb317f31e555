"""What a new user meets first: `cctuning --help` and `--version` without torch, transformers or
lm-eval; a command's --help with only what its parser needs; --version against the installed
packages' metadata; the third-party lines hidden by default and shown by -v (in fresh processes, so
that each library logs as on a first import). Timings are in bench/startup.py, not here."""

import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

import pytest
import torch

import cctuning
from cctuning.cli import COMMANDS, build_parser, command_of, main, quiet
from cctuning.cli.about import OPTIONAL, PACKAGES
from tests.conftest import FAST, flags

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "lm_eval", "peft", "accelerate", "datasets", "deepspeed")
PROBE = """
import json, sys
from cctuning.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)), file=sys.stderr)
"""


def run_python(code_or_args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """A fresh interpreter with this checkout's cctuning first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, *code_or_args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def heavy_imports(*argv: str) -> list[str]:
    proc = run_python(["-c", PROBE.format(heavy=HEAVY), *argv])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv,allowed",
    [
        (["--help"], []),
        (["--version"], []),
        (["train", "--help"], []),
        (["generate", "--help"], []),
        (["eval", "--help"], []),
        (["fit-matrix", "--help"], []),
        (["export", "--help"], []),
        (["serve", "--help"], []),
        (["lm-eval", "--help"], ["lm_eval"]),  # lm-eval's own help follows ours
    ],
)
def test_help_and_version_import_no_heavy_library(argv, allowed):
    assert heavy_imports(*argv) == allowed
    # and the probe sees them when a command does load them
    if argv == ["--help"]:
        assert "torch" in heavy_imports("generate", "--model", "/nonexistent", "--prompt", "x")


def test_version_reports_the_installed_packages(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    out = capsys.readouterr().out.splitlines()
    assert (
        exit.value.code == 0
        and out[0] == f"cctuning {metadata.version('cctuning')}" == f"cctuning {cctuning.__version__}"
    )
    shown = dict(line[2:].split(": ", 1) for line in out[1:])
    assert shown["Python"] == ".".join(map(str, sys.version_info[:3]))
    assert shown["Platform"] == platform.platform()
    for name in PACKAGES + OPTIONAL:
        try:
            expected = metadata.version(name)
        except metadata.PackageNotFoundError:
            expected = "not installed"
        assert shown[name] == expected, name
    assert {"torch", "transformers", "peft", "accelerate"} <= set(shown)


def test_main_builds_only_the_command_it_runs():
    full = build_parser()
    sub = next(a for a in full._actions if a.dest == "command")
    assert list(sub.choices) == list(COMMANDS) and "transfer-task" not in sub.choices
    # every command with its options (lm-eval's: one list passed to lm-eval)
    assert all(len(p._actions) > 1 for name, p in sub.choices.items() if name != "lm-eval")
    assert len(sub.choices["train"]._actions) > 150 and sub.choices["lm-eval"]._actions
    one = next(a for a in build_parser("generate")._actions if a.dest == "command").choices
    assert "--model" in one["generate"]._option_string_actions
    assert set(one["train"]._option_string_actions) == {"-h", "--help"}  # listed, not built
    assert command_of(["-v", "train", "--model", "m"]) == "train"
    assert command_of(["--help", "train"]) is None and command_of(["-v"]) is None


def test_an_unknown_command_is_argparse_s_error(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["trian", "--model", "m"])
    assert exit.value.code == 2 and "invalid choice: 'trian'" in capsys.readouterr().err


def test_the_cli_s_choices_are_the_library_s():
    from cctuning.cli.common import CONNECTIONS, FORMATS
    from cctuning.data.formats import FORMATS as LIBRARY_FORMATS
    from cctuning.model.connection import CONNECTIONS as LIBRARY_CONNECTIONS

    assert (CONNECTIONS, FORMATS) == (LIBRARY_CONNECTIONS, LIBRARY_FORMATS)


# -- quiet by default --------------------------------------------------------------------------------
def test_quiet_drops_the_hidden_lines_and_verbose_brings_them_back(capsys):
    deepspeed = logging.getLogger("DeepSpeed")  # as deepspeed's own logger: its handler, no propagation
    handler = logging.StreamHandler(sys.stdout)
    deepspeed.addHandler(handler)
    try:
        for verbose in (False, True, False):
            quiet.setup(verbose)
            deepspeed.warning("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
            deepspeed.warning("a real DeepSpeed warning")
            out = capsys.readouterr().out
            assert ("Setting accelerator to CPU" in out) == verbose and "a real DeepSpeed warning" in out
            with warnings.catch_warnings(record=True) as seen:
                quiet.setup(verbose)
                warnings.warn(
                    "`is_gradient_checkpointing` is deprecated and will be removed",
                    FutureWarning,
                    stacklevel=1,
                )
                warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
            assert [str(w.message)[:10] for w in seen] == (["`is_gradie"] if verbose else []) + ["another Fu"]
    finally:
        deepspeed.removeHandler(handler)
        quiet.setup(False)


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True])
def test_train_and_export_say_nothing_of_the_hidden_lines(base_dir, data_file, tmp_path, verbose):
    """A LoRA run with gradient checkpointing on the CPU, and its merged export, each in a fresh process:
    DeepSpeed's accelerator line and transformers' is_gradient_checkpointing FutureWarning only with -v."""
    v = ["-v"] if verbose else []
    out = tmp_path / "run"
    train = run_python(
        [
            "-m",
            "cctuning.cli",
            *v,
            "train",
            *flags(model=base_dir, data=data_file, output=out),
            *FAST,
            "--lora-r",
            "4",
            "--gradient-checkpointing",
        ]  # fmt: skip
    )
    assert train.returncode == 0, train.stderr
    export = run_python(
        [
            "-m",
            "cctuning.cli",
            *v,
            "export",
            "--model",
            str(out),
            "--output",
            str(tmp_path / "e"),
            "--merge-lora",
        ]
    )
    assert export.returncode == 0, export.stderr
    train_text, export_text = train.stdout + train.stderr, export.stdout + export.stderr
    # DeepSpeed says it only where it finds no GPU (and when it is installed)
    cpu_line = verbose and importlib.util.find_spec("deepspeed") is not None and not torch.cuda.is_available()
    assert ("Setting accelerator to CPU" in train_text) == cpu_line
    assert ("Setting accelerator to CPU" in export_text) == cpu_line
    assert ("`is_gradient_checkpointing` is deprecated" in train_text) == verbose
    assert ("`is_gradient_checkpointing` is deprecated" in export_text) == verbose  # the LoRA run is loaded
    assert "saved cc model to" in train_text and "exported cc" in export_text
