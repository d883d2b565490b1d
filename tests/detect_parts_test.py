"""The pieces of raw-scan detection that need no registration (seconds): the run's preparation
record, the voxel mapping back onto the raw grid, the report's components and out-of-distribution
check, the healthy reference, the batch input list."""

from __future__ import annotations

import json
from types import SimpleNamespace

import ants
import nibabel as nib
import numpy as np
import pytest

from p2l import detect, detect_report, eval_thresholds
from p2l import score_histograms as sh
from p2l.errors import DataError
from p2l.preparation import raw_scan, record


def _manifest_row(path="t1/IXI1_t1.nii.gz"):
    return {
        "pipeline": "1", "subject": "IXI1", "modality": "t1", "spacing_mm": 2.0,
        "config": {"skull_strip": "given-mask", "hd_bet_args": "", "crop_mode": "reference",
                   "registration": {"aff_iterations": [10]}, "n4": {"iters": [5]},
                   "atlas_path": None, "spacing": 2.0},
        "atlas": {"sha256": "abc", "name": "MNI"},
        "skull_strip": {"method": "given-mask"},
        "outputs": {"image": {"path": path}},
    }  # fmt: skip


def test_preparation_record_is_read_from_the_manifest_listing_the_scan(tmp_path):
    folder = tmp_path / "Train" / "ixi"
    (folder / "t1").mkdir(parents=True)
    rows = [_manifest_row("t1/IXI0_t1.nii.gz"), _manifest_row()]
    (folder / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    found = record.from_manifest(folder / "t1" / "IXI1_t1.nii.gz")
    assert found["spacing_mm"] == 2.0 and found["atlas"] == {"path": None, "sha256": "abc",
                                                             "name": "MNI"}  # fmt: skip
    assert found["registration"] == {"aff_iterations": [10]} and found["subject"] == "IXI1"
    assert record.from_manifest(folder / "t1" / "other_t1.nii.gz") is None
    assert record.from_manifest(tmp_path / "elsewhere" / "t1" / "x.nii.gz") is None
    # training_space.json's copy comes first; without either, raw mode is refused in one line.
    assert record.for_run(tmp_path, {"preparation": {"spacing_mm": 1.0}}, None) == {
        "spacing_mm": 1.0}  # fmt: skip
    assert record.for_run(tmp_path, None, str(folder / "t1" / "IXI1_t1.nii.gz")) == found
    with pytest.raises(DataError, match="not prepared by data_prep"):
        record.for_run(tmp_path, None, str(folder / "t1" / "other_t1.nii.gz"))
    (folder / "manifest.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="line 1 is not a data_prep manifest row"):
        record.from_manifest(folder / "t1" / "IXI1_t1.nii.gz")


def _ants(shape, spacing, origin, direction):
    data = np.zeros(shape, np.float32)
    return ants.from_numpy(data, origin=tuple(origin), spacing=tuple(spacing),
                           direction=np.asarray(direction, float))  # fmt: skip


def test_maps_go_back_through_the_inverse_registration_to_the_right_world_point():
    """A known affine (atlas -> scan: rotation, scaling, shift) and a map with one bright voxel
    on the prepared grid: on the raw grid it lands at T(p), the scan point of the atlas point p."""
    raw = _ants((60, 50, 20), (1.0, 1.2, 3.0), (-30.0, 40.0, -25.0), np.diag([1.0, -1.0, 1.0]))
    prepared = _ants((40, 40, 30), (2.0, 2.0, 2.0), (35.0, 40.0, -30.0), np.diag([-1, -1, 1.0]))
    angle = np.deg2rad(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                         [0, 0, 1]])  # fmt: skip
    matrix, offset = 0.9 * rotation, np.array([2.0, -3.0, 5.0])
    mapped = raw_scan.PreparedScan(
        image=prepared, mask=prepared, raw_shape=raw.shape, raw_affine=np.eye(4),
        raw_to_prepared=raw_scan._raw_to_prepared(raw, prepared, matrix, offset),
        skull_strip={}, checks={},
    )  # fmt: skip
    values = np.zeros(prepared.shape, np.float32)
    index = np.array([20, 22, 12])
    values[tuple(index)] = 1.0
    values = ants.smooth_image(prepared.new_image_like(values), 2.0).numpy()  # a smooth blob
    back = mapped.to_raw(values)
    # Where the blob's centre should land: prepared index -> LPS point p -> scan point T(p).
    a_prep = np.asarray(prepared.direction) @ np.diag(prepared.spacing)
    p = a_prep @ index + np.asarray(prepared.origin)
    q = matrix @ p + offset
    a_raw = np.asarray(raw.direction) @ np.diag(raw.spacing)
    expected = np.linalg.solve(a_raw, q - np.asarray(raw.origin))
    weights = back / back.sum()
    centre = np.array([(weights * g).sum() for g in np.indices(back.shape)])
    # In mm: the 3 mm slices allow a fraction of a slice of interpolation bias.
    assert np.linalg.norm(a_raw @ (centre - expected)) < 1.0
    cube = np.zeros(prepared.shape, bool)
    cube[19:22, 21:24, 11:14] = True  # 27 voxels of 8 mm³: 216 mm³
    binary = mapped.to_raw(cube, kind="mask")
    assert binary.dtype == np.uint8 and set(np.unique(binary)) == {0, 1}
    # Linear, then >= 0.5: about the volume (the affine scales volumes by 0.9³ scan per atlas).
    assert binary.sum() * 1.0 * 1.2 * 3.0 == pytest.approx(216 * 0.9**3, rel=0.35)


def test_itk_affine_matches_nibabel_for_a_stored_file(tmp_path):
    affine = np.array([[0, 0, -3.0, 40], [-0.9, 0, 0, 20], [0, 1.1, 0, -30], [0, 0, 0, 1]])
    path = tmp_path / "x.nii.gz"
    img = nib.Nifti1Image(np.zeros((5, 6, 7), np.float32), affine)
    img.set_qform(affine, 1)
    nib.save(img, path)
    np.testing.assert_allclose(raw_scan.itk_ras_affine(ants.image_read(str(path))), affine,
                               atol=1e-4)  # fmt: skip


def test_components_are_sized_and_centred_in_world_mm():
    mask = np.zeros((20, 20, 10), np.uint8)
    mask[2:5, 2:5, 2:4] = 1  # 18 voxels
    mask[10:12, 10:12, 5] = 1  # 4 voxels
    score = mask * 2.0
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10, 5, 0]
    found = detect_report.components(mask, score, affine)
    assert [c["voxels"] for c in found] == [18, 4]
    assert found[0]["ml"] == pytest.approx(18 * 12 / 1000)
    assert found[0]["centre_world_mm"] == [-10 + 2 * 3.0, 5 + 2 * 3.0, 3 * 2.5]
    assert found[0]["peak_score"] == 2.0
    assert detect_report.components(np.zeros_like(mask), score, affine) == []


