"""Shared test set-up: quiet TensorFlow, the ../shared folder (skipped when absent)."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest

from p2l import xla_flags
from p2l.config_file import set_dotted

# The tests run with the XLA:CPU flags users get from every entry point (p2l.main, p2l.detect,
# benchmarks.bench): a test comparing an in-process run with a `python -m p2l.main` subprocess
# (kill and resume) needs both on the same convolution kernels to be bit-identical.
xla_flags.apply()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One ITK thread, as p2l.detect sets for raw scans: ANTs' multi-threaded registration is not
# repeatable, and ITK reads this once, before its first filter runs, for the whole session.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
# One persistent XLA compilation cache for the session, inherited by the `python -m p2l.main`
# subprocesses tests start (kill and resume, two processes, fault runs): they compile the same
# small models again and again. A cached executable is the same program, so results are unchanged.
_CACHE = tempfile.mkdtemp(prefix="p2l_test_xla_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (a user's clone): real-data test skipped")
    return SHARED


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """A small embedded-default dataset (data_prep.demo_data) shared by the end-to-end tests."""
    from data_prep import demo_data

    out = tmp_path_factory.mktemp("demo")
    demo_data.write_demo_dataset(out, seed=0, n_train=8, n_val=2, n_test=2, n_ixi_test=1)
    return out


def demo_config(small_demo: Path, **overrides):
    """experiments/demo.py:tiny pointed at `small_demo`, with dotted overrides."""
    from experiments import demo

    config = demo.get_config("tiny")
    config.data_root = str(small_demo / "data")
    config.splits_dir = str(small_demo / "splits")
    config.tfds_dir = str(small_demo / "tfds")
    config.sampling.slices_per_step = 4
    for key, value in overrides.items():
        set_dotted(config, key, value)
    return config
