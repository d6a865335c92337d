"""Mamba-2: the SSD layer (state space duality) of Dao & Gu, 2024, "Transformers are SSMs:
Generalized Models and Efficient Algorithms Through Structured State Space Duality".

The layer, for ``x [B, T, C]``, ``E = expand · C`` inner channels split into ``H = E / P``
heads of ``P = headdim`` channels, state size ``N`` and ``G = ngroups`` groups for ``B``/``C``::

    z, xBC, dt = in_proj(x)                   # [B, T, E], [B, T, E + 2GN], [B, T, H]
    u, B, C    = silu(causal depthwise conv(xBC))   # u [B, T, H, P]; B, C [B, T, G, N]
    Δ          = softplus(dt + dt_bias)       # [B, T, H]: one step size per head and token
    h_t        = exp(Δ_t A) h_{t-1} + B_t (Δ_t u_t)ᵀ     # per head: h [N, P], A a scalar < 0
    y_t        = h_tᵀ C_t + D u_t             # [B, T, H, P]
    out        = out_proj(RMSNorm_G(y · silu(z)))        # [B, T, C]

Unlike Mamba (S6), ``A`` is one scalar per head, the input-dependent ``B``/``C`` are produced
in parallel with ``u`` by ``in_proj`` (not from ``u``), and they go through the short
convolution with it; the output is gated then normalised per group (``norm_before_gate=False``
in the reference code: ``RMSNorm(y · silu(z))`` over each group of ``E / G`` channels).

**SSD as gated linear attention.** With a scalar decay per head the recurrence is exactly
``seqapps.kernels.gated_linear_attention``'s scalar path,
``S_t = exp(g_t) S_{t-1} + k_t v_tᵀ``, ``o_t = scale · S_tᵀ q_t`` with state ``S [N, P]``:

* ``q = C`` and ``k = B`` (each head reading its group's ``[N]`` vectors): SSD's "attention"
  scores are ``C_t · B_s``, as linear attention's are ``q_t · k_s``;
* ``v = Δ · u`` (``[B, T, H, P]``): the discretised input ``Δ_t B_t u_t`` is ``k_t v_tᵀ`` with
  the step size folded into the value;
* ``g = Δ · A`` (``[B, T, H]``, ``≤ 0``): the log of the transition ``exp(Δ_t A)``;
* ``scale = 1`` (SSD has no ``1/√N``), and the ``D u`` skip is added after the kernel.

So the chunked (matmul) form of the kernel is SSD's block decomposition, and ``gla_step`` its
one-token recurrence. State: ``(conv cache [B, E + 2GN, d_conv - 1], S [B, H, N, P])``, ``S``
in float32 (float64 for float64).

Defaults follow the paper (``expand=2``, ``d_conv=4``, ``ngroups=1``, ``A`` drawn in
``[1, 16]``, step sizes in ``[1e-3, 0.1]``) except the sizes, chosen for small models:
``headdim=16`` (paper 64; 4 heads at ``dim=32``) and ``d_state=64`` (paper 64 to 128).

Left out: the fused Triton kernels of the reference code, the optional learnable initial
state and ``dt_limit`` clamp (off by default there), and ``D`` per channel (``D_has_hdim``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqapps.backbones.layers import ShortConvolution
from seqapps.backbones.mixer import Mixer, State, register_mixer
from seqapps.backbones.mixers.mamba import step_size_bias
from seqapps.errors import InputError
from seqapps.kernels import gated_linear_attention, gla_step


@register_mixer("mamba2")
class Mamba2(Mixer):
    """Mamba-2 (SSD) layer; ``x [B, T, C] -> y [B, T, C]``.

    Args:
        dim: model width ``C``.
        d_state: state size ``N`` per head (paper: 64 or 128).
        d_conv: width of the causal depthwise convolution over ``(u, B, C)`` (paper: 4).
        expand: inner width ``E = expand · C`` (paper: 2).
        headdim: channels per head ``P``; ``E`` must be a multiple (paper: 64; default 16).
        ngroups: groups of heads sharing ``B`` and ``C`` (and normalised together; paper: 1).
        A_init_range: ``-A`` is drawn uniformly in this range per head (paper: (1, 16)).
        dt_min, dt_max: range of the initial step sizes (paper: 1e-3, 0.1).
        bias: bias in ``in_proj`` and ``out_proj`` (paper: none).
        conv_bias: bias in the short convolution (paper: yes).
        norm_eps: epsilon of the output RMSNorm.
    """

    def __init__(self, dim: int, d_state: int = 64, d_conv: int = 4, expand: int = 2, headdim: int = 16,
                 ngroups: int = 1, A_init_range: tuple[float, float] = (1.0, 16.0), dt_min: float = 1e-3,
                 dt_max: float = 0.1, bias: bool = False, conv_bias: bool = True, norm_eps: float = 1e-5):
        super().__init__(dim)
        self.d_inner = expand * dim
        if self.d_inner % headdim:
            raise InputError(f"Mamba2: headdim={headdim} does not divide the {self.d_inner} inner channels "
                             f"(expand={expand} x dim={dim}); expected a divisor of {self.d_inner}")
        self.num_heads = self.d_inner // headdim
        if self.num_heads % ngroups:
            raise InputError(f"Mamba2: ngroups={ngroups} does not divide the {self.num_heads} heads")
        low, high = A_init_range
        if not 0 < low <= high:
            raise InputError(f"Mamba2: A_init_range={tuple(A_init_range)}; expected 0 < low <= high")
        self.d_state, self.headdim, self.ngroups, self.norm_eps = d_state, headdim, ngroups, norm_eps
        self.conv_channels = self.d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(dim, self.d_inner + self.conv_channels + self.num_heads, bias=bias)
        self.conv = ShortConvolution(self.conv_channels, d_conv, activation=True, bias=conv_bias)
        self.dt_bias = nn.Parameter(step_size_bias(self.num_heads, dt_min, dt_max))  # [H]
        self.A_log = nn.Parameter(torch.log(torch.empty(self.num_heads).uniform_(low, high)))  # [H]
        self.D = nn.Parameter(torch.ones(self.num_heads))  # [H]
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))  # [E]
        self.out_proj = nn.Linear(self.d_inner, dim, bias=bias)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or torch.get_default_dtype()
        return (self.conv.init_cache(batch_size, device, dtype),
                torch.zeros(batch_size, self.num_heads, self.d_state, self.headdim, device=device,
                            dtype=torch.promote_types(dtype, torch.float32)))

    def _ssd_inputs(self, xBC: torch.Tensor, dt: torch.Tensor):
        """The convolved ``xBC [..., E + 2GN]`` and raw ``dt [..., H]`` -> the GLA operands
        ``(q = C [..., H, N], k = B [..., H, N], v = Δ u [..., H, P], g = Δ A [..., H])`` and
        ``u [..., H, P]`` (for the ``D`` skip)."""
        u, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        u = u.unflatten(-1, (self.num_heads, self.headdim))
        heads_per_group = self.num_heads // self.ngroups
        B, C = (m.unflatten(-1, (self.ngroups, self.d_state)).repeat_interleave(heads_per_group, dim=-2)
                for m in (B, C))
        dt = F.softplus(dt + self.dt_bias)
        return C, B, u * dt.unsqueeze(-1), dt * -torch.exp(self.A_log), u

    def _output(self, y: torch.Tensor, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``y, u [..., H, P]``, gate ``z [..., E]`` -> ``out_proj(RMSNorm_G((y + D u) · silu(z)))``."""
        y = (y + self.D.unsqueeze(-1) * u).flatten(-2).to(z.dtype) * F.silu(z)
        group_size = self.d_inner // self.ngroups
        y = F.rms_norm(y.unflatten(-1, (self.ngroups, group_size)), (group_size,), eps=self.norm_eps)
        return self.out_proj(y.flatten(-2) * self.norm_weight)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``x [B, T, C]`` (+ state) -> ``(y [B, T, C], state)``."""
        self.check_input(x)
        if state is not None:
            self.check_state(state, x.shape[0])
        conv_cache, ssm_state = (None, None) if state is None else state
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_channels, self.num_heads], dim=-1)
        xBC, conv_cache = self.conv(xBC, conv_cache)
        q, k, v, g, u = self._ssd_inputs(xBC, dt)
        y, ssm_state = gated_linear_attention(q, k, v, g, scale=1.0, initial_state=ssm_state,
                                              output_final_state=True)
        return self._output(y, u, z), (conv_cache, ssm_state)

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """``x_t [B, C]`` -> ``(y_t [B, C], state)``; the state is ``init_state``'s."""
        self.check_input(x_t, 2)
        self.check_state(state, x_t.shape[0])
        conv_cache, ssm_state = state
        z, xBC, dt = self.in_proj(x_t).split([self.d_inner, self.conv_channels, self.num_heads], dim=-1)
        xBC, conv_cache = self.conv.step(xBC, conv_cache)
        acc = ssm_state.dtype
        q, k, v, g, u = (t.to(acc) for t in self._ssd_inputs(xBC, dt))
        y, ssm_state = gla_step(q, k, v, g, ssm_state, scale=1.0)
        return self._output(y, u, z), (conv_cache, ssm_state)
