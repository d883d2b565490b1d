"""Real IXI002 T1 (native scanner space, 1.2 x 0.94 x 0.94 mm, oblique) -> atlas space through the
`hd-bet` skull-stripping path (a stand-in command returns HD-BET's published mask), then read the
way the trainer reads it. T2: data_prep_ixi_t2_real_test.py."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep import validate
from p2l.normalization import load_subject
from tests.data_prep_real import IXI_ID, dice_with_atlas_brain, prepare_ixi002

# Real scans through registration and skull stripping: tens of seconds per module (make test-slow).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_ixi002(tmp_path_factory.mktemp("ixi_t1"), "T1")


def test_t1_brain_mask_overlaps_the_atlas_brain_after_registration(prepared):
    out, status, row = prepared
    assert status == 0
    assert row["skull_strip"]["method"] == "hd-bet"  # auto picks the installed hd-bet
    assert row["steps"][1]["result"]["resampled"]
    assert dice_with_atlas_brain(out / "Train/ixi", row) > 0.9


def test_t1_output_loads_as_the_trainer_reads_it(prepared):
    out, _, _ = prepared
    folder = out / "Train/ixi"
    subject = load_subject(
        folder / f"t1/{IXI_ID}_t1.nii.gz",
        folder / f"mask_t1/{IXI_ID}_mask.nii.gz",
        None,
        modality="t1",
        subject_id=IXI_ID,
    )
    assert subject.image.shape == (192, 192, 100)
    assert 0.0 <= subject.image.min() and subject.image.max() <= 1.0
    assert np.count_nonzero(subject.mask == 1) > 1_000_000  # patches need mask == 1 (spec §3.2)
    assert (folder / f"mask/{IXI_ID}_mask.nii.gz").samefile(
        folder / f"mask_t1/{IXI_ID}_mask.nii.gz"
    )
    assert validate.main([str(out)]) == 0
