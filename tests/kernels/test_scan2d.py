"""Chimera's 2-D scan: the parallel form (``chunk``) against the cell-by-cell ``recurrent`` oracle
(outputs, final states, the gradients of every input), on square and non-square grids, 1 x T
and V x 1; both sweep orders; the recurrence checked by hand on a 2 x 2 grid; state carry along
time; gradcheck; extreme decays; bad input."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_harness import assert_matches, rel_rms, run_with_grads

from seqapps.errors import InputError
from seqapps.kernels.scan2d import linear_scan, scan2d, scan2d_chunk

NAMES = ("x", "delta_time", "delta_variate", "A_time", "A_variate", "A_time_from_variate", "A_variate_from_time",
         "B_time", "B_variate", "C_time", "C_variate", "initial_state")


def make_inputs(batch=2, v=3, t=5, d=4, n=3, with_state=True, dtype=torch.float32, seed=0, step_scale=1.0):
    """Random inputs for ``scan2d``: positive steps, negative decays, couplings of either sign."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def positive(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) + 0.05) * step_scale

    inputs = {"x": rand(batch, v, t, d), "delta_time": positive(batch, v, t, d),
              "delta_variate": positive(batch, v, t, d),
              "A_time": -torch.rand(d, n, generator=g, dtype=torch.float64) * 2 - 0.1,
              "A_variate": -torch.rand(d, n, generator=g, dtype=torch.float64) * 2 - 0.1,
              "A_time_from_variate": rand(d, n), "A_variate_from_time": rand(d, n),
              "B_time": rand(batch, v, t, n), "B_variate": rand(batch, v, t, n),
              "C_time": rand(batch, v, t, n), "C_variate": rand(batch, v, t, n),
              "initial_state": rand(batch, v, 2, d, n) if with_state else None}
    return {k: None if val is None else val.to(dtype) for k, val in inputs.items()}


def time_slice(inputs: dict, start: int, stop: int) -> dict:
    """The grid tensors cut to columns ``start:stop``; the rest (and no initial state) as given."""
    return {k: val[:, :, start:stop] if val.ndim == 4 else val for k, val in inputs.items() if k != "initial_state"}


GRIDS = {
    "3x5": {},
    "5x3 (swept along time)": {"v": 5, "t": 3},
    "square 4x4": {"v": 4, "t": 4},
    "1xT": {"v": 1, "t": 9},
    "1xT no state": {"v": 1, "t": 6, "with_state": False},
    "Vx1": {"v": 4, "t": 1},
    "1x1": {"v": 1, "t": 1},
    "2x17, odd lengths": {"v": 2, "t": 17},
    "6x2, batch 1, d 1, n 1": {"v": 6, "t": 2, "batch": 1, "d": 1, "n": 1},
}


@pytest.mark.parametrize("grid", list(GRIDS))
def test_chunk_matches_recurrent_float32(grid):
    assert_matches(scan2d, make_inputs(**GRIDS[grid]), "chunk", tol=1e-5)


def test_chunk_matches_recurrent_bfloat16():
    inputs = make_inputs(v=3, t=6, dtype=torch.bfloat16)
    ref = scan2d(**inputs, output_final_state=True, backend="recurrent")
    got = scan2d(**inputs, output_final_state=True, backend="chunk")
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert rel_rms(got[0], ref[0]) < 1e-2 and rel_rms(got[1], ref[1]) < 1e-5


@pytest.mark.parametrize("v, t, channel_block", [(3, 7, None), (7, 3, None), (4, 4, None), (3, 7, 1), (7, 3, 3)])
def test_both_sweeps_and_channel_blocks_equal_the_recurrence(v, t, channel_block):
    inputs = make_inputs(v=v, t=t, dtype=torch.float64)
    ref = run_with_grads(lambda **kw: scan2d(**kw, backend="recurrent"), inputs)
    for sweep in ("variates", "time"):
        got = run_with_grads(lambda **kw: scan2d_chunk(**kw, sweep=sweep, channel_block=channel_block), inputs)
        errors = {k: rel_rms(got[k], ref[k]) for k in ref}
        assert max(errors.values()) < 1e-12, (sweep, errors)


