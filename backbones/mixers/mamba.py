"""Mamba: the selective state-space layer (S6) of Gu & Dao, 2023, "Mamba: Linear-Time Sequence
Modeling with Selective State Spaces".

The layer, for ``x [B, T, C]`` and ``E = expand · C`` inner channels::

    u, z   = in_proj(x)                      # [B, T, E] each: the SSM input and its gate
    u      = silu(causal depthwise conv(u))  # kernel d_conv, over time
    dt_low, B, C = x_proj(u)                 # [B, T, R], [B, T, N], [B, T, N]   (R = dt_rank)
    Δ      = softplus(dt_proj(dt_low))       # [B, T, E]: a step size per channel and token
    h_t    = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t        # h [B, E, N], A = -exp(A_log) [E, N]
    y_t    = (C_t · h_t + D u_t) · silu(z_t)
    out    = out_proj(y)                     # [B, T, C]

``B``, ``C`` and ``Δ`` depend on the input (the "selection"); ``A`` is a learned diagonal,
initialised S4D-real (``A[e, n] = -(n + 1)``), and ``dt_proj``'s bias is the inverse softplus of
step sizes drawn log-uniformly in ``[dt_min, dt_max]``, so ``Δ`` starts in that range.

``negative_eigenvalues=True`` is the variant of Grazzi et al., 2024 ("Unlocking State-Tracking
in Linear RNNs Through Negative Eigenvalues"): the transition becomes ``2·exp(Δ A) - 1``, whose
eigenvalues cover ``[-1, 1]`` instead of ``(0, 1]``, which lets one layer track parity.

State: ``(conv cache [B, E, d_conv - 1], ssm state h [B, E, N])``; the SSM state is kept in
float32 (float64 for float64). Defaults are the paper's (``expand=2``, ``d_conv=4``,
``d_state=16``, ``dt_rank = ceil(C / 16)``); at ``dim=32`` that is ``E = 64``, ``R = 2``.

Left out: the fused CUDA kernel (``seqapps.kernels.selective_scan`` picks Triton on CUDA and
the chunked PyTorch form elsewhere) and the residual norm around the layer (the block's job).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqapps.backbones.layers import ShortConvolution
from seqapps.backbones.mixer import Mixer, State, register_mixer
from seqapps.errors import InputError
from seqapps.kernels import selective_scan, selective_scan_step


def step_size_bias(channels: int, dt_min: float, dt_max: float, dt_floor: float = 1e-4) -> torch.Tensor:
    """The bias ``b [channels]`` with ``softplus(b)`` log-uniform in ``[dt_min, dt_max]`` (floored
    at ``dt_floor``): Mamba's step-size initialisation, shared with Mamba-2."""
    if not 0 < dt_min <= dt_max:
        raise InputError(f"dt_min={dt_min}, dt_max={dt_max}; expected 0 < dt_min <= dt_max")
    log_dt = torch.rand(channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = torch.exp(log_dt).clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


@register_mixer("mamba")
class Mamba(Mixer):
    """Mamba (S6) layer; ``x [B, T, C] -> y [B, T, C]``.

    Args:
        dim: model width ``C``.
        d_state: state size ``N`` per channel (paper: 16).
        d_conv: width of the causal depthwise convolution (paper: 4).
        expand: inner width ``E = expand · C`` (paper: 2).
        dt_rank: rank ``R`` of the step-size projection; ``None`` = ``ceil(C / 16)`` (paper).
        dt_min, dt_max: range of the initial step sizes (paper: 1e-3, 0.1).
        negative_eigenvalues: transition ``2·exp(Δ A) - 1`` (eigenvalues in [-1, 1], Grazzi et
            al., 2024) instead of ``exp(Δ A)`` (in (0, 1]).
        bias: bias in ``in_proj`` and ``out_proj`` (paper: none).
        conv_bias: bias in the short convolution (paper: yes).
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, dt_min: float = 1e-3, dt_max: float = 0.1,
                 negative_eigenvalues: bool = False, bias: bool = False, conv_bias: bool = True):
        super().__init__(dim)
        self.d_state, self.d_conv = d_state, d_conv
        self.d_inner = expand * dim
        self.dt_rank = math.ceil(dim / 16) if dt_rank is None else dt_rank
        self.negative_eigenvalues = negative_eigenvalues

        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=bias)
        self.conv = ShortConvolution(self.d_inner, d_conv, activation=True, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        with torch.no_grad():
            self.dt_proj.bias.copy_(step_size_bias(self.d_inner, dt_min, dt_max))
        # S4D-real: A[e, n] = -(n + 1) for every channel e.
        s4d_real = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(s4d_real))  # [E, N]
        self.D = nn.Parameter(torch.ones(self.d_inner))  # [E]
        self.out_proj = nn.Linear(self.d_inner, dim, bias=bias)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or torch.get_default_dtype()
        return (self.conv.init_cache(batch_size, device, dtype),
                torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                            dtype=torch.promote_types(dtype, torch.float32)))

    def _selection(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``u [..., E]`` -> ``(dt before bias and softplus [..., E], B [..., N], C [..., N])``."""
        dt_low, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt_low, self.dt_proj.weight), B, C

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``x [B, T, C]`` (+ state) -> ``(y [B, T, C], state)``."""
        self.check_input(x)
        if state is not None:
            self.check_state(state, x.shape[0])
        conv_cache, ssm_state = (None, None) if state is None else state
        u, z = self.in_proj(x).chunk(2, dim=-1)  # [B, T, E] each
        u, conv_cache = self.conv(u, conv_cache)
        dt, B, C = self._selection(u)
        y, ssm_state = selective_scan(u, dt, -torch.exp(self.A_log), B, C, self.D, z,
                                      delta_bias=self.dt_proj.bias, delta_softplus=True,
                                      negative_eigenvalues=self.negative_eigenvalues,
                                      initial_state=ssm_state, output_final_state=True)
        return self.out_proj(y), (conv_cache, ssm_state)

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """``x_t [B, C]`` -> ``(y_t [B, C], state)``; the state is ``init_state``'s."""
        self.check_input(x_t, 2)
        self.check_state(state, x_t.shape[0])
        conv_cache, ssm_state = state
        u, z = self.in_proj(x_t).chunk(2, dim=-1)  # [B, E] each
        u, conv_cache = self.conv.step(u, conv_cache)
        dt, B, C = self._selection(u)
        acc = ssm_state.dtype
        dt = F.softplus((dt + self.dt_proj.bias).to(acc))
        y, ssm_state = selective_scan_step(u.to(acc), dt, -torch.exp(self.A_log.to(acc)), B.to(acc), C.to(acc),
                                           self.D.to(acc), z.to(acc), ssm_state, self.negative_eigenvalues)
        return self.out_proj(y.to(x_t.dtype)), (conv_cache, ssm_state)
