"""``cctuning eval``: run benchmarks through the generation path, cache, score and report.

Prompts go through the model's chat template and :class:`CCGenerator` (batched, fast path),
greedy with 40 new tokens by default, as in the paper. ``scoring="likelihood"`` instead compares
the next-token log-probabilities of the option labels after the prompt (multiple-choice
benchmarks only; the connection is applied at the prompt exactly as for generation).

Every generation is appended to ``generations/<Benchmark>/<lang>.jsonl`` in the output folder as
soon as its batch finishes, so an interrupted run resumes without recomputing finished items.
Scores are always recomputed from the cached outputs.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cctuning.data.augment import inference_instruction, needs_english, prompt_report, warn_without_english
from cctuning.errors import CCError
from cctuning.eval.benchmarks import (
    BENCHMARKS,
    Item,
    available_languages,
    get_spec,
    load_benchmark,
    resolve_name,
)
from cctuning.eval.scoring import aggregate, score_choice_logprobs, score_item
from cctuning.inference.generate import CCGenerator
from cctuning.io import (
    check_output_folder,
    folder_fingerprint,
    folder_lock,
    write_json,
    write_text,
    writes_into,
)
from cctuning.loading import load_for_inference
from cctuning.model.connection import (
    describe_layer_choice,
    layer_counts_by_language,
    layer_sampling,
    resolve_connection,
)
from cctuning.versions import versions

logger = logging.getLogger(__name__)

PRIMARY_METRIC = {"choice": "accuracy", "span": "contains", "aliases": "contains", "summary": "rougeL"}
RESULTS_NAME = "results.json"


def primary_metric(benchmark: str) -> str:
    return PRIMARY_METRIC[get_spec(benchmark).answer_kind]


@dataclass
class EvalConfig:
    model: str
    benchmarks: list[str] = field(default_factory=lambda: list(BENCHMARKS))
    langs: list[str] | None = None  # None: every language of each benchmark
    limit: int | None = None
    limits: dict[str, int] = field(default_factory=dict)  # per-benchmark item limits overriding limit
    connection: str | None = None  # None: transform when the model has a matrix, else none
    scoring: str = "generate"
    max_new_tokens: int = 40
    batch_size: int = 8
    data_dir: str | None = None
    output: str | None = None
    seed: int = 0
    trust_remote_code: bool = False
    sample_layer: int = 0  # K > 0: the official Gumbel-sampled layer, K seeded draws, scores averaged
    overwrite: bool = False  # replace results of another model or settings in the output folder
    # a model trained with --augment bilingual-prompt: prompts without the items' English (prompt_en)
    withhold_english: bool = False

    def check(self) -> None:
        """Values that cannot make an evaluation: one line each, before anything runs."""
        if self.scoring not in ("generate", "likelihood"):
            raise CCError(f"unknown scoring '{self.scoring}' (use generate or likelihood)")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise CCError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name, value in [("limit", self.limit), *((f"limits: {k}", v) for k, v in self.limits.items())]:
            if value is not None and value <= 0:
                raise CCError(f"--{name} must be > 0 items, got {value}")
        if self.sample_layer < 0:
            raise CCError(f"--sample-layer takes the number of draws (≥ 0), got {self.sample_layer}")

    def limit_for(self, benchmark: str) -> int | None:
        """Items per language for ``benchmark``: its entry in ``limits`` (any spelling of the name), else ``limit``."""
        name = resolve_name(benchmark)
        for key, value in self.limits.items():
            if resolve_name(key) == name:
                return value
        return self.limit

    def fingerprint(self, connection: str) -> dict:
        """What must match for cached generations to be reused."""
        folder = Path(self.model)
        return {
            "model": str(folder.resolve()) if folder.exists() else self.model,
            # the weights, Decision Maker and matrix that were scored: a retrained or refitted model
            # never reuses generations of the old one
            "weights": folder_fingerprint(folder) if folder.is_dir() else None,
            "connection": connection,
            "scoring": self.scoring,
            "max_new_tokens": self.max_new_tokens,
            "sample_layer": self.sample_layer,
            # only when set, so that generations cached before the option existed are reused
            **({"withhold_english": True} if self.withhold_english else {}),
        }


class GenerationCache:
    """Append-only JSONL per benchmark and language, keyed by item id."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, benchmark: str, lang: str) -> Path:
        return self.folder / benchmark / f"{lang}.jsonl"

    def load(self, benchmark: str, lang: str) -> dict[str, dict]:
        path = self.path(benchmark, lang)
        done: dict[str, dict] = {}
        if not path.is_file():
            return done
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that item is simply generated again
            done[str(row["id"])] = row
        return done

    def append(self, benchmark: str, lang: str, rows: list[dict]) -> None:
        path = self.path(benchmark, lang)
        path.parent.mkdir(parents=True, exist_ok=True)
        # a full disk cuts the last line at worst, which load() skips: that item is generated again
        with writes_into(path), open(path, "a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _label_token_ids(tokenizer, labels: tuple[str, ...]) -> list[int]:
    ids = [tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in labels]
    if len(set(ids)) != len(ids):
        raise CCError(f"the option labels {labels} do not start with distinct tokens; use --scoring generate")
    return ids


def _run_items(
    generator, items: list[Item], connection: str, scoring: str, labels: tuple[str, ...]
) -> list[dict]:
    """Generate (or score by likelihood) one batch of items; returns cache rows."""
    english = [it.prompt_en for it in items] if connection == "english" else None
    prompts = [it.prompt for it in items]
    if scoring == "likelihood":
        label_ids = _label_token_ids(generator.tokenizer, labels)
        outs = generator.generate(prompts, connection, english, return_first_logits=True, max_new_tokens=1)
        rows = []
        for it, out in zip(items, outs):
            logp = torch.log_softmax(out.first_logits, -1)
            rows.append(
                {
                    "id": it.id,
                    "logprobs": {lab: float(logp[i]) for lab, i in zip(labels, label_ids)},
                    "layer": out.layer,
                }
            )
        return rows
    outs = generator.generate(prompts, connection, english)
    return [{"id": it.id, "output": out.text, "layer": out.layer} for it, out in zip(items, outs)]


def _score(item: Item, row: dict) -> dict:
    if "logprobs" in row:
        return score_choice_logprobs(row["logprobs"], str(item.answer))
    return score_item(item, row["output"])


def evaluate(cfg: EvalConfig, model=None, tokenizer=None, progress: bool = True) -> dict:
    """Run the evaluation described by ``cfg``; returns (and writes) the results dictionary."""
    cfg.check()
    if model is None:
        model, tokenizer, _ = load_for_inference(cfg.model, cfg.trust_remote_code)
    torch.manual_seed(cfg.seed)
    generator = CCGenerator(model, tokenizer, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    connection = resolve_connection(model, cfg.connection)
    out_dir = check_output_folder(_out_dir(cfg, connection))
    with folder_lock(out_dir, "cctuning eval"):
        _open_run_dir(cfg, connection, out_dir)
        results, started = [], time.time()
        missing_langs: dict[str, list[str]] = {}
        without_english: dict[tuple[str, str], tuple[int, int]] = {}  # (benchmark, lang): (fallbacks, items)
        draws = cfg.sample_layer if connection != "none" else 0
        for bench in [get_spec(b).name for b in cfg.benchmarks]:
            langs = _benchmark_langs(cfg, bench, missing_langs)
            runs = []
            for draw in range(max(1, draws)):  # each draw has its own cache and seed
                folder = out_dir / "generations" / (f"draw-{draw}" if draws else "")
                with layer_sampling(model, cfg.seed + draw) if draws else contextlib.nullcontext():
                    runs.append(
                        _evaluate_benchmark(
                            cfg,
                            bench,
                            langs,
                            generator,
                            GenerationCache(folder),
                            connection,
                            progress,
                            without_english,
                        )  # fmt: skip
                    )
            results += _average_draws(runs)
        if not results:
            raise CCError("nothing to evaluate: no benchmark has any of the requested languages")
        fallbacks = sum(n for n, _ in without_english.values())
        warn_without_english("eval", fallbacks, sum(t for _, t in without_english.values()))
        report = _results_report(cfg, model, connection, results, missing_langs, time.time() - started)
        report.update(prompt_report(model.cc_config.augment, cfg.withhold_english, fallbacks))
        write_results(out_dir, report)
    return report


def _average_draws(runs: list[list[dict]]) -> list[dict]:
    """One result per item: its metrics averaged over the layer draws (one run: as is); the layers of
    every draw count in the layer statistics."""
    if len(runs) == 1:
        return runs[0]
    out = []
    for rows in zip(*runs):
        first = rows[0]
        metrics = {}
        for key, value in first["metrics"].items():
            if isinstance(value, bool):  # e.g. parsed: true only when every draw's answer parsed
                metrics[key] = all(r["metrics"][key] for r in rows)
            elif isinstance(value, (int, float)):
                metrics[key] = sum(r["metrics"][key] for r in rows) / len(rows)
        out.append({**first, "metrics": metrics, "layers": [r["layer"] for r in rows]})
    return out


def _out_dir(cfg: EvalConfig, connection: str) -> Path:
    suffix = f"-sampled{cfg.sample_layer}" if cfg.sample_layer and connection != "none" else ""
    suffix += "-no-english" if cfg.withhold_english else ""
    return Path(cfg.output or Path(cfg.model) / "eval" / f"{connection}-{cfg.scoring}{suffix}")


def _open_run_dir(cfg: EvalConfig, connection: str, out_dir: Path) -> None:
    """Refuse a folder whose cached generations are another model's (retrained, refitted) or other
    settings', unless ``overwrite``, which removes them first."""
    fingerprint = cfg.fingerprint(connection)
    run_file = out_dir / "run.json"
    if run_file.is_file():
        previous = json.loads(run_file.read_text(encoding="utf-8")).get("fingerprint") or {}
        changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
        if changed and not cfg.overwrite:
            what = (
                "the model's weights, Decision Maker or matrix changed since"
                if "weights" in changed
                else "other settings made"
            )
            raise CCError(
                f"{out_dir} holds results that {what} them (differs: {', '.join(changed)}); use --overwrite "
                "to replace them or choose another --output"
            )
        if changed:
            logger.info("--overwrite: removing the earlier results in %s", out_dir)
            shutil.rmtree(out_dir / "generations", ignore_errors=True)
            for name in (RESULTS_NAME, "results.csv", "results.md"):
                (out_dir / name).unlink(missing_ok=True)
    write_json(run_file, {"fingerprint": fingerprint, "config": asdict(cfg), "versions": versions()})


def _benchmark_langs(cfg: EvalConfig, bench: str, missing_langs: dict[str, list[str]]) -> list[str]:
    """The requested languages the benchmark has (those it lacks are noted in ``missing_langs``)."""
    have = available_languages(bench, cfg.data_dir)
    if cfg.langs is None:
        return have
    langs = [lang for lang in cfg.langs if lang in have]
    if len(langs) < len(cfg.langs):
        missing_langs[bench] = [lang for lang in cfg.langs if lang not in have]
    return langs


def _evaluate_benchmark(
    cfg: EvalConfig,
    bench: str,
    langs: list[str],
    generator,
    cache: GenerationCache,
    connection: str,
    progress: bool,
    without_english: dict | None = None,
) -> list[dict]:
    """One benchmark's items: generate those not cached yet, then score every item (``without_english``
    gets, per language, how many prompts of a bilingual-prompt model went without their English)."""
    spec = get_spec(bench)
    scoring = cfg.scoring if spec.answer_kind == "choice" else "generate"
    limit = cfg.limit_for(bench)
    items_by_lang = {lang: load_benchmark(bench, lang, cfg.data_dir, limit) for lang in langs}
    total = sum(len(v) for v in items_by_lang.values())
    bar = tqdm(total=total, desc=bench, unit="item", disable=not progress)
    results = []
    for lang, items in items_by_lang.items():
        done = cache.load(bench, lang)
        asked, fallbacks = _prompted(cfg, generator.model.cc_config.augment, items)
        if without_english is not None:
            without_english[bench, lang] = (fallbacks, len(items))
        todo = [it for it in asked if str(it.id) not in done]
        if scoring == "likelihood" and not cfg.sample_layer:
            # chunks of similar prompt lengths, so that their batches carry little padding (XNLI/sw,
            # 200 items, SmolLM2 tokens, batch 8: 6.5 % padding -> 1.1 %); results are kept by id.
            # Sampled draws keep the file order: their Gumbel noise follows the batches.
            todo.sort(key=lambda it: len(it.prompt))
        bar.update(len(items) - len(todo))
        for rows in _generate(cfg, generator, todo, connection, scoring, spec.labels):
            cache.append(bench, lang, rows)
            done.update({str(r["id"]): r for r in rows})
            bar.update(len(rows))
        for it in items:
            row = done[str(it.id)]
            results.append(
                {
                    "benchmark": bench,
                    "lang": lang,
                    "id": it.id,
                    "metrics": _score(it, row),
                    "layer": row.get("layer"),
                }
            )
    bar.close()
    return results


def _prompted(cfg: EvalConfig, augment: str, items: list[Item]) -> tuple[list[Item], int]:
    """``items`` with the prompt a model trained with ``augment`` is given
    (:func:`~cctuning.data.augment.inference_instruction`: a bilingual-prompt model gets the item's
    ``prompt_en``, then its prompt, unless ``withhold_english``), and how many went without their
    English (the caller warns once for the whole run)."""
    if augment != "bilingual-prompt":
        return items, 0
    english = [None if cfg.withhold_english else it.prompt_en for it in items]
    asked = [
        replace(it, prompt=inference_instruction(it.prompt, en, augment, it.lang))
        for it, en in zip(items, english)
    ]
    return asked, sum(needs_english(it.prompt, en, augment, it.lang) for it, en in zip(items, english))


def _generate(cfg: EvalConfig, generator, todo: list[Item], connection: str, scoring: str, labels):
    """Cache rows for ``todo``, a chunk of a few batches at a time (each chunk is cached at once)."""
    step = max(1, cfg.batch_size * 4)
    for start in range(0, len(todo), step):
        yield _run_items(generator, todo[start : start + step], connection, scoring, labels)


def _results_report(
    cfg: EvalConfig, model, connection: str, results: list[dict], missing_langs: dict, seconds: float
) -> dict:
    """The results dictionary: scores aggregated per benchmark and language, and the run's settings."""
    summary = aggregate(results)
    report = {
        "model": cfg.model,
        "connection": connection,
        "scoring": cfg.scoring,
        "sample_layer": cfg.sample_layer if connection != "none" else 0,
        "limit": cfg.limit,
        "seed": cfg.seed,
        "max_new_tokens": cfg.max_new_tokens,
        "method": model.cc_config.method,
        "primary_metric": {b: primary_metric(b) for b in summary},
        "benchmarks": summary,
        "missing_languages": missing_langs,
        "layer_choice": layer_counts_by_language(results),
        "num_layers": model.arch.num_layers,
        "seconds": round(seconds, 2),
        "versions": versions(),
    }
    if cfg.limits:
        report["limits"] = {b: cfg.limit_for(b) for b in summary}
    return report


# -- outputs --------------------------------------------------------------------------------------
def results_rows(report: dict) -> list[dict]:
    """One row per benchmark × language × metric (plus the averages)."""
    rows = []
    for bench, data in report["benchmarks"].items():
        for lang, metrics in data["per_language"].items():
            for metric, value in metrics.items():
                if metric in ("n", "unparsed"):
                    continue
                rows.append(
                    {
                        "benchmark": bench,
                        "lang": lang,
                        "metric": metric,
                        "value": value,
                        "n": metrics["n"],
                        "unparsed": metrics.get("unparsed", ""),
                    }
                )
        for key, label in (("average", "avg"), ("average_without_en", "avg_no_en")):
            for metric, value in (data.get(key) or {}).items():
                rows.append(
                    {
                        "benchmark": bench,
                        "lang": label,
                        "metric": metric,
                        "value": value,
                        "n": "",
                        "unparsed": "",
                    }
                )
    return rows


def markdown_table(report: dict) -> str:
    """Primary metric (×100) per benchmark and language, with both averages and unparsed counts."""
    overrides = {b: n for b, n in (report.get("limits") or {}).items() if n != report["limit"]}
    lines = [
        f"model: `{report['model']}` · connection: {report['connection']} · scoring: {report['scoring']}"
        f" · limit: {report['limit']}"
        + (" (" + ", ".join(f"{b} {n}" for b, n in overrides.items()) + ")" if overrides else ""),
        "",
        describe_layer_choice(report["connection"], report.get("layer_choice") or {}) + " (every benchmark)",
        "",
    ]
    for bench, data in report["benchmarks"].items():
        metric = report["primary_metric"][bench]
        langs = list(data["per_language"])
        lines.append(f"**{bench}** ({metric} ×100)")
        lines.append("")
        lines.append("| " + " | ".join(langs + ["avg", "avg w/o en"]) + " |")
        lines.append("|" + "---|" * (len(langs) + 2))
        vals = [f"{100 * data['per_language'][lang][metric]:.1f}" for lang in langs]
        for key in ("average", "average_without_en"):
            vals.append(f"{100 * data[key][metric]:.1f}" if data.get(key) else "–")
        lines.append("| " + " | ".join(vals) + " |")
        unparsed = {lang: m["unparsed"] for lang, m in data["per_language"].items() if m.get("unparsed")}
        if unparsed:
            lines.append("")
            lines.append("unparseable answers: " + ", ".join(f"{k} {v}" for k, v in unparsed.items()))
        lines.append("")
    return "\n".join(lines)


def write_results(out_dir: Path, report: dict) -> None:
    write_json(out_dir / RESULTS_NAME, report)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["benchmark", "lang", "metric", "value", "n", "unparsed"])
    writer.writeheader()
    writer.writerows(results_rows(report))
    write_text(out_dir / "results.csv", buf.getvalue())
    write_text(out_dir / "results.md", markdown_table(report) + "\n")
