"""Config file and variant typos answer with one line naming what exists (p2l.config_file)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from p2l import config_file
from p2l.errors import ConfigError
from p2l.tools import sweep

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _message(spec: str) -> str:
    with pytest.raises(ConfigError) as info:
        config_file.check_config_spec(spec)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_misspelt_file_lists_the_configs_of_its_folder(in_repo):
    assert _message("experiments/demoo.py") == (
        "config.config: experiments/demoo.py: no such config file; did you mean "
        "experiments/demo.py? configs there: atlas.py, brats.py, dae_demo.py, dae_t1.py, "
        "dae_t1_2mm.py, dae_t2.py, demo.py, mslub.py, real_check.py, t1.py, t1_2mm.py, t2.py, "
        "... (13 in all)"
    )
    assert _message("experimentz/demo.py:tiny").endswith(
        "no such config file (no folder experimentz/)"
    )


def test_listing_shows_only_files_with_get_config(tmp_path):
    (tmp_path / "alpha.py").write_text("def get_config():\n    return None\n")
    (tmp_path / "helpers.py").write_text("X = 1\n")
    (tmp_path / "__init__.py").write_text("")
    message = _message(str(tmp_path / "zeta.py"))
    assert message.endswith("no such config file; configs there: alpha.py")
    (tmp_path / "alpha.py").unlink()
    assert _message(str(tmp_path / "zeta.py")).endswith(f"no such config file; none in {tmp_path}/")


def test_unknown_variant_keeps_the_configs_message_on_one_line(in_repo):
    assert _message("experiments/demo.py:tinny") == (
        "config.config: unknown variant 'tinny' of experiments/demo.py (known: 'tiny')"
    )
    assert _message("experiments/brats.py:smal") == (
        "config.config: experiments/brats.py: unknown variant 'smal' (known: 'tiny')"
    )
    config_file.check_config_spec("experiments/demo.py:tiny")  # valid: silent
    assert config_file.load_config("experiments/demo.py:tiny").num_steps == 12


def test_load_config_module_checks_the_variant_so_sweeps_answer_in_one_line(in_repo, capsys):
    with pytest.raises(ConfigError, match="unknown variant 'tinny'"):
        config_file.load_config_module("experiments/demo.py:tinny")
    assert sweep.main(["--config", "experiments/demo.py:tinny", "--list"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("unknown variant 'tinny' of experiments/demo.py (known: 'tiny')")
    assert sweep.main(["--config", "experiments/demoo.py", "--list"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "configs there: atlas.py, brats.py, dae_demo.py" in line


def test_other_broken_config_files_are_one_line(tmp_path):
    plain = tmp_path / "plain.py"
    plain.write_text("def get_config():\n    return None\n")
    assert _message(f"{plain}:tiny").endswith(
        "plain.py has no variants (its get_config takes no argument)"
    )
    wordy = tmp_path / "wordy.py"
    wordy.write_text(
        "def get_config(v=''):\n    raise ValueError(f'unknown variant {v!r}\\n(known: none)')\n"
    )
    assert _message(f"{wordy}:x") == "config.config: unknown variant 'x' (known: none)"
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    assert _message(str(broken)).startswith(f"config.config: {broken}:1: ")
    nothing = tmp_path / "nothing.py"
    nothing.write_text("X = 1\n")
    assert _message(str(nothing)).endswith("nothing.py defines no get_config()")


@pytest.mark.parametrize(
    "argv, spec",
    [
        (["prog", "--config=experiments/demo.py:tiny", "--workdir=w"], "experiments/demo.py:tiny"),
        (["prog", "--config", "a.py", "--config.fold=1"], "a.py"),
        (["prog", "-config=a.py"], "a.py"),
        (["prog", "--config.fold=1", "--workdir=w"], None),
        (["prog", "--config=a.py", "--config=b.py"], "b.py"),
        (["prog", "--", "--config=a.py"], None),
        (["prog", "--config"], None),
    ],
)
def test_config_spec_in_argv(argv, spec):
    assert config_file.config_spec_in_argv(argv) == spec


@pytest.mark.parametrize(
    "spec, said",
    [
        ("experiments/demoo.py", "no such config file; did you mean experiments/demo.py?"),
        ("experiments/demo.py:tinny", "unknown variant 'tinny' of experiments/demo.py"),
    ],
)
def test_p2l_main_answers_config_typos_in_one_line(tmp_path, spec, said):
    out = subprocess.run(
        [sys.executable, "-m", "p2l.main", f"--config={spec}", f"--workdir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], out.stderr
    assert not (tmp_path / "run").exists()
