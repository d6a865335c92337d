"""AutoTimes: the LMs (transformers folder, seqapps stack, identity), next-segment training,
the rollout (KV cache / recurrent state = recomputing the whole context), in-context prompts,
one model for every horizon, and the bad-input errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from seqapps.config import compose
from seqapps.errors import InputError
from seqapps.runs import load_module, resolve_checkpoint
from seqapps.tasks.forecasting.autotimes import AutoTimes, StackLM, build_lm, make_tiny_lm
from seqapps.tasks.forecasting.autotimes_data import AutoTimesDataModule, cache_root, timestamp_texts
from seqapps.train import run_train

S = 8  # token_len in these tests


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny randomly initialised GPT-2 and its tokenizer, saved to a local folder."""
    return str(make_tiny_lm(tmp_path_factory.mktemp("lm") / "gpt2", n_layer=2, n_embd=32, n_head=2, n_positions=64))


def _hf(path):
    return {"kind": "hf", "path": path}


STACK = {"kind": "stack", "stack": {"dim": 16, "depth": 2, "mixer": "gla", "mixer_kwargs": {"num_heads": 2}}}


def _rollout_by_recomputing(net, x, horizon):
    """The forecast with the whole token sequence recomputed at every step (no cache/state)."""
    series, mean, std = net.normalise(x)
    tokens = net.tokens(series, None, x.shape[-1])
    segments = []
    for _ in range(-(-horizon // net.token_len)):
        hidden, _ = net.backbone(tokens)
        segments.append(net.head(hidden[:, -1]))
        tokens = torch.cat([tokens, net.tokens(segments[-1], None, x.shape[-1])], dim=1)
    return net._to_windows(torch.cat(segments, -1)[:, :horizon], mean, std)


@pytest.mark.parametrize("lm", ["hf", "stack"])
def test_rollout_with_cache_or_state_equals_recomputing_the_context(tiny_lm, lm):
    torch.manual_seed(0)
    net = AutoTimes(_hf(tiny_lm) if lm == "hf" else STACK, token_len=S).eval()
    x = torch.randn(3, 4 * S, 2)
    with torch.no_grad():
        fast = net(x, horizon=3 * S + 5)
        slow = _rollout_by_recomputing(net, x, 3 * S + 5)
    assert fast.shape == (3, 3 * S + 5, 2)
    assert torch.allclose(fast, slow, atol=1e-4)


def test_recurrent_lm_keeps_a_constant_state_per_step():
    lm = StackLM(STACK["stack"])
    state = lm(torch.randn(2, 3, 16), use_cache=True)[1]
    sizes = [t.numel() for t in state]
    for _ in range(5):
        _, state = lm(torch.randn(2, 1, 16), state=state, use_cache=True)
    assert [t.numel() for t in state] == sizes


def test_channels_are_independent_and_normalised_by_their_lookback(tiny_lm):
    net = AutoTimes(_hf(tiny_lm), token_len=S).eval()
    x = torch.randn(2, 3 * S, 3)
    with torch.no_grad():
        out = net(x, horizon=2 * S)
        shifted = net(x * torch.tensor([1.0, 5.0, 1.0]) + torch.tensor([0.0, 100.0, 0.0]), horizon=2 * S)
        alone = net(x[..., 2:], horizon=2 * S)
    assert torch.allclose(out[..., 2:], alone, atol=1e-5)  # channel 2 ignores channels 0 and 1
    assert torch.allclose(shifted[..., 1], out[..., 1] * 5 + 100, atol=1e-3)  # scale-free per series


def test_next_segment_outputs_are_causal_in_segments(tiny_lm):
    net = AutoTimes({"kind": "hf", "path": tiny_lm}, token_len=S).eval()
    x = torch.randn(2, 4 * S, 1)
    with torch.no_grad():
        a = net.backbone(net.tokens(net.normalise(x)[0], None, 1))[0]
        b = net.backbone(net.tokens(net.normalise(x)[0][:, :3 * S], None, 1))[0]
    assert torch.allclose(a[:, :3], b, atol=1e-5)  # position i never sees segments after i


def test_only_embedding_projection_and_scale_train(tiny_lm):
    cfg = _cfg(tiny_lm, [])
    from seqapps.train import build_data_and_module

    datamodule, module = build_data_and_module(cfg)
    net = module.net
    d = net.backbone.width
    assert module.freeze_counts["trainable"] == 2 * S * d + S + d + 1
    assert {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad} == {"embed", "head", "pos_scale"}
    before = {n: p.clone() for n, p in net.backbone.named_parameters()}
    x, y, pos = next(iter(datamodule.train_dataloader()))
    assert x.shape == y.shape and torch.equal(x[:, S:], y[:, :-S])  # y is x one segment later
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    torch.nn.functional.mse_loss(net.next_segments(x, pos), y).backward()
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in net.backbone.named_parameters())


def test_timestamp_embeddings_follow_the_template_and_differ_per_segment(tiny_lm):
    texts = timestamp_texts(pd.Series(pd.date_range("2001-01-01 01:00", periods=3, freq="h")), 24, extra=1)
    assert texts[0] == "This is Time Series from 2001-01-01 01:00:00 to 2001-01-02 00:00:00"
    assert texts[-1].startswith("This is Time Series from 2001-01-01 04:00:00")
    lm = build_lm(_hf(tiny_lm))
    emb = lm.embed_texts(texts)
    assert emb.shape == (4, 32) and not torch.allclose(emb[0], emb[1])
    # right padding does not change the last token's state
    assert torch.allclose(lm.embed_texts(texts[:1]), emb[:1], atol=1e-5)


def test_in_context_prompt_changes_the_forecast_and_keeps_the_windows(tiny_lm, tmp_path):
    dm = AutoTimesDataModule(dataset="weather", seq_len=3 * S, pred_len=S, token_len=S, features="S",
                             horizons=[S], timestamps={"lm": _hf(tiny_lm)}, cache_dir=str(tmp_path),
                             transfer={"dataset": "weather_ak", "prompt_segments": 2, "prompt_gap": 5})
    dm.load()
    zero, icl = dm.transfer_windows(False), dm.transfer_windows(True)
    assert len(zero) == len(icl)
    x0, y0, *_ = zero[7]
    x1, y1, pos, fpos, prompt, prompt_pos = icl[7]
    assert torch.equal(x0, x1) and torch.equal(y0, y1) and prompt.shape == (2 * S, 1)
    data = dm.transfer_data["data"]
    assert torch.equal(prompt, data[7:7 + 2 * S]) and torch.equal(x1, data[7 + 2 * S + 5:7 + 5 * S + 5])
    net = AutoTimes(_hf(tiny_lm), token_len=S).eval()
    with torch.no_grad():
        a = net(x1[None], pos[None], fpos[None], horizon=S)
        b = net(x1[None], pos[None], fpos[None], horizon=S, prompt=prompt[None], prompt_pos=prompt_pos[None])
    assert not torch.allclose(a, b)


def _cfg(lm_path, overrides):
    return compose("train", [
        "task=forecast_autotimes", "data.features=S", f"data.seq_len={4 * S}", f"data.token_len={S}",
        f"data.pred_len={S}", f"data.horizons=[{S},{2 * S},{3 * S}]", "data.batch_size=64",
        "data.max_train_windows=512", f"module.net.lm.path={lm_path}", "module.seasonal_period=4",
        "trainer.max_epochs=2", "callbacks=none", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "logger.tensorboard=null", *overrides])


def test_one_trained_model_forecasts_every_horizon_and_reloads(tiny_lm, tmp_path):
    cfg = _cfg(tiny_lm, [f"paths.runs={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}",
                         "data.transfer={dataset: weather_ak, prompt_segments: 2}"])
    run_dir = run_train(cfg)
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    for h in (S, 2 * S, 3 * S):
        assert metrics[f"test/model_h{h}/mse"] < 1.0  # well below the scaled series' variance
        assert f"test/seasonal_naive_h{h}/mse_orig" in metrics
    assert metrics[f"test/model_h{S}/mse"] < metrics[f"test/model_h{3 * S}/mse"]  # error grows with the horizon
    assert {"test/model_zero_shot/mse", "test/model_in_context/mse"} <= set(metrics)
    assert (run_dir / "plots" / "forecast.png").is_file()
    ckpt = resolve_checkpoint(str(run_dir), None)
    assert not any(k.startswith("net.backbone.") for k in torch.load(ckpt, weights_only=True)["state_dict"])
    module = load_module(ckpt)  # the frozen LM comes back from its folder
    x = torch.randn(1, 4 * S, 1)
    assert module.net(x, horizon=5 * S).shape == (1, 5 * S, 1)


def test_stack_lm_trains_with_freeze_full(tmp_path):
    """Also features MS: every variable is a series in, the target is scored."""
    cfg = _cfg("null", [f"paths.runs={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "data.features=MS",
                        "module.net.lm.kind=stack", "+module.net.lm.stack={dim: 16, depth: 1, mixer: gla}",
                        "module.freeze=full", "trainer.max_epochs=1"])
    metrics = json.loads((run_train(cfg) / "test_metrics.json").read_text())
    assert metrics[f"test/model_h{3 * S}/mse"] < 1.5


# --------------------------------------------------------------------------- bad input
def test_lm_folder_that_does_not_exist(tmp_path):
    with pytest.raises(InputError, match="no folder at"):
        build_lm(_hf(str(tmp_path / "nope")))


def test_lm_folder_without_a_model(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        build_lm(_hf(str(tmp_path)))


def test_lm_folder_with_an_encoder_is_not_causal(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                         vocab_size=50)).save_pretrained(tmp_path / "bert")
    with pytest.raises(InputError, match="not a causal LM"):
        build_lm(_hf(str(tmp_path / "bert")))


def test_lm_folder_of_a_non_language_model(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                       image_size=8, patch_size=4)).save_pretrained(tmp_path / "vit")
    with pytest.raises(InputError, match="not a causal language model"):
        build_lm(_hf(str(tmp_path / "vit")))


