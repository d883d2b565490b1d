"""The 2 mm T1 real-data check (data_prep/real_check_t1.py): its fixed split, its CSVs, and a
short form of the whole check on the real IXI Hammersmith heads of ../shared (the CI form)."""

import json

import nibabel as nib
import numpy as np
import pytest

from data_prep import real_check_t1
from p2l import detect, splits

IDS = [f"IXI{i:03d}-HH-{1000 + i}" for i in range(138)]


def test_split_is_fixed_disjoint_and_118_10_10():
    train, val, test = real_check_t1.split_ids(IDS)
    assert (len(train), len(val), len(test)) == (118, 10, 10)
    assert set(train) | set(val) | set(test) == set(IDS)
    assert not (set(train) & set(val)) and not (set(train) & set(test)) and not set(val) & set(test)
    assert real_check_t1.split_ids(list(reversed(IDS))) == (train, val, test)  # order-free
    small = real_check_t1.split_ids(IDS, 16, 4)
    assert [len(p) for p in small] == [16, 4, 4]
    with pytest.raises(ValueError, match="138 available"):
        real_check_t1.split_ids(IDS, 130, 5)


def test_split_csvs_put_lesion_cases_in_test_files_only(tmp_path):
    data_root = tmp_path / "data"
    for case in ("brats_a", "brats_b"):
        path = data_root / "Test/BraTS15/t1c" / f"{case}_t1c.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    parts = real_check_t1.split_ids(IDS, 16, 4)
    real_check_t1.write_splits(tmp_path / "splits", parts, data_root)
    for name, part in zip(("train", "val", "test"), parts):
        rows = splits.read_ixi_split(tmp_path / "splits", name, 0, "t1", data_root, False)
        assert [r.subject_id for r in rows] == part
        assert all("/Train/ixi/t1/" in r.image_path for r in rows)
    mslub = splits.read_test_split(tmp_path / "splits", "MSLUB", "t1", data_root, "test", False)
    brats = splits.read_test_split(tmp_path / "splits", "BraTS15", "t1", data_root, "test", False)
    assert [r.subject_id for r in mslub] == ["patient07", "patient19"]
    assert [r.subject_id for r in brats] == ["brats_a", "brats_b"]
    assert brats[0].image_path.endswith("Test/BraTS15/t1c/brats_a_t1c.nii.gz")
    # No lesion set has a validation CSV: no threshold is tuned on a lesion case.
    assert sorted(p.name for p in (tmp_path / "splits").glob("*_val*.csv")) == ["IXI_val_fold0.csv"]


def _tensorboard_tags(folder) -> set[str]:
    import tensorflow as tf

    tags = set()
    for events in folder.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            tags.update(v.tag for v in event.summary.value)
    return tags


