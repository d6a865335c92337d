"""Samplers, and the checks of the loader options, shared by the tasks' data modules."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from seqapps.errors import InputError


class EpochSeededSampler(Sampler[int]):
    """A random permutation per epoch from ``seed + epoch``, so a run resumed from a checkpoint
    sees the same batches as one that never stopped (Lightning calls ``set_epoch``)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def expect_loader_options(batch_size, num_workers) -> None:
    """Raise one line unless ``data.batch_size`` is a positive and ``data.num_workers`` a
    non-negative integer: checked when the data is loaded, before any run folder is written (the
    DataLoader would refuse them only once training has started)."""
    for option, value, minimum in (("data.batch_size", batch_size, 1), ("data.num_workers", num_workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InputError(f"{option}={value!r}; expected an integer of at least {minimum}")
