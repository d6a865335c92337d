"""Gated linear attention in chunked parallel form: plain PyTorch, differentiable by autograd.

The recurrence (per batch and head) is ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ`` and
``o_t = scale · S_tᵀ q_t``. Unrolled, with ``G_t = g_1 + … + g_t`` the cumulative log decay,

    o_i = scale · [ Σ_{j≤i} (q_i ⊙ exp(G_i - G_j)) · k_j  v_j  +  (q_i ⊙ exp(G_i))ᵀ S_0 ].

The sequence is cut into chunks of ``C`` tokens. Inside a chunk the first sum is a masked
(C × C) attention-like product, done with matrix multiplications; across chunks only the state
travels: the state entering a chunk is decayed by the chunk's total decay and receives the
chunk's keys and values, ``S_end = exp(G_last) ⊙ S_start + Σ_j (k_j ⊙ exp(G_last - G_j)) v_jᵀ``.
``G`` restarts at every chunk, so it never grows with ``T``.

Numerical safety. ``G`` is non-increasing, so ``exp(G_i - G_j) ≤ 1`` whenever ``i ≥ j``, but it
cannot be split as ``exp(G_i) · exp(-G_j)``: with log decays near -20 per step the second factor
overflows after a handful of steps. Every factorisation below goes through a reference position
``r`` with ``j ≤ r ≤ i``, so that both ``exp(G_i - G_r)`` and ``exp(G_r - G_j)`` are at most 1
(they may underflow to 0 only where the exact product is negligible anyway):

* per-key decay ``g [B, T, H, K]``: the strictly lower triangle of the chunk is tiled
  dyadically. At level ``s`` (``s = C/2, C/4, …, 1``) the chunk is split into blocks of ``s``
  tokens; every odd block (rows) meets the even block just before it (columns), and the first
  row of the odd block is the reference: one batched matmul of ``q ⊙ exp(G - G_r)`` with
  ``k ⊙ exp(G_r - G)`` per level. These blocks cover each pair ``j < i`` exactly once; the
  diagonal ``i = j`` has no decay (``exp(0) = 1``).
* scalar decay ``g [B, T, H]``: the decay matrix ``exp(G_i - G_j)`` is one number per pair, so
  it multiplies ``q kᵀ`` after the matmul; the upper triangle is masked *before* ``exp`` (with
  ``-inf``, whose exp and gradient are exact zeros, never ``inf · 0``).
* across chunks, ``exp(G_i)`` (from the chunk start) and ``exp(G_last - G_j)`` (to its end)
  are both at most 1.

Work is linear in ``T`` (``O(T·C·(K+V) + T·K·V)``) and so is the memory autograd keeps.
Inputs in bfloat16/float16 are computed in float32 (float64 stays float64); the output comes
back in the input dtype, the final state in the accumulation dtype (as ``recurrent``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqapps.errors import InputError


def gla_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
              initial_state: torch.Tensor | None = None, output_final_state: bool = False,
              chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated linear attention.

    ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``g [B, T, H, K]`` (log decay per key dimension)
    or ``[B, T, H]`` (one per head), ``initial_state [B, H, K, V]`` or ``None``. Returns
    ``(o [B, T, H, V], final_state [B, H, K, V] or None)``. ``chunk_size`` is rounded up to a
    power of two (the dyadic tiling needs one) and capped at the padded sequence length.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"chunk_size={chunk_size!r}; expected a positive integer")
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    chunk = _next_power_of_two(min(chunk_size, max(length, 1)))
    n_chunks = -(-length // chunk)
    padded = n_chunks * chunk

    def chunked(x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H, *D]`` -> ``[B, H, N, C, *D]`` in ``acc``, zero-padded at the end (a zero
        key adds nothing to the state and a zero log decay keeps it, so padding is inert)."""
        x = x.to(acc).movedim(1, 2)
        tail = [0, 0] * (x.ndim - 3) + [0, padded - length]
        if padded != length:
            x = F.pad(x, tail)
        return x.reshape(batch, heads, n_chunks, chunk, *x.shape[3:])

    q_c, k_c, v_c, g_c = chunked(q), chunked(k), chunked(v), chunked(g)
    q_c = q_c * scale
    log_decay = g_c.cumsum(3)  # G, from the chunk start, [B, H, N, C] or [B, H, N, C, K]
    if g.ndim == 3:
        intra = _intra_scalar(q_c, k_c, v_c, log_decay)
        log_decay = log_decay.unsqueeze(-1)  # broadcast over K from here on
    else:
        intra = _intra_per_key(q_c, k_c, v_c, log_decay)

    log_total = log_decay[..., -1:, :]  # G_last, [B, H, N, 1, K or 1]
    updates = (k_c * torch.exp(log_total - log_decay)).transpose(-1, -2) @ v_c  # [B, H, N, K, V]
    chunk_decay = torch.exp(log_total).transpose(-1, -2)  # [B, H, N, K or 1, 1]
    state = (torch.zeros(batch, heads, key_dim, value_dim, dtype=acc, device=q.device)
             if initial_state is None else initial_state.to(acc))
    entering = []
    for n in range(n_chunks):
        entering.append(state)
        state = chunk_decay[:, :, n] * state + updates[:, :, n]
    inter = (q_c * torch.exp(log_decay)) @ torch.stack(entering, 2)  # [B, H, N, C, V]

    out = (intra + inter).reshape(batch, heads, padded, value_dim)[:, :, :length]
    return out.movedim(1, 2).to(q.dtype), (state if output_final_state else None)


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _intra_scalar(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """Within-chunk part for one decay per head: ``q, k [.., C, K]``, ``v [.., C, V]``,
    ``log_decay [.., C]`` -> ``[.., C, V]``."""
    chunk = q.shape[-2]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    gap = log_decay.unsqueeze(-1) - log_decay.unsqueeze(-2)  # G_i - G_j
    decay = torch.exp(gap.masked_fill(~causal, float("-inf")))
    return ((q @ k.transpose(-1, -2)) * decay) @ v


def _intra_per_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """Within-chunk part for a decay per key dimension, by the dyadic tiling of the module
    docstring: ``q, k, log_decay [.., C, K]``, ``v [.., C, V]`` -> ``[.., C, V]``."""
    *lead, chunk, key_dim = q.shape
    value_dim = v.shape[-1]
    out = (q * k).sum(-1, keepdim=True) * v  # the diagonal, i = j
    size = chunk // 2
    while size >= 1:
        pairs = chunk // (2 * size)

        def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """``[.., C, D]`` -> (even blocks, odd blocks), each ``[.., C/2s, s, D]``."""
            x = x.reshape(*lead, pairs, 2, size, x.shape[-1])
            return x[..., 0, :, :], x[..., 1, :, :]

        _, q_rows = split(q)
        k_cols, _ = split(k)
        v_cols, _ = split(v)
        g_cols, g_rows = split(log_decay)
        g_ref = g_rows[..., :1, :]
        scores = (q_rows * torch.exp(g_rows - g_ref)) @ (k_cols * torch.exp(g_ref - g_cols)).transpose(-1, -2)
        rows_out = scores @ v_cols  # [.., C/2s, s, V]
        out = out + torch.stack([torch.zeros_like(rows_out), rows_out], -3).reshape(*lead, chunk, value_dim)
        size //= 2
    return out
