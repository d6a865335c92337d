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

    (I + A) [W U] = diag(β) [K V],   A = tril(diag(β) K Kᵀ, -1),   so [W U] = T diag(β) [K V],
    T = (I + A)⁻¹.

With the pseudo-values ``Δ = U - W S_0`` (what each token writes once the old state's recall is
subtracted), ``S_t = S_0 + Σ_{i≤t} k_i Δ_iᵀ``, hence for the whole chunk at once

    O = scale · (Q S_0 + tril(Q Kᵀ) Δ),      S_C = S_0 + Kᵀ Δ.

**Gated.** Let ``G_t = Σ_{i≤t} g_i`` be the log decay accumulated since the start of the chunk.
Dividing the state by ``exp(G_t)`` gives an ungated delta rule on the values
``exp(-G_t) v_t``; multiplying the factors back in, every product of decays becomes a ratio
``exp(G_t - G_i)`` with ``t ≥ i``, so each exponent is ``≤ 0`` (the upper triangle is masked to
``-inf`` *before* ``exp``, and nothing ever overflows, even at -20 per step over a chunk):

    Γ_ti = exp(G_t - G_i) for t ≥ i, 0 above the diagonal,
    A = tril(diag(β) (K Kᵀ ⊙ Γ), -1),   W = T diag(β exp(G)) K,   U = T diag(β) V,
    Δ = U - W S_0,
    O = scale · ((exp(G) ⊙ Q) S_0 + (Q Kᵀ ⊙ Γ) Δ),
    S_C = exp(G_C) S_0 + (exp(G_C - G) ⊙ K)ᵀ Δ.

**The inverse** ``T = (I + A)⁻¹`` (unit lower triangular, so always invertible) is built by
doubling, with matmuls and concatenations only, since it runs inside exported ONNX graphs, which
have no triangular solver: the inverse of a block lower-triangular matrix is
``[[X₁, 0], [-X₂ A₂₁ X₁, X₂]]`` with ``X₁, X₂`` the inverses of its diagonal blocks, so starting
from ``1 × 1`` diagonal blocks (whose inverse is 1) each level joins neighbouring pairs of blocks
until one block spans the chunk. That is block forward substitution: exact, with the rounding of
a triangular solve. It needs a power-of-two chunk, so ``chunk_size`` is rounded up to one.

**Order of work.** Everything inside the chunks (``A``, ``T``, ``W``, ``U``, ``Q Kᵀ ⊙ Γ``) is
computed for all chunks at once; the loop over the chunks only carries the state (``Δ`` and the
next state: two fused multiply-adds per chunk), and the outputs follow for all chunks at once.
Work is ``O(T·C·(K + V) + T·K·V)``, memory linear in ``T``; on a CPU a chunk of 32 does less
work than 64 for head sizes near 64 and runs faster.

**Backward.** Autograd of a loop over many chunks of small matmuls is bound by per-op overhead
and by allocating a fresh tensor per op, so the core is a ``torch.autograd.Function`` with a
hand-written backward that writes into buffers. The gradient of the state runs backwards
through the same chunks, ``dΔ = Pᵀ dO + (exp(G_C - G) ⊙ K) dS_C`` and
``dS_0 = exp(G_C) dS_C + (exp(G) ⊙ Q)ᵀ dO - Wᵀ dΔ`` (``P`` the masked ``scale · Q Kᵀ ⊙ Γ``,
``dO`` carrying the scale), three fused multiply-adds per chunk; the rest is batched over all
chunks: the gradients of ``W``, ``U`` and of the query and key factors, then through the
inverse (``dA = -Tᵀ dT Tᵀ`` on the strict lower triangle) to ``K`` and ``β``. The decays enter
only as ``exp`` of differences of ``G``, so the gradient of ``G_t`` is ``Σ_i Z_ti - Σ_i Z_it`` over
the decayed matrices (``Z`` the upstream gradient times the matrix, entry by entry) plus the
terms of the per-token factors, and ``dg`` is its reverse cumulative sum.

The sequence is padded to a multiple of the chunk with ``k = v = β = g = 0`` tokens, whose
transition is the identity, so the final state is unaffected. Work is done in float32 for
half-precision inputs (float64 for float64): the output comes back in the input dtype, the
final state in the accumulation dtype, as from ``recurrent``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqapps.kernels.backend import accumulation_dtype, expect_chunk_size


