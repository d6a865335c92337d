"""mLSTM: the matrix-memory LSTM of xLSTM (Beck et al., 2024, "xLSTM: Extended Long Short-Term
Memory"), as the paper's mLSTM block without its pre-norm and residual (the block's job here).

**The cell**, per head, with ``q_t, k_t, v_t`` of width ``D``::

    C_t = f_t C_{t-1} + i_t v_t k_tᵀ / √D          # matrix memory [D, D]
    n_t = f_t n_{t-1} + i_t k_t / √D               # normaliser [D]
    h̃_t = C_t q_t / max(|n_tᵀ q_t|, 1)
    i_t = exp(ĩ_t),  f_t = sigmoid(f̃_t) (or exp(f̃_t)),  ĩ, f̃ = W_{i,f} [q; k; v] + b_{i,f}

``exp(ĩ)`` overflows for large pre-activations, so the paper keeps a running stabiliser
``m_t = max(log f_t + m_{t-1}, ĩ_t)`` and stores ``C̄_t = exp(-m_t) C_t``, ``n̄_t = exp(-m_t) n_t``::

    C̄_t = exp(log f_t + m_{t-1} - m_t) C̄_{t-1} + exp(ĩ_t - m_t) v_t k_tᵀ / √D
    h̃_t = C̄_t q_t / max(|n̄_tᵀ q_t|, exp(-m_t))           # the same h̃_t for any choice of m

Both exponents are ``≤ 0``: nothing overflows.

**Mapping to gated linear attention.** The stabilised recurrence *is*
``seqapps.kernels.gated_linear_attention`` with a scalar log decay per head
``g_t = log f_t + m_{t-1} - m_t`` (≤ 0), keys ``exp(ĩ_t - m_t) k_t / √D`` and ``scale = 1``;
appending a column of ones to the values, ``[v_t; 1]``, makes the kernel's state ``[C̄_t | n̄_t]``
and its output ``[C̄_t q_t; n̄_tᵀ q_t]``: the numerator and the normaliser in one pass.

The stabiliser of the whole sequence comes without a loop: with ``F_t = Σ_{s≤t} log f_s`` (from
the start of the call) and ``a_t = m_t - F_t``, the recursion becomes ``a_t = max(a_{t-1},
ĩ_t - F_t)``, a cumulative maximum (``torch.cummax``) started at the carried ``m_0``; then
``g_t = a_{t-1} - a_t`` exactly (≤ 0) and ``ĩ_t - m_t = ĩ_t - F_t - a_t``. These ``[B, T, H]``
bookkeeping tensors are computed in float64, so that ``F_t`` and ``a_t``, which grow with ``T``
while their sum ``m_t`` does not, cancel without losing digits over long sequences. ``step`` runs
the paper's recurrence for ``m`` directly, through the same kernel family's ``gla_step``; the two
agree up to rounding, since ``h̃`` does not depend on the stabiliser chosen. (For that reason the
lower bound ``exp(-m_t)`` is evaluated with ``m`` clamped to [-80, 80], finite and nonzero in
float32, instead of adding the ``1e-6`` of xLSTM's code to the denominator, which would make
``h̃`` depend on ``m``.) The cell is exposed as :func:`mlstm_cell` and :func:`mlstm_cell_step`.

**The block** (the paper's pre-up-projection mLSTM block; it fits the mixer contract, since all of
it is token-wise except a causal convolution that streams)::

    c, z   = W_up x                               # [B, T, E] each, E = proj_factor · C
    c'     = silu(conv(c))                        # causal, width 4
    q, k   = blockdiag(c'),  v = blockdiag(c)     # block-diagonal projections (blocks of 4)
    h̃      = mLSTM cell over H heads
    y      = W_down ((LayerNorm_head(h̃) + s ⊙ c') ⊙ silu(z))

The cell's output gate ``o_t`` is, in the block, the branch ``silu(z)`` (as in the paper's block
and its released code), and ``s`` is the learnable skip from the convolution. Defaults are the
paper's: ``proj_factor = 2``, 4 heads, conv width 4, q/k/v blocks of 4, sigmoid forget gate,
forget-gate bias spaced linearly over [3, 6], input-gate bias ~ N(0, 0.1), gate weights zero. At
``dim=32``: ``E = 64``, ``D = 16``.

State: ``(conv cache [B, E, w-1], memory C̄ [B, H, D, D], normaliser n̄ [B, H, D], stabiliser m
[B, H])``, the last three in float32 (float64 for float64); the memory in the kernel's key-by-value
layout (``C̄ᵀ``); ``m_0 = 0`` for a fresh sequence.
Left out: the block's pre-LayerNorm and residual (the residual block around every mixer provides
them), dropout, and the sLSTM (a different, non-parallelisable cell).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqapps.backbones.layers import ShortConvolution
from seqapps.backbones.mixer import Mixer, State, register_mixer
from seqapps.errors import InputError
from seqapps.kernels import gated_linear_attention, gla_step

FORGET_GATES = ("sigmoid", "exp")
CellState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# The normaliser's lower bound exp(-m) is evaluated at m clamped to [-80, 80]: finite and nonzero
# in float32 (and its gradient never inf · 0); it differs from exp(-m) only where |m| > 80.
STABILISER_RANGE = 80.0


def _with_normaliser(v: torch.Tensor, memory: torch.Tensor, normaliser: torch.Tensor):
    """Values ``[v; 1] [..., H, D+1]`` and the kernel state ``[C̄ | n̄] [B, H, D, D+1]``."""
    return (torch.cat([v, torch.ones_like(v[..., :1])], dim=-1),
            torch.cat([memory, normaliser.unsqueeze(-1)], dim=-1))


def _normalise(o: torch.Tensor, stabiliser: torch.Tensor) -> torch.Tensor:
    """Kernel output ``[C̄q; n̄ᵀq] [..., H, D+1]`` and ``m [..., H]`` -> ``h̃ [..., H, D]``."""
    numerator, projection = o[..., :-1], o[..., -1]
    lower_bound = torch.exp(-stabiliser.clamp(-STABILISER_RANGE, STABILISER_RANGE))
    return numerator / torch.maximum(projection.abs(), lower_bound).unsqueeze(-1)


def mlstm_cell(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_preact: torch.Tensor,
               log_forget: torch.Tensor, state: CellState, chunk_size: int = 64) -> tuple[torch.Tensor, CellState]:
    """The stabilised mLSTM cell over a whole sequence, through ``gated_linear_attention``.

    ``q, k, v [B, T, H, D]``, ``input_preact`` (ĩ) and ``log_forget`` (log f) ``[B, T, H]``,
    ``state = (C̄ [B, H, D, D], n̄ [B, H, D], m [B, H])`` -> ``(h̃ [B, T, H, D], new state)``.
    Computes in ``C̄``'s dtype; the keys are scaled by ``D^{-1/2}`` here (the paper's ``k/√D``).
    """
    memory, normaliser, stabiliser = state
    acc, book = memory.dtype, torch.float64
    # m_t = F_t + a_t, a_t = max(m_0, max_{s≤t} ĩ_s - F_s): float64, F and a grow with T.
    cumulative_forget = log_forget.to(book).cumsum(1)  # F [B, T, H]
    m0 = stabiliser.to(book).unsqueeze(1)  # [B, 1, H]
    offset = torch.maximum(_running_max(input_preact.to(book) - cumulative_forget), m0)  # a
    m = cumulative_forget + offset
    log_decay = torch.cat([m0, offset[:, :-1]], dim=1) - offset  # g_t = a_{t-1} - a_t ≤ 0
    key_weight = torch.exp(input_preact.to(book) - m) * k.shape[-1] ** -0.5  # exp(ĩ_t - m_t) / √D

    values, kernel_state = _with_normaliser(v.to(acc), memory, normaliser)
    o, kernel_state = gated_linear_attention(q.to(acc), k.to(acc) * key_weight.to(acc).unsqueeze(-1), values,
                                             log_decay.to(acc), scale=1.0, initial_state=kernel_state,
                                             output_final_state=True, chunk_size=chunk_size)
    m = m.to(acc)
    return _normalise(o, m), (kernel_state[..., :-1], kernel_state[..., -1], m[:, -1])


def _running_max(x: torch.Tensor) -> torch.Tensor:
    """``max_{s≤t} x_s`` along the time axis of ``x [B, T, H]``. The ONNX exporter has no
    ``cummax``: while exporting, the maximum over a ``[B, T, T, H]`` copy with the future masked
    to ``-inf`` (``O(T²)`` memory, the same values)."""
    if not torch.compiler.is_exporting():
        return torch.cummax(x, dim=1).values
    length = x.shape[1]
    future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1).unsqueeze(-1)  # s > t
    return x.unsqueeze(1).masked_fill(future, float("-inf")).amax(2)


def mlstm_cell_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, input_preact_t: torch.Tensor,
                    log_forget_t: torch.Tensor, state: CellState) -> tuple[torch.Tensor, CellState]:
    """One token of the stabilised cell, through ``gla_step``: ``q_t, k_t, v_t [B, H, D]``,
    ``input_preact_t, log_forget_t [B, H]``, ``state`` as :func:`mlstm_cell`'s -> ``(h̃_t [B, H, D],
    new state)``. The paper's recurrence ``m_t = max(log f_t + m_{t-1}, ĩ_t)``."""
    memory, normaliser, stabiliser = state
    acc = memory.dtype
    input_preact_t, log_forget_t = input_preact_t.to(acc), log_forget_t.to(acc)
    m = torch.maximum(log_forget_t + stabiliser, input_preact_t)  # [B, H]
    log_decay = log_forget_t + stabiliser - m
    values, kernel_state = _with_normaliser(v_t.to(acc), memory, normaliser)
    key_weight = torch.exp(input_preact_t - m) * k_t.shape[-1] ** -0.5  # exp(ĩ_t - m_t) / √D
    o, kernel_state = gla_step(q_t.to(acc), k_t.to(acc) * key_weight.unsqueeze(-1), values, log_decay,
                               kernel_state, 1.0)
    return _normalise(o, m), (kernel_state[..., :-1], kernel_state[..., -1], m)


