"""tf.data over the tfds slice builds: training batches of slices and validation batches.

Training follows the reference's sampling (spec §2.2 "Slices used", §3.3): each optimiser step
takes `slices_per_step` CSV rows of the IXI train fold (shuffled per epoch, drop_last, so with
387 rows and 356 slices one step is one epoch) and one axial slice of each row, each row cycling
through its slices without replacement (the reference's RandomPopper). Unlike the reference the
choice is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would have.

The slices of the split are held in host memory, as the reference pre-caches its subjects:
the training input image*mask (spec §8.9) in float32 and the rejection mask (mask == 1, spec §8.10)
in uint8 — about 7 GB for a full IXI fold at 192x192x100.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from p2l import parallel, patches
from p2l.errors import ConfigError
from p2l.slices_builder import build_slices, read_volumes

# TensorFlow only feeds data: keep it off the accelerators JAX uses (conventions).
tf.config.set_visible_devices([], "GPU")


@dataclass
class SliceBank:
    """All slices of a split, row-major: image*mask and (mask == 1), each (R, D, H, W)."""

    image: np.ndarray
    mask_one: np.ndarray
    subject_ids: list[str]

    @property
    def num_rows(self) -> int:
        return self.image.shape[0]

    @property
    def num_slices(self) -> int:
        return self.image.shape[1]


def default_tfds_dir(config) -> str:
    if config.tfds_dir:
        return config.tfds_dir
    return str(Path(config.data_root).absolute().parent / "p2l_tfds")


def build_dataset(config):
    """The tfds builder of this config's modality, fold and test sets (built on first use)."""
    import jax

    def build():
        return build_slices(
            data_root=config.data_root,
            splits_dir=config.splits_dir,
            modality=config.modality,
            fold=config.fold,
            test_sets=tuple(config.test_sets),
            target_shape=tuple(config.data.image_shape),
            expected_spacing=config.data.expected_spacing,
            data_dir=default_tfds_dir(config),
        )

    if jax.process_count() == 1:
        return build()
    # Multi-process: process 0 builds, the others open the finished build after a barrier
    # (two writers of one tfds folder would race).
    from jax.experimental import multihost_utils

    builder = build() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("p2l: tfds slices built")
    return builder if builder is not None else build()


def load_slice_bank(builder, split: str, image_shape) -> SliceBank:
    """Reads a split's ordered slices into a SliceBank (rows are CSV rows, duplicates kept)."""
    h, w, d = image_shape
    n_examples = builder.info.splits[split].num_examples
    if n_examples == 0 or n_examples % d:
        raise ConfigError(
            "data",
            f"split {split!r} of {builder.name} has {n_examples} slices, not a multiple of {d}",
        )
    rows = n_examples // d
    image = np.zeros((rows, d, h, w), np.float32)
    mask_one = np.zeros((rows, d, h, w), np.uint8)
    subject_ids = []
    source = builder.as_data_source(split=split)  # ArrayRecord: ordered random access
    for i in range(n_examples):
        ex = source[i]
        r, z = divmod(i, d)
        if int(ex["slice_index"]) != z:
            raise ConfigError("data", f"slices of {split!r} out of order at example {i}")
        if z == 0:
            subject_ids.append(ex["subject_id"].decode())
        image[r, z] = ex["image"] * ex["mask"]  # training input is masked (spec §8.9)
        mask_one[r, z] = ex["mask"] == 1.0  # rejection counts mask == 1 exactly (spec §8.10)
    return SliceBank(image=image, mask_one=mask_one, subject_ids=subject_ids)


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
    slices = np.array(
        [np.random.default_rng([seed, 1, int(r), cycle]).permutation(num_slices)[pos] for r in rows]
    )
    return rows, slices


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


def read_eval_volumes(builder, split: str):
    """Ordered (H, W, D) volumes of an evaluation split (image, mask, seg, subject_id)."""
    return read_volumes(builder, split)
