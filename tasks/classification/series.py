"""Time-series classification: Chimera (Behrouz et al., 2024) or any seqapps stack over a
multivariate series, mean-pooled, then a linear head; and the LightningModule that trains it on
:mod:`seqapps.tasks.classification.series_data` (accuracy as the UEA/UCR archives report it:
the share of the official test cases classified right).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from seqapps.tasks.base import raw_series_example
from seqapps.tasks.classification.module import ClassifyModule
from seqapps.tasks.forecasting.chimera import SeriesEncoder
from seqapps.tasks.standardised import Standardised


class SeriesClassifier(nn.Module):
    """``x [B, T, V] -> logits [B, num_classes]``: :class:`SeriesEncoder` (Chimera's grid by
    default), the mean of every token (over variates and time), dropout, a linear head.

    Args:
        num_variates, num_classes: from the data.
        seq_len: the (padded) length; kept for the export's example input.
        backbone, patch_len, layout: as :class:`SeriesEncoder` (``backbone.mixer.cross_variate=false``
            is the ablation without the cross-variate path).
    """

    def __init__(self, num_variates: int, num_classes: int, seq_len: int, backbone: nn.Module | Mapping | None = None,
                 patch_len: int = 1, layout: str = "auto", dropout: float = 0.1):
        super().__init__()
        self.num_variates, self.num_classes, self.seq_len = num_variates, num_classes, seq_len
        self.encoder = SeriesEncoder(num_variates, backbone, patch_len, layout)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, V]`` -> pooled features ``[B, D]``."""
        tokens = self.encoder(x)
        return tokens.flatten(1, -2).mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward_features(x)))


class ChannelStandardised(Standardised):
    """``net`` on raw series: ``x [B, T, C]`` standardised per channel with the training
    statistics, missing values (NaN) set to the channel mean, as in training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = self.standardise(x)
        return self.net(torch.where(torch.isnan(scaled), torch.zeros_like(scaled), scaled))


class ClassifySeries(ClassifyModule):
    """:class:`ClassifyModule` for series: the same training, accuracy and confusion matrix;
    exports :class:`ChannelStandardised` (per-channel statistics) with a ``[B, T, C]`` input."""

    export_wrapper = ChannelStandardised

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        info = self.data_info
        return raw_series_example(info["seq_len"], info["num_variates"], info["mean"], info["std"])

    def io_names(self) -> tuple[list[str], list[str]]:
        return ["series"], ["logits"]
