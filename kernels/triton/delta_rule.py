"""The delta rule as fused recurrent Triton kernels, forward and backward.

Per head, with ``a_t = exp(g_t)`` (``a_t = 1`` without ``g``), the state ``S [K, V]`` evolves as
``S_t = a_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`` and the output is
``o_t = scale · S_tᵀ q_t``. The kernels write one step as a rank-one correction:

    r_t = S_{t-1}ᵀ k_t                  what the memory recalls for the key      [V]
    u_t = β_t (v_t - a_t r_t)           the (decayed) prediction error, weighted [V]
    S_t = a_t S_{t-1} + k_t u_tᵀ

Forward: one program per (batch·head, block of ``BV`` value columns) keeps its ``[K, BV]``
slice of the state in fp32 registers and walks through time; the columns of ``S`` never mix,
so value blocks are independent. When gradients are needed it also saves the state at the
start of every stretch of ``checkpoint_every`` steps (the checkpoints, ``[B·H, n_chunks, K, V]``
fp32, as much memory as the chunk states of a chunked kernel).

Backward: the same program layout walks the chunks from last to first. For each chunk it
replays the forward from the checkpoint, writing the state before every step into a private
fp32 scratch buffer, then steps backwards through the chunk carrying ``dS = ∂L/∂S_t``:

    dS   += scale · q_t do_tᵀ                    (o_t reads S_t)
    dq_t  = scale · S_t do_t
    du    = dSᵀ k_t ;  dv_t = β_t du ;  dβ_t = du · (v_t - a_t r_t)
    dr    = -β_t a_t du
    dk_t  = dS u_t + S_{t-1} dr
    da_t  = <dS, S_{t-1}> - β_t du · r_t ;  dg_t = a_t da_t
    dS   <- a_t dS + k_t drᵀ                     (∂L/∂S_{t-1})

and what is left in ``dS`` at ``t = 0`` is the gradient of the initial state. The quantities
that sum over value columns (dq, dk, dβ, dg) are written per value block and summed after.
Everything accumulates in fp32 whatever the input dtype. Any ``T`` (steps past the end are
masked: zero inputs and unit decay leave the state alone); ``K`` and ``V`` need not be powers
of two (masked blocks). The kernels also run under ``TRITON_INTERPRET=1``, which is how the
tests check them on a CPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DEFAULT_CHECKPOINT_EVERY = 64


@triton.jit
def _load_token(q, k, v, beta, g, row, valid, offs_k, mask_k, offs_v, mask_v,
                K: tl.constexpr, V: tl.constexpr, HAS_G: tl.constexpr):
    """Token ``row`` (flat index of ``(b, t, h)``) as fp32: ``q_t, k_t [BK]``, ``v_t [BV]``,
    ``β_t`` and the decay ``a_t``; zeros (and ``a_t = 1``) where ``valid`` is false, so that a
    step past the end of the sequence leaves the state unchanged."""
    q_t = tl.load(q + row * K + offs_k, mask=mask_k & valid, other=0.0).to(tl.float32)
    k_t = tl.load(k + row * K + offs_k, mask=mask_k & valid, other=0.0).to(tl.float32)
    v_t = tl.load(v + row * V + offs_v, mask=mask_v & valid, other=0.0).to(tl.float32)
    beta_t = tl.load(beta + row, mask=valid, other=0.0).to(tl.float32)
    if HAS_G:
        decay_t = tl.exp(tl.load(g + row, mask=valid, other=0.0).to(tl.float32))
    else:
        decay_t = 1.0
    return q_t, k_t, v_t, beta_t, decay_t


@triton.jit
def _delta_step(state, k_t, v_t, beta_t, decay_t):
    """One step of the recurrence on a ``[BK, BV]`` state slice: returns ``r_t``, ``u_t`` and
    ``S_t = a_t S_{t-1} + k_t u_tᵀ``."""
    recalled = tl.sum(state * k_t[:, None], axis=0)
    correction = beta_t * (v_t - decay_t * recalled)
    new_state = decay_t * state + k_t[:, None] * correction[None, :]
    return recalled, correction, new_state


@triton.jit
def _value_block(i_v, i_bh, start, HAS_START: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr):
    """All keys and value block ``i_v`` of a ``[K, V]`` state: key and value offsets and masks,
    the block's offsets and mask in one state, and its start read from ``start [B·H, K, V]``
    (initial state forward, final-state gradient backward; zeros when absent), fp32."""
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    mask_state = mask_k[:, None] & mask_v[None, :]
    state_offs = offs_k[:, None] * V + offs_v[None, :]
    if HAS_START:
        state = tl.load(start + i_bh * K * V + state_offs, mask=mask_state, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    return offs_k, offs_v, mask_k, mask_v, mask_state, state_offs, state


@triton.jit
def _delta_rule_fwd_kernel(q, k, v, beta, g, initial_state, o, final_state, checkpoints,
                           scale, T, n_chunks,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, CHUNK: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
                           HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr,
                           STORE_CHECKPOINTS: tl.constexpr):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_k, offs_v, mask_k, mask_v, mask_state, state_offs, state = _value_block(
        i_v, i_bh, initial_state, HAS_INITIAL, K, V, BK, BV)

    # A while loop: the interpreter cannot take a runtime scalar as a range bound.
    c = 0
    while c < n_chunks:
        if STORE_CHECKPOINTS:
            tl.store(checkpoints + (i_bh * n_chunks + c) * K * V + state_offs, state, mask=mask_state)
        for i in range(CHUNK):
            t = c * CHUNK + i
            valid = t < T
            row = (i_b * T + t) * H + i_h
            q_t, k_t, v_t, beta_t, decay_t = _load_token(q, k, v, beta, g, row, valid, offs_k, mask_k,
                                                         offs_v, mask_v, K, V, HAS_G)
            _, _, state = _delta_step(state, k_t, v_t, beta_t, decay_t)
            o_t = scale * tl.sum(state * q_t[:, None], axis=0)
            tl.store(o + row * V + offs_v, o_t.to(o.dtype.element_ty), mask=mask_v & valid)
        c += 1

    if STORE_FINAL:
        tl.store(final_state + i_bh * K * V + state_offs, state, mask=mask_state)


@triton.jit
def _delta_rule_bwd_kernel(q, k, v, beta, g, checkpoints, d_o, d_final, scratch,
                           dq_parts, dk_parts, dv, dbeta_parts, dg_parts, d_initial,
                           scale, T, n_chunks, B,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, CHUNK: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
                           HAS_D_FINAL: tl.constexpr, STORE_D_INITIAL: tl.constexpr):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    n_v = tl.num_programs(0)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_k, offs_v, mask_k, mask_v, mask_state, state_offs, d_state = _value_block(
        i_v, i_bh, d_final, HAS_D_FINAL, K, V, BK, BV)
    # This program's scratch: `CHUNK` slots of a [BK, BV] state, dense (padding included).
    scratch_base = scratch + (i_bh * n_v + i_v) * CHUNK * BK * BV
    slot_offs = tl.arange(0, BK)[:, None] * BV + tl.arange(0, BV)[None, :]
    # Per value block partial sums of the gradients that reduce over V.
    parts_row0 = i_v.to(tl.int64) * B * T * H

    c = n_chunks - 1
    while c >= 0:
        # Replay the chunk from its checkpoint, keeping the state before every step.
        state = tl.load(checkpoints + (i_bh * n_chunks + c) * K * V + state_offs, mask=mask_state, other=0.0)
        tl.debug_barrier()  # the previous chunk's reads of the scratch are done
        for i in range(CHUNK):
            t = c * CHUNK + i
            row = (i_b * T + t) * H + i_h
            tl.store(scratch_base + i * BK * BV + slot_offs, state)
            _, k_t, v_t, beta_t, decay_t = _load_token(q, k, v, beta, g, row, t < T, offs_k, mask_k,
                                                       offs_v, mask_v, K, V, HAS_G)
            _, _, state = _delta_step(state, k_t, v_t, beta_t, decay_t)
        tl.debug_barrier()  # the scratch is written before any thread reads it back

        for i_rev in range(CHUNK):
            i = CHUNK - 1 - i_rev
            t = c * CHUNK + i
            valid = t < T
            row = (i_b * T + t) * H + i_h
            prev_state = tl.load(scratch_base + i * BK * BV + slot_offs)
            q_t, k_t, v_t, beta_t, decay_t = _load_token(q, k, v, beta, g, row, valid, offs_k, mask_k,
                                                         offs_v, mask_v, K, V, HAS_G)
            do_t = tl.load(d_o + row * V + offs_v, mask=mask_v & valid, other=0.0).to(tl.float32)
            recalled, correction, state_t = _delta_step(prev_state, k_t, v_t, beta_t, decay_t)

            dq_t = scale * tl.sum(state_t * do_t[None, :], axis=1)
            d_state += scale * q_t[:, None] * do_t[None, :]
            d_correction = tl.sum(d_state * k_t[:, None], axis=0)
            dv_t = beta_t * d_correction
            dbeta_t = tl.sum(d_correction * (v_t - decay_t * recalled), axis=0)
            d_recalled = -beta_t * decay_t * d_correction
            dk_t = (tl.sum(d_state * correction[None, :], axis=1)
                    + tl.sum(prev_state * d_recalled[None, :], axis=1))

            tl.store(dq_parts + (parts_row0 + row) * K + offs_k, dq_t, mask=mask_k & valid)
            tl.store(dk_parts + (parts_row0 + row) * K + offs_k, dk_t, mask=mask_k & valid)
            tl.store(dv + row * V + offs_v, dv_t.to(dv.dtype.element_ty), mask=mask_v & valid)
            tl.store(dbeta_parts + parts_row0 + row, dbeta_t, mask=valid)
            if HAS_G:
                d_decay = (tl.sum(tl.sum(d_state * prev_state, axis=1), axis=0)
                           - beta_t * tl.sum(d_correction * recalled, axis=0))
                tl.store(dg_parts + parts_row0 + row, decay_t * d_decay, mask=valid)
            d_state = decay_t * d_state + k_t[:, None] * d_recalled[None, :]
        c -= 1

    if STORE_D_INITIAL:
        tl.store(d_initial + i_bh * K * V + state_offs, d_state.to(d_initial.dtype.element_ty), mask=mask_state)


def _blocks(dk: int, dv: int) -> tuple[int, int, int]:
    """``(BK, BV, num_warps)``: the whole key dimension, and a value block of at most 32
    columns, fewer for wide keys, so that a ``[BK, BV]`` fp32 state slice stays near 2048
    elements; 8 warps for such slices keep the backward free of register spills on sm_90."""
    block_k = triton.next_power_of_2(dk)
    block_v = min(triton.next_power_of_2(dv), 32, max(16, 2048 // block_k))
    num_warps = 8 if block_k * block_v >= 2048 else 4
    return block_k, block_v, num_warps


def _chunking(t: int, checkpoint_every: int) -> tuple[int, int]:
    """``(steps per chunk, number of chunks)``. The chunk length is a compile-time constant:
    compiled for a GPU, short sequences round it up to a power of two so that few variants get
    built; the interpreter compiles nothing and takes it exact (no padded steps to walk)."""
    span = t if os.environ.get("TRITON_INTERPRET") == "1" else triton.next_power_of_2(t)
    chunk = min(checkpoint_every, span)
    return chunk, triton.cdiv(t, chunk)


def _forward(q, k, v, beta, g, scale, initial_state, output_final_state, checkpoint_every, keep_checkpoints):
    """Launch the forward kernel on contiguous inputs; returns ``(o, final_state, checkpoints)``."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    block_k, block_v, num_warps = _blocks(dk, dv)
    chunk, n_chunks = _chunking(t, checkpoint_every)
    o = torch.empty_like(v, dtype=q.dtype)
    final_state = (torch.empty(b, h, dk, dv, dtype=torch.float32, device=q.device)
                   if output_final_state else None)
    checkpoints = (torch.empty(b * h, n_chunks, dk, dv, dtype=torch.float32, device=q.device)
                   if keep_checkpoints else None)
    grid = (triton.cdiv(dv, block_v), b * h)
    _delta_rule_fwd_kernel[grid](
        q, k, v, beta, g if g is not None else beta, initial_state if initial_state is not None else q,
        o, final_state if final_state is not None else o, checkpoints if checkpoints is not None else o,
        float(scale), t, n_chunks,
        H=h, K=dk, V=dv, CHUNK=chunk, BK=block_k, BV=block_v, HAS_G=g is not None,
        HAS_INITIAL=initial_state is not None, STORE_FINAL=output_final_state,
        STORE_CHECKPOINTS=keep_checkpoints, num_warps=num_warps)
    return o, final_state, checkpoints


