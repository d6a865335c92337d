"""One harness for every registered mixer: a new mixer is tested by being registered.

forward on the whole sequence = forward over pieces with the state carried (empty pieces
included) = ``step`` token by token; an empty batch; causality; gradients reach every parameter;
``torch.export`` of ``step``; ONNX export of ``step`` with the state as explicit inputs and
outputs, checked with onnxruntime; bad input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqapps.backbones.mixer import available_mixers, build_mixer
from seqapps.backbones.streaming import StepModule, run_steps
from seqapps.errors import InputError

DIM, BATCH, T = 32, 2, 19
MIXERS = available_mixers()


def make(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mixer(name, DIM).eval()


def sequence(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, T, DIM, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_mixers_and_rejects_unknown_names():
    assert MIXERS, "no mixer registered"
    with pytest.raises(InputError, match="unknown mixer 'nope'"):
        build_mixer("nope", DIM)


@pytest.mark.parametrize("name", MIXERS)
def test_whole_equals_pieces_equals_steps(name):
    mixer, x = make(name), sequence()
    with torch.no_grad():
        y, final = mixer(x)
        state, pieces = None, []
        for a, b in ((0, 0), (0, 1), (1, 8), (8, 8), (8, 13), (13, T)):  # empty pieces too
            y_piece, state = mixer(x[:, a:b], state)
            pieces.append(y_piece)
        y_steps, step_state = run_steps(mixer, x)
    assert y.shape == x.shape
    torch.testing.assert_close(torch.cat(pieces, 1), y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_steps, y, rtol=1e-4, atol=1e-5)
    for a, b, c in zip(final, state, step_state):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MIXERS)
def test_an_empty_batch_mixes_to_an_empty_output(name):
    mixer, x = make(name), sequence()[:0]
    with torch.no_grad():
        y, state = mixer(x)
        y_next, _ = mixer(x, state)
    assert y.shape == x.shape and y_next.shape == x.shape
    assert all(s.shape == i.shape for s, i in zip(state, mixer.init_state(0)))


@pytest.mark.parametrize("name", MIXERS)
def test_causal(name):
    mixer, x = make(name), sequence()
    changed = x.clone()
    changed[:, 11] += 1.0
    with torch.no_grad():
        y, _ = mixer(x)
        y2, _ = mixer(changed)
    torch.testing.assert_close(y2[:, :11], y[:, :11], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y2[:, 11:], y[:, 11:])


@pytest.mark.parametrize("name", MIXERS)
def test_every_parameter_gets_a_gradient(name):
    mixer = make(name).train()
    y, state = mixer(sequence())
    (y.pow(2).mean() + sum(s.float().pow(2).mean() for s in state)).backward()
    missing = [n for n, p in mixer.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reached {missing}"


@pytest.mark.parametrize("name", MIXERS)
def test_bad_input_one_line(name):
    mixer = make(name)
    with pytest.raises(InputError, match=f"{DIM} channels"):
        mixer(torch.randn(BATCH, 5, DIM + 1))
    state = mixer.init_state(BATCH + 1)
    with pytest.raises(InputError, match="state"):
        mixer.step(torch.randn(BATCH, DIM), state)


@pytest.mark.parametrize("name", MIXERS)
def test_step_exports_with_torch_export_and_onnx(name, tmp_path):
    import onnxruntime as ort

    from seqapps.export import export_onnx

    mixer = make(name)
    step = StepModule(mixer).eval()
    state = tuple(torch.randn_like(s) * 0.1 for s in mixer.init_state(BATCH))
    x_t = torch.randn(BATCH, DIM)
    with torch.no_grad():
        expected = step(x_t, *state)
    exported = torch.export.export(step, (x_t, *state))
    for got, want in zip(exported.module()(x_t, *state), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    names = ["x_t", *[f"state_{i}" for i in range(len(state))]]
    outs = ["y_t", *[f"new_state_{i}" for i in range(len(state))]]
    diff = export_onnx(step, (x_t, *state), tmp_path / "step.onnx", names, outs)
    assert diff < 1e-4
    session = ort.InferenceSession(str(tmp_path / "step.onnx"))
    got = session.run(None, {n: t.numpy() for n, t in zip(names, (x_t, *state))})
    for g, w in zip(got, expected):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5)


class _Forward(torch.nn.Module):
    """The whole-sequence forward as ``x -> y`` (what an exported model runs)."""

    def __init__(self, mixer):
        super().__init__()
        self.mixer = mixer

    def forward(self, x):
        return self.mixer(x)[0]


# While exporting, the kernels hand over to their out-of-place forms (``gla_chunk_reference``, the
# masked running maximum of mLSTM's stabiliser): every mixer's whole-sequence forward exports.
@pytest.mark.parametrize("name", MIXERS)
def test_forward_exports_to_onnx(name, tmp_path):
    from seqapps.export import export_onnx

    diff = export_onnx(_Forward(make(name)).eval(), (sequence(),), tmp_path / "model.onnx", ["x"], ["y"])
    assert diff < 1e-4
