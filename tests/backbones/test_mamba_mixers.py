"""What the mixer harness cannot see in Mamba and Mamba-2: the paper's initialisation, the
[-1, 1] eigenvalue option really reaching -1, and Mamba-2's mapping of SSD onto gated linear
attention against a plain SSD loop written from the paper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqapps.backbones.mixer import build_mixer
from seqapps.backbones.streaming import run_steps
from seqapps.errors import InputError

DIM = 32


def test_mamba_initialisation_follows_the_paper():
    torch.manual_seed(0)
    mamba = build_mixer("mamba", DIM, d_state=8)
    A = -torch.exp(mamba.A_log)
    torch.testing.assert_close(A, -torch.arange(1.0, 9.0).expand(2 * DIM, 8))  # S4D-real
    dt = F.softplus(mamba.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert mamba.dt_rank == 2 and mamba.x_proj.out_features == 2 + 2 * 8


@pytest.mark.parametrize("negative", [False, True])
def test_mamba_transition_reaches_minus_one_only_with_negative_eigenvalues(negative):
    """With zero input after a zero conv cache, the SSM input is 0 and one token maps the state
    h to a·h: a = 2·exp(Δ A) - 1 = -1 (flip) for large Δ with the option, exp(Δ A) = 0 without;
    a small Δ keeps a = 1 either way."""
    torch.manual_seed(0)
    mamba = build_mixer("mamba", DIM, d_state=4, negative_eigenvalues=negative).eval()
    with torch.no_grad():
        mamba.conv.conv.bias.zero_()
        mamba.dt_proj.weight.zero_()
        mamba.A_log.zero_()  # A = -1
    conv_cache, _ = mamba.init_state(2)
    h0 = torch.randn(2, 2 * DIM, 4)
    x = torch.zeros(2, 3, DIM)
    for bias, per_step in ((30.0, -1.0 if negative else 0.0), (-30.0, 1.0)):
        with torch.no_grad():
            mamba.dt_proj.bias.fill_(bias)  # Δ = softplus(±30): 30 or ~1e-13
            _, (_, h_forward) = mamba(x, (conv_cache, h0))
            _, (_, h_steps) = run_steps(mamba, x, (conv_cache, h0))
        torch.testing.assert_close(h_forward, per_step ** 3 * h0)
        torch.testing.assert_close(h_steps, per_step ** 3 * h0)


def naive_mamba2(layer, x: torch.Tensor) -> torch.Tensor:
    """Mamba-2 for ``x [B, T, C]`` straight from the paper: the SSD recurrence as a loop over
    time with state ``h [B, H, P, N]``, gate then grouped RMSNorm, no linear-attention kernel."""
    heads, P, N, G = layer.num_heads, layer.headdim, layer.d_state, layer.ngroups
    z, xBC, dt = layer.in_proj(x).split([layer.d_inner, layer.conv_channels, heads], dim=-1)
    xBC, _ = layer.conv(xBC)
    u, B, C = xBC.split([layer.d_inner, G * N, G * N], dim=-1)
    u, B, C = u.unflatten(-1, (heads, P)), B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N))
    dt = F.softplus(dt + layer.dt_bias)  # [B, T, H]
    A = -torch.exp(layer.A_log)  # [H]
    group_of_head = torch.arange(heads) // (heads // G)
    h = torch.zeros(x.shape[0], heads, P, N)
    ys = []
    for t in range(x.shape[1]):
        B_t, C_t = B[:, t, group_of_head], C[:, t, group_of_head]  # [B, H, N]
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + (dt[:, t, :, None] * u[:, t])[..., None] * B_t[:, :, None]
        ys.append((h * C_t[:, :, None]).sum(-1) + layer.D[:, None] * u[:, t])  # [B, H, P]
    y = torch.stack(ys, 1).flatten(-2) * F.silu(z)  # [B, T, E]
    grouped = y.unflatten(-1, (G, -1))
    y = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + layer.norm_eps)).flatten(-2)
    return layer.out_proj(y * layer.norm_weight)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_mamba2_gla_mapping_equals_a_naive_ssd_loop(ngroups):
    torch.manual_seed(0)
    layer = build_mixer("mamba2", DIM, d_state=8, ngroups=ngroups).eval()
    with torch.no_grad():
        layer.norm_weight.uniform_(0.5, 1.5)
        layer.D.uniform_(-1, 1)
        layer.dt_bias.uniform_(-2, 2)  # step sizes well beyond the initial [1e-3, 0.1]
    x = torch.randn(2, 23, DIM)
    with torch.no_grad():
        expected = naive_mamba2(layer, x)
        y, _ = layer(x)
        y_steps, _ = run_steps(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_steps, expected, rtol=1e-4, atol=1e-5)


def test_mamba2_initialisation_and_bad_sizes():
    torch.manual_seed(0)
    layer = build_mixer("mamba2", DIM)
    assert layer.num_heads == 4 and layer.headdim == 16
    minus_A = torch.exp(layer.A_log)
    assert minus_A.min() >= 1 and minus_A.max() <= 16
    dt = F.softplus(layer.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    with pytest.raises(InputError, match="headdim=24 does not divide the 64 inner channels"):
        build_mixer("mamba2", DIM, headdim=24)
    with pytest.raises(InputError, match="ngroups=3"):
        build_mixer("mamba2", DIM, ngroups=3)
