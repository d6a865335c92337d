"""Time-series classification data: the UEA/UCR ``.ts`` format, read by a loader of our own.

The format (used by the UEA & UCR archives, sktime and aeon): ``#`` comment lines, then
``@`` headers, then one case per line after ``@data``::

    @problemName BasicMotions
    @univariate false          # optional: @dimensions 6
    @equalLength true          # with @seriesLength 100
    @classLabel true Standing Running Walking Badminton
    @data
    0.07,0.07,-0.90,...:0.30,0.12,...:...:Standing     # dimensions split by ':', the label last

Values are comma-separated; ``?`` (or ``NaN``) is a missing value. Univariate and multivariate,
equal and unequal lengths are read; time-stamped series (``@timeStamps true``, ``(t,v)`` pairs)
are not. The four bundled sets live inside ``aeon`` (``pip install seqapps[series]``):
multivariate JapaneseVowels (12 channels, lengths 7..29, 9 speakers) and BasicMotions (6 channels,
length 100, 4 activities); univariate GunPoint (150, 2 classes) and ItalyPowerDemand (24, 2).

Unequal lengths (JapaneseVowels) are right-padded to the longest series of the train and test
files by holding each series' last observed value (``pad="edge"``; the models are causal in
time, so a held value reads as "nothing new happened"). Missing values become the training mean
of their channel (0 after standardisation). Standardisation is per channel, fitted on the
training split only (every time step of every training case).

Splits: the archive's official train and test files; the validation split is carved from the
training file, stratified by class and seeded. Batches are ``x [B, T, C]`` (float32,
standardised) and ``y [B]`` (class indices in the order of ``@classLabel``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from seqapps.errors import InputError
from seqapps.tasks.classification.data import split_indices
from seqapps.tasks.splits import SplitsDataModule

BUNDLED = ("JapaneseVowels", "BasicMotions", "GunPoint", "ItalyPowerDemand")
PADDINGS = ("edge", "zero")
MISSING = {"?", "nan", "NaN", ""}


@dataclass
class TsFile:
    """A parsed ``.ts`` file: ``series`` one ``[C, T_i]`` array per case, ``labels`` the class
    strings, ``class_names`` the ``@classLabel`` list (in its order), ``header`` the ``@`` keys."""

    series: list[np.ndarray]
    labels: list[str]
    class_names: list[str]
    header: dict[str, str] = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return self.series[0].shape[0]

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([s.shape[1] for s in self.series])


def _flag(value: str, key: str, where: str) -> bool:
    word = value.split()[0].lower() if value.split() else ""
    if word not in ("true", "false"):
        raise InputError(f"{where}: @{key} must be true or false, got '{value}'")
    return word == "true"


def read_ts(path: str | os.PathLike) -> TsFile:
    """Read a UEA/UCR ``.ts`` file; every malformed input is one :class:`InputError` line naming
    the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no .ts file at '{path}'")
    header: dict[str, str] = {}
    series: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    try:
        lines = path.read_text(encoding="utf-8", errors="strict").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"'{path}' is not a text .ts file (not UTF-8)") from None
    has_labels, dims = True, None
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        where = f"{path.name}, line {number}"
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if not line.startswith("@"):
                raise InputError(f"{where}: expected an @header or @data before the values, got '{line[:40]}'")
            key, _, value = line[1:].partition(" ")
            key = key.lower()
            if key == "data":
                in_data = True
                has_labels = _flag(header.get("classlabel", "false"), "classLabel", where)
                if _flag(header.get("timestamps", "false"), "timeStamps", where):
                    raise InputError(f"{where}: time-stamped .ts files (@timeStamps true) are not supported")
                if "univariate" in header and _flag(header["univariate"], "univariate", where):
                    dims = 1
                if "dimensions" in header:
                    try:
                        dims = int(header["dimensions"])
                    except ValueError:
                        raise InputError(f"{where}: @dimensions must be a number, got "
                                         f"'{header['dimensions']}'") from None
                continue
            header[key] = value.strip()
            continue
        fields = line.split(":")
        label = fields.pop().strip() if has_labels else None
        if not fields:
            raise InputError(f"{where}: a case needs values before its label, got '{line[:40]}'")
        if dims is not None and len(fields) != dims:
            raise InputError(f"{where}: {len(fields)} dimensions (':'-separated), but the header says {dims}")
        if series and len(fields) != series[0].shape[0]:
            raise InputError(f"{where}: {len(fields)} dimensions, but the first case has {series[0].shape[0]}")
        channels = []
        for dim, text in enumerate(fields):
            try:
                channels.append([math.nan if v.strip() in MISSING else float(v) for v in text.split(",")])
            except ValueError:
                bad = next(v for v in text.split(",") if v.strip() not in MISSING and not _is_float(v))
                raise InputError(f"{where}: dimension {dim} holds a non-number '{bad.strip()[:20]}' "
                                 "(values are comma-separated numbers, '?' for missing)") from None
        if len({len(c) for c in channels}) != 1:
            raise InputError(f"{where}: the dimensions of one case have different lengths "
                             f"{[len(c) for c in channels]}")
        series.append(np.asarray(channels, dtype=np.float64))
        labels.append(label)
    if not in_data:
        raise InputError(f"'{path}' has no @data line; is it a UEA/UCR .ts file?")
    if not series:
        raise InputError(f"'{path}' has no cases after @data")
    if not has_labels:
        raise InputError(f"'{path}' has no class labels (@classLabel false); classification needs them")
    class_names = header.get("classlabel", "").split()[1:] or sorted(set(labels))
    unknown = sorted(set(labels) - set(class_names))
    if unknown:
        raise InputError(f"'{path}': labels {unknown[:5]} are not in @classLabel {class_names}")
    equal = header.get("equallength")
    if equal is not None and _flag(equal, "equalLength", path.name):
        lengths = {s.shape[1] for s in series}
        expected = header.get("serieslength")
        if len(lengths) != 1 or (expected and str(lengths.pop()) != expected.split()[0]):
            raise InputError(f"'{path}': @equalLength true, but the cases have lengths "
                             f"{sorted({s.shape[1] for s in series})[:5]} (@seriesLength {expected})")
    return TsFile(series, labels, class_names, header)


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def pad_series(series: list[np.ndarray], length: int, mode: str = "edge") -> np.ndarray:
    """Cases ``[C, T_i]`` -> one array ``[N, length, C]``: each case right-padded to ``length``
    by holding its last value (``edge``) or with zeros (``zero``); longer cases are cut."""
    if mode not in PADDINGS:
        raise InputError(f"data.pad='{mode}' is not one of {', '.join(PADDINGS)}")
    out = np.empty((len(series), length, series[0].shape[0]))
    for i, case in enumerate(series):
        case = case[:, :length].T  # [T_i, C]
        out[i, :len(case)] = case
        out[i, len(case):] = case[-1] if mode == "edge" else 0.0
    return out


