"""Anomaly detection by reconstruction error, with the Time-Series-Library's evaluation.

Training: a reconstructor (Chimera's, :class:`~seqapps.tasks.forecasting.chimera.ChimeraReconstructor`,
by default) learns to reconstruct windows of ``win_size`` normal training rows with the MSE.

Evaluation, as the Time-Series-Library's anomaly-detection experiment:

1. the score of a step is its squared reconstruction error averaged over the variates, for every
   row of ``train.csv`` and of ``test.csv`` (here each step is scored once, from non-overlapping
   windows; that library scores the test rows in windows at stride 1 and concatenates them);
2. the threshold is the ``100 - anomaly_ratio`` percentile of the train and test scores together;
3. a step is predicted anomalous when its score is above the threshold;
4. precision, recall and F1 of the anomalous class over the test steps: ``*_pa`` after point
   adjustment (a labelled segment counts as found entirely when any one of its steps is
   predicted, the number the field's tables report), ``precision``/``recall``/``f1`` without it
   (the raw point-wise numbers);
5. ``hit_<kind>``: the share of the labelled segments of each kind with a predicted step (the
   point-adjusted recall per kind, when the data says the kinds).

The test table has one row per scorer: ``model`` and the baselines fitted on the training rows
only, ``zscore`` (the mean over the variates of the squared training z-score of the step) and
``pca`` (the squared residual of the step's variates after projection on the principal components
of the training rows that explain ``pca_variance`` of their variance), and ``random`` (uniform
scores, seeded): what point adjustment alone makes of scores that know nothing, the floor against
which the ``*_pa`` columns mean anything (on long labelled segments it is high).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from seqapps.errors import InputError
from seqapps.tasks import plotting
from seqapps.tasks.base import SeqappsModule, StandardisedExport, raw_series_example
from seqapps.tasks.forecasting.anomaly_data import label_segments, tile_scores
from seqapps.tasks.forecasting.model import ScaledScorer

BASELINES = ("zscore", "pca", "random")


# --------------------------------------------------------------------------- metrics
def combined_threshold(train_scores: np.ndarray, test_scores: np.ndarray, anomaly_ratio: float) -> float:
    """The ``100 - anomaly_ratio`` percentile of the train and test scores together."""
    return float(np.percentile(np.concatenate([train_scores, test_scores]), 100 - anomaly_ratio))


def point_adjust(pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``pred [M]`` with every labelled segment of ``labels [M]`` that holds a predicted step set to
    predicted entirely (the field's "detection adjustment"); other steps unchanged."""
    adjusted = np.asarray(pred, dtype=bool).copy()
    for start, end in label_segments(labels):
        if adjusted[start:end].any():
            adjusted[start:end] = True
    return adjusted


