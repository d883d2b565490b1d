"""The evaluation protocols a reported number belongs to, named and never mixed (spec §7).

- "reference" (Patch2Loc's): every volume of the test CSV; the per-volume oracle threshold, the
  healthy-quantile threshold and the threshold-free metrics (AUROC, AUPRC, ...).
- "behrendt" (pDDPM/cDDPM's): one threshold tuned on the dataset's lesion validation CSV
  (policy "validation"), reported on the test CSV *minus the validation subjects*.

The Behrendt splits keep validation and test apart (e.g. Brats21_val.csv, 100, and
Brats21_test.csv, 1151), but Patch2Loc's Brats21_test.csv holds all 1,251 subjects, so a splits
folder mixing the two would score a validation-tuned threshold on the volumes it was tuned on.
Such subjects are left out of the validation policy (their rows carry no `*[validation]` metric)
and counted in summary.json.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from p2l.thresholds import ORACLE, VALIDATION

REFERENCE = "reference"
BEHRENDT = "behrendt"
# The per-volume row flag: True for a test volume whose subject is in the validation CSV.
VALIDATION_SUBJECT = "validation_subject"


def validation_subjects(test_ids: Iterable[str], val_ids: Iterable[str]) -> set[str]:
    """The test subjects that are also lesion validation subjects (excluded from "behrendt")."""
    return set(test_ids) & set(val_ids)


def describe(
    rows: Sequence[dict], healthy_policy: str, validation_volumes: int | None
) -> dict[str, dict]:
    """summary["sets"][<dataset>]["protocols"] for the set's per-volume rows.

    `validation_volumes` is the number of validation volumes the threshold was tuned on, None when
    the dataset has no validation CSV (no "behrendt" entry then: no number is on that protocol).
    """
    excluded = sum(1 for row in rows if row.get(VALIDATION_SUBJECT))
    out = {REFERENCE: {"policies": [ORACLE, healthy_policy], "threshold_free": True,
                       "volumes": len(rows)}}  # fmt: skip
    if validation_volumes is not None:
        out[BEHRENDT] = {
            "policies": [VALIDATION],
            "volumes": len(rows) - excluded,
            "excluded_validation_subjects": excluded,
            "validation_volumes": validation_volumes,
        }
    return out


def protocol_of(metric_key: str) -> str:
    """The protocol a metric key of the summary is on (`dice[validation]` -> "behrendt")."""
    return BEHRENDT if metric_key.endswith(f"[{VALIDATION}]") else REFERENCE
