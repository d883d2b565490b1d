"""data_prep.adapters: the providers' raw layouts -> subjects, and the output layout."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from data_prep.adapters import discover, get_spec, output_paths, shared_paths
from p2l.errors import ConfigError, DataError


def _touch(path: Path, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _by_id(subjects):
    return {s.subject_id: s for s in subjects}


def test_ixi_files_and_tarball_extracted_wins(tmp_path):
    raw = tmp_path / "ixi"
    _touch(raw / "T1" / "IXI002-Guys-0828-T1.nii.gz")
    _touch(raw / "T1" / "IXI012-HH-1211-T1.nii.gz")
    _touch(raw / "T2" / "IXI002-Guys-0828-T2.nii.gz", b"extracted")
    staging = _touch(tmp_path / "IXI012-HH-1211-T2.nii.gz", b"from tar")
    dup = _touch(tmp_path / "dup" / "IXI002-Guys-0828-T2.nii.gz", b"tar copy")
    with tarfile.open(raw / "IXI-T2.tar", "w") as archive:
        archive.add(staging, arcname=staging.name)
        archive.add(dup, arcname=dup.name)
    _touch(raw / "IXI-PD.tar.notes.txt")

    subjects = _by_id(discover(get_spec("ixi"), raw))

    assert sorted(subjects) == ["IXI002-Guys-0828", "IXI012-HH-1211"]
    assert subjects["IXI002-Guys-0828"].images["t2"].member is None  # extracted file wins
    from_tar = subjects["IXI012-HH-1211"].images["t2"]
    assert from_tar.member == "IXI012-HH-1211-T2.nii.gz"
    with from_tar.local_file() as path:
        assert path.read_bytes() == b"from tar"
    assert from_tar.identity()["size"] == len(b"from tar")
    assert not subjects["IXI012-HH-1211"].already_stripped


def test_brats21_2021_and_2023_names(tmp_path):
    raw = tmp_path / "brats"
    for role in ("t1", "t1ce", "t2", "flair", "seg"):
        _touch(raw / "BraTS2021_00000" / f"BraTS2021_00000_{role}.nii.gz")
    for role in ("t1n", "t1c", "t2w", "t2f", "seg"):
        _touch(raw / "BraTS-GLI-00001-000" / f"BraTS-GLI-00001-000-{role}.nii.gz")
    _touch(raw / "BraTS2021_00002" / "BraTS2021_00002_t1.nii.gz")  # no t2, no seg

    subjects = _by_id(discover(get_spec("Brats21"), raw))

    case = subjects["BraTS2021_00000"]
    assert Path(case.images["t1"].path).name == "BraTS2021_00000_t1.nii.gz"  # not t1ce
    assert Path(case.images["t2"].path).name == "BraTS2021_00000_t2.nii.gz"
    assert Path(case.seg.path).name == "BraTS2021_00000_seg.nii.gz"
    assert case.already_stripped
    gli = subjects["BraTS-GLI-00001-000"]
    assert set(gli.images) == {"t1", "t2"} and gli.seg is not None
    assert (
        subjects["BraTS2021_00002"].seg is None and "t2" not in subjects["BraTS2021_00002"].images
    )


def test_mslub_release_and_derivatives_and_ambiguity(tmp_path):
    raw = tmp_path / "mslub"
    for name in (
        "patient01_T1W",
        "patient01_T1WKS",
        "patient01_T2W",
        "patient01_FLAIR",
        "patient01_consensus_gt",
    ):
        _touch(raw / "patient01" / f"{name}.nii.gz")
    for name in (
        "T1_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI",
        "T2_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI",
        "GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI",
    ):
        _touch(raw / "MNI" / "patient07" / f"{name}.nii.gz")
    _touch(raw / "patient09" / "raw" / "T1W.nii.gz")
    _touch(raw / "patient09" / "coregistered" / "T1W.nii.gz")

    subjects = _by_id(discover(get_spec("mslub"), raw))

    release = subjects["patient01"]
    assert Path(release.images["t1"].path).name == "patient01_T1W.nii.gz"
    assert Path(release.seg.path).name == "patient01_consensus_gt.nii.gz"
    assert not release.already_stripped
    derivative = subjects["patient07"]
    assert derivative.already_stripped and set(derivative.images) == {"t1", "t2"}
    assert any("2 candidate files" in p for p in subjects["patient09"].problems)


def test_atlas_v2_bids(tmp_path):
    anat = tmp_path / "ATLAS_2" / "Training" / "R001" / "sub-r001s001" / "ses-1" / "anat"
    stem = "sub-r001s001_ses-1_space-MNI152NLin2009aSym"
    _touch(anat / f"{stem}_T1w.nii.gz")
    _touch(anat / f"{stem}_label-L_desc-T1lesion_mask.nii.gz")
    _touch(anat / f"{stem}_T1w.json")

    (subject,) = discover(get_spec("atlas_v2"), tmp_path / "ATLAS_2")

    assert subject.subject_id == stem  # the CSVs name `<stem>_t1.nii.gz`
    assert subject.seg.path.endswith("label-L_desc-T1lesion_mask.nii.gz")


def test_wmh_challenge_sites(tmp_path):
    for site, number in (("Utrecht", "0"), ("Singapore", "64"), ("Amsterdam/GE3T", "137")):
        folder = tmp_path / "wmh" / site / number
        _touch(folder / "pre" / "T1.nii.gz")
        _touch(folder / "pre" / "FLAIR.nii.gz")
        _touch(folder / "orig" / "T1.nii.gz")
        if number != "64":
            _touch(folder / "wmh.nii.gz")

    subjects = _by_id(discover(get_spec("wmh"), tmp_path / "wmh"))

    assert sorted(subjects) == ["GE3T_137", "Singapore_64", "Utrecht_0"]
    assert subjects["GE3T_137"].images["t1"].path.endswith("pre/T1.nii.gz")
    assert subjects["Singapore_64"].seg is None


def test_output_layout_matches_the_split_csv_paths(tmp_path):
    spec = get_spec("ixi")
    paths = output_paths(tmp_path, spec, "IXI002-Guys-0828", "t2")
    assert paths["image"] == tmp_path / "Train/ixi/t2/IXI002-Guys-0828_t2.nii.gz"
    assert paths["mask"] == tmp_path / "Train/ixi/mask_t2/IXI002-Guys-0828_mask.nii.gz"
    assert "seg" not in paths
    shared = shared_paths(tmp_path, get_spec("brats21"), "BraTS2021_00538")
    # As in Brats21_test.csv: /Test/Brats21/mask/..._mask.nii.gz and /Test/Brats21/seg/...
    assert shared["mask"] == tmp_path / "Test/Brats21/mask/BraTS2021_00538_mask.nii.gz"
    assert shared["seg"] == tmp_path / "Test/Brats21/seg/BraTS2021_00538_seg.nii.gz"
    assert get_spec("brats21").mask_preference[0] == "t2"  # the modality the paper uses


def test_unknown_dataset_and_empty_or_missing_raw(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset"):
        get_spec("oasis")
    with pytest.raises(DataError, match="not found"):
        discover(get_spec("ixi"), tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="IXI<nnn>-<Site>-<nnnn>-T1.nii.gz"):
        discover(get_spec("ixi"), tmp_path / "empty")


def test_unreadable_tarball_names_the_archive(tmp_path):
    _touch(tmp_path / "raw" / "IXI-T1.tar", b"not a tar archive at all" * 40)
    with pytest.raises(DataError, match="IXI-T1.tar"):
        discover(get_spec("ixi"), tmp_path / "raw")


def test_shared_scans_laid_out_as_the_providers_do(tmp_path):
    from data_prep.shared_layout import make_layout

    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not shared.is_dir():
        pytest.skip("../shared is absent (a user's clone): real-data test skipped")
    folders = make_layout(shared, tmp_path / "raw")
    found = {key: _by_id(discover(get_spec(key), raw)) for key, raw in folders.items()}
    assert set(found["ixi"]) == {"IXI002-Guys-0828"}
    assert set(found["ixi"]["IXI002-Guys-0828"].images) == {"t1", "t2"}
    assert set(found["wmh"]) == {"Utrecht_0", "GE3T_100"}
    assert all(s.seg is not None for s in found["wmh"].values())
    assert set(found["mslub"]) == {"patient07", "patient19"}
    assert all(s.already_stripped and not s.problems for s in found["mslub"].values())
    (case,) = found["brats21"].values()
    assert set(case.images) == {"t1", "t2"} and case.seg is not None
