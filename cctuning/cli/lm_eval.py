"""``cctuning lm-eval ARGS...``: lm-evaluation-harness's own command line, with the model ``cctuning``
registered and our task folder added to ``--include_path``; every argument is lm-eval's.

``cctuning lm-eval --help`` starts with our usage (:func:`usage`: the model, its ``model_args``, our
tasks), then lm-eval's help. A run with ``--model cctuning`` passes lm-eval the batch size and the
device the model uses, so that its header and its results name them: a ``batch_size`` in
``--model_args`` (which the model takes over ``--batch_size``), the device of ``model_args`` or
``--device``, else cctuning's ``auto`` device (not lm-eval's default ``cuda:0``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import textwrap
from pathlib import Path

from cctuning.errors import CCError
from cctuning.eval.benchmarks import BENCHMARKS
from cctuning.eval.lmeval_tasks import TASKS_DIR
from cctuning.guard import check_output
from cctuning.io import folder_lock

MODEL = "cctuning"  # cctuning.eval.lmeval.MODEL_NAME
# every model_arg of cctuning.eval.lmeval.CCLM that text can give (tests/test_lmeval.py checks the list)
MODEL_ARGS = {
    "pretrained": "PATH: a model folder (CC-Tuning, SFT or plain) or a preset name (required)",
    "connection": "transform, none or english (default: transform when the folder has a Transform "
    "Matrix, else none); english reads the English prompt from each document",
    "english_field": "the documents' field holding the English prompt (default: prompt_en)",
    "sample_layer": "K: sample the layer with Gumbel noise K times and average (default 0: argmax)",
    "seed": "seed of sample_layer (default 0)",
    "batch_size": "requests per forward pass (default: --batch_size, else 1); auto is max_batch_size",
    "max_batch_size": "the batch size that batch_size=auto means (default 8)",
    "max_length": "tokens of context + continuation, cut from the left (default: the model's)",
    "max_gen_toks": "new tokens of a generation at most (default 256, lm-eval's)",
    "dtype": "float32, bfloat16, float16 or auto (default: as saved)",
    "device": "cpu, cuda or cuda:N (default: --device, else $CCTUNING_DEVICE, else CUDA when there is "
    "one, else the CPU)",
    "add_bos_token": "true or false: add the BOS token (default: as lm-eval's hf model)",
    "prefix_token_id": "the token before a continuation without context (default: BOS, else EOS)",
    "trust_remote_code": "true: allow code from the model folder to run (only if you trust it)",
    "prompt_field": "a model trained with --augment bilingual-prompt: the documents' field whose text in "
    "the context gets the English before it (default: prompt)",
    "withhold_english": "true: prompt a bilingual-prompt model without the English (default false)",
}
HELP_ARGS = ([], ["-h"], ["--help"], ["run"], ["run", "-h"], ["run", "--help"])


def add_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    # every argument after `lm-eval` is lm-eval's (no option of ours: prefix_chars matches none)
    p = sub.add_parser(name, help=help, add_help=False, prefix_chars="\0")
    p.add_argument("lm_eval_args", nargs="*")
    p.set_defaults(func=lambda args: run_cli(args.lm_eval_args))
    return p


def usage() -> str:
    """Our part of ``cctuning lm-eval --help``."""
    choice = [b.lower() for b, spec in BENCHMARKS.items() if spec.answer_kind == "choice"]
    generated = [b.lower() for b, spec in BENCHMARKS.items() if spec.answer_kind != "choice"]
    width = max(map(len, MODEL_ARGS)) + 2
    lines = [
        f"usage: cctuning lm-eval [run] --model {MODEL} --model_args KEY=VALUE,... --tasks TASK,... [lm-eval options]",
        "       cctuning lm-eval ls tasks       every task lm-eval knows, ours included",
        "",
        "lm-evaluation-harness with cctuning's model and tasks; every argument after `lm-eval` is lm-eval's.",
        "",
        f"model_args of --model {MODEL}, comma-separated KEY=VALUE:",
        *(
            textwrap.fill(text, 100, initial_indent=f"  {name:{width}}", subsequent_indent=" " * (width + 2))
            for name, text in MODEL_ARGS.items()
        ),
        "",
        "our tasks: cctuning_<benchmark> (a group: the languages averaged) and cctuning_<benchmark>_<lang>;",
        f"  {', '.join(choice)}: likelihood of the labels (cctuning_<benchmark>_gen: generated and parsed);",
        f"  {', '.join(generated)}: generated and scored by our rules (docs/evaluation.md)",
        "",
        "example:",
        f"  cctuning lm-eval --model {MODEL} --model_args pretrained=runs/cc,batch_size=8 \\",
        "      --tasks cctuning_xnli --apply_chat_template --output_path results/lm-eval",
        "",
        "lm-eval's own help follows.",
        "",
    ]
    return "\n".join(lines)


def _parse(argv: list[str]) -> tuple:
    """lm-eval's command line object and its parse of ``argv`` (``lm-eval ARGS``)."""
    from lm_eval._cli.harness import HarnessCLI  # deferred: lm-eval is optional (extra eval)

    cli = HarnessCLI()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        return cli, cli.parse_args()
    finally:
        sys.argv = saved


