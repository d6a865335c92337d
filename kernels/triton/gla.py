"""Gated linear attention as chunked Triton kernels, forward and backward.

Per batch and head, with the state ``S [K, V]`` and the log decay ``g_t [K]`` (a scalar per head
is broadcast over ``K``):

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ,        o_t = scale · S_tᵀ q_t.

**Chunks.** Time is cut into chunks of ``BT`` steps. Inside a chunk let ``G_i`` be the log decay
summed from the chunk's first step up to and including step ``i`` (``[K]``, one per key
dimension) and ``H`` the state entering the chunk. Unrolling the recurrence gives

    o_i = scale · [ (q_i ⊙ e^{G_i})ᵀ H + Σ_{j ≤ i} A_ij v_j ],  A_ij = Σ_d q_id k_jd e^{G_id − G_jd}
    H'  = e^{G_last} ⊙ H + Σ_j (k_j ⊙ e^{G_last − G_j}) v_jᵀ       (⊙ scales the rows of H)

so one sequential pass over chunks computes the states at chunk boundaries, and everything
else is parallel over chunks and made of matrix products.

**Keeping every exponent ≤ 0.** For decays (``g ≤ 0``, as log-sigmoid gates give) every
exponent above is a sum of ``g`` over a stretch of time, hence ≤ 0, except inside ``A``:
writing ``A = (q e^{G})(k e^{-G})ᵀ`` would overflow ``e^{-G}`` for strong decays. So each
chunk is split into sub-blocks of ``BC`` rows. For a query sub-block ``I`` after a key
sub-block ``J``, a reference row ``r`` between them splits ``e^{G_i − G_j}`` into
``e^{G_i − G_r} · e^{G_r − G_j}``, two factors ≤ 1, and the block of ``A`` is one ``tl.dot``.
The diagonal sub-blocks (``i, j`` in the same sub-block) go the same way through the
sub-block's first (or last) row, masked above the diagonal after the product, when the log
decay spans at most ``DIAGONAL_SPAN`` over the sub-block; a steeper one is computed
elementwise, one key (or query) row at a time, with the exponent masked to ``-inf`` above the
diagonal. Decays of ``-20`` per step underflow to exact zeros instead of ``inf·0``.

**Backward.** The gradient of the state entering chunk ``c`` runs backwards:

    dH_c = e^{G_last} ⊙ dH_{c+1} + scale · Σ_i (q_i ⊙ e^{G_i}) do_iᵀ,    dH_{n_chunks} = d final state,

and ``dH_0`` is the gradient of the initial state. With it, per chunk (sums over the chunk):

    dq_i = scale · [ e^{G_i} ⊙ (H do_i) + Σ_{j ≤ i} (do_i · v_j) e^{G_i − G_j} ⊙ k_j ]
    dk_j = scale · Σ_{i ≥ j} (do_i · v_j) e^{G_i − G_j} ⊙ q_i  +  e^{G_last − G_j} ⊙ (dH_{c+1} v_j)
    dv_j = scale · Σ_{i ≥ j} A_ij do_i  +  dH_{c+1}ᵀ (k_j ⊙ e^{G_last − G_j})

computed with the same sub-block scheme. For the decay: ``q_i`` and ``k_j`` only ever appear
as ``q_i e^{G_i}`` and ``k_j e^{−G_j}`` (and the outgoing state carries a factor ``e^{G_last}``),
so the gradient with respect to ``G_i`` is ``q_i ⊙ dq_i − k_i ⊙ dk_i``, plus
``Σ_v (dH_{c+1} ⊙ H_{c+1})`` at the chunk's last step. Since ``G`` is a cumulative sum of ``g``
inside the chunk, ``dg`` is the reverse cumulative sum of that within the chunk.

**Kernels** (``*_kernel``). ``_chunk_cumsum`` (``G``, fp32, padded to whole chunks by
repeating the last value); ``_forward_states`` and ``_backward_states``, the only sequential
loops, one program per (key block, value block, batch·head), writing every chunk-boundary
state (or its gradient) to an fp32 buffer ``[B·H, n_chunks + 1, K, V]`` whose last slot is the
final state; ``_forward_output``, ``_backward_dv`` and ``_backward_dq_dk_dg``, one program per
chunk (and value or key block), walking its sub-blocks.
Matrix products take the input dtype (bf16/fp16 as on tensor cores, fp32 exactly) and
accumulate in fp32; everything elementwise is fp32. ``K`` and ``V`` up to 256, any ``T``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from seqapps.errors import InputError

DEFAULT_CHUNK = 64   # BT: steps between stored states (16, 32, 64 or 128)
SUB = 16             # BC: rows of an intra-chunk sub-block (the smallest tl.dot size)
STATE_BLOCK = 64     # key / value block of the sequential state kernels
NUM_WARPS = 4        # measured on an H100 at B=4, H=8, T=4096, K=V=128, bf16: fwd+bwd 2.40 ms, against 3.89 with 8
MAX_HEAD_DIM = 256
# A diagonal sub-block whose log decay spans at most this much (|G_i - G_r| over its rows and
# keys) takes its block of A as one tl.dot through a reference row r: every factor stays below
# e^40 (e^80 for the products of the masked entries, under fp32's e^88). Steeper blocks go
# one key at a time, exactly.
DIAGONAL_SPAN = tl.constexpr(40.0)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Triton 3.6's interpreter multiplies bf16 tl.dot operands as their raw uint16 bits, so under
# TRITON_INTERPRET=1 the products are taken in fp32 (read when this module is imported).
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


# --------------------------------------------------------------------------- helpers

@triton.jit
def _head_start(bh, H, T, D):
    """Offset of element ``(b, 0, h, 0)`` of a contiguous ``[B, T, H, D]`` tensor (int64)."""
    bh = bh.to(tl.int64)
    return ((bh // H) * T * H + bh % H) * D


@triton.jit
def _load_tile(ptr, rows, row_stride, row_mask, cols, col_mask):
    """Block ``ptr[rows, cols]`` of a row-major matrix as fp32, zeros outside the masks."""
    offsets = rows[:, None] * row_stride + cols[None, :]
    return tl.load(ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_row(ptr, row, row_stride, cols, col_mask):
    """Row ``ptr[row, cols]`` as fp32, zeros outside the mask."""
    return tl.load(ptr + row * row_stride + cols, mask=col_mask, other=0.0).to(tl.float32)


@triton.jit
def _dot(a, b, DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``a @ b`` with operands in ``DTYPE`` (the input dtype) and an fp32 result."""
    if _INTERPRETED:
        # operands rounded to DTYPE, products and sums in fp32: what the tensor cores compute
        return tl.dot(a.to(DTYPE).to(tl.float32), b.to(DTYPE).to(tl.float32))
    else:
        return tl.dot(a.to(DTYPE), b.to(DTYPE), input_precision=PRECISION)