def test_healthy_reference_and_the_out_of_distribution_warnings():
    rng = np.random.default_rng(0)
    per_volume = []
    for _ in range(5):
        values = rng.normal(1.0, 0.1, 5000).astype(np.float32)
        counts = sh.volume_counts(values)
        bins = np.flatnonzero(counts)
        per_volume.append({"mean_score": float(values.mean()), "mean_logvar": 2.0,
                           "counts": (bins.astype(np.int32), counts[bins])})  # fmt: skip
    reference = eval_thresholds.healthy_reference(per_volume, 1.2)
    stats = reference["statistics"]
    assert reference["volumes"] == 5 and stats["mean_logvar"]["std"] == 0.0
    # ~2.3 % of N(1, 0.1) lies above 1.2.
    assert 0.015 < stats["fraction_above"]["mean"] < 0.03
    run = SimpleNamespace(summary={"healthy_reference": reference}, modality="t1")
    ok, _ = detect_report.ood_warnings(run, {"mean_score": 1.0, "mean_logvar": 2.0,
                                             "fraction_above": 0.02}, None)  # fmt: skip
    assert ok == []
    odd, _ = detect_report.ood_warnings(run, {"mean_score": 1.0, "mean_logvar": 3.5,
                                              "fraction_above": 0.4}, None)  # fmt: skip
    assert len(odd) == 2 and "mean_logvar" in odd[0] and "fraction_above" in odd[1]
    # A raw scan's contrast against the run's modality (correlation with the T1 atlas).
    t2_like = SimpleNamespace(checks={"atlas_correlation": -0.35})
    warned, _ = detect_report.ood_warnings(run, {}, t2_like)
    assert len(warned) == 1 and "looks T2" in warned[0]
    unsure = SimpleNamespace(checks={"atlas_correlation": 0.05})
    assert detect_report.ood_warnings(run, {}, unsure)[0] == []


def test_batch_inputs_from_a_folder_or_a_csv(tmp_path):
    (tmp_path / "scans").mkdir()
    for name in ("b.nii.gz", "a.nii", "notes.txt"):
        (tmp_path / "scans" / name).write_text("")
    found = detect.list_inputs(tmp_path / "scans")
    assert [p.split("/")[-1] for p, _ in found] == ["a.nii", "b.nii.gz"]
    (tmp_path / "list.csv").write_text("input,brain_mask\nscans/a.nii,\n/abs/b.nii.gz,m.nii\n")
    rows = detect.list_inputs(tmp_path / "list.csv")
    assert rows == [(str(tmp_path / "scans/a.nii"), None), ("/abs/b.nii.gz",
                                                            str(tmp_path / "m.nii"))]  # fmt: skip
    (tmp_path / "bad.csv").write_text("path\nx.nii\n")
    with pytest.raises(DataError, match="`input` column"):
        detect.list_inputs(tmp_path / "bad.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .nii"):
        detect.list_inputs(tmp_path / "empty")
