"""`make scale-check`: does p2l hold at the protocol's full sizes? One JSON line, on this machine.

Writes a synthetic full-size dataset (IXI-shaped 1 mm volumes cropped to 192x192x100: a few IXI
subjects in two folds and a lesion set "Scale" of 5N test volumes plus a lesion validation list),
then measures, each in its own process so that memory figures are the process's own:

- `build_first_s` / `build_reuse_s`: making the slice builds, then opening them again for
  another fold of the same data (one build per dataset, shared: p2l.builds);
- `eval_peak_rss_mb[N]`, `eval_peak_rss_mb[5N]`, `eval_peak_rss_ratio`: peak resident memory of
  `p2l.main --mode=eval` on N and on 5N test volumes (must stay within 10 %: streaming);
- `eval_host_s_per_volume` / `eval_device_s_per_volume`: one volume's evaluation split into host
  work (reading from the build, post-processing, metrics) and the heatmap on the device;
- `pipeline`: training-input slices/s delivered vs a training step's consumption
  (benchmarks.bench.pipeline_throughput).

The model is trained for 2 steps only (the figures are about sizes, not accuracy); the heatmap
stride is coarse (`--stride`, 16) so that the CPU finishes within minutes: the device seconds per
volume scale with the number of patches, (192/stride)^2 x 100 in-brain at most.

    python -m benchmarks.scale_check [--n 4] [--out runs/scale_check] [--shrink]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
HEADER = ",img_name,age,label,img_path,mask_path,seg_path\n"


def _phantom(rng, shape, lesion: bool):
    """A brain-like ellipsoid with tissue texture; a bright blob when `lesion`."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.8, 0.85, 0.8])[:, None, None, None]) ** 2).sum(0))
    mask = (radius < 1.0).astype(np.uint8)
    image = (300 + 120 * np.sin(6 * grid[0]) * np.cos(5 * grid[1]) + 40 * grid[2]) * mask
    image = image + rng.normal(0, 15, shape) * mask
    seg = np.zeros(shape, np.uint8)
    if lesion:
        centre = rng.uniform(-0.4, 0.4, 3)
        blob = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) < 0.15
        seg[blob & (mask > 0)] = 1
        image[seg > 0] *= 1.8
    return np.clip(image, 0, None).astype(np.int16), mask, seg


