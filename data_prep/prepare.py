"""Prepare a raw dataset into the reference layout (spec §2.1): `python -m data_prep.prepare`.

    python -m data_prep.prepare --dataset ixi --raw RAW --out OUT [--atlas T1_brain.nii]
        [--skull-strip auto|hd-bet|none|atlas|given-mask] [--modalities t1,t2] [--workers N]
        [--spacing 2]

Restartable: a scan whose manifest row matches the current configuration and whose output files
still hash as recorded is skipped. A failing subject is reported (with the file and the problem)
and skipped; the run ends with counts and exits 1 when anything failed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import sys
import traceback
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from data_prep.adapters import (
    DATASETS,
    DatasetSpec,
    Subject,
    discover,
    get_spec,
    output_paths,
    shared_paths,
)
from data_prep.manifest import read_manifest, tool_versions, verify_outputs, write_manifest
from data_prep.pipeline import PrepConfig, prepare_scan, scan_key, skull_strip_method
from p2l.errors import ConfigError, P2LError
from p2l.preparation.ants_io import link_atomic
from p2l.preparation.atlas import Atlas, load_atlas
from p2l.preparation.skull_strip import QUALITY, describe_hd_bet_env, hd_bet_command
from p2l.preparation.steps import N4Params, RegistrationParams

logger = logging.getLogger("data_prep.prepare")

_ATLAS_CACHE: dict[tuple[str | None, float], Atlas] = {}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.prepare",
        description="Raw IXI / BraTS21 / BraTS15 / MSLUB / ATLAS v2 / WMH downloads -> registered, "
        "skull-stripped, bias-corrected volumes in the reference layout (spec §2.1).",
    )
    parser.add_argument("--dataset", required=True, help=f"one of {list(DATASETS)}")
    parser.add_argument("--raw", required=True, help="folder holding the provider's download")
    parser.add_argument("--out", required=True, help="output data root (gets Train/ or Test/)")
    parser.add_argument(
        "--atlas",
        default=None,
        help="brain-extracted 1 mm T1 template, e.g. SRI24 T1_brain.nii as the paper "
        "(default: nilearn's bundled MNI152 2009a, offline)",
    )
    parser.add_argument(
        "--skull-strip",
        default="auto",
        choices=("auto", "hd-bet", "none", "atlas", "given-mask"),
        help="auto: given-mask where the dataset ships its reference brain mask (brats15), none "
        "for already-stripped data (BraTS21, MSLUB _brain_ derivatives), else hd-bet if "
        "installed, else the lower-quality atlas fallback; given-mask: the subject's own mask "
        "file (label > 0, e.g. IXI <id>_T1_DLMUSE.nii.gz); a subject without one fails",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        default=1.0,
        help="working grid in mm, isotropic (default 1 = the reference); scans and the 1 mm "
        "atlas are resampled to it (e.g. 2 for the 2 mm IXI Hammersmith set)",
    )
    parser.add_argument(
        "--hd-bet-args", default="", help="extra hd-bet arguments, e.g. '-device cpu'"
    )
    parser.add_argument(
        "--modalities", default=None, help="comma list (default: all the dataset has)"
    )
    parser.add_argument("--workers", type=int, default=1, help="parallel subjects (processes)")
    parser.add_argument(
        "--subjects", default=None, help="only these subject ids: comma list, or a file of ids"
    )
    parser.add_argument(
        "--exclude-labels",
        type=_int_list,
        default=(),
        help="segmentation labels treated as background (default none: label > 0 is lesion, as "
        "the reference; e.g. 2 to drop WMH 'other pathology')",
    )
    parser.add_argument(
        "--seg-threshold",
        type=float,
        default=0.0,
        help="lesion = warped fraction > 0 (default, the reference/loader rule; grows lesions by a "
        "source voxel, ~3 mm in z for WMH) or >= this value (0.5 preserves lesion volume)",
    )
    parser.add_argument(
        "--crop",
        default="reference",
        choices=("reference", "inclusive"),
        help="reference: cut.py's [min:max] bounding box (drops the last brain index per axis)",
    )
    parser.add_argument(
        "--registration-iterations",
        type=_int_list,
        default=RegistrationParams().aff_iterations,
        help="affine iterations per level, coarsest first (default: ANTsPy 'Affine' = the "
        "reference); fewer values run only the coarsest levels",
    )
    parser.add_argument(
        "--n4-iterations",
        type=_int_list,
        default=N4Params().iters,
        help="N4 iterations per level (default: reference 200,200,200,200)",
    )
    parser.add_argument("--seed", type=int, default=RegistrationParams().random_seed)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _config_from_args(args: argparse.Namespace) -> PrepConfig:
    try:
        registration = RegistrationParams.with_iterations(
            tuple(args.registration_iterations), args.seed
        )
    except ValueError as err:
        raise ConfigError("registration_iterations", str(err)) from err
    if not 0.0 <= args.seg_threshold <= 1.0:
        raise ConfigError("seg_threshold", f"expected a value in [0, 1], got {args.seg_threshold}")
    if not args.n4_iterations:
        raise ConfigError("n4_iterations", "expected at least one level")
    if not 0.5 <= args.spacing <= 4.0:
        raise ConfigError("spacing", f"expected a voxel size in [0.5, 4] mm, got {args.spacing}")
    if args.skull_strip == "hd-bet" and hd_bet_command() is None:
        raise ConfigError(
            "skull_strip",
            "hd-bet requested but not installed (no 'hd-bet' on PATH); install it yourself, or use "
            "--skull-strip atlas (lower quality, offline) or none (already stripped data)",
        )
    return PrepConfig(
        atlas_path=None if args.atlas is None else str(Path(args.atlas).resolve()),
        skull_strip=args.skull_strip,
        hd_bet_args=args.hd_bet_args,
        registration=registration,
        n4=N4Params(iters=tuple(args.n4_iterations)),
        crop_mode=args.crop,
        exclude_labels=tuple(args.exclude_labels),
        seg_threshold=args.seg_threshold,
        spacing=float(args.spacing),
    )


def _modalities(spec: DatasetSpec, text: str | None) -> tuple[str, ...]:
    if text is None:
        return spec.default_modalities
    wanted = tuple(m.strip().lower() for m in text.split(",") if m.strip())
    unknown = [m for m in wanted if m not in spec.modalities]
    if not wanted or unknown:
        raise ConfigError(
            "modalities", f"{spec.key} supports {list(spec.modalities)}, got {text!r}"
        )
    return wanted


def _select(subjects: list[Subject], text: str | None) -> list[Subject]:
    if text is None:
        return subjects
    path = Path(text)
    if "," not in text and path.is_file():  # a long comma list is no file name (ENAMETOOLONG)
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        wanted = [line for line in lines if line]
    else:
        wanted = [v.strip() for v in text.split(",") if v.strip()]
    by_id = {s.subject_id: s for s in subjects}
    unknown = [w for w in wanted if w not in by_id]
    if unknown:
        raise ConfigError("subjects", f"not found in the raw folder: {unknown[:10]}")
    return [by_id[w] for w in dict.fromkeys(wanted)]


def _atlas(path: str | None, spacing: float = 1.0) -> Atlas:
    """The atlas on the working grid, made once per process (the 2 mm resample takes ~2 s)."""
    key = (path, float(spacing))
    if key not in _ATLAS_CACHE:
        _ATLAS_CACHE[key] = load_atlas(path, spacing=spacing)
    return _ATLAS_CACHE[key]


def process_scan(
    subject: Subject,
    dataset: str,
    modality: str,
    config: PrepConfig,
    root: str,
    versions: dict,
) -> tuple[dict | None, str | None]:
    """Prepare one scan of one subject: (manifest row, None) or (None, error message).

    Runs in a worker process; never raises for a bad input, so one failure cannot stop a run.
    """
    try:
        atlas = _atlas(config.atlas_path, config.spacing)
        spec = get_spec(dataset)
        return prepare_scan(subject, modality, spec, config, atlas, Path(root), versions), None
    except P2LError as err:
        return None, str(err)
    except Exception as err:  # a bug or a tool crash: still reported, never silent
        detail = traceback.format_exc(limit=3).strip().splitlines()[-1]
        source = subject.images[modality].describe()
        return None, f"{source}: unexpected {type(err).__name__}: {detail}"


@contextlib.contextmanager
def _environment(name: str, value: str):
    """Set an environment variable unless the user did, restoring it afterwards."""
    previous = os.environ.get(name)
    if previous is None:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)


def _link_shared(root: Path, spec: DatasetSpec, subject_id: str, rows: dict) -> None:
    """mask/ and seg/ of the split CSVs <- the preferred prepared modality's files."""
    for modality in spec.mask_preference:
        if (subject_id, modality) in rows:
            own = output_paths(root, spec, subject_id, modality)
            for kind, target in shared_paths(root, spec, subject_id).items():
                link_atomic(own[kind], target)
            return


