"""Choosing an implementation (``backend=``) and checking shapes, shared by every op."""

from __future__ import annotations

import os

import torch

from seqapps.errors import InputError

BACKENDS = ("auto", "recurrent", "chunk", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """The implementation to run: ``auto`` picks ``triton`` for CUDA tensors and ``chunk``
    elsewhere; ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` (how CI tests it)."""
    if backend not in BACKENDS:
        raise InputError(f"backend='{backend}' is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        on_cuda = all(t.is_cuda for t in tensors if t is not None)
        return "triton" if on_cuda and triton_available() else "chunk"
    if backend == "triton":
        if not triton_available():
            raise InputError("backend='triton' needs the triton package (it comes with torch on Linux)")
        on_cuda = all(t.is_cuda for t in tensors if t is not None)
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise InputError("backend='triton' on CPU tensors runs only under TRITON_INTERPRET=1 "
                             "(set it before importing triton); use backend='chunk' on the CPU")
    return backend


def expect_shape(name: str, tensor: torch.Tensor | None, shape: tuple, layout: str) -> None:
    """Raise one line if ``tensor`` (when given) does not have ``shape`` (``None`` = any size)."""
    if tensor is None:
        return
    ok = tensor.ndim == len(shape) and all(s is None or s == d for s, d in zip(shape, tensor.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise InputError(f"{name} has shape {list(tensor.shape)}; expected {want} ({layout})")