class BlockDiagonalLinear(nn.Module):
    """A linear map ``[..., F] -> [..., F]`` that is block-diagonal with square blocks of
    ``block_size`` (xLSTM's "headwise" q/k/v projections: ``F / block_size`` independent maps)."""

    def __init__(self, features: int, block_size: int):
        super().__init__()
        self.num_blocks, self.block_size = features // block_size, block_size
        std = math.sqrt(2.0 / (5.0 * features))  # "small init" (Nguyen & Salazar), as xLSTM
        self.weight = nn.Parameter(torch.randn(self.num_blocks, block_size, block_size) * std)  # [N, out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.unflatten(-1, (self.num_blocks, self.block_size))  # [..., N, in]
        return torch.einsum("...ni,noi->...no", blocks, self.weight).flatten(-2)


@register_mixer("mlstm")
class MLSTM(Mixer):
    """xLSTM's mLSTM block (without pre-norm and residual); ``x [B, T, C] -> y [B, T, C]``.

    Args:
        dim: model width ``C``.
        num_heads: heads ``H`` of the cell (paper: 4).
        proj_factor: inner width ``E = proj_factor · C`` (paper: 2).
        conv_size: width of the causal convolution before q and k (paper: 4).
        qkv_block_size: block size of the block-diagonal q/k/v projections (paper: 4).
        forget_gate: ``"sigmoid"`` (paper's default) or ``"exp"`` (exponential forget gate).
        norm_eps: epsilon of the per-head LayerNorm.
        chunk_size: chunk length of the parallel kernel.
    """

    def __init__(self, dim: int, num_heads: int = 4, proj_factor: float = 2.0, conv_size: int = 4,
                 qkv_block_size: int = 4, forget_gate: str = "sigmoid", norm_eps: float = 1e-5,
                 chunk_size: int = 64):
        super().__init__(dim)
        inner = round(proj_factor * dim)
        if inner % num_heads or inner % qkv_block_size or inner < num_heads:
            raise InputError(f"proj_factor={proj_factor} at dim={dim} gives {inner} inner channels; expected a "
                             f"multiple of num_heads={num_heads} and of qkv_block_size={qkv_block_size}")
        if forget_gate not in FORGET_GATES:
            raise InputError(f"forget_gate='{forget_gate}'; expected one of {', '.join(FORGET_GATES)}")
        self.inner, self.num_heads, self.head_dim = inner, num_heads, inner // num_heads
        self.forget_gate_kind, self.norm_eps, self.chunk_size = forget_gate, norm_eps, chunk_size

        self.up_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = ShortConvolution(inner, conv_size, activation=True, bias=True)
        self.q_proj = BlockDiagonalLinear(inner, qkv_block_size)
        self.k_proj = BlockDiagonalLinear(inner, qkv_block_size)
        self.v_proj = BlockDiagonalLinear(inner, qkv_block_size)
        self.input_gate = nn.Linear(3 * inner, num_heads)
        self.forget_gate = nn.Linear(3 * inner, num_heads)
        self.norm_weight = nn.Parameter(torch.ones(inner))
        self.skip = nn.Parameter(torch.ones(inner))
        self.down_proj = nn.Linear(inner, dim, bias=False)
        with torch.no_grad():
            nn.init.zeros_(self.input_gate.weight)
            nn.init.normal_(self.input_gate.bias, std=0.1)
            nn.init.zeros_(self.forget_gate.weight)
            self.forget_gate.bias.copy_(torch.linspace(3.0, 6.0, num_heads))

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or torch.get_default_dtype()
        acc = torch.promote_types(dtype, torch.float32)
        h, d = self.num_heads, self.head_dim
        return (self.conv.init_cache(batch_size, device, dtype),
                torch.zeros(batch_size, h, d, d, device=device, dtype=acc),
                torch.zeros(batch_size, h, d, device=device, dtype=acc),
                torch.zeros(batch_size, h, device=device, dtype=acc))

    # -- the parts shared by forward and step (any leading shape: [B, T, ...] or [B, ...])
    def _cell_inputs(self, cells: torch.Tensor, conv_out: torch.Tensor):
        """``cells, conv_out [..., E]`` -> ``q, k, v [..., H, D]``, the input gate's pre-activation
        ``ĩ [..., H]`` and ``log f [..., H]`` (gates in float32 at least)."""
        q, k, v = self.q_proj(conv_out), self.k_proj(conv_out), self.v_proj(cells)
        qkv = torch.cat([q, k, v], dim=-1)
        acc = torch.promote_types(qkv.dtype, torch.float32)
        input_preact = self.input_gate(qkv).to(acc)
        forget_preact = self.forget_gate(qkv).to(acc)
        log_forget = F.logsigmoid(forget_preact) if self.forget_gate_kind == "sigmoid" else forget_preact
        heads = (self.num_heads, self.head_dim)
        return q.unflatten(-1, heads), k.unflatten(-1, heads), v.unflatten(-1, heads), input_preact, log_forget

    def _block_output(self, h: torch.Tensor, conv_out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``h̃ [..., H, D]``, ``conv_out, z [..., E]`` -> ``y [..., C]``."""
        h = F.layer_norm(h, (self.head_dim,), eps=self.norm_eps).flatten(-2).to(z.dtype) * self.norm_weight
        return self.down_proj((h + self.skip * conv_out) * F.silu(z))

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``x [B, T, C]`` (+ state) -> ``(y [B, T, C], state)``."""
        self.check_input(x)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        self.check_state(state, x.shape[0])
        if x.numel() == 0:  # an empty piece of a stream or an empty batch: the state as it was
            return x.new_zeros(x.shape), state
        cells, z = self.up_proj(x).chunk(2, dim=-1)  # [B, T, E] each
        conv_out, conv_cache = self.conv(cells, state[0])
        h, cell_state = mlstm_cell(*self._cell_inputs(cells, conv_out), state[1:], self.chunk_size)
        return self._block_output(h, conv_out, z), (conv_cache, *cell_state)

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """``x_t [B, C]`` -> ``(y_t [B, C], state)``; the state is ``init_state``'s."""
        self.check_input(x_t, 2)
        self.check_state(state, x_t.shape[0])
        cells, z = self.up_proj(x_t).chunk(2, dim=-1)  # [B, E] each
        conv_out, conv_cache = self.conv.step(cells, state[0])
        h, cell_state = mlstm_cell_step(*self._cell_inputs(cells, conv_out), state[1:])
        return self._block_output(h, conv_out, z), (conv_cache, *cell_state)
