"""The offline LMs for AutoTimes: a GPT-2 pretrained here on the English text that ships with
Python and its packages learns (held-out loss falls), writes an ordinary transformers folder that
AutoTimes loads, and refuses bad settings in one line."""

from __future__ import annotations

import json

import pytest
import torch

from seqapps.errors import InputError
from seqapps.tasks.forecasting.autotimes import build_lm
from seqapps.tasks.forecasting.text_lm import local_text_corpus, pretrain_text_lm
from seqapps.text_lm import main


def test_the_local_corpus_is_english_text():
    docs = local_text_corpus()
    assert len(docs) > 50 and sum(map(len, docs)) > 500_000
    assert all(len(d) >= 200 for d in docs)
    assert sum(" the " in d for d in docs) > 0.9 * len(docs)


def test_pretraining_lowers_held_out_loss_and_autotimes_loads_the_folder(tmp_path):
    torch.manual_seed(0)
    corpus = local_text_corpus()[:60]
    report = pretrain_text_lm(tmp_path / "lm", steps=40, n_layer=1, n_embd=32, n_head=2, n_positions=64,
                              vocab_size=512, block=32, batch=8, lr=3e-3, corpus=corpus,
                              extra_texts=["This is Time Series from 2020-01-01 00:00 to 2020-01-04 23:00"])
    assert report["held_out_loss_after"] < report["held_out_loss_before"] - 0.5
    assert json.loads((tmp_path / "lm" / "pretraining.json").read_text())["steps"] == 40
    lm = build_lm({"kind": "hf", "path": str(tmp_path / "lm")})
    hidden = lm(torch.randn(2, 3, 32))[0]
    assert hidden.shape == (2, 3, 32) and torch.isfinite(hidden).all()
    assert lm.embed_texts(["This is Time Series from 2020-01-01 00:00 to 2020-01-04 23:00"]).shape == (1, 32)


def test_bad_settings_one_line_and_an_existing_folder_is_left_alone(tmp_path, capsys):
    with pytest.raises(InputError, match="steps=0"):
        pretrain_text_lm(tmp_path / "a", steps=0)
    with pytest.raises(InputError, match="at least two documents"):
        pretrain_text_lm(tmp_path / "b", steps=1, corpus=["only one document " * 20])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "pretraining.json").write_text("{}")
    with pytest.raises(InputError, match="exists"):
        pretrain_text_lm(taken, steps=1, corpus=local_text_corpus()[:4])
    assert main(["--out", str(taken)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("seqapps.text_lm: error:") and "exists" in error and error.count("\n") == 1
    assert (taken / "pretraining.json").read_text() == "{}" and sorted(p.name for p in taken.iterdir()) == [
        "pretraining.json"]


def test_the_text_lm_recipes_differ_only_in_the_lm():
    from seqapps.config import compose

    with_lm = compose("train", ["experiment=weather_autotimes_textlm"])
    without = compose("train", ["experiment=weather_autotimes_textlm_nollm"])
    assert with_lm.module.net.lm.kind == "hf" and with_lm.module.net.lm.path == "lms/text_gpt2"
    assert without.module.net.lm.kind == "identity" and without.module.net.lm.width == 64  # the LM's width
    assert with_lm.data.timestamps.lm.path == without.data.timestamps.lm.path == "lms/text_gpt2"
