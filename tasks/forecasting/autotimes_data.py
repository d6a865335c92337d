"""AutoTimes data: the forecasting windows with next-segment targets and textual timestamps.

On top of :class:`~seqapps.tasks.forecasting.data.ForecastDataModule` (same CSV layout, splits,
train-fitted scaling and checks):

* training windows are ``x [seq_len, C]`` and ``y [seq_len, C]``, ``y`` being ``x`` shifted by
  one segment (``token_len`` rows): every position is trained to predict its next segment;
* validation windows roll out ``pred_len`` steps; the test split gives one set of windows per
  horizon of ``horizons`` (the long-term protocol's 96/192/336/720) — one trained model
  forecasts them all ("one-for-all");
* each segment carries a position embedding: the text ``"This is Time Series from {start} to
  {end}"`` of its first and last timestamps, embedded once by the language model (its hidden
  state at the last token, or the mean over tokens) and cached on disk, so no tokenizer or LM
  runs during training;
* ``transfer``: a held-out series (another CSV or bundled dataset) scored zero-shot and
  in-context, the prompt being ``prompt_segments`` segments of the same held-out series that
  end ``prompt_gap`` rows before the lookback starts; its lookback is ``seq_len`` rows (default
  ``data.seq_len``: the paper's in-context setup trains at a longer context than the lookback,
  to leave room for the prompt); with ``control`` (another CSV or dataset), a third row scores
  the same windows with a prompt of as many segments taken from that other source instead.

Batches: train ``(x, y, pos)``; val/test ``(x, y, pos, future_pos)``; transfer ``(x, y, pos,
future_pos, prompt, prompt_pos)``, with ``pos [B, seq_len / token_len, D]`` and ``future_pos
[B, ceil(h / token_len), D]``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from seqapps.errors import InputError
from seqapps.kernels.compiled import cache_root as seqapps_cache_root
from seqapps.tasks.forecasting.data import ForecastDataModule, builtin_frame, check_frame, read_tslib_csv

TEMPLATE = "This is Time Series from {start} to {end}"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where generated LMs and timestamp embeddings live: ``cache_dir``, else the seqapps cache
    (:func:`seqapps.kernels.compiled.cache_root`: ``$SEQAPPS_CACHE``, ``$XDG_CACHE_HOME/seqapps`` or
    ``~/.cache/seqapps``)."""
    return Path(cache_dir) if cache_dir else seqapps_cache_root()


def timestamp_texts(dates: pd.Series, token_len: int, extra: int = 0, template: str = TEMPLATE) -> list[str]:
    """One text per row (the segment starting there): ``template`` with its first and last
    timestamps; ``extra`` rows are appended past the end, continuing the median time step."""
    dates = pd.to_datetime(pd.Series(dates)).reset_index(drop=True)
    step = dates.diff().median() if len(dates) > 1 else pd.Timedelta(hours=1)
    if pd.isna(step) or step == pd.Timedelta(0):
        step = pd.Timedelta(hours=1)
    starts = pd.concat([dates, dates.iloc[-1] + step * pd.Series(np.arange(1, extra + 1))], ignore_index=True)
    ends = starts + step * (token_len - 1)
    fmt = "%Y-%m-%d %H:%M:%S"
    return [template.format(start=s.strftime(fmt), end=e.strftime(fmt)) for s, e in zip(starts, ends)]


def timestamp_corpus() -> list[str]:
    """Timestamp sentences of every hour and minute pattern (a 37-minute step over 400 days, every
    7th kept), for training the tokenizers of the generated LMs: AutoTimes embeds such sentences."""
    dates = pd.Series(pd.date_range("2000-01-01", periods=24 * 400, freq="37min"))
    return timestamp_texts(dates, 96)[::7]


def embed_timestamps(lm_spec: Mapping, texts: Sequence[str], pool: str = "last",
                     cache_dir: str | os.PathLike | None = None, batch_size: int = 256) -> torch.Tensor:
    """``[len(texts), D]`` embeddings of ``texts`` by the LM of ``lm_spec`` (see
    :func:`seqapps.tasks.forecasting.autotimes.build_lm`), cached on disk by the LM's identity
    and the texts; distinct texts are embedded once."""
    from seqapps.tasks.forecasting.autotimes import build_lm, lm_identity

    if pool not in ("last", "mean"):
        raise InputError(f"data.timestamps.pool='{pool}': choose last (the last token's hidden state, "
                         "as AutoTimes) or mean")
    key = hashlib.sha256(json.dumps([lm_identity(lm_spec, cache_dir), pool, list(texts)]).encode()).hexdigest()[:24]
    path = cache_root(cache_dir) / "autotimes" / "timestamps" / f"{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    lm = build_lm(lm_spec, cache_dir=cache_dir).eval()
    unique, inverse = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    with torch.no_grad():
        parts = [lm.embed_texts(list(unique[i:i + batch_size]), pool) for i in range(0, len(unique), batch_size)]
    table = torch.cat(parts)[torch.as_tensor(inverse)].float().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(table, tmp)
    os.replace(tmp, path)
    return table


