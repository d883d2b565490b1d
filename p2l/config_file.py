"""Experiment config files (`path/to/config.py[:variant]`) and dotted keys (`eval.stride`).

The one loader of config files for every program that takes `--config` without absl
(`p2l.tools.sweep`, `p2l.tools.convert_torch`); `p2l.main` uses ml_collections' flag, which reads
the same files the same way. A config is locked after loading, so a misspelt key fails.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import ml_collections

from p2l.errors import ConfigError


def load_config_module(spec: str) -> tuple[ModuleType, str]:
    """(module, variant) of 'experiments/x.py[:variant]'."""
    path, _, variant = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError("config", f"{path}: no such config file")
    module_spec = importlib.util.spec_from_file_location(f"p2l_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError("config", f"{path} defines no get_config()")
    return module, variant


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The locked config of 'experiments/x.py[:variant]', as p2l.main's --config builds it."""
    module, variant = load_config_module(spec)
    try:
        config = module.get_config(variant) if variant else module.get_config()
    except (TypeError, ValueError) as err:  # unknown ':variant'
        raise ConfigError("config", f"{spec}: {err}") from None
    config.lock()
    return config


def get_dotted(tree, key: str, default=None):
    """tree['a']['b'] for key 'a.b' in nested dicts or ConfigDicts; `default` when absent."""
    for part in key.split("."):
        try:
            tree = tree[part]
        except (KeyError, TypeError, AttributeError):
            return default
    return tree


def set_dotted(config, key: str, value) -> None:
    """config['a']['b'] = value for key 'a.b'; the key must exist (ConfigError otherwise)."""
    node = config
    *parents, leaf = key.split(".")
    try:
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(leaf)
        node[leaf] = value
    except (KeyError, AttributeError, TypeError) as err:
        raise ConfigError(
            key, f"override {key}={value!r} does not fit the config ({err})"
        ) from None
