import jax
import jax.numpy as jnp
import numpy as np

from p2l import patches


def test_patch_size_and_candidate_layout():
    assert patches.patch_size_for(192, 0.125) == 24
    assert patches.patch_size_for(96, 0.125) == 12
    assert patches.candidates_per_slice(32384, 356) == 91  # 91*356 = 32396 >= 32384


def test_extract_patches_uses_half_patch_zero_padding():
    img = jnp.arange(2 * 6 * 6, dtype=jnp.float32).reshape(2, 6, 6) + 1
    padded = patches.pad_slices(img, 4)
    got = patches.extract_patches(
        padded, jnp.array([1, 0]), jnp.array([0, 3]), jnp.array([5, 2]), 4
    )
    # patch centred at (y, x) covers rows y-2..y+1, cols x-2..x+1 (spec §3.2), zeros outside
    want0 = np.zeros((4, 4))
    want0[2:, :3] = np.array(img[1, 0:2, 3:6])
    np.testing.assert_array_equal(got[0], want0)
    np.testing.assert_array_equal(got[1], np.array(img[0, 1:5, 0:4]))


def window_counts(mask_BxHxW, patch: int):
    """Mask pixels in the patch centred at every pixel, (B, H, W): a summed-area table of the
    padded mask. The whole-map reference for draw_candidates' per-candidate counts (the sampler
    used it until counting at the candidates was found cheaper on XLA:CPU)."""
    padded = patches.pad_slices(jnp.asarray(mask_BxHxW).astype(jnp.int32), patch)
    sat = jnp.pad(jnp.cumsum(jnp.cumsum(padded, axis=1), axis=2), ((0, 0), (1, 0), (1, 0)))
    h, w = mask_BxHxW.shape[1:]
    return (
        sat[:, patch : patch + h, patch : patch + w]
        - sat[:, :h, patch : patch + w]
        - sat[:, patch : patch + h, :w]
        + sat[:, :h, :w]
    )


def test_window_counts_match_brute_force():
    rng = np.random.default_rng(0)
    mask = (rng.random((2, 9, 7)) > 0.4).astype(np.uint8)
    p = 4
    got = np.array(window_counts(jnp.array(mask), p))
    padded = np.pad(mask, ((0, 0), (2, 2), (2, 2)))
    for b in range(2):
        for y in range(9):
            for x in range(7):
                assert got[b, y, x] == padded[b, y : y + p, x : x + p].sum()


def brain_batch(b=4, h=32, w=32):
    yy, xx = np.mgrid[:h, :w]
    mask = (yy - h / 2) ** 2 / (0.35 * h) ** 2 + (xx - w / 2) ** 2 / (0.3 * w) ** 2 <= 1
    mask_one = np.broadcast_to(mask, (b, h, w)).astype(np.uint8)
    image = np.random.default_rng(1).random((b, h, w)).astype(np.float32) * mask_one
    return jnp.array(image), jnp.array(mask_one)


def test_rejection_rule_and_targets():
    image, mask_one = brain_batch()
    p, rate = 8, 0.2
    pb = patches.sample_training_patches(
        jax.random.key(0),
        image,
        mask_one,
        jnp.array([10.0, 20.0, 30.0, 40.0]),
        jnp.arange(4),
        per_slice=50,
        num_candidates=200,
        capacity=200,
        patch=p,
        rejection_rate=rate,
    )
    w = np.array(pb.weight)
    assert pb.patches.shape == (200, p, p, 1)
    assert int(pb.num_accepted) == int(w.sum()) > 0 and int(pb.num_overflow) == 0
    padded_mask = np.pad(np.array(mask_one), ((0, 0), (p // 2, p // 2), (p // 2, p // 2)))
    tgt = np.array(pb.target)
    for i in np.flatnonzero(w):
        y, x = np.rint(tgt[i] / 100 * 32).astype(int)
        # the slice the patch came from is identified by its position input
        b = int(round(float(pb.position[i]) / 10)) - 1
        frac = padded_mask[b, y : y + p, x : x + p].mean()
        assert frac >= rate
        np.testing.assert_array_equal(
            pb.patches[i, ..., 0], np.pad(np.array(image[b]), p // 2)[y : y + p, x : x + p]
        )
    # valid patches come first; padding slots have weight 0
    assert w[: int(w.sum())].all() and not w[int(w.sum()) :].any()


def test_static_shapes_capacity_overflow_and_candidate_budget():
    image, mask_one = brain_batch()
    kw = dict(per_slice=50, num_candidates=120, patch=8, rejection_rate=0.0)
    pos, idx = jnp.zeros(4), jnp.arange(4)
    full = patches.sample_training_patches(
        jax.random.key(0), image, mask_one, pos, idx, capacity=200, **kw
    )
    # rate 0 accepts every candidate inside the budget C=120 (slices 0,1 fully, slice 2 20 of 50)
    assert int(full.num_accepted) == 120
    small = patches.sample_training_patches(
        jax.random.key(0), image, mask_one, pos, idx, capacity=64, **kw
    )
    assert small.patches.shape[0] == 64
    assert int(small.num_overflow) == 120 - 64 and float(small.weight.sum()) == 64


def test_draws_depend_on_global_slice_index_not_on_local_position():
    """Sharding-invariance: slice i draws the same candidates wherever it sits."""
    image, mask_one = brain_batch()
    a = patches.draw_candidates(jax.random.key(3), mask_one, jnp.arange(4), 10, 40, 8, 0.2)
    b = patches.draw_candidates(jax.random.key(3), mask_one[2:], jnp.arange(2, 4), 10, 40, 8, 0.2)
    np.testing.assert_array_equal(a.y[2:], b.y)
    np.testing.assert_array_equal(a.accepted[2:], b.accepted)


def test_sliding_window_grid_and_targets():
    ys, xs = patches.sliding_window_centres(192, 192, 4)
    assert ys[0] == 0 and ys[-1] == 188 and len(ys) == 48
    t = patches.window_targets(jnp.array([0, 96]), jnp.array([191, 48]), 192, 192)
    np.testing.assert_allclose(t, [[0.0, 100 * 191 / 192], [50.0, 25.0]], rtol=1e-6)
    assert float(patches.slice_position(jnp.array(37.0), 100)) == 37.0


def test_candidate_acceptance_equals_the_summed_area_table_rule():
    """draw_candidates counts mask pixels in each candidate's window; the decision must be the
    reference rule mean(mask_patch == 1) >= rate on window_counts at the same centres."""
    rng = np.random.default_rng(4)
    mask = jnp.asarray(rng.random((3, 40, 36)) < 0.45).astype(jnp.uint8)
    patch, per_slice, rate = 10, 200, 0.45
    cand = patches.draw_candidates(
        jax.random.key(9), mask, jnp.arange(3), per_slice, 600, patch, rate
    )
    counts = np.asarray(window_counts(mask, patch))
    for b in range(3):
        y, x = np.asarray(cand.y[b]), np.asarray(cand.x[b])
        frac = counts[b, y, x].astype(np.float32) / np.float32(patch * patch)
        np.testing.assert_array_equal(np.asarray(cand.accepted[b]), frac >= rate)
    assert 0 < int(cand.accepted.sum()) < 600  # both outcomes occur
