"""A synthetic BraTS 2021 case (labels 1/2/4, T1 and T2) through `data_prep.prepare`: binary segs
per modality, the CSV `mask/`/`seg/` links, lesion volume through registration, validation against
a split CSV, and the prepared root feeding the tfds builder with no manual step."""

from __future__ import annotations

import socket

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from data_prep import prepare, validate
from data_prep.manifest import read_manifest
from p2l.builds import Builds
from p2l.slices_builder import SPLIT
from p2l.splits import read_test_split
from tests import data_prep_phantom as phantom

# Prepares a phantom dataset through the whole pipeline in a module fixture (make test-slow).
pytestmark = pytest.mark.slow

CASE = "BraTS2021_90001"
IXI_ID = "IXI901-Synth-0001"


def _write_splits(folder):
    folder.mkdir(parents=True, exist_ok=True)
    ixi = pd.DataFrame(
        {
            "img_name": [f"{IXI_ID}_t1.nii.gz"],
            "age": 40,
            "label": 0,
            "img_path": [f"/Train/ixi/t1/{IXI_ID}_t1.nii.gz"],
            "mask_path": [f"/Train/ixi/mask/{IXI_ID}_mask.nii.gz"],
            "seg_path": "",
        }
    )
    for name in ("IXI_train_fold0.csv", "IXI_val_fold0.csv", "IXI_test.csv"):
        ixi.to_csv(folder / name)
    pd.DataFrame({"0": [f"{IXI_ID}_t2.nii.gz"]}).to_csv(folder / "avail_t2.csv")
    pd.DataFrame(
        {
            "img_name": [CASE],
            "label": 1,
            "img_path": [f"/Test/Brats21/t1/{CASE}_t1.nii.gz"],
            "mask_path": [f"/Test/Brats21/mask/{CASE}_mask.nii.gz"],
            "seg_path": [f"/Test/Brats21/seg/{CASE}_seg.nii.gz"],
        }
    ).to_csv(folder / "Brats21_test.csv")
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("lesion")
    atlas = phantom.atlas(root / "atlas.nii.gz")
    out = root / "out"
    common = ["--out", str(out), "--atlas", str(atlas), *phantom.FAST_ARGS]
    raw_brats = phantom.write_raw_brats(root / "raw_brats", CASE)
    raw_ixi = phantom.write_raw_ixi(root / "raw_ixi", {IXI_ID: ("T2",)}, t2_in_tar=False)
    statuses = [
        prepare.main(["--dataset", "brats21", "--raw", str(raw_brats), *common]),
        prepare.main(
            [
                "--dataset",
                "ixi",
                "--raw",
                str(raw_ixi),
                "--modalities",
                "t2",
                "--skull-strip",
                "none",
                *common,
            ]
        ),
    ]
    return {"root": root, "out": out, "statuses": statuses, "splits": _write_splits(root / "s")}


def test_segs_per_modality_binary_and_links_to_t2(prepared):
    assert prepared["statuses"] == [0, 0]
    brats = prepared["out"] / "Test/Brats21"
    for modality in ("t1", "t2"):
        image = nib.load(brats / f"{modality}/{CASE}_{modality}.nii.gz")
        seg = nib.load(brats / f"seg_{modality}/{CASE}_seg.nii.gz")
        mask = nib.load(brats / f"mask_{modality}/{CASE}_mask.nii.gz")
        assert seg.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(seg.dataobj))) == {0, 1}  # labels 1/2/4 -> whole tumour
        assert image.shape == seg.shape == mask.shape
        assert np.allclose(image.affine, seg.affine) and np.allclose(image.affine, mask.affine)
    # BraTS is evaluated on T2 in the paper: the CSV's mask/ and seg/ are the T2 ones.
    assert (brats / f"mask/{CASE}_mask.nii.gz").samefile(brats / f"mask_t2/{CASE}_mask.nii.gz")
    assert (brats / f"seg/{CASE}_seg.nii.gz").samefile(brats / f"seg_t2/{CASE}_seg.nii.gz")


def test_lesion_volume_survives_registration(prepared):
    rows = read_manifest(prepared["out"] / "Test/Brats21")
    for (_, modality), row in rows.items():
        lesion = row["lesion"]
        assert lesion["label_voxels"].keys() == {"0", "1", "2", "4"}
        det = row["steps"][3]["result"]["affine"]["determinant"]
        # Volume-preserving fractions match the source within 3 %; the > 0 rule only adds a rim.
        assert lesion["fraction_sum"] * det == pytest.approx(lesion["source_mm3"], rel=0.03)
        # (an 8 mm sphere plus one 1 mm layer: at most (9/8)³ ≈ 1.42 times the volume)
        assert lesion["fraction_sum"] <= lesion["voxels_gt0"] <= 1.5 * lesion["fraction_sum"]
        assert row["skull_strip"]["method"] == "none", modality  # BraTS is already stripped


def test_validate_against_the_split_csv(prepared, capsys):
    out, splits = prepared["out"], prepared["splits"]
    status = validate.main([str(out), "--splits", str(splits)])
    text = capsys.readouterr().out
    # The loader pairs `seg/` (here the T2 seg) with every modality unless it prefers
    # seg_<modality>/ as it does mask_<modality>/: validate must flag exactly the rows it would
    # refuse, i.e. the T1 row when the T1 and T2 crops differ.
    row = read_test_split(splits, "Brats21", "t1", out, check_files=False)[0]
    image, seg = nib.load(row.image_path), nib.load(row.seg_path)
    loadable = image.shape == seg.shape and np.allclose(image.affine, seg.affine, atol=1e-4)
    if loadable:
        assert status == 0, text
    else:
        assert status == 1
        assert "Brats21_test.csv (t1): 1 rows whose image, mask and seg are on different" in text
    assert "Brats21_test.csv (t2)" not in text


def test_prepared_root_feeds_the_tfds_builder(prepared, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    builds = Builds(
        data_root=prepared["out"],
        splits_dir=prepared["splits"],
        modality="t2",
        fold=0,
        test_sets=("Brats21",),
        target_shape=(96, 96, 16),
        expected_spacing=1.0,
        data_dir=prepared["root"] / "tfds",
    ).prepare()
    counts = {d: b.info.splits[SPLIT].num_examples for d, b in builds.builders.items()}
    assert counts == {"IXI": 16, "Brats21": 16}
    assert [len(builds.subject_ids(p)) for p in ("train", "val", "ixi_test")] == [1, 1, 1]
    (volume,) = list(builds.volumes("brats21"))
    assert volume.subject_id == CASE and volume.seg is not None
    assert volume.image.max() == pytest.approx(1.0) and volume.seg.sum() > 0
