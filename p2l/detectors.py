"""The detectors a run scores: its own (Patch2Loc or the DAE, `config.method`) and, for a
Patch2Loc run with `eval.pixel_workdir`, a trained DAE run beside it and the fusion rules of
`eval.fusion` (p2l.fusion, p2l.fused_scoring).

Evaluation and detection open their scorer here, so both score the same detectors the same way.
The pixel-wise run is read from its own folder (its trained config and latest checkpoint) and
scored with the evaluating run's `eval` settings (median filter, mask erosion), so both maps go
through the same post-processing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2l import config_check, fused_scoring, run_info, train_state
from p2l.config_check import method
from p2l.errors import ConfigError

# What must agree between a Patch2Loc run and the DAE run fused with it: the same scans, on the
# same grid, so that both maps are of the same voxels.
SAME_INPUT_KEYS = ("modality", "data.image_shape", "data.expected_spacing")


@dataclass
class OpenedRun:
    scorer: Any  # Scorer, DAEScorer or FusedScorer: start/result/stream
    names: dict[str, str]  # {detector name: map key in ScoredVolume.maps}
    primary: str  # the run's own detector: what summary["sets"] and the figures show
    model: Any
    variables: dict
    step: int
    pixel: dict | None = None  # {"workdir", "step"} of the fused pixel-wise run

    @property
    def fused(self) -> bool:
        return isinstance(self.scorer, fused_scoring.FusedScorer)


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value.get(part) if hasattr(value, "get") else None
    return list(value) if isinstance(value, (list, tuple)) else value


def load_pixel_config(config, pixel_workdir: str | Path):
    """The DAE run's trained config, checked against `config`, with `config`'s eval settings."""
    pixel = run_info.load_run_config(pixel_workdir)
    if method(pixel) != "dae":
        raise ConfigError("eval.pixel_workdir",
                          f"{pixel_workdir} is a {method(pixel)} run, not a DAE run")  # fmt: skip
    for key in SAME_INPUT_KEYS:
        if _get(pixel, key) != _get(config, key):
            raise ConfigError(
                "eval.pixel_workdir",
                f"{pixel_workdir} was trained with {key}={_get(pixel, key)!r} but this run has "
                f"{_get(config, key)!r}: the two maps would not be of the same voxels",
            )
    with pixel.unlocked():
        eval_slices = pixel.dae.get("eval_slices", 16)
        pixel.eval = config.eval.to_dict()
        pixel.dae.eval_slices = eval_slices
    return pixel


def open_run(config, workdir: str | Path) -> OpenedRun:
    """Restores the latest checkpoint of `workdir` (and of `eval.pixel_workdir`) for scoring."""
    model, variables, step = train_state.restore_variables(config, workdir)
    if method(config) == "dae":
        from p2l.dae_scoring import DAEScorer

        scorer = DAEScorer(config, model, variables)
        return OpenedRun(scorer, {fused_scoring.DAE: "score"}, fused_scoring.DAE, model,
                         variables, step)  # fmt: skip
    from p2l.scoring import Scorer

    scorer = Scorer(config, model, variables)
    pixel_workdir = config_check.pixel_workdir(config)
    if not pixel_workdir:
        patch2loc = fused_scoring.PATCH2LOC
        return OpenedRun(scorer, {patch2loc: "score"}, patch2loc, model, variables, step)
    from p2l.dae_scoring import DAEScorer

    pixel_config = load_pixel_config(config, pixel_workdir)
    pixel_model, pixel_variables, pixel_step = train_state.restore_variables(
        pixel_config, pixel_workdir
    )
    fused = fused_scoring.FusedScorer(
        scorer, DAEScorer(pixel_config, pixel_model, pixel_variables), config.eval.fusion
    )
    return OpenedRun(fused, fused.detectors(), fused_scoring.PATCH2LOC, model, variables, step,
                     {"workdir": str(pixel_workdir), "step": pixel_step})  # fmt: skip
