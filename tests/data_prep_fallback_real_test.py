"""The offline atlas-based skull-stripping fallback against HD-BET on a real brain (IXI002 T1).

IXI002 is shipped already stripped by HD-BET, with HD-BET's mask: an easy input for the fallback
(no scalp), so this bounds its quality from above; on heads it is only checked for plausibility
(data_prep_wmh_real_test.py). Registration runs its two coarsest levels, as the fallback uses
only coarse levels anyway (with the reference schedule: Dice 0.952 for T1, 0.966 for T2).
"""

from __future__ import annotations

import ants
import numpy as np
import pytest

from p2l.preparation.atlas import load_atlas
from p2l.preparation.skull_strip import skull_strip
from p2l.preparation.steps import RegistrationParams, reorient_resample
from tests.data_prep_real import SHARED

# Real scans through registration and skull stripping: tens of seconds per module (make test-slow).
pytestmark = pytest.mark.slow

SCAN = SHARED / "data/ixi_defacing_pipeline/data/example_input_hdbet_processed/IXI002-Guys-0828-T1"


def test_atlas_fallback_agrees_with_hd_bet():
    if not SCAN.is_dir():
        pytest.skip("../shared is absent (a user's clone): real-data test skipped")
    image, _ = reorient_resample(ants.image_read(str(SCAN / "hd_bet_IXI002-Guys-0828-T1.nii.gz")))
    hd_bet = (
        ants.resample_image_to_target(
            ants.image_read(str(SCAN / "hd_bet_mask_IXI002-Guys-0828-T1.nii.gz")),
            image,
            interp_type="linear",
        ).numpy()
        >= 0.5
    )

    stripped, mask, info = skull_strip(
        image,
        "atlas",
        load_atlas(),
        source=str(SCAN),
        registration=RegistrationParams.with_iterations((100, 50)),
    )

    fallback = mask.numpy() > 0.5
    dice = 2 * np.sum(fallback & hd_bet) / (fallback.sum() + hd_bet.sum())
    assert dice > 0.9, dice
    assert "LOWER QUALITY" in info["quality"]
    assert np.all(stripped.numpy()[~fallback] == 0)
