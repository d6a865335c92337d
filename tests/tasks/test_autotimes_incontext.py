"""AutoTimes in-context forecasting: the pieces of the experiment (joint prompt normalisation,
a trained stack LM loaded frozen, the transfer lookback, the control prompt) and the generated
series families (tasks/forecasting/autotimes_incontext.py); the driver is seqapps/autotimes_incontext.py."""

from __future__ import annotations

import pytest
import torch

from seqapps.errors import InputError
from seqapps.tasks.forecasting.autotimes import AutoTimes, StackLM
from seqapps.tasks.forecasting.autotimes_data import AutoTimesDataModule
from seqapps.tasks.forecasting.autotimes_incontext import periodic_family, write_families

S = 8
STACK = {"dim": 16, "depth": 1, "mixer": "gla", "mixer_kwargs": {"num_heads": 2}}


def test_joint_prompt_normalisation_is_a_longer_lookback():
    """``prompt_norm=joint`` normalises prompt and lookback together (the reference code feeds
    their concatenation): the same forecast as the prompt put into the lookback; ``own`` differs
    when the prompt has another level and scale."""
    torch.manual_seed(0)
    joint = AutoTimes({"kind": "stack", "stack": STACK}, token_len=S, prompt_norm="joint").eval()
    own = AutoTimes({"kind": "stack", "stack": STACK}, token_len=S, prompt_norm="own").eval()
    own.load_state_dict(joint.state_dict())
    x, prompt = torch.randn(2, S, 3), 5 + 3 * torch.randn(2, 2 * S, 3)
    with torch.no_grad():
        a = joint(x, horizon=2 * S, prompt=prompt)
        b = joint(torch.cat([prompt, x], 1), horizon=2 * S)
        c = own(x, horizon=2 * S, prompt=prompt)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)
    with pytest.raises(InputError, match="prompt_norm='both'"):
        AutoTimes({"kind": "identity", "width": 4}, token_len=S, prompt_norm="both")


def test_stack_lm_loads_the_weights_a_run_trained(tmp_path):
    trained = AutoTimes({"kind": "stack", "stack": STACK, "seed": 1}, token_len=S)
    state = {f"net.{k}": v for k, v in trained.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "lm.ckpt")
    lm = StackLM(STACK, seed=0, weights=tmp_path / "lm.ckpt")
    assert all(torch.equal(p, q) for p, q in zip(lm.state_dict().values(), trained.backbone.state_dict().values()))
    fresh = StackLM(STACK, seed=0).state_dict()
    assert not all(torch.equal(fresh[k], v) for k, v in lm.state_dict().items())  # not seed 0's weights
    with pytest.raises(InputError, match="no checkpoint at"):
        StackLM(STACK, weights=tmp_path / "nope.ckpt")
    with pytest.raises(InputError, match="no stack LM of this shape"):
        StackLM({**STACK, "dim": 32}, weights=tmp_path / "lm.ckpt")


def test_generated_families_differ_and_are_reproducible():
    a, b = periodic_family("source", 3, 200, 0), periodic_family("source", 3, 200, 0)
    assert a.equals(b) and list(a.columns) == ["date", "source0", "source1", "source2"]
    target = periodic_family("target", 3, 200, 0)
    assert not target.iloc[:, 1:].to_numpy().__eq__(a.iloc[:, 1:].to_numpy()).any()
    with pytest.raises(InputError, match="family 'other'"):
        periodic_family("other", 1, 10, 0)


def test_transfer_lookback_and_control_prompt_keep_the_windows(tmp_path):
    paths = write_families(tmp_path, 0, n_source=3, n_target=2, source_len=400, target_len=300)
    dm = AutoTimesDataModule(path=str(paths["source"]), seq_len=4 * S, pred_len=S, token_len=S, horizons=[S],
                             timestamps={}, transfer={"path": str(paths["target"]), "prompt_segments": 2,
                                                      "prompt_gap": 3, "seq_len": S,
                                                      "control": {"path": str(paths["source_lm"])}})
    dm.load()
    assert dm.test_loader_names()[-3:] == ["zero_shot", "in_context", "in_context_control"]
    zero, same, control = (dm.transfer_windows(False), dm.transfer_windows(True),
                           dm.transfer_windows(True, control=True))
    assert len(zero) == len(same) == len(control)
    x0, y0, *_ = zero[5]
    x1, y1, _, _, prompt, _ = same[5]
    x2, y2, _, _, other, _ = control[5]
    assert x0.shape == (S, 2) and torch.equal(x0, x1) and torch.equal(x0, x2) and torch.equal(y0, y2)
    data = dm.transfer_data["data"]
    assert torch.equal(prompt, data[5:5 + 2 * S]) and torch.equal(x1, data[5 + 2 * S + 3:5 + 3 * S + 3])
    c_data = dm.transfer_data["control"][0]
    assert other.shape == (2 * S, 2) and torch.equal(other, c_data[5:5 + 2 * S, :2])
    bad = AutoTimesDataModule(path=str(paths["source"]), seq_len=4 * S, pred_len=S, token_len=S, horizons=[S],
                              timestamps={}, transfer={"path": str(paths["target"]), "seq_len": S + 1})
    with pytest.raises(InputError, match="transfer.seq_len=9 is not a whole number"):
        bad.load()


@pytest.mark.slow
def test_in_context_beats_zero_shot_with_a_prompt_from_the_same_source(tmp_path):
    """Issue 5's claim, on a small copy of the recorded experiment (`python -m
    seqapps.autotimes_incontext`): a stack LM trained on source series, then
    frozen under fresh AutoTimes adapters, forecasts held-out target series (another shape,
    period range and scale pattern) from a one-segment lookback. Two segments of the same
    target series as the prompt cut the MSE by far more than the seed-to-seed spread (here
    1.47 -> 0.74; over seeds 0-2 the cut is 0.73-0.80 and each condition's MSE varies by about
    0.15), and beat a prompt of as many segments from a source series (0.89; paired gap
    0.09-0.16 over seeds 0-2)."""
    from seqapps.autotimes_incontext import run_seed

    result = run_seed(tmp_path, 0, ("main",), ["trainer.max_epochs=5", "callbacks=none"],
                      ["trainer.max_epochs=10"],
                      dict(n_source=16, n_target=8, source_len=1500, target_len=800))
    mse = {c: result["metrics"]["main"][f"test/model_{c}/mse"]
           for c in ("zero_shot", "in_context", "in_context_control")}
    assert mse["in_context"] < mse["zero_shot"] - 0.4, mse
    assert mse["in_context"] < 0.75 * mse["zero_shot"], mse
    assert mse["in_context"] < mse["in_context_control"] - 0.03, mse
