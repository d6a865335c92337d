"""RetNet: the multi-scale retention layer of Sun, Dong, Huang, Ma, Xia, Xue, Wang & Wei, 2023,
"Retentive Network: A Successor to Transformer for Large Language Models".

For ``x [B, T, C]`` with ``H`` heads, keys of ``K = expand_k · C / H`` and values of
``V = expand_v · C / H`` channels per head, token ``n`` at absolute position ``n``::

    q = rotary(x W_q), k = rotary(x W_k)      # [B, T, H, K]: Q ⊙ Θ, K ⊙ Θ̄ with Θ_n = e^{inθ}
    v = x W_v                                 # [B, T, H, V]
    S_n = γ_h S_{n-1} + k_nᵀ v_n,  o_n = q_n S_n / √K     # per head h, S [B, H, K, V]
    y = (swish(x W_g) ⊙ GroupNorm_H(o)) W_o   # [B, T, C]

Each head has its own fixed decay ``γ_h = 1 - 2^(-5-h)``, ``h = 0 .. H-1`` (the "multi-scale"),
so retention is gated linear attention with one scalar log decay per head: the kernel's
matmul-only path (``seqapps.kernels.gated_linear_attention`` with ``g [B, T, H]``); ``step`` runs
``gla_step``. The rotation ``Θ`` is the rotary embedding (``seqapps.backbones.layers``); the
decay ``γ`` is the length-decaying part of xPos, applied by the recurrence itself.

State: ``(S [B, H, K, V], position counter [B])``; ``S`` in float32 (float64 for float64), the
counter in float32 (see ``seqapps.backbones.positions``): the rotation needs each token's
absolute position.

Defaults: ``expand_k=1``, ``expand_v=2`` (the paper's ``W_Q, W_K ∈ R^{d×d}``,
``W_V, W_G ∈ R^{d×2d}``), ``num_heads=4`` (the paper uses heads of 256 key channels, too wide
for small models; at ``dim=32`` that gives ``K = 8``, ``V = 16``), no biases.
Left out, for cause: the paper's three normalisations of the parallel form (dividing ``QKᵀ``
by ``√d``, the decay matrix by its row sums, and the retention scores by
``max(|row sum|, 1)``) are positive factors per token and head, which GroupNorm divides out (up to
its epsilon); the scale ``1/√K`` is kept. The rotary frequencies are ``base^(-2i/K)`` (RoFormer)
rather than torchscale's ``10000^(-linspace(0, 1, K/2))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqapps.backbones.layers import RotaryEmbedding
from seqapps.backbones.mixer import Mixer, State, register_mixer
from seqapps.backbones.positions import init_position_counter, rotate_at, start_positions, token_positions
from seqapps.errors import InputError
from seqapps.kernels import gated_linear_attention, gla_step


def retention_log_decays(num_heads: int) -> torch.Tensor:
    """``log γ_h`` with ``γ_h = 1 - 2^(-5-h)`` for ``h = 0 .. H-1``: ``[H]`` (float32)."""
    return torch.log1p(-torch.exp2(-5.0 - torch.arange(num_heads, dtype=torch.float64))).float()


@register_mixer("retnet")
class RetNet(Mixer):
    """Multi-scale retention; ``x [B, T, C] -> y [B, T, C]``.

    Args:
        dim: model width ``C``.
        num_heads: heads ``H`` (one decay ``γ_h`` each).
        expand_k: query/key width ``H·K = expand_k · C`` (paper: 1); ``K`` must be even (rotary).
        expand_v: value and gate width ``H·V = expand_v · C`` (paper: 2).
        rope_base: base of the rotary frequencies.
        norm_eps: epsilon of the GroupNorm.
    """

    def __init__(self, dim: int, num_heads: int = 4, expand_k: float = 1.0, expand_v: float = 2.0,
                 rope_base: float = 10000.0, norm_eps: float = 1e-5):
        super().__init__(dim)
        key_dim, value_dim = int(dim * expand_k), int(dim * expand_v)
        if (num_heads < 1 or key_dim % num_heads or value_dim % num_heads or value_dim == 0
                or key_dim == 0 or (key_dim // num_heads) % 2):
            raise InputError(f"retnet: num_heads={num_heads} must divide the key width {key_dim} (dim·expand_k) "
                             f"into heads of even size (rotary) and the value width {value_dim} (dim·expand_v)")
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.q_proj = nn.Linear(dim, key_dim, bias=False)
        self.k_proj = nn.Linear(dim, key_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.g_proj = nn.Linear(dim, value_dim, bias=False)
        self.group_norm = nn.GroupNorm(num_heads, value_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, dim, bias=False)
        self.rotary = RotaryEmbedding(self.head_k_dim, base=rope_base)
        self.register_buffer("log_decay", retention_log_decays(num_heads), persistent=False)  # [H]

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or torch.get_default_dtype()
        memory = torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim, device=device,
                             dtype=torch.promote_types(dtype, torch.float32))
        return (memory, init_position_counter(batch_size, device))

    def _heads(self, x: torch.Tensor, positions: torch.Tensor):
        """``x [B, T, C]`` at ``positions [B, T]`` -> rotated ``q, k [B, T, H, K]`` and ``v [B, T, H, V]``."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_k_dim)
        k = self.k_proj(x).view(b, t, self.num_heads, self.head_k_dim)
        v = self.v_proj(x).view(b, t, self.num_heads, self.head_v_dim)
        return rotate_at(self.rotary, q, positions), rotate_at(self.rotary, k, positions), v

    def _output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """``o [B, T, H, V]`` -> ``(swish(x W_g) ⊙ GroupNorm(o)) W_o [B, T, C]`` (the norm per token)."""
        b, t = o.shape[:2]
        normed = self.group_norm(o.reshape(b * t, self.value_dim)).view(b, t, self.value_dim)
        return self.o_proj(F.silu(self.g_proj(x)) * normed)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``x [B, T, C]`` (+ state) -> ``(y [B, T, C], state)``."""
        self.check_input(x)
        if state is not None:
            self.check_state(state, x.shape[0])
        memory, counter = self.init_state(x.shape[0], x.device, x.dtype) if state is None else state
        start = start_positions(counter)
        q, k, v = self._heads(x, token_positions(start, x.shape[1]))
        log_decay = self.log_decay.to(memory.dtype).expand(x.shape[0], x.shape[1], self.num_heads)  # [B, T, H]
        o, memory = gated_linear_attention(q, k, v, log_decay, initial_state=memory, output_final_state=True)
        return self._output(x, o.to(x.dtype)), (memory, start + x.shape[1])

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """``x_t [B, C]`` -> ``(y_t [B, C], state)``; the state is ``init_state``'s."""
        self.check_input(x_t, 2)
        self.check_state(state, x_t.shape[0])
        memory, counter = state
        start = start_positions(counter)
        q, k, v = self._heads(x_t[:, None], start[:, None])
        acc = memory.dtype
        log_decay = self.log_decay.to(acc).expand(x_t.shape[0], self.num_heads)  # [B, H]
        o, memory = gla_step(q[:, 0].to(acc), k[:, 0].to(acc), v[:, 0].to(acc), log_decay, memory,
                             self.head_k_dim ** -0.5)
        return self._output(x_t[:, None], o[:, None].to(x_t.dtype))[:, 0], (memory, start + 1)
