"""Orientation (issue 15, defect 4): the training space is recorded, every scan is brought to it
by an exact axis permutation/flip, and detect gives the same maps for the same scan stored in any
of the 48 axis orders/flips; scans that are clearly not registered are refused or warned about."""

from __future__ import annotations

import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff

from p2l import detect, normalization, orientation, run_info, train
from p2l.errors import DataError
from p2l.orientation import Reorientation, all_orientations
from p2l.volume_io import Volume
from tests.conftest import demo_config

# Anisotropic spacing and a translation, so that a wrong axis order, flip or offset shows.
AFFINE = np.array(
    [[1.5, 0, 0, -30.0], [0, 1.0, 0, -42.0], [0, 0, 2.0, -17.0], [0, 0, 0, 1]], dtype=np.float64
)
IDENTITY = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
# Representative stored versions: LR-flipped, in-plane axes swapped, slice axis moved + flipped.
SUBSET = {
    "lr_flipped": np.array([[0, -1], [1, 1], [2, 1]], dtype=float),
    "in_plane_swapped": np.array([[1, 1], [0, 1], [2, 1]], dtype=float),
    "slice_axis_first_flipped": np.array([[1, -1], [2, 1], [0, -1]], dtype=float),
}


def stored_copy(data: np.ndarray, affine: np.ndarray, ornt: np.ndarray):
    """The same scan stored another way: voxels moved by `ornt`, affine so that every voxel keeps
    its world position."""
    return (
        np.ascontiguousarray(apply_orientation(data, ornt)),
        affine @ inv_ornt_aff(ornt, data.shape),
    )


