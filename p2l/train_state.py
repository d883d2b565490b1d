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
        model = create_model(config)
        tx = make_optimizer(config)
        like = create_train_state(config, model, tx, jax.random.key(0))
        like = jax.device_put(like, parallel.replicated(parallel.create_mesh()))
        state = ckpt.restore(like, step)
    finally:
        ckpt.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return model, variables, int(step)
