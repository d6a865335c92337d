"""Forecasting data: the Time-Series-Library CSV layout, bundled real series, AR(p) generator.

The on-disk format is the one of the Time-Series-Library (ETT, Weather, ECL, Traffic, ...):
a ``date`` column, then the features, the target last. Splits follow that library:

* ``ETTh*`` files: 12/4/4 months of hours; ``ETTm*``: the same in 15-minute steps
  (standard borders, rows ``[0, 8640)``, ``[8640, 11520)``, ``[11520, 14400)`` for ETTh1/2);
* every other file (Weather, ECL, Traffic, ...): 70 % train, 10 % validation, 20 % test;
* validation and test start ``seq_len`` rows earlier, so that their first window has a full
  history (their targets never overlap the training rows).

Short files just work: when 10 % or 20 % of the rows is less than ``pred_len``, validation and
test get ``pred_len`` rows of targets each (one window) and training keeps the rest; an ``ETT*``
file shorter than its 20 months falls back to the 70/10/20 rule. The least a file needs is
``seq_len + 3·pred_len`` rows (one training window, and ``pred_len`` more for each of validation
and test); a shorter one is refused with one line that says so.

The Time-Series-Library protocol of the long-term forecasting tables is ``seq_len=96``,
``pred_len`` in {96, 192, 336, 720}, ``features=M``, MSE/MAE on the scaled data, the test
loader keeping its last, partial batch.

A ``StandardScaler`` is fitted on the training rows only. ``features`` is ``M`` (all variables
in, all out), ``S`` (the target alone) or ``MS`` (all in, the target out).

Bundled series (``data.dataset=...``, used when ``data.path`` is not given), no download:

* ``weather``: the hourly TMY3 weather year of Greensboro, NC, shipped inside ``pvlib``
  (8760 rows, 21 weather variables; target ``temp_air``, dry-bulb temperature in °C);
* ``weather_ak``: the same for Sand Point, Alaska (a second site, for transfer);
* ``ar``: an AR(p) process with known coefficients (noise std 1, Σ|w| ≤ 1), as in the AR-Net
  paper; ``true_coefficients`` holds them (lag 1 first).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from seqapps.errors import InputError
from seqapps.tasks.sampling import EpochSeededSampler, expect_loader_options

FEATURE_MODES = ("M", "S", "MS")
BUILTIN_DATASETS = ("weather", "weather_ak", "ar")

# Physical variables of a TMY3 file (pvlib's names after map_variables=True); the quality
# flags ("... source", "... uncert") and constant columns are left out.
_TMY3_VARIABLES = [
    "ghi_extra", "dni_extra", "ghi", "dni", "dhi", "GH illum (lx)", "DN illum (lx)",
    "DH illum (lx)", "Zenith lum (cd/m^2)", "TotCld (tenths)", "OpqCld (tenths)", "temp_dew",
    "relative_humidity", "pressure", "wind_direction", "wind_speed", "Hvis (m)",
    "CeilHgt (m)", "precipitable_water", "Lprecip depth (mm)", "temp_air",
]
_TMY3_FILES = {"weather": "723170TYA.CSV", "weather_ak": "703165TY.csv"}


# --------------------------------------------------------------------------- sources
def generate_ar(order: int = 3, n_samples: int = 10000, noise_std: float = 1.0,
                abs_sum: float = 0.9, seed: int = 0,
                coefficients: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An AR(p) series ``y_t = Σ_i w_i y_{t-i} + e_t``, ``e_t ~ N(0, noise_std²)``.

    Coefficients are drawn uniformly in [-1, 1] and rescaled so that ``Σ|w| = abs_sum ≤ 1``,
    which keeps the process stationary. Returns ``(series [n_samples], w [order])``, lag 1 first.
    """
    rng = np.random.default_rng(seed)
    if coefficients is None:
        if not 0 < abs_sum <= 1:
            raise InputError(f"ar.abs_sum={abs_sum}: must be in (0, 1] for a stationary AR process")
        w = rng.uniform(-1.0, 1.0, size=order)
        w = w * (abs_sum / np.abs(w).sum())
    else:
        w = np.asarray(coefficients, dtype=np.float64)
    p = len(w)
    burn_in = 10 * p + 100
    noise = rng.normal(0.0, noise_std, size=n_samples + burn_in)
    y = np.zeros(n_samples + burn_in)
    for t in range(p, len(y)):
        y[t] = w @ y[t - p:t][::-1] + noise[t]
    return y[burn_in:], w


