"""DLinear: the trend/seasonal split, the two linear maps, channel modes."""

from __future__ import annotations

import pytest
import torch

from seqapps.errors import InputError
from seqapps.tasks.forecasting.dlinear import DLinear, moving_average


@pytest.mark.parametrize("kernel_size", [25, 4, 1])
def test_decomposition_sums_to_the_input_and_the_trend_is_a_moving_average(kernel_size):
    model = DLinear(seq_len=48, pred_len=12, n_in=2, n_out=2, kernel_size=kernel_size)
    x = torch.randn(3, 48, 2)
    seasonal, trend = model.decompose(x)
    assert seasonal.shape == trend.shape == x.shape
    assert torch.allclose(seasonal + trend, x, atol=1e-6)
    # away from the ends, the trend is the plain centred mean of kernel_size values
    front = (kernel_size - 1) // 2
    t = 20
    window = x[:, t - front:t - front + kernel_size]
    assert torch.allclose(trend[:, t], window.mean(1), atol=1e-6)


def test_trend_of_a_line_is_the_line_and_of_a_season_is_flat():
    t = torch.arange(96, dtype=torch.float32)
    line = (0.5 * t + 3)[None, :, None]
    assert torch.allclose(moving_average(line, 25)[:, 12:-12], line[:, 12:-12], atol=1e-4)
    season = torch.sin(2 * torch.pi * t / 24)[None, :, None]  # a 24-step average removes it
    assert moving_average(season, 24)[:, 12:-12].abs().max() < 1e-5


def test_forecast_is_the_sum_of_two_linear_maps_and_starts_at_the_mean():
    model = DLinear(seq_len=16, pred_len=4, n_in=3, n_out=3, kernel_size=5)
    with torch.no_grad():
        model.seasonal_bias.zero_()
        model.trend_bias.zero_()
    x = torch.randn(2, 16, 3)
    # initial weights 1/seq_len: every output is the lookback's mean (seasonal + trend = x)
    assert torch.allclose(model(x), x.mean(1, keepdim=True).expand(-1, 4, -1), atol=1e-5)
    # channel independence, and MS is the last channel
    assert torch.allclose(model(x)[..., 0], model(x[..., [0, 0, 0]])[..., 0], atol=1e-6)
    ms = DLinear(seq_len=16, pred_len=4, n_in=3, n_out=1, kernel_size=5)
    ms.load_state_dict(model.state_dict())
    assert torch.allclose(ms(x), model(x)[..., -1:])
    # individual: one pair of layers per channel
    ind = DLinear(seq_len=16, pred_len=4, n_in=3, n_out=3, kernel_size=5, individual=True)
    with torch.no_grad():
        ind.seasonal_weight[1] *= 2
    assert not torch.allclose(ind(x)[..., 1], ind(x[..., [1, 1, 1]])[..., 0])


def test_bad_input_gives_one_clear_line():
    with pytest.raises(InputError, match="n_out must be 1"):
        DLinear(16, 4, n_in=3, n_out=2)
    with pytest.raises(InputError, match="kernel_size >= 1"):
        DLinear(16, 4, kernel_size=0)
    with pytest.raises(InputError, match=r"expects x of shape \[batch, 16, 1\]"):
        DLinear(16, 4)(torch.randn(2, 15, 1))
