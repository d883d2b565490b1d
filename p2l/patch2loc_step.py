"""Patch2Loc's jitted steps (spec §3.2, §3.3): static step geometry, on-device patch sampling,
the train step and the validation step.

The step is a pure function (state, batch, key) -> (state, metrics), jitted over a ('data',)
mesh with the batch sharded and the state replicated. Patches are sampled on device from the
sharded slices (p2l.patches), each device from its own slices (shard_map, no communication);
the forward then runs on the global, sharded patch batch, so BatchNorm statistics and the loss
mean are over all valid patches of the step, as in the reference's single-GPU run. The training
loop (p2l.train) drives these or the DAE's (p2l.dae_step), by `config.method`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from p2l import losses, parallel, patches
from p2l.train_state import TrainState, apply_step


@dataclass(frozen=True)
class StepGeometry:
    """Static sizes of a step (p2l.patches docstring)."""

    patch: int  # patch side in pixels
    slices: int  # slices per step before padding (the reference's batch size)
    padded_slices: int  # rounded up to a multiple of the device count
    per_slice: int  # K = ceil(C / B) candidates per slice
    num_candidates: int  # C
    capacity_per_device: int  # accepted-candidate buffer per device
    devices: int

    @property
    def capacity(self) -> int:
        return self.capacity_per_device * self.devices


def step_geometry(config, slices: int, num_candidates: int, devices: int) -> StepGeometry:
    patch = patches.patch_size_for(config.data.image_shape[0], config.sampling.patch_fraction)
    padded = parallel.padded_size(slices, devices)
    per_slice = patches.candidates_per_slice(num_candidates, slices)
    local_slices = padded // devices
    capacity = math.ceil(config.sampling.capacity_fraction * per_slice * local_slices / 8) * 8
    return StepGeometry(patch, slices, padded, per_slice, num_candidates, capacity, devices)


def make_sampler(geometry: StepGeometry, rejection_rate: float, mesh):
    """Per-device patch sampling as a global function of the sharded slice batch."""

    def local(key, image, mask_one, position, slice_index):
        pb = patches.sample_training_patches(
            key,
            image,
            mask_one,
            position,
            slice_index,
            per_slice=geometry.per_slice,
            num_candidates=geometry.num_candidates,
            capacity=geometry.capacity_per_device,
            patch=geometry.patch,
            rejection_rate=rejection_rate,
        )
        return pb._replace(num_accepted=pb.num_accepted[None], num_overflow=pb.num_overflow[None])

    data = PartitionSpec(parallel.DATA_AXIS)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(), data, data, data, data),
        out_specs=patches.PatchBatch(*([data] * 6)),
    )


def _sample(sampler, key, batch: dict) -> patches.PatchBatch:
    return sampler(key, batch["image"], batch["mask_one"], batch["position"], batch["slice_index"])


def _forward_loss(model, config, params, batch_stats, pb, train: bool):
    variables = {"params": params, "batch_stats": batch_stats}
    if train:
        (mean, logvar), updates = model.apply(
            variables,
            pb.patches,
            pb.position,
            train=True,
            mask_N=pb.weight,
            mutable=["batch_stats"],
        )
        new_stats = updates["batch_stats"]
    else:
        mean, logvar = model.apply(variables, pb.patches, pb.position, train=False)
        new_stats = batch_stats
    loss = losses.location_loss(
        config.loss.type, mean, logvar, pb.target, pb.weight, beta=config.loss.beta
    )
    aux = {
        "mean_logvar": losses.weighted_mean(jnp.mean(logvar, axis=-1), pb.weight),
        # The reference logs this as "mse" but computes the mean absolute error (spec §3.3).
        "mae": losses.weighted_mean(jnp.mean(jnp.abs(pb.target - mean), axis=-1), pb.weight),
    }
    return loss, (new_stats, aux)


def _patch_metrics(pb: patches.PatchBatch, geometry: StepGeometry) -> dict:
    valid = jnp.sum(pb.weight)
    return {
        "valid_patches": valid,
        "accepted": jnp.sum(pb.num_accepted),
        "overflow": jnp.sum(pb.num_overflow),
        "valid_fraction": valid / geometry.num_candidates,
    }


def make_train_step(model, tx, config, geometry: StepGeometry, mesh):
    sampler = make_sampler(geometry, config.sampling.rejection_rate, mesh)
    grad_fn = jax.value_and_grad(partial(_forward_loss, model, config), has_aux=True)

    def train_step(state: TrainState, batch: dict, key: jax.Array):
        pb = _sample(sampler, jax.random.fold_in(key, 0), batch)
        (loss, (new_stats, aux)), grads = grad_fn(state.params, state.batch_stats, pb, True)
        new_state, metrics = apply_step(tx, state, loss, grads, new_stats, batch)
        metrics = {
            **metrics,
            **aux,
            **_patch_metrics(pb, geometry),
        }
        return new_state, metrics

    return parallel.jit_train_step(train_step, mesh)


def make_eval_step(model, config, geometry: StepGeometry, mesh):
    """Validation loss with BatchNorm in eval mode (spec §3.3 'validation')."""
    sampler = make_sampler(geometry, config.sampling.rejection_rate, mesh)

    def eval_step(state: TrainState, batch: dict, key: jax.Array):
        pb = _sample(sampler, jax.random.fold_in(key, 1), batch)
        loss, (_, aux) = _forward_loss(model, config, state.params, state.batch_stats, pb, False)
        return {"val_loss": loss, "val_mae": aux["mae"], "val_mean_logvar": aux["mean_logvar"],
                # 0 when every drawn validation slice misses the brain: the loss is then 0/0.
                "val_valid_patches": jnp.sum(pb.weight)}  # fmt: skip

    return parallel.jit_eval_step(eval_step, mesh)