@pytest.mark.slow
def test_short_check_end_to_end(shared_dir, tmp_path, capfd):
    """8 training subjects, 3 validation, 3 healthy test, the fast registration schedule and
    the tiny training: the code path of `make real-check`'s T1 check, on real scans."""
    overrides = {"eval.max_volumes": 0, "eval.max_healthy_volumes": 0}
    all_rows = real_check_t1.run(shared_dir, tmp_path, "tiny", 8, 3, fast_prep=True, **overrides)
    printed = capfd.readouterr().out
    # One row per case and detector: Patch2Loc, the DAE and the three fusion rules.
    assert {r["detector"] for r in all_rows} == {
        "patch2loc", "dae", "fused[product]", "fused[zsum]", "fused[gate]"}  # fmt: skip
    rows = [r for r in all_rows if r["detector"] == "patch2loc"]
    assert {r["dataset"] for r in rows} == {"MSLUB", "BraTS15"} and len(rows) == 6
    assert len(all_rows) == 5 * len(rows)
    for r in rows:  # in-brain AUROC/AUPRC: defined for every case (lesion and normal brain)
        assert 0.0 <= float(r["auroc_brain"]) <= 1.0 and 0.0 < float(r["auprc_brain"]) <= 1.0
    assert "| MSLUB/patient07 |" in printed and "healthy brain > healthy_q98" in printed

    results = tmp_path / "run" / "results"
    summary = json.loads((results / "summary.json").read_text())
    assert summary["thresholds"]["healthy_q98"]["volumes"] == 3  # from the 3 validation heads
    # The range of the healthy validation heads that p2l.detect's out-of-distribution check uses.
    reference = summary["healthy_reference"]
    assert reference["volumes"] == 3
    assert {"mean_score", "mean_logvar", "fraction_above"} <= set(reference["statistics"])
    held_out = summary["healthy_test"]
    assert held_out["split"] == "ixi_test" and held_out["volumes"] == 3
    assert 0.0 <= held_out["thresholds"]["healthy_q98"]["pooled_fraction"] <= 1.0

    # No slice of a lesion case is trained on, validated on or used for a threshold: every IXI
    # part of the run's builds is a healthy Train/ixi scan, none a lesion case.
    from p2l import builds

    config = real_check_t1.configure("tiny", tmp_path / "input/data", tmp_path / "input/splits",
                                     tmp_path / "input/tfds")  # fmt: skip
    opened = builds.from_config(config).open()
    lesion_ids = set(opened.subject_ids("mslub")) | set(opened.subject_ids("brats15"))
    assert lesion_ids == {r["subject_id"] for r in rows}
    for part in ("train", "val", "ixi_test"):
        ids = opened.subject_ids(part)
        assert ids and not set(ids) & lesion_ids
        for record in opened.volumes(part, range(len(ids))):
            assert record.seg is None
    assert not opened.has("mslub_val") and not opened.has("brats15_val")

    uncertainty = json.loads((results / "uncertainty/uncertainty.json").read_text())
    assert uncertainty["healthy"]["volumes"] == 3 and uncertainty["healthy"]["patches_kept"] > 0
    assert set(uncertainty["lesion_sets"]) == {"MSLUB", "BraTS15"}
    for name in ("calibration.png", "mslub_patch_kde.png", "brats15_patch_kde.png"):
        assert (results / "uncertainty" / name).stat().st_size > 0
    tags = _tensorboard_tags(tmp_path / "run" / "tensorboard")
    assert {"eval/MSLUB/auroc_brain", "eval/threshold/healthy_q98"} <= tags
    assert any(t.startswith("uncertainty/healthy/coverage") for t in tags)
    assert any(t.startswith("eval/mslub_patient07_overlay") for t in tags)

    # p2l.detect on a held-out head straight from ../shared (native space, PSR, with skull): the
    # run's own preparation (its record: 2 mm, the fast registration), scored, mapped back.
    held_out_id = real_check_t1.split_ids(real_check_t1.ixi_ids(shared_dir), 8, 3)[2][0]
    (raw,) = (shared_dir / "data" / real_check_t1.IXI_HH).rglob(f"{held_out_id}_T1.nii.gz")
    out = tmp_path / "detect" / held_out_id
    argv = ["--workdir", str(tmp_path / "run"), "--input", str(raw), "--output", str(out)]
    written = detect.detect(detect.parse_args(argv))
    source = nib.load(raw)
    for name in ("score", "error", "logvar", "brain", "mask"):
        img = nib.load(written[name])
        assert img.shape == source.shape, name
        np.testing.assert_allclose(img.affine, source.affine, atol=1e-4)
    report = json.loads(written["report"].read_text())
    assert report["mode"] == "raw" and report["threshold"]["source"].startswith("healthy_q98")
    assert report["preparation"]["spacing_mm"] == 2.0
    assert report["out_of_distribution"]["healthy_reference"]["volumes"] == 3
    assert 0.0 <= report["out_of_distribution"]["statistics"]["fraction_above"] <= 1.0

    # Preparation is cached: a second run checks the files and prepares nothing.
    real_check_t1.prepare(shared_dir, tmp_path / "input", 8, 3, fast=True)
    err = capfd.readouterr().err
    assert "prepared 0 scans, skipped 14 up to date" in err
    assert np.isfinite(float(rows[0]["score_normal_brain_mean"]))


pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
