"""Mamba's selective scan as sequential Triton kernels, forward and backward.

Per channel ``d`` and state index ``n`` the scan is a first-order linear recurrence over time,

    Δ_t  = softplus(δ_t + bias)   (or δ_t + bias)                  step size        [D]
    e_t  = exp(Δ_t A)             a_t = e_t  (or 2 e_t - 1)          transition       [D, N]
    h_t  = a_t ⊙ h_{t-1} + (Δ_t u_t) B_tᵀ                            state            [D, N]
    y_t  = (h_t C_t + D ⊙ u_t) ⊙ silu(z_t)                           output           [D]

with ``B_t, C_t`` shared by the channels of one group. Channels never mix, so the work splits
into independent programs, one per (batch, group, block of ``BLOCK_D`` channels); each holds
its ``[BLOCK_D, N]`` slice of the state in fp32 registers and walks through time, fusing the
discretisation, the skip ``D u`` and the gate. When gradients are needed the forward also
saves the state at the start of every stretch of ``chunk`` steps (the checkpoints).

Backward: the same programs walk the chunks from last to first. Each chunk is replayed from its
checkpoint, writing ``h_{t-1}`` of every step into a private scratch buffer (recovering it by
dividing by ``a_t`` would blow up where ``a_t`` is near zero), then traversed backwards with
the adjoint ``dh = ∂L/∂h_t``. With ``g_t = dy_t ⊙ silu(z_t)`` and ``s_t = ∂a_t/∂(Δ_t A)``
(``e_t``, or ``2 e_t``):

    dz_t  = dy_t ⊙ (h_t C_t + D u_t) ⊙ silu'(z_t)
    dh   += g_t C_tᵀ                                   (y_t reads h_t)
    dC_t  = Σ_d g_t h_t ;   dB_t = Σ_d dh ⊙ (Δ_t u_t)
    du_t  = Δ_t (dh B_t) + D ⊙ g_t ;   dD += g_t ⊙ u_t
    dΔ_t  = u_t (dh B_t) + Σ_n dh ⊙ h_{t-1} ⊙ s_t ⊙ A ;   dA += dh ⊙ h_{t-1} ⊙ s_t Δ_t
    dδ_t  = dΔ_t ⊙ sigmoid(δ_t + bias)   (through the softplus)
    dh   <- a_t ⊙ dh                                   (∂L/∂h_{t-1})

What is left in ``dh`` at ``t = 0`` is the gradient of the initial state. Sums over channels
(``dB``, ``dC``) are written per channel block, sums over time and batch (``dA``, ``dD``) per
program, and reduced in PyTorch afterwards, so the result is deterministic (no atomics).
Accumulation is fp32 whatever the input dtype (fp64 for fp64 inputs). Any ``T``; ``D`` and
``N`` need not be powers of two (masked blocks). Only constructs that the Triton interpreter
runs are used, so the kernels are tested on the CPU under ``TRITON_INTERPRET=1``: ``while``
loops where the trip count is known at run time only (the interpreter cannot take a runtime
bound in ``range``), no ``libdevice``, and few nested ``@triton.jit`` calls in the time loops
(each costs the interpreter milliseconds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqapps.kernels.backend import accumulation_dtype

MAX_CHECKPOINT_EVERY = 64


@triton.jit
def _load_step(u, delta, B, row, bc_row, offs_d, mask_d, offs_n, mask_n, valid, A, bias,
               DELTA_SOFTPLUS: tl.constexpr, NEGATIVE_EIGENVALUES: tl.constexpr, ACC: tl.constexpr):
    """One time step of a channel block, in the accumulation dtype: ``u_t, Δ_t [BD]``, the
    pre-softplus ``δ_t + bias [BD]``, ``B_t [BN]``, ``e_t = exp(Δ_t A)`` and ``a_t [BD, BN]``.
    ``row`` is the flat index of ``(b, t)`` in ``u``; ``bc_row`` that of ``(b, t, g)`` in ``B``.
    Where ``valid`` is false (past the end of the sequence) ``u_t = Δ_t = 0``, so ``a_t = 1``
    and the step leaves the state unchanged."""
    mask_ud = mask_d & valid
    u_t = tl.load(u + row + offs_d, mask=mask_ud, other=0.0).to(ACC)
    raw_t = tl.load(delta + row + offs_d, mask=mask_ud, other=0.0).to(ACC) + bias
    if DELTA_SOFTPLUS:
        # softplus without overflow, max(x, 0) + log1p(exp(-|x|)), with log1p(e) computed
        # accurately as log(w) e / (w - 1), w = 1 + e (Goldberg's trick; no libdevice, which
        # the interpreter lacks)
        e = tl.exp(-tl.abs(raw_t))
        w = 1.0 + e
        log1p = tl.where(w == 1.0, e, tl.log(w) * e / tl.where(w == 1.0, 1.0, w - 1.0))
        dt = tl.maximum(raw_t, 0.0) + log1p
    else:
        dt = raw_t
    dt = tl.where(mask_ud, dt, 0.0)
    B_t = tl.load(B + bc_row + offs_n, mask=mask_n & valid, other=0.0).to(ACC)
    e_t = tl.exp(dt[:, None] * A)
    if NEGATIVE_EIGENVALUES:
        a_t = 2.0 * e_t - 1.0
    else:
        a_t = e_t
    return u_t, raw_t, dt, B_t, e_t, a_t


@triton.jit
def _program_block(group_size, n_blocks, N, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's batch index (int64), group, channel block, channel offsets ``[BD]`` and
    state offsets ``[BN]``, with their masks."""
    b = tl.program_id(0).to(tl.int64)
    group_block = tl.program_id(1)
    group = group_block // n_blocks
    block = group_block % n_blocks
    in_group = block * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = in_group < group_size
    offs_d = group * group_size + in_group
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    return b, group, block, offs_d, mask_d, offs_n, mask_n


