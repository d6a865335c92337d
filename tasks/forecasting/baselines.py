"""Baselines on the same windows as the models, as ``nn.Module``s with the models' signature
``x [B, seq_len, C_in] -> [B, pred_len, C_out]`` (scaled data), so one loop scores them all.
"""

from __future__ import annotations

import torch
from torch import nn

from seqapps.errors import InputError
from seqapps.tasks.forecasting.model import ARNet


class SeasonalNaive(nn.Module):
    """Repeat the last season: ``ŷ_{t+h} = y_{t+h-m·⌈h/m⌉}`` for period ``m`` (``m=1``: naive)."""

    def __init__(self, period: int, pred_len: int, n_out: int = 1):
        super().__init__()
        self.period, self.pred_len, self.n_out = period, pred_len, n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.period > x.shape[1]:
            raise InputError(f"seasonal naive: period {self.period} is longer than the lookback "
                             f"{x.shape[1]}; use data.seq_len >= the period")
        last_season = x[:, x.shape[1] - self.period:, x.shape[2] - self.n_out:]
        reps = -(-self.pred_len // self.period)
        return last_season.repeat(1, reps, 1)[:, :self.pred_len].contiguous()  # [B, pred_len, n_out]


@torch.no_grad()
def classic_ar(x: torch.Tensor, y: torch.Tensor, n_out: int) -> ARNet:
    """Classic-AR: the linear AR-Net with its weights from ordinary least squares (float64,
    with an intercept) on windows ``x [N, p, C_in]``, ``y [N, h, C_out]``."""
    model = ARNet(n_lags=x.shape[1], n_forecasts=y.shape[1], n_in=x.shape[2], n_out=n_out)
    feats = model.lag_features(x.double())
    design = torch.cat([feats, torch.ones(len(feats), 1, dtype=feats.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, model.target_rows(y.double()), driver="gelsd").solution
    model.head.weight.copy_(solution[:-1].T)
    model.head.bias.copy_(solution[-1])
    return model
