"""Anomaly-detection data in the Time-Series-Library layout, and a bundled sensor data set.

The on-disk layout is the one of the Time-Series-Library's anomaly sets (PSM, and the loaders of
SMD/MSL/SMAP/SWaT once converted to CSV): a folder with

* ``train.csv``: a first column with a timestamp or row index (its content is not used), then
  the sensor channels; the training rows are normal (no labels);
* ``test.csv``: the same columns, in the same order;
* ``test_label.csv``: a first timestamp/index column, then the label (1 anomalous, 0 normal),
  one row per row of ``test.csv``;
* optionally ``anomaly_kinds.csv`` (``start, end, kind, channel``: one row per injected segment,
  ``end`` exclusive), written by :func:`write_sensor_anomalies`, for the detection rate per kind.

As the Time-Series-Library does, a ``StandardScaler`` is fitted on ``train.csv`` only and applied
to both files; the last 20 % of the training rows are the validation windows (here they are held
out from training, where that library trains on all of ``train.csv``). Training windows are
``win_size`` rows (100 in that library's protocol) at stride ``step`` (1 there); validation and
scoring use non-overlapping windows, so every step gets one score (the last window is aligned to
the end of the series and only its new steps are used).

Bad input (a missing file, columns that differ between the files, a non-number or missing value,
a label count that is not the row count, labels other than 0/1, a constant training channel,
fewer rows than a window) is refused with one line before anything is written.

Bundled data (``dataset=pv_plant``, used when ``path`` is not given): :func:`sensor_frames`, the
hourly TMY3 weather year of Greensboro, NC shipped in ``pvlib`` as the weather a 100 kW PV plant's
sensors see (irradiance, air and dew-point temperature, humidity, wind, pressure) plus two
channels simulated from them with pvlib's SAPM module-temperature model and a PVWatts-style power
model, with sensor noise. The first 60 % of the year is ``train.csv``; labelled anomalies of three
kinds are injected into the rest (``test.csv``): ``spike`` (1-3 steps of one channel 5-8 training
standard deviations off), ``level_shift`` (8-24 steps of one channel offset by 2-3 standard
deviations) and ``cross_variate`` (12-30 steps of module temperature or power replaced by the
same hours of another day whose irradiance differs most: every channel keeps values it really
takes, only the relation between the channels breaks).

``dataset=daphnet``: :func:`daphnet_frames`, a real recording that ``aeon`` (< 1.7, ``pip install
"seqapps[series]"``) ships: Daphnet freezing-of-gait S06R02E0 (TimeEval's copy), 7040 rows at
64 Hz (110 s: about 20 s standing, then walking) of 3 acceleration sensors (ankle, upper leg,
trunk) x 3 axes, not downsampled. Split in time order: the first 60 % (4224 rows) is
``train.csv``, taken as normal (TimeEval's semi-supervised setting), the rest (2816 rows) the
test. The excerpt carries no labelled freezing episode (``is_anomaly`` is 0 in every row; aeon
1.6 deprecates it for that), so the test labels are segments injected into the real signal as
for ``pv_plant``: ``spike`` (1-3 rows), ``level_shift`` (16-48 rows, a sensor offset) and
``cross_variate`` (32-64 rows, 0.5-1 s, of one channel replaced by its own values 1-10 s away:
a real gait waveform, out of step with the other sensors).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from seqapps.errors import InputError
from seqapps.tasks.forecasting.data import _names, check_frame, fit_scaler, read_csv_checked, weather_frame
from seqapps.tasks.splits import SplitsDataModule

LAYOUT = "the Time-Series-Library anomaly layout: train.csv, test.csv, test_label.csv"
KINDS = ("spike", "level_shift", "cross_variate")

# The weather channels a plant's sensors measure (pvlib's TMY3 names) and the two simulated ones,
# each next to what drives it (Chimera's scan along the variates follows the column order).
_WEATHER = ["ghi", "temp_air", "temp_dew", "relative_humidity", "pressure", "wind_speed"]
SENSOR_CHANNELS = ["ghi", "power_kw", "temp_module", "temp_air", "temp_dew", "relative_humidity", "pressure",
                   "wind_speed"]


# --------------------------------------------------------------------------- generator
def sensor_frames(seed: int = 0, train_fraction: float = 0.6, counts: dict | None = None
                  ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The bundled PV-plant sensor set: ``(train, test, test_label, anomaly_kinds)`` frames in
    the layout of the module docstring. ``counts``: segments per kind (default 8 spikes, 6 level
    shifts, 6 cross-variate)."""
    from pvlib.temperature import TEMPERATURE_MODEL_PARAMETERS, sapm_cell

    rng = np.random.default_rng(seed)
    weather = weather_frame("weather")
    frame = weather[["date", *_WEATHER]].copy()
    ghi = frame["ghi"].to_numpy()
    params = TEMPERATURE_MODEL_PARAMETERS["sapm"]["open_rack_glass_polymer"]
    t_module = np.asarray(sapm_cell(ghi, frame["temp_air"].to_numpy(), frame["wind_speed"].to_numpy(), **params))
    # PVWatts-style DC power of a 100 kW array, -0.4 %/K above 25 °C, 96 % inverter, clipped at 100 kW
    power = np.clip(100.0 * ghi / 1000.0 * (1 - 0.004 * (t_module - 25.0)) * 0.96, 0.0, 100.0)
    frame["temp_module"] = t_module + rng.normal(0.0, 0.3, len(frame))
    frame["power_kw"] = np.maximum(power + rng.normal(0.0, 0.2, len(frame)) * (ghi > 0), 0.0)
    frame["ghi"] = np.maximum(ghi + rng.normal(0.0, 2.0, len(frame)) * (ghi > 0), 0.0)
    frame = frame.rename(columns={"date": "timestamp"})[["timestamp", *SENSOR_CHANNELS]]
    frame["timestamp"] = frame["timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S")

    n_train = int(len(frame) * train_fraction)
    train, test = frame.iloc[:n_train].reset_index(drop=True), frame.iloc[n_train:].reset_index(drop=True)
    std = train[SENSOR_CHANNELS].std().to_numpy()
    counts = {"spike": 8, "level_shift": 6, "cross_variate": 6, **(counts or {})}
    test, labels, kinds = inject_anomalies(test, std, counts, rng)
    label_frame = pd.DataFrame({"timestamp": test["timestamp"], "label": labels})
    return train, test, label_frame, kinds


