"""The ``cctuning`` command line. Only this module prints; the library logs.

Each command imports the package modules it runs inside its own function (the one module of the
package that does so on purpose): ``cctuning --help`` and every command load only what they use,
not the benchmark runner, the plots, the experiment runner and the rest of every other command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from cctuning.config import add_dataclass_arguments, apply_yaml_defaults, build_config, split_list
from cctuning.errors import CCError
from cctuning.model.connection import CONNECTIONS, resolve_connection


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        for noisy in ("httpx", "urllib3", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _given_flags(args: argparse.Namespace) -> dict:
    """The options of a config-file command (train, demo) as parsed, without the parser's own entries."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "config", "verbose", "func")}


def _close_process_group() -> None:
    """End a multi-process run's process group cleanly (every rank has saved): left to interpreter
    teardown, gloo's and DeepSpeed's threads could abort a rank after its work was done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _cmd_train(args: argparse.Namespace) -> int:
    from cctuning.training import train
    from cctuning.training.options import build_train_config

    cfg = build_train_config(args.config, _given_flags(args))
    out = train(cfg)
    _close_process_group()
    if int(os.environ.get("RANK", "0") or 0) == 0:  # one line per run, not per process
        results = out / "train_results.json"
        skipped = (
            json.loads(results.read_text(encoding="utf-8")).get("skipped_records", 0)
            if results.is_file()
            else 0
        )
        note = f" ({skipped} invalid records skipped)" if skipped else ""
        print(f"saved {cfg.method} model to {out}{note}")
    return 0


def _load(
    model: str,
    trust_remote_code: bool = False,
    seed: int | None = None,
    sample_layer: bool = False,
    load_transform: bool = True,
    device: str | None = "auto",
    dtype: str | None = None,
):
    """A trained (or plain) model folder and its tokenizer, for the inference commands."""
    import torch

    from cctuning.loading import load_for_inference

    cc, tok, path = load_for_inference(
        model, trust_remote_code, dtype=dtype, load_transform=load_transform, device=device
    )
    if sample_layer:
        cc.cc_config.sample_layer = True
        cc.generator = torch.Generator().manual_seed(seed or 0)
    return cc, tok, path


def _cmd_fit_matrix(args: argparse.Namespace) -> int:
    from cctuning.inference.matrix import fit_matrix_from_file

    data_options = _data_options(args)  # checked before the model loads
    # without the matrix already there: refitting replaces it (it may be a retrained model's stale one)
    model, tok, path = _load(
        args.model, args.trust_remote_code, load_transform=False, device=args.device, dtype=args.dtype
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
        data_options=data_options,
        samples=args.samples,
        ridge=args.ridge,
        per_layer=args.per_layer,
        batch_size=args.batch_size,
        seed=args.seed,
        heldout_fraction=args.heldout,
        progress=True,
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
    return 0


def _generate_records(args: argparse.Namespace) -> list[dict]:
    """The prompts of ``generate``: the one of --prompt (and --prompt-en), or the records of --input."""
    from cctuning.data.records import load_prompts

    if args.prompt is not None:
        if args.connection == "english" and not args.prompt_en:
            raise CCError("--connection english with --prompt needs --prompt-en (the English prompt)")
        return [{"instruction": args.prompt, "instruction_en": args.prompt_en}]
    return [r.__dict__ for r in load_prompts(args.input, require_english=args.connection == "english")]


def _check_system_turn(records: list[dict], model) -> None:
    """A conversation's system turn in --input must be the model's system prompt: every prompt is
    rendered with that one (a one-line error otherwise, not a silently different prompt)."""
    from cctuning.data.records import Record, system_prompt_of

    if records and records[0].get("system") is not None:
        system_prompt_of([Record(**records[0])], model.cc_config.prompt_format.system_prompt, model=True)


def _generation_rows(records: list[dict], outs, connection: str) -> list[str]:
    """One JSON line per generation: the instruction, the text, the chosen layer (and the language)."""
    rows = []
    for rec, out in zip(records, outs):
        row = {
            "instruction": rec["instruction"],
            "generation": out.text,
            "layer": out.layer,
            "connection": connection,
        }
        if rec.get("lang"):
            row["lang"] = rec["lang"]
        rows.append(json.dumps(row, ensure_ascii=False))
    return rows


def _cmd_generate(args: argparse.Namespace) -> int:
    from cctuning.inference.generate import CCGenerator
    from cctuning.io import write_text

    if (args.prompt is None) == (args.input is None):
        raise CCError("give exactly one of --prompt TEXT or --input FILE.jsonl")
    model, tok, _ = _load(
        args.model, args.trust_remote_code, args.seed, args.sample_layer, device=args.device
    )
    gen = CCGenerator(model, tok, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    records = _generate_records(args)
    _check_system_turn(records, model)
    connection = resolve_connection(model, args.connection)
    outs = gen.generate(
        [r["instruction"] for r in records],
        connection,
        english=[r["instruction_en"] for r in records] if connection == "english" else None,
        progress=args.input is not None,
    )
    if args.prompt is not None and not args.output:
        print(outs[0].text)
        return 0
    rows = _generation_rows(records, outs, connection)
    text = "\n".join(rows) + "\n"
    if args.output:
        write_text(args.output, text)
        print(f"wrote {len(rows)} generations to {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from cctuning.eval.benchmarks import BENCHMARKS
    from cctuning.eval.runner import EvalConfig, evaluate, markdown_table
    from cctuning.loading import load_for_inference

    if args.nll:
        return _cmd_eval_nll(args)
    if args.data_format != "auto" or args.columns or args.split:
        raise CCError("--format, --columns and --split say how to read the --nll data; give --nll")
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
    )
    cfg.check()  # before the model loads
    model, tok, _ = load_for_inference(cfg.model, cfg.trust_remote_code, dtype=args.dtype, device=args.device)
    report = evaluate(cfg, model, tok)
    print(markdown_table(report))
    for bench, langs in report["missing_languages"].items():
        print(f"note: {bench} has no data for {', '.join(langs)}")
    return 0


def _cmd_eval_nll(args: argparse.Namespace) -> int:
    from cctuning.eval.benchmarks import answer_records, is_benchmark_name, resolve_name
    from cctuning.eval.nll import evaluate_nll
    from cctuning.loading import load_for_inference

    data_options = _data_options(args)  # checked before the model loads
    # a benchmark's name instead of a file: the likelihood of its gold answers
    benchmark = (
        resolve_name(args.nll) if not Path(args.nll).exists() and is_benchmark_name(args.nll) else None
    )
    records = (
        answer_records(benchmark, split_list(args.langs) or None, args.data_dir, args.limit)
        if benchmark
        else None
    )
    model, tok, path = load_for_inference(
        args.model, args.trust_remote_code, dtype=args.dtype, device=args.device
    )
    sampled = f"-sampled{args.sample_layer}" if args.sample_layer else ""
    source = f"-{benchmark}" if benchmark else ""
    output = args.output or str(Path(path) / "eval" / f"nll{source}-{args.connection or 'default'}{sampled}")
    data = args.nll
    if records is not None:
        from cctuning.io import write_jsonl

        data = Path(output) / f"{benchmark}_answers.jsonl"
        write_jsonl(data, records)
    report = evaluate_nll(
        model,
        tok,
        data,
        args.connection,
        output,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        model_name=args.model,
        sample_layer=args.sample_layer,
        min_response_tokens=args.min_response_tokens,
        data_options=data_options,
    )
    print(f"held-out NLL of {args.nll} (connection {report['connection']}), saved to {output}")
    print(f"{'lang':6} {'items':>6} {'tokens':>7} {'NLL':>8} {'95% CI':>17} {'PPL':>9}")
    for lang, m in report["nll"].items():
        print(
            f"{lang:6} {m['items']:6d} {m['tokens']:7d} {m['nll']:8.4f} [{m['ci_low']:.4f}, {m['ci_high']:.4f}] "
            f"{m['ppl']:9.2f}"
        )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from cctuning.lab.report import build_report_from_args

    table, png = build_report_from_args(args)
    print(table)
    print(f"\nplot: {png}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from cctuning.lab.demo import DemoConfig, run_demo

    cfg = build_config(DemoConfig, args.config, _given_flags(args))
    table, report_dir = run_demo(cfg)
    print()
    print(table)
    print(f"\nreport: {report_dir}/report.md · plots: {report_dir}/report.png, {report_dir}/layers.png")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from cctuning.config import coerce
    from cctuning.lab.experiment import experiment_markdown, load_config, run_experiment, select_cells

    cfg = load_config(args.config)
    if args.output:
        cfg.output = args.output
    if args.seeds:
        cfg.seeds = [coerce(v, int, "--seeds") for v in split_list(args.seeds)]
    if args.cells:
        select_cells(cfg, split_list(args.cells))
    if args.jobs < 0:
        raise CCError(f"--jobs: expected a number ≥ 0, got {args.jobs}")
    report = run_experiment(
        cfg,
        progress=not args.no_progress,
        jobs=args.jobs,
        devices=split_list(args.devices) if args.devices else None,
        config_path=args.config,
        report_only=args.report_only,
        write_report=not args.no_report,
    )
    if args.no_report:
        return 0
    print(experiment_markdown(report))
    print(f"\nreport: {cfg.output}/report.md")
    return 0


def _cmd_transfer_task(args: argparse.Namespace) -> int:
    from cctuning.transfer import config_from_args, run_transfer_task, summary_markdown

    cfg = config_from_args(args)
    print(summary_markdown(run_transfer_task(cfg)))
    print(f"summary: {cfg.output}/summary.json")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from cctuning.inference.export import export_model

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


# -- the parser: one function per command ----------------------------------------------------------

_MODEL_HELP = "a model folder (CC-Tuning, SFT or plain Hugging Face)"
_CONFIG_HELP = "YAML file with any of the options below (flags override it)"


def _add_data_options(p: argparse.ArgumentParser, data_flag: str = "--data") -> None:
    """``--format``, ``--columns`` and ``--split``: how the records of ``data_flag`` are read (as
    train's options of the same names; README "Data formats")."""
    from cctuning.data.formats import FORMATS

    p.add_argument(
        "--format",
        dest="data_format",
        choices=FORMATS,
        default="auto",
        help=f"format of the {data_flag} records (default: auto, detected from the fields)",
    )
    p.add_argument(
        "--columns",
        metavar="FIELD=COLUMN,...",
        help=f"read fields of the {data_flag} records from columns of other names, e.g. instruction=question",
    )
    p.add_argument("--split", help=f"the split of a DatasetDict folder given as {data_flag}")


def _data_options(args: argparse.Namespace):
    """The :class:`~cctuning.data.formats.DataOptions` of ``--format``, ``--columns``, ``--split``."""
    from cctuning.data.formats import DataOptions

    return DataOptions.of(args.data_format, args.columns, args.split)


def _add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--connection",
        choices=CONNECTIONS,
        help="default: transform when the model has a matrix, else none",
    )


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)


