"""Anomaly detection with Chimera: the Time-Series-Library folder layout and its refusals, the
threshold / point-adjustment metric on hand-made arrays, the bundled generator's anomalies,
masked reconstruction that never sees the cell it scores, and a real `seqapps train` that scores
injected anomalies above normal steps."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from seqapps.config import compose
from seqapps.errors import InputError
from seqapps.tasks.forecasting.anomaly import PCAScorer, detection_metrics, point_adjust
from seqapps.tasks.forecasting import anomaly_data
from seqapps.tasks.forecasting.anomaly_data import (DAPHNET_CHANNELS, DAPHNET_FILE, SENSOR_CHANNELS,
                                                    AnomalyDataModule, daphnet_recording, read_anomaly_folder,
                                                    write_sensor_anomalies)
from seqapps.tasks.forecasting.chimera import ChimeraReconstructor
from seqapps.train import run_train
from conftest import run_cli

QUIET = ["callbacks=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "logger.tensorboard=null"]
SMALL = {"dim": 8, "depth": 1, "d_state": 4, "expand": 1}


def write_folder(folder, n_train: int = 600, n_test: int = 400, seed: int = 0):
    """A small set in the layout: ``a`` a daily-like sine, ``b = 1.5 a`` (coupled), ``c`` a slower
    wave; in test a spike of ``c``, a level shift of ``a`` and a cross-variate break (``b`` taken
    half a period later, so ``b = -1.5 a``: both stay in range, their relation breaks)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_train + n_test)
    a = np.sin(2 * np.pi * t / 24) + 0.05 * rng.normal(size=len(t))
    b = 1.5 * np.sin(2 * np.pi * t / 24) + 0.05 * rng.normal(size=len(t))
    c = np.cos(2 * np.pi * t / 50) + 0.05 * rng.normal(size=len(t))
    data = np.stack([a, b, c], 1)
    train, test = data[:n_train], data[n_train:].copy()
    labels = np.zeros(n_test, dtype=int)
    segments = [(60, 62, "spike"), (150, 162, "level_shift"), (260, 284, "cross_variate")]
    test[60:62, 2] += 6.0
    test[150:162, 0] += 2.0
    test[260:284, 1] = 1.5 * np.sin(2 * np.pi * (n_train + np.arange(260, 284) + 12) / 24)
    for s, e, _ in segments:
        labels[s:e] = 1
    folder.mkdir(parents=True, exist_ok=True)
    stamps = pd.date_range("2024-01-01", periods=len(t), freq="min").astype(str)
    pd.DataFrame({"timestamp_(min)": stamps[:n_train], "a": train[:, 0], "b": train[:, 1], "c": train[:, 2]}).to_csv(
        folder / "train.csv", index=False)
    pd.DataFrame({"timestamp_(min)": stamps[n_train:], "a": test[:, 0], "b": test[:, 1], "c": test[:, 2]}).to_csv(
        folder / "test.csv", index=False)
    pd.DataFrame({"timestamp_(min)": stamps[n_train:], "label": labels}).to_csv(folder / "test_label.csv", index=False)
    pd.DataFrame(segments, columns=["start", "end", "kind"]).to_csv(folder / "anomaly_kinds.csv", index=False)
    return folder


# --------------------------------------------------------------------------- data
def test_loader_reads_the_layout_and_scales_with_train_only(tmp_path):
    folder = write_folder(tmp_path / "set")
    raw = read_anomaly_folder(folder)
    assert raw["columns"] == ["a", "b", "c"] and raw["train"].shape == (600, 3) and raw["test"].shape == (400, 3)
    assert raw["labels"].sum() == 2 + 12 + 24
    assert [s["kind"] for s in raw["segments"]] == ["spike", "level_shift", "cross_variate"]
    dm = AnomalyDataModule(path=str(folder), win_size=24, step=2, batch_size=8)
    dm.load()
    np.testing.assert_allclose(dm.mean, raw["train"].mean(0))  # fitted on train.csv, not test
    np.testing.assert_allclose(dm.train_series.mean(0), 0, atol=1e-12)
    assert abs(dm.test_series[60, 2] - dm.test_series[59, 2]) > 5  # the spike, in training std units
    x, labels, starts = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 24, 3) and labels.shape == (8, 24) and starts.tolist()[:2] == [0, 24]
    test_windows = dm.splits["test"]
    assert test_windows.starts[-1] == 400 - 24  # the last window is aligned to the end: every step scored
    assert len(dm.splits["train"]) == (480 - 24) // 2 + 1 and len(dm.splits["val"]) == 5
    assert dm.info()["n_in"] == 3


