"""Mamba's selective scan: ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t``, ``y_t = C_t h_t + D u_t``,
gated by ``silu(z_t)`` when ``z`` is given.

Shapes (channels last): ``u, delta, z [B, T, D]``; ``A [D, N]`` real, diagonal per channel;
``B, C [B, T, N]`` (shared by every channel) or ``[B, T, G, N]`` (``G`` groups of ``D / G``
channels); ``D`` and ``delta_bias`` ``[D]``; state ``h [B, D, N]``. With
``negative_eigenvalues=True`` the transition is ``2·exp(Δ A) - 1`` (eigenvalues in [-1, 1],
Grazzi et al., 2024), which lets one layer track parity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqapps.kernels.backend import (accumulation_dtype, expect_shape, expect_state_dims, expect_tensors,
                                     nothing_to_scan, resolve_backend)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                   negative_eigenvalues: bool = False, initial_state: torch.Tensor | None = None,
                   output_final_state: bool = False, backend: str = "auto",
                   chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns ``(y [B, T, D], final_state [B, D, N] or None)``."""
    layout = "u, delta, z [B, T, D]; A [D, N]; B, C [B, T, N] or [B, T, G, N]; D, delta_bias [D]; state [B, D, N]"
    expect_tensors(layout, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                   initial_state=initial_state)
    expect_shape("u", u, (None,) * 3, layout)
    b, t, d = u.shape
    n = B.shape[-1] if B.ndim in (3, 4) else (A.shape[-1] if A.ndim == 2 else None)  # the state size
    expect_shape("delta", delta, (b, t, d), layout)
    expect_shape("A", A, (d, n), layout)
    expect_shape("B", B, (b, t, n) if B.ndim == 3 else (b, t, None, n), layout)
    expect_shape("C", C, tuple(B.shape), layout)
    expect_shape("D", D, (d,), layout)
    expect_shape("z", z, (b, t, d), layout)
    expect_shape("delta_bias", delta_bias, (d,), layout)
    expect_shape("initial_state", initial_state, (b, d, n), layout)
    if B.ndim == 4 and (B.shape[2] < 1 or d % B.shape[2]):
        from seqapps.errors import InputError

        raise InputError(f"B has {B.shape[2]} groups, which do not divide the {d} channels of u")
    expect_state_dims(layout, N=n)
    backend = resolve_backend(backend, u, delta, A, B, C)
    if 0 in (b, t, d):
        return nothing_to_scan(u, initial_state, (b, d, n), output_final_state)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, negative_eigenvalues, initial_state,
            output_final_state)
    if backend == "recurrent":
        return selective_scan_recurrent(*args)
    if backend == "chunk":
        from seqapps.kernels.selective_scan_chunk import selective_scan_chunk

        return selective_scan_chunk(*args, chunk_size=chunk_size)
    from seqapps.kernels.triton.selective_scan import selective_scan_triton

    return selective_scan_triton(*args)


def discretize(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    """The step size ``Δ`` actually used: ``softplus(delta + bias)`` or ``delta + bias``."""
    if delta_bias is not None:
        delta = delta + delta_bias
    return F.softplus(delta) if delta_softplus else delta


def per_channel(x: torch.Tensor, d: int) -> torch.Tensor:
    """``B`` or ``C`` of one step, ``[B, N]`` or ``[B, G, N]`` -> ``[B, D, N]``."""
    if x.ndim == 2:
        return x.unsqueeze(1).expand(-1, d, -1)
    return x.repeat_interleave(d // x.shape[1], dim=1)


def selective_scan_step(u_t, dt_t, A, B_t, C_t, D, z_t, state, negative_eigenvalues=False):
    """One token, ``Δ`` already discretised: ``u_t, dt_t, z_t [B, D]``, ``B_t, C_t [B, N]`` or
    ``[B, G, N]``, ``state [B, D, N]`` -> ``(y_t [B, D], new state)``."""
    d = u_t.shape[-1]
    transition = torch.exp(dt_t.unsqueeze(-1) * A)
    if negative_eigenvalues:
        transition = 2 * transition - 1
    state = transition * state + (dt_t * u_t).unsqueeze(-1) * per_channel(B_t, d)
    y = (state * per_channel(C_t, d)).sum(-1)
    if D is not None:
        y = y + D * u_t
    if z_t is not None:
        y = y * F.silu(z_t)
    return y, state


def selective_scan_recurrent(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             negative_eigenvalues=False, initial_state=None, output_final_state=False):
    """The loop over time: the oracle of the tests (float32 accumulation, float64 for float64)."""
    b, t, d = u.shape
    acc = accumulation_dtype(u)
    dt = discretize(delta.to(acc), None if delta_bias is None else delta_bias.to(acc), delta_softplus)
    state = (torch.zeros(b, d, A.shape[-1], dtype=acc, device=u.device) if initial_state is None
             else initial_state.to(acc))
    A, D = A.to(acc), None if D is None else D.to(acc)
    outputs = []
    for i in range(t):
        z_i = None if z is None else z[:, i].to(acc)
        y_t, state = selective_scan_step(u[:, i].to(acc), dt[:, i], A, B[:, i].to(acc), C[:, i].to(acc),
                                         D, z_i, state, negative_eigenvalues)
        outputs.append(y_t)
    return torch.stack(outputs, 1).to(u.dtype), (state if output_final_state else None)
