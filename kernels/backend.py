"""Choosing an implementation (``backend=``) and checking shapes, shared by every op."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from seqapps.errors import InputError

BACKENDS = ("auto", "recurrent", "chunk", "cpu", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, *tensors: torch.Tensor, cpu_kernel: Callable[[], bool] | None = None) -> str:
    """The implementation to run. ``auto`` picks ``triton`` for CUDA tensors; on the CPU the op's
    fused C kernel (``cpu``) when it has one (``cpu_kernel`` says whether it is built here), the
    inputs are not float64 and nothing is being traced by ``torch.compile``/``torch.export``;
    ``chunk`` otherwise. ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` (how CI tests it)."""
    if backend not in BACKENDS:
        raise InputError(f"backend='{backend}' is not one of {', '.join(BACKENDS)}")
    given = [t for t in tensors if t is not None]
    on_cuda = all(t.is_cuda for t in given)
    if backend == "auto":
        if on_cuda and triton_available():
            return "triton"
        tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
        usable = cpu_kernel is not None and not tracing and all(t.device.type == "cpu" for t in given)
        return "cpu" if usable and given[0].dtype != torch.float64 and cpu_kernel() else "chunk"
    if backend == "cpu":
        if cpu_kernel is None:
            raise InputError("backend='cpu' (a fused C kernel) exists for gated_linear_attention only; use 'chunk'")
        if any(t.device.type != "cpu" for t in given):
            raise InputError("backend='cpu' needs CPU tensors; use 'triton' or 'auto' on a GPU")
        if given[0].dtype == torch.float64:
            raise InputError("backend='cpu' computes in float32; float64 inputs go to backend='chunk'")
        if not cpu_kernel():
            raise InputError("backend='cpu': the C kernel could not be built here (no C compiler, or "
                             "SEQAPPS_CPU_KERNELS=0); use backend='chunk'")
    if backend == "triton":
        if not triton_available():
            raise InputError("backend='triton' needs the triton package (it comes with torch on Linux)")
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


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """What the kernels accumulate in for inputs like ``x``: float64 for float64, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def expect_tensors(layout: str, **tensors: torch.Tensor | None) -> None:
    """Raise one line unless each given input (``None``: not given) is a floating-point tensor."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise InputError(f"{name} is a {type(tensor).__name__}; expected a torch.Tensor ({layout})")
        if not tensor.is_floating_point():
            raise InputError(f"{name} has dtype {tensor.dtype}; expected floating point (float32, bfloat16, "
                             "float16 or float64)")


def expect_chunk_size(chunk_size) -> None:
    """Raise one line unless ``chunk_size`` is a positive integer."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"chunk_size={chunk_size!r}; expected a positive integer (64 is a good default)")


def expect_state_dims(layout: str, **dims: int) -> None:
    """Raise one line if a dimension of the state (``K=...``, ``V=...``, ``N=...``) is 0: there is
    no state to carry."""
    empty = [f"{name}={size}" for name, size in dims.items() if size < 1]
    if empty:
        raise InputError(f"{', '.join(empty)}: the state's dimensions must be at least 1 ({layout})")


def nothing_to_scan(output: torch.Tensor, initial_state: torch.Tensor | None, state_shape: tuple,
                    output_final_state: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The result of an op over no time steps, an empty batch or no heads: ``output``, the empty
    output (copied, so that it stays in the autograd graph of the input it was taken from), and,
    when asked, the state unchanged: a copy of ``initial_state`` (zeros ``state_shape`` when
    absent) in the accumulation dtype, float32 (float64 for float64 inputs), as the backends give."""
    acc = accumulation_dtype(output)
    if not output_final_state:
        return output.clone(), None
    if initial_state is None:
        return output.clone(), torch.zeros(state_shape, dtype=acc, device=output.device)
    return output.clone(), initial_state.to(acc, copy=True)