@dataclass(frozen=True)
class InjectionPlan:
    """Where and how :func:`inject_anomalies` places each kind of segment in a data set.

    ``lengths``: ``kind -> (min, max)`` rows; ``level_channels``/``swap_channels``: the channels a
    ``level_shift``/``cross_variate`` segment may hit; ``lags``: the candidate offsets (rows) of
    the stretch a ``cross_variate`` segment copies in, the one where ``driver`` (``None``: the
    swapped channel itself) differs most from the original is taken; such a segment is only
    placed where ``driver`` reaches ``min_driver``; ``margin``: free rows around every segment.
    """

    channels: tuple[str, ...]
    lengths: dict
    level_channels: tuple[str, ...]
    swap_channels: tuple[str, ...]
    lags: tuple[int, ...]
    driver: str | None = None
    min_driver: float = -np.inf
    margin: int = 48


PV_PLAN = InjectionPlan(
    channels=tuple(SENSOR_CHANNELS), lengths={"spike": (1, 3), "level_shift": (8, 24), "cross_variate": (12, 30)},
    level_channels=("temp_air", "temp_dew", "relative_humidity", "pressure", "temp_module"),
    swap_channels=("temp_module", "power_kw"), lags=tuple(24 * d for d in range(-20, 21) if d),
    driver="ghi", min_driver=200.0)  # the same hours of the day whose irradiance differs most, in daylight


