"""What the mixer harness cannot see in RWKV-6 and HGRN-2: each layer against a plain loop written
from its paper's equations (no kernel), and HGRN-2's forget gate held at its lower bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqapps.backbones.mixer import build_mixer
from seqapps.backbones.streaming import run_steps
from seqapps.errors import InputError

DIM, BATCH, T = 32, 2, 11


def naive_rwkv6(layer, x: torch.Tensor, previous: torch.Tensor, memory: torch.Tensor):
    """RWKV-6 time mixing for ``x [B, T, C]`` from the Finch paper, token by token: ddlerp with
    one LoRA per target, ``w_t = exp(-exp(d_t))``, ``wkv_t = S_{t-1} + diag(u) k_tᵀ v_t``,
    ``S_t = diag(w_t) S_{t-1} + k_tᵀ v_t``, per-head GroupNorm, SiLU gate."""
    H, K, R = layer.num_heads, layer.head_dim, layer.mix_rank
    A = {name: layer.mix_down[:, i * R:(i + 1) * R] for i, name in enumerate("wkvrg")}
    B = {name: layer.mix_up[i] for i, name in enumerate("wkvrg")}
    lam = {name: layer.mix_bias[i] for i, name in enumerate("wkvrg")}
    outputs = []
    for t in range(x.shape[1]):
        a, b = x[:, t], previous
        z = a + (b - a) * layer.mix_x
        ddlerp = {name: a + (b - a) * (lam[name] + torch.tanh(z @ A[name]) @ B[name]) for name in "wkvrg"}
        r = layer.receptance(ddlerp["r"]).view(-1, H, K)
        k = layer.key(ddlerp["k"]).view(-1, H, K)
        v = layer.value(ddlerp["v"]).view(-1, H, K)
        d = layer.decay_bias + torch.tanh(ddlerp["w"] @ layer.decay_down) @ layer.decay_up
        w = torch.exp(-torch.exp(d)).view(-1, H, K)
        kv = k.unsqueeze(-1) * v.unsqueeze(-2)  # k_tᵀ v_t: [B, H, K, K]
        wkv = memory + layer.bonus.unsqueeze(-1) * kv
        o = torch.einsum("bhk,bhkv->bhv", r, wkv).reshape(-1, H * K)
        memory = w.unsqueeze(-1) * memory + kv
        gate = F.silu(layer.gate(ddlerp["g"]))
        outputs.append(layer.o_proj(F.group_norm(o, H, layer.out_norm.weight, layer.out_norm.bias,
                                                 layer.out_norm.eps) * gate))
        previous = x[:, t]
    return torch.stack(outputs, 1), previous, memory


def naive_hgrn2(layer, x: torch.Tensor, memory: torch.Tensor):
    """HGRN-2 for ``x [B, T, C]`` from the paper, token by token:
    ``f = β + (1 - β) σ(·)``, ``S_t = diag(f_t) S_{t-1} + (1 - f_t) i_tᵀ``, ``h_t = o_tᵀ S_t``."""
    H, E, V, beta = layer.num_heads, layer.expand_ratio, layer.head_v_dim, layer.lower_bound
    outputs = []
    for t in range(x.shape[1]):
        f = (beta + (1 - beta) * torch.sigmoid(layer.forget_proj(x[:, t]))).view(-1, H, E)
        i = F.silu(layer.input_proj(x[:, t])).view(-1, H, V)
        o = torch.sigmoid(layer.output_gate_proj(x[:, t])).view(-1, H, E)
        memory = f.unsqueeze(-1) * memory + (1 - f).unsqueeze(-1) * i.unsqueeze(-2)
        h = torch.einsum("bhe,bhev->bhv", o, memory)
        outputs.append(layer.out_proj(layer.out_norm(h).flatten(-2)))
    return torch.stack(outputs, 1), memory


def test_rwkv6_equals_the_papers_loop():
    """Whole-sequence forward (the kernel with shifted receptances) and ``step`` against the loop,
    from a non-zero state, with LoRAs large enough that every data-dependent path matters."""
    torch.manual_seed(0)
    layer = build_mixer("rwkv6", DIM, num_heads=4, mix_rank=4, decay_rank=8, layer_idx=1, num_layers=3).double()
    with torch.no_grad():
        for p in (layer.mix_down, layer.mix_up, layer.decay_down, layer.decay_up):
            p.normal_(0, 0.3)
    x = torch.randn(BATCH, T, DIM, dtype=torch.float64)
    previous = torch.randn(BATCH, DIM, dtype=torch.float64)
    memory = 0.3 * torch.randn(BATCH, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want, want_previous, want_memory = naive_rwkv6(layer, x, previous, memory)
        got, (got_previous, got_memory) = layer(x, (previous, memory))
        stepped, (_, stepped_memory) = run_steps(layer, x, (previous, memory))
    for y in (got, stepped):
        torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got_previous, want_previous)
    for m in (got_memory, stepped_memory):
        torch.testing.assert_close(m, want_memory, rtol=1e-9, atol=1e-10)


def test_rwkv6_paper_initialisation_spans_the_decays():
    layer = build_mixer("rwkv6", DIM)
    w = torch.exp(-torch.exp(layer.decay_bias))
    torch.testing.assert_close(w[[0, -1]], torch.exp(-torch.exp(torch.tensor([-6.0, -1.0]))))
    assert torch.all(w[1:] < w[:-1])  # channels range from slow to fast decay


@pytest.mark.parametrize("lower_bound", [0.0, 0.4])
def test_hgrn2_equals_the_papers_loop(lower_bound):
    torch.manual_seed(0)
    layer = build_mixer("hgrn2", DIM, lower_bound=lower_bound).double()
    x = torch.randn(BATCH, T, DIM, dtype=torch.float64)
    memory = torch.randn(BATCH, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want, want_memory = naive_hgrn2(layer, x, memory)
        got, (got_memory,) = layer(x, (memory,))
        stepped, (stepped_memory,) = run_steps(layer, x, (memory,))
    for y, m in ((got, got_memory), (stepped, stepped_memory)):
        torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(m, want_memory, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("lower_bound", [0.0, 0.25, 0.9])
def test_hgrn2_forget_gate_respects_its_lower_bound(lower_bound):
    """Gates of random inputs lie in [β, 1) with the key exactly 1 - f; and a forget logit of -800
    with zero input (σ underflows to 0) shrinks the state by exactly β per token."""
    torch.manual_seed(0)
    layer = build_mixer("hgrn2", DIM, lower_bound=lower_bound).double()
    x = 5 * torch.randn(BATCH, T, DIM, dtype=torch.float64)
    with torch.no_grad():
        log_forget, key = layer.forget_gate(x)
    forget = log_forget.exp()
    assert forget.min() >= lower_bound and forget.max() < 1
    torch.testing.assert_close(key, 1 - forget)

    with torch.no_grad():
        layer.forget_proj.weight.zero_()
        layer.forget_proj.bias.fill_(-800.0)
        layer.input_proj.weight.zero_()
        layer.input_proj.bias.zero_()  # i = SiLU(0) = 0: nothing enters the state
        memory = torch.randn(BATCH, 4, 8, 8, dtype=torch.float64)
        _, (after,) = layer(x, (memory,))
    # the chunk kernel floors decay exponents at -80 (e^-80 ≈ 2e-35): "exactly 0" is below 1e-30
    torch.testing.assert_close(after, lower_bound ** T * memory, rtol=1e-12, atol=1e-30)


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("rwkv6", {"num_heads": 5}, "num_heads=5 must divide dim=32"),
    ("rwkv6", {"layer_idx": 3, "num_layers": 3}, "layer_idx=3"),
    ("hgrn2", {"expand_ratio": 5}, "expand_ratio=5 must divide dim=32"),
    ("hgrn2", {"lower_bound": 1.0}, "lower_bound=1.0"),
])
def test_bad_options_one_line(name, kwargs, message):
    with pytest.raises(InputError, match=message):
        build_mixer(name, DIM, **kwargs)