def _add_config_command(sub, name: str, help: str, cls, func) -> argparse.ArgumentParser:
    """A command whose options are the fields of the dataclass ``cls``, from flags or ``--config``."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--config", help=_CONFIG_HELP)
    add_dataclass_arguments(p, cls)
    p.set_defaults(func=func)
    return p


def _add_yaml_config(p: argparse.ArgumentParser) -> None:
    """``--config FILE.yaml`` for a command built with plain add_argument calls: the file's options
    become the command's defaults (:func:`_apply_config_file`), so flags override them."""
    p.add_argument("--config", help=_CONFIG_HELP)
    p.yaml_defaults = True


def _add_train(sub) -> None:
    from cctuning.training import TrainConfig
    from cctuning.training.options import add_trainer_arguments

    p = _add_config_command(
        sub, "train", "fine-tune with CC-Tuning (or plain SFT with --method sft)", TrainConfig, _cmd_train
    )
    add_trainer_arguments(p)  # every other TrainingArguments field, generated


def _add_loading_options(p) -> None:
    """How the inference commands load and run a model: ``--trust-remote-code``, ``--device``,
    ``--dtype`` and ``--bf16``."""
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (default: $CCTUNING_DEVICE, else CUDA when there is one, else the CPU), cpu, cuda, cuda:N",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="load the weights in this dtype (default: as saved; cctuning's own runs save float32); "
        "the Decision Maker and the Transform Matrix compute in float32 whatever it is",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="run the forward passes under bf16 autocast (the weights stay as loaded)",
    )
    p.set_defaults(inference_precision=True)


