"""Collect evaluation summaries into the paper's table layout (`make tables`).

    python -m p2l.tools.tables --runs runs/

Every run folder (one holding run_info.json) below --runs is one training run (a fold, a seed, a
setting). Runs are grouped by config name; for each dataset the table gives the mean ± std over
runs of each run's mean over volumes (Dice per threshold policy, AUPRC, AUROC, in %). Only
finished runs count (last step checkpointed and evaluated: p2l.run_status); the others
(unfinished, interrupted, failed, unreadable files) and summaries lacking a dataset are listed
apart under "Not counted", never averaged over. A model is counted once: run folders with the
same identity (p2l.run_identity: the same config, fold, seed and data, e.g. `runs/t2` from
`make train` and `runs/t2/fold=0` from a sweep) count as one, the most recently evaluated, and
the others are listed under "Not counted". The `runs` column says how many runs a row averages.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from p2l import results_summary, run_status
from p2l.atomic_write import write_text_atomic
from p2l.errors import DataError
from p2l.thresholds import HEALTHY_QUANTILE


def find_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).rglob("run_info.json"))


def collect(root: Path) -> tuple[dict, list[str]]:
    """{config name: {dataset: {metric: [per-run means]}}}, and problems found."""
    table: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    runs: dict = defaultdict(lambda: defaultdict(list))
    columns: dict[str, str] = {}  # headline metrics of all runs, in order (key -> header)
    quantiles: set[float] = set()
    problems = []
    finished = []  # (run, name, config, state)
    for run in find_runs(root):
        try:
            info = run_status.read_json(run / "run_info.json")
            config = info.get("config", {})
            state = run_status.run_state(run, int(config.get("num_steps", 0)))
        except DataError as err:
            problems.append(str(err))
            continue
        except (TypeError, ValueError, AttributeError) as err:
            problems.append(f"{run / 'run_info.json'}: unexpected content ({err!r})")
            continue
        name = config.get("name", "?")
        # Sweep folders are named k=v,...: runs differing only in fold/seed are pooled.
        settings = [p for p in run.name.split(",") if "=" in p]
        settings = [p for p in settings if not p.startswith(("fold=", "seed="))]
        if settings:
            name = f"{name} [{','.join(settings)}]"
        if not state.finished:
            problems.append(f"{run}: {state.label}")
            continue
        finished.append((run, name, config, state, (info.get("identity") or {}).get("hash")))
    volumes: dict = defaultdict(lambda: defaultdict(set))  # (name, dataset) -> protocol counts
    for run, run_name, config, state in _counted_once(finished, problems):
        for name, summary in detector_summaries(run_name, state.summary):
            try:
                rows = _summary_rows(summary, config.get("test_sets", []))
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                problems.append(f"{run / run_status.SUMMARY}: unexpected content ({err!r})")
                continue
            quantile, headline, per_set = rows
            quantiles.add(quantile)
            columns.update(headline)
            for dataset, means in per_set.items():
                if means is None:
                    problems.append(f"{run}: summary has no {dataset} results")
                    continue
                runs[name][dataset].append(str(run))
                for key, value in means.items():
                    table[name][dataset][key].append(value)
                for protocol, found in summary["sets"][dataset].get("protocols", {}).items():
                    volumes[name][dataset].add(
                        (
                            protocol,
                            found.get("volumes"),
                            found.get("excluded_validation_subjects", 0),
                        )
                    )
    collected = {"table": table, "runs": runs, "columns": columns, "quantiles": sorted(quantiles),
                 "protocols": volumes}  # fmt: skip
    return collected, problems


def detector_summaries(name: str, summary: dict) -> list[tuple[str, dict]]:
    """(row name, summary) per detector of a run: `t2 · dae`, `t2 · fused[product]`, ... for a run
    that scored several (p2l.detectors), else the run's own name and summary."""
    per_detector = summary.get("detectors") or {}
    if len(per_detector) <= 1:
        return [(name, summary)]
    return [(f"{name} · {detector}", {**summary, **result})
            for detector, result in per_detector.items()]  # fmt: skip


def _evaluated_at(run: Path) -> float:
    try:
        return (run / run_status.SUMMARY).stat().st_mtime
    except OSError:
        return float("-inf")


