"""Lesion heatmap for one scan: python -m p2l.detect --workdir W --input scan.nii.gz --modality t2
[--brain-mask m.nii.gz] --output PREFIX.

Brings the scan to the orientation the model was trained in (W/training_space.json, see
p2l.orientation: an exact axis permutation/flip, no resampling), runs the training-time
normalisation (spec §2.2), the sliding-window heatmap and post-processing, and writes PREFIX_score
/ _error / _logvar / _mask .nii.gz in the input scan's own grid and affine (the 192x192x100 crop
and the reorientation are mapped back; voxels outside the crop are 0), plus PREFIX_overlay.png (in
the training orientation). The same scan stored in any axis order or flip gives the same maps.

The scan must be preprocessed like the training data (skull-stripped, registered, 1 mm: see
data_prep); spacing and obliqueness are checked, the brain's extent is compared with the training
brain's (`orientation.REGISTRATION_RULES`). The mask threshold is the one `make eval` stored in
W/results/summary.json (validation-tuned if available, else the healthy quantile's) or
--threshold.

With `--dae-workdir D` (a DAE run trained on the same data, experiments/dae_*.py) the scan is also
scored by the DAE and the two maps are fused by `--fusion` (p2l.fusion): PREFIX_dae and
PREFIX_fused, and PREFIX_fused_mask at the fused map's stored threshold when the Patch2Loc run was
evaluated fused with D (`eval.pixel_workdir`), whose healthy statistics zsum and gate need. A DAE
run can also be given as --workdir alone (its residual map, no error/log-variance).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from p2l import fusion, xla_flags
from p2l.errors import ConfigError, DataError, P2LError


def stored_summary(workdir: Path) -> dict | None:
    path = Path(workdir) / "results" / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def stored_threshold(workdir: Path, detector: str | None = None) -> tuple[float, str] | None:
    """The threshold `make eval` stored for this run (for `detector`, default the run's own): the
    first fixed policy (validation-tuned, then healthy quantile, in `thresholds.policies` order)
    with a value, and its name."""
    from p2l import thresholds
    from p2l.run_info import load_run_config

    summary = stored_summary(workdir)
    if summary is None:
        return None
    if detector is not None and detector != summary.get("detector", "patch2loc"):
        summary = (summary.get("detectors") or {}).get(detector)
        if summary is None:
            return None
    stored = summary.get("thresholds", {})
    quantile = load_run_config(workdir).eval.get("healthy_quantile", thresholds.HEALTHY_QUANTILE)
    for policy in thresholds.policies(quantile):
        if policy.per_volume:
            continue
        # The validation threshold is stored per dataset: "validation[<Dataset>]".
        for key, value in stored.items():
            if key.split("[")[0] == policy.name and value.get("value") is not None:
                return float(value["value"]), key
    return None


def derive_brain_mask(image, path: Path):
    """Non-zero voxels of a skull-stripped scan; refuses scans with no zero background."""
    from p2l.volume_io import Volume

    nonzero = image.data != 0
    fraction = float(nonzero.mean())
    if fraction > 0.9 or not nonzero.any():
        raise DataError(
            path,
            f"{100 * fraction:.0f} % of voxels are non-zero: the scan does not look "
            "skull-stripped, so no brain mask can be derived. Pass --brain-mask.",
        )
    print(f"p2l.detect: no --brain-mask given; using the {nonzero.sum():,} non-zero voxels of "
          "the skull-stripped scan as the brain mask")  # fmt: skip
    return Volume(nonzero.astype(np.float32), image.affine, f"{path} (non-zero voxels)")


def detect(args) -> dict[str, Path]:
    from p2l import figures, normalization, orientation, thresholds
    from p2l.run_info import load_run_config
    from p2l.volume_io import read_volume, write_volume_atomic

    workdir = Path(args.workdir)
    config = load_run_config(workdir)
    if args.modality != config.modality:
        raise ConfigError(
            "modality",
            f"the model in {workdir} was trained on {config.modality.upper()} scans, "
            f"but --modality is {args.modality}",
        )
    image = read_volume(args.input, kind="image")
    if args.brain_mask:
        mask = read_volume(args.brain_mask, kind="mask")
    else:
        mask = derive_brain_mask(image, Path(args.input))
    space = orientation.run_space(workdir, config)
    # Without any record of the training orientation the scan's own is the only choice.
    target = image.axcodes if space is None else tuple(space["axcodes"])
    subject = normalization.prepare_subject(
        image,
        mask,
        None,
        modality=args.modality,
        subject_id=Path(args.input).name,
        target_shape=tuple(config.data.image_shape),
        expected_spacing=config.data.expected_spacing,
        orientation=target,
        spacing=None if space is None else space["spacing"],
    )
    reorientation = subject.reorientation
    if not reorientation.is_identity:
        print(f"p2l.detect: {args.input} is stored as {''.join(image.axcodes)}, the model was "
              f"trained on {''.join(target)} volumes: axes permuted/flipped to match (no "
              "resampling); outputs are mapped back to the scan's own grid")  # fmt: skip
    orientation.check_registered(
        reorientation, reorientation.apply(mask.data), space, source=args.input
    )
    if args.threshold is not None:
        threshold, source = args.threshold, "--threshold"
    else:
        found = stored_threshold(workdir)  # the run's own detector's
        if found is None:
            raise DataError(
                workdir / "results" / "summary.json",
                "no stored threshold: run `make eval` for this workdir or pass --threshold",
            )
        threshold, source = found
    if args.stride:
        config.eval.stride = args.stride
    opened = _open(config, workdir, args)
    step = opened.step
    sv = opened.scorer(subject.subject_id, subject.image, subject.mask)
    prediction = thresholds.predict(sv.score, threshold) & (subject.mask > 0)

    brain = subject.mask > 0
    outputs = {"score": sv.score, "mask": prediction.astype(np.uint8)}
    for name in ("error", "logvar"):  # Patch2Loc's heatmap parts (a DAE run has none)
        if name in sv.maps:
            outputs[name] = sv.maps[name] * brain
    if opened.fused:
        outputs["dae"] = sv.maps["dae"]
        fused = fusion.detector_name(args.fusion)
        outputs["fused"] = sv.maps[fused]
        found = stored_threshold(workdir, fused)
        if found is not None:
            outputs["fused_mask"] = (thresholds.predict(sv.maps[fused], found[0]) & brain).astype(
                np.uint8
            )
            print(f"p2l.detect: {fused} thresholded at {found[0]:.4g} ({found[1]})")
        else:
            print(
                f"p2l.detect: no stored threshold for {fused} (evaluate the run with "
                "eval.pixel_workdir to store one): the fused map is written unthresholded"
            )
    prefix = Path(args.output)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, array in outputs.items():
        path = prefix.with_name(f"{prefix.name}_{name}.nii.gz")
        back = subject.to_source(array, fill=0)  # the input scan's own grid and orientation
        dtype = np.uint8 if name.endswith("mask") else np.float32
        write_volume_atomic(path, back, subject.source_affine, dtype=dtype)
        written[name] = path
    png = prefix.with_name(f"{prefix.name}_overlay.png")
    figures.overlay(
        png,
        subject.image,
        sv.score,
        subject.mask,
        None,
        prediction,
        title=f"{Path(args.input).name}: threshold {threshold:.4g} ({source}), "
        f"{int(prediction.sum()):,} voxels flagged",
    )
    written["overlay"] = png
    print(
        f"p2l.detect: checkpoint step {step}, threshold {threshold:.4g} from {source}, "
        f"{int(prediction.sum()):,} voxels flagged; wrote "
        + ", ".join(str(p) for p in written.values())
    )
    return written


def _open(config, workdir: Path, args):
    """The run's scorer; with --dae-workdir, Patch2Loc and the DAE fused by --fusion, with the
    fusion parameters the run's evaluation stored (p2l.fusion: zsum and gate need them)."""
    from p2l import detectors

    if not args.dae_workdir:
        return detectors.open_run(config, workdir)
    if not (Path(args.dae_workdir) / "run_info.json").is_file():
        raise DataError(
            args.dae_workdir,
            "not a trained DAE run folder (no run_info.json): train one first, e.g. make train "
            "CONFIG=experiments/dae_t2.py",
        )
    from p2l.config_check import method

    if method(config) != "patch2loc":
        raise ConfigError("dae-workdir", f"--workdir {workdir} must be a Patch2Loc run to fuse")
    config.eval.pixel_workdir = str(args.dae_workdir)
    config.eval.fusion = (args.fusion,)
    opened = detectors.open_run(config, workdir)
    stored = (stored_summary(workdir) or {}).get("fusion") or {}
    same = Path(str((stored.get("pixel_run") or {}).get("workdir", ""))).resolve()
    if stored.get("params") and same == Path(args.dae_workdir).resolve():
        opened.scorer.params = fusion.FusionParams(**stored["params"])
    elif args.fusion == "product":  # the one rule without healthy parameters
        opened.scorer.params = fusion.FusionParams(0.0, 1.0, 0.0, 1.0, 0.0)
    else:
        raise DataError(
            Path(workdir) / "results" / "summary.json",
            f"no fusion parameters stored for the DAE run {args.dae_workdir}: the {args.fusion} "
            "rule needs the healthy statistics of an evaluation (make eval with "
            f"--config.eval.pixel_workdir={args.dae_workdir}); --fusion product needs none",
        )
    return opened


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="trained run folder (make train)")
    ap.add_argument("--input", required=True, help="preprocessed scan (.nii/.nii.gz)")
    ap.add_argument("--brain-mask", help="brain mask on the scan's grid (default: non-zero voxels)")
    ap.add_argument("--modality", required=True, choices=("t1", "t2"))
    ap.add_argument("--output", required=True, help="output prefix, e.g. out/patient1")
    ap.add_argument("--threshold", type=float, help="score threshold for the mask")
    ap.add_argument("--stride", type=int, help="sliding-window stride (default: the config's)")
    ap.add_argument(
        "--dae-workdir",
        help="a trained DAE run on the same data: also write its map "
        "(PREFIX_dae) and the fused one (PREFIX_fused, PREFIX_fused_mask)",
    )
    ap.add_argument(
        "--fusion",
        default="product",
        choices=fusion.RULES,
        help="fusion rule with --dae-workdir (p2l.fusion; default product)",
    )
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    xla_flags.apply()  # before JAX starts its backend
    try:
        detect(args)
    except P2LError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
