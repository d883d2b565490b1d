"""Real IXI002 T2 (native scanner space, 0.94 x 0.94 x 1.25 mm) -> the T1 atlas through the
`hd-bet` path; registered on its own, as in the reference, with its own mask folder."""

from __future__ import annotations

import pytest

from tests.data_prep_real import dice_with_atlas_brain, prepare_ixi002

# Real scans through registration and skull stripping: tens of seconds per module (make test-slow).
pytestmark = pytest.mark.slow


def test_t2_brain_mask_overlaps_the_atlas_brain_after_registration(tmp_path):
    out, status, row = prepare_ixi002(tmp_path, "T2")
    assert status == 0
    assert row["modality"] == "t2" and row["skull_strip"]["method"] == "hd-bet"
    assert row["outputs"]["mask"]["path"].startswith("mask_t2/")
    assert row["source"]["image_spacing"][2] > 1.2  # 1.25 mm slices, resampled to 1 mm
    assert dice_with_atlas_brain(out / "Train/ixi", row) > 0.9
