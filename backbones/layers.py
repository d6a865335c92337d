"""Small layers shared by the mixers: a causal short convolution that streams, a gated
RMSNorm, and rotary position embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortConvolution(nn.Module):
    """Depthwise causal 1-D convolution over time (Mamba, DeltaNet, GLA, ...), optionally
    followed by SiLU. Its streaming state is the last ``kernel_size - 1`` inputs.

    ``x [B, T, C]`` (+ ``cache [B, C, kernel_size - 1]``) -> ``(y [B, T, C], new cache)``.
    """

    def __init__(self, channels: int, kernel_size: int = 4, activation: bool = True, bias: bool = True):
        super().__init__()
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=bias)

    def init_cache(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch_size, self.channels, self.kernel_size - 1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        xt = x.transpose(1, 2)  # [B, C, T]
        if cache is None:
            cache = self.init_cache(x.shape[0], x.device, x.dtype)
        if x.shape[1] == 0:  # an empty piece of a stream: nothing to convolve, the cache as it was
            return x.clone(), cache
        padded = torch.cat([cache.to(xt.dtype), xt], dim=-1)
        y = self.conv(padded).transpose(1, 2)
        new_cache = padded[..., padded.shape[-1] - (self.kernel_size - 1):]
        return (F.silu(y) if self.activation else y), new_cache

    def step(self, x_t: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t [B, C]`` -> ``(y_t [B, C], new cache)``."""
        window = torch.cat([cache.to(x_t.dtype), x_t.unsqueeze(-1)], dim=-1)  # [B, C, K]
        y = (window * self.conv.weight.squeeze(1)).sum(-1)
        if self.conv.bias is not None:
            y = y + self.conv.bias
        return (F.silu(y) if self.activation else y), window[..., 1:]


class GatedRMSNorm(nn.Module):
    """``RMSNorm(x) * silu(gate)`` over the last dimension (the output norm and gate of GLA,
    Mamba-2, Gated DeltaNet, ...)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        y = self.norm(x)
        return y if gate is None else y * F.silu(gate)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al.) on ``[B, T, H, D]`` at absolute positions
    ``offset .. offset + T - 1`` (``offset`` may be a tensor, for streaming)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
        t = x.shape[1]
        positions = torch.arange(t, device=x.device, dtype=torch.float32) + offset
        angles = positions[:, None] * self.inv_freq  # [T, D/2]
        cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
        x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        return rotated.to(x.dtype)
