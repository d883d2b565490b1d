"""Checks a config before any work starts, so a missing path fails at once with what to set."""

from __future__ import annotations

from pathlib import Path

from experiments.base import REQUIRED_PATHS
from p2l.errors import ConfigError

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
    if config.modality not in ("t1", "t2"):
        raise ConfigError("modality", f"{config.modality!r}; expected 't1' or 't2'")
    if config.loss.type not in ("beta_nll", "stirn", "mse"):
        raise ConfigError("loss.type", f"{config.loss.type!r}; expected beta_nll, stirn or mse")
    if config.model.conv_impl not in ("auto", "xla"):
        raise ConfigError("model.conv_impl", f"{config.model.conv_impl!r}; expected auto or xla")
