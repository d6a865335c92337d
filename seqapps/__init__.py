"""seqapps: state-space models and linear RNNs, put to work across domains.

Importing ``seqapps`` is light: it pulls in neither Lightning nor Hydra, so that
``seqapps.load(folder)`` serves exported models in plain PyTorch.
"""

from seqapps.errors import InputError

__version__ = "0.1.0"
__all__ = ["InputError", "load", "__version__"]


def load(folder, device="cpu"):
    """Load an export folder (``config.yaml`` + ``model.safetensors``) as an eval-mode module.

    Imports neither Lightning nor Hydra. See :func:`seqapps.hub.load`.
    """
    from seqapps.hub import load as _load

    return _load(folder, device=device)
