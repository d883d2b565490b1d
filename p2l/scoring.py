"""A volume in, named per-voxel maps out: Patch2Loc's heatmap (spec §5.2-§5.3) followed by the
post-processing of spec §5.4-§5.5 (median filter, brain mask).

The seam every consumer of lesion maps goes through (`p2l.evaluate`, `p2l.detect`): a scored
volume carries a dict of maps, so other detectors' maps can sit beside Patch2Loc's. Scoring uses
the train state's variables only; it never loads the training loop or TensorFlow.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from p2l import heatmaps, patches, postprocess


@dataclass
class ScoredVolume:
    """One scored volume. `maps["score"]` is post-processed (filtered, 0 outside the brain);
    `maps["error"]` and `maps["logvar"]` are the heatmap's raw values (0 where not computed)."""

    subject_id: str
    image: np.ndarray
    mask: np.ndarray  # the brain mask the score was masked with (eroded when configured)
    seg: np.ndarray | None
    maps: dict[str, np.ndarray]
    patches_evaluated: int

    @property
    def score(self) -> np.ndarray:
        return self.maps["score"]


def postprocessed(eval_config, subject_id: str, score, mask, median: int):
    """(post-processed score, the mask it was masked with) of a raw per-voxel score: the brain
    mask eroded by `eval_config.erode_mask_iterations` when that is set, then the median filter
    of side `median` (0: none) and the masking of spec §5.4-§5.5 (`p2l.postprocess`). Every
    detector's score goes through it (Patch2Loc's here, the DAE's in p2l.dae_scoring), so the
    detectors compared and fused are post-processed alike."""
    work_mask = mask
    if eval_config.erode_mask_iterations:
        work_mask = postprocess.erode_brain_mask(mask, eval_config.erode_mask_iterations)
    score = postprocess.postprocess(score, work_mask, median_size=median or None, name=subject_id)
    return score, work_mask


class PendingScore:
    """A volume whose heatmap is dispatched to the devices; `result()` post-processes it."""

    def __init__(self, scorer: Scorer, subject_id, image, mask, seg, median: int, pending):
        self._scorer = scorer
        self._args = (subject_id, image, mask, seg, median)
        self._pending = pending

    def result(self) -> ScoredVolume:
        subject_id, image, mask, seg, median = self._args
        raw = self._pending.result()
        score, work_mask = postprocessed(
            self._scorer.config.eval, subject_id, raw.score, mask, median
        )
        maps = {"score": score, "error": raw.error, "logvar": raw.logvar}
        return ScoredVolume(subject_id, image, work_mask, seg, maps, raw.patches_evaluated)


class Scorer:
    """Heatmap + post-processing of one volume with the config's `eval` settings."""

    def __init__(self, config, model, variables):
        self.config = config
        self.model = model
        self.variables = heatmaps.local_variables(variables)
        self.patch = patches.patch_size_for(
            config.data.image_shape[0], config.sampling.patch_fraction
        )

    def start(self, subject_id, image, mask, seg=None, *, filtered: bool = True) -> PendingScore:
        """Dispatches the heatmap and returns at once (JAX runs it asynchronously)."""
        ev = self.config.eval
        median = ev.median_size if filtered else 0
        # Patches that cannot reach the masked, filtered result are skipped (p2l.heatmaps).
        region = postprocess.influence_region(mask, max(median, 1)) if median else mask > 0
        pending = heatmaps.start_volume_heatmap(
            self.model,
            self.variables,
            image,
            patch=self.patch,
            stride=ev.stride,
            batch_size=ev.batch_size,
            region=region,
            dtype=ev.dtype,
            variant=ev.variant,
            name=subject_id,
        )
        return PendingScore(self, subject_id, image, mask, seg, median, pending)

    def __call__(self, subject_id, image, mask, seg=None, *, filtered: bool = True):
        return self.start(subject_id, image, mask, seg, filtered=filtered).result()

    def stream(self, volumes: Iterable, *, filtered: bool = True) -> Iterator[tuple]:
        """(volume, ScoredVolume) for volumes with subject_id/image/mask/seg, in order.

        Volume k+1's heatmap is dispatched before volume k is post-processed, so on an
        accelerator the devices compute while the host filters; two volumes are held at a time.
        """
        ahead = None
        for vol in volumes:
            started = (vol, self.start(vol.subject_id, vol.image, vol.mask, vol.seg,
                                       filtered=filtered))  # fmt: skip
            if ahead is not None:
                yield ahead[0], ahead[1].result()
            ahead = started
        if ahead is not None:
            yield ahead[0], ahead[1].result()
