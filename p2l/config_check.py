"""Checks a config before any work starts, so a missing path fails at once with what to set."""

from __future__ import annotations

from pathlib import Path

from p2l.errors import ConfigError
from p2l.layers import CONV_IMPLS, MATMUL_PRECISIONS
from p2l.losses import LOSS_TYPES

# Keys every config leaves for the user to set (experiments/base.py leaves them None).
REQUIRED_PATHS = ("data_root", "splits_dir")
MODALITIES = ("t1", "t2")
DEVICE_SLICES = ("auto", "device", "host")  # p2l.device_slices.choose
HEALTHY_TEST_SPLITS = ("", "val", "ixi_test")  # p2l.healthy_fpr

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
    device_slices = config.data.get("device_slices", "auto")  # configs of older runs lack it
    if device_slices not in DEVICE_SLICES:
        raise ConfigError("data.device_slices", f"{device_slices!r}; expected auto, device or host")
    workers = config.eval.get("workers", 0)  # configs of older runs lack it (p2l.eval_stream)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError("eval.workers", f"{workers!r}; expected an integer >= 0 (0 = all CPUs)")
    healthy_test = config.eval.get("healthy_test_split", "")  # older runs' configs lack it
    if healthy_test not in HEALTHY_TEST_SPLITS:
        raise ConfigError("eval.healthy_test_split",
                          f"{healthy_test!r}; expected '' (none), 'val' or 'ixi_test'")  # fmt: skip
    check_numerics(config)


def check_numerics(config) -> None:
    """Raises ConfigError for an unknown model.conv_impl or matmul_precision."""
    if config.model.conv_impl not in CONV_IMPLS:
        raise ConfigError(
            "model.conv_impl", f"{config.model.conv_impl!r}; expected {', '.join(CONV_IMPLS)}"
        )
    # Configs from before the key (read back from an old run's run_info.json) lack it.
    precision = config.get("matmul_precision", "default")
    if precision not in MATMUL_PRECISIONS:
        raise ConfigError(
            "matmul_precision", f"{precision!r}; expected {', '.join(MATMUL_PRECISIONS)}"
        )
