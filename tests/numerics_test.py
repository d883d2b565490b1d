"""Backend-aware convolution forms and the matmul precision: resolution, validation, recording,
and that adding `matmul_precision` leaves old runs resumable."""

import jax
import jax.numpy as jnp
import pytest

from experiments import base
from p2l import config_check, layers, run_identity, run_info, xla_flags
from p2l import model as model_lib
from p2l.errors import ConfigError


@pytest.mark.parametrize(
    "name,backend,want",
    [
        ("auto", "cpu", "matmul"),
        ("auto", "gpu", "xla"),
        ("auto", "cuda", "xla"),
        ("auto", "tpu", "xla"),
        ("xla", "cpu", "xla"),
        ("matmul", "gpu", "matmul"),
    ],
)
def test_auto_takes_the_cpu_forms_on_cpu_only(name, backend, want):
    assert layers.resolve_conv_impl(name, backend) == want


def test_resolution_defaults_to_this_backend_and_refuses_unknown_names():
    here = "matmul" if jax.default_backend() == "cpu" else "xla"
    assert layers.resolve_conv_impl("auto") == here
    with pytest.raises(ValueError, match="conv_impl must be one of auto, matmul, xla"):
        layers.resolve_conv_impl("cudnn", "cpu")


def test_create_model_records_the_resolved_form_and_the_precision():
    config = base.base_config()
    model = model_lib.create_model(config)
    assert model.conv_impl == layers.resolve_conv_impl("auto")
    assert model.matmul_precision == config.matmul_precision == "default"
    config.model.conv_impl, config.matmul_precision = "xla", "highest"
    model = model_lib.create_model(config)
    assert (model.conv_impl, model.matmul_precision) == ("xla", "highest")


def _old_config():
    """A config as read back from a run started before `matmul_precision` existed."""
    import ml_collections

    tree = base.base_config().to_dict()
    del tree["matmul_precision"]
    return ml_collections.ConfigDict(tree)


def test_configs_from_before_the_key_run_at_jax_default():
    old = _old_config()
    config_check.check_numerics(old)
    assert model_lib.create_model(old).matmul_precision == "default"
    assert run_info.numerics(old)["matmul_precision"] == "default"


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("matmul_precision", "tf32", "config.matmul_precision: 'tf32'; expected default, high, "
         "highest"),
        ("model.conv_impl", "cudnn", "config.model.conv_impl: 'cudnn'; expected auto, matmul, "
         "xla"),
    ],
)  # fmt: skip
def test_unknown_numerics_values_stop_with_one_line_naming_the_key(key, value, message):
    config = base.base_config()
    if key == "matmul_precision":
        config.matmul_precision = value
    else:
        config.model.conv_impl = value
    with pytest.raises(ConfigError) as err:
        config_check.check_numerics(config)
    assert str(err.value) == message and err.value.key == key


def test_precision_reaches_every_product_of_forward_and_backward():
    """Traced only (no compilation): every dot and conv, the backward's included, carries it."""
    x = jnp.zeros((2, 24, 24, 1))
    pos = jnp.zeros((2,))

    def precisions(precision, impl):
        m = model_lib.Patch2Loc(conv_impl=impl, matmul_precision=precision)
        variables = jax.eval_shape(lambda: model_lib.init_variables(m, jax.random.key(0), 24))

        def loss(params, batch_stats):
            v = {"params": params, "batch_stats": batch_stats}
            (mean, _), _ = m.apply(v, x, pos, train=True, mutable=["batch_stats"])
            return jnp.sum(mean)

        grad = jax.make_jaxpr(jax.grad(loss))
        text = str(grad(variables["params"], variables["batch_stats"]))
        products = text.count("dot_general[") + text.count("conv_general_dilated[")
        return products, text.count("Precision.HIGHEST")

    products, highest = precisions("highest", "xla")
    # Each product names the precision of its two operands.
    assert products > 50 and highest == 2 * products
    assert precisions(None, "xla")[1] == 0  # None leaves JAX's global setting alone


def test_run_info_records_backend_resolved_form_and_precision():
    config = base.base_config()
    config.matmul_precision = "high"
    info = run_info.describe(config)
    assert info["numerics"] == {
        "backend": jax.default_backend(),
        "conv_impl": layers.resolve_conv_impl("auto"),
        "matmul_precision": "high",
    }
    assert info["config"]["model"]["conv_impl"] == "auto"  # the setting, beside its meaning


def test_precision_is_not_identity_so_old_runs_resume_and_hashes_stay(tmp_path):
    old, new = _old_config(), base.base_config()
    ident = run_identity.identity(new)
    assert "matmul_precision" not in ident
    assert run_identity.digest(ident) == run_identity.digest(run_identity.identity(old))
    # A run whose identity was stored before the key existed, resumed at step 4 with it set.
    run_identity.write_history(tmp_path, run_identity.check_resume(old, tmp_path, None))
    new.matmul_precision = "highest"
    assert run_identity.check_resume(new, tmp_path, 4) is None  # nothing changed
    assert run_identity.check_checkpoint(new, tmp_path, 4)  # evaluation at another precision


def test_cpu_flag_is_left_out_when_jax_platforms_excludes_cpu(monkeypatch):
    import jax._src.xla_bridge as xla_bridge

    monkeypatch.setattr(xla_flags.jax, "__version__", xla_flags.PINNED_JAX)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert xla_flags.apply() == [] and "XLA_FLAGS" not in xla_flags.os.environ
    monkeypatch.setenv("JAX_PLATFORMS", "cuda, cpu")
    assert xla_flags.apply() == list(xla_flags.CPU_FLAGS)