def _backward(q, k, v, beta, g, scale, checkpoints, d_o, d_final, initial_state, checkpoint_every):
    """Launch the backward kernel; returns ``(dq, dk, dv, dbeta, dg, d_initial_state)``."""
    b, t, h, dk = q.shape
    dv_dim = v.shape[-1]
    block_k, block_v, num_warps = _blocks(dk, dv_dim)
    chunk, n_chunks = _chunking(t, checkpoint_every)
    n_v = triton.cdiv(dv_dim, block_v)
    device = q.device
    f32 = dict(dtype=torch.float32, device=device)
    scratch = torch.empty(b * h * n_v, chunk, block_k, block_v, **f32)
    dq_parts = torch.empty(n_v, b, t, h, dk, **f32)
    dk_parts = torch.empty(n_v, b, t, h, dk, **f32)
    dbeta_parts = torch.empty(n_v, b, t, h, **f32)
    dg_parts = torch.empty(n_v, b, t, h, **f32) if g is not None else None
    dv = torch.empty_like(v)
    d_initial = torch.empty_like(initial_state) if initial_state is not None else None
    _delta_rule_bwd_kernel[(n_v, b * h)](
        q, k, v, beta, g if g is not None else beta, checkpoints, d_o,
        d_final if d_final is not None else d_o, scratch,
        dq_parts, dk_parts, dv, dbeta_parts, dg_parts if dg_parts is not None else dbeta_parts,
        d_initial if d_initial is not None else dv,
        float(scale), t, n_chunks, b,
        H=h, K=dk, V=dv_dim, CHUNK=chunk, BK=block_k, BV=block_v, HAS_G=g is not None,
        HAS_D_FINAL=d_final is not None, STORE_D_INITIAL=d_initial is not None, num_warps=num_warps)
    dg = dg_parts.sum(0).to(g.dtype) if g is not None else None
    return (dq_parts.sum(0).to(q.dtype), dk_parts.sum(0).to(k.dtype), dv,
            dbeta_parts.sum(0).to(beta.dtype), dg, d_initial)


