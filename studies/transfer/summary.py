"""The study's summary: the seeds' results aggregated (``summary.json``) and its table (``summary.md``)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import date

from cctuning.stats import mean_interval, wilson_interval
from cctuning.versions import versions
from studies.transfer.config import BASELINE, CELLS, TransferConfig

SUMMARY_NAME = "summary.json"
SUMMARY_MD_NAME = "summary.md"


def _aggregate(parts: list[dict]) -> dict:
    """Per-seed accuracy summaries → mean over seeds (95% t-interval), the per-seed values and
    the items pooled over seeds (Wilson 95% interval; the seeds' worlds are independent)."""
    out = mean_interval([p["accuracy"] for p in parts], 0.0, 1.0)
    out["per_seed"] = [p["accuracy"] for p in parts]
    k, n = sum(p["correct"] for p in parts), sum(p["n"] for p in parts)
    low, high = wilson_interval(k, n)
    out["pooled"] = {"accuracy": k / n, "ci_low": low, "ci_high": high, "correct": k, "n": n}
    return out


def _column_sums(rows: list[list[int]]) -> list[int]:
    return [sum(col) for col in zip(*rows)]


def _cell_accuracies(runs: list[dict]) -> dict:
    """``{name}_accuracy`` of every cell: :func:`_aggregate` overall and on the dictionary's
    entities and the others, and the layer choices summed over seeds."""
    out = {}
    for cell in CELLS:
        per_seed = [r["cells"][cell.name] for r in runs]
        summary = _aggregate(per_seed)
        summary.update(
            method=cell.method,
            connection=cell.connection,
            in_dictionary=_aggregate([c["in_dictionary"] for c in per_seed]),
            not_in_dictionary=_aggregate([c["not_in_dictionary"] for c in per_seed]),
            layer_histogram=_column_sums([c["layer_histogram"] for c in per_seed]),
        )
        out[f"{cell.name}_accuracy"] = summary
    return out


def _margins(runs: list[dict]) -> dict:
    """Each cell's margin over the baseline: mean over seeds (95% t-interval) and the per-seed
    paired bootstraps."""
    return {
        cell.name: {
            **mean_interval([r["margins_over_sft"][cell.name]["margin"] for r in runs], -1.0, 1.0),
            "per_seed": [r["margins_over_sft"][cell.name] for r in runs],
        }
        for cell in CELLS
        if cell.name != BASELINE
    }


def _matrix(runs: list[dict]) -> dict:
    """The Transform Matrix's cosines (held-out training pairs, held-out entities) over seeds, and
    the per-layer diagnostics' means."""
    diag = [r["matrix"]["heldout_entities"] for r in runs]

    def cosine(values: list[float]) -> dict:
        return mean_interval(values, -1.0, 1.0)

    layers = range(len(diag[0]["per_layer"]))
    return {
        "heldout_pairs_cosine_before": cosine(
            [r["matrix"]["heldout_pairs"]["before"]["cosine"] for r in runs]
        ),
        "heldout_pairs_cosine_after": cosine([r["matrix"]["heldout_pairs"]["after"]["cosine"] for r in runs]),
        "heldout_entities_cosine_before": cosine([d["cosine_before"] for d in diag]),
        "heldout_entities_cosine_after": cosine([d["cosine_after"] for d in diag]),
        "per_layer": [
            {
                key: layer
                if key == "layer"
                else mean_interval([d["per_layer"][layer][key] for d in diag])["mean"]
                for key in diag[0]["per_layer"][layer]
            }
            for layer in layers
        ],
    }


def summarize(cfg: TransferConfig, runs: list[dict], seconds: float) -> dict:
    """Everything in summary.json (see :func:`_aggregate` for the intervals)."""
    summary: dict = {"date": date.today().isoformat(), "seeds": [r["seed"] for r in runs]}
    summary.update(_cell_accuracies(runs))
    summary["chance_accuracy"] = 1 / cfg.values
    summary["majority_baseline_accuracy"] = _aggregate([r["majority_baseline"] for r in runs])
    summary["stage1_foreign_accuracy"] = _aggregate([r["stage1"]["foreign_accuracy_heldout"] for r in runs])
    summary["margins_over_sft"] = _margins(runs)
    summary["stage1_english_accuracy"] = _aggregate(
        [r["stage1"]["english_accuracy_heldout_entities"] for r in runs]
    )
    summary["stage1_english_accuracy_train_entities"] = _aggregate(
        [r["stage1"]["english_accuracy_train_entities"] for r in runs]
    )
    summary["english_accuracy_after_stage2"] = {
        m: _aggregate([r["english_accuracy_after_stage2"][m] for r in runs])
        for m in runs[0]["english_accuracy_after_stage2"]
    }
    summary["layer_choice"] = {
        "training": _column_sums([r["layer_choice_training"] for r in runs]),
        "eval_oracle": summary["cc_oracle_accuracy"]["layer_histogram"],
        "eval_transform": summary["cc_transform_accuracy"]["layer_histogram"],
    }
    summary["matrix"] = _matrix(runs)
    summary["seconds"] = {"total": round(seconds, 1), "per_seed": [r["seconds"] for r in runs]}
    summary["settings"] = asdict(cfg)
    summary["versions"] = versions()
    summary["per_seed"] = runs
    return summary


# -- summary.md ----------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _interval(d: dict) -> str:
    if d.get("ci_low") is None:
        return "–"
    return f"[{_pct(d['ci_low'])}, {_pct(d['ci_high'])}]"


def _cell_table(summary: dict) -> list[str]:
    lines = [
        "| cell | connection | mean over seeds | 95% t-interval | pooled items [Wilson 95%] "
        "| in dictionary | not in dictionary | margin over SFT [95% t] |",
        "|---|---|---:|---|---|---:|---:|---|",
    ]
    for cell in CELLS:
        c = summary[f"{cell.name}_accuracy"]
        p = c["pooled"]
        margin = "–"
        if cell.name != BASELINE:
            m = summary["margins_over_sft"][cell.name]
            margin = f"{100 * m['mean']:+.1f} {_interval(m)}"
        lines.append(
            f"| {cell.label} | {c['connection']} | {_pct(c['mean'])} | {_interval(c)} | "
            f"{_pct(p['accuracy'])} [{_pct(p['ci_low'])}, {_pct(p['ci_high'])}] (n={p['n']}) | "
            f"{_pct(c['in_dictionary']['pooled']['accuracy'])} | {_pct(c['not_in_dictionary']['pooled']['accuracy'])} | {margin} |"
        )
    return lines


def _layer_table(per_layer: list[dict]) -> list[str]:
    lines = [
        "| layer | cosine before | cosine after | probe English→English | probe English→transformed foreign "
        "| probe foreign→foreign |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in per_layer:
        lines.append(
            f"| {row['layer']} | {row['cosine_before']:.3f} | {row['cosine_after']:.3f} | "
            f"{_pct(row['probe_english'])} | {_pct(row['probe_transformed'])} | {_pct(row['probe_foreign'])} |"
        )
    return lines


def summary_markdown(summary: dict) -> str:
    """The table of summary.md (and of the command): accuracy in % on the held-out foreign questions."""
    s1 = summary["stage1_english_accuracy"]
    after = summary["english_accuracy_after_stage2"]
    m = summary["matrix"]
    lc = summary["layer_choice"]
    lines = [
        "Held-out facts asked in the foreign language, accuracy in % (chance "
        f"{_pct(summary['chance_accuracy'])}, majority answer {_pct(summary['majority_baseline_accuracy']['mean'])}); "
        f"seeds {', '.join(map(str, summary['seeds']))}; {summary['date']}",
        "",
        *_cell_table(summary),
        "",
        f"Stage-1 English accuracy on the held-out entities' facts: {_pct(s1['mean'])} {_interval(s1)} "
        f"(training entities {_pct(summary['stage1_english_accuracy_train_entities']['mean'])}); "
        f"after stage 2: SFT {_pct(after['sft']['mean'])}, CC {_pct(after['cc']['mean'])}.",
        f"Decision Maker layer choices: training {lc['training']}, evaluation oracle {lc['eval_oracle']}, "
        f"transform {lc['eval_transform']}.",
        f"Transform Matrix cosine to the English activations on held-out entities: "
        f"{m['heldout_entities_cosine_before']['mean']:.3f} before, {m['heldout_entities_cosine_after']['mean']:.3f} after "
        f"(held-out training pairs: {m['heldout_pairs_cosine_before']['mean']:.3f} → {m['heldout_pairs_cosine_after']['mean']:.3f}).",
        "",
        *_layer_table(m["per_layer"]),
        "",
        f"Wall-clock: {summary['seconds']['total']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"
