"""The delta rule in chunks: matmuls inside each chunk, a short loop that carries the state.

The recurrence (per batch and head, the state ``S`` a ``[K, V]`` matrix) is
``S_t = a_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`` with ``a_t = exp(g_t)`` (``a_t = 1``
without gate) and ``o_t = scale · S_tᵀ q_t``.

**Ungated, inside one chunk** of ``C`` tokens that starts from the state ``S_0``. The product of
the transitions ``P_t = M_t ⋯ M_1``, ``M_i = I - β_i k_i k_iᵀ``, stays a rank-``t`` correction of
the identity, ``P_t = I - Σ_{i≤t} k_i w_iᵀ``: multiplying ``P_{t-1}`` by ``M_t`` adds the term
``k_t w_tᵀ`` with ``w_t = β_t (k_t - Σ_{i<t} (k_iᵀ k_t) w_i)`` (the WY representation of a product
of Householder-like matrices). The inputs sum in the same way, ``Σ_i (P_t/P_i) β_i k_i v_iᵀ =
Σ_{i≤t} k_i u_iᵀ`` with ``u_t = β_t (v_t - Σ_{i<t} (k_iᵀ k_t) u_i)``. Both are one unit
lower-triangular system (the UT transform):

    (I + tril(diag(β) K Kᵀ, -1)) [W U] = diag(β) [K V],   i.e. [W U] = T [K V],
    T = (I + tril(diag(β) K Kᵀ, -1))⁻¹ diag(β).

With the pseudo-values ``Δ = U - W S_0`` (what each token writes once the old state's recall is
subtracted), ``S_t = S_0 + Σ_{i≤t} k_i Δ_iᵀ``, hence for the whole chunk at once

    O = scale · (Q S_0 + tril(Q Kᵀ) Δ),      S_C = S_0 + Kᵀ Δ.

**Gated.** Let ``G_t = Σ_{i≤t} g_i`` be the log decay accumulated since the start of the chunk.
Dividing the state by ``exp(G_t)`` gives an ungated delta rule on the values
``exp(-G_t) v_t``; multiplying the factors back in, every product of decays becomes a ratio
``exp(G_t - G_i)`` with ``t ≥ i``, so each exponent is ``≤ 0`` (the upper triangle is masked to
``-inf`` *before* ``exp``, and nothing ever overflows, even at -20 per step over a chunk):

    Γ_ti = exp(G_t - G_i) for t ≥ i, 0 above the diagonal,
    (I + tril(diag(β) (K Kᵀ ⊙ Γ), -1)) [W U] = diag(β) [exp(G) ⊙ K, V],
    Δ = U - W S_0,
    O = scale · ((exp(G) ⊙ Q) S_0 + (Q Kᵀ ⊙ Γ) Δ),
    S_C = exp(G_C) S_0 + (exp(G_C - G) ⊙ K)ᵀ Δ.

Everything but ``Δ``, ``O`` and the carried state is computed for all chunks at once (the
triangular solve is batched ``torch.linalg.solve_triangular``, exact and backward stable, which
autograd differentiates); the loop over chunks only does ``Δ = U - W S`` and the state update;
the outputs then come from one batched product with the stacked per-chunk start states. The
sequence is padded to a multiple of the chunk with ``k = v = β = g = 0`` tokens, whose
transition is the identity, so the final state is unaffected. Work is done in float32 for
half-precision inputs (float64 for float64): the output comes back in the input dtype, the
final state in the accumulation dtype, as from ``recurrent``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqapps.errors import InputError


def delta_rule_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                     g: torch.Tensor | None, scale: float, initial_state: torch.Tensor | None,
                     output_final_state: bool, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``beta, g [B, T, H]`` (``g`` may be ``None``),
    ``initial_state [B, H, K, V]`` or ``None`` -> ``(o [B, T, H, V], final_state [B, H, K, V] or None)``."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"chunk_size={chunk_size!r}; expected a positive int (64 is a good default)")
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    chunk = min(chunk_size, t)
    n_chunks = -(-t // chunk)

    def chunked(x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H, *D]`` -> ``[B, H, N, C, *D]`` in the accumulation dtype, zero-padded."""
        x = x.to(acc)
        extra = x.ndim - 3
        x = F.pad(x, (0, 0) * extra + (0, 0, 0, n_chunks * chunk - t))
        x = x.reshape(b, n_chunks, chunk, h, *x.shape[3:])
        return x.permute(0, 3, 1, 2, *range(4, x.ndim))

    q_c, k_c, v_c, beta_c = chunked(q * scale), chunked(k), chunked(v), chunked(beta)
    if initial_state is None:
        state = q_c.new_zeros(b, h, dk, dv)
    else:
        state = initial_state.to(acc)

    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    key_gram = k_c @ k_c.transpose(-1, -2)  # [B, H, N, C, C]
    query_key = q_c @ k_c.transpose(-1, -2)  # [B, H, N, C, C]
    if g is None:
        keys_in = k_c  # W's right-hand side
        queries_from_state = q_c  # what reads S_0
        keys_to_end = k_c  # what writes the chunk's end state
        chunk_decay = None
        attention = query_key.masked_fill(~causal, 0.0)
    else:
        log_decay = chunked(g).cumsum(-1)  # G [B, H, N, C], ≤ 0
        decay_from_start = log_decay.exp()[..., None]  # exp(G_t)
        keys_in = k_c * decay_from_start
        queries_from_state = q_c * decay_from_start
        keys_to_end = k_c * (log_decay[..., -1:] - log_decay).exp()[..., None]  # exp(G_C - G_t)
        chunk_decay = log_decay[..., -1].exp()[..., None, None]  # [B, H, N, 1, 1]
        relative = (log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(~causal, float("-inf"))
        ratios = relative.exp()  # Γ [B, H, N, C, C], lower triangle incl. diagonal
        key_gram = key_gram * ratios
        attention = query_key * ratios

    # UT transform: one unit lower-triangular solve per chunk gives W and U together.
    beta_col = beta_c[..., None]
    strictly_causal = causal.tril(-1)
    strict_lower = (beta_col * key_gram).masked_fill(~strictly_causal, 0.0)  # tril(diag(β) K Kᵀ ⊙ Γ, -1)
    rhs = torch.cat([beta_col * keys_in, beta_col * v_c], dim=-1)  # [B, H, N, C, K + V]
    solved = torch.linalg.solve_triangular(strict_lower, rhs, upper=False, unitriangular=True)
    w, u = solved.split([dk, dv], dim=-1)

    # The only sequential part: carry the state from chunk to chunk.
    start_states, pseudo_values = [], []
    for i in range(n_chunks):
        start_states.append(state)
        delta = u[:, :, i] - w[:, :, i] @ state  # [B, H, C, V]
        pseudo_values.append(delta)
        written = keys_to_end[:, :, i].transpose(-1, -2) @ delta  # [B, H, K, V]
        state = (state if chunk_decay is None else chunk_decay[:, :, i] * state) + written
    starts = torch.stack(start_states, dim=2)  # [B, H, N, K, V]
    deltas = torch.stack(pseudo_values, dim=2)  # [B, H, N, C, V]

    o = queries_from_state @ starts + attention @ deltas  # [B, H, N, C, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(b, n_chunks * chunk, h, dv)[:, :t]
    return o.to(q.dtype), (state if output_final_state else None)
