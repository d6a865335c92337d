"""RWKV-6 "Finch" time mixing: Peng, Goldstein, Anthony, Albalak, Alcaide et al., 2024, "Eagle and
Finch: RWKV with Matrix-Valued States and Dynamic Recurrence".

For ``x [B, T, C]`` with ``H`` heads of ``K = C / H`` channels (keys and values alike), and the
previous token ``x_{t-1}`` (zeros before the first; carried in the state when streaming)::

    lora_□(z)     = λ_□ + tanh(z A_□) B_□                      # low-rank, data-dependent
    ddlerp_□(a, b) = a + (b - a) ⊙ lora_□(a + (b - a) ⊙ μ_x)   # token shift, a = x_t, b = x_{t-1}
    r, k, v, g    = ddlerp_□(x_t, x_{t-1}) W_□                 # □ ∈ {r, k, v, g}: [B, T, H, K]
    d_t           = lora_d(ddlerp_w(x_t, x_{t-1}))              # [B, T, H, K]
    w_t           = exp(-exp(d_t))                              # per-key decay in (0, 1)
    S_t           = diag(w_t) S_{t-1} + k_tᵀ v_t                # S [B, H, K, K]
    o_t           = r_t (S_{t-1} + diag(u) k_tᵀ v_t)            # the bonus u [H, K] for the current token
    y             = (GroupNorm_H(o) ⊙ SiLU(g)) W_o              # [B, T, C]

The five ``A_□`` (``□ ∈ {w, k, v, r, g}``, rank ``mix_rank``) are one ``[C, 5·mix_rank]`` matrix;
the decay has its own rank-``decay_rank`` LoRA ``A_d, B_d`` with ``λ_d`` the base decay.

The recurrence through ``seqapps.kernels.gated_linear_attention``. The kernel computes
``ô_s = q_sᵀ S_s`` with ``S_s = diag(exp(g_s)) S_{s-1} + k_s v_sᵀ``: it reads the state *after*
the current token, RWKV *before* it. The readout of ``S_{t-1}`` is exactly the kernel's output
one step earlier with the next token's receptance as the query: feeding ``q_s = r_{s+1}`` (and a
zero query for the last token, whose readout no one needs) gives ``ô_s = r_{s+1} S_s``, so

    r_t S_{t-1} = ô_{t-1}  for t ≥ 1,      r_0 S_{-1} = r_0 S_init  (one small product),

with ``g = log w = -exp(d)`` and ``scale = 1``; the kernel's final state is still ``S_{T-1}``. The
bonus ``(r_t ⊙ u ⊙ k_t) · v_t`` is added per token. No division by ``w`` (which could overflow) is
involved: the identity is exact. ``step`` reads ``r_t S_{t-1}`` directly and updates the state
with ``gla_step``.

State: ``(previous token [B, C], S [B, H, K, K])``; ``S`` in float32 (float64 for float64).

Defaults: ``num_heads=4`` (the paper's heads have 64 channels, ``num_heads = C / 64``; 4 keeps
``dim=32`` working, ``K = 8``), ``mix_rank=32`` and ``decay_rank=64`` (the paper's LoRA widths
for models up to 3B), GroupNorm epsilon ``64e-5`` (the authors' ``1e-5 · 8²``), no biases.
The initialisation is the authors' layer-dependent one for layer ``layer_idx`` of
``num_layers`` (decays from ``exp(-exp(-6))`` to ``exp(-exp(-1))`` across channels, the mixing
coefficients ``μ`` and bonus ``u`` by the layer's depth); the LoRA down-projections start at
``±1e-4`` rather than zero, so that gradients reach their up-projections from the first step.

Left out: the channel-mixing (RWKV's feed-forward) sub-block, which is the block's MLP here, not
part of a token mixer; the authors' zero initialisation of the projections (PyTorch's defaults
instead, so that every parameter trains from the first step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqapps.backbones.mixer import Mixer, State, register_mixer
from seqapps.errors import InputError
from seqapps.kernels import gated_linear_attention, gla_step

# The five ddlerp targets, in the order of the rows of ``mix_bias`` / ``mix_up``.
_TARGETS = ("w", "k", "v", "r", "g")


@register_mixer("rwkv6")
class RWKV6(Mixer):
    """RWKV-6 (Finch) time mixing; ``x [B, T, C] -> y [B, T, C]``.

    Args:
        dim: model width ``C``.
        num_heads: heads ``H``; each has ``K = C / H`` key and value channels.
        mix_rank: rank of the token-shift LoRA ``A_□ B_□`` (paper: 32).
        decay_rank: rank of the decay LoRA ``A_d B_d`` (paper: 64).
        layer_idx: this layer's depth, for the paper's initialisation (0-based).
        num_layers: the stack's depth, for the paper's initialisation.
        norm_eps: epsilon of the per-head GroupNorm.
    """

    def __init__(self, dim: int, num_heads: int = 4, mix_rank: int = 32, decay_rank: int = 64,
                 layer_idx: int = 0, num_layers: int = 1, norm_eps: float = 64e-5):
        super().__init__(dim)
        if num_heads < 1 or dim % num_heads:
            raise InputError(f"rwkv6: num_heads={num_heads} must divide dim={dim}")
        if mix_rank < 1 or decay_rank < 1:
            raise InputError(f"rwkv6: mix_rank={mix_rank}, decay_rank={decay_rank}; expected both >= 1")
        if not 0 <= layer_idx < num_layers:
            raise InputError(f"rwkv6: layer_idx={layer_idx}, num_layers={num_layers}; "
                             f"expected 0 <= layer_idx < num_layers")
        self.num_heads, self.head_dim, self.mix_rank = num_heads, dim // num_heads, mix_rank
        n_targets = len(_TARGETS)
        self.mix_x = nn.Parameter(torch.empty(dim))  # μ_x
        self.mix_bias = nn.Parameter(torch.empty(n_targets, dim))  # λ_□
        self.mix_down = nn.Parameter(torch.empty(dim, n_targets * mix_rank))  # A_□, side by side
        self.mix_up = nn.Parameter(torch.empty(n_targets, mix_rank, dim))  # B_□
        self.decay_bias = nn.Parameter(torch.empty(dim))  # λ_d
        self.decay_down = nn.Parameter(torch.empty(dim, decay_rank))  # A_d
        self.decay_up = nn.Parameter(torch.empty(decay_rank, dim))  # B_d
        self.bonus = nn.Parameter(torch.empty(num_heads, self.head_dim))  # u
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Linear(dim, dim, bias=False)
        self.out_norm = nn.GroupNorm(num_heads, dim, eps=norm_eps)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self._init_as_paper(layer_idx, num_layers)

    @torch.no_grad()
    def _init_as_paper(self, layer_idx: int, num_layers: int) -> None:
        """The authors' layer-dependent initialisation: deeper layers mix less of the previous
        token, decay more slowly and favour the current token less."""
        dim = self.dim
        depth = layer_idx / max(num_layers - 1, 1)  # 0 at the first layer, 1 at the last
        shallowness = 1.0 - layer_idx / num_layers  # 1 at the first layer, towards 0
        channel = torch.arange(dim, dtype=torch.float64)
        position = channel / dim
        share = 1.0 - position ** shallowness
        mixes = {"w": share, "k": share, "v": share - 0.3 * depth, "r": 1.0 - position ** (0.5 * shallowness),
                 "g": 1.0 - position ** (0.5 * shallowness)}
        self.mix_x.copy_(share)
        self.mix_bias.copy_(torch.stack([mixes[name] for name in _TARGETS]))
        ramp = channel / max(dim - 1, 1)
        self.decay_bias.copy_(-6.0 + 5.0 * ramp ** (0.7 + 1.3 * depth))
        self.bonus.copy_((depth * (1.0 - ramp) + ((channel + 1) % 3 - 1) * 0.1).view_as(self.bonus))
        for down, up in ((self.mix_down, self.mix_up), (self.decay_down, self.decay_up)):
            down.uniform_(-1e-4, 1e-4)
            up.uniform_(-1e-2, 1e-2)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or torch.get_default_dtype()
        previous = torch.zeros(batch_size, self.dim, device=device, dtype=dtype)
        memory = torch.zeros(batch_size, self.num_heads, self.head_dim, self.head_dim, device=device,
                             dtype=torch.promote_types(dtype, torch.float32))
        return (previous, memory)

    def _time_mix(self, x: torch.Tensor, previous: torch.Tensor):
        """``x [..., C]`` and the tokens before them ``previous [..., C]`` -> ``r, k, v, log w``
        ``[..., H, K]`` and the output gate input ``g [..., C]`` (ddlerp, projections, decay)."""
        delta = previous - x
        low = torch.tanh((x + delta * self.mix_x) @ self.mix_down)  # [..., 5·R]
        low = low.unflatten(-1, (len(_TARGETS), 1, self.mix_rank))  # [..., 5, 1, R]
        mix = self.mix_bias + (low @ self.mix_up).squeeze(-2)  # lora_□: [..., 5, C]
        x_w, x_k, x_v, x_r, x_g = (x.unsqueeze(-2) + delta.unsqueeze(-2) * mix).unbind(-2)
        decay_logit = self.decay_bias + torch.tanh(x_w @ self.decay_down) @ self.decay_up  # d_t
        log_decay = -torch.exp(decay_logit.to(torch.promote_types(decay_logit.dtype, torch.float32)))  # log w_t
        heads = (*x.shape[:-1], self.num_heads, self.head_dim)
        return (self.receptance(x_r).reshape(heads), self.key(x_k).reshape(heads), self.value(x_v).reshape(heads),
                log_decay.reshape(heads), self.gate(x_g))

    def _bonus(self, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The current token's term ``(r ⊙ u ⊙ k) · v``: ``[..., H, K]``."""
        return (r * self.bonus * k).sum(-1, keepdim=True) * v

    def _output(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``o [..., H, K]``, ``gate [..., C]`` -> ``(GroupNorm_H(o) ⊙ SiLU(gate)) W_o [..., C]``."""
        flat = o.flatten(-2)
        normed = self.out_norm(flat.reshape(-1, self.dim)).reshape(flat.shape)
        return self.o_proj(normed * F.silu(gate))

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``x [B, T, C]`` (+ state) -> ``(y [B, T, C], state)``."""
        self.check_input(x)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        else:
            self.check_state(state, x.shape[0])
        if x.numel() == 0:  # an empty piece of a stream or an empty batch: the state as it was
            return x.new_zeros(x.shape), state
        last_token, initial_memory = state
        previous = torch.cat([last_token.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)
        r, k, v, log_decay, gate = self._time_mix(x, previous)
        # The kernel reads S_s after token s; querying it with r_{s+1} gives r_{s+1} S_s, the
        # readout token s + 1 needs (see the module docstring).
        next_receptance = torch.cat([r[:, 1:], torch.zeros_like(r[:, :1])], dim=1)
        readout_next, memory = gated_linear_attention(next_receptance, k, v, log_decay, scale=1.0,
                                                      initial_state=initial_memory, output_final_state=True)
        acc = memory.dtype
        first = torch.einsum("bhk,bhkv->bhv", r[:, 0].to(acc), initial_memory.to(acc))  # r_0 S_init
        readout = torch.cat([first.unsqueeze(1).to(readout_next.dtype), readout_next[:, :-1]], dim=1)
        o = readout + self._bonus(r, k, v)
        return self._output(o.to(x.dtype), gate), (x[:, -1], memory)

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """``x_t [B, C]`` -> ``(y_t [B, C], state)``; the state is ``init_state``'s."""
        self.check_input(x_t, 2)
        self.check_state(state, x_t.shape[0])
        last_token, memory = state
        r, k, v, log_decay, gate = self._time_mix(x_t, last_token.to(x_t.dtype))
        acc = memory.dtype
        r, k, v, log_decay = r.to(acc), k.to(acc), v.to(acc), log_decay.to(acc)
        o = torch.einsum("bhk,bhkv->bhv", r, memory) + self._bonus(r, k, v)  # r_t (S_{t-1} + diag(u) k_tᵀ v_t)
        _, memory = gla_step(r, k, v, log_decay, memory, 1.0)
        return self._output(o.to(x_t.dtype), gate), (x_t, memory)
