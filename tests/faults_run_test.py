"""Faults around a run's life (issue 15, defects 1-3 and a corrupt summary): resuming under another
config, two processes on one workdir, SIGTERM/SIGINT in any mode, what counts as finished.

The fast tests drive each piece directly; the slow ones (`make test-slow`) do it through
`python -m p2l.main` as a user or a sweep would.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2l import checkpoint, interrupt, run_identity, run_status, train, workdir_lock
from p2l.tools import sweep, tables
from tests.conftest import demo_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """Empty data and split folders: enough for everything that stops before reading data."""
    root = tmp_path_factory.mktemp("folders")
    for name in ("data", "splits"):
        (root / name).mkdir()
    return root


# -- 1. run identity ------------------------------------------------------------------------------


def test_identity_holds_what_defines_the_model_not_bookkeeping(folders):
    config = demo_config(folders)
    ident = run_identity.identity(config)
    defining = ("modality", "fold", "seed", "sampling.patch_fraction", "data.image_shape",
                "model.dtype", "loss.type", "optim.learning_rate", "data_root",
                "splits_dir")  # fmt: skip
    for key in defining:
        assert key in ident
    for key in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "tfds_dir",
                "eval.stride", "name", "test_sets", "model.conv_impl", "prefetch"):  # fmt: skip
        assert key not in ident
    assert ident["data.image_shape"] == [96, 96, 48] and os.path.isabs(ident["data_root"])
    longer = demo_config(folders, num_steps=500, log_every=7, **{"eval.stride": 8})
    assert run_identity.digest(run_identity.identity(longer)) == run_identity.digest(ident)


def _fake_run(workdir: Path, config, step: int) -> None:
    """A workdir trained with `config` up to `step`: its identity and a (tiny) checkpoint."""
    run_identity.write_history(workdir, run_identity.check_resume(config, workdir, None))
    ckpt = checkpoint.Checkpointer(workdir)
    ckpt.save(step, {"step": step})
    ckpt.close()


def test_resume_under_another_patch_size_or_modality_stops_naming_the_keys(folders, tmp_path):
    config = demo_config(folders)
    _fake_run(tmp_path, config, 4)
    (tmp_path / "run_info.json").write_text('{"config": "as trained"}')
    wider = demo_config(folders, **{"sampling.patch_fraction": 0.25})
    with pytest.raises(run_identity.IdentityMismatch) as err:
        train.train_and_evaluate(wider, tmp_path)  # stops before loading any data
    message = str(err.value)
    assert "checkpoint 4 was trained with another config" in message
    assert "sampling.patch_fraction 0.125 → 0.25" in message
    assert (
        "new --workdir" in message and "--accept_config_change=sampling.patch_fraction" in message
    )
    t1 = demo_config(folders, modality="t1", **{"sampling.patch_fraction": 0.25})
    with pytest.raises(run_identity.IdentityMismatch, match='modality "t2" → "t1"') as err:
        train.train_and_evaluate(t1, tmp_path)
    assert set(err.value.changes) == {"modality", "sampling.patch_fraction"}
    # Nothing was rewritten: run_info.json still describes the checkpoints.
    assert (tmp_path / "run_info.json").read_text() == '{"config": "as trained"}'


def test_an_accepted_change_is_recorded_and_evaluation_reads_the_checkpoints_identity(
    folders, tmp_path
):
    config = demo_config(folders)
    _fake_run(tmp_path, config, 4)
    wider = demo_config(folders, **{"sampling.patch_fraction": 0.25})
    with pytest.raises(run_identity.IdentityMismatch):  # accepting another key is not enough
        run_identity.check_resume(wider, tmp_path, 4, accept=["modality"])
    history = run_identity.check_resume(wider, tmp_path, 4, accept=["sampling.patch_fraction"])
    run_identity.write_history(tmp_path, history)
    stored = json.loads((tmp_path / "checkpoints" / "identity.json").read_text())["history"]
    assert stored[-1]["from_step"] == 4
    assert stored[-1]["accepted_change"] == {"sampling.patch_fraction": [0.125, 0.25]}
    # Checkpoint 4 was trained under the old identity, the ones after it under the new one.
    assert run_identity.stored_identity(tmp_path, 4)["sampling.patch_fraction"] == 0.125
    assert run_identity.stored_identity(tmp_path, 6)["sampling.patch_fraction"] == 0.25
    assert run_identity.check_checkpoint(config, tmp_path, 4)
    with pytest.raises(run_identity.IdentityMismatch, match="patch_fraction 0.125 → 0.25"):
        run_identity.check_checkpoint(wider, tmp_path, 4)
    # Killed before saving under the new identity: resuming with the old config is fine again.
    assert run_identity.check_resume(config, tmp_path, 4) == stored[:1]


def test_detection_takes_the_identity_keys_from_the_checkpoint(folders, tmp_path):
    from p2l.run_info import load_run_config

    config = demo_config(folders)
    _fake_run(tmp_path, config, 4)
    rewritten = demo_config(folders, modality="t1").to_dict()  # what the old code left there
    (tmp_path / "run_info.json").write_text(json.dumps({"config": rewritten}, default=list))
    assert load_run_config(tmp_path).modality == "t2"


# -- 2. workdir lock ------------------------------------------------------------------------------


def test_a_second_process_on_a_busy_workdir_stops_at_once_naming_the_holder(folders, tmp_path):
    config = demo_config(folders)
    with workdir_lock.hold(tmp_path, "training"):
        assert workdir_lock.holder(tmp_path).startswith(f"pid {os.getpid()} on ")
        start = time.time()
        out = subprocess.run(
            [sys.executable, "-m", "p2l.main", "--config=experiments/demo.py:tiny",
             f"--workdir={tmp_path}", f"--config.data_root={config.data_root}",
             f"--config.splits_dir={config.splits_dir}", f"--config.tfds_dir={config.tfds_dir}"],
            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        elapsed = time.time() - start
    assert out.returncode == 1, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert f"in use by another p2l process: pid {os.getpid()} on " in lines[0]
    assert "(training, since " in lines[0]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "run_info.json").exists()
    assert elapsed < 120  # at once: no data loaded, nothing compiled
    assert workdir_lock.holder(tmp_path) is None  # released: the note is emptied


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_message(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    note = {"pid": int(dead), "host": os.uname().nodename, "started": "then", "purpose": "training"}
    (tmp_path / ".lock").write_text(json.dumps(note))
    assert workdir_lock.holder(tmp_path) is None  # the pid is gone
    with workdir_lock.hold(tmp_path, "training"):
        pass
    out = capsys.readouterr().out
    assert f"was left by pid {dead} on " in out and "no longer running; taking it over" in out


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with workdir_lock.hold(tmp_path, "train_eval"), workdir_lock.hold(tmp_path, "training"):
        note = json.loads((tmp_path / ".lock").read_text())
        assert note["purpose"] == "train_eval" and note["pid"] == os.getpid()
    assert (tmp_path / ".lock").read_text() == ""


# -- 3. stop signals, finished runs -------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_is_deferred_in_the_training_loop_and_raises_elsewhere(sig):
    with interrupt.stop_signals():
        with interrupt.deferred() as stop:
            os.kill(os.getpid(), sig)
            assert stop.requested == sig.name  # the loop checkpoints, then raises
            with pytest.raises(interrupt.Interrupted):  # a second one: at once
                os.kill(os.getpid(), sig)
        with pytest.raises(interrupt.Interrupted) as err:  # e.g. during evaluation
            os.kill(os.getpid(), sig)
        assert err.value.signal_name == sig.name
    assert not isinstance(err.value, Exception)  # no `except Exception` turns it into an error


def _write(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))


def _fake_workdir(
    workdir: Path, steps, evaluated, num_steps=12, status=None, name="demo", identity=None
):
    for step in steps:
        (workdir / "checkpoints" / str(step)).mkdir(parents=True)
    config = {"name": name, "num_steps": num_steps, "test_sets": ["Synth"]}
    info = {"config": config}
    if identity:
        info["identity"] = {"hash": identity, "from_step": 1}
    _write(workdir / "run_info.json", info)
    if evaluated is not None:
        metrics = {"dice[oracle]": {"mean": 0.5}, "auroc": {"mean": 0.9}}
        summary = {"checkpoint_step": evaluated, "sets": {"Synth": {"metrics": metrics}}}
        _write(workdir / "results" / "summary.json", summary)
    if status:
        _write(workdir / "status.json", status)


def test_finished_means_the_last_step_checkpointed_and_evaluated(tmp_path):
    _fake_workdir(tmp_path / "a", [2, 4], 4, status={"state": "interrupted", "signal": "SIGTERM"})
    state = run_status.run_state(tmp_path / "a", 12)
    assert not state.finished and state.interrupted
    assert state.label == "interrupted (SIGTERM) at checkpoint 4 of 12; resumable"
    _fake_workdir(tmp_path / "b", [10, 12], 12)
    assert run_status.run_state(tmp_path / "b", 12).finished
    assert not run_status.run_state(tmp_path / "b", 20).finished  # extended: not yet
    _fake_workdir(tmp_path / "c", [12, 14], 12)  # trained on after the evaluation
    assert "evaluated at step 12" in run_status.run_state(tmp_path / "c", 12).label


def test_sweep_lists_and_skips_by_the_last_step(tmp_path, capsys):
    runs = sweep.expand("experiments/demo.py", tmp_path)
    first = runs[0].workdir  # num_steps=40 in the demo sweep
    _fake_workdir(
        first, [20], 20, num_steps=40, status={"state": "interrupted", "signal": "SIGINT"}
    )
    assert not runs[0].finished
    assert sweep.main(["--config=experiments/demo.py", "--runs", str(tmp_path), "--list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert "interrupted (SIGINT) at checkpoint 20 of 40; resumable" in listing[0]
    assert "not started" in listing[1]


def test_sweep_reports_a_run_that_exits_75_as_interrupted(tmp_path, monkeypatch, capsys):
    runs = sweep.expand("experiments/demo.py", tmp_path)[:2]
    codes = {runs[0].workdir: interrupt.EXIT_INTERRUPTED, runs[1].workdir: 0}
    monkeypatch.setattr(
        sweep, "command",
        lambda spec, run, extra: [sys.executable, "-c", f"raise SystemExit({codes[run.workdir]})"],
    )  # fmt: skip
    counts = sweep.run_locally("experiments/demo.py", runs, 1, [])
    assert counts == {"done": 1, "failed": 0, "interrupted": 1, "not started": 0}
    out = capsys.readouterr().out
    assert f"interrupted: {runs[0].workdir} (resumable" in out and "FAILED" not in out


def test_tables_count_finished_runs_only_and_name_a_corrupt_summary(tmp_path, capsys):
    root = tmp_path / "runs"
    _fake_workdir(root / "fold=0", [12], 12)
    _fake_workdir(root / "fold=1", [4], 4, status={"state": "interrupted", "signal": "SIGTERM"})
    _fake_workdir(root / "fold=2", [12], 12)
    (root / "fold=2" / "results" / "summary.json").write_text('{"checkpoint_step": 12, "se')
    _fake_workdir(root / "fold=3", [12], 12)
    (root / "fold=3" / "run_info.json").write_text("{")
    collected, problems = tables.collect(root)
    assert collected["runs"]["demo"]["Synth"] == [str(root / "fold=0")]
    assert collected["table"]["demo"]["Synth"]["dice[oracle]"] == [0.5]
    assert len(problems) == 3
    assert any("fold=1" in p and "interrupted" in p for p in problems)
    assert any(f"{root / 'fold=2' / 'results' / 'summary.json'}: corrupt, not valid JSON" in p
               for p in problems)  # fmt: skip
    assert any(f"{root / 'fold=3' / 'run_info.json'}: corrupt" in p for p in problems)
    assert tables.main(["--runs", str(root)]) == 0
    out = capsys.readouterr().out
    assert "| demo | Synth | 1 |" in out and "## Not counted" in out
    assert "Traceback" not in out and "summary.json: corrupt" in out
    assert "## Not counted" in (root / "tables.md").read_text()


def test_tables_count_one_model_once_and_say_how_many_runs_a_row_averages(tmp_path, capsys):
    root = tmp_path / "runs"
    # runs/t2 of `make train` and runs/t2/fold=0 of a sweep: one model (same identity).
    _fake_workdir(root / "t2", [12], 12, name="t2", identity="aaaa")
    _fake_workdir(root / "t2" / "fold=0", [12], 12, name="t2", identity="aaaa")
    _fake_workdir(root / "t2" / "fold=1", [12], 12, name="t2", identity="bbbb")
    os.utime(root / "t2" / "results" / "summary.json", (1, 1))  # evaluated earlier
    collected, problems = tables.collect(root)
    assert collected["runs"]["t2"]["Synth"] == [str(root / "t2" / "fold=0"),
                                                str(root / "t2" / "fold=1")]  # fmt: skip
    assert problems == [
        f"{root / 't2'}: the same model as {root / 't2' / 'fold=0'} (identity aaaa); counted once"
    ]
    markdown, _ = tables.render(collected, problems)
    assert "| t2 | Synth | 2 |" in markdown and "counted once" in markdown


def test_tables_say_which_volumes_each_protocol_is_on(tmp_path):
    root = tmp_path / "runs"
    _fake_workdir(root / "fold=0", [12], 12, identity="a")
    path = root / "fold=0" / "results" / "summary.json"
    summary = json.loads(path.read_text())
    summary["sets"]["Synth"]["protocols"] = {
        "reference": {"policies": ["oracle", "healthy_q98"], "volumes": 12},
        "behrendt": {"policies": ["validation"], "volumes": 10, "excluded_validation_subjects": 2},
    }
    path.write_text(json.dumps(summary))
    markdown, _ = tables.render(*tables.collect(root))
    assert ("- demo / Synth: behrendt: 10 volumes (2 validation subjects of the test CSV "
            "excluded); reference: 12 volumes") in markdown  # fmt: skip


# -- end to end, through p2l.main (slow) ---------------------------------------------------------


def _main(workdir: Path, config, *extra: str, mode="train_eval", **kw):
    flags = [
        "-m", "p2l.main", "--config=experiments/demo.py:tiny", f"--workdir={workdir}",
        f"--mode={mode}", f"--config.data_root={config.data_root}",
        f"--config.splits_dir={config.splits_dir}", f"--config.tfds_dir={config.tfds_dir}",
        "--config.sampling.slices_per_step=4", "--config.checkpoint_every=2",
        "--config.log_every=2", "--config.eval_every=100", "--config.eval.stride=4",
        "--config.eval.max_volumes=1", "--config.eval.max_healthy_volumes=1",
        "--config.eval.num_figures=0", *extra,
    ]  # fmt: skip
    return subprocess.Popen([sys.executable, *flags], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # fmt: skip


def _finish(proc, timeout=600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _wait_for(path: Path, proc, seconds=400):
    deadline = time.time() + seconds
    while not path.is_dir():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def lifecycle(small_demo, tmp_path_factory):
    """Train (train_eval) -> a second process on the busy workdir -> SIGTERM -> rerun to the end.

    The first run is set to 1000 steps so that SIGTERM surely finds it training; the rerun
    finishes it at 12 (or at the step it was stopped at, if later)."""
    config = demo_config(small_demo)
    workdir = tmp_path_factory.mktemp("runs") / "demo" / "fold=0"
    seen = {"workdir": workdir, "config": config}
    first = _main(workdir, config, "--config.num_steps=1000")
    seen["first_pid"] = first.pid
    _wait_for(workdir / "checkpoints" / "2", first)
    second = _main(workdir, config)
    seen["second"] = _finish(second, 300)
    seen["first_alive_after_second"] = first.poll() is None
    first.send_signal(signal.SIGTERM)
    seen["first"] = _finish(first, 300)
    seen["after_sigterm"] = {
        "summary": (workdir / "results" / "summary.json").exists(),
        "steps": checkpoint.complete_steps(workdir),
        "state": run_status.run_state(workdir, 12),
        "tables": tables.collect(workdir.parents[1])[1],
    }
    rerun = _main(workdir, config)
    seen["rerun"] = _finish(rerun, 900)
    return seen


@pytest.mark.slow
def test_a_second_training_on_a_busy_workdir_stops_naming_the_holder(lifecycle):
    code, _, err = lifecycle["second"]
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"in use by another p2l process: pid {lifecycle['first_pid']} on " in err
    assert "(train_eval, since" in err
    assert lifecycle["first_alive_after_second"]


@pytest.mark.slow
def test_sigterm_in_train_eval_checkpoints_skips_evaluation_and_exits_75(lifecycle):
    code, out, err = lifecycle["first"]
    assert code == interrupt.EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err
    assert "p2l: interrupted by SIGTERM: latest checkpoint: step " in err.strip().splitlines()[-1]
    after = lifecycle["after_sigterm"]
    assert not after["summary"]  # the half-trained model was not evaluated
    assert after["steps"] and after["steps"][-1] < 1000
    assert after["state"].interrupted and not after["state"].finished
    assert any("interrupted (SIGTERM)" in p for p in after["tables"])  # listed apart


@pytest.mark.slow
def test_the_interrupted_run_resumes_and_finishes(lifecycle):
    code, out, err = lifecycle["rerun"]
    assert code == 0, err[-3000:]
    workdir = lifecycle["workdir"]
    assert "p2l: resumed from" in out
    summary = json.loads((workdir / "results" / "summary.json").read_text())
    assert summary["checkpoint_step"] == max(12, lifecycle["after_sigterm"]["steps"][-1])
    assert run_status.run_state(workdir, 12).finished
    assert json.loads((workdir / "status.json").read_text())["state"] == "evaluated"


@pytest.mark.slow
def test_resuming_under_another_config_stops_unless_accepted(lifecycle):
    workdir, config = lifecycle["workdir"], lifecycle["config"]
    latest = checkpoint.complete_steps(workdir)[-1]
    more = f"--config.num_steps={latest + 2}"
    for flag, key in [("--config.sampling.patch_fraction=0.25", "sampling.patch_fraction"),
                      ("--config.modality=t1", "modality")]:  # fmt: skip
        proc = _main(workdir, config, flag, more, mode="train")
        code, _, err = _finish(proc, 300)
        assert code == 1 and "Traceback" not in err
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: ") and f"{key} " in line
        assert f"--accept_config_change={key}" in line and "new --workdir" in line
    proc = _main(workdir, config, "--config.sampling.patch_fraction=0.25", more,
                 "--accept_config_change=sampling.patch_fraction", mode="train")  # fmt: skip
    code, _, err = _finish(proc)
    assert code == 0, err[-3000:]
    history = json.loads((workdir / "checkpoints" / "identity.json").read_text())["history"]
    assert history[-1]["from_step"] == latest
    assert history[-1]["accepted_change"] == {"sampling.patch_fraction": [0.125, 0.25]}
    info = json.loads((workdir / "run_info.json").read_text())
    assert info["identity"]["accepted_change"] == {"sampling.patch_fraction": [0.125, 0.25]}
    assert checkpoint.complete_steps(workdir)[-1] == latest + 2
