"""The fusion rules (p2l.fusion) on hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from p2l import fusion
from p2l.errors import ConfigError

# Four voxels in a row; the last one is outside the brain (both maps are 0 there, as
# post-processed maps are).
P2L = np.array([1.0, 3.0, 5.0, 0.0], np.float32)
PIXEL = np.array([0.2, 0.4, 0.1, 0.0], np.float32)
BRAIN = np.array([1, 1, 1, 0], np.uint8)
PARAMS = fusion.FusionParams(p2l_mean=2.0, p2l_std=2.0, pixel_mean=0.1, pixel_std=0.1,
                             p2l_threshold=2.5, weight=0.5)  # fmt: skip


def test_product_weights_the_residual_by_the_min_max_normalised_patch2loc_score():
    # p2l over the brain: min 1, max 5 -> weights 0, 0.5, 1.
    got = fusion.product(P2L, PIXEL, BRAIN)
    np.testing.assert_allclose(got, [0.0, 0.2, 0.1, 0.0], rtol=1e-6)
    # A constant Patch2Loc map weighs every voxel 1: the residual alone.
    np.testing.assert_allclose(fusion.product(np.full(4, 7.0), PIXEL, BRAIN), [0.2, 0.4, 0.1, 0])


def test_zsum_standardises_each_map_by_its_healthy_moments():
    # z(p2l) = (1-2)/2, (3-2)/2, (5-2)/2 = -0.5, 0.5, 1.5; z(pixel) = 1, 3, 0.
    got = fusion.zsum(P2L, PIXEL, BRAIN, PARAMS)
    np.testing.assert_allclose(got, [0.25, 1.75, 0.75, 0.0], rtol=1e-6)
    weighted = fusion.zsum(P2L, PIXEL, BRAIN, fusion.FusionParams(**{**PARAMS.to_dict(),
                                                                     "weight": 1.0}))  # fmt: skip
    np.testing.assert_allclose(weighted, [-0.5, 0.5, 1.5, 0.0], rtol=1e-6)
    with pytest.raises(ValueError, match="p2l_std"):
        fusion.zsum(P2L, PIXEL, BRAIN, fusion.FusionParams(**{**PARAMS.to_dict(), "p2l_std": 0}))


def test_gate_keeps_the_residual_where_patch2loc_is_above_its_healthy_threshold():
    np.testing.assert_allclose(fusion.gate(P2L, PIXEL, BRAIN, PARAMS), [0.0, 0.4, 0.1, 0.0])
    # Strictly above (the prediction rule of p2l.thresholds.predict): 3.0 at a threshold of 3.0
    # is not gated in.
    at = fusion.FusionParams(**{**PARAMS.to_dict(), "p2l_threshold": 3.0})
    np.testing.assert_allclose(fusion.gate(P2L, PIXEL, BRAIN, at), [0.0, 0.0, 0.1, 0.0])


def test_every_rule_is_zero_outside_the_brain_and_works_on_flat_in_brain_values():
    for rule in fusion.RULES:
        volume = fusion.fuse(rule, P2L, PIXEL, BRAIN, PARAMS)
        assert volume[3] == 0.0 and volume.dtype == np.float32
        flat = fusion.fuse(rule, P2L[:3], PIXEL[:3], None, PARAMS)
        np.testing.assert_array_equal(flat, volume[:3])


def test_healthy_moments_merge_volumes_exactly():
    rng = np.random.default_rng(0)
    parts = [rng.normal(3.0, 2.0, n) for n in (5, 1, 300)]
    moments = fusion.HealthyMoments()
    for part in parts:
        moments.add(part)
    moments.add(np.array([]))
    everything = np.concatenate(parts)
    assert moments.count == everything.size
    assert moments.mean == pytest.approx(everything.mean(), rel=1e-12)
    assert moments.std == pytest.approx(everything.std(), rel=1e-12)


def test_rules_are_checked():
    assert fusion.check_rules(["gate", "product"]) == ("gate", "product")
    with pytest.raises(ConfigError, match="unknown fusion rule"):
        fusion.check_rules(["sum"])
    with pytest.raises(ConfigError, match="twice"):
        fusion.check_rules(["gate", "gate"])
    with pytest.raises(ValueError, match="differ"):
        fusion.product(P2L, PIXEL[:3], BRAIN)
