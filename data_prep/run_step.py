"""Run one preprocessing step on files: `python -m data_prep.run_step STEP ...` (spec §2.1).

    resample    IN OUT [--kind image|mask|seg]              1 mm + RAI (B-spline for images)
    skull-strip IN OUT_IMAGE OUT_MASK [--method none|hd-bet|atlas] [--atlas T]
    register    IN OUT [--mask M M_OUT] [--seg S S_OUT] [--atlas T] [--iterations ...]
    crop        IN MASK OUT OUT_MASK [--seg S S_OUT] [--mode reference|inclusive]
    n4          IN MASK OUT [--iterations ...]

Idempotent: next to its first output each step writes `<output>.step.json` (step, parameters,
input and output sha256, tool versions, seconds); a rerun with the same inputs and parameters
whose outputs still hash as recorded does nothing. `data_prep.prepare` runs the same functions in
memory for whole datasets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ants

from data_prep.manifest import tool_versions
from p2l.atomic_write import write_text_atomic
from p2l.errors import ConfigError, P2LError
from p2l.preparation.ants_io import read_ants, sha256_file, write_ants_atomic
from p2l.preparation.atlas import load_atlas
from p2l.preparation.skull_strip import describe_hd_bet_env, skull_strip
from p2l.preparation.steps import (
    N4Params,
    RegistrationParams,
    binarise_labels,
    binarise_warped_seg,
    crop_to_mask,
    n4_correct,
    register_to_atlas,
    remove_transform_files,
    reorient_resample,
    warp_to_atlas,
)

Outputs = dict[str, tuple[ants.ANTsImage, str]]  # name -> (image, kind)


def _sidecar(first_output: Path) -> Path:
    return first_output.with_name(first_output.name + ".step.json")


def _up_to_date(sidecar: Path, record: dict, outputs: dict[str, Path]) -> bool:
    if not sidecar.is_file():
        return False
    try:
        old = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if any(old.get(k) != record[k] for k in ("step", "params", "inputs")):
        return False
    recorded = old.get("outputs", {})
    return all(
        path.is_file() and recorded.get(name, {}).get("sha256") == sha256_file(path)
        for name, path in outputs.items()
    )


def _run(
    step: str,
    inputs: dict[str, Path],
    outputs: dict[str, Path],
    params: dict,
    compute: Callable[[], Outputs],
) -> int:
    record = {
        "step": step,
        "params": params,
        "inputs": {name: sha256_file(path) for name, path in inputs.items() if path.is_file()},
    }
    missing = [str(path) for path in inputs.values() if not path.is_file()]
    if missing:
        raise P2LError(f"{missing[0]}: input file not found")
    sidecar = _sidecar(next(iter(outputs.values())))
    if _up_to_date(sidecar, record, outputs):
        print(f"{step}: up to date: {', '.join(str(p) for p in outputs.values())}")
        return 0
    start = time.perf_counter()
    results = compute()
    for name, path in outputs.items():
        image, kind = results[name]
        write_ants_atomic(image, path, kind)  # type: ignore[arg-type]
    record.update(
        outputs={n: {"path": str(p), "sha256": sha256_file(p)} for n, p in outputs.items()},
        seconds=round(time.perf_counter() - start, 3),
        versions=tool_versions(describe_hd_bet_env()),
    )
    write_text_atomic(sidecar, json.dumps(record, indent=1, sort_keys=True))
    print(f"{step}: wrote {', '.join(str(p) for p in outputs.values())} ({record['seconds']} s)")
    return 0


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _pairs(args: argparse.Namespace, name: str) -> tuple[Path | None, Path | None]:
    pair = getattr(args, name)
    return (None, None) if pair is None else (Path(pair[0]), Path(pair[1]))


def _resample(args: argparse.Namespace) -> int:
    inp, out = Path(args.input), Path(args.output)

    def compute() -> Outputs:
        image, _ = reorient_resample(read_ants(inp, args.kind), args.kind)
        return {"out": (image, "image" if args.kind == "image" else args.kind)}

    return _run("resample", {"in": inp}, {"out": out}, {"kind": args.kind}, compute)


def _skull_strip(args: argparse.Namespace) -> int:
    inp, out_image, out_mask = Path(args.input), Path(args.output), Path(args.mask_output)
    reg = RegistrationParams.with_iterations(_ints(args.iterations))

    def compute() -> Outputs:
        image = read_ants(inp, "image")
        stripped, mask, _ = skull_strip(
            image,
            args.method,
            load_atlas(args.atlas),
            source=str(inp),
            registration=reg,
            hd_bet_args=args.hd_bet_args,
        )
        return {"image": (stripped, "image"), "mask": (mask, "mask")}

    params = {"method": args.method, "atlas": args.atlas, "registration": reg.as_dict()}
    return _run("skull-strip", {"in": inp}, {"image": out_image, "mask": out_mask}, params, compute)


def _register(args: argparse.Namespace) -> int:
    inp, out = Path(args.input), Path(args.output)
    mask_in, mask_out = _pairs(args, "mask")
    seg_in, seg_out = _pairs(args, "seg")
    reg = RegistrationParams.with_iterations(_ints(args.iterations), args.seed)
    excluded = _ints(args.exclude_labels)

    def compute() -> Outputs:
        atlas = load_atlas(args.atlas)
        warped, transforms = register_to_atlas(read_ants(inp, "image"), atlas, reg)
        results: Outputs = {"image": (warped, "image")}
        try:
            if mask_in is not None:
                results["mask"] = (
                    warp_to_atlas(read_ants(mask_in, "mask"), atlas, transforms),
                    "mask",
                )
            if seg_in is not None:
                binary, _ = binarise_labels(read_ants(seg_in, "seg"), excluded)
                warped_seg = warp_to_atlas(binary, atlas, transforms)
                seg = binarise_warped_seg(warped_seg, args.seg_threshold)
                results["seg"] = (seg, "seg")
        finally:
            remove_transform_files(transforms)
        return results

    inputs = {
        "in": inp,
        **({"mask": mask_in} if mask_in else {}),
        **({"seg": seg_in} if seg_in else {}),
    }
    outputs = {
        "image": out,
        **({"mask": mask_out} if mask_out else {}),
        **({"seg": seg_out} if seg_out else {}),
    }
    params = {
        "atlas": args.atlas,
        "registration": reg.as_dict(),
        "exclude_labels": list(excluded),
        "seg_threshold": args.seg_threshold,
    }
    return _run("register", inputs, outputs, params, compute)


def _crop(args: argparse.Namespace) -> int:
    inp, mask = Path(args.input), Path(args.mask)
    seg_in, seg_out = _pairs(args, "seg")

    def compute() -> Outputs:
        volumes = {"image": read_ants(inp, "image"), "mask": read_ants(mask, "mask")}
        if seg_in is not None:
            volumes["seg"] = read_ants(seg_in, "seg")
        cropped, _ = crop_to_mask(volumes, volumes["mask"], args.mode)
        return {name: (image, name) for name, image in cropped.items()}  # type: ignore[misc]

    inputs = {"image": inp, "mask": mask, **({"seg": seg_in} if seg_in else {})}
    outputs = {"image": Path(args.output), "mask": Path(args.mask_output)}
    if seg_out:
        outputs["seg"] = seg_out
    return _run("crop", inputs, outputs, {"mode": args.mode}, compute)


def _n4(args: argparse.Namespace) -> int:
    inp, mask, out = Path(args.input), Path(args.mask), Path(args.output)
    params = N4Params(iters=_ints(args.iterations))

    def compute() -> Outputs:
        corrected = n4_correct(read_ants(inp, "image"), read_ants(mask, "mask"), params)
        return {"out": (corrected, "image")}

    return _run("n4", {"in": inp, "mask": mask}, {"out": out}, params.as_dict(), compute)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface, one sub-command per step."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.run_step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="step", required=True)
    default_iters = ",".join(str(i) for i in RegistrationParams().aff_iterations)

    p = sub.add_parser("resample", help="1 mm isotropic + RAI")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--kind", choices=("image", "mask", "seg"), default="image")
    p.set_defaults(run=_resample)

    p = sub.add_parser("skull-strip", help="brain extraction (hd-bet, none, atlas fallback)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("mask_output")
    p.add_argument("--method", choices=("none", "hd-bet", "atlas"), default="none")
    p.add_argument("--atlas", default=None)
    p.add_argument("--hd-bet-args", default="")
    p.add_argument("--iterations", default=default_iters, help="atlas fallback registration")
    p.set_defaults(run=_skull_strip)

    p = sub.add_parser("register", help="affine registration to the atlas")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--mask", nargs=2, metavar=("MASK", "MASK_OUT"))
    p.add_argument("--seg", nargs=2, metavar=("SEG", "SEG_OUT"))
    p.add_argument("--atlas", default=None)
    p.add_argument("--iterations", default=default_iters)
    p.add_argument("--seed", type=int, default=RegistrationParams().random_seed)
    p.add_argument("--exclude-labels", default="", help="seg labels that are background")
    p.add_argument("--seg-threshold", type=float, default=0.0, help="0: > 0 (reference)")
    p.set_defaults(run=_register)

    p = sub.add_parser("crop", help="crop to the brain-mask bounding box")
    p.add_argument("input")
    p.add_argument("mask")
    p.add_argument("output")
    p.add_argument("mask_output")
    p.add_argument("--seg", nargs=2, metavar=("SEG", "SEG_OUT"))
    p.add_argument("--mode", choices=("reference", "inclusive"), default="reference")
    p.set_defaults(run=_crop)

    p = sub.add_parser("n4", help="N4 bias-field correction weighted by the brain mask")
    p.add_argument("input")
    p.add_argument("mask")
    p.add_argument("output")
    p.add_argument("--iterations", default=",".join(str(i) for i in N4Params().iters))
    p.set_defaults(run=_n4)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: a bad input prints one line naming the file; exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (P2LError, ValueError) as err:
        if isinstance(err, ValueError) and not isinstance(err, P2LError):
            err = ConfigError(args.step, str(err))
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
