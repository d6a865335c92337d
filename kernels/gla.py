"""Gated linear attention: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ``, ``o_t = scale · S_tᵀ q_t``.

Used by GLA, RetNet, Mamba-2/SSD, RWKV-6, HGRN-2, LightNet and Lina-Speech. Shapes (as in
flash-linear-attention): ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``g`` the log decay, either
``[B, T, H, K]`` (one per key dimension) or ``[B, T, H]`` (one per head, the faster scalar
path); states ``[B, H, K, V]``.
"""

from __future__ import annotations

import torch

from seqapps.kernels.backend import (accumulation_dtype, expect_shape, expect_state_dims, expect_tensors,
                                     nothing_to_scan, resolve_backend)


def gla_cpu_available() -> bool:
    """Whether the fused C kernel (``backend="cpu"``) is built here; builds it on first call."""
    from seqapps.kernels.gla_cpu import available

    return available()


def gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           scale: float | None = None, initial_state: torch.Tensor | None = None,
                           output_final_state: bool = False, backend: str = "auto",
                           chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns ``(o [B, T, H, V], final_state [B, H, K, V] or None)``."""
    layout = "q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K] or [B, T, H]; state [B, H, K, V]"
    expect_tensors(layout, q=q, k=k, v=v, g=g, initial_state=initial_state)
    expect_shape("q", q, (None,) * 4, layout)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    expect_shape("k", k, (b, t, h, dk), layout)
    expect_shape("v", v, (b, t, h, None), layout)
    expect_shape("g", g, (b, t, h, dk) if g.ndim == 4 else (b, t, h), layout)
    expect_shape("initial_state", initial_state, (b, h, dk, dv), layout)
    expect_state_dims(layout, K=dk, V=dv)
    backend = resolve_backend(backend, q, k, v, g, initial_state, cpu_kernel=gla_cpu_available)
    if 0 in (b, t, h):
        return nothing_to_scan(v.to(q.dtype), initial_state, (b, h, dk, dv), output_final_state)
    scale = dk ** -0.5 if scale is None else scale
    if backend == "recurrent":
        return gla_recurrent(q, k, v, g, scale, initial_state, output_final_state)
    if backend == "chunk":
        from seqapps.kernels.gla_chunk import gla_chunk

        return gla_chunk(q, k, v, g, scale, initial_state, output_final_state, chunk_size)
    if backend == "cpu":
        from seqapps.kernels.gla_cpu import gla_cpu

        return gla_cpu(q, k, v, g, scale, initial_state, output_final_state, chunk_size)
    from seqapps.kernels.triton.gla import gla_triton

    return gla_triton(q, k, v, g, scale, initial_state, output_final_state, chunk_size)


def gla_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, g_t: torch.Tensor,
             state: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: ``q_t, k_t [B, H, K]``, ``v_t [B, H, V]``, ``g_t [B, H, K]`` or ``[B, H]``,
    ``state [B, H, K, V]`` -> ``(o_t [B, H, V], new state)``. O(1) memory in T."""
    decay = torch.exp(g_t).unsqueeze(-1)
    if g_t.ndim == 2:
        decay = decay.unsqueeze(-1)
    state = decay * state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
    return scale * torch.einsum("bhk,bhkv->bhv", q_t, state), state


def gla_recurrent(q, k, v, g, scale, initial_state=None, output_final_state=False):
    """The loop over time, written to be read: the oracle of the tests. Accumulates in float32
    (float64 for float64 inputs)."""
    b, t, h, dk = q.shape
    acc = accumulation_dtype(q)
    state = (torch.zeros(b, h, dk, v.shape[-1], dtype=acc, device=q.device) if initial_state is None
             else initial_state.to(acc))
    outputs = []
    for i in range(t):
        o_t, state = gla_step(q[:, i].to(acc), k[:, i].to(acc), v[:, i].to(acc), g[:, i].to(acc), state, scale)
        outputs.append(o_t)
    return torch.stack(outputs, 1).to(q.dtype), (state if output_final_state else None)
