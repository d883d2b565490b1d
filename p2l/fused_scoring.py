"""Patch2Loc and a pixel-wise detector scored on the same volumes, with their fused maps.

A `FusedScorer` has the interface of `p2l.scoring.Scorer` (start/result, stream), so every pass
of `p2l.evaluate` and `p2l.detect` scores each volume once for all detectors: both detectors are
dispatched to the devices together, then post-processed, then fused (p2l.fusion). Its
ScoredVolume carries Patch2Loc's maps ("score", "error", "logvar") beside the pixel-wise
detector's post-processed map (under its detector name, "dae") and one map per fusion rule
("fused[product]", ...), the latter once `params` are set (they come from the healthy volumes,
p2l.eval_thresholds, so the first healthy pass runs without them).
"""

from __future__ import annotations

from p2l import fusion
from p2l.scoring import ScoredVolume, Scorer

PATCH2LOC = "patch2loc"
DAE = "dae"


class _PendingFused:
    def __init__(self, scorer: FusedScorer, p2l_pending, pixel_pending):
        self._scorer, self._p2l, self._pixel = scorer, p2l_pending, pixel_pending

    def result(self) -> ScoredVolume:
        sv = self._p2l.result()
        pixel = self._pixel.result()
        maps = dict(sv.maps)
        maps[self._scorer.pixel_name] = pixel.score
        params = self._scorer.params
        if params is not None:
            for rule in self._scorer.rules:
                maps[fusion.detector_name(rule)] = fusion.fuse(
                    rule, sv.score, pixel.score, sv.mask, params
                )
        return ScoredVolume(sv.subject_id, sv.image, sv.mask, sv.seg, maps, sv.patches_evaluated)


class FusedScorer:
    """Patch2Loc (`p2l_scorer`) + a pixel-wise scorer with the same eval settings."""

    stream = Scorer.stream  # the same pipelining: volume k+1 dispatched before k is finished

    def __init__(self, p2l_scorer, pixel_scorer, rules, pixel_name: str = DAE):
        self.p2l, self.pixel = p2l_scorer, pixel_scorer
        self.config = p2l_scorer.config
        self.rules = fusion.check_rules(rules)
        self.pixel_name = pixel_name
        self.params: fusion.FusionParams | None = None

    def start(self, subject_id, image, mask, seg=None, *, filtered: bool = True):
        p2l = self.p2l.start(subject_id, image, mask, seg, filtered=filtered)
        pixel = self.pixel.start(subject_id, image, mask, seg, filtered=filtered)
        return _PendingFused(self, p2l, pixel)

    def __call__(self, subject_id, image, mask, seg=None, *, filtered: bool = True):
        return self.start(subject_id, image, mask, seg, filtered=filtered).result()

    def detectors(self, fused: bool = True) -> dict[str, str]:
        """{detector name: map key} of this scorer's maps (fused ones when `fused`)."""
        names = {PATCH2LOC: "score", self.pixel_name: self.pixel_name}
        if fused:
            names.update({fusion.detector_name(r): fusion.detector_name(r) for r in self.rules})
        return names