@triton.jit
def _block_constants(A, Dskip, bias, start, b, D, N, offs_d, mask_d, offs_n, mask_n,
                     HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_START: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """What both kernels read once for their channel block: the state offsets ``[BD, BN]`` and
    mask, ``A``, the Δ bias and ``D`` of the block (zeros when absent), and the starting state
    (``start [B, D, N]``: h0 forward, dfinal backward; zeros when absent)."""
    mask_dn = mask_d[:, None] & mask_n[None, :]
    offs_dn = offs_d[:, None] * N + offs_n[None, :]
    A_blk = tl.load(A + offs_dn, mask=mask_dn, other=0.0).to(ACC)
    bias_blk = tl.zeros([BLOCK_D], dtype=ACC)
    if HAS_BIAS:
        bias_blk = tl.load(bias + offs_d, mask=mask_d, other=0.0).to(ACC)
    D_blk = tl.zeros([BLOCK_D], dtype=ACC)
    if HAS_D:
        D_blk = tl.load(Dskip + offs_d, mask=mask_d, other=0.0).to(ACC)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    if HAS_START:
        h = tl.load(start + b * D * N + offs_dn, mask=mask_dn, other=0.0).to(ACC)
    return mask_dn, offs_dn, A_blk, bias_blk, D_blk, h


@triton.jit
def _forward_kernel(u, delta, A, B, C, Dskip, z, bias, h0, y, final, checkpoints,
                    T, D, G, N, group_size, n_blocks, n_chunks,
                    DELTA_SOFTPLUS: tl.constexpr, NEGATIVE_EIGENVALUES: tl.constexpr,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_H0: tl.constexpr, SAVE_CHECKPOINTS: tl.constexpr, CHUNK: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """``u, delta, z, y [B, T, D]``; ``B, C [B, T, G, N]``; ``A [D, N]``; ``Dskip, bias [D]``;
    ``h0, final [B, D, N]``; ``checkpoints [B, n_chunks, D, N]`` (state before each chunk)."""
    # (compiled Triton types every name once per loop: no `_` reused for values of other types)
    b, group, _unused_block, offs_d, mask_d, offs_n, mask_n = _program_block(group_size, n_blocks, N,
                                                                             BLOCK_D, BLOCK_N)
    mask_dn, offs_dn, A_blk, bias_blk, D_blk, h = _block_constants(
        A, Dskip, bias, h0, b, D, N, offs_d, mask_d, offs_n, mask_n, HAS_D, HAS_BIAS, HAS_H0, ACC, BLOCK_D, BLOCK_N)
    chunk = 0
    while chunk < n_chunks:
        if SAVE_CHECKPOINTS:
            tl.store(checkpoints + (b * n_chunks + chunk) * D * N + offs_dn, h, mask=mask_dn)
        for step in range(CHUNK):
            t = chunk * CHUNK + step
            valid = t < T
            row = (b * T + t) * D
            bc_row = ((b * T + t) * G + group) * N
            u_t, _raw_t, dt, B_t, _e_t, a_t = _load_step(u, delta, B, row, bc_row, offs_d, mask_d,
                                                          offs_n, mask_n, valid, A_blk, bias_blk, DELTA_SOFTPLUS,
                                                          NEGATIVE_EIGENVALUES, ACC)
            C_t = tl.load(C + bc_row + offs_n, mask=mask_n & valid, other=0.0).to(ACC)
            h = a_t * h + (dt * u_t)[:, None] * B_t[None, :]
            y_t = tl.sum(h * C_t[None, :], axis=1)
            if HAS_D:
                y_t += D_blk * u_t
            if HAS_Z:
                z_t = tl.load(z + row + offs_d, mask=mask_d & valid, other=0.0).to(ACC)
                y_t = y_t * z_t / (1.0 + tl.exp(-z_t))
            tl.store(y + row + offs_d, y_t.to(y.dtype.element_ty), mask=mask_d & valid)
        chunk += 1
    tl.store(final + b * D * N + offs_dn, h, mask=mask_dn)


@triton.jit
def _backward_kernel(u, delta, A, B, C, Dskip, z, bias, dy, dfinal, checkpoints, scratch,
                     du, ddelta, dz, dB_part, dC_part, dA_part, dD_part, dh0,
                     T, D, G, N, group_size, n_blocks, n_chunks,
                     DELTA_SOFTPLUS: tl.constexpr, NEGATIVE_EIGENVALUES: tl.constexpr,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_DFINAL: tl.constexpr, CHUNK: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """Inputs as in the forward, plus ``dy [B, T, D]``, ``dfinal [B, D, N]`` and ``scratch
    [B, CHUNK, D, N]``. Writes ``du, ddelta, dz [B, T, D]``, ``dB_part, dC_part [B, T, G,
    n_blocks, N]`` (per channel block), ``dA_part [B, D, N]``, ``dD_part [B, D]`` (per batch)
    and ``dh0 [B, D, N]``."""
    b, group, block, offs_d, mask_d, offs_n, mask_n = _program_block(group_size, n_blocks, N,
                                                                     BLOCK_D, BLOCK_N)
    mask_dn, offs_dn, A_blk, bias_blk, D_blk, dh = _block_constants(
        A, Dskip, bias, dfinal, b, D, N, offs_d, mask_d, offs_n, mask_n, HAS_D, HAS_BIAS, HAS_DFINAL, ACC, BLOCK_D, BLOCK_N)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    dD_acc = tl.zeros([BLOCK_D], dtype=ACC)
    chunk = n_chunks - 1
    while chunk >= 0:
        # Replay the chunk from its checkpoint, keeping the state before every step.
        h = tl.load(checkpoints + (b * n_chunks + chunk) * D * N + offs_dn, mask=mask_dn,
                    other=0.0).to(ACC)
        for step in range(CHUNK):
            t = chunk * CHUNK + step
            valid = t < T
            row = (b * T + t) * D
            bc_row = ((b * T + t) * G + group) * N
            tl.store(scratch + (b * CHUNK + step) * D * N + offs_dn, h, mask=mask_dn)
            u_t, _raw_t, dt, B_t, _e_t, a_t = _load_step(u, delta, B, row, bc_row, offs_d, mask_d,
                                                          offs_n, mask_n, valid, A_blk, bias_blk, DELTA_SOFTPLUS,
                                                          NEGATIVE_EIGENVALUES, ACC)
            h = a_t * h + (dt * u_t)[:, None] * B_t[None, :]
        tl.debug_barrier()
        # Walk it backwards, carrying dh = ∂L/∂h_t.
        for back in range(CHUNK):
            step = CHUNK - 1 - back
            t = chunk * CHUNK + step
            valid = t < T
            mask_dt = mask_d & valid
            row = (b * T + t) * D
            bc_row = ((b * T + t) * G + group) * N
            h_prev = tl.load(scratch + (b * CHUNK + step) * D * N + offs_dn, mask=mask_dn, other=0.0)
            u_t, raw_t, dt, B_t, e_t, a_t = _load_step(u, delta, B, row, bc_row, offs_d, mask_d,
                                                       offs_n, mask_n, valid, A_blk, bias_blk,
                                                       DELTA_SOFTPLUS, NEGATIVE_EIGENVALUES, ACC)
            C_t = tl.load(C + bc_row + offs_n, mask=mask_n & valid, other=0.0).to(ACC)
            dt_u = dt * u_t
            h = a_t * h_prev + dt_u[:, None] * B_t[None, :]
            gy = tl.load(dy + row + offs_d, mask=mask_dt, other=0.0).to(ACC)
            if HAS_Z:
                z_t = tl.load(z + row + offs_d, mask=mask_dt, other=0.0).to(ACC)
                sig = 1.0 / (1.0 + tl.exp(-z_t))
                y_pre = tl.sum(h * C_t[None, :], axis=1)
                if HAS_D:
                    y_pre += D_blk * u_t
                dz_t = gy * y_pre * sig * (1.0 + z_t * (1.0 - sig))
                tl.store(dz + row + offs_d, dz_t.to(dz.dtype.element_ty), mask=mask_dt)
                gy = gy * z_t * sig
            dh += gy[:, None] * C_t[None, :]
            part_row = (((b * T + t) * G + group) * n_blocks + block) * N
            mask_nt = mask_n & valid
            tl.store(dC_part + part_row + offs_n, tl.sum(gy[:, None] * h, axis=0), mask=mask_nt)
            tl.store(dB_part + part_row + offs_n, tl.sum(dh * dt_u[:, None], axis=0), mask=mask_nt)
            dh_B = tl.sum(dh * B_t[None, :], axis=1)
            du_t = dt * dh_B
            if HAS_D:
                du_t += D_blk * gy
                dD_acc += gy * u_t
            if NEGATIVE_EIGENVALUES:
                slope = 2.0 * e_t
            else:
                slope = e_t
            dh_h_slope = dh * h_prev * slope
            d_dt = u_t * dh_B + tl.sum(dh_h_slope * A_blk, axis=1)
            dA_acc += dh_h_slope * dt[:, None]
            if DELTA_SOFTPLUS:
                d_dt = d_dt / (1.0 + tl.exp(-raw_t))
            tl.store(du + row + offs_d, du_t.to(du.dtype.element_ty), mask=mask_dt)
            tl.store(ddelta + row + offs_d, d_dt.to(ddelta.dtype.element_ty), mask=mask_dt)
            dh = a_t * dh
        tl.debug_barrier()
        chunk -= 1
    tl.store(dh0 + b * D * N + offs_dn, dh, mask=mask_dn)
    tl.store(dA_part + b * D * N + offs_dn, dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_part + b * D + offs_d, dD_acc, mask=mask_d)


def _launch_config(u: torch.Tensor, group_size: int, n: int, block_d: int | None) -> dict:
    """Block sizes and warps. On a GPU a small ``[BLOCK_D, N]`` state tile (about 128
    elements) gives many programs to hide the latency of the sequential walk (on an H100, a
    Mamba-130M-sized scan in bf16 took 12.3 ms forward+backward with tiles of 8 × 16 channels,
    15.0 with 16 × 16, 18.3 with 4 × 16); the interpreter prefers few, large programs."""
    block_n = max(2, triton.next_power_of_2(n))
    if block_d is None:
        budget = 128 if u.is_cuda else 4096
        block_d = min(triton.next_power_of_2(group_size), max(1, budget // block_n))
    block_d = max(2, triton.next_power_of_2(block_d))
    num_warps = max(1, min(8, block_d * block_n // 128))
    return {"BLOCK_D": block_d, "BLOCK_N": block_n, "num_warps": num_warps}


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, Dskip, z, bias, initial_state, delta_softplus,
                negative_eigenvalues, block_d, checkpoint_every):
        batch, t, d = u.shape
        n = A.shape[-1]
        groups = B.shape[2]
        acc = accumulation_dtype(u)
        # On a GPU the chunk length is a compile-time constant: a power of two keeps the number of
        # compiled variants small. The interpreter compiles nothing, so it skips the padding steps.
        chunk = min(checkpoint_every or MAX_CHECKPOINT_EVERY,
                    triton.next_power_of_2(t) if u.is_cuda else t)
        n_chunks = triton.cdiv(t, chunk)
        config = _launch_config(u, d // groups, n, block_d)
        n_blocks = triton.cdiv(d // groups, config["BLOCK_D"])
        save = any(ctx.needs_input_grad)
        y = torch.empty_like(u)
        final = u.new_empty(batch, d, n, dtype=acc)
        checkpoints = u.new_empty(batch, n_chunks, d, n, dtype=acc) if save else None
        flags = {"DELTA_SOFTPLUS": delta_softplus, "NEGATIVE_EIGENVALUES": negative_eigenvalues,
                 "HAS_D": Dskip is not None, "HAS_Z": z is not None, "HAS_BIAS": bias is not None,
                 "CHUNK": chunk, "ACC": tl.float64 if acc == torch.float64 else tl.float32}
        _forward_kernel[(batch, groups * n_blocks)](
            u, delta, A, B, C, Dskip, z, bias, initial_state, y, final, checkpoints,
            t, d, groups, n, d // groups, n_blocks, n_chunks,
            HAS_H0=initial_state is not None, SAVE_CHECKPOINTS=save, **flags, **config)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, Dskip, z, bias, initial_state, checkpoints)
            ctx.launch = (flags, config, n_blocks, n_chunks)
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        u, delta, A, B, C, Dskip, z, bias, initial_state, checkpoints = ctx.saved_tensors
        flags, config, n_blocks, n_chunks = ctx.launch
        batch, t, d = u.shape
        n = A.shape[-1]
        groups = B.shape[2]
        acc = checkpoints.dtype
        dy = torch.zeros_like(u) if dy is None else dy.contiguous()
        dfinal = None if dfinal is None else dfinal.contiguous()
        du = torch.empty_like(u)
        ddelta = torch.empty(u.shape, dtype=acc, device=u.device)
        dz = torch.empty_like(z) if z is not None else None
        dB_part = u.new_empty(batch, t, groups, n_blocks, n, dtype=acc)
        dC_part = torch.empty_like(dB_part)
        dA_part = u.new_empty(batch, d, n, dtype=acc)
        dD_part = u.new_empty(batch, d, dtype=acc) if Dskip is not None else None
        dh0 = u.new_empty(batch, d, n, dtype=acc)
        scratch = u.new_empty(batch, flags["CHUNK"], d, n, dtype=acc)
        _backward_kernel[(batch, groups * n_blocks)](
            u, delta, A, B, C, Dskip, z, bias, dy, dfinal, checkpoints, scratch,
            du, ddelta, dz, dB_part, dC_part, dA_part, dD_part, dh0,
            t, d, groups, n, d // groups, n_blocks, n_chunks,
            HAS_DFINAL=dfinal is not None, **flags, **config)
        dbias = ddelta.sum((0, 1)).to(bias.dtype) if bias is not None else None
        dD = dD_part.sum(0).to(Dskip.dtype) if Dskip is not None else None
        dh0 = dh0.to(initial_state.dtype) if initial_state is not None else None
        return (du, ddelta.to(delta.dtype), dA_part.sum(0).to(A.dtype), dB_part.sum(3).to(B.dtype),
                dC_part.sum(3).to(C.dtype), dD, dz, dbias, dh0, None, None, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          negative_eigenvalues=False, initial_state=None, output_final_state=False,
                          *, block_d: int | None = None, checkpoint_every: int | None = None):
    """The selective scan through the Triton kernels (shapes checked by the caller):
    ``u, delta, z [B, T, D]``, ``A [D, N]``, ``B, C [B, T, N]`` or ``[B, T, G, N]``,
    ``D, delta_bias [D]``, ``initial_state [B, D, N]``. Returns ``(y [B, T, D], final_state
    [B, D, N] or None)``; the state is kept in the accumulation dtype (fp32, fp64 for fp64),
    as the recurrent oracle does. ``block_d`` (channels per program) and ``checkpoint_every``
    (steps between saved states, at most 64 by default) override the launch choices, for tuning
    and for tests that cross several checkpoints on short sequences."""
    grouped = B.ndim == 4

    def by_group(x: torch.Tensor) -> torch.Tensor:
        return (x if grouped else x.unsqueeze(2)).contiguous()

    def maybe(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.contiguous()

    y, final = _SelectiveScan.apply(u.contiguous(), delta.contiguous(), A.contiguous(), by_group(B),
                                    by_group(C), maybe(D), maybe(z), maybe(delta_bias),
                                    maybe(initial_state), delta_softplus, negative_eigenvalues, block_d,
                                    checkpoint_every)
    return y, (final if output_final_state else None)
