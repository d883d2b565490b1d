"""A volume in, named per-voxel maps out, for the denoising autoencoder (Kascenas et al., MIDL
2022): the same seam as `p2l.scoring.Scorer`, so evaluation and detection take either detector.

Every axial slice of the (H, W, D) volume is reconstructed (unmasked input, as Patch2Loc's
heatmap); the anomaly score is the residual |image - recon| inside the brain mask, then the
post-processing Patch2Loc's scores get (optional mask erosion, median filter, brain mask;
`p2l.scoring.postprocessed`). Maps: "score" (post-processed), "residual" (|image - recon|
where mask > 0, else 0) and "recon" (the reconstruction).

Slices go through `p2l.dae_step.make_reconstruct` in fixed-size batches of config.dae.eval_slices
per device (p2l.heatmaps.batch_for: few static shapes), the last one zero-padded. `start` only
dispatches them (JAX runs them asynchronously); the host waits in `result()`, so `stream` and
p2l.eval_stream post-process one volume while the devices reconstruct the next.
"""

from __future__ import annotations

import jax
import numpy as np

from p2l import heatmaps, parallel
from p2l.dae_step import make_reconstruct
from p2l.scoring import ScoredVolume, Scorer, postprocessed


class PendingReconstruction:
    """A volume whose slices are dispatched to the devices; `result()` scores it."""

    def __init__(self, scorer: DAEScorer, subject_id, image, mask, seg, median: int, outputs):
        self._scorer = scorer
        self._args = (subject_id, image, mask, seg, median)
        self._outputs = outputs  # per batch, (batch, H, W) device arrays; padding rows last

    def result(self) -> ScoredVolume:
        subject_id, image, mask, seg, median = self._args
        depth = image.shape[2]
        recon_DxHxW = np.concatenate(jax.device_get(self._outputs))[:depth]
        self._outputs = []
        recon = np.ascontiguousarray(recon_DxHxW.transpose(1, 2, 0), np.float32)
        residual = np.where(np.asarray(mask) > 0, np.abs(image - recon), np.float32(0))
        score, work_mask = postprocessed(
            self._scorer.config.eval, subject_id, residual, mask, median
        )
        maps = {"score": score, "residual": residual, "recon": recon}
        return ScoredVolume(subject_id, image, work_mask, seg, maps, depth)


class DAEScorer:
    """Reconstruction residual + post-processing of one volume with the config's settings
    (config.dae.eval_slices, config.eval.median_size, config.eval.erode_mask_iterations).

    The interface of p2l.scoring.Scorer: `start` dispatches and returns a pending score,
    `__call__` scores at once, `stream` pipelines volumes (the last two are Scorer's own).
    """

    def __init__(self, config, model, variables):
        self.config = config
        self.model = model
        self._devices = tuple(jax.local_devices())
        self._reconstruct = make_reconstruct(model, self._devices)
        self.slices_per_device = heatmaps.positive_int(config.dae.eval_slices, "dae.eval_slices")
        repl = parallel.replicated(parallel.create_mesh(list(self._devices)))
        # Sent to the devices once for all volumes.
        self.variables = jax.device_put(heatmaps.local_variables(variables), repl)

    def start(
        self, subject_id, image, mask, seg=None, *, filtered: bool = True
    ) -> PendingReconstruction:
        """Dispatches the reconstruction of every slice and returns at once."""
        # The same checks as the heatmap's: a finite 3-D volume and a mask of its shape.
        vol, _ = heatmaps.check_volume(image, mask, subject_id)
        median = self.config.eval.median_size if filtered else 0
        slices = np.ascontiguousarray(vol.transpose(2, 0, 1))  # (D, H, W)
        depth = len(slices)
        batch = heatmaps.batch_for(depth, self.slices_per_device, len(self._devices))
        outputs = []
        for begin in range(0, depth, batch):
            chunk = slices[begin : begin + batch]
            if len(chunk) < batch:  # static shapes: zero slices pad the last batch
                padding = np.zeros((batch - len(chunk),) + slices.shape[1:], np.float32)
                chunk = np.concatenate([chunk, padding])
            # Dispatched asynchronously: the host goes on to the next batch at once.
            outputs.append(self._reconstruct(self.variables, chunk))
        return PendingReconstruction(self, subject_id, vol, mask, seg, median, outputs)

    # Scorer's, unchanged: they only call `self.start`.
    __call__ = Scorer.__call__
    stream = Scorer.stream