def bundled_folder(name: str) -> Path:
    """The folder of a bundled set inside ``aeon`` (``<aeon>/datasets/data/<name>``)."""
    if name not in BUNDLED:
        raise InputError(f"data.name='{name}' is not a bundled set; choose one of {', '.join(BUNDLED)} "
                         "or give data.path=<a folder with <Name>_TRAIN.ts and <Name>_TEST.ts>")
    spec = importlib.util.find_spec("aeon")
    if spec is None or spec.origin is None:
        raise InputError(f"data.name={name} needs the UEA/UCR files bundled with aeon: pip install "
                         "seqapps[series] (or give data.path=<a folder with the _TRAIN.ts and _TEST.ts files>)")
    return Path(spec.origin).parent / "datasets" / "data" / name


def find_split_files(folder: Path, name: str | None) -> tuple[Path, Path]:
    """``(<name>_TRAIN.ts, <name>_TEST.ts)`` in ``folder``; without a name, the one pair there."""
    if not folder.is_dir():
        raise InputError(f"data.path: no folder at '{folder}'; give a folder with <Name>_TRAIN.ts and <Name>_TEST.ts")
    if name is None:
        trains = sorted(p for p in folder.glob("*_TRAIN.ts") if not p.name.endswith("_eq_TRAIN.ts"))
        if len(trains) != 1:
            raise InputError(f"data.path: '{folder}' holds {len(trains)} *_TRAIN.ts files "
                             f"({', '.join(p.name for p in trains[:4]) or 'none'}); give data.name=<Name> to pick one")
        name = trains[0].name[:-len("_TRAIN.ts")]
    train, test = folder / f"{name}_TRAIN.ts", folder / f"{name}_TEST.ts"
    for p in (train, test):
        if not p.is_file():
            raise InputError(f"data.path: '{folder}' has no {p.name}")
    return train, test


