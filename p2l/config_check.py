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
METHODS = ("patch2loc", "dae")  # what a run trains: Patch2Loc, or the DAE (p2l.dae_step)

HINTS = {
    "data_root": "the preprocessed data folder holding Train/ixi/... and Test/<Dataset>/... "
    "(see README, 'Data')",
    "splits_dir": "the folder of split CSVs in the reference format (IXI_train_fold0.csv, ...), "
    "e.g. a checkout of the reference repository's splits/",
}


def method(config) -> str:
    """`config.method` ("patch2loc" for configs of runs from before the key)."""
    found = config.get("method", "patch2loc")
    if found not in METHODS:
        raise ConfigError("method", f"{found!r}; expected one of {', '.join(METHODS)}")
    return found


def pixel_workdir(config) -> str:
    """`eval.pixel_workdir` with `{fold}` and `{seed}` filled in from the config, so that a sweep
    fuses each fold's Patch2Loc with the same fold's DAE ("runs/dae_t2/fold={fold},seed={seed}")."""
    raw = config.eval.get("pixel_workdir", "")
    if not raw:
        return ""
    try:
        return raw.format(fold=config.fold, seed=config.seed)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            "eval.pixel_workdir", f"{raw!r}: only {{fold}} and {{seed}} can be filled in ({err})"
        ) from None


def check_fusion(config) -> None:
    """The fusion keys (p2l.fusion): known rules, a weight in [0, 1], an existing DAE run."""
    from p2l import fusion

    ev = config.eval
    fusion.check_rules(ev.get("fusion", fusion.RULES))
    weight = ev.get("fusion_weight", 0.5)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise ConfigError("eval.fusion_weight", f"{weight!r}; expected a number in [0, 1]")
    gate_q = ev.get("fusion_gate_quantile", 0.0)
    if isinstance(gate_q, bool) or not isinstance(gate_q, (int, float)) or not 0 <= gate_q < 100:
        raise ConfigError(
            "eval.fusion_gate_quantile",
            f"{gate_q!r}; expected a percentile in [0, 100), 0 = healthy_quantile",
        )
    pixel = pixel_workdir(config)
    if pixel and method(config) != "patch2loc":
        raise ConfigError("eval.pixel_workdir", "is for a Patch2Loc run (fused with the DAE run "
                          "it names); this run is a DAE run: leave it empty")  # fmt: skip
    if pixel and not (Path(pixel) / "run_info.json").is_file():
        raise ConfigError("eval.pixel_workdir", f"{pixel!r} is not a trained DAE run folder (no "
                          "run_info.json): train it first, e.g. make train "
                          "CONFIG=experiments/dae_t2.py")  # fmt: skip


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
    method(config)
    check_fusion(config)
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