def inject_anomalies(test: pd.DataFrame, std: np.ndarray, counts: dict, rng: np.random.Generator,
                     plan: InjectionPlan = PV_PLAN) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """Inject labelled segments (``plan.margin`` rows apart) into a copy of ``test``: ``spike``
    (one channel 5-8 training standard deviations ``std [V]`` off), ``level_shift`` (one channel
    offset by 2-3 of them), ``cross_variate`` (one channel replaced by its own values elsewhere
    in ``test``: in range, out of step with the other channels)."""
    test = test.copy()
    channels = list(plan.channels)
    clean = test[channels].to_numpy().copy()
    values = clean.copy()
    n, margin = len(values), plan.margin
    labels = np.zeros(n, dtype=np.int64)
    jobs = [k for k in KINDS for _ in range(counts.get(k, 0))]
    rng.shuffle(jobs)
    rows, taken = [], np.zeros(n, dtype=bool)
    driver = None if plan.driver is None else clean[:, channels.index(plan.driver)]
    for kind in jobs:
        length = plan.lengths[kind]
        length = int(rng.integers(length[0], length[1] + 1))
        for _ in range(1000):  # a free place, away from the others and from the ends
            start = int(rng.integers(margin, n - length - margin))
            if kind == "cross_variate" and driver is not None and driver[start:start + length].max() < plan.min_driver:
                continue  # e.g. needs daylight, where the channels are coupled
            if not taken[start - margin:start + length + margin].any():
                break
        else:
            raise InputError(f"cannot place {len(jobs)} anomaly segments in {n} test rows; ask for fewer")
        end = start + length
        if kind == "spike":
            channel = int(rng.integers(len(channels)))
            values[start:end, channel] += rng.choice([-1, 1]) * rng.uniform(5, 8) * std[channel]
        elif kind == "level_shift":
            channel = int(rng.choice([channels.index(c) for c in plan.level_channels]))
            values[start:end, channel] += rng.choice([-1, 1]) * rng.uniform(2, 3) * std[channel]
        else:
            channel = channels.index(rng.choice(list(plan.swap_channels)))
            ref = clean[:, channel] if driver is None else driver
            lags = [lag for lag in plan.lags if 0 <= start + lag and end + lag <= n]
            gap = [np.abs(ref[start + lag:end + lag] - ref[start:end]).mean() for lag in lags]
            lag = lags[int(np.argmax(gap))]
            values[start:end, channel] = clean[start + lag:end + lag, channel]
        labels[start:end] = 1
        taken[start:end] = True
        rows.append({"start": start, "end": end, "kind": kind, "channel": channels[channel]})
    test[channels] = values
    kinds = pd.DataFrame(rows, columns=["start", "end", "kind", "channel"]).sort_values("start")
    return test, labels, kinds.reset_index(drop=True)


# Daphnet freezing-of-gait, recording S06R02E0 as TimeEval ships it (inside aeon < 1.7): 64 Hz,
# 3 acceleration sensors (ankle, upper leg, trunk) x 3 axes, in milli-g.
DAPHNET_FILE = ("datasets", "data", "Daphnet_S06R02E0", "S06R02E0.csv")
DAPHNET_CHANNELS = ["ankle_horiz_fwd", "ankle_vert", "ankle_horiz_lateral", "leg_horiz_fwd", "leg_vert",
                    "leg_horiz_lateral", "trunk_horiz_fwd", "trunk_vert", "trunk_horiz_lateral"]
DAPHNET_PLAN = InjectionPlan(
    channels=tuple(DAPHNET_CHANNELS), lengths={"spike": (1, 3), "level_shift": (16, 48), "cross_variate": (32, 64)},
    level_channels=tuple(DAPHNET_CHANNELS), swap_channels=tuple(DAPHNET_CHANNELS),
    lags=tuple(d for d in range(-640, 641, 4) if abs(d) >= 64), margin=64)  # 1-10 s away; 1 s apart


def daphnet_recording() -> pd.DataFrame:
    """The Daphnet S06R02E0 recording bundled with ``aeon``: ``timestamp``, the 9 channels of
    :data:`DAPHNET_CHANNELS`, ``is_anomaly`` (7040 rows)."""
    spec = importlib.util.find_spec("aeon")
    if spec is None or spec.origin is None:
        raise InputError('data.dataset=daphnet reads the Daphnet recording bundled with aeon: pip install "seqapps[series]"')
    path = Path(spec.origin).parent.joinpath(*DAPHNET_FILE)
    if not path.is_file():
        raise InputError(f"data.dataset=daphnet: the installed aeon has no {'/'.join(DAPHNET_FILE)} (aeon 1.7 "
                         'dropped it); pip install "seqapps[series]" "aeon<1.7"')
    frame = pd.read_csv(path)
    missing = [c for c in ("timestamp", *DAPHNET_CHANNELS, "is_anomaly") if c not in frame.columns]
    if missing:
        raise InputError(f"data.dataset=daphnet: '{path}' has no column {missing[0]!r}; expected timestamp, "
                         f"{_names(DAPHNET_CHANNELS)}, is_anomaly")
    check_frame(frame, str(path), [*DAPHNET_CHANNELS, "is_anomaly"])
    return frame