@triton.jit
def _masked_block_product(left, right, values, rows, LOWER: tl.constexpr, DTYPE: tl.constexpr,
                          PRECISION: tl.constexpr):
    """``(M ⊙ (left @ rightᵀ)) @ values`` for a diagonal sub-block, ``left, right [BC, BK]``,
    ``values [BC, BV]``, ``rows [BC]`` the sub-block's time steps; ``M_ij`` keeps ``i >= j``
    (``LOWER``, the block of ``A``) or ``i <= j`` (the block of ``Aᵀ``)."""
    scores = _dot(left, tl.trans(right), DTYPE, PRECISION)
    keep = rows[:, None] >= rows[None, :] if LOWER else rows[:, None] <= rows[None, :]
    return _dot(tl.where(keep, scores, 0.0), values, DTYPE, PRECISION)


@triton.jit
def _exact_diagonal_product(tile, G_tile, rows, other, G, values, first, T, H, K: tl.constexpr,
                            V: tl.constexpr, offs_k, mask_k, offs_v, mask_v, BC: tl.constexpr,
                            BV: tl.constexpr, LOWER: tl.constexpr):
    """The same product as :func:`_masked_block_product` for a sub-block whose decay is too steep
    to factor, one row ``m`` of ``other`` at a time with every exponent taken whole:
    ``Σ_m M_rm (Σ_d tile_rd other_md e^{±(G_rd − G_md)}) values_m``, ``+`` and ``r >= m``
    (``LOWER``: ``tile`` = queries, ``other`` = keys) or ``−`` and ``r <= m`` (``tile`` = keys,
    ``other`` = queries). ``first``: the sub-block's first step. Decays of ``-20`` per step
    underflow to exact zeros instead of ``inf·0``."""
    acc = tl.zeros([BC, BV], dtype=tl.float32)
    for m in range(BC):
        step = first + m
        # plain loads: a nested jit call costs the interpreter more than the load
        other_m = tl.load(other + step * H * K + offs_k, mask=mask_k & (step < T), other=0.0).to(tl.float32)
        G_m = tl.load(G + step * H * K + offs_k, mask=mask_k, other=0.0)
        values_m = tl.load(values + step * H * V + offs_v, mask=mask_v & (step < T), other=0.0).to(tl.float32)
        if LOWER:
            decay = tl.exp(tl.where(rows[:, None] >= step, G_tile - G_m[None, :], float("-inf")))
        else:
            decay = tl.exp(tl.where(rows[:, None] <= step, G_m[None, :] - G_tile, float("-inf")))
        weights = tl.sum(tile * decay * other_m[None, :], axis=1)
        acc += weights[:, None] * values_m[None, :]
    return acc