def delta_rule_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                     g: torch.Tensor | None, scale: float, initial_state: torch.Tensor | None,
                     output_final_state: bool, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``beta, g [B, T, H]`` (``g`` may be ``None``),
    ``initial_state [B, H, K, V]`` or ``None`` -> ``(o [B, T, H, V], final_state [B, H, K, V] or None)``.
    ``chunk_size`` is rounded up to a power of two and capped at the sequence length so rounded."""
    expect_chunk_size(chunk_size)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    acc = accumulation_dtype(q)
    chunk = 1 << (min(chunk_size, max(t, 1)) - 1).bit_length()
    n_chunks = -(-t // chunk)

    def chunked(x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H, D]`` -> ``[N, B·H, C, D]`` in the accumulation dtype, contiguous, zero-padded
        to ``N·C`` tokens (chunks lead, so that the loops read contiguous slices)."""
        x = x.to(acc)
        if n_chunks * chunk > t:
            x = F.pad(x, (0, 0, 0, 0, 0, n_chunks * chunk - t))
        return x.reshape(b, n_chunks, chunk, h, -1).permute(1, 0, 3, 2, 4).reshape(n_chunks, b * h, chunk, -1)

    state = (q.new_zeros(b * h, dk, dv, dtype=acc) if initial_state is None
             else initial_state.to(acc).reshape(b * h, dk, dv))
    gate = None if g is None else chunked(g[..., None])
    o, state = _ChunkedDeltaRule.apply(chunked(q), chunked(k), chunked(v), chunked(beta[..., None]), gate,
                                       state, scale)
    o = o.reshape(n_chunks, b, h, chunk, dv).permute(1, 0, 3, 2, 4).reshape(b, n_chunks * chunk, h, dv)
    return o[:, :t].to(q.dtype), (state.reshape(b, h, dk, dv) if output_final_state else None)


def unit_lower_inverse(strict_lower: torch.Tensor) -> torch.Tensor:
    """``(I + A)⁻¹`` for ``A [..., C, C]`` zero on and above the diagonal, ``C`` a power of two,
    by doubling the diagonal blocks (matmuls and concatenations only; see the module docstring)."""
    *lead, size, _ = strict_lower.shape
    if size == 1:
        return torch.ones_like(strict_lower)
    blocks = None  # the inverses of the diagonal blocks of the current span: [..., C/s, s, s]
    span = 1
    while span < size:
        pairs = size // (2 * span)
        # The (2s × 2s) diagonal blocks of A, [..., pairs, 2s, 2s], and their lower-left quarters.
        joined = strict_lower.reshape(*lead, pairs, 2 * span, pairs, 2 * span).diagonal(dim1=-4, dim2=-2)
        corner = joined.movedim(-1, -3)[..., span:, :span]
        if blocks is None:  # 1 × 1 diagonal blocks, whose inverses are 1
            upper_left = lower_right = torch.ones_like(corner)
            lower_left = -corner
        else:
            upper_left, lower_right = blocks.reshape(*lead, pairs, 2, span, span).unbind(-3)
            lower_left = -(lower_right @ corner @ upper_left)
        top = F.pad(upper_left, (0, span))  # [X₁, 0]
        blocks = torch.cat([top, torch.cat([lower_left, lower_right], dim=-1)], dim=-2)
        span *= 2
    return blocks.reshape(*lead, size, size)


class _Decays:
    """The decay factors of the log decays ``g [N, M, C, 1]`` (``None`` without gate, where
    every factor below is ``None``, meaning 1): with ``G``
    the cumulative sum of ``g`` inside each chunk, ``from_start = exp(G)`` and
    ``to_end = exp(G_C - G)`` ``[N, M, C, 1]``, ``total = exp(G_C)`` ``[N, M, 1, 1]`` and
    ``ratios = Γ [N, M, C, C]`` (``exp(G_t - G_i)`` on and below the diagonal, 0 above)."""

    def __init__(self, g: torch.Tensor | None):
        self.from_start = self.to_end = self.total = self.ratios = None
        if g is None:
            return
        chunk = g.shape[-2]
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=g.device).tril()
        log_decay = g.cumsum(-2)
        last = log_decay[..., -1:, :]
        self.from_start = log_decay.exp()
        self.to_end = (last - log_decay).exp()
        self.total = last.exp()
        # Masked before exp: above the diagonal G_t - G_i > 0 could overflow; exp(-inf) = 0.
        self.ratios = (log_decay - _t(log_decay)).masked_fill_(~causal, float("-inf")).exp_()

    def decay_(self, matrix: torch.Tensor) -> torch.Tensor:
        """``matrix ⊙ Γ [N, M, C, C]`` in place (without gate: its lower triangle)."""
        return matrix.tril_() if self.from_start is None else matrix.mul_(self.ratios)


