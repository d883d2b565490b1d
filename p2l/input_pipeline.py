"""tf.data over the tfds slice builds: training batches of slices and validation batches.

Training follows the reference's sampling (spec §2.2 "Slices used", §3.3): each optimiser step
takes `slices_per_step` CSV rows of the IXI train fold (shuffled per epoch, drop_last, so with
387 rows and 356 slices one step is one epoch) and one axial slice of each row, each row cycling
through its slices without replacement (the reference's RandomPopper). Unlike the reference the
choice is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would have.

The slices of the fold are read from the IXI slice build (p2l.builds) into a SliceBank, as the
reference pre-caches its subjects: the training input image*mask (spec §8.9) in float32 and the
rejection mask (mask == 1, spec §8.10) in uint8 — about 7 GB for a full IXI fold at 192x192x100.
Training then gathers each step's slices on the devices from a copy placed there once, or streams
them from the host with tf.data (`train_batches`) when the fold does not fit (p2l.device_slices).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from p2l import parallel, patches
from p2l.builds import Builds, from_config
from p2l.errors import ConfigError

# TensorFlow only feeds data: keep it off the accelerators JAX uses (conventions).
tf.config.set_visible_devices([], "GPU")


class BankShape:
    """Rows and slices per row of a bank whose `image` is (R, D, H, W), on host or device."""

    image: np.ndarray

    @property
    def num_rows(self) -> int:
        return self.image.shape[0]

    @property
    def num_slices(self) -> int:
        return self.image.shape[1]


@dataclass
class SliceBank(BankShape):
    """All slices of a split, row-major: image*mask and (mask == 1), each (R, D, H, W)."""

    image: np.ndarray
    mask_one: np.ndarray
    subject_ids: list[str]


def build_dataset(config) -> Builds:
    """The slice builds this config reads (made on first use, shared by folds and configs)."""
    import jax

    builds = from_config(config)
    if jax.process_count() == 1:
        return builds.prepare()
    # Multi-process: process 0 builds, the others open the finished builds after a barrier.
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        builds.prepare()
    else:
        print("p2l: waiting for process 0 to make the slice builds", flush=True)
    multihost_utils.sync_global_devices("p2l: tfds slices built")
    return builds if jax.process_index() == 0 else builds.open()


def load_slice_bank(builds: Builds, part: str, image_shape) -> SliceBank:
    """Reads a part's ordered slices into a SliceBank (rows are CSV rows, duplicates kept)."""
    h, w, d = image_shape
    subject_ids = builds.subject_ids(part)
    if not subject_ids:
        raise ConfigError("data", f"the {part!r} part of the slice builds has no volumes")
    image = np.zeros((len(subject_ids), d, h, w), np.float32)
    mask_one = np.zeros((len(subject_ids), d, h, w), np.uint8)
    for r, volume in enumerate(builds.volumes(part)):
        if volume.image.shape != (h, w, d):
            raise ConfigError(
                "data",
                f"{volume.subject_id} of {part!r} has shape {volume.image.shape}, "
                f"not the configured {(h, w, d)}",
            )
        # (H, W, D) -> (D, H, W); the training input is masked (spec §8.9) and the rejection
        # counts mask == 1 exactly (spec §8.10).
        image[r] = np.moveaxis(volume.image * volume.mask, -1, 0)
        mask_one[r] = np.moveaxis(volume.mask == 1.0, -1, 0)
    return SliceBank(image=image, mask_one=mask_one, subject_ids=list(subject_ids))


def steps_per_epoch(num_rows: int, batch: int) -> int:
    if batch > num_rows:
        raise ConfigError(
            "sampling.slices_per_step",
            f"{batch} is larger than the {num_rows} training rows (drop_last leaves no step)",
        )
    return num_rows // batch


