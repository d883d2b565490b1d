"""Progress records: what a log line says about the steps since the previous one."""

from p2l import run_log


def test_window_sums_overflow_and_averages_the_rest():
    window = [
        {"loss": 2.0, "valid_patches": 100.0, "overflow": 0.0},
        {"loss": 4.0, "valid_patches": 300.0, "overflow": 3.0},
        {"loss": 3.0, "valid_patches": 200.0, "overflow": 0.0},
    ]
    s = run_log.window_scalars(window)
    assert s == {"loss": 3.0, "valid_patches": 200.0, "overflow": 3.0}
    line = run_log.progress_line(75, 100, s, 1.0, 200.0)
    assert "OVERFLOW: 3 accepted patches dropped" in line


def test_no_overflow_no_warning():
    s = run_log.window_scalars([{"loss": 1.0, "valid_patches": 10.0, "overflow": 0.0}] * 4)
    assert "OVERFLOW" not in run_log.progress_line(4, 8, s, 2.0, 20.0)


def test_validation_without_a_valid_patch_says_so_instead_of_nan():
    s = {"loss": 1.0, "valid_patches": 10.0, "val_loss": float("nan"), "val_valid_patches": 0.0}
    line = run_log.progress_line(4, 8, s, 2.0, 20.0)
    assert "val n/a (no valid patch in the drawn validation slices)" in line and "nan" not in line
    s.update(val_loss=2.5, val_valid_patches=12.0)
    assert "val 2.5000" in run_log.progress_line(4, 8, s, 2.0, 20.0)
