"""HGRN-2: the gated linear RNN with state expansion of Qin, Yang, Sun, Shen, Li, Sun & Zhong,
2024, "HGRN2: Gated Linear RNNs with State Expansion".

For ``x [B, T, C]`` with ``H`` heads, each with a forget gate of ``E = expand_ratio`` channels
and an input of ``V = C / H`` channels::

    f_t = β + (1 - β) ⊙ σ(x_t W_f + b_f)       # forget gate in [β, 1): [B, T, H, E]
    i_t = SiLU(x_t W_i + b_i)                   # input:                 [B, T, H, V]
    o_t = σ(x_t W_o + b_o)                      # output gate:           [B, T, H, E]
    S_t = diag(f_t) S_{t-1} + (1 - f_t) i_tᵀ    # outer-product state expansion, S [B, H, E, V]
    h_t = o_tᵀ S_t                              # [B, T, H, V]
    y   = RMSNorm_head(h) W_out + b_out         # [B, T, C]

HGRN1's element-wise recurrence ``h_t = f_t ⊙ h_{t-1} + (1 - f_t) ⊙ i_t`` becomes a matrix-valued
one by replacing the product of the input gate ``1 - f_t`` with the input by an outer product,
which needs no new parameter. Read as linear attention, the output gate is the query, the tied
input gate ``1 - f_t`` the key, ``i_t`` the value and ``log f_t`` a per-key log decay: the layer is
``seqapps.kernels.gated_linear_attention(o, 1 - f, i, log f, scale=1)`` (``gla_step`` in
``step``). ``log f`` and ``1 - f = (1 - β) σ(-z)`` are computed from the logit ``z`` directly,
never as ``1 - exp(log f)``, so gates near 1 keep their precision.

The lower bound ``β`` (``lower_bound``) is the paper's hierarchy: 0 in the first layer, growing
with depth so that upper layers keep longer memories. In the paper the bounds of all layers come
from one learnt table shared by the stack (a cumulative softmax over layers, ``l / L`` for
layer ``l`` of ``L`` at initialisation); a mixer knows no stack, so here ``β`` is a fixed number
per layer: given explicitly, or, when left ``None``, ``layer_idx / num_layers`` from the stack
(which passes every mixer its position), the paper's initial schedule. With ``β = 0`` the key is ``σ(-z)`` and ``log f = logsigmoid(z)``.

State: ``(S [B, H, E, V])`` in float32 (float64 for float64).

Defaults: ``expand_ratio=8`` and ``num_heads = C / expand_ratio`` (the paper's language models
use ``expand_ratio=128``; 8 keeps ``dim=32`` working with 4 heads of ``E = V = 8``), biases on
the projections (as the authors' layer), ``lower_bound=0`` (a first layer).
Left out: the learnt, stack-wide lower-bound table (see above); the norm is an RMSNorm per head
(as flash-linear-attention's HGRN-2 layer) where the authors' code normalises the whole width
with a LayerNorm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqapps.backbones.mixer import Mixer, State, register_mixer
from seqapps.errors import InputError
from seqapps.kernels import gated_linear_attention, gla_step


@register_mixer("hgrn2")
class HGRN2(Mixer):
    """HGRN-2 token mixer; ``x [B, T, C] -> y [B, T, C]``.

    Args:
        dim: model width ``C``.
        expand_ratio: forget-gate (key) channels per head ``E``; the state of a head is ``E × V``.
        num_heads: heads ``H`` (default ``C / expand_ratio``, the paper's); must divide ``C``.
        lower_bound: ``β`` in ``[0, 1)``, the smallest forget gate (the paper's layer-dependent
            bound: 0 for the first layer, larger for deeper ones); ``None``: ``layer_idx /
            num_layers`` when the stack gives them, else 0.
        layer_idx, num_layers: this layer's position in its stack (set by the stack).
        norm_eps: epsilon of the per-head output RMSNorm.
    """

    def __init__(self, dim: int, expand_ratio: int = 8, num_heads: int | None = None,
                 lower_bound: float | None = None, norm_eps: float = 1e-5, layer_idx: int | None = None,
                 num_layers: int | None = None):
        super().__init__(dim)
        if lower_bound is None:
            lower_bound = layer_idx / num_layers if layer_idx is not None and num_layers else 0.0
        if num_heads is None:
            if expand_ratio < 1 or dim % expand_ratio:
                raise InputError(f"hgrn2: expand_ratio={expand_ratio} must divide dim={dim} "
                                 f"(num_heads = dim / expand_ratio), or give num_heads")
            num_heads = dim // expand_ratio
        if expand_ratio < 1 or num_heads < 1 or dim % num_heads:
            raise InputError(f"hgrn2: num_heads={num_heads} must divide dim={dim} and expand_ratio={expand_ratio} "
                             f"be >= 1")
        if not 0.0 <= lower_bound < 1.0:
            raise InputError(f"hgrn2: lower_bound={lower_bound}; expected 0 <= lower_bound < 1")
        self.num_heads, self.expand_ratio, self.head_v_dim = num_heads, expand_ratio, dim // num_heads
        self.lower_bound = float(lower_bound)
        gate_dim = num_heads * expand_ratio
        self.forget_proj = nn.Linear(dim, gate_dim)  # W_f, b_f
        self.input_proj = nn.Linear(dim, dim)  # W_i, b_i
        self.output_gate_proj = nn.Linear(dim, gate_dim)  # W_o, b_o
        self.out_norm = nn.RMSNorm(self.head_v_dim, eps=norm_eps)
        self.out_proj = nn.Linear(dim, dim)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or torch.get_default_dtype()
        memory = torch.zeros(batch_size, self.num_heads, self.expand_ratio, self.head_v_dim, device=device,
                             dtype=torch.promote_types(dtype, torch.float32))
        return (memory,)

    def forget_gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [..., C]`` -> ``(log f, 1 - f)``, each ``[..., H, E]``, with
        ``f = β + (1 - β) σ(x W_f + b_f)``, computed stably from the logit."""
        logit = self.forget_proj(x).unflatten(-1, (self.num_heads, self.expand_ratio))
        beta = self.lower_bound
        if beta == 0.0:
            return F.logsigmoid(logit), torch.sigmoid(-logit)
        log_forget = torch.logaddexp(torch.full_like(logit, math.log(beta)),
                                     math.log1p(-beta) + F.logsigmoid(logit))
        return log_forget, (1.0 - beta) * torch.sigmoid(-logit)

    def _gates(self, x: torch.Tensor):
        """``x [..., C]`` -> query ``o [..., H, E]``, key ``1 - f [..., H, E]``, value ``i [..., H, V]``,
        ``log f [..., H, E]``."""
        log_forget, key = self.forget_gate(x)
        query = torch.sigmoid(self.output_gate_proj(x)).unflatten(-1, (self.num_heads, self.expand_ratio))
        value = F.silu(self.input_proj(x)).unflatten(-1, (self.num_heads, self.head_v_dim))
        return query, key, value, log_forget

    def _output(self, h: torch.Tensor) -> torch.Tensor:
        """``h [..., H, V]`` -> ``RMSNorm_head(h) W_out + b_out [..., C]``."""
        return self.out_proj(self.out_norm(h).flatten(-2))

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``x [B, T, C]`` (+ state) -> ``(y [B, T, C], state)``."""
        self.check_input(x)
        if state is not None:
            self.check_state(state, x.shape[0])
        query, key, value, log_forget = self._gates(x)
        h, memory = gated_linear_attention(query, key, value, log_forget, scale=1.0,
                                           initial_state=None if state is None else state[0],
                                           output_final_state=True)
        return self._output(h.to(x.dtype)), (memory,)

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """``x_t [B, C]`` -> ``(y_t [B, C], state)``; the state is ``init_state``'s."""
        self.check_input(x_t, 2)
        self.check_state(state, x_t.shape[0])
        memory = state[0]
        acc = memory.dtype
        query, key, value, log_forget = (t.to(acc) for t in self._gates(x_t))
        h, memory = gla_step(query, key, value, log_forget, memory, 1.0)
        return self._output(h.to(x_t.dtype)), (memory,)
