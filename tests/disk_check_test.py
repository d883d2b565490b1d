"""p2l.disk_check: one line for a folder that cannot be written or lacks room, before long work."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from p2l import disk_check
from p2l.disk_check import check_writable, format_bytes
from p2l.errors import DataError


def test_creates_the_folder_and_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "runs" / "a"
    check_writable(folder, 1000, "training")
    assert folder.is_dir() and not list(folder.iterdir())


def test_a_file_in_the_way_is_one_line(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    for folder in (tmp_path / "runs", tmp_path / "runs" / "demo"):
        with pytest.raises(DataError) as info:
            check_writable(folder, 0, "training")
        assert (
            str(info.value)
            == f"{folder}: not a folder (a file is in the way) — training cannot write here"
        )


@pytest.mark.parametrize(
    "code, reason",
    [
        (errno.EROFS, "read-only"),
        (errno.EACCES, "not writable (permission denied)"),
        (errno.ENOSPC, "disk full"),
    ],
)
def test_probe_failure_names_the_reason(tmp_path, monkeypatch, code, reason):
    # Tests run as root, which chmod cannot stop: the probe's write fails instead.
    def refuse(fd, data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(disk_check.os, "write", refuse)
    with pytest.raises(DataError) as info:
        check_writable(tmp_path, 0, "evaluation")
    assert str(info.value) == f"{tmp_path}: {reason} — evaluation cannot write here"
    assert not list(tmp_path.iterdir())  # the probe file was removed


def test_too_little_free_space(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)._replace(free=1_200_000_000)
    monkeypatch.setattr(disk_check.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(DataError) as info:
        check_writable(tmp_path, 7_000_000_000, "the build")
    assert str(info.value) == f"{tmp_path}: 1.2 GB free, the build needs about 7.0 GB"
    check_writable(tmp_path, 1_000_000_000, "the build")
    check_writable(tmp_path, 0, "the build")  # 0: no estimate, no space check


def test_format_bytes():
    assert [format_bytes(n) for n in (512, 1_500, 2_000_000, 7.25e9, 3e12)] == [
        "512 bytes",
        "1.5 kB",
        "2.0 MB",
        "7.2 GB",
        "3000.0 GB",
    ]
