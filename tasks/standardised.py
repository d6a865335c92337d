"""The exported modules' common part: a net behind the training data's per-channel scaling.

Kept apart from the task modules (no Lightning import): ``seqapps.load`` of an export imports
this and nothing heavy."""

from __future__ import annotations

import torch
from torch import nn


class Standardised(nn.Module):
    """``net`` behind the training data's per-channel standardisation: the common part of the
    exported modules that take raw series ``[B, T, C]`` (subclasses say what ``forward`` returns)."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
