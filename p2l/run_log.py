"""Training's record for people and tools: metrics.jsonl, TensorBoard scalars and the progress
line (conventions "metrics"). Only process 0 writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


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


def progress_line(step: int, total: int, scalars: dict, steps_per_s: float, patches_per_s: float,
                  unit: str = "patches"):  # fmt: skip
    """One progress line; `patches_per_s` counts `unit` (slices for the DAE, p2l.dae_step)."""
    eta = (total - step) / steps_per_s if steps_per_s > 0 else float("nan")
    parts = [
        f"step {step}/{total}",
        f"loss {scalars.get('loss', float('nan')):.4f}",
    ]
    if scalars.get("val_valid_patches", 1) == 0:
        parts.append("val n/a (no valid patch in the drawn validation slices)")
    elif "val_loss" in scalars:
        parts.append(f"val {scalars['val_loss']:.4f}")
    if "valid_patches" in scalars:
        parts.append(f"valid patches {scalars['valid_patches']:,.0f}")
    parts += [
        f"{steps_per_s:.2f} steps/s",
        f"{patches_per_s:,.0f} {unit}/s",
        f"eta {format_duration(eta) if eta == eta else '?'}",
    ]
    if scalars.get("overflow", 0) > 0:
        parts.append(
            f"OVERFLOW: {scalars['overflow']:,.0f} accepted patches dropped since the last line "
            "(raise sampling.capacity_fraction)"
        )
    return " | ".join(parts)
