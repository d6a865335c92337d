"""Gated linear attention on the CPU through the fused C kernel ``kernels/cpu/gla.c``.

The chunked form of ``gla_chunk`` (same maths, same numerical safety; its docstring explains
both), computed one batch entry's heads (or a group of them) per thread, chunk by chunk, with a
chunk's temporaries in cache and its matmuls in a register-blocked loop that the compiler
vectorises for the machine; ``torch.get_num_threads()`` threads, PyTorch's own where the kernel
was built with OpenMP. Forward and backward are one ``torch.autograd.Function``; the forward
keeps the state entering each chunk (``[B, H, N, K, V]``, linear in ``T``) when a gradient will
be asked for.

Float32 arithmetic; bfloat16/float16 inputs are computed in float32 (as in ``gla_chunk``), and
the output comes back in the input dtype. Float64 inputs are for ``chunk`` (``auto`` sends them
there). ``available()`` says whether the kernel could be built here (``kernels/compiled.py``).
"""

from __future__ import annotations

import ctypes

import torch

from seqapps.errors import InputError
from seqapps.kernels.backend import expect_chunk_size
from seqapps.kernels.compiled import library

_BLOCK = 16  # rows per block inside a chunk (BLOCK in gla.c): chunks are a multiple of it
_PAD = 16    # key and value dims padded to a multiple of this in the kernel (kp, vp in gla.c's problem())


def _library() -> ctypes.CDLL | None:
    lib = library("gla")
    if lib is not None and not getattr(lib, "_seqapps_typed", False):
        ints, floats, pointers = [ctypes.c_int] * 7, [ctypes.c_float, ctypes.c_int], [ctypes.c_void_p]
        lib.gla_forward.argtypes = ints + floats + pointers * 8
        lib.gla_backward.argtypes = ints + floats + pointers * 12
        lib.gla_forward.restype = lib.gla_backward.restype = ctypes.c_int
        lib._seqapps_typed = True
    return lib


def available() -> bool:
    """Whether the fused kernel is built and loadable on this machine."""
    return _library() is not None


def gla_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
            initial_state: torch.Tensor | None = None, output_final_state: bool = False,
            chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``g [B, T, H, K]`` or ``[B, T, H]``,
    ``initial_state [B, H, K, V]`` or ``None`` -> ``(o [B, T, H, V], final_state [B, H, K, V] or
    None)``. ``chunk_size`` is rounded up to a multiple of 16 and capped at ``T`` so rounded."""
    expect_chunk_size(chunk_size)
    if _library() is None:
        raise InputError("gla_cpu: the C kernel could not be built here (no C compiler, or SEQAPPS_CPU_KERNELS=0); "
                         "use gla_chunk")
    length = q.shape[1]
    chunk = _round_up(min(chunk_size, max(length, 1)), _BLOCK)
    f32 = [x.to(torch.float32).contiguous() for x in (q, k, v, g)]
    state = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    out, final_state = _FusedGLA.apply(*f32, state, float(scale), chunk)
    return out.to(q.dtype), (final_state if output_final_state else None)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _FusedGLA(torch.autograd.Function):
    """float32, contiguous: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``g [B, T, H(, K)]``,
    ``initial_state [B, H, K, V]`` or ``None`` -> ``(o [B, T, H, V], final_state [B, H, K, V])``."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, chunk):
        lib = _library()
        batch, length, heads, key_dim = q.shape
        value_dim = v.shape[-1]
        n_chunks = -(-length // chunk)
        sizes = (batch, length, heads, key_dim, value_dim, int(g.ndim == 4), chunk, scale, torch.get_num_threads())
        out = q.new_empty(batch, length, heads, value_dim)
        final_state = q.new_empty(batch, heads, key_dim, value_dim)
        states = None
        if any(ctx.needs_input_grad[:5]):
            states = q.new_empty(batch, heads, n_chunks, _round_up(key_dim, _PAD), _round_up(value_dim, _PAD))
        status = lib.gla_forward(*sizes, *map(_pointer, (q, k, v, g, initial_state, out, states, final_state)))
        if status:
            raise MemoryError(f"gla CPU kernel: forward failed (status {status}: workspace or threads)")
        ctx.save_for_backward(q, k, v, g, states)
        ctx.sizes, ctx.has_initial = sizes, initial_state is not None
        return out, final_state

    @staticmethod
    def backward(ctx, d_out, d_final):
        q, k, v, g, states = ctx.saved_tensors
        grads = [torch.empty_like(x) for x in (q, k, v, g)]
        d_initial = q.new_empty(q.shape[0], q.shape[2], q.shape[3], v.shape[-1]) if ctx.has_initial else None
        d_out = d_out.to(torch.float32).contiguous()
        d_final = None if d_final is None else d_final.to(torch.float32).contiguous()
        status = _library().gla_backward(*ctx.sizes, *map(_pointer, (q, k, v, g, states, d_out, d_final, *grads,
                                                                      d_initial)))
        if status:
            raise MemoryError(f"gla CPU kernel: backward failed (status {status}: workspace or threads)")
        return (*grads, d_initial, None, None)