@pytest.mark.parametrize("spoil, message", [
    (lambda f: (f / "test_label.csv").unlink(), "no test_label.csv in"),
    (lambda f: pd.read_csv(f / "test_label.csv").iloc[:-3].to_csv(f / "test_label.csv", index=False),
     "test_label.csv has 397 rows but test.csv has 400"),
    (lambda f: pd.read_csv(f / "train.csv").assign(b=lambda d: d["b"].astype(object).where(d.index != 7, "9,5 V"))
     .to_csv(f / "train.csv", index=False), "column 'b' holds a non-number ('9,5 V') at row 7"),
    (lambda f: pd.read_csv(f / "train.csv").assign(c=1.0).to_csv(f / "train.csv", index=False),
     "column 'c' is constant in train.csv"),
    (lambda f: pd.read_csv(f / "test.csv").rename(columns={"c": "z"}).to_csv(f / "test.csv", index=False),
     "test.csv's channels (a, b, z) differ"),
    (lambda f: pd.read_csv(f / "test_label.csv").assign(label=2).to_csv(f / "test_label.csv", index=False),
     "labels are 0 (normal) or 1"),
    (lambda f: pd.DataFrame({"begin": [3], "end": [9]}).to_csv(f / "anomaly_kinds.csv", index=False),
     "anomaly_kinds.csv needs start, end, kind"),
])
def test_bad_folders_are_refused_with_one_line(tmp_path, spoil, message):
    folder = write_folder(tmp_path / "set")
    spoil(folder)
    with pytest.raises(InputError, match=re.escape(message)) as err:
        AnomalyDataModule(path=str(folder), win_size=24).load()
    assert "\n" not in str(err.value)


@pytest.mark.slow  # a fresh interpreter importing Lightning and Hydra: ~30 s on 2 shared cores
def test_cli_refuses_a_bad_folder_with_one_line_and_writes_nothing(tmp_path):
    folder = write_folder(tmp_path / "set")
    pd.read_csv(folder / "test_label.csv").iloc[:10].to_csv(folder / "test_label.csv", index=False)
    proc = run_cli("train", "task=anomaly_chimera", f"data.path={folder}", "data.win_size=24", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "seqapps train: error: data.path: test_label.csv has 10 rows but test.csv has 400; one label per test row is needed"]
    assert not (tmp_path / "runs").exists()


def test_generator_writes_the_layout_with_anomalies_only_in_test(tmp_path):
    folder = write_sensor_anomalies(tmp_path / "pv")
    train, test = pd.read_csv(folder / "train.csv"), pd.read_csv(folder / "test.csv")
    labels, kinds = pd.read_csv(folder / "test_label.csv"), pd.read_csv(folder / "anomaly_kinds.csv")
    assert list(train.columns) == list(test.columns) == ["timestamp", *SENSOR_CHANNELS]
    assert len(labels) == len(test) and list(labels.columns) == ["timestamp", "label"]
    assert set(kinds["kind"]) == {"spike", "level_shift", "cross_variate"}
    assert labels["label"].sum() == (kinds["end"] - kinds["start"]).sum()  # labelled = injected, no overlap
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    # a cross-variate segment leaves every channel in its normal (training) range...
    low, high = train[SENSOR_CHANNELS].min(), train[SENSOR_CHANNELS].max()
    for seg in kinds[kinds["kind"] == "cross_variate"].itertuples():
        part = test[SENSOR_CHANNELS].iloc[seg.start:seg.end]
        assert ((part >= low - 1e-9) & (part <= high + 1e-9)).all().all()
    # ...but breaks the physics: power no longer follows irradiance there
    power = kinds[(kinds["kind"] == "cross_variate") & (kinds["channel"] == "power_kw")].iloc[0]
    part = test.iloc[power.start:power.end]
    assert np.abs(part["power_kw"] - 0.096 * part["ghi"]).mean() > 5  # kW; ~1 kW where they agree
    with pytest.raises(InputError, match="already holds a train.csv"):
        write_sensor_anomalies(folder)


def _daphnet_shipped() -> bool:
    """aeon installed and still shipping the recording (its deprecation says a later aeon drops it)."""
    spec = importlib.util.find_spec("aeon")
    return spec is not None and spec.origin is not None and Path(spec.origin).parent.joinpath(*DAPHNET_FILE).is_file()


