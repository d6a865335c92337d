"""Build objects from plain ``{"_target_": "pkg.mod.Class", **kwargs}`` specs.

The small, Hydra-free counterpart of ``hydra.utils.instantiate``: tasks keep their model
specs as plain dicts (saved in checkpoints and export folders), and ``seqapps.load`` rebuilds
models from them without Hydra.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from seqapps.errors import InputError


def to_plain(value: Any) -> Any:
    """Recursively turn mappings and sequences (e.g. OmegaConf containers) into dicts/lists."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [to_plain(v) for v in value]
    return value


def locate(path: str) -> Any:
    """Import ``"pkg.mod.Name"`` and return ``Name``."""
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise InputError(f"_target_ '{path}' cannot be imported ({err}); give a dotted path such as "
                         "'seqapps.tasks.forecasting.model.ARNet'") from None


def instantiate(spec: Any) -> Any:
    """Build ``spec`` recursively: every mapping with a ``_target_`` becomes an object."""
    if isinstance(spec, Mapping):
        kwargs = {k: instantiate(v) for k, v in spec.items() if k != "_target_"}
        if "_target_" in spec:
            return locate(spec["_target_"])(**kwargs)
        return kwargs
    if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        return [instantiate(v) for v in spec]
    return spec
