"""train_and_evaluate(config, workdir): mesh, data, init/restore, jitted step, loop (spec §3.3).

The loop is the same for both methods a run can train (`config.method`): Patch2Loc, whose steps
(on-device patch sampling, the Gaussian-NLL location loss) are in p2l.patch2loc_step, and the
pixel-wise DAE it is fused with, whose steps are in p2l.dae_step. Both are pure functions
(state, batch, key) -> (state, metrics), jitted over a ('data',) mesh with the batch of slices
sharded and the state replicated; checkpoints, resume, identity checks, stop signals, NaN stops
and progress lines are shared.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

# The input pipeline (TensorFlow, through device_slices too) and orientation (nibabel) are
# imported where the loop uses them: the train step alone builds without them (a bare GPU
# machine's `make gpu-check`, benchmarks.gpu_check).
from p2l import (
    checkpoint,
    config_check,
    disk_check,
    interrupt,
    parallel,
    patches,
    run_identity,
    run_info,
    run_log,
    workdir_lock,
)
from p2l.config_check import method
from p2l.errors import P2LError
from p2l.model import count_params, create_model, init_variables

# Patch2Loc's steps, also imported from here by callers of old (benchmarks, tests).
from p2l.patch2loc_step import (  # noqa: F401
    StepGeometry,
    make_eval_step,
    make_sampler,
    make_train_step,
    step_geometry,
)
from p2l.train_state import TrainState, create_train_state, make_optimizer


class TrainingDiverged(P2LError):
    """The loss or gradient became non-finite; the state from before that step is kept."""


def _check_finite(step: int, metrics: dict, last_saved: int | None) -> None:
    if metrics["finite"] < 1.0:
        raise TrainingDiverged(
            f"non-finite loss at step {step} (loss={metrics['loss']}, "
            f"grad_norm={metrics['grad_norm']}); the update was not applied and no checkpoint "
            f"was written after it (last checkpoint: step {last_saved}). Lower "
            "config.optim.learning_rate or check the input data for extreme values."
        )


def _checkpoint_bytes(config) -> int:
    """Kept checkpoints: about 3 float32 copies of the parameters each (params, Adam's moments;
    the DAE's AMSGrad keeps a fourth, its running maximum)."""
    if method(config) == "dae":
        from p2l import dae_model

        model = dae_model.create_dae_model(config)
        h, w = config.data.image_shape[:2]
        init = lambda: dae_model.init_dae_variables(model, jax.random.key(0), h, w)  # noqa: E731
        copies = 4
    else:
        patch = patches.patch_size_for(config.data.image_shape[0], config.sampling.patch_fraction)
        init = lambda: init_variables(create_model(config), jax.random.key(0), patch)  # noqa: E731
        copies = 3
    shapes = jax.eval_shape(init)
    return copies * 4 * count_params(shapes["params"]) * config.keep_checkpoints


@dataclass
class MethodSteps:
    """What the loop needs of the method being trained (Patch2Loc or the DAE, `config.method`)."""

    model: object
    tx: object
    create_state: object  # key -> TrainState
    train_step: object  # jitted (state, batch, key) -> (state, metrics)
    eval_step: object  # jitted (state, batch, key) -> metrics
    padded_slices: int  # training rows per step, padded to the device count
    val_padded_slices: int
    description: str  # for the start line
    unit: str  # what the throughput counts
    count_key: str  # the per-step metric that counts it


def method_steps(config, mesh, val_rows: int) -> MethodSteps:
    devices = mesh.devices.size
    slices = config.sampling.slices_per_step
    if method(config) == "dae":
        from p2l import dae_model, dae_step

        model = dae_model.create_dae_model(config)
        tx = dae_step.make_dae_optimizer(config)
        d = config.dae
        return MethodSteps(
            model, tx, lambda key: dae_step.create_dae_state(config, model, tx, key),
            dae_step.make_dae_train_step(model, tx, config, slices, mesh),
            dae_step.make_dae_eval_step(model, config, val_rows, mesh),
            parallel.padded_size(slices, devices), parallel.padded_size(val_rows, devices),
            f"DAE U-Net depth {d.depth}, width {d.width}; {slices} slices/step, noise std "
            f"{d.noise_std} on a {d.noise_res}x{d.noise_res} grid", "slices", "valid_slices",
        )  # fmt: skip
    geometry = step_geometry(config, slices, config.sampling.num_candidates, devices)
    # Validation draws the same number of candidates over the (fewer) val slices (spec §3.3).
    val_geometry = step_geometry(config, val_rows, config.sampling.num_candidates, devices)
    model = create_model(config)
    tx = make_optimizer(config)
    return MethodSteps(
        model, tx, lambda key: create_train_state(config, model, tx, key),
        make_train_step(model, tx, config, geometry, mesh),
        make_eval_step(model, config, val_geometry, mesh),
        geometry.padded_slices, val_geometry.padded_slices,
        f"patch {geometry.patch}px, {geometry.num_candidates} candidates/step, buffer "
        f"{geometry.capacity} patches", "patches", "valid_patches",
    )  # fmt: skip


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
    steps = method_steps(config, mesh, val_bank.num_rows)
    input_path, input_why = device_slices.choose_for(config, train_bank, mesh)
    print(
        f"p2l: {train_bank.num_rows} training rows, {val_bank.num_rows} validation rows, "
        f"{devices} device(s) ({jax.devices()[0].device_kind}); {steps.description}; "
        f"training slices on the {input_path} ({input_why})",
        flush=True,
    )

    # Stateless keys (conventions): init from one stream, step s samples from fold_in(base, s).
    init_key, base_key = jax.random.split(jax.random.key(config.seed))
    state = steps.create_state(init_key)
    state = jax.device_put(state, parallel.replicated(mesh))
    if last_saved is not None:
        state = ckpt.restore(state, last_saved)
        print(f"p2l: resumed from {ckpt.directory}/{last_saved}", flush=True)
    start = int(state.step)
    if start >= config.num_steps:
        print(f"p2l: already trained to step {start} (num_steps={config.num_steps})", flush=True)
        return state

    train_step, eval_step = steps.train_step, steps.eval_step
    batches = device_slices.train_feed(
        train_bank, config, steps.padded_slices, start, mesh, input_path
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
                rows = steps.padded_slices // jax.process_count()
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
                rate = sum(m[steps.count_key] for m in window) / elapsed
                scalars[f"{steps.unit}_per_s"] = rate
                scalars["steps_per_s"] = steps_per_s
                if done % config.eval_every == 0 or done == config.num_steps:
                    vb = input_pipeline.val_batch(
                        val_bank, step, config.seed, steps.val_padded_slices
                    )
                    vm = eval_step(
                        state, parallel.to_global(vb, mesh), jax.random.fold_in(base_key, step)
                    )
                    scalars.update({k: float(v) for k, v in jax.device_get(vm).items()})
                log.write(done, scalars)
                if is_main:
                    print(
                        run_log.progress_line(
                            done, config.num_steps, scalars, steps_per_s, rate, steps.unit
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
