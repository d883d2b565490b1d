"""Sweep expansion, validation against the locked config, and the SLURM array script."""

import subprocess
import textwrap

import pytest

from p2l.errors import ConfigError
from p2l.tools import sweep


def test_demo_sweep_expands_to_two_folds_by_two_seeds(tmp_path):
    runs = sweep.expand("experiments/demo.py", tmp_path)
    assert [r.workdir.name for r in runs] == [
        "fold=0,seed=0", "fold=0,seed=1", "fold=1,seed=0", "fold=1,seed=1"
    ]  # fmt: skip
    assert all(r.workdir.parent == tmp_path / "demo" for r in runs)
    assert "--config.fold=1" in runs[2].flags() and "--config.num_steps=40" in runs[2].flags()
    assert not runs[0].finished


def test_paper_configs_sweep_five_folds(tmp_path):
    for name in ("brats", "mslub", "atlas", "wmh"):
        runs = sweep.expand(f"experiments/{name}.py", tmp_path)
        assert [r.overrides["fold"] for r in runs] == [0, 1, 2, 3, 4]


def test_unknown_key_fails_before_anything_runs(tmp_path):
    cfg = tmp_path / "bad.py"
    cfg.write_text(
        textwrap.dedent("""
        from experiments import demo
        get_config = demo.get_config
        def sweep():
            return [{"fold": 0}, {"fold": 1, "sampling.rejection_rat": 0.3}]
    """)
    )
    with pytest.raises(ConfigError, match="rejection_rat"):
        sweep.expand(str(cfg), tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_slurm_script_is_valid_bash_with_one_task_per_run(tmp_path):
    runs = sweep.expand("experiments/brats.py", tmp_path)
    script = sweep.slurm_script(
        "experiments/brats.py", runs, gpus_per_task=2, partition="gpu",
        time_limit="12:00:00", extra=["--config.data_root=/data/p2l"],
    )  # fmt: skip
    path = tmp_path / "sweep.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "#SBATCH --array=0-4" in script and "#SBATCH --gres=gpu:2" in script
    task_lines = [line for line in script.splitlines() if "-m p2l.main" in line]
    assert len(task_lines) == 5
    assert all("--mode=train_eval" in t and "--config.data_root=/data/p2l" in t for t in task_lines)
    assert "--config.fold=3" in task_lines[3] and str(runs[3].workdir) in task_lines[3]
    assert "${RUNS[$SLURM_ARRAY_TASK_ID]}" in script


def test_cli_lists_and_writes_the_script(tmp_path, capsys):
    assert sweep.main(["--config=experiments/demo.py", "--runs", str(tmp_path), "--list"]) == 0
    assert "fold=1,seed=1" in capsys.readouterr().out
    code = sweep.main(["--config=experiments/demo.py", "--runs", str(tmp_path), "--launch=slurm"])
    assert code == 0 and (tmp_path / "demo" / "sweep.sbatch").exists()


def test_a_run_counts_as_finished_at_the_num_steps_the_sweep_would_train_to(tmp_path, capsys):
    import json

    runs = sweep.expand("experiments/demo.py", tmp_path)
    workdir = runs[0].workdir  # the demo sweep trains 40 steps
    (workdir / "checkpoints" / "40").mkdir(parents=True)
    (workdir / "results").mkdir()
    (workdir / "results" / "summary.json").write_text(json.dumps({"checkpoint_step": 40}))
    assert runs[0].num_steps == 40 and runs[0].finished
    args = ["--config=experiments/demo.py", "--runs", str(tmp_path), "--list"]
    assert sweep.main(args) == 0
    assert "(finished)" in capsys.readouterr().out.splitlines()[0]
    assert sweep.main([*args, "--", "--config.num_steps=80"]) == 0  # extended: resumes
    assert "unfinished: evaluated at step 40" in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize("launch", ["local", "slurm"])
def test_flags_after_the_separator_are_checked_before_anything_runs(tmp_path, capsys, launch):
    base = ["--config=experiments/demo.py", "--runs", str(tmp_path), f"--launch={launch}", "--"]
    for bad, said in [
        (["--config.sampling.rejection_rat=0.3"], "unknown config key"),
        (["--config.num_steps=many"], "num_steps"),
        (["--workdir=elsewhere"], "sets --config, --workdir and --mode itself"),
        (["stray"], "not flags of p2l.main"),
    ]:
        assert sweep.main(base + bad) == 1
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "demo").exists()  # no script, no run folder
    assert sweep.check_extra_flags("experiments/demo.py", ["--config.num_steps=80"]) == 80
    assert sweep.check_extra_flags("experiments/demo.py", ["--config.eval.stride=2"]) is None
