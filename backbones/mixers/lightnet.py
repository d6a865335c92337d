"""LightNet attention (LNA) of Qin et al., 2024, "You Only Scan Once: Efficient Multi-dimension
Sequential Modeling with LightNet": the additive linear recurrence, with the MD-TPE and MD-LRPE
positional encodings, so that one causal scan covers a 1-D, 2-D or 3-D grid.

The additive recurrence (per head and key dimension ``i``)::

    Λ_t = Σ_{s≤t} exp(k_s)                  S_t = Λ_t⁻¹ Σ_{s≤t} exp(k_s) v_sᵀ        o_t = S_tᵀ q_t

Every token's weight is a softmax over the tokens seen so far, independent of the order in
which they were visited: no product of decays shrinks what came early, so a single scan of a
grid gives the last position a view of every position (the "multiplicative" decays of GLA or
Mamba need several scan directions for that). It is a gated linear attention with a derived
gate: with the running log-normaliser ``l_t = log Λ_t`` (``logcumsumexp`` of the keys)::

    S_t = exp(l_{t-1} - l_t) S_{t-1} + exp(k_t - l_t) v_tᵀ

so the whole forward is ``seqapps.kernels.gated_linear_attention`` (chunked) and ``step`` its
recurrent form (``gla_step``); ``l`` is part of the streaming state.

The layer, for ``x [B, *column, T, C]`` (``[B, T, C]`` is a grid of one axis), heads ``H``,
``K = V = C / H``::

    x     = x + MD-TPE(x)                              # Toeplitz positions along every grid axis
    scan  = x in scan order                            # [B, L, C], L = T · N (N: positions per column)
    q     = silu(W_q scan), k = W_k scan, v = W_v scan # [B, L, H, K]
    q, k̂  = MD-LRPE(q), MD-LRPE(exp(k - l))            # [B, L, H, 2K]: cos and sin halves
    o     = additive recurrence                        # [B, L, H, V]
    y     = W_o (RMSNorm(o) ⊙ sigmoid(W_u2 W_u1 scan)) # low-rank output gate, as the paper's LNA

(No short convolution: the paper's LNA has none. The output gate is a sigmoid, as in the
authors' reference code; flash-linear-attention's port uses swish there.)

Scan order and streaming. The last grid axis is time. The scan visits the grid time-major: all
positions of column ``t`` (the other axes, in raster order) before those of column ``t + 1``.
``forward`` on a grid, ``forward`` on consecutive pieces of it along time with the state
carried, and ``step`` column by column give the same outputs. The state after a column::

    kv              [B, H, 2K, V]      S_t, over MD-LRPE's cos/sin key halves (K without LRPE):
                                       one state for the whole scan, shared by every position
    log_normaliser  [B, H, K]          l_t = log Λ_t per key dimension (-inf: nothing seen yet)
    position        [B]                time steps (columns) consumed: the next column's time coordinate
    toeplitz        [B, *column, C]    MD-TPE's running sum along time, one per position of a column
                                       (absent with ``use_tpe=False``)

``column_shape`` (constructor) fixes the sizes of the axes before time for ``init_state`` and
``step``: built with ``column_shape=(R,)``, ``step`` takes a column ``x_t [B, R, C]``; the
default ``()`` is a plain sequence, ``x_t [B, C]``. ``forward`` accepts any grid of
``1 .. max_grid_ndim`` axes (its state shapes follow the grid it is given).

MD-TPE (multi-dimensional Toeplitz positional encoding): along each grid axis ``a``, a causal
Toeplitz mixing ``(T_a x)_i = Σ_{j≤i} λ_{a,h}^{i-j} x_j`` per head (a learned decay per axis and
head, ``λ = sigmoid(·)``), summed over the axes, normalised and projected, added to ``x``.
Along time it is a scalar-decay GLA with unit keys and queries (the kernel, and its state
above); along the other axes, which a column brings whole, it is a small explicit matrix.

MD-LRPE (multi-dimensional linearised relative positional encoding, cosine form): the ``K``
key dimensions are shared among the ``m`` grid axes (dimension ``j`` encodes axis ``j mod m``,
so each axis gets the full range of frequencies), with angle ``a_j = θ_{h,j} · c_{axis(j)}`` for
the position's coordinates ``c``; queries and normalised keys become ``[x cos a, x sin a]``, so
``q·k̂ = Σ_j q_j k̂_j cos(θ_j (c_q - c_k)_{axis(j)})``: relative in every axis, and still linear.
``θ`` is learned, initialised to ``base^(-j/K)``.

Left out: the paper's bidirectional (non-causal) form for images, which
reads the final state at every position; applying MD-TPE once at the network input (here each
mixer adds it to its own input, so the mixer is self-contained); the Triton kernels of the
reference implementation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqapps.backbones.layers import GatedRMSNorm
from seqapps.backbones.mixer import Mixer, State, register_mixer
from seqapps.errors import InputError
from seqapps.kernels import gated_linear_attention
from seqapps.kernels.backend import accumulation_dtype

# The derived gate l_{t-1} - l_t is -inf at the first token ever seen (nothing to keep) and
# very negative when one key outweighs all before it. It is floored here: exp(-30) ~ 1e-13 is
# nothing next to float32 precision, and the chunked kernel needs finite log decays.
LOG_DECAY_FLOOR = -30.0


def additive_recurrence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: torch.Tensor | None = None,
                        initial_state: torch.Tensor | None = None,
                        initial_log_normaliser: torch.Tensor | None = None,
                        backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The normalised additive recurrence as a gated linear attention with a derived gate.

    ``q, k [B, L, H, K]``, ``v [B, L, H, V]``; ``angles [B, L, H, K]`` (MD-LRPE) or ``None``;
    ``initial_state [B, H, K', V]`` (``K' = 2K`` with angles, else ``K``) and
    ``initial_log_normaliser [B, H, K]`` (``-inf``: nothing seen) describe the tokens before.
    Computes, per head and key dimension ``i``::

        o_t = Σ_{s≤t} Σ_i q_ti · exp(k_si) / Σ_{r≤t} exp(k_ri) · cos(angle_ti - angle_si) · v_s

    (``cos = 1`` without angles). Returns ``(o [B, L, H, V], state [B, H, K', V],
    log_normaliser [B, H, K])``; computed in float32 (float64 for float64 inputs).
    """
    batch, length, heads, key_dim = k.shape
    acc = accumulation_dtype(q)
    k = k.to(acc)
    if initial_log_normaliser is None:
        initial_log_normaliser = k.new_full((batch, heads, key_dim), float("-inf"))
    start = initial_log_normaliser.to(acc).unsqueeze(1)  # [B, 1, H, K]
    log_normaliser = torch.logaddexp(start, torch.logcumsumexp(k, dim=1))  # l_t, [B, L, H, K]
    previous = torch.cat([start, log_normaliser[:, :-1]], dim=1)  # l_{t-1}
    gate = (previous - log_normaliser).clamp(min=LOG_DECAY_FLOOR)
    keys = torch.exp(k - log_normaliser)  # exp(k_t) / Λ_t, at most 1
    queries = q.to(acc)
    if angles is not None:
        cos, sin = angles.to(acc).cos(), angles.to(acc).sin()
        queries = torch.cat([queries * cos, queries * sin], dim=-1)
        keys = torch.cat([keys * cos, keys * sin], dim=-1)
        gate = torch.cat([gate, gate], dim=-1)
    o, state = gated_linear_attention(queries, keys, v.to(acc), gate, scale=1.0, initial_state=initial_state,
                                      output_final_state=True, backend=backend)
    return o.to(v.dtype), state, log_normaliser[:, -1]


