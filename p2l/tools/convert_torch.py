"""Import weights trained with the original PyTorch Patch2Loc code into a p2l workdir.

    python -m p2l.tools.convert_torch --input last_fold-1.ckpt --output runs/torch_fold1 \
        [--prefix model.] [--config experiments/brats.py] [--trust-pickle]

The names and layouts are mapped by `p2l.torch_weights` (spec §3.1), strictly: every p2l
parameter must be filled and every torch tensor used, or nothing is written.

The result is a TrainState checkpoint (step, params, batch_stats, opt_state) under
<output>/checkpoints/<step>, restorable by `p2l.checkpoint.Checkpointer` like a trained workdir;
step is Lightning's `global_step` when the file has one, else 0. The Adam moments are not imported:
opt_state is a fresh Adam state (evaluation never reads it; resumed training restarts Adam's bias
correction).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from p2l.atomic_write import write_json_atomic
from p2l.config_file import load_config
from p2l.errors import DataError, P2LError
from p2l.torch_weights import strip_prefix, torch_state_dict_to_variables

TORCH_PIN = "torch==2.13.0"
# The reference geometry (192x192 slices, 24-px patches), as a file like any --config value.
DEFAULT_CONFIG = str(Path(__file__).resolve().parents[2] / "experiments" / "brats.py")
# ---------------------------------------------------------------------------------------------


def _import_torch():
    try:
        import torch
    except ImportError as err:
        raise P2LError(
            f"reading a PyTorch checkpoint needs torch, which is not installed: "
            f"pip install {TORCH_PIN} (the CPU build is enough)"
        ) from err
    return torch


def load_torch_checkpoint(
    path: str | Path, trust_pickle: bool = False
) -> tuple[dict[str, np.ndarray], dict]:
    """Reads a .pt/.ckpt file -> (state dict as float numpy arrays, metadata such as global_step).

    Accepts a plain state dict, a Lightning checkpoint ({"state_dict": ..., "global_step": ...}),
    a {"model_state_dict": ...} dict, or (with trust_pickle) a pickled nn.Module.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such file")
    torch = _import_torch()
    try:
        # weights_only=True refuses arbitrary pickled objects (code execution on load); Lightning
        # files whose hyper_parameters hold e.g. OmegaConf objects need the caller's trust.
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = (
            ""
            if trust_pickle
            else "; if it holds pickled Python objects (Lightning hyper-parameters) and you "
            "trust the file, rerun with --trust-pickle"
        )
        raise DataError(path, f"cannot be read as a PyTorch checkpoint ({detail}){hint}") from err

    meta: dict[str, Any] = {}
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    elif isinstance(obj, Mapping):
        for field in ("global_step", "epoch"):
            if isinstance(obj.get(field), int):
                meta[field] = int(obj[field])
        for field in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(field), Mapping):
                obj = obj[field]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise DataError(path, f"holds a {type(obj).__name__}, not a (non-empty) state dict")
    state_dict, dtypes = {}, set()
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise DataError(
                path,
                f"state dict entry {key!r} is a {type(value).__name__}, not a tensor "
                f"(top-level keys: {', '.join(map(str, list(obj)[:10]))})",
            )
        value = value.detach().cpu()
        if value.is_floating_point():
            dtypes.add(str(value.dtype).removeprefix("torch."))
            value = value.float()  # fp16/bf16 (the reference's .half() inference) -> float32
        state_dict[str(key)] = value.numpy()
    meta["source_dtypes"] = sorted(dtypes)
    meta["torch"] = torch.__version__
    return state_dict, meta


# ---------------------------------------------------------------------------------------------
# Writing the p2l checkpoint
# ---------------------------------------------------------------------------------------------


def train_state_from_variables(config, variables: Mapping[str, Any], step: int):
    """A TrainState shaped exactly as `train_state.create_train_state` builds it for `config`."""
    import jax
    import jax.numpy as jnp

    from p2l import train_state
    from p2l.model import create_model

    model = create_model(config)
    tx = train_state.make_optimizer(config)
    # eval_shape: the template's structure, shapes and dtypes without running the model's init.
    template = jax.eval_shape(
        lambda: train_state.create_train_state(config, model, tx, jax.random.key(0))
    )
    params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
    batch_stats = jax.tree_util.tree_map(jnp.asarray, variables["batch_stats"])
    state = train_state.TrainState(
        step=jnp.asarray(step, template.step.dtype),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
    )
    # Structure, shapes and dtypes must agree leaf for leaf, or a restore would fail or mislead.
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    if shapes(state) != shapes(template):
        raise ValueError("converted state does not match create_train_state's (bug)")
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(
    input_path: str | Path,
    output_dir: str | Path,
    prefix: str | None = None,
    config_spec: str | None = None,
    trust_pickle: bool = False,
) -> Path:
    """Converts a torch checkpoint into <output_dir>/checkpoints/<step>; returns that folder."""
    from p2l import checkpoint

    input_path, output_dir = Path(input_path), Path(output_dir)
    config_spec = config_spec or DEFAULT_CONFIG
    config = load_config(config_spec)
    raw, meta = load_torch_checkpoint(input_path, trust_pickle=trust_pickle)
    state_dict, used_prefix = strip_prefix(raw, prefix, input_path)
    variables = torch_state_dict_to_variables(state_dict, input_path)
    step = meta.get("global_step", 0)

    ckpt = checkpoint.Checkpointer(output_dir, keep=1)
    existing = ckpt.latest_step()
    if existing is not None:
        ckpt.close()
        raise DataError(
            ckpt.directory,
            f"already holds a checkpoint (step {existing}); convert into an empty workdir",
        )
    state = train_state_from_variables(config, variables, step)
    ckpt.save(step, state)  # orbax writes a temporary folder and renames it when complete
    ckpt.close()
    write_json_atomic(
        output_dir / "converted_from.json",
        {
            "input": str(input_path.absolute()),
            "sha256": _sha256(input_path),
            "prefix": used_prefix,
            "step": step,
            "config": config_spec,
            **meta,
        },
    )
    return ckpt.directory / str(step)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m p2l.tools.convert_torch",
        description="Import a PyTorch Patch2Loc checkpoint (.pt / Lightning .ckpt) into a p2l "
        "workdir that evaluation can use like a trained one.",
    )
    ap.add_argument("--input", required=True, help="torch checkpoint: state dict or Lightning")
    ap.add_argument("--output", required=True, help="p2l workdir to create (must hold no ckpt)")
    ap.add_argument(
        "--prefix",
        default=None,
        help="prefix before the network's keys, e.g. 'model.' (default: detected; '' for none)",
    )
    ap.add_argument(
        "--config",
        default=None,
        help="experiment config (file.py[:variant]) whose TrainState to write "
        "(default: experiments/brats.py, the reference's geometry)",
    )
    ap.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load with torch.load(weights_only=False): runs code in the file, trusted files only",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        written = convert(args.input, args.output, args.prefix, args.config, args.trust_pickle)
    except P2LError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"p2l: wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
