"""Token mixers, blocks, multi-dimensional scans and stacks (built on ``seqapps.kernels``).

``ImageBackbone`` is imported on first use (it needs timm, and importing
``seqapps.backbones.image`` registers the ``seqapps_<mixer>_tiny`` models with timm).
"""

from seqapps.backbones.block import GLU, MLP, Block, DropPath, build_mixer_from_spec, make_norm, mixer_name
from seqapps.backbones.mixer import Mixer, available_mixers, build_mixer, mixer_class, register_mixer
from seqapps.backbones.scan import (
    DIRECTIONS,
    ORDERS,
    GridScan,
    inverse_permutation,
    scan_order,
    scan_paths,
    scan_permutation,
)
from seqapps.backbones.stack import SequenceStack
from seqapps.backbones.streaming import StepModule, run_steps

__all__ = [
    "DIRECTIONS", "GLU", "MLP", "ORDERS", "Block", "DropPath", "GridScan", "ImageBackbone", "Mixer",
    "SequenceStack", "StepModule", "available_mixers", "build_mixer", "build_mixer_from_spec",
    "inverse_permutation", "make_norm", "mixer_class", "mixer_name", "register_mixer", "run_steps",
    "scan_order", "scan_paths", "scan_permutation",
]


def __getattr__(name: str):
    if name == "ImageBackbone":
        from seqapps.backbones.image import ImageBackbone

        return ImageBackbone
    raise AttributeError(f"module 'seqapps.backbones' has no attribute '{name}'")
