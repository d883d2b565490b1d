"""Fusing Patch2Loc's coarse score with a pixel-wise detector's residual (`eval.fusion`).

Patch2Loc's summary says its heatmaps are fused with a pixel-wise reconstruction method to reach
finer segmentations, but neither the paper nor the reference code gives the operator (spec §5,
item 7). p2l defines three rules; each is a pure function of the two post-processed maps (both
median-filtered and 0 outside the brain, p2l.postprocess) and the brain mask, and each fused map
is 0 outside the brain like every other score (spec §5.5), so the thresholds, histograms and
metrics treat it as any score:

- `product`: residual x Patch2Loc score min-max normalised over the volume's brain, the rule the
  MHD line of work uses to let a coarse map weight a fine one. In [0, max residual].
- `zsum`: w * z(Patch2Loc) + (1 - w) * z(residual), each map standardised by its in-brain mean and
  standard deviation over the healthy IXI volumes of the healthy threshold (`HealthyMoments`,
  computed once per evaluation and stored in summary.json); w = `eval.fusion_weight` (0.5).
- `gate`: the residual where the Patch2Loc score is above its own healthy-quantile threshold,
  0 elsewhere: coarse localisation by Patch2Loc, fine delineation by the residual.

The functions also take flat arrays of in-brain values with `brain=None` (every value in the
brain), which is how the healthy pass re-fuses its cached in-brain values (p2l.fused_scoring).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from p2l.errors import ConfigError

RULES = ("product", "zsum", "gate")


def detector_name(rule: str) -> str:
    """The name a fusion rule's map has in tables, CSVs and summary.json: `fused[product]`."""
    return f"fused[{rule}]"


def check_rules(rules) -> tuple[str, ...]:
    rules = tuple(rules)
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ConfigError("eval.fusion", f"unknown fusion rule(s) {unknown}; known: {list(RULES)}")
    if len(set(rules)) != len(rules):
        raise ConfigError("eval.fusion", f"a rule is listed twice: {list(rules)}")
    return rules


@dataclass(frozen=True)
class FusionParams:
    """What the rules need beyond the two maps, fixed on healthy volumes before any test volume."""

    p2l_mean: float
    p2l_std: float
    pixel_mean: float
    pixel_std: float
    p2l_threshold: float  # Patch2Loc's healthy-quantile threshold (the gate)
    weight: float = 0.5  # of Patch2Loc in zsum

    def to_dict(self) -> dict:
        return asdict(self)


class HealthyMoments:
    """Running in-brain mean and standard deviation of one map over healthy volumes (exact:
    float64 sums of values and squares per volume, Chan's merge across volumes)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64).ravel()
        n = values.size
        if n == 0:
            return
        mean = float(values.mean())
        self.merge(n, mean, float(np.square(values - mean).sum()))

    def merge(self, count: int, mean: float, m2: float) -> None:
        """Adds the moments (count, mean, sum of squared deviations) of other values."""
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else float("nan")


def _brain(p2l: np.ndarray, brain: np.ndarray | None) -> np.ndarray:
    return np.ones(p2l.shape, bool) if brain is None else np.asarray(brain) > 0


def _check(p2l: np.ndarray, pixel: np.ndarray, brain) -> tuple[np.ndarray, np.ndarray]:
    p2l, pixel = np.asarray(p2l, np.float32), np.asarray(pixel, np.float32)
    if p2l.shape != pixel.shape or (brain is not None and np.shape(brain) != p2l.shape):
        raise ValueError(f"fusion: maps of shapes {p2l.shape}, {pixel.shape} and brain "
                         f"{None if brain is None else np.shape(brain)} differ")  # fmt: skip
    return p2l, pixel


def product(p2l, pixel, brain=None) -> np.ndarray:
    """pixel x (p2l - min) / (max - min), min and max over the brain; a constant Patch2Loc map
    (max == min) gives weight 1 everywhere, i.e. the residual alone."""
    p2l, pixel = _check(p2l, pixel, brain)
    inside = _brain(p2l, brain)
    out = np.zeros_like(pixel)
    if not inside.any():
        return out
    lo, hi = float(p2l[inside].min()), float(p2l[inside].max())
    weight = (p2l[inside] - lo) / (hi - lo) if hi > lo else np.ones(int(inside.sum()), np.float32)
    out[inside] = pixel[inside] * weight
    return out


def zsum(p2l, pixel, brain, params: FusionParams) -> np.ndarray:
    p2l, pixel = _check(p2l, pixel, brain)
    for key in ("p2l_std", "pixel_std"):
        if not getattr(params, key) > 0:
            raise ValueError(f"fusion zsum: healthy {key} is {getattr(params, key)}; it needs a "
                             "positive spread on the healthy volumes")  # fmt: skip
    inside = _brain(p2l, brain)
    w = params.weight
    z = (w * (p2l[inside] - params.p2l_mean) / params.p2l_std
         + (1 - w) * (pixel[inside] - params.pixel_mean) / params.pixel_std)  # fmt: skip
    out = np.zeros_like(pixel)
    out[inside] = z
    return out


def gate(p2l, pixel, brain, params: FusionParams) -> np.ndarray:
    """pixel where p2l > the Patch2Loc healthy threshold (thresholds.predict's rule), else 0."""
    p2l, pixel = _check(p2l, pixel, brain)
    inside = _brain(p2l, brain) & (p2l > np.float32(params.p2l_threshold))
    return np.where(inside, pixel, np.float32(0))


def fuse(rule: str, p2l, pixel, brain, params: FusionParams) -> np.ndarray:
    if rule == "product":
        return product(p2l, pixel, brain)
    if rule == "zsum":
        return zsum(p2l, pixel, brain, params)
    if rule == "gate":
        return gate(p2l, pixel, brain, params)
    raise ConfigError("eval.fusion", f"unknown fusion rule {rule!r}; known: {list(RULES)}")