def test_seq_len_must_be_whole_segments(tiny_lm):
    dm = AutoTimesDataModule(dataset="weather", seq_len=50, token_len=S, timestamps={})
    with pytest.raises(InputError, match="not a multiple of data.token_len"):
        dm.load()


def test_bad_lm_kind():
    with pytest.raises(InputError, match="lm.kind='gpt'"):
        build_lm({"kind": "gpt"})


def test_generated_lms_share_the_compiled_kernels_cache_root(monkeypatch, tmp_path):
    """One cache root for the whole package: $SEQAPPS_CACHE, else $XDG_CACHE_HOME/seqapps."""
    from seqapps.kernels.compiled import cache_dir

    monkeypatch.delenv("SEQAPPS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "seqapps" and cache_dir() == cache_root() / "kernels"
    monkeypatch.setenv("SEQAPPS_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine" and cache_dir() == tmp_path / "mine" / "kernels"
    assert cache_root(tmp_path / "given") == tmp_path / "given"


@pytest.mark.parametrize("key", ["data.transfer.path", "data.transfer.control.path"])
def test_a_missing_transfer_file_names_its_option(tmp_path, key):
    missing = str(tmp_path / "missing.csv")
    transfer = ({"path": missing, "prompt_segments": 1} if key == "data.transfer.path"
                else {"dataset": "weather_ak", "prompt_segments": 1, "control": {"path": missing}})
    dm = AutoTimesDataModule(dataset="weather", seq_len=3 * S, pred_len=S, token_len=S, features="S",
                             horizons=[S], timestamps={"lm": None}, cache_dir=str(tmp_path), transfer=transfer)
    with pytest.raises(InputError, match=f"^{key}: no file at"):
        dm.load()
