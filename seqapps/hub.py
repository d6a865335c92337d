"""Loading export folders in plain PyTorch: no Lightning, no Hydra.

An export folder holds ``config.yaml`` (the model as a ``_target_`` spec, and what it needs
to know of its data), ``model.safetensors``, ``model.onnx`` and a model card ``README.md``;
the folder of a recurrent model also holds ``step.onnx``, one ``step`` with the state as
explicit inputs and outputs (its first state: ``load(folder).init_state(batch)``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from seqapps.errors import InputError


def read_export_config(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / "config.yaml"
    if not path.is_file() or not (folder / "model.safetensors").is_file():
        raise InputError(f"'{folder}' is not an export folder (it needs config.yaml and "
                         "model.safetensors); make one with `seqapps export run=<run folder>`")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise InputError(f"'{path}' is not readable YAML ({str(error).splitlines()[0]}); "
                         "export the run again") from None
    if not isinstance(config, dict) or "model" not in config:
        raise InputError(f"'{path}' has no 'model' entry; it was not written by `seqapps export`")
    return config


def load(folder: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The exported model, weights loaded, in eval mode; ``model.seqapps_config`` holds the
    export's ``config.yaml`` (data columns, lookback, horizon, scaling, metrics)."""
    from seqapps.tasks.build import instantiate

    config = read_export_config(folder)
    model = instantiate(config["model"])
    weights = Path(folder) / "model.safetensors"
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except (SafetensorError, RuntimeError) as error:  # a damaged file, or weights of another model
        raise InputError(f"'{weights}' does not load into the model of config.yaml "
                         f"({str(error).strip().splitlines()[0][:160]}); export the run again") from None
    model.seqapps_config = config
    return model.to(device).eval()
