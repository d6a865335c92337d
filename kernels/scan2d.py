"""Chimera's 2-D selective state-space recurrence (Behrouz, Santacatterina & Zabih, 2024,
"Chimera: Effectively Modeling Multivariate Time Series with 2-Dimensional State Space Models")
over a grid of variates ``i`` (rows, ``V``) × time ``j`` (columns, ``T``).

Every cell carries two hidden states of size ``N`` per channel ``d``: ``h^time``, which travels
along time, and ``h^var``, which travels along the variates; each is fed by the other (the
2-D SSM of Roesser's form, with diagonal transitions, so everything is elementwise in
``(d, n)``)::

    h^time_{i,j} = Ā^t_{i,j} h^time_{i,j-1} + Ā^tv_{i,j} h^var_{i,j-1}  + B̄^t_{i,j} x_{i,j}    (from the left)
    h^var_{i,j}  = Ā^v_{i,j} h^var_{i-1,j}  + Ā^vt_{i,j} h^time_{i-1,j} + B̄^v_{i,j} x_{i,j}    (from above)
    y_{i,j}      = C^time_{i,j} · h^time_{i,j} + C^var_{i,j} · h^var_{i,j}                      (sums over n)

Discretisation: zero-order hold per axis, each axis with its own input-dependent step ``Δ``.
Along time, ``∂h^time = A_time h^time + A_time_from_variate h^var + B_time x`` is integrated
exactly over ``Δ^t`` with the other state and the input held::

    Ā^t  = exp(Δ^t A_time)       hold^t = (exp(Δ^t A_time) - 1) / A_time   (≈ Δ^t for small steps)
    Ā^tv = hold^t A_time_from_variate                B̄^t = hold^t B_time

and the same along the variates with ``Δ^v``, ``A_variate``, ``A_variate_from_time``, ``B_variate``.
``A_time`` and ``A_variate`` are negative (decays, ``-exp(A_log)``), the couplings any sign; ``Δ``
is positive (the caller applies softplus); ``Δ``, ``B`` and ``C`` depend on the input (the
"selection"), the ``A``'s do not.

Shapes (channels last, the grid in front): ``x, delta_time, delta_variate [B, V, T, D]``;
``A_* [D, N]``; ``B_time, B_variate, C_time, C_variate [B, V, T, N]`` (shared by the channels, as
in Mamba); the state ``[B, V, 2, D, N]``: per variate, ``h^time`` (index 0) and ``h^var`` (index 1)
of the last column. The state enters as the column before the grid (``j = -1``), so a grid can
be cut anywhere along time and carried on; above the first variate (``i = -1``) both states
are zero (the variate axis is not streamed).

Backends: ``recurrent`` (the loop, cell by cell, the oracle of the tests; ``scan2d_step`` is
its one-column step, for streaming) and ``chunk`` (the parallel form, plain PyTorch with
autograd; the name is shared with the other kernels so that ``auto`` picks it). There is no
Triton kernel: ``auto`` picks ``chunk`` on every device.

The parallel form (the paper trains with a 2-D parallel selective scan; this computes the same
recurrence exactly, with scans along one axis). Fix the states of row ``i - 1``: row ``i``'s
``h^var`` is then elementwise (``Ā^v h^var_{i-1,j} + Ā^vt h^time_{i-1,j} + B̄^v x_{i,j}`` for every
``j`` at once), and row ``i``'s ``h^time`` is a 1-D linear recurrence along time,
``h_j = Ā^t_j h_{j-1} + g_j``, with a known drive ``g_j = Ā^tv_j h^var_{i,j-1} + B̄^t_j x_{i,j}`` (the
row's ``h^var`` shifted by one column, the carried state in front): one parallel scan over ``T``
(``linear_scan``: chunked, ``O(T)`` work in about ``3 sqrt(T)`` vectorised steps, with its
adjoint scan as a hand-written backward; only products of decays in ``(0, 1]`` are formed, so
nothing overflows). So the grid is swept one row at a time. The roles of the axes are
symmetric: when ``V > T`` the grid is swept one column at a time instead, scanning the
variates (``sweep="time"``), so the sequential part is ``min(V, T)`` rows or columns and every
step is parallel over the other axis (and over batch, channels and state). Both are exact: the
same sums as the recurrence, in another order. Channels are independent and are processed in
blocks small enough to stay in a CPU's cache.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from seqapps.errors import InputError
from seqapps.kernels.backend import accumulation_dtype, expect_shape, nothing_to_scan

BACKENDS = ("auto", "recurrent", "chunk")
SWEEPS = ("auto", "variates", "time")
CHANNEL_BLOCK_ELEMENTS = 1 << 20  # state elements per channel block of the parallel form (cache-sized on a CPU)
LAYOUT = ("x, delta_time, delta_variate [B, V, T, D]; A_* [D, N]; B_time, B_variate, C_time, C_variate "
          "[B, V, T, N]; state [B, V, 2, D, N]")


def scan2d(x: torch.Tensor, delta_time: torch.Tensor, delta_variate: torch.Tensor, A_time: torch.Tensor,
           A_variate: torch.Tensor, A_time_from_variate: torch.Tensor, A_variate_from_time: torch.Tensor,
           B_time: torch.Tensor, B_variate: torch.Tensor, C_time: torch.Tensor, C_variate: torch.Tensor,
           initial_state: torch.Tensor | None = None, output_final_state: bool = False,
           backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns ``(y [B, V, T, D] in x's dtype, final_state [B, V, 2, D, N] in the accumulation
    dtype, or None)``. See the module docstring for the recurrence."""
    if x.ndim != 4:
        raise InputError(f"x has shape {list(x.shape)}; expected [B, V, T, D] ({LAYOUT})")
    b, v, t, d = x.shape
    n = A_time.shape[-1] if A_time.ndim == 2 else None
    for name, tensor in (("delta_time", delta_time), ("delta_variate", delta_variate)):
        expect_shape(name, tensor, (b, v, t, d), LAYOUT)
    for name, tensor in (("A_time", A_time), ("A_variate", A_variate), ("A_time_from_variate", A_time_from_variate),
                         ("A_variate_from_time", A_variate_from_time)):
        expect_shape(name, tensor, (d, n), LAYOUT)
    for name, tensor in (("B_time", B_time), ("B_variate", B_variate), ("C_time", C_time), ("C_variate", C_variate)):
        expect_shape(name, tensor, (b, v, t, n), LAYOUT)
    expect_shape("initial_state", initial_state, (b, v, 2, d, n), LAYOUT)
    if backend not in BACKENDS:
        raise InputError(f"backend='{backend}' is not one of {', '.join(BACKENDS)} (scan2d has no triton kernel)")
    args = (x, delta_time, delta_variate, A_time, A_variate, A_time_from_variate, A_variate_from_time,
            B_time, B_variate, C_time, C_variate, initial_state, output_final_state)
    if x.numel() == 0:  # no time steps, variates, channels or batch: the state as it was
        return nothing_to_scan(x, initial_state, (b, v, 2, d, A_time.shape[-1]), output_final_state)
    if backend == "recurrent":
        return scan2d_recurrent(*args)
    return scan2d_chunk(*args)