@pytest.mark.skipif(not _daphnet_shipped(), reason="the Daphnet recording ships inside aeon (<1.7)")
def test_daphnet_splits_the_real_recording_and_labels_injected_test_segments():
    recording = daphnet_recording()
    assert recording.shape == (7040, 11) and recording["is_anomaly"].sum() == 0  # the excerpt: no labelled episode
    dm = AnomalyDataModule(dataset="daphnet", win_size=100, step=4, batch_size=8)
    dm.load()
    raw = recording[DAPHNET_CHANNELS].to_numpy(np.float64)
    assert dm.columns == DAPHNET_CHANNELS and dm.info()["n_in"] == 9
    assert dm.train_series.shape == (4224, 9) and dm.test_series.shape == (2816, 9)
    np.testing.assert_allclose(dm.mean, raw[:4224].mean(0))  # training rows only, in time order
    np.testing.assert_allclose(dm.std, raw[:4224].std(0))
    np.testing.assert_allclose(dm.train_series * dm.std + dm.mean, raw[:4224], atol=1e-9)  # train is the untouched recording
    labels = dm.test_labels
    assert labels.shape == (2816,) and 0.05 < labels.mean() < 0.25
    assert {s["kind"] for s in dm.segments} == {"spike", "level_shift", "cross_variate"}
    assert labels.sum() == sum(s["end"] - s["start"] for s in dm.segments)
    test = dm.test_series * dm.std + dm.mean
    changed = ~np.isclose(test, raw[4224:]).all(1)
    assert not (changed & (labels == 0)).any()  # only labelled rows differ from the recording
    for seg in (s for s in dm.segments if s["kind"] == "cross_variate"):
        c, rows = DAPHNET_CHANNELS.index(seg["channel"]), slice(seg["start"], seg["end"])
        others = [i for i in range(9) if i != c]
        np.testing.assert_allclose(test[rows][:, others], raw[4224:][rows][:, others])
        lags = [lag for lag in range(-640, 641) if abs(lag) >= 64 and 0 <= seg["start"] + lag
                and seg["end"] + lag <= 2816 and np.allclose(raw[4224 + seg["start"] + lag:4224 + seg["end"] + lag, c],
                                                             test[rows, c])]
        assert lags  # the channel's own real values from 1-10 s away
    x, window_labels, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 100, 9) and window_labels.shape == (8, 100)


def test_daphnet_without_aeon_is_refused_with_one_line(monkeypatch):
    monkeypatch.setattr(anomaly_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=re.escape('pip install "seqapps[series]"')) as err:
        AnomalyDataModule(dataset="daphnet").load()
    assert "\n" not in str(err.value) and "aeon" in str(err.value)


# --------------------------------------------------------------------------- metrics
def test_threshold_point_adjustment_and_f1_on_hand_made_scores():
    train = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    test = np.array([0.1, 0.2, 5.0, 0.3, 0.2, 0.1, 0.3, 4.0, 0.2, 0.1])
    labels = np.array([0, 1, 1, 1, 0, 0, 0, 0, 1, 0])
    segments = [{"start": 1, "end": 4, "kind": "spike"}, {"start": 8, "end": 9, "kind": "cross_variate"}]
    m = detection_metrics(train, test, labels, anomaly_ratio=10, segments=segments)
    # 90th percentile of the 20 scores: 1.0 + 0.1 * (4.0 - 1.0); predicted: steps 2 and 7
    assert m["threshold"] == pytest.approx(1.3)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((0.5, 0.25, 1 / 3))
    # adjusted: step 2 finds the segment 1..3 entirely; step 7 stays a false alarm, step 8 missed
    assert (m["precision_pa"], m["recall_pa"], m["f1_pa"]) == pytest.approx((0.75, 0.75, 0.75))
    assert (m["hit_spike"], m["hit_cross_variate"]) == (1.0, 0.0)
    assert point_adjust(np.array([0, 0, 0, 1, 0]), np.array([0, 0, 1, 1, 1])).tolist() == [0, 0, 1, 1, 1]
    nothing = detection_metrics(train, np.zeros(10), labels, anomaly_ratio=1)
    assert (nothing["precision"], nothing["f1"], nothing["f1_pa"]) == (0.0, 0.0, 0.0)


def test_pca_baseline_scores_a_broken_relation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=500)
    train = np.stack([a, a + 0.05 * rng.normal(size=500)], 1)
    pca = PCAScorer(train, variance=0.9)
    assert pca.k == 1
    scores = pca(np.array([[1.0, 1.0], [1.0, -1.0]]))  # in range, relation kept / broken
    assert scores[1] > 100 * scores[0]


