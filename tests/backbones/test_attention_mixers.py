"""Behaviour of the attention-family mixers (softmax attention, GLA, RetNet) that the shared
harness cannot see: each layer against a naive implementation of its paper's formula, the
sliding window's receptive field, options off the defaults, per-sequence positions in one batch,
and the KV cache's capacity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seqapps.backbones.mixer import build_mixer
from seqapps.backbones.streaming import run_steps
from seqapps.errors import InputError

DIM = 32


def make(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mixer(name, DIM, **kwargs).eval()


def sequence(batch: int = 2, t: int = 13, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, t, DIM, generator=torch.Generator().manual_seed(seed))


def naive_attention(mixer, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out: scores, causal (and window) mask, softmax, values."""
    b, t, _ = x.shape
    h, h_kv, d = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    q = mixer.rotary(mixer.q_proj(x).view(b, t, h, d)).transpose(1, 2)
    k = mixer.rotary(mixer.k_proj(x).view(b, t, h_kv, d)).transpose(1, 2).repeat_interleave(h // h_kv, dim=1)
    v = mixer.v_proj(x).view(b, t, h_kv, d).transpose(1, 2).repeat_interleave(h // h_kv, dim=1)
    query, key = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = key <= query
    if mixer.window is not None:
        allowed &= key > query - mixer.window
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
    o = scores.softmax(-1) @ v  # [B, H, T, D]
    return mixer.o_proj(o.transpose(1, 2).reshape(b, t, DIM))


def naive_gla(mixer, x: torch.Tensor) -> torch.Tensor:
    """GLA as the paper writes it: α = σ(x W_α1 W_α2 + b_α)^(1/τ), a loop over time, per-head
    RMSNorm, swish output gate."""
    b, t, _ = x.shape
    h, dk, dv = mixer.num_heads, mixer.head_k_dim, mixer.head_v_dim
    q = mixer.q_proj(x).view(b, t, h, dk)
    k = mixer.k_proj(x).view(b, t, h, dk)
    v = mixer.v_proj(x).view(b, t, h, dv)
    alpha = torch.sigmoid(mixer.gate_up(mixer.gate_down(x))).pow(1 / mixer.gate_logit_normalizer).view(b, t, h, dk)
    memory, outputs = torch.zeros(b, h, dk, dv), []
    for i in range(t):
        memory = alpha[:, i, :, :, None] * memory + k[:, i, :, :, None] * v[:, i, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, i], memory) / math.sqrt(dk))
    o = torch.stack(outputs, 1)  # [B, T, H, V]
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + mixer.out_norm.norm.eps) * mixer.out_norm.norm.weight
    gate = mixer.output_gate(x).view(b, t, h, dv)
    return mixer.o_proj((o * F.silu(gate)).reshape(b, t, h * dv))


def naive_retnet(mixer, x: torch.Tensor) -> torch.Tensor:
    """Retention in the paper's parallel form: ``(Q Kᵀ ⊙ D) V`` with ``D[n, m] = γ^(n-m)`` for
    ``n >= m``, then GroupNorm and the swish gate."""
    b, t, _ = x.shape
    h, dk, dv = mixer.num_heads, mixer.head_k_dim, mixer.head_v_dim
    q = mixer.rotary(mixer.q_proj(x).view(b, t, h, dk)).transpose(1, 2)
    k = mixer.rotary(mixer.k_proj(x).view(b, t, h, dk)).transpose(1, 2)
    v = mixer.v_proj(x).view(b, t, h, dv).transpose(1, 2)
    gamma = 1 - 2.0 ** (-5 - torch.arange(h, dtype=torch.float32))
    distance = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).float()
    decay = torch.where(distance >= 0, gamma[:, None, None] ** distance.clamp(min=0), torch.zeros(()))  # [H, T, T]
    o = ((q @ k.transpose(-1, -2)) / math.sqrt(dk) * decay) @ v  # [B, H, T, V]
    o = o.transpose(1, 2)  # [B, T, H, V]
    mean, var = o.mean(-1, keepdim=True), o.var(-1, unbiased=False, keepdim=True)
    normed = ((o - mean) / torch.sqrt(var + mixer.group_norm.eps)).reshape(b, t, h * dv)
    normed = normed * mixer.group_norm.weight + mixer.group_norm.bias
    return mixer.o_proj(F.silu(mixer.g_proj(x)) * normed)


