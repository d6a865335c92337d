"""Optimizers and learning-rate schedulers from config specs.

``optimizer: {_target_: torch.optim.AdamW, lr: 1e-3, weight_decay: 0.01}``
``scheduler: {_target_: torch.optim.lr_scheduler.CosineAnnealingLR, T_max: 10, interval: epoch}``
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from seqapps.errors import InputError
from seqapps.tasks.build import locate


def build_optimizer(spec: Mapping, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise InputError("the optimizer has no trainable parameter: the freezing policy froze them all")
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    return locate(spec["_target_"])(params, **kwargs)


def build_scheduler(spec: Mapping | None, optimizer: torch.optim.Optimizer) -> dict | None:
    """A Lightning ``lr_scheduler`` dict, or ``None`` when no scheduler is configured."""
    if not spec:
        return None
    kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "interval", "monitor")}
    scheduler = locate(spec["_target_"])(optimizer, **kwargs)
    out = {"scheduler": scheduler, "interval": spec.get("interval", "epoch")}
    if "monitor" in spec:
        out["monitor"] = spec["monitor"]
    return out
