"""train_and_evaluate(config, workdir): mesh, data, init/restore, jitted step, loop (spec §3.3).

The step is a pure function (state, batch, key) -> (state, metrics), jitted over a ('data',)
mesh with the batch sharded and the state replicated. Patches are sampled on device from the
sharded slices (p2l.patches), each device from its own slices (shard_map, no communication);
the forward then runs on the global, sharded patch batch, so BatchNorm statistics and the loss
mean are over all valid patches of the step, as in the reference's single-GPU run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

# The input pipeline (TensorFlow, through device_slices too) and orientation (nibabel) are
# imported where the loop uses them: the train step alone builds without them (a bare GPU
# machine's `make gpu-check`, benchmarks.gpu_check).
from p2l import (
    checkpoint,
    config_check,
    disk_check,
    interrupt,
    losses,
    parallel,
    patches,
    run_identity,
    run_info,
    run_log,
    workdir_lock,
)
from p2l.errors import P2LError
from p2l.model import count_params, create_model, init_variables
from p2l.train_state import TrainState, create_train_state, make_optimizer


class TrainingDiverged(P2LError):
    """The loss or gradient became non-finite; the state from before that step is kept."""


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
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step leaves the state untouched: no NaN ever reaches a checkpoint.
        keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
            lambda n, o: jnp.where(finite, n, o), new, old
        )
        new_state = TrainState(
            step=jnp.where(finite, state.step + 1, state.step),
            params=keep(new_params, state.params),
            batch_stats=keep(new_stats, state.batch_stats),
            opt_state=keep(new_opt_state, state.opt_state),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "param_norm": optax.global_norm(state.params),
            "finite": finite.astype(jnp.float32),
            **({"stop": jnp.max(batch["stop"])} if "stop" in batch else {}),
            **aux,
            **_patch_metrics(pb, geometry),
        }
        return new_state, metrics

    repl = parallel.replicated(mesh)
    data = parallel.batch_sharded(mesh)
    return jax.jit(
        train_step,
        in_shardings=(repl, data, repl),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )


def make_eval_step(model, config, geometry: StepGeometry, mesh):
    """Validation loss with BatchNorm in eval mode (spec §3.3 'validation')."""
    sampler = make_sampler(geometry, config.sampling.rejection_rate, mesh)

    def eval_step(state: TrainState, batch: dict, key: jax.Array):
        pb = _sample(sampler, jax.random.fold_in(key, 1), batch)
        loss, (_, aux) = _forward_loss(model, config, state.params, state.batch_stats, pb, False)
        return {"val_loss": loss, "val_mae": aux["mae"], "val_mean_logvar": aux["mean_logvar"],
                # 0 when every drawn validation slice misses the brain: the loss is then 0/0.
                "val_valid_patches": jnp.sum(pb.weight)}  # fmt: skip

    repl = parallel.replicated(mesh)
    return jax.jit(
        eval_step,
        in_shardings=(repl, parallel.batch_sharded(mesh), repl),
        out_shardings=repl,
    )


def _check_finite(step: int, metrics: dict, last_saved: int | None) -> None:
    if metrics["finite"] < 1.0:
        raise TrainingDiverged(
            f"non-finite loss at step {step} (loss={metrics['loss']}, "
            f"grad_norm={metrics['grad_norm']}); the update was not applied and no checkpoint "
            f"was written after it (last checkpoint: step {last_saved}). Lower "
            "config.optim.learning_rate or check the input data for extreme values."
        )


def _checkpoint_bytes(config) -> int:
    """Kept checkpoints: about 3 float32 copies of the parameters each (params, Adam's moments)."""
    patch = patches.patch_size_for(config.data.image_shape[0], config.sampling.patch_fraction)
    shapes = jax.eval_shape(lambda: init_variables(create_model(config), jax.random.key(0), patch))
    return 3 * 4 * count_params(shapes["params"]) * config.keep_checkpoints


def train_and_evaluate(config, workdir: str | Path, accept_config_change=()) -> TrainState:
    """Trains (or resumes) the model of `config` in `workdir`; returns the final state.

    Holds the workdir lock (p2l.workdir_lock) while it runs. Resuming checks `config` against the
    identity stored with the checkpoint (p2l.run_identity): IdentityMismatch unless
    `accept_config_change` names every changed key. SIGTERM/SIGINT checkpoint at the next step
    and raise p2l.interrupt.Interrupted, so that no caller evaluates a half-trained model.
    """
    config_check.check_paths(config)
    workdir = Path(workdir)
    if jax.process_index() != 0:  # only process 0 writes in the workdir
        return _train(config, workdir, tuple(accept_config_change))
    # Before the lock, which writes into the workdir: read-only or full stops here, in one line.
    disk_check.check_writable(workdir, _checkpoint_bytes(config), "training")
    with workdir_lock.hold(workdir, "training"):
        return _train(config, workdir, tuple(accept_config_change))


def _train(config, workdir: Path, accept: tuple[str, ...]) -> TrainState:
    is_main = jax.process_index() == 0
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
    try:
        last_saved = ckpt.latest_step()
        # Before anything is loaded or written: a run resumed under another config stops here.
        history = run_identity.check_resume(config, workdir, last_saved, accept)
        if is_main:
            if history is not None:
                run_identity.write_history(workdir, history)
            # The entry the checkpoints of this start will be stored under.
            entry = run_identity.entry_for_step(
                run_identity.read_history(workdir), (last_saved or 0) + 1
            )
            keys = ("hash", "from_step", "accepted_change")
            ident = {k: entry[k] for k in keys if k in entry}
            run_info.write(workdir, config, identity=ident, resumed_from=last_saved)
            # The orientation and spacing the model learns: detect and evaluation bring scans
            # to it (p2l.orientation).
            from p2l import orientation

            orientation.write_training_space(workdir, config)
        return _train_loop(config, workdir, ckpt, last_saved)
    finally:
        # Also on errors: finish an in-flight async save, so the last good checkpoint is whole.
        ckpt.close()


def _train_loop(config, workdir: Path, ckpt, last_saved: int | None):
    from p2l import device_slices, input_pipeline

    is_main = jax.process_index() == 0
    mesh = parallel.create_mesh()
    devices = mesh.devices.size
    builder = input_pipeline.build_dataset(config)
    shape = tuple(config.data.image_shape)
    train_bank = input_pipeline.load_slice_bank(builder, "train", shape)
    val_bank = input_pipeline.load_slice_bank(builder, "val", shape)
    geometry = step_geometry(
        config, config.sampling.slices_per_step, config.sampling.num_candidates, devices
    )
    # Validation draws the same number of candidates over the (fewer) val slices (spec §3.3).
    val_geometry = step_geometry(config, val_bank.num_rows, config.sampling.num_candidates, devices)
    input_path, input_why = device_slices.choose_for(config, train_bank, mesh)
    print(
        f"p2l: {train_bank.num_rows} training rows, {val_bank.num_rows} validation rows, "
        f"{devices} device(s) ({jax.devices()[0].device_kind}); patch {geometry.patch}px, "
        f"{geometry.num_candidates} candidates/step, buffer {geometry.capacity} patches; "
        f"training slices on the {input_path} ({input_why})",
        flush=True,
    )

    model = create_model(config)
    tx = make_optimizer(config)
    # Stateless keys (conventions): init from one stream, step s samples from fold_in(base, s).
    init_key, base_key = jax.random.split(jax.random.key(config.seed))
    state = create_train_state(config, model, tx, init_key)
    state = jax.device_put(state, parallel.replicated(mesh))
    if last_saved is not None:
        state = ckpt.restore(state, last_saved)
        print(f"p2l: resumed from {ckpt.directory}/{last_saved}", flush=True)
    start = int(state.step)
    if start >= config.num_steps:
        print(f"p2l: already trained to step {start} (num_steps={config.num_steps})", flush=True)
        return state

    train_step = make_train_step(model, tx, config, geometry, mesh)
    eval_step = make_eval_step(model, config, val_geometry, mesh)
    batches = device_slices.train_feed(
        train_bank, config, geometry.padded_slices, start, mesh, input_path
    )
    del train_bank  # on the device path the host copy is no longer needed
    log = run_log.MetricLog(workdir, enabled=is_main)
    window: list[dict] = []
    window_start = time.perf_counter()
    pending: tuple[int, dict] | None = None
    # Multi-process runs stop together: each feeds its stop flag with its batch rows and the
    # step reduces them, so every process sees the same "stop" metric at the same step.
    seen_stop = False

    def drain(pending_step, pending_metrics):
        nonlocal seen_stop
        host = {k: float(v) for k, v in jax.device_get(pending_metrics).items()}
        seen_stop |= host.pop("stop", 0.0) > 0
        _check_finite(pending_step, host, last_saved)
        window.append(host)

    try:
        with interrupt.deferred() as stop:
            single = jax.process_count() == 1
            stopping = lambda: stop.requested is not None if single else seen_stop  # noqa: E731
            for step in range(start, config.num_steps):
                batch = next(batches)
                # Each process feeds its stop flag with its share of the rows.
                rows = geometry.padded_slices // jax.process_count()
                flag = np.full(rows, stop.requested is not None, np.int32)
                batch = {**batch, **parallel.to_global({"stop": flag}, mesh)}
                state, metrics = train_step(state, batch, jax.random.fold_in(base_key, step))
                if pending is not None:
                    drain(*pending)  # the previous step's metrics, while this step runs
                pending = (step, metrics)
                done = step + 1
                boundary = (
                    done % config.log_every == 0
                    or done % config.eval_every == 0
                    or done % config.checkpoint_every == 0
                    or done == config.num_steps
                    or stopping()
                )
                if not boundary:
                    continue
                drain(*pending)
                pending = None
                scalars = run_log.window_scalars(window)
                elapsed = time.perf_counter() - window_start
                steps_per_s = len(window) / elapsed
                scalars["patches_per_s"] = sum(m["valid_patches"] for m in window) / elapsed
                scalars["steps_per_s"] = steps_per_s
                if done % config.eval_every == 0 or done == config.num_steps:
                    vb = input_pipeline.val_batch(
                        val_bank, step, config.seed, val_geometry.padded_slices
                    )
                    vm = eval_step(
                        state, parallel.to_global(vb, mesh), jax.random.fold_in(base_key, step)
                    )
                    scalars.update({k: float(v) for k, v in jax.device_get(vm).items()})
                log.write(done, scalars)
                if is_main:
                    print(
                        run_log.progress_line(
                            done, config.num_steps, scalars, steps_per_s, scalars["patches_per_s"]
                        ),
                        flush=True,
                    )
                if done % config.checkpoint_every == 0 or done == config.num_steps or stopping():
                    ckpt.save(done, state)
                    last_saved = done
                window, window_start = [], time.perf_counter()
                if stopping():
                    break
            # Also a signal during the last step: the caller must not evaluate. All processes agree.
            names = [stop.requested] if single else parallel.gather_objects(stop.requested)
            name = next((n for n in names if n), None)
            if name is not None:
                print(f"p2l: {name}: checkpointed step {last_saved} of {config.num_steps}; "
                      "stopping without evaluation", flush=True)  # fmt: skip
                raise interrupt.Interrupted(name, f"checkpointed step {last_saved}")
    finally:
        log.close()
    return state
