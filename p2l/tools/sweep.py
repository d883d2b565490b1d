"""Sweeps: folds x seeds x settings, run locally or as a SLURM array (no home-made job system).

A config file may define `sweep()` returning dicts of dotted overrides, one per run, e.g.
`[{"fold": f, "seed": s} for f in range(5) for s in (3141, 1)]`. Each override is checked
against the locked config before anything runs. A run's workdir is
`<runs>/<config name>/<k=v,...>` over the keys that vary across the sweep.

    python -m p2l.tools.sweep --config=experiments/brats.py --list
    python -m p2l.tools.sweep --config=experiments/demo.py                 # run them here
    python -m p2l.tools.sweep --config=experiments/brats.py --launch=slurm [--submit]

Locally, runs go one per GPU (CUDA_VISIBLE_DEVICES) or one after another on CPU. A finished run
(its last step checkpointed and evaluated: p2l.run_status) is skipped, an unfinished one resumes
from its checkpoint. A run that exits with p2l.interrupt.EXIT_INTERRUPTED (75: SIGTERM/SIGINT,
checkpointed) is reported as interrupted; SIGTERM/SIGINT to the sweep stops its runs that way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from p2l import config_file, run_status
from p2l.atomic_write import write_text_atomic
from p2l.errors import ConfigError, P2LError
from p2l.interrupt import EXIT_INTERRUPTED

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Run:
    overrides: dict
    workdir: Path
    num_steps: int  # of the run's config: finished means this step checkpointed and evaluated

    def flags(self) -> list[str]:
        return [f"--config.{k}={_flag_value(v)}" for k, v in sorted(self.overrides.items())]

    def state(self) -> run_status.RunState:
        return run_status.run_state(self.workdir, self.num_steps)

    @property
    def finished(self) -> bool:
        return self.state().finished


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
    num_steps = []
    for entry in entries:
        config = base.copy_and_resolve_references()
        config.lock()
        for key, value in entry.items():
            config_file.set_dotted(config, key, value)
        num_steps.append(config.num_steps)
    varying = sorted(k for k in entries[0] if len({repr(e.get(k)) for e in entries}) > 1)
    name = base.name + (f"_{variant}" if variant else "")
    runs = []
    for entry, steps in zip(entries, num_steps):
        label = ",".join(f"{k}={_flag_value(entry[k])}" for k in varying) or "default"
        runs.append(Run(overrides=entry, workdir=Path(runs_root) / name / label, num_steps=steps))
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


class _StopForwarder:
    """SIGTERM/SIGINT to the sweep: start nothing more and pass SIGTERM to the running runs (each
    in its own session, so a Ctrl-C in the terminal reaches them once, through here)."""

    def __init__(self):
        self.requested = False
        self.procs: list[subprocess.Popen] = []

    def handle(self, signum, frame):
        self.requested = True
        # os.write: a buffered print here could re-enter one the main loop was in.
        os.write(1, f"sweep: {signal.Signals(signum).name}: stopping the running runs (they "
                    "checkpoint)\n".encode())  # fmt: skip
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def __enter__(self):
        try:
            self._previous = {s: signal.signal(s, self.handle) for s in SIGNALS}
        except ValueError:  # not the main thread
            self._previous = {}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _outcome(returncode: int) -> str:
    if returncode == 0:
        return "done"
    if returncode == EXIT_INTERRUPTED:
        return "interrupted"
    return f"FAILED (exit {returncode})"


def run_locally(spec: str, runs: list[Run], parallel: int, extra: list[str]) -> dict[str, int]:
    """Runs unfinished runs, `parallel` at a time (one GPU each); {outcome: count} of those run,
    outcomes "done", "failed", "interrupted", "not started" (the sweep was stopped first)."""
    todo = []
    for r in runs:
        if r.finished:
            print(f"skip (finished): {r.workdir}")
        else:
            todo.append(r)
    slots: dict[int, tuple[subprocess.Popen, Run] | None] = dict.fromkeys(range(parallel))
    counts = dict.fromkeys(("done", "failed", "interrupted", "not started"), 0)
    with _StopForwarder() as stop:
        while (todo and not stop.requested) or any(slots.values()):
            for slot, job in slots.items():
                if job is not None and job[0].poll() is not None:
                    proc, run = job
                    outcome = _outcome(proc.returncode)
                    counts[outcome if outcome in counts else "failed"] += 1
                    note = " (resumable: run the sweep again)" if outcome == "interrupted" else ""
                    print(f"{outcome}: {run.workdir}{note} (log: {run.workdir / 'sweep.log'})",
                          flush=True)  # fmt: skip
                    slots[slot] = None
                if slots[slot] is None and todo and not stop.requested:
                    run = todo.pop(0)
                    run.workdir.mkdir(parents=True, exist_ok=True)
                    env = dict(os.environ)
                    if parallel > 1:
                        env["CUDA_VISIBLE_DEVICES"] = str(slot)
                    log = open(run.workdir / "sweep.log", "a")  # noqa: SIM115 (closed with the job)
                    print(f"start: {run.workdir}", flush=True)
                    proc = subprocess.Popen(
                        command(spec, run, extra),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )
                    stop.procs.append(proc)
                    slots[slot] = (proc, run)
            time.sleep(0.5)
    counts["not started"] = len(todo)
    for run in todo:
        print(f"not started: {run.workdir}")
    return counts


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
        "# Finished runs (last step checkpointed and evaluated) exit at once; unfinished ones",
        "# resume. Exit code 75: interrupted (SIGTERM, e.g. the time limit), checkpointed.",
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
        steps = check_extra_flags(args.config, args.extra)
    except P2LError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if steps is not None:
        runs = [dataclasses.replace(r, num_steps=steps) for r in runs]
    for i, run in enumerate(runs):
        print(f"[{i}] {run.workdir}  {' '.join(run.flags())}  ({run.state().label})")
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
    counts = run_locally(args.config, runs, parallel, args.extra)
    print("sweep: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    if counts["failed"]:
        return 1
    return EXIT_INTERRUPTED if counts["interrupted"] or counts["not started"] else 0


def check_extra_flags(spec: str, extra: list[str]) -> int | None:
    """Parses the flags after `--` as p2l.main will, before anything runs or is written.

    A misspelt key, a value of the wrong type or a flag p2l.main does not take stops the sweep
    with one line, for every launcher. Returns num_steps when an extra flag sets it (the runs are
    finished at that step then), else None.
    """
    from absl import flags
    from ml_collections import config_flags

    argv = ["p2l.main", f"--config={spec}", *extra]
    parser = flags.FlagValues()
    # sys_argv: ml_collections registers the override flags it finds in this command line.
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=parser, lock_config=True, sys_argv=argv
    )
    flags.DEFINE_list("accept_config_change", [], "", flag_values=parser)
    try:
        rest = parser(argv)
    except flags.Error as err:
        if "flag 'config." in str(err):  # absl's word for a key the config does not have
            raise ConfigError("sweep", f"flags after --: unknown config key: {err}") from None
        raise ConfigError("sweep", f"flags after --: {err} (the sweep sets --config, "
                          "--workdir and --mode itself)") from None  # fmt: skip
    except (KeyError, AttributeError) as err:  # ml_collections: a key the config lacks
        detail = config_file.unknown_key_detail(err)
        raise ConfigError("sweep", f"flags after --: unknown config key: {detail}") from None
    if len(rest) > 1:
        raise ConfigError("sweep", f"flags after --: not flags of p2l.main: {rest[1:]}")
    if any(flag.startswith("--config.num_steps") for flag in extra):
        return int(parser.config.num_steps)
    return None


if __name__ == "__main__":
    sys.exit(main())
