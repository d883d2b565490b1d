"""p2l.torch_weights and p2l.tools.convert_torch: name/layout mapping, strictness errors, and
equal outputs with the reference.

The strictness tests run without torch: they build a torch-named numpy state dict from a p2l
variable tree with an inverse mapping written here from torchvision's naming rules (independently
of the module's table). The equivalence and CLI tests need torch and ../shared/bench.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p2l import config_file, torch_weights
from p2l import model as model_lib
from p2l.errors import DataError, P2LError
from p2l.tools import convert_torch
from tests.torch_reference import reference_network

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# An independent inverse mapping: p2l variables -> torchvision-named numpy state dict.
# ------------------------------------------------------------------------------------------------


def _torch_name(path: tuple[str, ...]) -> str:
    top, *module = path
    if top == "encoder":
        parts = ["encoder"]
        for p in module:
            if p.startswith("layer"):  # layer3_1 -> layer3.1
                parts += p.split("_")
            elif p == "downsample_conv":
                parts.append("downsample.0")
            elif p == "downsample_bn":
                parts.append("downsample.1")
            else:
                parts.append(p)
        return ".".join(parts)
    branch = {"mean_head": "mean_branch", "logvar_head": "logvariance_branch"}[top]
    (name,) = module
    index = int(name[-1])
    # Sequential [Linear, BN1d, ReLU] * 4 + Linear: Linear i at 3i, BN i at 3i + 1.
    return f"{branch}.{3 * index if name.startswith('linear') else 3 * index + 1}"


def p2l_to_torch_state_dict(variables) -> dict[str, np.ndarray]:
    out = {}
    leaf_names = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    for collection in ("params", "batch_stats"):
        flat = jax.tree_util.tree_flatten_with_path(variables[collection])[0]
        for keypath, value in flat:
            path = tuple(k.key for k in keypath)
            module, leaf = _torch_name(path[:-1]), path[-1]
            value = np.asarray(value)
            if leaf == "kernel" and value.ndim == 4:
                out[f"{module}.weight"] = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
            elif leaf == "kernel":
                out[f"{module}.weight"] = value.T  # (in, out) -> (out, in)
            else:
                out[f"{module}.{leaf_names[leaf]}"] = value
            if leaf == "mean":
                out[f"{module}.num_batches_tracked"] = np.array(5, np.int64)
    return out


@pytest.fixture(scope="module")
def variables():
    """Random p2l variables with non-trivial BN affine parameters and running statistics."""
    # Shapes from the model (eval_shape: traced, nothing computed), values drawn here.
    v = jax.eval_shape(
        lambda: model_lib.init_variables(model_lib.Patch2Loc(), jax.random.key(0), 24)
    )
    leaves, treedef = jax.tree_util.tree_flatten(v)
    rng = np.random.default_rng(0)
    # Positive everywhere so running variances stay valid; distinct values expose any mix-up.
    leaves = [rng.uniform(0.5, 1.5, x.shape).astype(np.float32) for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def state_dict(variables):
    return p2l_to_torch_state_dict(variables)


def _assert_trees_equal(a, b):
    fa, ta = jax.tree_util.tree_flatten_with_path(a)
    fb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(fa, fb):
        assert np.shape(x) == np.shape(y), path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


# ------------------------------------------------------------------------------------------------
# Mapping and strictness (no torch needed)
# ------------------------------------------------------------------------------------------------


def test_round_trip_fills_every_variable_exactly(variables, state_dict):
    # 62 BN layers x (weight, bias, mean, var) + 20 convs + 10 Linears x (weight, bias) = 152.
    assert len([k for k in state_dict if not k.endswith("num_batches_tracked")]) == 152
    got = torch_weights.torch_state_dict_to_variables(state_dict)
    assert set(got) == {"params", "batch_stats"}
    _assert_trees_equal(got["params"], variables["params"])
    _assert_trees_equal(got["batch_stats"], variables["batch_stats"])
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(got))


def test_layouts_of_conv_and_linear(state_dict):
    got = torch_weights.torch_state_dict_to_variables(state_dict)
    conv = state_dict["encoder.layer2.0.downsample.0.weight"]  # (128, 64, 1, 1) OIHW
    assert conv.shape == (128, 64, 1, 1)
    kernel = got["params"]["encoder"]["layer2_0"]["downsample_conv"]["kernel"]
    np.testing.assert_array_equal(kernel[0, 0], conv[:, :, 0, 0].T)
    linear = state_dict["logvariance_branch.9.weight"]  # Linear(64, 32): (out, in)
    np.testing.assert_array_equal(got["params"]["logvar_head"]["linear3"]["kernel"], linear.T)
    np.testing.assert_array_equal(
        got["batch_stats"]["mean_head"]["bn2"]["var"], state_dict["mean_branch.7.running_var"]
    )


def test_missing_key_is_named_with_the_file(state_dict):
    broken = dict(state_dict)
    del broken["encoder.layer3.1.bn2.running_var"]
    with pytest.raises(DataError) as err:
        torch_weights.torch_state_dict_to_variables(broken, source="ckpt/last_fold-1.ckpt")
    msg = str(err.value)
    assert msg.startswith("ckpt/last_fold-1.ckpt: ")
    assert "1 missing keys" in msg and "encoder.layer3.1.bn2.running_var" in msg


def test_unexpected_keys_are_listed(state_dict):
    broken = dict(state_dict)
    broken["encoder.fc.weight"] = np.zeros((10, 512), np.float32)
    broken["encoder.extra.num_batches_tracked"] = np.array(1)  # not a BN of the network
    with pytest.raises(DataError, match="2 unexpected keys") as err:
        torch_weights.torch_state_dict_to_variables(broken)
    assert "encoder.fc.weight" in str(err.value)
    assert "encoder.extra.num_batches_tracked" in str(err.value)


def test_num_batches_tracked_is_optional(state_dict):
    bare = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    torch_weights.torch_state_dict_to_variables(bare)  # no error


def test_wrong_shape_names_key_and_both_shapes(state_dict):
    broken = dict(state_dict)
    broken["mean_branch.0.weight"] = np.zeros((512, 256), np.float32)
    broken["encoder.conv1.weight"] = np.zeros((64, 3, 3, 3), np.float32)  # RGB stem
    with pytest.raises(DataError, match="2 shape or dtype mismatches") as err:
        torch_weights.torch_state_dict_to_variables(broken)
    msg = str(err.value)
    assert "mean_branch.0.weight: float32[512, 256], expected float[512, 512]" in msg
    assert "encoder.conv1.weight: float32[64, 3, 3, 3], expected float[64, 1, 3, 3]" in msg


def test_non_finite_and_negative_variance_are_rejected(state_dict):
    broken = dict(state_dict)
    broken["encoder.bn1.weight"] = np.full(64, np.nan, np.float32)
    broken["mean_branch.1.running_var"] = -np.ones(512, np.float32)
    with pytest.raises(DataError, match="2 bad values") as err:
        torch_weights.torch_state_dict_to_variables(broken)
    assert "encoder.bn1.weight: contains NaN" in str(err.value)
    assert "mean_branch.1.running_var: negative running variance" in str(err.value)


def test_prefix_is_detected_given_or_absent(state_dict):
    lightning = {f"model.{k}": v for k, v in state_dict.items()}
    stripped, prefix = torch_weights.strip_prefix(lightning, None)
    assert prefix == "model." and set(stripped) == set(state_dict)
    stripped, prefix = torch_weights.strip_prefix(lightning, "model.")
    assert set(stripped) == set(state_dict)
    stripped, prefix = torch_weights.strip_prefix(state_dict, None)
    assert prefix == "" and set(stripped) == set(state_dict)


def test_prefix_errors(state_dict):
    two = {f"model.{k}": v for k, v in state_dict.items()}
    two.update({f"ema.{k}": v for k, v in state_dict.items()})
    with pytest.raises(DataError, match=r"several networks .*'ema\.', 'model\.'"):
        torch_weights.strip_prefix(two, None, "x.ckpt")
    with pytest.raises(DataError, match="not a Patch2Loc state dict"):
        torch_weights.strip_prefix({"fc.weight": np.zeros(1)}, None, "x.ckpt")
    with pytest.raises(DataError, match="no key starts with prefix 'module.'"):
        torch_weights.strip_prefix(state_dict, "module.", "x.ckpt")
    # Keys outside the prefix stay as they are, so the strict check reports them.
    extra = {f"model.{k}": v for k, v in state_dict.items()}
    extra["loss_scale"] = np.ones(1, np.float32)
    stripped, _ = torch_weights.strip_prefix(extra, "model.")
    with pytest.raises(DataError, match="1 unexpected keys:\n  loss_scale"):
        torch_weights.torch_state_dict_to_variables(stripped)


def test_missing_input_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        convert_torch.load_torch_checkpoint(tmp_path / "absent.ckpt")


def test_clear_error_without_torch(tmp_path, monkeypatch):
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(P2LError, match=r"pip install torch==2\.13\.0"):
        convert_torch.load_torch_checkpoint(ckpt)


# ------------------------------------------------------------------------------------------------
# Against the PyTorch reference network (needs torch and ../shared)
# ------------------------------------------------------------------------------------------------


class NotATensor:
    """A pickled Python object, as Lightning's hyper_parameters may hold (OmegaConf, ...)."""


