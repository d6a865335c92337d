"""Gated linear attention in chunked parallel form, in plain PyTorch.

The recurrence (per batch and head) is ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ`` and
``o_t = scale · S_tᵀ q_t``. Unrolled, with ``G_t = g_1 + … + g_t`` the cumulative log decay,

    o_i = scale · [ Σ_{j≤i} (q_i ⊙ exp(G_i - G_j)) · k_j  v_j  +  (q_i ⊙ exp(G_i))ᵀ S_0 ].

The sequence is cut into chunks of ``C`` tokens and ``G`` restarts at every chunk, so it never
grows with ``T``. Inside a chunk the first sum is a lower-triangular ``C × C`` matrix ``A``
times the values; across chunks only the state travels, decayed by the chunk's total decay and
fed with the chunk's keys and values:

    S_end = exp(G_last) ⊙ S_start + Σ_j (k_j ⊙ exp(G_last - G_j)) v_jᵀ,
    o     = scale · [ (q ⊙ exp(G)) S_start + A v ].

Numerical safety. ``G`` is non-increasing, so ``exp(G_i - G_j) ≤ 1`` whenever ``i ≥ j``, but it
cannot be split as ``exp(G_i) · exp(-G_j)``: with log decays near -20 per step the second factor
overflows after a handful of steps. Every factorisation here goes through a reference position
``r`` with ``j ≤ r ≤ i``, so that ``exp(G_i - G_r)`` and ``exp(G_r - G_j)`` are both at most 1
(either may underflow to 0, but only where the exact product is negligible anyway):

* across chunks, ``exp(G_i)`` (from the chunk start) and ``exp(G_last - G_j)`` (to its end);
* scalar decay ``g [B, T, H]``: ``exp(G_i - G_j)`` is one number per pair, so a decay matrix
  multiplies ``q kᵀ`` after one matmul; its upper triangle (where ``G_i - G_j ≥ 0`` could
  overflow) is zeroed before ``exp`` and after it, so no ``inf`` ever appears;
* per-key decay ``g [B, T, H, K]``: the strictly lower triangle of ``A`` is tiled dyadically.
  At level ``s = 1, 2, 4, …, C/2`` the chunk is cut into blocks of ``s`` tokens; each odd block
  (rows) meets the even block just before it (columns), with the first row of the odd block as
  the reference, so the block is one matmul of ``q ⊙ exp(G - G_r)`` with ``k ⊙ exp(G_r - G)``.
  The levels cover every pair ``j < i`` exactly once and the diagonal ``i = j`` has no decay:
  ``O(C K log C)`` elementwise work per chunk instead of the ``O(C² K)`` of forming every
  ``exp(G_i - G_j)``. The factors are products of the per-step decays ``exp(g_t) ≤ 1`` (see
  ``_PerKeyDecays``), never exponentials of sums.

Every ``exp`` argument is floored at -80 (``_decay_factor``): below about -87 ``exp`` returns
subnormals or zero and runs 10-30 times slower on x86 CPUs, while a factor under
``e^-80 ≈ 2e-35`` is negligible next to the undecayed ``q_i·k_i`` term of the same output.

Speed. On a CPU this is bound by memory traffic and per-operation overhead more than by the
matmuls, so the core is one ``torch.autograd.Function`` with a hand-written backward: it walks
over tiles of chunks (temporaries stay small and in cache), keeps only the inputs, ``exp(g)``,
the states entering each chunk and ``A``, rebuilds the other decay factors in the backward, and
writes each result once; the gradient of ``G`` comes from ``q ⊙ dq - k ⊙ dk`` (each factor ``exp(G_i - ·)`` sits
next to ``q_i`` and each ``exp(· - G_j)`` next to ``k_j``) instead of level by level. The state
is carried by a Python loop over the chunks (one fused multiply-add per chunk, forward and
backward). Work is ``O(T·C·(K+V) + T·K·V)`` and memory linear in ``T``.

Inputs in bfloat16/float16 are computed in float32 (float64 stays float64); the output comes
back in the input dtype, the final state in the accumulation dtype (as ``recurrent``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqapps.kernels.backend import accumulation_dtype, expect_chunk_size

# Numbers per ``[chunks, C, D]`` slab of a tile: a few MB, so that a tile's working set stays in
# cache, and few enough tiles that per-operation overhead stays small.
_TILE_ELEMENTS = 1 << 19
# Below this block size a level's products are elementwise: batched matmuls of tiny matrices
# cost more in per-matrix overhead than they save.
_MATMUL_MIN_BLOCK = 8
# Log decays are floored here before exp (see ``_decay_factor``).
_EXP_FLOOR = -80.0


def gla_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
              initial_state: torch.Tensor | None = None, output_final_state: bool = False,
              chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated linear attention.

    ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``g [B, T, H, K]`` (log decay per key dimension)
    or ``[B, T, H]`` (one per head), ``initial_state [B, H, K, V]`` or ``None``. Returns
    ``(o [B, T, H, V], final_state [B, H, K, V] or None)``. ``chunk_size`` is rounded up to a
    power of two (the dyadic tiling needs one) and capped at the sequence length so rounded.
    """
    expect_chunk_size(chunk_size)
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    acc = accumulation_dtype(q)
    chunk = _next_power_of_two(min(chunk_size, max(length, 1)))
    n_chunks = -(-length // chunk)
    padded = n_chunks * chunk

    def chunked(x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H, D]`` -> ``[B·H·N, C, D]`` in ``acc``, zero-padded at the end (a zero key
        adds nothing to the state and a zero log decay keeps it: padding is inert)."""
        x = x.to(acc).movedim(1, 2)
        if padded != length:
            x = F.pad(x, [0, 0, 0, padded - length])
        return x.reshape(batch * heads * n_chunks, chunk, x.shape[-1])

    if torch.compiler.is_exporting():
        return gla_chunk_reference(q, k, v, g, scale, initial_state, output_final_state, chunk)
    state = (torch.zeros(batch * heads, key_dim, value_dim, dtype=acc, device=q.device)
             if initial_state is None else initial_state.to(acc).reshape(batch * heads, key_dim, value_dim))
    g = g if g.ndim == 4 else g.unsqueeze(-1)  # [B, T, H, K or 1]
    out, final_state = _ChunkedGLA.apply(chunked(q), chunked(k), chunked(v), chunked(g), state, scale)
    out = out.view(batch, heads, padded, value_dim)[:, :, :length].movedim(1, 2).to(q.dtype)
    return out, (final_state.view(batch, heads, key_dim, value_dim) if output_final_state else None)


def gla_chunk_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
                        initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                        chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same chunked form in plain, out-of-place tensor operations, written to be read: the
    intra-chunk decays ``exp(G_i - G_j)`` are formed for every pair (``[C, C, K]`` per chunk,
    upper triangle zeroed before ``exp``), and the state is carried by a loop over the chunks.
    ``O(T·C·K)`` memory instead of ``O(T·K)``, no hand-written backward, no writes into views: what
    ``torch.export`` and the ONNX exporter trace (``gla_chunk`` hands over to it while exporting),
    and a second reference for the fast path. Same shapes and dtypes as ``gla_chunk``."""
    batch, length, heads, key_dim = q.shape
    acc = accumulation_dtype(q)
    chunk = min(chunk_size, max(length, 1))
    n_chunks = -(-length // chunk)
    padded = n_chunks * chunk

    def chunked(x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H, D]`` -> ``[B, H, N, C, D]`` in ``acc``, zero-padded at the end (inert)."""
        x = x.to(acc).movedim(1, 2)
        if padded != length:
            x = F.pad(x, [0, 0, 0, padded - length])
        return x.reshape(batch, heads, n_chunks, chunk, x.shape[-1])

    q_c, k_c, v_c = chunked(q), chunked(k), chunked(v)
    log_decay = chunked(g if g.ndim == 4 else g.unsqueeze(-1)).cumsum(3)  # G within each chunk
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril().unsqueeze(-1)
    gap = (log_decay.unsqueeze(4) - log_decay.unsqueeze(3)).masked_fill(~causal, 0.0)  # G_i - G_j
    pair_decay = gap.clamp_min(_EXP_FLOOR).exp().masked_fill(~causal, 0.0)  # [B, H, N, C, C, K or 1]
    attention = torch.einsum("bhnik,bhnijk,bhnjk->bhnij", q_c, pair_decay.expand(-1, -1, -1, -1, -1, key_dim), k_c)
    queries = q_c * log_decay.clamp_min(_EXP_FLOOR).exp()  # q ⊙ exp(G)
    keys_to_end = k_c * (log_decay[:, :, :, -1:] - log_decay).clamp_min(_EXP_FLOOR).exp()
    chunk_decay = log_decay[:, :, :, -1].clamp_min(_EXP_FLOOR).exp().unsqueeze(-1)  # [B, H, N, K or 1, 1]

    state = (q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=acc) if initial_state is None
             else initial_state.to(acc))
    entering = []
    for n in range(n_chunks):
        entering.append(state)
        state = chunk_decay[:, :, n] * state + keys_to_end[:, :, n].transpose(-1, -2) @ v_c[:, :, n]
    out = scale * (attention @ v_c + queries @ torch.stack(entering, 2))
    out = out.reshape(batch, heads, padded, -1)[:, :, :length].movedim(1, 2).to(q.dtype)
    return out, (state if output_final_state else None)


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _tiles(n_chunks: int, chunk_numel: int) -> list[slice]:
    """Slices of ``n_chunks`` chunks, about ``_TILE_ELEMENTS`` numbers per slab each."""
    step = max(1, _TILE_ELEMENTS // max(1, chunk_numel))
    return [slice(start, start + step) for start in range(0, n_chunks, step)]


class _ChunkedGLA(torch.autograd.Function):
    """``q, k [M, C, K]``, ``v [M, C, V]``, ``g [M, C, K or 1]`` (log decays), ``initial_state
    [BH, K, V]``, with ``M = BH · N`` and the chunks of one sequence consecutive -> ``(o [M, C, V],
    final_state [BH, K, V])``. The decay factors are rebuilt per tile wherever they are needed
    rather than stored."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale):
        q, k, v, g = q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous()
        n_total, chunk, key_dim = q.shape
        tiles = _tiles(n_total, chunk * max(key_dim, v.shape[-1]))
        chunk_decay = _decay_factor_(g.sum(1)).unsqueeze(-1)  # exp(G_last): [M, K or 1, 1]
        # What the tiles rebuild their decay factors from: the log decays, or for a decay per key
        # the per-step factors exp(g), computed once.
        decays, source = (_PerKeyDecays, _decay_factor(g)) if g.shape[-1] > 1 else (_ScalarDecays, g)

        # Each chunk's own contribution to the state it passes on: Σ_j (k_j ⊙ exp(G_last - G_j)) v_jᵀ.
        contributions = q.new_empty(n_total, key_dim, v.shape[-1])
        for tile in tiles:
            torch.bmm((k[tile] * decays(source[tile]).key).transpose(1, 2), v[tile], out=contributions[tile])
        entering, final_state = _carry(contributions, chunk_decay, initial_state)
        del contributions

        out = torch.empty_like(v)
        attention = q.new_empty(n_total, chunk, chunk)
        for tile in tiles:
            decay = decays(source[tile])
            decay.attention(q[tile], k[tile], out=attention[tile])
            torch.bmm(q[tile] * decay.query, entering[tile], out=out[tile])
            out[tile].baddbmm_(attention[tile], v[tile], beta=scale, alpha=scale)
        ctx.save_for_backward(q, k, v, source, chunk_decay, entering, attention)
        ctx.scale, ctx.decays, ctx.tiles = scale, decays, tiles
        return out, final_state

    @staticmethod
    def backward(ctx, d_out, d_final):
        q, k, v, source, chunk_decay, entering, attention = ctx.saved_tensors
        tiles, decays, scale = ctx.tiles, ctx.decays, ctx.scale
        d_out = d_out.contiguous()

        # What each chunk's outputs ask of the state entering it: scale · (q ⊙ exp(G))ᵀ dO.
        d_local = torch.empty_like(entering)
        for tile in tiles:
            queries = q[tile] * decays(source[tile]).query
            d_local[tile].baddbmm_(queries.transpose(1, 2), d_out[tile], beta=0, alpha=scale)
        d_leaving, d_initial = _carry(d_local, chunk_decay, d_final, reverse=True)
        del d_local

        d_q, d_k, d_v, d_g = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(source)
        for tile in tiles:
            q_t, k_t, v_t, do_t, leaving_t = q[tile], k[tile], v[tile], d_out[tile] * scale, d_leaving[tile]
            decay = decays(source[tile])
            decay.attention_backward(q_t, k_t, do_t @ v_t.transpose(1, 2), d_q[tile], d_k[tile])
            keys_to_end = k_t * decay.key
            # v feeds A v and the state passed on.
            torch.baddbmm(keys_to_end @ leaving_t, attention[tile].transpose(1, 2), do_t, out=d_v[tile])
            d_query = do_t @ entering[tile].transpose(1, 2)  # d(q ⊙ exp(G))
            d_key = v_t @ leaving_t.transpose(1, 2)  # d(k ⊙ exp(G_last - G))
            d_q[tile].addcmul_(d_query, decay.query)
            d_k[tile].addcmul_(d_key, decay.key)
            # G_last scales every key of the chunk and the state carried through it.
            last = d_key.mul_(keys_to_end).sum(1) + (entering[tile] * leaving_t).sum(-1) * chunk_decay[tile, :, 0]
            # Every term has G_i as exp(G_i - ·) next to q_i or exp(· - G_i) next to k_i, so
            # dL/dG = q ⊙ dq - k ⊙ dk, plus the G_last terms; then back through the cumsum.
            d_log_decay = q_t * d_q[tile] - k_t * d_k[tile]
            d_log_decay[:, -1] += last
            if source.shape[-1] == 1:
                d_log_decay = d_log_decay.sum(-1, keepdim=True)
            torch.sub(d_log_decay.sum(1, keepdim=True), d_log_decay.cumsum(1), out=d_g[tile]).add_(d_log_decay)
        return d_q, d_k, d_v, d_g, d_initial, None


def _decay_factor(log_decay: torch.Tensor) -> torch.Tensor:
    """``exp`` of a log decay (``<= 0``) with its argument floored at ``_EXP_FLOOR`` (module
    docstring: the floor keeps exp off its slow subnormal path and changes nothing resolvable)."""
    return _decay_factor_(log_decay.clone())


def _decay_factor_(log_decay: torch.Tensor) -> torch.Tensor:
    """``_decay_factor`` in place, for a temporary."""
    return log_decay.clamp_min_(_EXP_FLOOR).exp_()


def _to_end(log_decay: torch.Tensor) -> torch.Tensor:
    """``G_last - G_j`` (``<= 0``): the log decay from each position to the end of its chunk."""
    return log_decay[:, -1:] - log_decay


def _carry(contributions: torch.Tensor, chunk_decay: torch.Tensor, start: torch.Tensor, reverse: bool = False):
    """Carries a state through the chunks of each sequence, ``S_next = decay ⊙ S + contribution``:
    ``contributions [M, K, V]``, ``chunk_decay [M, K or 1, 1]``, ``start [BH, K, V]`` -> (the state
    entering each chunk ``[M, K, V]``, the state leaving the last one ``[BH, K, V]``). ``reverse``
    runs from the last chunk to the first, for the gradients, which flow backwards through the
    same recurrence (and then "entering" is the gradient of the state leaving each chunk)."""
    n_seq = start.shape[0]
    contributions = contributions.view(n_seq, -1, *contributions.shape[1:])
    decay = chunk_decay.view(n_seq, -1, *chunk_decay.shape[1:])
    entering = torch.empty_like(contributions)
    order = list(range(contributions.shape[1]))
    if reverse:
        order.reverse()
    entering[:, order[0]] = start
    for n, following in zip(order, order[1:]):
        torch.addcmul(contributions[:, n], decay[:, n], entering[:, n], out=entering[:, following])
    last = order[-1]
    leaving = torch.addcmul(contributions[:, last], decay[:, last], entering[:, last])
    return entering.view(-1, *entering.shape[2:]), leaving


class _ScalarDecays:
    """The decay factors of a tile of chunks with one log decay per position, ``g [m, C, 1]``:
    ``query = exp(G)``, ``key = exp(G_last - G)`` (``[m, C, 1]``), and the intra-chunk matrix
    ``A_ij = exp(G_i - G_j) q_i·k_j`` for ``j ≤ i``."""

    def __init__(self, g: torch.Tensor):
        self.log_decay = g.cumsum(1)
        self.query = _decay_factor(self.log_decay)
        self.key = _decay_factor_(_to_end(self.log_decay))

    def decay_matrix(self) -> torch.Tensor:
        """``exp(G_i - G_j)`` below the diagonal and on it, 0 above: ``[m, C, C]``."""
        position = torch.arange(self.log_decay.shape[1], device=self.log_decay.device)
        above = position.unsqueeze(1) < position  # j > i
        # G_i - G_j >= 0 above the diagonal: zeroed before exp (no overflow) and after (no use).
        gap = (self.log_decay - self.log_decay.transpose(1, 2)).masked_fill_(above, 0.0)
        return _decay_factor_(gap).masked_fill_(above, 0.0)

    def attention(self, q: torch.Tensor, k: torch.Tensor, out: torch.Tensor) -> None:
        torch.bmm(q, k.transpose(1, 2), out=out).mul_(self.decay_matrix())

    def attention_backward(self, q, k, d_attention, d_q, d_k) -> None:
        """Writes the gradients through ``A`` (given ``dA``, overwritten) into ``d_q, d_k``."""
        d_scores = d_attention.mul_(self.decay_matrix())
        torch.bmm(d_scores, k, out=d_q)
        torch.bmm(d_scores.transpose(1, 2), q, out=d_k)


class _PerKeyDecays:
    """The decay factors of a tile of chunks with a log decay per key dimension, ``g [m, C, K]``,
    built as products of the per-step decays ``e_t = exp(g_t) <= 1`` (no exp of a sum, hence no
    overflow, and one exp per element in all).

    The dyadic tiling (module docstring) needs, at level ``s``, ``exp(G_i - G_r)`` for the rows
    ``i`` of each odd block (``r`` its first row) and ``exp(G_r - G_j)`` for the columns ``j`` of
    the even block before it. Two buffers hold them for every position at once:
    ``prefix_i = Π e_t`` over ``(start of i's block, i]`` and ``suffix_j = Π e_t`` over
    ``(j, start of the next block]``. Going from blocks of ``s`` to ``2s`` multiplies the second
    half of each new block's prefixes, and the first half's suffixes, by one suffix each. After
    the last level they are the inter-chunk factors: ``query = e_0 · prefix = exp(G)``,
    ``key = suffix = exp(G_last - G)``."""

    def __init__(self, step: torch.Tensor):
        self.step = step  # exp(g): [m, C, K]
        self.prefix = torch.ones_like(self.step)
        self.suffix = torch.ones_like(self.step)
        self.suffix[:, :-1] = self.step[:, 1:]
        self.finished = False

    def levels(self):
        """Per level: the views of ``_dyadic_levels`` and the rows' and columns' factors."""
        for halves, blocks in _dyadic_levels(self.step.shape[1]):
            prefix_even, prefix_odd = halves(self.prefix)
            suffix_even, suffix_odd = halves(self.suffix)
            yield halves, blocks, prefix_odd, suffix_even
            prefix_odd.mul_(suffix_even[:, :, :1])
            suffix_even.mul_(suffix_odd[:, :, :1])
        self.prefix.mul_(self.step[:, :1])
        self.finished = True

    @property
    def query(self) -> torch.Tensor:
        """``exp(G)``: ``[m, C, K]``."""
        self._finish()
        return self.prefix

    @property
    def key(self) -> torch.Tensor:
        """``exp(G_last - G)``: ``[m, C, K]``."""
        self._finish()
        return self.suffix

    def _finish(self) -> None:
        """Run the levels that no attention pass has run."""
        if not self.finished:
            for _ in self.levels():
                pass

    def attention(self, q: torch.Tensor, k: torch.Tensor, out: torch.Tensor) -> None:
        """``A_ij = Σ_k q_ik k_jk exp(G_ik - G_jk)`` for ``j ≤ i``, 0 above: ``out [m, C, C]``."""
        out.zero_().diagonal(dim1=1, dim2=2).copy_((q * k).sum(-1))
        for halves, blocks, row_factor, col_factor in self.levels():
            rows, cols = halves(q)[1] * row_factor, halves(k)[0] * col_factor
            blocks(out).copy_(_block_product(rows, cols.transpose(2, 3)))

    def attention_backward(self, q, k, d_attention, d_q, d_k) -> None:
        """Writes the gradients through ``A`` (given ``dA``) into ``d_q, d_k``."""
        diagonal = d_attention.diagonal(dim1=1, dim2=2).unsqueeze(-1)
        torch.mul(k, diagonal, out=d_q)
        torch.mul(q, diagonal, out=d_k)
        for halves, blocks, row_factor, col_factor in self.levels():
            rows, cols = halves(q)[1] * row_factor, halves(k)[0] * col_factor
            d_scores = blocks(d_attention)
            halves(d_q)[1].addcmul_(_block_product(d_scores, cols), row_factor)
            halves(d_k)[0].addcmul_(_block_product(d_scores.transpose(2, 3), rows), col_factor)


def _dyadic_levels(chunk: int):
    """Per level ``s = 1, 2, …, C/2``: views of a ``[m, C, D]`` tensor as its even (columns) and
    odd (rows) blocks, and of a ``[m, C, C]`` matrix as the level's blocks (rows of odd block
    ``p``, columns of even block ``p``), all ``[m, C/2s, s, ·]``."""
    size = 1
    while size < chunk:
        pairs = chunk // (2 * size)

        def halves(x, pairs=pairs, size=size):
            return x.view(x.shape[0], pairs, 2, size, x.shape[-1]).unbind(2)

        def blocks(matrix, pairs=pairs, size=size):
            by_pair = matrix.view(matrix.shape[0], pairs, 2 * size, pairs, 2 * size)
            return by_pair.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)[:, :, size:, :size]

        yield halves, blocks
        size *= 2


def _block_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [m, P, s, n] @ b [m, P, n, p]``, elementwise when the blocks are tiny."""
    if a.shape[2] >= _MATMUL_MIN_BLOCK:
        return a @ b
    if a.shape[3] <= b.shape[3]:  # short contraction: a sum of outer products
        out = a[..., :1] * b[:, :, :1]
        for j in range(1, a.shape[3]):
            out.addcmul_(a[..., j:j + 1], b[:, :, j:j + 1])
        return out
    return (a.unsqueeze(3) * b.transpose(2, 3).unsqueeze(2)).sum(-1)  # long contraction: sum over it
