"""The commands that use a trained model: ``fit-matrix``, ``generate`` and ``export``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cctuning.cli.common import (
    MODEL_HELP,
    add_connection,
    add_data_options,
    add_generation_options,
    add_loading_options,
    add_special_tokens_option,
    add_withhold_english,
    add_yaml_config,
    data_options,
)
from cctuning.errors import CCError
from cctuning.guard import check_output
from cctuning.io import check_output_file, check_output_folder, folder_lock, write_text


def add_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    {"fit-matrix": _add_fit_matrix, "generate": _add_generate, "export": _add_export}[name](p)
    return p


def load(model: str, trust_remote_code: bool = False, seed=None, sample_layer=False, **options):
    """A trained (or plain) model folder and its tokenizer, for the inference commands; ``options``
    go to :func:`cctuning.loading.load_for_inference` (``load_transform``, ``device``, ``dtype``)."""
    import torch  # deferred: --help must not import torch

    from cctuning.loading import load_for_inference  # deferred: imports torch

    cc, tok, path = load_for_inference(model, trust_remote_code, **options)
    if sample_layer:
        cc.cc_config.sample_layer = True
        cc.generator = torch.Generator().manual_seed(seed or 0)
    return cc, tok, path


# -- fit-matrix ------------------------------------------------------------------------------------
def _add_fit_matrix(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a folder trained with --method cc")
    p.add_argument(
        "--data", required=True, help="parallel records (instruction, instruction_en), e.g. the training file"
    )
    add_data_options(p)
    p.add_argument("--samples", type=int, default=1000, help="number of records to use (seeded sample)")
    p.add_argument("--ridge", type=float, default=0.0, help="ridge λ: solve (SᵀS + λI) M = SᵀT")
    p.add_argument(
        "--per-layer", action="store_true", help="one matrix per layer instead of one pooled matrix"
    )
    p.add_argument(
        "--heldout", type=float, default=0.1, help="fraction of pairs held out to measure the error"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--max-length",
        type=int,
        default=1024,
        help="token budget of a prompt (cut from the start; at most the model's context)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid records instead of stopping")
    add_special_tokens_option(p)
    add_loading_options(p)
    add_yaml_config(p)
    p.set_defaults(func=fit_matrix)


def fit_matrix(args: argparse.Namespace) -> int:
    from cctuning.inference.matrix import fit_matrix_from_file  # deferred: --help must not import torch
    from cctuning.loading import resolve_model_path  # deferred: imports torch
    from cctuning.model.transform import MATRIX_NAME, MATRIX_REPORT_NAME  # deferred: imports torch

    options = data_options(args)  # checked before the model loads
    path = resolve_model_path(args.model)
    inputs = {"--data": args.data, "--config": args.config}
    for name in (MATRIX_NAME, MATRIX_REPORT_NAME):  # its own results: replaced, never an input
        check_output(Path(path) / name, inputs, option="the Transform Matrix", own=lambda _: True)
    # the model folder is written: held exclusively from before the model loads until the matrix is saved
    with folder_lock(check_output_folder(path, "model folder"), "cctuning fit-matrix"):
        # without the matrix already there: refitting replaces it (it may be a retrained model's stale one)
        model, tok, path = load(
            path, args.trust_remote_code, load_transform=False, device=args.device, dtype=args.dtype
        )
        if not model.uses_connection:
            raise CCError(
                f"'{args.model}' is not a CC-Tuning model (method '{model.cc_config.method}'): it has no connection"
            )
        report = fit_matrix_from_file(
            model,
            tok,
            args.data,
            path,
            skip_invalid=args.skip_invalid,
            data_options=options,
            samples=args.samples,
            ridge=args.ridge,
            per_layer=args.per_layer,
            batch_size=args.batch_size,
            seed=args.seed,
            heldout_fraction=args.heldout,
            max_length=args.max_length,
            allow_special_tokens=args.allow_special_tokens,
            progress=True,
            lock=False,
        )
    print(
        f"transform matrix ({'per layer' if report.per_layer else 'pooled'}, ridge {report.ridge}) "
        f"fitted on {report.fit_pairs} pairs, {report.heldout_pairs} held out; saved to {path}"
    )
    print(f"{'':10} {'MSE before':>12} {'MSE after':>12} {'cos before':>11} {'cos after':>10}")
    for name, m in (("fit", report.fit), ("held-out", report.heldout)):
        if m:
            print(
                f"{name:10} {m['before']['mse']:12.6g} {m['after']['mse']:12.6g} "
                f"{m['before']['cosine']:11.4f} {m['after']['cosine']:10.4f}"
            )
    for warning in report.warnings:
        print(f"warning: {warning}")
    return 0


# -- generate --------------------------------------------------------------------------------------
def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--prompt", help="one instruction")
    p.add_argument(
        "--prompt-en",
        help="its English translation (for --connection english, and the prompt of a model trained with "
        "--augment bilingual-prompt)",
    )
    p.add_argument(
        "--input",
        help="JSON/JSONL records with instruction (and instruction_en for english and bilingual-prompt models)",
    )
    p.add_argument("--output", help="write JSONL here (atomically) instead of stdout")
    add_connection(p)
    add_generation_options(p)
    p.add_argument(
        "--sample-layer",
        action="store_true",
        help="sample the layer with Gumbel noise (the official code) instead of argmax",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --sample-layer")
    add_special_tokens_option(p, "prompts")
    add_withhold_english(p)
    add_loading_options(p)
    add_yaml_config(p)
    p.set_defaults(func=generate)


def _generate_records(args: argparse.Namespace) -> list[dict]:
    """The prompts of ``generate``: the one of --prompt (and --prompt-en), or the records of --input."""
    from cctuning.data.records import load_prompts  # deferred: the data package imports torch

    if args.prompt is not None:
        if args.connection == "english" and not args.prompt_en:
            raise CCError("--connection english with --prompt needs --prompt-en (the English prompt)")
        return [{"instruction": args.prompt, "instruction_en": args.prompt_en}]
    return [r.__dict__ for r in load_prompts(args.input, require_english=args.connection == "english")]


def _check_system_turn(records: list[dict], model) -> None:
    """A conversation's system turn in --input must be the model's system prompt: every prompt is
    rendered with that one (a one-line error otherwise, not a silently different prompt)."""
    from cctuning.data.records import Record, system_prompt_of  # deferred: imports torch

    if records and records[0].get("system") is not None:
        system_prompt_of([Record(**records[0])], model.cc_config.prompt_format.system_prompt, model=True)


def _generation_rows(
    records: list[dict], outs, connection: str, prompts: list[str], augment: str
) -> list[str]:
    """One JSON line per generation: the instruction, the text, the chosen layer (and the language);
    for a model trained with --augment bilingual-prompt, the prompt it was given and whether it was
    bilingual (false: the non-English instruction alone, or an English one)."""
    rows = []
    for rec, out, prompt in zip(records, outs, prompts):
        row = {"instruction": rec["instruction"], "generation": out.text, "layer": out.layer}
        row["connection"] = connection
        if rec.get("lang"):
            row["lang"] = rec["lang"]
        if augment == "bilingual-prompt":
            row.update(augment=augment, prompt=prompt, bilingual=prompt != rec["instruction"])
        rows.append(json.dumps(row, ensure_ascii=False))
    return rows


def _prompts(args: argparse.Namespace, records: list[dict], augment: str) -> tuple[list[str], int]:
    """The prompt of each record for a model trained with ``augment`` (the English first for
    bilingual-prompt, unless --withhold-english), and how many went without their English."""
    from cctuning.data.augment import inference_instructions  # deferred: the data package imports torch

    english = None if args.withhold_english else [r.get("instruction_en") for r in records]
    where = args.input or "generate"
    return inference_instructions(
        [r["instruction"] for r in records], english, augment, where, [r.get("lang") for r in records]
    )


def what_ran(connection: str, layers) -> str:
    """The connection a command ran with and how often each layer was chosen (``layers``: one per
    prompt or item, None where no layer was chosen)."""
    from cctuning.model.connection import describe_layers, layer_counts  # deferred: imports torch

    return f"connection {connection}: {describe_layers(layer_counts(layers))}"


# the keys of every row generate writes (_generation_rows): a file of such rows is its own result
GENERATION_KEYS = frozenset({"instruction", "generation", "layer", "connection"})


def is_generation_file(path: Path) -> bool:
    """Whether ``path`` holds only rows that ``generate`` wrote (it may replace them), or nothing."""
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not GENERATION_KEYS <= row.keys():
                        return False
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return False
    return True


def _check_generate_output(args: argparse.Namespace, model_path: str) -> None:
    """--output is no input (the model folder, its base, --input, --config) nor inside one, no folder,
    no file of other content than generate's, and writable: checked before the model loads."""
    from cctuning.loading import model_inputs  # deferred: imports torch

    inputs = {**model_inputs(model_path), "--input": args.input, "--config": args.config}
    check_output(args.output, inputs, own=is_generation_file)
    check_output_file(args.output)


