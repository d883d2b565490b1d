"""Per-layer timing of the Patch2Loc network on this machine (issue "Performance").

    python -m benchmarks.layer_probe [--batch 1024] [--conv-impl auto|matmul|xla] [--reps 5]
    make bench-layers ARGS="--conv-impl xla"

Times each stage of the network separately, jitted, at a batch of 24x24 patches: the eval-mode
forward (inference) and the train-mode forward + backward (gradients of the parameters and of
the layer input, as inside a train step; the stem's input is data, so no input gradient there).
Prints a table of median milliseconds and each stage's share, so one sees where a step's time
goes. XLA_FLAGS from the environment apply; p2l's default XLA:CPU flags (p2l.xla_flags) are
added unless --no-xla-flags.
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from p2l import model as p2l_model
from p2l import xla_flags
from p2l.layers import CONV_IMPLS


class Stem(p2l_model.Encoder):
    """Only the encoder's stem (the same code and variables as inside the network)."""

    @nn.compact
    def __call__(self, x, train: bool):
        return self.stem(x, train)


class Block(nn.Module):
    features: int
    stride: int
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool):
        return p2l_model.BasicBlock(self.features, self.stride, self.conv_impl)(x, train)


class Heads(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        z = jnp.mean(x, axis=(1, 2))
        return p2l_model.Head()(z, train) + p2l_model.Head()(z, train)


def layers(conv_impl: str):
    """(name, module, input shape without batch) in network order."""
    out = [("stem conv+bn+relu+maxpool 24->14->7", Stem(conv_impl), (24, 24, 1))]
    size, width = 7, 64
    for stage, w in enumerate(p2l_model.STAGE_WIDTHS):
        for block in range(2):
            stride = 2 if (stage > 0 and block == 0) else 1
            new = (size + 2 - 3) // stride + 1
            name = f"layer{stage + 1}_{block} {size}x{size}x{width}->{new}x{new}x{w}"
            out.append((name, Block(w, stride, conv_impl), (size, size, width)))
            size, width = new, w
    out.append(("pool + two heads", Heads(), (1, 1, 512)))
    return out


def median_ms(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def probe(batch: int, conv_impl: str, reps: int) -> list[tuple[str, float, float]]:
    rows = []
    for i, (name, module, shape) in enumerate(layers(conv_impl)):
        x = jax.random.normal(jax.random.key(i), (batch, *shape))
        variables = module.init(jax.random.key(0), x[:2], train=False)

        @jax.jit
        def forward(variables, x, module=module):
            return module.apply(variables, x, train=False)

        @jax.jit
        def train_grads(variables, x, module=module, i=i):
            def loss(params, x):
                y, _ = module.apply(
                    {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
                )
                return jnp.sum(y * y)

            # The stem's input is the data: a train step never needs its gradient.
            argnums = 0 if i == 0 else (0, 1)
            return jax.grad(loss, argnums=argnums)(variables["params"], x)

        rows.append(
            (name, median_ms(forward, (variables, x), reps),
             median_ms(train_grads, (variables, x), reps))
        )  # fmt: skip
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--conv-impl", choices=CONV_IMPLS, default="auto")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-xla-flags", action="store_true", help="without p2l.xla_flags")
    args = ap.parse_args(argv)
    if not args.no_xla_flags:
        xla_flags.apply()
    rows = probe(args.batch, args.conv_impl, args.reps)
    fwd_total = sum(r[1] for r in rows)
    train_total = sum(r[2] for r in rows)
    print(f"batch {args.batch}, conv_impl={args.conv_impl}, {jax.devices()[0].device_kind}")
    print(
        f"{'layer':44s} {'eval fwd ms':>12s} {'share':>6s} {'train fwd+bwd ms':>17s} {'share':>6s}"
    )
    for name, fwd, trn in rows:
        print(
            f"{name:44s} {fwd:12.1f} {100 * fwd / fwd_total:5.0f}% {trn:17.1f} "
            f"{100 * trn / train_total:5.0f}%"
        )
    print(f"{'sum':44s} {fwd_total:12.1f} {'':6s} {train_total:17.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
