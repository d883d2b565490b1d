"""Tests of data_prep.demo_data: layout, CSV formats, volumes, determinism, marker, no network."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from data_prep import demo_data
from p2l.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMALL = {"n_train": 3, "n_val": 1, "n_test": 2, "n_ixi_test": 1}
TINY = {"n_train": 1, "n_val": 1, "n_test": 1, "n_ixi_test": 1}


class NetworkUsed(AssertionError):
    pass


def _no_network(*args, **kwargs):
    raise NetworkUsed(f"network access attempted: {args!r}")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The small dataset, generated with every way out to the network made to raise."""
    out = tmp_path_factory.mktemp("demo") / "ds"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket.socket, "connect_ex", _no_network)
        mp.setattr(socket, "getaddrinfo", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        # The patch must really bite, or the test proves nothing.
        with pytest.raises(NetworkUsed), socket.socket() as s:
            s.connect(("127.0.0.1", 9))
        returned = demo_data.write_demo_dataset(out, seed=0, **SMALL)
    assert returned == out
    return out


def _load(path: Path) -> nib.Nifti1Image:
    assert path.is_file(), path
    return nib.load(path)


def _subjects(root: Path) -> list[tuple[str, Path, bool]]:
    """(id, folder, has lesions) for every subject on disk."""
    ixi = sorted((root / "data/Train/ixi/t1").glob("*_t1.nii.gz"))
    syn = sorted((root / "data/Test/Synth/t1").glob("*_t1.nii.gz"))
    out = [(p.name[: -len("_t1.nii.gz")], p.parents[1], False) for p in ixi]
    return out + [(p.name[: -len("_t1.nii.gz")], p.parents[1], True) for p in syn]


def _volume(folder: Path, sid: str, mod: str) -> tuple[np.ndarray, np.ndarray]:
    img = _load(folder / mod / f"{sid}_{mod}.nii.gz")
    return np.asarray(img.dataobj), img.affine


def test_layout_matches_the_split_csvs(dataset):
    splits = dataset / "splits"
    names = {p.name for p in splits.glob("*.csv")}
    expected = {f"IXI_{s}_fold{k}.csv" for s in ("train", "val") for k in range(5)}
    expected |= {"IXI_test.csv", "avail_t2.csv", "Synth_test.csv", "Synth_val.csv"}
    assert names == expected
    referenced = set()
    for name in expected - {"avail_t2.csv"}:
        df = pd.read_csv(splits / name)
        assert len(df) > 0, name
        for col in ("img_path", "mask_path", "seg_path"):
            for rel in df[col].dropna():
                assert rel.startswith("/"), (name, rel)  # reference convention
                referenced.add(rel.lstrip("/"))
        assert (df["img_name"] == df["img_path"].str.split("/").str[-1]).all()
    avail = pd.read_csv(splits / "avail_t2.csv")
    # The reference's T2 mode: keep names in avail_t2 (t2 -> t1), rewrite img_path t1 -> t2.
    train = pd.read_csv(splits / "IXI_train_fold0.csv")
    kept = train[train["img_name"].isin(avail["0"].str.replace("t2", "t1"))]
    assert len(kept) == len(train)
    referenced |= {p.lstrip("/") for p in kept["img_path"].str.replace("t1", "t2")}
    referenced |= {f"Train/ixi/t2/{name}" for name in avail["0"]}
    for name in ("Synth_test.csv", "Synth_val.csv"):
        synth = pd.read_csv(splits / name)
        referenced |= {p.lstrip("/") for p in synth["img_path"].str.replace("t1", "t2")}
    on_disk = {str(p.relative_to(dataset / "data")) for p in (dataset / "data").rglob("*.nii.gz")}
    assert on_disk == referenced
    assert len(on_disk) == 3 * (3 + 1 + 1) + 4 * (2 + 1)
    assert (dataset / "data/Train/ixi/t1/IXI9001-Demo-0001_t1.nii.gz").is_file()
    assert (dataset / "data/Test/Synth/seg/synth001_seg.nii.gz").is_file()
    assert not list(dataset.rglob("*.tmp")), "temporary files left behind"


def test_csv_columns_and_values(dataset):
    splits = dataset / "splits"
    ixi_cols = ["Unnamed: 0", *demo_data.IXI_HEADER[1:]]
    pool, test = set(), set()
    val_sets = []
    for k in range(5):
        tr = pd.read_csv(splits / f"IXI_train_fold{k}.csv")
        va = pd.read_csv(splits / f"IXI_val_fold{k}.csv")
        assert list(tr.columns) == ixi_cols and list(va.columns) == ixi_cols
        assert len(tr) == SMALL["n_train"] and len(va) == SMALL["n_val"]
        assert not set(tr["img_name"]) & set(va["img_name"])
        pool |= set(tr["img_name"]) | set(va["img_name"])
        val_sets.append(frozenset(va["img_name"]))
        assert (tr["label"] == 0).all() and tr["seg_path"].isna().all()
        assert tr["Agegroup"].between(1, 4).all() and tr["age"].between(20, 86).all()
    assert len(set(val_sets)) > 1, "folds must differ"
    ixi_test = pd.read_csv(splits / "IXI_test.csv")
    test = set(ixi_test["img_name"])
    assert len(test) == SMALL["n_ixi_test"] and not test & pool
    assert len(pool) == SMALL["n_train"] + SMALL["n_val"]
    for name, n in (("Synth_test.csv", SMALL["n_test"]), ("Synth_val.csv", SMALL["n_val"])):
        df = pd.read_csv(splits / name)
        assert list(df.columns) == ["Unnamed: 0", *demo_data.LESION_HEADER[1:]]
        assert len(df) == n and (df["label"] == 1).all()
    a = set(pd.read_csv(splits / "Synth_test.csv")["img_name"])
    b = set(pd.read_csv(splits / "Synth_val.csv")["img_name"])
    assert not a & b


def test_default_folds_have_distinct_val_sets():
    """At the default sizes every fold validates on its own subjects, as in the reference."""
    vals = [set(demo_data._fold_indices(0, 28, 4, k)[1]) for k in range(5)]
    assert all(len(v) == 4 for v in vals)
    assert len({frozenset(v) for v in vals}) == 5


@pytest.mark.skipif(not (SHARED / "splits").is_dir(), reason="../shared/splits not available")
def test_headers_equal_the_reference_files(dataset):
    ref = SHARED / "splits"

    def first_line(path: Path) -> str:
        with path.open(newline="") as f:
            return f.readline()

    pairs = [
        (ref / "patch2loc" / f"IXI_train_fold{k}.csv", f"IXI_train_fold{k}.csv") for k in range(5)
    ]
    pairs += [
        (ref / "patch2loc" / f"IXI_val_fold{k}.csv", f"IXI_val_fold{k}.csv") for k in range(5)
    ]
    pairs += [
        (ref / "patch2loc/IXI_test.csv", "IXI_test.csv"),
        (ref / "patch2loc/avail_t2.csv", "avail_t2.csv"),
        (ref / "patch2loc/WMH_test.csv", "Synth_test.csv"),
        (ref / "behrendt/WMH_val.csv", "Synth_val.csv"),
    ]
    for ref_file, ours in pairs:
        assert first_line(dataset / "splits" / ours).rstrip("\r\n") == first_line(ref_file).rstrip(
            "\r\n"
        ), ours
        if ref_file.parent.name == "patch2loc":  # line endings too (its lesion files use CRLF)
            assert first_line(dataset / "splits" / ours) == first_line(ref_file), ours
    # Row format: same number of fields, same path conventions.
    with (ref / "patch2loc/IXI_test.csv").open(newline="") as f:
        ref_row = list(csv.reader(f))[1]
    with (dataset / "splits/IXI_test.csv").open(newline="") as f:
        our_row = list(csv.reader(f))[1]
    assert len(our_row) == len(ref_row)
    assert our_row[-4].startswith("/Train/ixi/t1/") and our_row[-3].startswith("/Train/ixi/mask/")
    assert our_row[-2] == ref_row[-2] == ""


def test_masks_have_fractional_border_and_unit_interior(dataset):
    for sid, folder, _ in _subjects(dataset):
        mask, _ = _volume(folder, sid, "mask")
        assert mask.dtype == np.float32
        assert mask.min() >= 0.0 and mask.max() == 1.0
        brain = mask > 0
        assert brain.sum() > 50_000, sid  # ~1.6 l of brain at 2 mm
        assert ((mask > 0) & (mask < 1)).sum() > 100, sid
        interior = ndimage.binary_erosion(brain, iterations=2)
        assert interior.sum() > 0.7 * brain.sum()
        assert (mask[interior] == 1.0).all(), sid
        # Cut to the mask's bounding box with the reference's [min:max] (spec §2.1 step 4): the
        # first plane of every axis holds brain, the (dropped) last one did.
        for axis in range(3):
            assert np.moveaxis(brain, axis, 0)[0].any(), (sid, axis)


def test_volumes_share_grid_and_are_skull_stripped(dataset):
    template_dir = demo_data.template_dir()
    tpl = nib.load(template_dir / demo_data.TEMPLATE_FILES["t1"])
    tpl_brain = np.argwhere(np.asarray(tpl.dataobj) > 0).mean(0)
    tpl_centre = tpl.affine[:3, :3] @ tpl_brain + tpl.affine[:3, 3]
    for sid, folder, lesioned in _subjects(dataset):
        mods = ["t1", "t2", "mask"] + (["seg"] if lesioned else [])
        vols = {m: _volume(folder, sid, m) for m in mods}
        mask, affine = vols["mask"]
        for m, (arr, aff) in vols.items():
            assert arr.shape == mask.shape, (sid, m)
            np.testing.assert_array_equal(aff, affine)
        np.testing.assert_allclose(np.diag(affine)[:3], 2.0)
        assert nib.aff2axcodes(affine) == ("R", "A", "S")
        assert 55 <= min(mask.shape) and max(mask.shape) <= 110, mask.shape
        # The affine places the brain where the template's is (up to the +-3 mm, +-5 deg jitter).
        centre = affine[:3, :3] @ np.argwhere(mask > 0).mean(0) + affine[:3, 3]
        assert np.linalg.norm(centre - tpl_centre) < 8.0, (sid, centre, tpl_centre)
        for m in ("t1", "t2"):
            img = vols[m][0]
            assert img.dtype == np.float32, (sid, m)
            assert (img >= 0).all() and (img[mask == 0] == 0).all(), (sid, m)
            assert img[mask == 1].mean() > 100, (sid, m)


def test_lesions_are_binary_inside_brain_and_have_the_right_contrast(dataset):
    lesioned = [s for s in _subjects(dataset) if s[2]]
    assert len(lesioned) == SMALL["n_test"] + SMALL["n_val"]
    for sid, folder, _ in lesioned:
        seg, _ = _volume(folder, sid, "seg")
        mask, _ = _volume(folder, sid, "mask")
        t1, _ = _volume(folder, sid, "t1")
        t2, _ = _volume(folder, sid, "t2")
        assert seg.dtype == np.uint8 and set(np.unique(seg)) == {0, 1}, sid
        lesion = seg == 1
        assert (mask[lesion] == 1.0).all(), f"{sid}: lesion reaches the mask border"
        fraction = lesion.sum() / (mask > 0).sum()
        assert 0.005 < fraction < 0.05, (sid, fraction)
        n_components = ndimage.label(lesion)[1]
        assert 1 <= n_components <= 3, (sid, n_components)
        normal = (mask > 0) & ~ndimage.binary_dilation(lesion, iterations=2)
        assert t2[lesion].mean() > t2[normal].mean(), f"{sid}: T2 lesion not hyperintense"
        assert t1[lesion].mean() < t1[normal].mean(), f"{sid}: T1 lesion not hypointense"
    healthy = [s for s in _subjects(dataset) if not s[2]]
    assert not any((folder / "seg").exists() for _, folder, _ in healthy)


def test_same_seed_same_arrays_other_seed_differs(dataset, tmp_path):
    again = demo_data.write_demo_dataset(tmp_path / "a", seed=0, **TINY)
    other = demo_data.write_demo_dataset(tmp_path / "b", seed=1, **TINY)
    for sid, sub in (("IXI9001-Demo-0001", "Train/ixi"), ("synth001", "Test/Synth")):
        for mod in ("t1", "t2", "mask"):
            rel = f"data/{sub}/{mod}/{sid}_{mod}.nii.gz"
            a, b, c = (np.asarray(_load(d / rel).dataobj) for d in (dataset, again, other))
            # A subject depends on (seed, number) only, not on how many subjects were asked for.
            np.testing.assert_array_equal(a, b)
            assert a.shape != c.shape or not np.array_equal(a, c), rel
            assert (dataset / rel).read_bytes() == (again / rel).read_bytes()  # byte-identical


def test_marker_makes_a_rerun_skip(tmp_path, monkeypatch):
    out = demo_data.write_demo_dataset(tmp_path / "ds", seed=3, **TINY)
    marker = json.loads((out / "COMPLETE.json").read_text())
    assert marker["parameters"]["seed"] == 3 and marker["parameters"]["n_train"] == 1
    assert len(marker["digest"]) == 64
    assert set(marker["files"]) == {
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "COMPLETE.json"
    }
    assert demo_data.is_complete(out, seed=3, **TINY)
    assert not demo_data.is_complete(out, seed=4, **TINY)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although complete")

    monkeypatch.setattr(demo_data, "_make_subject", fail)
    mtime = (out / "COMPLETE.json").stat().st_mtime_ns
    assert demo_data.write_demo_dataset(out, seed=3, **TINY) == out
    assert (out / "COMPLETE.json").stat().st_mtime_ns == mtime

    # A folder missing a file, or without marker, is not complete (and gets regenerated).
    (out / "data/Test/Synth/seg/synth001_seg.nii.gz").unlink()
    assert not demo_data.is_complete(out, seed=3, **TINY)
    with pytest.raises(AssertionError, match="regenerated"):
        demo_data.write_demo_dataset(out, seed=3, **TINY)
    assert not (out / "COMPLETE.json").exists(), "half-written folder must not be marked complete"
    monkeypatch.undo()
    demo_data.write_demo_dataset(out, seed=3, **TINY)
    assert demo_data.is_complete(out, seed=3, **TINY)


def test_other_parameters_regenerate_and_drop_stale_files(tmp_path):
    out = tmp_path / "ds"
    demo_data.write_demo_dataset(out, seed=0, **{**TINY, "n_train": 2})
    assert (out / "data/Train/ixi/t1/IXI9004-Demo-0004_t1.nii.gz").is_file()
    demo_data.write_demo_dataset(out, seed=0, **TINY)
    assert not (out / "data/Train/ixi/t1/IXI9004-Demo-0004_t1.nii.gz").exists()
    assert demo_data.is_complete(out, seed=0, **TINY)
    assert len(pd.read_csv(out / "splits/IXI_train_fold0.csv")) == 1


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"n_train": 0}, "n_train"),
        ({"n_val": -1}, "n_val"),
        ({"n_test": 1.5}, "n_test"),
        ({"seed": -2}, "seed"),
        ({"spacing_mm": 0.5}, "spacing_mm"),
        ({"spacing_mm": "big"}, "spacing_mm"),
    ],
)
def test_bad_parameters_raise_config_error(tmp_path, kwargs, key):
    with pytest.raises(ConfigError, match=key):
        demo_data.write_demo_dataset(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


def test_out_dir_that_is_a_file_raises_data_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(DataError, match=str(path)):
        demo_data.write_demo_dataset(path, **TINY)


def test_missing_template_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_data, "template_dir", lambda: tmp_path)
    demo_data._load_template.cache_clear()
    try:
        with pytest.raises(DataError, match="mni_icbm152_t1_tal_nlin_sym_09a_converted"):
            demo_data.write_demo_dataset(tmp_path / "ds", **TINY)
    finally:
        demo_data._load_template.cache_clear()


def test_cli_writes_then_reports_complete(tmp_path, capsys):
    args = ["--out", str(tmp_path / "ds"), "--seed", "2", "--n-train", "1", "--n-val", "1"]
    args += ["--n-test", "1", "--n-ixi-test", "1"]
    assert demo_data.main(args) == 0
    first = capsys.readouterr().out
    assert "wrote demo dataset" in first and "17 NIfTI volumes" in first
    assert demo_data.main(args) == 0
    assert "complete already" in capsys.readouterr().out
    assert demo_data.main([*args[:2], "--n-train", "0"]) == 1
    assert "n_train" in capsys.readouterr().err
