"""A run's identity: the config keys that define what its checkpoints are (the model, the data,
the training protocol), kept with the checkpoints in `<workdir>/checkpoints/identity.json`.

Training refuses to resume a checkpoint under another identity unless the changed keys are
accepted by name (`--accept_config_change`), which the file's history records; evaluation and
detection compare their config with the identity of the checkpoint they restore.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from p2l import checkpoint
from p2l.errors import ConfigError, DataError

FILENAME = "identity.json"

# Keys that do not change what is learned: how long to train (a run may be extended), how often
# to log, validate and save, where caches go, and the evaluation protocol (one model is evaluated
# on several test sets; eval.* only shapes the heatmaps). Every other key is part of the identity,
# keys added later included, so a key nobody classified errs towards a refusal that names it
# rather than a silently mixed model. model.conv_impl picks between exact forms of the same
# convolutions (same variables, same results to float rounding), and matmul_precision how finely
# the same products are rounded: a run may resume on another backend, a model be evaluated at
# another precision. data.build_workers and data.device_slices only say how the same slices are
# made and fed (the same batches, tested). (A key the stored identity lacks is never compared,
# `differences`.)
NOT_IDENTITY = (
    "name",
    "test_sets",
    "tfds_dir",
    "num_steps",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "prefetch",
    "eval",
    "model.conv_impl",
    "matmul_precision",
    "data.build_workers",
    "data.device_slices",
)
# Compared as absolute paths. Evaluation does not compare them: the same data may be read from
# another mount, and the keys that choose the data (modality, fold, data.*) are compared.
PATH_KEYS = ("data_root", "splits_dir")
_ABSENT = "(absent)"


class IdentityMismatch(ConfigError):
    """The config differs from the identity of the checkpoint in the keys `changes` names."""

    def __init__(self, message: str, changes: dict[str, tuple[Any, Any]]):
        Exception.__init__(self, message)
        self.changes = changes
        self.key = next(iter(changes))
        self.problem = message


def _excluded(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NOT_IDENTITY)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def identity(config) -> dict[str, Any]:
    """{dotted key: JSON value} of the identity keys of a ConfigDict or a config dict."""
    tree = config.to_dict() if hasattr(config, "to_dict") else config
    flat = {k: v for k, v in _flatten(tree).items() if not _excluded(k)}
    for key in PATH_KEYS:
        if flat.get(key):
            flat[key] = os.path.abspath(os.path.expanduser(str(flat[key])))
    return json.loads(json.dumps(flat, sort_keys=True, default=str))  # tuples -> lists, as stored


def digest(ident: dict[str, Any]) -> str:
    text = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(stored: dict, current: dict, skip=()) -> dict[str, tuple[Any, Any]]:
    """{key: (stored, current)} where they differ. Keys the stored identity lacks (added to the
    config after the run started) are not compared: their defaults reproduce the old behaviour."""
    return {
        key: (old, current.get(key, _ABSENT))
        for key, old in stored.items()
        if key not in skip and current.get(key, _ABSENT) != old
    }


def format_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {json.dumps(a)} → {json.dumps(b)}" for k, (a, b) in changes.items())


def path(workdir: str | Path) -> Path:
    return Path(workdir) / checkpoint.DIRNAME / FILENAME


def read_history(workdir: str | Path) -> list[dict] | None:
    """The stored identity entries, oldest first; None when the run has no identity file."""
    file = path(workdir)
    if not file.exists():
        return None
    try:
        history = json.loads(file.read_text())["history"]
        if not history or not all("identity" in e and "from_step" in e for e in history):
            raise ValueError("no identity entries")
        return history
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            file,
            f"unreadable ({err}); it records the config the checkpoints were trained with. "
            "Restore it, or move the checkpoints to a new workdir",
        ) from None


def entry_for_step(history: list[dict], step: int) -> dict:
    """The entry checkpoint `step` was trained under: an entry applies to the checkpoints after
    its `from_step` (the checkpoint training continued from)."""
    applicable = [e for e in history if e["from_step"] < step]
    return applicable[-1] if applicable else history[0]


def stored_identity(workdir: str | Path, step: int | None = None) -> dict | None:
    """The identity of checkpoint `step` (default: the latest), or None when none is stored."""
    history = read_history(workdir)
    if history is None:
        return None
    if step is None:
        steps = checkpoint.complete_steps(workdir)
        step = steps[-1] if steps else 0
    return entry_for_step(history, step)["identity"]


def _entry(ident: dict, from_step: int, **extra) -> dict:
    return {
        "from_step": from_step,
        "hash": digest(ident),
        "identity": ident,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "argv": sys.argv,
        **extra,
    }


def check_resume(config, workdir: str | Path, step: int | None, accept=()) -> list[dict] | None:
    """Checks `config` against the identity of checkpoint `step` (None: nothing to resume).

    Returns the history to store before training goes on (None: the stored one stands). Raises
    IdentityMismatch naming the changed keys unless `accept` names every one of them.
    """
    current = identity(config)
    if step is None:
        return [_entry(current, 0)]
    history = read_history(workdir)
    if history is None:
        # Checkpoints from before identity files (run_info.json then held the config, rewritten
        # at every start) or converted ones (no config at all): compare with what there is.
        from p2l.run_info import read_trained_config

        trained = read_trained_config(workdir)
        if trained is None:
            print(f"p2l: no identity recorded with checkpoint {step} (a converted or older run); "
                  f"recording this config's in {path(workdir)}", flush=True)  # fmt: skip
            return [_entry(current, 0, source="adopted: no identity or run_info.json")]
        stored, source = identity(trained), {"source": "run_info.json"}
        history = [_entry(stored, 0, **source)]
    stored = entry_for_step(history, step)["identity"]
    changes = differences(stored, current)
    kept = [e for e in history if e["from_step"] < step] or history[:1]
    if not changes:
        return None if kept == history and path(workdir).exists() else kept
    refused = [k for k in changes if k not in set(accept)]
    if refused:
        raise IdentityMismatch(
            f"{workdir}: checkpoint {step} was trained with another config: "
            f"{format_changes(changes)}. Resuming it would mix two models. Use a new --workdir "
            f"for this config, or pass --accept_config_change={','.join(changes)} to continue "
            f"this run with the new values (recorded in {path(workdir)})",
            changes,
        )
    print(f"p2l: continuing from step {step} with accepted config changes: "
          f"{format_changes(changes)} (recorded in {path(workdir)})", flush=True)  # fmt: skip
    accepted = {k: [a, b] for k, (a, b) in changes.items()}
    return kept + [_entry(current, step, accepted_change=accepted)]


def write_history(workdir: str | Path, history: list[dict]) -> None:
    from p2l.atomic_write import write_json_atomic

    write_json_atomic(path(workdir), {"format": 1, "history": history})


def check_checkpoint(config, workdir: str | Path, step: int | None) -> bool:
    """For evaluation and detection: IdentityMismatch when `config` is not the identity of
    checkpoint `step` (None: the latest). False when the run stores no identity (the caller
    falls back)."""
    stored = stored_identity(workdir, step)
    if stored is None:
        return False
    changes = differences(stored, identity(config), skip=PATH_KEYS)
    if changes:
        raise IdentityMismatch(
            f"the checkpoint of step {step} in {workdir} was trained with another config than "
            f"this one: {format_changes(changes)} (trained → this config). Use the config it was "
            f"trained with (its values are in {path(workdir)}), or train this one in a new workdir",
            changes,
        )
    return True


def overlay(tree: dict, ident: dict) -> dict:
    """A copy of the nested config dict `tree` with the identity's values set into it."""
    out = json.loads(json.dumps(tree, default=str))
    for key, value in ident.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