def ar_frame(order: int = 3, n_samples: int = 10000, noise_std: float = 1.0, abs_sum: float = 0.9,
             seed: int = 0, coefficients: Sequence[float] | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """:func:`generate_ar` as a Time-Series-Library frame (``date``, ``y``) and its coefficients."""
    y, w = generate_ar(order, n_samples, noise_std, abs_sum, seed, coefficients)
    dates = pd.date_range("2000-01-01", periods=len(y), freq="h")
    return pd.DataFrame({"date": dates, "y": y}), w


def weather_frame(site: str = "weather") -> pd.DataFrame:
    """The TMY3 hourly weather year bundled with pvlib, in the Time-Series-Library layout."""
    import pvlib  # a dependency; imported here so that other sources do not pay for it

    path = Path(pvlib.__file__).parent / "data" / _TMY3_FILES[site]
    data, _ = pvlib.iotools.read_tmy3(str(path), coerce_year=2001, map_variables=True)
    frame = data[_TMY3_VARIABLES].astype("float64").reset_index(drop=True)
    # A typical meteorological year stitches months of different years; coerce_year puts them
    # on one calendar. Keep local wall-clock time, hourly, starting 01:00 of Jan 1st.
    dates = pd.date_range("2001-01-01 01:00", periods=len(frame), freq="h")
    frame.insert(0, "date", dates)
    return frame


def builtin_frame(name: str, ar: dict | None = None) -> tuple[pd.DataFrame, np.ndarray | None]:
    """A bundled dataset by name: ``(frame, true AR coefficients or None)``."""
    if name in _TMY3_FILES:
        return weather_frame(name), None
    if name == "ar":
        return ar_frame(**(ar or {}))
    raise InputError(f"data.dataset='{name}' is not a bundled dataset; choose one of "
                     f"{', '.join(BUILTIN_DATASETS)} or give data.path=<your.csv>")


def read_csv_checked(path: str | os.PathLike, key: str, expected: str, absent: str | None = None) -> pd.DataFrame:
    """The CSV at ``path`` as pandas reads it, or one line that names ``key`` (the option that
    gave the file), the file, what is wrong (no file there, or not a CSV pandas can read) and then
    ``expected`` (what would be right, e.g. "give a CSV with ..."). ``absent`` words the missing
    file otherwise than "no file at '<path>'"."""
    path = Path(path)
    if not path.is_file():
        absent = absent or f"no file at '{path}'"
        raise InputError(f"{key}: {absent}; {expected}")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{key}: '{path}' is not a readable CSV ({str(err).splitlines()[0]}); {expected}") from None


def read_tslib_csv(path: str | os.PathLike, key: str = "data.path") -> pd.DataFrame:
    """Read a CSV in the Time-Series-Library layout and check it: a parseable ``date`` column
    and numeric variables without missing values. ``key``: the option that named the file, for
    the error messages."""
    frame = read_csv_checked(path, key, "give a CSV in the Time-Series-Library layout (a 'date' column, "
                                        "then the features, the target last)")
    if "date" not in frame.columns:
        raise InputError(f"{key}: '{path}' has no 'date' column (columns: "
                         f"{_names(frame.columns)}); the Time-Series-Library layout starts with one")
    hint = "write them as e.g. 2016-07-01 00:00:00"
    try:
        frame["date"] = pd.to_datetime(frame["date"])
    except (ValueError, TypeError, OverflowError) as err:
        raise InputError(f"{key}: the 'date' column of '{path}' does not parse as timestamps "
                         f"({str(err).splitlines()[0]}); {hint}") from None
    missing = frame["date"].isna()
    if missing.any():
        row = int(np.flatnonzero(missing.to_numpy())[0])
        raise InputError(f"{key}: the 'date' column of '{path}' has {int(missing.sum())} empty or "
                         f"unparseable timestamps (first at row {row}); {hint}")
    return frame


def check_frame(frame: pd.DataFrame, source: str, columns: Sequence[str]) -> None:
    """Every used column numeric and complete, else one line naming the first offence."""
    for col in columns:
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = values.isna() & frame[col].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{source}: column '{col}' holds a non-number ({frame[col].iloc[row]!r}) "
                             f"at row {row}; every variable must be numeric")
        missing = values.isna()
        if missing.any():
            row = int(np.flatnonzero(missing.to_numpy())[0])
            raise InputError(f"{source}: column '{col}' has {int(missing.sum())} missing values "
                             f"(first at row {row}); fill or drop them before training")
        frame[col] = values.astype("float64")


