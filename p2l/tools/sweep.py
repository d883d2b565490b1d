"""Sweeps: folds x seeds x settings, run locally or as a SLURM array (no home-made job system).

A config file may define `sweep()` returning dicts of dotted overrides, one per run, e.g.
`[{"fold": f, "seed": s} for f in range(5) for s in (3141, 1)]`. Each override is checked
against the locked config before anything runs. A run's workdir is
`<runs>/<config name>/<k=v,...>` over the keys that vary across the sweep.

    python -m p2l.tools.sweep --config=experiments/brats.py --list
    python -m p2l.tools.sweep --config=experiments/demo.py                 # run them here
    python -m p2l.tools.sweep --config=experiments/brats.py --launch=slurm [--submit]

Locally, runs go one per GPU (CUDA_VISIBLE_DEVICES) or one after another on CPU; a run whose
workdir holds results/summary.json is skipped, an unfinished one resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from p2l import config_file
from p2l.atomic_write import write_text_atomic
from p2l.errors import ConfigError, P2LError

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Run:
    overrides: dict
    workdir: Path

    def flags(self) -> list[str]:
        return [f"--config.{k}={_flag_value(v)}" for k, v in sorted(self.overrides.items())]

    @property
    def finished(self) -> bool:
        return (self.workdir / "results" / "summary.json").exists()


def _flag_value(value) -> str:
    if isinstance(value, tuple | list):
        return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def expand(spec: str, runs_root: str | Path = "runs") -> list[Run]:
    """The runs of a config's sweep, each override validated against the locked config."""
    module, variant = config_file.load_config_module(spec)
    if not hasattr(module, "sweep"):
        raise ConfigError("sweep", f"{spec} defines no sweep()")
    entries = [dict(e) for e in module.sweep()]
    if not entries:
        raise ConfigError("sweep", f"{spec}: sweep() returned no runs")
    base = module.get_config(variant) if variant else module.get_config()
    for entry in entries:
        config = base.copy_and_resolve_references()
        config.lock()
        for key, value in entry.items():
            config_file.set_dotted(config, key, value)
    varying = sorted(k for k in entries[0] if len({repr(e.get(k)) for e in entries}) > 1)
    name = base.name + (f"_{variant}" if variant else "")
    runs = []
    for entry in entries:
        label = ",".join(f"{k}={_flag_value(entry[k])}" for k in varying) or "default"
        runs.append(Run(overrides=entry, workdir=Path(runs_root) / name / label))
    if len({r.workdir for r in runs}) != len(runs):
        raise ConfigError("sweep", f"{spec}: two runs of the sweep have the same overrides")
    return runs


def command(spec: str, run: Run, extra: list[str] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "p2l.main",
        f"--config={spec}",
        f"--workdir={run.workdir}",
        "--mode=train_eval",
        *run.flags(),
        *extra,
    ]


def local_gpus() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def run_locally(spec: str, runs: list[Run], parallel: int, extra: list[str]) -> int:
    """Runs unfinished runs, `parallel` at a time (one GPU each); returns the failure count."""
    todo = [r for r in runs if not r.finished]
    for r in runs:
        if r.finished:
            print(f"skip (finished): {r.workdir}")
    slots: dict[int, tuple[subprocess.Popen, Run] | None] = dict.fromkeys(range(parallel))
    failures = 0
    while todo or any(slots.values()):
        for slot, job in slots.items():
            if job is not None and job[0].poll() is not None:
                proc, run = job
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                failures += proc.returncode != 0
                print(f"{status}: {run.workdir} (log: {run.workdir / 'sweep.log'})", flush=True)
                slots[slot] = None
            if slots[slot] is None and todo:
                run = todo.pop(0)
                run.workdir.mkdir(parents=True, exist_ok=True)
                env = dict(os.environ)
                if parallel > 1:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot)
                log = open(run.workdir / "sweep.log", "a")  # noqa: SIM115 (closed with the job)
                print(f"start: {run.workdir}", flush=True)
                proc = subprocess.Popen(
                    command(spec, run, extra), stdout=log, stderr=subprocess.STDOUT, env=env
                )
                slots[slot] = (proc, run)
        time.sleep(0.5)
    return failures


def slurm_script(spec: str, runs: list[Run], *, gpus_per_task: int, partition: str | None,
                 time_limit: str, extra: list[str]) -> str:  # fmt: skip
    """An sbatch array script: one array task per run (the index picks the run)."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=p2l-{runs[0].workdir.parent.name}",
        f"#SBATCH --array=0-{len(runs) - 1}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --gres=gpu:{gpus_per_task}" if gpus_per_task else "#SBATCH --cpus-per-task=4",
        f"#SBATCH --time={time_limit}",
        f"#SBATCH --output={runs[0].workdir.parent}/slurm-%A_%a.out",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(str(REPO))}",
        "RUNS=(",
    ]
    for run in runs:
        argv = command(spec, run, extra)[1:]  # the interpreter comes from the venv below
        lines.append("  " + shlex.quote(" ".join(shlex.quote(a) for a in argv)))
    lines += [
        ")",
        "# Finished runs (results/summary.json present) exit at once; unfinished ones resume.",
        "eval srun .venv/bin/python ${RUNS[$SLURM_ARRAY_TASK_ID]}",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="experiments/<name>.py[:variant]")
    ap.add_argument("--runs", default="runs", help="root of the run folders")
    ap.add_argument("--list", action="store_true", help="only list the runs")
    ap.add_argument("--launch", choices=("local", "slurm"), default="local")
    ap.add_argument("--submit", action="store_true", help="with --launch=slurm: call sbatch")
    ap.add_argument("--parallel", type=int, default=None, help="local runs at once (default: GPUs)")
    ap.add_argument("--gpus-per-task", type=int, default=1)
    ap.add_argument("--partition", default=None)
    ap.add_argument("--time", default="24:00:00", help="SLURM time limit per run")
    ap.add_argument("extra", nargs="*", help="extra flags passed to every run")
    args = ap.parse_args(argv)
    try:
        runs = expand(args.config, args.runs)
    except P2LError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for i, run in enumerate(runs):
        state = "finished" if run.finished else "to run"
        print(f"[{i}] {run.workdir}  {' '.join(run.flags())}  ({state})")
    if args.list:
        return 0
    if args.launch == "slurm":
        script = slurm_script(
            args.config,
            runs,
            gpus_per_task=args.gpus_per_task,
            partition=args.partition,
            time_limit=args.time,
            extra=args.extra,
        )
        path = runs[0].workdir.parent / "sweep.sbatch"
        write_text_atomic(path, script)
        print(f"wrote {path} ({len(runs)} array tasks)")
        if args.submit:
            return subprocess.run(["sbatch", str(path)]).returncode
        print(f"submit with: sbatch {path}")
        return 0
    parallel = args.parallel or max(local_gpus(), 1)
    failures = run_locally(args.config, runs, parallel, args.extra)
    print(f"sweep finished: {len(runs) - failures} ok, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
