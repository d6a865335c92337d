"""Chimera as a time-series model: shapes of the forecaster, classifier and reconstructor, the
cross-variate ablation, a few optimisation steps that lower the loss, configs that compose and
train through the real `seqapps train` path on tiny data."""

from __future__ import annotations

import json

import pytest
import torch

from seqapps.backbones import SequenceStack
from seqapps.config import compose
from seqapps.errors import InputError
from seqapps.tasks.classification.series import ChannelStandardised, SeriesClassifier
from seqapps.tasks.forecasting.chimera import ChimeraForecaster, ChimeraReconstructor, chimera_stack
from seqapps.train import run_train
from conftest import fit_classifier, write_tslib_csv

SMALL = {"dim": 16, "depth": 1, "d_state": 4, "expand": 1}
QUIET = ["callbacks=none", "export=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "logger.tensorboard=null"]


def _forecaster(cross_variate=True, **kwargs):
    torch.manual_seed(0)
    return ChimeraForecaster(12, 4, 3, backbone={**SMALL, "cross_variate": cross_variate}, **kwargs)


def test_forecaster_shapes_m_ms_patches_and_other_mixers():
    x = torch.randn(2, 12, 3)
    assert _forecaster()(x).shape == (2, 4, 3)
    assert _forecaster(n_out=1)(x).shape == (2, 4, 1)
    assert _forecaster(patch_len=5)(x).shape == (2, 4, 3)  # 12 steps -> 3 patches, left-padded
    gla = SequenceStack(16, 1, mixer="gla")
    assert ChimeraForecaster(12, 4, 3, backbone=gla)(x).shape == (2, 4, 3)  # channels layout
    assert ChimeraForecaster(12, 4, 3, backbone=SequenceStack(16, 1, mixer="gla"), layout="grid")(x).shape == (2, 4, 3)
    with pytest.raises(InputError, match=r"\[batch, 12, 3\]"):
        _forecaster()(torch.randn(2, 10, 3))
    with pytest.raises(InputError, match="n_out"):
        ChimeraForecaster(12, 4, 3, n_out=2)


def test_classifier_and_reconstructor_shapes():
    x = torch.randn(5, 20, 4)
    assert SeriesClassifier(4, 7, 20, backbone=SMALL)(x).shape == (5, 7)
    assert SeriesClassifier(4, 7, 20, backbone=SequenceStack(16, 1, mixer="mamba"))(x).shape == (5, 7)
    recon = ChimeraReconstructor(4, backbone=SMALL, patch_len=3)
    assert recon(x).shape == (5, 20, 4) and recon.anomaly_score(x).shape == (5, 20)
    model = ChannelStandardised(SeriesClassifier(4, 7, 20, backbone=SMALL).eval(), [1.0] * 4, [2.0] * 4)
    x[0, 3, 1] = float("nan")  # a missing value becomes the channel mean, as in training
    assert torch.isfinite(model(x)).all()


def test_ablation_removes_exactly_the_cross_variate_path():
    full, ablated = _forecaster(True).eval(), _forecaster(False).eval()
    assert [n for n, _ in full.named_parameters()] == [n for n, _ in ablated.named_parameters()]
    ablated.load_state_dict(full.state_dict())  # the same weights...
    x = torch.randn(2, 12, 3)
    changed = x.clone()
    changed[:, :, 0] = torch.randn(2, 12)  # another variate's history (a new shape: RevIN undoes mere shifts)
    with torch.no_grad():
        assert not torch.allclose(full(x), ablated(x))  # ...but another model
        # without the path, variate 2's forecast ignores variate 0; with it, it does not
        assert torch.equal(ablated(changed)[..., 2], ablated(x)[..., 2])
        assert (full(changed)[..., 2] - full(x)[..., 2]).abs().max() > 0  # small at initialisation (Mamba-sized steps)
    layers = [m for m in ablated.modules() if type(m).__name__ == "Chimera"]
    assert layers and not any(m.cross_variate for m in layers)


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    # classification: two classes of noisy sines, slow or fast, in one of the two variates
    t = torch.arange(24.0)
    labels = torch.arange(32) % 2
    wave = torch.sin(t * torch.where(labels[:, None] == 0, 0.3, 1.2) + torch.rand(32, 1) * 6.28)
    x = torch.stack([wave, torch.randn(32, 24)], -1) + 0.1 * torch.randn(32, 24, 2)
    model = SeriesClassifier(2, 2, 24, backbone=SMALL, dropout=0.0)
    losses = fit_classifier(model, lambda: (x, labels), steps=20)
    assert losses[-1] < 0.75 * losses[0]
    # forecasting: a noisy daily-like sine per variate
    series = torch.sin(torch.arange(40.0)[:, None] / 3 + torch.arange(3.0)) + 0.05 * torch.randn(40, 3)
    windows = series.unfold(0, 16, 1).permute(0, 2, 1)  # [25, 16, 3]
    xs, ys = windows[:, :12], windows[:, 12:]
    net = _forecaster()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    first = None
    for _ in range(12):
        loss = torch.nn.functional.mse_loss(net(xs), ys)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


@pytest.mark.parametrize("backbone,layout", [(SMALL, "grid"), (SequenceStack(16, 1, mixer="gla"), "channels"),
                                             (SequenceStack(16, 1, mixer="gla"), "grid")])
def test_closed_loop_rolls_out_any_horizon_by_feeding_its_forecast_back(backbone, layout):
    torch.manual_seed(0)
    # a lookback of 10 steps in patches of 4: left-padded to 12, so the fed patches must stay aligned
    net = ChimeraForecaster(10, 6, 3, backbone=backbone, patch_len=4, layout=layout, decoder="closed_loop").eval()
    x = torch.randn(2, 10, 3)
    with torch.no_grad():
        short, long = net(x), net.forecast(x, 20)
        # the rollout by hand: the lookback, then each forecast patch appended as if observed
        normalised, stats = net.revin.normalize(x)
        grown = normalised
        for _ in range(5):
            hidden = net.encoder(grown)
            patch = net.head(hidden[..., -1, :]).view(2, 3, 4).transpose(1, 2)  # [B, 4, V]
            grown = torch.cat([grown, patch], 1)
        by_hand = net.revin.denormalize(grown[:, 10:], stats)
    assert short.shape == (2, 6, 3) and long.shape == (2, 20, 3)
    torch.testing.assert_close(long[:, :6], short)  # one model, any horizon: the first steps agree
    torch.testing.assert_close(long, by_hand, rtol=1e-4, atol=1e-5)
    # teacher forcing feeds the true future: when that future is the model's own forecast, the
    # parallel teacher-forced pass predicts exactly the rollout (loss 0), and any other future not
    assert net.training_loss(x, short).item() < 1e-10
    assert net.training_loss(x, short + 0.1).item() > 1e-3
    for horizon in (0, -3, 2.5):
        with pytest.raises(InputError, match="horizon="):
            net.forecast(x, horizon)


def test_closed_loop_refusals_and_features_ms():
    x = torch.randn(2, 12, 3)
    with pytest.raises(InputError, match="closed_loop"):
        _forecaster().forecast(x, 8)  # the linear head knows one horizon
    with pytest.raises(InputError, match="decoder='attention'"):
        _forecaster(decoder="attention")
    with pytest.raises(InputError, match="teacher_forcing=false"):
        _forecaster(n_out=1, decoder="closed_loop")  # MS: only the target's future is given
    ms = _forecaster(n_out=1, decoder="closed_loop", teacher_forcing=False)
    assert ms(x).shape == (2, 4, 1) and ms.forecast(x, 9).shape == (2, 9, 1)
    assert torch.isfinite(ms.training_loss(x, torch.randn(2, 4, 1)))

    class Stateless(torch.nn.Module):  # a stack that hands on no state along time
        dim = 16

        def forward(self, tokens, state=None):
            return tokens, ()

        def init_state(self, batch_size, device=None, dtype=None):
            return ()

    with pytest.raises(InputError, match="carries none along time"):
        ChimeraForecaster(12, 4, 3, backbone=Stateless(), layout="channels", decoder="closed_loop")
    assert ChimeraForecaster(12, 4, 3, backbone=Stateless(), layout="channels")(x).shape == (2, 4, 3)


@pytest.mark.parametrize("teacher_forcing", [True, False])
def test_closed_loop_trained_at_a_short_horizon_forecasts_a_longer_one(teacher_forcing):
    """Trained on 8-step forecasts of sines (fed the true patches, or its own), the closed loop
    carries on at 32 steps, where repeating the last 8 steps is far off."""
    torch.manual_seed(0)
    t = torch.arange(400.0)
    series = torch.stack([torch.sin(2 * torch.pi * t / 24), torch.cos(2 * torch.pi * t / 24 + 1.0)], -1)
    windows = series.unfold(0, 48 + 32, 5).permute(0, 2, 1)  # [B, 80, 2]
    net = ChimeraForecaster(48, 8, 2, backbone=SMALL, patch_len=4, decoder="closed_loop",
                            teacher_forcing=teacher_forcing)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(60):
        loss = net.training_loss(windows[:, :48], windows[:, 48:56])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        long = net.eval().forecast(windows[:, :48], 32)
    error = (long - windows[:, 48:]).pow(2).mean().item()
    repeat_last = windows[:, 40:48].repeat(1, 4, 1)
    assert error < 0.05 and error < 0.1 * (repeat_last - windows[:, 48:]).pow(2).mean().item()


@pytest.mark.parametrize("overrides", [
    ["task=classify_series"],
    ["task=classify_series", "backbone/mixer=gla"],
    ["task=forecast_chimera"],
    ["experiment=weather_chimera", "data.pred_len=720"],
    ["experiment=series_chimera_japanesevowels"],
    ["experiment=series_chimera_japanesevowels_nocross"],
    ["experiment=series_chimera_basicmotions"],
    ["experiment=series_chimera_basicmotions_nocross"],
    ["experiment=series_chimera_gunpoint"],
    ["experiment=series_chimera_italypowerdemand"],
    ["experiment=series_chimera_japanesevowels_heads"],
    ["experiment=series_chimera_japanesevowels_heads_nocross"],
    ["experiment=weather_chimera_paper"],
])
def test_configs_compose(overrides):
    cfg = compose("train", overrides)
    if cfg.task_name == "forecast_chimera":
        assert cfg.module.net._target_.endswith("ChimeraForecaster")
        assert {"path", "seq_len", "pred_len", "features", "target"} <= set(cfg.data)
    else:
        assert cfg.module.net._target_.endswith("SeriesClassifier")
    nocross = any(o.endswith("_nocross") for o in overrides)
    if cfg.backbone.mixer.name == "chimera":
        assert cfg.backbone.mixer.cross_variate is not nocross
    if any("_heads" in o or o.endswith("_paper") for o in overrides):
        assert set(cfg.backbone.mixer_kwargs.chimera.heads) == {"trend", "seasonal"}
    if any(o.endswith("_paper") for o in overrides):
        assert cfg.module.net.decoder == "closed_loop"


def test_train_classify_series_end_to_end(tmp_path):
    pytest.importorskip("aeon")
    cfg = compose("train", ["task=classify_series", "data.name=ItalyPowerDemand", "trainer.max_epochs=1",
                            "backbone.dim=8", "backbone.depth=1", f"paths.runs={tmp_path}", *QUIET])
    run_dir = run_train(cfg)
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert 0.0 <= metrics["test/model/acc"] <= 1.0


PAPER_CHIMERA = ["+backbone.mixer_kwargs.chimera.heads={trend:[0.001,0.01],seasonal:[0.1,1.0]}",
                 "module.net.decoder=closed_loop", "export=true"]


@pytest.mark.parametrize("paper", [False, True], ids=["default", "two_heads_closed_loop_exported"])
def test_train_forecast_chimera_on_a_users_csv(tmp_path, paper):
    csv = write_tslib_csv(tmp_path / "my.csv", n=300)
    cfg = compose("train", ["task=forecast_chimera", f"data.path={csv}", "data.seq_len=24", "data.pred_len=8",
                            "trainer.max_epochs=1", "backbone.dim=8", "backbone.depth=1", "module.net.patch_len=4",
                            f"paths.runs={tmp_path / 'runs'}", *QUIET, *(PAPER_CHIMERA if paper else [])])
    run_dir = run_train(cfg)
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert metrics["test/model/mse"] > 0 and "test/seasonal_naive/mse" in metrics
    if paper:
        state = torch.load(next(run_dir.glob("checkpoints/*.ckpt")), weights_only=False)["state_dict"]
        assert any("directions.3." in name for name in state)  # 2 heads x 2 directions
        assert state["net.head.weight"].shape == (4, 8)  # the closed loop's head: a token -> the next patch
        assert any((run_dir / "export").glob("*.onnx"))


def test_default_backbone_is_two_chimera_blocks():
    stack = chimera_stack()
    assert stack.grid_native and stack.depth == 2 and set(stack.mixer_names) == {"chimera"}


def _correlation_task(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [n, 16, 2]``: two unit-variance noise variates, the second ``±`` the first plus noise;
    the class is the sign. Each variate alone is N(0, 1) white noise in both classes: only a
    model that mixes the variates can tell them apart."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    first = torch.randn(n, 16, generator=generator)
    sign = (2 * labels - 1).float()[:, None]
    second = (sign * first + 0.3 * torch.randn(n, 16, generator=generator)) / 1.044
    return torch.stack([first, second], -1), labels


@pytest.mark.parametrize("cross_variate", [True, False])
def test_only_the_cross_variate_path_solves_a_cross_variate_task(cross_variate):
    """The 2-D scan's point, as a test that could fail: with the cross-variate path Chimera learns
    a label that lives only in the relation between variates (1.00, 1.00, 1.00 over seeds 0-2);
    without it the same model stays near chance (0.46, 0.53, 0.63: the pooling over variates
    leaves it only a weak cue, the spread of the pooled features)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = SeriesClassifier(2, 2, 16, backbone={**SMALL, "cross_variate": cross_variate}, dropout=0.0)
    fit_classifier(model, lambda: _correlation_task(64, generator), steps=150)
    x, y = _correlation_task(512, generator)
    with torch.no_grad():
        accuracy = (model(x).argmax(-1) == y).float().mean().item()
    if cross_variate:
        assert accuracy > 0.95, accuracy
    else:
        assert accuracy < 0.7, accuracy