class SeriesDataModule(SplitsDataModule):
    """A UEA/UCR classification set: ``x [B, T, C]`` standardised per channel, ``y [B]``.

    Args:
        name: a bundled set (``JapaneseVowels``, ``BasicMotions``, ``GunPoint``,
            ``ItalyPowerDemand``), or the ``<Name>`` of the files in ``path``.
        path: a folder with ``<Name>_TRAIN.ts`` and ``<Name>_TEST.ts`` (overrides the bundled copy).
        val_fraction: share of each class of the training file held out for validation.
        pad: ``edge`` (hold the last value) or ``zero``, for unequal lengths.
        seed: the validation split and the shuffling.
    """

    def __init__(self, name: str | None = "BasicMotions", path: str | None = None, val_fraction: float = 0.2,
                 pad: str = "edge", batch_size: int = 32, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.name, self.path, self.val_fraction, self.pad = name, path, val_fraction, pad
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def read(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"data.val_fraction={self.val_fraction}: must be in [0, 1)")
        if self.path:
            train_file, test_file = find_split_files(Path(self.path), self.name)
        elif self.name:
            train_file, test_file = find_split_files(bundled_folder(self.name), self.name)
        else:
            raise InputError("give data.name=<a bundled set> or data.path=<a folder with _TRAIN.ts and _TEST.ts>")
        train, test = read_ts(train_file), read_ts(test_file)
        if train.num_channels != test.num_channels:
            raise InputError(f"{train_file.name} has {train.num_channels} dimensions but {test_file.name} "
                             f"has {test.num_channels}")
        unknown = sorted(set(test.labels) - set(train.class_names))
        if unknown:
            raise InputError(f"{test_file.name}: labels {unknown[:5]} are not classes of {train_file.name}")
        self.class_names = train.class_names
        self.lengths = {"train": train.lengths, "test": test.lengths}
        self.seq_len = int(max(train.lengths.max(), test.lengths.max()))
        index = {c: i for i, c in enumerate(self.class_names)}
        x_train, x_test = pad_series(train.series, self.seq_len, self.pad), pad_series(test.series, self.seq_len, self.pad)
        y_train = np.asarray([index[c] for c in train.labels])
        y_test = np.asarray([index[c] for c in test.labels])

        fit, val, rest = split_indices(y_train, (1 - self.val_fraction, self.val_fraction, 0.0), self.seed)
        fit = np.sort(np.concatenate([fit, rest]))
        # per-channel statistics over every observed step of the fitting cases (padding excluded)
        observed = np.concatenate([s.T for s in (train.series[i] for i in fit)])  # [steps, C]
        self.mean = np.nanmean(observed, axis=0)
        std = np.nanstd(observed, axis=0)
        self.std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        self.mean = np.where(np.isfinite(self.mean), self.mean, 0.0)

        def tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
            scaled = np.nan_to_num((x - self.mean) / self.std, nan=0.0)
            return TensorDataset(torch.as_tensor(scaled, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))

        self.splits = {"train": tensors(x_train[fit], y_train[fit]), "val": tensors(x_train[val], y_train[val]),
                       "test": tensors(x_test, y_test)}
        if not len(self.splits["val"]):
            self.splits["val"] = self.splits["test"] if self.val_fraction == 0 else self.splits["train"]
        self.num_channels = train.num_channels
        self.source = f"{train.header.get('problemname', train_file.stem[:-6])} ({train_file.parent})"

    def info(self) -> dict:
        """What the model and an export need (plain types)."""
        self.load()
        return {"source": self.source, "num_classes": len(self.class_names), "class_names": list(self.class_names),
                "num_variates": self.num_channels, "seq_len": self.seq_len,
                "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std],
                "sizes": {k: len(v) for k, v in self.splits.items()}}
