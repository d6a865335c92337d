"""LightNet (Qin et al., 2024): the additive recurrence against a naive normalised cumulative sum,
MD-TPE and MD-LRPE on grids, a 2-D grid against a naive computation, and streaming a grid along
its last axis. (The 1-D contract is in test_mixer_harness.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqapps.backbones.mixer import build_mixer
from seqapps.backbones.mixers.lightnet import (
    LightNet,
    MultiDimToeplitzPE,
    additive_recurrence,
    grid_coordinates,
    md_lrpe_angles,
)
from seqapps.errors import InputError

TOL = dict(rtol=1e-4, atol=1e-5)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def naive_normalised_cumsum(q, k, v):
    """``S_t = Σ_{s≤t} exp(k_s) v_sᵀ / Σ_{s≤t} exp(k_s)`` by plain cumulative sums: (o, S_T)."""
    weights = torch.exp(k)
    numerator = torch.cumsum(weights.unsqueeze(-1) * v.unsqueeze(-2), dim=1)  # [B, L, H, K, V]
    states = numerator / torch.cumsum(weights, dim=1).unsqueeze(-1)
    return torch.einsum("blhk,blhkv->blhv", q, states), states[:, -1]


@pytest.mark.parametrize("backend", ["auto", "recurrent"])
def test_additive_recurrence_is_a_normalised_cumulative_sum(backend):
    q, k, v = randn(2, 37, 3, 4, seed=1), 3 * randn(2, 37, 3, 4, seed=2), randn(2, 37, 3, 5, seed=3)
    expected, expected_state = naive_normalised_cumsum(q.double(), k.double(), v.double())
    o, state, log_normaliser = additive_recurrence(q, k, v, backend=backend)
    torch.testing.assert_close(o, expected.float(), **TOL)
    torch.testing.assert_close(state, expected_state.float(), **TOL)
    torch.testing.assert_close(log_normaliser, torch.logsumexp(k, dim=1), **TOL)
    # cut anywhere, carry (state, log-normaliser): the same
    first = additive_recurrence(q[:, :10], k[:, :10], v[:, :10], backend=backend)
    second = additive_recurrence(q[:, 10:], k[:, 10:], v[:, 10:], None, first[1], first[2], backend=backend)
    torch.testing.assert_close(torch.cat([first[0], second[0]], 1), o, **TOL)
    torch.testing.assert_close(second[1], state, **TOL)


def test_additive_recurrence_with_angles_is_the_relative_cosine_form():
    f64 = torch.float64
    q, k = randn(1, 9, 2, 4, seed=4, dtype=f64), randn(1, 9, 2, 4, seed=5, dtype=f64)
    v = randn(1, 9, 2, 3, seed=6, dtype=f64)
    angles = randn(1, 9, 2, 4, seed=7, dtype=f64)
    o, state, _ = additive_recurrence(q, k, v, angles)
    assert state.shape == (1, 2, 8, 3)  # cos and sin halves of the keys
    expected = torch.zeros(1, 9, 2, 3, dtype=f64)
    for t in range(9):
        share = torch.softmax(k[:, : t + 1], dim=1)  # exp(k_s) / Λ_t, per key dimension
        relative = torch.cos(angles[:, t : t + 1] - angles[:, : t + 1])
        scores = (q[:, t : t + 1] * share * relative).sum(-1)  # [1, t+1, H]
        expected[:, t] = torch.einsum("bsh,bshv->bhv", scores, v[:, : t + 1])
    torch.testing.assert_close(o, expected, rtol=1e-9, atol=1e-10)


def test_grid_coordinates_are_time_major_and_offset_in_time():
    coords = grid_coordinates((3,), 4, torch.tensor([0.0, 5.0]))
    assert coords.shape == (2, 12, 2)
    for t in range(4):
        for r in range(3):
            assert coords[1, t * 3 + r].tolist() == [r, t + 5]
    assert grid_coordinates((), 3, torch.zeros(1))[0, :, 0].tolist() == [0, 1, 2]
    assert grid_coordinates((2, 3), 2, torch.zeros(1)).shape == (1, 12, 3)


def test_md_lrpe_shares_key_dimensions_among_the_axes_and_is_relative():
    theta = torch.rand(2, 6) + 0.1
    coords = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # origin, one row down, one step later
    angles = md_lrpe_angles(theta, coords)
    assert angles.shape == (1, 3, 2, 6)
    row_dims, time_dims = slice(0, None, 2), slice(1, None, 2)
    moved_row, moved_time = angles[0, 1] - angles[0, 0], angles[0, 2] - angles[0, 0]
    assert (moved_row[:, row_dims] != 0).all() and (moved_row[:, time_dims] == 0).all()
    assert (moved_time[:, time_dims] != 0).all() and (moved_time[:, row_dims] == 0).all()

    def score(query_at, key_at):  # q·k after MD-LRPE, as the recurrence forms it
        q, k = randn(2, 6, seed=8), randn(2, 6, seed=9)
        a_q = md_lrpe_angles(theta, torch.tensor([[query_at]]))[0, 0]
        a_k = md_lrpe_angles(theta, torch.tensor([[key_at]]))[0, 0]
        return (torch.cat([q * a_q.cos(), q * a_q.sin()], -1) * torch.cat([k * a_k.cos(), k * a_k.sin()], -1)).sum(-1)

    torch.testing.assert_close(score([2.0, 5.0], [1.0, 3.0]), score([4.0, 9.0], [3.0, 7.0]))  # same offset
    assert not torch.allclose(score([2.0, 5.0], [1.0, 3.0]), score([2.0, 5.0], [0.0, 3.0]))  # other row offset


@pytest.mark.parametrize("grid", [(3, 5), (2, 3, 4)])
def test_md_tpe_mixes_causally_along_each_axis_only(grid):
    torch.manual_seed(0)
    tpe = MultiDimToeplitzPE(dim=8, num_heads=2, max_grid_ndim=3)
    x = randn(1, *grid, 8, seed=10)
    where = tuple(n // 2 for n in grid)
    changed = x.clone()
    changed[(0, *where)] += 1.0
    state = torch.zeros(1, *grid[:-1], 8)
    with torch.no_grad():
        y, new_state = tpe(x, state, "auto")
        y2, _ = tpe(changed, state, "auto")
    assert y.shape == x.shape and new_state.shape == state.shape
    moved = (y2 - y).abs().sum(-1)[0] > 0
    index = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij"), -1)
    same = index == torch.tensor(where)
    later = index >= torch.tensor(where)
    # the Toeplitz sum along axis a reaches positions equal to `where` on every other axis, later on a
    expected = torch.zeros(grid, dtype=torch.bool)
    for axis in range(len(grid)):
        others = torch.cat([same[..., :axis], same[..., axis + 1:]], -1).all(-1)
        expected |= others & later[..., axis]
    assert torch.equal(moved, expected)


def test_md_tpe_sums_one_toeplitz_per_axis_with_its_own_decay():
    torch.manual_seed(0)
    tpe = MultiDimToeplitzPE(dim=4, num_heads=2, max_grid_ndim=3)
    with torch.no_grad():
        tpe.decay_logits.copy_(torch.tensor([[0.0, 1.0], [-1.0, 2.0], [0.5, -0.5]]))
        x = randn(1, 2, 3, 4, 4, seed=15)  # [B, A1, A2, T, C]
        y, _ = tpe(x, torch.zeros(1, 2, 3, 4), "auto")
    decay = torch.sigmoid(tpe.decay_logits)  # row 0: time (x dim 3), row 1: x dim 2, row 2: x dim 1
    heads = torch.arange(4) // 2  # channel -> head
    mixed = torch.zeros_like(x)
    for dim, row in ((1, 2), (2, 1), (3, 0)):
        size = x.shape[dim]
        for i in range(size):
            for j in range(i + 1):
                mixed.select(dim, i).add_(decay[row, heads] ** (i - j) * x.select(dim, j))
    torch.testing.assert_close(y, x + tpe.proj(tpe.norm(mixed)), **TOL)


def naive_lightnet_2d(mixer: LightNet, x: torch.Tensor) -> torch.Tensor:
    """The layer on ``x [B, R, T, C]`` written position by position (no kernels, no state)."""
    batch, rows, steps, channels = x.shape
    heads, size = mixer.num_heads, mixer.head_dim
    decay = torch.sigmoid(mixer.tpe.decay_logits)  # [axes, H]: row 0 time, row 1 the rows
    mixed = torch.zeros_like(x)
    for r in range(rows):
        for t in range(steps):
            for h in range(heads):
                ch = slice(h * size, (h + 1) * size)
                along_time = sum(decay[0, h] ** (t - s) * x[:, r, s, ch] for s in range(t + 1))
                along_rows = sum(decay[1, h] ** (r - s) * x[:, s, t, ch] for s in range(r + 1))
                mixed[:, r, t, ch] = along_time + along_rows
    x = x + mixer.tpe.proj(mixer.tpe.norm(mixed))
    order = [(r, t) for t in range(steps) for r in range(rows)]  # time-major scan
    scan = torch.stack([x[:, r, t] for r, t in order], 1)
    q = F.silu(mixer.q_proj(scan)).view(batch, -1, heads, size)
    k = mixer.k_proj(scan).view(batch, -1, heads, size)
    v = mixer.v_proj(scan).view(batch, -1, heads, size)
    coords = torch.tensor(order, dtype=torch.float32)[:, torch.arange(size) % 2]  # [L, K]: axis j mod 2
    out = torch.zeros_like(v)
    for p in range(len(order)):
        weights = torch.exp(k[:, : p + 1]) / torch.exp(k[:, : p + 1]).sum(1, keepdim=True)  # [B, p+1, H, K]
        relative = torch.cos(mixer.theta * (coords[p] - coords[: p + 1]).unsqueeze(1))  # [p+1, H, K]
        scores = (q[:, p : p + 1] * weights * relative).sum(-1)  # [B, p+1, H]
        out[:, p] = torch.einsum("bsh,bshv->bhv", scores, v[:, : p + 1])
    gate = torch.sigmoid(mixer.gate_proj(scan))
    y = mixer.o_proj(mixer.output_norm(out.reshape(batch, -1, channels)) * gate)
    grid = torch.zeros_like(x)
    for i, (r, t) in enumerate(order):
        grid[:, r, t] = y[:, i]
    return grid


def test_2d_grid_matches_a_naive_computation():
    torch.manual_seed(0)
    mixer = LightNet(8, num_heads=2, column_shape=(3,)).eval()
    with torch.no_grad():
        mixer.theta.mul_(torch.rand_like(mixer.theta) * 20)  # angles that matter on a small grid
        mixer.tpe.decay_logits.add_(torch.randn_like(mixer.tpe.decay_logits))  # axes with their own decays
        x = randn(2, 3, 4, 8, seed=11)
        y, _ = mixer(x)
        torch.testing.assert_close(y, naive_lightnet_2d(mixer, x), **TOL)


@pytest.mark.parametrize("column", [(3,), (2, 2)])
def test_streaming_along_the_last_axis_equals_the_whole_grid(column):
    torch.manual_seed(0)
    mixer = build_mixer("lightnet", 16, column_shape=column).eval()
    x = randn(2, *column, 7, 16, seed=12)
    with torch.no_grad():
        y, final = mixer(x)
        state, pieces = None, []
        for a, b in ((0, 2), (2, 3), (3, 7)):
            y_piece, state = mixer(x[..., a:b, :], state)
            pieces.append(y_piece)
        step_state, steps = mixer.init_state(2), []
        for t in range(7):
            y_t, step_state = mixer.step(x[..., t, :], step_state)
            steps.append(y_t)
    assert y.shape == x.shape and final[-1].shape == (2, *column, 16)
    torch.testing.assert_close(torch.cat(pieces, -2), y, **TOL)
    torch.testing.assert_close(torch.stack(steps, -2), y, **TOL)
    for a, b, c in zip(final, state, step_state):
        torch.testing.assert_close(b, a, **TOL)
        torch.testing.assert_close(c, a, **TOL)


@pytest.mark.parametrize("options", [dict(use_tpe=False), dict(use_lrpe=False)])
def test_sequence_streaming_without_one_encoding(options):
    torch.manual_seed(0)
    mixer = build_mixer("lightnet", 16, **options).eval()
    x = randn(2, 9, 16, seed=13)
    with torch.no_grad():
        y, final = mixer(x)
        head, state = mixer(x[:, :4])
        tail, state = mixer(x[:, 4:], state)
    torch.testing.assert_close(torch.cat([head, tail], 1), y, **TOL)
    assert len(final) == (3 if options.get("use_tpe") is False else 4)


def test_one_scan_is_causal_in_scan_order_and_the_last_position_sees_the_whole_grid():
    torch.manual_seed(0)
    mixer = LightNet(16, column_shape=(3,)).eval()
    x = randn(1, 3, 4, 16, seed=14)
    with torch.no_grad():
        y, _ = mixer(x)
        for r, t in [(0, 0), (2, 0), (1, 2)]:
            changed = x.clone()
            changed[0, r, t] += 1.0
            y2, _ = mixer(changed)
            moved = (y2 - y).abs().sum(-1)[0] > 1e-6  # [R, T]
            scan_index = torch.arange(4).view(1, 4) * 3 + torch.arange(3).view(3, 1)
            assert not moved[scan_index < t * 3 + r].any()  # nothing earlier in the scan
            assert moved[2, 3]  # the last position in the scan sees every position


def test_grid_bad_input_one_line():
    mixer = LightNet(16, column_shape=(3,))
    with pytest.raises(InputError, match=r"column x_t of shape \[batch, 3, 16\]"):
        mixer.step(torch.randn(2, 4, 16), mixer.init_state(2))
    with pytest.raises(InputError, match="1 to 3 grid axes and 16 channels"):
        mixer(torch.randn(1, 2, 2, 2, 2, 16))
    _, state = mixer(torch.randn(2, 5, 3, 16))  # columns of 5, not 3
    with pytest.raises(InputError, match="state"):
        mixer(torch.randn(2, 3, 3, 16), state)
    with pytest.raises(InputError, match="num_heads=3 must divide dim=16"):
        LightNet(16, num_heads=3)
