"""Experiment config files (`path/to/config.py[:variant]`) and dotted keys (`eval.stride`).

The one loader of config files for every program that takes `--config` without absl
(`p2l.tools.sweep`, `p2l.tools.convert_torch`); `p2l.main` uses ml_collections' flag, which reads
the same files the same way. A config is locked after loading, so a misspelt key fails. A missing
file or an unknown variant is one ConfigError line naming what exists; `check_config_spec` gives
p2l.main the same answer before its config flag would turn the typo into a traceback.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import ml_collections

from p2l.errors import ConfigError

_LISTED = 12


def _config_files(folder: Path) -> list[str]:
    """Names of the .py files in `folder` that define or import get_config() (what a user can
    pass; experiments/brats.py imports t2.py's)."""
    names = []
    for path in sorted(folder.glob("*.py")):
        try:
            text = path.read_text(errors="replace")
            if "def get_config" in text or "import get_config" in text:
                names.append(path.name)
        except OSError:
            continue
    return names


def _missing_file(path: str) -> ConfigError:
    """One line naming the config files that do exist there (and the closest one)."""
    folder = Path(path).parent
    if not folder.is_dir():
        return ConfigError("config", f"{path}: no such config file (no folder {folder}/)")
    names = _config_files(folder)
    if not names:
        return ConfigError("config", f"{path}: no such config file; none in {folder}/")
    close = difflib.get_close_matches(Path(path).name, names, n=1)
    hint = f"did you mean {folder / close[0]}? " if close else ""
    more = f", ... ({len(names)} in all)" if len(names) > _LISTED else ""
    listed = ", ".join(names[:_LISTED]) + more
    return ConfigError("config", f"{path}: no such config file; {hint}configs there: {listed}")


def _load_module(path: str) -> ModuleType:
    if not Path(path).is_file():
        raise _missing_file(path)
    module_spec = importlib.util.spec_from_file_location(f"p2l_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ConfigError("config", f"{path}:{err.lineno}: {err.msg}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError("config", f"{path} defines no get_config()")
    return module


def _takes_variant(get_config) -> bool:
    try:
        params = inspect.signature(get_config).parameters.values()
    except (TypeError, ValueError):  # no signature to read: let the call decide
        return True
    return any(p.kind is not p.KEYWORD_ONLY for p in params)


def _load(spec: str) -> tuple[ModuleType, str, ml_collections.ConfigDict]:
    path, _, variant = spec.partition(":")
    module = _load_module(path)
    if variant and not _takes_variant(module.get_config):
        raise ConfigError("config", f"{path} has no variants (its get_config takes no argument)")
    try:
        config = module.get_config(variant) if variant else module.get_config()
    except ValueError as err:  # the configs' answer to an unknown ':variant'; kept, on one line
        message = " ".join(str(err).split())
        # experiments/brats.py's get_config is t2.py's: name the file the user gave.
        borrowed = getattr(module.get_config, "__module__", None) != module.__name__
        raise ConfigError("config", f"{path}: {message}" if borrowed else message) from None
    return module, variant, config


def load_config_module(spec: str) -> tuple[ModuleType, str]:
    """(module, variant) of 'experiments/x.py[:variant]'; the variant is checked here already."""
    module, variant, _ = _load(spec)
    return module, variant


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The locked config of 'experiments/x.py[:variant]', as p2l.main's --config builds it."""
    _, _, config = _load(spec)
    config.lock()
    return config


def check_config_spec(spec: str) -> None:
    """Load the config of `spec` once, so that a typo in its file or variant name stops a program
    with one line (ConfigError) before absl's config flag turns it into a traceback."""
    load_config(spec)


def config_spec_in_argv(argv: Sequence[str], flag: str = "config") -> str | None:
    """The value of `--config=X` / `--config X` in a raw command line (the last one wins, as in
    absl); None when absent. Overrides such as `--config.fold=1` are not it."""
    spec = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        for prefix in (f"--{flag}", f"-{flag}"):
            if arg.startswith(prefix + "="):
                spec = arg[len(prefix) + 1 :]
            elif arg == prefix and i + 1 < len(argv):
                spec = argv[i + 1]
    return spec


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


def unknown_key_detail(err: BaseException) -> str:
    """ml_collections' message for an override of a key a locked config lacks, unwrapped (it
    comes in nested repr()s), on one line: 'rejection_rat; Did you mean "rejection_rate" ...?'."""
    detail = str(err.args[0] if err.args else err)
    for _ in range(3):
        detail = detail.replace("\\n", "\n").replace("\\'", "'").strip("'\" \\")
    return "; ".join(line.strip("'\" \\") for line in detail.splitlines() if line.strip())
