"""PyTorch Patch2Loc weights <-> p2l variables: the name and layout mapping (spec §3.1).

The reference network uses torchvision's parameter names; `p2l.model` mirrors them one to one,
so the mapping is a renaming plus layout changes: conv OIHW -> HWIO, Linear (out, in) -> (in, out),
BatchNorm weight/bias -> scale/bias and running_mean/var -> the `batch_stats` mean/var.
`num_batches_tracked` has no p2l counterpart (Flax's BatchNorm uses a fixed momentum, spec §3.1)
and is dropped. The conversion is strict: every p2l parameter must be filled and every torch
tensor used. Numpy in and out; `p2l.tools.convert_torch` reads the files and writes checkpoints.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from p2l.errors import DataError

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