def _names(columns: Sequence[str], limit: int = 12) -> str:
    columns = list(columns)
    shown = ", ".join(map(str, columns[:limit]))
    return shown + (f", ... ({len(columns)} in all)" if len(columns) > limit else "")


def fit_scaler(train: np.ndarray, columns: Sequence[str], source: str,
               where: str = "over the training rows") -> tuple[np.ndarray, np.ndarray]:
    """The per-channel ``(mean, std)`` of the training rows ``train [N, C]`` (``columns``: their
    names), the scaling a model's inputs get; a channel with zero std cannot be scaled and is
    refused in one line naming ``source``, the column and ``where`` its rows are from."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    constant = np.flatnonzero(std == 0)
    if len(constant):
        raise InputError(f"{source}: column '{columns[constant[0]]}' is constant {where} (zero std), so it "
                         "cannot be scaled; drop it or give a longer series")
    return mean, std


# --------------------------------------------------------------------------- windows
def min_rows(seq_len: int, pred_len: int) -> int:
    """The fewest rows a series needs: one training window, ``pred_len`` targets for validation
    and ``pred_len`` for test."""
    return seq_len + 3 * pred_len


def split_borders(n_rows: int, seq_len: int, file_name: str = "",
                  pred_len: int = 0) -> tuple[list[int], list[int]]:
    """Start and end rows of train/val/test, as the Time-Series-Library sets them; with
    ``pred_len``, a short series still gets one validation and one test window (see the module
    docstring)."""
    name = Path(file_name).name
    if name.startswith(("ETTh", "ETTm")):
        per_month = 30 * 24 * (4 if name.startswith("ETTm") else 1)
        ends = [12 * per_month, 16 * per_month, 20 * per_month]
        if n_rows >= ends[-1]:
            starts = [0, ends[0] - seq_len, ends[1] - seq_len]
            return starts, ends
    n_train, n_test = int(n_rows * 0.7), int(n_rows * 0.2)
    n_val = n_rows - n_train - n_test
    if pred_len and min(n_val, n_test) < pred_len:  # short: one window each for val and test
        n_test = max(n_test, pred_len)
        n_val = max(n_rows - n_train - n_test, pred_len)
        n_train = n_rows - n_val - n_test
    starts = [0, n_train - seq_len, n_rows - n_test - seq_len]
    ends = [n_train, n_train + n_val, n_rows]
    return starts, ends


class WindowDataset(Dataset):
    """Sliding windows over a ``[N, C]`` array: ``x [seq_len, C_in]`` and ``y [pred_len, C_out]``."""

    def __init__(self, data: np.ndarray, seq_len: int, pred_len: int, target_channels: slice):
        self.data = torch.as_tensor(data, dtype=torch.float32)
        self.seq_len, self.pred_len = seq_len, pred_len
        self.target_channels = target_channels

    def __len__(self) -> int:
        return max(0, len(self.data) - self.seq_len - self.pred_len + 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.data[i:i + self.seq_len]
        y = self.data[i + self.seq_len:i + self.seq_len + self.pred_len, self.target_channels]
        return x, y


# --------------------------------------------------------------------------- datamodule
class ForecastDataModule(L.LightningDataModule):
    """Windows of ``seq_len`` in and ``pred_len`` out over a Time-Series-Library CSV or a
    bundled series; batches are ``x [B, seq_len, C_in]``, ``y [B, pred_len, C_out]``, scaled.

    Args:
        path: a CSV in the Time-Series-Library layout; when ``None``, ``dataset`` is used.
        dataset: a bundled series (``weather``, ``weather_ak``, ``ar``).
        seq_len, pred_len: lookback and horizon (rows).
        features: ``M``, ``S`` or ``MS``.
        target: the target column (default: the last column).
        ar: options of the AR generator (``order``, ``n_samples``, ``noise_std``, ``abs_sum``,
            ``seed``, ``coefficients``) for ``dataset=ar``.
    """

    def __init__(self, path: str | None = None, dataset: str = "weather", seq_len: int = 96,
                 pred_len: int = 24, features: str = "S", target: str | None = None,
                 batch_size: int = 32, num_workers: int = 0, scale: bool = True, seed: int = 0,
                 ar: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.path, self.dataset = path, dataset
        self.seq_len, self.pred_len = int(seq_len), int(pred_len)
        self.features, self.target = features, target
        self.batch_size, self.num_workers = batch_size, num_workers
        self.scale, self.seed, self.ar = scale, seed, dict(ar or {})
        self._prepared = False

    # -- loading and checking (runs before any run folder is written)
    def load(self) -> None:
        """Read, check, split and scale the data; raises :class:`InputError` on bad input."""
        if self._prepared:
            return
        expect_loader_options(self.batch_size, self.num_workers)
        if self.features not in FEATURE_MODES:
            raise InputError(f"data.features='{self.features}' is not a mode; use M (all variables), "
                             "S (the target alone) or MS (all in, the target out)")
        if self.seq_len < 1 or self.pred_len < 1:
            raise InputError(f"data.seq_len={self.seq_len}, data.pred_len={self.pred_len}: both must be ≥ 1")
        if self.path:
            frame, self.true_coefficients = read_tslib_csv(self.path), None
            source = str(self.path)
        else:
            frame, self.true_coefficients = builtin_frame(self.dataset, self.ar)
            source = f"dataset '{self.dataset}'"
        variables = [c for c in frame.columns if c != "date"]
        if not variables:
            raise InputError(f"{source}: no variable besides 'date'; add at least one numeric column")
        target = self.target if self.target is not None else variables[-1]
        if target not in variables:
            raise InputError(f"data.target: column '{target}' is not in {source}; its columns are: "
                             f"{_names(variables)}")
        columns = [target] if self.features == "S" else [c for c in variables if c != target] + [target]
        check_frame(frame, source, columns)

        need = self.seq_len + self.pred_len
        if len(frame) < min_rows(self.seq_len, self.pred_len):
            raise InputError(
                f"{source} has {len(frame)} rows, too short for data.seq_len={self.seq_len} and "
                f"data.pred_len={self.pred_len}: one training window ({need} rows) and pred_len more "
                f"each for validation and test need {min_rows(self.seq_len, self.pred_len)}; use a "
                "shorter seq_len/pred_len or a longer series")
        starts, ends = split_borders(len(frame), self.seq_len, str(self.path or ""), self.pred_len)
        for name, s, e in zip(("train", "val", "test"), starts, ends):
            if s < 0 or e - s < need:
                raise InputError(
                    f"data.seq_len + data.pred_len = {need} rows is longer than the {name} split "
                    f"({max(0, e - max(s, 0))} of the {len(frame)} rows of {source}); use a shorter "
                    "seq_len/pred_len or a longer series")

        values = frame[columns].to_numpy(dtype=np.float64)
        if self.scale:
            self.mean, self.std = fit_scaler(values[starts[0]:ends[0]], columns, source)
        else:
            self.mean, self.std = np.zeros(len(columns)), np.ones(len(columns))
        scaled = (values - self.mean) / self.std
        self.frame, self.columns, self.target_name, self.source = frame, columns, target, source
        self.splits = {n: scaled[s:e] for n, s, e in zip(("train", "val", "test"), starts, ends)}
        self.split_dates = {n: frame["date"].iloc[s:e].reset_index(drop=True)
                            for n, s, e in zip(("train", "val", "test"), starts, ends)}
        self.n_in = len(columns)
        self.n_out = 1 if self.features in ("S", "MS") else len(columns)
        self.target_channels = slice(len(columns) - self.n_out, len(columns))
        self._prepared = True

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def info(self) -> dict:
        """What a model needs to know of its data to be exported and served (plain types)."""
        self.load()
        freq = pd.infer_freq(self.frame["date"].iloc[:50]) if len(self.frame) >= 3 else None
        return {
            "source": self.source, "columns": list(self.columns), "target": self.target_name,
            "features": self.features, "seq_len": self.seq_len, "pred_len": self.pred_len,
            "n_in": self.n_in, "n_out": self.n_out, "freq": freq,
            "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std],
        }

    def windows(self, split: str) -> WindowDataset:
        self.load()
        return WindowDataset(self.splits[split], self.seq_len, self.pred_len, self.target_channels)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.windows(split)
        sampler = EpochSeededSampler(len(dataset), self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """All windows of a split as arrays ``(x [N, seq_len, C_in], y [N, pred_len, C_out])``."""
        ds = self.windows(split)
        idx = np.arange(len(ds))[:, None]
        data = ds.data.numpy()
        x = data[idx + np.arange(self.seq_len)]
        y = data[idx + self.seq_len + np.arange(self.pred_len)][..., self.target_channels]
        return x, y
