"""run_info.json: what the latest training start of a run was made with (versions, git SHA,
devices, the numerics actually used, the full config, the identity hash), written once the config
passed the identity check (`p2l.run_identity`). Detection reads its config back, with the
identity keys taken from the checkpoint's stored identity, which is what the model was trained
with.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import ml_collections

from p2l.atomic_write import write_json_atomic
from p2l.errors import DataError

FILENAME = "run_info.json"
_PACKAGES = ("jax", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets")


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def numerics(config) -> dict:
    """What the config's numerics settings mean on this backend: the conv form "auto" resolved
    to (p2l.layers.resolve_conv_impl, as create_model) and the matmul precision."""
    import jax

    from p2l.layers import resolve_conv_impl

    return {
        "backend": jax.default_backend(),
        "conv_impl": resolve_conv_impl(config.model.conv_impl),
        "matmul_precision": config.get("matmul_precision", "default"),
    }


def describe(config) -> dict:
    import jax

    return {
        "argv": sys.argv,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in _PACKAGES},
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "process_count": jax.process_count(),
        "numerics": numerics(config),
        "config": config.to_dict(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write(workdir: Path, config, **extra) -> None:
    write_json_atomic(Path(workdir) / FILENAME, {**describe(config), **extra})


def read_trained_config(workdir: str | Path) -> dict | None:
    """The config a run in `workdir` was trained with, or None when it has no run_info.json."""
    path = Path(workdir) / FILENAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(path, f"not a p2l run_info.json ({err})") from None


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The trained config of a run folder as a ConfigDict, its identity keys as stored with the
    latest checkpoint; a clear error when there is none."""
    from p2l import run_identity

    trained = read_trained_config(workdir)
    if trained is None:
        raise DataError(
            Path(workdir) / FILENAME, "not found: --workdir must be a trained p2l run folder"
        )
    stored = run_identity.stored_identity(workdir)
    if stored is not None:
        trained = run_identity.overlay(trained, stored)
    return ml_collections.ConfigDict(trained)
