"""Reversible instance normalisation (Kim et al., 2022, "Reversible Instance Normalization for
Accurate Time-Series Forecasting against Distribution Shift"): each window standardised by its
own lookback statistics per channel, the forecast mapped back with them. Shared by the patch
forecaster, Chimera and AutoTimes."""

from __future__ import annotations

import torch
from torch import nn

from seqapps.errors import InputError


def lookback_stats(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, T, C]`` -> ``(mean, std)``, each ``[B, 1, C]``, over time, detached (statistics, not
    parameters). A constant lookback has std ``sqrt(eps)``: the division stays finite and the
    forecast comes back at the series' level."""
    mean = x.mean(1, keepdim=True).detach()
    std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + eps).detach()
    return mean, std


class RevIN(nn.Module):
    """``normalize(x [B, T, C])`` subtracts each series' lookback mean, divides by its std, then
    applies an optional learned per-channel affine map; ``denormalize(y [B, H, C'])`` undoes both
    with those statistics. ``C' <= C``: the forecast of the last ``C'`` channels (features MS)."""

    def __init__(self, n_channels: int = 0, affine: bool = False, eps: float = 1e-5):
        super().__init__()
        if affine and n_channels < 1:
            raise InputError(f"RevIN: affine=True needs the number of channels, got n_channels={n_channels}")
        self.eps, self.affine = eps, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(n_channels))
            self.bias = nn.Parameter(torch.zeros(n_channels))

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x [B, T, C]`` -> ``(x_norm [B, T, C], (mean, std) [B, 1, C])``."""
        stats = lookback_stats(x, self.eps)
        return self.apply_stats(x, stats), stats

    def apply_stats(self, x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x [B, T, C]`` normalised with given statistics (e.g. a window's future with its lookback's)."""
        mean, std = stats
        x = (x - mean) / std
        return x * self.weight + self.bias if self.affine else x

    def denormalize(self, y: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``y [B, H, C']`` in the normalised space -> the series' own units."""
        mean, std = (s[..., -y.shape[-1]:] for s in stats)
        if self.affine:
            weight, bias = self.weight[-y.shape[-1]:], self.bias[-y.shape[-1]:]
            y = (y - bias) / (weight + self.eps * self.eps)
        return y * std + mean
