"""p2l: a JAX/Flax implementation of Patch2Loc (Baker & Brockmeier, AISTATS 2026)."""