def _save(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def write_dataset(out: Path, n_test: int, shape, n_ixi: int = 6, n_val: int = 2) -> None:
    """IXI T2 subjects (2 folds) and a lesion set "Scale" of n_test test + n_val val volumes."""
    root, splits = out / "data", out / "splits"
    if (splits / "Scale_test.csv").is_file():
        return  # written by an earlier run with the same arguments (the folder says which)
    rng = np.random.default_rng(0)
    ixi = [f"IXI{900 + i}-Scale-{i:04d}" for i in range(n_ixi)]
    for sid in ixi:
        image, mask, _ = _phantom(rng, shape, lesion=False)
        _save(root / f"Train/ixi/t2/{sid}_t2.nii.gz", image)
        _save(root / f"Train/ixi/mask/{sid}_mask.nii.gz", mask)
    splits.mkdir(parents=True, exist_ok=True)

    def ixi_csv(name, subjects):
        lines = [f"{i},{s}_t1.nii.gz,40,0,/Train/ixi/t1/{s}_t1.nii.gz,"
                 f"/Train/ixi/mask/{s}_mask.nii.gz,\n" for i, s in enumerate(subjects)]  # fmt: skip
        (splits / name).write_text(HEADER + "".join(lines))

    for fold in (0, 1):
        val = ixi[2 * fold : 2 * fold + 2]
        ixi_csv(f"IXI_train_fold{fold}.csv", [s for s in ixi if s not in val])
        ixi_csv(f"IXI_val_fold{fold}.csv", val)
    ixi_csv("IXI_test.csv", ixi[-1:])
    (splits / "avail_t2.csv").write_text(",0\n" + "".join(f"{i},{s}_t2.nii.gz\n"
                                                          for i, s in enumerate(ixi)))  # fmt: skip
    rows = {"test": [], "val": []}
    for i in range(n_test + n_val):
        sid = f"Scale{i:04d}"
        image, mask, seg = _phantom(rng, shape, lesion=True)
        _save(root / f"Test/Scale/t2/{sid}_t2.nii.gz", image)
        _save(root / f"Test/Scale/mask/{sid}_mask.nii.gz", mask)
        _save(root / f"Test/Scale/seg/{sid}_seg.nii.gz", seg)
        part = "val" if i >= n_test else "test"
        paths = [f"/Test/Scale/{kind}/{sid}_{kind}.nii.gz" for kind in ("t1", "mask", "seg")]
        rows[part].append(f"{len(rows[part])},{sid}_t1.nii.gz,50,1,{','.join(paths)}\n")
    (splits / "Scale_val.csv").write_text(HEADER + "".join(rows["val"]))
    (splits / "Scale_test.csv").write_text(HEADER + "".join(rows["test"]))  # last: complete


def overrides(out: Path, shape, stride: int, fold: int = 0) -> dict:
    """The config of every step: the demo's tiny variant at full size on the written data."""
    return {
        "data_root": str(out / "data"),
        "splits_dir": str(out / "splits"),
        "tfds_dir": str(out / "tfds"),
        "fold": fold,
        "test_sets": ("Scale",),
        "data.image_shape": tuple(shape),
        "data.expected_spacing": 1.0,
        "num_steps": 2,
        "checkpoint_every": 2,
        "eval_every": 2,
        "log_every": 1,
        "sampling.slices_per_step": 4,
        "eval.stride": stride,
        "eval.num_figures": 0,
        "eval.max_healthy_volumes": 2,
    }


def _flags(values: dict) -> list[str]:
    return ["--config=experiments/demo.py:tiny",
            *(f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
              for k, v in values.items())]  # fmt: skip


def _config(values: dict):
    from p2l import config_file

    config = config_file.load_config("experiments/demo.py:tiny")
    config.unlock()
    for key, value in values.items():
        config_file.set_dotted(config, key, value)
    return config


def _run(args: list[str], log: Path) -> dict:
    """Runs a child python; returns its seconds and own peak RSS (os.wait4's rusage)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=f, stderr=f)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"scale-check: {' '.join(args[:3])} failed ({proc.returncode}):\n{tail}")
    # ru_maxrss is in kilobytes on Linux.
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def _last_json(log: Path) -> dict:
    return json.loads(log.read_text().strip().splitlines()[-1])


def child_build(values: dict) -> dict:
    """Seconds to make (or find and check) the config's slice builds, imports excluded."""
    from p2l import input_pipeline

    config = _config(values)
    t0 = time.perf_counter()
    input_pipeline.build_dataset(config)
    return {"seconds": time.perf_counter() - t0}


def child_timing(values: dict, workdir: str) -> dict:
    """Seconds of one volume's evaluation: host (read, post-process, metrics) and device."""
    from p2l import input_pipeline, metrics, postprocess, train_state
    from p2l.scoring import Scorer

    config = _config(values)
    model, variables, _ = train_state.restore_variables(config, workdir)
    scorer = Scorer(config, model, variables)
    volumes = input_pipeline.build_dataset(config).volumes("scale")
    first = next(volumes)
    scorer(first.subject_id, first.image, first.mask, first.seg)  # compiles
    host = device = 0.0
    count = 3
    for _ in range(count):
        t0 = time.perf_counter()
        v = next(volumes)
        t1 = time.perf_counter()
        # The heatmap alone (dispatched and fetched), as p2l.scoring.Scorer.start does.
        raw = scorer.start(v.subject_id, v.image, v.mask, v.seg)._pending.result()
        t2 = time.perf_counter()
        score = postprocess.postprocess(
            raw.score, v.mask, median_size=config.eval.median_size, name=v.subject_id
        )
        metrics.volume_metrics(score, v.seg, v.mask, {}, name=v.subject_id)
        t3 = time.perf_counter()
        host += (t1 - t0) + (t3 - t2)
        device += t2 - t1
    return {"host_s": host / count, "device_s": device / count}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4, help="test volumes of the smaller evaluation")
    ap.add_argument("--out", default="runs/scale_check")
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--shrink", action="store_true", help="tiny volumes: a check of the script")
    ap.add_argument("--child", choices=("build", "timing"), help=argparse.SUPPRESS)
    ap.add_argument("--values", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        values = json.loads(args.values)
        values["data.image_shape"] = tuple(values["data.image_shape"])
        values["test_sets"] = tuple(values["test_sets"])
        child = child_build(values) if args.child == "build" else child_timing(values, args.workdir)
        print(json.dumps(child))
        return 0
    shape = (48, 48, 24) if args.shrink else (192, 192, 100)
    stored = (52, 50, 26) if args.shrink else (200, 196, 110)  # cropped/padded on load
    n = args.n
    out = Path(args.out).absolute() / f"{'x'.join(map(str, shape))}_n{n}"
    t0 = time.perf_counter()
    write_dataset(out, 5 * n, stored)
    report: dict = {"shape": list(shape), "n": n, "write_data_s": time.perf_counter() - t0}
    stride = 4 if args.shrink else args.stride
    values = overrides(out, shape, stride)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    me = ["-m", "benchmarks.scale_check"]

    def child(kind: str, log: str, **extra) -> dict:
        encoded = json.dumps({**values, **extra})
        return _run([*me, "--child", kind, "--values", encoded, "--workdir", str(workdir)],
                    logs / log)  # fmt: skip

    workdir = out / "run"
    # The first build makes IXI (both folds' subjects) and Scale; the second opens them for fold 1.
    for key, log, extra in [("build_first_s", "build1.log", {}),
                            ("build_reuse_s", "build2.log", {"fold": 1})]:  # fmt: skip
        child("build", log, **extra)
        report[key] = _last_json(logs / log)["seconds"]
    train = _run(["-m", "p2l.main", *_flags(values), f"--workdir={workdir}", "--mode=train"],
                 logs / "train.log")  # fmt: skip
    report["train_s"] = train["seconds"]
    rss = {}
    for count in (n, 5 * n):
        result = _run(
            ["-m", "p2l.main", *_flags({**values, "eval.max_volumes": count}),
             f"--workdir={workdir}", "--mode=eval"],
            logs / f"eval_{count}.log",
        )  # fmt: skip
        rss[count] = result["peak_rss_mb"]
        report[f"eval_s[{count} volumes]"] = result["seconds"]
    report[f"eval_peak_rss_mb[{n}]"] = rss[n]
    report[f"eval_peak_rss_mb[{5 * n}]"] = rss[5 * n]
    report["eval_peak_rss_ratio"] = rss[5 * n] / rss[n]
    child("timing", "timing.log")
    timing = _last_json(logs / "timing.log")
    report["eval_host_s_per_volume"] = timing["host_s"]
    report["eval_device_s_per_volume"] = timing["device_s"]
    report["eval_stride"] = stride
    try:
        from benchmarks.bench import pipeline_throughput
    except ImportError:
        report["pipeline"] = "benchmarks.bench.pipeline_throughput not available"
    else:
        report["pipeline"] = pipeline_throughput(shrink=args.shrink)
    report["total_s"] = time.perf_counter() - t0
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
