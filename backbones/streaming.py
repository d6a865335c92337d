"""Streaming a mixer (or any module with ``step``/``init_state``) with its state as explicit
tensors: the form that ``torch.export`` and ONNX take for one-token inference."""

from __future__ import annotations

import torch
from torch import nn


class StepModule(nn.Module):
    """``forward(x_t, *state) -> (y_t, *new_state)`` around ``module.step``, so the state is a
    list of plain tensor inputs and outputs (``x_t [B, C]``)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x_t: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y_t, new_state = self.module.step(x_t, tuple(state))
        return (y_t, *new_state)


def run_steps(module: nn.Module, x: torch.Tensor, state=None) -> tuple[torch.Tensor, tuple]:
    """``x [B, T, C]`` token by token through ``module.step``: ``(y [B, T, C], final state)``."""
    if state is None:
        state = module.init_state(x.shape[0], device=x.device, dtype=x.dtype)
    outputs = []
    for t in range(x.shape[1]):
        y_t, state = module.step(x[:, t], state)
        outputs.append(y_t)
    return torch.stack(outputs, 1), state
