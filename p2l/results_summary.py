"""From per-volume metric rows to what people read: the headline metrics, mean ± std over
volumes (`aggregate`), the printed summary table, and JSON without NaN (spec §6, §7).

`headline` is the one list of headline metrics; `p2l.evaluate` prints it per run and
`p2l.tools.tables` per config over runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from p2l.thresholds import HEALTHY_QUANTILE, policies


def headline(healthy_quantile: float = HEALTHY_QUANTILE) -> tuple[tuple[str, str], ...]:
    """(metric key, column header): Dice at every threshold policy, then AUPRC and AUROC."""
    dice = tuple((f"dice[{p.name}]", f"Dice ({p.label})") for p in policies(healthy_quantile))
    return (*dice, ("auprc", "AUPRC"), ("auroc", "AUROC"))


def legend(healthy_quantile: float = HEALTHY_QUANTILE) -> str:
    """One sentence per threshold policy, for the line under a table."""
    return "; ".join(f"Dice {p.label}: {p.meaning}" for p in policies(healthy_quantile)) + "."


def aggregate(rows: Sequence[Mapping[str, object]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation over volumes of every numeric key of `rows`.

    For each key (in order of first appearance): {"mean", "std", "n", "n_nan", "n_inf"}. Mean and
    std use only the finite values; std is over volumes with ddof=0 (numpy's default, as the
    reference's np.nanstd). A row without the key counts as NaN. Non-finite values are counted,
    not averaged: the reference did the same for Hausdorff (inf) and nanmean elsewhere, but used
    a plain mean for precision/recall, where sklearn had turned undefined values into 0.
    Keys whose values are not all numbers (e.g. volume ids) are skipped.
    """
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    summary: dict[str, dict[str, float]] = {}
    for key in keys:
        raw = [row.get(key, float("nan")) for row in rows]
        if not all(
            isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
            for v in raw
        ):
            continue
        values = np.asarray(raw, dtype=np.float64)
        finite = values[np.isfinite(values)]
        summary[key] = {
            "mean": float(finite.mean()) if finite.size else float("nan"),
            "std": float(finite.std()) if finite.size else float("nan"),
            "n": float(finite.size),
            "n_nan": float(np.count_nonzero(np.isnan(values))),
            "n_inf": float(np.count_nonzero(np.isinf(values))),
        }
    return summary


def json_safe(tree):
    """JSON has no NaN/inf: write them as null (the counts say how many there were)."""
    if isinstance(tree, dict):
        return {k: json_safe(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [json_safe(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    if isinstance(tree, np.generic):
        return json_safe(tree.item())
    return tree


def format_summary(summary: dict) -> str:
    """A small Markdown table of the headline metrics (mean ± std over volumes, in %)."""
    columns = headline(summary.get("eval", {}).get("healthy_quantile", HEALTHY_QUANTILE))
    lines = [
        f"{summary['name']} fold {summary['fold']} seed {summary['seed']} "
        f"(checkpoint step {summary['checkpoint_step']})",
        "| set | volumes | " + " | ".join(h for _, h in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for name, res in summary["sets"].items():
        cells = []
        for key, _ in columns:
            m = res["metrics"].get(key)
            if not m or m.get("mean") is None:
                cells.append("n/a")
            else:
                cells.append(f"{100 * m['mean']:.2f} ± {100 * (m.get('std') or 0):.2f}")
        lines.append(f"| {name} | {res['volumes']} | " + " | ".join(cells) + " |")
    thr = ", ".join(
        f"{k}={v['value']:.4g}" for k, v in summary["thresholds"].items() if v["value"] is not None
    )
    lines.append(f"thresholds: {thr}")
    return "\n".join(lines)