def settle_model_options(args: argparse.Namespace) -> None:
    """For ``--model cctuning``: lm-eval's ``--batch_size`` and ``--device`` become the ones the
    model uses (what lm-eval prints and records), see the module's docstring."""
    if getattr(args, "command", None) != "run" or getattr(args, "model", None) != MODEL:
        return
    model_args = args.model_args if isinstance(args.model_args, dict) else {}
    if "batch_size" in model_args:
        args.batch_size = str(model_args["batch_size"])
    if "device" in model_args:
        args.device = str(model_args["device"])
    elif not args.device:
        from cctuning.loading import resolve_device  # deferred: imports torch

        args.device = str(resolve_device("auto"))


def guard_run(args: argparse.Namespace) -> str | None:
    """For a run of ``--model cctuning``: ``--output_path`` checked against the model folder of
    ``pretrained`` and its base (never over or inside them); returns that folder (None when
    ``pretrained`` names no folder), which the run then reads under a shared lock."""
    if getattr(args, "command", None) != "run" or getattr(args, "model", None) != MODEL:
        return None
    model_args = args.model_args if isinstance(args.model_args, dict) else {}
    pretrained = model_args.get("pretrained")
    if not isinstance(pretrained, str) or not pretrained:
        return None
    from cctuning.loading import model_inputs  # deferred: imports torch

    inputs = model_inputs(pretrained, "pretrained")
    output = getattr(args, "output_path", None)
    if output:
        folder = not str(output).endswith(".json")  # lm-eval: a folder, or the .json file of the results
        check_output(output, inputs, option="--output_path", own=lambda _: True, folder=folder)
    return inputs["pretrained"] if Path(inputs["pretrained"]).is_dir() else None


def run_cli(argv: list[str]) -> int:
    """lm-eval's command line (``lm-eval ARGS``) with the model ``cctuning`` registered and our task
    folder added to ``--include_path`` (before any folder given there)."""
    if argv in HELP_ARGS:
        print(usage())
    cli, args = _parse(argv)
    if getattr(args, "command", None) == "run":
        from cctuning.eval.lmeval import register  # deferred: imports torch; only a run needs the model

        register()
    settle_model_options(args)
    if hasattr(args, "include_path"):
        given = args.include_path
        args.include_path = [str(TASKS_DIR)] + ([given] if given else [])
    model = guard_run(args)
    # no train --overwrite of the model while lm-eval reads it
    with folder_lock(model, "cctuning lm-eval", shared=True) if model else contextlib.nullcontext():
        try:
            cli.execute(args)
        except ValueError as err:
            message = user_error(args, err)
            if message is None:  # not one of the user's mistakes that lm-eval reports so: a bug, traced
                raise
            raise CCError(message) from None
    return 0


def user_error(args: argparse.Namespace, err: ValueError) -> str | None:
    """The one-line error for what lm-eval (or transformers under it) raises as a ValueError about the
    command line: an unknown task, or a model folder whose own code (``auto_map`` in config.json) would
    have to run without ``trust_remote_code`` (it is refused unread, never run); None for others."""
    text = str(err)
    if text.startswith("Tasks not found"):
        return (
            f"lm-eval: {text.splitlines()[0]} (`cctuning lm-eval ls tasks` lists them; ours are "
            "cctuning_<benchmark> and cctuning_<benchmark>_<lang>)"
        )
    if "custom code" in text and "trust_remote_code" in text:
        model_args = getattr(args, "model_args", None)
        folder = model_args.get("pretrained") if isinstance(model_args, dict) else None
        return (
            f"lm-eval: {folder or 'the model'} ships its own model code (auto_map in config.json), which "
            "runs only with trust_remote_code: add trust_remote_code=True to --model_args (or give "
            "--trust_remote_code) if you trust it"
        )
    return None
