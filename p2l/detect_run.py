"""The trained run `p2l.detect` scores with, opened once for any number of scans.

Holds what does not change from scan to scan: the run's config and training space, the compiled
scorer (Patch2Loc, or fused with a DAE run), the stored threshold and where it came from, the
healthy reference for the out-of-distribution check, and, for raw scans, the run's preparation
record and its atlas (loaded on first use).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from p2l import fusion
from p2l.errors import ConfigError, DataError


def stored_summary(workdir: Path) -> dict | None:
    path = Path(workdir) / "results" / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def stored_threshold(workdir: Path, detector: str | None = None) -> tuple[float, str] | None:
    """The threshold `make eval` stored for this run (for `detector`, default the run's own): the
    first fixed policy (validation-tuned, then healthy quantile, in `thresholds.policies` order)
    with a value, and its name."""
    from p2l import thresholds
    from p2l.run_info import load_run_config

    summary = stored_summary(workdir)
    if summary is None:
        return None
    if detector is not None and detector != summary.get("detector", "patch2loc"):
        summary = (summary.get("detectors") or {}).get(detector)
        if summary is None:
            return None
    stored = summary.get("thresholds", {})
    quantile = load_run_config(workdir).eval.get("healthy_quantile", thresholds.HEALTHY_QUANTILE)
    for policy in thresholds.policies(quantile):
        if policy.per_volume:
            continue
        # The validation threshold is stored per dataset: "validation[<Dataset>]".
        for key, value in stored.items():
            if key.split("[")[0] == policy.name and value.get("value") is not None:
                return float(value["value"]), key
    return None


@dataclass
class DetectRun:
    """A trained run ready to score scans (see the module doc)."""

    workdir: Path
    config: object
    opened: object  # p2l.detectors.OpenedRun
    threshold: float
    threshold_source: str
    space: dict | None
    summary: dict | None
    fused: str | None = None  # "fused[rule]" with --dae-workdir
    open_seconds: float = 0.0  # config, checkpoint, compiled scorer: once per batch
    fused_threshold: tuple[float, str] | None = None
    _preparation: dict | None = field(default=None, repr=False)
    _atlas: object = field(default=None, repr=False)

    @property
    def modality(self) -> str:
        return str(self.config.modality)

    def preparation(self) -> dict:
        """How data_prep made the training data (p2l.preparation.record); DataError if unknown."""
        if self._preparation is None:
            from p2l.preparation import record

            source = None if self.space is None else self.space.get("source")
            self._preparation = record.for_run(self.workdir, self.space, source)
        return self._preparation

    def has_preparation(self) -> bool:
        try:
            self.preparation()
        except DataError:
            return False
        return True

    def atlas(self, override: str | None = None):
        """The run's atlas on its working grid, loaded once; its content must be the one the
        training data were registered to (sha256 in the preparation record)."""
        if self._atlas is None:
            from p2l.preparation.atlas import load_atlas

            prep = self.preparation()
            path = override or prep["atlas"]["path"]
            if path is not None and not Path(path).is_file():
                raise DataError(
                    path,
                    "the run's atlas is not here (it was registered to this file when the "
                    "training data were prepared): pass --atlas with the same file",
                )
            atlas = load_atlas(path, float(prep["spacing_mm"]))
            if atlas.sha256 != prep["atlas"]["sha256"]:
                raise DataError(
                    atlas.path,
                    "not the atlas the run's training data were registered to "
                    f"({prep['atlas']['name']}, sha256 {prep['atlas']['sha256'][:12]}..., this "
                    f"file {atlas.sha256[:12]}...)",
                )
            self._atlas = atlas
        return self._atlas


def open_detect_run(
    workdir: str | Path,
    *,
    modality: str | None = None,
    threshold: float | None = None,
    stride: int | None = None,
    dae_workdir: str | None = None,
    fusion_rule: str = "product",
) -> DetectRun:
    """Open `workdir` once: config, checkpoint, compiled scorer and stored threshold."""
    from p2l import orientation
    from p2l.run_info import load_run_config

    started = time.perf_counter()
    workdir = Path(workdir)
    config = load_run_config(workdir)
    if modality is not None and modality != config.modality:
        raise ConfigError(
            "modality",
            f"the model in {workdir} was trained on {config.modality.upper()} scans, "
            f"but --modality is {modality}",
        )
    if threshold is not None:
        value, source = float(threshold), "--threshold"
    else:
        found = stored_threshold(workdir)  # the run's own detector's
        if found is None:
            raise DataError(
                workdir / "results" / "summary.json",
                "no stored threshold: run `make eval` for this workdir or pass --threshold",
            )
        value, source = found[0], f"{found[1]} stored by make eval in {workdir}"
    if stride:
        config.eval.stride = int(stride)
    opened = _open(config, workdir, dae_workdir, fusion_rule)
    run = DetectRun(
        workdir=workdir,
        config=config,
        opened=opened,
        threshold=value,
        threshold_source=source,
        space=orientation.run_space(workdir, config),
        summary=stored_summary(workdir),
        open_seconds=0.0,
    )
    if opened.fused:
        run.fused = fusion.detector_name(fusion_rule)
        run.fused_threshold = stored_threshold(workdir, run.fused)
    run.open_seconds = round(time.perf_counter() - started, 2)
    return run


def _open(config, workdir: Path, dae_workdir: str | None, rule: str):
    """The run's scorer; with a DAE run, Patch2Loc and the DAE fused by `rule`, with the fusion
    parameters the run's evaluation stored (p2l.fusion: zsum and gate need them)."""
    from p2l import detectors

    if not dae_workdir:
        # The run's own detector only: its evaluation may have fused a DAE (eval.pixel_workdir),
        # detect fuses only when asked (--dae-workdir).
        config.eval.pixel_workdir = ""
        return detectors.open_run(config, workdir)
    if not (Path(dae_workdir) / "run_info.json").is_file():
        raise DataError(
            dae_workdir,
            "not a trained DAE run folder (no run_info.json): train one first, e.g. make train "
            "CONFIG=experiments/dae_t2.py",
        )
    from p2l.config_check import method

    if method(config) != "patch2loc":
        raise ConfigError("dae-workdir", f"--workdir {workdir} must be a Patch2Loc run to fuse")
    config.eval.pixel_workdir = str(dae_workdir)
    config.eval.fusion = (rule,)
    opened = detectors.open_run(config, workdir)
    stored = (stored_summary(workdir) or {}).get("fusion") or {}
    same = Path(str((stored.get("pixel_run") or {}).get("workdir", ""))).resolve()
    if stored.get("params") and same == Path(dae_workdir).resolve():
        opened.scorer.params = fusion.FusionParams(**stored["params"])
    elif rule == "product":  # the one rule without healthy parameters
        opened.scorer.params = fusion.FusionParams(0.0, 1.0, 0.0, 1.0, 0.0)
    else:
        raise DataError(
            Path(workdir) / "results" / "summary.json",
            f"no fusion parameters stored for the DAE run {dae_workdir}: the {rule} "
            "rule needs the healthy statistics of an evaluation (make eval with "
            f"--config.eval.pixel_workdir={dae_workdir}); --fusion product needs none",
        )
    return opened