def test_recurrence_by_hand_on_a_2x2_grid():
    """One channel, one state dimension: the equations of the module docstring, in plain floats."""
    x = [[0.5, -1.0], [2.0, 0.25]]                       # x[i][j]: variate i, time j
    dt_t = [[0.1, 0.3], [0.2, 0.4]]
    dt_v = [[0.5, 0.2], [0.3, 0.1]]
    a_t, a_v, a_tv, a_vt = -1.5, -0.5, 0.7, -0.4
    b_t = [[1.0, 0.5], [-0.5, 2.0]]
    b_v = [[0.3, -1.0], [1.5, 0.2]]
    c_t = [[1.0, -2.0], [0.5, 1.0]]
    c_v = [[0.25, 1.0], [-1.0, 0.5]]
    start = [[0.2, -0.3], [0.1, 0.4]]                    # start[i] = (h_time, h_var) left of column 0
    h_time, h_var, y = {}, {}, {}
    for j in range(2):
        for i in range(2):
            hold_t = math.expm1(dt_t[i][j] * a_t) / a_t
            hold_v = math.expm1(dt_v[i][j] * a_v) / a_v
            left_time, left_var = (start[i][0], start[i][1]) if j == 0 else (h_time[i, j - 1], h_var[i, j - 1])
            above_time, above_var = (0.0, 0.0) if i == 0 else (h_time[i - 1, j], h_var[i - 1, j])
            h_time[i, j] = (math.exp(dt_t[i][j] * a_t) * left_time + hold_t * a_tv * left_var
                            + hold_t * b_t[i][j] * x[i][j])
            h_var[i, j] = (math.exp(dt_v[i][j] * a_v) * above_var + hold_v * a_vt * above_time
                           + hold_v * b_v[i][j] * x[i][j])
            y[i, j] = c_t[i][j] * h_time[i, j] + c_v[i][j] * h_var[i, j]

    def grid(values):
        return torch.tensor(values, dtype=torch.float64).view(1, 2, 2, 1)

    def scalar(value):
        return torch.tensor([[value]], dtype=torch.float64)

    inputs = dict(x=grid(x), delta_time=grid(dt_t), delta_variate=grid(dt_v), A_time=scalar(a_t),
                  A_variate=scalar(a_v), A_time_from_variate=scalar(a_tv), A_variate_from_time=scalar(a_vt),
                  B_time=grid(b_t), B_variate=grid(b_v), C_time=grid(c_t), C_variate=grid(c_v),
                  initial_state=torch.tensor(start, dtype=torch.float64).view(1, 2, 2, 1, 1))
    expected_y = torch.tensor([[y[0, 0], y[0, 1]], [y[1, 0], y[1, 1]]], dtype=torch.float64).view(1, 2, 2, 1)
    expected_state = torch.tensor([[h_time[0, 1], h_var[0, 1]], [h_time[1, 1], h_var[1, 1]]],
                                  dtype=torch.float64).view(1, 2, 2, 1, 1)
    for backend in ("recurrent", "chunk"):
        out, state = scan2d(**inputs, output_final_state=True, backend=backend)
        torch.testing.assert_close(out, expected_y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state, expected_state, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cuts", [(1,), (4,), (2, 3, 7)])
def test_cutting_along_time_and_carrying_the_state(cuts):
    inputs = make_inputs(v=3, t=9)
    whole, final = scan2d(**inputs, output_final_state=True)
    state, pieces = inputs["initial_state"], []
    for a, b in zip((0, *cuts), (*cuts, 9)):
        out, state = scan2d(**time_slice(inputs, a, b), initial_state=state, output_final_state=True)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 2), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, final, rtol=1e-5, atol=1e-6)


