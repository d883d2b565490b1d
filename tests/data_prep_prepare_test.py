"""`python -m data_prep.prepare` and `python -m data_prep.validate` end to end on a synthetic raw
IXI layout (T1 files, T2 inside the provider's tarball, two parallel workers): layout, manifest,
restarts, validation against the manifest and the split CSVs, and a deliberately broken copy.
Lesion datasets and the tfds builder: data_prep_lesion_test.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from data_prep import prepare, validate
from data_prep.manifest import read_manifest, write_manifest
from p2l.preparation.ants_io import sha256_file
from tests import data_prep_phantom as phantom

# Prepares a phantom dataset through the whole pipeline in a module fixture (make test-slow).
pytestmark = pytest.mark.slow

IXI = {"IXI901-Synth-0001": ("T1", "T2"), "IXI902-Synth-0002": ("T1",)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    atlas = phantom.atlas(root / "atlas.nii.gz")
    raw = phantom.write_raw_ixi(root / "raw_ixi", IXI)
    out = root / "out"
    argv = [
        "--dataset",
        "ixi",
        "--raw",
        str(raw),
        "--out",
        str(out),
        "--atlas",
        str(atlas),
        "--skull-strip",
        "none",
        *phantom.FAST_ARGS,
    ]
    status = prepare.main(argv + ["--workers", "2"])
    return {"out": out, "atlas": atlas, "argv": argv, "status": status}


def test_layout_links_and_voxel_types(prepared):
    assert prepared["status"] == 0
    ixi = prepared["out"] / "Train/ixi"
    expected = [
        ixi / "t1/IXI901-Synth-0001_t1.nii.gz",
        ixi / "t1/IXI902-Synth-0002_t1.nii.gz",
        ixi / "t2/IXI901-Synth-0001_t2.nii.gz",
        ixi / "mask_t2/IXI901-Synth-0001_mask.nii.gz",
    ]
    assert all(p.is_file() for p in expected), [p for p in expected if not p.is_file()]
    assert not (ixi / "t2/IXI902-Synth-0002_t2.nii.gz").exists()  # it has no T2: not a failure
    # mask/ (the CSV path) links to the T1 mask: the split CSVs name T1 files.
    for sid in IXI:
        assert (ixi / f"mask/{sid}_mask.nii.gz").samefile(ixi / f"mask_t1/{sid}_mask.nii.gz")
    assert not list(prepared["out"].rglob(".*"))  # no temp files left behind

    image = nib.load(ixi / "t2/IXI901-Synth-0001_t2.nii.gz")
    mask = np.asarray(nib.load(ixi / "mask_t2/IXI901-Synth-0001_mask.nii.gz").dataobj)
    assert image.get_data_dtype() == np.float32
    assert "".join(nib.aff2axcodes(image.affine)) == "LPS"  # RAI as the reference
    assert np.allclose(image.header.get_zooms(), 1.0)
    assert image.shape == mask.shape
    # Masks keep the linear warp's fractional border (spec §2.1); inside they are exactly 1.
    assert mask.max() == 1.0 and np.any((mask > 0) & (mask < 1))


def test_manifest_rows(prepared):
    rows = read_manifest(prepared["out"] / "Train/ixi")
    assert sorted(rows) == [
        ("IXI901-Synth-0001", "t1"),
        ("IXI901-Synth-0001", "t2"),
        ("IXI902-Synth-0002", "t1"),
    ]
    row = rows[("IXI901-Synth-0001", "t2")]
    assert row["source"]["image"].endswith("IXI-T2.tar::IXI901-Synth-0001-T2.nii.gz")
    assert row["source"]["image_spacing"] == [1.0, 2.0, 1.0]
    assert [s["name"] for s in row["steps"]] == [
        "read",
        "reorient_resample",
        "skull_strip",
        "register",
        "crop",
        "n4",
        "write",
    ]
    assert row["steps"][1]["result"]["interpolation"] == "bspline"
    assert row["skull_strip"]["method"] == "none"
    assert row["config"]["registration"]["aff_iterations"] == [100, 50]
    assert row["config"]["registration"]["aff_shrink_factors"] == [6, 4]
    assert row["atlas"]["sha256"] == sha256_file(prepared["atlas"])
    assert row["versions"]["antspyx"] and row["versions"]["nibabel"]
    image = row["outputs"]["image"]
    assert image["sha256"] == sha256_file(prepared["out"] / "Train/ixi" / image["path"])
    assert image["spacing"] == [1.0, 1.0, 1.0] and image["dtype"] == "float32"
    assert row["brain_mask"]["voxels_gt0"] > row["brain_mask"]["voxels_eq1"] > 400_000
    assert row["intensity"]["p99"] > row["intensity"]["p50"] > row["intensity"]["p1"]
    # The phantom moved rigidly: the registration's determinant is ~1.
    assert row["steps"][3]["result"]["affine"]["determinant"] == pytest.approx(1.0, abs=0.03)
    lines = (prepared["out"] / "Train/ixi/manifest.jsonl").read_text().splitlines()
    keys = [(json.loads(line)["subject"], json.loads(line)["modality"]) for line in lines]
    assert keys == sorted(keys)


def test_rerun_skips_verified_scans_and_redoes_changed_ones(prepared, capsys):
    out, argv = prepared["out"], prepared["argv"]
    t1 = out / "Train/ixi/t1/IXI901-Synth-0001_t1.nii.gz"
    before = t1.stat().st_mtime_ns
    assert prepare.main(argv) == 0
    assert "prepared 0 scans, skipped 3 up to date" in capsys.readouterr().err
    assert t1.stat().st_mtime_ns == before

    t1.write_bytes(b"damaged")  # e.g. a copy interrupted by hand
    assert prepare.main(argv + ["--subjects", "IXI901-Synth-0001"]) == 0
    assert "prepared 1 scans, skipped 1 up to date" in capsys.readouterr().err
    recorded = read_manifest(out / "Train/ixi")[("IXI901-Synth-0001", "t1")]["outputs"]["image"]
    assert sha256_file(t1) == recorded["sha256"]


def test_validate_passes_on_the_prepared_root(prepared, capsys):
    assert validate.main([str(prepared["out"])]) == 0
    assert "data_prep.validate: OK, 3 scans in 1 folder(s)" in capsys.readouterr().out


def _rewrite(folder: Path, key, kind, data, dtype=np.float32):
    """Replace an output file and update its manifest hash: only the voxel checks can tell."""
    rows = read_manifest(folder)
    record = rows[key]["outputs"][kind]
    path = folder / record["path"]
    nib.save(nib.Nifti1Image(data.astype(dtype), nib.load(path).affine), path)
    record.update(sha256=sha256_file(path), shape=list(data.shape))
    write_manifest(folder, rows)


def test_validate_fails_with_clear_messages_on_a_broken_copy(prepared, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(prepared["out"], broken)
    ixi = broken / "Train/ixi"
    (ixi / "t1/IXI902-Synth-0002_t1.nii.gz").unlink()
    shape = nib.load(ixi / "t2/IXI901-Synth-0001_t2.nii.gz").shape
    _rewrite(ixi, ("IXI901-Synth-0001", "t2"), "image", np.full(shape, 7.0))
    _rewrite(ixi, ("IXI901-Synth-0001", "t1"), "mask", np.zeros(shape[:2] + (5,)))
    (ixi / "mask/IXI901-Synth-0001_mask.nii.gz").unlink()
    (ixi / "t1/IXI999-Stray-0001_t1.nii.gz").write_bytes(b"stray")

    assert validate.main([str(broken)]) == 1
    out = capsys.readouterr().out
    assert "IXI902-Synth-0002 t1: image file missing" in out
    assert "IXI901-Synth-0001 t2: implausible intensities: constant inside the brain" in out
    assert "IXI901-Synth-0001 t1: mask is not on the image grid" in out
    assert "IXI901-Synth-0001: mask/ file missing" in out
    assert "1 file(s) in" in out and "not in the manifest" in out
    assert "data_prep.validate: FAILED" in out

    (ixi / "manifest.jsonl").write_text("{not json\n")
    assert validate.main([str(broken)]) == 1
    assert "manifest.jsonl: line 1 is not a manifest row" in capsys.readouterr().out


def _write_ixi_splits(folder: Path, test_ids: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)

    def frame(ids):
        return pd.DataFrame(
            {
                "img_name": [f"{i}_t1.nii.gz" for i in ids],
                "age": 40,
                "label": 0,
                "img_path": [f"/Train/ixi/t1/{i}_t1.nii.gz" for i in ids],
                "mask_path": [f"/Train/ixi/mask/{i}_mask.nii.gz" for i in ids],
                "seg_path": "",
            }
        )

    frame(list(IXI)).to_csv(folder / "IXI_train_fold0.csv")
    frame(["IXI901-Synth-0001"]).to_csv(folder / "IXI_val_fold0.csv")
    frame(test_ids).to_csv(folder / "IXI_test.csv")
    pd.DataFrame({"0": ["IXI901-Synth-0001_t2.nii.gz"]}).to_csv(folder / "avail_t2.csv")
    return folder


def test_validate_against_split_csvs(prepared, tmp_path, capsys):
    out = prepared["out"]
    splits = _write_ixi_splits(tmp_path / "splits", ["IXI902-Synth-0002"])
    assert validate.main([str(out), "--splits", str(splits)]) == 0
    # IXI902 has no T2 (not in avail_t2.csv), so IXI_test.csv has no T2 row: only a warning.
    assert "warning" in capsys.readouterr().out

    splits = _write_ixi_splits(tmp_path / "missing", ["IXI902-Synth-0002", "IXI903-Synth-0003"])
    assert validate.main([str(out), "--splits", str(splits)]) == 1
    text = capsys.readouterr().out
    assert "ERROR IXI_test.csv (t1): 1 of 2 rows lack files, e.g. " in text
    assert "Train/ixi/t1/IXI903-Synth-0003_t1.nii.gz" in text
    assert validate.main([str(out), "--splits", str(splits), "--allow-missing"]) == 0
    assert "warning IXI_test.csv (t1): 1 of 2 rows lack files" in capsys.readouterr().out
