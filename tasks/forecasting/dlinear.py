"""DLinear: a moving-average trend/seasonal split and one linear map of the lookback for each.

Zeng, Chen, Zhang, Xu, "Are Transformers Effective for Time Series Forecasting?" (AAAI 2023):
the baseline of the long-term forecasting tables. Plain ``torch.nn`` (no Lightning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqapps.errors import InputError


def moving_average(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The trend: a centred moving average over time with the ends repeated so that the length
    is kept. ``x [B, T, C]`` -> ``[B, T, C]``."""
    front, back = (kernel_size - 1) // 2, kernel_size - 1 - (kernel_size - 1) // 2
    padded = torch.cat([x[:, :1].expand(-1, front, -1), x, x[:, -1:].expand(-1, back, -1)], dim=1)
    return F.avg_pool1d(padded.transpose(1, 2), kernel_size, stride=1).transpose(1, 2)


class DLinear(nn.Module):
    """``x [B, seq_len, n_in]`` -> ``[B, pred_len, n_out]``: ``x = seasonal + trend``, each mapped
    from ``seq_len`` to ``pred_len`` by its own linear layer, the two forecasts summed.

    Channel independent: the same two layers for every channel (``individual=False``, the
    paper's default), or one pair per channel (``individual=True``). For ``n_out < n_in``
    (features ``MS``) the last ``n_out`` channels are returned. The weights start at
    ``1 / seq_len`` (each output the lookback's mean), as in the reference code.
    """

    def __init__(self, seq_len: int, pred_len: int, n_in: int = 1, n_out: int = 1,
                 kernel_size: int = 25, individual: bool = False):
        super().__init__()
        if n_out not in (1, n_in):
            raise InputError(f"DLinear: n_out={n_out} with n_in={n_in}; n_out must be 1 (MS) or n_in (S, M)")
        if kernel_size < 1:
            raise InputError(f"DLinear: kernel_size={kernel_size}; the moving average needs kernel_size >= 1")
        self.seq_len, self.pred_len, self.n_in, self.n_out = seq_len, pred_len, n_in, n_out
        self.kernel_size, self.individual = kernel_size, individual
        shape = (n_in if individual else 1, pred_len, seq_len)
        self.seasonal_weight = nn.Parameter(torch.full(shape, 1.0 / seq_len))
        self.trend_weight = nn.Parameter(torch.full(shape, 1.0 / seq_len))
        bound = seq_len ** -0.5  # nn.Linear's default bias initialisation
        self.seasonal_bias = nn.Parameter(torch.empty(shape[:2]).uniform_(-bound, bound))
        self.trend_bias = nn.Parameter(torch.empty(shape[:2]).uniform_(-bound, bound))

    def decompose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, C]`` -> ``(seasonal, trend)``, each ``[B, T, C]``, summing to ``x``."""
        trend = moving_average(x, self.kernel_size)
        return x - trend, trend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != self.seq_len or x.shape[2] != self.n_in:
            raise InputError(f"DLinear expects x of shape [batch, {self.seq_len}, {self.n_in}], "
                             f"got {list(x.shape)}")
        seasonal, trend = self.decompose(x)
        # [B, T, C] with weights [C or 1, H, T] -> [B, H, C]
        y = (torch.einsum("btc,cht->bhc", seasonal, self.seasonal_weight.expand(self.n_in, -1, -1))
             + torch.einsum("btc,cht->bhc", trend, self.trend_weight.expand(self.n_in, -1, -1))
             + (self.seasonal_bias + self.trend_bias).expand(self.n_in, -1).T)
        return y[..., self.n_in - self.n_out:].contiguous()  # [B, H, n_out]