def _times(x: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """``x ⊙ factor``, or ``x`` itself where the factor is 1 (``None``)."""
    return x if factor is None else x * factor


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [..., n, m] @ b [..., m, p]`` over equal leading dims, as one batched matmul."""
    return torch.bmm(a.flatten(0, -3), b.flatten(0, -3)).view(*a.shape[:-1], b.shape[-1])


def _add_bmm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``out += alpha · a @ b`` in place, over equal leading dims (``out`` contiguous)."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.flatten(0, -3), b.flatten(0, -3), alpha=alpha)
    return out


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_d a ⊙ b`` over the last dim, kept as ``[..., 1]`` (as a matmul: no product tensor)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).squeeze(-1)


def _rowsum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(-1, keepdim=True)


class _ChunkedDeltaRule(torch.autograd.Function):
    """``q, k [N, M, C, K]``, ``v [N, M, C, V]``, ``beta, g [N, M, C, 1]`` (``g`` may be ``None``),
    ``initial_state [M, K, V]`` -> ``(o [N·M, C, V], final_state [M, K, V])``, with ``N`` chunks
    of ``C`` tokens of ``M = B·H`` sequences. The forward pass (what exported graphs run) writes
    in place only into tensors it has just made, and only into whole chunks of them."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, scale):
        n_chunks = q.shape[0]
        decays = _Decays(g)
        inverse = unit_lower_inverse(decays.decay_(_bmm(k, _t(k))).mul_(beta).tril_(-1))
        scaled_inverse = inverse * _t(beta)  # T diag(β): its columns scaled
        deltas = _bmm(scaled_inverse, v)  # U, made Δ = U - W S chunk by chunk below
        if decays.from_start is not None:
            scaled_inverse.mul_(_t(decays.from_start))
        w = _bmm(scaled_inverse, k)
        queries, keys_to_end = _times(q, decays.from_start), _times(k, decays.to_end)

        states = q.new_empty(n_chunks + 1, *initial_state.shape)  # entering each chunk, then the last
        states[0] = initial_state
        for n in range(n_chunks):
            deltas[n].baddbmm_(w[n], states[n], alpha=-1.0)
            if decays.total is None:
                states[n + 1] = states[n]
            else:
                torch.mul(states[n], decays.total[n], out=states[n + 1])
            states[n + 1].baddbmm_(_t(keys_to_end[n]), deltas[n])

        attention = decays.decay_(_bmm(q, _t(k)))  # Q Kᵀ ⊙ Γ, without the scale
        # The output is made by an out-of-place op and returned as is, not as a view:
        # torch.compile gets the gradient of an output that is a view, or written in place, wrong.
        o = torch.baddbmm(_bmm(attention, deltas).flatten(0, 1), queries.flatten(0, 1), states[:-1].flatten(0, 1),
                          beta=scale, alpha=scale)
        ctx.save_for_backward(q, k, v, beta, g, inverse, w, attention, queries, keys_to_end, states, deltas)
        ctx.scale = scale
        return o, states[-1].clone()

    @staticmethod
    def backward(ctx, d_o, d_final):
        q, k, v, beta, g, inverse, w, attention, queries, keys_to_end, states, deltas = ctx.saved_tensors
        scale, n_chunks = ctx.scale, q.shape[0]
        decays = _Decays(g)
        d_o = d_o.contiguous().view_as(v)

        # The state's gradient, carried backwards chunk by chunk (``d_states[n]``: the gradient of
        # the state entering chunk n; the last one, of the final state).
        d_delta = _bmm(_t(attention), d_o).mul_(scale)
        d_states = torch.empty_like(states)
        d_states[-1] = d_final
        for n in range(n_chunks - 1, -1, -1):
            d_delta[n].baddbmm_(keys_to_end[n], d_states[n + 1])
            if decays.total is None:
                d_states[n] = d_states[n + 1]
            else:
                torch.mul(d_states[n + 1], decays.total[n], out=d_states[n])
            d_states[n].baddbmm_(_t(queries[n]), d_o[n], alpha=scale)
            d_states[n].baddbmm_(_t(w[n]), d_delta[n], alpha=-1.0)
        entering, leaving = states[:-1], d_states[1:]

        # The outputs and the state passed on: d(exp(G) ⊙ Q) = dO Sᵀ, d(Q Kᵀ ⊙ Γ) = dO Δᵀ,
        # d(exp(G_C - G) ⊙ K) = Δ dS_Cᵀ.
        d_queries = _bmm(d_o, _t(entering)).mul_(scale)
        d_scores = _bmm(d_o, _t(deltas)).mul_(scale)
        decayed = None if g is None else d_scores * attention  # d(Q Kᵀ ⊙ Γ) ⊙ (Q Kᵀ ⊙ Γ)
        decays.decay_(d_scores)  # d(Q Kᵀ), zero above the diagonal
        d_k = _bmm(_t(d_scores), q)
        d_keys_to_end = _bmm(deltas, _t(leaving))
        d_from_start = d_to_end = None
        if g is not None:
            d_from_start = _rowdot(q, d_queries)
            d_to_end = _rowdot(k, d_keys_to_end).mul_(decays.to_end)
            d_queries.mul_(decays.from_start)
            d_keys_to_end.mul_(decays.to_end)
        d_q = _add_bmm_(d_queries, d_scores, k)
        d_k.add_(d_keys_to_end)

        # W = T diag(β exp(G)) K and U = T diag(β) V, with -dW = dΔ Sᵀ and dU = dΔ.
        minus_d_w = _bmm(d_delta, _t(entering))
        through_w = _bmm(_t(inverse), minus_d_w)  # -Tᵀ dW
        keys_weight = _times(beta, decays.from_start)
        d_k.addcmul_(through_w, keys_weight, value=-1.0)
        d_keys_weight = -_rowdot(k, through_w)
        d_v = _bmm(_t(inverse), d_delta)  # Tᵀ dU, times β below
        d_beta = _rowdot(v, d_v)
        d_v.mul_(beta)
        d_inverse = _bmm(d_delta, _t(v)).mul_(_t(beta))
        d_inverse.sub_(_bmm(minus_d_w, _t(k)).mul_(_t(keys_weight)))

        # T = (I + A)⁻¹: dA = -Tᵀ dT Tᵀ on the strict lower triangle; A = tril(diag(β) (K Kᵀ ⊙ Γ), -1).
        d_strict = decays.decay_(_bmm(_t(inverse), _bmm(d_inverse, _t(inverse))).neg_().tril_(-1))
        by_beta = _bmm(k, _t(k)).mul_(d_strict)  # dA ⊙ A / β, without dividing
        d_beta.add_(_rowsum(by_beta))
        d_gram = d_strict.mul_(beta)
        _add_bmm_(_add_bmm_(d_k, d_gram, k), _t(d_gram), k)

        if g is None:
            return d_q, d_k, d_v, d_beta.add_(d_keys_weight), None, d_states[0], None
        d_beta.addcmul_(d_keys_weight, decays.from_start)
        # G enters as exp(G_t - G_i) in P and A: dG_t += Σ_i Z_ti - Σ_i Z_it, Z = d(matrix) ⊙ matrix;
        # as exp(G) (queries, keys in), exp(G_C - G) (keys to the end) and exp(G_C) (the state).
        decayed.add_(by_beta.mul_(beta))
        d_log = _rowsum(decayed).sub_(decayed.sum(-2).unsqueeze(-1))
        d_log.addcmul_(d_from_start.addcmul_(d_keys_weight, beta), decays.from_start).sub_(d_to_end)
        d_state_decay = (entering.flatten(-2).unsqueeze(-2) @ leaving.flatten(-2).unsqueeze(-1))
        d_log[..., -1:, :] += d_to_end.sum(-2, keepdim=True) + decays.total * d_state_decay
        d_g = d_log.sum(-2, keepdim=True) - d_log.cumsum(-2) + d_log  # dg_t = Σ_{s ≥ t} dG_s
        return d_q, d_k, d_v, d_beta, d_g, d_states[0], None
