"""Preparation of one scan (spec §2.1): reorient/resample, skull stripping, affine registration to
the atlas, crop, N4 — the steps `data_prep` runs over datasets and `p2l.detect` runs on a raw scan,
plus the inverse mapping of maps on the prepared grid back onto the raw scan's grid.

Needs ANTsPy (and scipy); imported lazily by `p2l.detect`, so scoring an already prepared scan
does not load it.
"""