def daphnet_frames(seed: int = 0, train_fraction: float = 0.6, counts: dict | None = None
                   ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The Daphnet set: ``(train, test, test_label, anomaly_kinds)`` frames as :func:`sensor_frames`.

    The recording is split in time order, the first ``train_fraction`` training (taken as normal,
    TimeEval's semi-supervised setting; none of its rows is labelled). The shipped excerpt has no
    labelled freezing-of-gait episode at all (``is_anomaly`` is 0 throughout, why aeon 1.6
    deprecates it), so labelled segments are injected into the test part with
    :data:`DAPHNET_PLAN` (default 6 spikes, 5 level shifts, 5 cross-variate); a row the file
    labels stays labelled (kind ``freeze_of_gait``).
    """
    rng = np.random.default_rng(seed)
    frame = daphnet_recording()
    n_train = int(len(frame) * train_fraction)
    file_labels = frame["is_anomaly"].to_numpy().astype(np.int64)
    frame = frame[["timestamp", *DAPHNET_CHANNELS]].astype({c: np.float64 for c in DAPHNET_CHANNELS})
    train, test = frame.iloc[:n_train].reset_index(drop=True), frame.iloc[n_train:].reset_index(drop=True)
    std = train[DAPHNET_CHANNELS].std().to_numpy()
    counts = {"spike": 6, "level_shift": 5, "cross_variate": 5, **(counts or {})}
    test, labels, kinds = inject_anomalies(test, std, counts, rng, DAPHNET_PLAN)
    recorded = file_labels[n_train:]
    if recorded.any():
        fog = pd.DataFrame([{"start": s, "end": e, "kind": "freeze_of_gait", "channel": "all"}
                            for s, e in label_segments(recorded)])
        kinds = pd.concat([kinds, fog]).sort_values("start").reset_index(drop=True)
    label_frame = pd.DataFrame({"timestamp": test["timestamp"], "label": labels | recorded})
    return train, test, label_frame, kinds


def write_sensor_anomalies(folder: str | os.PathLike, seed: int = 0, **kwargs) -> Path:
    """Write :func:`sensor_frames` into ``folder`` (created; refused if it holds a ``train.csv``).
    Written under a temporary name and renamed when complete: nothing half-written."""
    folder = Path(folder)
    if (folder / "train.csv").exists():
        raise InputError(f"'{folder}' already holds a train.csv; give a new folder")
    train, test, labels, kinds = sensor_frames(seed, **kwargs)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        train.to_csv(tmp / "train.csv", index=False)
        test.to_csv(tmp / "test.csv", index=False)
        labels.to_csv(tmp / "test_label.csv", index=False)
        kinds.to_csv(tmp / "anomaly_kinds.csv", index=False)
        if folder.exists():
            for path in tmp.iterdir():
                path.replace(folder / path.name)
            tmp.rmdir()
        else:
            tmp.replace(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


BUNDLED = {"pv_plant": sensor_frames, "daphnet": daphnet_frames}  # data.dataset -> (train, test, labels, kinds)


# --------------------------------------------------------------------------- reader
def _read_csv(path: Path) -> pd.DataFrame:
    frame = read_csv_checked(path, "data.path", f"expected {LAYOUT}", absent=f"no {path.name} in '{path.parent}'")
    if frame.shape[1] < 2:
        raise InputError(f"data.path: '{path}' has {frame.shape[1]} column(s); {LAYOUT} has a "
                         "timestamp/index column first, then the channels (the label, for test_label.csv)")
    return frame


def read_anomaly_folder(folder: str | os.PathLike) -> dict:
    """Read and check a folder in the layout of the module docstring.

    Returns ``{"train": [N, V], "test": [M, V]`` (float64, unscaled), ``"labels": [M]`` (int 0/1),
    ``"columns": [V names]``, ``"segments"``: the ``anomaly_kinds.csv`` rows (or one ``anomaly``
    row per labelled segment when there is none)``}``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"data.path: no folder at '{folder}'; give a folder in {LAYOUT}")
    train, test, label = (_read_csv(folder / name) for name in ("train.csv", "test.csv", "test_label.csv"))
    columns = [str(c) for c in train.columns[1:]]
    if [str(c) for c in test.columns[1:]] != columns:
        raise InputError(f"data.path: test.csv's channels ({_names(test.columns[1:])}) differ from "
                         f"train.csv's ({_names(columns)}); both need the same columns in the same order")
    check_frame(train, str(folder / "train.csv"), train.columns[1:])
    check_frame(test, str(folder / "test.csv"), test.columns[1:])
    check_frame(label, str(folder / "test_label.csv"), label.columns[1:2])
    if len(label) != len(test):
        raise InputError(f"data.path: test_label.csv has {len(label)} rows but test.csv has {len(test)}; "
                         "one label per test row is needed")
    labels = label.iloc[:, 1].to_numpy()
    if not np.isin(labels, (0, 1)).all():
        bad = labels[~np.isin(labels, (0, 1))][0]
        raise InputError(f"data.path: test_label.csv's label column holds {bad!r}; labels are 0 (normal) or 1 (anomaly)")
    labels = labels.astype(np.int64)
    kinds_path = folder / "anomaly_kinds.csv"
    if kinds_path.is_file():
        kinds = read_csv_checked(kinds_path, "data.path", "give anomaly_kinds.csv with columns start, end, kind")
        if not {"start", "end", "kind"} <= set(kinds.columns):
            raise InputError(f"data.path: '{kinds_path}' has columns {', '.join(map(str, kinds.columns))}; "
                             "anomaly_kinds.csv needs start, end, kind (or leave it out)")
        segments = kinds[["start", "end", "kind"]].to_dict("records")
    else:
        segments = [{"start": s, "end": e, "kind": "anomaly"} for s, e in label_segments(labels)]
    return {"train": train.iloc[:, 1:].to_numpy(np.float64), "test": test.iloc[:, 1:].to_numpy(np.float64),
            "labels": labels, "columns": columns, "segments": segments}


def label_segments(labels: np.ndarray) -> list[tuple[int, int]]:
    """``[(start, end)]`` of the runs of 1 in ``labels [M]`` (``end`` exclusive)."""
    edges = np.diff(np.concatenate([[0], np.asarray(labels, dtype=np.int64), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


# --------------------------------------------------------------------------- windows
def window_starts(n: int, win_size: int, step: int) -> np.ndarray:
    """Starts of the windows over ``n`` rows; with ``step == win_size`` the last window is
    aligned to the end, so that every row is in one (the tiling used for scores)."""
    starts = np.arange(0, n - win_size + 1, step)
    if step == win_size and len(starts) and starts[-1] + win_size < n:
        starts = np.append(starts, n - win_size)
    return starts


def tile_scores(score_windows, series: np.ndarray, win_size: int, batch_size: int = 64) -> np.ndarray:
    """Per-row scores ``[N]`` of ``series [N, V]`` from the windows that tile it (:func:`window_starts`
    with ``step == win_size``; the last window's scores overwrite its overlap with the one before).
    ``score_windows``: windows ``[B, win_size, V]`` (float32) -> scores ``[B, win_size]``."""
    starts = window_starts(len(series), win_size, win_size)
    scores = np.zeros(len(series))
    for i in range(0, len(starts), batch_size):
        batch = starts[i:i + batch_size]
        windows = torch.as_tensor(np.stack([series[s:s + win_size] for s in batch]), dtype=torch.float32)
        for s, values in zip(batch, score_windows(windows).float().cpu().numpy()):
            scores[s:s + win_size] = values
    return scores


class AnomalyWindows(Dataset):
    """Windows ``x [win_size, V]`` of a series ``[N, V]``, with their labels ``[win_size]``
    (zeros for unlabelled series) and start row."""

    def __init__(self, data: np.ndarray, win_size: int, step: int, labels: np.ndarray | None = None):
        self.data = torch.as_tensor(data, dtype=torch.float32)
        self.labels = torch.as_tensor(np.zeros(len(data)) if labels is None else np.array(labels), dtype=torch.long)
        self.win_size = win_size
        self.starts = window_starts(len(data), win_size, step)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        s = int(self.starts[i])
        return self.data[s:s + self.win_size], self.labels[s:s + self.win_size], s


class AnomalyDataModule(SplitsDataModule):
    """Anomaly detection by reconstruction: batches ``(x [B, win_size, V], labels [B, win_size],
    start [B])``, scaled with the training statistics.

    Args:
        path: a folder in the Time-Series-Library anomaly layout (module docstring); when
            ``None``, the bundled ``dataset`` (``pv_plant`` or ``daphnet``) is made in memory.
        win_size: rows per window (100 in the Time-Series-Library protocol).
        step: stride of the training windows (1 in that protocol).
        val_fraction: the last share of the training rows held out for validation.
        generator_seed: the seed of the bundled set's noise and anomalies (not ``seed``, which
            orders the training batches: another training seed scores the same test rows).
    """

    def __init__(self, path: str | None = None, dataset: str = "pv_plant", win_size: int = 100, step: int = 1,
                 val_fraction: float = 0.2, batch_size: int = 32, num_workers: int = 0, seed: int = 0,
                 generator_seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.path, self.dataset = path, dataset
        self.win_size, self.step, self.val_fraction = int(win_size), int(step), float(val_fraction)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.generator_seed = generator_seed

    def read(self) -> None:
        if self.win_size < 2 or self.step < 1:
            raise InputError(f"data.win_size={self.win_size}, data.step={self.step}: need win_size >= 2, step >= 1")
        if not 0 < self.val_fraction < 1:
            raise InputError(f"data.val_fraction={self.val_fraction}: must be in (0, 1)")
        if self.path:
            raw, self.source = read_anomaly_folder(self.path), str(self.path)
        elif self.dataset in BUNDLED:
            train, test, labels, kinds = BUNDLED[self.dataset](seed=self.generator_seed)
            channels = [str(c) for c in train.columns[1:]]
            raw = {"train": train[channels].to_numpy(np.float64),
                   "test": test[channels].to_numpy(np.float64), "labels": labels["label"].to_numpy(),
                   "columns": channels, "segments": kinds.to_dict("records")}
            self.source = f"dataset '{self.dataset}'"
        else:
            raise InputError(f"data.dataset='{self.dataset}' is not a bundled dataset; choose one of "
                             f"{', '.join(BUNDLED)} or give data.path=<folder in {LAYOUT}>")
        n_val = int(len(raw["train"]) * self.val_fraction)
        n_fit = len(raw["train"]) - n_val
        for name, rows in (("training (after the validation share)", n_fit), ("validation", n_val),
                           ("test", len(raw["test"]))):
            if rows < self.win_size:
                raise InputError(f"{self.source}: the {name} split has {rows} rows, fewer than "
                                 f"data.win_size={self.win_size}; use a shorter window or more rows")
        self.mean, self.std = fit_scaler(raw["train"], raw["columns"], self.source, "in train.csv")
        self.columns, self.segments = raw["columns"], raw["segments"]
        self.train_series = (raw["train"] - self.mean) / self.std  # all of train.csv: the threshold's statistics
        self.test_series = (raw["test"] - self.mean) / self.std
        self.test_labels = raw["labels"]
        self.splits = {
            "train": AnomalyWindows(self.train_series[:n_fit], self.win_size, self.step),
            "val": AnomalyWindows(self.train_series[n_fit:], self.win_size, self.win_size),
            "test": AnomalyWindows(self.test_series, self.win_size, self.win_size, self.test_labels),
        }

    def info(self) -> dict:
        self.load()
        return {"source": self.source, "columns": list(self.columns), "n_in": len(self.columns),
                "win_size": self.win_size, "mean": [float(v) for v in self.mean],
                "std": [float(v) for v in self.std], "test_anomaly_share": float(self.test_labels.mean())}
