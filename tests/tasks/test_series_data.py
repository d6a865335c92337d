"""The UEA/UCR .ts loader on the real files bundled with aeon, the classification data module
(official split, stratified validation, per-channel standardisation, padding), and bad input."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from seqapps.errors import InputError
from seqapps.tasks.classification.series_data import (
    SeriesDataModule,
    bundled_folder,
    pad_series,
    read_ts,
)

pytest.importorskip("aeon")

# name: (channels, train cases, test cases, classes, series length (longest))
BUNDLED = {
    "JapaneseVowels": (12, 270, 370, 9, 29),
    "BasicMotions": (6, 40, 40, 4, 100),
    "GunPoint": (1, 50, 150, 2, 150),
    "ItalyPowerDemand": (1, 67, 1029, 2, 24),
}


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_reads_the_bundled_files(name):
    channels, n_train, n_test, n_classes, length = BUNDLED[name]
    folder = bundled_folder(name)
    train, test = read_ts(folder / f"{name}_TRAIN.ts"), read_ts(folder / f"{name}_TEST.ts")
    assert (train.num_channels, len(train.series), len(test.series)) == (channels, n_train, n_test)
    assert len(train.class_names) == n_classes and set(train.labels) == set(train.class_names)
    assert max(train.lengths.max(), test.lengths.max()) == length
    assert all(np.isfinite(s).all() for s in train.series)


def test_japanese_vowels_unequal_lengths_and_balanced_training_classes():
    train = read_ts(bundled_folder("JapaneseVowels") / "JapaneseVowels_TRAIN.ts")
    assert train.lengths.min() == 7 and train.lengths.max() < 29  # the longest case is in the test file
    assert train.class_names == [str(i) for i in range(1, 10)]
    assert np.unique(train.labels, return_counts=True)[1].tolist() == [30] * 9  # 30 utterances per speaker


def test_edge_padding_holds_the_last_value():
    series = [np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), np.array([[7.0], [8.0]])]
    padded = pad_series(series, 3)
    assert padded.shape == (2, 3, 2)
    assert padded[1].tolist() == [[7.0, 8.0]] * 3
    assert pad_series(series, 3, "zero")[1, 1:].tolist() == [[0.0, 0.0]] * 2


@pytest.mark.parametrize("name", ["JapaneseVowels", "BasicMotions"])
def test_datamodule_split_stratified_and_standardised_on_train(name):
    channels, n_train, n_test, n_classes, length = BUNDLED[name]
    dm = SeriesDataModule(name, val_fraction=0.2, seed=3)
    info = dm.info()
    assert (info["num_variates"], info["num_classes"], info["seq_len"]) == (channels, n_classes, length)
    x, y = dm.splits["train"].tensors
    x_val, y_val = dm.splits["val"].tensors
    assert x.shape[1:] == (length, channels) and len(x) + len(x_val) == n_train
    assert len(dm.splits["test"]) == n_test
    # stratified: every class keeps its share of the training file in the validation split
    per_class_train = np.bincount(y.numpy(), minlength=n_classes)
    per_class_val = np.bincount(y_val.numpy(), minlength=n_classes)
    assert (per_class_val == per_class_val[0]).all() and (per_class_train == per_class_train[0]).all()
    if name == "BasicMotions":  # equal lengths: the fitted split is exactly standardised per channel
        flat = x.numpy().reshape(-1, channels)
        np.testing.assert_allclose(flat.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(flat.std(0), 1, atol=1e-4)
    # another seed, another validation split; the same seed, the same one
    other = SeriesDataModule(name, val_fraction=0.2, seed=4)
    other.load()
    again = SeriesDataModule(name, val_fraction=0.2, seed=3)
    again.load()
    assert not np.array_equal(other.splits["val"].tensors[0].numpy(), x_val.numpy())
    assert np.array_equal(again.splits["val"].tensors[0].numpy(), x_val.numpy())


def _write(folder, name, train_text, test_text=None):
    (folder / f"{name}_TRAIN.ts").write_text(train_text)
    (folder / f"{name}_TEST.ts").write_text(test_text if test_text is not None else train_text)
    return folder


GOOD = """# a comment
@problemName Toy
@univariate false
@dimensions 2
@equalLength false
@classLabel true a b
@data
1,2,3:4,5,6:a
1,?,3,4:4,5,6,7:b
2,3:1,2:a
5,6,7:1,1,1:b
"""


def test_a_folder_of_ts_files_with_missing_values(tmp_path):
    dm = SeriesDataModule(name=None, path=str(_write(tmp_path, "Toy", GOOD)), val_fraction=0.0)
    info = dm.info()
    assert (info["num_variates"], info["num_classes"], info["seq_len"]) == (2, 2, 4)
    x = dm.splits["test"].tensors[0]
    assert np.isfinite(x.numpy()).all()  # '?' became the channel mean (0 after standardisation)
    assert x[1, 1, 0] == 0.0


@pytest.mark.parametrize("text, message", [
    (GOOD.replace("1,2,3:4,5,6:a", "1,2,3:a"), "1 dimensions"),
    (GOOD.replace("1,2,3:4,5,6:a", "1,x,3:4,5,6:a"), "non-number 'x'"),
    (GOOD.replace("2,3:1,2:a", "2,3:1,2:c"), "not in @classLabel"),
    (GOOD.replace("@data\n", ""), "expected an @header"),
    (GOOD.replace("1,2,3:4,5,6:a", "1,2,3:4,5:a"), "different lengths"),
    ("@problemName Toy\n@classLabel true a\n", "no @data"),
    (GOOD.replace("@equalLength false", "@equalLength true\n@seriesLength 3"), "@equalLength true"),
    (GOOD.replace("@univariate false", "@timeStamps true"), "time-stamped"),
])
def test_malformed_ts_is_one_clear_line(tmp_path, text, message):
    _write(tmp_path, "Toy", text)
    with pytest.raises(InputError, match=message) as err:
        SeriesDataModule(name="Toy", path=str(tmp_path)).load()
    assert "\n" not in str(err.value) and "Toy_TRAIN.ts" in str(err.value)


def test_bad_names_and_folders(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="not a bundled set"):
        SeriesDataModule("Nope").load()
    with pytest.raises(InputError, match="no folder"):
        SeriesDataModule(path=str(tmp_path / "missing")).load()
    with pytest.raises(InputError, match="0 \\*_TRAIN.ts"):
        SeriesDataModule(name=None, path=str(tmp_path)).load()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "aeon" else real(name, *a))
    with pytest.raises(InputError, match=r"pip install seqapps\[series\]"):
        SeriesDataModule("GunPoint").load()
