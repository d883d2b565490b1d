"""From per-volume metric rows to what people read: the headline metrics, mean ± std over
volumes (`aggregate`), the printed summary table, and JSON without NaN (spec §6, §7).

`headline` is the one list of headline metrics; `p2l.evaluate` prints it per run and
`p2l.tools.tables` per config over runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from p2l.protocols import BEHRENDT, REFERENCE, VALIDATION_SUBJECT, protocol_of
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


def aggregate_by_protocol(rows: Sequence[Mapping[str, object]]) -> dict[str, dict[str, float]]:
    """`aggregate`, each metric over the volumes of its protocol (p2l.protocols): `*[validation]`
    keys over the test volumes that are not validation subjects, every other key over all."""
    summary = aggregate(rows)
    kept = [row for row in rows if not row.get(VALIDATION_SUBJECT)]
    if len(kept) < len(rows):
        behrendt = aggregate(kept)
        for key in summary:
            if protocol_of(key) == BEHRENDT:
                summary[key] = behrendt.get(key, summary[key])
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
    # Runs scoring several detectors (p2l.detectors) get one row per set and detector.
    per_detector = summary.get("detectors") or {}
    several = len(per_detector) > 1
    if several:
        lines[1] = lines[1].replace("| set |", "| set | detector |")
        lines[2] = "|---" + lines[2]
    runs = per_detector.items() if several else [(None, summary)]
    for name in summary["sets"]:
        for detector, result in runs:
            res = result["sets"][name]
            cells = []
            for key, _ in columns:
                m = res["metrics"].get(key)
                if not m or m.get("mean") is None:
                    cells.append("n/a")
                else:
                    cells.append(f"{100 * m['mean']:.2f} ± {100 * (m.get('std') or 0):.2f}")
            label = f"{name} | {detector}" if several else name
            lines.append(f"| {label} | {res['volumes']} | " + " | ".join(cells) + " |")
    for detector, result in runs:
        thr = ", ".join(f"{k}={v['value']:.4g}" for k, v in result["thresholds"].items()
                        if v["value"] is not None)  # fmt: skip
        lines.append(f"thresholds{f' ({detector})' if several else ''}: {thr}")
    lines.extend(protocol_lines(summary))
    healthy = summary.get("healthy_test")
    if healthy:  # p2l.healthy_fpr
        cells = []
        for name, t in healthy["thresholds"].items():
            pooled = t["pooled_fraction"]
            cells.append(f"{name} " + ("n/a" if pooled is None else f"{100 * pooled:.2f} %"))
        lines.append(f"healthy test ({healthy['split']}, {healthy['volumes']} volumes), "
                     "brain voxels above: " + ", ".join(cells))  # fmt: skip
    return "\n".join(lines)


def protocol_lines(summary: dict) -> list[str]:
    """One line per set saying which volumes each policy's numbers are on (p2l.protocols)."""
    lines = []
    for name, res in summary["sets"].items():
        found = res.get("protocols")
        if not found:  # summaries written before protocols were recorded
            continue
        ref = found[REFERENCE]
        text = (f"{name}: {', '.join(ref['policies'])}, AUROC/AUPRC on all {ref['volumes']} test "
                f"volumes ({REFERENCE} protocol)")  # fmt: skip
        if BEHRENDT in found:
            b = found[BEHRENDT]
            text += (
                f"; {', '.join(b['policies'])} on {b['volumes']} ({BEHRENDT} protocol: "
                f"{b['excluded_validation_subjects']} validation subject(s) left out)"
            )
        lines.append(text)
    return lines
