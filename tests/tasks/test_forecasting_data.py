"""Forecasting data: the Time-Series-Library layout and protocol, bundled series, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_tslib_csv

from seqapps.errors import InputError
from seqapps.tasks.sampling import EpochSeededSampler
from seqapps.tasks.forecasting.data import (
    ForecastDataModule,
    generate_ar,
    min_rows,
    read_tslib_csv,
    split_borders,
    weather_frame,
)


def test_split_borders_follow_the_time_series_library():
    # 70/10/20, validation and test start seq_len earlier (Dataset_Custom)
    starts, ends = split_borders(1000, seq_len=96)
    assert starts == [0, 700 - 96, 1000 - 200 - 96] and ends == [700, 800, 1000]
    # ETT hourly: 12/4/4 months of 30 days
    starts, ends = split_borders(17420, seq_len=96, file_name="data/ETTh1.csv")
    assert ends == [8640, 11520, 14400] and starts == [0, 8640 - 96, 11520 - 96]
    starts, ends = split_borders(69680, seq_len=96, file_name="ETTm2.csv")
    assert ends == [34560, 46080, 57600]
    # a long series keeps the standard borders whatever the horizon
    assert split_borders(8760, 96, pred_len=720) == split_borders(8760, 96)


def test_short_csv_just_works_with_one_validation_and_one_test_window(tmp_path):
    # 300 rows at 96 -> 48: 10 % (30 rows) cannot hold a validation target; it gets 48 rows
    path = write_tslib_csv(tmp_path / "short.csv", n=300)
    dm = ForecastDataModule(path=str(path), seq_len=96, pred_len=48, features="M")
    dm.load()
    starts, ends = split_borders(300, 96, pred_len=48)
    assert ends == [192, 240, 300] and starts == [0, 192 - 96, 240 - 96]
    assert [len(dm.windows(s)) for s in ("train", "val", "test")] == [192 - 144 + 1, 1, 60 - 48 + 1]
    # validation and test targets start after the training rows: no target is seen in training
    assert ends[0] <= starts[1] + 96 and ends[1] <= starts[2] + 96
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (1, 96, 3) and y.shape == (1, 48, 3)
    # the fewest rows that work, and a short ETT file falls back to the 70/10/20 rule
    n = min_rows(96, 48)
    ForecastDataModule(path=str(write_tslib_csv(tmp_path / "least.csv", n=n)), seq_len=96, pred_len=48).load()
    dm = ForecastDataModule(path=str(write_tslib_csv(tmp_path / "ETTh1.csv", n=1000)), seq_len=96,
                            pred_len=96, features="M")
    dm.load()
    assert len(dm.windows("test")) == 200 - 96 + 1


@pytest.mark.parametrize("features, n_in, n_out", [("S", 1, 1), ("M", 3, 3), ("MS", 3, 1)])
def test_windows_shapes_and_scaler_fit_on_train_only(tmp_path, features, n_in, n_out):
    path = write_tslib_csv(tmp_path / "x.csv", n=300)
    dm = ForecastDataModule(path=str(path), seq_len=24, pred_len=12, features=features, batch_size=16)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 24, n_in) and y.shape == (16, 12, n_out)
    train = pd.read_csv(path).iloc[:210]
    cols = ["OT"] if features == "S" else ["a", "b", "OT"]
    np.testing.assert_allclose(dm.mean, train[cols].mean().to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(dm.std, train[cols].std(ddof=0).to_numpy(), rtol=1e-9)
    # the target comes last and y continues x in time
    xs, ys = dm.split_arrays("test")
    assert np.allclose(xs[1, -1, -1], dm.splits["test"][24, -1])
    assert np.allclose(ys[0, 0, -1], dm.splits["test"][24, -1])
    # the test loader keeps the last, partial batch
    n_test = sum(len(b[0]) for b in dm.test_dataloader())
    assert n_test == len(dm.splits["test"]) - 24 - 12 + 1


def test_epoch_seeded_sampler_repeats_per_epoch():
    a, b = EpochSeededSampler(50, seed=3), EpochSeededSampler(50, seed=3)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    b.set_epoch(5)
    assert list(a) != list(b)


def test_ar_generator_known_coefficients_are_recovered_by_least_squares():
    y, w = generate_ar(order=5, n_samples=20000, seed=1)
    assert np.isclose(np.abs(w).sum(), 0.9) and len(y) == 20000
    lags = np.stack([y[5 - i - 1:len(y) - i - 1] for i in range(5)], axis=1)
    est = np.linalg.lstsq(lags, y[5:], rcond=None)[0]
    np.testing.assert_allclose(est, w, atol=0.03)
    assert abs(y.std() - 1.0) < 0.5  # noise std 1, a stationary process


def test_weather_frame_is_real_hourly_data():
    frame = weather_frame()
    assert len(frame) == 8760 and frame.columns[0] == "date" and frame.columns[-1] == "temp_air"
    assert frame.shape[1] == 22 and not frame.isna().any().any()
    assert pd.infer_freq(frame["date"].iloc[:50]) == "h"
    # Greensboro, NC: cold in January, warm in July
    temp = frame.set_index("date")["temp_air"]
    assert temp["2001-01"].mean() < 10 < 20 < temp["2001-07"].mean()


def _error(tmp_path, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        ForecastDataModule(**kwargs).load()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_input_gives_one_clear_line(tmp_path):
    good = write_tslib_csv(tmp_path / "good.csv", n=200)
    assert "no file at" in _error(tmp_path, path=str(tmp_path / "missing.csv"))
    assert "'nope' is not in" in _error(tmp_path, path=str(good), target="nope")
    frame = pd.read_csv(good)
    frame.loc[17, "OT"] = np.nan
    frame.to_csv(tmp_path / "nan.csv", index=False)
    msg = _error(tmp_path, path=str(tmp_path / "nan.csv"), seq_len=8, pred_len=4)
    assert "1 missing values" in msg and "row 17" in msg
    # shorter than seq_len + pred_len, and long enough for one window but not for the splits
    msg = _error(tmp_path, path=str(good), seq_len=150, pred_len=96)
    assert "has 200 rows, too short" in msg and f"need {150 + 3 * 96}" in msg
    assert "too short" in _error(tmp_path, path=str(good), seq_len=96, pred_len=40)
    frame = pd.read_csv(good)
    frame["date"] = "not a date"
    frame.to_csv(tmp_path / "baddate.csv", index=False)
    assert "does not parse" in _error(tmp_path, path=str(tmp_path / "baddate.csv"))
    frame = pd.read_csv(good)
    frame.loc[5, "date"] = np.nan
    frame.to_csv(tmp_path / "nodate.csv", index=False)
    msg = _error(tmp_path, path=str(tmp_path / "nodate.csv"))
    assert "1 empty or unparseable timestamps" in msg and "row 5" in msg
    frame = pd.read_csv(good)
    frame["OT"] = 1.0
    frame.to_csv(tmp_path / "const.csv", index=False)
    msg = _error(tmp_path, path=str(tmp_path / "const.csv"), seq_len=8, pred_len=4)
    assert "column 'OT' is constant" in msg and "zero std" in msg
    assert "not a mode" in _error(tmp_path, path=str(good), features="X")
    assert "not a bundled dataset" in _error(tmp_path, dataset="nope")


def test_an_unreadable_csv_is_refused_in_one_line_by_every_reader(tmp_path):
    """One reader serves data.path, the anomaly folder's files and `predict`'s input: the option,
    the file, why pandas cannot read it, and what each caller expects."""
    from seqapps.tasks.forecasting.anomaly_data import read_anomaly_folder
    from seqapps.tasks.forecasting.predict import score_csv

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "train.csv").write_bytes(b"\xff\xfe\x00")
    for read, start, expected in [
            (lambda: read_tslib_csv(empty), f"data.path: '{empty}' is not a readable CSV", "Time-Series-Library layout"),
            (lambda: read_anomaly_folder(tmp_path / "set"), "data.path: '" + str(tmp_path / "set" / "train.csv")
             + "' is not a readable CSV", "anomaly layout: train.csv"),
            (lambda: score_csv(None, {}, str(empty)), f"input: '{empty}' is not a readable CSV", "index column")]:
        with pytest.raises(InputError) as err:
            read()
        assert str(err.value).startswith(start) and expected in str(err.value) and "\n" not in str(err.value)
