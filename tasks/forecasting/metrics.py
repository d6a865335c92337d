"""The forecasting field's metrics: MSE and MAE (torchmetrics), and sTPE between coefficients."""

from __future__ import annotations

import torch
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection


def forecast_metrics(prefix: str = "") -> MetricCollection:
    """MSE and MAE, averaged over every forecast value (batch, horizon, channel)."""
    return MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError()}, prefix=prefix)


def stpe(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """Symmetric total percentage error, in percent (AR-Net paper):
    ``100 · Σ|ŵ - w| / Σ(|ŵ| + |w|)``; 0 for equal weights, 100 for disjoint supports."""
    estimate, reference = torch.as_tensor(estimate).double(), torch.as_tensor(reference).double()
    return float(100.0 * (estimate - reference).abs().sum() / (estimate.abs() + reference.abs()).sum())
