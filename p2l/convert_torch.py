"""Import weights trained with the original PyTorch Patch2Loc code into a p2l workdir.

    python -m p2l.convert_torch --input last_fold-1.ckpt --output runs/torch_fold1 \
        [--prefix model.] [--config experiments/brats.py] [--trust-pickle]

The reference network (spec §3.1, rebuilt in ../shared/bench/reference_torch.py) uses torchvision's
parameter names; `p2l.model` mirrors them one to one, so the mapping is a renaming plus layout
changes: conv OIHW -> HWIO, Linear (out, in) -> (in, out), BatchNorm weight/bias -> scale/bias and
running_mean/var -> the `batch_stats` mean/var. `num_batches_tracked` has no p2l counterpart
(Flax's BatchNorm uses a fixed momentum, spec §3.1) and is dropped. The conversion is strict: every
p2l parameter must be filled and every torch tensor used, or nothing is written.

The result is a TrainState checkpoint (step, params, batch_stats, opt_state) under
<output>/checkpoints/<step>, restorable by `p2l.checkpoint.Checkpointer` like a trained workdir;
step is Lightning's `global_step` when the file has one, else 0. The Adam moments are not imported:
opt_state is a fresh Adam state (evaluation never reads it; resumed training restarts Adam's bias
correction).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from p2l.errors import DataError, P2LError

TORCH_PIN = "torch==2.13.0"
# p2l head name -> the reference's nn.Sequential attribute (reference_torch.Patch2LocNet).
HEAD_NAMES = {"mean_head": "mean_branch", "logvar_head": "logvariance_branch"}
# Within a head Sequential each stage is [Linear, BatchNorm1d, ReLU], so Linear i sits at index
# 3i and its BatchNorm at 3i+1 (spec §3.1: Linear-BN1d-ReLU x4, then Linear(32, 2)).
HEAD_STRIDE = 3
# Inside a torchvision BasicBlock the shortcut is Sequential(conv1x1, BN).
BLOCK_NAMES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
# The key used to find the prefix the checkpoint puts in front of the network's names.
ANCHOR_KEY = "encoder.conv1.weight"
_LAYER_RE = re.compile(r"^layer(\d)_(\d)$")


# ---------------------------------------------------------------------------------------------
# Name and layout mapping (numpy in and out; jax only traces the model for its shapes)
# ---------------------------------------------------------------------------------------------


def _torch_module(path: tuple[str, ...]) -> str:
    """torch module name of the p2l module at `path` (without the leaf name)."""
    top, *rest = path
    if top == "encoder":
        out = ["encoder"]
        for part in rest:
            layer = _LAYER_RE.match(part)
            if layer:
                out += [f"layer{layer.group(1)}", layer.group(2)]
            else:
                out.append(BLOCK_NAMES.get(part, part))
        return ".".join(out)
    stage = re.match(r"^(linear|bn)(\d+)$", rest[0]) if len(rest) == 1 else None
    if top in HEAD_NAMES and stage:
        offset = 0 if stage.group(1) == "linear" else 1
        return f"{HEAD_NAMES[top]}.{HEAD_STRIDE * int(stage.group(2)) + offset}"
    raise KeyError(f"no torch counterpart for p2l module {'/'.join(path)}")


def _conv_to_flax(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO


def _linear_to_flax(w: np.ndarray) -> np.ndarray:
    return np.transpose(w)  # (out, in) -> (in, out)


def _identity(w: np.ndarray) -> np.ndarray:
    return w


# p2l (collection, leaf) -> torch leaf, for the leaves whose layout is the same in both.
_LEAVES: dict[tuple[str, str], str] = {
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _leaf_rule(
    collection: str, leaf: str, flax_shape: tuple[int, ...]
) -> tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]:
    if collection == "params" and leaf == "kernel":
        if len(flax_shape) == 4:  # HWIO conv kernel
            h, w, i, o = flax_shape
            return "weight", (o, i, h, w), _conv_to_flax
        return "weight", tuple(reversed(flax_shape)), _linear_to_flax
    return _LEAVES[(collection, leaf)], tuple(flax_shape), _identity


def expected_variable_shapes() -> dict[str, dict]:
    """Shapes of the p2l variables ({"params", "batch_stats"}) from the model itself, not a copy.

    `jax.eval_shape` traces `p2l.model` without computing anything, so this stays in step with
    model.py; the parameters do not depend on the patch size (global average pool, spec §3.1).
    """
    import jax

    from p2l import model as model_lib

    abstract = jax.eval_shape(
        lambda: model_lib.init_variables(model_lib.Patch2Loc(), jax.random.key(0), 24)
    )
    return jax.tree_util.tree_map(lambda x: tuple(x.shape), abstract)


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def torch_key_map(
    shapes: Mapping[str, Mapping] | None = None,
) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], Callable[[np.ndarray], np.ndarray]]]:
    """torch state-dict key -> (p2l path incl. collection, expected torch shape, to-flax layout)."""
    shapes = expected_variable_shapes() if shapes is None else shapes
    table = {}
    for path, flax_shape in _flatten(shapes).items():
        collection, *module, leaf = path
        torch_leaf, torch_shape, to_flax = _leaf_rule(collection, leaf, tuple(flax_shape))
        table[f"{_torch_module(tuple(module))}.{torch_leaf}"] = (path, torch_shape, to_flax)
    return table


def torch_state_dict_to_variables(
    state_dict: Mapping[str, np.ndarray], source: str | Path = "<state dict>"
) -> dict[str, dict]:
    """A reference-network state dict (numpy, prefix removed) -> {"params", "batch_stats"}.

    Strict: raises DataError naming `source` and listing every missing key, unexpected key, shape
    mismatch and non-finite or negative-variance tensor; nothing is returned half-filled.
    """
    table = torch_key_map()
    bn_modules = {k.rsplit(".", 1)[0] for k in table if k.endswith(".running_mean")}
    missing = sorted(set(table) - set(state_dict))
    unexpected, bad_shape, bad_value = [], [], []
    flat = {}
    for key, value in state_dict.items():
        if key.endswith(".num_batches_tracked") and key.rsplit(".", 1)[0] in bn_modules:
            continue  # torch's BN step counter; Flax BN has no counterpart (module docstring)
        if key not in table:
            unexpected.append(key)
            continue
        path, torch_shape, to_flax = table[key]
        array = np.asarray(value)
        if array.shape != torch_shape or not np.issubdtype(array.dtype, np.floating):
            bad_shape.append(
                f"{key}: {array.dtype}{list(array.shape)}, expected float{list(torch_shape)} "
                f"(for p2l {'/'.join(path)})"
            )
            continue
        array = array.astype(np.float32)
        if not np.all(np.isfinite(array)):
            bad_value.append(f"{key}: contains NaN or infinity")
        elif path[-1] == "var" and np.any(array < 0):
            bad_value.append(f"{key}: negative running variance")
        flat[path] = np.ascontiguousarray(to_flax(array))
    problems = []
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", sorted(unexpected)),
        ("shape or dtype mismatches", bad_shape),
        ("bad values", bad_value),
    ):
        if items:
            shown = "\n  ".join(items[:40])
            more = f"\n  ... and {len(items) - 40} more" if len(items) > 40 else ""
            problems.append(f"{len(items)} {title}:\n  {shown}{more}")
    if problems:
        raise DataError(
            source,
            "does not match the Patch2Loc reference network (spec §3.1):\n" + "\n".join(problems),
        )
    tree = _unflatten(flat)
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}


def strip_prefix(
    state_dict: Mapping[str, Any], prefix: str | None, source: str | Path = "<state dict>"
) -> tuple[dict[str, Any], str]:
    """Removes the prefix the checkpoint puts before the network's names (e.g. Lightning's
    `model.`); `prefix=None` detects it from the key ending in `encoder.conv1.weight`.

    Keys outside the prefix are kept under their full name, so the strict check reports them.
    """
    if prefix is None:
        found = sorted(
            {
                k[: -len(ANCHOR_KEY)]
                for k in state_dict
                if k.endswith(ANCHOR_KEY) and (k == ANCHOR_KEY or k[-len(ANCHOR_KEY) - 1] == ".")
            }
        )
        if not found:
            first = ", ".join(list(state_dict)[:8]) or "(none)"
            raise DataError(
                source,
                f"no key ends with {ANCHOR_KEY!r}, so this is not a Patch2Loc state dict "
                f"(first keys: {first})",
            )
        if len(found) > 1:
            raise DataError(
                source,
                f"several networks in one state dict (prefixes {found}); choose one with --prefix",
            )
        prefix = found[0]
    elif prefix and not any(k.startswith(prefix) for k in state_dict):
        raise DataError(
            source,
            f"no key starts with prefix {prefix!r} (found e.g. {next(iter(state_dict), '')!r})",
        )
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        name = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        if name in out:
            raise DataError(source, f"key {name!r} occurs both with and without prefix {prefix!r}")
        out[name] = value
    return out, prefix


# ---------------------------------------------------------------------------------------------
# Reading the torch file
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


def load_config(spec: str | None):
    """The experiment config named like p2l.main's --config (`file.py[:variant]`), or the base."""
    if spec is None:
        from experiments import base

        return base.base_config()
    file, *variant = spec.split(":", 1)
    if not Path(file).is_file():
        raise DataError(file, "no such config file")
    module_spec = importlib.util.spec_from_file_location("p2l_converter_config", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        config = module.get_config(*variant)
    except (AttributeError, TypeError, ValueError) as err:  # no get_config, unknown ':variant'
        raise DataError(file, f"cannot build the config: {err}") from err
    config.lock()  # as p2l.main's --config: a misspelt key fails instead of being added
    return config


def train_state_from_variables(config, variables: Mapping[str, Any], step: int):
    """A TrainState shaped exactly as `p2l.train.create_train_state` builds it for `config`."""
    import jax
    import jax.numpy as jnp

    from p2l import train
    from p2l.model import create_model

    model = create_model(config)
    tx = train.make_optimizer(config)
    # eval_shape: the template's structure, shapes and dtypes without running the model's init.
    template = jax.eval_shape(
        lambda: train.create_train_state(config, model, tx, jax.random.key(0))
    )
    params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
    batch_stats = jax.tree_util.tree_map(jnp.asarray, variables["batch_stats"])
    state = train.TrainState(
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
    from p2l import checkpoint, run_log

    input_path, output_dir = Path(input_path), Path(output_dir)
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
    run_log.write_json_atomic(
        output_dir / "converted_from.json",
        {
            "input": str(input_path.absolute()),
            "sha256": _sha256(input_path),
            "prefix": used_prefix,
            "step": step,
            "config": config_spec or "experiments/base.py",
            **meta,
        },
    )
    return ckpt.directory / str(step)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m p2l.convert_torch",
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
        help="experiment config (file.py[:variant]) whose TrainState to write (default: base)",
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
