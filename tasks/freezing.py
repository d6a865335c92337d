"""Fine-tuning: which parameters train (freezing policies), and loading pretrained weights
into a model whose head may have a different size.

A model that supports the policies exposes ``backbone`` and ``head`` submodules.

* ``full``: every parameter trains.
* ``frozen_backbone``: ``backbone`` is frozen; everything else (embeddings, head, ...) trains.
* ``head_only``: only ``head`` trains.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from seqapps.errors import InputError

POLICIES = ("full", "frozen_backbone", "head_only")


def apply_freezing(model: nn.Module, policy: str) -> dict[str, int]:
    """Set ``requires_grad`` by policy; returns the counts of trainable and frozen parameters."""
    if policy not in POLICIES:
        raise InputError(f"freeze='{policy}' is not a policy; choose one of {', '.join(POLICIES)}")
    if policy != "full":
        for part in ("backbone", "head"):
            if not isinstance(getattr(model, part, None), nn.Module):
                raise InputError(f"freeze='{policy}' needs a model with a '{part}' submodule; "
                                 f"{type(model).__name__} has none (use freeze=full)")
    for p in model.parameters():
        p.requires_grad_(policy != "head_only")
    if policy == "frozen_backbone":
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    if policy == "head_only":
        for p in model.head.parameters():
            p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen}


def load_matching(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy every tensor of ``state`` whose name and shape match; the rest of the model keeps
    its fresh initialisation (a new head when the output size differs)."""
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise InputError("the pretrained weights share no tensor of the same name and shape with "
                         "this model; is it the same architecture?")
    model.load_state_dict(matching, strict=False)
    return {"loaded": sorted(matching),
            "reinitialised": sorted(k for k in own if k not in matching),
            "unused": sorted(k for k in state if k not in matching)}