@triton.jit
def _state_block(kb, vb, bh, start, HAS_START: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr):
    """The ``[BK, BV]`` block ``(kb, vb)`` of a ``[K, V]`` state for the sequential state kernels:
    its key and value offsets and masks, its offsets and mask inside one ``[K, V]`` slot, and its
    starting value, read from ``start [B·H, K, V]`` when given (else zeros), in fp32."""
    offs_k = kb * BK + tl.arange(0, BK)
    offs_v = vb * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    state_offs = offs_k[:, None] * V + offs_v[None, :]
    state_mask = mask_k[:, None] & mask_v[None, :]
    if HAS_START:
        S = tl.load(start + bh.to(tl.int64) * K * V + state_offs, mask=state_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    return offs_k, offs_v, mask_k, mask_v, state_offs, state_mask, S


@triton.jit
def _stored_state(states, slot, vb, bh, n_chunks, K: tl.constexpr, V: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr):
    """All keys and value block ``vb`` of the chunk-boundary state ``slot`` of sequence ``bh`` in
    ``states [B·H, n_chunks + 1, K, V]`` (fp32): the key and value offsets and masks, and the
    ``[BK, BV]`` tile."""
    offs_k = tl.arange(0, BK)
    offs_v = vb * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    tile = tl.load(states + (bh.to(tl.int64) * (n_chunks + 1) + slot) * K * V + offs_k[:, None] * V + offs_v[None, :],
                   mask=mask_k[:, None] & mask_v[None, :], other=0.0)
    return offs_k, offs_v, mask_k, mask_v, tile


# --------------------------------------------------------------------------- kernels

@triton.jit
def _chunk_cumsum_kernel(g, G, T, T_pad, H, K: tl.constexpr, PER_KEY: tl.constexpr,
                         BT: tl.constexpr, BK: tl.constexpr):
    """``G [B, T_pad, H, K]`` fp32: the log decay summed from the start of each chunk. Rows
    past ``T`` read ``g = 0``, so they repeat the last value. Grid ``(n_chunks, B·H)``."""
    c, bh = tl.program_id(0), tl.program_id(1)
    rows = c * BT + tl.arange(0, BT)
    cols = tl.arange(0, BK)
    col_mask = cols < K
    if PER_KEY:
        decay = _load_tile(g + _head_start(bh, H, T, K), rows, H * K, rows < T, cols, col_mask)
    else:
        per_head = tl.load(g + _head_start(bh, H, T, 1) + rows * H, mask=rows < T, other=0.0).to(tl.float32)
        decay = tl.where(col_mask[None, :], per_head[:, None], 0.0)
    offsets = _head_start(bh, H, T_pad, K) + rows[:, None] * H * K + cols[None, :]
    tl.store(G + offsets, tl.cumsum(decay, axis=0), mask=col_mask[None, :] & (rows < T_pad)[:, None])


@triton.jit
def _forward_states_kernel(k, v, G, initial_state, states, T, T_pad, n_chunks, H,
                           K: tl.constexpr, V: tl.constexpr, HAS_INITIAL: tl.constexpr,
                           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           PRECISION: tl.constexpr):
    """``states[bh, c]`` = the state entering chunk ``c``; slot ``n_chunks`` is the final state.
    Grid ``(K blocks, V blocks, B·H)``: the rows and columns of ``S`` evolve independently."""
    kb, vb, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k, offs_v, mask_k, mask_v, state_offs, state_mask, S = _state_block(
        kb, vb, bh, initial_state, HAS_INITIAL, K, V, BK, BV)
    k, v = k + _head_start(bh, H, T, K), v + _head_start(bh, H, T, V)
    G = G + _head_start(bh, H, T_pad, K)
    states = states + bh.to(tl.int64) * (n_chunks + 1) * K * V
    # A while loop: the interpreter cannot take a runtime scalar as a range bound.
    c = 0
    while c < n_chunks:
        tl.store(states + c * K * V + state_offs, S, mask=state_mask)
        rows = c * BT + tl.arange(0, BT)
        k_c = _load_tile(k, rows, H * K, rows < T, offs_k, mask_k)
        v_c = _load_tile(v, rows, H * V, rows < T, offs_v, mask_v)
        G_c = _load_tile(G, rows, H * K, rows < T_pad, offs_k, mask_k)
        G_last = _load_row(G, c * BT + BT - 1, H * K, offs_k, mask_k)
        k_to_end = k_c * tl.exp(G_last[None, :] - G_c)
        S = S * tl.exp(G_last)[:, None] + _dot(tl.trans(k_to_end), v_c, k.dtype.element_ty, PRECISION)
        c += 1
    tl.store(states + n_chunks * K * V + state_offs, S, mask=state_mask)


@triton.jit
def _forward_output_kernel(q, k, v, G, states, o, scale, T, T_pad, n_chunks, H,
                           K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """``o`` for one chunk and one value block, all of ``K``. Grid ``(V blocks, n_chunks, B·H)``."""
    vb, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    DTYPE = q.dtype.element_ty
    offs_k, offs_v, mask_k, mask_v, H_in = _stored_state(states, c, vb, bh, n_chunks, K, V, BK, BV)
    H_in = H_in.to(DTYPE)  # only ever a tl.dot operand: kept in the operand dtype (half the registers for bf16)
    q, k = q + _head_start(bh, H, T, K), k + _head_start(bh, H, T, K)
    v, o = v + _head_start(bh, H, T, V), o + _head_start(bh, H, T, V)
    G = G + _head_start(bh, H, T_pad, K)
    for ib in range(BT // BC):
        i0 = c * BT + ib * BC
        if i0 < T:
            rows = i0 + tl.arange(0, BC)
            q_I = _load_tile(q, rows, H * K, rows < T, offs_k, mask_k)
            G_I = _load_tile(G, rows, H * K, rows < T_pad, offs_k, mask_k)
            out = _dot(q_I * tl.exp(G_I), H_in, DTYPE, PRECISION)
            # earlier sub-blocks J of the chunk, through the reference row i0
            G_ref = _load_row(G, i0, H * K, offs_k, mask_k)
            q_ref = q_I * tl.exp(G_I - G_ref[None, :])
            for jb in range(ib):
                cols = c * BT + jb * BC + tl.arange(0, BC)
                k_J = _load_tile(k, cols, H * K, cols < T, offs_k, mask_k)
                G_J = _load_tile(G, cols, H * K, cols < T_pad, offs_k, mask_k)
                v_J = _load_tile(v, cols, H * V, cols < T, offs_v, mask_v)
                scores = _dot(q_ref, tl.trans(k_J * tl.exp(G_ref[None, :] - G_J)), DTYPE, PRECISION)
                out += _dot(scores, v_J, DTYPE, PRECISION)
            # the diagonal sub-block: one tl.dot through the reference row i0 when its decay
            # span allows, else one key at a time
            if tl.max(tl.abs(G_I - G_ref[None, :])) <= DIAGONAL_SPAN:
                k_I = _load_tile(k, rows, H * K, rows < T, offs_k, mask_k)
                v_I = _load_tile(v, rows, H * V, rows < T, offs_v, mask_v)
                out += _masked_block_product(q_ref, k_I * tl.exp(G_ref[None, :] - G_I), v_I, rows, True,
                                             DTYPE, PRECISION)
            else:
                out += _exact_diagonal_product(q_I, G_I, rows, k, G, v, i0, T, H, K, V, offs_k, mask_k,
                                               offs_v, mask_v, BC, BV, True)
            out_offs = rows[:, None] * H * V + offs_v[None, :]
            tl.store(o + out_offs, (scale * out).to(o.dtype.element_ty),
                     mask=(rows < T)[:, None] & mask_v[None, :])


@triton.jit
def _backward_states_kernel(q, do, G, d_final, d_states, scale, T, T_pad, n_chunks, H,
                            K: tl.constexpr, V: tl.constexpr, HAS_D_FINAL: tl.constexpr,
                            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            PRECISION: tl.constexpr):
    """``d_states[bh, c]`` = gradient of the state entering chunk ``c`` (slot 0: the initial
    state, slot ``n_chunks``: the final state). Grid ``(K blocks, V blocks, B·H)``."""
    kb, vb, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k, offs_v, mask_k, mask_v, state_offs, state_mask, dS = _state_block(
        kb, vb, bh, d_final, HAS_D_FINAL, K, V, BK, BV)
    q, do = q + _head_start(bh, H, T, K), do + _head_start(bh, H, T, V)
    G = G + _head_start(bh, H, T_pad, K)
    d_states = d_states + bh.to(tl.int64) * (n_chunks + 1) * K * V
    c = n_chunks - 1
    while c >= 0:
        tl.store(d_states + (c + 1) * K * V + state_offs, dS, mask=state_mask)
        rows = c * BT + tl.arange(0, BT)
        q_c = _load_tile(q, rows, H * K, rows < T, offs_k, mask_k)
        do_c = _load_tile(do, rows, H * V, rows < T, offs_v, mask_v)
        G_c = _load_tile(G, rows, H * K, rows < T_pad, offs_k, mask_k)
        G_last = _load_row(G, c * BT + BT - 1, H * K, offs_k, mask_k)
        q_from_start = q_c * tl.exp(G_c)
        dS = dS * tl.exp(G_last)[:, None] + scale * _dot(tl.trans(q_from_start), do_c,
                                                         q.dtype.element_ty, PRECISION)
        c -= 1
    tl.store(d_states + state_offs, dS, mask=state_mask)


@triton.jit
def _backward_dv_kernel(q, k, G, do, d_states, dv, scale, T, T_pad, n_chunks, H,
                        K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """``dv`` for one chunk and one value block, all of ``K``. Grid ``(V blocks, n_chunks, B·H)``."""
    vb, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    DTYPE = q.dtype.element_ty
    offs_k, offs_v, mask_k, mask_v, dH_out = _stored_state(d_states, c + 1, vb, bh, n_chunks, K, V, BK, BV)
    dH_out = dH_out.to(DTYPE)  # a tl.dot operand
    q, k = q + _head_start(bh, H, T, K), k + _head_start(bh, H, T, K)
    do, dv = do + _head_start(bh, H, T, V), dv + _head_start(bh, H, T, V)
    G = G + _head_start(bh, H, T_pad, K)
    G_last = _load_row(G, c * BT + BT - 1, H * K, offs_k, mask_k)
    for jb in range(BT // BC):
        j0 = c * BT + jb * BC
        if j0 < T:
            keys = j0 + tl.arange(0, BC)
            k_J = _load_tile(k, keys, H * K, keys < T, offs_k, mask_k)
            G_J = _load_tile(G, keys, H * K, keys < T_pad, offs_k, mask_k)
            intra = tl.zeros([BC, BV], dtype=tl.float32)
            # the intra-chunk part first (times scale at the end): later sub-blocks I of the
            # chunk, through the reference row j0 + BC - 1
            G_ref = _load_row(G, j0 + BC - 1, H * K, offs_k, mask_k)
            k_ref = k_J * tl.exp(G_ref[None, :] - G_J)
            for ib in range(jb + 1, BT // BC):
                queries = c * BT + ib * BC + tl.arange(0, BC)
                q_I = _load_tile(q, queries, H * K, queries < T, offs_k, mask_k)
                G_I = _load_tile(G, queries, H * K, queries < T_pad, offs_k, mask_k)
                do_I = _load_tile(do, queries, H * V, queries < T, offs_v, mask_v)
                scores_t = _dot(k_ref, tl.trans(q_I * tl.exp(G_I - G_ref[None, :])), DTYPE, PRECISION)
                intra += _dot(scores_t, do_I, DTYPE, PRECISION)
            # the diagonal sub-block: one tl.dot through the reference row when its decay span
            # allows, else one query at a time
            if tl.max(tl.abs(G_J - G_ref[None, :])) <= DIAGONAL_SPAN:
                q_J = _load_tile(q, keys, H * K, keys < T, offs_k, mask_k)
                do_J = _load_tile(do, keys, H * V, keys < T, offs_v, mask_v)
                intra += _masked_block_product(k_ref, q_J * tl.exp(G_J - G_ref[None, :]), do_J, keys, False,
                                               DTYPE, PRECISION)
            else:
                intra += _exact_diagonal_product(k_J, G_J, keys, q, G, do, j0, T, H, K, V, offs_k, mask_k,
                                                 offs_v, mask_v, BC, BV, False)
            # then the part through the state leaving the chunk
            grad = _dot(k_J * tl.exp(G_last[None, :] - G_J), dH_out, DTYPE, PRECISION) + scale * intra
            tl.store(dv + keys[:, None] * H * V + offs_v[None, :], grad.to(dv.dtype.element_ty),
                     mask=(keys < T)[:, None] & mask_v[None, :])


@triton.jit
def _backward_dq_dk_dg_kernel(q, k, v, G, do, states, d_states, dq, dk, dg, scale, T, T_pad, n_chunks, H,
                              K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                              BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """``dq``, ``dk`` and ``dg [B, T, H, K]`` (fp32) for one chunk and one key block, all of
    ``V``. Walks the sub-blocks from last to first to sum ``dg`` backwards. Grid
    ``(K blocks, n_chunks, B·H)``."""
    kb, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    DTYPE = q.dtype.element_ty
    offs_k = kb * BK + tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    q, k = q + _head_start(bh, H, T, K), k + _head_start(bh, H, T, K)
    v, do = v + _head_start(bh, H, T, V), do + _head_start(bh, H, T, V)
    dq, dk, dg = dq + _head_start(bh, H, T, K), dk + _head_start(bh, H, T, K), dg + _head_start(bh, H, T, K)
    G = G + _head_start(bh, H, T_pad, K)
    slot = (bh.to(tl.int64) * (n_chunks + 1) + c) * K * V
    state_offs = offs_k[:, None] * V + offs_v[None, :]
    state_mask = mask_k[:, None] & mask_v[None, :]
    H_out = tl.load(states + slot + K * V + state_offs, mask=state_mask, other=0.0)
    dH_out = tl.load(d_states + slot + K * V + state_offs, mask=state_mask, other=0.0)
    dg_from_state = tl.sum(dH_out * H_out, axis=1)      # through e^{G_last} in the outgoing state
    # from here on the states are only tl.dot operands: kept in the operand dtype
    dH_out = dH_out.to(DTYPE)
    H_in = tl.load(states + slot + state_offs, mask=state_mask, other=0.0).to(DTYPE)
    G_last = _load_row(G, c * BT + BT - 1, H * K, offs_k, mask_k)
    dG_after = tl.zeros([BK], dtype=tl.float32)         # Σ of dG over the later sub-blocks
    for ib in range(BT // BC - 1, -1, -1):
        i0 = c * BT + ib * BC
        if i0 < T:
            rows = i0 + tl.arange(0, BC)
            q_I = _load_tile(q, rows, H * K, rows < T, offs_k, mask_k)
            G_I = _load_tile(G, rows, H * K, rows < T_pad, offs_k, mask_k)
            v_I = _load_tile(v, rows, H * V, rows < T, offs_v, mask_v)
            do_I = _load_tile(do, rows, H * V, rows < T, offs_v, mask_v)
            # the intra-chunk parts first (times scale at the end); dq from earlier sub-blocks J,
            # through the reference row i0
            G_top = _load_row(G, i0, H * K, offs_k, mask_k)
            G_ref = G_top
            acc = tl.zeros([BC, BK], dtype=tl.float32)
            for jb in range(ib):
                cols = c * BT + jb * BC + tl.arange(0, BC)
                k_J = _load_tile(k, cols, H * K, cols < T, offs_k, mask_k)
                G_J = _load_tile(G, cols, H * K, cols < T_pad, offs_k, mask_k)
                v_J = _load_tile(v, cols, H * V, cols < T, offs_v, mask_v)
                d_scores = _dot(do_I, tl.trans(v_J), DTYPE, PRECISION)
                acc += _dot(d_scores, k_J * tl.exp(G_ref[None, :] - G_J), DTYPE, PRECISION)
            intra_q = tl.exp(G_I - G_ref[None, :]) * acc
            # dk from later sub-blocks J, through the reference row i0 + BC - 1
            G_ref = _load_row(G, i0 + BC - 1, H * K, offs_k, mask_k)
            acc = tl.zeros([BC, BK], dtype=tl.float32)
            for jb in range(ib + 1, BT // BC):
                cols = c * BT + jb * BC + tl.arange(0, BC)
                q_J = _load_tile(q, cols, H * K, cols < T, offs_k, mask_k)
                G_J = _load_tile(G, cols, H * K, cols < T_pad, offs_k, mask_k)
                do_J = _load_tile(do, cols, H * V, cols < T, offs_v, mask_v)
                d_scores_t = _dot(v_I, tl.trans(do_J), DTYPE, PRECISION)
                acc += _dot(d_scores_t, q_J * tl.exp(G_J - G_ref[None, :]), DTYPE, PRECISION)
            intra_k = tl.exp(G_ref[None, :] - G_I) * acc
            # the diagonal sub-block (dA_ij = do_i · v_j for j <= i): two tl.dot through the
            # reference row i0 when its decay span allows, else one key at a time (column j of dA
            # feeds dq, row j of dk)
            d_scores = _dot(do_I, tl.trans(v_I), DTYPE, PRECISION)
            k_I = _load_tile(k, rows, H * K, rows < T, offs_k, mask_k)
            if tl.max(tl.abs(G_I - G_top[None, :])) <= DIAGONAL_SPAN:
                d_scores = tl.where(rows[:, None] >= rows[None, :], d_scores, 0.0)
                intra_q += tl.exp(G_I - G_top[None, :]) * _dot(d_scores, k_I * tl.exp(G_top[None, :] - G_I),
                                                               DTYPE, PRECISION)
                intra_k += tl.exp(G_top[None, :] - G_I) * _dot(tl.trans(d_scores),
                                                               q_I * tl.exp(G_I - G_top[None, :]),
                                                               DTYPE, PRECISION)
            else:
                sub = tl.arange(0, BC)
                for j in range(BC):
                    key = i0 + j
                    k_j = tl.load(k + key * H * K + offs_k, mask=mask_k & (key < T), other=0.0).to(tl.float32)
                    G_j = tl.load(G + key * H * K + offs_k, mask=mask_k, other=0.0)
                    d_scores_j = tl.sum(tl.where(sub[None, :] == j, d_scores, 0.0), axis=1)
                    weight = d_scores_j[:, None] * tl.exp(tl.where(rows[:, None] >= key, G_I - G_j[None, :],
                                                                   float("-inf")))
                    intra_q += weight * k_j[None, :]
                    intra_k_j = tl.sum(weight * q_I, axis=0)
                    intra_k += tl.where(sub[:, None] == j, intra_k_j[None, :], 0.0)
            # then the parts through the states entering and leaving the chunk
            grad_q = scale * (tl.exp(G_I) * _dot(do_I, tl.trans(H_in), DTYPE, PRECISION) + intra_q)
            grad_k = (tl.exp(G_last[None, :] - G_I) * _dot(v_I, tl.trans(dH_out), DTYPE, PRECISION)
                      + scale * intra_k)
            # dg: reverse cumulative sum of q dq - k dk over the chunk
            dG = q_I * grad_q - k_I * grad_k
            grad_g = tl.cumsum(dG, axis=0, reverse=True) + (dG_after + dg_from_state)[None, :]
            dG_after += tl.sum(dG, axis=0)
            offsets = rows[:, None] * H * K + offs_k[None, :]
            mask = (rows < T)[:, None] & mask_k[None, :]
            tl.store(dq + offsets, grad_q.to(dq.dtype.element_ty), mask=mask)
            tl.store(dk + offsets, grad_k.to(dk.dtype.element_ty), mask=mask)
            tl.store(dg + offsets, grad_g, mask=mask)


# --------------------------------------------------------------------------- host side

def _block(dim: int, cap: int | None = None) -> int:
    """A power-of-two block of at least 16 covering ``dim`` (at most ``cap``)."""
    size = max(16, triton.next_power_of_2(dim))
    return min(size, cap) if cap else size


def _precision(dtype: torch.dtype) -> str:
    """fp32 products exactly (no TF32); bf16/fp16 products use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


class _GatedLinearAttention(torch.autograd.Function):
    """Autograd wrapper: ``(q, k, v, g, scale, initial_state) -> (o, final_state)``."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, chunk_size):
        B, T, H, K = q.shape
        V = v.shape[-1]
        n_chunks = triton.cdiv(T, chunk_size)
        T_pad = n_chunks * chunk_size
        bh = B * H
        G = torch.empty(B, T_pad, H, K, device=q.device, dtype=torch.float32)
        _chunk_cumsum_kernel[(n_chunks, bh)](g, G, T, T_pad, H, K, PER_KEY=g.ndim == 4,
                                             BT=chunk_size, BK=_block(K))
        states = torch.empty(bh, n_chunks + 1, K, V, device=q.device, dtype=torch.float32)
        BK, BV = _block(K, STATE_BLOCK), _block(V, STATE_BLOCK)
        common = dict(T=T, T_pad=T_pad, n_chunks=n_chunks, H=H, K=K, V=V, BT=chunk_size,
                      PRECISION=_precision(q.dtype))
        _forward_states_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), bh)](
            k, v, G, initial_state, states, HAS_INITIAL=initial_state is not None, BK=BK, BV=BV,
            num_warps=NUM_WARPS, **common)
        o = torch.empty_like(v, dtype=q.dtype)
        _forward_output_kernel[(triton.cdiv(V, BV), n_chunks, bh)](
            q, k, v, G, states, o, scale, BC=SUB, BK=_block(K), BV=BV, num_warps=NUM_WARPS, **common)
        ctx.save_for_backward(q, k, v, G, states)
        ctx.scale, ctx.common = scale, common
        ctx.g_shape, ctx.g_dtype = g.shape, g.dtype
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        return o, states[:, -1].reshape(B, H, K, V).clone()

    @staticmethod
    def backward(ctx, d_out, d_final):
        q, k, v, G, states = ctx.saved_tensors
        B, T, H, K = q.shape
        V = v.shape[-1]
        common, n_chunks, bh = ctx.common, ctx.common["n_chunks"], B * H
        do = torch.zeros_like(v, dtype=q.dtype) if d_out is None else d_out.to(q.dtype).contiguous()
        d_final = None if d_final is None else d_final.contiguous()
        d_states = torch.empty_like(states)
        BK, BV = _block(K, STATE_BLOCK), _block(V, STATE_BLOCK)
        _backward_states_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), bh)](
            q, do, G, d_final, d_states, ctx.scale, HAS_D_FINAL=d_final is not None, BK=BK, BV=BV,
            num_warps=NUM_WARPS, **common)
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dg = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32)
        _backward_dq_dk_dg_kernel[(triton.cdiv(K, BK), n_chunks, bh)](
            q, k, v, G, do, states, d_states, dq, dk, dg, ctx.scale, BC=SUB, BK=BK, BV=_block(V),
            num_warps=NUM_WARPS, **common)
        dv = torch.empty_like(v)
        _backward_dv_kernel[(triton.cdiv(V, BV), n_chunks, bh)](
            q, k, G, do, d_states, dv, ctx.scale, BC=SUB, BK=_block(K), BV=BV, num_warps=NUM_WARPS, **common)
        dg = dg if len(ctx.g_shape) == 4 else dg.sum(-1)
        d_initial = None
        if ctx.initial_dtype is not None:
            d_initial = d_states[:, 0].reshape(B, H, K, V).to(ctx.initial_dtype)
        return dq, dk, dv, dg.to(ctx.g_dtype), None, d_initial, None


def _check_inputs(q, k, v, g, initial_state, chunk_size) -> None:
    """One-line InputError for what these kernels cannot take (shapes are checked by the caller)."""
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise InputError(f"backend='triton' got q, k, v of dtypes {q.dtype}, {k.dtype}, {v.dtype}; expected "
                         "one dtype among float32, bfloat16, float16")
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise InputError(f"backend='triton' got K={q.shape[-1]}, V={v.shape[-1]}; expected head dims "
                         f"of at most {MAX_HEAD_DIM}")
    if q.shape[1] == 0:
        raise InputError("backend='triton' got T=0; expected at least one time step")
    if chunk_size not in (16, 32, 64, 128):
        raise InputError(f"backend='triton' got chunk_size={chunk_size}; expected 16, 32, 64 or 128")
    devices = {t.device for t in (q, k, v, g, initial_state) if t is not None}
    if len(devices) > 1:
        raise InputError(f"backend='triton' got tensors on several devices {sorted(map(str, devices))}; "
                         "expected one")


def gla_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
               initial_state: torch.Tensor | None = None,
               output_final_state: bool = False,
               chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``g [B, T, H, K]`` or ``[B, T, H]`` (log decay),
    ``initial_state [B, H, K, V]`` -> ``(o [B, T, H, V], final_state [B, H, K, V] fp32 or None)``.
    Differentiable in every tensor input. ``chunk_size``: steps between stored states."""
    _check_inputs(q, k, v, g, initial_state, chunk_size)
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    o, final_state = _GatedLinearAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                                 g.contiguous(), float(scale), initial_state, chunk_size)
    return o, (final_state if output_final_state else None)
