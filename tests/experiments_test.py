"""The paper configs: one model per modality and fold, as the reference (spec §1)."""

from p2l import config_file
from p2l.tools import sweep, workdir


def test_one_t2_and_one_t1_run_serve_the_four_columns():
    t2, t1 = (
        config_file.load_config("experiments/t2.py"),
        config_file.load_config("experiments/t1.py"),
    )
    assert (t2.modality, tuple(t2.test_sets)) == ("t2", ("Brats21", "MSLUB"))
    assert (t1.modality, tuple(t1.test_sets)) == ("t1", ("ATLAS_v2", "WMH"))
    for column, run in [("brats", t2), ("mslub", t2), ("atlas", t1), ("wmh", t1)]:
        config = config_file.load_config(f"experiments/{column}.py")
        assert config.to_dict() == run.to_dict(), column  # the same config: the same run
        assert workdir.run_name(f"experiments/{column}.py") == run.name
        assert workdir.run_name(f"experiments/{column}.py:tiny") == f"{run.name}_tiny"


def test_column_configs_sweep_into_their_modality_run(tmp_path):
    brats = sweep.expand("experiments/brats.py", tmp_path)
    mslub = sweep.expand("experiments/mslub.py", tmp_path)
    assert [r.workdir for r in brats] == [r.workdir for r in mslub]
    assert brats[3].workdir == tmp_path / "t2" / "fold=3"


def test_workdir_tool_prints_the_default_run_folder(capsys):
    assert workdir.main(["experiments/mslub.py:tiny"]) == 0
    assert capsys.readouterr().out.strip() == "runs/t2_tiny"
    assert workdir.main(["experiments/nope.py"]) == 2
    assert "no such config file" in capsys.readouterr().err