def run(args: argparse.Namespace) -> int:
    """Execute a parsed command line; returns the exit status."""
    spec = get_spec(args.dataset)
    modalities = _modalities(spec, args.modalities)
    config = _config_from_args(args)
    if args.workers < 1:
        raise ConfigError("workers", f"expected >= 1, got {args.workers}")
    atlas = _atlas(config.atlas_path, config.spacing)
    subjects = _select(discover(spec, args.raw), args.subjects)
    root = Path(args.out).resolve()
    folder = root / spec.folder
    versions = tool_versions(describe_hd_bet_env())

    logger.info("dataset %s: %d subjects under %s -> %s", spec.key, len(subjects), args.raw, folder)
    logger.info("atlas: %s (%s, sha256 %s)", atlas.name, atlas.path, atlas.sha256[:12])
    logger.info("working grid: %g mm isotropic", config.spacing)
    logger.info("tools: %s", ", ".join(f"{k} {v}" for k, v in versions.items()))
    methods = sorted({skull_strip_method(config, s) for s in subjects})
    for method in methods:
        log = logger.warning if method == "atlas" else logger.info
        log("skull stripping: %s: %s", method, QUALITY[method])
    if spec.zscored:
        logger.info("z-scored sources: brain intensities are shifted positive before N4")

    rows = read_manifest(folder)
    failures: list[tuple[str, str, str]] = []
    jobs: list[tuple[Subject, str]] = []
    skipped = unavailable = 0
    for subject in subjects:
        for problem in subject.problems:
            failures.append((subject.subject_id, "-", problem))
        method = skull_strip_method(config, subject)
        for modality in modalities:
            if modality not in subject.images:
                if spec.modality_optional:
                    unavailable += 1
                elif not subject.problems:
                    failures.append((subject.subject_id, modality, f"no {modality} scan found"))
                continue
            row = rows.get((subject.subject_id, modality))
            key = scan_key(config, atlas, subject, modality, method)
            if row is not None and row.get("config_key") == key and not verify_outputs(folder, row):
                skipped += 1
                continue
            jobs.append((subject, modality))
    pending: dict[str, int] = {}
    for subject, _ in jobs:
        pending[subject.subject_id] = pending.get(subject.subject_id, 0) + 1
    for subject in subjects:
        if subject.subject_id not in pending:
            _link_shared(root, spec, subject.subject_id, rows)
    if unavailable:
        logger.info(
            "%d requested scans do not exist in %s (not every subject has them)",
            unavailable,
            spec.key,
        )
    logger.info(
        "%d scans up to date (skipped); %d scans of %d subjects to prepare",
        skipped,
        len(jobs),
        len(pending),
    )

    done = 0
    progress = tqdm(total=len(pending), unit="subject", disable=args.no_progress, file=sys.stderr)

    def collect(subject_id: str, modality: str, row: dict | None, error: str | None) -> None:
        nonlocal done
        if error is None:
            rows[(subject_id, modality)] = row
            done += 1
        else:
            failures.append((subject_id, modality, error))
            progress.write(f"FAILED {subject_id} {modality}: {error}", file=sys.stderr)
        write_manifest(folder, rows)  # after every scan: a killed run loses one scan at most
        _link_shared(root, spec, subject_id, rows)
        pending[subject_id] -= 1
        if pending[subject_id] == 0:
            progress.update(1)

    arguments = [(s, spec.key, m, config, str(root), versions) for s, m in jobs]
    if args.workers == 1 or len(arguments) <= 1:
        for item in arguments:
            collect(item[0].subject_id, item[2], *process_scan(*item))
    else:
        # ITK threads per worker, so N workers do not each start one thread per core. Spawned
        # workers copy the environment when the pool starts them (during submit); this process
        # keeps its own setting.
        threads = str(max(1, (os.cpu_count() or 1) // args.workers))
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool:
            with _environment("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", threads):
                futures: dict[Future, tuple[Subject, str]] = {
                    pool.submit(process_scan, *item): (item[0], item[2]) for item in arguments
                }
            for future in as_completed(futures):
                subject, modality = futures[future]
                try:
                    row, error = future.result()
                except Exception as err:  # a worker died (out of memory, a crash in ITK)
                    row, error = (
                        None,
                        f"{subject.images[modality].describe()}: worker failed: {err!r}",
                    )
                collect(subject.subject_id, modality, row, error)
    progress.close()

    print(
        f"data_prep.prepare {spec.key}: prepared {done} scans, skipped {skipped} up to date, "
        f"failures: {len(failures)}",
        file=sys.stderr,
    )
    for subject_id, modality, error in failures:
        print(f"  FAILED {subject_id} {modality}: {error}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors in the user's input print one line, not a traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return run(args)
    except P2LError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
