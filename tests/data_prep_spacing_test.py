"""data_prep's working grid (--spacing), given brain masks, the IXI HH and BraTS 2015 layouts and
the z-score shift: the pure pieces, on synthetic volumes and empty files (seconds)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import ants
import numpy as np
import pytest

from data_prep.adapters import discover, get_spec
from data_prep.manifest import config_key
from data_prep.pipeline import PIPELINE_VERSION, PrepConfig, scan_key, skull_strip_method
from data_prep.sources import Source, Subject
from data_prep.validate import row_spacing
from p2l.errors import DataError
from p2l.preparation.atlas import load_atlas
from p2l.preparation.skull_strip import skull_strip
from p2l.preparation.steps import RegistrationParams, reorient_resample, shift_to_positive
from tests import data_prep_phantom as phantom


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_spacing_1_keeps_the_earlier_config_and_restart_key(tmp_path):
    image = Source(str(_touch(tmp_path / "IXI002-Guys-0828-T1.nii.gz")))
    subject = Subject("IXI002-Guys-0828", {"t1": image})
    atlas = SimpleNamespace(sha256="a" * 64)
    config = PrepConfig()
    assert "spacing" not in config.as_dict()
    earlier = config_key(  # the payload as written before --spacing existed
        {
            "pipeline": PIPELINE_VERSION,
            "config": config.as_dict(),
            "method": "hd-bet",
            "atlas_sha256": atlas.sha256,
            "modality": "t1",
            "image": image.identity(),
            "seg": None,
        }
    )
    assert scan_key(config, atlas, subject, "t1", "hd-bet") == earlier
    two = PrepConfig(spacing=2.0)
    assert two.as_dict()["spacing"] == 2.0
    assert scan_key(two, atlas, subject, "t1", "hd-bet") != earlier
    # Scans stripped by the atlas fallback are redone since it changed (several starts).
    old_atlas_key = config_key(
        {
            "pipeline": PIPELINE_VERSION,
            "config": config.as_dict(),
            "method": "atlas",
            "atlas_sha256": atlas.sha256,
            "modality": "t1",
            "image": image.identity(),
            "seg": None,
        }
    )
    assert scan_key(config, atlas, subject, "t1", "atlas") != old_atlas_key
    assert row_spacing({"config": config.as_dict()}) == 1.0
    assert row_spacing({"config": two.as_dict(), "spacing_mm": 2.0}) == 2.0


def test_ixi_hh_names_and_dlmuse_masks_through_symlinked_folders(tmp_path):
    shared = tmp_path / "shared"
    _touch(shared / "Nifti/T1/IXI013-HH-1212_T1.nii.gz")
    _touch(shared / "Nifti/T1/IXI014-HH-1236_T1.nii.gz")
    _touch(shared / "DLMUSE/IXI013-HH-1212_T1_DLMUSE.nii.gz")
    _touch(tmp_path / "elsewhere/IXI002-Guys-0828-T1.nii.gz")
    real = tmp_path / "real"
    real.mkdir()
    (real / "hh").symlink_to(shared)  # a linked folder inside RAW
    (real / "guys").symlink_to(tmp_path / "elsewhere")
    (real / "loop").symlink_to(real)  # a cycle must not recurse forever
    raw = tmp_path / "raw"
    raw.symlink_to(real)  # RAW itself a link

    subjects = {s.subject_id: s for s in discover(get_spec("ixi"), raw)}

    assert sorted(subjects) == ["IXI002-Guys-0828", "IXI013-HH-1212", "IXI014-HH-1236"]
    hh = subjects["IXI013-HH-1212"]
    assert Path(hh.images["t1"].path).name == "IXI013-HH-1212_T1.nii.gz"
    assert Path(hh.brain_mask.path).name == "IXI013-HH-1212_T1_DLMUSE.nii.gz"
    assert "pseudo-label" in hh.brain_mask_note and not hh.mask_is_reference
    assert subjects["IXI014-HH-1236"].brain_mask is None
    assert not hh.problems
    config = PrepConfig(skull_strip="auto")
    assert skull_strip_method(config, hh) != "given-mask"  # a pseudo-label is never automatic


def test_brats15_case_folders(tmp_path):
    raw = tmp_path / "deepmedic"
    case = raw / "train" / "brats_2013_pat0005_1"
    for name in ("T1c_subtrMeanDivStd", "Flair_subtrMeanDivStd", "brainmask", "OTMultiClass"):
        _touch(case / f"{name}.nii.gz")
    _touch(case / "License_CC_BY_NC_SA_3.0.txt")
    _touch(raw / "validation" / "brats_2013_pat0003_1" / "T1c_subtrMeanDivStd.nii.gz")

    spec = get_spec("brats15")
    subjects = {s.subject_id: s for s in discover(spec, raw)}

    assert spec.folder == "Test/BraTS15" and spec.zscored and spec.has_seg
    full = subjects["brats_2013_pat0005_1"]
    assert set(full.images) == {"t1c", "flair"}
    assert Path(full.seg.path).name == "OTMultiClass.nii.gz"
    assert Path(full.brain_mask.path).name == "brainmask.nii.gz" and full.mask_is_reference
    assert skull_strip_method(PrepConfig(), full) == "given-mask"  # auto uses the shipped mask
    bare = subjects["brats_2013_pat0003_1"]
    assert bare.brain_mask is None and bare.seg is None
    assert skull_strip_method(PrepConfig(), bare) == "none"


def _image(data: np.ndarray, spacing: float) -> ants.ANTsImage:
    return ants.from_numpy(data.astype(np.float32), spacing=(spacing,) * 3)


def test_reorient_resample_to_2mm():
    data = np.random.default_rng(0).random((40, 30, 20)).astype(np.float32)
    out, info = reorient_resample(_image(data, 1.0), "image", 2.0)
    assert info["resampled"] and np.allclose(out.spacing, 2.0)
    assert out.shape == (20, 15, 10)
    same, info = reorient_resample(_image(data, 2.0), "image", 2.0)
    assert not info["resampled"] and same.shape == data.shape
    cube = np.zeros((40, 40, 40), np.float32)
    cube[10:30, 10:30, 10:30] = 1
    mask, info = reorient_resample(_image(cube, 1.0), "mask", 2.0)
    assert info["interpolation"] == "linear>=0.5" and set(np.unique(mask.numpy())) == {0, 1}
    assert mask.numpy().sum() * 8 == pytest.approx(cube.sum(), rel=0.15)


def test_shift_to_positive_zero_background_and_order_kept():
    rng = np.random.default_rng(1)
    data = np.full((12, 12, 12), -3.0, np.float32)  # z-scored: background = brain minimum
    inside = np.zeros(data.shape, bool)
    inside[3:9, 3:9, 3:9] = True
    data[inside] = rng.normal(size=inside.sum()).astype(np.float32)
    mask = _image(inside.astype(np.float32), 1.0)

    shifted, info = shift_to_positive(_image(data, 1.0), mask)

    out = shifted.numpy()
    assert np.all(out[~inside] == 0)
    assert out[inside].min() > 0
    span = data[inside].max() - data[inside].min()
    assert out[inside].min() == pytest.approx(0.01 * span, rel=1e-4)
    np.testing.assert_allclose(out[inside] - data[inside], info["offset"], atol=1e-4)


def test_given_mask_strips_with_the_subjects_mask_and_says_so():
    image = _image(np.full((60, 60, 60), 5.0), 2.0)  # a 2 mm grid: 0.008 mL voxels
    ball = (np.linalg.norm(np.indices((60, 60, 60)) - 30, axis=0) < 25).astype(np.float32)
    note = "provided mask: /raw/x_T1_DLMUSE.nii.gz (pseudo-label)"
    stripped, mask, info = skull_strip(
        image,
        "given-mask",
        None,
        source="/raw/x_T1.nii.gz",
        registration=RegistrationParams(),
        given_mask=_image(ball * 7, 2.0),  # labels: anything > 0 is brain
        given_note=note,
    )
    assert info["method"] == "given-mask" and info["quality"] == note
    assert info["brain_ml"] == pytest.approx(ball.sum() * 0.008, rel=1e-3)
    np.testing.assert_array_equal(mask.numpy(), ball)
    np.testing.assert_array_equal(stripped.numpy(), 5.0 * ball)
    with pytest.raises(DataError, match="x_T1.nii.gz: skull stripping given-mask: no brain mask"):
        skull_strip(
            image, "given-mask", None, source="/raw/x_T1.nii.gz", registration=RegistrationParams()
        )


def test_working_atlas_is_made_from_1mm_and_coarse_files_are_refused(tmp_path):
    one = load_atlas(phantom.atlas(tmp_path / "atlas.nii.gz"))
    two = load_atlas(tmp_path / "atlas.nii.gz", spacing=2.0)
    assert np.allclose(two.image.spacing, 2.0) and two.spacing_mm == 2.0
    assert two.sha256 == one.sha256  # the file's; the spacing is in describe() and the config
    described = two.describe()
    assert described["working_spacing_mm"] == 2.0 and described["spacing"] == [2.0, 2.0, 2.0]
    assert "working_spacing_mm" not in one.describe()
    np.testing.assert_array_equal(two.image.numpy() > 0, two.brain_mask.numpy() > 0)
    volume_one = one.brain_mask.numpy().sum() * one.voxel_ml
    assert two.brain_mask.numpy().sum() * two.voxel_ml == pytest.approx(volume_one, rel=0.03)
    brain, _, affine = phantom.scan((70, 80, 60), (2.0, 2.0, 2.0), "RAS")
    coarse = phantom.save(tmp_path / "coarse.nii.gz", brain, affine)
    with pytest.raises(DataError, match="coarse.nii.gz: atlas must be 1 mm isotropic"):
        load_atlas(coarse, spacing=2.0)