def select_train_slices(
    step: int, num_rows: int, batch: int, num_slices: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, slice indices) of a training step; a pure function of its arguments."""
    spe = steps_per_epoch(num_rows, batch)
    epoch, k = divmod(int(step), spe)
    rows = np.random.default_rng([seed, 0, epoch]).permutation(num_rows)[
        k * batch : (k + 1) * batch
    ]
    cycle, pos = divmod(epoch, num_slices)
    return rows, _slice_orders(seed, num_rows, num_slices, cycle)[rows, pos]


@functools.lru_cache(maxsize=2)
def _slice_orders(seed: int, num_rows: int, num_slices: int, cycle: int) -> np.ndarray:
    """(num_rows, num_slices): each row's slice order in a cycle of num_slices epochs.

    Cached, so that a step costs a lookup: one generator per row and step took longer than a GPU
    step (README, "Performance"). The orders are the same.
    """
    orders = np.stack(
        [
            np.random.default_rng([seed, 1, r, cycle]).permutation(num_slices)
            for r in range(num_rows)
        ]
    )
    orders.flags.writeable = False  # shared by every caller of the cache
    return orders


def select_val_slices(step: int, num_rows: int, num_slices: int, seed: int):
    """Every validation row with one random slice, fixed by (seed, step) (spec §3.3)."""
    rows = np.arange(num_rows)
    slices = np.random.default_rng([seed, 2, int(step)]).integers(0, num_slices, num_rows)
    return rows, slices


def assemble_batch(bank: SliceBank, rows: np.ndarray, slices: np.ndarray, padded: int) -> dict:
    """The global batch of the selected slices, zero-padded to `padded` rows.

    Padding rows have an empty mask, so no candidate is ever accepted in them; `slice_index`
    is each slice's position in the global batch (it seeds the per-slice candidate draw).
    Only this process's share of the rows is returned (parallel.process_rows).
    """
    n = len(rows)
    _, d, h, w = bank.image.shape
    image = np.zeros((padded, h, w), np.float32)
    mask_one = np.zeros((padded, h, w), np.uint8)
    image[:n] = bank.image[rows, slices]
    mask_one[:n] = bank.mask_one[rows, slices]
    position = np.zeros((padded,), np.float32)
    position[:n] = patches.slice_position(slices, d)  # spec §3.1: 100*z/total_slices
    batch = {
        "image": image,
        "mask_one": mask_one,
        "position": position,
        "slice_index": np.arange(padded, dtype=np.int32),
    }
    mine = parallel.process_rows(padded)
    return {k: v[mine] for k, v in batch.items()}


def train_batches(bank: SliceBank, config, padded: int, start_step: int):
    """tf.data iterator of host-local training batches for steps start_step..num_steps-1."""
    batch = config.sampling.slices_per_step
    steps_per_epoch(bank.num_rows, batch)  # fail early with a clear message

    def make(step):
        rows, slices = select_train_slices(
            int(step), bank.num_rows, batch, bank.num_slices, config.seed
        )
        b = assemble_batch(bank, rows, slices, padded)
        return b["image"], b["mask_one"], b["position"], b["slice_index"]

    def to_dict(step):
        image, mask_one, position, slice_index = tf.numpy_function(
            make, [step], [tf.float32, tf.uint8, tf.float32, tf.int32], stateful=False
        )
        return {
            "image": image,
            "mask_one": mask_one,
            "position": position,
            "slice_index": slice_index,
        }

    ds = tf.data.Dataset.range(start_step, config.num_steps)
    ds = ds.map(to_dict, num_parallel_calls=1, deterministic=True).prefetch(config.prefetch)
    return ds.as_numpy_iterator()


def val_batch(bank: SliceBank, step: int, seed: int, padded: int) -> dict:
    rows, slices = select_val_slices(step, bank.num_rows, bank.num_slices, seed)
    return assemble_batch(bank, rows, slices, padded)


def read_eval_volumes(builds: Builds, split: str):
    """Ordered (H, W, D) volumes of an evaluation split (image, mask, seg, subject_id)."""
    return builds.volumes(split)