def grid_coordinates(column_shape: tuple[int, ...], steps: int, time_offset: torch.Tensor) -> torch.Tensor:
    """The coordinates of the ``L = steps · N`` positions of a grid piece in scan order (time-major,
    then the column axes in raster order): ``time_offset [B]`` -> ``[B, L, m]`` (float32) with
    ``m = len(column_shape) + 1`` and the last coordinate the time ``offset + t``."""
    n_column = math.prod(column_shape)
    index = torch.arange(n_column, device=time_offset.device)
    column_coords, stride = [], n_column
    for size in column_shape:  # unravel the raster index of a column position
        stride //= size
        column_coords.append(index // stride % size)
    column = torch.stack(column_coords, -1) if column_coords else index.new_zeros(n_column, 0)  # [N, m-1]
    time = torch.arange(steps, device=time_offset.device)
    coords = torch.cat([column.unsqueeze(0).expand(steps, -1, -1),
                        time.view(steps, 1, 1).expand(-1, n_column, 1)], dim=-1)  # [steps, N, m]
    coords = coords.reshape(1, steps * n_column, -1).float()
    time_shift = F.pad(time_offset.float().view(-1, 1, 1), (len(column_shape), 0))  # [B, 1, m]
    return coords + time_shift


def md_lrpe_angles(theta: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """MD-LRPE angles: ``theta [H, K]``, ``coords [B, L, m]`` -> ``[B, L, H, K]`` with key
    dimension ``j`` encoding grid axis ``j mod m``: ``angle_j = θ_{h,j} · c_{j mod m}``."""
    axis_of_dim = torch.arange(theta.shape[-1], device=coords.device) % coords.shape[-1]
    return coords[..., axis_of_dim].unsqueeze(2) * theta


class MultiDimToeplitzPE(nn.Module):
    """MD-TPE: ``x + W · RMSNorm(Σ_a T_a x)`` over the grid axes of ``x [B, *column, T, C]``, with
    ``T_a`` the causal Toeplitz matrix ``λ_{a,h}^{i-j}`` (``i ≥ j``) along axis ``a``, per head.

    Decays are indexed from the time axis backwards (row 0: time, row 1: the axis before it, ...),
    so a sequence and a grid share the time decay. The time axis carries a running sum between
    pieces, ``time_state [B, *column, C]``.
    """

    def __init__(self, dim: int, num_heads: int, max_grid_ndim: int):
        super().__init__()
        self.num_heads = num_heads
        # decays from 0.5 to 0.95 over the heads, on every axis
        decays = torch.linspace(0.5, 0.95, num_heads)
        self.decay_logits = nn.Parameter(torch.log(decays / (1 - decays)).repeat(max_grid_ndim, 1))
        self.norm = GatedRMSNorm(dim)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, time_state: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, *column, T, C]``, ``time_state [B, *column, C]`` -> ``(x with positions, new time_state)``."""
        log_decay = F.logsigmoid(self.decay_logits)  # [A, H]
        n_axes = x.ndim - 2
        mixed, time_state = self._along_time(x, log_decay[0], time_state, backend)
        for axis in range(1, n_axes):  # the column axes, x dims 1 .. m-1
            mixed = mixed + self._along_column_axis(x, axis, log_decay[n_axes - axis])
        return x + self.proj(self.norm(mixed)), time_state

    def _along_time(self, x, log_decay, time_state, backend):
        """Scalar-decay GLA with unit queries and keys: ``o_t = Σ_{s≤t} λ^{t-s} x_s`` per head."""
        batch, *column, steps, channels = x.shape
        heads = self.num_heads
        values = x.reshape(-1, steps, heads, channels // heads)  # [B·N, T, H, D]
        ones = values.new_ones(values.shape[0], steps, heads, 1)
        gate = log_decay.to(values.dtype).expand(values.shape[0], steps, heads)
        initial = time_state.reshape(values.shape[0], heads, 1, channels // heads)
        out, final = gated_linear_attention(ones, ones, values, gate, scale=1.0, initial_state=initial,
                                            output_final_state=True, backend=backend)
        return out.reshape(x.shape), final.reshape(batch, *column, channels)

    def _along_column_axis(self, x, axis, log_decay):
        """The explicit causal Toeplitz matrix ``[H, n, n]`` along dim ``axis`` of ``x``."""
        size = x.shape[axis]
        position = torch.arange(size, device=x.device)
        distance = position.view(-1, 1) - position.view(1, -1)  # i - j
        weights = torch.exp(distance.clamp(min=0) * log_decay.view(-1, 1, 1))  # [H, n, n]
        weights = weights.masked_fill(distance < 0, 0.0).to(x.dtype)
        moved = x.movedim(axis, -2)
        heads = moved.unflatten(-1, (self.num_heads, -1))  # [..., n, H, D]
        mixed = torch.einsum("hij,...jhd->...ihd", weights, heads)
        return mixed.flatten(-2).movedim(-2, axis)


@register_mixer("lightnet")
class LightNet(Mixer):
    """LightNet attention over a sequence ``[B, T, C]`` or a grid ``[B, *column, T, C]`` (one causal
    scan, time-major); see the module docstring for the layer, the scan order and the state.

    Args:
        dim: model width ``C``.
        num_heads: heads ``H``; ``K = V = C / H`` (default 4: head size 8 at ``dim=32``).
        gate_rank: rank of the low-rank output gate ``W_u2 W_u1``; ``None`` = the head size.
        use_tpe: add MD-TPE to the input (paper: yes).
        use_lrpe: MD-LRPE on queries and normalised keys (paper: yes).
        lrpe_base: ``θ`` starts at ``lrpe_base^(-j/K)``.
        column_shape: sizes of the grid axes before time, for ``init_state`` and ``step``
            (``()``: a sequence; ``(R,)``: ``step`` takes columns ``x_t [B, R, C]``).
        max_grid_ndim: the most grid axes (time included) ``forward`` accepts; MD-TPE learns a
            decay per axis and head for that many axes.
        bias: bias in the q/k/v/output projections (paper: none).
    """

    grid_native = True

    def __init__(self, dim: int, num_heads: int = 4, gate_rank: int | None = None, use_tpe: bool = True,
                 use_lrpe: bool = True, lrpe_base: float = 10000.0, column_shape: tuple[int, ...] | list = (),
                 max_grid_ndim: int = 3, bias: bool = False):
        super().__init__(dim)
        if num_heads < 1 or dim % num_heads:
            raise InputError(f"LightNet: num_heads={num_heads} must divide dim={dim}")
        self.column_shape = tuple(int(n) for n in column_shape)
        if len(self.column_shape) + 1 > max_grid_ndim or any(n < 1 for n in self.column_shape):
            raise InputError(f"LightNet: column_shape={list(self.column_shape)}; expected at most "
                             f"{max_grid_ndim - 1} positive sizes (max_grid_ndim={max_grid_ndim})")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.use_tpe, self.use_lrpe, self.max_grid_ndim = use_tpe, use_lrpe, max_grid_ndim
        gate_rank = self.head_dim if gate_rank is None else gate_rank

        self.tpe = MultiDimToeplitzPE(dim, num_heads, max_grid_ndim) if use_tpe else None
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        if use_lrpe:
            frequencies = lrpe_base ** (-torch.arange(self.head_dim, dtype=torch.float32) / self.head_dim)
            self.theta = nn.Parameter(frequencies.repeat(num_heads, 1))  # [H, K]
        self.gate_proj = nn.Sequential(nn.Linear(dim, gate_rank, bias=False), nn.Linear(gate_rank, dim, bias=False))
        self.output_norm = GatedRMSNorm(dim)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    # -- state
    def init_state(self, batch_size: int, device=None, dtype=None,
                   column_shape: tuple[int, ...] | None = None) -> State:
        """``(kv, log_normaliser, position[, toeplitz])`` before the first column, float32 whatever
        ``dtype``; ``column_shape`` defaults to the constructor's."""
        column = self.column_shape if column_shape is None else tuple(column_shape)
        heads, size = self.num_heads, self.head_dim
        f32 = torch.float32
        state = (torch.zeros(batch_size, heads, size * (2 if self.use_lrpe else 1), size, device=device, dtype=f32),
                 torch.full((batch_size, heads, size), float("-inf"), device=device, dtype=f32),
                 torch.zeros(batch_size, device=device, dtype=f32))
        if self.use_tpe:
            state += (torch.zeros(batch_size, *column, self.dim, device=device, dtype=f32),)
        return state

    # -- the interface
    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``x [B, T, C]`` or ``[B, *column, T, C]`` -> ``(y of x's shape, state after it)``."""
        self._check_grid(x)
        batch, column = x.shape[0], tuple(x.shape[1:-2])
        if state is None:
            state = self.init_state(batch, device=x.device, column_shape=column)
        else:
            self._check_state_for(state, batch, column)
        if x.numel() == 0:  # no time steps (or an empty batch or grid): the state as it was
            return x.new_zeros(x.shape), state
        return self._mix(x, state, backend="auto")

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One column: ``x_t [B, C]`` (sequence) or ``[B, *column_shape, C]`` (grid) -> ``(y_t, state)``.
        The column's positions go through the recurrent form (``gla_step``) in scan order."""
        if self.column_shape:
            self._check_column(x_t)
        else:
            self.check_input(x_t, 2)
        self.check_state(state, x_t.shape[0])
        y, state = self._mix(x_t.unsqueeze(-2), state, backend="recurrent")
        return y.squeeze(-2), state

    # -- the layer
    def _mix(self, x: torch.Tensor, state: State, backend: str) -> tuple[torch.Tensor, State]:
        """``x [B, *column, T, C]`` with ``T ≥ 1`` -> ``(y [B, *column, T, C], new state)``."""
        kv, log_normaliser, position, *toeplitz = state
        batch, *column, steps, channels = x.shape
        if self.use_tpe:
            x, toeplitz_state = self.tpe(x, toeplitz[0], backend)
        scan = x.movedim(-2, 1).reshape(batch, -1, channels)  # [B, L, C], time-major
        split = (batch, scan.shape[1], self.num_heads, self.head_dim)
        q = F.silu(self.q_proj(scan)).view(split)
        k = self.k_proj(scan).view(split)
        v = self.v_proj(scan).view(split)
        angles = md_lrpe_angles(self.theta, grid_coordinates(tuple(column), steps, position)) if self.use_lrpe else None
        o, kv, log_normaliser = additive_recurrence(q, k, v, angles, kv, log_normaliser, backend)
        gate = torch.sigmoid(self.gate_proj(scan))
        y = self.o_proj(self.output_norm(o.reshape(batch, -1, channels)) * gate)
        y = y.view(batch, steps, *column, channels).movedim(1, -2)
        new_state = (kv, log_normaliser, position + steps)
        return y, (new_state + (toeplitz_state,) if self.use_tpe else new_state)

    # -- checks
    def _check_grid(self, x: torch.Tensor) -> None:
        if x.ndim == 3:
            self.check_input(x)
        elif not 3 <= x.ndim <= self.max_grid_ndim + 2 or x.shape[-1] != self.dim:
            raise InputError(f"LightNet expects x of shape [batch, *grid, time, channels] with 1 to "
                             f"{self.max_grid_ndim} grid axes and {self.dim} channels, got {list(x.shape)}")

    def _check_column(self, x_t: torch.Tensor) -> None:
        want = [*self.column_shape, self.dim]
        if x_t.ndim != len(want) + 1 or list(x_t.shape[1:]) != want:
            raise InputError(f"LightNet (built with column_shape={list(self.column_shape)}) expects one "
                             f"column x_t of shape [batch, {', '.join(map(str, want))}] ({self.dim} channels), "
                             f"got {list(x_t.shape)}")

    def _check_state_for(self, state: State, batch_size: int, column: tuple[int, ...]) -> None:
        """``check_state`` for a grid whose columns may differ from ``column_shape``."""
        if column == self.column_shape:
            self.check_state(state, batch_size)
            return
        want = [list(s.shape) for s in self.init_state(batch_size, device="meta", column_shape=column)]
        got = [list(s.shape) for s in state] if isinstance(state, tuple) else type(state).__name__
        if got != want:
            raise InputError(f"LightNet: state shapes {got} do not fit a batch of {batch_size} with columns "
                             f"{list(column)}; expected {want} (a state from another batch size or grid?)")
