"""SIGTERM and SIGINT stop a run so that it can be resumed, in every mode.

Inside the training loop (`deferred`) the first signal only sets a flag: the loop checkpoints at
the next step and raises Interrupted; a second signal raises at once. Elsewhere (data build,
evaluation, under `stop_signals`) a signal raises Interrupted at once: evaluation writes its
outputs atomically, so an interrupted one leaves no results. `p2l.main` exits with
EXIT_INTERRUPTED, which `p2l.tools.sweep` reports as "interrupted".
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

# sysexits.h EX_TEMPFAIL, "a temporary failure; the user is invited to retry": the latest
# checkpoint is complete and the same command resumes the run.
EXIT_INTERRUPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal ended the work. A BaseException like KeyboardInterrupt, so that no
    `except Exception` on the way (file readers wrap their errors) turns it into another error."""

    def __init__(self, signal_name: str, detail: str = ""):
        super().__init__(f"{signal_name}{': ' + detail if detail else ''}")
        self.signal_name = signal_name
        self.detail = detail


class StopState:
    """What the installed handler does with a signal; `requested` names the deferred one."""

    def __init__(self):
        self.deferring = False
        self.requested: str | None = None

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.deferring and self.requested is None:
            self.requested = name
            # os.write: a buffered print here could re-enter one the main thread was in.
            os.write(2, f"p2l: {name} received: checkpointing at the next step, then stopping "
                        "(send it again to stop at once)\n".encode())  # fmt: skip
            return
        raise Interrupted(name)


_active: list[StopState] = []


@contextlib.contextmanager
def _installed(state: StopState) -> Iterator[StopState]:
    try:
        previous = {s: signal.signal(s, state.handle) for s in SIGNALS}
    except ValueError:  # not the main thread: only the main thread receives signals
        previous = {}
    try:
        yield state
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def stop_signals() -> Iterator[StopState]:
    """For the block, SIGTERM/SIGINT raise Interrupted (deferred inside `deferred`)."""
    state = StopState()
    with _installed(state):
        _active.append(state)
        try:
            yield state
        finally:
            _active.remove(state)


@contextlib.contextmanager
def deferred() -> Iterator[StopState]:
    """For the block, the first SIGTERM/SIGINT sets `.requested` instead of raising; installs
    the handlers itself when no `stop_signals` block is active (in-process callers)."""
    state = _active[-1] if _active else StopState()
    with _installed(state):
        state.deferring, state.requested = True, None
        try:
            yield state
        finally:
            state.deferring = False