def axis_coefficients(x: torch.Tensor, delta: torch.Tensor, A_self: torch.Tensor, A_cross: torch.Tensor,
                      B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ZOH along one axis: ``x, delta [..., D]``, ``A_self, A_cross [D, N]``, ``B [..., N]`` ->
    ``(decay Ā, coupling Ā_cross, input B̄ x)``, each ``[..., D, N]``."""
    step = delta.unsqueeze(-1) * A_self                  # Δ A <= 0
    hold = torch.expm1(step) / A_self                    # ∫_0^Δ exp(s A) ds
    return torch.exp(step), hold * A_cross, hold * B.unsqueeze(-2) * x.unsqueeze(-1)


def _read_out(h_time: torch.Tensor, h_variate: torch.Tensor, C_time: torch.Tensor,
              C_variate: torch.Tensor) -> torch.Tensor:
    """``y = C^time · h^time + C^var · h^var``: states ``[..., D, N]``, ``C [..., N]`` -> ``[..., D]``."""
    return (h_time * C_time.unsqueeze(-2) + h_variate * C_variate.unsqueeze(-2)).sum(-1)


def scan2d_step(x_t: torch.Tensor, dt_time_t: torch.Tensor, dt_variate_t: torch.Tensor, A_time: torch.Tensor,
                A_variate: torch.Tensor, A_time_from_variate: torch.Tensor, A_variate_from_time: torch.Tensor,
                B_time_t: torch.Tensor, B_variate_t: torch.Tensor, C_time_t: torch.Tensor, C_variate_t: torch.Tensor,
                state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One time column, cell by cell down the variates: ``x_t, dt_*_t [B, V, D]``, ``B_*_t, C_*_t
    [B, V, N]``, ``state [B, V, 2, D, N]`` (the column before) -> ``(y_t [B, V, D], new state)``.
    O(1) memory in T. Computes in ``state``'s dtype."""
    acc = state.dtype
    x_t, dt_time_t, dt_variate_t = x_t.to(acc), dt_time_t.to(acc), dt_variate_t.to(acc)
    decay_t, couple_t, input_t = axis_coefficients(x_t, dt_time_t, A_time.to(acc), A_time_from_variate.to(acc),
                                                   B_time_t.to(acc))
    decay_v, couple_v, input_v = axis_coefficients(x_t, dt_variate_t, A_variate.to(acc),
                                                   A_variate_from_time.to(acc), B_variate_t.to(acc))
    h_time_left, h_variate_left = state[:, :, 0], state[:, :, 1]
    h_time_above = h_variate_above = torch.zeros_like(h_time_left[:, 0])  # above the first variate
    times, variates = [], []
    for i in range(x_t.shape[1]):
        h_time = decay_t[:, i] * h_time_left[:, i] + couple_t[:, i] * h_variate_left[:, i] + input_t[:, i]
        h_variate = decay_v[:, i] * h_variate_above + couple_v[:, i] * h_time_above + input_v[:, i]
        times.append(h_time)
        variates.append(h_variate)
        h_time_above, h_variate_above = h_time, h_variate
    h_time, h_variate = torch.stack(times, 1), torch.stack(variates, 1)  # [B, V, D, N]
    y_t = _read_out(h_time, h_variate, C_time_t.to(acc), C_variate_t.to(acc))
    return y_t, torch.stack([h_time, h_variate], 2)


def scan2d_recurrent(x, delta_time, delta_variate, A_time, A_variate, A_time_from_variate, A_variate_from_time,
                     B_time, B_variate, C_time, C_variate, initial_state=None, output_final_state=False):
    """The loop over time columns (each cell by cell, ``scan2d_step``), written to be read: the
    oracle of the tests (float32 accumulation, float64 for float64)."""
    b, v, t, d = x.shape
    acc = accumulation_dtype(x)
    state = (torch.zeros(b, v, 2, d, A_time.shape[-1], dtype=acc, device=x.device) if initial_state is None
             else initial_state.to(acc))
    outputs = [x.new_zeros(b, v, 0, d, dtype=acc)]  # so that an empty grid concatenates too
    for j in range(t):
        y_t, state = scan2d_step(x[:, :, j], delta_time[:, :, j], delta_variate[:, :, j], A_time, A_variate,
                                 A_time_from_variate, A_variate_from_time, B_time[:, :, j], B_variate[:, :, j],
                                 C_time[:, :, j], C_variate[:, :, j], state)
        outputs.append(y_t.unsqueeze(2))
    return torch.cat(outputs, 2).to(x.dtype), (state if output_final_state else None)


def linear_scan(a: torch.Tensor, g: torch.Tensor, h0: torch.Tensor | None = None,
                chunk_size: int | None = None) -> torch.Tensor:
    """Every state of ``h_k = a_k h_{k-1} + g_k`` (``h_{-1} = h0``, zero if None) along dim 0:
    ``a, g [L, ...]``, ``h0 [...]`` -> ``h [L, ...]``, differentiable in ``a``, ``g`` and ``h0``.

    Chunked: the ``L`` steps are cut into ``nc`` chunks of ``c`` (default ``ceil(sqrt(L))``);
    every chunk is scanned from zero at once (``c`` steps over all chunks), the chunks' start
    states follow from ``H_{m+1} = P_m H_m + e_m`` (``nc`` steps; ``P_m`` the product of chunk
    ``m``'s decays, ``e_m`` its local end state), and every chunk is scanned again from its true
    start (``c`` steps): ``O(L)`` work in ``2c + nc`` vectorised steps. Only products of the
    ``a``'s are formed, so decays in ``[0, 1]`` never overflow. The backward pass is the adjoint
    recurrence ``λ_k = ∂h_k + a_{k+1} λ_{k+1}``, the same scan run backwards."""
    if h0 is None:
        h0 = torch.zeros_like(g[0])
    length = a.shape[0]
    chunk = chunk_size or max(1, math.isqrt(length - 1) + 1)
    return _LinearScan.apply(a, g, h0, chunk)


def _chunked_scan(a: torch.Tensor, g: torch.Tensor, h0: torch.Tensor, chunk: int,
                  reverse: bool = False) -> torch.Tensor:
    """The forward of ``linear_scan`` (no autograd): ``a, g [L, ...]``, ``h0 [...]`` -> ``h [L, ...]``.
    ``reverse``: ``h_k = a_k h_{k+1} + g_k`` from ``h_L = h0`` down to ``k = 0`` instead."""
    length, rest = a.shape[0], a.shape[1:]
    c = min(chunk, length)
    n_chunks = -(-length // c)
    pad = n_chunks * c - length
    if pad:  # identity steps (a = 1, g = 0) after the end: they leave a reverse scan's start alone too
        a = torch.cat([a, a.new_ones(pad, *rest)])
        g = torch.cat([g, g.new_zeros(pad, *rest)])
    a = a.view(n_chunks, c, *rest).transpose(0, 1).contiguous()  # [c, nc, ...]
    g = g.view(n_chunks, c, *rest).transpose(0, 1).contiguous()
    positions = list(range(c))[::-1] if reverse else list(range(c))
    if n_chunks == 1:
        starts = h0.unsqueeze(0)
    else:
        local_end, product = g[positions[0]].clone(), a[positions[0]].clone()  # each chunk from zero
        for k in positions[1:]:
            local_end = torch.addcmul(g[k], a[k], local_end)
            product.mul_(a[k])
        chunks = list(range(n_chunks))[::-1] if reverse else list(range(n_chunks))
        carried = [h0]
        for m in chunks[:-1]:
            carried.append(torch.addcmul(local_end[m], product[m], carried[-1]))
        starts = torch.stack(carried[::-1] if reverse else carried)  # [nc, ...]: the state entering each chunk
    states, state = [None] * c, starts
    for k in positions:
        state = states[k] = torch.addcmul(g[k], a[k], state)
    # [nc, c, ...] -> [nc · c, ...] by concatenating the chunks: a view would guard on a symbolic batch (export)
    return torch.cat(torch.stack(states, 1).unbind(0))[:length]


class _LinearScan(torch.autograd.Function):
    """``linear_scan`` with its adjoint as the backward pass: ``λ_k = ∂h_k + a_{k+1} λ_{k+1}`` (the
    scan run backwards); ``∂g = λ``, ``∂a_k = λ_k h_{k-1}``, ``∂h0 = a_0 λ_0``."""

    @staticmethod
    def forward(ctx, a, g, h0, chunk):
        h = _chunked_scan(a, g, h0, chunk)
        ctx.save_for_backward(a, h0, h)
        ctx.chunk = chunk
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        a, h0, h = ctx.saved_tensors
        a_next = torch.cat([a[1:], a.new_zeros(1, *a.shape[1:])])  # nothing after the last step
        adjoint = _chunked_scan(a_next, grad_h.contiguous(), torch.zeros_like(h0), ctx.chunk, reverse=True)
        h_before = torch.cat([h0.unsqueeze(0), h[:-1]])
        return adjoint * h_before, adjoint, a[0] * adjoint[0], None


def _sweep(scanned: tuple[torch.Tensor, ...], swept: tuple[torch.Tensor, ...], scanned_start: torch.Tensor,
           swept_start: torch.Tensor, scanned_edge: torch.Tensor, swept_edge: torch.Tensor):
    """The 2-D recurrence on a grid laid out ``[P, Q, B, D, N]``, swept one outer row ``p`` at a
    time with a parallel scan along the inner axis ``q``::

        f[p, q] = af f[p, q-1] + cf s[p, q-1] + bf       (f travels along q: scanned)
        s[p, q] = as s[p-1, q] + cs f[p-1, q] + bs       (s travels along p: elementwise per row)

    ``scanned = (af, cf, bf)``, ``swept = (as, cs, bs)``, each ``[P, Q, B, D, N]``; ``*_start
    [P, B, D, N]``: ``f``, ``s`` at ``q = -1``; ``*_edge [Q, B, D, N]``: ``f``, ``s`` at ``p = -1``.
    Returns ``(f, s)``, each ``[P, Q, B, D, N]``."""
    f_above, s_above = scanned_edge, swept_edge
    rows_f, rows_s = [], []
    # unbind, not indexing: autograd then gathers each tensor's gradient once, not once per row.
    for decay_f, couple_f, input_f, decay_s, couple_s, input_s, f_start, s_start in zip(
            *(t.unbind(0) for t in (*scanned, *swept, scanned_start, swept_start))):
        s_row = torch.addcmul(torch.addcmul(input_s, decay_s, s_above), couple_s, f_above)
        s_left = torch.cat([s_start.unsqueeze(0), s_row[:-1]])
        f_row = linear_scan(decay_f, torch.addcmul(input_f, couple_f, s_left), f_start)
        rows_f.append(f_row)
        rows_s.append(s_row)
        f_above, s_above = f_row, s_row
    return torch.stack(rows_f), torch.stack(rows_s)


def scan2d_chunk(x, delta_time, delta_variate, A_time, A_variate, A_time_from_variate, A_variate_from_time,
                 B_time, B_variate, C_time, C_variate, initial_state=None, output_final_state=False,
                 sweep: str = "auto", channel_block: int | None = None):
    """The parallel form (module docstring). ``sweep``: ``"variates"`` (rows one at a time, a scan
    along time each), ``"time"`` (columns one at a time, a scan along the variates each) or
    ``"auto"`` (the shorter axis is swept). The channels are independent and are done
    ``channel_block`` at a time (default: about ``CHANNEL_BLOCK_ELEMENTS`` state elements per
    block, so that a block's intermediates stay in cache on a CPU). Same results, up to rounding,
    as ``scan2d_recurrent``."""
    if sweep not in SWEEPS:
        raise InputError(f"sweep='{sweep}' is not one of {', '.join(SWEEPS)}")
    if channel_block is not None and not (isinstance(channel_block, int) and channel_block >= 1):
        raise InputError(f"channel_block={channel_block!r}; expected a positive integer or None")
    b, v, t, d = x.shape
    n = A_time.shape[-1]
    acc = accumulation_dtype(x)
    by_variates = sweep == "variates" or (sweep == "auto" and v <= t)
    # The grid laid out [P, Q, B, ...] (P swept, Q scanned): rows [V, T, B, ...] or columns [T, V, B, ...].
    order = (1, 2, 0, 3) if by_variates else (2, 1, 0, 3)

    def laid_out(tensor: torch.Tensor) -> torch.Tensor:
        """``[B, V, T, *]`` -> contiguous ``[P, Q, B, *]`` in the accumulation dtype."""
        return tensor.to(acc).permute(order).contiguous()

    x_grid, dt_time, dt_variate = laid_out(x), laid_out(delta_time), laid_out(delta_variate)  # [P, Q, B, D]
    B_time, B_variate, C_time, C_variate = map(laid_out, (B_time, B_variate, C_time, C_variate))  # [P, Q, B, N]
    A_time, A_variate, A_time_from_variate, A_variate_from_time = (
        a.to(acc) for a in (A_time, A_variate, A_time_from_variate, A_variate_from_time))
    start = (torch.zeros(b, v, 2, d, n, dtype=acc, device=x.device) if initial_state is None
             else initial_state.to(acc))
    start_time, start_variate = start[:, :, 0].transpose(0, 1), start[:, :, 1].transpose(0, 1)  # [V, B, D, N]
    if channel_block is None:  # while tracing with a symbolic batch (export), one block: no guard on its size
        symbolic = not all(isinstance(size, int) for size in (b, v, t))
        channel_block = d if symbolic else max(1, CHANNEL_BLOCK_ELEMENTS // (b * v * t * n))
    outputs, last_columns = [], []
    for lo in range(0, d, channel_block):
        channels = slice(lo, lo + channel_block)
        time_axis = axis_coefficients(x_grid[..., channels], dt_time[..., channels], A_time[channels],
                                      A_time_from_variate[channels], B_time)               # 3 x [P, Q, B, Dc, N]
        variate_axis = axis_coefficients(x_grid[..., channels], dt_variate[..., channels], A_variate[channels],
                                         A_variate_from_time[channels], B_variate)
        nothing_above = x_grid.new_zeros(t, b, time_axis[0].shape[-2], n)  # above the first variate, per column
        if by_variates:
            h_time, h_variate = _sweep(time_axis, variate_axis, start_time[..., channels, :],
                                       start_variate[..., channels, :], nothing_above, nothing_above)
            last_columns.append(torch.stack([h_time[:, -1], h_variate[:, -1]], 2))     # [V, B, 2, Dc, N]
        else:
            h_variate, h_time = _sweep(variate_axis, time_axis, nothing_above, nothing_above,
                                       start_variate[..., channels, :], start_time[..., channels, :])
            last_columns.append(torch.stack([h_time[-1], h_variate[-1]], 2))
        outputs.append(_read_out(h_time, h_variate, C_time, C_variate))                 # [P, Q, B, Dc]
    y = torch.cat(outputs, -1)
    y = y.permute(2, 0, 1, 3) if by_variates else y.permute(2, 1, 0, 3)                # -> [B, V, T, D]
    final_state = torch.cat(last_columns, -2).transpose(0, 1) if output_final_state else None
    return y.to(x.dtype), final_state
