"""p2l vs the PyTorch reference on the same machine: `make bench-compare` (issue "Performance").

    python benchmarks/side_by_side.py [--rounds 3] [--patches 1024] [--infer-batch 1024] ...

Runs ../shared/bench/reference_torch.py (in its own virtual environment, `.venv-ref`, created
with `python3 -m venv .venv-ref && .venv-ref/bin/pip install torch==2.13.0 numpy` when missing)
and `python -m benchmarks.bench` interleaved A B A B ... on the same sizes, then prints, per
figure, the ratio p2l / reference of each round (paired runs, so machine-load drifts largely
cancel) with min / median / max, and the median absolute figures. Throughputs are compared as
p2l/ref; volume wall times as ref_time/p2l_time, so > 1 always means p2l is faster. The last
stdout line is one JSON object with every run and ratio; `--out FILE` also writes it
(atomically).

Skips cleanly (exit 0, one line saying why) when the reference script is absent or torch cannot
be installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from p2l.atomic_write import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = REPO.parent / "shared" / "bench" / "reference_torch.py"
DEFAULT_REF_VENV = REPO / ".venv-ref"
TORCH_PIN = "torch==2.13.0"
# Size flags both harnesses accept with the same meaning.
SHARED_FLAGS = (
    "patches",
    "patch_size",
    "image_size",
    "train_slices",
    "steps",
    "warmup",
    "infer_batch",
    "infer_reps",
    "infer_dtype",
    "stride",
    "slices",
    "stride1_slices",
    "full_slices",
    "seed",
)


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _volume_wall(run: dict, key: str) -> float | None:
    vol = _get(run, "infer", key)
    if not isinstance(vol, dict):
        return None
    return vol.get("extrapolated_full_volume_wall_s", vol.get("wall_s"))


# name -> (how to read the figure from a run, higher is better?)
FIGURES = {
    "train_patches_per_s": (lambda r: _get(r, "train", "train_patches_per_s"), True),
    "infer_patches_per_s": (lambda r: _get(r, "infer", "infer_patches_per_s"), True),
    "volume_full_wall_s": (lambda r: _volume_wall(r, "volume"), False),
    "volume_stride1_full_wall_s": (lambda r: _volume_wall(r, "volume_stride1"), False),
}


def summarize(pairs: list[tuple[dict, dict]]) -> dict:
    """Per figure: per-round ratios (p2l faster > 1) with min/median/max, and median values."""
    out = {}
    for name, (read, higher_is_better) in FIGURES.items():
        ratios, refs, mine = [], [], []
        for ref, p2l in pairs:
            a, b = read(ref), read(p2l)
            if a is None or b is None or a <= 0 or b <= 0:
                continue
            refs.append(a)
            mine.append(b)
            ratios.append(b / a if higher_is_better else a / b)
        if not ratios:
            continue
        out[name] = {
            "ratio_definition": "p2l/reference" if higher_is_better else "reference/p2l (time)",
            "ratios": ratios,
            "ratio_min": min(ratios),
            "ratio_median": statistics.median(ratios),
            "ratio_max": max(ratios),
            "reference_median": statistics.median(refs),
            "p2l_median": statistics.median(mine),
        }
    return out


def last_json_line(text: str) -> dict:
    """The last stdout line that parses as a JSON object (both harnesses print one)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON line in the output")


