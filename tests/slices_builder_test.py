"""Tests for p2l.slices_builder and p2l.builds: a tiny generated reference layout and the real
IXI002 T2."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from tensorflow_datasets.core.utils import gcs_utils

from p2l import build_inputs, disk_check, slices_builder
from p2l.builds import Builds
from p2l.errors import ConfigError, DataError
from p2l.normalization import load_subject
from p2l.slices_builder import SPLIT, Patch2LocSlices, read_volumes
from p2l.splits import read_ixi_split, read_test_split

SHARED = Path(__file__).resolve().parents[2] / "shared"
IXI002_T2 = (
    SHARED / "data/ixi_defacing_pipeline/data/example_input_hdbet_processed/IXI002-Guys-0828-T2"
)
TARGET = (32, 32, 12)
TRAIN = ["IXI011-A-1", "IXI012-B-2", "IXI013-C-3"]
VAL = ["IXI021-A-1", "IXI022-B-2"]
TEST = ["case1", "case2"]
HEADER = ",img_name,age,label,img_path,mask_path,seg_path\n"


def _block_network(mp: pytest.MonkeyPatch) -> None:
    """Make every attempt to open a network connection raise.

    tfds probes gs://tfds-data through TensorFlow's C++ GCS client (libcurl), which Python socket
    patches cannot see, so its GCS helpers are made to raise too.
    """

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket.socket, "connect_ex", refuse)
    mp.setattr(socket, "create_connection", refuse)
    mp.setattr(socket, "getaddrinfo", refuse)
    for name in ("exists", "download_gcs_folder", "download_gcs_dataset"):
        mp.setattr(gcs_utils, name, refuse)


def _phantom(shape, seed):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt((grid**2).sum(axis=0))
    mask = np.clip((0.8 - radius) / 0.1, 0, 1).astype(np.float32)
    image = np.clip((300 + 200 * grid[0] + 50 * rng.standard_normal(shape)) * (mask > 0), 0, None)
    return image.astype(np.float32), mask


def _save(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def _ixi_csv(path: Path, subjects: list[str]) -> None:
    lines = [
        f"{i},{s}_t1.nii.gz,40,0,/Train/ixi/t1/{s}_t1.nii.gz,/Train/ixi/mask/{s}_mask.nii.gz,\n"
        for i, s in enumerate(subjects)
    ]
    path.write_text(HEADER + "".join(lines))


def _write_reference_layout(root: Path, splits: Path) -> None:
    """IXI T2 scans (train/val/test) and a 'Synth' lesion test set, CSVs naming T1 paths."""
    splits.mkdir(parents=True)
    for seed, subject in enumerate(TRAIN + VAL):
        shape = (30, 34, 14) if seed % 2 else (34, 30, 11)  # crop and pad on every axis
        image, mask = _phantom(shape, seed)
        _save(root / f"Train/ixi/t2/{subject}_t2.nii.gz", image.astype(np.int16))
        _save(root / f"Train/ixi/mask/{subject}_mask.nii.gz", mask)
    _ixi_csv(splits / "IXI_train_fold0.csv", TRAIN)
    _ixi_csv(splits / "IXI_val_fold0.csv", VAL)
    _ixi_csv(splits / "IXI_test.csv", TRAIN[:1])
    (splits / "avail_t2.csv").write_text(
        ",0\n" + "".join(f"{i},{s}_t2.nii.gz\n" for i, s in enumerate(TRAIN + VAL))
    )
    lines = []
    for i, subject in enumerate(TEST):
        image, mask = _phantom((32, 30, 13), 10 + i)
        seg = np.zeros_like(mask)
        seg[12:18, 12:16, 4 + i : 8 + i] = 0.5
        _save(root / f"Test/Synth/t2/{subject}_t2.nii.gz", image)
        _save(root / f"Test/Synth/mask/{subject}_mask.nii.gz", mask)
        _save(root / f"Test/Synth/seg/{subject}_seg.nii.gz", seg)
        lines.append(
            f"{i},{subject}_t1.nii.gz,50,1,/Test/Synth/t1/{subject}_t1.nii.gz,"
            f"/Test/Synth/mask/{subject}_mask.nii.gz,/Test/Synth/seg/{subject}_seg.nii.gz\n"
        )
    (splits / "Synth_test.csv").write_text(HEADER + "".join(lines))


def open_builds(**kwargs) -> Builds:
    """The builds of a config, made (or reused) in this process."""
    return Builds(**kwargs).prepare()


def ixi(builds: Builds):
    return builds.builders["IXI"]


IXI_ROWS = 5  # the union of the fold's train (3) and val (2) rows and the test row (a train one)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    root, splits = base / "data", base / "splits"
    _write_reference_layout(root, splits)
    kwargs = dict(
        data_root=root,
        splits_dir=splits,
        modality="t2",
        fold=0,
        test_sets=("Synth",),
        target_shape=TARGET,
        expected_spacing=1.0,
        data_dir=base / "tfds",
    )
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        builds = open_builds(**kwargs)
    return SimpleNamespace(builds=builds, root=root, splits=splits, kwargs=kwargs)


def test_one_build_per_dataset_and_part_counts(tiny):
    builds = tiny.builds
    assert set(builds.builders) == {"IXI", "Synth"}
    depth = TARGET[2]
    assert ixi(builds).info.splits[SPLIT].num_examples == IXI_ROWS * depth
    assert builds.builders["Synth"].info.splits[SPLIT].num_examples == 2 * depth
    assert ixi(builds).builder_config.name.startswith("ixi_t2_")
    assert builds.builders["Synth"].builder_config.name.startswith("synth_t2_")
    assert ixi(builds).info.disable_shuffling
    assert builds.subject_ids("train") == TRAIN and builds.subject_ids("val") == VAL
    assert builds.subject_ids("ixi_test") == TRAIN[:1] and builds.subject_ids("synth") == TEST
    assert not builds.has("synth_val") and builds.has("synth")


def test_order_and_seg_presence(tiny):
    for builder, has_seg in [(ixi(tiny.builds), False), (tiny.builds.builders["Synth"], True)]:
        source = builder.as_data_source(split=SPLIT)
        examples = [source[i] for i in range(len(source))]
        ids = [e["subject_id"].decode() for e in examples]
        # Rows sorted by path, slices inner.
        assert ids == [r.subject_id for r in builder.rows for _ in range(TARGET[2])]
        assert [int(e["slice_index"]) for e in examples] == list(range(TARGET[2])) * len(
            builder.rows
        )
        assert {int(e["num_slices"]) for e in examples} == {TARGET[2]}
        assert {bool(e["has_seg"]) for e in examples} == {has_seg}
        first = examples[0]
        assert first["image"].shape == first["mask"].shape == first["seg"].shape == TARGET[:2]
        assert first["image"].dtype == np.float32 and first["seg"].dtype == np.uint8
        if not has_seg:
            assert all(not e["seg"].any() for e in examples)
        assert len(list(read_volumes(builder))) == len(builder.rows)


def test_part_volumes_equal_load_subject(tiny):
    cases = [
        ("train", read_ixi_split(tiny.splits, "train", 0, "t2", tiny.root)),
        ("val", read_ixi_split(tiny.splits, "val", 0, "t2", tiny.root)),
        ("synth", read_test_split(tiny.splits, "Synth", "t2", tiny.root)),
    ]
    for part, rows in cases:
        volumes = list(tiny.builds.volumes(part))
        assert [v.subject_id for v in volumes] == [r.subject_id for r in rows]
        for volume, row in zip(volumes, rows, strict=True):
            subject = load_subject(
                row.image_path,
                row.mask_path,
                row.seg_path,
                modality="t2",
                subject_id=row.subject_id,
                target_shape=TARGET,
            )
            assert volume.num_slices == TARGET[2]
            np.testing.assert_array_equal(volume.image, subject.image)
            np.testing.assert_array_equal(volume.mask, subject.mask)
            if subject.seg is None:
                assert volume.seg is None
            else:
                np.testing.assert_array_equal(volume.seg, subject.seg)
                assert volume.seg.sum() > 0
    # Chosen volumes, in the order asked.
    picked = list(tiny.builds.volumes("train", [2, 0]))
    assert [v.subject_id for v in picked] == [TRAIN[2], TRAIN[0]]


def _names(builds: Builds) -> dict:
    return {d: b.builder_config.name for d, b in builds.builders.items()}


def test_builds_are_shared_by_folds_and_configs_and_change_with_their_inputs(
    tiny, tmp_path, monkeypatch
):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the existing build should have been reused")

    monkeypatch.setattr(slices_builder, "load_subject", must_not_load)
    again = open_builds(**tiny.kwargs)
    assert _names(again) == _names(tiny.builds)
    names = _names(tiny.builds)

    copied = tmp_path / "splits"
    shutil.copytree(tiny.splits, copied)
    # Fold 1 of the same IXI scans and a config testing only Synth: the same builds, reused.
    _ixi_csv(copied / "IXI_train_fold1.csv", VAL + TRAIN[:1])
    _ixi_csv(copied / "IXI_val_fold1.csv", TRAIN[1:])
    fold1 = open_builds(**{**tiny.kwargs, "splits_dir": copied, "fold": 1})
    assert _names(fold1) == names
    assert fold1.subject_ids("train") == VAL + TRAIN[:1]
    assert [v.subject_id for v in fold1.volumes("val")] == TRAIN[1:]
    only_ixi = open_builds(**{**tiny.kwargs, "test_sets": ()})
    assert _names(only_ixi) == {"IXI": names["IXI"]}

    # Another set of scans, shape or root: other builds.
    _ixi_csv(copied / "IXI_val_fold0.csv", VAL[:1])
    _ixi_csv(copied / "IXI_train_fold1.csv", TRAIN)
    _ixi_csv(copied / "IXI_val_fold1.csv", VAL[:1])
    other_rows = Builds(**{**tiny.kwargs, "splits_dir": copied})
    assert Patch2LocSlices(**other_rows._kwargs["IXI"]).builder_config.name != names["IXI"]
    for key, value in [("target_shape", (32, 32, 10)), ("data_root", tmp_path / "root_copy")]:
        if key == "data_root":
            shutil.copytree(tiny.root, value)
        other = Builds(**{**tiny.kwargs, key: value})
        assert Patch2LocSlices(**other._kwargs["IXI"]).builder_config.name != names["IXI"]


def test_build_logs_one_line_per_volume(tiny, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="p2l.slices_builder"):
        open_builds(**{**tiny.kwargs, "test_sets": (), "data_dir": tmp_path / "t"})
    lines = [r.getMessage() for r in caplog.records if r.name == "p2l.slices_builder"]
    assert len(lines) == IXI_ROWS
    assert lines[0] == f"IXI: volume 1/{IXI_ROWS} {TRAIN[0]} ({TARGET[2]} slices)"


def test_parallel_workers_build_the_same_slices(tiny, tmp_path):
    kwargs = {**tiny.kwargs, "data_dir": tmp_path / "t", "workers": 2}
    parallel = open_builds(**kwargs)
    for part in ("train", "synth"):
        for a, b in zip(parallel.volumes(part), tiny.builds.volumes(part), strict=True):
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.mask, b.mask)


def test_a_concurrent_run_waits_for_the_build(tiny, tmp_path, capsys):
    import fcntl
    import threading

    kwargs = {**tiny.kwargs, "data_dir": tmp_path / "t", "test_sets": ()}
    name = Patch2LocSlices(**Builds(**kwargs)._kwargs["IXI"]).builder_config.name
    (tmp_path / "t").mkdir()
    fd = os.open(tmp_path / "t" / f"{name}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run is building
    threading.Timer(1.0, lambda: os.close(fd)).start()
    open_builds(**kwargs)
    assert f"waiting for another process to finish the slice build {name}" in (
        capsys.readouterr().out
    )


def test_missing_scan_fails_before_any_build(tiny, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny.root, root)
    (root / "Test/Synth/seg/case2_seg.nii.gz").unlink()
    kwargs = {**tiny.kwargs, "data_root": root, "data_dir": tmp_path / "tfds"}
    with pytest.raises(DataError, match=r"1 file\(s\) of the Synth build") as info:
        open_builds(**kwargs)
    assert "case2_seg.nii.gz" in str(info.value)
    assert not list((tmp_path / "tfds").rglob("synth*/**/*.array_record*"))


def test_bad_arguments(tiny, tmp_path):
    with pytest.raises(ConfigError, match="test_sets"):
        Builds(**{**tiny.kwargs, "test_sets": ("Synth", "synth")})
    with pytest.raises(ConfigError, match="test_sets"):
        Builds(**{**tiny.kwargs, "test_sets": "Synth"})
    with pytest.raises(ConfigError, match="invalid dataset name"):
        Patch2LocSlices(**{**Builds(**tiny.kwargs)._kwargs["Synth"], "dataset": "Synth-1"})
    with pytest.raises(ConfigError, match="modality"):
        Builds(**{**tiny.kwargs, "modality": "flair"})
    with pytest.raises(ConfigError, match="target_shape"):
        Builds(**{**tiny.kwargs, "target_shape": (32, 32)})
    absent_root = {**tiny.kwargs, "data_root": tmp_path / "absent", "data_dir": tmp_path / "t"}
    with pytest.raises(DataError):
        open_builds(**absent_root)
    with pytest.raises(DataError, match="Brats21_test.csv"):
        Builds(**{**tiny.kwargs, "test_sets": ("Brats21",)})


def test_real_ixi002_t2(tmp_path):
    image = IXI002_T2 / "hd_bet_IXI002-Guys-0828-T2.nii.gz"
    mask = IXI002_T2 / "hd_bet_mask_IXI002-Guys-0828-T2.nii.gz"
    if not (image.is_file() and mask.is_file()):
        pytest.skip(f"real IXI002 T2 scan not available under {IXI002_T2}")
    root, splits = tmp_path / "data", tmp_path / "splits"
    subject = "IXI002-Guys-0828"
    (root / "Train/ixi/t2").mkdir(parents=True)
    (root / "Train/ixi/mask").mkdir(parents=True)
    shutil.copy(image, root / f"Train/ixi/t2/{subject}_t2.nii.gz")
    shutil.copy(mask, root / f"Train/ixi/mask/{subject}_mask.nii.gz")
    splits.mkdir()
    for name in ("IXI_train_fold0.csv", "IXI_val_fold0.csv", "IXI_test.csv"):
        _ixi_csv(splits / name, [subject])
    (splits / "avail_t2.csv").write_text(f",0\n0,{subject}_t2.nii.gz\n")
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        # Native space (0.94 x 0.94 x 1.25 mm), not preprocessed: skip the spacing check.
        builds = open_builds(
            data_root=root,
            splits_dir=splits,
            modality="t2",
            fold=0,
            test_sets=(),
            target_shape=(192, 192, 100),
            expected_spacing=None,
            data_dir=tmp_path / "tfds",
        )
    assert {k: v.num_examples for k, v in ixi(builds).info.splits.items()} == {SPLIT: 100}
    (volume,) = list(builds.volumes("train"))
    assert volume.subject_id == subject and volume.seg is None
    assert volume.image.shape == volume.mask.shape == (192, 192, 100)
    assert volume.image.min() == 0 and volume.image.max() == 1
    inside = volume.mask > 0
    assert inside[:, :, 50].mean() > 0.1  # the brain is in the central crop
    far_outside = ~ndimage.binary_dilation(inside, iterations=3)
    assert np.all(volume.image[far_outside] == 0)
    assert np.median(volume.image[inside]) > 0.1


def _copied_layout(tiny, tmp_path, age_s=3600.0):
    """A private copy of the tiny layout whose files were last modified `age_s` ago."""
    root = tmp_path / "data"
    shutil.copytree(tiny.root, root)
    past = time.time() - age_s
    for path in root.rglob("*.nii.gz"):
        os.utime(path, (past, past))
    return root, {**tiny.kwargs, "data_root": root, "data_dir": tmp_path / "tfds"}


def test_volume_changed_after_a_build_is_noticed_and_rebuilt(tiny, tmp_path, caplog):
    root, kwargs = _copied_layout(tiny, tmp_path)
    first = ixi(open_builds(**kwargs))
    changed = root / f"Train/ixi/t2/{TRAIN[1]}_t2.nii.gz"
    image, _ = _phantom((30, 34, 14), 99)  # e.g. data re-prepared into the same folder
    _save(changed, image.astype(np.int16))
    with caplog.at_level(logging.WARNING, logger="p2l.slices_builder"):
        second = open_builds(**kwargs)
    (message,) = [r.getMessage() for r in caplog.records if r.name == "p2l.slices_builder"]
    assert "1 input file(s) changed" in message and str(changed) in message
    assert ixi(second).data_path == first.data_path
    rows = read_ixi_split(tiny.splits, "train", 0, "t2", root)
    rebuilt = list(second.volumes("train"))[1]
    row = rows[1]
    expected = load_subject(
        row.image_path,
        row.mask_path,
        None,
        modality="t2",
        subject_id=row.subject_id,
        target_shape=TARGET,
    )
    np.testing.assert_array_equal(rebuilt.image, expected.image)

    _save(changed, np.full((30, 34, 14), np.nan, np.float32))
    for _ in range(2):  # the stale build is gone: a second start must fail the same way
        with pytest.raises(DataError, match="non-finite") as info:
            open_builds(**kwargs)
        assert info.value.path == str(changed)
    assert not Path(ixi(second).data_path).exists()


def test_unchanged_second_open_stats_only_and_a_touch_is_hashed_once(tiny, tmp_path, monkeypatch):
    root, kwargs = _copied_layout(tiny, tmp_path)
    open_builds(**kwargs)
    hashed = []
    real_hash = build_inputs.sha256_file

    def counting_hash(path):
        hashed.append(path)
        return real_hash(path)

    def must_not_load(*args, **kwargs):
        raise AssertionError("the existing build should have been reused")

    monkeypatch.setattr(build_inputs, "sha256_file", counting_hash)
    monkeypatch.setattr(slices_builder, "load_subject", must_not_load)
    again = open_builds(**kwargs)
    assert ixi(again).info.splits[SPLIT].num_examples == IXI_ROWS * TARGET[2]
    assert hashed == []  # fast path: one stat per input, nothing read

    touched = root / f"Test/Synth/seg/{TEST[0]}_seg.nii.gz"
    past = time.time() - 60
    os.utime(touched, (past, past))  # same content, new mtime: hashed once, then remembered
    open_builds(**kwargs)
    assert hashed == [str(touched)]
    open_builds(**kwargs)
    assert hashed == [str(touched)]


def test_interrupted_or_unrecorded_build_is_never_used(tiny, tmp_path, monkeypatch, caplog):
    root, kwargs = _copied_layout(tiny, tmp_path)
    builder = ixi(open_builds(**kwargs))
    (Path(builder.data_path) / build_inputs.RECORD_NAME).unlink()  # killed before the record
    with caplog.at_level(logging.WARNING, logger="p2l.slices_builder"):
        open_builds(**kwargs)
    assert "no record of its input files" in caplog.text

    mask = _phantom((34, 30, 11), 0)[1]
    mask[:, :, 5] *= 0.5
    _save(root / f"Train/ixi/mask/{TRAIN[0]}_mask.nii.gz", mask)
    calls = []
    real_load = slices_builder.load_subject

    def killed_mid_build(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_load(*args, **kw)

    monkeypatch.setattr(slices_builder, "load_subject", killed_mid_build)
    with pytest.raises(KeyboardInterrupt):
        open_builds(**kwargs)
    monkeypatch.setattr(slices_builder, "load_subject", real_load)
    assert not Path(builder.data_path).exists()
    rebuilt = open_builds(**kwargs)
    assert rebuilt.builders["Synth"].info.splits[SPLIT].num_examples == 2 * TARGET[2]


def test_absent_inputs_keep_the_build_readable_with_a_warning(tiny, tmp_path, caplog):
    root, kwargs = _copied_layout(tiny, tmp_path)
    open_builds(**kwargs)
    shutil.rmtree(root / "Test")
    with caplog.at_level(logging.WARNING, logger="p2l.slices_builder"):
        again = open_builds(**kwargs)
    assert again.builders["Synth"].info.splits[SPLIT].num_examples == 2 * TARGET[2]
    assert "6 input file(s) of this build are absent" in caplog.text


def test_build_checks_free_space_first(tiny, tmp_path, monkeypatch):
    _, kwargs = _copied_layout(tiny, tmp_path)
    usage = shutil.disk_usage(tmp_path)._replace(free=1_000)
    monkeypatch.setattr(disk_check.shutil, "disk_usage", lambda path: usage)
    needed = IXI_ROWS * int(np.prod(TARGET)) * 4
    with pytest.raises(
        DataError, match=f"1.0 kB free, the slice build needs about {needed / 1e3:.1f} kB"
    ):
        open_builds(**kwargs)
    assert not list((tmp_path / "tfds").rglob("*.array_record*"))


def test_same_size_rewrite_within_the_clock_resolution_is_caught(tmp_path):
    path = tmp_path / "volume.nii.gz"
    path.write_bytes(b"a" * 100)
    build_inputs.write(tmp_path, build_inputs.fingerprint([str(path)]))
    before = path.stat()
    path.write_bytes(b"b" * 100)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # as a 1 s or 2 s clock would
    found = build_inputs.check(tmp_path, [str(path)])
    assert found.changed == [str(path)] and "1 input file(s) changed" in found.stale
    assert build_inputs.check(tmp_path, [str(path), str(tmp_path / "other")]).stale == (
        "it was made from another list of input files"
    )
    (tmp_path / build_inputs.RECORD_NAME).write_text("{")
    assert "unreadable" in build_inputs.check(tmp_path, [str(path)]).stale
