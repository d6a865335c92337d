"""Chimera's 2-D SSM mixer on grids (variates x time): shapes, causality in time (and not along the
variates), streaming a grid column by column, the cross-variate ablation, the directions,
untied couplings, bad input. The 1-D contract is covered by test_mixer_harness.py."""

from __future__ import annotations

import pytest
import torch

from seqapps.backbones.mixer import build_mixer
from seqapps.backbones.streaming import StepModule
from seqapps.errors import InputError

DIM, BATCH, V, T = 16, 2, 3, 9
SMALL = {"d_state": 4, "expand": 2}
TREND_SEASONAL = {"trend": (1e-3, 1e-2), "seasonal": (0.1, 1.0)}


def make(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mixer("chimera", DIM, **{**SMALL, **kwargs}).eval()


def grid(seed: int = 1, v: int = V, t: int = T) -> torch.Tensor:
    return torch.randn(BATCH, v, t, DIM, generator=torch.Generator().manual_seed(seed))


def test_grid_forward_shapes_and_a_sequence_is_a_grid_of_one_variate():
    mixer = make()
    with torch.no_grad():
        y, state = mixer(grid())
        y_seq, state_seq = mixer(grid(v=1)[:, 0])
        y_one, _ = mixer(grid(v=1))
    assert y.shape == (BATCH, V, T, DIM)
    assert [list(s.shape) for s in state] == [[BATCH, V, 32, 3], [BATCH, V, 2, 32, 4], [BATCH, V, 2, 32, 4]]
    assert y_seq.shape == (BATCH, T, DIM) and state_seq[1].shape == (BATCH, 1, 2, 32, 4)
    torch.testing.assert_close(y_seq, y_one[:, 0])


def test_causal_in_time_and_both_ways_along_the_variates():
    mixer, x = make(), grid()
    changed = x.clone()
    changed[:, 1, 5] += 1.0  # the middle variate at time 5
    with torch.no_grad():
        diff = (mixer(changed)[0] - mixer(x)[0]).abs().amax(dim=(0, 3))  # [V, T]
    assert diff[:, :5].max() == 0          # nothing earlier in time
    assert (diff[:, 5:] > 0).all()         # every variate, above and below, from time 5 on


def test_top_down_only_when_not_bidirectional():
    mixer, x = make(bidirectional=False), grid()
    changed = x.clone()
    changed[:, 1, 5] += 1.0
    with torch.no_grad():
        diff = (mixer(changed)[0] - mixer(x)[0]).abs().amax(dim=(0, 3))
    assert diff[0].max() == 0 and (diff[1:, 5:] > 0).all()


@pytest.mark.parametrize("heads", [None, TREND_SEASONAL])
def test_streaming_a_grid_column_by_column_equals_the_whole_grid(heads):
    mixer, x = make(num_variates=V, heads=heads), grid()
    with torch.no_grad():
        y, final = mixer(x)
        state, pieces = None, []
        for a, b in ((0, 1), (1, 5), (5, T)):
            y_piece, state = mixer(x[:, :, a:b], state)
            pieces.append(y_piece)
        step_state, steps = mixer.init_state(BATCH), []
        for j in range(T):
            y_t, step_state = mixer.step(x[:, :, j], step_state)
            steps.append(y_t)
    torch.testing.assert_close(torch.cat(pieces, 2), y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 2), y, rtol=1e-4, atol=1e-5)
    for whole, carried, stepped in zip(final, state, step_state):
        torch.testing.assert_close(carried, whole, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stepped, whole, rtol=1e-4, atol=1e-5)


def test_grid_step_exports():
    mixer = make(num_variates=V)
    step = StepModule(mixer).eval()
    state = tuple(torch.randn_like(s) * 0.1 for s in mixer.init_state(BATCH))
    x_t = torch.randn(BATCH, V, DIM)
    with torch.no_grad():
        expected = step(x_t, *state)
    exported = torch.export.export(step, (x_t, *state))
    for got, want in zip(exported.module()(x_t, *state), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_grid_forward_exports_with_a_dynamic_batch():
    class Forward(torch.nn.Module):
        def __init__(self, mixer):
            super().__init__()
            self.mixer = mixer

        def forward(self, x):
            return self.mixer(x)[0]

    model = Forward(make()).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (grid(),), dynamic_shapes=({0: batch},))
    x = torch.randn(BATCH + 1, V, T, DIM)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_without_the_cross_variate_path_variates_are_independent():
    with_cross, without = make(), make(cross_variate=False)
    without.load_state_dict(with_cross.state_dict())  # the same weights; only the path differs
    x = grid()
    changed = x.clone()
    changed[:, 0] += 1.0  # the first variate, at every time
    with torch.no_grad():
        y_cross, y_alone = with_cross(x)[0], without(x)[0]
        moved_cross = (with_cross(changed)[0] - y_cross).abs().amax(dim=(0, 2, 3))  # [V]
        moved_alone = (without(changed)[0] - y_alone).abs().amax(dim=(0, 2, 3))
        each_as_a_sequence = torch.stack([without(x[:, i])[0] for i in range(V)], 1)
    assert not torch.allclose(y_alone, y_cross, rtol=1e-3, atol=1e-4)
    assert (moved_cross[1:] > 0).all()                       # with the path, the others see variate 0
    assert moved_alone[0] > 0 and moved_alone[1:].max() == 0  # without it, they do not
    torch.testing.assert_close(y_alone, each_as_a_sequence, rtol=1e-5, atol=1e-6)