def precision_recall_f1(pred: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """Of the anomalous class (1); 0 where undefined (nothing predicted, nothing labelled)."""
    pred, labels = np.asarray(pred, dtype=bool), np.asarray(labels, dtype=bool)
    tp = float((pred & labels).sum())
    precision = tp / pred.sum() if pred.sum() else 0.0
    recall = tp / labels.sum() if labels.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def detection_metrics(train_scores: np.ndarray, test_scores: np.ndarray, labels: np.ndarray,
                      anomaly_ratio: float, segments: Sequence[Mapping] = ()) -> dict[str, float]:
    """The evaluation of the module docstring for one scorer: ``precision``, ``recall``, ``f1``
    (point-wise), the same with ``_pa`` (point-adjusted), ``threshold``, and ``hit_<kind>`` for
    the kinds of ``segments`` (``{start, end, kind}``, ``end`` exclusive)."""
    threshold = combined_threshold(train_scores, test_scores, anomaly_ratio)
    pred = test_scores > threshold
    out = dict(zip(("precision", "recall", "f1"), precision_recall_f1(pred, labels)))
    adjusted = precision_recall_f1(point_adjust(pred, labels), labels)
    out.update(zip(("precision_pa", "recall_pa", "f1_pa"), adjusted))
    out["threshold"] = threshold
    kinds: dict[str, list[bool]] = {}
    for seg in segments:
        kinds.setdefault(str(seg["kind"]), []).append(bool(pred[int(seg["start"]):int(seg["end"])].any()))
    out.update({f"hit_{kind}": float(np.mean(hits)) for kind, hits in kinds.items()})
    return out


# --------------------------------------------------------------------------- baselines
def zscore_scores(series: np.ndarray) -> np.ndarray:
    """``series [N, V]`` already scaled with the training statistics -> ``[N]``, mean of ``z²``."""
    return np.square(series).mean(-1)


class PCAScorer:
    """Reconstruction of each step's variates by the principal components of the training rows
    (``[N, V]``, scaled) that explain ``variance`` of their variance; the score of a step is the
    mean squared residual."""

    def __init__(self, train: np.ndarray, variance: float = 0.9):
        self.mean = train.mean(0)
        _, s, vt = np.linalg.svd(train - self.mean, full_matrices=False)
        explained = np.cumsum(s ** 2) / np.sum(s ** 2)
        self.k = int(np.searchsorted(explained, variance) + 1)
        self.components = vt[:self.k]  # [k, V]

    def __call__(self, series: np.ndarray) -> np.ndarray:
        centred = series - self.mean
        residual = centred - centred @ self.components.T @ self.components
        return np.square(residual).mean(-1)


# --------------------------------------------------------------------------- module
class AnomalyModule(StandardisedExport, SeqappsModule):
    """Train a reconstructor ``x [B, T, V] -> x̂ [B, T, V]`` (with ``training_loss`` and
    ``anomaly_score``, as :class:`ChimeraReconstructor`) on normal windows; test as the module
    docstring says.

    Args:
        anomaly_ratio: the share (in %) of all train and test steps above the threshold (the
            Time-Series-Library uses 1 for PSM, MSL, SMAP and SWaT, 0.5 for SMD).
        baselines: scorers tested the same way: ``zscore``, ``pca`` (fitted on the training rows),
            ``random``.
        pca_variance: the share of the training variance the ``pca`` baseline keeps.
    """

    export_wrapper = ScaledScorer
    predictor = "seqapps.tasks.forecasting.predict.score_csv"

    def __init__(self, net: Mapping, optimizer: Mapping, scheduler: Mapping | None = None,
                 freeze: str = "full", anomaly_ratio: float = 1.0, baselines: Sequence[str] = BASELINES,
                 pca_variance: float = 0.9):
        unknown = [name for name in baselines if name not in BASELINES]
        if unknown:
            raise InputError(f"module.baselines: unknown baseline '{unknown[0]}'; choose from {', '.join(BASELINES)}")
        super().__init__(net, optimizer, scheduler, freeze)
        self.save_hyperparameters({"anomaly_ratio": float(anomaly_ratio), "baselines": list(baselines),
                                   "pca_variance": float(pca_variance)})
        self._test_scores: np.ndarray | None = None
        self.last_scores: dict[str, dict] = {}

    def training_step(self, batch, batch_idx):
        x = batch[0]
        loss = self.net.training_loss(x)
        self.log("train/mse", loss, on_epoch=True, on_step=False, batch_size=len(x), prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x = batch[0]
        error = self.net.reconstruction_error(x).mean()
        self.log("val/mse", error, on_epoch=True, batch_size=len(x), prog_bar=True)

    @torch.no_grad()
    def score_series(self, series: np.ndarray, win_size: int, batch_size: int = 64) -> np.ndarray:
        """``series [N, V]`` (scaled) -> per-step scores ``[N]``, from the windows that tile it."""
        return tile_scores(lambda x: self.net.anomaly_score(x.to(self.device)), series, win_size, batch_size)

    @staticmethod
    def _place(scores: np.ndarray, window_scores: torch.Tensor, starts) -> None:
        values = window_scores.float().cpu().numpy()
        for s, v in zip(starts, values):
            scores[int(s):int(s) + len(v)] = v

    def on_test_start(self) -> None:
        self._test_scores = np.zeros(len(self.trainer.datamodule.test_series))

    def test_step(self, batch, batch_idx):
        x, _, starts = batch
        self._place(self._test_scores, self.net.anomaly_score(x), starts.tolist())

    def on_test_epoch_end(self) -> None:
        dm = self.trainer.datamodule
        scores = {"model": (self.score_series(dm.train_series, dm.win_size), self._test_scores)}
        if "zscore" in self.hparams.baselines:
            scores["zscore"] = (zscore_scores(dm.train_series), zscore_scores(dm.test_series))
        if "pca" in self.hparams.baselines:
            pca = PCAScorer(dm.splits["train"].data.numpy(), self.hparams.pca_variance)  # the training rows only
            scores["pca"] = (pca(dm.train_series), pca(dm.test_series))
        if "random" in self.hparams.baselines:
            draw = np.random.default_rng(0).random
            scores["random"] = (draw(len(dm.train_series)), draw(len(dm.test_series)))
        out, self.last_scores = {}, {}
        for name, (train, test) in scores.items():
            metrics = detection_metrics(train, test, dm.test_labels, self.hparams.anomaly_ratio, dm.segments)
            self.last_scores[name] = {"train": train, "test": test, "threshold": metrics["threshold"]}
            out.update({f"test/{name}/{k}": torch.tensor(v, dtype=torch.float32) for k, v in metrics.items()})
        self.log_dict(out)

    # -- export
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        info = self.data_info
        return raw_series_example(info["win_size"], info["n_in"], info["mean"], info["std"])

    def io_names(self) -> tuple[list[str], list[str]]:
        return ["series"], ["score"]

    # -- plots
    def make_plots(self, datamodule, folder: str | Path) -> list[Path]:
        """``anomaly_scores.png`` and the data it shows, ``anomaly_scores.csv`` (per test step:
        label, then each scorer's score and prediction at its threshold)."""
        if "model" not in self.last_scores:
            return []
        import pandas as pd

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        table = {"label": datamodule.test_labels}
        for name, s in self.last_scores.items():
            table[f"{name}_score"] = s["test"]
            table[f"{name}_pred"] = (s["test"] > s["threshold"]).astype(int)
        pd.DataFrame(table).rename_axis("step").to_csv(folder / "anomaly_scores.csv")
        model = self.last_scores["model"]
        return [anomaly_plot(model["test"], model["threshold"], datamodule.test_labels,
                             f"{type(self.net).__name__} on {datamodule.source}", folder / "anomaly_scores.png"),
                folder / "anomaly_scores.csv"]


def anomaly_plot(scores: np.ndarray, threshold: float, labels: np.ndarray, title: str, path: Path) -> Path:
    """Test scores (log scale) with the threshold and the labelled anomalies shaded."""
    fig, ax = plotting.new_figure(11, 3.5)
    steps = np.arange(len(scores))
    ax.plot(steps, np.maximum(scores, 1e-6), color="tab:blue", linewidth=0.7, label="score")
    ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1, label="threshold")
    for i, (start, end) in enumerate(label_segments(labels)):
        ax.axvspan(start - 0.5, end - 0.5, color="tab:orange", alpha=0.3, linewidth=0,
                   label="labelled anomaly" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("test step")
    ax.set_ylabel("reconstruction error")
    ax.set_title(f"{title}: anomaly scores on the test rows")
    ax.legend(loc="upper right")
    return plotting.save(fig, path)