# --------------------------------------------------------------------------- model
@pytest.mark.parametrize("cross_variate", [True, False])
def test_masked_reconstruction_never_sees_the_cell_it_scores(cross_variate):
    torch.manual_seed(0)
    net = ChimeraReconstructor(3, backbone={**SMALL, "cross_variate": cross_variate}, patch_len=2, revin=False,
                               mask_ratio=0.25).eval()
    x = torch.randn(1, 10, 3)
    mask = torch.zeros(1, 3, 5, dtype=torch.bool)
    mask[0, 1, 2] = True  # variate 1, steps 4 and 5
    own, other = x.clone(), x.clone()
    own[0, 4:6, 1] += 10.0  # the masked cell's own values
    other[0, 4:6, 0] += 10.0  # the same steps of another variate
    with torch.no_grad():
        base = net(x, mask)[0, 4:6, 1]
        assert torch.equal(net(own, mask)[0, 4:6, 1], base)
        moved = (net(other, mask)[0, 4:6, 1] - base).abs().max()
    assert (moved > 0) if cross_variate else (moved == 0)  # small at initialisation, but there
    # every cell masked exactly once over the scoring passes: its error is (own value - estimate)²
    error = net.reconstruction_error(own)
    assert error.shape == (1, 10, 3) and error[0, 4:6, 1].min() > 25
    # the passes run as one batch: the same as one pass at a time over a batch of two windows
    batch = torch.cat([own, x])
    with torch.no_grad():
        expected = torch.zeros_like(batch)
        cells = torch.arange(3)[:, None] + torch.arange(5)
        for k in range(4):
            mask = (cells % 4 == k).expand(2, -1, -1)
            steps = mask.repeat_interleave(2, -1).transpose(1, 2)
            expected = torch.where(steps, (batch - net(batch, mask)).pow(2), expected)
        torch.testing.assert_close(net.reconstruction_error(batch), expected)


def test_train_scores_injected_anomalies_above_normal_steps(tmp_path):
    folder = write_folder(tmp_path / "set")
    cfg = compose("train", ["task=anomaly_chimera", f"data.path={folder}", "data.win_size=24", "data.step=2",
                            "data.batch_size=16", "trainer.max_epochs=4", "backbone.dim=8", "backbone.depth=1",
                            "module.net.patch_len=2", "module.optimizer.lr=0.005", "module.anomaly_ratio=5",
                            f"paths.runs={tmp_path / 'runs'}", *QUIET])
    run_dir = run_train(cfg)
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert {"test/model/f1", "test/model/f1_pa", "test/pca/f1_pa", "test/zscore/recall",
            "test/random/f1_pa"} <= set(metrics)
    table = pd.read_csv(run_dir / "plots" / "anomaly_scores.csv")
    assert (run_dir / "plots" / "anomaly_scores.png").stat().st_size > 0
    normal = table.loc[table["label"] == 0, "model_score"].mean()
    assert table.loc[table["label"] == 1, "model_score"].mean() > 3 * normal
    assert table.loc[60:61, "model_score"].min() > 10 * normal  # the spike
    assert metrics["test/model/hit_spike"] == 1.0
    # the export (raw windows -> scores) and `seqapps predict` on test.csv give the test's scores
    # and, at the run's threshold, its predictions; from the export and from the run folder alike
    export = run_dir / "export"
    assert (export / "model.onnx").is_file()
    for model in (export, run_dir):
        out = tmp_path / f"scores_{model.name}.csv"
        proc = run_cli("predict", f"model={model}", f"input={folder / 'test.csv'}", f"output={out}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        scores = pd.read_csv(out)
        assert list(scores.columns) == ["timestamp_(min)", "score", "anomaly"] and len(scores) == len(table)
        np.testing.assert_allclose(scores["score"], table["model_score"], rtol=1e-4, atol=1e-7)
        assert (scores["anomaly"] == table["model_pred"]).mean() > 0.99  # ties at the threshold aside
    short = tmp_path / "short.csv"
    pd.read_csv(folder / "test.csv").head(10).to_csv(short, index=False)
    proc = run_cli("predict", f"model={export}", f"input={short}", cwd=tmp_path)
    assert proc.returncode != 0 and "needs at least that many" in proc.stderr and not (tmp_path / "short.scores.csv").exists()


@pytest.mark.parametrize("name, cross_variate", [("anomaly_chimera", True), ("anomaly_chimera_nocross", False),
                                                 ("anomaly_daphnet", True), ("anomaly_daphnet_nocross", False)])
def test_experiments_compose(name, cross_variate):
    cfg = compose("train", [f"experiment={name}"])
    assert cfg.experiment_name == name and cfg.task_name == "anomaly_chimera"
    assert cfg.data.dataset == ("daphnet" if "daphnet" in name else "pv_plant")
    assert cfg.module.net._target_.endswith("ChimeraReconstructor") and cfg.data.win_size == 100
    assert cfg.backbone.mixer.name == "chimera" and cfg.backbone.mixer.cross_variate is cross_variate


def test_an_unknown_baseline_is_refused_with_one_line():
    from seqapps.tasks.forecasting.anomaly import AnomalyModule

    with pytest.raises(InputError, match="unknown baseline 'iforest'; choose from zscore, pca, random") as error:
        AnomalyModule(net={}, optimizer={}, baselines=["pca", "iforest"])
    assert "\n" not in str(error.value)
