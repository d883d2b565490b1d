"""Entry point: python -m p2l.main --config=experiments/brats.py --workdir=runs/brats.

Config overrides: --config.fold=3 --config.data_root=/data/p2l ...; the config is locked, so a
misspelt key stops the run before anything starts. Multi-process runs (SLURM, TPU pods, or
explicit --coordinator_address) call jax.distributed.initialize() first.

The workdir is locked while it runs (a second process on it stops at once). Resuming under a
config whose identity differs from the checkpoint's stops, naming the keys, unless
--accept_config_change names them (p2l.run_identity). Exit codes: 0 done, 1 error,
75 interrupted by SIGTERM/SIGINT (checkpointed, not evaluated; the same command resumes).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from p2l import config_file
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
flags.DEFINE_list(
    "accept_config_change",
    [],
    "resume although these identity keys differ from the checkpoint's (comma-separated; "
    "recorded in <workdir>/checkpoints/identity.json)",
)


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
    from p2l import interrupt

    is_main = jax.process_index() == 0
    try:
        with interrupt.stop_signals():
            code, message = _run_locked(is_main)
    except interrupt.Interrupted as stop:  # before the lock was taken
        code, message = interrupt.EXIT_INTERRUPTED, f"p2l: stopped by {stop.signal_name}"
    except P2LError as err:  # e.g. the workdir is in use: its status is not ours to write
        code, message = 1, f"error: {err}"
    if message:
        print(message, file=sys.stderr, flush=True)
    return code


def _run_locked(is_main: bool) -> tuple[int, str | None]:
    """Runs the mode holding the workdir lock; (exit code, last line), with the run's status."""
    import contextlib

    from p2l import checkpoint, interrupt, run_status, workdir_lock

    workdir, mode = FLAGS.workdir, FLAGS.mode
    lock = (
        workdir_lock.hold(workdir, mode, create=mode != "eval")
        if is_main
        else contextlib.nullcontext()
    )
    status = run_status.write if is_main else lambda *a, **k: None
    with lock:
        status(workdir, "running", mode=mode, pid=os.getpid())
        try:
            _run_mode(workdir, mode)
        except interrupt.Interrupted as stop:
            steps = checkpoint.complete_steps(workdir)
            latest = steps[-1] if steps else None
            status(workdir, "interrupted", signal=stop.signal_name, step=latest)
            num_steps = FLAGS.config.num_steps
            if latest is not None and latest >= num_steps:
                done = f"training is complete (step {latest}), evaluation was not run"
            else:
                done = f"latest checkpoint: step {latest} of {num_steps}; not evaluated"
            return interrupt.EXIT_INTERRUPTED, (
                f"p2l: interrupted by {stop.signal_name}: {done}. Run the same command again "
                f"to resume (exit code {interrupt.EXIT_INTERRUPTED})"
            )
        except P2LError as err:
            status(workdir, "failed", message=str(err))
            return 1, f"error: {err}"
        steps = checkpoint.complete_steps(workdir)
        status(
            workdir,
            "trained" if mode == "train" else "evaluated",
            step=steps[-1] if steps else None,
        )
    return 0, None


def _run_mode(workdir: str, mode: str) -> None:
    import jax

    from p2l import run_status, train

    if mode in ("train", "train_eval"):
        train.train_and_evaluate(FLAGS.config, workdir, FLAGS.accept_config_change)
    if mode == "train_eval" and run_status.run_state(workdir, FLAGS.config.num_steps).finished:
        print(f"p2l: {workdir} is trained and evaluated already (results/summary.json)")
    elif mode in ("eval", "train_eval"):
        from p2l import evaluate, results_summary

        summary = evaluate.evaluate(FLAGS.config, workdir)
        if jax.process_index() == 0:
            print(results_summary.format_summary(summary))
            print(f"results: {workdir}/results/")


def _parse_flags(argv):
    """absl's flag parsing, with one-line answers for a config file or variant typo and for an
    override of a key the config lacks."""
    # Before absl's config flag, which would turn a typo into a traceback.
    spec = config_file.config_spec_in_argv(argv)
    if spec is not None:
        try:
            config_file.check_config_spec(spec)
        except P2LError as err:
            sys.exit(f"error: {err}")
    try:
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError) as err:
        # ml_collections: an override names a key that the locked config does not have.
        overrides = [a for a in argv if a.startswith("--config.")]
        detail = config_file.unknown_key_detail(err)
        sys.exit(f"error: unknown config key in {' '.join(overrides)}: {detail}")


def run():
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
