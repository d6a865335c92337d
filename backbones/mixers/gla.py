"""GLA: the gated linear attention layer of Yang, Wang, Shen, Panda & Kim, 2023, "Gated Linear
Attention Transformers with Hardware-Efficient Training".

For ``x [B, T, C]`` with ``H`` heads, keys of ``K = expand_k · C / H`` and values of
``V = expand_v · C / H`` channels per head::

    q, k, v = x W_q, x W_k, x W_v            # [B, T, H, K], [B, T, H, K], [B, T, H, V]
    log α   = logsigmoid(x W_α1 W_α2 + b_α) / τ     # [B, T, H, K]: α = σ(·)^(1/τ), in log space
    S_t     = diag(α_t) S_{t-1} + k_t v_tᵀ    # S [B, H, K, V]
    o_t     = S_tᵀ q_t / √K                   # seqapps.kernels.gated_linear_attention
    y       = (RMSNorm_head(o) ⊙ swish(x W_r + b_r)) W_o      # [B, T, C]

``W_α1 W_α2`` is a rank-16 factorisation and ``τ = 16`` (the paper's gate normaliser, which
keeps the decays near 1: ``α ≥ 2^(-1/16)`` at a logit of 0). With ``use_short_conv`` the
q, k, v projections go through a causal depthwise convolution with SiLU (as in the authors'
flash-linear-attention layer; off by default, as there and in the paper's GLA Transformer).

State: ``(S [B, H, K, V])``, or ``(conv cache [B, 2·H·K + H·V, conv_size - 1], S)`` with the
short convolution; ``S`` is kept in float32 (float64 for float64). The whole sequence runs
through the chunked kernel (Triton on CUDA), ``step`` through ``gla_step``.

Defaults are the paper's: ``num_heads=4``, ``expand_k=0.5``, ``expand_v=1``, gate rank 16,
``τ = 16``; at ``dim=32`` that is ``K = 4``, ``V = 8``.
The per-head output norm is an RMSNorm (the authors' released layer) where the paper writes a
LayerNorm; the paper's weight initialisation is left to PyTorch's defaults.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqapps.backbones.layers import GatedRMSNorm, ShortConvolution
from seqapps.backbones.mixer import Mixer, State, register_mixer
from seqapps.errors import InputError
from seqapps.kernels import gated_linear_attention, gla_step


@register_mixer("gla")
class GLA(Mixer):
    """Gated linear attention layer; ``x [B, T, C] -> y [B, T, C]``.

    Args:
        dim: model width ``C``.
        num_heads: heads ``H``.
        expand_k: key width ``H·K = expand_k · C`` (paper: 0.5).
        expand_v: value width ``H·V = expand_v · C`` (paper: 1).
        gate_low_rank_dim: rank of the forget-gate projection ``W_α1 W_α2`` (paper: 16).
        gate_logit_normalizer: ``τ`` in ``α = σ(·)^(1/τ)`` (paper: 16).
        use_short_conv: causal depthwise convolution (with SiLU) on q, k, v.
        conv_size: its kernel width.
        norm_eps: epsilon of the per-head output RMSNorm.
    """

    def __init__(self, dim: int, num_heads: int = 4, expand_k: float = 0.5, expand_v: float = 1.0,
                 gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0, use_short_conv: bool = False,
                 conv_size: int = 4, norm_eps: float = 1e-5):
        super().__init__(dim)
        key_dim, value_dim = int(dim * expand_k), int(dim * expand_v)
        if num_heads < 1 or key_dim % num_heads or value_dim % num_heads or key_dim == 0 or value_dim == 0:
            raise InputError(f"gla: num_heads={num_heads} must divide the key width {key_dim} (dim·expand_k) and "
                             f"the value width {value_dim} (dim·expand_v), both positive")
        if gate_logit_normalizer <= 0:
            raise InputError(f"gla: gate_logit_normalizer={gate_logit_normalizer}; expected > 0")
        self.num_heads = num_heads
        self.key_dim, self.value_dim = key_dim, value_dim
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.gate_logit_normalizer = gate_logit_normalizer
        self.q_proj = nn.Linear(dim, key_dim, bias=False)
        self.k_proj = nn.Linear(dim, key_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.gate_down = nn.Linear(dim, gate_low_rank_dim, bias=False)  # W_α1
        self.gate_up = nn.Linear(gate_low_rank_dim, key_dim, bias=True)  # W_α2, b_α
        self.output_gate = nn.Linear(dim, value_dim, bias=True)  # W_r, b_r
        self.out_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, dim, bias=False)
        self.conv = (ShortConvolution(2 * key_dim + value_dim, conv_size, activation=True, bias=False)
                     if use_short_conv else None)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or torch.get_default_dtype()
        memory = torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim, device=device,
                             dtype=torch.promote_types(dtype, torch.float32))
        if self.conv is None:
            return (memory,)
        return (self.conv.init_cache(batch_size, device, dtype), memory)

    def _split_heads(self, x: torch.Tensor, qkv: torch.Tensor):
        """``x [..., C]`` and the (convolved) projections ``qkv [..., 2·H·K + H·V]`` -> ``q, k, log α``
        ``[..., H, K]`` and ``v [..., H, V]``."""
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        log_decay = F.logsigmoid(self.gate_up(self.gate_down(x))) / self.gate_logit_normalizer
        heads = (*x.shape[:-1], self.num_heads)
        return (q.reshape(*heads, self.head_k_dim), k.reshape(*heads, self.head_k_dim),
                log_decay.reshape(*heads, self.head_k_dim), v.reshape(*heads, self.head_v_dim))

    def _projections(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)

    def _output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """``o [..., H, V]`` -> ``(RMSNorm(o) ⊙ swish(x W_r + b_r)) W_o [..., C]``."""
        gate = self.output_gate(x).reshape(o.shape)
        return self.o_proj(self.out_norm(o, gate).flatten(-2))

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``x [B, T, C]`` (+ state) -> ``(y [B, T, C], state)``."""
        self.check_input(x)
        if state is not None:
            self.check_state(state, x.shape[0])
        qkv = self._projections(x)
        conv_cache = None if state is None or self.conv is None else state[0]
        memory = None if state is None else state[-1]
        if self.conv is not None:
            qkv, conv_cache = self.conv(qkv, conv_cache)
        q, k, log_decay, v = self._split_heads(x, qkv)
        o, memory = gated_linear_attention(q, k, v, log_decay, initial_state=memory, output_final_state=True)
        y = self._output(x, o.to(x.dtype))
        return y, ((memory,) if self.conv is None else (conv_cache, memory))

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """``x_t [B, C]`` -> ``(y_t [B, C], state)``; the state is ``init_state``'s."""
        self.check_input(x_t, 2)
        self.check_state(state, x_t.shape[0])
        memory = state[-1]
        qkv = self._projections(x_t)
        if self.conv is not None:
            qkv, conv_cache = self.conv.step(qkv, state[0])
        q, k, log_decay, v = self._split_heads(x_t, qkv)
        acc = memory.dtype
        o, memory = gla_step(q.to(acc), k.to(acc), v.to(acc), log_decay.to(acc), memory, self.head_k_dim ** -0.5)
        y = self._output(x_t, o.to(x_t.dtype))
        return y, ((memory,) if self.conv is None else (conv_cache, memory))
