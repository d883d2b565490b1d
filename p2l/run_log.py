"""What a run leaves for people and tools: TensorBoard scalars, metrics.jsonl, a progress line,
and run_info.json (versions, git SHA, devices, config) — conventions "metrics" and "pins".

Only process 0 writes.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax


def write_json_atomic(path: Path, payload) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_info(config) -> dict:
    import flax
    import optax
    import orbax.checkpoint
    import tensorflow_datasets

    return {
        "argv": sys.argv,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "versions": {
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "orbax-checkpoint": orbax.checkpoint.__version__,
            "tensorflow-datasets": tensorflow_datasets.__version__,
        },
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "process_count": jax.process_count(),
        "config": config.to_dict(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


class MetricLog:
    """Appends {"step": s, ...} lines to <workdir>/metrics.jsonl and TensorBoard scalars."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            from clu import metric_writers

            self._tb = metric_writers.SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._tb.write_scalars(int(step), scalars)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: Path) -> list[dict]:
    """Records of metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# Counts of events, summed over the logging window; every other scalar is averaged. A mean would
# print a window with one overflowing step as "OVERFLOW 0".
SUMMED_SCALARS = ("overflow",)


def window_scalars(window: list[dict]) -> dict:
    """One record for the steps since the last log line: counts summed, the rest averaged."""
    return {
        k: float(sum(m[k] for m in window))
        if k in SUMMED_SCALARS
        else float(sum(float(m[k]) for m in window) / len(window))
        for k in window[0]
    }


def progress_line(step: int, total: int, scalars: dict, steps_per_s: float, patches_per_s: float):
    eta = (total - step) / steps_per_s if steps_per_s > 0 else float("nan")
    parts = [
        f"step {step}/{total}",
        f"loss {scalars.get('loss', float('nan')):.4f}",
    ]
    if "val_loss" in scalars:
        parts.append(f"val {scalars['val_loss']:.4f}")
    parts += [
        f"valid patches {scalars.get('valid_patches', 0):,.0f}",
        f"{steps_per_s:.2f} steps/s",
        f"{patches_per_s:,.0f} patches/s",
        f"eta {format_duration(eta) if eta == eta else '?'}",
    ]
    if scalars.get("overflow", 0) > 0:
        parts.append(
            f"OVERFLOW: {scalars['overflow']:,.0f} accepted patches dropped since the last line "
            "(raise sampling.capacity_fraction)"
        )
    return " | ".join(parts)
