"""Entry point: python -m p2l.main --config=experiments/brats.py --workdir=runs/brats.

Config overrides: --config.fold=3 --config.data_root=/data/p2l ...; the config is locked, so a
misspelt key stops the run before anything starts. Multi-process runs (SLURM, TPU pods, or
explicit --coordinator_address) call jax.distributed.initialize() first.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from p2l.errors import P2LError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, results")
flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "train_eval"], "train, evaluate the checkpoint, or both"
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
flags.DEFINE_integer("process_id", None, "this process's index (multi-process runs)")


def _multi_process_requested() -> bool:
    if FLAGS.coordinator_address:
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("TPU_WORKER_ID"))


def main(argv):
    del argv
    from p2l import xla_flags

    xla_flags.apply()  # before JAX starts its backend
    import jax
    from absl import logging

    # orbax and tfds log every file operation at INFO; people want the progress lines.
    logging.set_verbosity(logging.WARNING)

    if _multi_process_requested():
        # CPU processes need a collectives backend (GPUs use NCCL, TPUs their ICI).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # Explicit flags win; otherwise JAX reads SLURM / TPU / JAX_* environment variables.
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    if FLAGS.config is None or FLAGS.workdir is None:
        sys.exit("error: --config and --workdir are required")
    from p2l import train

    try:
        if FLAGS.mode in ("train", "train_eval"):
            train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
        if FLAGS.mode == "train_eval" and _already_evaluated(FLAGS.workdir):
            print(f"p2l: {FLAGS.workdir} is trained and evaluated already (results/summary.json)")
        elif FLAGS.mode in ("eval", "train_eval"):
            from p2l import evaluate, results_summary

            summary = evaluate.evaluate(FLAGS.config, FLAGS.workdir)
            if jax.process_index() == 0:
                print(results_summary.format_summary(summary))
                print(f"results: {FLAGS.workdir}/results/")
    except P2LError as err:
        sys.exit(f"error: {err}")


def _already_evaluated(workdir: str) -> bool:
    """results/summary.json exists and was made from the latest checkpoint (sweeps re-run)."""
    import json
    from pathlib import Path

    path = Path(workdir) / "results" / "summary.json"
    ckpts = Path(workdir) / "checkpoints"
    if not path.exists() or not ckpts.is_dir():
        return False
    steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()]
    return bool(steps) and json.loads(path.read_text()).get("checkpoint_step") == max(steps)


def _parse_flags(argv):
    """absl's flag parsing, with a one-line answer for an override of a key the config lacks."""
    try:
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError) as err:
        # ml_collections: an override names a key that the locked config does not have.
        detail = str(err.args[0] if err.args else err)
        for _ in range(3):  # the message comes wrapped in nested repr()s
            detail = detail.replace("\\n", "\n").replace("\\'", "'").strip("'\" \\")
        overrides = [a for a in argv if a.startswith("--config.")]
        sys.exit(f"error: unknown config key in {' '.join(overrides)}: {detail}")


def run():
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
