"""DeltaNet: linear attention whose memory is updated by the delta rule (Yang et al., 2024,
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length").

The layer, for ``x [B, T, C]``, ``H`` heads of key width ``K`` and value width ``V``::

    q, k, v = silu(conv(W_q x)), silu(conv(W_k x)), silu(conv(W_v x))   # [B, T, H, K|K|V]
    q, k    = q / |q|, k / |k|                   # L2-normalised per head
    β       = sigmoid(W_β x)                     # [B, T, H]: the writing strength
    S_t     = (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ    # S [B, H, K, V]
    o_t     = K^{-1/2} · S_tᵀ q_t
    y       = W_o RMSNorm(o)                     # per head; · silu(W_g x) with use_gate=True

Each token first reads what the memory holds for its key (``S_{t-1}ᵀ k_t``) and replaces it by
a β-mix of the old and the new value, a step of online regression instead of linear
attention's pure addition. The whole sequence runs through ``seqapps.kernels.delta_rule`` (the
chunked WY/UT form on the CPU), ``step`` through ``delta_rule_step``.

``allow_neg_eigval=True`` doubles β to ``2·sigmoid(W_β x)`` in [0, 2] (Grazzi et al., 2024,
"Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues"): the transition
``I - β k kᵀ`` then has the eigenvalue ``1 - β`` in [-1, 1], a reflection at β = 2, which lets
one layer track parity.

Defaults follow the paper's layer (and flash-linear-attention's): 4 heads, ``K = V = C / 4``
(``expand_k = expand_v = 1``), short convolutions of width 4 without bias, SiLU, L2-normalised
q/k, sigmoid β, output RMSNorm per head without gate. At ``dim=32``: ``K = V = 8``.

:class:`DeltaNet` also holds what Gated DeltaNet (``gated_deltanet.py``) shares: a subclass adds a
per-head log decay by overriding :meth:`DeltaNet.log_decay`.

State: ``(q conv cache [B, H·K, w-1], k conv cache [B, H·K, w-1], v conv cache [B, H·V, w-1],
memory S [B, H, K, V])``, the memory in float32 (float64 for float64). Left out: the residual
norm around the layer (the block's job) and the paper's ablation variants (ReLU/ELU+1 feature
maps, sum normalisation, no convolution), which are not the recommended layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqapps.backbones.layers import GatedRMSNorm, ShortConvolution
from seqapps.backbones.mixer import Mixer, State, register_mixer
from seqapps.errors import InputError
from seqapps.kernels import delta_rule, delta_rule_step


def heads_width(name: str, dim: int, expand: float, num_heads: int) -> int:
    """The per-head width ``expand · dim / num_heads``; one line if it is not a whole number."""
    total = expand * dim
    if total != int(total) or int(total) % num_heads or total < num_heads:
        raise InputError(f"{name}={expand} at dim={dim} gives {total} channels, which do not split into "
                         f"num_heads={num_heads} heads; expected {name} · dim to be a multiple of num_heads")
    return int(total) // num_heads


@register_mixer("deltanet")
class DeltaNet(Mixer):
    """DeltaNet layer; ``x [B, T, C] -> y [B, T, C]``.

    Args:
        dim: model width ``C``.
        num_heads: heads ``H`` (flash-linear-attention's DeltaNet default: 4).
        expand_k: key width ``H·K = expand_k · C`` (paper: 1).
        expand_v: value width ``H·V = expand_v · C`` (paper: 1).
        conv_size: width of the causal depthwise convolutions on q, k, v (paper: 4).
        use_gate: output gate ``silu(W_g x)`` after the RMSNorm (DeltaNet: off; Gated DeltaNet: on).
        allow_neg_eigval: β in [0, 2] instead of [0, 1] (Grazzi et al., 2024).
        norm_eps: epsilon of the output RMSNorm.
        chunk_size: chunk length of the parallel kernel.
    """

    def __init__(self, dim: int, num_heads: int = 4, expand_k: float = 1.0, expand_v: float = 1.0,
                 conv_size: int = 4, use_gate: bool = False, allow_neg_eigval: bool = False,
                 norm_eps: float = 1e-5, chunk_size: int = 64):
        super().__init__(dim)
        self.num_heads = num_heads
        self.head_k_dim = heads_width("expand_k", dim, expand_k, num_heads)
        self.head_v_dim = heads_width("expand_v", dim, expand_v, num_heads)
        self.use_gate, self.allow_neg_eigval, self.chunk_size = use_gate, allow_neg_eigval, chunk_size
        self.scale = self.head_k_dim ** -0.5
        key_dim, value_dim = num_heads * self.head_k_dim, num_heads * self.head_v_dim

        self.q_proj = nn.Linear(dim, key_dim, bias=False)
        self.k_proj = nn.Linear(dim, key_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.q_conv = ShortConvolution(key_dim, conv_size, activation=True, bias=False)
        self.k_conv = ShortConvolution(key_dim, conv_size, activation=True, bias=False)
        self.v_conv = ShortConvolution(value_dim, conv_size, activation=True, bias=False)
        self.beta_proj = nn.Linear(dim, num_heads, bias=False)
        self.gate_proj = nn.Linear(dim, value_dim, bias=False) if use_gate else None
        self.out_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps)
        self.out_proj = nn.Linear(value_dim, dim, bias=False)

    # -- what subclasses change
    def log_decay(self, x: torch.Tensor) -> torch.Tensor | None:
        """The per-head log decay ``g [B, T, H]`` of the memory (``None``: no decay, DeltaNet)."""
        return None

    def write_strength(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, C]`` -> ``β [B, T, H]``, in [0, 1], or in [0, 2] with ``allow_neg_eigval``."""
        beta = torch.sigmoid(self.beta_proj(x))
        return 2.0 * beta if self.allow_neg_eigval else beta

    # -- shared by forward and step
    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or torch.get_default_dtype()
        memory = torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim, device=device,
                             dtype=torch.promote_types(dtype, torch.float32))
        return (self.q_conv.init_cache(batch_size, device, dtype), self.k_conv.init_cache(batch_size, device, dtype),
                self.v_conv.init_cache(batch_size, device, dtype), memory)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H·D]`` -> ``[B, T, H, D]``."""
        return x.unflatten(-1, (self.num_heads, -1))

    def _read_inputs(self, x: torch.Tensor, caches: tuple[torch.Tensor | None, ...]):
        """``x [B, T, C]`` -> ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``beta [B, T, H]``,
        ``g [B, T, H]`` or ``None``, and the three new convolution caches."""
        q, q_cache = self.q_conv(self.q_proj(x), caches[0])
        k, k_cache = self.k_conv(self.k_proj(x), caches[1])
        v, v_cache = self.v_conv(self.v_proj(x), caches[2])
        q = F.normalize(self._heads(q), dim=-1, eps=1e-6)
        k = F.normalize(self._heads(k), dim=-1, eps=1e-6)
        return q, k, self._heads(v), self.write_strength(x), self.log_decay(x), (q_cache, k_cache, v_cache)

    def _write_output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``o [B, T, H, V]`` (and ``x [B, T, C]`` for the gate) -> ``y [B, T, C]``."""
        gate = None if self.gate_proj is None else self._heads(self.gate_proj(x))
        return self.out_proj(self.out_norm(o.to(x.dtype), gate).flatten(-2))

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``x [B, T, C]`` (+ state) -> ``(y [B, T, C], state)``."""
        self.check_input(x)
        if state is not None:
            self.check_state(state, x.shape[0])
        caches, memory = (None, None, None), None
        if state is not None:
            caches, memory = state[:3], state[3]
        q, k, v, beta, g, caches = self._read_inputs(x, caches)
        o, memory = delta_rule(q, k, v, beta, g, scale=self.scale, initial_state=memory,
                               output_final_state=True, chunk_size=self.chunk_size)
        return self._write_output(o, x), (*caches, memory)

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """``x_t [B, C]`` -> ``(y_t [B, C], state)``; the state is ``init_state``'s."""
        self.check_input(x_t, 2)
        self.check_state(state, x_t.shape[0])
        memory = state[3]
        x = x_t.unsqueeze(1)  # one token: [B, 1, C]
        q, k, v, beta, g, caches = self._read_inputs(x, state[:3])
        acc = memory.dtype
        o_t, memory = delta_rule_step(q[:, 0].to(acc), k[:, 0].to(acc), v[:, 0].to(acc), beta[:, 0].to(acc),
                                      None if g is None else g[:, 0].to(acc), memory, self.scale)
        return self._write_output(o_t.unsqueeze(1), x)[:, 0], (*caches, memory)
