"""Checks a config before any work starts, so a missing path fails at once with what to set."""

from __future__ import annotations

from pathlib import Path

from p2l.errors import ConfigError
from p2l.layers import CONV_IMPLS
from p2l.losses import LOSS_TYPES

# Keys every config leaves for the user to set (experiments/base.py leaves them None).
REQUIRED_PATHS = ("data_root", "splits_dir")
MODALITIES = ("t1", "t2")

HINTS = {
    "data_root": "the preprocessed data folder holding Train/ixi/... and Test/<Dataset>/... "
    "(see README, 'Data')",
    "splits_dir": "the folder of split CSVs in the reference format (IXI_train_fold0.csv, ...), "
    "e.g. a checkout of the reference repository's splits/",
}


def check_paths(config) -> None:
    """Raises ConfigError naming the first required path that is unset or missing."""
    for key in REQUIRED_PATHS:
        value = config.get(key)
        if not value:
            raise ConfigError(key, f"not set. Pass --config.{key}=/path/to/folder ({HINTS[key]}).")
        if not Path(value).is_dir():
            raise ConfigError(key, f"{value!r} is not a folder ({HINTS[key]}).")
    if config.modality not in MODALITIES:
        raise ConfigError("modality", f"{config.modality!r}; expected 't1' or 't2'")
    if config.loss.type not in LOSS_TYPES:
        raise ConfigError("loss.type", f"{config.loss.type!r}; expected {', '.join(LOSS_TYPES)}")
    if config.model.conv_impl not in CONV_IMPLS:
        raise ConfigError("model.conv_impl", f"{config.model.conv_impl!r}; expected auto or xla")