@pytest.fixture(scope="module")
def torch_net():
    return reference_network(24)[2]


@pytest.fixture(scope="module")
def torch_state_dict(state_dict):
    """The numpy state dict as torch tensors: file-format tests need torch but not ../shared."""
    torch = pytest.importorskip("torch")
    return {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}


def _numpy_state_dict(net) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("conv_impl", ["auto", "xla"])
def test_same_eval_outputs_as_reference(torch_net, conv_impl):
    import torch

    variables = torch_weights.torch_state_dict_to_variables(_numpy_state_dict(torch_net))
    gen = torch.Generator().manual_seed(2)
    patches = torch.randn(32, 1, 24, 24, generator=gen)
    position = 99 * torch.rand(32, generator=gen)
    with torch.no_grad():
        want_mean, want_logvar = torch_net(patches, position)
    assert float(want_mean.std()) > 1e-2  # the check compares something that varies
    mean, logvar = model_lib.Patch2Loc(conv_impl=conv_impl).apply(
        variables,
        jnp.asarray(patches.numpy().transpose(0, 2, 3, 1)),  # NCHW -> NHWC
        jnp.asarray(position.numpy()),
    )
    np.testing.assert_allclose(np.asarray(mean), want_mean.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(logvar), want_logvar.numpy(), rtol=0, atol=1e-4)