def test_an_empty_piece_keeps_the_state():
    inputs = make_inputs(v=2, t=4)
    out, state = scan2d(**time_slice(inputs, 0, 0), initial_state=inputs["initial_state"], output_final_state=True)
    assert out.shape == (2, 2, 0, 4)
    torch.testing.assert_close(state, inputs["initial_state"])


def test_causal_in_time_and_forward_along_the_variates():
    inputs = make_inputs(v=4, t=6)
    out, _ = scan2d(**inputs)
    changed = {**inputs, "x": inputs["x"].clone()}
    changed["x"][:, 1, 3] += 1.0  # variate 1, time 3
    out2, _ = scan2d(**changed)
    diff = (out2 - out).abs().amax(dim=(0, 3))  # [V, T]
    assert diff[:, :3].max() == 0 and diff[0].max() == 0   # nothing earlier in time, nothing above
    assert (diff[1:, 3:] > 0).all()                        # every cell below and later


def test_gradcheck_float64():
    inputs = make_inputs(batch=1, v=2, t=3, d=2, n=2, dtype=torch.float64)
    order = [inputs[k].requires_grad_() for k in NAMES]
    assert torch.autograd.gradcheck(lambda *args: scan2d_chunk(*args, output_final_state=True), order)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 64])
def test_linear_scan_against_a_loop(chunk_size):
    g = torch.Generator().manual_seed(3)
    for length in (1, 2, 5, 8, 13):
        a, drive = torch.rand(length, 4, generator=g), torch.randn(length, 4, generator=g)
        h0 = torch.randn(4, generator=g)
        h, expected = h0, []
        for k in range(length):
            h = a[k] * h + drive[k]
            expected.append(h)
        got = linear_scan(a, drive, h0, chunk_size=chunk_size)
        torch.testing.assert_close(got, torch.stack(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("length, chunk_size", [(1, None), (7, 3), (9, 3), (6, None)])
def test_linear_scan_gradcheck(length, chunk_size):
    """The hand-written backward (the adjoint scan run backwards), padding and several chunks."""
    g = torch.Generator().manual_seed(4)
    a = torch.rand(length, 3, generator=g, dtype=torch.float64).requires_grad_()
    drive = torch.randn(length, 3, generator=g, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda *args: linear_scan(*args, chunk_size=chunk_size), (a, drive, h0))


def test_extreme_decays_stay_finite():
    """Steps from ~0 to ~25 with |A| up to 2: decays down to exp(-50) per step over a long row."""
    inputs = make_inputs(batch=1, v=2, t=512, d=2, n=2)
    g = torch.Generator().manual_seed(5)
    for key in ("delta_time", "delta_variate"):
        inputs[key] = torch.exp(torch.empty(1, 2, 512, 2).uniform_(-9, 3.2, generator=g))
    result = run_with_grads(lambda **kw: scan2d(**kw), inputs)
    assert all(torch.isfinite(val).all() for val in result.values())
    short = {**time_slice(inputs, 0, 40), "initial_state": inputs["initial_state"]}
    ref = scan2d(**{k: val.double() for k, val in short.items()}, backend="recurrent")[0]
    assert rel_rms(scan2d(**short)[0], ref) < 1e-5


def test_bad_input_one_line():
    inputs = make_inputs()
    with pytest.raises(InputError, match=r"delta_time has shape \[2, 3, 4, 4\]"):
        scan2d(**{**inputs, "delta_time": inputs["delta_time"][:, :, :4]})
    with pytest.raises(InputError, match="initial_state"):
        scan2d(**{**inputs, "initial_state": inputs["initial_state"][:1]})
    with pytest.raises(InputError, match="expected \\[B, V, T, D\\]"):
        scan2d(**{**inputs, "x": inputs["x"][0]})
    with pytest.raises(InputError, match="no triton kernel"):
        scan2d(**inputs, backend="triton")
    with pytest.raises(InputError, match="sweep='rows'"):
        scan2d_chunk(**inputs, sweep="rows")
    with pytest.raises(InputError, match="channel_block=0"):
        scan2d_chunk(**inputs, channel_block=0)
