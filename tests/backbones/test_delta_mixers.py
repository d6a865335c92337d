"""DeltaNet's β range, Gated DeltaNet's decay, and the mLSTM cell against the paper's plain loop.

(The shared harness, test_mixer_harness.py, already checks every mixer's forward = pieces = steps,
causality, gradients and export.)
"""

from __future__ import annotations

import math

import pytest
import torch

from seqapps.backbones.mixer import build_mixer
from seqapps.backbones.mixers.mlstm import mlstm_cell, mlstm_cell_step

DIM = 32


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_allow_neg_eigval_lets_beta_reach_two(name):
    x = torch.randn(2, 7, DIM)
    saturating = torch.ones(2, 1, DIM)  # with all-ones weights: pre-activation 32, sigmoid ≈ 1
    betas = {}
    for allow in (False, True):
        torch.manual_seed(0)
        mixer = build_mixer(name, DIM, allow_neg_eigval=allow)
        with torch.no_grad():
            beta = mixer.write_strength(x)
            mixer.beta_proj.weight.fill_(1.0)
            betas[allow] = (beta, mixer.write_strength(saturating))
    plain, plain_max = betas[False]
    doubled, doubled_max = betas[True]
    torch.testing.assert_close(doubled, 2 * plain)
    assert 0 <= plain.min() and plain.max() <= 1
    assert plain_max.min() > 0.99 and doubled_max.min() > 1.99 and doubled_max.max() <= 2


def test_gated_deltanet_decay_starts_in_mamba2_range():
    torch.manual_seed(0)
    mixer = build_mixer("gated_deltanet", DIM)
    with torch.no_grad():
        g = mixer.log_decay(torch.zeros(1, 1, DIM))  # = -A · softplus(dt_bias), A in [1, 16], dt in [1e-3, 0.1]
    assert g.shape == (1, 1, mixer.num_heads)
    assert (g <= -1e-3 * (1 - 1e-4)).all() and (g >= -16 * 0.1 * (1 + 1e-4)).all()


def naive_mlstm(q, k, v, input_preact, log_forget):
    """The paper's cell without stabiliser, in float64: ``(h̃ [B, T, H, D], C [B, H, D, D], n [B, H, D])``."""
    q, k, v, input_preact, log_forget = (t.double() for t in (q, k, v, input_preact, log_forget))
    b, t, h, d = q.shape
    memory, normaliser = q.new_zeros(b, h, d, d), q.new_zeros(b, h, d)
    outputs = []
    for i in range(t):
        gate_in, gate_forget = input_preact[:, i].exp()[..., None], log_forget[:, i].exp()[..., None]
        key = k[:, i] / math.sqrt(d)
        memory = gate_forget[..., None] * memory + gate_in[..., None] * key[..., :, None] * v[:, i, :, None, :]
        normaliser = gate_forget * normaliser + gate_in * key
        numerator = torch.einsum("bhkv,bhk->bhv", memory, q[:, i])
        projection = (normaliser * q[:, i]).sum(-1, keepdim=True)
        outputs.append(numerator / projection.abs().clamp(min=1.0))
    return torch.stack(outputs, 1), memory, normaliser


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_mlstm_cell_parallel_and_step_equal_the_plain_loop(forget_gate):
    gen = torch.Generator().manual_seed(3)
    b, t, h, d, cut = 2, 37, 2, 4, 13
    q, k, v = (torch.randn(b, t, h, d, generator=gen) for _ in range(3))
    # input-gate pre-activations up to 300: exp overflows float32 (from 89) without the stabiliser
    input_preact = torch.rand(b, t, h, generator=gen) * 330 - 30
    forget_preact = torch.randn(b, t, h, generator=gen) * 3
    log_forget = torch.nn.functional.logsigmoid(forget_preact) if forget_gate == "sigmoid" else forget_preact
    expected, memory, normaliser = naive_mlstm(q, k, v, input_preact, log_forget)
    fresh = (torch.zeros(b, h, d, d), torch.zeros(b, h, d), torch.zeros(b, h))

    whole, whole_state = mlstm_cell(q, k, v, input_preact, log_forget, fresh, chunk_size=8)
    first, state = mlstm_cell(q[:, :cut], k[:, :cut], v[:, :cut], input_preact[:, :cut], log_forget[:, :cut], fresh)
    second, state = mlstm_cell(q[:, cut:], k[:, cut:], v[:, cut:], input_preact[:, cut:], log_forget[:, cut:], state)
    steps, step_state = [], fresh
    for i in range(t):
        h_t, step_state = mlstm_cell_step(q[:, i], k[:, i], v[:, i], input_preact[:, i], log_forget[:, i], step_state)
        steps.append(h_t)

    for got in (whole, torch.cat([first, second], 1), torch.stack(steps, 1)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    for got_memory, got_normaliser, stabiliser in (whole_state, state, step_state):
        unscale = torch.exp(-stabiliser.double())  # C̄ = exp(-m) C
        torch.testing.assert_close(got_memory.double(), memory * unscale[..., None, None], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_normaliser.double(), normaliser * unscale[..., None], rtol=1e-4, atol=1e-5)


def test_mlstm_gradients_stay_finite_under_huge_input_gates():
    torch.manual_seed(0)
    mixer = build_mixer("mlstm", DIM)
    with torch.no_grad():
        mixer.input_gate.bias.fill_(500.0)  # exp(500) overflows even float64
    y, state = mixer(torch.randn(2, 11, DIM))
    (y.pow(2).mean() + state[1].pow(2).mean()).backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for p in mixer.parameters() if p.grad is not None)
