"""The LightningModule every task builds on: the model from a plain spec, optimizers from
config, freezing policies, the data facts a checkpoint must carry, and the export hooks."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from seqapps.tasks.build import instantiate, to_plain
from seqapps.tasks.freezing import apply_freezing
from seqapps.tasks.optim import build_optimizer, build_scheduler


def class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def raw_series_example(length: int, width: int, mean, std) -> tuple[torch.Tensor]:
    """An export example on the data's own scale: two random series ``[2, length, width]`` with the
    per-channel ``mean`` and ``std`` the exported module standardises with."""
    return (torch.randn(2, length, width) * torch.tensor(std) + torch.tensor(mean),)


class StandardisedExport:
    """Export for task modules whose exported graph is ``export_wrapper(net, mean, std, **extra)``:
    the net behind a standardisation with the training data's statistics (``data_info`` ``mean``,
    ``std``). Set ``export_wrapper`` on the subclass; ``export_extra()`` adds further arguments."""

    export_wrapper: type

    def export_extra(self) -> dict:
        """Further keyword arguments of ``export_wrapper`` (none by default)."""
        return {}

    def export_spec(self) -> dict:
        wrapper = self.export_wrapper
        return {"_target_": f"{wrapper.__module__}.{wrapper.__qualname__}", "net": self.hparams.net,
                "mean": self.data_info["mean"], "std": self.data_info["std"], **self.export_extra()}

    def export_module(self) -> nn.Module:
        return self.export_wrapper(self.net, self.data_info["mean"], self.data_info["std"], **self.export_extra())


class SeqappsModule(L.LightningModule):
    """Base of the task modules.

    Args:
        net: the model as a plain ``{_target_: ..., **kwargs}`` spec (kept in the checkpoint's
            hyper-parameters and written to export folders, so the model rebuilds without Hydra).
        optimizer / scheduler: specs for :mod:`seqapps.tasks.optim`.
        freeze: a policy of :mod:`seqapps.tasks.freezing`.
    """

    #: dotted path of ``fn(model, data_info, input_path) -> pandas.DataFrame`` for ``seqapps predict``
    predictor: str | None = None

    def __init__(self, net: Mapping, optimizer: Mapping, scheduler: Mapping | None = None,
                 freeze: str = "full"):
        super().__init__()
        self.save_hyperparameters({"net": to_plain(net), "optimizer": to_plain(optimizer),
                                   "scheduler": to_plain(scheduler), "freeze": freeze})
        self.net: nn.Module = instantiate(self.hparams.net)
        self.freeze_counts = apply_freezing(self.net, freeze)
        self.data_info: dict[str, Any] = {}

    # -- training plumbing
    def configure_optimizers(self):
        optimizer = build_optimizer(self.hparams.optimizer, self.parameters())
        scheduler = build_scheduler(self.hparams.scheduler, optimizer)
        return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is not None and hasattr(datamodule, "info"):
            self.data_info = datamodule.info()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        checkpoint["seqapps"] = {"module": class_path(self), "data_info": self.data_info,
                                 "datamodule": class_path(datamodule) if datamodule else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.data_info = checkpoint.get("seqapps", {}).get("data_info", {})

    # -- export (overridden by tasks)
    def export_spec(self) -> dict:
        """The deployable model as a plain ``_target_`` spec (``config.yaml`` of an export)."""
        return self.hparams.net

    def export_module(self) -> nn.Module:
        """The deployable ``nn.Module`` whose state dict matches :meth:`export_spec`."""
        return self.net

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Inputs for tracing the export (batch dimension first, dynamic in ONNX)."""
        raise NotImplementedError(f"{type(self).__name__} does not define example_inputs()")

    def io_names(self) -> tuple[list[str], list[str]]:
        return ["input"], ["output"]

    def make_plots(self, datamodule, folder: str | Path) -> list[Path]:
        """PNG plots of a trained model on its data; none by default."""
        return []
