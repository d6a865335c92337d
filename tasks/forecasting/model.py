"""Forecasting models: AR-Net (Triebe et al., 2019) and the scaling wrapper used for export.

Plain ``torch.nn`` (no Lightning), so that ``seqapps.load`` can rebuild them alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from seqapps.errors import InputError
from seqapps.tasks.standardised import Standardised


class ARNet(nn.Module):
    """AR-Net: ``p`` lags in, ``n_forecasts`` steps out; linear unless ``hidden`` is given.

    Shapes: ``x [B, n_lags, n_in]`` (oldest first, as in a window) -> ``[B, n_forecasts, n_out]``.

    * ``n_in == n_out`` (features ``S`` or ``M``): one AR model shared by every channel
      (channel independence).
    * ``n_out == 1 < n_in`` (features ``MS``): the target's forecast from the lags of every
      variable (lagged regressors).

    The first layer's weights are the AR coefficients (lag 1 first); the paper's sparsity
    regulariser acts on them (:meth:`sparsity_penalty`).
    """

    def __init__(self, n_lags: int, n_forecasts: int = 1, n_in: int = 1, n_out: int = 1,
                 hidden: Sequence[int] = (), bias: bool = True):
        super().__init__()
        if n_out not in (1, n_in):
            raise InputError(f"ARNet: n_out={n_out} with n_in={n_in}; n_out must be 1 (MS) or n_in (S, M)")
        self.n_lags, self.n_forecasts, self.n_in, self.n_out = n_lags, n_forecasts, n_in, n_out
        self.mixes_channels = n_in != n_out
        width = n_lags * (n_in if self.mixes_channels else 1)
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h, bias=bias), nn.ReLU()]
            width = h
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_forecasts, bias=bias)

    def first_layer(self) -> nn.Linear:
        return self.backbone[0] if len(self.backbone) else self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != self.n_lags or x.shape[2] != self.n_in:
            raise InputError(f"ARNet expects x of shape [batch, {self.n_lags}, {self.n_in}], "
                             f"got {list(x.shape)}")
        return self.to_outputs(self.head(self.backbone(self.lag_features(x))), x.shape[0])

    def lag_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, n_lags, n_in]`` -> rows of lags, lag 1 first: ``[B, n_lags * n_in]`` (MS,
        index ``lag * n_in + channel``) or ``[B * n_in, n_lags]`` (one row per channel)."""
        b = x.shape[0]
        lags = x.flip(1)
        if self.mixes_channels:
            return lags.reshape(b, self.n_lags * self.n_in)
        return lags.permute(0, 2, 1).reshape(b * self.n_in, self.n_lags)

    def to_outputs(self, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Rows ``[B or B * n_out, n_forecasts]`` (as :meth:`lag_features` laid them out) ->
        ``[B, n_forecasts, n_out]``."""
        if self.mixes_channels:
            return rows.unsqueeze(-1)
        return rows.reshape(batch_size, self.n_out, self.n_forecasts).permute(0, 2, 1).contiguous()

    def target_rows(self, y: torch.Tensor) -> torch.Tensor:
        """``y [B, n_forecasts, n_out]`` laid out as the rows of :meth:`to_outputs`."""
        return y.permute(0, 2, 1).reshape(-1, self.n_forecasts)

    def coefficients(self) -> torch.Tensor:
        """The AR coefficients, ``[n_forecasts, n_lags]`` (``[n_forecasts, n_lags, n_in]`` for
        MS), lag 1 first. Only the linear AR-Net has them."""
        if len(self.backbone):
            raise InputError("ARNet.coefficients(): a model with hidden layers has no AR coefficients; "
                             "use hidden=[] for the interpretable linear AR-Net")
        w = self.head.weight.detach()
        return w.reshape(self.n_forecasts, self.n_lags, self.n_in) if self.mixes_channels else w

    def sparsity_penalty(self, c1: float = 3.0, c2: float = 3.0) -> torch.Tensor:
        """``R(θ) = 1/p Σ_i [2 / (1 + exp(-c1 |θ_i|^(1/c2))) - 1]`` over the first layer."""
        return sparsity_penalty(self.first_layer().weight, c1, c2)


def sparsity_penalty(weights: torch.Tensor, c1: float = 3.0, c2: float = 3.0) -> torch.Tensor:
    """AR-Net's regulariser: near-L0 for small weights, saturating for large ones; mean over
    the weights (the paper's ``1/p Σ``)."""
    zero = weights == 0  # |θ|^(1/c2) has an infinite slope at 0: keep its gradient finite there
    magnitude = torch.where(zero, 0.0, torch.where(zero, 1.0, weights.abs()) ** (1.0 / c2))
    return (2.0 / (1.0 + torch.exp(-c1 * magnitude)) - 1.0).mean()


def sparsity_lambda(sparsity: float, c_lambda: float = 0.02) -> float:
    """``λ(s) = c_λ (1/s - 1)`` for an estimated fraction ``s`` of non-zero coefficients."""
    if not 0 < sparsity <= 1:
        raise InputError(f"regularizer.sparsity={sparsity}: the estimated fraction of non-zero "
                         "coefficients must be in (0, 1]")
    return c_lambda * (1.0 / sparsity - 1.0)


class ScaledForecaster(Standardised):
    """A forecaster in original units: standardise the history with the training statistics,
    forecast, and undo the scaling of the target channels.

    ``history [B, seq_len, C_in]`` -> ``forecast [B, pred_len, C_out]``; ``net`` is any model
    with that signature on the scaled data (``C_out`` last channels of ``C_in`` are targets).
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], n_out: int = 1):
        super().__init__(net, mean, std)
        self.n_out = n_out

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        out = self.net(self.standardise(history))
        return out * self.std[-self.n_out:] + self.mean[-self.n_out:]


class ScaledScorer(Standardised):
    """Raw windows ``x [B, T, V]`` -> anomaly scores ``[B, T]``: the training scaling, then the
    reconstructor's ``anomaly_score`` (the export of the anomaly task; its threshold is in
    ``config.yaml``'s metrics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.anomaly_score(self.standardise(x))