class _DeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, scale, initial_state, output_final_state, checkpoint_every):
        ctx.set_materialize_grads(False)
        q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
        g = g.contiguous() if g is not None else None
        initial_state = initial_state.contiguous() if initial_state is not None else None
        needs_grad = any(ctx.needs_input_grad)
        o, final_state, checkpoints = _forward(q, k, v, beta, g, scale, initial_state, output_final_state,
                                               checkpoint_every, keep_checkpoints=needs_grad)
        if needs_grad:
            ctx.save_for_backward(q, k, v, beta, g, initial_state, checkpoints)
            ctx.scale, ctx.checkpoint_every = scale, checkpoint_every
        return o, final_state

    @staticmethod
    def backward(ctx, d_o, d_final):
        q, k, v, beta, g, initial_state, checkpoints = ctx.saved_tensors
        d_o = torch.zeros_like(v, dtype=q.dtype) if d_o is None else d_o.contiguous()
        d_final = d_final.contiguous() if d_final is not None else None
        dq, dk, dv, dbeta, dg, d_initial = _backward(q, k, v, beta, g, ctx.scale, checkpoints, d_o, d_final,
                                                     initial_state, ctx.checkpoint_every)
        return dq, dk, dv, dbeta, dg, None, d_initial, None, None


def delta_rule_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                      g: torch.Tensor | None, scale: float, initial_state: torch.Tensor | None,
                      output_final_state: bool, checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The delta rule with Triton kernels: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``,
    ``beta, g [B, T, H]`` (``g`` log decay or ``None``), ``initial_state [B, H, K, V]`` or
    ``None`` -> ``(o [B, T, H, V]`` in q's dtype, ``final_state [B, H, K, V]`` fp32 or ``None)``.

    ``checkpoint_every``: the forward saves the state every so many steps for the backward,
    which replays the steps in between (memory ``T / checkpoint_every · K · V`` fp32 per head).
    """
    return _DeltaRuleFunction.apply(q, k, v, beta, g, scale, initial_state, output_final_state,
                                    checkpoint_every)
