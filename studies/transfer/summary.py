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


def _trainings(runs: list[dict]) -> dict:
    """Each stage-2 training's method, augment, budget and per-seed optimizer steps and examples."""
    out = {}
    for name, first in runs[0]["stage2"].items():
        out[name] = {key: first.get(key) for key in ("method", "augment", "budget")} | {
            "steps": [r["stage2"][name]["steps"] for r in runs],
            "examples": [r["stage2"][name].get("examples") for r in runs],
            "train_loss": [r["stage2"][name]["train_loss"] for r in runs],
        }
    return out


def _entity_probes(runs: list[dict]) -> dict | None:
    """The entity probes (understood world) per model: per layer, the mean over seeds of each
    probe, and the best foreign layer's accuracy per seed with its mean (95% t-interval)."""
    if not runs[0].get("entity_probe", {}).get("stage1"):
        return None
    out = {}
    for model in runs[0]["entity_probe"]:
        probes = [r["entity_probe"][model] for r in runs]
        layers = range(len(probes[0]["per_layer"]))
        out[model] = {
            "classes": probes[0]["classes"],
            **{  # the hidden states' only in runs that measured them
                key: {
                    **mean_interval([p[key] for p in probes], 0.0, 1.0),
                    "per_seed": [p[key] for p in probes],
                }
                for key in ("best_foreign", "best_foreign_hidden")
                if all(key in p for p in probes)
            },
            "per_layer": [
                {
                    key: layer
                    if key == "layer"
                    else sum(p["per_layer"][layer][key] for p in probes) / len(probes)
                    for key in probes[0]["per_layer"][layer]
                }
                for layer in layers
            ],
        }
    return out


def _checks(summary: dict) -> dict | None:
    """The understood world's preconditions (docs/transfer.md): after stage 2 a linear probe on the
    connected model's foreign activations identifies a held-out entity at >= 80% (best layer, mean
    over seeds) while SFT answers its held-out facts at <= 40%. Checked on the MLP outputs (what the
    Transform Matrix maps) and, where measured, on the hidden states at p."""
    probes = summary.get("entity_probe")
    if not probes:
        return None
    probe = probes["cc"]["best_foreign"]["mean"]
    sft = summary["sft_accuracy"]["mean"]
    checks = {
        "entity_probe_cc_best_foreign": probe,
        "entity_probe_at_least_80": probe >= 0.8,
        "sft_accuracy": sft,
        "sft_at_most_40": sft <= 0.4,
    }
    if "best_foreign_hidden" in probes["cc"]:
        hidden = probes["cc"]["best_foreign_hidden"]["mean"]
        checks["entity_probe_cc_best_foreign_hidden"] = hidden
        checks["entity_probe_hidden_at_least_80"] = hidden >= 0.8
    return checks


def summarize(cfg: TransferConfig, runs: list[dict], seconds: float) -> dict:
    """Everything in summary.json (see :func:`_aggregate` for the intervals)."""
    summary: dict = {
        "date": date.today().isoformat(),
        "world": cfg.world,
        "seeds": [r["seed"] for r in runs],
    }
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
    summary["stage2_trainings"] = _trainings(runs)
    summary["entity_probe"] = _entity_probes(runs)
    summary["checks"] = _checks(summary)
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


def _probe_lines(summary: dict) -> list[str]:
    """The entity probes' table (understood world; none in the default world)."""
    probes = summary.get("entity_probe")
    if not probes:
        return []
    chance = 100 / probes["stage1"]["classes"]
    lines = [
        f"Entity probe on the held-out entities' evaluated questions (fitted on their context-relation "
        f"prompts; chance {chance:.1f}%), mean over seeds, per layer:",
        "",
        "| model | probe | "
        + " | ".join(f"layer {row['layer']}" for row in probes["stage1"]["per_layer"])
        + " |",
        "|---|---|" + "---:|" * len(probes["stage1"]["per_layer"]),
    ]
    for model, probe in probes.items():
        for key in probe["per_layer"][0]:
            if key != "layer":
                values = " | ".join(_pct(row[key]) for row in probe["per_layer"])
                lines.append(f"| {model} | {key} | {values} |")
    c = summary["checks"]
    lines += [
        "",
        f"Checks: entity probe (CC, best foreign layer) {_pct(c['entity_probe_cc_best_foreign'])}% "
        f"(>= 80: {c['entity_probe_at_least_80']}); SFT {_pct(c['sft_accuracy'])}% (<= 40: {c['sft_at_most_40']}).",
        "",
    ]
    if "entity_probe_cc_best_foreign_hidden" in c:
        lines[-1:-1] = [
            f"On the hidden states at p (after each layer): {_pct(c['entity_probe_cc_best_foreign_hidden'])}% "
            f"(>= 80: {c['entity_probe_hidden_at_least_80']})."
        ]
    return lines


def _training_line(summary: dict) -> str:
    parts = [
        f"{name} (--method {t['method']} --augment {t['augment']}, {t['budget']}): steps "
        f"{', '.join(map(str, t['steps']))}"
        for name, t in summary["stage2_trainings"].items()
    ]
    return "Stage-2 trainings, optimizer steps per seed: " + "; ".join(parts) + "."


def summary_markdown(summary: dict) -> str:
    """The table of summary.md (and of the command): accuracy in % on the held-out foreign questions."""
    s1 = summary["stage1_english_accuracy"]
    after = summary["english_accuracy_after_stage2"]
    m = summary["matrix"]
    lc = summary["layer_choice"]
    lines = [
        f"World `{summary['world']}`. Held-out facts asked in the foreign language, accuracy in % (chance "
        f"{_pct(summary['chance_accuracy'])}, majority answer {_pct(summary['majority_baseline_accuracy']['mean'])}); "
        f"seeds {', '.join(map(str, summary['seeds']))}; {summary['date']}",
        "",
        *_cell_table(summary),
        "",
        f"Stage-1 English accuracy on the held-out entities' facts: {_pct(s1['mean'])} {_interval(s1)} "
        f"(training entities {_pct(summary['stage1_english_accuracy_train_entities']['mean'])}); "
        "after stage 2: " + ", ".join(f"{m} {_pct(a['mean'])}" for m, a in after.items()) + ".",
        _training_line(summary),
        f"Decision Maker layer choices: training {lc['training']}, evaluation oracle {lc['eval_oracle']}, "
        f"transform {lc['eval_transform']}.",
        f"Transform Matrix cosine to the English activations on held-out entities: "
        f"{m['heldout_entities_cosine_before']['mean']:.3f} before, {m['heldout_entities_cosine_after']['mean']:.3f} after "
        f"(held-out training pairs: {m['heldout_pairs_cosine_before']['mean']:.3f} → {m['heldout_pairs_cosine_after']['mean']:.3f}).",
        "",
        *_layer_table(m["per_layer"]),
        "",
        *_probe_lines(summary),
        f"Wall-clock: {summary['seconds']['total']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"
