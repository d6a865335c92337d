"""Gated DeltaNet: the delta rule with a Mamba-2-style decay per head (Yang, Kautz & Hatamizadeh,
2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule").

The layer is DeltaNet's (``deltanet.py``: q, k, v projections with short convolutions and SiLU,
L2-normalised q and k, ``β = sigmoid(W_β x)``) with a forgetting gate and an output gate::

    α_t = exp(g_t),  g_t = -exp(A_log) · softplus(W_α x_t + dt_bias)      # [B, T, H], α in (0, 1]
    S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ                  # S [B, H, K, V]
    o_t = K^{-1/2} · S_tᵀ q_t
    y   = W_o (RMSNorm(o) · silu(W_g x))                                    # per head

The gate α lets the memory forget quickly when the context switches (Mamba-2's strength) while
the delta rule edits single associations precisely (DeltaNet's). ``g`` goes to
``seqapps.kernels.delta_rule`` in log space, so the chunked kernel never forms a ratio of decays
that could overflow. ``A`` starts uniform in [1, 16] and ``softplus(dt_bias)`` log-uniform in
[0.001, 0.1] (Mamba-2's initialisation). ``allow_neg_eigval=True`` gives β in [0, 2] as in
DeltaNet (Grazzi et al., 2024).

Defaults follow the paper's layer (as released in flash-linear-attention, where 6 heads of key
width 256 sit on a width of 2048): key width ``0.75 · C``, value width ``2 · C``, here over 4
heads, output gate on. At ``dim=32``: ``K = 6``, ``V = 16``.

State: as DeltaNet's, ``(q, k, v conv caches, memory S [B, H, K, V])``. Left out: the hybrid
stacks of the paper (Gated DeltaNet-H1/H2 with sliding-window attention), which are stacks of
mixers rather than one mixer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqapps.backbones.mixer import register_mixer
from seqapps.backbones.mixers.deltanet import DeltaNet
from seqapps.backbones.mixers.mamba import step_size_bias


@register_mixer("gated_deltanet")
class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet layer; ``x [B, T, C] -> y [B, T, C]``.

    Args:
        dim: model width ``C``.
        num_heads: heads ``H`` (default 4).
        expand_k: key width ``H·K = expand_k · C`` (paper: 0.75).
        expand_v: value width ``H·V = expand_v · C`` (paper: 2).
        conv_size: width of the causal depthwise convolutions on q, k, v (paper: 4).
        use_gate: output gate ``silu(W_g x)`` after the per-head RMSNorm (paper: on).
        allow_neg_eigval: β in [0, 2] instead of [0, 1] (Grazzi et al., 2024).
        dt_min, dt_max: range of the initial ``softplus(dt_bias)`` (Mamba-2: 0.001, 0.1).
        norm_eps: epsilon of the output RMSNorm.
        chunk_size: chunk length of the parallel kernel.
    """

    def __init__(self, dim: int, num_heads: int = 4, expand_k: float = 0.75, expand_v: float = 2.0,
                 conv_size: int = 4, use_gate: bool = True, allow_neg_eigval: bool = False,
                 dt_min: float = 0.001, dt_max: float = 0.1, norm_eps: float = 1e-5, chunk_size: int = 64):
        super().__init__(dim, num_heads=num_heads, expand_k=expand_k, expand_v=expand_v, conv_size=conv_size,
                         use_gate=use_gate, allow_neg_eigval=allow_neg_eigval, norm_eps=norm_eps,
                         chunk_size=chunk_size)
        self.decay_proj = nn.Linear(dim, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(1.0, 16.0)))  # [H]
        self.dt_bias = nn.Parameter(step_size_bias(num_heads, dt_min, dt_max))  # [H]

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, C]`` -> ``g = log α [B, T, H]`` (≤ 0), computed in float32 at least."""
        acc = torch.promote_types(x.dtype, torch.float32)
        rate = F.softplus(self.decay_proj(x).to(acc) + self.dt_bias.to(acc))
        return -torch.exp(self.A_log.to(acc)) * rate