def generate(args: argparse.Namespace) -> int:
    from cctuning.inference.generate import CCGenerator  # deferred: --help must not import torch
    from cctuning.loading import resolve_model_path  # deferred: imports torch
    from cctuning.model.connection import resolve_connection  # deferred: imports torch

    if (args.prompt is None) == (args.input is None):
        raise CCError("give exactly one of --prompt TEXT or --input FILE.jsonl")
    path = resolve_model_path(args.model)
    if args.output:
        _check_generate_output(args, path)
    with folder_lock(path, "cctuning generate", shared=True):  # no train --overwrite while it reads
        model, tok, _ = load(
            path, args.trust_remote_code, args.seed, args.sample_layer, device=args.device, dtype=args.dtype
        )
        gen = CCGenerator(
            model,
            tok,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            allow_special_tokens=args.allow_special_tokens,
        )
        records = _generate_records(args)
        _check_system_turn(records, model)
        connection = resolve_connection(model, args.connection)
        augment = model.cc_config.augment
        prompts, missing = _prompts(args, records, augment)
        outs = gen.generate(
            prompts,
            connection,
            english=[r["instruction_en"] for r in records] if connection == "english" else None,
            progress=args.input is not None,
        )
    ran = what_ran(connection, [o.layer for o in outs])
    if augment == "bilingual-prompt":
        why = (
            (" (--withhold-english)" if args.withhold_english else " (no English at hand)") if missing else ""
        )
        ran += f"; bilingual-prompt model: {missing} of {len(prompts)} prompts without the English{why}"
    if args.prompt is not None and not args.output:
        print(outs[0].text)
        print(ran, file=sys.stderr)  # stdout holds the answer only
        return 0
    rows = _generation_rows(records, outs, connection, prompts, augment)
    text = "\n".join(rows) + "\n"
    if args.output:
        write_text(args.output, text)
        print(f"wrote {len(rows)} generations to {args.output} ({ran})")
    else:
        sys.stdout.write(text)
        print(ran, file=sys.stderr)  # stdout holds the JSON lines only
    return 0


# -- export ----------------------------------------------------------------------------------------
def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a trained run folder (CC-Tuning, SFT, LoRA or not)")
    p.add_argument("--output", required=True, help="a new or empty folder")
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="merge a LoRA run's adapter into the base weights (else the adapter is exported as is)",
    )
    p.add_argument(
        "--base-model", help="a LoRA run's base model (folder or preset), when the one it records moved"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=export)


def export(args: argparse.Namespace) -> int:
    from cctuning.inference.export import export_model  # deferred: --help must not import torch

    result = export_model(
        args.model,
        args.output,
        merge_lora=args.merge_lora,
        overwrite=args.overwrite,
        base_model=args.base_model,
        trust_remote_code=args.trust_remote_code,
    )
    what = {"full": "model", "merged": "model with the LoRA adapter merged", "adapter": "LoRA adapter"}
    print(f"exported {result.method} {what[result.kind]} to {result.output}")
    if result.merge_ignored:
        print("note: not a LoRA run, nothing to merge (--merge-lora ignored)")
    if result.kind == "adapter":
        print(
            f"note: the adapter needs its base model ({result.base_model}); --merge-lora writes a "
            "self-contained folder"
        )
    return 0