def test_cli_writes_a_restorable_workdir(torch_state_dict, variables, tmp_path, capsys):
    import torch

    from p2l import checkpoint, train_state
    from p2l.model import create_model

    ckpt = tmp_path / "last_fold-1.ckpt"
    lightning = {f"model.{k}": v for k, v in torch_state_dict.items()}
    torch.save({"state_dict": lightning, "global_step": 7, "epoch": 6}, ckpt)
    workdir = tmp_path / "run"
    config_spec = f"{REPO / 'experiments' / 'brats.py'}:tiny"
    argv = ["--input", str(ckpt), "--output", str(workdir), "--config", config_spec]
    assert convert_torch.main(argv) == 0
    assert f"wrote {workdir / 'checkpoints' / '7'}" in capsys.readouterr().out

    config = config_file.load_config(config_spec)
    tx = train_state.make_optimizer(config)
    abstract = jax.eval_shape(
        lambda: train_state.create_train_state(config, create_model(config), tx, jax.random.key(1))
    )
    template = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)
    restored = checkpoint.Checkpointer(workdir).restore(template)
    assert int(restored.step) == 7
    _assert_trees_equal(restored.params, variables["params"])
    _assert_trees_equal(restored.batch_stats, variables["batch_stats"])
    assert (workdir / "converted_from.json").is_file()

    # A second conversion into the same workdir is refused rather than mixed in.
    assert convert_torch.main(argv) == 1
    assert "already holds a checkpoint (step 7)" in capsys.readouterr().err


def test_pickled_objects_need_trust(torch_state_dict, tmp_path):
    import torch

    ckpt = tmp_path / "with_hparams.ckpt"
    torch.save({"state_dict": torch_state_dict, "hyper_parameters": NotATensor()}, ckpt)
    with pytest.raises(DataError, match="rerun with --trust-pickle"):
        convert_torch.load_torch_checkpoint(ckpt)
    state_dict, meta = convert_torch.load_torch_checkpoint(ckpt, trust_pickle=True)
    assert "encoder.conv1.weight" in state_dict and meta["source_dtypes"] == ["float32"]


def test_half_precision_weights_and_garbage_files(torch_state_dict, tmp_path):
    import torch

    half = tmp_path / "half.pt"
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in torch_state_dict.items()}, half
    )
    state_dict, meta = convert_torch.load_torch_checkpoint(half)
    assert meta["source_dtypes"] == ["float16"] and state_dict["encoder.conv1.weight"].dtype == (
        np.float32
    )
    garbage = tmp_path / "notes.pt"
    garbage.write_text("these are not weights")
    with pytest.raises(DataError, match="cannot be read as a PyTorch checkpoint"):
        convert_torch.load_torch_checkpoint(garbage)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(DataError, match="holds a list, not a"):
        convert_torch.load_torch_checkpoint(listing)
