"""``cctuning eval``: the benchmarks, or ``--nll``, the held-out likelihood of gold responses
(``cctuning lm-eval``: :mod:`cctuning.cli.lm_eval`)."""

from __future__ import annotations

import argparse
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
    augment_note,
    data_options,
)
from cctuning.config import split_list
from cctuning.errors import CCError
from cctuning.eval.benchmarks import BENCHMARKS, answer_records, is_benchmark_name, resolve_name
from cctuning.guard import check_output
from cctuning.io import folder_lock, write_jsonl


def add_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    _add_eval(p)
    return p


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument(
        "--benchmarks", help="comma-separated: XNLI,XStoryCloze,MMMLU,XQuAD,MKQA,XLSum (default: all)"
    )
    p.add_argument(
        "--langs", help="comma-separated language codes (default: every language of each benchmark)"
    )
    p.add_argument("--limit", type=int, help="first N items per benchmark and language")
    add_connection(p)
    p.add_argument(
        "--scoring",
        choices=["generate", "likelihood"],
        default="generate",
        help="likelihood: compare the option labels' next-token log-probabilities (multiple choice)",
    )
    add_generation_options(p)
    p.add_argument(
        "--data-dir", help="benchmark folder <Benchmark>/<lang>.jsonl (default: the bundled split)"
    )
    p.add_argument(
        "--output",
        help="run folder (default: MODEL/eval/CONNECTION-SCORING, with --nll MODEL/eval/nll-CONNECTION, "
        "named after the connection that runs); resumes if it exists",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--nll",
        metavar="DATA",
        help="instead of benchmarks: per-token NLL of the gold responses of these records (held-out): "
        "a file or folder as train's --data; or a generative benchmark's name (XQuAD, MKQA, XLSum): "
        "the likelihood of its gold answers, with --langs, --limit and --data-dir",
    )
    add_data_options(p, "--nll")
    add_special_tokens_option(p, "--nll records")
    add_withhold_english(p)
    _add_eval_tail(p)
    add_loading_options(p)
    add_yaml_config(p)
    p.set_defaults(func=evaluate)


def _add_eval_tail(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sample-layer",
        type=int,
        default=0,
        metavar="K",
        help="sample the layer with seeded Gumbel noise (the official inference) K times per item and "
        "average the scores (default 0: the Decision Maker's argmax)",
    )
    p.add_argument("--max-length", type=int, default=1024, help="token budget of an --nll item")
    p.add_argument(
        "--min-response-tokens",
        type=int,
        default=4,
        help="--nll: flag items whose response the budget cut to fewer tokens",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace results of another model or settings in --output"
    )


def checked_model(args: argparse.Namespace) -> str:
    """The --model folder, and an explicit --output checked against every input (the model, where
    only its ``eval/`` may hold results, its base, --data-dir, the --nll data, --config) before
    anything loads."""
    from cctuning.loading import model_inputs, resolve_model_path  # deferred: imports torch

    path = resolve_model_path(args.model)
    if args.output:
        inputs = {
            **model_inputs(path),
            "--data-dir": args.data_dir,
            "--nll": args.nll,
            "--config": args.config,
        }
        check_output(args.output, inputs, inside={"--model": ["eval"]}, folder=True)
    return path


def evaluate(args: argparse.Namespace) -> int:
    from cctuning.eval.runner import EvalConfig, markdown_table  # deferred: --help must not import torch
    from cctuning.eval.runner import evaluate as run_evaluation  # deferred: --help must not import torch
    from cctuning.loading import load_for_inference  # deferred: --help must not import torch

    if args.nll:
        return evaluate_nll(args)
    if args.data_format != "auto" or args.columns or args.split:
        raise CCError("--format, --columns and --split say how to read the --nll data; give --nll")
    if args.allow_special_tokens:
        raise CCError("--allow-special-tokens applies to the --nll records; give --nll")
    cfg = EvalConfig(
        model=args.model,
        benchmarks=split_list(args.benchmarks) or list(BENCHMARKS),
        langs=split_list(args.langs) or None,
        limit=args.limit,
        connection=args.connection,
        scoring=args.scoring,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        output=args.output,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
        sample_layer=args.sample_layer,
        overwrite=args.overwrite,
        withhold_english=args.withhold_english,
    )
    cfg.check()  # before the model loads
    path = checked_model(args)
    with folder_lock(path, "cctuning eval", shared=True):  # no train --overwrite while it reads
        model, tok, _ = load_for_inference(path, cfg.trust_remote_code, dtype=args.dtype, device=args.device)
        report = run_evaluation(cfg, model, tok)
    print(markdown_table(report))
    if note := augment_note(report):
        print(note)
    for bench, langs in report["missing_languages"].items():
        print(f"note: {bench} has no data for {', '.join(langs)}")
    return 0


def evaluate_nll(args: argparse.Namespace) -> int:
    from cctuning.loading import load_for_inference  # deferred: --help must not import torch

    options = data_options(args)  # checked before the model loads
    if args.max_length <= 0:
        raise CCError(f"--max-length must be > 0 tokens, got {args.max_length}")
    # a benchmark's name instead of a file: the likelihood of its gold answers
    benchmark = (
        resolve_name(args.nll) if not Path(args.nll).exists() and is_benchmark_name(args.nll) else None
    )
    records = (
        answer_records(benchmark, split_list(args.langs) or None, args.data_dir, args.limit)
        if benchmark
        else None
    )
    path = checked_model(args)
    with folder_lock(path, "cctuning eval --nll", shared=True):  # no train --overwrite while it reads
        model, tok, path = load_for_inference(
            path, args.trust_remote_code, dtype=args.dtype, device=args.device
        )
        return _run_nll(args, model, tok, path, benchmark, records, options)


def _run_nll(args: argparse.Namespace, model, tok, path: str, benchmark, records, options) -> int:
    from cctuning.eval.nll import evaluate_nll as run_nll  # deferred: --help must not import torch
    from cctuning.model.connection import (  # deferred: imports torch
        describe_layer_choice,
        resolve_connection,
    )

    connection = resolve_connection(model, args.connection)  # the default folder names what runs
    sampled = f"-sampled{args.sample_layer}" if args.sample_layer else ""
    source = f"-{benchmark}" if benchmark else ""
    withheld = "-no-english" if args.withhold_english else ""
    output = args.output or str(Path(path) / "eval" / f"nll{source}-{connection}{sampled}{withheld}")
    data = args.nll
    if records is not None:
        data = Path(output) / f"{benchmark}_answers.jsonl"
        write_jsonl(data, records)
    report = run_nll(
        model,
        tok,
        data,
        connection,
        output,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        model_name=args.model,
        sample_layer=args.sample_layer,
        min_response_tokens=args.min_response_tokens,
        data_options=options,
        allow_special_tokens=args.allow_special_tokens,
        withhold_english=args.withhold_english,
    )
    print(f"held-out NLL of {args.nll} (connection {report['connection']}), saved to {output}")
    print(describe_layer_choice(report["connection"], report["layer_choice"]))
    if note := augment_note(report):
        print(note)
    print(f"{'lang':6} {'items':>6} {'tokens':>7} {'NLL':>8} {'95% CI':>17} {'PPL':>9}")
    for lang, m in report["nll"].items():
        print(
            f"{lang:6} {m['items']:6d} {m['tokens']:7d} {m['nll']:8.4f} [{m['ci_low']:.4f}, {m['ci_high']:.4f}] "
            f"{m['ppl']:9.2f}"
        )
    return 0
