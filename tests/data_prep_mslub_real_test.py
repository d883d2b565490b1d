"""A real MSLUB case (open_ms_data `_brain_` derivatives: skull-stripped, MNI 1 mm, LAS) with its
expert consensus lesion mask carried through registration (`skull-strip auto` -> none).

Stated tolerance: the warped lesion fractions times the registration's determinant equal the
source lesion volume within 5 %; the reference's `> 0` binarisation can only add voxels. With MNI
as the atlas this scan is enlarged (determinant about 0.57: its brain is smaller than the
template's). Registration runs its two coarsest levels and N4 one short level.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from data_prep import prepare, validate
from data_prep.manifest import read_manifest
from tests.data_prep_real import FAST, SHARED

# Real scans through registration and skull stripping: tens of seconds per module (make test-slow).
pytestmark = pytest.mark.slow

MSLUB = SHARED / "data/mslub_open_ms_data/cross_sectional/MNI/patient07"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    if not MSLUB.is_dir():
        pytest.skip("../shared is absent (a user's clone): real-data test skipped")
    root = tmp_path_factory.mktemp("mslub_real")
    (root / "raw").mkdir()
    (root / "raw" / "patient07").symlink_to(MSLUB)
    out = root / "out"
    argv = [
        "--dataset",
        "mslub",
        "--raw",
        str(root / "raw"),
        "--out",
        str(out),
        "--modalities",
        "t2",
        *FAST,
    ]
    status = prepare.main(argv)
    return {
        "out": out,
        "status": status,
        "row": read_manifest(out / "Test/MSLUB")[("patient07", "t2")],
    }


def test_lesion_volume_is_carried_through_registration(prepared):
    assert prepared["status"] == 0
    row = prepared["row"]
    assert row["skull_strip"]["method"] == "none"  # `_brain_` derivatives are stripped already
    lesion = row["lesion"]
    assert lesion["lesion_voxels"] == 1300  # the upstream README's count
    det = row["steps"][3]["result"]["affine"]["determinant"]
    expected = lesion["source_mm3"] / det
    assert lesion["fraction_sum"] == pytest.approx(expected, rel=0.05)
    assert lesion["voxels_gt0"] >= expected  # > 0 only grows lesions (by one source voxel)


def test_lesions_lie_in_the_brain_and_the_folder_validates(prepared):
    folder = prepared["out"] / "Test/MSLUB"
    seg = np.asarray(nib.load(folder / "seg/patient07_seg.nii.gz").dataobj)
    mask = np.asarray(nib.load(folder / "mask/patient07_mask.nii.gz").dataobj)
    assert set(np.unique(seg)) == {0, 1}
    assert np.mean(mask[seg > 0] > 0) > 0.99
    assert validate.main([str(prepared["out"])]) == 0
