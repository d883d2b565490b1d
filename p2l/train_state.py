"""The train state (step, parameters, BatchNorm statistics, Adam state): created by training,
restored by training, evaluation and detection (spec §3.3).

Inference imports this module, not `p2l.train`, so scoring a scan never loads the training loop
or TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from p2l import checkpoint, config_check, parallel, patches, run_identity
from p2l.config_file import get_dotted
from p2l.errors import ConfigError, DataError
from p2l.model import create_model, init_variables
from p2l.run_info import read_trained_config

# What fixes a model's input (the network is fully convolutional, so a checkpoint of another
# patch size would load without a shape error): what is checked for runs without an identity.
INPUT_KEYS = ("modality", "data.image_shape", "sampling.patch_fraction")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def keep_if_finite(finite: jax.Array, new_state: TrainState, old_state: TrainState) -> TrainState:
    """`new_state` when `finite` (a scalar bool), else `old_state`, leaf by leaf: a training step
    whose loss or gradients are not finite changes nothing, step count included, so no NaN ever
    reaches a checkpoint. Both states must have the same structure."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_state, old_state)


def apply_step(tx, state: TrainState, loss, grads, batch_stats, batch: dict):
    """(new state, metrics) of one optimiser step, kept only when the loss and the gradient norm
    are finite (`keep_if_finite`); the metrics every method's step reports: loss, grad_norm,
    param_norm, finite, and the multi-process stop flag when the batch carries one."""
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    stepped = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=new_opt_state)  # fmt: skip
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": optax.global_norm(state.params),
        "finite": finite.astype(jnp.float32),
        **({"stop": jnp.max(batch["stop"])} if "stop" in batch else {}),
    }
    return keep_if_finite(finite, stepped, state), metrics


def make_optimizer(config) -> optax.GradientTransformation:
    # Adam, betas (0.9, 0.999), eps 1e-8, constant lr, no weight decay or clipping (spec §3.3).
    return optax.adam(config.optim.learning_rate, b1=0.9, b2=0.999, eps=1e-8)


def create_train_state(config, model, tx, key) -> TrainState:
    patch = patches.patch_size_for(config.data.image_shape[0], config.sampling.patch_fraction)
    variables = init_variables(model, key, patch)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
    )


def check_trained_like(config, workdir: Path, step: int | None = None) -> None:
    """ConfigError when checkpoint `step` (default: the latest) of `workdir` was trained with
    another identity than `config` (p2l.run_identity). Runs from before identity files are
    checked on their input keys against run_info.json."""
    if run_identity.check_checkpoint(config, workdir, step):
        return
    trained = read_trained_config(workdir)
    if trained is None:
        return
    for key in INPUT_KEYS:
        want, got = get_dotted(config.to_dict(), key), get_dotted(trained, key)
        if got is not None and list(np.ravel(got)) != list(np.ravel(want)):
            raise ConfigError(
                key,
                f"the checkpoint in {workdir} was trained with {key}={got!r}, "
                f"but this config has {want!r}",
            )


def restore_variables(config, workdir: str | Path) -> tuple[Any, dict, int]:
    """(model, eval-mode variables, step) of the latest checkpoint in `workdir`.

    Fails with a clear message when there is no checkpoint, when it was trained with another
    identity (modality, patch size, fold, ...: the identity stored with that checkpoint), or when
    its shapes do not fit the config.
    """
    workdir = Path(workdir)
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise DataError(workdir, "no checkpoint found: train first (make train CONFIG=...)")
        check_trained_like(config, workdir, step)
        config_check.check_numerics(config)  # detection reads its config from the run folder
        if config_check.method(config) == "dae":
            from p2l import dae_model, dae_step

            model = dae_model.create_dae_model(config)
            tx = dae_step.make_dae_optimizer(config)
            like = dae_step.create_dae_state(config, model, tx, jax.random.key(0))
        else:
            model = create_model(config)
            tx = make_optimizer(config)
            like = create_train_state(config, model, tx, jax.random.key(0))
        like = jax.device_put(like, parallel.replicated(parallel.create_mesh()))
        state = ckpt.restore(like, step)
    finally:
        ckpt.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return model, variables, int(step)
