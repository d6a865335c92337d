"""Chimera's 2-D selective SSM layer (Behrouz, Santacatterina & Zabih, 2024, "Chimera: Effectively
Modeling Multivariate Time Series with 2-Dimensional State Space Models") over a grid of
variates × time (or rows × columns of an image), ``x [B, V, T, C]``; a sequence ``[B, T, C]`` is
a grid of one variate.

The layer, for ``E = expand · C`` inner channels (Mamba's block around the 2-D SSM, the form
the paper calls 2-D Mamba)::

    u, z  = in_proj(x)                                   # [B, V, T, E] each: SSM input and gate
    u     = silu(causal depthwise conv(u))               # along time, per variate (kernel d_conv)
    for each head (one by default; ``heads=`` trend and seasonal, below):
      for each direction along the variates (top-down and bottom-up, both by default):
        Δ^t, Δ^v, B^t, B^v, C^t, C^v = selection(u)      # input-dependent: [B, V, T, E] / [B, V, T, N]
        y_dir = 2-D SSM(u; Δ, B, C, A_time, A_variate, couplings)   # seqapps.kernels.scan2d
    y     = (Σ_head Σ_dir y_dir + D u) · silu(z)         # silu(z): the data-dependent gate
    out   = out_proj(y)                                  # [B, V, T, C]

The 2-D SSM (see ``seqapps.kernels.scan2d``): per cell two states, ``h^time`` carried along time
and ``h^var`` carried along the variates, each fed by the other through a coupling, with
ZOH discretisation and a separate input-dependent step ``Δ`` per axis (``softplus`` of a
low-rank projection, as Mamba's; initialised in 1e-3..0.1 along time, as Mamba's, and in 0.1..1
along the short variate axis, see ``dt_min_variate``). ``A_time``, ``A_variate`` are S4D-real (``-(n + 1)``) decays;
the couplings start at half their size (``+(n + 1) / 2``), so each state's gain per step,
``Ā + Ā_cross = exp(ΔA) + (1 - exp(ΔA)) / 2``, starts at most 1.

Heads. Chimera learns long-term progression and seasonal patterns with two 2-D SSM heads that
differ in their discretisation along time: the step ``Δ^t`` sets the resolution at which a head
reads the series, so a head of small steps (slow decay, a memory of hundreds of steps) follows
the long-term progression and a head of large steps (fast decay, a memory of a few steps at a
coarse resolution) the seasonal detail. ``heads={"trend": (1e-3, 1e-2), "seasonal": (0.1, 1.0)}``
builds one head per entry, each with its own selection, transitions and initial range of
``Δ^t``, all reading the same ``u`` and summed under the one gate. The default (``heads=None``)
is a single head with ``Δ^t`` in ``(dt_min, dt_max)``. (The paper's method section was not
available to us; the two-head design follows its abstract and figure 1: "two input-dependent 2-D
SSM heads with different discretization processes to learn long-term progression and seasonal
patterns", with smaller steps for the long-term and larger for the seasonal head.)

Directions. The variates have no natural order, so by default the 2-D SSM runs twice, down the
variates and up them (each with its own selection and transitions), and the outputs are
summed: every output then sees every variate, so the layer is NOT causal along the variates
(it is along time). ``bidirectional=False`` keeps only the top-down direction.

``cross_variate=False`` (the ablation of the cross-variate path) runs the same layer on each
variate as its own grid of one row: no state crosses between variates, so each variate's
output depends on that variate alone (and equals the layer applied to it as a sequence).

Couplings. The general 2-D SSM has two couplings, time -> variate and variate -> time. On a
single variate (a plain sequence) the time -> variate one never acts (there is no variate above
to read), so with separate couplings a model trained on sequences leaves it untrained; by
default (``tied_coupling=True``) one coupling per channel and state serves both directions
(``A_time_from_variate = A_variate_from_time``); ``tied_coupling=False`` learns both.

Streaming along time. The state after a column: ``(conv cache [B, V, E, d_conv - 1], then per
head and direction the 2-D SSM state [B, V, 2, E, N]`` (per variate ``h^time`` and ``h^var`` of the last
column, float32; both directions indexed in the natural variate order)). ``forward`` on a
grid, ``forward`` on consecutive pieces of it along time with the state carried, and ``step``
column by column give the same outputs. ``num_variates`` (constructor) fixes ``V`` for
``init_state`` and ``step``: the default ``None`` is a sequence, ``step(x_t [B, C])``; with
``num_variates=V``, ``step`` takes one time column ``x_t [B, V, C]`` and returns ``y_t [B, V, C]``.
``forward`` takes any ``V`` (its state shapes follow the grid it is given).

Left out: the fused CUDA kernel (``scan2d`` is plain PyTorch on every device). The series
decomposition and the forecasting heads are the model's (``seqapps.tasks.forecasting.chimera``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from seqapps.backbones.layers import ShortConvolution
from seqapps.backbones.mixer import Mixer, State, register_mixer
from seqapps.backbones.mixers.mamba import step_size_bias
from seqapps.errors import InputError
from seqapps.kernels.scan2d import scan2d


class VariateDirection(nn.Module):
    """The selection and transitions of one direction along the variates.

    ``selection(u [..., E])`` -> ``(Δ^t, Δ^v [..., E], B^t, B^v, C^t, C^v [..., N])``;
    ``transitions()`` -> ``(A_time, A_variate, A_time_from_variate, A_variate_from_time)``, each ``[E, N]``.
    """

    def __init__(self, inner: int, d_state: int, dt_rank: int, dt_range_time: tuple[float, float],
                 dt_range_variate: tuple[float, float], tied_coupling: bool):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.x_proj = nn.Linear(inner, 2 * dt_rank + 4 * d_state, bias=False)
        self.dt_proj_time = nn.Linear(dt_rank, inner, bias=True)
        self.dt_proj_variate = nn.Linear(dt_rank, inner, bias=True)
        for proj, (dt_min, dt_max) in ((self.dt_proj_time, dt_range_time), (self.dt_proj_variate, dt_range_variate)):
            nn.init.uniform_(proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
            with torch.no_grad():
                proj.bias.copy_(step_size_bias(inner, dt_min, dt_max))
        s4d_real = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(inner, 1)  # [E, N]
        self.A_time_log = nn.Parameter(torch.log(s4d_real))
        self.A_variate_log = nn.Parameter(torch.log(s4d_real))
        self.time_from_variate = nn.Parameter(s4d_real / 2)
        self.variate_from_time = None if tied_coupling else nn.Parameter(s4d_real / 2)

    def selection(self, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        split = [self.dt_rank, self.dt_rank] + [self.d_state] * 4
        dt_time, dt_variate, B_time, B_variate, C_time, C_variate = self.x_proj(u).split(split, dim=-1)
        return (F.softplus(self.dt_proj_time(dt_time)), F.softplus(self.dt_proj_variate(dt_variate)),
                B_time, B_variate, C_time, C_variate)

    def transitions(self) -> tuple[torch.Tensor, ...]:
        variate_from_time = self.time_from_variate if self.variate_from_time is None else self.variate_from_time
        return -torch.exp(self.A_time_log), -torch.exp(self.A_variate_log), self.time_from_variate, variate_from_time


@register_mixer("chimera")
class Chimera(Mixer):
    """Chimera's 2-D selective SSM over ``[B, T, C]`` or ``[B, V, T, C]``; see the module docstring.

    Args:
        dim: model width ``C``.
        d_state: state size ``N`` per channel and axis (default 16, as Mamba).
        d_conv: width of the causal depthwise convolution along time (default 4; at least 2).
        expand: inner width ``E = expand · C`` (default 2; ``E = 64`` at ``dim=32``).
        dt_rank: rank of each step-size projection; ``None`` = ``ceil(C / 16)``.
        dt_min, dt_max: range of the initial step sizes along time (default 1e-3, 0.1, as Mamba).
        dt_min_variate, dt_max_variate: the same along the variates (default 0.1, 1). The variate
            axis is short (a few to a few dozen rows) and every cross-variate path goes through it:
            with Mamba's small steps there too, a row's state reaches the next row through the
            coupling ``hold^v A_variate_from_time ≈ Δ^v (n + 1) / 2``, about 1e-2 (and the product
            of two such factors, ~1e-4, in the output of a neighbouring variate), so the
            cross-variate path starts switched off and barely trains; steps of 0.1..1 start it at
            a coupling of about 0.05..0.5 and a memory of a few rows.
        heads: ``{name: (dt_min, dt_max)}``, one 2-D SSM head per entry with its own initial range
            of steps along time (e.g. ``{"trend": (1e-3, 1e-2), "seasonal": (0.1, 1.0)}``, the
            paper's two heads); ``None`` (default) is one head with ``(dt_min, dt_max)``, which
            are not used when ``heads`` is given.
        bidirectional: run the 2-D SSM down and up the variates and sum (default, as the paper).
        cross_variate: let states cross between variates; ``False`` makes the variates independent.
        tied_coupling: one coupling for both directions between the two states (default; see
            the module docstring); ``False`` learns the two couplings separately.
        num_variates: ``V`` for ``init_state`` and ``step``; ``None`` (default) is a sequence.
        bias: bias in ``in_proj`` and ``out_proj`` (default none, as Mamba).
        conv_bias: bias in the short convolution (default yes).
    """

    grid_native = True

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_min_variate: float = 0.1, dt_max_variate: float = 1.0,
                 heads: Mapping[str, Sequence[float]] | None = None, bidirectional: bool = True, cross_variate: bool = True,
                 tied_coupling: bool = True, num_variates: int | None = None, bias: bool = False,
                 conv_bias: bool = True):
        super().__init__(dim)
        if d_conv < 2:
            raise InputError(f"Chimera: d_conv={d_conv}; expected at least 2")
        if num_variates is not None and num_variates < 1:
            raise InputError(f"Chimera: num_variates={num_variates}; expected a positive number or None (a sequence)")
        self.d_state, self.d_conv = d_state, d_conv
        self.d_inner = expand * dim
        self.dt_rank = math.ceil(dim / 16) if dt_rank is None else dt_rank
        self.bidirectional, self.cross_variate, self.num_variates = bidirectional, cross_variate, num_variates

        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=bias)
        self.conv = ShortConvolution(self.d_inner, d_conv, activation=True, bias=conv_bias)
        self.heads = _time_step_ranges(heads, (dt_min, dt_max))
        directions = (False, True) if bidirectional else (False,)
        # flat, head-major: head h's directions are entries h * len(directions) ... (one state each)
        self.directions = nn.ModuleList([
            VariateDirection(self.d_inner, d_state, self.dt_rank, dt_range, (dt_min_variate, dt_max_variate),
                             tied_coupling)
            for dt_range in self.heads.values() for _ in directions])
        self.reversed = directions * len(self.heads)
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, dim, bias=bias)

    # -- state
    def init_state(self, batch_size: int, device=None, dtype=None, num_variates: int | None = None) -> State:
        """``(conv cache [B, V, E, d_conv - 1], one 2-D SSM state [B, V, 2, E, N] per head and direction)``;
        ``V`` = ``num_variates``, else the constructor's, else 1."""
        v = num_variates or self.num_variates or 1
        dtype = dtype or torch.get_default_dtype()
        ssm_dtype = torch.promote_types(dtype, torch.float32)
        conv = torch.zeros(batch_size, v, self.d_inner, self.d_conv - 1, device=device, dtype=dtype)
        return (conv, *(torch.zeros(batch_size, v, 2, self.d_inner, self.d_state, device=device, dtype=ssm_dtype)
                        for _ in self.directions))

    # -- the interface
    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``x [B, T, C]`` or ``[B, V, T, C]`` -> ``(y of x's shape, state after it)``."""
        sequence = x.ndim == 3
        if sequence:
            self.check_input(x)
            x = x.unsqueeze(1)
        elif x.ndim != 4 or x.shape[-1] != self.dim:
            raise InputError(f"Chimera expects x of shape [batch, time, channels] or [batch, variates, time, channels] "
                             f"with {self.dim} channels, got {list(x.shape)}")
        batch, v, t, _ = x.shape
        if state is None:
            state = self.init_state(batch, device=x.device, dtype=x.dtype, num_variates=v)
        else:
            self._check_state_for(state, batch, v)
        if x.numel() == 0:  # no time steps, variates or batch: the state as it was
            empty = x.new_zeros(x.shape)
            return (empty.squeeze(1) if sequence else empty), state
        u, z = self.in_proj(x).chunk(2, dim=-1)  # [B, V, T, E] each
        cache = state[0].reshape(batch * v, self.d_inner, self.d_conv - 1)
        u, cache = self.conv(u.reshape(batch * v, t, self.d_inner), cache)
        y, ssm_states = self._ssm(u.view(batch, v, t, self.d_inner), z, state[1:], backend="auto")
        y = y.squeeze(1) if sequence else y
        return y, (cache.view(batch, v, self.d_inner, self.d_conv - 1), *ssm_states)

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One time column: ``x_t [B, C]`` (built with ``num_variates=None``) or ``[B, V, C]`` (built
        with ``num_variates=V``) -> ``(y_t`` of x_t's shape, ``state)``; the one-column kernel."""
        if self.num_variates is None:
            self.check_input(x_t, 2)
        elif list(x_t.shape[1:]) != [self.num_variates, self.dim]:
            raise InputError(f"Chimera (built with num_variates={self.num_variates}) expects one time column x_t of "
                             f"shape [batch, {self.num_variates}, {self.dim}] ({self.dim} channels), "
                             f"got {list(x_t.shape)}")
        self.check_state(state, x_t.shape[0])
        column = x_t.unsqueeze(1) if self.num_variates is None else x_t  # [B, V, C]
        batch, v, _ = column.shape
        u, z = self.in_proj(column).chunk(2, dim=-1)  # [B, V, E] each
        u, cache = self.conv.step(u.reshape(batch * v, self.d_inner),
                                  state[0].reshape(batch * v, self.d_inner, self.d_conv - 1))
        y, ssm_states = self._ssm(u.view(batch, v, 1, self.d_inner), z.unsqueeze(2), state[1:], backend="recurrent")
        y = y.squeeze(2)
        y = y.squeeze(1) if self.num_variates is None else y
        return y, (cache.view(batch, v, self.d_inner, self.d_conv - 1), *ssm_states)

    # -- the layer
    def _ssm(self, u: torch.Tensor, z: torch.Tensor, ssm_states: State, backend: str) -> tuple[torch.Tensor, State]:
        """``u, z [B, V, T, E]`` (after the convolution) and one state per head and direction ->
        ``(out_proj(y) [B, V, T, C], new states)``."""
        y = u * self.D
        new_states = []
        for direction, reverse, ssm_state in zip(self.directions, self.reversed, ssm_states):
            y_direction, ssm_state = self._scan(direction, u, ssm_state, reverse, backend)
            y = y + y_direction
            new_states.append(ssm_state)
        return self.out_proj(y * F.silu(z)), tuple(new_states)

    def _scan(self, direction: VariateDirection, u: torch.Tensor, ssm_state: torch.Tensor, reverse: bool,
              backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One direction of the 2-D SSM: ``u [B, V, T, E]``, ``ssm_state [B, V, 2, E, N]`` (natural
        variate order) -> ``(y [B, V, T, E], new state)``."""
        batch, v = u.shape[:2]
        flip = reverse and v > 1 and self.cross_variate  # independent variates need no order

        def to_scan(tensor: torch.Tensor) -> torch.Tensor:
            """The grid as the kernel sees it: reversed variates, or each variate its own grid."""
            tensor = tensor.flip(1) if flip else tensor
            return tensor if self.cross_variate else tensor.reshape(batch * v, 1, *tensor.shape[2:])

        def from_scan(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor if self.cross_variate else tensor.reshape(batch, v, *tensor.shape[2:])
            return tensor.flip(1) if flip else tensor

        u_scan = to_scan(u)
        selection = tuple(to_scan(s) for s in direction.selection(u))
        y, new_state = scan2d(u_scan, *selection[:2], *direction.transitions(), *selection[2:],
                              initial_state=to_scan(ssm_state), output_final_state=True, backend=backend)
        return from_scan(y), from_scan(new_state)

    # -- checks
    def _check_state_for(self, state: State, batch_size: int, num_variates: int) -> None:
        """``check_state`` for a grid of ``num_variates`` variates."""
        want = [list(s.shape) for s in self.init_state(batch_size, device="meta", num_variates=num_variates)]
        got = [list(s.shape) for s in state] if isinstance(state, tuple) else type(state).__name__
        if got != want:
            raise InputError(f"Chimera: state shapes {got} do not fit a batch of {batch_size} with {num_variates} "
                             f"variates; expected {want} (a state from another batch size or grid?)")


def _time_step_ranges(heads: Mapping[str, Sequence[float]] | None,
                      default: tuple[float, float]) -> dict[str, tuple[float, float]]:
    """``heads`` as ``{name: (dt_min, dt_max)}``, checked; ``None`` -> one head of ``default``."""
    if heads is None:
        return {"time": default}
    if not isinstance(heads, Mapping) or not heads:
        raise InputError(f"Chimera: heads={heads!r}; expected a mapping of head names to (dt_min, dt_max), "
                         "e.g. {trend: [0.001, 0.01], seasonal: [0.1, 1.0]}")
    ranges = {}
    for name, dt_range in heads.items():
        try:
            low, high = (float(step) for step in dt_range)
        except (TypeError, ValueError):
            low = high = float("nan")
        if isinstance(dt_range, (str, bytes)) or not 0 < low <= high:
            raise InputError(f"Chimera: head '{name}' has steps {dt_range!r}; expected (dt_min, dt_max) with "
                             "0 < dt_min <= dt_max")
        ranges[str(name)] = (low, high)
    return ranges