def _add_fit_matrix(sub) -> None:
    p = sub.add_parser("fit-matrix", help="fit the Transform Matrix (non-English → English activations)")
    p.add_argument("--model", required=True, help="a folder trained with --method cc")
    p.add_argument(
        "--data", required=True, help="parallel records (instruction, instruction_en), e.g. the training file"
    )
    _add_data_options(p)
    p.add_argument("--samples", type=int, default=1000, help="number of records to use (seeded sample)")
    p.add_argument("--ridge", type=float, default=0.0, help="ridge λ: solve (SᵀS + λI) M = SᵀT")
    p.add_argument(
        "--per-layer", action="store_true", help="one matrix per layer instead of one pooled matrix"
    )
    p.add_argument(
        "--heldout", type=float, default=0.1, help="fraction of pairs held out to measure the error"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid records instead of stopping")
    _add_loading_options(p)
    _add_yaml_config(p)
    p.set_defaults(func=_cmd_fit_matrix)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="greedy generation with the simulated connection")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--prompt", help="one instruction")
    p.add_argument("--prompt-en", help="its English translation (for --connection english)")
    p.add_argument("--input", help="JSON/JSONL records with instruction (and instruction_en for english)")
    p.add_argument("--output", help="write JSONL here (atomically) instead of stdout")
    _add_connection(p)
    _add_generation_options(p)
    p.add_argument(
        "--sample-layer",
        action="store_true",
        help="sample the layer with Gumbel noise (the official code) instead of argmax",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --sample-layer")
    _add_loading_options(p)
    _add_yaml_config(p)
    p.set_defaults(func=_cmd_generate)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a model on the benchmarks, per language")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument(
        "--benchmarks", help="comma-separated: XNLI,XStoryCloze,MMMLU,XQuAD,MKQA,XLSum (default: all)"
    )
    p.add_argument(
        "--langs", help="comma-separated language codes (default: every language of each benchmark)"
    )
    p.add_argument("--limit", type=int, help="first N items per benchmark and language")
    _add_connection(p)
    p.add_argument(
        "--scoring",
        choices=["generate", "likelihood"],
        default="generate",
        help="likelihood: compare the option labels' next-token log-probabilities (multiple choice)",
    )
    _add_generation_options(p)
    p.add_argument(
        "--data-dir", help="benchmark folder <Benchmark>/<lang>.jsonl (default: the bundled split)"
    )
    p.add_argument(
        "--output", help="run folder (default: MODEL/eval/CONNECTION-SCORING); resumes if it exists"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--nll",
        metavar="DATA",
        help="instead of benchmarks: per-token NLL of the gold responses of these records (held-out): "
        "a file or folder as train's --data; or a generative benchmark's name (XQuAD, MKQA, XLSum): "
        "the likelihood of its gold answers, with --langs, --limit and --data-dir",
    )
    _add_data_options(p, "--nll")
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
    _add_loading_options(p)
    _add_yaml_config(p)
    p.set_defaults(func=_cmd_eval)


