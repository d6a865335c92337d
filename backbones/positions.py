"""Absolute token positions for mixers whose layer depends on them (rotary positions in softmax
attention and in RetNet's retention): a position counter carried in the streaming state, and the
rotary embedding applied at per-sequence positions.

The counter is one float32 number per sequence, ``[B]``: a state is a tuple of tensors that
ONNX and ``torch.export`` see as plain inputs with the batch on axis 0, and every state tensor
of a mixer is of a floating type (the export harness fills states with random values, and an
integer tensor has no such values). Whole numbers up to ``2 ** 24`` (16.7 M tokens) are exact in
float32, as they are in ``RotaryEmbedding``'s own float32 angles. Readers round and clamp it,
so a counter that is not a whole number (a random test state) still means a valid position.
"""

from __future__ import annotations

import torch

from seqapps.backbones.layers import RotaryEmbedding


def init_position_counter(batch_size: int, device=None) -> torch.Tensor:
    """The counter before the first token: zeros ``[B]`` (float32)."""
    return torch.zeros(batch_size, device=device, dtype=torch.float32)


def start_positions(counter: torch.Tensor) -> torch.Tensor:
    """``counter [B]`` -> the position of the next token of each sequence ``[B]`` (float32, a whole
    number >= 0)."""
    return counter.float().round().clamp(min=0)


def token_positions(start: torch.Tensor, length: int) -> torch.Tensor:
    """``start [B]`` -> the positions ``[B, T]`` of ``length`` tokens that follow it."""
    return start[:, None] + torch.arange(length, device=start.device, dtype=start.dtype)


def rotate_at(rotary: RotaryEmbedding, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [B, T, H, D]`` at ``positions [B, T]`` (one row per sequence, so
    sequences of a batch may stand at different positions).

    ``RotaryEmbedding`` puts token ``i`` of its time axis at position ``i + offset``. The batch is
    laid out as one row of ``B·T`` tokens with ``offset = positions - i``, which puts every
    token at its own position; the arithmetic is on whole numbers and therefore exact.
    """
    b, t, h, d = x.shape
    flat_positions = positions.reshape(-1).float()
    offset = flat_positions - torch.arange(b * t, device=x.device, dtype=torch.float32)
    return rotary(x.reshape(1, b * t, h, d), offset).reshape(b, t, h, d)
