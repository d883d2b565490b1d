"""A real BraTS-preprocessed glioma case (skull-stripped, SRI24 240 x 240 x 155, LPS) laid out as a
BraTS 2021 case folder, its tumour labels in the 2021 convention {1, 2, 4} -> one binary seg.

The tumour mask is an algorithm's pseudo-label in the 2023 convention (1 NCR, 2 ED, 3 ET; see
../shared/data/brats_orchestrator_case/README.md); it is rewritten 3 -> 4 to give BraTS 2021's
labels. Registration runs its two coarsest levels and N4 one short level.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from data_prep import prepare
from data_prep.manifest import read_manifest
from tests.data_prep_real import FAST, SHARED

# Real scans through registration and skull stripping: tens of seconds per module (make test-slow).
pytestmark = pytest.mark.slow

CASE_DIR = SHARED / "data/brats_orchestrator_case"
CASE = "BraTS2021_99999"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    if not CASE_DIR.is_dir():
        pytest.skip("../shared is absent (a user's clone): real-data test skipped")
    root = tmp_path_factory.mktemp("brats_real")
    case = root / "raw" / CASE
    case.mkdir(parents=True)
    (case / f"{CASE}_t2.nii.gz").symlink_to(CASE_DIR / "data/preprocessed_case/t2w.nii.gz")
    labels = nib.load(CASE_DIR / "outputs/segmentation.nii.gz")
    data = np.asarray(labels.dataobj).copy()
    data[data == 3] = 4
    nib.save(nib.Nifti1Image(data, labels.affine, labels.header), case / f"{CASE}_seg.nii.gz")
    out = root / "out"
    argv = [
        "--dataset",
        "brats21",
        "--raw",
        str(root / "raw"),
        "--out",
        str(out),
        "--modalities",
        "t2",
        *FAST,
    ]
    status = prepare.main(argv)
    return {"out": out, "status": status, "row": read_manifest(out / "Test/Brats21")[(CASE, "t2")]}


def test_labels_1_2_4_become_one_binary_whole_tumour_mask(prepared):
    assert prepared["status"] == 0
    folder = prepared["out"] / "Test/Brats21"
    seg = nib.load(folder / f"seg/{CASE}_seg.nii.gz")
    values = np.asarray(seg.dataobj)
    assert seg.get_data_dtype() == np.uint8 and set(np.unique(values)) == {0, 1}
    lesion = prepared["row"]["lesion"]
    # Every tumour label counts: 14300 + 108566 + 21866 voxels (the README's per-label counts).
    assert lesion["label_voxels"] == {"0": 8783268, "1": 14300, "2": 108566, "4": 21866}
    assert lesion["lesion_voxels"] == 144732
    det = prepared["row"]["steps"][3]["result"]["affine"]["determinant"]
    assert lesion["fraction_sum"] * det == pytest.approx(144732, rel=0.03)
    assert int(values.sum()) == lesion["voxels_gt0"] >= lesion["fraction_sum"]


def test_already_stripped_scan_keeps_its_brain(prepared):
    row = prepared["row"]
    assert row["skull_strip"]["method"] == "none"  # BraTS is distributed skull-stripped
    assert row["steps"][1]["result"]["resampled"] is False  # already 1 mm: only reoriented
    folder = prepared["out"] / "Test/Brats21"
    image = nib.load(folder / f"t2/{CASE}_t2.nii.gz")
    mask = np.asarray(nib.load(folder / f"mask/{CASE}_mask.nii.gz").dataobj)
    assert image.shape == mask.shape and "".join(nib.aff2axcodes(image.affine)) == "LPS"
    seg = np.asarray(nib.load(folder / f"seg/{CASE}_seg.nii.gz").dataobj)
    assert np.mean(mask[seg > 0] > 0) > 0.98  # the tumour is inside the brain mask
