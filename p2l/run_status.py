"""Where a run stands, for `p2l.main`, `p2l.tools.sweep` and `p2l.tools.tables`.

A run is finished only when its last step (the config's num_steps) is checkpointed and evaluated:
results/summary.json made from that checkpoint, which is the latest. Anything else is unfinished;
`status.json`, written by `p2l.main` when it starts and stops, says why (interrupted, failed,
or killed without a word when it still says "running").
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from p2l import checkpoint, workdir_lock
from p2l.errors import DataError, P2LError

FILENAME = "status.json"
SUMMARY = Path("results") / "summary.json"


def read_json(path: str | Path) -> dict:
    """A JSON object from `path`; DataError naming the file when it is unreadable or not JSON."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except OSError as err:
        raise DataError(path, f"cannot read: {err.strerror or err}") from None
    except ValueError as err:  # JSONDecodeError, bad UTF-8
        raise DataError(path, f"corrupt, not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise DataError(path, "corrupt: not a JSON object")
    return value


def write(workdir: str | Path, state: str, **details) -> None:
    """Best effort: the status is a note for people and listings, never a reason to fail."""
    from p2l.atomic_write import write_json_atomic

    if not Path(workdir).is_dir():
        return
    record = {"state": state, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **details}
    with contextlib.suppress(P2LError, OSError):
        write_json_atomic(Path(workdir) / FILENAME, record)


@dataclass(frozen=True)
class RunState:
    finished: bool
    label: str  # "finished", or why the run does not count yet
    summary: dict | None = None  # results/summary.json when finished
    interrupted: bool = False


def run_state(workdir: str | Path, num_steps: int) -> RunState:
    """Whether the run in `workdir` is finished for `num_steps`, and if not, why.

    When the checkpoints are absent (results copied elsewhere) the summary's step is trusted.
    """
    workdir = Path(workdir)
    steps = checkpoint.complete_steps(workdir)
    latest = steps[-1] if steps else None
    summary, summary_problem = None, None
    if (workdir / SUMMARY).exists():
        try:
            summary = read_json(workdir / SUMMARY)
        except DataError as err:
            summary_problem = str(err)
    evaluated = summary.get("checkpoint_step") if summary else None
    if (
        isinstance(evaluated, int)
        and evaluated >= num_steps
        and (latest is None or evaluated == latest)
    ):
        return RunState(True, "finished", summary)
    running = workdir_lock.holder(workdir)
    if running:
        return RunState(False, f"running: {running}")
    if summary_problem:
        return RunState(False, f"failed: {summary_problem}")
    try:
        status = read_json(workdir / FILENAME) if (workdir / FILENAME).exists() else {}
    except DataError:
        status = {}
    at = f"checkpoint {latest} of {num_steps}" if latest is not None else "no checkpoint"
    state = status.get("state")
    if state == "interrupted":
        return RunState(False, f"interrupted ({status.get('signal', '?')}) at {at}; "
                        "resumable", interrupted=True)  # fmt: skip
    if state == "failed":
        return RunState(False, f"failed at {at}: {status.get('message', '?')}")
    if state == "running":
        return RunState(False, f"stopped without a word (killed?) at {at}; resumable")
    if latest is None:
        return RunState(False, "not started (no checkpoint, no results/summary.json)")
    if evaluated is not None:
        return RunState(False, f"unfinished: evaluated at step {evaluated}, {at}")
    return RunState(False, f"unfinished: {at}, not evaluated (no results/summary.json)")
