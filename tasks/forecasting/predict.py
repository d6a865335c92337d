"""Forecasting files, and scoring them for anomalies, with a trained model (plain torch)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from seqapps.errors import InputError
from seqapps.tasks.forecasting.data import check_frame, read_csv_checked, read_tslib_csv


def check_input_columns(frame: pd.DataFrame, path: str, columns: list[str]) -> None:
    """The columns the model was trained on are all in ``frame``, numeric and complete, else one line."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"input: '{path}' lacks the column(s) {', '.join(missing)} the model was "
                         f"trained on (it needs {', '.join(columns)})")
    check_frame(frame, str(path), columns)


@torch.no_grad()
def forecast_csv(model: torch.nn.Module, info: dict, path: str) -> pd.DataFrame:
    """Forecast the ``pred_len`` steps after the end of the CSV at ``path`` from its last
    ``seq_len`` rows. ``model`` maps raw ``[B, seq_len, C_in]`` to raw ``[B, pred_len, C_out]``.

    Returns a frame: ``date`` (continuing the CSV's frequency) and one column per output.
    """
    frame = read_tslib_csv(path, key="input")
    columns, seq_len = info["columns"], info["seq_len"]
    check_input_columns(frame, path, columns)
    if len(frame) < seq_len:
        raise InputError(f"input: '{path}' has {len(frame)} rows; the model needs the last "
                         f"{seq_len} (its seq_len) to forecast")
    history = torch.as_tensor(frame[columns].to_numpy()[-seq_len:], dtype=torch.float32)[None]
    forecast = model(history)[0].numpy()
    freq = info.get("freq") or pd.infer_freq(frame["date"].iloc[-min(len(frame), 50):])
    last = frame["date"].iloc[-1]
    dates = (pd.date_range(last, periods=len(forecast) + 1, freq=freq)[1:] if freq
             else pd.RangeIndex(1, len(forecast) + 1))
    out_columns = columns[len(columns) - info["n_out"]:]
    result = pd.DataFrame(forecast, columns=out_columns)
    result.insert(0, "date" if freq else "step", dates)
    return result


forecast_csv.output_suffix = ".forecast.csv"  # the default output file: input.forecast.csv


@torch.no_grad()
def score_csv(model: torch.nn.Module, info: dict, path: str, batch_size: int = 64) -> pd.DataFrame:
    """Anomaly scores for every row of the CSV at ``path``, in the layout of the anomaly task's
    ``test.csv`` (a timestamp or index column first, then the channels the model was trained on,
    by name). ``model`` maps raw windows ``[B, win_size, V]`` to scores ``[B, win_size]``.

    The rows are tiled by windows of ``win_size`` as in the task's test (the last one aligned to
    the end), so the scores are the ones ``seqapps train`` reported for the same rows. Returns a
    frame: the first column of the CSV, ``score``, and ``anomaly`` (0/1, the score above the
    threshold of the run's test) when the run was tested.
    """
    from seqapps.tasks.forecasting.anomaly_data import tile_scores

    frame = read_csv_checked(path, "input", "give a CSV with a timestamp or index column, then the channels")
    columns, win_size = info["columns"], info["win_size"]
    check_input_columns(frame, path, columns)
    if len(frame) < win_size:
        raise InputError(f"input: '{path}' has {len(frame)} rows; the model scores windows of "
                         f"{win_size} rows (its win_size), so it needs at least that many")
    scores = tile_scores(model, frame[columns].to_numpy(np.float32), win_size, batch_size)
    result = pd.DataFrame({frame.columns[0]: frame.iloc[:, 0], "score": scores})
    threshold = (info.get("test_metrics") or {}).get("test/model/threshold")
    if threshold is not None:
        result["anomaly"] = (scores > threshold).astype(int)
    return result


score_csv.output_suffix = ".scores.csv"
