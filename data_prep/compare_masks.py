"""How good is the offline skull-stripping fallback? Dice against the masks shipped with the data.

    python -m data_prep.compare_masks --raw RAW [--n 5 | --subjects ID,ID] [--spacing 2]
        [--atlas T1_brain.nii] [--registration-iterations 2100,1200,1200,10]

For IXI subjects that come with a given brain mask (the 2 mm Hammersmith set's
`<id>_T1_DLMUSE.nii.gz`, label > 0), runs the pipeline's `atlas` method (spec §2.1 step 2, the
fallback used when HD-BET is absent) on the head scan and reports its Dice with the given mask.
Both masks are on the subject's own scan, reoriented and resampled to the working grid exactly as
`data_prep.prepare` does before skull stripping (given mask: linear then >= 0.5). The DLMUSE mask
is a model's output (a pseudo-label), so this measures agreement, not accuracy. Prints a markdown
table; `compare_masks()` returns the numbers. Multi-threaded ITK registration is not bit-repeatable
(the fallback chains two registrations, which can amplify that): run with
`ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1` for numbers that repeat.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from data_prep.adapters import Subject, discover, get_spec
from data_prep.pipeline import read_given_mask
from p2l.errors import ConfigError, P2LError
from p2l.preparation.ants_io import read_ants
from p2l.preparation.atlas import Atlas, load_atlas
from p2l.preparation.skull_strip import skull_strip
from p2l.preparation.steps import RegistrationParams, reorient_resample


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.sum(a & b)) / total


def compare_subject(
    subject: Subject, atlas: Atlas, spacing: float, registration: RegistrationParams
) -> dict:
    """Dice of the `atlas` fallback mask with the subject's given mask, on the working grid."""
    spec = get_spec("ixi")
    source = subject.images["t1"]
    start = time.perf_counter()
    native = read_ants(source.path, "image")
    given_native, _, _ = read_given_mask(subject, spec, native, source)
    image, _ = reorient_resample(native, "image", spacing)
    given, _ = reorient_resample(given_native, "mask", spacing)
    _, fallback, info = skull_strip(
        image, "atlas", atlas, source=source.describe(), registration=registration
    )
    a, b = fallback.numpy() > 0.5, given.numpy() > 0.5
    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    return {
        "subject": subject.subject_id,
        "dice": round(dice(a, b), 4),
        "fallback_ml": round(float(a.sum()) * voxel_ml, 1),
        "given_ml": round(float(b.sum()) * voxel_ml, 1),
        "seconds": round(time.perf_counter() - start, 2),
        "iterations": info["fallback"]["iterations"],
    }


def compare_masks(
    raw: str | Path,
    subjects: list[str] | None = None,
    n: int = 5,
    spacing: float = 2.0,
    atlas_path: str | None = None,
    registration: RegistrationParams | None = None,
) -> list[dict]:
    """One row per subject (the first `n` with a given mask, or the listed ids)."""
    found = {s.subject_id: s for s in discover(get_spec("ixi"), raw)}
    if subjects:
        unknown = [s for s in subjects if s not in found]
        if unknown:
            raise ConfigError("subjects", f"not found under {raw}: {unknown[:10]}")
        chosen = [found[s] for s in subjects]
    else:
        chosen = [s for s in found.values() if s.brain_mask is not None and "t1" in s.images][:n]
    if not chosen:
        raise ConfigError("subjects", f"no IXI T1 scan with a given brain mask under {raw}")
    atlas = load_atlas(atlas_path, spacing=spacing)
    registration = registration or RegistrationParams()
    return [compare_subject(s, atlas, spacing, registration) for s in chosen]


def format_table(rows: list[dict]) -> str:
    """Markdown table of the rows, with the mean Dice last."""
    lines = [
        "| subject | Dice (atlas fallback vs given mask) | fallback mL | given mL | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['subject']} | {r['dice']:.3f} | {r['fallback_ml']:.0f} | {r['given_ml']:.0f} "
            f"| {r['seconds']:.1f} |"
        )
    mean = float(np.mean([r["dice"] for r in rows]))
    lines.append(f"| mean of {len(rows)} | {mean:.3f} | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point: prints the table; 2 for bad input (one line), 0 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m data_prep.compare_masks", description=__doc__)
    parser.add_argument("--raw", required=True, help="IXI raw folder with *_T1_DLMUSE masks")
    parser.add_argument("--n", type=int, default=5, help="first N subjects with a given mask")
    parser.add_argument("--subjects", default=None, help="comma list of subject ids instead")
    parser.add_argument("--spacing", type=float, default=2.0, help="working grid in mm")
    parser.add_argument("--atlas", default=None, help="1 mm brain template (default MNI152)")
    parser.add_argument(
        "--registration-iterations",
        default=None,
        help="affine iterations per level, coarsest first (default: the reference schedule; "
        "the fallback runs only its shrink >= 4 levels)",
    )
    args = parser.parse_args(argv)
    try:
        registration = None
        if args.registration_iterations:
            counts = tuple(int(v) for v in args.registration_iterations.split(",") if v.strip())
            registration = RegistrationParams.with_iterations(counts)
        subjects = [s.strip() for s in args.subjects.split(",")] if args.subjects else None
        rows = compare_masks(args.raw, subjects, args.n, args.spacing, args.atlas, registration)
    except (P2LError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
