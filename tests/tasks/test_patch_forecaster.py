"""The backbone forecaster (PatchTST-style), its configs and the weather experiments."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import run_cli, write_tslib_csv

from seqapps.backbones import SequenceStack
from seqapps.config import compose
from seqapps.errors import InputError
from seqapps.tasks.forecasting.patch import PatchForecaster, RevIN, patch_count
from seqapps.train import run_train

EXPERIMENTS = {  # recipe -> (net class, mixer or None)
    "weather_patch_gla": ("PatchForecaster", "gla"),
    "weather_patch_mamba": ("PatchForecaster", "mamba"),
    "weather_patch_attention": ("PatchForecaster", "attention"),
    "weather_dlinear": ("DLinear", None),
    "weather_arnet_m": ("ARNet", None),
}


def _model(seq_len=32, pred_len=8, n_in=3, n_out=3, mixer="gla", **kwargs) -> PatchForecaster:
    torch.manual_seed(0)
    stack = SequenceStack(dim=16, depth=1, mixer=mixer, mixer_kwargs={"num_heads": 2} if mixer != "mamba" else {})
    return PatchForecaster(seq_len, pred_len, n_in, n_out, stack, patch_len=8, stride=4, **kwargs).eval()


def test_patches_cover_the_lookback_with_the_end_padded():
    model = _model()
    assert model.n_patches == patch_count(32, 8, 4) == (32 - 8) // 4 + 2
    x = torch.arange(2 * 32 * 3, dtype=torch.float32).reshape(2, 32, 3)
    patches = model.patches(x)  # [B * C, n_patches, patch_len]
    assert patches.shape == (6, model.n_patches, 8)
    series = x[1, :, 2]  # batch 1, channel 2 -> row 1 * 3 + 2
    assert torch.equal(patches[5, 0], series[:8]) and torch.equal(patches[5, 1], series[4:12])
    assert torch.equal(patches[5, -1], torch.cat([series[-4:], series[-1:].repeat(4)]))


@pytest.mark.parametrize("mixer", ["gla", "mamba", "attention"])
def test_channel_independence_and_ms_output(mixer):
    model = _model(mixer=mixer, affine=False)
    x = torch.randn(4, 32, 3)
    out = model(x)
    assert out.shape == (4, 8, 3)
    # channel c's forecast depends on channel c only (no affine: the channels share every weight)
    assert torch.allclose(out[..., 1], model(x[..., [1, 1, 1]])[..., 1], atol=1e-5)
    x2 = x.clone()
    x2[..., 0] = torch.randn(4, 32)
    assert torch.allclose(out[..., 1:], model(x2)[..., 1:], atol=1e-5)
    # features MS: the last channel of the same model
    ms = _model(mixer=mixer, affine=False, n_out=1)
    ms.load_state_dict(model.state_dict())
    assert torch.allclose(ms(x), out[..., -1:], atol=1e-6)


def test_revin_makes_the_forecast_follow_shift_and_scale_of_the_input():
    model = _model()
    with torch.no_grad():  # a trained-looking affine map: the invariance must not depend on it
        model.revin.weight.copy_(torch.tensor([0.5, 2.0, 1.3]))
        model.revin.bias.copy_(torch.tensor([0.1, -0.7, 0.3]))
    x = torch.randn(4, 32, 3)
    scale, shift = torch.tensor([3.0, 0.2, 10.0]), torch.tensor([5.0, -100.0, 0.5])
    out = model(x)
    assert torch.allclose(model(x * scale + shift), out * scale + shift, rtol=1e-4, atol=1e-3)
    # without RevIN the forecast does not follow
    plain = _model(revin=False)
    assert not torch.allclose(plain(x * scale + shift), plain(x) * scale + shift, atol=1e-2)
    # normalize / denormalize round-trip per series
    revin = RevIN(3)
    xn, stats = revin.normalize(x)
    assert torch.allclose(xn.mean(1), torch.zeros(4, 3), atol=1e-5)
    assert torch.allclose(revin.denormalize(xn, stats), x, atol=1e-5)


def test_bad_model_input_gives_one_clear_line():
    with pytest.raises(InputError, match="patch_len=16, stride=8 with seq_len=8"):
        PatchForecaster(8, 4, 1, 1, SequenceStack(16, 1), patch_len=16, stride=8)
    with pytest.raises(InputError, match="n_out must be 1"):
        PatchForecaster(32, 4, 3, 2, SequenceStack(16, 1))
    with pytest.raises(InputError, match=r"expects x of shape \[batch, 32, 3\]"):
        _model()(torch.randn(2, 31, 3))


def _metrics_csv(run_dir) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics" / "metrics.csv")


def _tiny(tmp_path, csv) -> list[str]:
    return [f"data.path={csv}", "data.seq_len=32", "data.pred_len=8", "data.batch_size=16",
            f"paths.runs={tmp_path / 'runs'}", "callbacks=none", "trainer.max_epochs=3",
            "++trainer.limit_train_batches=1.0", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "logger.tensorboard=null"]


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_composes_and_trains_with_the_loss_going_down(tmp_path, experiment):
    net_class, mixer = EXPERIMENTS[experiment]
    cfg = compose("train", [f"experiment={experiment}"])
    # the recipe is the Time-Series-Library protocol on the bundled weather data
    assert (cfg.data.dataset, cfg.data.seq_len, cfg.data.features, cfg.data.path) == ("weather", 96, "M", None)
    assert cfg.module.net._target_.endswith(net_class) and cfg.experiment_name == experiment
    if mixer:
        assert cfg.backbone.mixer.name == mixer
    # the same recipe on a small CSV, a few epochs: the training loss goes down
    csv = write_tslib_csv(tmp_path / "small.csv", n=400)
    overrides = [f"experiment={experiment}", *_tiny(tmp_path, csv), "module.optimizer.lr=0.003",
                 f"export={str(experiment in ('weather_patch_gla', 'weather_dlinear')).lower()}"]
    if mixer:
        overrides += ["module.net.patch_len=8", "module.net.stride=4", "backbone.dim=16", "backbone.depth=1"]
    run_dir = run_train(compose("train", overrides))
    train = _metrics_csv(run_dir).dropna(subset=["train/mse"])["train/mse"].to_numpy()
    assert len(train) == 3 and train[-1] < train[0]
    metrics = pd.read_json(run_dir / "test_metrics.json", typ="series")
    assert {"test/model/mse", "test/model/mae", "test/seasonal_naive/mse"} <= set(metrics.index)
    assert (run_dir / "plots" / "forecast.png").is_file()


def test_task_config_reads_any_tslib_csv_short_ones_included(tmp_path):
    # 300 rows at the protocol's seq_len 96 and pred_len 48: one validation and one test window
    csv = write_tslib_csv(tmp_path / "short.csv", n=300)
    cfg = compose("train", ["task=forecast_patch", "backbone/mixer=gla", "data.pred_len=48",
                            *_tiny(tmp_path, csv)[3:], "data.path=" + str(csv), "trainer.max_epochs=1",
                            "backbone.dim=16", "backbone.depth=1", "export=false"])
    run_dir = run_train(cfg)
    metrics = pd.read_json(run_dir / "test_metrics.json", typ="series")
    assert metrics["test/model/mse"] > 0


def test_too_short_csv_is_one_line_and_leaves_no_run_folder(tmp_path):
    csv = write_tslib_csv(tmp_path / "tiny.csv", n=150)
    proc = run_cli("train", "task=forecast_patch", f"data.path={csv}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "has 150 rows, too short" in lines[0] and "need 384" in lines[0]
    assert not (tmp_path / "runs").exists()
