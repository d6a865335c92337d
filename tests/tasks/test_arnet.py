"""AR-Net: the model, its regulariser, the baselines, and the paper's two claims."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from seqapps.config import compose
from seqapps.runs import load_module, resolve_checkpoint
from seqapps.tasks.forecasting.baselines import SeasonalNaive, classic_ar
from seqapps.tasks.forecasting.data import generate_ar
from seqapps.tasks.forecasting.metrics import stpe
from seqapps.tasks.forecasting.model import ARNet, ScaledForecaster, sparsity_lambda, sparsity_penalty
from seqapps.train import run_train


def test_linear_arnet_is_an_ar_model_lag_one_first():
    net = ARNet(n_lags=4, n_forecasts=2)
    with torch.no_grad():
        net.head.weight.copy_(torch.tensor([[0.5, -0.2, 0.1, 0.05], [0.3, 0.0, 0.0, 0.0]]))
        net.head.bias.zero_()
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).unsqueeze(-1)  # oldest first; lag 1 = 4.0
    out = net(x)
    assert out.shape == (1, 2, 1)
    assert torch.allclose(out[0, :, 0], torch.tensor([0.5 * 4 - 0.2 * 3 + 0.1 * 2 + 0.05 * 1, 0.3 * 4]))
    assert net.coefficients().shape == (2, 4)


def test_channel_modes_share_or_mix_channels():
    x = torch.randn(5, 6, 3)
    shared = ARNet(n_lags=6, n_forecasts=2, n_in=3, n_out=3)
    out = shared(x)
    assert out.shape == (5, 2, 3)
    # channel independence: channel c's forecast depends on channel c only
    assert torch.allclose(out[..., 1], shared(x[..., [1, 1, 1]])[..., 1])
    mixed = ARNet(n_lags=6, n_forecasts=2, n_in=3, n_out=1)
    assert mixed(x).shape == (5, 2, 1) and mixed.coefficients().shape == (2, 6, 3)


def test_sparsity_regulariser_matches_the_paper_formula():
    w = torch.tensor([0.0, 0.001, 0.5, -2.0])
    expected = (2 / (1 + torch.exp(-3 * w.abs() ** (1 / 3))) - 1).mean()
    assert torch.allclose(sparsity_penalty(w), expected)
    assert sparsity_penalty(torch.tensor([10.0])) > 0.99  # saturates for large weights
    assert sparsity_lambda(0.1) == pytest.approx(0.02 * 9)


def test_baselines():
    x = torch.arange(48.0).reshape(1, 48, 1)
    naive = SeasonalNaive(period=24, pred_len=30)(x)
    assert torch.equal(naive[0, :24, 0], x[0, 24:, 0]) and torch.equal(naive[0, 24:, 0], x[0, 24:30, 0])
    y, w = generate_ar(order=3, n_samples=5000, seed=2)
    windows = np.lib.stride_tricks.sliding_window_view(y, 4)
    xs = torch.as_tensor(windows[:, :3, None].copy())
    ys = torch.as_tensor(windows[:, 3:, None].copy())
    assert stpe(classic_ar(xs, ys, n_out=1).coefficients()[0], w) < 5


def test_scaled_forecaster_works_in_original_units():
    net = ARNet(n_lags=3, n_forecasts=1)
    with torch.no_grad():
        net.head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))  # persistence
        net.head.bias.zero_()
    model = ScaledForecaster(net, mean=[10.0], std=[2.0])
    assert torch.allclose(model(torch.tensor([[[11.0], [12.0], [13.0]]])), torch.tensor([[[13.0]]]))


def _train(tmp_path, overrides):
    cfg = compose("train", [*overrides, f"paths.runs={tmp_path}", "callbacks=none", "export=false",
                            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                            "logger.tensorboard=null"])
    run_dir = run_train(cfg)
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    module = load_module(resolve_checkpoint(str(run_dir), None))
    return metrics, module.net.coefficients()[0]


def test_claim_arnet_learns_the_least_squares_coefficients(tmp_path):
    """Paper claim 1: AR-Net learns the same AR coefficients as Classic-AR (OLS).

    On AR(3) with 10 000 samples (7 000 for training) the OLS estimate errs by about
    1/sqrt(7000) ≈ 0.012 per coefficient, i.e. an sTPE near 2 % against the truth (Σ|w| = 0.9);
    5 % leaves room for SGD noise while a wrong lag order or sign would give > 20 %.
    """
    metrics, learned = _train(tmp_path, ["data.dataset=ar", "data.seq_len=3", "data.pred_len=1",
                                         "trainer.max_epochs=10", "module.baselines=[classic_ar]"])
    assert metrics["test/stpe_model_vs_classic_ar"] < 5.0
    assert metrics["test/stpe_model_vs_true"] < 5.0 and metrics["test/stpe_classic_ar_vs_true"] < 5.0
    assert metrics["test/model/mse"] == pytest.approx(metrics["test/classic_ar/mse"], rel=0.02)


def test_claim_regulariser_makes_an_overfitted_order_sparse(tmp_path):
    """Paper claim 2: with order 10x the true one (30 for AR(3)) and the regulariser on
    (estimated sparsity 0.1), weights off the true lags shrink, clearly more than without."""
    off_support, stpe_true = {}, {}
    for sparsity in ("null", "0.1"):
        metrics, learned = _train(tmp_path / sparsity, ["experiment=arnet_sparse_ar",
                                                         f"module.regularizer.sparsity={sparsity}",
                                                         "trainer.max_epochs=10"])
        off_support[sparsity] = learned[3:].abs().mean().item()
        stpe_true[sparsity] = metrics["test/stpe_model_vs_true"]
    assert off_support["0.1"] < 0.5 * off_support["null"]
    assert stpe_true["0.1"] < stpe_true["null"]
