"""The chunked parallel form of Mamba's selective scan, in plain PyTorch with autograd.

The recurrence of ``selective_scan`` is ``D · N`` independent scalar recurrences per sequence,
``h_t = a_t h_{t-1} + x_t`` with ``a_t = exp(Δ_t A)`` (or ``2 exp(Δ_t A) - 1``) and
``x_t = Δ_t u_t B_t``, read out as ``y_t = C_t · h_t`` (a sum over the state size ``N``).

Why not the decay-matrix form of SSD / GLA. There, one decay per head lets the intra-chunk work
be a matmul over the key dimension, and a ``c x c`` matrix of decays ``exp(G_t - G_s)`` is shared
by every key. Here every channel and state dimension ``(d, n)`` decays at its own rate, so that
matrix would be ``[c, c]`` per ``(b, d, n)``: ``c`` times the work of the scan itself with nothing
to amortise it over. Splitting ``exp(G_t - G_s) = exp(G_t - G_r) exp(G_r - G_s)`` around a
reference ``r`` is cheaper but cannot be exact when a single step decays by ``exp(-20)``: one
factor overflows or underflows whatever ``r`` is.

So the chunk form here works with products of the transitions themselves and never takes a
logarithm or an ``exp`` of anything positive:

1. Cut time into ``nc`` chunks of ``c`` steps and lay the tensors out as ``[c, nc, B, G, Dg, N]``
   (position in chunk, chunk, batch, group of ``B``/``C``, channel in group, state).
2. Local scan: step through the ``c`` positions once, every chunk at the same time, starting
   each chunk from zero. Its last step gives ``e_k``, what chunk ``k`` adds to the state.
3. Chunk states: ``H_k = P_k H_{k-1} + e_k`` with ``P_k`` the product of the chunk's transitions
   (``exp(A Σ Δ)`` when they are positive, the running product from step 2 otherwise): a short
   loop over the ``nc`` chunks, on ``[B, D, N]`` tensors.
4. Final scan: step through the ``c`` positions again, each chunk now starting from the true
   state ``H_{k-1}``, and read out ``y_t = C_t · h_t`` at every step (a batched matmul).

That is ``2c + nc`` Python steps, each on a slice of ``B · nc · D · N`` elements, and
``O(T · D · N)`` work, the same as the recurrence. Every number is a sum of products of the
recurrence's own factors, so transitions from ``exp(-20)`` (or exactly 0) to 1, negative ones
included (``negative_eigenvalues``), need no special care, and autograd through the steps is
the adjoint recurrence. Padding the last chunk with ``Δ = 0`` (transition 1, input 0) leaves the
final state untouched. Work is done in float32 (float64 for float64 inputs), as in
``selective_scan_recurrent``, whose semantics this matches exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seqapps.errors import InputError
from seqapps.kernels.selective_scan import discretize


def selective_scan_chunk(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                         delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                         negative_eigenvalues: bool = False, initial_state: torch.Tensor | None = None,
                         output_final_state: bool = False,
                         chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``u, delta, z [B, T, D]``, ``A [D, N]``, ``B, C [B, T, N]`` or ``[B, T, G, N]``,
    ``D, delta_bias [D]``, ``initial_state [B, D, N]`` -> ``(y [B, T, D] in u's dtype,
    final_state [B, D, N] in the accumulation dtype, or None)``."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"chunk_size={chunk_size!r}; expected a positive integer")
    batch, t, d = u.shape
    n = A.shape[-1]
    groups = 1 if B.ndim == 3 else B.shape[2]
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    c = min(chunk_size, t)
    n_chunks = math.ceil(t / c)

    def chunked(x: torch.Tensor) -> torch.Tensor:
        """``[B, T, ...]`` -> ``[c, nc, B, ...]`` in ``acc``, zero-padded to ``nc · c`` steps."""
        x = x.to(acc)
        pad = n_chunks * c - t
        if pad:
            x = F.pad(x, (0, 0) * (x.ndim - 2) + (0, pad))
        return x.reshape(batch, n_chunks, c, *x.shape[2:]).transpose(0, 2).contiguous()

    def by_group(x: torch.Tensor) -> torch.Tensor:
        """Split the last dim, ``D`` -> ``[G, Dg]``."""
        return x.unflatten(-1, (groups, d // groups))

    dt = discretize(delta.to(acc), None if delta_bias is None else delta_bias.to(acc), delta_softplus)
    dt_c = by_group(chunked(dt))                                    # [c, nc, B, G, Dg]
    u_c = by_group(chunked(u))                                      # [c, nc, B, G, Dg]
    B_c = chunked(B.reshape(batch, t, groups, n))                   # [c, nc, B, G, N]
    C_c = chunked(C.reshape(batch, t, groups, n))                   # [c, nc, B, G, N]
    A_g = A.to(acc).reshape(groups, d // groups, n)                 # [G, Dg, N]

    transition = torch.exp(dt_c.unsqueeze(-1) * A_g)                # [c, nc, B, G, Dg, N]
    if negative_eigenvalues:
        transition = 2 * transition - 1
    inputs = (dt_c * u_c).unsqueeze(-1) * B_c.unsqueeze(-2)         # [c, nc, B, G, Dg, N]

    h0 = (torch.zeros(batch, groups, d // groups, n, dtype=acc, device=u.device) if initial_state is None
          else initial_state.to(acc).reshape(batch, groups, d // groups, n))
    starts = _chunk_start_states(transition, inputs, h0, dt_c, A_g, negative_eigenvalues)
    y, final_state = _scan_and_read_out(transition, inputs, starts, C_c)

    y = y.flatten(-2).transpose(0, 2).reshape(batch, n_chunks * c, d)[:, :t]
    if D is not None:
        y = y + D.to(acc) * u.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(u.dtype), (final_state.reshape(batch, d, n) if output_final_state else None)


def _chunk_start_states(transition: torch.Tensor, inputs: torch.Tensor, h0: torch.Tensor, dt: torch.Tensor,
                        A: torch.Tensor, negative_eigenvalues: bool) -> torch.Tensor:
    """The state each chunk starts from, ``[nc, B, G, Dg, N]``: ``h0`` for the first, then
    ``H_k = P_k H_{k-1} + e_k`` over the chunks (the last chunk's own contribution is not needed).

    ``transition, inputs [c, nc, B, G, Dg, N]``, ``dt [c, nc, B, G, Dg]``, ``A [G, Dg, N]``,
    ``h0 [B, G, Dg, N]``."""
    if transition.shape[1] == 1:
        return h0.unsqueeze(0)
    transition, inputs = transition[:, :-1], inputs[:, :-1]
    local, product = None, None
    for a_i, x_i in zip(transition.unbind(0), inputs.unbind(0)):
        local = x_i if local is None else torch.addcmul(x_i, a_i, local)
        if negative_eigenvalues:
            product = a_i if product is None else product * a_i
    if not negative_eigenvalues:
        # All transitions are positive: their product is one exp of a sum, never above 1 for Δ A <= 0.
        product = torch.exp(dt[:, :-1].sum(0).unsqueeze(-1) * A)
    states = [h0]
    for p_k, e_k in zip(product.unbind(0), local.unbind(0)):
        states.append(torch.addcmul(e_k, p_k, states[-1]))
    return torch.stack(states)


def _scan_and_read_out(transition: torch.Tensor, inputs: torch.Tensor, starts: torch.Tensor,
                       C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step through the chunk positions from the true start states, reading ``y = C · h``.

    ``transition, inputs [c, nc, B, G, Dg, N]``, ``starts [nc, B, G, Dg, N]``,
    ``C [c, nc, B, G, N]`` -> ``(y [c, nc, B, G, Dg], state after the last step [B, G, Dg, N])``."""
    state = starts
    outputs = []
    for a_i, x_i, c_i in zip(transition.unbind(0), inputs.unbind(0), C.unbind(0)):
        state = torch.addcmul(x_i, a_i, state)
        outputs.append(torch.matmul(state, c_i.unsqueeze(-1)).squeeze(-1))
    return torch.stack(outputs), state[-1]
