"""The delta rule in chunks: matmuls inside each chunk, a short loop that carries the state.

The recurrence (per batch and head, the state ``S`` a ``[K, V]`` matrix) is
``S_t = a_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`` with ``a_t = exp(g_t)`` (``a_t = 1``
without gate) and ``o_t = scale · S_tᵀ q_t``.

**Ungated, inside one chunk** of ``C`` tokens that starts from the state ``S_0``. The product of
the transitions ``P_t = M_t ⋯ M_1``, ``M_i = I - β_i k_i k_iᵀ``, stays a rank-``t`` correction of
the identity, ``P_t = I - Σ_{i≤t} k_i w_iᵀ``: multiplying ``P_{t-1}`` by ``M_t`` adds the term
``k_t w_tᵀ`` with ``w_t = β_t (k_t - Σ_{i<t} (k_iᵀ k_t) w_i)`` (the WY representation of a product
of Householder-like matrices). The writes, each carried forward by the later transitions,
sum in the same way: ``Σ_{i≤t} M_t ⋯ M_{i+1} β_i k_i v_iᵀ = Σ_{i≤t} k_i u_iᵀ`` with
``u_t = β_t (v_t - Σ_{i<t} (k_iᵀ k_t) u_i)``. Both are one unit lower-triangular system (the UT
transform):

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

Everything but ``Δ``, the outputs and the carried state is computed for all chunks at once:
the Gram matrices, the decay ratios, and ``T`` by one batched unit-triangular solve against the
identity (``torch.linalg.solve_triangular``: exact, backward stable, differentiated by autograd;
on the CPU faster than solving for the ``C × (K + V)`` right-hand sides). The loop over chunks
only does three small matmuls per chunk (``Δ``, the chunk's outputs, the state update). The
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
        """``[B, T, H, D]`` -> ``[N, B·H, C, D]`` in the accumulation dtype, contiguous, zero-padded
        to ``N·C`` tokens (chunks lead, so that the loop reads contiguous slices)."""
        x = x.to(acc)
        if n_chunks * chunk > t:
            x = F.pad(x, (0, 0, 0, 0, 0, n_chunks * chunk - t))
        return x.reshape(b, n_chunks, chunk, h, -1).permute(1, 0, 3, 2, 4).reshape(n_chunks, b * h, chunk, -1)

    q_c, k_c, v_c = chunked(q * scale), chunked(k), chunked(v)
    beta_c = chunked(beta[..., None])  # [N, B·H, C, 1]
    state = (q_c.new_zeros(b * h, dk, dv) if initial_state is None
             else initial_state.to(acc).reshape(b * h, dk, dv))

    beta_k = beta_c * k_c
    gram = beta_k @ k_c.transpose(-1, -2)  # diag(β) K Kᵀ [N, B·H, C, C]
    query_key = q_c @ k_c.transpose(-1, -2)
    if g is None:
        keys_in, queries_from_state, keys_to_end = beta_k, q_c, k_c
        chunk_decays = [None] * n_chunks
        attention = query_key.tril()
    else:
        log_decay = chunked(g[..., None]).cumsum(-2)  # G [N, B·H, C, 1], ≤ 0
        decay_from_start = log_decay.exp()  # exp(G_t)
        keys_in = beta_k * decay_from_start
        queries_from_state = q_c * decay_from_start
        keys_to_end = k_c * (log_decay[:, :, -1:] - log_decay).exp()  # exp(G_C - G_t)
        chunk_decays = log_decay[:, :, -1:].exp().unbind(0)  # exp(G_C), N × [B·H, 1, 1]
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
        relative = (log_decay - log_decay.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
        ratios = relative.exp()  # Γ, zero above the diagonal
        gram = gram * ratios
        attention = query_key * ratios

    # UT transform: (I + tril(diag(β) K Kᵀ ⊙ Γ, -1))⁻¹, with diag(β) applied to the right-hand
    # sides. With unitriangular=True the solver reads only the strictly lower triangle of ``gram``
    # (its diagonal and upper part neither enter the result nor receive gradient).
    identity = torch.eye(chunk, dtype=acc, device=q.device).expand_as(gram)
    transform = torch.linalg.solve_triangular(gram, identity, upper=False, unitriangular=True)
    w = transform @ keys_in  # [N, B·H, C, K]
    u = transform @ (beta_c * v_c)  # [N, B·H, C, V]

    # The only sequential part: carry the state from chunk to chunk. (``unbind`` rather than
    # indexing, so that autograd gathers the slices' gradients once, not once per chunk.)
    outputs = []
    for w_i, u_i, q_i, attention_i, keys_i, decay_i in zip(
            w.unbind(0), u.unbind(0), queries_from_state.unbind(0), attention.unbind(0),
            keys_to_end.unbind(0), chunk_decays):
        delta = torch.baddbmm(u_i, w_i, state, alpha=-1.0)  # U - W S [B·H, C, V]
        outputs.append(torch.baddbmm(attention_i @ delta, q_i, state))
        state = torch.baddbmm(state if decay_i is None else decay_i * state, keys_i.transpose(-1, -2), delta)

    o = torch.stack(outputs).reshape(n_chunks, b, h, chunk, dv).permute(1, 0, 3, 2, 4)
    o = o.reshape(b, n_chunks * chunk, h, dv)[:, :t]
    return o.to(q.dtype), (state.reshape(b, h, dk, dv) if output_final_state else None)