def _counted_once(finished: list[tuple], problems: list[str]) -> list[tuple]:
    """(run, name, config, state) of finished runs, one per identity: the latest evaluated.

    The identity hash (p2l.run_identity, recorded in run_info.json) covers the config keys that
    define a model, fold, seed and data included: two folders with the same hash hold the same
    model, e.g. `runs/t2` of `make train` and `runs/t2/fold=0` of a sweep.
    """
    groups: dict = defaultdict(list)
    for entry in finished:
        run, name, config, state, identity = entry
        groups[(name, identity) if identity else (name, str(run))].append(entry)
    kept = []
    for (_, identity), same in groups.items():
        latest = max(same, key=lambda e: _evaluated_at(e[0]))
        kept.append(latest[:4])
        problems += [f"{e[0]}: the same model as {latest[0]} (identity {identity}); counted once"
                     for e in same if e is not latest]  # fmt: skip
    return sorted(kept, key=lambda e: str(e[0]))


def _summary_rows(summary: dict, expected) -> tuple[float, dict, dict]:
    """(healthy quantile, headline columns, {dataset: {metric: mean} or None}) of a summary."""
    quantile = summary.get("eval", {}).get("healthy_quantile", HEALTHY_QUANTILE)
    headline = results_summary.headline(quantile)
    per_set = {}
    for dataset in expected:
        res = summary.get("sets", {}).get(dataset)
        if res is None:
            per_set[dataset] = None
            continue
        means = {}
        for key, _ in headline:
            mean = (res["metrics"].get(key) or {}).get("mean")
            means[key] = np.nan if mean is None else float(mean)
        per_set[dataset] = means
    return quantile, dict(headline), per_set


def render(collected: dict, problems: list[str] = ()) -> tuple[str, str]:
    """(Markdown, CSV) of the collected table."""
    columns = tuple(collected["columns"].items()) or results_summary.headline()
    md = [
        "| config | dataset | runs | " + " | ".join(h for _, h in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["config", "dataset", "runs"] + [f"{h} {s}" for _, h in columns for s in ("mean", "std")]
    )
    for name, datasets in sorted(collected["table"].items()):
        for dataset, values in sorted(datasets.items()):
            n = len(collected["runs"][name][dataset])
            cells, csv_cells = [], []
            for key, _ in columns:
                v = np.asarray(values[key], float)
                finite = v[np.isfinite(v)]
                if finite.size == 0:
                    cells.append("n/a")
                    csv_cells += ["", ""]
                    continue
                mean, std = 100 * finite.mean(), 100 * finite.std()
                note = "" if finite.size == n else f" ({finite.size}/{n})"
                cells.append(f"{mean:.2f} ± {std:.2f}{note}")
                csv_cells += [f"{mean:.4f}", f"{std:.4f}"]
            md.append(f"| {name} | {dataset} | {n} | " + " | ".join(cells) + " |")
            writer.writerow([name, dataset, n, *csv_cells])
    md.append("")
    md.append(
        "Mean ± std over runs (folds/seeds) of each run's mean over volumes, in %. "
        + " ".join(results_summary.legend(q) for q in collected["quantiles"] or [HEALTHY_QUANTILE])
    )
    notes = _protocol_notes(collected.get("protocols", {}))
    if notes:
        md += [
            "",
            "Volumes per protocol (p2l.protocols; val-tuned Dice is on the Behrendt one):",
            "",
        ]
        md += notes
    if problems:
        md += [
            "",
            "## Not counted",
            "",
            "Runs (or datasets of runs) left out of the means above:",
            "",
        ]
        md += [f"- {p}" for p in problems]
    return "\n".join(md), buf.getvalue()


def _protocol_notes(protocols: dict) -> list[str]:
    """One line per (config, dataset): the volumes each protocol's numbers are on."""
    lines = []
    for name, datasets in sorted(protocols.items()):
        for dataset, entries in sorted(datasets.items()):
            parts = []
            for protocol, n, excluded in sorted(entries, key=lambda e: (e[0], e[1] or 0)):
                text = f"{protocol}: {n} volumes"
                if excluded:
                    text += f" ({excluded} validation subjects of the test CSV excluded)"
                parts.append(text)
            lines.append(f"- {name} / {dataset}: " + "; ".join(parts))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs", help="folder searched for run folders")
    ap.add_argument("--out", default=None, help="where tables.md/csv go (default: --runs)")
    args = ap.parse_args(argv)
    root = Path(args.runs)
    if not root.is_dir():
        print(f"error: {root}: no such folder", file=sys.stderr)
        return 1
    collected, problems = collect(root)
    markdown, table_csv = render(collected, problems)
    out = Path(args.out or root)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "tables.md", markdown + "\n")
    write_text_atomic(out / "tables.csv", table_csv)
    print(markdown)
    print(f"wrote {out / 'tables.md'} and {out / 'tables.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
