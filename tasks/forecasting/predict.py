"""Forecasting files with a trained model (plain torch; no Lightning)."""

from __future__ import annotations

import pandas as pd
import torch

from seqapps.errors import InputError
from seqapps.tasks.forecasting.data import check_frame, read_tslib_csv


@torch.no_grad()
def forecast_csv(model: torch.nn.Module, info: dict, path: str) -> pd.DataFrame:
    """Forecast the ``pred_len`` steps after the end of the CSV at ``path`` from its last
    ``seq_len`` rows. ``model`` maps raw ``[B, seq_len, C_in]`` to raw ``[B, pred_len, C_out]``.

    Returns a frame: ``date`` (continuing the CSV's frequency) and one column per output.
    """
    frame = read_tslib_csv(path)
    columns, seq_len = info["columns"], info["seq_len"]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"input: '{path}' lacks the column(s) {', '.join(missing)} the model was "
                         f"trained on (it needs {', '.join(columns)})")
    check_frame(frame, str(path), columns)
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
