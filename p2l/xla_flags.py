"""XLA:CPU flags p2l sets by default at its entry points (README, "Performance").

The pinned jax (0.10.2) sends XLA:CPU convolutions to YNNPACK. On this network's shapes (7x7 and
4x4 maps, 64-128 channels, batches of ~1024 patches) those kernels scale poorly to few threads
and are slower for weight gradients than XLA's Eigen convolutions, so convolutions go to Eigen
(matrix products stay on YNNPACK); same results up to float32 rounding. `make bench
ARGS=--no-xla-flags` measures without them.

The flags only exist in the XLA of the pinned version (XLA aborts on an unknown flag), so they
are added only there; a flag the user already set in $XLA_FLAGS is never overridden. They must
be in the environment before JAX creates its CPU backend (the first jax.devices() or
computation): entry points call `apply()` first thing.

On GPU and TPU the flag should be inert: it is a field of XLA's DebugOptions, whose flags every
backend built from the same XLA parses (jax[cuda12]==0.10.2's plugin included), and only the
XLA:CPU compiler reads it (`make gpu-check` applies it, so a GPU run would show otherwise).
JAX still creates a CPU backend beside an accelerator, so the flag cannot be tied to the default
backend (unknown before the backends start); it is skipped only when $JAX_PLATFORMS names
platforms and "cpu" is not among them.
"""

from __future__ import annotations

import os
import sys

import jax

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
PINNED_JAX = "0.10.2"


def apply() -> list[str]:
    """Adds CPU_FLAGS to $XLA_FLAGS unless already set there; returns the flags added."""
    if jax.__version__ != PINNED_JAX:
        return []
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in {p.strip() for p in platforms.lower().split(",")}:
        return []
    current = os.environ.get("XLA_FLAGS", "")
    added = [f for f in CPU_FLAGS if f.split("=")[0] not in current]
    if not added:
        return []
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        print(
            "p2l: warning: JAX started before the XLA:CPU flags could be set; running without "
            f"{' '.join(added)}",
            file=sys.stderr,
        )
        return []
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
