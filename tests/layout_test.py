"""The house's rules: dependencies point one way, inference stays light, modules stay small."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "p2l"
OUTSIDE = ("experiments", "data_prep", "benchmarks", "tests")


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_core_package_imports_none_of_its_users():
    offenders = {
        str(path.relative_to(REPO)): sorted(
            m for m in _imported_modules(path) if m.split(".")[0] in OUTSIDE
        )
        for path in PACKAGE.rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_rule_checker_sees_lazy_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from experiments import base\n    import data_prep.x\n")
    assert _imported_modules(sample) == {"experiments", "data_prep.x"}


def test_no_module_of_the_package_is_over_400_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert long == {}


def test_detecting_imports_neither_training_nor_tensorflow():
    """Import p2l.detect and score one small volume in a fresh interpreter; then look."""
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import jax
        from p2l import detect  # noqa: F401
        from p2l.config_file import load_config
        from p2l.model import create_model, init_variables
        from p2l.scoring import Scorer

        config = load_config("experiments/demo.py:tiny")
        config.unlock()
        config.eval.stride = 4
        config.eval.batch_size = 64
        config.data.image_shape = (32, 32, 4)
        model = create_model(config)
        variables = init_variables(model, jax.random.key(0), 4)
        image = np.random.default_rng(0).random((32, 32, 4)).astype(np.float32)
        mask = np.zeros((32, 32, 4), np.float32)
        mask[8:24, 8:24] = 1
        scored = Scorer(config, model, variables)("tiny", image, mask)
        assert set(scored.maps) == {"score", "error", "logvar"}
        assert scored.score.shape == (32, 32, 4) and np.all(scored.score[mask == 0] == 0)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"
                        or m in ("p2l.train", "p2l.input_pipeline", "tensorflow_datasets"))
        print("LOADED", loaded)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout, out.stdout
