"""The Triton delta rule against the ``recurrent`` oracle: outputs, final states and every
gradient, on small shapes run by the Triton interpreter on the CPU (or on a GPU when one is
there and ``TRITON_INTERPRET=0`` is set)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_harness import assert_matches, rel_rms, triton_test_device

DEVICE = triton_test_device()

from seqapps.kernels.delta_rule import delta_rule  # noqa: E402
from seqapps.kernels.triton.delta_rule import delta_rule_triton  # noqa: E402

FP32_TOL = 1e-5
LOW_PRECISION_TOL = 2e-2


def make_inputs(b: int, t: int, h: int, dk: int, dv: int, gated: bool = True, with_initial: bool = True,
                dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Random delta-rule inputs: unit-norm keys, ``beta`` over [0, 2] (negative eigenvalues
    included), log decays in [-1, 0], an initial state of unit scale."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    inputs = {
        "q": rand(b, t, h, dk),
        "k": F.normalize(rand(b, t, h, dk), dim=-1),
        "v": rand(b, t, h, dv),
        "beta": 2 * torch.rand(b, t, h, generator=gen),
        "g": -torch.rand(b, t, h, generator=gen) if gated else None,
        "initial_state": rand(b, h, dk, dv) if with_initial else None,
    }
    return {name: None if x is None else x.to(DEVICE, dtype) for name, x in inputs.items()}


def with_checkpoints_every(steps: int):
    """``delta_rule`` whose triton backend saves the state every ``steps`` steps, so that short
    test sequences cross several checkpoints in the backward."""

    def fn(q, k, v, beta, g, initial_state, output_final_state, backend):
        if backend != "triton":
            return delta_rule(q, k, v, beta, g, initial_state=initial_state,
                              output_final_state=output_final_state, backend=backend)
        return delta_rule_triton(q, k, v, beta, g, q.shape[-1] ** -0.5, initial_state, output_final_state,
                                 checkpoint_every=steps)

    return fn


@pytest.mark.parametrize(
    ("b", "t", "h", "dk", "dv", "gated", "with_initial"),
    [
        pytest.param(1, 1, 1, 8, 8, True, True, id="T1-H1"),
        pytest.param(2, 37, 2, 12, 20, True, True, id="T37-K12-V20-gated"),
        pytest.param(1, 23, 3, 16, 16, False, False, id="T23-ungated-no-initial"),
        pytest.param(1, 19, 2, 32, 40, True, False, id="two-value-blocks"),
    ],
)
def test_matches_recurrent_float32(b, t, h, dk, dv, gated, with_initial):
    inputs = make_inputs(b, t, h, dk, dv, gated, with_initial)
    errors = assert_matches(delta_rule, inputs, "triton", FP32_TOL)
    assert "d_beta" in errors and ("d_g" in errors) == gated and ("d_initial_state" in errors) == with_initial


def test_backward_across_many_checkpoints():
    """T = 37 with a checkpoint every 8 steps: five replayed chunks, the last one partial."""
    inputs = make_inputs(1, 37, 2, 16, 24)
    assert_matches(with_checkpoints_every(8), inputs, "triton", FP32_TOL)


def test_extreme_gates():
    """Log decays from -1e-4 to -20 per step (log-uniform): finite, and still the oracle's
    outputs and gradients."""
    inputs = make_inputs(1, 24, 2, 8, 8)
    gen = torch.Generator().manual_seed(1)
    log_magnitude = torch.empty(1, 24, 2).uniform_(-4 * 2.3026, 2.9957, generator=gen)  # 1e-4 .. 20
    inputs["g"] = -log_magnitude.exp().to(DEVICE)
    assert_matches(delta_rule, inputs, "triton", FP32_TOL)  # a NaN fails the comparison too


@pytest.mark.slow
def test_matches_recurrent_longest_shape():
    """The largest shape the interpreter allows in reasonable time: T = 70 crosses the default
    checkpoint interval (64), with K ≠ V."""
    inputs = make_inputs(1, 70, 2, 32, 24)
    assert_matches(delta_rule, inputs, "triton", FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_recurrent_low_precision(dtype):
    inputs = make_inputs(1, 21, 2, 16, 12, dtype=dtype)
    assert_matches(delta_rule, inputs, "triton", LOW_PRECISION_TOL)


@pytest.mark.parametrize("loss_on", ["output", "final_state"])
def test_gradients_when_only_one_result_is_used(loss_on):
    """Backward with no gradient arriving for the final state (not returned) or for the
    output (unused), the initial state a constant."""
    inputs = make_inputs(1, 13, 2, 8, 8)
    initial_state = inputs.pop("initial_state")
    grads = {}
    for backend in ("recurrent", "triton"):
        leaves = {name: x.clone().requires_grad_() for name, x in inputs.items()}
        o, state = delta_rule(**leaves, initial_state=initial_state, backend=backend,
                              output_final_state=loss_on == "final_state")
        loss = (o * o).sum() if loss_on == "output" else (state * state).sum()
        loss.backward()
        # A leaf that cannot reach the loss (q when only the state is used) may get no
        # gradient from the oracle and zeros from the kernel.
        grads[backend] = {name: torch.zeros_like(x) if x.grad is None else x.grad for name, x in leaves.items()}
    for name, ref in grads["recurrent"].items():
        assert rel_rms(grads["triton"][name], ref) <= FP32_TOL, name


def test_carrying_the_state_equals_one_pass():
    """Cutting the sequence at any point and passing the final state on gives the outputs and
    the final state of the whole sequence (also the no-grad forward path)."""
    inputs = make_inputs(1, 29, 2, 16, 8)
    whole_o, whole_state = delta_rule(**inputs, output_final_state=True, backend="triton")
    state = inputs["initial_state"]
    pieces = []
    with torch.no_grad():
        for start, stop in [(0, 1), (1, 12), (12, 29)]:
            piece = {name: inputs[name][:, start:stop] for name in ("q", "k", "v", "beta", "g")}
            o, state = delta_rule(**piece, initial_state=state, output_final_state=True, backend="triton")
            pieces.append(o)
    assert rel_rms(torch.cat(pieces, dim=1), whole_o) <= FP32_TOL
    assert rel_rms(state, whole_state) <= FP32_TOL


def test_final_state_is_float32_and_output_keeps_the_input_dtype():
    inputs = make_inputs(1, 5, 1, 8, 8, dtype=torch.bfloat16)
    o, state = delta_rule(**inputs, output_final_state=True, backend="triton")
    assert o.dtype == torch.bfloat16 and o.shape == (1, 5, 1, 8)
    assert state.dtype == torch.float32 and state.shape == (1, 1, 8, 8)
    o, state = delta_rule(**inputs, backend="triton")
    assert state is None
