"""make scale-check's data and config (the whole check is minutes; it is run by hand, README)."""

from benchmarks import scale_check
from p2l import builds, splits


def test_written_dataset_is_a_reference_layout_with_two_folds_and_a_val_list(tmp_path):
    scale_check.write_dataset(tmp_path, n_test=3, shape=(20, 18, 10), n_ixi=6, n_val=2)
    values = scale_check.overrides(tmp_path, (16, 16, 8), stride=4)
    config = scale_check._config(values)
    assert tuple(config.test_sets) == ("Scale",) and tuple(config.data.image_shape) == (16, 16, 8)
    data = builds.from_config(config)
    assert data.has("scale_val") and len(data.subject_ids("scale")) == 3
    assert len(data.subject_ids("train")) == 4 and len(data.subject_ids("val")) == 2
    # Fold 1 selects other rows of the same IXI scans: one IXI build serves both folds.
    fold1 = builds.from_config(scale_check._config({**values, "fold": 1}))
    assert fold1.subject_ids("val") != data.subject_ids("val")
    rows = splits.dataset_rows(tmp_path / "splits", splits.IXI, "t2", tmp_path / "data", True)
    assert len(rows) == 6
    flags = scale_check._flags({**values, "eval.max_volumes": 3})
    assert "--config.test_sets=('Scale',)" in flags and "--config.eval.max_volumes=3" in flags
