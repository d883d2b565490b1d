"""Collect evaluation summaries into the paper's table layout: python -m p2l.tables --runs runs/.

Every run folder (one holding run_info.json) below --runs is one training run (a fold, a seed, a
setting). Runs are grouped by config name; for each dataset the table gives the mean ± std over
runs of each run's mean over volumes (Dice per threshold policy, AUPRC, AUROC, in %). Runs
without a results/summary.json, or whose summary lacks the dataset, are listed as missing and
never silently averaged over.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

COLUMNS = (
    ("dice[oracle]", "Dice oracle"),
    ("dice[validation]", "Dice val-tuned"),
    ("dice[healthy_q98]", "Dice healthy-q98"),
    ("auprc", "AUPRC"),
    ("auroc", "AUROC"),
)


def find_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).rglob("run_info.json"))


def collect(root: Path) -> tuple[dict, list[str]]:
    """{config name: {dataset: {metric: [per-run means]}}}, and problems found."""
    table: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    runs: dict = defaultdict(lambda: defaultdict(list))
    problems = []
    for run in find_runs(root):
        info = json.loads((run / "run_info.json").read_text())
        name = info.get("config", {}).get("name", "?")
        # Sweep folders are named k=v,...: runs differing only in fold/seed are pooled.
        settings = [p for p in run.name.split(",") if "=" in p]
        settings = [p for p in settings if not p.startswith(("fold=", "seed="))]
        if settings:
            name = f"{name} [{','.join(settings)}]"
        expected = info.get("config", {}).get("test_sets", [])
        summary_path = run / "results" / "summary.json"
        if not summary_path.exists():
            problems.append(f"{run}: no results/summary.json (not evaluated, or failed)")
            continue
        summary = json.loads(summary_path.read_text())
        for dataset in expected:
            res = summary.get("sets", {}).get(dataset)
            if res is None:
                problems.append(f"{run}: summary has no {dataset} results")
                continue
            runs[name][dataset].append(str(run))
            for key, _ in COLUMNS:
                mean = (res["metrics"].get(key) or {}).get("mean")
                table[name][dataset][key].append(np.nan if mean is None else float(mean))
    return {"table": table, "runs": runs}, problems


def render(collected: dict) -> tuple[str, str]:
    """(Markdown, CSV) of the collected table."""
    md = [
        "| config | dataset | runs | " + " | ".join(h for _, h in COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["config", "dataset", "runs"] + [f"{h} {s}" for _, h in COLUMNS for s in ("mean", "std")]
    )
    for name, datasets in sorted(collected["table"].items()):
        for dataset, values in sorted(datasets.items()):
            n = len(collected["runs"][name][dataset])
            cells, csv_cells = [], []
            for key, _ in COLUMNS:
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
        "Dice oracle: per-volume best threshold (the reference's 'Supervised Dice', an upper "
        "bound); val-tuned: one threshold per dataset from its lesion validation split; "
        "healthy-q98: 98th percentile of healthy IXI scores."
    )
    return "\n".join(md), buf.getvalue()


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    markdown, table_csv = render(collected)
    out = Path(args.out or root)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "tables.md", markdown + "\n")
    _write(out / "tables.csv", table_csv)
    print(markdown)
    for p in problems:
        print(f"MISSING: {p}")
    print(f"wrote {out / 'tables.md'} and {out / 'tables.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
