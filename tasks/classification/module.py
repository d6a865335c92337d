"""The classification LightningModule: cross-entropy, accuracy and a confusion matrix
(torchmetrics), export of the network with the input standardisation inside."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from seqapps.tasks import plotting
from seqapps.tasks.base import SeqappsModule, StandardisedExport


class Standardised(nn.Module):
    """``net((x - mean) / std)``: a classifier on raw inputs ``[B, C, H, W]`` (or ``[B, T, C]``)."""

    def __init__(self, net: nn.Module, mean: float, std: float):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    # -- streaming, when the net streams (an image backbone column by column)
    @property
    def streams(self) -> bool:
        return bool(getattr(self.net, "streams", False))

    def init_state(self, batch_size: int, device=None, dtype=None) -> tuple[torch.Tensor, ...]:
        return self.net.init_state(batch_size, device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One raw piece ``x_t`` (a column of patches ``[B, C, H, p]`` for an image backbone)."""
        return self.net.step((x_t - self.mean) / self.std, state)


class ClassifyModule(StandardisedExport, SeqappsModule):
    """Train ``net: x -> logits [B, num_classes]`` with cross-entropy (label smoothing optional)."""

    export_wrapper = Standardised

    def __init__(self, net: Mapping, optimizer: Mapping, scheduler: Mapping | None = None,
                 freeze: str = "full", label_smoothing: float = 0.0):
        super().__init__(net, optimizer, scheduler, freeze)
        self.save_hyperparameters({"label_smoothing": label_smoothing})
        num_classes = self.hparams.net.get("num_classes")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.confusion = MulticlassConfusionMatrix(num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, on_epoch=True, on_step=False, batch_size=len(x), sync_dist=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.val_acc.update(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), batch_size=len(x), sync_dist=True)
        self.log("val/acc", self.val_acc, batch_size=len(x), prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.test_acc.update(logits, y)
        self.confusion.update(logits, y)
        self.log("test/model/acc", self.test_acc, batch_size=len(x))

    # -- export
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        info = self.data_info
        return (torch.rand(2, info["in_chans"], info["img_size"], info["img_size"]),)

    def io_names(self) -> tuple[list[str], list[str]]:
        return ["images"], ["logits"]

    def example_step_inputs(self) -> torch.Tensor | None:
        """The example images as the pieces ``step`` takes, ``[B, n, ...]`` (columns of patches),
        or ``None`` when the net does not stream (``step.onnx`` is written only when it does)."""
        if not getattr(self.net, "streams", False):
            return None
        return self.net.image_columns(self.example_inputs()[0])

    # -- plots
    @torch.no_grad()
    def make_plots(self, datamodule, folder: str | Path) -> list[Path]:
        self.confusion.reset()
        model = self.net.eval()
        for x, y in datamodule.test_dataloader():
            self.confusion.update(model(x.to(self.device)), y.to(self.device))
        matrix = self.confusion.compute().cpu().numpy()
        names = self.data_info.get("class_names") or [str(i) for i in range(len(matrix))]
        fig, ax = plotting.new_figure(5.5, 5.0)
        ax.imshow(matrix, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, int(count), ha="center", va="center", fontsize=7,
                        color="white" if count > matrix.max() / 2 else "black")
        ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 12 else 0)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        accuracy = matrix.trace() / max(1, matrix.sum())
        ax.set_title(f"test confusion matrix — accuracy {accuracy:.3f}")
        return [plotting.save(fig, Path(folder) / "confusion_matrix.png")]
