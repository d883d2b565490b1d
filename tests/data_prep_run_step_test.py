"""`python -m data_prep.run_step`: each step alone on files, idempotent through its sidecar."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from data_prep import run_step
from tests import data_prep_phantom as phantom


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("steps")
    atlas = phantom.atlas(root / "atlas.nii.gz")
    image, labels, affine = phantom.scan(
        (100, 140, 52), (1.2, 1.0, 2.0), "LAS", 8.0, **phantom.MOTION
    )
    scan = phantom.save(root / "scan.nii.gz", image, affine)
    seg = phantom.save(root / "seg.nii.gz", labels, affine, np.uint8)
    return root, atlas, scan, seg


def test_the_five_steps_chain_and_rerun_as_no_ops(files, capsys):
    root, atlas, scan, seg = files
    p = {
        name: str(root / f"{name}.nii.gz")
        for name in ("r", "s", "m", "w", "wm", "ws", "c", "cm", "cs", "n")
    }
    commands = [
        ["resample", str(scan), p["r"]],
        ["skull-strip", p["r"], p["s"], p["m"], "--method", "none"],
        [
            "register",
            p["s"],
            p["w"],
            "--atlas",
            str(atlas),
            "--iterations",
            "100,50",
            "--mask",
            p["m"],
            p["wm"],
            "--seg",
            str(seg),
            p["ws"],
        ],
        ["crop", p["w"], p["wm"], p["c"], p["cm"], "--seg", p["ws"], p["cs"]],
        ["n4", p["c"], p["cm"], p["n"], "--iterations", "20"],
    ]
    for command in commands:
        assert run_step.main(command) == 0, command
        assert "wrote" in capsys.readouterr().out
    out = nib.load(p["n"])
    assert (
        np.allclose(out.header.get_zooms(), 1.0) and "".join(nib.aff2axcodes(out.affine)) == "LPS"
    )
    assert set(np.unique(np.asarray(nib.load(p["cs"]).dataobj))) == {0, 1}
    sidecar = json.loads((root / "w.nii.gz.step.json").read_text())
    assert sidecar["step"] == "register" and set(sidecar["outputs"]) == {"image", "mask", "seg"}
    assert sidecar["params"]["registration"]["aff_iterations"] == [100, 50]

    mtime = (root / "n.nii.gz").stat().st_mtime_ns
    for command in commands:
        assert run_step.main(command) == 0
        assert "up to date" in capsys.readouterr().out
    assert (root / "n.nii.gz").stat().st_mtime_ns == mtime

    # Other parameters, or a changed output, make the step run again.
    assert run_step.main(commands[-1][:-1] + ["10"]) == 0
    assert "wrote" in capsys.readouterr().out
    (root / "r.nii.gz").write_bytes(b"tampered")
    assert run_step.main(commands[0]) == 0
    assert "wrote" in capsys.readouterr().out


def test_bad_inputs_exit_2_naming_the_file(files, capsys):
    root, _, scan, _ = files
    assert (
        run_step.main(["n4", str(root / "absent.nii.gz"), str(scan), str(root / "x.nii.gz")]) == 2
    )
    assert "absent.nii.gz: input file not found" in capsys.readouterr().err
    bad = root / "bad.nii.gz"
    bad.write_bytes(b"garbage" * 50)
    assert run_step.main(["resample", str(bad), str(root / "y.nii.gz")]) == 2
    assert "bad.nii.gz: cannot read as NIfTI" in capsys.readouterr().err
    command = ["register", str(scan), str(root / "z.nii.gz"), "--iterations", "1,2,3,4,5"]
    assert run_step.main(command) == 2
    assert "config.register: expected 1 to 4 iteration counts" in capsys.readouterr().err
