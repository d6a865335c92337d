"""The chunked parallel form of Mamba's selective scan, in plain PyTorch.

``selective_scan`` is ``D · N`` independent scalar recurrences per sequence,
``h_t = a_t h_{t-1} + x_t`` with ``a_t = exp(Δ_t A)`` (or ``2 exp(Δ_t A) - 1``) and
``x_t = Δ_t u_t B_t``, read out as ``y_t = C_t · h_t`` (a sum over the state size ``N``).

Why not the decay-matrix form of SSD / GLA. There, one decay per head makes the intra-chunk work
a matmul over the key dimension, with a ``c x c`` matrix of decays ``exp(G_t - G_s)`` shared by
every key. Here every channel and state dimension ``(d, n)`` decays at its own rate, so that
matrix would be ``[c, c]`` per ``(b, d, n)``: ``c`` times the work of the scan, with no matmul
to absorb it. Splitting ``exp(G_t - G_s) = exp(G_t - G_r) exp(G_r - G_s)`` around a reference
``r`` is cheaper but cannot be exact once a step decays by ``exp(-20)``: some factor overflows
or underflows whatever ``r`` is.

So this form works with products of the transitions themselves, never takes a logarithm and
never exponentiates anything positive (for ``Δ A <= 0``). Time is cut into ``nc`` chunks of
``c`` steps, laid out ``[c, nc, B, G, Dg, N]`` (position in chunk, chunk, batch, group of
``B``/``C``, channel in group, state), and every loop below steps through the ``c`` positions
of all chunks at once, or through the ``nc`` chunks:

1. local pass: each chunk scanned from a zero state; its last step is ``e_k``, what chunk ``k``
   adds to the state, and ``P_k`` is the product of its transitions (``exp(A Σ Δ)`` when they
   are all positive, a running product otherwise);
2. between chunks: ``H_k = P_k H_{k-1} + e_k``, the state each chunk starts from;
3. final pass: each chunk scanned from its true start state, reading out ``y_t = C_t · h_t``.

The backward pass (written by hand, in ``_ChunkedScan``) is the same three steps run backwards
on the adjoint ``λ_t = C_t ∂y_t + a_{t+1} λ_{t+1}``: a local reverse pass gives what each chunk's
outputs send back to its start state, ``σ_k = ρ_k + P_k σ_{k+1}`` carries the adjoint between
chunks, and a final reverse pass forms every gradient step by step.

That is ``O(T · D · N)`` work in ``2c + nc`` Python steps each way, every step on one slice of
``nc · B · D · N`` elements, small enough to stay in cache while several operations read it.
Each transition is exponentiated once (the ``exp`` is the costliest operation here) and kept,
with the state after every position, as the per-position slices the backward pass reads; no
other ``[B, T, D, N]`` tensor is built. Every number is a sum of products of the recurrence's
own factors, so transitions anywhere in ``[-1, 1]``, ``exp(-20)`` or exactly 0 included, need
no special care. Padding the last chunk with ``Δ = 0`` (transition 1, input 0) leaves the final
state untouched. Work is done in float32 (float64 for float64 inputs), as in
``selective_scan_recurrent``, whose results this reproduces up to rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from seqapps.kernels.backend import accumulation_dtype, expect_chunk_size
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
    expect_chunk_size(chunk_size)
    batch, t, d = u.shape
    n = A.shape[-1]
    groups = 1 if B.ndim == 3 else B.shape[2]
    acc = accumulation_dtype(u)
    c = min(chunk_size, t)
    n_chunks = math.ceil(t / c)

    def chunked(x: torch.Tensor) -> torch.Tensor:
        """``[B, T, ...]`` -> ``[c, nc, B, ...]``, contiguous, zero-padded to ``nc · c`` steps."""
        pad = n_chunks * c - t
        if pad:
            x = F.pad(x, (0, 0) * (x.ndim - 2) + (0, pad))
        return x.reshape(batch, n_chunks, c, *x.shape[2:]).transpose(0, 2).contiguous()

    def by_group(x: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` -> ``[..., G, D / G]``."""
        return x.unflatten(-1, (groups, d // groups))

    dt = discretize(delta.to(acc), None if delta_bias is None else delta_bias.to(acc), delta_softplus)
    y, final_state = _ChunkedScan.apply(
        by_group(chunked(dt)),                                      # [c, nc, B, G, Dg]
        by_group(chunked(dt * u.to(acc))),                          # [c, nc, B, G, Dg]
        A.to(acc).reshape(groups, d // groups, n),                  # [G, Dg, N]
        chunked(B.to(acc).reshape(batch, t, groups, n)),            # [c, nc, B, G, N]
        chunked(C.to(acc).reshape(batch, t, groups, n)),            # [c, nc, B, G, N]
        (torch.zeros(batch, groups, d // groups, n, dtype=acc, device=u.device) if initial_state is None
         else initial_state.to(acc).reshape(batch, groups, d // groups, n)),
        negative_eigenvalues)
    y = y.flatten(-2).transpose(0, 2).reshape(batch, n_chunks * c, d)[:, :t]
    if D is not None:
        y = y + D.to(acc) * u.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(u.dtype), (final_state.reshape(batch, d, n) if output_final_state else None)


class _ChunkedScan(torch.autograd.Function):
    """The scan core, ``y = C · h`` with ``h_t = a_t h_{t-1} + w_t B_t``, on chunked tensors:
    ``dt, w [c, nc, B, G, Dg]`` (``Δ`` and ``Δ u``), ``A [G, Dg, N]``, ``B, C [c, nc, B, G, N]``,
    ``h0 [B, G, Dg, N]`` -> ``(y [c, nc, B, G, Dg], final state [B, G, Dg, N])``.

    Inside, chunk and batch share one "row" dimension ``R = nc · B`` (chunk-major), so the rows
    of chunk ``k`` are ``k·B ... (k+1)·B - 1`` and one position of every chunk is a single
    contiguous slice ``[R, G, Dg, N]``. The transitions and the states after every position are
    kept for the backward pass as lists of such slices: allocated step by step, they reuse memory
    the allocator already holds, where one big fresh buffer costs a page fault per 4 KiB on
    every call."""

    @staticmethod
    def forward(ctx, dt, w, A, B, C, h0, negative):
        c, n_chunks, batch = dt.shape[:3]
        dt, w, B, C = (x.flatten(1, 2) for x in (dt, w, B, C))
        transitions = [_transition(dt_i, A, negative) for dt_i in dt]
        if n_chunks == 1:
            starts, products = h0, h0  # nothing to carry between chunks
        else:
            local_ends, products = _local_pass(transitions, dt, w, A, B, negative)
            starts = _between_chunks(h0, products, local_ends, n_chunks)
        keep = any(ctx.needs_input_grad)
        y, states = _final_pass(transitions, w, B, C, starts, keep)
        if keep:
            ctx.save_for_backward(dt, w, A, B, C, starts, products, *transitions, *states)
        ctx.negative, ctx.n_chunks = negative, n_chunks
        final_state = states[-1][(n_chunks - 1) * batch:]
        return y.unflatten(1, (n_chunks, batch)), final_state

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_final):
        dt, w, A, B, C, starts, products, *slices = ctx.saved_tensors
        c, n_chunks = dt.shape[0], ctx.n_chunks
        transitions, states = slices[:c], slices[c:]
        grad_y = grad_y.contiguous().flatten(1, 2)  # autograd may hand it over transposed
        # Adjoints are carried from the end backwards, so chunks are walked last to first.
        if n_chunks == 1:
            end_adjoints = grad_final
        else:
            local_starts = _local_reverse_pass(transitions, C, grad_y)
            flip = lambda x: x.unflatten(0, (n_chunks, -1)).flip(0).flatten(0, 1)  # noqa: E731
            end_adjoints = flip(_between_chunks(grad_final, flip(products), flip(local_starts), n_chunks))
        grads = _final_reverse_pass(transitions, states, dt, w, A, B, C, grad_y, starts, end_adjoints,
                                    ctx.negative)
        grad_dt, grad_w, grad_A, grad_B, grad_C, start_adjoints = grads
        split = lambda x: x.unflatten(1, (n_chunks, -1))  # noqa: E731
        grad_h0 = start_adjoints[:grad_final.shape[0]]  # the rows of the first chunk
        return split(grad_dt), split(grad_w), grad_A, split(grad_B), split(grad_C), grad_h0, None


def _transition(dt_i: torch.Tensor, A: torch.Tensor, negative: bool) -> torch.Tensor:
    """One position's transitions, ``dt_i [R, G, Dg]``, ``A [G, Dg, N]`` -> ``[R, G, Dg, N]``:
    ``exp(Δ A)``, or ``2 exp(Δ A) - 1``."""
    transition = (dt_i.unsqueeze(-1) * A).exp_()
    return transition.mul_(2).sub_(1) if negative else transition


def _local_pass(transitions, dt, w, A, B, negative):
    """Every chunk scanned from zero: ``(e [R, G, Dg, N]``, what each chunk adds to its start
    state, ``P [R, G, Dg, N]``, the product of each chunk's transitions``)``. ``transitions``:
    one ``[R, G, Dg, N]`` per position; ``dt, w [c, R, G, Dg]``, ``B [c, R, G, N]``."""
    local = w[0].unsqueeze(-1) * B[0].unsqueeze(-2)
    for a_i, w_i, B_i in zip(transitions[1:], w[1:], B[1:]):
        local = local.mul_(a_i).addcmul_(w_i.unsqueeze(-1), B_i.unsqueeze(-2))
    if not negative:
        # All transitions are positive: their product is one exp of a sum, never above 1 for Δ A <= 0.
        return local, torch.exp(dt.sum(0).unsqueeze(-1) * A)
    product = transitions[0].clone()
    for a_i in transitions[1:]:
        product = product.mul_(a_i)
    return local, product


def _between_chunks(first, factors, contributions, n_chunks):
    """``s_0 = first``, ``s_{k+1} = factors_k s_k + contributions_k``: ``[R, ...]`` with the
    ``s_k`` stacked chunk-major. ``first [B, ...]``; ``factors, contributions [R, ...]`` (the
    last chunk's entries are not used)."""
    carried = [first]
    factors, contributions = factors.unflatten(0, (n_chunks, -1)), contributions.unflatten(0, (n_chunks, -1))
    for k in range(n_chunks - 1):
        carried.append(torch.addcmul(contributions[k], factors[k], carried[-1]))
    return torch.cat(carried)


def _read_out(state: torch.Tensor, C_i: torch.Tensor) -> torch.Tensor:
    """``y = Σ_n C h``: ``state [R, G, Dg, N]``, ``C_i [R, G, N]`` -> ``[R, G, Dg]``."""
    return torch.matmul(C_i.unsqueeze(-2), state.transpose(-1, -2)).squeeze(-2)


def _final_pass(transitions, w, B, C, starts, keep_states):
    """Every chunk scanned from its start state ``[R, G, Dg, N]``, reading out ``y = C · h``:
    ``(y [c, R, G, Dg], states)``, the state after every position (``[R, G, Dg, N]`` each) when
    ``keep_states``, else only the last."""
    state, states, outputs = starts.clone(), [], []
    for a_i, w_i, B_i, C_i in zip(transitions, w, B, C):
        state = torch.mul(a_i, state) if keep_states else state.mul_(a_i)
        state = state.addcmul_(w_i.unsqueeze(-1), B_i.unsqueeze(-2))
        outputs.append(_read_out(state, C_i))
        if keep_states:
            states.append(state)
    return torch.stack(outputs), (states if keep_states else [state])


def _local_reverse_pass(transitions, C, grad_y):
    """Every chunk run backwards from a zero adjoint at its end: ``ρ [R, G, Dg, N]``, the
    adjoint its own outputs send to its start state. ``grad_y [c, R, G, Dg]``."""
    adjoint = torch.zeros_like(transitions[0])
    for i in range(len(transitions) - 1, -1, -1):
        adjoint = adjoint.addcmul_(grad_y[i].unsqueeze(-1), C[i].unsqueeze(-2)).mul_(transitions[i])
    return adjoint


def _final_reverse_pass(transitions, states, dt, w, A, B, C, grad_y, starts, end_adjoints, negative):
    """The gradients, one position at a time from the last, with ``λ`` the adjoint of the state
    after that position: ``∂C = ∂y · h``, ``∂w = λ · B``, ``∂B = w · λ``, and through
    ``a = a(ΔA)``: ``g = λ h_prev ∂a/∂(ΔA)``, ``∂dt = Σ_n g A``, ``∂A = Σ g dt``, where
    ``∂a/∂(ΔA)`` is ``a`` (``a + 1`` with negative eigenvalues). Returns ``(∂dt, ∂w [c, R, G, Dg],
    ∂A [G, Dg, N], ∂B, ∂C [c, R, G, N], the adjoint of every chunk's start state [R, G, Dg, N])``."""
    grad_dt, grad_w, grad_B, grad_C = [], [], [], []
    grad_A, grad_log = torch.zeros_like(end_adjoints), torch.empty_like(end_adjoints)
    adjoint = end_adjoints.clone()
    for i in range(len(transitions) - 1, -1, -1):
        a_i, state, previous = transitions[i], states[i], (states[i - 1] if i else starts)
        adjoint = adjoint.addcmul_(grad_y[i].unsqueeze(-1), C[i].unsqueeze(-2))
        grad_C.append(torch.matmul(grad_y[i].unsqueeze(-2), state).squeeze(-2))
        grad_w.append(_read_out(adjoint, B[i]))
        grad_B.append(torch.matmul(w[i].unsqueeze(-2), adjoint).squeeze(-2))
        if negative:
            grad_log = torch.mul(adjoint, previous, out=grad_log)
            grad_log = grad_log.addcmul_(grad_log, a_i)  # λ h_prev (a + 1)
            adjoint = adjoint.mul_(a_i)
        else:
            adjoint = adjoint.mul_(a_i)
            grad_log = torch.mul(adjoint, previous, out=grad_log)  # λ a h_prev
        grad_dt.append(torch.linalg.vecdot(grad_log, A))
        grad_A = grad_A.addcmul_(grad_log, dt[i].unsqueeze(-1))
    reverse = lambda grads: torch.stack(grads[::-1])  # noqa: E731
    return reverse(grad_dt), reverse(grad_w), grad_A.sum(0), reverse(grad_B), reverse(grad_C), adjoint
