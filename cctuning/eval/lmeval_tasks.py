"""The lm-evaluation-harness tasks of our six benchmarks: the task YAMLs shipped in
:data:`TASKS_DIR` (written by :func:`write_task_configs`), the dataset loader and the scoring they
name (``!function cctuning.eval.lmeval_tasks.load_split`` and ``process_results``), and a
``TaskManager`` that knows them. Nothing here imports torch: lm-eval loads these functions whenever
it reads our task folder (``cctuning lm-eval ls tasks`` too). The model is :mod:`cctuning.eval.lmeval`.
"""

from __future__ import annotations

from pathlib import Path

from cctuning.eval.benchmarks import BENCHMARKS, RESOURCE_DIR, Item, read_items
from cctuning.eval.scoring import score_item

TASKS_DIR = Path(__file__).resolve().parent.parent / "resources" / "lm_eval_tasks"


def task_manager(include_path: str | Path | list | None = None, **kwargs):
    """An lm-eval ``TaskManager`` that knows our tasks (and ``include_path``'s)."""
    from lm_eval.tasks import TaskManager  # deferred: lm-eval is an optional dependency (extra eval)

    extra = [] if include_path is None else include_path if isinstance(include_path, list) else [include_path]
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, extra)], **kwargs)


def load_split(data_files, benchmark: str, lang: str, cctuning_data_dir: str | None = None, **_metadata):
    """``custom_dataset`` of our task YAMLs: the ``data_files`` (relative paths: inside
    ``cctuning_data_dir``, a ``--metadata`` key, or else the bundled development split), read and
    checked as ``cctuning eval`` reads them. Other keys (lm-eval's metadata, the model_args) are ignored."""
    from datasets import Dataset, DatasetDict  # deferred: seconds to import; only lm-eval's runs need it

    base = Path(cctuning_data_dir).expanduser() if cctuning_data_dir else RESOURCE_DIR
    files = data_files if isinstance(data_files, dict) else {"test": data_files}
    splits = {}
    for split, name in files.items():
        path = Path(name).expanduser()
        items = read_items(path if path.is_absolute() else base / path, benchmark, lang)
        splits[split] = Dataset.from_list([_doc(item) for item in items])
    return DatasetDict(splits)


def _doc(item: Item) -> dict:
    answer = list(item.answer) if isinstance(item.answer, tuple) else item.answer
    return {
        "id": str(item.id),
        "prompt": item.prompt,
        "answer": answer,
        "prompt_en": item.prompt_en,
        "benchmark": item.benchmark,
        "lang": item.lang,
    }


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Our runner's per-item scores (``cctuning.eval.scoring.score_item``) of a generated answer."""
    answer = doc["answer"]
    item = Item(
        id=doc["id"],
        prompt=doc["prompt"],
        answer=tuple(answer) if isinstance(answer, list) else answer,
        prompt_en=doc["prompt_en"],
        lang=doc["lang"],
        benchmark=doc["benchmark"],
    )
    metrics = score_item(item, results[0])
    return {name: float(metrics[name]) for name in _generate_metrics(doc["benchmark"])}


def _generate_metrics(benchmark: str) -> tuple[str, ...]:
    spec = BENCHMARKS[benchmark]
    return spec.metrics + (("parsed",) if spec.answer_kind == "choice" else ())


GENERATED = (
    "# Written by cctuning.eval.lmeval_tasks.write_task_configs(); change that function, not this file.\n"
)
MAX_GEN_TOKS = 40  # as `cctuning eval` and the paper


def _yaml_list(values) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def _task_head(task: str, bench: str, lang: str) -> str:
    return (
        f"{GENERATED}task: {task}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {bench}/{lang}.jsonl\n"
        f"  benchmark: {bench}\n"
        f"  lang: {lang}\n"
        "custom_dataset: !function cctuning.eval.lmeval_tasks.load_split\n"
        "test_split: test\n"
        "doc_to_text: prompt\n"
    )


def _metrics(names) -> str:
    lines = ["metric_list:\n"]
    for name in names:
        lines.append(f"  - metric: {name}\n    aggregation: mean\n    higher_is_better: true\n")
    return "".join(lines)


def _group(group: str, tasks: list[str], metrics) -> str:
    lines = [f"{GENERATED}group: {group}\ntask:\n"]
    lines += [f"  - {t}\n" for t in tasks]
    lines.append("aggregate_metric_list:\n")
    for name in metrics:
        lines.append(f"  - metric: {name}\n    aggregation: mean\n    weight_by_size: false\n")
    lines.append("metadata:\n  version: 1.0\n")
    return "".join(lines)


def task_configs() -> dict[str, str]:
    """Every task and group YAML of :data:`TASKS_DIR` by relative path. Per benchmark, a task per
    language ``cctuning_<benchmark>_<lang>`` and a group ``cctuning_<benchmark>`` (languages
    weighted equally, as ``cctuning eval``'s average). Multiple-choice benchmarks are scored by
    likelihood (``acc``: the label whose continuation after the prompt is most likely); their
    ``cctuning_<benchmark>_gen_<lang>`` tasks generate and parse the label as ``cctuning eval``'s
    default scoring does. The others generate (greedy, 40 tokens) and are scored by our rules."""
    out = {}
    for bench, spec in BENCHMARKS.items():
        key = bench.lower()
        variants = []
        if spec.answer_kind == "choice":
            variants.append((f"cctuning_{key}", "choice", ("acc",)))
            variants.append((f"cctuning_{key}_gen", "generate", _generate_metrics(bench)))
        else:
            variants.append((f"cctuning_{key}", "generate", _generate_metrics(bench)))
        for group, kind, metrics in variants:
            tasks = []
            for lang in spec.languages:
                task = f"{group}_{lang}"
                tasks.append(task)
                text = _task_head(task, bench, lang)
                if kind == "choice":
                    labels = ", ".join(f"'{label}'" for label in spec.labels)
                    text += (
                        "output_type: multiple_choice\n"
                        f"doc_to_choice: {_yaml_list(spec.labels)}\n"
                        f'doc_to_target: "{{{{[{labels}].index(answer)}}}}"\n'
                        'target_delimiter: ""\n'
                    )
                else:
                    text += (
                        "output_type: generate_until\n"
                        "doc_to_target: answer\n"
                        "generation_kwargs:\n"
                        "  until: []\n"
                        f"  max_gen_toks: {MAX_GEN_TOKS}\n"
                        "  do_sample: false\n"
                        "process_results: !function cctuning.eval.lmeval_tasks.process_results\n"
                    )
                text += _metrics(metrics) + "metadata:\n  version: 1.0\n"
                out[f"{key}/{task}.yaml"] = text
            out[f"{key}/_{group}.yaml"] = _group(group, tasks, metrics)
    return out


def write_task_configs(folder: str | Path = TASKS_DIR) -> list[Path]:
    """Write :func:`task_configs` into ``folder`` (the package's own task folder by default)."""
    written = []
    for rel, text in task_configs().items():
        path = Path(folder) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
