"""A real WMH-challenge-style scan (T1 in FLAIR space, 0.96 x 0.96 x 3 mm, not skull-stripped)
through the offline atlas-based skull-stripping fallback, from the challenge's folder layout.

The lesion mask is a model's pseudo-label (see ../shared/data/wmh_ibbmtum_examples/README.md):
used only as "white-matter voxels that must stay inside the brain mask". Registration runs its two
coarsest levels and N4 one short level, to keep the file fast.
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

WMH = SHARED / "data/wmh_ibbmtum_examples"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    if not WMH.is_dir():
        pytest.skip("../shared is absent (a user's clone): real-data test skipped")
    root = tmp_path_factory.mktemp("wmh_real")
    subject = root / "raw" / "Utrecht" / "0"  # the challenge's <Site>/<n>/ layout
    (subject / "pre").mkdir(parents=True)
    (subject / "pre" / "T1.nii.gz").symlink_to(WMH / "input_dir/sub-0001/anat/sub-0001_T1.nii.gz")
    (subject / "wmh.nii.gz").symlink_to(WMH / "output_dir/sub-0001/derivatives/sub-0001_seg.nii.gz")
    out = root / "out"
    argv = [
        "--dataset",
        "wmh",
        "--raw",
        str(root / "raw"),
        "--out",
        str(out),
        "--skull-strip",
        "atlas",
        *FAST,
    ]
    status = prepare.main(argv)
    row = read_manifest(out / "Test/WMH")[("Utrecht_0", "t1")]
    return {"out": out, "status": status, "row": row}


def test_fallback_is_used_and_labelled_lower_quality(prepared):
    assert prepared["status"] == 0
    row = prepared["row"]
    assert row["skull_strip"]["method"] == "atlas"
    assert "LOWER QUALITY" in row["skull_strip"]["quality"]
    # An adult brain, not the head (about 2.5 L here) nor a fragment of it.
    assert 900 <= row["skull_strip"]["brain_ml"] <= 1700
    resample = row["steps"][1]["result"]
    assert resample["resampled"] and resample["input_spacing"][2] == pytest.approx(3.0)


def test_outputs_are_1mm_rai_and_keep_the_white_matter_lesions(prepared):
    folder = prepared["out"] / "Test/WMH"
    image = nib.load(folder / "t1/Utrecht_0_t1.nii.gz")
    mask = np.asarray(nib.load(folder / "mask_t1/Utrecht_0_mask.nii.gz").dataobj)
    seg = np.asarray(nib.load(folder / "seg_t1/Utrecht_0_seg.nii.gz").dataobj)
    assert np.allclose(image.header.get_zooms(), 1.0)
    assert "".join(nib.aff2axcodes(image.affine)) == "LPS"
    # WMH sit deep in the white matter: a brain mask that lost them cut into the brain.
    assert np.mean(mask[seg > 0] > 0) > 0.99
    lesion = prepared["row"]["lesion"]
    # Linear warp of 3 mm slices then > 0 (the reference rule) spreads each lesion over about
    # +-3 mm in z: the count grows about twofold; the warped fractions keep the volume.
    det = prepared["row"]["steps"][3]["result"]["affine"]["determinant"]
    assert lesion["fraction_sum"] * det == pytest.approx(lesion["source_mm3"], rel=0.05)
    assert lesion["voxels_gt0"] > 1.5 * lesion["fraction_sum"]
    # The brain is brighter than the dark background in the corrected image.
    data = np.asarray(image.dataobj)
    assert np.median(data[mask >= 0.5]) > 5 * max(np.median(data[mask == 0]), 1e-3)
