"""Causal softmax attention with rotary positions and a fixed-capacity KV cache as its state.

The layer of Vaswani et al., 2017 ("Attention Is All You Need") with rotary position
embeddings (Su et al., 2021, "RoFormer"), as in LLaMA-style decoders, for ``x [B, T, C]``::

    q = rotary(x W_q)  [B, T, H, D]     k = rotary(x W_k), v = x W_v  [B, T, H_kv, D]
    o = softmax(q kᵀ / √D + causal mask) v        # scaled_dot_product_attention
    y = o W_o                                    [B, T, C]

Options: grouped-query attention (Ainslie et al., 2023: ``num_kv_heads`` key/value heads shared
by ``num_heads / num_kv_heads`` query heads each) and a sliding window (Beltagy et al., 2020;
Mistral): with ``window=W`` token ``t`` attends to tokens ``t - W + 1 .. t`` only.

State, fixed in shape so that the one-token ``step`` exports to ONNX and ``torch.export``:
``(keys [B, H_kv, L, D], values [B, H_kv, L, D], position counter [B])``. The cache has ``L``
slots, ``L = window`` with a window and ``L = max_len`` without; token ``p`` lives in slot
``p mod L`` (a ring buffer), keys stored already rotated. Softmax over keys does not depend on
their order, so the slots need no reordering; a mask leaves out the slots that hold no token
yet and, with a window, the tokens that fell out of it. Without a window, more than ``max_len``
tokens are an ``InputError`` (in eager mode: an exported ``step`` cannot raise, and past
``max_len`` it keeps the latest ``max_len`` tokens, a sliding window of that size).
The counter is float32 (see ``seqapps.backbones.positions``). ``forward`` returns the whole
cache even from a fresh start, ``2·B·L·H_kv·D`` numbers per call: for training only, a
``max_len`` near the sequence length keeps it small.

Defaults: ``num_heads=4`` (head size ``C / 4``, 8 at ``dim=32``), full multi-head attention
(``num_kv_heads = num_heads``), no window, ``max_len=2048``, rotary base 10000, no biases.
Left out: dropout on the attention weights (the block owns regularisation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqapps.backbones.layers import RotaryEmbedding
from seqapps.backbones.mixer import Mixer, State, register_mixer
from seqapps.backbones.positions import init_position_counter, rotate_at, start_positions, token_positions
from seqapps.errors import InputError


def ring_slot_positions(end: torch.Tensor, capacity: int) -> torch.Tensor:
    """The position of the token in each slot of a ring buffer after tokens ``0 .. end - 1``
    were written (token ``p`` to slot ``p mod capacity``): ``end [B]`` -> ``[B, capacity]``,
    negative for a slot that no token has reached."""
    slots = torch.arange(capacity, device=end.device, dtype=end.dtype)
    last = end[:, None] - 1
    return last - torch.remainder(last - slots, capacity)


@register_mixer("attention")
class Attention(Mixer):
    """Causal multi-head softmax attention with rotary positions; ``x [B, T, C] -> y [B, T, C]``.

    Args:
        dim: model width ``C``.
        num_heads: query heads ``H``; the head size is ``D = C / H`` (even, for rotary).
        num_kv_heads: key/value heads ``H_kv`` (grouped-query attention); ``None`` = ``H``.
        window: sliding-window length ``W`` (each token sees itself and the ``W - 1`` before
            it); ``None`` = the whole past.
        max_len: KV-cache capacity without a window: the most tokens one stream may hold.
        rope_base: base of the rotary frequencies.
        bias: biases in the projections.
    """

    def __init__(self, dim: int, num_heads: int = 4, num_kv_heads: int | None = None, window: int | None = None,
                 max_len: int = 2048, rope_base: float = 10000.0, bias: bool = False):
        super().__init__(dim)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or dim % num_heads or (dim // num_heads) % 2:
            raise InputError(f"attention: num_heads={num_heads} must divide dim={dim} into heads of even size "
                             f"(rotary positions rotate pairs of channels)")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise InputError(f"attention: num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        if window is not None and window < 1:
            raise InputError(f"attention: window={window}; expected a positive number of tokens or None")
        if max_len < 1:
            raise InputError(f"attention: max_len={max_len}; expected a positive number of tokens")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.window, self.max_len = window, max_len
        self.capacity = window if window is not None else max_len
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)
        self.rotary = RotaryEmbedding(self.head_dim, base=rope_base)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or torch.get_default_dtype()
        cache_shape = (batch_size, self.num_kv_heads, self.capacity, self.head_dim)
        return (torch.zeros(cache_shape, device=device, dtype=dtype),
                torch.zeros(cache_shape, device=device, dtype=dtype),
                init_position_counter(batch_size, device))

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``x [B, T, C]`` (+ the state after the tokens before it) -> ``(y [B, T, C], state)``."""
        self.check_input(x)
        if state is not None:
            self.check_state(state, x.shape[0])
        if x.numel() == 0:  # an empty piece of a stream or an empty batch: the cache as it was
            return x.new_zeros(x.shape), self.init_state(x.shape[0], x.device, x.dtype) if state is None else state
        return self._attend(x, state)

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """``x_t [B, C]`` -> ``(y_t [B, C], state)``: attends over the cache, ``O(L)`` per token."""
        self.check_input(x_t, 2)
        self.check_state(state, x_t.shape[0])
        y, state = self._attend(x_t[:, None], state)
        return y[:, 0], state

    def _check_capacity(self, start: torch.Tensor | None, length: int) -> None:
        """One line if, without a window, the cache cannot hold ``length`` more tokens. Skipped
        while exporting, where the tensor values are unknown."""
        if self.window is not None or torch.compiler.is_exporting():
            return
        held = 0 if start is None else int(start.max())
        if held + length > self.max_len:
            raise InputError(f"attention: {length} new tokens after {held} cached ones exceed the KV cache of "
                             f"max_len={self.max_len}; build the mixer with a larger max_len or a window")

    def _heads(self, x: torch.Tensor, positions: torch.Tensor | None):
        """``x [B, T, C]`` -> rotated ``q [B, T, H, D]``, ``k [B, T, H_kv, D]`` and ``v [B, T, H_kv, D]``."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if positions is None:  # a fresh sequence: positions 0 .. T-1 for every row
            return self.rotary(q), self.rotary(k), v
        return rotate_at(self.rotary, q, positions), rotate_at(self.rotary, k, positions), v

    def _attend(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        b, t, _ = x.shape
        start = None if state is None else start_positions(state[2])
        self._check_capacity(start, t)
        positions = None if start is None else token_positions(start, t)
        q, k, v = self._heads(x, positions)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, H_kv, T, D]
        if state is None:
            keys, values, mask = k, v, self._fresh_mask(t, x.device)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), self._share(keys), self._share(values),
                                               attn_mask=mask, is_causal=mask is None and t > 1)
            end = init_position_counter(b, x.device) + t
            return self.o_proj(o.transpose(1, 2).reshape(b, t, self.dim)), (*self._fresh_cache(k, v), end)
        else:
            key_cache, value_cache, _ = state
            keys = torch.cat([key_cache.to(k.dtype), k], dim=2)  # [B, H_kv, L + T, D]
            values = torch.cat([value_cache.to(v.dtype), v], dim=2)
            mask = self._cached_mask(start, positions)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), self._share(keys), self._share(values),
                                           attn_mask=mask, is_causal=mask is None and t > 1)
        y = self.o_proj(o.transpose(1, 2).reshape(b, t, self.dim))
        end = start + t
        return y, (self._write(key_cache, k, start, end), self._write(value_cache, v, start, end), end)

    def _fresh_cache(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The caches ``[B, H_kv, L, D]`` after a fresh sequence of ``k, v [B, H_kv, T, D]``: token
        ``p`` in slot ``p mod L``. Without wrapping that is the keys padded with zeros (no gather
        over the whole capacity: a plain forward with a large ``max_len`` stays cheap)."""
        t = k.shape[2]
        if t <= self.capacity:
            return tuple(F.pad(x, [0, 0, 0, self.capacity - t]) for x in (k, v))
        zeros = torch.zeros(k.shape[0], device=k.device)
        caches = self.init_state(k.shape[0], k.device, k.dtype)[:2]
        return tuple(self._write(cache, x, zeros, zeros + t) for cache, x in zip(caches, (k, v)))

    def _share(self, kv: torch.Tensor) -> torch.Tensor:
        """``[B, H_kv, S, D]`` -> ``[B, H, S, D]``: each key/value head serves its group of query heads."""
        groups = self.num_heads // self.num_kv_heads
        if groups == 1:
            return kv
        b, h_kv, s, d = kv.shape
        return kv[:, :, None].expand(b, h_kv, groups, s, d).reshape(b, self.num_heads, s, d)

    def _fresh_mask(self, t: int, device) -> torch.Tensor | None:
        """Mask ``[T, T]`` (True = attend) for a sequence from position 0; ``None`` = plain causal."""
        if self.window is None or self.window >= t:
            return None
        query, key = torch.arange(t, device=device)[:, None], torch.arange(t, device=device)
        return (key <= query) & (key > query - self.window)

    def _cached_mask(self, start: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Mask ``[B, 1, T, L + T]`` (True = attend) of the new tokens at ``positions [B, T]`` over
        the cache slots (holding tokens before ``start [B]``) followed by the new tokens."""
        key_positions = torch.cat([ring_slot_positions(start, self.capacity), positions], dim=1)[:, None, :]
        query_positions = positions[:, :, None]
        mask = (key_positions >= 0) & (key_positions <= query_positions)
        if self.window is not None:
            mask = mask & (key_positions > query_positions - self.window)
        return mask[:, None]

    def _write(self, cache: torch.Tensor, new: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """The cache ``[B, H_kv, L, D]`` after the tokens ``new [B, H_kv, T, D]`` at positions
        ``start .. end - 1`` were written into their slots (a gather, no scatter: shape-stable and
        deterministic when ``T > L`` wraps the ring)."""
        b, h_kv, t, d = new.shape
        slot_positions = ring_slot_positions(end, self.capacity)  # [B, L]
        index = (slot_positions - start[:, None]).clamp(0, t - 1).long()
        taken = new.gather(2, index[:, None, :, None].expand(b, h_kv, self.capacity, d))
        from_new = (slot_positions >= start[:, None])[:, None, :, None]
        return torch.where(from_new, taken.to(cache.dtype), cache)
