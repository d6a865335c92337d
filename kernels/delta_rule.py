"""The delta rule: ``S_t = exp(g_t) (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``,
``o_t = scale · S_tᵀ q_t`` (DeltaNet; Gated DeltaNet when ``g`` is given).

Shapes: ``q, k [B, T, H, K]`` (keys L2-normalised by the caller), ``v [B, T, H, V]``,
``beta [B, T, H]`` in [0, 1], or in [0, 2] for transitions with negative eigenvalues
(Grazzi et al., 2024), ``g [B, T, H]`` log decay or ``None``; states ``[B, H, K, V]``.
"""

from __future__ import annotations

import torch

from seqapps.kernels.backend import (accumulation_dtype, expect_shape, expect_state_dims, expect_tensors,
                                     nothing_to_scan, resolve_backend)


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
               g: torch.Tensor | None = None, scale: float | None = None,
               initial_state: torch.Tensor | None = None, output_final_state: bool = False,
               backend: str = "auto", chunk_size: int = 32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns ``(o [B, T, H, V], final_state [B, H, K, V] or None)``."""
    layout = "q, k [B, T, H, K]; v [B, T, H, V]; beta, g [B, T, H]; state [B, H, K, V]"
    expect_tensors(layout, q=q, k=k, v=v, beta=beta, g=g, initial_state=initial_state)
    expect_shape("q", q, (None,) * 4, layout)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    expect_shape("k", k, (b, t, h, dk), layout)
    expect_shape("v", v, (b, t, h, None), layout)
    expect_shape("beta", beta, (b, t, h), layout)
    expect_shape("g", g, (b, t, h), layout)
    expect_shape("initial_state", initial_state, (b, h, dk, dv), layout)
    expect_state_dims(layout, K=dk, V=dv)
    backend = resolve_backend(backend, q, k, v, beta)
    if 0 in (b, t, h):
        return nothing_to_scan(v.to(q.dtype), initial_state, (b, h, dk, dv), output_final_state)
    scale = dk ** -0.5 if scale is None else scale
    if backend == "recurrent":
        return delta_rule_recurrent(q, k, v, beta, g, scale, initial_state, output_final_state)
    if backend == "chunk":
        from seqapps.kernels.delta_rule_chunk import delta_rule_chunk

        return delta_rule_chunk(q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size)
    from seqapps.kernels.triton.delta_rule import delta_rule_triton

    return delta_rule_triton(q, k, v, beta, g, scale, initial_state, output_final_state)


def delta_rule_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, beta_t: torch.Tensor,
                    g_t: torch.Tensor | None, state: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: ``q_t, k_t [B, H, K]``, ``v_t [B, H, V]``, ``beta_t, g_t [B, H]``,
    ``state [B, H, K, V]`` -> ``(o_t [B, H, V], new state)``."""
    beta = beta_t[..., None, None]
    recalled = torch.einsum("bhk,bhkv->bhv", k_t, state)  # k_tᵀ S_{t-1}
    state = state - beta * k_t.unsqueeze(-1) * recalled.unsqueeze(-2)
    if g_t is not None:
        state = torch.exp(g_t)[..., None, None] * state
    state = state + beta * k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
    return scale * torch.einsum("bhk,bhkv->bhv", q_t, state), state


def delta_rule_recurrent(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False):
    """The loop over time: the oracle of the tests (float32 accumulation, float64 for float64)."""
    b, t, h, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    acc = accumulation_dtype(q)
    state = (torch.zeros(b, h, dk, v.shape[-1], dtype=acc, device=q.device) if initial_state is None
             else initial_state.to(acc))
    outputs = []
    for i in range(t):
        g_i = None if g is None else g[:, i].to(acc)
        o_t, state = delta_rule_step(q[:, i].to(acc), k[:, i].to(acc), v[:, i].to(acc),
                                     beta[:, i].to(acc), g_i, state, scale)
        outputs.append(o_t)
    return torch.stack(outputs, 1).to(q.dtype), (state if output_final_state else None)
