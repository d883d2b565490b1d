"""Tests for p2l.splits on the reference CSVs (spec §1.1, §1.2) and on small written ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2l.errors import ConfigError, DataError
from p2l.splits import SplitRow, read_ixi_split, read_test_split

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_SPLITS = SHARED / "splits" / "patch2loc"

IXI_HEADER = (
    ',img_name,"SEX_ID (1=m, 2=f)",HEIGHT,WEIGHT,ETHNIC_ID,MARITAL_ID,OCCUPATION_ID,'
    "QUALIFICATION_ID,DATE_AVAILABLE,STUDY_DATE,age,label,img_path,mask_path,seg_path,Agegroup\n"
)


def _ixi_line(index: int, subject: str) -> str:
    return (
        f"{index},{subject}_t1.nii.gz,1,0,0,1,2,1,4,1,2005-08-12,55.83,0,"
        f"/Train/ixi/t1/{subject}_t1.nii.gz,/Train/ixi/mask/{subject}_mask.nii.gz,,2.0\n"
    )


def _real_splits() -> Path:
    if not REAL_SPLITS.is_dir():
        pytest.skip(f"reference splits not available at {REAL_SPLITS}")
    return REAL_SPLITS


@pytest.mark.parametrize(
    ("modality", "fold", "train_rows", "val_rows"),
    [("t1", 0, 387, 44), ("t2", 0, 385, 44), ("t2", 3, 386, 43), ("t1", 4, 387, 44)],
)
def test_real_ixi_row_counts(modality, fold, train_rows, val_rows):
    splits = _real_splits()
    train = read_ixi_split(splits, "train", fold, modality, "/data", check_files=False)
    val = read_ixi_split(splits, "val", fold, modality, "/data", check_files=False)
    assert (len(train), len(val)) == (train_rows, val_rows)  # spec §1.1 table
    # Duplicate rows are kept (spec §1.1): fold 0 has 13 (T1) / 13 (T2) duplicates.
    if fold == 0:
        assert len(train) - len({r.subject_id for r in train}) == 13
    test = read_ixi_split(splits, "test", fold, modality, "/data", check_files=False)
    assert len(test) == {"t1": 160, "t2": 158}[modality]


def test_real_ixi_t2_paths_rewritten():
    splits = _real_splits()
    rows = read_ixi_split(splits, "train", 0, "t2", "/data", check_files=False)
    first = rows[0]
    assert first == SplitRow(
        subject_id="IXI076-Guys-0753",
        image_path="/data/Train/ixi/t2/IXI076-Guys-0753_t2.nii.gz",
        mask_path="/data/Train/ixi/mask/IXI076-Guys-0753_mask.nii.gz",
        seg_path=None,
    )
    assert all("/t2/" in r.image_path and r.image_path.endswith("_t2.nii.gz") for r in rows)
    t1 = read_ixi_split(splits, "train", 0, "t1", "/data", check_files=False)
    assert t1[0].image_path == "/data/Train/ixi/t1/IXI076-Guys-0753_t1.nii.gz"


def test_real_test_sets():
    splits = _real_splits()
    brats = read_test_split(splits, "Brats21", "t2", "/data", check_files=False)
    assert len(brats) == 1251
    assert brats[0] == SplitRow(
        subject_id="BraTS2021_00538",
        image_path="/data/Test/Brats21/t2/BraTS2021_00538_t2.nii.gz",
        mask_path="/data/Test/Brats21/mask/BraTS2021_00538_mask.nii.gz",
        seg_path="/data/Test/Brats21/seg/BraTS2021_00538_seg.nii.gz",
    )
    mslub = read_test_split(splits, "MSLUB", "t2", "/data", check_files=False)
    assert len(mslub) == 30
    assert mslub[0].subject_id == "patient26"
    assert mslub[0].image_path == "/data/Test/MSLUB/t2/patient26_t2.nii.gz"
    atlas = read_test_split(splits, "ATLAS_v2", "t1", "/data", check_files=False)
    assert len(atlas) == 655
    assert atlas[0].image_path.endswith("/t1/sub-r009s085_ses-1_space-MNI152NLin2009aSym_t1.nii.gz")
    wmh = read_test_split(splits, "WMH", "t1", "/data", check_files=False)
    assert len(wmh) == 60 and wmh[0].subject_id == "Singapore_64"


def test_real_split_missing_files_are_listed(tmp_path):
    splits = _real_splits()
    # 374 distinct subjects x (image, mask), each missing file counted once.
    with pytest.raises(DataError, match=r"(?s)748 file\(s\).*first 5") as info:
        read_ixi_split(splits, "train", 0, "t1", tmp_path)
    message = str(info.value)
    assert message.startswith(str(splits / "IXI_train_fold0.csv"))
    assert message.count(str(tmp_path)) == 6  # the root and the first five missing paths


def _write_layout(root: Path, splits: Path) -> None:
    """A tiny reference layout: 3 IXI subjects (one without T2), one 'Synth' test subject."""
    splits.mkdir()
    lines = [_ixi_line(i, s) for i, s in enumerate(["IXI001-A-1", "IXI002-B-2", "IXI003-C-3"])]
    (splits / "IXI_train_fold0.csv").write_text(IXI_HEADER + "".join(lines) + lines[0])
    (splits / "avail_t2.csv").write_text(",0\n0,IXI001-A-1_t2.nii.gz\n1,IXI003-C-3_t2.nii.gz\n")
    (splits / "Synth_test.csv").write_text(
        ",img_name,label,img_path,mask_path,seg_path\n"
        "0,case7_t1.nii.gz,1,/Test/Synth/t1/case7_t1.nii.gz,/Test/Synth/mask/case7_mask.nii.gz,"
        "/Test/Synth/seg/case7_seg.nii.gz\n"
    )
    for modality in ("t1", "t2"):
        for subject in ("IXI001-A-1", "IXI002-B-2", "IXI003-C-3"):
            path = root / "Train" / "ixi" / modality / f"{subject}_{modality}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        path = root / "Test" / "Synth" / modality / f"case7_{modality}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    for folder, name in [
        ("Train/ixi/mask", "IXI001-A-1_mask.nii.gz"),
        ("Train/ixi/mask", "IXI002-B-2_mask.nii.gz"),
        ("Train/ixi/mask", "IXI003-C-3_mask.nii.gz"),
        ("Train/ixi/mask_t2", "IXI003-C-3_mask.nii.gz"),
        ("Test/Synth/mask", "case7_mask.nii.gz"),
        ("Test/Synth/seg", "case7_seg.nii.gz"),
    ]:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).touch()


def test_t2_filter_duplicates_and_per_modality_masks(tmp_path):
    root, splits = tmp_path / "data", tmp_path / "splits"
    _write_layout(root, splits)
    t1 = read_ixi_split(splits, "train", 0, "t1", root)
    assert [r.subject_id for r in t1] == ["IXI001-A-1", "IXI002-B-2", "IXI003-C-3", "IXI001-A-1"]
    assert all(r.mask_path.startswith(str(root / "Train/ixi/mask/")) for r in t1)
    t2 = read_ixi_split(splits, "train", 0, "t2", root)
    # IXI002 has no T2; the duplicate row of IXI001 is kept; IXI003 uses its own T2 mask.
    assert [r.subject_id for r in t2] == ["IXI001-A-1", "IXI003-C-3", "IXI001-A-1"]
    assert t2[0].image_path == str(root / "Train/ixi/t2/IXI001-A-1_t2.nii.gz")
    assert t2[0].mask_path == str(root / "Train/ixi/mask/IXI001-A-1_mask.nii.gz")
    assert t2[1].mask_path == str(root / "Train/ixi/mask_t2/IXI003-C-3_mask.nii.gz")
    synth = read_test_split(splits, "Synth", "t2", root)
    assert synth == [
        SplitRow(
            subject_id="case7",
            image_path=str(root / "Test/Synth/t2/case7_t2.nii.gz"),
            mask_path=str(root / "Test/Synth/mask/case7_mask.nii.gz"),
            seg_path=str(root / "Test/Synth/seg/case7_seg.nii.gz"),
        )
    ]


def test_relative_data_root_becomes_absolute(tmp_path, monkeypatch):
    root, splits = tmp_path / "data", tmp_path / "splits"
    _write_layout(root, splits)
    monkeypatch.chdir(tmp_path)
    rows = read_ixi_split(splits, "train", 0, "t1", "data")
    assert rows[0].image_path == str(root / "Train/ixi/t1/IXI001-A-1_t1.nii.gz")


def test_missing_files_and_folders(tmp_path):
    root, splits = tmp_path / "data", tmp_path / "splits"
    _write_layout(root, splits)
    (root / "Test/Synth/seg/case7_seg.nii.gz").unlink()
    with pytest.raises(DataError, match=r"1 file\(s\)") as info:
        read_test_split(splits, "Synth", "t1", root)
    assert "case7_seg.nii.gz" in str(info.value)
    with pytest.raises(DataError, match="split file not found.*reference repository") as info:
        read_ixi_split(splits, "val", 0, "t1", root)
    assert info.value.path == str(splits / "IXI_val_fold0.csv")
    with pytest.raises(DataError, match="splits folder not found"):
        read_ixi_split(tmp_path / "nowhere", "train", 0, "t1", root)
    with pytest.raises(DataError, match="Brats21_test.csv"):
        read_test_split(splits, "Brats21", "t2", root)
    (splits / "avail_t2.csv").unlink()
    with pytest.raises(DataError, match="avail_t2.csv"):
        read_ixi_split(splits, "train", 0, "t2", root)


def test_bad_csv_content_and_arguments(tmp_path):
    root, splits = tmp_path / "data", tmp_path / "splits"
    _write_layout(root, splits)
    (splits / "IXI_val_fold0.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"missing column\(s\)"):
        read_ixi_split(splits, "val", 0, "t1", root)
    (splits / "IXI_test.csv").write_text(IXI_HEADER)
    with pytest.raises(DataError, match="no rows"):
        read_ixi_split(splits, "test", 0, "t1", root)
    with pytest.raises(ConfigError, match="modality"):
        read_ixi_split(splits, "train", 0, "flair", root)
    with pytest.raises(ConfigError, match="part"):
        read_ixi_split(splits, "holdout", 0, "t1", root)


def test_modality_seg_folder_is_preferred(tmp_path):
    """data_prep writes seg_<modality>/ beside seg/ (T1 and T2 are registered separately)."""
    from p2l import splits

    root, sp = tmp_path / "root", tmp_path / "splits"
    for rel in ("Test/X/t2/a_t2.nii.gz", "Test/X/mask/a_mask.nii.gz", "Test/X/seg/a_seg.nii.gz",
                "Test/X/seg_t2/a_seg.nii.gz"):  # fmt: skip
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    sp.mkdir()
    (sp / "X_test.csv").write_text(
        ",img_name,label,img_path,mask_path,seg_path\n"
        "0,a,1,/Test/X/t1/a_t1.nii.gz,/Test/X/mask/a_mask.nii.gz,/Test/X/seg/a_seg.nii.gz\n"
    )
    (row,) = splits.read_test_split(sp, "X", "t2", root)
    assert row.seg_path.endswith("seg_t2/a_seg.nii.gz")
    assert row.image_path.endswith("t2/a_t2.nii.gz")