def test_each_axis_has_its_own_initial_step_range_and_the_variate_one_opens_the_cross_path():
    import torch.nn.functional as F

    mixer = make()
    for direction in mixer.directions:
        dt_time = F.softplus(direction.dt_proj_time.bias)
        dt_variate = F.softplus(direction.dt_proj_variate.bias)
        assert 1e-3 * 0.99 <= dt_time.min() and dt_time.max() <= 0.1 * 1.01        # Mamba's range along time
        assert 0.1 * 0.99 <= dt_variate.min() and dt_variate.max() <= 1.0 * 1.01   # larger along the variates
    # what one variate's state passes to the next row (ZOH along the variates): hold^v * coupling
    direction = mixer.directions[0]
    A_variate, coupling = -torch.exp(direction.A_variate_log), direction.time_from_variate

    def coupling_gain(dt_bias):
        dt = F.softplus(dt_bias)[:, None]
        return (torch.expm1(dt * A_variate) / A_variate * coupling).median()

    narrow = make(dt_min_variate=1e-3, dt_max_variate=0.1).directions[0]
    assert coupling_gain(direction.dt_proj_variate.bias) > 0.1 > 0.05 > coupling_gain(narrow.dt_proj_variate.bias)
    with pytest.raises(InputError, match="dt_min"):
        make(dt_min_variate=1.0, dt_max_variate=0.5)


def test_trend_and_seasonal_heads_have_their_own_steps_along_time_and_all_train():
    import torch.nn.functional as F

    mixer = make(heads=TREND_SEASONAL).train()
    assert list(mixer.heads) == ["trend", "seasonal"] and len(mixer.directions) == 4  # 2 heads x 2 directions
    assert len(mixer.init_state(BATCH, num_variates=V)) == 1 + 4
    for index, (low, high) in enumerate([TREND_SEASONAL["trend"]] * 2 + [TREND_SEASONAL["seasonal"]] * 2):
        dt_time = F.softplus(mixer.directions[index].dt_proj_time.bias)
        assert low * 0.99 <= dt_time.min() and dt_time.max() <= high * 1.01
    # the seasonal head forgets faster: its output hardly reads a change made long ago, the trend head's does
    x = grid(t=60)
    changed = x.clone()
    changed[:, :, 0] += 3.0
    with torch.no_grad():
        heads_response = []
        for head in (0, 2):  # the first direction of each head, on the grid's first channel as its input
            direction = mixer.directions[head]
            y_x, _ = mixer._scan(direction, x[..., :1].expand(-1, -1, -1, mixer.d_inner).contiguous(),
                                 mixer.init_state(BATCH, num_variates=V)[1 + head], False, "auto")
            y_c, _ = mixer._scan(direction, changed[..., :1].expand(-1, -1, -1, mixer.d_inner).contiguous(),
                                 mixer.init_state(BATCH, num_variates=V)[1 + head], False, "auto")
            heads_response.append((y_c - y_x)[:, :, -1].abs().mean().item())
    trend_response, seasonal_response = heads_response
    assert trend_response > 10 * seasonal_response
    y, _ = mixer(grid())
    y.pow(2).mean().backward()
    missing = [n for n, p in mixer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"
    for bad in ({}, {"trend": (0.1,)}, {"trend": (0.1, 0.01)}, ["trend"], {"trend": ("a", 1)}, {"trend": [[1], 2]},
                {"trend": "ab"}):
        with pytest.raises(InputError, match="heads=|head 'trend'"):
            make(heads=bad)


def test_untied_couplings_all_train_on_a_grid():
    mixer = make(tied_coupling=False).train()
    y, _ = mixer(grid())
    y.pow(2).mean().backward()
    names = [n for n, _ in mixer.named_parameters()]
    assert "directions.0.variate_from_time" in names
    missing = [n for n, p in mixer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"


def test_bad_input_one_line():
    mixer = make(num_variates=V)
    with pytest.raises(InputError, match=r"\[batch, variates, time, channels\] with 16 channels"):
        mixer(torch.randn(BATCH, V, 2, T, DIM))
    with pytest.raises(InputError, match=r"expects one time column x_t of shape \[batch, 3, 16\]"):
        mixer.step(torch.randn(BATCH, V + 1, DIM), mixer.init_state(BATCH))
    _, state = mixer(grid())
    with pytest.raises(InputError, match="2 variates"):
        mixer(grid(v=2), state)
    with pytest.raises(InputError, match="num_variates=0"):
        make(num_variates=0)