@pytest.mark.parametrize("name, kwargs, reference", [
    ("attention", {}, naive_attention),
    ("attention", {"num_kv_heads": 2, "window": 5}, naive_attention),
    ("gla", {}, naive_gla),
    ("retnet", {}, naive_retnet),
])
def test_layer_equals_its_papers_formula(name, kwargs, reference):
    mixer, x = make(name, **kwargs), sequence()
    with torch.no_grad():
        y, _ = mixer(x)
        torch.testing.assert_close(y, reference(mixer, x), rtol=1e-4, atol=1e-5)


def test_retention_decays_are_one_minus_two_to_the_minus_five_minus_h():
    mixer = make("retnet", num_heads=4)
    torch.testing.assert_close(mixer.log_decay.exp(), torch.tensor([1 - 2 ** -5, 1 - 2 ** -6, 1 - 2 ** -7, 1 - 2 ** -8]))


def test_sliding_window_limits_the_receptive_field_also_when_streaming():
    window, t, changed_at = 4, 15, 3
    mixer, x = make("attention", window=window), sequence(t=t)
    changed = x.clone()
    changed[:, changed_at] += 1.0
    with torch.no_grad():
        for run in (lambda inp: mixer(inp)[0], lambda inp: run_steps(mixer, inp)[0]):
            diff = (run(changed) - run(x)).abs().amax(dim=(0, 2))  # [T]
            reached = diff > 1e-6
            expected = (torch.arange(t) >= changed_at) & (torch.arange(t) < changed_at + window)
            assert torch.equal(reached, expected), diff


@pytest.mark.parametrize("name, kwargs", [
    ("attention", {"window": 5, "num_kv_heads": 2}),  # the ring wraps several times within 23 tokens
    ("attention", {"num_kv_heads": 1, "max_len": 23}),  # multi-query, cache filled to the last slot
    ("gla", {"use_short_conv": True, "num_heads": 2}),
    ("retnet", {"num_heads": 2, "expand_v": 1.0}),
])
def test_options_off_the_defaults_stream_exactly(name, kwargs):
    mixer, x = make(name, **kwargs), sequence(t=23)
    with torch.no_grad():
        y, final = mixer(x)
        state, pieces = None, []
        for a, b in ((0, 2), (2, 9), (9, 10), (10, 23)):
            y_piece, state = mixer(x[:, a:b], state)
            pieces.append(y_piece)
        y_steps, step_state = run_steps(mixer, x)
    torch.testing.assert_close(torch.cat(pieces, 1), y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_steps, y, rtol=1e-4, atol=1e-5)
    for a, b, c in zip(final, state, step_state):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, kwargs", [("attention", {}), ("attention", {"window": 4}), ("retnet", {})])
def test_sequences_of_one_batch_may_stand_at_different_positions(name, kwargs):
    """Two streams, 3 and 7 tokens in, stepped together as one batch, give what each gives alone."""
    mixer, x = make(name, **kwargs), sequence(batch=2, t=8)
    with torch.no_grad():
        _, short = mixer(x[:1, :3])
        _, long = mixer(x[1:, :7])
        together, _ = mixer.step(torch.stack([x[0, 3], x[1, 7]]), tuple(torch.cat(p) for p in zip(short, long)))
        alone = [mixer.step(x[0:1, 3], short)[0], mixer.step(x[1:2, 7], long)[0]]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-6)


def test_attention_cache_capacity_is_one_clear_line():
    mixer = make("attention", max_len=6)
    with pytest.raises(InputError, match="max_len=6"):
        mixer(sequence(t=7))
    _, state = mixer(sequence(t=6))
    with pytest.raises(InputError, match="6 cached"):
        mixer.step(sequence(t=1)[:, 0], state)
    _, state = make("attention", window=6)(sequence(t=40))  # a window never runs out
    assert state[0].shape[2] == 6 and torch.equal(state[2], torch.full((2,), 40.0))