def _add_demo(sub) -> None:
    from cctuning.lab.demo import DemoConfig

    _add_config_command(
        sub, "demo", "CC-Tuning vs SFT on a real small model, end to end (make demo)", DemoConfig, _cmd_demo
    )


def _add_experiment(sub) -> None:
    p = sub.add_parser(
        "experiment", help="a resumable grid of methods × ablations × seeds with NLL and benchmarks"
    )
    p.add_argument("--config", required=True, help="YAML file (see examples/experiment_smollm2.yaml)")
    p.add_argument("--output", help="override the config's output folder")
    p.add_argument("--seeds", help="comma-separated: run these seeds instead of the config's")
    p.add_argument("--cells", help="comma-separated: run only these cells")
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="run the grid as N processes at a time, one per seed × training, each in "
        "<output>/jobs/<job> (a GPU shared by several, or one each with --devices); default: one "
        "process, cell after cell",
    )
    p.add_argument(
        "--devices", help="with --jobs: CUDA_VISIBLE_DEVICES values handed to the jobs in turn, e.g. 0,1,2,3"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the evaluations already on disk; train and evaluate nothing",
    )
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # a parallel run's job
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_experiment)


def _add_report(sub) -> None:
    from cctuning.lab.report import add_arguments as add_report_arguments

    p = sub.add_parser(
        "report", help="put runs side by side (tables, plots) with the connection's diagnostics"
    )
    add_report_arguments(p)
    p.set_defaults(func=_cmd_report)