def run_json(cmd: list[str], label: str, env: dict | None = None, timeout: float | None = None):
    print(f"side_by_side: running {label}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return last_json_line(proc.stdout)


def interleave(ref_cmd, p2l_cmd, rounds: int, env=None, timeout=None) -> list[tuple[dict, dict]]:
    """A B A B ...: reference then p2l, `rounds` times; returns the (reference, p2l) pairs."""
    pairs = []
    for r in range(rounds):
        ref = run_json(ref_cmd, f"reference, round {r + 1}/{rounds}", env, timeout)
        mine = run_json(p2l_cmd, f"p2l, round {r + 1}/{rounds}", env, timeout)
        pairs.append((ref, mine))
    return pairs


def has_torch(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run(
        [str(python), "-c", "import torch"], capture_output=True, text=True, check=False
    )
    return probe.returncode == 0


def ensure_reference_venv(venv: Path, setup: bool) -> tuple[Path | None, str]:
    """(python with torch, "") or (None, why not)."""
    python = venv / "bin" / "python"
    if has_torch(python):
        return python, ""
    if not setup:
        return None, f"{python} has no torch and --no-setup was given"
    print(f"side_by_side: creating {venv} with {TORCH_PIN} numpy", file=sys.stderr, flush=True)
    cmds = []
    if not python.exists():
        cmds.append([shutil.which("python3") or sys.executable, "-m", "venv", str(venv)])
    cmds.append([str(python), "-m", "pip", "install", "--quiet", TORCH_PIN, "numpy"])
    for cmd in cmds:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            return None, f"torch is not installable here ({' '.join(cmd[1:4])}: {tail[0]})"
    if not has_torch(python):
        return None, f"torch still not importable from {python}"
    return python, ""


def shared_args(args) -> list[str]:
    out = []
    for name in SHARED_FLAGS:
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def print_table(summary: dict) -> None:
    print(
        f"{'figure':28s} {'reference':>12s} {'p2l':>12s}   ratio min / median / max "
        "(>1: p2l faster)"
    )
    for name, s in summary.items():
        print(
            f"{name:28s} {s['reference_median']:12.2f} {s['p2l_median']:12.2f}   "
            f"{s['ratio_min']:.2f} / {s['ratio_median']:.2f} / {s['ratio_max']:.2f}"
            f"   [{s['ratio_definition']}]"
        )


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="A B pairs to run")
    ap.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    ap.add_argument("--ref-venv", type=Path, default=DEFAULT_REF_VENV)
    ap.add_argument("--no-setup", action="store_true", help="do not create the reference venv")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="reference device")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-volumes", action="store_true", help="only the throughput figures")
    ap.add_argument("--p2l-extra", default="", help="extra arguments for benchmarks.bench")
    ap.add_argument("--ref-extra", default="", help="extra arguments for reference_torch.py")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--out", type=Path, help="also write the JSON summary here")
    ap.add_argument("--patches", type=int)
    ap.add_argument("--patch-size", type=int)
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--train-slices", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--infer-batch", type=int)
    ap.add_argument("--infer-reps", type=int)
    ap.add_argument("--infer-dtype", choices=("float32", "bfloat16"))
    ap.add_argument("--stride", type=int)
    ap.add_argument("--slices", type=int, help="reference default 12")
    ap.add_argument("--stride1-slices", type=int, help="reference default 2")
    ap.add_argument("--full-slices", type=int)
    ap.add_argument("--seed", type=int)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.skip_volumes:
        args.slices, args.stride1_slices = 0, 0
    # The reference's defaults (12 slices at stride 4, 2 at stride 1), so both time the same.
    args.slices = 12 if args.slices is None else args.slices
    args.stride1_slices = 2 if args.stride1_slices is None else args.stride1_slices
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.reference.is_file():
        print(f"side_by_side: skipped: reference harness {args.reference} not found")
        return 0
    python, why = ensure_reference_venv(args.ref_venv, setup=not args.no_setup)
    if python is None:
        print(f"side_by_side: skipped: {why}")
        return 0
    common = shared_args(args)
    skip = ["--skip-train"] if args.skip_train else []
    ref_cmd = [str(python), str(args.reference), "--json", "--device", args.device, *common, *skip]
    ref_cmd += args.ref_extra.split()
    p2l_cmd = [sys.executable, "-m", "benchmarks.bench", *common, *skip, "--skip-pipeline"]
    p2l_cmd += args.p2l_extra.split()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    pairs = interleave(ref_cmd, p2l_cmd, args.rounds, env=env, timeout=args.timeout)
    summary = summarize(pairs)
    print_table(summary)
    result = {
        "rounds": args.rounds,
        "reference_cmd": ref_cmd,
        "p2l_cmd": p2l_cmd,
        "summary": summary,
        "runs": [{"reference": a, "p2l": b} for a, b in pairs],
    }
    line = json.dumps(result, sort_keys=True)
    if args.out:
        write_text_atomic(args.out, line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