def segment_positions(table: torch.Tensor, start: int, n_segments: int, token_len: int) -> torch.Tensor:
    """Rows ``start, start + token_len, ...`` of a per-row table: ``[n_segments, D]``."""
    return table[start:start + n_segments * token_len:token_len]


class NextSegmentDataset(Dataset):
    """Training windows: ``x = data[i:i+L]``, ``y = data[i+S:i+L+S]``, ``pos`` of x's segments."""

    def __init__(self, data: torch.Tensor, table: torch.Tensor, seq_len: int, token_len: int):
        self.data, self.table, self.seq_len, self.token_len = data, table, seq_len, token_len

    def __len__(self) -> int:
        return max(0, len(self.data) - self.seq_len - self.token_len + 1)

    def __getitem__(self, i: int):
        L, S = self.seq_len, self.token_len
        return self.data[i:i + L], self.data[i + S:i + L + S], segment_positions(self.table, i, L // S, S)


class RolloutDataset(Dataset):
    """Forecast windows: lookback ``x [L, C]``, truth ``y [h, C]``, the lookback's segment
    positions and those of the ``ceil(h / S)`` future segments; with ``prompt_segments``, also
    a prompt of that many segments ending ``prompt_gap`` rows before the lookback."""

    def __init__(self, data: torch.Tensor, table: torch.Tensor, seq_len: int, horizon: int, token_len: int,
                 prompt_segments: int = 0, prompt_gap: int = 0, prompt_source: tuple | None = None):
        self.data, self.table = data, table
        self.prompt_source = prompt_source  # (data [T', C], table): prompts from another series
        self.seq_len, self.horizon, self.token_len = seq_len, horizon, token_len
        self.prompt_len, self.prompt_gap = prompt_segments * token_len, prompt_gap
        self.offset = self.prompt_len + prompt_gap if prompt_segments else 0  # rows needed before x

    def __len__(self) -> int:
        return max(0, len(self.data) - self.offset - self.seq_len - self.horizon + 1)

    def __getitem__(self, i: int):
        L, S, h = self.seq_len, self.token_len, self.horizon
        start = i + self.offset
        n_future = -(-h // S)
        item = (self.data[start:start + L], self.data[start + L:start + L + h],
                segment_positions(self.table, start, L // S, S),
                segment_positions(self.table, start + L, n_future, S))
        if self.prompt_len:
            data, table = self.prompt_source or (self.data, self.table)
            p = i % (len(data) - self.prompt_len + 1)
            prompt = data[p:p + self.prompt_len]
            if prompt.shape[-1] != self.data.shape[-1]:  # another source: its series in turn, per channel
                prompt = prompt[:, torch.arange(self.data.shape[-1]) % prompt.shape[-1]]
            item += (prompt, segment_positions(table, p, self.prompt_len // S, S))
        return item


class AutoTimesDataModule(ForecastDataModule):
    """:class:`ForecastDataModule` with AutoTimes' windows and timestamp embeddings.

    Args (besides those of :class:`ForecastDataModule`):
        token_len: the segment length ``S``; ``seq_len`` must be a multiple of it.
        horizons: the test horizons (those longer than the test split are left out, said so).
        timestamps: ``{lm: <LM spec>, pool: last | mean, template: ...}``; ``lm: null`` turns
            position embeddings off (the model then gets zeros).
        transfer: ``{dataset | path, prompt_segments, prompt_gap, seq_len, control}``: a
            held-out series scored zero-shot and in-context at ``pred_len`` with a lookback of
            ``seq_len`` rows (default ``data.seq_len``); ``control: {dataset | path}`` adds the
            same windows with the prompt from that other source; ``null``: none.
        cache_dir: generated LMs and timestamp embeddings (default: the seqapps cache, :func:`cache_root`).
    """

    def __init__(self, path: str | None = None, dataset: str = "weather", seq_len: int = 672,
                 pred_len: int = 96, features: str = "M", target: str | None = None,
                 batch_size: int = 32, num_workers: int = 0, scale: bool = True, seed: int = 0,
                 ar: dict | None = None, token_len: int = 96, horizons: Sequence[int] = (96, 192, 336, 720),
                 timestamps: Mapping | None = None, transfer: Mapping | None = None,
                 cache_dir: str | None = None, max_train_windows: int | None = None):
        super().__init__(path=path, dataset=dataset, seq_len=seq_len, pred_len=pred_len, features=features,
                         target=target, batch_size=batch_size, num_workers=num_workers, scale=scale,
                         seed=seed, ar=ar)
        self.token_len = int(token_len)
        self.horizons = [int(h) for h in horizons]
        self.timestamps = dict(timestamps or {})
        self.transfer = dict(transfer) if transfer else None
        self.cache_dir = cache_dir
        self.max_train_windows = max_train_windows

    # -- loading
    def load(self) -> None:
        if self._prepared:
            return
        if self.token_len < 1 or self.seq_len % self.token_len:
            raise InputError(f"data.seq_len={self.seq_len} is not a multiple of data.token_len={self.token_len}; "
                             "AutoTimes cuts the lookback into whole segments (e.g. 672 = 7 x 96)")
        super().load()
        n_train = len(self.splits["train"])
        if n_train < self.seq_len + self.token_len:
            raise InputError(f"data.seq_len + data.token_len = {self.seq_len + self.token_len} rows is longer than "
                             f"the train split ({n_train} rows of {self.source}); use shorter ones or a longer series")
        n_test = len(self.splits["test"])
        fitting = [h for h in self.horizons if self.seq_len + h <= n_test and h >= 1]
        if self.horizons and not fitting:
            raise InputError(f"data.horizons={self.horizons}: none fits the test split ({n_test} rows with the "
                             f"seq_len={self.seq_len} lookback); give shorter horizons")
        if fitting != self.horizons:
            print(f"autotimes: test horizons {sorted(set(self.horizons) - set(fitting))} are longer than the "
                  f"test split allows; scoring {fitting}")
        self.test_horizons = fitting or [self.pred_len]
        extra = -(-max(self.test_horizons + [self.pred_len]) // self.token_len) * self.token_len
        self.tables = self._tables(self.frame["date"], self.split_rows(), extra)
        self.transfer_data = self._load_transfer() if self.transfer else None
        self.info_width = next(iter(self.tables.values())).shape[-1]

    def split_rows(self) -> dict[str, tuple[int, int]]:
        from seqapps.tasks.forecasting.data import split_borders

        starts, ends = split_borders(len(self.frame), self.seq_len, str(self.path or ""))
        return {n: (s, e) for n, s, e in zip(("train", "val", "test"), starts, ends)}

    def _table(self, dates: pd.Series, extra: int) -> torch.Tensor:
        """Per-row position embeddings ``[len(dates) + extra, D]`` (``D = 0`` without an LM)."""
        lm = self.timestamps.get("lm")
        n = len(dates) + extra
        if not lm:
            return torch.zeros(n, 0)
        texts = timestamp_texts(dates, self.token_len, extra, self.timestamps.get("template", TEMPLATE))
        return embed_timestamps(lm, texts, self.timestamps.get("pool", "last"), self.cache_dir)

    def _tables(self, dates: pd.Series, rows: Mapping[str, tuple[int, int]], extra: int) -> dict[str, torch.Tensor]:
        table = self._table(dates, extra)
        return {n: table[s:e + extra] for n, (s, e) in rows.items()}

    def _held_out(self, spec: Mapping, seq_len: int, before: int,
                  key: str = "data.transfer.path") -> tuple[torch.Tensor, torch.Tensor, str]:
        """A held-out source's test split (and the ``before`` rows ahead of it), scaled by its
        own training rows: ``(data [T, C], table [T + extra, D], source)``; ``key`` names the
        option of ``spec['path']`` in errors."""
        if spec.get("path"):
            frame, source = read_tslib_csv(spec["path"], key), str(spec["path"])
        else:
            frame, _ = builtin_frame(spec.get("dataset", "weather_ak"), self.ar)
            source = f"dataset '{spec.get('dataset', 'weather_ak')}'"
        columns = [c for c in frame.columns if c != "date"]
        if self.features != "M":  # the model's channel: the same target if the file has it
            columns = [self.target_name] if self.target_name in columns else columns[-1:]
        check_frame(frame, source, columns)
        values = frame[columns].to_numpy(dtype=np.float64)
        from seqapps.tasks.forecasting.data import split_borders

        starts, ends = split_borders(len(frame), seq_len, str(spec.get("path") or ""))
        train = values[starts[0]:ends[0]]
        std = train.std(axis=0)
        if (std == 0).all():
            raise InputError(f"transfer: every column of {source} is constant over its training rows")
        if (std == 0).any():  # channels are independent series: a constant one is left out
            print(f"autotimes: transfer leaves out the constant column(s) "
                  f"{', '.join(c for c, s in zip(columns, std) if s == 0)} of {source}")
            values, train, std = values[:, std > 0], train[:, std > 0], std[std > 0]
        scaled = (values - train.mean(axis=0)) / std
        s, e = max(0, starts[2] - before), ends[2]
        extra = -(-self.pred_len // self.token_len) * self.token_len
        table = self._table(frame["date"], extra)
        return torch.as_tensor(scaled[s:e], dtype=torch.float32), table[s:e + extra], source

    def _load_transfer(self) -> dict:
        """The held-out series (and the control prompts' source): test splits and tables."""
        spec = self.transfer
        prompt_segments = int(spec.get("prompt_segments", 2))
        gap = int(spec.get("prompt_gap", 0))
        seq_len = int(spec.get("seq_len") or self.seq_len)
        if seq_len < self.token_len or seq_len % self.token_len:
            raise InputError(f"data.transfer.seq_len={seq_len} is not a whole number of segments of "
                             f"data.token_len={self.token_len}")
        # the test windows need their prompt: start the slice that many rows earlier
        before = prompt_segments * self.token_len + gap
        data, table, source = self._held_out(spec, seq_len, before)
        need = before + seq_len + self.pred_len
        if len(data) < need:
            raise InputError(f"transfer: the test split of {source} ({len(data)} rows) is shorter than prompt + "
                             f"lookback + horizon = {need} rows")
        out = {"data": data, "table": table, "source": source, "prompt_segments": prompt_segments,
               "prompt_gap": gap, "seq_len": seq_len, "control": None}
        control = spec.get("control") or {}
        if control.get("path") or control.get("dataset"):
            c_data, c_table, c_source = self._held_out(control, seq_len, 0, "data.transfer.control.path")
            if len(c_data) < prompt_segments * self.token_len:
                raise InputError(f"transfer.control: the test split of {c_source} ({len(c_data)} rows) is "
                                 f"shorter than the prompt ({prompt_segments * self.token_len} rows)")
            out["control"] = (c_data, c_table)
        return out

    def info(self) -> dict:
        info = super().info()
        info.update({"token_len": self.token_len, "horizons": list(self.test_horizons),
                     "position_width": int(self.info_width)})
        return info

    # -- datasets and loaders
    def _data(self, split: str) -> torch.Tensor:
        return torch.as_tensor(self.splits[split], dtype=torch.float32)

    def windows(self, split: str, horizon: int | None = None) -> Dataset:
        self.load()
        if split == "train":
            return NextSegmentDataset(self._data("train"), self.tables["train"], self.seq_len, self.token_len)
        return RolloutDataset(self._data(split), self.tables[split], self.seq_len, horizon or self.pred_len,
                              self.token_len)

    def transfer_windows(self, in_context: bool, control: bool = False) -> Dataset:
        """The held-out windows: zero-shot, in-context (the prompt from the same series) or,
        with ``control``, in-context with the prompt from the control source."""
        t = self.transfer_data
        prompt = t["prompt_segments"] if in_context or control else 0
        ds = RolloutDataset(t["data"], t["table"], t["seq_len"], self.pred_len, self.token_len,
                            t["prompt_segments"], t["prompt_gap"], t["control"] if control else None)
        ds.prompt_len = prompt * self.token_len  # same windows (same offset) with or without the prompt
        return ds

    def _make_loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        from seqapps.tasks.sampling import EpochSeededSampler

        sampler = None
        if shuffle:
            sampler = EpochSeededSampler(len(dataset), self.seed)
            if self.max_train_windows and self.max_train_windows < len(dataset):
                sampler = _Capped(sampler, self.max_train_windows)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._make_loader(self.windows("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._make_loader(self.windows("val"), shuffle=False)

    def test_loader_names(self) -> list[str]:
        """What each test loader scores: ``h<horizon>`` rows, then ``zero_shot``/``in_context``."""
        names = [f"h{h}" for h in self.test_horizons]
        if not self.transfer_data:
            return names
        return names + ["zero_shot", "in_context"] + (["in_context_control"] if self.transfer_data["control"] else [])

    def test_dataloader(self) -> list[DataLoader]:
        self.load()
        loaders = [self._make_loader(self.windows("test", h), shuffle=False) for h in self.test_horizons]
        if self.transfer_data:
            loaders += [self._make_loader(self.transfer_windows(flag), shuffle=False) for flag in (False, True)]
            if self.transfer_data["control"]:
                loaders.append(self._make_loader(self.transfer_windows(True, control=True), shuffle=False))
        return loaders

    def predict_dataloader(self) -> DataLoader:
        return self._make_loader(self.windows("test"), shuffle=False)


class _Capped(torch.utils.data.Sampler[int]):
    """The first ``n`` indices of an epoch-seeded permutation (a random subset per epoch)."""

    def __init__(self, sampler, n: int):
        self.sampler, self.n = sampler, n

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return iter(list(self.sampler)[:self.n])

    def __len__(self) -> int:
        return self.n