def _add_transfer_task(sub) -> None:
    from cctuning.transfer import add_arguments

    p = sub.add_parser("transfer-task", help="a synthetic task where the connection must help")
    add_arguments(p)
    p.set_defaults(func=_cmd_transfer_task)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a trained run as a self-contained folder (LoRA merged with --merge-lora)"
    )
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
    p.set_defaults(func=_cmd_export)


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    from cctuning.eval.lmeval import run_cli

    return run_cli(args.lm_eval_args)


def _add_lm_eval(sub) -> None:
    # every argument after `lm-eval` is lm-eval's (no option of ours: prefix_chars matches none)
    p = sub.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with the model 'cctuning' and our tasks (all lm-eval arguments pass through)",
        add_help=False,
        prefix_chars="\0",
    )
    p.add_argument("lm_eval_args", nargs="*")
    p.set_defaults(func=_cmd_lm_eval)


COMMANDS = (
    _add_train,
    _add_fit_matrix,
    _add_generate,
    _add_eval,
    _add_demo,
    _add_experiment,
    _add_report,
    _add_transfer_task,
    _add_export,
    _add_lm_eval,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cctuning",
        description="CC-Tuning: cross-lingual connection for multilingual supervised fine-tuning.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    return parser


def _apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """``--config FILE.yaml`` of a command marked by :func:`_add_yaml_config`, read before the command
    line is parsed: the file's options become the command's defaults, so the flags override them."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    position = next((i for i, token in enumerate(argv) if not token.startswith("-")), None)
    command = sub.choices.get(argv[position]) if position is not None else None
    if command is None or not getattr(command, "yaml_defaults", False):
        return
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv[position + 1 :])[0].config
    if path:
        apply_yaml_defaults(command, path)


def _inference_autocast(args: argparse.Namespace):
    """bf16 autocast on the inference device for ``--bf16`` of an inference command (``train``'s
    ``--bf16`` is the Trainer's own)."""
    import contextlib

    if not (getattr(args, "inference_precision", False) and args.bf16):
        return contextlib.nullcontext()
    import torch

    from cctuning.loading import resolve_device

    return torch.autocast(resolve_device(args.device).type, dtype=torch.bfloat16)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        _apply_config_file(parser, argv)
    except CCError as err:
        print(f"cctuning: error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with _inference_autocast(args):
            return args.func(args)
    except CCError as err:
        print(f"cctuning: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cctuning: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