def back_to_original(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    inverse = np.zeros_like(ornt)
    for axis, (to, flip) in enumerate(ornt):
        inverse[int(to)] = (axis, flip)
    return apply_orientation(array, inverse)


def test_all_48_orientations_reorient_to_one_array_and_back():
    rng = np.random.default_rng(0)
    data = rng.random((5, 6, 7)).astype(np.float32)
    reference = Reorientation.between(AFFINE, data.shape, ("L", "P", "S"))
    canonical = reference.apply(data)
    assert reference.target_axcodes == ("L", "P", "S") and canonical.shape == (5, 6, 7)
    orientations = all_orientations()
    assert len({tuple(o.ravel()) for o in orientations}) == 48
    for ornt in orientations:
        stored, affine = stored_copy(data, AFFINE, ornt)
        reo = Reorientation.between(affine, stored.shape, ("L", "P", "S"))
        np.testing.assert_array_equal(reo.apply(stored), canonical)
        np.testing.assert_allclose(reo.target_affine, reference.target_affine, atol=1e-9)
        np.testing.assert_array_equal(reo.invert(canonical), stored)
        assert reo.is_identity == (orientation.axcodes(affine) == ("L", "P", "S"))
        # Trailing axes (e.g. channels) follow the voxels.
        stacked = np.stack([stored, 2 * stored], axis=-1)
        np.testing.assert_array_equal(reo.invert(reo.apply(stacked)), stacked)


def test_reorientation_keeps_world_positions():
    stored, affine = stored_copy(np.zeros((5, 6, 7)), AFFINE, SUBSET["slice_axis_first_flipped"])
    reo = Reorientation.between(affine, stored.shape, ("R", "A", "S"))
    marker = np.zeros(stored.shape)
    marker[1, 2, 3] = 1
    where = np.argwhere(reo.apply(marker) == 1)[0]
    world_stored = affine @ np.array([1, 2, 3, 1.0])
    np.testing.assert_allclose(reo.target_affine @ np.r_[where, 1.0], world_stored, atol=1e-9)
    np.testing.assert_allclose(nib.affines.voxel_sizes(reo.target_affine), (1.5, 1.0, 2.0))


def _rotation_x(degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    rot = np.eye(4)
    rot[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rot @ AFFINE


def test_an_oblique_scan_is_refused_with_its_angle():
    with pytest.raises(DataError, match=r"12\.0 degrees.*not registered") as info:
        Reorientation.between(_rotation_x(12), (5, 6, 7), ("L", "P", "S"), source="scan.nii")
    assert info.value.path == "scan.nii"
    # A tilt within the limit goes to the nearest axes.
    reo = Reorientation.between(_rotation_x(2), (5, 6, 7), ("R", "A", "S"))
    assert reo.target_axcodes == ("R", "A", "S")


def _phantom(shape=(20, 18, 12), seed=0):
    """An asymmetric textured ellipsoid on a zero background and its mask."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt((grid**2).sum(axis=0))
    mask = (radius < 0.8).astype(np.float32)
    ramp = 300 + 150 * grid[0] + 80 * grid[1] ** 2 - 60 * grid[2]
    image = (ramp + 40 * rng.standard_normal(shape)) * mask
    return np.clip(image, 0, None).astype(np.float32), mask


def test_prepare_subject_is_the_same_for_all_48_stored_versions():
    image, mask = _phantom()
    kwargs = dict(modality="t2", subject_id="x", target_shape=(16, 16, 10), expected_spacing=None)
    reference = normalization.prepare_subject(
        Volume(image, AFFINE, "a"), Volume(mask, AFFINE, "m"), None,
        orientation=("L", "P", "S"), spacing=(1.5, 1.0, 2.0), **kwargs,
    )  # fmt: skip
    back = reference.to_source(reference.image)
    assert back.shape == image.shape and np.any(back > 0)
    for ornt in all_orientations():
        data, affine = stored_copy(image, AFFINE, ornt)
        stored_mask, _ = stored_copy(mask, AFFINE, ornt)
        subject = normalization.prepare_subject(
            Volume(data, affine, "a"), Volume(stored_mask, affine, "m"), None,
            orientation=("L", "P", "S"), spacing=(1.5, 1.0, 2.0), **kwargs,
        )  # fmt: skip
        np.testing.assert_array_equal(subject.image, reference.image)
        np.testing.assert_array_equal(subject.mask, reference.mask)
        assert subject.source_shape == data.shape
        np.testing.assert_array_equal(subject.source_affine, affine)
        # Results go back onto the stored grid: the stored copy of the original's result.
        np.testing.assert_array_equal(
            subject.to_source(subject.image), stored_copy(back, AFFINE, ornt)[0]
        )


def test_spacing_is_checked_along_the_training_axes_after_reorientation():
    image, mask = _phantom()
    # Stored with the 2 mm axis first: its own spacing (2, 1.5, 1) is the training one reoriented.
    data, affine = stored_copy(image, AFFINE, SUBSET["slice_axis_first_flipped"])
    stored_mask, _ = stored_copy(mask, AFFINE, SUBSET["slice_axis_first_flipped"])
    kwargs = dict(modality="t2", subject_id="x", target_shape=(16, 16, 10), expected_spacing=None)
    vols = (Volume(data, affine, "a.nii"), Volume(stored_mask, affine, "m.nii"), None)
    normalization.prepare_subject(*vols, orientation=("L", "P", "S"), spacing=(1.5, 1, 2), **kwargs)
    with pytest.raises(DataError, match=r"along the training axes.*\(1\.0, 1\.0, 2\.0\)") as info:
        normalization.prepare_subject(
            *vols, orientation=("L", "P", "S"), spacing=(1, 1, 2), **kwargs
        )
    assert info.value.path == "a.nii"


# --- the training-space record ----------------------------------------------------------------


def _mini_dataset(root, affine=AFFINE, shape=(40, 44, 30)):
    """<root>/data/Train/ixi/{t1,mask} with two subjects, <root>/splits/IXI_train_fold0.csv and
    IXI_test.csv (the files that make the IXI build, p2l.splits.dataset_rows)."""
    image, mask = _phantom(shape)
    (root / "data/Train/ixi/t1").mkdir(parents=True)
    (root / "data/Train/ixi/mask").mkdir(parents=True)
    (root / "splits").mkdir()
    lines = ["img_name,img_path,mask_path"]
    for sid in ("IXI1", "IXI2"):
        nib.save(nib.Nifti1Image(image, affine), root / f"data/Train/ixi/t1/{sid}_t1.nii.gz")
        nib.save(nib.Nifti1Image(mask, affine), root / f"data/Train/ixi/mask/{sid}_mask.nii.gz")
        lines.append(
            f"{sid}_t1.nii.gz,/Train/ixi/t1/{sid}_t1.nii.gz,/Train/ixi/mask/{sid}_mask.nii.gz"
        )
    (root / "splits/IXI_train_fold0.csv").write_text("\n".join(lines) + "\n")
    (root / "splits/IXI_test.csv").write_text("\n".join(lines[:2]) + "\n")
    config = demo_config(root)
    config.data_root, config.splits_dir, config.modality = (
        str(root / "data"),
        str(root / "splits"),
        "t1",
    )
    return config, image, mask


def test_training_space_is_recorded_and_read_back(tmp_path):
    config, _, mask = _mini_dataset(tmp_path)
    space = orientation.training_space(config)
    assert space["axcodes"] == ["R", "A", "S"] and space["spacing"] == [1.5, 1.0, 2.0]
    assert space["orientations_of_training_volumes"] == {"RAS": 2}
    expected_extent = orientation.brain_extent_mm(mask, (1.5, 1.0, 2.0))
    assert space["brain_extent_mm"] == expected_extent and min(expected_extent) > 0
    workdir = tmp_path / "run"
    workdir.mkdir()
    orientation.write_training_space(workdir, config)
    assert json.loads((workdir / orientation.FILENAME).read_text())["axcodes"] == ["R", "A", "S"]
    assert orientation.read_training_space(workdir) == space
    assert orientation.run_space(workdir, config) == space
    # Resuming on data now stored another way would mix array layouts: refused.
    record = json.loads((workdir / orientation.FILENAME).read_text())
    record["axcodes"] = ["L", "P", "S"]
    (workdir / orientation.FILENAME).write_text(json.dumps(record))
    with pytest.raises(DataError, match="trained on LPS volumes.*now RAS"):
        orientation.write_training_space(workdir, config)
    (workdir / orientation.FILENAME).write_text(
        '{"axcodes": ["L", "L", "S"], "spacing": [1, 1, 1]}'
    )
    with pytest.raises(DataError, match="not a p2l training-space record"):
        orientation.read_training_space(workdir)


def test_runs_without_a_record_fall_back_to_the_data_then_the_scan(tmp_path, capsys):
    config, _, _ = _mini_dataset(tmp_path)
    workdir = tmp_path / "old_run"
    workdir.mkdir()
    assert orientation.run_space(workdir, config)["axcodes"] == ["R", "A", "S"]
    assert "using the orientation of the training data" in capsys.readouterr().out
    config.data_root = str(tmp_path / "moved")
    assert orientation.run_space(workdir, config) is None
    assert "assuming each scan is stored in the orientation" in capsys.readouterr().out


# --- detect, with a position-dependent stand-in for the network (fast) --------------------------


class _PositionScorer:
    """Stands in for p2l.scoring.Scorer: maps that depend on where a voxel sits in the array, as a
    network's do, so an unhandled flip or permutation changes them."""

    def __init__(self, config, model, variables):
        del config, model, variables

    def __call__(self, subject_id, image, mask):
        ramp = np.arange(image.size, dtype=np.float32).reshape(image.shape) / image.size
        inside = mask > 0
        maps = {"score": image * ramp * inside, "error": image + ramp, "logvar": ramp - image}
        return SimpleNamespace(score=maps["score"], maps=maps)


@pytest.fixture
def stub_run(tmp_path, monkeypatch):
    """A run folder with config and training space, and no network (see _PositionScorer)."""
    from p2l import scoring, train_state

    config, image, _ = _mini_dataset(tmp_path, affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    config.data.image_shape = (32, 32, 16)
    workdir = tmp_path / "run"
    workdir.mkdir()
    run_info.write(workdir, config)
    orientation.write_training_space(workdir, config)
    monkeypatch.setattr(scoring, "Scorer", _PositionScorer)
    monkeypatch.setattr(train_state, "restore_variables", lambda config, workdir: (None, None, 0))
    return workdir, image


def _detect(workdir, scan, out, *extra):
    args = detect.parse_args(
        ["--workdir", str(workdir), "--input", str(scan), "--modality", "t1",
         "--output", str(out), "--threshold", "0.2", *extra]
    )  # fmt: skip
    return detect.detect(args)


def _maps(written, ornt):
    """detect's outputs, moved from the copy's stored grid back onto the original's grid."""
    out = {}
    for name in ("score", "error", "logvar", "mask"):
        img = nib.load(written[name])
        out[name] = back_to_original(np.asarray(img.dataobj, dtype=np.float64), ornt)
    return out, img.affine


def test_detect_gives_the_same_maps_for_flipped_and_permuted_copies(stub_run, tmp_path, capsys):
    workdir, image = stub_run
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-40, -50, -20)
    versions = {"original": IDENTITY, **SUBSET}
    results = {}
    for name, ornt in versions.items():
        data, stored_affine = stored_copy(image, affine, ornt)
        scan = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, stored_affine), scan)
        written = _detect(workdir, scan, tmp_path / "out" / name)
        results[name], out_affine = _maps(written, ornt)
        np.testing.assert_allclose(out_affine, stored_affine, atol=1e-5)  # the copy's own grid
    for name in SUBSET:
        for key, original in results["original"].items():
            np.testing.assert_array_equal(results[name][key], original, err_msg=f"{name} {key}")
    assert results["original"]["mask"].sum() > 0
    assert "stored as LAS, the model was trained on RAS" in capsys.readouterr().out


def test_detect_refuses_an_oblique_native_scan(stub_run, tmp_path):
    workdir, image = stub_run
    tilted = np.diag([2.0, 2.0, 2.0, 1.0])
    tilted[:3, :3] = _rotation_x(9)[:3, :3] @ np.diag([2 / 1.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(image, tilted), tmp_path / "oblique.nii.gz")
    with pytest.raises(DataError, match=r"9\.0 degrees away from the world axes"):
        _detect(workdir, tmp_path / "oblique.nii.gz", tmp_path / "x")


def test_detect_warns_about_a_brain_far_from_the_training_size(stub_run, tmp_path, capsys):
    workdir, image = stub_run
    big = np.zeros((60, 60, 40), np.float32)
    big[5:55, 5:55, 5:35] = 100 + np.arange(30, dtype=np.float32)  # a box, as big as a whole head
    nib.save(nib.Nifti1Image(big, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "head.nii.gz")
    _detect(workdir, tmp_path / "head.nii.gz", tmp_path / "x")
    assert "does not look skull-stripped and registered" in capsys.readouterr().out


def test_detect_refuses_the_real_oblique_ixi_scan(stub_run, tmp_path, shared_dir):
    workdir, _ = stub_run
    folder = shared_dir / "data/ixi_defacing_pipeline/data/example_input_hdbet_processed"
    scan = folder / "IXI002-Guys-0828-T2/hd_bet_IXI002-Guys-0828-T2.nii.gz"
    with pytest.raises(DataError, match=r"6\.\d degrees away from the world axes"):
        _detect(workdir, scan, tmp_path / "x")


# --- end to end: a trained model, a real scan with a blob, all 48 stored versions (slow) ---------

MSLUB_T2 = (
    "data/mslub_open_ms_data/cross_sectional/MNI/patient07/"
    "T2_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz"
)


@pytest.fixture(scope="module")
def trained(small_demo, tmp_path_factory):
    """A briefly trained demo model (2 mm, RAS), as tests/evaluate_test.py."""
    workdir = tmp_path_factory.mktemp("run")
    config = demo_config(small_demo, num_steps=6, checkpoint_every=6, log_every=3, eval_every=6)
    config.eval.stride = 4
    train.train_and_evaluate(config, workdir)
    orientation.write_training_space(workdir, config)  # a no-op once train.py records it
    return config, workdir


def _real_scan_with_blob(shared_dir):
    """MSLUB patient07 T2 (MNI, LAS, 1 mm) taken every 2nd voxel to the demo model's 2 mm, with a
    bright 5 mm-radius blob off the midline; returns data, affine and the blob's world centre."""
    img = nib.load(shared_dir / MSLUB_T2)
    data = np.asarray(img.dataobj, dtype=np.float32)[::2, ::2, ::2]
    affine = img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    brain = data != 0
    centre = np.round(np.argwhere(brain).mean(axis=0) + (10, 5, 3)).astype(int)
    assert brain[tuple(centre)]
    grid = np.indices(data.shape)
    blob = ((grid - centre[:, None, None, None]) ** 2).sum(axis=0) <= 2.5**2
    data[blob & brain] = np.percentile(data[brain], 99.5) * 1.6
    return data, affine, (affine @ np.r_[centre, 1.0])[:3]


def _blob_peak_world(written, blob_world, radius_mm=12.0):
    """Mean world position of the voxels with the highest score within `radius_mm` of the blob."""
    img = nib.load(written["score"])
    score = np.asarray(img.dataobj)
    index = np.indices(score.shape).reshape(3, -1).T
    world = index @ img.affine[:3, :3].T + img.affine[:3, 3]
    near = np.linalg.norm(world - blob_world, axis=1) <= radius_mm
    values = score.reshape(-1)[near]
    return world[near][values == values.max()].mean(axis=0), float(values.max())


def _detect_copy(workdir, data, affine, ornt, folder, threshold):
    """detect on `data` stored as `ornt`; its maps moved back onto the original grid."""
    stored, stored_affine = stored_copy(data, affine, ornt)
    scan = folder / "copy.nii.gz"
    nib.save(nib.Nifti1Image(stored, stored_affine), scan)
    args = detect.parse_args(
        ["--workdir", str(workdir), "--input", str(scan), "--modality", "t2",
         "--output", str(folder / "out" / "copy"), "--threshold", str(threshold), "--stride", "8"]
    )  # fmt: skip
    written = detect.detect(args)
    return _maps(written, ornt)[0], written


def _every_order_and_flip() -> list[np.ndarray]:
    """12 of the 48 orientations: each axis order twice, each of the 8 flip patterns at least
    once (order p with flip patterns p mod 4 and p mod 4 + 4). The normalisation is checked on
    all 48 above, in a second; this is its trained-network, real-scan form (3 s per copy)."""
    chosen = all_orientations()
    return [o for i, o in enumerate(chosen) if i % 4 == (i // 8) % 4]


@pytest.mark.slow
def test_detect_on_a_real_scan_is_the_same_in_every_axis_order_and_flip(
    trained, shared_dir, tmp_path
):
    _, workdir = trained
    data, affine, blob_world = _real_scan_with_blob(shared_dir)
    # The threshold: the 98th percentile of the stored scan's in-brain score, so masks have voxels.
    maps, _ = _detect_copy(workdir, data, affine, IDENTITY, tmp_path, 1e9)
    threshold = float(np.percentile(maps["score"][maps["score"] > 0], 98))
    reference = None
    for number, ornt in enumerate(_every_order_and_flip()):
        maps, written = _detect_copy(workdir, data, affine, ornt, tmp_path, threshold)
        peak, peak_value = _blob_peak_world(written, blob_world)
        if reference is None:
            reference = maps, peak
            assert peak_value > 0 and maps["mask"].sum() > 0
            continue
        for key, original in reference[0].items():
            # Measured: identical (max abs difference 0.0) for every map and copy.
            assert np.abs(maps[key] - original).max() <= 1e-6, (number, key)
        np.testing.assert_allclose(peak, reference[1], atol=1e-6, err_msg=f"copy {number}")


def test_a_dataset_volume_may_be_oblique_when_its_loader_says_so():
    # The slice build and the validation loader reorient the dataset's own volumes without the
    # registration check (the reference reads them as they are); detect keeps it.
    reo = Reorientation.between(
        _rotation_x(12), (5, 6, 7), ("L", "P", "S"), source="scan.nii", check_oblique=False
    )
    assert reo.target_axcodes == ("L", "P", "S")
