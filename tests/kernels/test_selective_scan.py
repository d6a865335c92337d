"""The ``chunk`` backend of the selective scan against the ``recurrent`` oracle: outputs, final
states and every gradient, over shapes, options and dtypes; state carry; extreme step sizes;
gradcheck; bad input; torch.compile and torch.export."""

from __future__ import annotations

import pytest
import torch
from kernel_harness import assert_matches, rel_rms, run_with_grads

from seqapps.errors import InputError
from seqapps.kernels.selective_scan import selective_scan

TENSORS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(batch=2, t=37, d=6, n=4, groups=None, with_d=True, with_z=True, with_bias=True,
                softplus=True, negative=False, with_state=True, chunk_size=8, dtype=torch.float32, seed=0):
    """Random inputs for ``selective_scan`` (``B, C [B, T, N]`` when ``groups`` is None, else
    ``[B, T, G, N]``); ``delta`` is kept positive when it is not passed through softplus."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    bc_shape = (batch, t, n) if groups is None else (batch, t, groups, n)
    delta = rand(batch, t, d) if softplus else torch.rand(batch, t, d, generator=g, dtype=torch.float64) + 0.05
    inputs = {"u": rand(batch, t, d), "delta": delta, "A": -torch.rand(d, n, generator=g, dtype=torch.float64) * 2,
              "B": rand(*bc_shape), "C": rand(*bc_shape), "D": rand(d) if with_d else None,
              "z": rand(batch, t, d) if with_z else None, "delta_bias": rand(d) * 0.5 if with_bias else None,
              "initial_state": rand(batch, d, n) if with_state else None}
    inputs = {k: None if v is None else v.to(dtype) for k, v in inputs.items()}
    return {**inputs, "delta_softplus": softplus, "negative_eigenvalues": negative, "chunk_size": chunk_size}


CASES = {
    "default": {},
    "T=1": {"t": 1},
    "T=1 no state": {"t": 1, "with_state": False},
    "T multiple of chunk": {"t": 32},
    "T below chunk": {"t": 5},
    "chunk of 1": {"t": 9, "chunk_size": 1},
    "chunk 64, T=130": {"t": 130, "chunk_size": 64},
    "grouped B, C": {"groups": 3},
    "one group": {"groups": 1, "d": 4},
    "bare": {"with_d": False, "with_z": False, "with_bias": False, "softplus": False, "with_state": False},
    "no softplus, bias": {"softplus": False},
    "D only": {"with_z": False, "with_bias": False},
    "negative eigenvalues": {"negative": True},
    "negative, grouped, T=1": {"negative": True, "groups": 2, "t": 1},
    "negative, bare": {"negative": True, "with_d": False, "with_z": False, "with_bias": False,
                       "with_state": False, "t": 50, "chunk_size": 16},
    "batch 1, d 1, n 1": {"batch": 1, "d": 1, "n": 1, "t": 20},
}


@pytest.mark.parametrize("case", list(CASES))
def test_chunk_matches_recurrent_float32(case):
    assert_matches(selective_scan, make_inputs(**CASES[case]), "chunk", tol=1e-5)


@pytest.mark.parametrize("case", ["default", "grouped B, C", "negative eigenvalues", "T=1"])
def test_chunk_matches_recurrent_bfloat16(case):
    inputs = make_inputs(**CASES[case], dtype=torch.bfloat16)
    errors = assert_matches(selective_scan, inputs, "chunk", tol=1e-2)
    assert errors["output"] < 1e-2


def test_bfloat16_accumulates_in_float32():
    inputs = make_inputs(t=64, dtype=torch.bfloat16)
    y, state = selective_scan(**inputs, output_final_state=True, backend="chunk")
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    exact, _ = selective_scan(**{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()},
                              backend="recurrent")
    assert rel_rms(y, exact) < 1e-2


def test_no_final_state_unless_asked():
    y, state = selective_scan(**make_inputs(), backend="chunk")
    assert state is None and y.shape == (2, 37, 6)


@pytest.mark.parametrize("cut", [1, 7, 8, 9, 36])
@pytest.mark.parametrize("negative", [False, True])
def test_cutting_the_sequence_and_carrying_the_state(cut, negative):
    inputs = make_inputs(t=37, negative=negative, groups=2)
    whole, whole_state = selective_scan(**inputs, output_final_state=True, backend="chunk")
    per_time = {k: v for k, v in inputs.items() if k in ("u", "delta", "B", "C", "z")}
    first = {**inputs, **{k: v[:, :cut] for k, v in per_time.items()}}
    second = {**inputs, **{k: v[:, cut:] for k, v in per_time.items()}}
    y1, state = selective_scan(**first, output_final_state=True, backend="chunk")
    y2, final = selective_scan(**{**second, "initial_state": state}, output_final_state=True, backend="chunk")
    assert rel_rms(torch.cat([y1, y2], 1), whole) < 1e-6
    assert rel_rms(final, whole_state) < 1e-6


@pytest.mark.parametrize("negative", [False, True])
def test_extreme_step_sizes_over_a_long_sequence(negative):
    """``Δ A`` log-uniform in ``[-20, -1e-4]``, a few steps far below (transitions exactly 0),
    over T = 8192: finite everywhere, equal to the float64 recurrence."""
    g = torch.Generator().manual_seed(1)
    batch, t, d, n = 1, 8192, 3, 4
    A = -(1 + torch.rand(d, n, generator=g))                                   # [-2, -1]
    log_dt = torch.empty(batch, t, d).uniform_(torch.tensor(1e-4).log().item(), torch.tensor(10.0).log().item(),
                                               generator=g)
    delta = log_dt.exp()
    delta[:, 5000:5003] = 1e4                                                  # exp(Δ A) == 0
    inputs = {"u": torch.randn(batch, t, d, generator=g), "delta": delta, "A": A,
              "B": torch.randn(batch, t, n, generator=g), "C": torch.randn(batch, t, n, generator=g),
              "D": torch.randn(d, generator=g), "initial_state": torch.randn(batch, d, n, generator=g),
              "negative_eigenvalues": negative}
    got = run_with_grads(lambda **kw: selective_scan(**kw, backend="chunk"), inputs)
    for name, value in got.items():
        assert torch.isfinite(value).all(), f"{name} is not finite"

    as_double = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        exact, exact_state = selective_scan(**as_double, output_final_state=True, backend="recurrent")
    assert rel_rms(got["output"], exact) < 1e-5
    assert rel_rms(got["output"][:, -200:], exact[:, -200:]) < 1e-5
    assert rel_rms(got["final_state"], exact_state) < 1e-5

    short = {k: v[:, 4900:5100] if k in ("u", "delta", "B", "C") else v for k, v in inputs.items()}
    got_short = run_with_grads(lambda **kw: selective_scan(**kw, backend="chunk"), short)
    short_double = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in short.items()}
    exact_short = run_with_grads(lambda **kw: selective_scan(**kw, backend="recurrent"), short_double)
    errors = {k: rel_rms(got_short[k], exact_short[k]) for k in exact_short}
    assert all(e < 1e-4 for e in errors.values()), errors


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("t, chunk_size, groups", [(7, 3, 2), (1, 4, None)])
def test_gradcheck_float64(negative, t, chunk_size, groups):
    inputs = make_inputs(batch=2, t=t, d=4, n=3, groups=groups, negative=negative, chunk_size=chunk_size,
                         dtype=torch.float64)
    names = [k for k in TENSORS if inputs[k] is not None]
    options = {k: v for k, v in inputs.items() if k not in TENSORS}

    def scan(*tensors):
        return selective_scan(**dict(zip(names, tensors)), **options, output_final_state=True, backend="chunk")

    leaves = [inputs[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(scan, leaves)


@pytest.mark.parametrize("change, message", [
    ({"chunk_size": 0}, "chunk_size=0"),
    ({"chunk_size": 2.5}, "chunk_size=2.5"),
    ({"delta": torch.zeros(2, 36, 6)}, "delta has shape"),
    ({"A": torch.zeros(5, 4)}, "A has shape"),
    ({"B": torch.zeros(2, 37, 4, 4), "C": torch.zeros(2, 37, 4, 4)}, "do not divide"),
    ({"C": torch.zeros(2, 37, 5)}, "C has shape"),
    ({"initial_state": torch.zeros(2, 6, 3)}, "initial_state has shape"),
    ({"D": torch.zeros(5)}, "D has shape"),
    ({"A": torch.zeros(6)}, r"A has shape \[6\]; expected \[6, 4\]"),
    ({"u": torch.zeros(36, 6)}, "u has shape"),
    ({"z": torch.zeros(2, 37, 6, dtype=torch.bool)}, "z has dtype torch.bool"),
])
def test_bad_input_is_one_line(change, message):
    with pytest.raises(InputError, match=message) as raised:
        selective_scan(**{**make_inputs(), **change}, backend="chunk")
    assert "\n" not in str(raised.value)


class _Scan(torch.nn.Module):
    def forward(self, u, delta, A, B, C, D, z, initial_state):
        return selective_scan(u, delta, A, B, C, D, z, delta_softplus=True, negative_eigenvalues=True,
                              initial_state=initial_state, output_final_state=True, backend="chunk",
                              chunk_size=4)


def _module_inputs():
    inputs = make_inputs(batch=1, t=10, d=4, n=3, groups=2, with_bias=False)
    return tuple(inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "initial_state"))


@pytest.mark.slow
def test_under_torch_compile():
    args = _module_inputs()
    eager_leaves = [a.clone().requires_grad_() for a in args]
    compiled_leaves = [a.clone().requires_grad_() for a in args]
    y, state = _Scan()(*eager_leaves)
    (y.sum() + state.sum()).backward()
    y_c, state_c = torch.compile(_Scan(), fullgraph=True)(*compiled_leaves)
    (y_c.sum() + state_c.sum()).backward()
    assert rel_rms(y_c, y) < 1e-6 and rel_rms(state_c, state) < 1e-6
    for eager, compiled in zip(eager_leaves, compiled_leaves):
        assert rel_rms(compiled.grad, eager.grad) < 1e-5


def test_under_torch_export():
    args = _module_inputs()
    exported = torch.export.export(_Scan(), args)
    y, state = exported.module()(*args)
    y_ref, state_ref = _Scan()(*args)
    assert rel_rms(y, y_ref) < 1e-6 and rel_rms(state, state_ref) < 1e-6
